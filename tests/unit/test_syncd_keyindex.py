"""Snapshot page order and the per-origin key index (syncd.keyindex)."""

from __future__ import annotations

from zlib import crc32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.errors import BadMessage
from syncd.keyindex import BUCKETS, ORDER_BUCKET, ORDER_KEY, KeyIndex, check_order, position

keys_st = st.binary(min_size=1, max_size=8)


def walk(index: KeyIndex, limit: int) -> list[bytes]:
    """Every page from the start; checks each page's order and cursor on the way."""
    out: list[bytes] = []
    cursor = b""
    for _ in range(10_000):
        found, next_cursor, last = index.page(cursor, limit)
        assert len(found) <= limit
        if found:
            assert check_order(found, cursor, ORDER_BUCKET) == next_cursor
        out += found
        if last:
            return out
        assert found and next_cursor > cursor
        cursor = next_cursor
    raise AssertionError("pages never ended")


def test_position_is_bucket_then_key() -> None:
    key = b"flow-1"
    assert position(key, ORDER_KEY) == key
    assert position(key, ORDER_BUCKET) == (crc32(key) >> 20).to_bytes(2, "big") + key
    assert BUCKETS == 4096


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), keys_st), max_size=200))
def test_index_is_a_set(ops: list[tuple[bool, bytes]]) -> None:
    index, model = KeyIndex(), set()
    for add, key in ops:
        if add:
            assert index.add(key) == (key not in model)
            model.add(key)
        else:
            assert index.discard(key) == (key in model)
            model.discard(key)
        assert len(index) == len(model) and bool(index) == bool(model)
    assert set(index) == model and sorted(index) == sorted(model)
    assert all(k in index for k in model) and b"absent-key-xyz" not in index


@settings(max_examples=100)
@given(st.lists(keys_st, max_size=100), st.lists(keys_st, max_size=100))
def test_add_many_is_add_in_a_loop(first: list[bytes], then: list[bytes]) -> None:
    one, many = KeyIndex(first), KeyIndex(first)
    one.page(b"", 3)  # a sorted bucket cached: adding to it must drop the cache
    many.page(b"", 3)
    for key in then:
        one.add(key)
    many.add_many(then)
    assert len(one) == len(many) == len(set(first) | set(then))
    assert walk(one, 3) == walk(many, 3)


@settings(max_examples=200)
@given(st.sets(keys_st, max_size=300), st.integers(1, 50))
def test_pages_give_every_key_once_in_order(keys: set[bytes], limit: int) -> None:
    index = KeyIndex(keys)
    got = walk(index, limit)
    assert got == sorted(keys, key=lambda k: position(k, ORDER_BUCKET))


@settings(max_examples=200)
@given(
    st.sets(keys_st, min_size=1, max_size=200),
    st.lists(st.tuples(st.booleans(), keys_st), max_size=100),
    st.integers(1, 20),
)
def test_keys_live_through_a_snapshot_come_exactly_once(
    keys: set[bytes], churn: list[tuple[bool, bytes]], limit: int
) -> None:
    """Keys added or removed between pages may or may not come; the others exactly once."""
    index = KeyIndex(keys)
    touched: set[bytes] = set()
    got: list[bytes] = []
    cursor, last, step = b"", False, 0
    while not last:
        found, cursor, last = index.page(cursor, limit)
        got += found
        for add, key in churn[step : step + 3]:
            touched.add(key)
            index.add(key) if add else index.discard(key)
        step += 3
    assert len(got) == len(set(got))
    assert set(got) >= keys - touched
    assert all(k in keys or k in touched for k in got)
    assert [position(k, ORDER_BUCKET) for k in got] == sorted(
        position(k, ORDER_BUCKET) for k in got
    )


def colliding_keys(n: int, bucket: int = 7) -> list[bytes]:
    """``n`` keys that all fall in one bucket (as an attacker choosing 5-tuples could)."""
    out, i = [], 0
    while len(out) < n:
        key = i.to_bytes(4, "big")
        if crc32(key) >> 20 == bucket:
            out.append(key)
        i += 1
    return out


def test_one_huge_bucket_pages_right_with_changes_in_between() -> None:
    keys = colliding_keys(40)
    index = KeyIndex(keys[:30])
    first, cursor, last = index.page(b"", 7)
    assert first == sorted(keys[:30])[:7] and not last
    index.discard(sorted(keys[:30])[10])  # removed from the cached sorted bucket: skipped
    index.add(keys[35])  # added to it: the cache is dropped, the key may come
    rest = walk_from(index, cursor, 7)
    expected = sorted(set(keys[:30]) - {sorted(keys[:30])[10]} | {keys[35]})
    assert first + rest == expected


def walk_from(index: KeyIndex, cursor: bytes, limit: int) -> list[bytes]:
    out: list[bytes] = []
    last = False
    while not last:
        found, cursor, last = index.page(cursor, limit)
        out += found
    return out


def test_a_page_ending_at_the_last_key_says_last() -> None:
    index = KeyIndex([b"a", b"b", b"c"])
    found, _, last = index.page(b"", 3)
    assert len(found) == 3 and last
    assert index.page(b"", 2)[2] is False
    assert KeyIndex().page(b"", 5) == ([], b"", True)


def test_any_cursor_bytes_give_an_answer() -> None:
    index = KeyIndex([b"a", b"b"])
    for cursor in (b"\xff\xff", b"\x00", b"\xff\xff\xff" * 22, b"\x10\x00z"):
        found, _, last = index.page(cursor, 10)
        assert all(position(k, ORDER_BUCKET) > cursor for k in found) and last


@pytest.mark.parametrize("order", [ORDER_KEY, ORDER_BUCKET])
def test_check_order_refuses_repeats_and_keys_before_the_cursor(order: int) -> None:
    keys = sorted([b"k1", b"k2", b"k3", b"k4"], key=lambda k: position(k, order))
    assert check_order(keys, b"", order) == position(keys[-1], order)
    assert check_order([], b"c", order) == b"c"
    for bad, cursor in (
        ([keys[1], keys[0]], b""),  # decreasing
        ([keys[0], keys[0]], b""),  # repeated
        ([keys[0]], position(keys[0], order)),  # not after the cursor
    ):
        with pytest.raises(BadMessage) as e:
            check_order(bad, cursor, order)
        assert e.value.reason == "bad-snapshot-page"
