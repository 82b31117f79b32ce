"""Replicas in the flow table: install, version ordering, removal and tombstones,
no idle expiry, takeover by local traffic, liberal TCP, capacity, no echo."""

from __future__ import annotations

import dataclasses
import ipaddress
import math

import pytest

from node.engine import Engine, Verdict
from node.errors import BadInput, ConfigError, Misuse
from node.flow.events import CtState, DeleteReason, FlowCreated, FlowDeleted, FlowStateChanged
from node.flow.key import flow_key
from node.flow.replica import ApplyOutcome, FlowOrigin, ReplicaDeleted, Tombstones
from node.flow.table import FlowTable, TableConfig
from node.flow.timeouts import Timeouts
from node.packet import ACK, FIN, SYN, TCP, UDP, Packet, parse
from node.policy import parse_ruleset
from syncd.records import FlowRecord
from tests.packets import ping4, tcp4, udp4

C, S = "10.10.1.2", "10.10.2.2"
T = Timeouts()
RULES = """
default: drop
rules:
  - name: web
    from: 10.10.1.0/24
    proto: tcp
    dport: 80
    action: accept
"""


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def record(
    src: str = C,
    sport: int = 40000,
    dst: str = S,
    dport: int = 80,
    *,
    proto: int = TCP,
    state: str = "ESTABLISHED",
    assured: bool = True,
    origin: str = "fw2",
    version: int = 5,
    timeout: float = 300.0,
) -> FlowRecord:
    """A peer's record for the flow src:sport -> dst:dport (original direction)."""
    key, _ = flow_key(Packet(4, ip(src), ip(dst), proto, sport, dport, 40))
    return FlowRecord(
        key=key.to_bytes(),
        proto=proto,
        family=4,
        orig_src=ip(src),
        orig_sport=sport,
        orig_dst=ip(dst),
        orig_dport=dport,
        state=state,
        assured=assured,
        timeout=timeout,
        origin=origin,
        version=version,
    )


def table(capacity: int = 1024, **config: object) -> FlowTable:
    t = FlowTable(TableConfig(capacity=capacity, **config))  # type: ignore[arg-type]
    t.set_local_origin("fw1")
    return t


def engine(capacity: int = 1024) -> Engine:
    e = Engine(TableConfig(capacity=capacity), parse_ruleset(RULES, "test-rules"))
    e.table.set_local_origin("fw1")
    return e


def syn(sport: int = 40000) -> Packet:
    return parse(tcp4(C, sport, S, 80, SYN, seq=100))


# --- install ---------------------------------------------------------------------


def test_install_holds_a_replica_with_no_events_and_no_deadline():
    t = table()
    r = record()
    assert t.install(r, 10.0) == (ApplyOutcome.INSTALLED, ())
    flow = t.get(r.key)
    assert flow is not None
    assert (flow.state, flow.assured, flow.deadline) == ("ESTABLISHED", True, math.inf)
    assert (flow.orig_src, flow.orig_sport, flow.orig_dst, flow.orig_dport) == (
        ip(C), 40000, ip(S), 80,
    )  # fmt: skip
    assert t.origin_of(r.key) == FlowOrigin("fw2", 5, True)
    stats = t.statistics()
    assert (stats.entries, stats.replicas, stats.assured, stats.created_total) == (1, 1, 1, 0)
    assert stats.replica_applied_total["installed"] == 1
    t.verify()


def test_replica_keeps_the_original_direction_of_the_record():
    # The record's original direction is the server -> client one (B -> A in key order).
    t = table()
    r = record(S, 80, C, 40000, state="SYN_SENT", assured=False)
    t.install(r, 0.0)
    flow = t.get(r.key)
    assert flow is not None and (flow.orig_src, flow.orig_dport) == (ip(S), 40000)
    reply = t.track(parse(tcp4(C, 40000, S, 80, SYN | ACK, seq=9, ack=1)), 1.0)
    assert reply.ct_state is CtState.ESTABLISHED and not reply.forward


def test_replicas_never_idle_expire_here():
    t = table()
    t.install(record(), 0.0)
    t.install(record(proto=UDP, sport=5000, dport=53, state="ASSURED"), 0.0)
    assert t.next_deadline() is None
    assert t.expire(1e9) == []
    assert len(t) == 2
    t.verify()


