"""PeerSession, Outbox and Inbox: the pure sync protocol, driven by hand."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from syncd import session as session_module
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, ConfigError, Misuse, PeerError
from syncd.keyindex import ORDER_BUCKET, ORDER_KEY, position
from syncd.records import Delta, Op, record_to_pb
from syncd.replica import ReplicaConfig, ReplicaStore
from syncd.session import (
    INITIAL_PAGE_RTO,
    TRANSITIONS,
    Action,
    Event,
    Inbox,
    Outbox,
    PeerSession,
    ReplicaChanged,
    SessionConfig,
    State,
    StateChanged,
    transition,
)
from tests.syncd_link import CLUSTER, SimNode, make_record

CFG = SessionConfig(cluster_id=CLUSTER)


class Duo:
    """Two nodes a and b and one session each, messages moved by hand."""

    def __init__(
        self,
        config: SessionConfig = CFG,
        capacity: int = 16,
        store_config: ReplicaConfig | None = None,
    ) -> None:
        self.config = config
        self.now = 0.0
        self.nodes = {
            n: SimNode(n, ["a", "b"], outbox_capacity=capacity, store_config=store_config)
            for n in "ab"
        }
        self.actions: dict[str, list[Action]] = {"a": [], "b": []}
        self.sessions: dict[str, PeerSession] = {}
        self.reconnect()

    def reconnect(self) -> None:
        for me, other in (("a", "b"), ("b", "a")):
            node = self.nodes[me]
            self.sessions[me] = PeerSession(
                self.config, node.outboxes[other], node.inboxes[other], node.store
            )

    def state(self, name: str) -> State:
        return self.sessions[name].state  # a call: mypy does not keep narrowing it

    @property
    def a(self) -> PeerSession:
        return self.sessions["a"]

    @property
    def b(self) -> PeerSession:
        return self.sessions["b"]

    def start(self) -> None:
        for name, s in self.sessions.items():
            self.actions[name] += s.start(self.now)

    def out(self, name: str) -> list[pb.Envelope]:
        return self.sessions[name].messages_to_send(self.now)

    def deliver(self, to: str, messages: list[pb.Envelope]) -> None:
        for m in messages:
            self.actions[to] += self.sessions[to].receive(m, self.now)

    def exchange(self, limit: int = 50) -> None:
        """Move messages both ways until both sides are silent (time stands still)."""
        for _ in range(limit):
            to_b, to_a = self.out("a"), self.out("b")
            if not to_a and not to_b:
                return
            self.deliver("b", to_b)
            self.deliver("a", to_a)
        raise AssertionError("sessions kept talking")

    def advance(self, dt: float) -> None:
        self.now += dt
        for name, s in self.sessions.items():
            self.actions[name] += s.handle_timer(self.now)

    def run_for(self, dt: float, step: float = 0.05) -> None:
        """Time passes with the timers run every ``step`` (as the adapter's pump does)."""
        end = self.now + dt
        while self.now < end - 1e-9:
            self.advance(min(step, end - self.now))

    def live(self) -> None:
        self.start()
        self.exchange()
        assert self.a.state is State.LIVE and self.b.state is State.LIVE


def kinds(messages: list[pb.Envelope]) -> list[str]:
    return [m.WhichOneof("body") or "" for m in messages]


def emit(node: SimNode, key: int, now: float = 0.0, delete: bool = False) -> None:
    node.emit(bytes([ord(node.node_id), key]), now, delete)


def pulling_duo(flows: int) -> Duo:
    """a holds ``flows`` flows; b has its Hello and pulls them in pages of 2
    (its first snapshot request is in its outbox)."""
    duo = Duo(SessionConfig(cluster_id=CLUSTER, snapshot_page=2))
    for k in range(flows):
        emit(duo.nodes["a"], k)
    duo.start()
    duo.deliver("a", duo.out("b"))
    duo.deliver("b", duo.out("a"))
    return duo


def delta(seq: int, key: int = 1, origin: str = "a") -> Delta:
    return Delta(Op.CREATE, origin, seq, make_record(bytes([key]), origin, seq))


# --- transition table -------------------------------------------------------------


def documented_transitions() -> set[tuple[State, Event, State]]:
    doc = session_module.__doc__ or ""
    found = set()
    for line in doc.splitlines():
        m = re.match(r"\s+(.+?)\s+--(\w+)-->\s+(\w+)", line)
        if not m:
            continue
        sources, event, target = m.groups()
        if sources.startswith("any but"):
            excluded = {State[s] for s in re.findall(r"[A-Z_]+", sources)}
            states = [s for s in State if s not in excluded]
        else:
            states = [State[sources]]
        found |= {(s, Event[event], State[target]) for s in states}
    return found


def test_docstring_documents_exactly_the_table() -> None:
    table = {(s, e, t) for (s, e), t in TRANSITIONS.items()}
    assert documented_transitions() == table


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_pair_transitions_or_is_misuse(state: State, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        assert transition(state, event) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(Misuse):
            transition(state, event)


def test_closed_is_terminal() -> None:
    assert not [k for k in TRANSITIONS if k[0] is State.CLOSED]


# --- Outbox / Inbox -----------------------------------------------------------------


def test_outbox_numbers_must_follow() -> None:
    box = Outbox("a", 1, 4)
    box.push(delta(1), 0.0)
    with pytest.raises(Misuse):
        box.push(delta(3), 0.0)
    with pytest.raises(Misuse):
        box.push(delta(2, origin="b"), 0.0)
    with pytest.raises(Misuse):
        Outbox("a", 0, 4)
    with pytest.raises(Misuse):
        Outbox("a", 1, 0)


def test_outbox_overflow_drops_oldest_and_records_the_loss() -> None:
    box = Outbox("a", 1, 3)
    for seq in range(1, 6):
        box.push(delta(seq), float(seq))
    stats = box.statistics()
    assert (stats.held, stats.lost_upto, stats.overflow) == (3, 2, 2)
    assert box.needs_snapshot and box.next_send == 3
    assert [d.seq for d in box.take(10)] == [3, 4, 5]
    box.ack(2)
    assert box.needs_snapshot is False  # the peer has everything up to the loss


def test_outbox_ack_trims_and_rewind_resends() -> None:
    box = Outbox("a", 1, 8)
    for seq in range(1, 6):
        box.push(delta(seq), 0.0)
    assert [d.seq for d in box.take(2)] == [1, 2]
    assert box.in_flight and box.unsent == 3
    assert box.ack(2) and not box.ack(1)
    assert box.statistics().held == 3
    assert [d.seq for d in box.take(10)] == [3, 4, 5]
    box.rewind(4)
    assert [d.seq for d in box.take(10)] == [4, 5]
    assert box.statistics().resent == 2
    box.rewind(1)  # cannot go below what is acked
    assert box.next_send == 3
    with pytest.raises(Misuse):
        box.ack(6)


def test_outbox_for_a_late_peer_starts_with_a_loss() -> None:
    box = Outbox("a", 1, 8, last_seq=10)
    assert box.lost_upto == 10 and box.needs_snapshot and box.unsent == 0
    box.push(delta(11), 0.0)
    assert box.oldest_unsent_at() == 0.0


def test_inbox_applies_in_order_and_stops_at_a_hole() -> None:
    inbox = Inbox("a")
    inbox.reset_epoch(1)
    inbox.first_page(0)
    inbox.page_done(b"", last=True)
    fresh, gap = inbox.accept([delta(1), delta(2)])
    assert [d.seq for d in fresh] == [1, 2] and not gap
    fresh, gap = inbox.accept([delta(2), delta(3), delta(5), delta(6)])
    assert [d.seq for d in fresh] == [3] and gap
    stats = inbox.statistics()
    assert (stats.applied, stats.duplicates, stats.out_of_order) == (3, 1, 2)


def test_inbox_defers_deltas_until_the_snapshot_base() -> None:
    inbox = Inbox("a")
    inbox.reset_epoch(1)
    assert inbox.accept([delta(1)]) == ([], False) and inbox.deferred
    inbox.required = 5
    assert not inbox.first_page(4)
    assert inbox.first_page(7) and inbox.applied == 7


# --- handshake -----------------------------------------------------------------------


def test_first_contact_pulls_snapshots_both_ways_then_goes_live() -> None:
    duo = Duo()
    for k in range(3):
        emit(duo.nodes["a"], k)
    emit(duo.nodes["b"], 9)
    duo.start()
    assert duo.a.next_deadline() == duo.now  # the Hello is waiting
    hellos = duo.out("a")
    assert kinds(hellos) == ["hello"] and hellos[0].hello.epoch == 1
    duo.deliver("b", hellos)
    duo.exchange()
    assert duo.state("a") is State.LIVE and duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()
    assert duo.nodes["a"].replicas_of("b") == duo.nodes["b"].own_flows()
    changes = [a for a in duo.actions["b"] if isinstance(a, ReplicaChanged)]
    assert sum(len(c.changes) for c in changes) == 3
    states = [a for a in duo.actions["a"] if isinstance(a, StateChanged)]
    assert [(s.old, s.new) for s in states] == [
        (State.IDLE, State.HELLO_SENT),
        (State.HELLO_SENT, State.SYNCING),
        (State.SYNCING, State.LIVE),
    ]


def test_reconnect_in_the_same_epoch_goes_straight_to_live_and_resends() -> None:
    duo = Duo()
    duo.live()
    emit(duo.nodes["a"], 1)
    duo.now += 0.01
    lost = duo.out("a")  # the batch goes out and is lost with the stream
    assert "batch" in kinds(lost)
    duo.a.close(duo.now)
    duo.b.close(duo.now)
    duo.reconnect()
    duo.start()
    duo.exchange()
    assert duo.state("a") is State.LIVE and duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows() != {}
    assert duo.nodes["b"].inboxes["a"].statistics().snapshots_started == 1  # only the first


def test_hello_is_resent_until_the_peer_shows_it_has_it() -> None:
    duo = Duo()
    duo.start()
    duo.out("a")  # lost
    duo.deliver("a", duo.out("b"))
    assert duo.state("a") is State.SYNCING and duo.state("b") is State.HELLO_SENT
    duo.advance(CFG.resend_after)
    assert "hello" in kinds(duo.out("a"))  # lost again
    duo.advance(INITIAL_PAGE_RTO)  # a's snapshot request was lost: retried after the first RTO
    duo.exchange()
    assert duo.state("a") is State.LIVE and duo.state("b") is State.LIVE
    duo.advance(CFG.resend_after)
    assert "hello" not in kinds(duo.out("a"))  # b showed it has the Hello


def bad_hello(**fields: object) -> pb.Envelope:
    hello = pb.Hello(protocol=1, node_id="b", cluster_id=CLUSTER, epoch=1)
    for name, value in fields.items():
        if name == "seen":
            hello.seen.extend(value)
        else:
            setattr(hello, name, value)
    return pb.Envelope(hello=hello)


@pytest.mark.parametrize(
    ("fields", "reason", "error"),
    [
        ({"cluster_id": "other"}, "wrong-cluster", PeerError),
        ({"node_id": "c"}, "unexpected-node", PeerError),
        ({"protocol": 2}, "bad-protocol", PeerError),
        ({"epoch": 0}, "bad-hello", BadMessage),
        ({"seen": [pb.OriginCursor(origin="a", epoch=2)]}, "future-epoch", PeerError),
        ({"seen": [pb.OriginCursor(origin="a", epoch=1, seq=5)]}, "ack-beyond-sent", PeerError),
        (
            {"seen": [pb.OriginCursor(origin="x"), pb.OriginCursor(origin="x")]},
            "bad-hello",
            BadMessage,
        ),
        ({"seen": [pb.OriginCursor(origin="NOT VALID")]}, "bad-hello", BadMessage),
    ],
)
def test_bad_hello_closes_the_session(
    fields: dict[str, object], reason: str, error: type[PeerError]
) -> None:
    duo = Duo()
    duo.start()
    with pytest.raises(PeerError) as info:
        duo.a.receive(bad_hello(**fields), 0.0)
    assert type(info.value) is error and info.value.reason == reason
    assert duo.state("a") is State.CLOSED
    assert duo.a.messages_to_send(1.0) == [] and duo.a.next_deadline() is None


def test_epoch_going_backwards_or_changing_is_refused() -> None:
    duo = Duo()
    duo.nodes["a"].inboxes["b"].epoch = 3
    duo.start()
    with pytest.raises(PeerError, match="epoch-regressed"):
        duo.a.receive(bad_hello(epoch=2), 0.0)
    duo = Duo()
    duo.live()
    duo.a.receive(bad_hello(epoch=1), 0.0)  # a repeat is harmless ...
    assert kinds(duo.out("a")) == ["ack"]  # ... and answered, so the resending stops
    with pytest.raises(PeerError, match="epoch-changed"):
        duo.a.receive(bad_hello(epoch=7), 0.0)


def test_messages_before_the_hello_are_dropped_and_counted() -> None:
    duo = Duo()
    duo.start()
    duo.a.receive(pb.Envelope(ack=pb.Ack(origin="a", epoch=1)), 0.0)
    duo.a.receive(pb.Envelope(heartbeat=pb.Heartbeat()), 0.0)
    assert duo.a.statistics().early_dropped == 1 and duo.state("a") is State.HELLO_SENT


def test_receive_before_start_is_misuse_and_after_close_is_dropped() -> None:
    duo = Duo()
    with pytest.raises(Misuse):
        duo.a.receive(pb.Envelope(heartbeat=pb.Heartbeat()), 0.0)
    assert duo.a.close(0.0) == [StateChanged(State.IDLE, State.CLOSED, Event.CLOSE)]
    assert duo.a.close(0.0) == []
    assert duo.a.receive(pb.Envelope(heartbeat=pb.Heartbeat()), 0.0) == []
    assert duo.a.statistics().after_close_dropped == 1
    with pytest.raises(Misuse):
        PeerSession(CFG, Outbox("a", 1, 4), Inbox("a"), ReplicaStore())


# --- batching, acks, resends ---------------------------------------------------------------


def test_batch_waits_for_delay_or_size() -> None:
    config = SessionConfig(cluster_id=CLUSTER, batch_max=3, batch_delay=0.001, eager_batches=1)
    duo = Duo(config)
    duo.live()
    emit(duo.nodes["a"], 1, duo.now)
    sent = duo.out("a")  # nothing in flight: a lone delta goes at once (Nagle)
    assert kinds(sent) == ["batch"] and len(sent[0].batch.deltas) == 1
    emit(duo.nodes["a"], 2, duo.now)  # delta 1 is unacked: this one waits
    assert duo.out("a") == []
    assert duo.a.next_deadline() == pytest.approx(duo.now + 0.001)
    duo.now += 0.001
    sent = duo.out("a")
    assert kinds(sent) == ["batch"] and [d.seq for d in sent[0].batch.deltas] == [2]
    for k in range(3, 10):
        emit(duo.nodes["a"], k, duo.now)
    sent = duo.out("a")  # 7 unsent >= batch_max: flush at once, in batches of 3
    assert [len(m.batch.deltas) for m in sent] == [3, 3, 1]
    assert [d.seq for m in sent for d in m.batch.deltas] == list(range(3, 10))


def test_a_few_batches_go_at_once_before_deltas_gather() -> None:
    config = SessionConfig(cluster_id=CLUSTER, batch_max=8, batch_delay=0.001, eager_batches=2)
    duo = Duo(config)
    duo.live()
    for k in (1, 2):  # fewer than eager_batches in flight: each goes at once
        emit(duo.nodes["a"], k, duo.now)
        assert [[d.seq for d in m.batch.deltas] for m in duo.out("a")] == [[k]]
    emit(duo.nodes["a"], 3, duo.now)  # two batches unacked: this one waits
    emit(duo.nodes["a"], 4, duo.now)
    assert duo.out("a") == []
    assert duo.a.next_deadline() == pytest.approx(duo.now + 0.001)
    ack = pb.Envelope(ack=pb.Ack(origin="a", epoch=duo.nodes["a"].outboxes["b"].epoch, seq=1))
    duo.a.receive(ack, duo.now)  # the first batch acked: one more may go, with both waiting
    assert [[d.seq for d in m.batch.deltas] for m in duo.out("a")] == [[3, 4]]
    duo.nodes["a"].outboxes["b"].rewind(2)  # resent from 2: neither counts as in flight
    assert [[d.seq for d in m.batch.deltas] for m in duo.out("a")] == [[2, 3, 4]]
    emit(duo.nodes["a"], 5, duo.now)
    assert [[d.seq for d in m.batch.deltas] for m in duo.out("a")] == [[5]]


def test_acks_wait_for_a_second_batch_or_ack_delay_but_not_after_a_repeat() -> None:
    config = SessionConfig(cluster_id=CLUSTER, ack_every=2, ack_delay=0.001)
    duo = Duo(config)
    duo.live()
    emit(duo.nodes["a"], 1, duo.now)
    first = duo.out("a")
    duo.deliver("b", first)
    assert duo.out("b") == []  # one batch: the ack is delayed
    assert duo.b.next_deadline() == pytest.approx(duo.now + 0.001)
    emit(duo.nodes["a"], 2, duo.now)
    duo.deliver("b", duo.out("a"))
    assert [m.ack.seq for m in duo.out("b")] == [2]  # the second batch: at once
    emit(duo.nodes["a"], 3, duo.now)
    duo.deliver("b", duo.out("a"))
    assert duo.out("b") == []
    duo.now += 0.001
    assert [m.ack.seq for m in duo.out("b")] == [3]  # ack_delay passed
    duo.deliver("b", first)  # a repeat (the sender did not see our ack): at once
    assert [m.ack.seq for m in duo.out("b")] == [3]


def test_acks_trim_the_outbox() -> None:
    duo = Duo()
    duo.live()
    for k in range(4):
        emit(duo.nodes["a"], k)
    duo.now += 0.01
    duo.exchange()
    outbox = duo.nodes["a"].outboxes["b"]
    assert outbox.acked == 0  # one batch: its ack waits ack_delay for another
    duo.now += CFG.ack_delay
    duo.exchange()
    assert outbox.acked == outbox.last_seq == 4 and outbox.statistics().held == 0
    assert duo.a.next_deadline() != duo.now


def test_lost_batch_is_resent_after_the_timeout() -> None:
    duo = Duo()
    duo.live()
    emit(duo.nodes["a"], 1)
    duo.now += 0.01
    assert kinds(duo.out("a")) == ["batch"]  # lost
    duo.advance(CFG.resend_after)
    assert duo.a.statistics().retransmits == 1
    duo.exchange()
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows() != {}


def test_gap_ack_rewinds_at_once() -> None:
    config = SessionConfig(cluster_id=CLUSTER, batch_max=1)
    duo = Duo(config)
    duo.live()
    emit(duo.nodes["a"], 1)
    emit(duo.nodes["a"], 2)
    first, second = duo.out("a")
    duo.deliver("b", [second])  # arrives first: a hole
    reply = duo.out("b")
    assert kinds(reply) == ["ack"] and reply[0].ack.gap and reply[0].ack.seq == 0
    duo.deliver("a", reply)
    resent = duo.out("a")
    assert [m.batch.deltas[0].seq for m in resent] == [1, 2]
    duo.deliver("b", resent)
    assert duo.nodes["b"].inboxes["a"].applied == 2
    duo.deliver("b", [first])  # the late original is a duplicate
    assert duo.nodes["b"].inboxes["a"].statistics().duplicates == 1


def test_overflow_leads_to_resync_and_sweep() -> None:
    duo = Duo(capacity=2)
    duo.live()
    for k in range(3):
        emit(duo.nodes["a"], k)
    duo.now += 0.01
    duo.exchange()
    duo.out("a")
    for k in range(3, 8):  # b hears none of it, and the outbox overflows
        emit(duo.nodes["a"], k)
    emit(duo.nodes["a"], 0, delete=True)
    duo.now += 0.01
    sent = duo.out("a")
    assert kinds(sent)[0] == "resync_required"
    assert sent[0].resync_required.lost_upto == duo.nodes["a"].outboxes["b"].lost_upto
    duo.deliver("b", sent)
    assert duo.state("b") is State.SYNCING
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()
    assert b"a\x00" not in duo.nodes["b"].replicas_of("a")  # the lost delete was swept
    assert duo.nodes["b"].store.statistics().swept == 1


def test_resync_notice_is_repeated_until_acked() -> None:
    duo = Duo(capacity=1)
    duo.live()
    emit(duo.nodes["a"], 1)
    emit(duo.nodes["a"], 2)
    duo.now += 0.01
    assert "resync_required" in kinds(duo.out("a"))  # lost
    duo.advance(CFG.resend_after)
    assert "resync_required" in kinds(duo.out("a"))
    assert duo.a.statistics().resync_notices_sent == 2


def test_page_retry_timer_follows_the_measured_round_trip() -> None:
    """Pages slower than resend_after are not asked for twice (RFC 6298 estimator)."""
    duo = pulling_duo(7)  # b: SYNCING, its first request goes out
    slow = 0.75 * duo.config.resend_after  # each reply takes this long to be taken
    for _ in range(2):  # two samples of `slow`: the timer is now beyond resend_after
        duo.deliver("a", duo.out("b"))
        duo.advance(slow)
        duo.deliver("b", duo.out("a"))
        duo.b.apply_pending(duo.now)
    duo.deliver("a", duo.out("b"))  # the third request
    reply = duo.out("a")
    duo.advance(1.5 * duo.config.resend_after)  # slower still, but within SRTT + 4 RTTVAR
    assert "snapshot_request" not in kinds(duo.out("b"))  # no retry
    duo.deliver("b", reply)
    assert duo.b.statistics().stale_dropped == 0
    assert duo.b.statistics().page_rtt_samples == 3
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


def test_multi_page_snapshot_and_stale_pages() -> None:
    duo = pulling_duo(5)  # b: SYNCING, its request goes out
    request = duo.out("b")
    assert "snapshot_request" in kinds(request)
    duo.deliver("a", request)
    page = [m for m in duo.out("a") if m.HasField("snapshot_chunk")]
    assert len(page[0].snapshot_chunk.records) == 2 and not page[0].snapshot_chunk.last
    duo.advance(INITIAL_PAGE_RTO)  # no reply yet: b asks again, with a new id
    retry = duo.out("b")
    assert "snapshot_request" in kinds(retry)
    duo.deliver("b", page)  # the first reply still answers the current cursor: taken
    assert duo.b.statistics().stale_dropped == 0
    duo.deliver("a", retry)
    duo.deliver("b", [m for m in duo.out("a") if m.HasField("snapshot_chunk")])
    assert duo.b.statistics().stale_dropped == 1  # the retry's reply: that page is done
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].inboxes["a"].statistics().pages == 3
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


def test_a_reply_from_before_a_pull_restarted_is_ignored() -> None:
    duo = pulling_duo(5)  # b: SYNCING, its request goes out
    duo.deliver("a", duo.out("b"))
    old = [m for m in duo.out("a") if m.HasField("snapshot_chunk")]
    duo.b.request_resync(duo.now)  # the pull restarts (a new sweep) before the reply arrives
    duo.deliver("b", old)
    assert duo.b.statistics().stale_dropped == 1
    assert duo.nodes["b"].inboxes["a"].statistics().pages == 0
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


def test_a_sender_that_ignores_the_order_field_is_pulled_in_key_order() -> None:
    """An older peer answers in ORDER_KEY (order 0): the pull keeps to it to the end."""
    duo = pulling_duo(7)  # b: SYNCING, its first request goes out
    for _ in range(10):
        requests = [m for m in duo.out("b") if m.HasField("snapshot_request")]
        if not requests:
            break
        for m in requests:
            m.snapshot_request.ClearField("order")  # what an older sender sees
        duo.deliver("a", requests)
        pages = duo.out("a")
        assert all(m.snapshot_chunk.order == ORDER_KEY for m in pages)
        assert any(m.HasField("snapshot_chunk") for m in pages)
        duo.deliver("b", pages)
        duo.b.apply_pending(duo.now)
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].inboxes["a"].statistics().pages == 4
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


