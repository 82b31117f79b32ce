"""LocalOrigin, PeerLink (the asyncio driver of PeerSession), the dialer's helpers.

Two PeerLinks are joined by an in-memory pipe (envelopes serialized both
ways, like the gRPC transport); the session timers run on real time with
short SessionConfig values, so each test takes well under a second.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.client import Backoff, page_records
from syncd.errors import BadMessage, Misuse
from syncd.keyindex import ORDER_BUCKET, position
from syncd.peers import EndReason, GcPause, LocalOrigin, PeerLink, StreamEnd, Wake
from syncd.records import FlowRecord, Op, record_to_pb
from syncd.replica import Change, ChangeKind, ReplicaConfig, ReplicaStore
from syncd.session import SessionConfig, State
from tests.syncd_link import CLUSTER, make_record

FAST = SessionConfig(
    cluster_id=CLUSTER, heartbeat_interval=0.02, suspect_after=0.06, dead_after=0.3,
    resend_after=0.05,
)  # fmt: skip


class PipeEnd:
    """One end of an in-memory Exchange stream."""

    def __init__(self, inq: asyncio.Queue[bytes | None], outq: asyncio.Queue[bytes | None]):
        self.inq, self.outq = inq, outq
        self.closed = False
        self.stall = False  # writes never complete
        self.sent: list[pb.Envelope] = []

    @property
    def ended_by(self) -> str:
        return "pipe closed"

    async def read(self) -> pb.Envelope | None:
        data = await self.inq.get()
        return None if data is None else pb.Envelope.FromString(data)

    async def write(self, envelope: pb.Envelope) -> bool:
        if self.stall:
            await asyncio.Event().wait()
        if self.closed:
            return False
        self.sent.append(envelope)
        self.outq.put_nowait(envelope.SerializeToString())
        return True

    def close(self) -> None:
        self.closed = True
        self.outq.put_nowait(None)


def pipe() -> tuple[PipeEnd, PipeEnd]:
    a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes | None] = asyncio.Queue()
    return PipeEnd(b_to_a, a_to_b), PipeEnd(a_to_b, b_to_a)


class SpyStore(ReplicaStore):
    """Notes whether the collector was on at each page applied."""

    gc_on: list[bool]

    def upsert_many(self, records: list[FlowRecord], now: float) -> tuple[list[Change], int]:
        self.gc_on.append(gc.isenabled())
        return super().upsert_many(records, now)


class Node:
    def __init__(
        self, node_id: str, peer: str, epoch: int = 1, capacity: int = 64,
        gc_pause: GcPause | None = None,
    ) -> None:  # fmt: skip
        self.store = SpyStore()
        self.store.gc_on = []
        self.origin = LocalOrigin(node_id, epoch, self.store)
        self.forwarded: list[Change] = []
        self.link = PeerLink(
            peer, self.origin, FAST, capacity, self.forwarded.extend, gc_pause=gc_pause
        )

    def emit(self, key: bytes, op: Op = Op.CREATE, now: float = 0.0) -> None:
        delta = self.origin.change(op, make_record(key, self.origin.node_id, 1), now)
        assert delta is not None
        self.link.push(delta, now)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


async def until(check: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# --- LocalOrigin --------------------------------------------------------------------


def test_local_change_gets_a_version_above_the_epoch_floor_and_is_numbered() -> None:
    store = ReplicaStore()
    origin = LocalOrigin("a", 3, store)
    first = origin.change(Op.CREATE, make_record(b"k1", "a", 5), 0.0)
    second = origin.change(Op.UPDATE, make_record(b"k1", "a", 5), 0.0)
    assert first is not None and second is not None
    assert (first.seq, second.seq) == (1, 2)
    assert first.record.version == (3 << 32) + 1
    assert second.record.version == first.record.version + 1
    held = store.get(b"k1")
    assert held is not None and held.record == second.record


def test_local_change_outranks_a_held_replica_and_a_tombstone() -> None:
    store = ReplicaStore()
    origin = LocalOrigin("a", 1, store)
    high = (9 << 32) + 7
    store.apply(Op.CREATE, make_record(b"taken", "b", high), 0.0)
    store.apply(Op.DELETE, make_record(b"gone", "b", high + 5), 0.0)
    takeover = origin.change(Op.UPDATE, make_record(b"taken", "a", 1), 0.0)
    recreate = origin.change(Op.CREATE, make_record(b"gone", "a", 1), 0.0)
    assert takeover is not None and takeover.record.version > high
    assert recreate is not None and recreate.record.version > high + 5
    assert {r.key for r in store.records("a")} == {b"taken", b"gone"}


def test_local_delete_of_a_flow_another_node_owns_is_ignored() -> None:
    store = ReplicaStore()
    origin = LocalOrigin("a", 1, store)
    store.apply(Op.CREATE, make_record(b"k", "b", 1 << 40), 0.0)
    assert origin.change(Op.DELETE, make_record(b"k", "a", 1), 0.0) is None
    assert store.get(b"k") is not None
    assert origin.statistics().delete_not_owned == 1
    assert origin.last_seq == 0


def test_local_change_refused_by_a_full_store_is_counted_not_numbered() -> None:
    store = ReplicaStore(ReplicaConfig(capacity=1))
    origin = LocalOrigin("a", 1, store)
    assert origin.change(Op.CREATE, make_record(b"k1", "a", 1), 0.0) is not None
    assert origin.change(Op.CREATE, make_record(b"k2", "a", 1), 0.0) is None
    stats = origin.statistics()
    assert (stats.changes, stats.refused_full, stats.last_seq) == (1, 1, 1)


def test_local_change_of_another_origin_is_misuse() -> None:
    origin = LocalOrigin("a", 1, ReplicaStore())
    with pytest.raises(Misuse):
        origin.change(Op.CREATE, make_record(b"k", "b", 1), 0.0)


def test_recover_keeps_old_versions_and_observes_them() -> None:
    store = ReplicaStore()
    origin = LocalOrigin("a", 2, store)
    old = make_record(b"k", "a", (5 << 32) + 3)  # from a much later epoch's clock: still observed
    origin.recover(old, 0.0)
    assert store.get(b"k") is not None
    assert origin.statistics().recovered == 1
    delta = origin.change(Op.UPDATE, make_record(b"k", "a", 1), 0.0)
    assert delta is not None and delta.record.version > old.version


def test_observe_raises_the_clock_for_replica_upserts_only() -> None:
    origin = LocalOrigin("a", 1, ReplicaStore())
    base = origin.clock.last
    origin.observe([Change(ChangeKind.REMOVE, make_record(b"x", "b", base + 100))])
    assert origin.clock.last == base
    origin.observe([Change(ChangeKind.UPSERT, make_record(b"y", "b", base + 50))])
    assert origin.clock.last == base + 50


# --- PeerLink over an in-memory stream ---------------------------------------------


def test_two_links_exchange_deltas_both_ways_and_report_live() -> None:
    async def scenario() -> None:
        a, b = Node("a", "b"), Node("b", "a")
        for i in range(5):
            a.emit(b"a%d" % i)
            b.emit(b"b%d" % i)
        ta, tb = pipe()
        runs = [asyncio.create_task(a.link.run(ta)), asyncio.create_task(b.link.run(tb))]
        await until(lambda: len(list(b.store.records("a"))) == 5)
        await until(lambda: len(list(a.store.records("b"))) == 5)
        a.emit(b"a-late")  # after the snapshot: travels as a delta
        await until(lambda: b.store.get(b"a-late") is not None)
        await until(lambda: a.link.state is State.LIVE and b.link.state is State.LIVE)
        assert {c.record.key for c in b.forwarded} >= {b"a0", b"a4", b"a-late"}
        stats = b.link.statistics()
        assert stats.state == "live" and stats.streams == 1
        assert stats.resyncs == 1 and stats.last_resync_seconds is not None
        assert stats.changes_forwarded == len(b.forwarded)
        assert stats.inbox.deltas_applied >= 1
        a.link.stop("test over")
        assert (await runs[0]) == StreamEnd(EndReason.STOPPED, "test over")
        ta.close()  # what the adapter does when run() returns
        assert (await runs[1]).reason is EndReason.PEER_CLOSED
        assert b.link.statistics().state == "disconnected"
        assert a.link.statistics().stream_ends == {"stopped": 1}

    run(scenario)


def test_peer_error_ends_the_stream_counts_the_reason_and_applies_nothing() -> None:
    async def scenario() -> None:
        b = Node("b", "a")
        ours, theirs = pipe()
        task = asyncio.create_task(b.link.run(ours))
        hello = pb.Hello(protocol=1, node_id="a", cluster_id=CLUSTER, epoch=1)
        theirs.outq.put_nowait(pb.Envelope(hello=hello).SerializeToString())
        good = pb.Delta(op=pb.OP_CREATE, origin="a", seq=1, record=record_to_pb(
            make_record(b"good", "a", 1)))  # fmt: skip
        bad = pb.Delta(op=pb.OP_CREATE, origin="a", seq=2, record=record_to_pb(
            make_record(b"bad", "a", 1)))  # fmt: skip
        bad.record.family = 5
        await until(lambda: b.link.state is not State.HELLO_SENT)
        batch = pb.Batch(origin="a", epoch=1, deltas=[good, bad])
        theirs.outq.put_nowait(pb.Envelope(batch=batch).SerializeToString())
        end = await task
        assert end.reason is EndReason.PEER_ERROR and "bad-record" in end.detail
        assert b.store.get(b"good") is None and len(b.store) == 0
        stats = b.link.statistics()
        assert stats.peer_errors == {"bad-record": 1} and "bad-record" in stats.last_error

    run(scenario)


def test_a_newer_stream_replaces_the_running_one() -> None:
    async def scenario() -> None:
        b = Node("b", "a")
        first, _ = pipe()
        second, _ = pipe()
        old = asyncio.create_task(b.link.run(first))
        await until(lambda: b.link.state is State.HELLO_SENT)
        new = asyncio.create_task(b.link.run(second))
        assert (await old).reason is EndReason.REPLACED
        await until(lambda: b.link.statistics().streams == 2)
        assert b.link.state is State.HELLO_SENT
        b.link.stop()
        assert (await new).reason is EndReason.STOPPED

    run(scenario)


def test_silence_closes_the_stream_as_dead() -> None:
    async def scenario() -> None:
        b = Node("b", "a")
        mute, _ = pipe()  # nothing ever arrives
        end = await b.link.run(mute)
        assert end.reason is EndReason.DEAD
        hellos = [e for e in mute.sent if e.HasField("hello")]
        assert len(hellos) >= 2  # the Hello was resent while waiting

    run(scenario)


def test_a_stalled_write_ends_the_stream() -> None:
    async def scenario() -> None:
        b = Node("b", "a")
        stuck, _ = pipe()
        stuck.stall = True
        end = await b.link.run(stuck)
        assert end.reason is EndReason.WRITE_STALLED

    run(scenario)


def test_end_of_stream_is_peer_closed_and_a_reconnect_resumes() -> None:
    async def scenario() -> None:
        a, b = Node("a", "b"), Node("b", "a")
        ta, tb = pipe()
        runs = [asyncio.create_task(a.link.run(ta)), asyncio.create_task(b.link.run(tb))]
        await until(lambda: a.link.state is State.LIVE and b.link.state is State.LIVE)
        ta.close()
        tb.close()
        ends = await asyncio.gather(*runs)
        assert {e.reason for e in ends} == {EndReason.PEER_CLOSED}
        first = b.link.messages_received
        assert first > 0 and first == b.link.statistics().session["messages_received"]
        for i in range(3):
            a.emit(b"k%d" % i)  # queued in the outbox while disconnected
        ta, tb = pipe()
        runs = [asyncio.create_task(a.link.run(ta)), asyncio.create_task(b.link.run(tb))]
        await until(lambda: len(list(b.store.records("a"))) == 3)
        assert b.link.statistics().resyncs == 1  # no new snapshot: deltas resumed
        assert a.link.statistics().outbox.acked == 3
        # Over both streams, live one included, the O(1) count agrees with the snapshot's.
        assert b.link.messages_received > first
        assert b.link.messages_received == b.link.statistics().session["messages_received"]
        a.link.stop()
        b.link.stop()
        await asyncio.gather(*runs)

    run(scenario)


# --- dialer helpers -------------------------------------------------------------------


def test_backoff_doubles_from_50_ms_to_the_cap() -> None:
    backoff = Backoff()
    delays = [0.0]
    for _ in range(7):
        delays.append(backoff.next(delays[-1]))
    assert delays[1:] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    with pytest.raises(Misuse):
        Backoff(initial=2.0, cap=1.0)


def _chunk(keys: list[bytes], origin: str = "a", **fields: Any) -> pb.SnapshotChunk:
    records = [record_to_pb(make_record(k, origin, 1)) for k in keys]
    return pb.SnapshotChunk(origin="a", records=records, **fields)


def test_bulk_page_validation() -> None:
    ok = page_records(_chunk([b"a", b"b"], next_cursor=b"b"), "a", b"")
    assert [r.key for r in ok] == [b"a", b"b"]
    assert page_records(_chunk([], last=True), "a", b"z") == []
    bad_pages = [
        (_chunk([b"b", b"a"], next_cursor=b"b"), b""),  # keys not increasing
        (_chunk([b"a"], next_cursor=b"a"), b"a"),  # key not after the cursor
        (_chunk([b"a"], origin="c", next_cursor=b"a"), b""),  # another origin
        (_chunk([b"a", b"b"], next_cursor=b"a"), b""),  # next cursor behind the page
    ]
    for chunk, cursor in bad_pages:
        with pytest.raises(BadMessage):
            page_records(chunk, "a", cursor)


def test_bulk_page_validation_in_bucket_order() -> None:
    keys = sorted([b"a", b"b", b"c"], key=lambda k: position(k, ORDER_BUCKET))
    last = position(keys[-1], ORDER_BUCKET)
    ok = page_records(_chunk(keys, next_cursor=last, order=ORDER_BUCKET), "a", b"")
    assert [r.key for r in ok] == keys
    bad_pages = [
        _chunk(keys[::-1], next_cursor=last, order=ORDER_BUCKET),  # not in bucket order
        _chunk(keys, next_cursor=position(keys[0], ORDER_BUCKET), order=ORDER_BUCKET),  # behind
        _chunk(keys, next_cursor=last, order=5),  # unknown order
    ]
    if keys != sorted(keys):
        bad_pages.append(_chunk(sorted(keys), next_cursor=last, order=ORDER_BUCKET))
    for chunk in bad_pages:
        with pytest.raises(BadMessage):
            page_records(chunk, "a", b"")


# --- the session's send window (syncd/session.py, max_in_flight) --------------------


def _live_pair(window: int) -> tuple[Any, Any, Any]:
    from syncd.session import PeerSession
    from tests.syncd_link import SimNode

    config = SessionConfig(cluster_id=CLUSTER, batch_max=4, max_in_flight=window)
    a, b = SimNode("a", ["a", "b"], outbox_capacity=100), SimNode("b", ["a", "b"])
    sa = PeerSession(config, a.outboxes["b"], a.inboxes["b"], a.store)
    sb = PeerSession(config, b.outboxes["a"], b.inboxes["a"], b.store)
    sa.start(0.0)
    sb.start(0.0)
    for msg in sa.messages_to_send(0.0):
        sb.receive(msg, 0.0)
    for msg in sb.messages_to_send(0.0):
        sa.receive(msg, 0.0)
    for msg in sa.messages_to_send(0.0):  # a's ack of b's (empty) snapshot
        sb.receive(msg, 0.0)
    return a, sa, sb


def _deltas(msgs: list[pb.Envelope]) -> list[int]:
    return [d.seq for m in msgs if m.HasField("batch") for d in m.batch.deltas]


def test_no_more_than_the_window_is_sent_unacked_and_acks_reopen_it() -> None:
    a, sa, sb = _live_pair(window=6)
    for i in range(20):
        a.emit(b"k%02d" % i, 0.0)
    first = sa.messages_to_send(0.01)
    assert _deltas(first) == [1, 2, 3, 4, 5, 6]  # batches of 4 then 2: the window is full
    deadline = sa.next_deadline()
    assert deadline is not None and deadline > 0.01  # no flush timer due while it is full
    assert _deltas(sa.messages_to_send(0.01)) == []
    for msg in first[:1]:  # b applies the first batch only and acks seq 4
        sb.receive(msg, 0.01)
    for msg in sb.messages_to_send(0.01):
        sa.receive(msg, 0.01)
    assert _deltas(sa.messages_to_send(0.01)) == [7, 8, 9, 10]


def test_a_resend_timeout_resends_one_window_not_the_whole_outbox() -> None:
    a, sa, _ = _live_pair(window=5)
    for i in range(50):
        a.emit(b"k%02d" % i, 0.0)
    assert _deltas(sa.messages_to_send(1.0)) == [1, 2, 3, 4, 5]
    sa.handle_timer(1.0 + FAST.dead_after)  # unacked for longer than resend_after
    assert _deltas(sa.messages_to_send(1.0 + FAST.dead_after)) == [1, 2, 3, 4, 5]


def test_a_small_window_still_converges_over_a_lossy_link() -> None:
    from tests.syncd_link import Faults, Mesh

    config = SessionConfig(cluster_id=CLUSTER, batch_max=3, max_in_flight=4)
    mesh = Mesh(["a", "b", "c"], seed=7, config=config, outbox_capacity=64,
                faults=Faults(drop=0.1, duplicate=0.05, reorder=0.1))  # fmt: skip
    for step in range(150):
        node = mesh.nodes["abc"[step % 3]]
        node.emit(b"%s%03d" % (node.node_id.encode(), step % 40), mesh.now, delete=step % 7 == 0)
        mesh.run_until(mesh.now + 0.002)
    mesh.heal()
    assert mesh.settle(limit=30)
    assert mesh.divergence() == []


def test_resends_without_ack_progress_back_off_and_progress_resets_them() -> None:
    a, sa, sb = _live_pair(window=100)
    a.emit(b"k", 0.0)
    first = sa.messages_to_send(0.01)
    assert _deltas(first) == [1]
    resent_at = []
    now = 0.01
    while now < 1.6:  # nothing is acked: each wait is twice the last
        now = round(now + 0.01, 2)
        sb.receive(pb.Envelope(heartbeat=pb.Heartbeat()), now)  # keep both sides alive
        sa.receive(pb.Envelope(heartbeat=pb.Heartbeat()), now)
        sa.handle_timer(now)
        if _deltas(sa.messages_to_send(now)):
            resent_at.append(now)
    gaps = [b - a for a, b in itertools.pairwise([0.01, *resent_at])]
    assert gaps == pytest.approx([0.2, 0.4, 0.8], abs=0.011)
    for msg in first:
        sb.receive(msg, now)
    for msg in sb.messages_to_send(now):
        sa.receive(msg, now)  # the ack: progress
    a.emit(b"k2", now)
    assert _deltas(sa.messages_to_send(now + 0.01)) == [2]
    due = sa.next_deadline()
    assert due is not None and abs(due - (now + 0.01 + FAST.resend_after)) < 0.06


def test_snapshot_request_retries_back_off_until_a_reply_arrives() -> None:
    from syncd.session import PeerSession
    from tests.syncd_link import SimNode

    config = SessionConfig(cluster_id=CLUSTER)
    b = SimNode("b", ["a", "b"])
    sb = PeerSession(config, b.outboxes["a"], b.inboxes["a"], b.store)
    sb.start(0.0)
    sb.receive(
        pb.Envelope(hello=pb.Hello(protocol=1, node_id="a", cluster_id=CLUSTER, epoch=1)), 0.0
    )
    requests: list[float] = []
    now = 0.0
    while now < 7.1:
        sb.receive(pb.Envelope(heartbeat=pb.Heartbeat()), now)
        sb.handle_timer(now)
        if any(m.HasField("snapshot_request") for m in sb.messages_to_send(now)):
            requests.append(round(now, 2))
        now = round(now + 0.01, 2)
    gaps = [later - earlier for earlier, later in itertools.pairwise(requests)]
    # The first wait is 1 s (no round trip measured yet, RFC 6298 s2.1), then doubles.
    assert gaps == pytest.approx([1.0, 2.0, 4.0], abs=0.011)


def test_wake_returns_when_set_or_after_its_timeout() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        wake = Wake()
        start = loop.time()
        await wake.wait(0.02)  # nobody sets it: the timeout ends the wait
        assert loop.time() - start >= 0.015 and not wake.is_set()
        loop.call_later(0.01, wake.set)
        start = loop.time()
        await wake.wait(5.0)  # set before the timeout: returns then
        assert loop.time() - start < 1.0 and wake.is_set()
        await wake.wait()  # already set: at once, until cleared
        wake.clear()
        assert not wake.is_set()
        waiter = asyncio.ensure_future(wake.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # no timeout: waits for set() only
        wake.set()
        await asyncio.wait_for(waiter, 1.0)

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_collector_is_off_while_a_snapshot_is_pulled_and_on_again_after() -> None:
    async def scenario() -> None:
        pause = GcPause()
        a, b = Node("a", "b"), Node("b", "a", gc_pause=pause)
        for i in range(5):
            a.emit(b"a%d" % i)
        ta, tb = pipe()
        runs = [asyncio.create_task(a.link.run(ta)), asyncio.create_task(b.link.run(tb))]
        await until(lambda: b.link.state is State.LIVE and len(list(b.store.records("a"))) == 5)
        assert b.store.gc_on == [False] and pause.pauses == 1  # the page: collector off
        assert gc.isenabled() and not pause.held  # on again once LIVE
        a.emit(b"a-late")
        await until(lambda: b.store.get(b"a-late") is not None)
        assert gc.isenabled() and not pause.held
        a.link.stop("test over")
        await runs[0]
        ta.close()
        await runs[1]
        assert gc.isenabled() and pause.pauses == 1

    assert gc.isenabled()
    try:
        run(scenario)
        assert gc.get_freeze_count() > 0  # what the pull allocated is never traversed again
    finally:
        gc.unfreeze()


def test_gc_pause_nests_and_restores_what_it_found() -> None:
    assert gc.isenabled()
    pause = GcPause()
    try:
        pause.hold()
        pause.hold()
        pause.release()
        assert not gc.isenabled() and pause.held
        pause.release()
        assert gc.isenabled() and not pause.held and pause.pauses == 1
        with pytest.raises(Misuse):
            pause.release()
        gc.disable()  # someone else turned it off: a pause leaves it off
        pause.hold()
        pause.release()
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
