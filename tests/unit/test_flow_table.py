"""The flow table beyond TCP: UDP, ICMP, RELATED, other protocols, timers,
capacity and early drop, statistics, and misuse."""

from __future__ import annotations

import pytest

from node.errors import ConfigError, Misuse
from node.flow.events import CtState, DeleteReason, FlowCreated, FlowDeleted, FlowStateChanged
from node.flow.key import flow_key
from node.flow.table import FlowTable, TableConfig
from node.flow.timeouts import Timeouts
from node.packet import ACK, ICMP, ICMPV6, SYN, TCP, UDP, Packet

A, B, R = 0x0A000001, 0x0A000002, 0x0A0000FE  # two hosts and a router
A6, B6 = 0x20010DB8 << 96 | 1, 0x20010DB8 << 96 | 2
T = Timeouts()


def udp(src: int, sport: int, dst: int, dport: int, length: int = 100) -> Packet:
    return Packet(4, src, dst, UDP, sport, dport, length)


def echo(src: int, dst: int, ident: int, icmp_type: int, family: int = 4) -> Packet:
    proto = ICMP if family == 4 else ICMPV6
    return Packet(family, src, dst, proto, ident, ident, 84, icmp_type=icmp_type, icmp_code=0)


def icmp_error(src: int, dst: int, quoted: Packet | None, icmp_type: int = 3) -> Packet:
    proto = ICMP if (quoted is None or quoted.family == 4) else ICMPV6
    family = 4 if proto == ICMP else 6
    return Packet(
        family, src, dst, proto, 0, 0, 56, icmp_type=icmp_type, icmp_code=1, embedded=quoted
    )


def syn(src: int = A, sport: int = 40000, dst: int = B, dport: int = 80) -> Packet:
    return Packet(4, src, dst, TCP, sport, dport, 60, SYN, 1000, 0, 65535, 7)


def admitted(table: FlowTable, p: Packet, now: float, rule: str | None = "r") -> None:
    tracked = table.track(p, now)
    assert (tracked.ct_state, tracked.flow) == (CtState.NEW, None)
    flow, events = table.admit(p, now, rule)
    assert flow is not None and isinstance(events[-1], FlowCreated)


# --- UDP ------------------------------------------------------------------------


def test_udp_is_new_until_a_reply_then_assured() -> None:
    table = FlowTable(TableConfig())
    query = udp(A, 5353, B, 53)
    admitted(table, query, 0.0)
    again = table.track(query, 1.0)
    assert again.ct_state == CtState.NEW and again.flow is not None
    assert (again.flow.state, again.flow.deadline) == ("UNREPLIED", 1.0 + T.udp)
    answer = table.track(udp(B, 53, A, 5353, 300), 2.0)
    assert answer.ct_state == CtState.ESTABLISHED and not answer.forward
    assert answer.flow is not None and answer.flow.assured
    assert (answer.flow.state, answer.flow.deadline) == ("ASSURED", 2.0 + T.udp_stream)
    (changed,) = answer.events
    assert isinstance(changed, FlowStateChanged) and changed.old_state == "UNREPLIED"
    after = table.track(query, 3.0)
    assert after.ct_state == CtState.ESTABLISHED and after.events == ()
    assert after.flow is not None
    assert (after.flow.packets_orig, after.flow.packets_reply) == (3, 1)
    assert (after.flow.bytes_orig, after.flow.bytes_reply) == (300, 300)


def test_udp_ipv6() -> None:
    table = FlowTable(TableConfig())
    out = Packet(6, A6, B6, UDP, 1000, 53, 80)
    admitted(table, out, 0.0)
    back = table.track(Packet(6, B6, A6, UDP, 53, 1000, 80), 0.5)
    assert back.ct_state == CtState.ESTABLISHED
    assert back.flow is not None and back.flow.family == 6 and back.flow.orig_src == A6


# --- ICMP -----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "ping", "pong"), [(4, 8, 0), (6, 128, 129)])
def test_icmp_echo_pairs_request_and_reply(family: int, ping: int, pong: int) -> None:
    table = FlowTable(TableConfig())
    a, b = (A, B) if family == 4 else (A6, B6)
    admitted(table, echo(a, b, 7, ping, family), 0.0)
    answer = table.track(echo(b, a, 7, pong, family), 0.1)
    assert answer.ct_state == CtState.ESTABLISHED
    assert answer.flow is not None and answer.flow.assured and answer.flow.state == "ASSURED"
    assert answer.flow.deadline == 0.1 + T.icmp


def test_icmp_reply_without_request_is_invalid() -> None:
    table = FlowTable(TableConfig())
    stray = table.track(echo(B, A, 7, 0), 0.0)
    assert (stray.ct_state, stray.reason) == (CtState.INVALID, "icmp-reply-no-flow")
    with pytest.raises(Misuse):
        table.admit(echo(B, A, 7, 0), 0.0, None)


def test_icmp_types_must_match_the_direction() -> None:
    table = FlowTable(TableConfig())
    admitted(table, echo(A, B, 7, 8), 0.0)
    assert table.track(echo(B, A, 7, 8), 0.1).reason == "icmp-wrong-direction"
    assert table.track(echo(A, B, 7, 0), 0.2).reason == "icmp-wrong-direction"


