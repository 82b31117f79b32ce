"""ReplicaStore: order-safe apply, tombstones, capacity, orphans, sweeps, pages, digest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.errors import ConfigError, Misuse
from syncd.keyindex import ORDER_BUCKET, position
from syncd.records import FlowRecord, Op
from syncd.replica import ChangeKind, Outcome, Page, ReplicaConfig, ReplicaStore
from tests.syncd_link import make_record


def rec(key: int, version: int, origin: str = "a", timeout: float = 60.0) -> FlowRecord:
    return make_record(bytes([key]), origin, version, timeout=timeout)


def store(**config: float) -> ReplicaStore:
    return ReplicaStore(ReplicaConfig(**config))  # type: ignore[arg-type]


def test_create_update_delete_in_order() -> None:
    s = store()
    outcome, change = s.apply(Op.CREATE, rec(1, 1), 0.0)
    assert outcome is Outcome.APPLIED and change is not None and change.kind is ChangeKind.UPSERT
    outcome, change = s.apply(Op.UPDATE, rec(1, 2), 0.0)
    assert outcome is Outcome.APPLIED and s.get(b"\x01").record.version == 2  # type: ignore[union-attr]
    outcome, change = s.apply(Op.DELETE, rec(1, 3), 0.0)
    assert outcome is Outcome.APPLIED and change is not None and change.kind is ChangeKind.REMOVE
    assert change.record.version == 2  # the removed record is reported
    assert s.get(b"\x01") is None and s.tombstone(b"\x01") == (3, "a")


def test_duplicates_and_stale_records_change_nothing() -> None:
    s = store()
    s.apply(Op.CREATE, rec(1, 5), 0.0)
    assert s.apply(Op.CREATE, rec(1, 5), 1.0) == (Outcome.DUPLICATE, None)
    assert s.apply(Op.UPDATE, rec(1, 4), 1.0) == (Outcome.STALE, None)
    assert s.apply(Op.DELETE, rec(1, 5), 1.0) == (Outcome.STALE, None)
    assert s.get(b"\x01").record.version == 5  # type: ignore[union-attr]
    stats = s.statistics()
    assert (stats.applied, stats.duplicates, stats.stale) == (1, 1, 2)


def test_update_overtaking_create_is_kept() -> None:
    s = store()
    s.apply(Op.UPDATE, rec(1, 2), 0.0)
    assert s.apply(Op.CREATE, rec(1, 1), 0.0)[0] is Outcome.STALE
    assert s.get(b"\x01").record.version == 2  # type: ignore[union-attr]


def test_tombstone_blocks_late_create_until_ttl() -> None:
    s = store(tombstone_ttl=5.0)
    s.apply(Op.CREATE, rec(1, 1), 0.0)
    s.apply(Op.DELETE, rec(1, 3), 1.0)
    assert s.apply(Op.CREATE, rec(1, 2), 2.0) == (Outcome.BLOCKED, None)
    assert s.apply(Op.CREATE, rec(1, 3), 2.0) == (Outcome.BLOCKED, None)  # equal is not newer
    assert s.statistics().blocked == 2
    assert s.next_deadline() == 6.0
    s.expire(5.9)
    assert s.tombstone(b"\x01") is not None
    s.expire(6.0)
    assert s.tombstone(b"\x01") is None and s.statistics().expired_tombstones == 1
    assert s.apply(Op.CREATE, rec(1, 2), 7.0)[0] is Outcome.APPLIED


def test_newer_create_replaces_tombstone() -> None:
    s = store()
    s.apply(Op.DELETE, rec(1, 3), 0.0)  # delete of an unknown key still buries it
    assert s.tombstone(b"\x01") == (3, "a")
    assert s.apply(Op.CREATE, rec(1, 4), 0.0)[0] is Outcome.APPLIED
    assert s.tombstone(b"\x01") is None
    s.expire(1000.0)  # the old FIFO entry must not remove anything now
    assert s.get(b"\x01") is not None


def test_delete_of_tombstoned_key() -> None:
    s = store()
    s.apply(Op.DELETE, rec(1, 3), 0.0)
    assert s.apply(Op.DELETE, rec(1, 3), 0.0)[0] is Outcome.DUPLICATE
    assert s.apply(Op.DELETE, rec(1, 2), 0.0)[0] is Outcome.STALE
    assert s.apply(Op.DELETE, rec(1, 9), 0.0)[0] is Outcome.APPLIED
    assert s.tombstone(b"\x01") == (9, "a")


def test_capacity_refuses_new_keys_not_updates() -> None:
    s = store(capacity=2)
    s.apply(Op.CREATE, rec(1, 1), 0.0)
    s.apply(Op.CREATE, rec(2, 1), 0.0)
    assert s.apply(Op.CREATE, rec(3, 1), 0.0) == (Outcome.FULL, None)
    assert s.apply(Op.UPDATE, rec(1, 2), 0.0)[0] is Outcome.APPLIED
    assert len(s) == 2 and s.statistics().overflow == 1


def test_tombstones_are_bounded_oldest_first() -> None:
    s = store(tombstone_capacity=2)
    for key in range(3):
        s.apply(Op.DELETE, rec(key, 1), float(key))
    assert s.tombstone(b"\x00") is None
    assert s.tombstone(b"\x01") is not None and s.tombstone(b"\x02") is not None
    assert s.statistics().tombstone_overflow == 1 and s.statistics().tombstones == 2


def test_replicas_never_expire_while_origin_is_member() -> None:
    s = store(orphan_grace=1.0)
    s.apply(Op.CREATE, rec(1, 1, timeout=0.5), 0.0)
    assert s.expire(1e6) == [] and s.get(b"\x01") is not None
    assert s.get(b"\x01").deadline == 0.5  # type: ignore[union-attr]


def test_orphans_expire_after_grace_or_their_deadline() -> None:
    s = store(orphan_grace=10.0)
    s.apply(Op.CREATE, rec(1, 1, timeout=5.0), 0.0)  # deadline 5
    s.apply(Op.CREATE, rec(2, 1, timeout=50.0), 0.0)  # deadline 50
    s.apply(Op.CREATE, rec(3, 1, origin="b"), 0.0)
    s.origin_left("a", 2.0)
    s.origin_left("a", 9.0)  # repeated: the first departure counts
    assert s.statistics().orphans == 2
    assert s.next_deadline() == 12.0
    assert s.expire(11.9) == []
    removed = s.expire(12.0)
    assert [c.record.key for c in removed] == [b"\x01"] and removed[0].kind is ChangeKind.REMOVE
    # an expired orphan is buried: a late copy cannot come back
    assert s.apply(Op.CREATE, rec(1, 1), 13.0)[0] is Outcome.BLOCKED
    assert [c.record.key for c in s.expire(50.0)] == [b"\x02"]
    assert s.get(b"\x03") is not None
    assert s.statistics().expired_orphans == 2 and s.statistics().orphans == 0


def test_takeover_and_rejoin_save_orphans() -> None:
    s = store(orphan_grace=1.0)
    s.apply(Op.CREATE, rec(1, 1), 0.0)
    s.apply(Op.CREATE, rec(2, 1), 0.0)
    s.origin_left("a", 0.0)
    s.apply(Op.UPDATE, rec(1, 2, origin="b"), 0.5)  # b took flow 1 over
    assert s.statistics().orphans == 1
    s.origin_joined("a")
    assert s.expire(1e6) == []
    assert len(s) == 2


def test_records_applied_after_origin_left_are_orphans_too() -> None:
    s = store(orphan_grace=1.0)
    s.origin_left("a", 0.0)
    s.apply(Op.CREATE, rec(1, 1, timeout=0.0), 0.5)
    assert [c.record.key for c in s.expire(1.5)] == [b"\x01"]


def test_sweep_removes_unconfirmed_records_of_that_origin_only() -> None:
    s = store()
    for key in range(4):
        s.apply(Op.CREATE, rec(key, 1), 0.0)
    s.apply(Op.CREATE, rec(9, 1, origin="b"), 0.0)
    s.begin_sweep("a")
    assert s.sweeping("a")
    s.apply(Op.UPDATE, rec(0, 1), 1.0)  # duplicate still confirms
    s.apply(Op.UPDATE, rec(1, 2), 1.0)
    s.apply(Op.CREATE, rec(5, 1), 1.0)
    s.apply(Op.DELETE, rec(2, 2), 1.0)
    removed = s.end_sweep("a", 2.0)
    assert sorted(c.record.key for c in removed) == [b"\x03"]
    assert sorted(r.key for r in s.records("a")) == [b"\x00", b"\x01", b"\x05"]
    assert s.get(b"\x09") is not None
    assert s.statistics().swept == 1 and not s.sweeping("a")
    assert s.apply(Op.CREATE, rec(3, 1), 3.0)[0] is Outcome.BLOCKED  # swept keys are buried


def test_begin_sweep_again_forgets_confirmations() -> None:
    s = store()
    s.apply(Op.CREATE, rec(1, 1), 0.0)
    s.begin_sweep("a")
    s.apply(Op.UPDATE, rec(1, 1), 0.0)
    s.begin_sweep("a")
    assert [c.record.key for c in s.end_sweep("a", 0.0)] == [b"\x01"]


def test_end_sweep_without_begin_is_misuse() -> None:
    s = store()
    with pytest.raises(Misuse):
        s.end_sweep("a", 0.0)
    s.begin_sweep("a")
    s.cancel_sweep("a")
    with pytest.raises(Misuse):
        s.end_sweep("a", 0.0)


def test_snapshot_pages_walk_keys_in_order_once() -> None:
    s = store()
    for key in (5, 1, 3, 7, 9):
        s.apply(Op.CREATE, rec(key, 1), 0.0)
    s.apply(Op.CREATE, rec(4, 1, origin="b"), 0.0)
    page = s.snapshot_page("a", b"", 2)
    assert [r.key for r in page.records] == [b"\x01", b"\x03"] and not page.last
    s.apply(Op.DELETE, rec(5, 2), 0.0)  # deleted meanwhile: skipped
    s.apply(Op.CREATE, rec(2, 1), 0.0)  # created behind the cursor: not sent (a delta is)
    page = s.snapshot_page("a", page.next_cursor, 2)
    assert [r.key for r in page.records] == [b"\x07", b"\x09"]
    assert page.next_cursor == b"\x09"
    last = s.snapshot_page("a", page.next_cursor, 2)
    assert last.records == () and last.last
    assert s.snapshot_page("zz", b"", 10).last


def test_snapshot_page_resumes_after_its_key_list_was_dropped() -> None:
    s = store()
    for key in range(6):
        s.apply(Op.CREATE, rec(key, 1), 0.0)
    first = s.snapshot_page("a", b"", 3)
    s.snapshot_page("a", b"", 100)  # another reader finishes and frees the list
    rest = s.snapshot_page("a", first.next_cursor, 100)
    assert [r.key for r in first.records + rest.records] == [bytes([k]) for k in range(6)]
    with pytest.raises(Misuse):
        s.snapshot_page("a", b"", 0)


def test_bucket_order_pages_read_the_live_index() -> None:
    s = store()
    for key in range(40):
        s.apply(Op.CREATE, rec(key, 1), 0.0)
    s.apply(Op.CREATE, rec(99, 1, origin="b"), 0.0)
    page = s.snapshot_page("a", b"", 15, ORDER_BUCKET)
    assert len(page.records) == 15 and not page.last
    keys = [r.key for r in page.records]
    assert keys == sorted(keys, key=lambda k: position(k, ORDER_BUCKET))
    assert page.next_cursor == position(keys[-1], ORDER_BUCKET)
    gone = next(k for k in range(40) if bytes([k]) not in keys)
    s.apply(Op.DELETE, rec(gone, 2), 0.0)  # deleted meanwhile: never sent
    seen = list(keys)
    while not page.last:
        page = s.snapshot_page("a", page.next_cursor, 15, ORDER_BUCKET)
        seen += [r.key for r in page.records]
    assert sorted(seen) == sorted(bytes([k]) for k in range(40) if k != gone)
    assert all(r.origin == "a" for r in page.records)
    assert s.snapshot_page("zz", b"", 10, ORDER_BUCKET) == Page((), b"", True)
    with pytest.raises(Misuse):
        s.snapshot_page("a", b"", 10, 7)


def test_digest_is_order_independent_and_sensitive() -> None:
    one, two = store(), store()
    records = [rec(k, k + 1, origin="a" if k % 2 else "b") for k in range(20)]
    for r in records:
        one.apply(Op.CREATE, r, 0.0)
    for r in reversed(records):
        two.apply(Op.CREATE, r, 5.0)
    assert one.digest(8) == two.digest(8)
    assert one.digest(8, "a") == two.digest(8, "a") != one.digest(8, "b")
    two.apply(Op.UPDATE, rec(3, 99, origin="a"), 6.0)
    diff = [i for i, (x, y) in enumerate(zip(one.digest(8), two.digest(8), strict=True)) if x != y]
    assert len(diff) == 1
    assert store().digest(4) == (0, 0, 0, 0)
    with pytest.raises(Misuse):
        one.digest(0)


@pytest.mark.parametrize(
    "config",
    [
        {"capacity": 0},
        {"tombstone_capacity": 0},
        {"tombstone_ttl": 0.0},
        {"orphan_grace": -1.0},
    ],
)
def test_config_is_validated(config: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ReplicaConfig(**config)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 5), st.integers(1, 6), st.sampled_from(["fw1", "fw2"]), st.booleans()
        ),
        max_size=40,
    ),
    page=st.lists(
        st.tuples(st.integers(0, 9), st.integers(1, 6), st.sampled_from(["fw1", "fw2"])),
        max_size=20,
    ),
    sweep=st.booleans(),
    capacity=st.sampled_from([4, 64]),
    indexed=st.booleans(),
    left=st.sampled_from([None, "fw1", "fw2"]),
)
def test_upsert_many_is_apply_update_in_a_loop(ops, page, sweep, capacity, indexed, left) -> None:
    config = ReplicaConfig(capacity=capacity)
    one, many = ReplicaStore(config), ReplicaStore(config)
    for store in (one, many):
        for k, v, origin, delete in ops:
            op = Op.DELETE if delete else Op.UPDATE
            store.apply(op, make_record(b"k%d" % k, origin, v), 1.0)
        if sweep:
            store.begin_sweep("fw1")
        if indexed:  # a snapshot was served: keys added from now on are tracked
            store.snapshot_page("fw1", b"", 1)
        if left is not None:
            store.origin_left(left, 1.5)
    records = [make_record(b"k%d" % k, origin, v) for k, v, origin in page]
    outcomes = [one.apply(Op.UPDATE, r, 2.0) for r in records]
    got, full = many.upsert_many(records, 2.0)
    assert got == [c for _, c in outcomes if c is not None]
    assert full == sum(1 for o, _ in outcomes if o is Outcome.FULL)
    assert one.statistics() == many.statistics()
    assert sorted(one.records(), key=lambda r: r.key) == sorted(many.records(), key=lambda r: r.key)
    for origin in ("fw1", "fw2"):  # the same snapshot index, in both orders
        assert one.snapshot_page(origin, b"", 100) == many.snapshot_page(origin, b"", 100)
        by_bucket = many.snapshot_page(origin, b"", 100, ORDER_BUCKET)
        assert by_bucket == one.snapshot_page(origin, b"", 100, ORDER_BUCKET)
        assert len(by_bucket.records) == many.count(origin) == one.count(origin)
    if sweep:
        assert one.end_sweep("fw1", 3.0) == many.end_sweep("fw1", 3.0)
    assert one.expire(1e6) == many.expire(1e6)  # the same orphans


def test_count_per_origin_follows_the_live_records() -> None:
    s = store()
    s.apply(Op.CREATE, rec(1, 1, "a"), 0.0)
    s.apply(Op.CREATE, rec(2, 1, "a"), 0.0)
    s.apply(Op.CREATE, rec(3, 1, "b"), 0.0)
    assert (s.count("a"), s.count("b"), s.count("c")) == (2, 1, 0)
    s.apply(Op.DELETE, rec(1, 2, "a"), 0.0)
    assert s.count("a") == sum(1 for _ in s.records("a")) == 1


def test_record_slices_read_each_record_once_while_the_store_changes() -> None:
    def big(key: int, version: int, origin: str = "a") -> FlowRecord:
        return make_record(key.to_bytes(4, "big"), origin, version)

    s = store(capacity=10_000)
    for k in range(1000):
        s.apply(Op.CREATE, big(k, 1), 0.0)
        s.apply(Op.CREATE, big(10_000 + k, 1, origin="b"), 0.0)
    assert sorted(r.key for part in s.record_slices("a", 100) for r in part) == sorted(
        r.key for r in s.records("a")
    )
    seen: list[bytes] = []
    sizes: list[int] = []
    for k, part in enumerate(s.record_slices("a", 100)):
        sizes.append(len(part))
        seen += [r.key for r in part]
        # Between two slices: deletes, creates and a takeover by b.
        s.apply(Op.DELETE, big(2 * k, 2), 0.0)
        s.apply(Op.CREATE, big(5000 + k, 1), 0.0)
        s.apply(Op.UPDATE, big(2 * k + 1, 5, origin="b"), 0.0)
    assert len(seen) == len(set(seen))  # never twice
    assert all(r.origin == "a" for part in s.record_slices("a", 100) for r in part)
    held = {r.key for r in s.records("a")} & {big(k, 1).key for k in range(1000)}
    assert held <= set(seen)  # every record held throughout the walk was read
    assert len(sizes) > 1 and max(sizes) < 200  # slices of about 100: whole buckets
    assert list(s.record_slices("c", 100)) == []
