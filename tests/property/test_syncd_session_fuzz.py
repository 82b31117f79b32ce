"""Fuzz properties of the session and the wire conversion.

* Wire conversion returns a valid value or raises exactly BadMessage.
* A session driven by any sequence of its public inputs (start, receive of
  arbitrary envelopes, timers, sends, resync requests, close) follows the
  TRANSITIONS table: every reported state change is a documented (state,
  input) -> state step, consecutive, and ending in the current state; the
  only errors are the documented ones (Misuse for start twice or receive
  before start; PeerError/BadMessage from receive, after which the session is
  CLOSED).  The outbox stays within its bound throughout.
"""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, Misuse, PeerError
from syncd.records import FlowRecord, Op, delta_from_pb, record_from_pb, record_to_pb
from syncd.replica import ReplicaStore
from syncd.session import (
    TRANSITIONS,
    Inbox,
    Outbox,
    PeerSession,
    Sequencer,
    SessionConfig,
    State,
    StateChanged,
)
from tests.syncd_link import CLUSTER, make_record

texts = st.text(st.characters(codec="utf-8"), max_size=40)  # protobuf strings are UTF-8
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def raw_records(draw: st.DrawFn) -> pb.FlowRecord:
    return pb.FlowRecord(
        key=draw(st.binary(max_size=80)),
        proto=draw(u32),
        family=draw(st.sampled_from([0, 4, 6, 7]) | u32),
        orig_src=draw(st.binary(max_size=20)),
        orig_sport=draw(u32),
        orig_dst=draw(st.binary(max_size=20)),
        orig_dport=draw(u32),
        state=draw(st.sampled_from(["ESTABLISHED", "SYN_SENT"]) | texts),
        assured=draw(st.booleans()),
        timeout=draw(doubles),
        origin=draw(st.sampled_from(["a", "b"]) | texts),
        version=draw(u64),
    )


@settings(max_examples=300)
@given(msg=raw_records())
def test_record_from_pb_returns_or_raises_bad_message(msg: pb.FlowRecord) -> None:
    try:
        record = record_from_pb(msg)
    except BadMessage:
        return
    assert isinstance(record, FlowRecord)
    assert record_to_pb(record) == msg


@settings(max_examples=200)
@given(
    op=st.integers(-5, 10),
    origin=st.sampled_from(["a", "b"]) | texts,
    seq=u64,
    record=st.none() | raw_records(),
)
def test_delta_from_pb_returns_or_raises_bad_message(
    op: int, origin: str, seq: int, record: pb.FlowRecord | None
) -> None:
    msg = pb.Delta(op=cast(pb.Op, op), origin=origin, seq=seq)
    if record is not None:
        msg.record.CopyFrom(record)
    try:
        delta = delta_from_pb(msg)
    except BadMessage:
        return
    assert delta.seq == seq and delta.origin == origin == delta.record.origin


# --- session driver ------------------------------------------------------------------------

origins = st.sampled_from(["a", "b", "c"])
epochs = st.integers(0, 3)
seqs = st.integers(0, 12)


def valid_record(key: int, origin: str = "b", version: int = 1) -> pb.FlowRecord:
    return record_to_pb(make_record(bytes([key]), origin, version))


records = st.builds(valid_record, st.integers(0, 9), origins, st.integers(1, 5)) | raw_records()


def envelope(**body: Any) -> pb.Envelope:
    return pb.Envelope(**body)


hellos = st.builds(
    lambda node, cluster, epoch, cursors, protocol: envelope(
        hello=pb.Hello(
            protocol=protocol,
            node_id=node,
            cluster_id=cluster,
            epoch=epoch,
            seen=[pb.OriginCursor(origin=o, epoch=e, seq=s) for o, e, s in cursors],
        )
    ),
    st.sampled_from(["b", "b", "c"]),
    st.sampled_from([CLUSTER, CLUSTER, "other"]),
    epochs,
    st.lists(st.tuples(origins, epochs, seqs), max_size=2),
    st.sampled_from([1, 1, 2]),
)


@st.composite
def batches(draw: st.DrawFn) -> pb.Envelope:
    origin = draw(st.sampled_from(["b", "b", "c"]))
    first = draw(st.integers(0, 10))
    deltas = [
        pb.Delta(
            op=cast(pb.Op, draw(st.integers(0, 3))),
            origin=origin,
            seq=first + i,
            record=draw(records),
        )
        for i in range(draw(st.integers(0, 4)))
    ]
    return envelope(batch=pb.Batch(origin=origin, epoch=draw(epochs), deltas=deltas))


@st.composite
def chunks(draw: st.DrawFn) -> pb.Envelope:
    keys = sorted(set(draw(st.lists(st.integers(0, 9), max_size=4))))
    recs = [valid_record(k, "b", draw(st.integers(1, 5))) for k in keys]
    if draw(st.booleans()):
        recs = [draw(records) for _ in range(draw(st.integers(0, 3)))]
    chunk = pb.SnapshotChunk(
        origin=draw(st.sampled_from(["b", "b", "c"])),
        epoch=draw(epochs),
        request_id=draw(st.integers(0, 4)),
        base_seq=draw(seqs),
        cursor=draw(st.sampled_from([b"", b"\x02"])),
        records=recs,
        next_cursor=draw(st.sampled_from([b"", b"\x05", b"\x09"])),
        last=draw(st.booleans()),
    )
    return envelope(snapshot_chunk=chunk)


