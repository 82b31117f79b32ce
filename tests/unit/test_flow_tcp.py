"""TCP tracking through the flow table: every state-machine path.

A :class:`Conn` plays both ends of one connection and keeps their sequence
numbers, so each test reads as the conversation it checks.
"""

from __future__ import annotations

import pytest

from node.errors import Misuse
from node.flow.events import CtState, DeleteReason, FlowCreated, FlowDeleted, FlowStateChanged
from node.flow.key import flow_key
from node.flow.table import FlowTable, TableConfig, Tracked
from node.flow.tcp import (
    TRANSITIONS,
    Direction,
    Special,
    TcpInput,
    TcpState,
    classify,
    transition,
    valid_flags,
)
from node.flow.timeouts import Timeouts
from node.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, TCP, URG, Packet

CLIENT, SERVER = 0x0A000001, 0x0A000002  # 10.0.0.1, 10.0.0.2
T = Timeouts()


class Conn:
    """Both ends of a TCP connection, with their next sequence numbers."""

    def __init__(
        self,
        table: FlowTable,
        wscale: int | None = 7,
        server_wscale: int | None = 7,
        window: int = 512,
        syn_window: int = 65535,
    ) -> None:
        self.table = table
        self.syn_window = syn_window
        self.seq = {"c": 1000, "s": 5000}
        self.wscale = {"c": wscale, "s": server_wscale}
        self.window = window
        self.now = 0.0

    def packet(
        self,
        side: str,
        flags: int,
        data: int = 0,
        seq: int | None = None,
        ack: int | None = None,
        window: int | None = None,
    ) -> Packet:
        other = "s" if side == "c" else "c"
        src, sport, dst, dport = (
            (CLIENT, 40000, SERVER, 80) if side == "c" else (SERVER, 80, CLIENT, 40000)
        )
        first = self.seq[side] if seq is None else seq
        if seq is None:
            self.seq[side] = (first + data + bool(flags & SYN) + bool(flags & FIN)) & 0xFFFFFFFF
        return Packet(
            4,
            src,
            dst,
            TCP,
            sport,
            dport,
            40 + data,
            flags,
            first,
            (self.seq[other] if ack is None else ack) if flags & ACK else 0,
            (self.syn_window if flags & SYN else self.window) if window is None else window,
            self.wscale[side] if flags & SYN else None,
            data,
        )

    def send(self, side: str, flags: int, **kw: int) -> Tracked:
        self.now += 1.0
        return self.table.track(self.packet(side, flags, **kw), self.now)

    def c(self, flags: int, **kw: int) -> Tracked:
        return self.send("c", flags, **kw)

    def s(self, flags: int, **kw: int) -> Tracked:
        return self.send("s", flags, **kw)

    def open(self, rule: str | None = "web") -> None:
        """Client SYN, admitted."""
        self.now += 1.0
        syn = self.packet("c", SYN)
        assert self.table.track(syn, self.now).ct_state == CtState.NEW
        flow, _events = self.table.admit(syn, self.now, rule)
        assert flow is not None and flow.state == "SYN_SENT"

    def handshake(self) -> None:
        self.open()
        assert self.s(SYN | ACK).flow.state == "SYN_RECV"  # type: ignore[union-attr]
        assert self.c(ACK).flow.state == "ESTABLISHED"  # type: ignore[union-attr]

    @property
    def key(self) -> bytes:
        return flow_key(self.packet("c", ACK, seq=0, ack=0))[0]


def table(**kw: object) -> FlowTable:
    return FlowTable(TableConfig(**kw))  # type: ignore[arg-type]


def states(*events: object) -> list[tuple[str, str]]:
    return [(e.old_state, e.snapshot.state) for e in events if isinstance(e, FlowStateChanged)]


# --- the table itself ---------------------------------------------------------


