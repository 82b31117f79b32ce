"""syncd.antientropy: hashing, repair decisions, applying, config."""

from __future__ import annotations

import pytest

from syncd.antientropy import (
    AntiEntropyConfig,
    AntiEntropyCounters,
    RepairKind,
    Tombstone,
    apply_repairs,
    bucket_of,
    differing,
    digest,
    entries_in,
    plan_repairs,
)
from syncd.errors import ConfigError, Misuse
from syncd.records import Op
from syncd.replica import ReplicaStore
from tests.syncd_link import make_record

K = b"key-1"


def rec(version: int, origin: str = "fwb", key: bytes = K):
    return make_record(key, origin, version)


def test_digest_is_order_independent_and_sees_versions() -> None:
    records = [rec(5, key=b"k%d" % i) for i in range(50)]
    assert digest(records, 16) == digest(list(reversed(records)), 16)
    changed = [*records[:-1], rec(6, key=b"k49")]
    assert differing(digest(records, 16), digest(changed, 16)) == [bucket_of(b"k49", 16)]
    assert digest([], 4) == [0, 0, 0, 0]
    with pytest.raises(Misuse):
        digest(records, 0)
    with pytest.raises(Misuse):
        differing([0, 0], [0])


def test_digest_continues_a_partial_one() -> None:
    records = [rec(5, key=b"k%d" % i) for i in range(10)]
    partial = digest(records[:4], 8)
    assert digest(records[4:], 8, into=partial) == digest(records, 8)


def test_entries_in_picks_the_origin_and_the_buckets() -> None:
    store = ReplicaStore()
    keys = [b"k%d" % i for i in range(40)]
    for key in keys:
        store.apply(Op.CREATE, rec(3, "fwb", key), 1.0)
    store.apply(Op.CREATE, rec(3, "fwc", b"other"), 1.0)
    store.apply(Op.DELETE, rec(4, "fwb", keys[0]), 1.0)
    wanted = {bucket_of(keys[0], 4), bucket_of(keys[1], 4)}
    got = entries_in(store.records("fwb"), store.tombstones(), "fwb", 4, wanted)
    assert got[keys[0]] == Tombstone(keys[0], (4, "fwb"))
    assert {k for k in keys if bucket_of(k, 4) in wanted} == set(got)
    assert b"other" not in got


def test_own_origin_is_never_repaired_from_a_peer() -> None:
    assert plan_repairs("fwa", "fwb", "fwa", {K: rec(1, "fwa")}, {K: rec(9, "fwa")}, 99) == []
    with pytest.raises(Misuse):
        plan_repairs("fwa", "fwa", "fwb", {}, {}, 0)


def test_newer_record_is_adopted_and_older_is_not() -> None:
    [repair] = plan_repairs("fwa", "fwc", "fwb", {K: rec(3)}, {K: rec(5)}, 0)
    assert repair.kind is RepairKind.ADOPTED and repair.record == rec(5)
    assert plan_repairs("fwa", "fwc", "fwb", {K: rec(5)}, {K: rec(3)}, 0) == []
    assert plan_repairs("fwa", "fwc", "fwb", {K: rec(5)}, {K: rec(5)}, 0) == []
    # A missing record of a third origin is adopted too (newest wins).
    [repair] = plan_repairs("fwa", "fwc", "fwb", {}, {K: rec(5)}, 0)
    assert repair.kind is RepairKind.ADOPTED


def test_tombstones_are_respected_both_ways() -> None:
    tomb = Tombstone(K, (6, "fwb"))
    [repair] = plan_repairs("fwa", "fwc", "fwb", {K: rec(5)}, {K: tomb}, 0)
    assert repair.kind is RepairKind.DELETED and repair.order == (6, "fwb")
    assert plan_repairs("fwa", "fwc", "fwb", {K: rec(7)}, {K: tomb}, 0) == []
    # Our tombstone at or above their record: no resurrection.
    assert plan_repairs("fwa", "fwc", "fwb", {K: tomb}, {K: rec(6)}, 0) == []
    assert plan_repairs("fwa", "fwc", "fwb", {K: tomb}, {K: rec(7)}, 0)[0].kind == "adopted"


def test_absent_at_the_origin_removes_only_up_to_its_clock() -> None:
    # fwb is the origin and does not hold K: our copy goes, if fwb's clock
    # had passed its version when fwb read its entries.
    [repair] = plan_repairs("fwa", "fwb", "fwb", {K: rec(5)}, {}, 5)
    assert repair.kind is RepairKind.REMOVED and repair.order == (5, "fwb")
    assert plan_repairs("fwa", "fwb", "fwb", {K: rec(6)}, {}, 5) == []  # created after
    # Absent at a third node proves nothing.
    assert plan_repairs("fwa", "fwc", "fwb", {K: rec(5)}, {}, 99) == []


def test_apply_goes_through_the_store_rules() -> None:
    store = ReplicaStore()
    store.apply(Op.CREATE, rec(5), 1.0)
    repairs = plan_repairs("fwa", "fwb", "fwb", {K: rec(5)}, {}, 10)
    store.apply(Op.UPDATE, rec(8), 1.0)  # a newer record arrived meanwhile
    changes, counts = apply_repairs(store, repairs, 2.0)
    assert changes == [] and counts == {"refused": 1}
    assert store.get(K) is not None and store.get(K).record == rec(8)

    repairs = plan_repairs("fwa", "fwb", "fwb", {K: rec(8)}, {}, 10)
    changes, counts = apply_repairs(store, repairs, 2.0)
    assert counts == {"removed": 1} and len(changes) == 1 and store.get(K) is None
    assert store.tombstone(K) == (8, "fwb")  # the removed record cannot come back
    changes, counts = apply_repairs(
        store, plan_repairs("fwa", "fwc", "fwb", {}, {K: rec(8)}, 0), 3.0
    )
    assert counts == {"refused": 1} and store.get(K) is None
    assert store.statistics().repair_removed == 1


def test_deleted_repair_leaves_a_tombstone() -> None:
    store = ReplicaStore()
    store.apply(Op.CREATE, rec(5), 1.0)
    plan = plan_repairs("fwa", "fwc", "fwb", {K: rec(5)}, {K: Tombstone(K, (6, "fwb"))}, 0)
    _, counts = apply_repairs(store, plan, 2.0)
    assert counts == {"deleted": 1} and store.get(K) is None and store.tombstone(K) == (6, "fwb")


@pytest.mark.parametrize(
    "kwargs",
    [{"interval": -1}, {"interval": 0.01}, {"jitter": 1.0}, {"buckets": 0}, {"buckets": 5000},
     {"buckets": 8, "max_repair_buckets": 9}, {"slice": 0}, {"digest_max_age": -1}],
)  # fmt: skip
def test_config_is_validated(kwargs) -> None:
    with pytest.raises(ConfigError):
        AntiEntropyConfig(**kwargs)


def test_counters_snapshot() -> None:
    counters = AntiEntropyCounters()
    counters.counts["rounds"] += 2
    counters.repairs["adopted"] += 3
    stats = counters.statistics()
    assert stats.rounds == 2 and stats.repairs["adopted"] == 3 and stats.repairs["removed"] == 0
    assert AntiEntropyConfig().digest_age == 15.0
    assert AntiEntropyConfig(digest_max_age=0).digest_age == 0