# --- RELATED ----------------------------------------------------------------------


def test_icmp_error_about_a_tracked_flow_is_related() -> None:
    table = FlowTable(TableConfig())
    first = syn()
    admitted(table, first, 0.0)
    # A router on the way tells A its SYN could not be delivered.
    error = icmp_error(R, A, first)
    related = table.track(error, 0.5)
    assert related.ct_state == CtState.RELATED and related.reason is None
    assert related.flow is not None and related.flow.orig_dport == 80
    assert not related.forward  # travels back towards the original sender
    assert related.flow.packets_orig == 1  # errors do not count as flow traffic
    # B's own error about a reply-direction packet travels forward.
    reply = Packet(4, B, A, TCP, 80, 40000, 60, SYN | ACK, 5000, 1001, 65535, 7)
    assert table.track(icmp_error(A, B, reply), 0.6).forward


def test_icmpv6_error_related_to_udp() -> None:
    table = FlowTable(TableConfig())
    out = Packet(6, A6, B6, UDP, 1000, 53, 80)
    admitted(table, out, 0.0)
    too_big = icmp_error(B6, A6, out, icmp_type=2)
    assert table.track(too_big, 0.1).ct_state == CtState.RELATED


def test_icmp_error_about_related_echo() -> None:
    table = FlowTable(TableConfig())
    ping = echo(A, B, 9, 8)
    admitted(table, ping, 0.0)
    assert table.track(icmp_error(R, A, ping, icmp_type=11), 0.1).ct_state == CtState.RELATED


@pytest.mark.parametrize(
    ("quoted", "reason"),
    [
        (syn(), "icmp-error-no-flow"),
        (None, "icmp-error-malformed"),
        (icmp_error(B, A, syn()), "icmp-error-malformed"),  # no errors about errors
    ],
)
def test_bad_icmp_errors_are_invalid(quoted: Packet | None, reason: str) -> None:
    table = FlowTable(TableConfig())
    result = table.track(icmp_error(R, A, quoted), 0.0)
    assert (result.ct_state, result.reason) == (CtState.INVALID, reason)
    with pytest.raises(Misuse):
        table.admit(icmp_error(R, A, quoted), 0.0, None)


# --- other protocols and fragments ------------------------------------------------


def test_generic_protocol_tracks_replies_but_is_never_assured() -> None:
    table = FlowTable(TableConfig())
    gre = Packet(4, A, B, 47, 0, 0, 200)
    admitted(table, gre, 0.0)
    back = table.track(Packet(4, B, A, 47, 0, 0, 200), 1.0)
    assert back.ct_state == CtState.ESTABLISHED
    assert back.flow is not None and back.flow.state == "REPLIED" and not back.flow.assured
    assert back.flow.deadline == 1.0 + T.generic


def test_fragments_are_invalid() -> None:
    table = FlowTable(TableConfig())
    fragment = Packet(4, A, B, UDP, 0, 0, 1500, is_fragment=True)
    assert table.track(fragment, 0.0).reason == "fragment"
    with pytest.raises(Misuse):
        table.admit(fragment, 0.0, None)


# --- timers -------------------------------------------------------------------------


def test_expire_removes_idle_flows_at_their_deadline() -> None:
    table = FlowTable(TableConfig())
    admitted(table, udp(A, 1, B, 2), 0.0)
    admitted(table, udp(A, 3, B, 4), 5.0)
    assert table.next_deadline() == 30.0
    assert table.expire(29.999) == []
    table.track(udp(A, 1, B, 2), 10.0)  # refresh: now due at 40
    assert table.next_deadline() == 35.0
    (gone,) = table.expire(35.0)
    assert isinstance(gone, FlowDeleted) and gone.reason == DeleteReason.TIMEOUT
    assert gone.snapshot.orig_sport == 3 and gone.at == 35.0
    assert table.next_deadline() == 40.0
    assert len(table.expire(100.0)) == 1
    assert table.next_deadline() is None and len(table) == 0


def test_shortened_deadline_is_seen_at_once() -> None:
    table = FlowTable(TableConfig())
    first = syn()
    admitted(table, first, 0.0)
    table.track(Packet(4, B, A, TCP, 80, 40000, 60, SYN | ACK, 5000, 1001, 65535, 7), 1.0)
    table.track(Packet(4, A, B, TCP, 40000, 80, 52, ACK, 1001, 5001, 512), 2.0)
    assert table.next_deadline() == 2.0 + T.tcp_established
    fin = Packet(4, A, B, TCP, 40000, 80, 52, 0x11, 1001, 5001, 512)
    assert table.track(fin, 3.0).flow.state == "FIN_WAIT"  # type: ignore[union-attr]
    assert table.next_deadline() == 3.0 + T.tcp_fin_wait
    assert len(table.expire(3.0 + T.tcp_fin_wait)) == 1


