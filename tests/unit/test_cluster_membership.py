"""Pure membership: records, the watch-built view, suspicion, etcd health, lifecycle."""

from __future__ import annotations

import json

import pytest

from cluster.errors import BadRecord, IllegalTransition, Misuse
from cluster.membership import (
    TRANSITIONS,
    EtcdHealth,
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
    Suspicion,
    next_state,
    should_fence,
)

UP, SYNCING, DRAINING = NodeState.UP, NodeState.SYNCING, NodeState.DRAINING


def rec(node: str = "a", state: NodeState = UP, epoch: int = 1, **kw: object) -> MemberRecord:
    return MemberRecord(node, kw.pop("address", "10.0.0.1:7000"), state, epoch, **kw)  # type: ignore[arg-type]


def put(record: MemberRecord, revision: int, node: str | None = None) -> MemberPut:
    return MemberPut(node or record.node_id, record.to_json(), revision, lease=99)


# --- records ----------------------------------------------------------------


def test_record_round_trips_through_json() -> None:
    record = rec(vips=("10.9.0.1", "2001:db8::5"), address="[fd00::1]:7000")
    assert MemberRecord.from_json(record.to_json()) == record
    body = json.loads(record.to_json())
    assert body == {
        "node_id": "a",
        "address": "[fd00::1]:7000",
        "state": "up",
        "epoch": 1,
        "vips": ["10.9.0.1", "2001:db8::5"],
    }


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"\xff\xfe", "not-json"),
        (lambda b: b"[" * 3000, "not-json"),
        (lambda b: b"x" * 5000, "too-large"),
        (lambda b: json.dumps([1]).encode(), "bad-fields"),
        (lambda b: json.dumps({**b, "extra": 1}).encode(), "bad-fields"),
        (lambda b: json.dumps({k: v for k, v in b.items() if k != "vips"}).encode(), "bad-fields"),
        (lambda b: json.dumps({**b, "epoch": 0}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "epoch": True}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "epoch": "1"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "state": "left"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "state": "sleeping"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "node_id": "a/b"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "address": "10.0.0.1"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "address": "10.0.0.1:0"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "address": "[zz]:80"}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "vips": ["10.0.0.01"]}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "vips": [167772161]}).encode(), "bad-field"),
        (lambda b: json.dumps({**b, "vips": ["10.0.0.2", "10.0.0.1"]}).encode(), "bad-field"),
    ],
)
def test_bad_record_values_raise_bad_record(mutate: object, reason: str) -> None:
    body = json.loads(rec().to_json())
    with pytest.raises(BadRecord) as info:
        MemberRecord.from_json(mutate(body))  # type: ignore[operator]
    assert info.value.reason == reason


def test_building_an_invalid_record_in_code_is_misuse() -> None:
    with pytest.raises(Misuse):
        rec(epoch=0)
    with pytest.raises(Misuse):
        rec(state="up")  # type: ignore[arg-type]  # a str, not the enum
    with pytest.raises(Misuse):
        rec(state=NodeState.LEFT)


# --- the view ---------------------------------------------------------------


def test_join_change_leave() -> None:
    view = Membership()
    a1 = rec("a", SYNCING)
    assert view.apply(put(a1, 5), now=1.0) == [MemberJoined(a1)]
    assert view.live() == frozenset()  # syncing owns nothing
    a2 = rec("a", UP)
    [change] = view.apply(put(a2, 6), now=2.0)
    assert change == MemberChanged(a1, a2) and not change.restarted
    assert view.live() == {"a"} and view.since("a") == 2.0
    assert view.apply(put(a2, 7), now=3.0) == []  # same value: nothing new
    assert view.since("a") == 2.0
    assert view.apply(MemberDeleted("a", 8), now=4.0) == [MemberLeft(a2)]
    assert view.get("a") is None and view.since("a") is None
    assert view.apply(MemberDeleted("a", 9), now=5.0) == []


