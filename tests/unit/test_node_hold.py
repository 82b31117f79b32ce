"""Holding for asymmetric routing: the engine's hold decisions and the NFQUEUE wiring.

Two real engines stand for two nodes: ``a`` sees the client's packets, ``b``
the server's; ``b`` learns ``a``'s flow only through a record (as syncd
delivers it).
"""

from __future__ import annotations

import asyncio

from node.config import HoldConfig, QueueConfig
from node.dataplane import MarkBits
from node.engine import Engine, Verdict
from node.flow.events import CtState
from node.flow.table import TableConfig
from node.hold import HoldQueue
from node.nfq import NfqAdapter
from node.packet import ACK, ICMP, SYN
from node.policy import parse_ruleset
from syncd.convert import record_from_snapshot
from tests.packets import icmp_error, ipv4, ping4, tcp4, udp4
from tests.unit.test_node_nfq import FakePacket, FakeQueue

RULES = """\
default: drop
established: accept
invalid: drop
rules:
  - {name: web, from: 10.0.0.0/24, proto: tcp, dport: 80, action: accept}
  - {name: dns, from: 10.0.0.0/24, proto: udp, dport: 53, action: accept}
  - {name: ping, from: 10.0.0.0/24, proto: icmp, icmp-type: echo-request, action: accept}
"""
C, S = "10.0.0.2", "10.9.0.2"


def engines() -> tuple[Engine, Engine]:
    ruleset = parse_ruleset(RULES, "rules.yaml")
    a, b = Engine(TableConfig(), ruleset), Engine(TableConfig(), ruleset)
    a.table.set_local_origin("fw1")
    b.table.set_local_origin("fw2")
    b.enable_hold()
    return a, b


def replicate(src: Engine, dst: Engine, key: bytes, version: int, now: float) -> None:
    snapshot = src.table.get(key)
    assert snapshot is not None
    outcome, _ = dst.table.install(record_from_snapshot(snapshot, "fw1", version, now), now)
    assert outcome.value in ("installed", "updated")


def test_a_syn_ack_without_the_flow_is_holdable_then_accepted_once_replicated():
    a, b = engines()
    syn = a.process(tcp4(C, 40000, S, 80, SYN, seq=100), 1.0)
    assert syn.verdict is Verdict.ACCEPT and syn.hold_key is None
    synack = tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101)
    d = b.process(synack, 1.001)
    assert d.ct_state is CtState.INVALID and d.hold_key == bytes(syn.flow.key)
    assert dict(b.statistics().verdicts)["drop"] == 0  # not counted while held
    replicate(a, b, d.hold_key, 1, 1.002)
    again = b.reprocess(synack, 1.003)
    assert again.verdict is Verdict.ACCEPT and again.hold_key is None
    stats = b.statistics()
    assert stats.packets_total == 1 and dict(stats.verdicts)["accept"] == 1
    assert stats.holdable_total == 1


def test_settle_counts_a_decision_that_could_not_be_held():
    _, b = engines()
    d = b.process(tcp4(S, 80, C, 40000, ACK, seq=1, ack=1), 1.0)
    assert d.hold_key is not None
    settled = b.settle(d, 0.0)
    assert settled.hold_key is None and settled.verdict is Verdict.DROP
    assert dict(b.statistics().verdicts)["drop"] == 1


def test_what_is_holdable():
    a, b = engines()
    # A UDP reply refused as a new flow, an ICMP echo reply, an ICMP error
    # quoting a flow this node lacks: holdable.
    assert b.process(udp4(S, 53, C, 5353, b"x"), 1.0).hold_key is not None
    assert b.process(ping4(S, C, 7, reply=True), 1.0).hold_key is not None
    quoted = tcp4(C, 40001, S, 80, SYN)
    assert b.process(ipv4(S, C, ICMP, icmp_error(3, 3, quoted)), 1.0).hold_key is not None
    # A pure SYN can start its own flow: never held (even when refused).
    assert b.process(tcp4(S, 80, C, 40000, SYN), 1.0).hold_key is None
    assert b.process(tcp4(C, 40000, S, 22, SYN), 1.0).hold_key is None
    # A NEW flow the policy accepts, and anything on an engine without holding.
    assert b.process(udp4(C, 5353, S, 53, b"q"), 1.0).hold_key is None
    assert a.process(tcp4(S, 80, C, 40000, ACK), 1.0).hold_key is None
    # The client's ACK on a flow still in SYN_SENT here (its SYN-ACK crossed
    # the other node) waits for that node's update.
    a.enable_hold()
    a.process(tcp4(C, 40002, S, 80, SYN, seq=10), 2.0)
    ack = a.process(tcp4(C, 40002, S, 80, ACK, seq=11, ack=501), 2.001)
    assert ack.reason == "tcp-illegal-transition" and ack.hold_key is not None


def adapter_for(engine: Engine, hold: HoldQueue, clock) -> NfqAdapter:
    return NfqAdapter(engine, QueueConfig(), MarkBits(), offload=False, clock=clock,
                      ifname=lambda i: f"if{i}", hold=hold)  # fmt: skip


class PayloadPacket(FakePacket):
    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload

    def get_payload(self) -> bytes:
        return self.payload


