from syncd._pb.stockade.sync.v1 import sync_pb2 as _sync_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LocalHello(_message.Message):
    __slots__ = ("protocol", "node_id", "role", "epoch")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    node_id: str
    role: str
    epoch: int
    def __init__(self, protocol: _Optional[int] = ..., node_id: _Optional[str] = ..., role: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class LocalDelta(_message.Message):
    __slots__ = ("op", "record")
    OP_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    op: _sync_pb2.Op
    record: _sync_pb2.FlowRecord
    def __init__(self, op: _Optional[_Union[_sync_pb2.Op, str]] = ..., record: _Optional[_Union[_sync_pb2.FlowRecord, _Mapping]] = ...) -> None: ...

class LocalBatch(_message.Message):
    __slots__ = ("deltas",)
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.RepeatedCompositeFieldContainer[LocalDelta]
    def __init__(self, deltas: _Optional[_Iterable[_Union[LocalDelta, _Mapping]]] = ...) -> None: ...

class ReplicaUpdate(_message.Message):
    __slots__ = ("op", "record")
    OP_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    op: _sync_pb2.Op
    record: _sync_pb2.FlowRecord
    def __init__(self, op: _Optional[_Union[_sync_pb2.Op, str]] = ..., record: _Optional[_Union[_sync_pb2.FlowRecord, _Mapping]] = ...) -> None: ...

class ReplicaBatch(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[ReplicaUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[ReplicaUpdate, _Mapping]]] = ...) -> None: ...

class TableRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    def __init__(self, request_id: _Optional[int] = ...) -> None: ...

class TableChunk(_message.Message):
    __slots__ = ("request_id", "records", "last")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    records: _containers.RepeatedCompositeFieldContainer[_sync_pb2.FlowRecord]
    last: bool
    def __init__(self, request_id: _Optional[int] = ..., records: _Optional[_Iterable[_Union[_sync_pb2.FlowRecord, _Mapping]]] = ..., last: _Optional[bool] = ...) -> None: ...

class LocalFrame(_message.Message):
    __slots__ = ("hello", "local", "replicas", "table_request", "table_chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TABLE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    TABLE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: LocalHello
    local: LocalBatch
    replicas: ReplicaBatch
    table_request: TableRequest
    table_chunk: TableChunk
    def __init__(self, hello: _Optional[_Union[LocalHello, _Mapping]] = ..., local: _Optional[_Union[LocalBatch, _Mapping]] = ..., replicas: _Optional[_Union[ReplicaBatch, _Mapping]] = ..., table_request: _Optional[_Union[TableRequest, _Mapping]] = ..., table_chunk: _Optional[_Union[TableChunk, _Mapping]] = ...) -> None: ...