def test_restart_is_a_change_with_a_new_epoch() -> None:
    view = Membership()
    view.apply(put(rec("a", UP, 1), 5), 1.0)
    [change] = view.apply(put(rec("a", SYNCING, 2), 6), 2.0)
    assert isinstance(change, MemberChanged) and change.restarted


def test_only_up_members_are_live() -> None:
    view = Membership()
    for i, state in enumerate(s for s in NodeState if s is not NodeState.LEFT):
        view.apply(put(rec(f"n{i}", state), 10 + i), 1.0)
    assert view.live() == {f"n{i}" for i, s in enumerate(NodeState) if s is UP}
    assert len(view.members()) == 5


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (MemberPut("a", b"{", 5), "not-json"),
        (MemberPut("b", rec("a").to_json(), 5), "key-mismatch"),
    ],
)
def test_bad_values_are_counted_and_ignored(event: MemberPut, reason: str) -> None:
    view = Membership()
    a = rec("a")
    view.apply(put(a, 4), 1.0)
    assert view.apply(event, 2.0) == []
    assert view.get("a") == a  # the previous view is kept
    assert dict(view.statistics().bad_records) == {reason: 1}


def test_epoch_going_backwards_is_rejected() -> None:
    view = Membership()
    view.apply(put(rec("a", epoch=3), 4), 1.0)
    assert view.apply(put(rec("a", epoch=2), 5), 2.0) == []
    assert view.get("a") == rec("a", epoch=3)
    assert dict(view.statistics().bad_records) == {"epoch-regressed": 1}


def test_stale_events_are_ignored() -> None:
    view = Membership()
    view.apply(put(rec("a"), 10), 1.0)
    assert view.apply(MemberDeleted("a", 9), 2.0) == []
    assert view.apply(put(rec("b"), 3), 2.0) == []
    assert view.get("a") is not None and view.get("b") is None
    stats = view.statistics()
    assert (stats.stale, stats.events, stats.revision) == (2, 1, 10)


def test_resync_diffs_a_listing_against_the_view() -> None:
    view = Membership()
    a, b, c = rec("a"), rec("b", SYNCING), rec("c")
    for i, record in enumerate((a, b)):
        view.apply(put(record, i + 1), 1.0)
    b_up = rec("b", UP)
    snapshot = MembersSnapshot((put(b_up, 20), put(c, 21), MemberPut("x", b"junk", 22)), 30)
    changes = view.resync(snapshot, 2.0)
    assert changes == [MemberLeft(a), MemberChanged(b, b_up), MemberJoined(c)]
    assert view.live() == {"b", "c"}
    stats = view.statistics()
    assert (stats.revision, stats.resyncs, dict(stats.bad_records)) == (30, 1, {"not-json": 1})
    assert view.apply(put(rec("d"), 25), 3.0) == []  # older than the listing


def test_members_view_is_read_only() -> None:
    view = Membership()
    view.apply(put(rec("a"), 1), 1.0)
    with pytest.raises(TypeError):
        view.members()["b"] = rec("b")  # type: ignore[index]


# --- suspicion ----------------------------------------------------------------


def test_silent_peer_becomes_suspect_and_is_cleared_when_heard() -> None:
    s = Suspicion(silence=0.150)
    s.track("b", now=10.0)
    s.heard("c", now=10.0)
    assert s.suspects(10.149) == frozenset()  # within the silence: not yet
    assert s.next_deadline() == pytest.approx(10.15)
    assert s.suspects(10.151) == {"b", "c"}
    assert s.heard("b", now=10.2) is True  # a late heartbeat clears it
    assert s.suspects(10.2) == {"c"}
    assert s.heard("b", now=10.25) is False
    s.forget("c")
    assert s.suspects(100.0) == {"b"}
    assert s.statistics().cleared == 1 and s.statistics().heartbeats == 3