def test_a_page_in_another_order_than_the_pull_is_refused() -> None:
    duo = pulling_duo(7)
    duo.deliver("a", duo.out("b"))
    first = [m for m in duo.out("a") if m.HasField("snapshot_chunk")]
    assert [m.snapshot_chunk.order for m in first] == [ORDER_BUCKET]
    duo.deliver("b", first)  # bucket order; b asks for the next page after its cursor
    request = [m for m in duo.out("b") if m.HasField("snapshot_request")]
    assert request[0].snapshot_request.order == ORDER_BUCKET
    duo.deliver("a", request)
    [second] = [m for m in duo.out("a") if m.HasField("snapshot_chunk")]
    second.snapshot_chunk.order = ORDER_KEY
    duo.b.apply_pending(duo.now)
    before = len(list(duo.nodes["b"].store.records("a")))
    with pytest.raises(BadMessage) as info:
        duo.b.receive(second, duo.now)
    assert info.value.reason == "bad-snapshot-page"
    assert len(list(duo.nodes["b"].store.records("a"))) == before == 2


def _pull_to_the_second_page(duo: Duo) -> pb.Envelope:
    """b pulls a's snapshot (pages of 2); returns a's reply with the second page."""
    for k in range(7):
        emit(duo.nodes["a"], k)
    duo.start()
    duo.deliver("a", duo.out("b"))
    duo.deliver("b", duo.out("a"))
    duo.deliver("a", duo.out("b"))
    duo.deliver("b", duo.out("a"))  # the first page: checked, b asks for the second
    duo.deliver("a", [m for m in duo.out("b") if m.HasField("snapshot_request")])
    duo.b.apply_pending(duo.now)
    [second] = [m for m in duo.out("a") if m.HasField("snapshot_chunk")]
    assert not second.snapshot_chunk.last and second.snapshot_chunk.cursor
    return second


