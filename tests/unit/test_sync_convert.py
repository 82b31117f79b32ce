"""Flow snapshots and events <-> syncd records, deltas and local-link messages."""

from __future__ import annotations

import dataclasses
import math

import pytest

from node.engine import Engine, Verdict
from node.flow.events import (
    CtState,
    DeleteReason,
    FlowCreated,
    FlowDeleted,
    FlowEvent,
    FlowSnapshot,
    FlowStateChanged,
)
from node.flow.replica import ApplyOutcome, FlowOrigin, ReplicaDeleted
from node.flow.table import FlowTable, TableConfig
from node.packet import ACK, FIN, SYN
from node.policy import parse_ruleset
from syncd._pb.stockade.sync.v1 import local_pb2
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.convert import (
    LocalChange,
    apply_change,
    change_from_event,
    change_from_pb,
    change_to_local_pb,
    change_to_replica_pb,
    delta_from_event,
    record_from_snapshot,
)
from syncd.errors import BadMessage
from syncd.records import MAX_TIMEOUT, FlowRecord, Op, VersionClock
from syncd.session import Sequencer
from tests.packets import tcp4, tcp6, udp4, udp6

C, S = "10.10.1.2", "10.10.2.2"
C6, S6 = "fd00:10:1::2", "fd00:10:2::2"
RULES = """
default: drop
rules:
  - {name: web, proto: tcp, dport: 80, action: accept}
  - {name: dns, proto: udp, dport: 53, action: accept}
"""


def engine(node_id: str) -> Engine:
    e = Engine(TableConfig(), parse_ruleset(RULES, "rules"))
    e.table.set_local_origin(node_id)
    return e


def created(data: bytes, now: float = 10.0) -> FlowCreated:
    d = engine("fw1").process(data, now)
    event = d.events[-1]
    assert isinstance(event, FlowCreated)
    return event


# --- records from snapshots ----------------------------------------------------------


def test_record_from_snapshot_copies_fields_and_converts_time():
    snapshot = created(tcp4(C, 40000, S, 80, SYN, seq=1), now=10.0).snapshot
    r = record_from_snapshot(snapshot, "fw1", 7, now=15.0)
    assert type(r.key) is bytes and r.key == snapshot.key.to_bytes()
    assert (r.proto, r.family, r.state, r.assured) == (6, 4, "SYN_SENT", False)
    assert (r.orig_src, r.orig_sport, r.orig_dst, r.orig_dport) == (
        snapshot.orig_src, 40000, snapshot.orig_dst, 80,
    )  # fmt: skip
    assert r.timeout == pytest.approx(snapshot.deadline - 15.0)
    assert (r.origin, r.version) == ("fw1", 7)


@pytest.mark.parametrize(
    ("deadline", "timeout"), [(5.0, 0.0), (math.inf, MAX_TIMEOUT), (1e12, MAX_TIMEOUT)]
)
def test_record_timeout_is_clamped(deadline, timeout):
    snapshot = dataclasses.replace(created(udp4(C, 5353, S, 53)).snapshot, deadline=deadline)
    assert record_from_snapshot(snapshot, "fw1", 1, now=10.0).timeout == timeout


@pytest.mark.parametrize(
    "packets",
    [
        [tcp4(C, 40000, S, 80, SYN, seq=1), tcp4(S, 80, C, 40000, SYN | ACK, seq=9, ack=2)],
        [tcp6(C6, 40000, S6, 80, SYN, seq=1)],
        [udp4(C, 5353, S, 53), udp4(S, 53, C, 5353)],
        [udp6(C6, 5353, S6, 53)],
    ],
)
def test_snapshot_record_install_round_trip(packets):
    """What a peer installs from our record is the flow we hold."""
    origin = engine("fw1")
    for i, data in enumerate(packets):
        assert origin.process(data, 10.0 + i).verdict is Verdict.ACCEPT
    (snapshot,) = origin.table.flows()
    r = record_from_snapshot(snapshot, "fw1", 3, now=12.0)
    peer = FlowTable(TableConfig())
    peer.set_local_origin("fw2")
    assert peer.install(r, 50.0) == (ApplyOutcome.INSTALLED, ())
    installed = peer.get(r.key)
    assert installed is not None
    same = ("key", "orig_src", "orig_sport", "orig_dst", "orig_dport", "proto", "family", "state")
    for name in (*same, "assured"):
        assert getattr(installed, name) == getattr(snapshot, name), name
    assert record_from_snapshot(installed, "fw1", 3, now=12.0) == dataclasses.replace(
        r, timeout=MAX_TIMEOUT
    )  # a replica has no deadline of its own