def test_track_does_not_reset_a_known_peer_and_clock_steps_back_are_ignored() -> None:
    s = Suspicion(silence=1.0)
    s.heard("b", now=5.0)
    s.track("b", now=9.0)
    assert s.suspects(6.5) == {"b"}
    s.heard("b", now=4.0)  # earlier than the last heartbeat
    assert s.suspects(6.5) == {"b"}
    assert Suspicion().next_deadline() is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_suspicion_and_health_need_positive_windows(bad: float) -> None:
    with pytest.raises(Misuse):
        Suspicion(silence=bad)
    with pytest.raises(Misuse):
        EtcdHealth(grace=bad)


# --- etcd health / fail static ------------------------------------------------------


def test_etcd_health_degrades_after_grace_and_recovers() -> None:
    h = EtcdHealth(grace=1.0)
    assert h.degraded(0.0)  # never reached etcd: nothing to act on
    h.succeeded(10.0)
    assert not h.degraded(11.0)
    h.failed(10.5, "connection refused")
    assert not h.degraded(10.5)  # a failure alone does not degrade within the grace
    assert h.degraded(11.01)
    h.succeeded(12.5)
    assert not h.degraded(13.0)
    h.succeeded(12.0)  # a late report never moves the last success back
    assert not h.degraded(13.4)
    stats = h.statistics()
    assert (stats.successes, stats.failures, stats.last_error) == (3, 1, "connection refused")
    assert (stats.last_success, stats.last_failure) == (12.5, 10.5)


@pytest.mark.parametrize(
    ("degraded", "peers", "suspects", "fence"),
    [
        (True, {"b", "c"}, {"b", "c"}, True),
        (True, {"b", "c"}, {"b"}, False),  # a peer still talks to us
        (False, {"b", "c"}, {"b", "c"}, False),  # etcd still answers
        (True, set(), set(), False),  # alone: nobody could have taken over
    ],
)
def test_should_fence_only_when_etcd_and_all_peers_are_lost(
    degraded: bool, peers: set[str], suspects: set[str], fence: bool
) -> None:
    assert should_fence(degraded, peers, suspects) is fence


# --- local lifecycle ------------------------------------------------------------


def test_normal_life_and_fencing() -> None:
    life = Lifecycle(now=0.0)
    path = [
        (LocalInput.REGISTERED, NodeState.SYNCING),
        (LocalInput.SYNCED, NodeState.UP),
        (LocalInput.ISOLATED, NodeState.FENCED),
        (LocalInput.RECOVERED, NodeState.SYNCING),
        (LocalInput.SYNCED, NodeState.UP),
        (LocalInput.DRAIN, NodeState.DRAINING),
        (LocalInput.DRAINED, NodeState.LEFT),
    ]
    for t, (event, state) in enumerate(path, start=1):
        assert life.handle(event, now=float(t)) is state
    stats = life.statistics()
    assert (stats.state, stats.since, stats.transitions, stats.fenced) == (
        NodeState.LEFT,
        7.0,
        7,
        1,
    )


def test_illegal_transitions_raise_and_leave_state_alone() -> None:
    life = Lifecycle(now=0.0)
    with pytest.raises(IllegalTransition):
        life.handle(LocalInput.SYNCED, now=1.0)  # cannot be up before registering
    assert life.state is NodeState.JOINING
    with pytest.raises(IllegalTransition):
        next_state(NodeState.LEFT, LocalInput.RECOVERED)


def test_lease_lost_fences_an_owner_and_ends_a_drain() -> None:
    assert next_state(UP, LocalInput.LEASE_LOST) is NodeState.FENCED
    assert next_state(SYNCING, LocalInput.LEASE_LOST) is NodeState.FENCED
    assert next_state(DRAINING, LocalInput.LEASE_LOST) is NodeState.LEFT


def test_left_is_terminal_and_only_up_owns() -> None:
    assert not [key for key in TRANSITIONS if key[0] is NodeState.LEFT]
    assert NodeState.LEFT in TRANSITIONS.values()
    assert {s for s in NodeState if s is not NodeState.LEFT and rec(state=s).owns_flows} == {UP}