def test_a_middle_page_is_requested_past_before_it_is_checked() -> None:
    """The next page's request goes out first; the page is checked and applied after."""
    duo = Duo(SessionConfig(cluster_id=CLUSTER, snapshot_page=2))
    second = _pull_to_the_second_page(duo)
    held = len(list(duo.nodes["b"].store.records("a")))
    duo.deliver("b", [second])
    assert duo.b.page_pending
    assert len(list(duo.nodes["b"].store.records("a"))) == held  # not applied yet
    [request] = [m for m in duo.out("b") if m.HasField("snapshot_request")]
    assert request.snapshot_request.cursor == second.snapshot_chunk.next_cursor
    duo.deliver("a", [request])
    duo.b.apply_pending(duo.now)
    assert len(list(duo.nodes["b"].store.records("a"))) == held + 2
    assert duo.nodes["b"].inboxes["a"].cursor == second.snapshot_chunk.next_cursor
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


@pytest.mark.parametrize("how", ["apply_pending", "receive", "handle_timer"])
def test_a_bad_middle_page_closes_the_stream_with_nothing_of_it_applied(how: str) -> None:
    duo = Duo(SessionConfig(cluster_id=CLUSTER, snapshot_page=2))
    second = _pull_to_the_second_page(duo)
    records = second.snapshot_chunk.records
    records[0].CopyFrom(records[1])  # the same key twice: not increasing
    held = sorted(duo.nodes["b"].store.records("a"), key=lambda r: r.key)
    cursor = duo.nodes["b"].inboxes["a"].cursor
    duo.deliver("b", [second])  # only the cheap checks so far: the request goes out
    assert "snapshot_request" in kinds(duo.out("b"))
    with pytest.raises(BadMessage) as info:
        if how == "apply_pending":
            duo.b.apply_pending(duo.now)
        elif how == "receive":
            duo.b.receive(pb.Envelope(heartbeat=pb.Heartbeat()), duo.now)
        else:
            duo.b.handle_timer(duo.now)
    assert info.value.reason == "bad-snapshot-page"
    assert duo.state("b") is State.CLOSED
    assert sorted(duo.nodes["b"].store.records("a"), key=lambda r: r.key) == held
    assert duo.nodes["b"].inboxes["a"].cursor == cursor  # a new stream resumes at that page