def test_adapter_defers_the_verdict_until_release_or_timeout():
    async def run() -> None:
        a, b = engines()
        now = [5.0]
        hold: HoldQueue = HoldQueue(HoldConfig(timeout=0.05, max_packets=2, max_flows=2))
        adapter = adapter_for(b, hold, lambda: now[0])
        q = FakeQueue()
        adapter.start(asyncio.get_running_loop(), nfq=q)
        try:
            syn = a.process(tcp4(C, 40000, S, 80, SYN, seq=100), 5.0)
            synack = PayloadPacket(tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101))
            adapter.handle(synack)
            assert synack.calls == [] and adapter.statistics().held_now == 1
            # Over the bounds: judged at once (no such flow: dropped).
            stray = [PayloadPacket(tcp4(S, 81 + i, C, 40000, ACK)) for i in range(2)]
            for p in stray:
                adapter.handle(p)
            assert stray[0].calls == [] and stray[1].calls == ["drop"]
            assert hold.statistics().overflow_total == 1
            replicate(a, b, bytes(syn.flow.key), 1, 5.001)
            now[0] = 5.003
            adapter.release(bytes(syn.flow.key))
            assert synack.calls == ["accept"]
            # The other one times out (real loop time) and is judged as without holding.
            now[0] = 5.1
            await asyncio.sleep(0.15)
            assert stray[0].calls == ["drop"]
            s = hold.statistics()
            assert (s.released_by_replica_total, s.expired_total, s.waiting) == (1, 1, 0)
            assert s.latency_max_ms == 3.0
            # Shutdown judges whatever still waits.
            last = PayloadPacket(tcp4(S, 99, C, 40000, ACK))
            adapter.handle(last)
        finally:
            adapter.stop()
            q.close()
        assert last.calls == ["drop"] and hold.statistics().flushed_total == 1

    asyncio.run(run())


def test_hold_metrics_include_a_latency_histogram():
    from prometheus_client import CollectorRegistry, generate_latest

    from node.metrics import MetricSources, NodeCollector

    _, b = engines()
    hold: HoldQueue = HoldQueue(HoldConfig())
    hold.hold(b"k", "p", 1.0)
    hold.release(b"k", 1.004)
    sources = MetricSources(engine=b.statistics, table=b.table.statistics,
                            ruleset=b.ruleset.statistics, hold=hold.statistics)  # fmt: skip
    registry = CollectorRegistry()
    registry.register(NodeCollector("fw2", sources))
    text = generate_latest(registry).decode()
    assert 'stockade_hold_released_by_replica_total{node="fw2"} 1.0' in text
    assert 'stockade_hold_release_latency_seconds_bucket{le="0.003",node="fw2"} 0.0' in text
    assert 'stockade_hold_release_latency_seconds_bucket{le="0.005",node="fw2"} 1.0' in text
    assert 'stockade_hold_release_latency_seconds_count{node="fw2"} 1.0' in text


def test_bucket_quantile_interpolates_inside_the_bucket_that_holds_the_rank():
    from node.histogram import bucket_quantile

    bounds = (1.0, 2.0, 4.0)
    # 10 in (0, 1], 10 in (1, 2], none in (2, 4], none above.
    assert bucket_quantile(bounds, (10, 10, 0, 0), 0.5) == 1.0
    assert bucket_quantile(bounds, (10, 10, 0, 0), 0.75) == 1.5
    assert bucket_quantile(bounds, (10, 10, 0, 0), 0.25) == 0.5
    # An empty bucket in between is skipped, not interpolated into.
    assert bucket_quantile(bounds, (1, 0, 1, 0), 1.0) == 4.0
    assert bucket_quantile(bounds, (0, 0, 0, 0), 0.5) is None


def test_bucket_quantile_in_the_overflow_bucket_is_the_highest_bound():
    from node.histogram import bucket_quantile

    assert bucket_quantile((1.0, 2.0), (1, 0, 99), 0.99) == 2.0


def test_bucket_quantile_refuses_a_shape_that_does_not_match():
    import pytest

    from node.histogram import bucket_quantile

    with pytest.raises(ValueError, match="want bounds"):
        bucket_quantile((1.0, 2.0), (1, 2), 0.5)
    with pytest.raises(ValueError, match="not in"):
        bucket_quantile((1.0,), (1, 2), 1.5)


def test_release_waits_land_in_buckets_a_quantile_can_be_read_from():
    from node.histogram import bucket_quantile

    hold: HoldQueue = HoldQueue(HoldConfig())
    for i, wait_ms in enumerate((1.2, 1.4, 3.5, 3.6, 3.7, 3.8, 3.9, 7.0, 9.0, 60.0)):
        key = b"k%d" % i
        hold.hold(key, "p", 10.0)
        hold.release(key, 10.0 + wait_ms / 1000)
    s = hold.statistics()
    assert sum(s.latency_counts) == 10
    p50 = bucket_quantile(s.latency_bounds_ms, s.latency_counts, 0.5)
    assert p50 is not None and 3.0 < p50 <= 4.0
    p99 = bucket_quantile(s.latency_bounds_ms, s.latency_counts, 0.99)
    assert p99 is not None and 50.0 < p99 <= 75.0