envelopes = st.one_of(
    hellos,
    batches(),
    chunks(),
    st.builds(
        lambda o, e, s, g: envelope(ack=pb.Ack(origin=o, epoch=e, seq=s, gap=g)),
        st.sampled_from(["a", "a", "b"]),
        epochs,
        seqs,
        st.booleans(),
    ),
    st.builds(
        lambda o, e, s: envelope(resync_required=pb.ResyncRequired(origin=o, epoch=e, lost_upto=s)),
        origins,
        epochs,
        seqs,
    ),
    st.builds(
        lambda o, c, n: envelope(
            snapshot_request=pb.SnapshotRequest(origin=o, cursor=c, request_id=1, max_records=n)
        ),
        st.sampled_from(["a", "a", "b"]),
        st.sampled_from([b"", b"\x03", b"x" * 70]),
        st.sampled_from([0, 2, 5000]),
    ),
    st.just(envelope(heartbeat=pb.Heartbeat())),
    st.just(pb.Envelope()),
)

inputs = st.one_of(
    st.tuples(st.just("receive"), envelopes),
    st.tuples(st.just("timer"), st.sampled_from([0.0, 0.001, 0.05, 0.2, 1.0, 2.5])),
    st.tuples(st.just("send"), st.none()),
    st.tuples(st.just("emit"), st.integers(0, 9)),
    st.tuples(st.just("start"), st.none()),
    st.tuples(st.just("resync"), st.none()),
    st.tuples(st.just("close"), st.none()),
)


class Driver:
    """Node a's session with peer b, fed arbitrary inputs, checked against the table."""

    def __init__(self) -> None:
        self.store = ReplicaStore()
        self.sequencer = Sequencer("a", 1)
        self.outbox = Outbox("a", 1, 4)
        self.inbox = Inbox("b")
        self.session = PeerSession(
            SessionConfig(cluster_id=CLUSTER), self.outbox, self.inbox, self.store
        )
        self.state = State.IDLE
        self.now = 0.0
        self.version = 0

    def step(self, kind: str, arg: Any) -> None:
        before = self.session.state
        try:
            actions = self.perform(kind, arg)
        except Misuse:
            assert (kind == "start" and before is not State.IDLE) or (
                kind == "receive" and before is State.IDLE
            ), f"undocumented Misuse from {kind} in {before}"
            assert self.session.state is before
            return
        except PeerError:
            assert kind == "receive"
            assert self.session.state is State.CLOSED
            self.state = State.CLOSED
            return
        for action in actions:
            if isinstance(action, StateChanged):
                assert action.old is self.state, "state changes must chain"
                assert TRANSITIONS[(action.old, action.event)] is action.new
                self.state = action.new
        assert self.session.state is self.state
        assert self.outbox.statistics().held <= self.outbox.capacity

    def perform(self, kind: str, arg: Any) -> list[Any]:
        s = self.session
        if kind == "receive":
            return s.receive(arg, self.now)
        if kind == "timer":
            self.now += arg
            return s.handle_timer(self.now)
        if kind == "send":
            for message in s.messages_to_send(self.now):
                assert message.WhichOneof("body") is not None
            return []
        if kind == "emit":
            self.version += 1
            record = make_record(bytes([arg]), "a", self.version)
            self.outbox.push(self.sequencer.delta(Op.CREATE, record), self.now)
            return []
        if kind == "start":
            return s.start(self.now)
        if kind == "resync":
            return s.request_resync(self.now)
        return s.close(self.now)


@settings(max_examples=400)
@given(steps=st.lists(inputs, max_size=40), start_first=st.booleans())
def test_session_follows_the_table_under_any_inputs(
    steps: list[tuple[str, Any]], start_first: bool
) -> None:
    driver = Driver()
    if start_first:
        driver.step("start", None)
    for kind, arg in steps:
        driver.step(kind, arg)
        deadline = driver.session.next_deadline()
        if driver.session.state in (State.IDLE, State.CLOSED):
            assert deadline is None


@settings(max_examples=200)
@given(steps=st.lists(inputs, max_size=30))
def test_session_started_and_live_follows_the_table(steps: list[tuple[str, Any]]) -> None:
    # Start from LIVE (a valid Hello from b, current replica), where most
    # inputs do real work instead of being dropped before the Hello.
    driver = Driver()
    driver.inbox.epoch = 1  # b's epoch is already known: no snapshot needed
    driver.step("start", None)
    driver.step(
        "receive",
        envelope(hello=pb.Hello(protocol=1, node_id="b", cluster_id=CLUSTER, epoch=1)),
    )
    assert driver.session.state is State.LIVE
    for kind, arg in steps:
        driver.step(kind, arg)