def test_a_page_pending_at_close_is_applied_or_discarded() -> None:
    duo = Duo(SessionConfig(cluster_id=CLUSTER, snapshot_page=2))
    second = _pull_to_the_second_page(duo)
    held = len(list(duo.nodes["b"].store.records("a")))
    duo.deliver("b", [second])
    duo.b.close(duo.now)  # a good page: applied, the pull resumes after it
    assert len(list(duo.nodes["b"].store.records("a"))) == held + 2
    duo = Duo(SessionConfig(cluster_id=CLUSTER, snapshot_page=2))
    second = _pull_to_the_second_page(duo)
    second.snapshot_chunk.records[1].family = 9
    held = len(list(duo.nodes["b"].store.records("a")))
    duo.deliver("b", [second])
    duo.b.close(duo.now)  # a bad one: dropped, the pull resumes before it
    assert len(list(duo.nodes["b"].store.records("a"))) == held
    assert duo.b.statistics().pages_discarded == 1
    assert duo.nodes["b"].inboxes["a"].cursor == second.snapshot_chunk.cursor


def test_deltas_before_the_first_page_do_not_confirm_keys() -> None:
    # The update reaches b before the snapshot's first page, the delete is
    # lost; the page (read after the delete) does not hold the key.  Had b
    # applied the update, it would have confirmed the key to the sweep and
    # kept a flow its origin no longer has.
    duo = Duo()
    duo.live()
    emit(duo.nodes["a"], 1)
    duo.now += 0.01
    duo.exchange()
    duo.b.request_resync(duo.now)
    request = duo.out("b")
    emit(duo.nodes["a"], 1)  # update
    duo.now += 0.01
    duo.deliver("b", duo.out("a"))
    assert duo.nodes["b"].inboxes["a"].statistics().deferred == 1
    emit(duo.nodes["a"], 1, delete=True)
    duo.now += 0.01
    duo.out("a")  # lost
    duo.deliver("a", request)
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows() == {}


