"""Snapshot page order and the per-origin key index that serves it.

A snapshot is read in pages, each after a cursor, so every flow that lives
through the snapshot is sent exactly once.  That needs a total order of the
keys that the sender can walk from any cursor.  The first order (``ORDER_KEY``,
plain increasing keys) made the sender sort every key of the origin when a
snapshot started: 0.7-1.5 s for 1M keys with the event loop stalled, again
for every repeated first-page request, long enough for the peer to declare
the stream dead mid-pull.

``ORDER_BUCKET`` orders keys by ``(bucket, key)``, ``bucket = crc32(key) >> 20``
(4096 buckets), and the store keeps each origin's keys in a :class:`KeyIndex`
of per-bucket sets, updated in O(1) on every insert and removal.  A page
sorts only the buckets it covers (about 250 keys each at 1M keys), so no
request costs more than a page's worth of work, whatever the table's size.
The order is public (CRC-32 is no secret), so the receiver checks it as it
checked key order: a cursor is the bucket as 2 bytes big-endian followed by
the key (:func:`position`), and comparing two positions as bytes compares
``(bucket, key)``.

A requester asks for ``ORDER_BUCKET`` (``SnapshotRequest.order``); a sender of
this version answers in the order asked and says so (``SnapshotChunk.order``),
an older one ignores the field and answers in key order with ``order`` 0,
which the requester then keeps for the rest of that pull.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Final
from zlib import crc32

from syncd.errors import BadMessage
from syncd.records import MAX_KEY_LEN

__all__ = [
    "BUCKETS",
    "MAX_CURSOR_LEN",
    "ORDERS",
    "ORDER_BUCKET",
    "ORDER_KEY",
    "KeyIndex",
    "check_order",
    "position",
]

ORDER_KEY: Final = 0  # pages in increasing key order (the first version's)
ORDER_BUCKET: Final = 1  # pages in increasing (crc32(key) >> 20, key) order
ORDERS: Final = (ORDER_KEY, ORDER_BUCKET)
_SHIFT: Final = 20
BUCKETS: Final = 1 << (32 - _SHIFT)
# A cursor: 2 bytes of bucket, then a key (ORDER_KEY: a key).
MAX_CURSOR_LEN: Final = MAX_KEY_LEN + 2
_PREFIX: Final = tuple(b.to_bytes(2, "big") for b in range(BUCKETS))


def position(key: bytes, order: int) -> bytes:
    """Where ``key`` falls in a snapshot of that order (compare positions as bytes)."""
    if order == ORDER_KEY:
        return key
    return _PREFIX[crc32(key) >> _SHIFT] + key


def check_order(keys: Iterable[bytes], cursor: bytes, order: int) -> bytes:
    """The position of the last key; :class:`BadMessage` unless all increase after ``cursor``."""
    previous = cursor
    if order == ORDER_KEY:
        for key in keys:
            if key <= previous:
                raise BadMessage("bad-snapshot-page", "keys not increasing after the cursor")
            previous = key
        return previous
    prefix = _PREFIX
    for key in keys:
        here = prefix[crc32(key) >> _SHIFT] + key
        if here <= previous:
            raise BadMessage("bad-snapshot-page", "keys not in bucket order after the cursor")
        previous = here
    return previous


class KeyIndex:
    """One origin's keys, in per-bucket sets: O(1) updates, pages in ``ORDER_BUCKET``.

    It behaves as a set of keys (``add``, ``discard``, ``in``, ``len``,
    iteration in no particular order) that can also be read in pages.
    """

    __slots__ = ("_buckets", "_len", "_sorted", "_sorted_bucket")

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._buckets: dict[int, set[bytes]] = {}
        self._len = 0
        # The last bucket a page ended inside, sorted: the next page goes on
        # from it without sorting it again (one huge bucket, e.g. keys chosen
        # to collide, is sorted once per pass, not once per page).  Dropped
        # when a key is added to it; removed keys are skipped when read.
        self._sorted_bucket = -1
        self._sorted: list[bytes] = []
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[bytes]:
        return chain.from_iterable(list(self._buckets.values()))

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        bucket = self._buckets.get(crc32(key) >> _SHIFT)
        return bucket is not None and key in bucket

    def add(self, key: bytes) -> bool:
        """Add ``key``; whether it was new."""
        b = crc32(key) >> _SHIFT
        bucket = self._buckets.get(b)
        if bucket is None:
            bucket = self._buckets[b] = set()
        elif key in bucket:
            return False
        bucket.add(key)
        self._len += 1
        if b == self._sorted_bucket:
            self._sorted_bucket = -1
        return True

    def add_many(self, keys: Iterable[bytes]) -> None:
        """:meth:`add` of each (one call per page instead of one per key)."""
        buckets, added = self._buckets, 0
        for key in keys:
            b = crc32(key) >> _SHIFT
            bucket = buckets.get(b)
            if bucket is None:
                bucket = buckets[b] = set()
            n = len(bucket)
            bucket.add(key)
            if len(bucket) != n:
                added += 1
                if b == self._sorted_bucket:
                    self._sorted_bucket = -1
        self._len += added

    def discard(self, key: bytes) -> bool:
        """Remove ``key`` if held; whether it was."""
        b = crc32(key) >> _SHIFT
        bucket = self._buckets.get(b)
        if bucket is None or key not in bucket:
            return False
        bucket.remove(key)
        self._len -= 1
        if not bucket:
            del self._buckets[b]
        return True

    def keys_from(self, first: int, limit: int) -> tuple[list[bytes], int]:
        """The keys of whole buckets from bucket ``first`` on, until at least
        ``limit`` (or the last bucket); and the bucket to go on from
        (``BUCKETS``: none left).

        A walk over the buckets in such steps sees each key at most once and
        every key held throughout the walk exactly once, whatever is added
        or removed between two steps: a reader can let other work run there.
        """
        out: list[bytes] = []
        buckets = self._buckets
        b = max(first, 0)
        while b < BUCKETS and len(out) < limit:
            bucket = buckets.get(b)
            if bucket:
                out += bucket
            b += 1
        return out, b

    def page(self, after: bytes, limit: int) -> tuple[list[bytes], bytes, bool]:
        """Up to ``limit`` keys positioned after ``after`` (b"": from the start), in order.

        Returns the keys, the cursor for the next page (the last key's
        position) and whether no key is positioned after this page.  Costs
        the sort of the buckets the page covers and a look at each empty
        bucket up to the last one it reaches, never more.
        """
        if after:
            first, after_key = int.from_bytes(after[:2], "big"), after[2:]
        else:
            first, after_key = 0, b""
        out: list[bytes] = []
        buckets = self._buckets
        for b in range(first, BUCKETS):
            bucket = buckets.get(b)
            if not bucket:
                continue
            if b == self._sorted_bucket:
                keys = [k for k in self._sorted if k in bucket]
            else:
                keys = sorted(bucket)
            start = bisect.bisect_right(keys, after_key) if b == first else 0
            room = limit - len(out)
            if len(keys) - start > room:  # the page ends inside this bucket
                out += keys[start : start + room]
                self._sorted_bucket, self._sorted = b, keys
                return out, _PREFIX[b] + out[-1], False
            out += keys[start:] if start else keys
            if len(out) == limit and out:
                more = any(buckets.get(later) for later in range(b + 1, BUCKETS))
                return out, _PREFIX[b] + out[-1], not more
        return out, _PREFIX[crc32(out[-1]) >> _SHIFT] + out[-1] if out else after, True
