"""The syncd end of the local link to the filter (``local.proto``).

Framing: each ``LocalFrame`` is preceded by its length as a 4-byte
big-endian unsigned integer; a length above :data:`MAX_FRAME` (4 MiB) or
bytes that do not parse are a protocol error (:class:`BadMessage`) and close
the connection.  :func:`encode_frame` and :class:`FrameDecoder` are pure and
shared with the filter side.

Conversation (one filter connection at a time; a new one replaces the old):

* both ends send ``LocalHello`` first (protocol 1, the same node id, role
  ``filter``/``syncd``, the sender's epoch);
* filter -> syncd ``LocalBatch``: the node's own changes.  The whole batch is
  validated (every record parses, names this node as origin) before any of
  it is applied; each delta is then versioned, applied to the store and
  pushed to every peer's outbox (``on_deltas``);
* filter -> syncd ``TableRequest``: syncd answers with ``TableChunk`` pages of
  everything in the store (own flows and replicas), ``last=true`` on the
  final one.  The table is read when the request arrives, so replica
  changes queued before it are dropped (the table has them) and the ones
  after it are sent after its last page;
* syncd -> filter ``ReplicaBatch``: the peers' changes as sessions apply
  them (``UPDATE`` = install or replace the record, ``DELETE`` = remove it).

Bounds: replica changes wait in a queue of ``queue_limit`` updates.  When it
would overflow (a slow filter), the queue is dropped, counted, and the
connection closed: the filter reconnects and sends a ``TableRequest``, which
brings it up to date.  With no filter connected, changes are not queued at
all (counted as skipped): a filter always starts with a ``TableRequest``.

The filter's side of the contract (implemented in ``node``): on every
connection send Hello; if it holds flows (it outlived a syncd restart) send
them all as CREATE deltas; then send a TableRequest and install what comes
back: every record of another origin as a replica; records of its own origin
that it does not hold are installed if the filter just started (empty table)
and otherwise answered with a DELETE (they ended while syncd was away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from syncd._pb.stockade.sync.v1 import local_pb2 as lpb
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, ConfigError
from syncd.records import FlowRecord, Op, field_bytes, record_wire, records_from_pb, varint
from syncd.replica import Change, ChangeKind

log = logging.getLogger("syncd.local")

PROTOCOL: Final = 1
MAX_FRAME: Final = 4 * 1024 * 1024
PAGE_RECORDS: Final = 1024  # records per TableChunk and updates per ReplicaBatch
_HEADER: Final = struct.Struct(">I")
_OPS: Final = {pb.OP_CREATE: Op.CREATE, pb.OP_UPDATE: Op.UPDATE, pb.OP_DELETE: Op.DELETE}
_READ_SIZE: Final = 64 * 1024
# Deltas validated or applied between two yields to the event loop: a read
# returns at once while data is buffered, so without yielding a busy filter
# would starve the peer streams (no heartbeats, stalled writes).
SLICE: Final = 512

LocalDeltas = list[tuple[Op, FlowRecord]]


def encode_frame(frame: lpb.LocalFrame, max_frame: int = MAX_FRAME) -> bytes:
    data = frame.SerializeToString()
    if len(data) > max_frame:
        raise BadMessage("oversized-frame", f"{len(data)} bytes > {max_frame}")
    return _HEADER.pack(len(data)) + data


class FrameDecoder:
    """Bytes in, whole frames out; keeps a partial frame between calls."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._max = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[lpb.LocalFrame]:
        """Frames completed by ``data``; :class:`BadMessage` on an oversized or garbled one."""
        buf = self._buffer
        buf += data
        frames: list[lpb.LocalFrame] = []
        offset = 0
        while len(buf) - offset >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, offset)
            if size > self._max:
                raise BadMessage("oversized-frame", f"{size} bytes > {self._max}")
            end = offset + _HEADER.size + size
            if len(buf) < end:
                break
            try:
                frame = lpb.LocalFrame.FromString(bytes(buf[offset + _HEADER.size : end]))
            except DecodeError as e:
                raise BadMessage("bad-frame", f"does not parse: {e}") from None
            frame.DiscardUnknownFields()  # records keep their encoding (FlowRecord.wire)
            frames.append(frame)
            offset = end
        del buf[:offset]
        return frames


def deltas_from_batch(deltas: Iterable[lpb.LocalDelta], node_id: str) -> LocalDeltas:
    """Validate a LocalBatch's deltas (every record ours); :class:`BadMessage` if any is bad."""
    ops: list[Op] = []
    msgs = []
    for delta in deltas:
        op = _OPS.get(delta.op)
        if op is None or not delta.HasField("record"):
            raise BadMessage("bad-local-delta", f"op {delta.op} or missing record")
        ops.append(op)
        msgs.append(delta.record)
    records = records_from_pb(msgs)  # every record, in one loop
    for record in records:
        if record.origin != node_id:
            raise BadMessage("bad-local-delta", f"origin {record.origin!r} is not {node_id}")
    return list(zip(ops, records, strict=True))