def test_next_deadline_skips_replicas_but_not_own_flows():
    t = table()
    t.install(record(sport=1), 0.0)
    tracked = t.track(syn(), 1.0)
    assert tracked.ct_state is CtState.NEW
    t.admit(syn(), 1.0, "web")
    assert t.next_deadline() == 1.0 + T.tcp_syn_sent


# --- version ordering --------------------------------------------------------------


def test_lower_or_equal_versions_are_ignored_and_counted():
    t = table()
    t.install(record(version=5), 0.0)
    assert t.install(record(version=4, state="FIN_WAIT"), 1.0)[0] is ApplyOutcome.STALE
    assert t.install(record(version=5, state="FIN_WAIT"), 1.0)[0] is ApplyOutcome.DUPLICATE
    flow = t.get(record().key)
    assert flow is not None and flow.state == "ESTABLISHED"
    applied = t.statistics().replica_applied_total
    assert (applied["stale"], applied["duplicate"]) == (1, 1)


def test_origin_breaks_version_ties():
    t = table()
    t.install(record(version=5, origin="fw2"), 0.0)
    assert t.install(record(version=5, origin="fw0"), 1.0)[0] is ApplyOutcome.STALE
    outcome, _ = t.install(record(version=5, origin="fw3", state="CLOSE_WAIT"), 1.0)
    assert outcome is ApplyOutcome.UPDATED
    assert t.origin_of(record().key) == FlowOrigin("fw3", 5, True)


def test_newer_record_updates_state_and_assured_flag():
    t = table()
    t.install(record(state="SYN_SENT", assured=False, version=1), 0.0)
    assert t.statistics().assured == 0
    t.install(record(state="ESTABLISHED", assured=True, version=2), 1.0)
    assert t.statistics().assured == 1
    t.install(record(state="FIN_WAIT", assured=False, version=3), 2.0)
    flow = t.get(record().key)
    assert flow is not None and (flow.state, flow.assured) == ("FIN_WAIT", False)
    assert t.statistics().assured == 0
    t.verify()


# --- removal and tombstones --------------------------------------------------------------


def test_newer_delete_removes_quietly_and_blocks_late_creates():
    t = table()
    t.install(record(version=5), 0.0)
    outcome, events = t.remove_replica(record(version=6), 1.0)
    assert outcome is ApplyOutcome.REMOVED
    assert len(events) == 1 and isinstance(events[0], ReplicaDeleted)
    assert events[0].reason is DeleteReason.ADMIN
    assert record().key not in t
    assert t.install(record(version=6), 2.0)[0] is ApplyOutcome.BLOCKED
    assert t.install(record(version=4), 2.0)[0] is ApplyOutcome.BLOCKED
    assert t.install(record(version=7), 2.0)[0] is ApplyOutcome.INSTALLED
    assert t.statistics().tombstones == 0  # a newer flow replaced the tombstone
    t.verify()


def test_older_delete_leaves_the_flow():
    t = table()
    t.install(record(version=5), 0.0)
    assert t.remove_replica(record(version=4), 1.0) == (ApplyOutcome.STALE, ())
    assert record().key in t


def test_delete_before_create_tombstones_the_key():
    t = table()
    assert t.remove_replica(record(version=9), 0.0) == (ApplyOutcome.TOMBSTONED, ())
    assert t.install(record(version=8), 1.0)[0] is ApplyOutcome.BLOCKED
    assert t.remove_replica(record(version=7), 1.0)[0] is ApplyOutcome.STALE


def test_tombstones_expire_after_their_ttl():
    t = table(tombstone_ttl=5.0)
    t.remove_replica(record(version=9), 0.0)
    assert t.install(record(version=8), 4.9)[0] is ApplyOutcome.BLOCKED
    assert t.install(record(version=8), 5.0)[0] is ApplyOutcome.INSTALLED


def test_tombstones_are_bounded_oldest_first():
    stones = Tombstones(capacity=2, ttl=30.0)
    for i, key in enumerate((b"a", b"b", b"c")):
        assert stones.add(key, (1, "fw2"), float(i))
    assert list(stones) == [b"b", b"c"] and stones.dropped == 1
    assert not stones.add(b"c", (1, "fw1"), 3.0)  # a lower order keeps the held one
    assert stones.blocks(b"c", (1, "fw2"), 3.0) and not stones.blocks(b"a", (1, "fw2"), 3.0)
    stones.purge(31.5)
    assert list(stones) == [b"c"]  # c was stored at 2.0: expires at 32.0


