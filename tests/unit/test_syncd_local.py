"""The local link: framing, batch validation, and the server over a real unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd._pb.stockade.sync.v1 import local_pb2 as lpb
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, ConfigError
from syncd.local import (
    MAX_FRAME,
    PAGE_RECORDS,
    FrameDecoder,
    LocalDeltas,
    LocalServer,
    bind_unix_socket,
    deltas_from_batch,
    encode_frame,
    replica_batch,
)
from syncd.records import FlowRecord, Op, record_to_pb
from syncd.replica import Change, ChangeKind
from tests.syncd_link import make_record


def hello(node_id: str = "fw1", role: str = "filter", protocol: int = 1) -> lpb.LocalFrame:
    return lpb.LocalFrame(
        hello=lpb.LocalHello(protocol=protocol, node_id=node_id, role=role, epoch=1)
    )


def batch(*records: FlowRecord, op: Any = pb.OP_CREATE) -> lpb.LocalFrame:
    deltas = [lpb.LocalDelta(op=op, record=record_to_pb(r)) for r in records]
    return lpb.LocalFrame(local=lpb.LocalBatch(deltas=deltas))


# --- framing -----------------------------------------------------------------------------


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    frames = [hello(), batch(make_record(b"k1", "fw1", 1)), hello("fw2")]
    data = b"".join(encode_frame(f) for f in frames)
    assert data[:4] == len(frames[0].SerializeToString()).to_bytes(4, "big")
    for step in (1, 3, 7, len(data)):
        decoder = FrameDecoder()
        out: list[lpb.LocalFrame] = []
        for i in range(0, len(data), step):
            out += decoder.feed(data[i : i + step])
        assert out == frames
        assert decoder.buffered == 0


def test_partial_frame_waits_for_the_rest() -> None:
    decoder = FrameDecoder()
    data = encode_frame(hello())
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == [hello()]


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(BadMessage, match="oversized-frame"):
        decoder.feed((101).to_bytes(4, "big"))
    with pytest.raises(BadMessage, match="oversized-frame"):
        FrameDecoder().feed((MAX_FRAME + 1).to_bytes(4, "big") + b"x")
    big = lpb.LocalFrame(hello=lpb.LocalHello(node_id="x" * 200))
    with pytest.raises(BadMessage, match="oversized-frame"):
        encode_frame(big, max_frame=100)


def test_garbage_body_is_bad_frame() -> None:
    with pytest.raises(BadMessage, match="bad-frame"):
        FrameDecoder().feed(b"\x00\x00\x00\x03\xff\xff\xff")


@given(st.binary(max_size=200))
def test_decoder_returns_frames_or_raises_bad_message(data: bytes) -> None:
    try:
        FrameDecoder(max_frame=1000).feed(data)
    except BadMessage as e:
        assert e.reason in ("oversized-frame", "bad-frame")


# --- batch validation ------------------------------------------------------------------


def test_valid_batch_converts_every_delta() -> None:
    r1, r2 = make_record(b"a", "fw1", 1), make_record(b"b", "fw1", 2)
    frame = batch(r1, r2)
    frame.local.deltas[1].op = pb.OP_DELETE
    assert deltas_from_batch(frame.local.deltas, "fw1") == [(Op.CREATE, r1), (Op.DELETE, r2)]


@pytest.mark.parametrize("defect", ["other-origin", "no-record", "bad-op", "bad-record"])
def test_one_bad_delta_refuses_the_whole_batch(defect: str) -> None:
    frame = batch(make_record(b"a", "fw1", 1), make_record(b"b", "fw1", 1))
    bad = frame.local.deltas[1]
    if defect == "other-origin":
        bad.record.origin = "fw2"
    elif defect == "no-record":
        bad.ClearField("record")
    elif defect == "bad-op":
        bad.op = pb.OP_UNSPECIFIED
    else:
        bad.record.orig_src = b"\x01"
    with pytest.raises(BadMessage):
        deltas_from_batch(frame.local.deltas, "fw1")


def test_replica_batch_maps_changes_to_updates() -> None:
    up, gone = make_record(b"a", "fw2", 1), make_record(b"b", "fw2", 1)
    frame = replica_batch([Change(ChangeKind.UPSERT, up), Change(ChangeKind.REMOVE, gone)])
    ops = [(u.op, u.record.key) for u in frame.replicas.updates]
    assert ops == [(pb.OP_UPDATE, b"a"), (pb.OP_DELETE, b"b")]


# --- the server ---------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="stk-lt-")  # short: unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Harness:
    def __init__(self, path: str, queue_limit: int = 100) -> None:
        self.applied: list[LocalDeltas] = []
        self.table: list[FlowRecord] = []
        self.server = LocalServer(
            path, "fw1", 7, self.applied.append, lambda: list(self.table), queue_limit
        )
        self.path = path
        self.clients: list[Client] = []

    async def connect(self) -> Client:
        reader, writer = await asyncio.open_unix_connection(self.path)
        client = Client(reader, writer)
        self.clients.append(client)
        first = await client.next()
        assert first.hello == lpb.LocalHello(protocol=1, node_id="fw1", role="syncd", epoch=7)
        return client


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.pending: list[lpb.LocalFrame] = []

    def send(self, frame: lpb.LocalFrame) -> None:
        self.writer.write(encode_frame(frame))

    async def next(self) -> lpb.LocalFrame:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), 2)
            if not data:
                raise EOFError
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    async def closed(self) -> bool:
        try:
            while True:
                await self.next()
        except EOFError:
            return True


def serve(
    sockdir: str, scenario: Callable[[Harness], Coroutine[Any, Any, None]], **kw: Any
) -> None:
    async def main() -> None:
        harness = Harness(os.path.join(sockdir, "local.sock"), **kw)
        await harness.server.start()
        try:
            await asyncio.wait_for(scenario(harness), 5)
        finally:
            for client in harness.clients:
                client.writer.close()
                with contextlib.suppress(OSError):
                    await client.writer.wait_closed()
            await harness.server.close()

    asyncio.run(main())


async def settle(check: Callable[[], bool]) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_socket_is_0600_and_removed_on_close(sockdir: str) -> None:
    path = os.path.join(sockdir, "local.sock")

    async def scenario(h: Harness) -> None:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    serve(sockdir, scenario)
    assert not os.path.exists(path)


def test_hello_then_batches_are_applied_in_order(sockdir: str) -> None:
    r1, r2, r3 = (make_record(b"k%d" % i, "fw1", 1) for i in range(3))

    async def scenario(h: Harness) -> None:
        c = await h.connect()
        c.send(hello())
        c.send(batch(r1, r2))
        c.send(batch(r3, op=pb.OP_DELETE))
        await settle(lambda: len(h.applied) == 2)
        assert h.applied == [[(Op.CREATE, r1), (Op.CREATE, r2)], [(Op.DELETE, r3)]]
        stats = h.server.statistics()
        assert stats.connected and (stats.batches, stats.deltas) == (2, 3)

    serve(sockdir, scenario)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (hello(node_id="fw2"), "bad-hello"),
        (hello(role="syncd"), "bad-hello"),
        (hello(protocol=2), "bad-hello"),
        (batch(make_record(b"k", "fw1", 1)), "no-hello"),
    ],
)
def test_bad_hello_closes_the_connection_and_is_counted(
    sockdir: str, first: lpb.LocalFrame, reason: str
) -> None:
    async def scenario(h: Harness) -> None:
        c = await h.connect()
        c.send(first)
        assert await c.closed()
        assert h.applied == []
        await settle(lambda: h.server.statistics().closed == {reason: 1})

    serve(sockdir, scenario)


def test_bad_batch_closes_and_applies_nothing_of_it(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        c = await h.connect()
        c.send(hello())
        frame = batch(make_record(b"a", "fw1", 1), make_record(b"b", "fw2", 1))
        c.send(frame)
        assert await c.closed()
        assert h.applied == []
        assert h.server.statistics().closed == {"bad-local-delta": 1}

    serve(sockdir, scenario)


def test_garbage_and_oversized_frames_close_the_connection(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        for data, reason in ((b"\x00\x00\x00\x02\xff\xff", "bad-frame"),
                             ((MAX_FRAME + 1).to_bytes(4, "big"), "oversized-frame")):  # fmt: skip
            c = await h.connect()
            c.writer.write(data)
            assert await c.closed()
            await settle(lambda r=reason: h.server.statistics().closed.get(r) == 1)  # type: ignore[misc]

    serve(sockdir, scenario)


def test_table_request_pages_everything_then_queued_changes_follow(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        h.table = [make_record(b"t%05d" % i, "fw2", 1) for i in range(PAGE_RECORDS + 5)]
        c = await h.connect()
        c.send(hello())
        c.send(lpb.LocalFrame(table_request=lpb.TableRequest(request_id=9)))
        await settle(lambda: h.server.statistics().table_requests == 1)
        late = make_record(b"late", "fw3", 1)
        h.server.replica_changes([Change(ChangeKind.UPSERT, late)])
        chunks = [await c.next(), await c.next()]
        assert [f.table_chunk.request_id for f in chunks] == [9, 9]
        assert [len(f.table_chunk.records) for f in chunks] == [PAGE_RECORDS, 5]
        assert [f.table_chunk.last for f in chunks] == [False, True]
        after = await c.next()
        assert [u.record.key for u in after.replicas.updates] == [b"late"]
        assert h.server.statistics().table_records == PAGE_RECORDS + 5

    serve(sockdir, scenario)


def test_empty_table_still_gets_a_last_page(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        c = await h.connect()
        c.send(hello())
        c.send(lpb.LocalFrame(table_request=lpb.TableRequest(request_id=1)))
        chunk = (await c.next()).table_chunk
        assert chunk.last and len(chunk.records) == 0

    serve(sockdir, scenario)


def test_changes_without_a_filter_are_skipped_and_counted(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        h.server.replica_changes([Change(ChangeKind.UPSERT, make_record(b"x", "fw2", 1))] * 3)
        assert h.server.statistics().skipped == 3

    serve(sockdir, scenario)


def test_queue_overflow_closes_the_link_so_the_filter_reloads(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        c = await h.connect()
        c.send(hello())
        await settle(lambda: h.server.statistics().connected)
        change = Change(ChangeKind.UPSERT, make_record(b"x", "fw2", 1))
        h.server.replica_changes([change] * 11)  # limit 10
        assert await c.closed()
        stats = h.server.statistics()
        assert stats.overflows == 1 and stats.closed == {"overflow": 1}
        h.server.replica_changes([change])
        assert h.server.statistics().skipped == 1

    serve(sockdir, scenario, queue_limit=10)


def test_a_new_filter_connection_replaces_the_old(sockdir: str) -> None:
    async def scenario(h: Harness) -> None:
        old = await h.connect()
        old.send(hello())
        new = await h.connect()
        assert await old.closed()
        new.send(hello())
        new.send(batch(make_record(b"k", "fw1", 1)))
        await settle(lambda: len(h.applied) == 1)
        assert h.server.statistics().replaced == 1

    serve(sockdir, scenario)


def test_bind_replaces_a_dead_socket_but_not_a_live_one_or_a_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    dead = bind_unix_socket(path)
    dead.close()  # the file stays, nobody listens
    live = bind_unix_socket(path)
    live.listen()
    try:
        with pytest.raises(ConfigError, match="another process"):
            bind_unix_socket(path)
    finally:
        live.close()
    plain = os.path.join(sockdir, "plain")
    with open(plain, "w") as f:
        f.write("x")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_unix_socket(plain)
    probe = socket.socket(socket.AF_UNIX)
    probe.close()
