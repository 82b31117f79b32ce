"""The engine end to end over the pure core: bytes in, decisions out."""

from __future__ import annotations

import pytest

from node.engine import Engine, Verdict
from node.flow.events import CtState, DeleteReason, FlowCreated, FlowDeleted
from node.flow.table import TableConfig
from node.flow.timeouts import Timeouts
from node.packet import ACK, FIN, RST, SYN
from node.policy import parse_ruleset
from tests.packets import icmp_error, ipv4, ping4, tcp4, tcp6, udp4

C, S = "10.10.1.2", "10.10.2.2"
RULES = """
default: drop
rules:
  - name: web
    from: 10.10.1.0/24
    proto: tcp
    dport: [80, 443]
    action: accept
  - name: web6
    from: "fd00:10:1::/64"
    proto: tcp
    dport: 80
    action: accept
  - name: no-smtp
    proto: tcp
    dport: 25
    action: reject
  - name: dns
    from: 10.10.1.0/24
    proto: udp
    dport: 53
    action: accept
  - name: ping
    proto: icmp
    icmp-type: echo-request
    action: accept
"""


def engine(capacity: int = 1024, **timeouts: float) -> Engine:
    config = TableConfig(capacity=capacity, timeouts=Timeouts.from_mapping(timeouts))
    return Engine(config, parse_ruleset(RULES, "test-rules"))


def handshake(e: Engine, sport: int = 40000, now: float = 1.0) -> None:
    assert e.process(tcp4(C, sport, S, 80, SYN, seq=100), now).verdict is Verdict.ACCEPT
    synack = tcp4(S, 80, C, sport, SYN | ACK, seq=500, ack=101)
    assert e.process(synack, now + 0.01).verdict is Verdict.ACCEPT
    ack = tcp4(C, sport, S, 80, ACK, seq=101, ack=501)
    assert e.process(ack, now + 0.02).ct_state is CtState.ESTABLISHED


def test_new_flow_accepted_by_rule_creates_flow():
    e = engine()
    d = e.process(tcp4(C, 40000, S, 80, SYN, seq=100), 1.0)
    assert (d.verdict, d.ct_state, d.rule) == (Verdict.ACCEPT, CtState.NEW, "web")
    assert [type(ev) for ev in d.events] == [FlowCreated]
    assert len(e.table) == 1


def test_reply_is_established_and_passes_the_shortcut():
    e = engine()
    e.process(tcp4(C, 40000, S, 80, SYN, seq=100), 1.0)
    d = e.process(tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101), 1.01)
    assert (d.verdict, d.ct_state, d.rule) == (Verdict.ACCEPT, CtState.ESTABLISHED, None)


def test_unmatched_new_flow_is_dropped_and_not_tracked():
    e = engine()
    d = e.process(tcp4(C, 40000, S, 22, SYN), 1.0)
    assert (d.verdict, d.ct_state, d.rule) == (Verdict.DROP, CtState.NEW, None)
    assert len(e.table) == 0


def test_unsolicited_inbound_is_dropped():
    e = engine()
    assert e.process(tcp4(S, 5000, C, 80, SYN), 1.0).verdict is Verdict.DROP


def test_reject_rule_gives_reject_verdict():
    d = engine().process(tcp4(C, 40000, S, 25, SYN), 1.0)
    assert (d.verdict, d.rule) == (Verdict.REJECT, "no-smtp")


def test_mid_stream_packet_without_flow_is_invalid():
    d = engine().process(tcp4(C, 40000, S, 80, ACK, seq=5, ack=5), 1.0)
    assert (d.verdict, d.ct_state) == (Verdict.DROP, CtState.INVALID)
    assert d.reason is not None


def test_malformed_packet_is_invalid_with_counted_reason():
    e = engine()
    d = e.process(b"\x45\x00\x00", 1.0)
    assert (d.verdict, d.ct_state, d.reason) == (
        Verdict.DROP,
        CtState.INVALID,
        "malformed-truncated",
    )
    assert ("malformed-truncated", 1) in e.statistics().drop_reasons


def test_fragment_is_invalid():
    data = ipv4(C, S, 17, b"\x00" * 16, more_fragments=True, ident=7)
    d = engine().process(data, 1.0)
    assert (d.ct_state, d.reason, d.verdict) == (CtState.INVALID, "fragment", Verdict.DROP)


def test_udp_request_reply():
    e = engine()
    assert e.process(udp4(C, 5353, S, 53, b"q"), 1.0).ct_state is CtState.NEW
    d = e.process(udp4(S, 53, C, 5353, b"a"), 1.1)
    assert (d.verdict, d.ct_state) == (Verdict.ACCEPT, CtState.ESTABLISHED)