def test_peer_delete_of_an_own_flow_is_not_echoed():
    t = table()
    t.admit(syn(), 0.0, "web")
    key = flow_key(syn())[0]
    _, events = t.remove_replica(dataclasses.replace(record(), state="SYN_SENT"), 1.0)
    assert [type(e) for e in events] == [ReplicaDeleted]
    assert key not in t


# --- own flows: stamps, restore ------------------------------------------------------------


def test_stamp_versions_own_flows_and_tombstones_their_deletes():
    t = table()
    _, events = t.admit(syn(), 0.0, "web")
    created = events[-1]
    t.stamp(created, 10)
    key = created.snapshot.key
    assert t.origin_of(key) == FlowOrigin("fw1", 10, False)
    assert t.install(record(version=9, state="SYN_RECV"), 1.0)[0] is ApplyOutcome.STALE
    assert t.install(record(version=11, state="SYN_RECV"), 1.0)[0] is ApplyOutcome.UPDATED
    assert t.origin_of(key) == FlowOrigin("fw2", 11, True)
    deleted = t.delete(key, DeleteReason.ADMIN, 2.0)
    assert isinstance(deleted, ReplicaDeleted)  # it was a replica by then


def test_stamped_local_delete_blocks_an_older_peer_record():
    t = table()
    _, events = t.admit(syn(), 0.0, "web")
    t.stamp(events[-1], 3)
    deleted = t.delete(events[-1].snapshot.key, DeleteReason.ADMIN, 1.0)
    assert deleted is not None and type(deleted) is FlowDeleted
    t.stamp(deleted, 4)
    assert t.install(record(version=3, origin="fw9"), 2.0)[0] is ApplyOutcome.BLOCKED
    assert t.install(record(version=4, origin="fw9"), 2.0)[0] is ApplyOutcome.INSTALLED


def test_stamp_ignores_flows_that_became_replicas_and_older_versions():
    t = table()
    _, events = t.admit(syn(), 0.0, "web")
    t.stamp(events[-1], 10)
    t.stamp(events[-1], 7)
    key = events[-1].snapshot.key
    assert t.origin_of(key) == FlowOrigin("fw1", 10, False)
    t.install(record(version=20, state="SYN_RECV"), 1.0)
    t.stamp(events[-1], 30)
    assert t.origin_of(key) == FlowOrigin("fw2", 20, True)


def test_record_of_this_node_restores_an_own_flow_that_expires_here():
    t = table()
    r = record(origin="fw1", version=3, timeout=50.0)
    assert t.install(r, 100.0)[0] is ApplyOutcome.INSTALLED
    flow = t.get(r.key)
    assert flow is not None and flow.deadline == 150.0
    assert t.origin_of(r.key) == FlowOrigin("fw1", 3, False)
    assert t.statistics().replicas == 0
    assert t.next_deadline() == 150.0
    (gone,) = t.expire(150.0)
    assert type(gone) is FlowDeleted and gone.reason is DeleteReason.TIMEOUT


def test_own_flows_lists_own_flows_with_versions():
    t = table()
    _, events = t.admit(syn(), 0.0, "web")
    t.stamp(events[-1], 8)
    t.install(record(sport=40001), 0.0)
    own = list(t.own_flows())
    assert [(s.key, v) for s, v in own] == [(events[-1].snapshot.key, 8)]


def test_local_origin_is_named_once():
    t = table()
    t.set_local_origin("fw1")
    with pytest.raises(Misuse):
        t.set_local_origin("fw7")
    other = FlowTable(TableConfig())
    other.install(record(origin="fw2"), 0.0)
    with pytest.raises(Misuse):
        other.set_local_origin("fw2")  # already known as a peer


# --- local traffic on replicas -------------------------------------------------------------


def test_asymmetric_routing_replica_passes_mid_stream_packets_both_ways():
    """A flow created on fw2 whose packets cross this node mid-stream, both directions."""
    e = engine()
    r = record(version=5)
    e.table.install(r, 0.0)
    data = tcp4(C, 40000, S, 80, ACK, seq=123456789, ack=987654321, payload=b"x" * 100)
    d = e.process(data, 1.0)
    assert (d.verdict, d.ct_state, d.events) == (Verdict.ACCEPT, CtState.ESTABLISHED, ())
    back = tcp4(S, 80, C, 40000, ACK, seq=987654321, ack=123456889, payload=b"y" * 50)
    d = e.process(back, 1.1)
    assert (d.verdict, d.ct_state, d.events) == (Verdict.ACCEPT, CtState.ESTABLISHED, ())
    assert e.table.origin_of(r.key) == FlowOrigin("fw2", 5, True)  # still fw2's
    flow = e.table.get(r.key)
    assert flow is not None and flow.deadline == math.inf
    assert (flow.packets_orig, flow.packets_reply) == (1, 1)