def test_page_overtaken_by_a_delete_cannot_resurrect_the_flow() -> None:
    config = SessionConfig(cluster_id=CLUSTER, snapshot_page=1)
    duo = Duo(config)
    emit(duo.nodes["a"], 1)
    emit(duo.nodes["a"], 2)
    duo.start()
    duo.deliver("a", duo.out("b"))
    duo.deliver("b", duo.out("a"))
    duo.deliver("a", duo.out("b"))  # b's first request
    duo.deliver("b", duo.out("a"))  # page 1 (key 1); b asks for the next
    duo.deliver("a", duo.out("b"))
    late_page = duo.out("a")  # page 2 holds the other key ...
    [late] = [r.key for m in late_page for r in m.snapshot_chunk.records]
    emit(duo.nodes["a"], late[1], delete=True)  # ... which is deleted right after
    duo.now += 0.01
    duo.deliver("b", duo.out("a"))  # the delete overtakes the page
    duo.deliver("b", late_page)
    assert duo.nodes["b"].store.statistics().blocked == 1
    duo.exchange()
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()
    assert late not in duo.nodes["b"].replicas_of("a")


def test_too_many_pending_pages_are_refused() -> None:
    config = SessionConfig(cluster_id=CLUSTER, max_pending_pages=1)
    duo = Duo(config)
    duo.live()
    request = pb.Envelope(snapshot_request=pb.SnapshotRequest(origin="a", request_id=1))
    duo.deliver("a", [request, request])
    assert duo.a.statistics().pages_refused == 1
    assert kinds(duo.out("a")).count("snapshot_chunk") == 1