# --- events to changes and deltas ---------------------------------------------------------


def events_of_one_flow() -> list[FlowEvent]:
    e = engine("fw1")
    events: list[FlowEvent] = []
    for i, data in enumerate(
        [
            tcp4(C, 40000, S, 80, SYN, seq=1),
            tcp4(S, 80, C, 40000, SYN | ACK, seq=9, ack=2),
        ]
    ):
        events += e.process(data, 10.0 + i).events
    deleted = e.table.delete(events[0].snapshot.key, DeleteReason.ADMIN, 20.0)
    assert deleted is not None
    return [*events, deleted]


def test_events_map_to_ops():
    events = events_of_one_flow()
    assert [type(ev) for ev in events] == [FlowCreated, FlowStateChanged, FlowDeleted]
    ops = [change_from_event(ev, "fw1", v, 20.0) for v, ev in enumerate(events, 1)]
    assert [c.op for c in ops if c is not None] == [Op.CREATE, Op.UPDATE, Op.DELETE]
    delete = ops[2]
    assert delete is not None and delete.record.state == "SYN_RECV"  # the flow as deleted
    assert [c.record.version for c in ops if c is not None] == [1, 2, 3]


def test_replica_deletions_are_never_replicated():
    snapshot = created(udp4(C, 5353, S, 53)).snapshot
    quiet = ReplicaDeleted(snapshot, DeleteReason.ADMIN, 11.0)
    assert change_from_event(quiet, "fw1", 5, 11.0) is None
    clock, sequencer = VersionClock(100), Sequencer("fw1", 1)
    assert delta_from_event(quiet, sequencer, clock, 11.0) is None
    assert (clock.last, sequencer.last_seq) == (100, 0)  # nothing consumed


def test_delta_from_event_numbers_and_versions():
    clock, sequencer = VersionClock(100), Sequencer("fw1", 1)
    deltas = [delta_from_event(ev, sequencer, clock, 20.0) for ev in events_of_one_flow()]
    assert [(d.op, d.seq, d.record.version) for d in deltas if d is not None] == [
        (Op.CREATE, 1, 101),
        (Op.UPDATE, 2, 102),
        (Op.DELETE, 3, 103),
    ]
    assert all(d is not None and d.origin == "fw1" for d in deltas)


# --- local-link messages ------------------------------------------------------------------


def sample_change(op: Op = Op.UPDATE) -> LocalChange:
    snapshot: FlowSnapshot = created(tcp6(C6, 40000, S6, 80, SYN, seq=1)).snapshot
    return LocalChange(op, record_from_snapshot(snapshot, "fw1", 9, 10.0))


@pytest.mark.parametrize("op", list(Op))
def test_local_delta_and_replica_update_round_trip(op):
    change = sample_change(op)
    local = local_pb2.LocalDelta.FromString(change_to_local_pb(change).SerializeToString())
    assert change_from_pb(local) == change
    update = local_pb2.ReplicaUpdate.FromString(change_to_replica_pb(change).SerializeToString())
    assert change_from_pb(update) == change


def test_bad_local_messages_raise_bad_message():
    good = change_to_local_pb(sample_change())
    unknown_op = local_pb2.LocalDelta()
    unknown_op.CopyFrom(good)
    unknown_op.op = pb.OP_UNSPECIFIED
    no_record = local_pb2.LocalDelta(op=pb.OP_CREATE)
    short_address = local_pb2.LocalDelta()
    short_address.CopyFrom(good)
    short_address.record.orig_src = b"\x01\x02"
    for msg in (unknown_op, no_record, short_address):
        with pytest.raises(BadMessage):
            change_from_pb(msg)


# --- applying, and two nodes joined by the converter ---------------------------------------


