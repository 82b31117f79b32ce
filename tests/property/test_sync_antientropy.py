"""Anti-entropy converges two drifted stores in one round (syncd.antientropy).

Each flow key has a history at its origin: versions that only grow, ending
live or deleted (and a deleted key's tombstone may since have expired
everywhere).  A replica saw any view of that history: nothing, an older
version, the delete, or the final state; a replica may also have lost a
delete whose tombstone then expired (it holds a dead flow).  Nodes ``fwa``
and ``fwb`` hold their own flows exactly and a drifted copy of the other's;
both hold drifted copies of a third origin, ``fwc``.

One round, as ``syncd.aerun`` runs it (``fwa`` asks): digests, differing
buckets, ``fwb`` repairs from ``fwa``'s entries, ``fwa`` repairs from
``fwb``'s (read after its repair).  Afterwards:

* each node's copy of the other's origin equals the origin's own records;
* both hold the same records of ``fwc`` (newest wins, tombstones respected)
  and no record of ``fwc`` at or below a tombstone either of them held;
* the digests agree for every origin.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.antientropy import (
    apply_repairs,
    differing,
    digest,
    entries_in,
    plan_repairs,
)
from syncd.records import Op
from syncd.replica import ReplicaConfig, ReplicaStore
from tests.syncd_link import make_record

BUCKETS = 8  # few buckets: several keys share one, as at scale
NOW = 100.0

# One key: (versions in its history, ends deleted, origin's tombstone expired,
#           view of replica 1, view of replica 2).  A view: 0 nothing,
#           1 an older live version, 2 the final state, 3 a lost delete
#           (the last live version, kept after the origin deleted it).
KEY = st.tuples(
    st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 3), st.integers(0, 3)
)
HISTORIES = st.lists(KEY, min_size=0, max_size=40)


def _fill(store: ReplicaStore, origin: str, index: int, versions: int, deleted: bool,
          view: int) -> None:  # fmt: skip
    """Put one view of key ``index``'s history into ``store``."""
    key = f"{origin}-{index:04d}".encode()
    base = 1000 * index + 10 * ord(origin[-1])  # distinct versions per key and origin
    last_live = base + versions
    if view == 1 and versions > 1:
        store.apply(Op.CREATE, make_record(key, origin, last_live - 1), NOW)
    elif view == 2:
        store.apply(Op.CREATE, make_record(key, origin, last_live), NOW)
        if deleted:
            store.apply(Op.DELETE, make_record(key, origin, last_live + 1, "CLOSE"), NOW)
    elif view == 3:
        store.apply(Op.CREATE, make_record(key, origin, last_live), NOW)


def _truth(store: ReplicaStore, origin: str, index: int, versions: int, deleted: bool,
           expired: bool) -> None:  # fmt: skip
    """The origin's own state of the key: final record, its tombstone, or nothing."""
    if deleted and expired:
        return
    _fill(store, origin, index, versions, deleted, 2)


def _round(a: ReplicaStore, b: ReplicaStore, clock_a: int, clock_b: int) -> None:
    origins = sorted({r.origin for s in (a, b) for r in s.records()} | {"fwa", "fwb", "fwc"})
    for origin in origins:
        diff = differing(digest(a.records(origin), BUCKETS), digest(b.records(origin), BUCKETS))
        if not diff:
            continue
        mine_a = entries_in(a.records(origin), a.tombstones(), origin, BUCKETS, diff)
        mine_b = entries_in(b.records(origin), b.tombstones(), origin, BUCKETS, diff)
        apply_repairs(b, plan_repairs("fwb", "fwa", origin, mine_b, mine_a, clock_a), NOW)
        after_b = entries_in(b.records(origin), b.tombstones(), origin, BUCKETS, diff)
        apply_repairs(a, plan_repairs("fwa", "fwb", origin, mine_a, after_b, clock_b), NOW)


def _held(store: ReplicaStore, origin: str) -> dict[bytes, int]:
    return {r.key: r.version for r in store.records(origin)}


@settings(max_examples=200, deadline=None)
@given(own_a=HISTORIES, own_b=HISTORIES, third=HISTORIES)
def test_one_round_converges(own_a, own_b, third) -> None:
    config = ReplicaConfig(tombstone_ttl=3600)
    a, b = ReplicaStore(config), ReplicaStore(config)
    for i, (versions, deleted, expired, _, view_b) in enumerate(own_a):
        _truth(a, "fwa", i, versions, deleted, expired)
        _fill(b, "fwa", i, versions, deleted, view_b)
    for i, (versions, deleted, expired, view_a, _) in enumerate(own_b):
        _truth(b, "fwb", i, versions, deleted, expired)
        _fill(a, "fwb", i, versions, deleted, view_a)
    for i, (versions, deleted, _, view_a, view_b) in enumerate(third):
        _fill(a, "fwc", i, versions, deleted, view_a)
        _fill(b, "fwc", i, versions, deleted, view_b)
    tombs_before = dict(a.tombstones()) | dict(b.tombstones())
    clock_a = max((r.version for r in a.records()), default=0) + 10_000_000
    clock_b = max((r.version for r in b.records()), default=0) + 10_000_000
    truth_a, truth_b = _held(a, "fwa"), _held(b, "fwb")

    _round(a, b, clock_a, clock_b)

    assert _held(b, "fwa") == truth_a == _held(a, "fwa")
    assert _held(a, "fwb") == truth_b == _held(b, "fwb")
    assert _held(a, "fwc") == _held(b, "fwc")
    for key, version in _held(a, "fwc").items():
        tomb = tombs_before.get(key)
        assert tomb is None or (version, "fwc") > tomb, "a record came back below a tombstone"
    for origin in ("fwa", "fwb", "fwc"):
        assert digest(a.records(origin), BUCKETS) == digest(b.records(origin), BUCKETS)


@settings(max_examples=100, deadline=None)
@given(own_a=HISTORIES)
def test_a_second_round_changes_nothing(own_a) -> None:
    a, b = ReplicaStore(), ReplicaStore()
    for i, (versions, deleted, expired, _, view_b) in enumerate(own_a):
        _truth(a, "fwa", i, versions, deleted, expired)
        _fill(b, "fwa", i, versions, deleted, view_b)
    _round(a, b, 1 << 40, 1 << 40)
    diff = differing(digest(a.records("fwa"), BUCKETS), digest(b.records("fwa"), BUCKETS))
    assert diff == []