# ReplicaUpdate op field (1) by change kind: REMOVE -> DELETE, UPSERT -> UPDATE.
_UPDATE_OP: Final = {
    ChangeKind.REMOVE: b"\x08" + varint(pb.OP_DELETE),
    ChangeKind.UPSERT: b"\x08" + varint(pb.OP_UPDATE),
}


def replica_batch_bytes(changes: Sequence[Change]) -> bytes:
    """A serialized LocalFrame{replicas} of ``changes``, assembled from the records' wire forms.

    LocalFrame.replicas (3) > ReplicaBatch.updates (1) > ReplicaUpdate{op (1), record (2)}.
    """
    updates = b"".join([
        field_bytes(b"\x0a", _UPDATE_OP[c.kind] + field_bytes(b"\x12", record_wire(c.record)))
        for c in changes
    ])  # fmt: skip
    return field_bytes(b"\x1a", updates)


def replica_batch(changes: Sequence[Change]) -> lpb.LocalFrame:
    return lpb.LocalFrame.FromString(replica_batch_bytes(changes))


def table_chunk_bytes(request_id: int, records: Sequence[FlowRecord], last: bool) -> bytes:
    """A serialized LocalFrame{table_chunk}: request_id (1), records (2), last (3)."""
    chunk = b"\x08" + varint(request_id) if request_id else b""
    chunk += b"".join([field_bytes(b"\x12", record_wire(r)) for r in records])
    if last:
        chunk += b"\x18\x01"
    return field_bytes(b"\x2a", chunk)