def test_transition_table_matches_the_kernel_rows() -> None:
    # Spot checks against nf_conntrack_proto_tcp.c's tcp_conntracks.
    o, r = Direction.ORIGINAL, Direction.REPLY
    assert transition(TcpState.NONE, o, TcpInput.SYN) is TcpState.SYN_SENT
    assert transition(TcpState.SYN_SENT, r, TcpInput.SYNACK) is TcpState.SYN_RECV
    assert transition(TcpState.SYN_RECV, o, TcpInput.ACK) is TcpState.ESTABLISHED
    assert transition(TcpState.SYN_SENT, r, TcpInput.SYN) is TcpState.SYN_SENT2
    assert transition(TcpState.ESTABLISHED, o, TcpInput.SYN) is Special.IGNORE
    assert transition(TcpState.ESTABLISHED, o, TcpInput.SYNACK) is Special.INVALID
    assert transition(TcpState.TIME_WAIT, r, TcpInput.SYN) is TcpState.SYN_SENT
    assert transition(TcpState.LAST_ACK, r, TcpInput.ACK) is TcpState.TIME_WAIT
    assert len(TRANSITIONS) == 10 * 6 * 2 - 6  # all but (NONE, REPLY, *)
    with pytest.raises(Misuse):
        transition(TcpState.NONE, r, TcpInput.ACK)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (SYN, TcpInput.SYN),
        (SYN | ACK, TcpInput.SYNACK),
        (FIN | ACK | PSH, TcpInput.FIN),
        (ACK | ECE | CWR, TcpInput.ACK),
        (RST | ACK, TcpInput.RST),
        (RST | SYN | FIN, TcpInput.RST),
        (0, TcpInput.NONE),
    ],
)
def test_classify(flags: int, expected: TcpInput) -> None:
    assert classify(flags) is expected


def test_valid_flags_follow_tcp_error() -> None:
    for ok in (SYN, SYN | ACK, RST, RST | ACK, FIN | ACK, ACK, ACK | URG, ACK | PSH | ECE | CWR):
        assert valid_flags(ok)
    for bad in (0, URG, FIN, SYN | FIN, SYN | RST, FIN | RST | ACK, SYN | ACK | URG | FIN):
        assert not valid_flags(bad)


# --- opening ------------------------------------------------------------------


def test_three_way_handshake() -> None:
    conn = Conn(table())
    syn = conn.packet("c", SYN)
    first = conn.table.track(syn, 1.0)
    assert (first.ct_state, first.flow, first.forward) == (CtState.NEW, None, True)
    flow, events = conn.table.admit(syn, 1.0, "web")
    assert flow is not None and isinstance(events[0], FlowCreated)
    assert (flow.state, flow.deadline, flow.rule, flow.assured) == ("SYN_SENT", 121.0, "web", False)
    assert (flow.orig_src, flow.orig_sport, flow.orig_dst, flow.orig_dport) == (
        CLIENT,
        40000,
        SERVER,
        80,
    )
    conn.now = 1.0
    synack = conn.s(SYN | ACK)
    assert synack.ct_state == CtState.ESTABLISHED and not synack.forward
    assert synack.flow is not None and synack.flow.deadline == 2.0 + T.tcp_syn_recv
    assert states(*synack.events) == [("SYN_SENT", "SYN_RECV")]
    ack = conn.c(ACK)
    assert ack.ct_state == CtState.ESTABLISHED and ack.forward
    assert ack.flow is not None and ack.flow.assured
    assert ack.flow.deadline == 3.0 + T.tcp_established
    assert states(*ack.events) == [("SYN_RECV", "ESTABLISHED")]
    assert (ack.flow.packets_orig, ack.flow.packets_reply) == (2, 1)
    assert conn.table.statistics().assured == 1


def test_original_direction_is_new_until_a_reply() -> None:
    conn = Conn(table())
    conn.open()
    again = conn.c(SYN, seq=1000)  # retransmitted SYN
    assert again.ct_state == CtState.NEW and again.flow is not None
    assert again.flow.state == "SYN_SENT"


