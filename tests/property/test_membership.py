"""Membership properties: record decoding never does anything undocumented, the
watch-built view matches a model, and the lifecycle follows its table only."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from cluster.errors import BadRecord, IllegalTransition
from cluster.membership import (
    TRANSITIONS,
    Lifecycle,
    LocalInput,
    MemberChanged,
    MemberDeleted,
    MemberJoined,
    MemberLeft,
    MemberPut,
    MemberRecord,
    Membership,
    MembersSnapshot,
    NodeState,
    next_state,
)

PUBLISHED = [s for s in NodeState if s is not NodeState.LEFT]
NODES = ["a", "b", "c"]

records = st.builds(
    MemberRecord,
    node_id=st.sampled_from(NODES),
    address=st.sampled_from(["10.0.0.1:7000", "[fd00::1]:7000", "node-b.lab:443"]),
    state=st.sampled_from(PUBLISHED),
    epoch=st.integers(1, 4),
    vips=st.lists(st.ip_addresses().map(str), max_size=3, unique=True).map(
        lambda v: tuple(sorted(v))
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_returns_or_raises_bad_record(data: bytes) -> None:
    try:
        MemberRecord.from_json(data)
    except BadRecord as exc:
        assert exc.reason
    # Anything else propagates and fails the test.


@given(records, st.sampled_from(["node_id", "address", "state", "epoch", "vips"]), json_values)
def test_decoding_records_with_one_field_replaced(record: MemberRecord, field: str, value) -> None:
    body = json.loads(record.to_json())
    body[field] = value
    try:
        decoded = MemberRecord.from_json(json.dumps(body).encode())
    except BadRecord:
        return
    assert json.loads(decoded.to_json()) == body  # accepted only when it re-encodes identically


@given(records)
def test_valid_records_round_trip(record: MemberRecord) -> None:
    assert MemberRecord.from_json(record.to_json()) == record


@given(st.sampled_from(list(NodeState)), st.sampled_from(list(LocalInput)))
def test_every_state_and_input_is_documented_or_illegal(
    state: NodeState, event: LocalInput
) -> None:
    try:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
    except IllegalTransition:
        assert (state, event) not in TRANSITIONS


@given(st.lists(st.sampled_from(list(LocalInput)), max_size=30))
def test_lifecycle_moves_only_through_the_table(events: list[LocalInput]) -> None:
    life = Lifecycle(now=0.0)
    for t, event in enumerate(events):
        before = life.state
        expected = TRANSITIONS.get((before, event))
        try:
            assert life.handle(event, now=float(t)) is expected
        except IllegalTransition:
            assert expected is None and life.state is before
        # Only "up" may own: reaching it needs a completed resync.
        if life.state is NodeState.UP and before is not NodeState.UP:
            assert event is LocalInput.SYNCED


watch_events = st.one_of(
    records.map(lambda r: ("put", r)),
    st.sampled_from(NODES).map(lambda n: ("delete", n)),
    st.tuples(st.sampled_from(NODES), st.binary(max_size=20)).map(lambda x: ("junk", x)),
)


def replay(view: dict[str, MemberRecord], change) -> None:
    if isinstance(change, MemberJoined):
        assert change.record.node_id not in view
        view[change.record.node_id] = change.record
    elif isinstance(change, MemberChanged):
        assert view[change.old.node_id] == change.old != change.new
        view[change.new.node_id] = change.new
    else:
        assert isinstance(change, MemberLeft)
        assert view.pop(change.record.node_id) == change.record


@given(st.lists(watch_events, max_size=40))
def test_view_matches_model_and_changes_replay_it(events) -> None:
    membership = Membership()
    model: dict[str, MemberRecord] = {}
    replayed: dict[str, MemberRecord] = {}
    for revision, (kind, payload) in enumerate(events, start=1):
        event: MemberPut | MemberDeleted
        if kind == "put":
            event = MemberPut(payload.node_id, payload.to_json(), revision)
            held = model.get(payload.node_id)
            if held is None or payload.epoch >= held.epoch:
                model[payload.node_id] = payload
        elif kind == "delete":
            event = MemberDeleted(payload, revision)
            model.pop(payload, None)
        else:
            event = MemberPut(payload[0], payload[1], revision)
        for change in membership.apply(event, now=float(revision)):
            replay(replayed, change)
    assert dict(membership.members()) == model == replayed
    assert membership.live() == {n for n, r in model.items() if r.state is NodeState.UP}
    # A listing of what the view holds changes nothing.
    listing = tuple(MemberPut(n, r.to_json(), 1) for n, r in model.items())
    assert membership.resync(MembersSnapshot(listing, len(events) + 1), now=0.0) == []