def test_without_the_replica_the_same_packets_are_invalid():
    e = engine()
    data = tcp4(C, 40000, S, 80, ACK, seq=123456789, ack=987654321, payload=b"x" * 100)
    d = e.process(data, 1.0)
    assert (d.verdict, d.ct_state) == (Verdict.DROP, CtState.INVALID)


def test_replica_tcp_is_tracked_liberally():
    """Sequence jumps a strict tracker would call out of window pass on a replica."""
    e = engine()
    e.table.install(record(), 0.0)
    seqs = (1000, 1000 + 2_000_000_000, 1000 + 3_500_000_000)
    for i, seq in enumerate(seqs):
        packet = tcp4(C, 40000, S, 80, ACK, seq=seq % 2**32, ack=5000, payload=b"z" * 10)
        d = e.process(packet, 1.0 + i)
        assert (d.verdict, d.ct_state) == (Verdict.ACCEPT, CtState.ESTABLISHED)


def test_a_strictly_tracked_own_flow_rejects_the_same_jump():
    e = engine()
    e.process(tcp4(C, 40000, S, 80, SYN, seq=100), 1.0)
    e.process(tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101), 1.01)
    e.process(tcp4(C, 40000, S, 80, ACK, seq=101, ack=501), 1.02)
    jump = tcp4(C, 40000, S, 80, ACK, seq=101 + 2_000_000_000, ack=501, payload=b"z")
    assert e.process(jump, 1.03).ct_state is CtState.INVALID


def test_state_change_on_a_replica_takes_it_over():
    e = engine()
    r = record(version=5)
    e.table.install(r, 0.0)
    fin = tcp4(C, 40000, S, 80, FIN | ACK, seq=7000, ack=9000)
    d = e.process(fin, 2.0)
    assert d.verdict is Verdict.ACCEPT
    (changed,) = d.events
    assert isinstance(changed, FlowStateChanged) and changed.old_state == "ESTABLISHED"
    assert changed.snapshot.state == "FIN_WAIT"
    assert changed.snapshot.deadline == 2.0 + T.tcp_fin_wait
    assert e.table.origin_of(r.key) == FlowOrigin("fw1", 5, False)
    stats = e.table.statistics()
    assert (stats.replicas, stats.takeovers_total) == (0, 1)
    (expired,) = e.expire(2.0 + T.tcp_fin_wait)
    assert type(expired) is FlowDeleted  # own now: its timeout is news for the cluster
    e.table.verify()


def test_udp_reply_on_an_unreplied_replica_takes_it_over():
    t = table()
    r = record(proto=UDP, sport=5353, dport=53, state="UNREPLIED", assured=False)
    t.install(r, 0.0)
    query = t.track(parse(udp4(C, 5353, S, 53, b"q")), 1.0)
    assert query.ct_state is CtState.NEW and query.events == ()
    assert t.origin_of(r.key) == FlowOrigin("fw2", 5, True)
    answer = t.track(parse(udp4(S, 53, C, 5353, b"a")), 2.0)
    assert answer.ct_state is CtState.ESTABLISHED
    (changed,) = answer.events
    assert isinstance(changed, FlowStateChanged) and changed.snapshot.state == "ASSURED"
    assert changed.snapshot.deadline == 2.0 + T.udp_stream
    assert t.origin_of(r.key) == FlowOrigin("fw1", 5, False)
    t.verify()


def test_icmp_echo_replica_passes_the_reply():
    t = table()
    key, _ = flow_key(parse(ping4(C, S, 77)))
    r = dataclasses.replace(
        record(proto=1, state="UNREPLIED", assured=False, sport=77, dport=77), key=key.to_bytes()
    )
    t.install(r, 0.0)
    reply = t.track(parse(ping4(S, C, 77, reply=True)), 1.0)
    assert reply.ct_state is CtState.ESTABLISHED


def test_replica_of_another_protocol_tracks_replies():
    t = table()
    r = record(proto=47, sport=0, dport=0, state="UNREPLIED", assured=False)
    t.install(r, 0.0)
    gre_back = Packet(4, ip(S), ip(C), 47, 0, 0, 100)
    tracked = t.track(gre_back, 1.0)
    assert tracked.ct_state is CtState.ESTABLISHED
    assert tracked.flow is not None and tracked.flow.state == "REPLIED"