def test_retransmitted_syn_does_not_extend_the_deadline() -> None:
    conn = Conn(table())
    conn.open()  # at 1.0
    again = conn.c(SYN, seq=1000)
    assert again.flow is not None and again.flow.deadline == 1.0 + T.tcp_syn_sent
    assert again.flow.packets_orig == 2


def test_syn_with_new_isn_restarts_tracking() -> None:
    conn = Conn(table())
    conn.open()
    conn.c(SYN, seq=777777)  # client restarted with a new ISN
    conn.seq["c"] = 777778
    assert conn.s(SYN | ACK).ct_state == CtState.ESTABLISHED
    assert conn.c(ACK).flow.state == "ESTABLISHED"  # type: ignore[union-attr]


def test_simultaneous_open() -> None:
    conn = Conn(table())
    conn.open()
    crossing = conn.s(SYN)  # the server's own SYN crosses ours
    assert crossing.flow is not None and crossing.flow.state == "SYN_SENT2"
    answer = conn.c(SYN | ACK)
    assert answer.flow is not None and answer.flow.state == "SYN_RECV"
    done = conn.s(ACK)
    assert done.flow is not None and done.flow.state == "ESTABLISHED" and done.flow.assured
    assert states(*crossing.events, *answer.events, *done.events) == [
        ("SYN_SENT", "SYN_SENT2"),
        ("SYN_SENT2", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
    ]


def test_ack_before_synack_is_ignored() -> None:
    conn = Conn(table())
    conn.open()
    stray = conn.s(ACK, seq=99999, ack=1001)
    assert stray.ct_state == CtState.ESTABLISHED and stray.reason is None
    assert stray.flow is not None and stray.flow.state == "SYN_SENT"
    assert stray.flow.packets_reply == 0  # ignored packets are not counted
    assert conn.table.statistics().ignored_total == 1


# --- data and windows ---------------------------------------------------------


def test_unacknowledged_data_shortens_the_timeout() -> None:
    conn = Conn(table())
    conn.handshake()
    data = conn.c(ACK | PSH, data=1000)
    assert data.flow is not None and data.flow.deadline == conn.now + T.tcp_unacknowledged
    acked = conn.s(ACK)
    assert acked.flow is not None and acked.flow.deadline == conn.now + T.tcp_established
    assert (acked.flow.bytes_orig, acked.flow.bytes_reply) == (40 * 3 + 1000, 80)


def test_data_beyond_the_window_is_invalid() -> None:
    conn = Conn(table(), window=512)  # 512 << 7 = 65536 bytes
    conn.handshake()
    ok = conn.c(ACK, data=60000)
    assert ok.ct_state == CtState.ESTABLISHED
    beyond = conn.c(ACK, data=10, seq=conn.seq["c"] + 200000)
    assert (beyond.ct_state, beyond.reason, beyond.flow) == (
        CtState.INVALID,
        "tcp-out-of-window",
        None,
    )
    assert conn.table.statistics().invalid_total == {"tcp-out-of-window": 1}


def test_window_scale_needs_both_sides() -> None:
    # Only the client offers window scaling: windows are unscaled, so 512
    # bytes is all the server allows and 4000 bytes overshoot it.
    conn = Conn(table(), wscale=7, server_wscale=None, window=512, syn_window=512)
    conn.handshake()
    conn.s(ACK)
    far = conn.c(ACK, data=100, seq=conn.seq["c"] + 4000)
    assert far.reason == "tcp-out-of-window"
    # Both offer it: the server's 512 means 512 << 7 bytes.
    scaled = Conn(table(), wscale=7, server_wscale=7, window=512, syn_window=512)
    scaled.handshake()
    scaled.s(ACK)
    assert scaled.c(ACK, data=100, seq=scaled.seq["c"] + 4000).ct_state == CtState.ESTABLISHED


def test_ack_of_unseen_data_is_invalid() -> None:
    conn = Conn(table())
    conn.handshake()
    bogus = conn.c(ACK, ack=conn.seq["s"] + 100000)
    assert bogus.reason == "tcp-out-of-window"


def test_retransmission_of_acknowledged_data_is_ignored() -> None:
    conn = Conn(table(), window=1, syn_window=128)  # 128-byte windows (1 << 7)
    conn.handshake()
    for _ in range(5):
        conn.c(ACK, data=100)
        conn.s(ACK)
    old = conn.c(ACK, data=100, seq=1001)  # 500 bytes behind, all acknowledged
    assert old.ct_state == CtState.ESTABLISHED and old.reason is None
    assert conn.table.statistics().ignored_total == 1
    assert old.flow is not None and old.flow.packets_orig == 7  # not counted


def test_liberal_tracking_never_marks_out_of_window() -> None:
    conn = Conn(table(tcp_liberal=True))
    conn.handshake()
    jump = conn.c(ACK, data=10, seq=conn.seq["c"] + 10**6)
    assert jump.ct_state == CtState.ESTABLISHED
    conn.seq["c"] += 10**6
    # Tracking moved with the jump: the next in-order segment and the
    # server's ACK of the new data are in window.
    assert conn.c(ACK, data=10).ct_state == CtState.ESTABLISHED
    assert conn.s(ACK).ct_state == CtState.ESTABLISHED
    assert conn.table.statistics().invalid_total == {}


def test_offloaded_flows_are_tracked_liberally_then_resynced() -> None:
    conn = Conn(table())
    conn.handshake()
    assert conn.table.set_offloaded(conn.key, True)
    # The kernel forwarded 5 MB we never saw; a sampled packet arrives.
    conn.seq["c"] += 5_000_000
    conn.seq["s"] += 3_000_000
    sample = conn.c(ACK, data=1000)
    assert sample.ct_state == CtState.ESTABLISHED
    assert sample.flow is not None and sample.flow.offloaded
    assert conn.s(ACK).ct_state == CtState.ESTABLISHED
    # Back on the slow path: windows restart from live packets.
    assert conn.table.set_offloaded(conn.key, False)
    conn.seq["c"] += 1_000_000
    assert conn.c(ACK, data=100).ct_state == CtState.ESTABLISHED
    assert conn.s(ACK).ct_state == CtState.ESTABLISHED
    assert conn.c(ACK, data=100, seq=conn.seq["c"] + 10**6).reason == "tcp-out-of-window"
    assert not conn.table.set_offloaded(b"no such key", True)


def test_retransmissions_shorten_the_timeout() -> None:
    conn = Conn(table())
    conn.handshake()
    conn.c(ACK, data=100)
    conn.s(ACK)
    seq = conn.seq["c"]
    for _ in range(4):  # the same segment again and again, never acknowledged
        last = conn.c(ACK, data=100, seq=seq)
    assert last.flow is not None and last.flow.deadline == conn.now + T.tcp_max_retrans


# --- closing ------------------------------------------------------------------


def test_fin_from_both_sides_reaches_time_wait() -> None:
    conn = Conn(table())
    conn.handshake()
    steps = [conn.c(FIN | ACK), conn.s(ACK), conn.s(FIN | ACK), conn.c(ACK)]
    assert [s.flow.state for s in steps] == [  # type: ignore[union-attr]
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
    ]
    last = steps[-1].flow
    assert last is not None and last.deadline == conn.now + T.tcp_time_wait
    assert conn.table.next_deadline() == last.deadline


def test_simultaneous_close() -> None:
    conn = Conn(table())
    conn.handshake()
    assert conn.c(FIN | ACK).flow.state == "FIN_WAIT"  # type: ignore[union-attr]
    both = conn.s(FIN | ACK)
    assert both.flow is not None and both.flow.state == "LAST_ACK"
    assert conn.c(ACK).flow.state == "TIME_WAIT"  # type: ignore[union-attr]


def test_fin_before_synack_is_an_illegal_transition() -> None:
    conn = Conn(table())
    conn.open()
    early = conn.c(FIN | ACK)
    assert (early.ct_state, early.reason) == (CtState.INVALID, "tcp-illegal-transition")


def test_synack_from_client_on_established_is_illegal() -> None:
    conn = Conn(table())
    conn.handshake()
    assert conn.c(SYN | ACK, seq=1001).reason == "tcp-illegal-transition"


def test_rst_in_window_closes() -> None:
    conn = Conn(table())
    conn.handshake()
    conn.c(ACK, data=100)
    conn.s(ACK)
    reset = conn.s(RST | ACK)
    assert reset.flow is not None and reset.flow.state == "CLOSE"
    assert reset.flow.deadline == conn.now + T.tcp_close
    assert len(conn.table) == 1  # CLOSE lingers until its timeout
    assert conn.table.expire(conn.now + T.tcp_close)[0].reason == DeleteReason.TIMEOUT  # type: ignore[union-attr]


def test_rst_below_the_acknowledged_sequence_is_invalid() -> None:
    conn = Conn(table())
    conn.handshake()
    conn.c(ACK, data=100)
    conn.s(ACK)  # the server acknowledged the client up to 1101
    stale = conn.c(RST, seq=1050)
    assert (stale.ct_state, stale.reason) == (CtState.INVALID, "tcp-invalid-rst")


def test_rst_far_ahead_is_out_of_window() -> None:
    conn = Conn(table())
    conn.handshake()
    far = conn.c(RST, seq=conn.seq["c"] + 10**7)
    assert far.reason == "tcp-out-of-window"


def test_inexact_rst_keeps_established_for_a_challenge_ack() -> None:
    conn = Conn(table(), window=512)
    conn.handshake()
    conn.c(ACK, data=100)
    conn.s(ACK)
    near = conn.c(RST, seq=conn.seq["c"] + 50)  # in window, not the expected seq
    assert near.ct_state == CtState.ESTABLISHED
    assert near.flow is not None and near.flow.state == "ESTABLISHED"
    exact = conn.c(RST, seq=conn.seq["c"])
    assert exact.flow is not None and exact.flow.state == "CLOSE"


def test_rst_before_any_reply_deletes_the_flow() -> None:
    conn = Conn(table())
    conn.open()
    refused = conn.s(RST | ACK, seq=0)
    assert refused.ct_state == CtState.ESTABLISHED
    assert [type(e) for e in refused.events] == [FlowStateChanged, FlowDeleted]
    deleted = refused.events[-1]
    assert isinstance(deleted, FlowDeleted) and deleted.reason == DeleteReason.RST
    assert len(conn.table) == 0
    assert conn.table.statistics().deleted_total["rst"] == 1


def test_syn_in_time_wait_replaces_the_flow() -> None:
    conn = Conn(table())
    conn.handshake()
    for side, flags in (("c", FIN | ACK), ("s", ACK), ("s", FIN | ACK), ("c", ACK)):
        conn.send(side, flags)
    conn.seq["c"] += 100000
    syn = conn.packet("c", SYN)
    reopened = conn.table.track(syn, conn.now)
    assert (reopened.ct_state, reopened.flow) == (CtState.NEW, None)
    (replaced,) = reopened.events
    assert isinstance(replaced, FlowDeleted) and replaced.reason == DeleteReason.REPLACED
    assert replaced.snapshot.state == "TIME_WAIT"
    flow, _ = conn.table.admit(syn, conn.now, "web")
    assert flow is not None and flow.state == "SYN_SENT" and flow.packets_orig == 1


def test_server_may_reopen_from_time_wait_with_roles_swapped() -> None:
    conn = Conn(table())
    conn.handshake()
    for side, flags in (("c", FIN | ACK), ("s", ACK), ("s", FIN | ACK), ("c", ACK)):
        conn.send(side, flags)
    syn = conn.packet("s", SYN)
    reopened = conn.table.track(syn, conn.now)
    assert (reopened.ct_state, reopened.flow) == (CtState.NEW, None)
    assert reopened.events[0].reason == DeleteReason.REPLACED  # type: ignore[union-attr]
    flow, _ = conn.table.admit(syn, conn.now, "back")
    assert flow is not None and (flow.orig_src, flow.orig_sport) == (SERVER, 80)


def test_syn_after_own_rst_replaces_the_flow() -> None:
    conn = Conn(table())
    conn.handshake()
    assert conn.c(RST).flow.state == "CLOSE"  # type: ignore[union-attr]
    reopened = conn.c(SYN)
    assert reopened.ct_state == CtState.NEW and reopened.flow is None
    assert reopened.events[0].reason == DeleteReason.REPLACED  # type: ignore[union-attr]


def test_syn_after_peer_rst_is_ignored_then_resynced_by_the_synack() -> None:
    conn = Conn(table())
    conn.handshake()
    conn.s(RST)
    retry = conn.c(SYN, seq=900000)
    conn.seq["c"] = 900001
    assert retry.ct_state == CtState.ESTABLISHED and retry.flow is not None
    assert retry.flow.state == "CLOSE"
    answer = conn.s(SYN | ACK, seq=70000)
    conn.seq["s"] = 70001
    assert answer.flow is not None and answer.flow.state == "SYN_RECV"
    assert conn.c(ACK).flow.state == "ESTABLISHED"  # type: ignore[union-attr]


def test_syn_on_established_is_ignored_and_resyncs_when_answered() -> None:
    conn = Conn(table())
    conn.handshake()
    reuse = conn.c(SYN, seq=424242)  # client reuses the tuple; we missed the close
    assert reuse.ct_state == CtState.ESTABLISHED and reuse.flow.state == "ESTABLISHED"  # type: ignore[union-attr]
    answer = conn.s(SYN | ACK, seq=13, ack=424243)
    assert answer.flow is not None and answer.flow.state == "SYN_RECV"
    assert states(*answer.events) == [("ESTABLISHED", "SYN_RECV")]


# --- without a flow -----------------------------------------------------------


def test_non_syn_without_flow_is_invalid_unless_loose() -> None:
    strict = Conn(table())
    assert strict.c(ACK).reason == "tcp-no-flow"
    assert strict.c(FIN | ACK).reason == "tcp-no-flow"
    assert strict.s(SYN | ACK).reason == "tcp-no-flow"
    with pytest.raises(Misuse):
        strict.table.admit(strict.packet("c", ACK), 1.0, None)


def test_loose_picks_up_mid_stream() -> None:
    conn = Conn(table(tcp_loose=True))
    mid = conn.packet("c", ACK, data=100)
    assert conn.table.track(mid, 1.0).ct_state == CtState.NEW
    flow, _ = conn.table.admit(mid, 1.0, None)
    assert flow is not None and flow.state == "ESTABLISHED" and not flow.assured
    reply = conn.s(ACK)
    assert reply.ct_state == CtState.ESTABLISHED
    later = conn.c(ACK, data=10, seq=conn.seq["c"] + 10**6)  # picked-up flows are liberal
    assert later.ct_state == CtState.ESTABLISHED and later.flow.assured  # type: ignore[union-attr]
    (assured,) = later.events  # no state change, but sync must learn it is assured
    assert isinstance(assured, FlowStateChanged) and assured.old_state == "ESTABLISHED"


def test_bad_flag_combinations_are_invalid() -> None:
    conn = Conn(table())
    conn.handshake()
    assert conn.c(SYN | FIN).reason == "tcp-bad-flags"
    assert conn.c(0).reason == "tcp-bad-flags"
    assert conn.table.statistics().invalid_total == {"tcp-bad-flags": 2}