def frame_bytes(body: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """A serialized LocalFrame with its length prefix (:func:`encode_frame` for bytes)."""
    if len(body) > max_frame:
        raise BadMessage("oversized-frame", f"{len(body)} bytes > {max_frame}")
    return _HEADER.pack(len(body)) + body


def _check_hello(hello: lpb.LocalHello, node_id: str) -> None:
    if hello.protocol != PROTOCOL or hello.role != "filter" or hello.node_id != node_id:
        raise BadMessage(
            "bad-hello",
            f"protocol {hello.protocol}, role {hello.role[:20]!r}, node {hello.node_id[:40]!r}",
        )


@dataclass(frozen=True, slots=True)
class LocalStats:
    connected: bool  # a filter is connected and said Hello
    connections: int
    replaced: int  # connections closed because a newer one arrived
    closed: Mapping[str, int]  # connections closed by us, by reason
    batches: int  # LocalBatch frames applied
    deltas: int  # local deltas in them
    table_requests: int
    table_records: int  # records sent in TableChunks
    replica_updates: int  # updates sent in ReplicaBatches
    queued: int  # updates waiting for the filter now
    skipped: int  # replica changes not queued: no filter connected
    overflows: int  # queue overflows (the connection was closed to force a reload)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.hello = False
        self.queue: deque[Change] = deque()
        self.table: tuple[int, list[FlowRecord]] | None = None
        self.wake = asyncio.Event()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.wake.set()
        self.writer.close()


class LocalServer:
    """Serves one filter on a unix socket; see the module docstring."""

    def __init__(
        self,
        path: str,
        node_id: str,
        epoch: int,
        on_deltas: Callable[[LocalDeltas], None],
        table: Callable[[], list[FlowRecord]],
        queue_limit: int,
    ) -> None:
        self._path = path
        self._node_id = node_id
        self._epoch = epoch
        self._on_deltas = on_deltas
        self._table = table
        self._limit = queue_limit
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self._conn: _Conn | None = None
        self._counts = Counter[str]()
        self._closed = Counter[str]()

    async def start(self) -> None:
        sock = bind_unix_socket(self._path)
        self._inode = os.stat(self._path).st_ino
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self._path).st_ino == self._inode:
                os.unlink(self._path)

    # --- replica changes to the filter -------------------------------------------------

    def replica_changes(self, changes: Sequence[Change]) -> None:
        conn = self._conn
        if conn is None:
            self._counts["skipped"] += len(changes)
            return
        if len(conn.queue) + len(changes) > self._limit:
            self._counts["overflows"] += 1
            conn.queue.clear()
            self._close(conn, "overflow")
            return
        conn.queue.extend(changes)
        conn.wake.set()

    # --- one connection -----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        if self._conn is not None:
            self._counts["replaced"] += 1
            self._conn.close()
        self._conn = conn
        self._counts["connections"] += 1
        hello = lpb.LocalHello(
            protocol=PROTOCOL, node_id=self._node_id, role="syncd", epoch=self._epoch
        )
        writer.write(encode_frame(lpb.LocalFrame(hello=hello)))
        sender = asyncio.create_task(self._send_loop(conn))
        try:
            await self._read_loop(conn)
        except BadMessage as e:
            log.warning("filter connection closed: %s", e)
            self._close(conn, e.reason)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
            if self._conn is conn:
                self._conn = None
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _close(self, conn: _Conn, reason: str) -> None:
        self._closed[reason] += 1
        conn.close()
        if self._conn is conn:
            self._conn = None  # changes from now on are skipped, not queued

    async def _read_loop(self, conn: _Conn) -> None:
        decoder = FrameDecoder()
        while not conn.closed:
            data = await conn.reader.read(_READ_SIZE)
            if not data:
                return
            for i, frame in enumerate(decoder.feed(data)):
                if i:
                    # Between frames of one read, the pump and the rest run.
                    # Not after the last: the next read waits for data anyway
                    # (and one more loop pass was a delta's wait at 1k/s).
                    await asyncio.sleep(0)
                await self._on_frame(conn, frame)

    async def _on_frame(self, conn: _Conn, frame: lpb.LocalFrame) -> None:
        kind = frame.WhichOneof("body")
        if not conn.hello:
            if kind != "hello":
                raise BadMessage("no-hello", f"first frame is {kind}")
            _check_hello(frame.hello, self._node_id)
            conn.hello = True
            log.info("filter connected (epoch %d)", frame.hello.epoch)
        elif kind == "local":
            await self._on_batch(frame.local)
        elif kind == "table_request":
            self._counts["table_requests"] += 1
            conn.queue.clear()  # the table read now already has every queued change
            conn.table = (frame.table_request.request_id, self._table())
            conn.wake.set()
        else:
            raise BadMessage("unexpected-frame", f"{kind} from the filter")

    async def _on_batch(self, batch: lpb.LocalBatch) -> None:
        """Validate all of it, then apply it; both in slices, yielding in between."""
        deltas: LocalDeltas = []
        for start in range(0, len(batch.deltas), SLICE):
            deltas += deltas_from_batch(batch.deltas[start : start + SLICE], self._node_id)
            if start + SLICE < len(batch.deltas):
                await asyncio.sleep(0)
        self._counts["batches"] += 1
        self._counts["deltas"] += len(deltas)
        for start in range(0, len(deltas), SLICE):
            self._on_deltas(deltas[start : start + SLICE])
            if start + SLICE < len(deltas):
                await asyncio.sleep(0)

    async def _send_loop(self, conn: _Conn) -> None:
        while not conn.closed:
            await conn.wake.wait()
            conn.wake.clear()
            if conn.table is not None:
                request_id, records = conn.table
                conn.table = None
                await self._send_table(conn, request_id, records)
            while conn.queue and not conn.closed and conn.table is None:
                batch = [conn.queue.popleft() for _ in range(min(PAGE_RECORDS, len(conn.queue)))]
                conn.writer.write(frame_bytes(replica_batch_bytes(batch)))
                self._counts["replica_updates"] += len(batch)
                await conn.writer.drain()
                await asyncio.sleep(0)  # drain returns at once below its high-water mark

    async def _send_table(self, conn: _Conn, request_id: int, records: list[FlowRecord]) -> None:
        for start in range(0, max(len(records), 1), PAGE_RECORDS):
            page = records[start : start + PAGE_RECORDS]
            last = start + PAGE_RECORDS >= len(records)
            conn.writer.write(frame_bytes(table_chunk_bytes(request_id, page, last)))
            self._counts["table_records"] += len(page)
            await conn.writer.drain()
            await asyncio.sleep(0)
            if conn.closed or conn.table is not None:
                return  # gone, or asked again: the new request restarts the table

    def statistics(self) -> LocalStats:
        conn = self._conn
        c = self._counts
        return LocalStats(
            connected=conn is not None and conn.hello,
            connections=c["connections"],
            replaced=c["replaced"],
            closed=dict(self._closed),
            batches=c["batches"],
            deltas=c["deltas"],
            table_requests=c["table_requests"],
            table_records=c["table_records"],
            replica_updates=c["replica_updates"],
            queued=len(conn.queue) if conn is not None else 0,
            skipped=c["skipped"],
            overflows=c["overflows"],
        )


def _remove_stale(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # removed meanwhile
    except OSError as e:
        # Seen on overlay filesystems after a crash (ENOTDIR on a dead socket).
        raise ConfigError(f"{path}: cannot remove the stale socket: {e.strerror}") from None


def bind_unix_socket(path: str) -> socket.socket:
    """A listening-ready unix socket at ``path``, born 0600; a dead one's file is replaced.

    :class:`ConfigError` if the path holds something else or a live server.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"{path}: exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
        except OSError:
            _remove_stale(path)  # nobody answers: left behind by a process that died
        else:
            raise ConfigError(f"{path}: another process is serving it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no window where others may connect
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{path}: cannot bind: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock
