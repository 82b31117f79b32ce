from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OP_UNSPECIFIED: _ClassVar[Op]
    OP_CREATE: _ClassVar[Op]
    OP_UPDATE: _ClassVar[Op]
    OP_DELETE: _ClassVar[Op]
OP_UNSPECIFIED: Op
OP_CREATE: Op
OP_UPDATE: Op
OP_DELETE: Op

class FlowRecord(_message.Message):
    __slots__ = ("key", "proto", "family", "orig_src", "orig_sport", "orig_dst", "orig_dport", "state", "assured", "timeout", "origin", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PROTO_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ORIG_SRC_FIELD_NUMBER: _ClassVar[int]
    ORIG_SPORT_FIELD_NUMBER: _ClassVar[int]
    ORIG_DST_FIELD_NUMBER: _ClassVar[int]
    ORIG_DPORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ASSURED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    proto: int
    family: int
    orig_src: bytes
    orig_sport: int
    orig_dst: bytes
    orig_dport: int
    state: str
    assured: bool
    timeout: float
    origin: str
    version: int
    def __init__(self, key: _Optional[bytes] = ..., proto: _Optional[int] = ..., family: _Optional[int] = ..., orig_src: _Optional[bytes] = ..., orig_sport: _Optional[int] = ..., orig_dst: _Optional[bytes] = ..., orig_dport: _Optional[int] = ..., state: _Optional[str] = ..., assured: _Optional[bool] = ..., timeout: _Optional[float] = ..., origin: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("op", "origin", "seq", "record", "created")
    OP_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    op: Op
    origin: str
    seq: int
    record: FlowRecord
    created: float
    def __init__(self, op: _Optional[_Union[Op, str]] = ..., origin: _Optional[str] = ..., seq: _Optional[int] = ..., record: _Optional[_Union[FlowRecord, _Mapping]] = ..., created: _Optional[float] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("origin", "epoch", "deltas")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    deltas: _containers.RepeatedCompositeFieldContainer[Delta]
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., deltas: _Optional[_Iterable[_Union[Delta, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("origin", "epoch", "seq", "gap")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    seq: int
    gap: bool
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., gap: _Optional[bool] = ...) -> None: ...

class OriginCursor(_message.Message):
    __slots__ = ("origin", "epoch", "seq")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    seq: int
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "node_id", "cluster_id", "epoch", "seen")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    node_id: str
    cluster_id: str
    epoch: int
    seen: _containers.RepeatedCompositeFieldContainer[OriginCursor]
    def __init__(self, protocol: _Optional[int] = ..., node_id: _Optional[str] = ..., cluster_id: _Optional[str] = ..., epoch: _Optional[int] = ..., seen: _Optional[_Iterable[_Union[OriginCursor, _Mapping]]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("counter",)
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    counter: int
    def __init__(self, counter: _Optional[int] = ...) -> None: ...

class ResyncRequired(_message.Message):
    __slots__ = ("origin", "epoch", "lost_upto")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOST_UPTO_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    lost_upto: int
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., lost_upto: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("origin", "cursor", "request_id", "max_records", "order")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    origin: str
    cursor: bytes
    request_id: int
    max_records: int
    order: int
    def __init__(self, origin: _Optional[str] = ..., cursor: _Optional[bytes] = ..., request_id: _Optional[int] = ..., max_records: _Optional[int] = ..., order: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("origin", "epoch", "request_id", "base_seq", "cursor", "records", "next_cursor", "last", "order")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_SEQ_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    request_id: int
    base_seq: int
    cursor: bytes
    records: _containers.RepeatedCompositeFieldContainer[FlowRecord]
    next_cursor: bytes
    last: bool
    order: int
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., request_id: _Optional[int] = ..., base_seq: _Optional[int] = ..., cursor: _Optional[bytes] = ..., records: _Optional[_Iterable[_Union[FlowRecord, _Mapping]]] = ..., next_cursor: _Optional[bytes] = ..., last: _Optional[bool] = ..., order: _Optional[int] = ...) -> None: ...

class DigestRequest(_message.Message):
    __slots__ = ("buckets", "origins")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    buckets: int
    origins: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, buckets: _Optional[int] = ..., origins: _Optional[_Iterable[str]] = ...) -> None: ...

class OriginDigest(_message.Message):
    __slots__ = ("origin", "count", "hashes")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    origin: str
    count: int
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, origin: _Optional[str] = ..., count: _Optional[int] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class DigestReply(_message.Message):
    __slots__ = ("origins",)
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    origins: _containers.RepeatedCompositeFieldContainer[OriginDigest]
    def __init__(self, origins: _Optional[_Iterable[_Union[OriginDigest, _Mapping]]] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("key", "record", "tomb_version", "tomb_origin")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    TOMB_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOMB_ORIGIN_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    record: FlowRecord
    tomb_version: int
    tomb_origin: str
    def __init__(self, key: _Optional[bytes] = ..., record: _Optional[_Union[FlowRecord, _Mapping]] = ..., tomb_version: _Optional[int] = ..., tomb_origin: _Optional[str] = ...) -> None: ...

class RepairRequest(_message.Message):
    __slots__ = ("origin", "buckets", "bucket_ids", "entries", "as_of_version", "node_id")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_IDS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    AS_OF_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    origin: str
    buckets: int
    bucket_ids: _containers.RepeatedScalarFieldContainer[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    as_of_version: int
    node_id: str
    def __init__(self, origin: _Optional[str] = ..., buckets: _Optional[int] = ..., bucket_ids: _Optional[_Iterable[int]] = ..., entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., as_of_version: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class RepairReply(_message.Message):
    __slots__ = ("entries", "as_of_version")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    AS_OF_VERSION_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    as_of_version: int
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., as_of_version: _Optional[int] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("hello", "batch", "ack", "heartbeat", "resync_required", "snapshot_request", "snapshot_chunk")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: Batch
    ack: Ack
    heartbeat: Heartbeat
    resync_required: ResyncRequired
    snapshot_request: SnapshotRequest
    snapshot_chunk: SnapshotChunk
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., resync_required: _Optional[_Union[ResyncRequired, _Mapping]] = ..., snapshot_request: _Optional[_Union[SnapshotRequest, _Mapping]] = ..., snapshot_chunk: _Optional[_Union[SnapshotChunk, _Mapping]] = ...) -> None: ...