def test_request_resync_pulls_a_fresh_snapshot() -> None:
    duo = Duo()
    duo.live()
    emit(duo.nodes["a"], 1)
    duo.nodes["b"].store.apply(Op.CREATE, make_record(b"ghost", "a", 1), 0.0)  # not at a
    actions = duo.b.request_resync(duo.now)
    assert actions == [StateChanged(State.LIVE, State.SYNCING, Event.RESYNC)]
    duo.now += 0.01
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


def test_full_store_resyncs_after_the_holdoff() -> None:
    duo = Duo(store_config=ReplicaConfig(capacity=2))
    duo.live()
    for k in range(3):
        emit(duo.nodes["a"], k)
    duo.now += 0.01
    duo.exchange()
    assert duo.b.statistics().store_full == 1
    duo.nodes["a"].emit(b"a\x00", duo.now, delete=True)  # room again
    duo.now += 0.01
    duo.exchange()
    while True:  # keep the link alive until the holdoff ends
        assert duo.now < CFG.full_resync_holdoff + 1
        duo.advance(CFG.heartbeat_interval)
        if duo.state("b") is State.SYNCING:
            break
        duo.exchange()
    duo.exchange()
    assert duo.state("b") is State.LIVE
    assert duo.nodes["b"].inboxes["a"].statistics().snapshots_started == 2
    assert duo.nodes["b"].replicas_of("a") == duo.nodes["a"].own_flows()