def test_a_flow_past_its_deadline_is_dead_before_expire_runs() -> None:
    table = FlowTable(TableConfig())
    admitted(table, udp(A, 1, B, 2), 0.0)
    late = table.track(udp(B, 2, A, 1), 31.0)  # a "reply" after the flow timed out
    assert late.ct_state == CtState.NEW and late.flow is None
    (gone,) = late.events
    assert isinstance(gone, FlowDeleted) and gone.reason == DeleteReason.TIMEOUT
    # admit() also replaces an expired flow, and the new flow's original
    # direction is the one that restarted it.
    flow, events = table.admit(udp(B, 2, A, 1), 31.0, None)
    assert flow is not None and flow.orig_src == B and isinstance(events[-1], FlowCreated)


# --- capacity --------------------------------------------------------------------


def test_full_table_evicts_the_oldest_non_assured_flow() -> None:
    table = FlowTable(TableConfig(capacity=3))
    for port in (1, 2, 3):
        admitted(table, udp(A, port, B, 53), float(port))
    table.track(udp(B, 53, A, 1), 4.0)  # flow 1 becomes assured
    flow, events = table.admit(udp(A, 4, B, 53), 5.0, None)
    assert flow is not None
    evicted, created = events
    assert isinstance(evicted, FlowDeleted) and evicted.reason == DeleteReason.EVICTED
    assert evicted.snapshot.orig_sport == 2  # oldest non-assured, not the assured 1
    assert isinstance(created, FlowCreated)
    assert {f.orig_sport for f in table.flows()} == {1, 3, 4}
    stats = table.statistics()
    assert (stats.entries, stats.evicted_total, stats.deleted_total["evicted"]) == (3, 1, 1)


def test_full_table_of_assured_flows_refuses_new_ones() -> None:
    table = FlowTable(TableConfig(capacity=2))
    for port in (1, 2):
        admitted(table, udp(A, port, B, 53), 0.0)
        table.track(udp(B, 53, A, port), 0.5)
    assert table.track(udp(A, 3, B, 53), 1.0).ct_state == CtState.NEW
    assert table.admit(udp(A, 3, B, 53), 1.0, None) == (None, ())
    stats = table.statistics()
    assert (stats.refused_full_total, stats.entries, stats.assured) == (1, 2, 2)
    assert stats.evicted_total == 0


# --- operator API and statistics ------------------------------------------------


def test_get_delete_flush_and_flows() -> None:
    table = FlowTable(TableConfig())
    admitted(table, udp(A, 1, B, 2), 0.0, rule="dns")
    admitted(table, syn(), 0.0, rule="web")
    key, _ = flow_key(udp(B, 2, A, 1))
    snapshot = table.get(key)
    assert snapshot is not None and snapshot.rule == "dns" and snapshot.key == key
    assert key in table and table.get(b"nope") is None
    deleted = table.delete(key, DeleteReason.ADMIN, 1.0)
    assert deleted is not None and deleted.reason == DeleteReason.ADMIN
    assert table.delete(key, DeleteReason.ADMIN, 1.0) is None
    assert [f.rule for f in table.flows()] == ["web"]
    flushed = table.flush(2.0)
    assert [e.reason for e in flushed] == [DeleteReason.FLUSH]  # type: ignore[union-attr]
    assert len(table) == 0 and table.next_deadline() is None


def test_statistics_count_everything() -> None:
    table = FlowTable(TableConfig(capacity=10))
    admitted(table, udp(A, 1, B, 2), 0.0)
    table.track(udp(B, 2, A, 1), 0.1)
    table.track(Packet(4, A, B, TCP, 1, 2, 40, ACK, 1, 1, 100), 0.2)
    table.track(echo(B, A, 1, 0), 0.3)
    table.track(Packet(4, A, B, TCP, 1, 2, 40, ACK, 1, 1, 100), 0.4)
    table.expire(1000.0)
    stats = table.statistics()
    assert (stats.entries, stats.capacity, stats.assured, stats.created_total) == (0, 10, 0, 1)
    assert stats.deleted_total["timeout"] == 1 and sum(stats.deleted_total.values()) == 1
    assert dict(stats.invalid_total) == {"tcp-no-flow": 2, "icmp-reply-no-flow": 1}
    assert stats.heap_entries == 0
    table.verify()


def test_slots_are_reused_after_deletion() -> None:
    table = FlowTable(TableConfig(capacity=4))
    for round_ in range(50):
        for port in range(4):
            admitted(table, udp(A, port, B, 2), float(round_))
        assert len(table.flush(float(round_))) == 4
        table.verify()
    assert table.statistics().created_total == 200


# --- misuse and config ----------------------------------------------------------


def test_admitting_an_existing_flow_is_misuse() -> None:
    table = FlowTable(TableConfig())
    admitted(table, udp(A, 1, B, 2), 0.0)
    with pytest.raises(Misuse):
        table.admit(udp(B, 2, A, 1), 1.0, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity": 0},
        {"capacity": True},
        {"capacity": 2**32},
        {"capacity": 1.5},
        {"timeouts": {"udp": 5}},
        {"tcp_loose": 1},
        {"tcp_liberal": "yes"},
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TableConfig(**kwargs)  # type: ignore[arg-type]
