"""node.nfq: verdict mapping, fail-closed errors, events, batching and the expiry timer.

The engine here is a scripted double (the adapter's contract with the real
engine is the ``Decision`` value); packets are recording doubles of
``netfilterqueue.Packet``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

import pytest

from node.config import QueueConfig
from node.dataplane import MarkBits
from node.engine import Decision, Verdict
from node.flow.events import CtState, DeleteReason, FlowDeleted, FlowSnapshot
from node.flow.key import FlowKey, flow_key_bytes
from node.nfq import NfqAdapter, _BudgetedSocket, kernel_queue_stats
from node.packet import Packet

MARKS = MarkBits()


class FakePacket:
    def __init__(self, mark: int = 0, indev: int = 2, outdev: int = 3) -> None:
        self.indev, self.outdev = indev, outdev
        self._mark = mark
        self.calls: list[Any] = []
        self.fail_verdict = False

    def get_payload(self) -> bytes:
        return b"\x45payload"

    def get_mark(self) -> int:
        return self._mark

    def set_mark(self, mark: int) -> None:
        self.calls.append(("mark", mark))

    def _verdict(self, name: str) -> None:
        if self.fail_verdict:
            raise RuntimeError("Parent queue has already been unbound")
        self.calls.append(name)

    def accept(self) -> None:
        self._verdict("accept")

    def drop(self) -> None:
        self._verdict("drop")

    def repeat(self) -> None:
        self._verdict("repeat")


class RecordingTable:
    def __init__(self) -> None:
        self.offloaded: list[tuple[bytes, bool]] = []

    def set_offloaded(self, key: bytes, offloaded: bool) -> bool:
        self.offloaded.append((key, offloaded))
        return True


class ScriptedEngine:
    """Returns ``decide(data)``; records what it was asked."""

    def __init__(self, decide: Callable[[bytes], Decision]) -> None:
        self.decide = decide
        self.table = RecordingTable()
        self.seen: list[tuple[bytes, float, str | None, str | None]] = []
        self.deadline: float | None = None
        self.expired_at: list[float] = []
        self.expire_events: list[Any] = []

    def process(self, data: bytes, now: float, in_iface: str | None, out_iface: str | None):
        self.seen.append((data, now, in_iface, out_iface))
        return self.decide(data)

    def next_deadline(self) -> float | None:
        return self.deadline

    def expire(self, now: float) -> list[Any]:
        self.expired_at.append(now)
        self.deadline = None
        events, self.expire_events = self.expire_events, []
        return events


PACKET = Packet(family=4, src=0x0A0A0102, dst=0x0A0A0202, proto=6, sport=40000, dport=80,
                length=52)  # fmt: skip


def decision(verdict: Verdict, offload: bool = False, events: tuple[Any, ...] = ()) -> Decision:
    return Decision(verdict, CtState.ESTABLISHED, None, None, offload, events, PACKET)


def adapter(engine: Any, **kw: Any) -> NfqAdapter:
    kw.setdefault("offload", True)
    kw.setdefault("ifname", lambda i: f"if{i}")
    kw.setdefault("clock", lambda: 100.0)
    return NfqAdapter(engine, QueueConfig(), MARKS, **kw)


@pytest.mark.parametrize(
    ("d", "offload_on", "calls", "counter"),
    [
        (decision(Verdict.ACCEPT), True, ["accept"], "accepted_total"),
        (decision(Verdict.ACCEPT, offload=True), False, ["accept"], "accepted_total"),
        (decision(Verdict.ACCEPT, offload=True), True,
         [("mark", 0x5 | MARKS.offload), "repeat"], "offloaded_total"),
        (decision(Verdict.REJECT), True,
         [("mark", 0x5 | MARKS.reject), "repeat"], "rejected_total"),
        (decision(Verdict.DROP, offload=True), True, ["drop"], "dropped_total"),
    ],
)  # fmt: skip
def test_verdicts_map_to_library_calls_keeping_the_existing_mark(d, offload_on, calls, counter):
    engine = ScriptedEngine(lambda _: d)
    a = adapter(engine, offload=offload_on)
    pkt = FakePacket(mark=0x5)
    a.handle(pkt)
    assert pkt.calls == calls
    stats = a.statistics()
    assert getattr(stats, counter) == 1 and stats.packets_total == 1
    # Only a packet really handed to the fast path marks its flow offloaded.
    offloaded = counter == "offloaded_total"
    assert engine.table.offloaded == ([(flow_key_bytes(PACKET)[0], True)] if offloaded else [])


def test_engine_gets_payload_clock_and_interface_names():
    engine = ScriptedEngine(lambda _: decision(Verdict.ACCEPT))
    a = adapter(engine)
    a.handle(FakePacket(indev=2, outdev=0))
    assert engine.seen == [(b"\x45payload", 100.0, "if2", None)]


def test_an_engine_exception_drops_the_packet_and_is_counted_not_raised(caplog):
    def boom(_: bytes) -> Decision:
        raise ValueError("engine bug")

    a = adapter(ScriptedEngine(boom))
    packets = [FakePacket() for _ in range(3)]
    for p in packets:
        a.handle(p)
    assert all(p.calls == ["drop"] for p in packets)
    stats = a.statistics()
    assert (stats.engine_errors_total, stats.dropped_total) == (3, 3)
    # Rate limited: one log line per exception type within the interval.
    assert len([r for r in caplog.records if "engine failed" in r.getMessage()]) == 1


def test_a_refused_verdict_is_counted_not_raised():
    a = adapter(ScriptedEngine(lambda _: decision(Verdict.ACCEPT)))
    pkt = FakePacket()
    pkt.fail_verdict = True
    a.handle(pkt)
    stats = a.statistics()
    assert (stats.verdict_errors_total, stats.accepted_total) == (1, 0)


def test_interface_names_are_cached_and_unknown_indexes_are_none():
    looked_up: list[int] = []

    def lookup(index: int) -> str:
        looked_up.append(index)
        if index == 9:
            raise OSError(errno.ENXIO, "no such device")
        return f"veth{index}"

    engine = ScriptedEngine(lambda _: decision(Verdict.ACCEPT))
    a = adapter(engine, ifname=lookup)
    for _ in range(3):
        a.handle(FakePacket(indev=2, outdev=9))
    assert looked_up == [2, 9]
    assert engine.seen[-1][2:] == ("veth2", None)


def test_the_interface_cache_ages_out():
    now = [0.0]
    looked_up: list[int] = []

    def lookup(index: int) -> str:
        looked_up.append(index)
        return "x"

    a = adapter(ScriptedEngine(lambda _: decision(Verdict.ACCEPT)), ifname=lookup,
                clock=lambda: now[0])  # fmt: skip
    a.handle(FakePacket(indev=2, outdev=0))
    now[0] = 61.0
    a.handle(FakePacket(indev=2, outdev=0))
    assert looked_up == [2, 2]


def deleted(offloaded: bool, port: int = 1000) -> FlowDeleted:
    snapshot = FlowSnapshot(
        key=FlowKey(b"\x04\x06" + bytes(12)), orig_src=1, orig_sport=port, orig_dst=2,
        orig_dport=80, proto=6, family=4, state="ESTABLISHED", assured=True, created_at=0.0,
        last_seen=0.0, deadline=1.0, packets_orig=1, packets_reply=1, bytes_orig=60,
        bytes_reply=60, rule="web", offloaded=offloaded,
    )  # fmt: skip
    return FlowDeleted(snapshot, DeleteReason.TIMEOUT, 1.0)


def test_events_go_to_the_sink_and_offloaded_deletes_to_the_kernel():
    handed: list[Any] = []
    sunk: list[tuple[Any, ...]] = []
    events = (deleted(True), deleted(False), deleted(True))
    a = adapter(ScriptedEngine(lambda _: decision(Verdict.ACCEPT, events=events)),
                on_offloaded_delete=handed.append, on_events=sunk.append)  # fmt: skip
    a.handle(FakePacket())
    a.handle(FakePacket())
    assert handed == [events[0].snapshot, events[2].snapshot] * 2
    assert sunk == [events, events]  # in order, one call per decision
    assert a.statistics().events_total == 6


def test_without_a_sink_events_are_counted_and_not_kept():
    events = (deleted(False),)
    a = adapter(ScriptedEngine(lambda _: decision(Verdict.ACCEPT, events=events)))
    for _ in range(3):
        a.handle(FakePacket())
    assert a.statistics().events_total == 3
    assert not hasattr(a, "outbox")  # nothing grows or overflows without a consumer


def test_unoffload_reinjects_the_accept_to_clear_the_kernel_mark():
    flow = deleted(True).snapshot
    d = Decision(Verdict.ACCEPT, CtState.ESTABLISHED, None, None, False, (), PACKET, True, flow)
    pkt = FakePacket(mark=0x5)
    a = adapter(ScriptedEngine(lambda _: d))
    a.handle(pkt)
    assert pkt.calls == [("mark", 0x5 | MARKS.unoffload), "repeat"]
    assert a.statistics().unoffloaded_total == 1
    plain = FakePacket()
    adapter(ScriptedEngine(lambda _: d), offload=False).handle(plain)
    assert plain.calls == ["accept"]  # fast path off: nothing to take back


class FakeQueue:
    """A netfilterqueue.NetfilterQueue double reading 'packets' from a socketpair."""

    def __init__(self) -> None:
        # Datagrams, like netlink messages: one recv is one packet.
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.callback: Callable[[Any], None] | None = None
        self.bound: tuple[int, int] | None = None
        self.unbound = False

    def bind(
        self, num: int, callback: Callable[[Any], None], max_len: int, sock_len: int, range: int
    ) -> None:
        self.callback, self.bound = callback, (num, max_len)

    def get_fd(self) -> int:
        return self.ours.fileno()

    def run_socket(self, s: Any) -> None:
        # As netfilterqueue does: recv until EAGAIN, one callback per message.
        while True:
            try:
                s.recv(4096)
            except BlockingIOError:
                return
            assert self.callback is not None
            self.callback(FakePacket())

    def unbind(self) -> None:
        self.unbound = True

    def close(self) -> None:
        self.ours.close()
        self.kernel.close()


def test_a_readable_event_handles_at_most_one_batch():
    async def scenario() -> tuple[NfqAdapter, FakeQueue]:
        a = adapter(ScriptedEngine(lambda _: decision(Verdict.ACCEPT)), batch=4)
        q = FakeQueue()
        a.start(asyncio.get_running_loop(), nfq=q)
        for _ in range(10):
            q.kernel.send(b"p")
        for _ in range(20):  # let the loop run its reader callbacks
            await asyncio.sleep(0)
        a.stop()
        q.close()
        return a, q

    a, q = asyncio.run(scenario())
    stats = a.statistics()
    # 10 packets with a budget of 4: at least three readable events (4+4+2).
    assert stats.packets_total == 10 and stats.batches_total >= 3
    assert q.bound == (0, 4096) and q.unbound


def test_the_expiry_timer_follows_the_engine_deadline():
    async def scenario() -> ScriptedEngine:
        loop = asyncio.get_running_loop()
        engine = ScriptedEngine(lambda _: decision(Verdict.ACCEPT))
        engine.deadline = loop.time() + 0.02
        engine.expire_events = [deleted(True)]
        handed: list[Any] = []
        a = adapter(engine, clock=loop.time, on_offloaded_delete=handed.append)
        q = FakeQueue()
        a.start(loop, nfq=q)
        await asyncio.sleep(0.1)
        assert len(engine.expired_at) == 1 and len(handed) == 1
        # A packet that creates an earlier deadline re-arms the timer.
        engine.deadline = loop.time() + 0.01
        q.kernel.send(b"p")
        await asyncio.sleep(0.1)
        assert len(engine.expired_at) == 2
        assert a.statistics().expiry_runs_total == 2
        a.stop()
        q.close()
        return engine

    asyncio.run(scenario())


def test_budgeted_socket_reports_eagain_after_the_budget():
    a, b = socket.socketpair()
    a.setblocking(False)
    enobufs: list[int] = []
    reader = _BudgetedSocket(a, 2, lambda: enobufs.append(1))
    b.send(b"1")
    b.send(b"2")
    b.send(b"3")
    assert reader.recv(1) == b"1" and reader.recv(1) == b"2"
    with pytest.raises(BlockingIOError) as err:
        reader.recv(1)
    assert err.value.errno == errno.EAGAIN
    a.close()
    b.close()


def test_kernel_queue_stats_reads_proc_columns(tmp_path):
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text(
        "    0  12345     3 2 65531     7    11        99  1\n    5  1 0 2 65531 0 0 0 1\n"
    )
    stats = kernel_queue_stats(0, str(proc))
    assert stats is not None and (stats.waiting, stats.queue_dropped, stats.user_dropped) == (
        3,
        7,
        11,
    )
    assert kernel_queue_stats(4, str(proc)) is None
    assert kernel_queue_stats(0, str(tmp_path / "missing")) is None