# --- liveness -----------------------------------------------------------------------------


def test_heartbeat_only_when_idle() -> None:
    duo = Duo()
    duo.live()
    assert duo.out("a") == []
    duo.now += CFG.heartbeat_interval
    assert kinds(duo.out("a")) == ["heartbeat"]
    assert duo.out("a") == []
    assert duo.a.next_deadline() == pytest.approx(duo.now + CFG.heartbeat_interval)


def test_silence_makes_suspect_then_closed_and_traffic_recovers() -> None:
    duo = Duo()
    duo.live()
    duo.advance(CFG.suspect_after)
    assert duo.state("a") is State.SUSPECT and duo.a.statistics().suspicions == 1
    duo.deliver("a", [pb.Envelope(heartbeat=pb.Heartbeat())])
    assert duo.state("a") is State.LIVE
    assert StateChanged(State.SUSPECT, State.LIVE, Event.RECOVERED) in duo.actions["a"]
    duo.run_for(CFG.dead_after)
    assert duo.state("a") is State.CLOSED
    assert StateChanged(State.SUSPECT, State.CLOSED, Event.DEAD) in duo.actions["a"]
    assert duo.a.statistics().stalls == 0


def test_no_hello_means_dead() -> None:
    duo = Duo()
    duo.start()
    duo.run_for(CFG.dead_after - 0.001)
    assert duo.state("a") is State.HELLO_SENT
    duo.advance(0.001)
    assert duo.state("a") is State.CLOSED


def test_our_own_stall_is_not_the_peers_silence() -> None:
    """A loop stalled longer than dead_after: the peer is not suspected, the stream lives."""
    duo = Duo()
    duo.live()
    duo.advance(CFG.suspect_after / 2)  # heard nothing for a while, then ...
    duo.advance(CFG.dead_after + 1.0)  # ... nothing called us for 3 s
    assert duo.state("a") is State.LIVE and duo.a.statistics().suspicions == 0
    assert duo.a.statistics().stalls == 1
    duo.deliver("a", duo.out("b"))  # what waited in the transport is read
    assert duo.state("a") is State.LIVE
    duo.run_for(CFG.suspect_after + 0.01)  # silence while we listen counts again
    assert duo.state("a") is State.SUSPECT
    duo.run_for(CFG.dead_after)
    assert duo.state("a") is State.CLOSED


def test_silence_before_a_stall_still_counts() -> None:
    duo = Duo()
    duo.live()
    duo.run_for(CFG.suspect_after * 0.8)
    duo.advance(1.0)  # a stall
    assert duo.state("a") is State.LIVE
    duo.run_for(CFG.suspect_after * 0.3)  # 0.8 + 0.3 of it heard nothing while listening
    assert duo.state("a") is State.SUSPECT


def test_suspect_during_a_pull_recovers_to_syncing() -> None:
    duo = Duo()
    duo.start()
    duo.deliver("a", duo.out("b"))
    assert duo.state("a") is State.SYNCING
    duo.advance(CFG.suspect_after)
    assert duo.state("a") is State.SUSPECT
    duo.deliver("a", [pb.Envelope(heartbeat=pb.Heartbeat())])
    assert duo.state("a") is State.SYNCING


# --- hostile messages ---------------------------------------------------------------------


def batch_from_b(*seqs: int, origin: str = "b", epoch: int = 1) -> pb.Envelope:
    deltas = []
    for seq in seqs:
        record = record_to_pb(make_record(bytes([seq]), "b", seq))
        deltas.append(pb.Delta(op=pb.OP_CREATE, origin=origin, seq=seq, record=record))
    return pb.Envelope(batch=pb.Batch(origin=origin, epoch=epoch, deltas=deltas))


def chunk_from_b(**fields: object) -> pb.Envelope:
    chunk = pb.SnapshotChunk(origin="b", epoch=1, request_id=1, last=True)
    for name, value in fields.items():
        if name == "records":
            chunk.records.extend(value)
        else:
            setattr(chunk, name, value)
    return pb.Envelope(snapshot_chunk=chunk)