def test_icmp_echo_and_related_error():
    e = engine()
    assert e.process(ping4(C, S, ident=9), 1.0).verdict is Verdict.ACCEPT
    assert e.process(ping4(S, C, ident=9, reply=True), 1.1).ct_state is CtState.ESTABLISHED
    e.process(udp4(C, 5353, S, 53, b"q"), 1.2)
    quoted = udp4(C, 5353, S, 53, b"q")
    d = e.process(ipv4(S, C, 1, icmp_error(3, 3, quoted)), 1.3)
    assert (d.verdict, d.ct_state) == (Verdict.ACCEPT, CtState.RELATED)


def test_ipv6_flow():
    e = engine()
    d = e.process(tcp6("fd00:10:1::2", 40000, "fd00:10:2::2", 80, SYN, seq=1), 1.0)
    assert (d.verdict, d.rule) == (Verdict.ACCEPT, "web6")


def test_offload_only_once_established():
    e = engine()
    d = e.process(tcp4(C, 40000, S, 80, SYN, seq=100), 1.0)
    assert not d.offload
    d = e.process(tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101), 1.01)
    assert not d.offload  # SYN_RECV: the handshake is not complete
    d = e.process(tcp4(C, 40000, S, 80, ACK, seq=101, ack=501), 1.02)
    assert d.offload and not d.unoffload
    assert d.flow is not None and d.flow.state == "ESTABLISHED"


def test_fin_on_offloaded_flow_takes_it_back_from_the_kernel():
    e = engine()
    handshake(e)
    flow = next(iter(e.table.flows()))
    e.table.set_offloaded(flow.key, True)  # what the adapter does on offload
    d = e.process(tcp4(C, 40000, S, 80, FIN | ACK, seq=101, ack=501), 2.0)
    assert d.unoffload and not d.offload
    assert not next(iter(e.table.flows())).offloaded
    d = e.process(tcp4(S, 80, C, 40000, FIN | ACK, seq=501, ack=102), 2.1)
    assert not d.unoffload  # already taken back


def test_fin_on_flow_never_offloaded_needs_no_unoffload():
    e = engine()
    handshake(e)
    d = e.process(tcp4(C, 40000, S, 80, FIN | ACK, seq=101, ack=501), 2.0)
    assert not d.unoffload


def test_no_offload_for_rejected_or_closing_flows():
    e = engine()
    handshake(e)
    d = e.process(tcp4(C, 40000, S, 80, FIN | ACK, seq=101, ack=501), 2.0)
    assert not d.offload


def test_rst_deletes_flow_eventually_and_expiry_reports_timeout():
    e = engine(tcp_close=10)
    handshake(e)
    e.process(tcp4(C, 40000, S, 80, RST, seq=101), 2.0)
    assert e.next_deadline() is not None
    events = e.expire(1000.0)
    assert any(isinstance(ev, FlowDeleted) and ev.reason is DeleteReason.TIMEOUT for ev in events)
    assert len(e.table) == 0


def test_table_full_drops_new_flow_but_assured_flows_pass():
    e = engine(capacity=2)
    handshake(e, sport=40000)
    handshake(e, sport=40001)
    d = e.process(tcp4(C, 40002, S, 80, SYN, seq=1), 3.0)
    assert (d.verdict, d.reason) == (Verdict.DROP, "table-full")
    data = tcp4(C, 40000, S, 80, ACK, seq=101, ack=501, payload=b"x")
    assert e.process(data, 3.1).verdict is Verdict.ACCEPT


def test_swap_ruleset_applies_to_next_new_flow_only():
    e = engine()
    handshake(e)
    e.swap_ruleset(parse_ruleset("default: drop\n", "empty"))
    assert e.process(tcp4(C, 40009, S, 80, SYN), 2.0).verdict is Verdict.DROP
    more = tcp4(C, 40000, S, 80, ACK, seq=101, ack=501, payload=b"x")
    assert e.process(more, 2.1).verdict is Verdict.ACCEPT
    assert e.statistics().ruleset_swaps_total == 1


def test_statistics_count_every_packet():
    e = engine()
    handshake(e)
    e.process(b"", 2.0)
    stats = e.statistics()
    assert stats.packets_total == 4
    assert dict(stats.verdicts) == {"accept": 3, "drop": 1, "reject": 0}
    assert dict(stats.ct_states)["invalid"] == 1


@pytest.mark.parametrize("junk", [b"", b"\x60", b"\x45" + b"\xff" * 40, bytes(range(256))])
def test_junk_never_raises(junk):
    d = engine().process(junk, 1.0)
    assert d.ct_state is CtState.INVALID


def test_an_offloaded_flow_is_not_offered_again():
    e = engine()
    handshake(e)
    flow = next(iter(e.table.flows()))
    e.table.set_offloaded(flow.key, True)
    sample = tcp4(C, 40000, S, 80, ACK, seq=101, ack=501, payload=b"x")
    d = e.process(sample, 2.0)
    assert d.verdict is Verdict.ACCEPT and not d.offload