def test_new_connection_on_a_closed_replica_resyncs_and_is_taken_over():
    """A reused tuple: the SYN is let through (as Linux does when it cannot tell
    who closed), the SYN/ACK answering it resyncs the flow, which becomes ours."""
    e = engine()
    r = record(state="TIME_WAIT", version=5)
    e.table.install(r, 0.0)
    d = e.process(tcp4(C, 40000, S, 80, SYN, seq=1000), 1.0)
    assert (d.verdict, d.events) == (Verdict.ACCEPT, ())
    d = e.process(tcp4(S, 80, C, 40000, SYN | ACK, seq=5000, ack=1001), 1.1)
    assert d.verdict is Verdict.ACCEPT
    (changed,) = d.events
    assert isinstance(changed, FlowStateChanged) and changed.snapshot.state == "SYN_RECV"
    d = e.process(tcp4(C, 40000, S, 80, ACK, seq=1001, ack=5001), 1.2)
    assert d.ct_state is CtState.ESTABLISHED and d.flow is not None
    assert (d.flow.state, d.flow.assured) == ("ESTABLISHED", True)
    assert e.table.origin_of(r.key) == FlowOrigin("fw1", 5, False)


# --- capacity ---------------------------------------------------------------------------


def test_assured_replicas_are_never_early_dropped():
    e = engine(capacity=2)
    e.table.install(record(sport=1), 0.0)
    e.table.install(record(sport=2), 0.0)
    d = e.process(tcp4(C, 40000, S, 80, SYN, seq=1), 1.0)
    assert (d.verdict, d.reason) == (Verdict.DROP, "table-full")
    assert len(e.table) == 2


def test_non_assured_replica_is_evicted_quietly_for_a_local_flow():
    t = table(capacity=1)
    t.install(record(sport=1, state="SYN_SENT", assured=False), 0.0)
    flow, events = t.admit(syn(), 1.0, "web")
    assert flow is not None
    assert [type(ev) for ev in events] == [ReplicaDeleted, FlowCreated]
    assert events[0].reason is DeleteReason.EVICTED  # type: ignore[union-attr]


def test_install_at_capacity_evicts_a_non_assured_own_flow_as_news():
    t = table(capacity=1)
    t.admit(syn(), 0.0, "web")
    outcome, events = t.install(record(sport=1), 1.0)
    assert outcome is ApplyOutcome.INSTALLED
    (evicted,) = events
    assert type(evicted) is FlowDeleted and evicted.reason is DeleteReason.EVICTED


def test_install_at_capacity_of_assured_flows_is_refused():
    t = table(capacity=1)
    t.install(record(sport=1), 0.0)
    assert t.install(record(sport=2), 1.0) == (ApplyOutcome.FULL, ())
    assert t.statistics().replica_applied_total["full"] == 1


def test_flush_reports_replicas_as_replica_deletions():
    t = table()
    t.install(record(sport=1), 0.0)
    t.admit(syn(), 0.0, "web")
    kinds = sorted(type(ev).__name__ for ev in t.flush(1.0))
    assert kinds == ["FlowDeleted", "ReplicaDeleted"]
    assert t.statistics().replicas == 0


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"orig_sport": 40001},  # tuple does not match the key
        {"family": 6, "orig_src": 1, "orig_dst": 2},  # family differs from the key
        {"proto": UDP},  # protocol differs from the key
        {"state": "ASSURED"},  # not a TCP state
        {"state": "NONE"},  # the starting point is not a state a flow is in
        {"key": b"\x04\x06" + b"\xff" * 12},  # endpoints not in canonical order
        {"key": b"\x04\x06\x00"},  # wrong length
    ],
)
def test_record_contradicting_its_key_is_bad_input(change):
    t = table()
    with pytest.raises(BadInput):
        t.install(dataclasses.replace(record(), **change), 0.0)
    assert len(t) == 0


def test_udp_record_needs_a_udp_state():
    t = table()
    with pytest.raises(BadInput):
        t.install(record(proto=UDP, state="ESTABLISHED"), 0.0)


@pytest.mark.parametrize(
    "config", [{"tombstone_capacity": 0}, {"tombstone_ttl": 0.0}, {"tombstone_ttl": True}]
)
def test_tombstone_config_is_validated(config):
    with pytest.raises(ConfigError):
        TableConfig(**config)