def rec_pb(key: bytes, origin: str = "b") -> pb.FlowRecord:
    return record_to_pb(make_record(key, origin, 1))


# Two keys in decreasing bucket order (in increasing key order).
BUCKET_DESC = sorted([b"\x01", b"\x02"], key=lambda k: position(k, ORDER_BUCKET), reverse=True)
assert BUCKET_DESC == [b"\x01", b"\x02"]

HOSTILE: list[tuple[str, Callable[[], pb.Envelope], str]] = [
    ("empty", pb.Envelope, "empty-envelope"),
    ("batch other origin", lambda: batch_from_b(1, origin="c"), "wrong-origin"),
    ("batch other epoch", lambda: batch_from_b(1, epoch=2), "wrong-epoch"),
    ("batch empty", lambda: pb.Envelope(batch=pb.Batch(origin="b", epoch=1)), "bad-batch"),
    ("batch not consecutive", lambda: batch_from_b(1, 3), "bad-batch"),
    ("ack other origin", lambda: pb.Envelope(ack=pb.Ack(origin="b", epoch=1)), "wrong-origin"),
    ("ack other epoch", lambda: pb.Envelope(ack=pb.Ack(origin="a", epoch=2)), "wrong-epoch"),
    ("ack beyond", lambda: pb.Envelope(ack=pb.Ack(origin="a", epoch=1, seq=99)), "ack-beyond-sent"),
    (
        "resync zero",
        lambda: pb.Envelope(resync_required=pb.ResyncRequired(origin="b", epoch=1)),
        "bad-resync",
    ),
    (
        "request other origin",
        lambda: pb.Envelope(snapshot_request=pb.SnapshotRequest(origin="b")),
        "wrong-origin",
    ),
    (
        "request huge page",
        lambda: pb.Envelope(snapshot_request=pb.SnapshotRequest(origin="a", max_records=10**6)),
        "bad-snapshot-request",
    ),
    (
        "page keys unordered",
        lambda: chunk_from_b(records=[rec_pb(b"\x02"), rec_pb(b"\x01")]),
        "bad-snapshot-page",
    ),
    (
        "page key not after cursor",
        lambda: chunk_from_b(cursor=b"\x05", records=[rec_pb(b"\x05")]),
        "bad-snapshot-page",
    ),
    ("page foreign record", lambda: chunk_from_b(records=[rec_pb(b"\x01", "c")]), "wrong-origin"),
    (
        "page in bucket order unordered",
        lambda: chunk_from_b(order=ORDER_BUCKET, records=[rec_pb(k) for k in BUCKET_DESC]),
        "bad-snapshot-page",
    ),
    ("page order unknown", lambda: chunk_from_b(order=2), "bad-snapshot-page"),
    (
        "request order unknown",
        lambda: pb.Envelope(snapshot_request=pb.SnapshotRequest(origin="a", order=2)),
        "bad-snapshot-request",
    ),
    (
        "request cursor too long",
        lambda: pb.Envelope(snapshot_request=pb.SnapshotRequest(origin="a", cursor=b"k" * 67)),
        "bad-snapshot-request",
    ),
    (
        "page cursor stuck",
        lambda: chunk_from_b(last=False, records=[rec_pb(b"\x01")], next_cursor=b""),
        "bad-snapshot-page",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_messages_raise_and_apply_nothing(
    name: str, make: Callable[[], pb.Envelope], reason: str
) -> None:
    duo = Duo()
    duo.live()
    emit(duo.nodes["a"], 1)
    before = sorted(duo.nodes["a"].store.records(), key=lambda r: r.key)
    with pytest.raises(PeerError) as info:
        duo.a.receive(make(), duo.now)
    assert info.value.reason == reason
    assert duo.state("a") is State.CLOSED
    assert sorted(duo.nodes["a"].store.records(), key=lambda r: r.key) == before


def test_a_bad_delta_in_a_batch_applies_none_of_it() -> None:
    duo = Duo()
    duo.live()
    env = batch_from_b(1, 2)
    env.batch.deltas[1].record.family = 9
    with pytest.raises(BadMessage):
        duo.a.receive(env, 0.0)
    assert list(duo.nodes["a"].store.records("b")) == []


def test_statistics_are_frozen_snapshots() -> None:
    duo = Duo()
    duo.live()
    stats = duo.a.statistics()
    with pytest.raises(AttributeError):
        stats.messages_sent = 0  # type: ignore[misc]
    duo.now += 1
    duo.out("a")
    assert duo.a.statistics().messages_sent == stats.messages_sent + 1


@pytest.mark.parametrize(
    "fields",
    [
        {"cluster_id": ""},
        {"batch_max": 0},
        {"batch_max": 5000},
        {"snapshot_page": 0},
        {"max_pending_pages": 0},
        {"batch_delay": -1.0},
        {"eager_batches": 0},
        {"ack_every": 0},
        {"ack_delay": 0.5},
        {"heartbeat_interval": 0.2, "suspect_after": 0.1},
        {"suspect_after": 3.0, "dead_after": 2.0},
        {"resend_after": 0.0},
        {"full_resync_holdoff": -1.0},
    ],
)
def test_session_config_is_validated(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SessionConfig(**{"cluster_id": CLUSTER, **fields})  # type: ignore[arg-type]