def test_apply_change_installs_and_removes():
    table = FlowTable(TableConfig())
    r: FlowRecord = sample_change().record
    assert apply_change(table, Op.CREATE, r, 1.0)[0] is ApplyOutcome.INSTALLED
    assert apply_change(table, Op.UPDATE, r, 1.0)[0] is ApplyOutcome.DUPLICATE
    newer = dataclasses.replace(r, version=10)
    outcome, events = apply_change(table, Op.DELETE, newer, 2.0)
    assert outcome is ApplyOutcome.REMOVED and isinstance(events[0], ReplicaDeleted)


class Node:
    """A filter node whose events reach the other node through the converter."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.engine = engine(node_id)
        self.clock = VersionClock(0)
        self.sent: list[LocalChange] = []

    def packet(self, data: bytes, now: float) -> tuple[Verdict, CtState]:
        d = self.engine.process(data, now)
        self.send(d.events, now)
        return d.verdict, d.ct_state

    def send(self, events: tuple[FlowEvent, ...], now: float) -> None:
        for event in events:
            version = self.clock.next()
            self.engine.table.stamp(event, version)
            change = change_from_event(event, self.id, version, now)
            if change is not None:
                self.sent.append(change)

    def receive(self, changes: list[LocalChange], now: float) -> None:
        for change in changes:
            self.clock.observe(change.record.version)
            _, events = apply_change(self.engine.table, change.op, change.record, now)
            self.send(events, now)


def exchange(a: Node, b: Node, now: float) -> int:
    """Deliver everything both sent; returns how many changes travelled."""
    to_b, to_a = a.sent, b.sent
    a.sent, b.sent = [], []
    b.receive(to_b, now)
    a.receive(to_a, now)
    return len(to_a) + len(to_b)


def test_asymmetric_handshake_between_two_nodes_converges_without_echo():
    """fw1 sees the client's packets, fw2 the server's; each learns the other's state."""
    fw1, fw2 = Node("fw1"), Node("fw2")
    assert fw1.packet(tcp4(C, 40000, S, 80, SYN, seq=100), 1.0) == (Verdict.ACCEPT, CtState.NEW)
    assert exchange(fw1, fw2, 1.0) == 1
    synack = tcp4(S, 80, C, 40000, SYN | ACK, seq=500, ack=101)
    assert fw2.packet(synack, 1.1) == (Verdict.ACCEPT, CtState.ESTABLISHED)
    assert exchange(fw1, fw2, 1.1) == 1  # fw2 took the flow over (SYN_RECV)
    ack = tcp4(C, 40000, S, 80, ACK, seq=101, ack=501)
    assert fw1.packet(ack, 1.2) == (Verdict.ACCEPT, CtState.ESTABLISHED)
    assert exchange(fw1, fw2, 1.2) == 1  # fw1 took it back (ESTABLISHED, assured)
    assert exchange(fw1, fw2, 1.3) == 0  # nothing echoes
    key = fw1.engine.table.flows().__next__().key
    one, two = fw1.engine.table.get(key), fw2.engine.table.get(key)
    assert one is not None and two is not None
    assert (one.state, one.assured) == (two.state, two.assured) == ("ESTABLISHED", True)
    origin_1, origin_2 = fw1.engine.table.origin_of(key), fw2.engine.table.origin_of(key)
    assert origin_1 == FlowOrigin("fw1", 3, False) and origin_2 == FlowOrigin("fw1", 3, True)
    # Mid-stream data keeps flowing on both nodes without any sync traffic.
    data = tcp4(S, 80, C, 40000, ACK, seq=501, ack=101, payload=b"hello")
    assert fw2.packet(data, 2.0) == (Verdict.ACCEPT, CtState.ESTABLISHED)
    assert exchange(fw1, fw2, 2.0) == 0
    # The close: fw1 sees the client's FIN, takes nothing over (it owns it), tells fw2.
    assert fw1.packet(tcp4(C, 40000, S, 80, FIN | ACK, seq=101, ack=506), 3.0)[0] is Verdict.ACCEPT
    assert exchange(fw1, fw2, 3.0) == 1
    two = fw2.engine.table.get(key)
    assert two is not None and two.state == "FIN_WAIT"
