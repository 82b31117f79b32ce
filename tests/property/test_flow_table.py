"""Flow table properties: keys are direction-independent and round-trip, and
random traffic on a few flows keeps every table invariant, with events that
describe exactly the set of flows (what the sync daemon relies on)."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from node.errors import Misuse
from node.flow.events import CtState, DeleteReason, FlowCreated, FlowDeleted, FlowStateChanged
from node.flow.key import FlowKey, flow_key
from node.flow.table import FlowTable, TableConfig, Tracked
from node.packet import ACK, FIN, ICMP, RST, SYN, TCP, UDP, Packet

# --- keys ------------------------------------------------------------------------


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    family = draw(st.sampled_from([4, 6]))
    bits = 32 if family == 4 else 128
    addr = st.integers(0, 2**bits - 1)
    port = st.integers(0, 65535)
    proto = draw(st.integers(0, 255))
    return family, proto, draw(addr), draw(port), draw(addr), draw(port)


@given(endpoints())
def test_key_is_direction_independent_and_round_trips(
    e: tuple[int, int, int, int, int, int],
) -> None:
    family, proto, src, sport, dst, dport = e
    there, a_to_b = flow_key(Packet(family, src, dst, proto, sport, dport, 40))
    back, b_to_a = flow_key(Packet(family, dst, src, proto, dport, sport, 40))
    assert there == back
    assert a_to_b != b_to_a or (src, sport) == (dst, dport)
    assert FlowKey.from_bytes(there.to_bytes()) == there
    low, high = sorted([(src, sport), (dst, dport)])
    assert there.fields() == (family, proto, *low, *high)


# --- the table under random traffic ----------------------------------------------

HOSTS = [0x0A000001, 0x0A000002, 0x0A000003]
# A few conversations (proto, client, client port, server, server port); the
# capacity below is smaller than their number, so early drop happens.
CONVERSATIONS = [
    (TCP, HOSTS[0], 40000, HOSTS[1], 80),
    (TCP, HOSTS[0], 40001, HOSTS[1], 80),
    (TCP, HOSTS[2], 40000, HOSTS[1], 80),
    (UDP, HOSTS[0], 5353, HOSTS[1], 53),
    (ICMP, HOSTS[0], 7, HOSTS[2], 7),
    (47, HOSTS[0], 0, HOSTS[2], 0),
]
TCP_FLAGS = [SYN, SYN, SYN | ACK, SYN | ACK, ACK, ACK, ACK, FIN | ACK, RST, RST | ACK, SYN | FIN]
JITTER = st.sampled_from([0, 0, 0, 0, 1, -1, -3000, 100_000, 2**31])
# What each side sends next in a tidy conversation: state -> (side, flags),
# side 0 being the side that opened the flow.
PLAUSIBLE = {
    "SYN_SENT": (1, SYN | ACK),
    "SYN_SENT2": (0, SYN | ACK),
    "SYN_RECV": (0, ACK),
    "ESTABLISHED": (0, ACK),
    "FIN_WAIT": (1, ACK),
    "CLOSE_WAIT": (1, FIN | ACK),
    "LAST_ACK": (0, ACK),
}
DT = st.sampled_from([0.0, 0.1, 0.1, 0.1, 1.0, 1.0, 5.0, 40.0, 200.0])


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = FlowTable(TableConfig(capacity=3))
        self.now = 0.0
        self.model: dict[bytes, bool] = {}  # key -> assured, rebuilt from events only
        # Next sequence number per (conversation, side), as the hosts see it.
        self.next_seq = {
            (c, side): 1000 + 7919 * c + 5000 * side for c in range(7) for side in (0, 1)
        }

    def packet_of(self, conv: int, side: int, flags: int, seq: int, ack: int, data: int) -> Packet:
        proto, client, cport, server, sport = CONVERSATIONS[conv]
        src, s_port, dst, d_port = (
            (client, cport, server, sport) if side == 0 else (server, sport, client, cport)
        )
        if proto == TCP:
            window = 65535 if flags & SYN else 512
            return Packet(
                4, src, dst, TCP, s_port, d_port, 40 + data, flags, seq, ack, window, 7, data
            )
        if proto == ICMP:
            kind = 8 if side == 0 else 0
            return Packet(4, src, dst, ICMP, s_port, d_port, 84, icmp_type=kind, icmp_code=0)
        return Packet(4, src, dst, proto, s_port, d_port, 60 + data)

    # -- rules --

    @rule(
        conv=st.integers(0, len(CONVERSATIONS) - 1),
        side=st.sampled_from([0, 1]),
        flags=st.sampled_from(TCP_FLAGS),
        seq_jitter=JITTER,
        ack_jitter=JITTER,
        data=st.sampled_from([0, 0, 10, 1000]),
        admit=st.sampled_from([True, True, True, False]),
        dt=DT,
        error=st.sampled_from([False] * 7 + [True]),
    )
    def send(
        self,
        conv: int,
        side: int,
        flags: int,
        seq_jitter: int,
        ack_jitter: int,
        data: int,
        admit: bool,
        dt: float,
        error: bool,
    ) -> None:
        """One packet of a conversation (or, rarely, an ICMP error about one)."""
        self.now += dt
        if error:
            self.icmp_error(conv, side)
            return
        seq = (self.next_seq[(conv, side)] + seq_jitter) % 2**32
        ack = (self.next_seq[(conv, 1 - side)] + ack_jitter) % 2**32
        p = self.packet_of(conv, side, flags, seq, ack, data)
        tracked = self.table.track(p, self.now)
        self.check_tracked(tracked)
        self.apply(tracked.events)
        if tracked.ct_state != CtState.INVALID and p.proto == TCP and not seq_jitter:
            step = data + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self.next_seq[(conv, side)] = (seq + step) % 2**32
        if tracked.ct_state == CtState.NEW and tracked.flow is None and admit:
            flow, events = self.table.admit(p, self.now, f"rule-{conv}")
            self.apply(events)
            if flow is None:
                assert self.table.statistics().refused_full_total > 0
                assert all(self.model.values())  # refused only when all are assured

    def icmp_error(self, conv: int, side: int) -> None:
        quoted = self.packet_of(conv, side, ACK, 1, 1, 0)
        error = Packet(
            4, HOSTS[2], quoted.src, ICMP, 0, 0, 56, icmp_type=3, icmp_code=1, embedded=quoted
        )
        tracked = self.table.track(error, self.now)
        self.check_tracked(tracked)
        key = bytes(flow_key(quoted)[0])
        live = key in self.model and self.table.get(key).deadline > self.now  # type: ignore[union-attr]
        assert (tracked.ct_state == CtState.RELATED) == live

    @rule(
        conv=st.integers(0, 2),
        coin=st.booleans(),
        data=st.sampled_from([0, 100]),
        dt=st.sampled_from([0.0, 0.1, 1.0]),
    )
    def converse(self, conv: int, coin: bool, data: int, dt: float) -> None:
        """The packet a well-behaved TCP pair would send next, as we track it."""
        snapshot = self.table.get(flow_key(self.packet_of(conv, 0, ACK, 0, 0, 0))[0])
        state = "NONE" if snapshot is None else snapshot.state
        client_first = snapshot is None or snapshot.orig_sport == CONVERSATIONS[conv][2]
        side, flags = PLAUSIBLE.get(state, (0, SYN))
        if state in ("ESTABLISHED", "CLOSE_WAIT") and coin:
            side, flags = 1 - side, FIN | ACK if state == "ESTABLISHED" else ACK
        if not client_first:
            side = 1 - side
        self.send(conv, side, flags, 0, 0, data if flags == ACK else 0, True, dt, False)

    @rule(dt=st.sampled_from([0.0, 10.0, 100.0, 1000.0]))
    def expire(self, dt: float) -> None:
        self.now += dt
        events = self.table.expire(self.now)
        assert all(isinstance(e, FlowDeleted) and e.reason == DeleteReason.TIMEOUT for e in events)
        self.apply(events)
        deadline = self.table.next_deadline()
        assert deadline is None or deadline > self.now

    @precondition(lambda self: len(self.table) > 0)
    @rule(pick=st.integers(0, 10), offloaded=st.booleans())
    def offload(self, pick: int, offloaded: bool) -> None:
        keys = sorted(self.model)
        assert self.table.set_offloaded(keys[pick % len(keys)], offloaded)

    @precondition(lambda self: len(self.table) > 0)
    @rule(pick=st.integers(0, 10))
    def delete(self, pick: int) -> None:
        keys = sorted(self.model)
        event = self.table.delete(keys[pick % len(keys)], DeleteReason.ADMIN, self.now)
        assert event is not None
        self.apply((event,))

    @precondition(lambda self: len(self.table) > 0)
    @rule(pick=st.integers(0, 10))
    def admit_of_a_live_flow_is_misuse(self, pick: int) -> None:
        keys = sorted(self.model)
        snapshot = self.table.get(keys[pick % len(keys)])
        assert snapshot is not None
        if snapshot.proto != TCP and snapshot.deadline > self.now:
            p = Packet(
                4,
                snapshot.orig_src,
                snapshot.orig_dst,
                snapshot.proto,
                snapshot.orig_sport,
                snapshot.orig_dport,
                50,
                icmp_type=8,
            )
            try:
                self.table.admit(p, self.now, None)
            except Misuse:
                return
            raise AssertionError("admit() of a live flow must be Misuse")

    # -- checks --

    def check_tracked(self, tracked: Tracked) -> None:
        if tracked.ct_state == CtState.INVALID:
            assert tracked.flow is None and tracked.reason
        else:
            assert tracked.reason is None
        if tracked.ct_state == CtState.RELATED:
            assert tracked.flow is not None

    def apply(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, FlowCreated):
                key = bytes(event.snapshot.key)
                assert key not in self.model
                assert not event.snapshot.assured
                self.model[key] = False
            elif isinstance(event, FlowDeleted):
                key = bytes(event.snapshot.key)
                assert key in self.model
                if event.reason == DeleteReason.EVICTED:
                    assert not event.snapshot.assured  # never evict an assured flow
                del self.model[key]
            else:
                assert isinstance(event, FlowStateChanged)
                assert event.old_state != event.snapshot.state or event.snapshot.assured
                key = bytes(event.snapshot.key)
                if key in self.model:  # may be deleted by a later event of the batch
                    self.model[key] = event.snapshot.assured

    @invariant()
    def table_matches_its_events(self) -> None:
        self.table.verify()
        flows = list(self.table.flows())
        stats = self.table.statistics()
        assert len(self.table) == len(flows) == stats.entries == stats.heap_entries
        assert len(flows) <= stats.capacity
        assert {bytes(f.key) for f in flows} == set(self.model)
        assert stats.assured == sum(f.assured for f in flows)
        for f in flows:
            assert f.created_at <= f.last_seen <= f.deadline
            assert f.packets_orig >= 1
            if f.assured:  # assured is never lost, and events said so
                assert self.model[bytes(f.key)]
        deleted = sum(stats.deleted_total.values())
        assert stats.created_total - deleted == len(flows)


TableMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50)
test_table_machine = TableMachine.TestCase
