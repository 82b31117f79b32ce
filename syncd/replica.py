"""The replica store: every flow a node knows of, from every origin.

Pure (house style): values and ``now`` in, :class:`Change` lists out; no clock.

Apply rules, per flow key (they make apply idempotent and order-safe, so
deltas and snapshot pages may arrive twice, late or interleaved):

* The held record has the highest ``(version, origin)`` seen (``origin``
  only breaks ties).  An equal record is a duplicate, a lower one is stale;
  both leave the store unchanged.  CREATE and UPDATE are the same upsert: an
  UPDATE overtaking its CREATE must not be lost.
* A DELETE above the held record removes it and leaves a *tombstone* with
  the delete's order for ``tombstone_ttl`` seconds.  A create or update at or
  below a tombstone is refused (``blocked``): a late create cannot resurrect
  a deleted flow.  A delete of an unknown key also leaves a tombstone.
  Tombstones are bounded (``tombstone_capacity``; the oldest go first,
  counted).  Like Linux conntrack's dying list, they only need to outlive
  the reordering window, which on one ordered gRPC stream plus snapshots is
  seconds.
* Replicas never expire on their own idle timer: their origin sends the
  DELETE when the flow times out there (Linux conntrackd's external cache
  behaves the same way).  The absolute ``deadline`` (apply time + the
  timeout the origin sent) is kept for a node that takes the flow over.
* *Orphans*, replicas whose origin left the membership
  (:meth:`ReplicaStore.origin_left`), do expire: at
  ``max(left_at + orphan_grace, deadline)``, unless another node takes the
  flow over first (its record carries the new owner as origin) or the origin
  comes back (:meth:`ReplicaStore.origin_joined`).  Nothing grows without
  bound.
* The store holds at most ``capacity`` live records; a record for a new key
  beyond that is refused and counted (``full``) and the caller resyncs later.

Sweeps support snapshot resync: :meth:`begin_sweep` starts remembering which
keys of one origin are confirmed (by any record of that origin applied
since), :meth:`end_sweep` removes that origin's records that were not, i.e.
flows whose DELETE was lost.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from syncd.errors import ConfigError, Misuse
from syncd.keyindex import BUCKETS, ORDER_BUCKET, ORDER_KEY, ORDERS, KeyIndex
from syncd.records import FlowRecord, Op

__all__ = [
    "Change",
    "ChangeKind",
    "Outcome",
    "Page",
    "Replica",
    "ReplicaConfig",
    "ReplicaStats",
    "ReplicaStore",
]


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    # Live records held (all origins); a record for a new key beyond it is
    # refused and counted, never an existing flow evicted.
    capacity: int = 262144
    # Tombstones held; beyond it the oldest is dropped early (counted).
    tombstone_capacity: int = 65536
    # Seconds a deleted key refuses records at or below the delete's version.
    tombstone_ttl: float = 30.0
    # Seconds an orphan is kept at least after its origin left, giving the
    # hash ring time to hand its flows to a new owner.
    orphan_grace: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.capacity <= 1 << 24:
            raise ConfigError(f"replica capacity must be 1..16777216, not {self.capacity}")
        if not 1 <= self.tombstone_capacity <= 1 << 24:
            raise ConfigError(
                f"tombstone_capacity must be 1..16777216, not {self.tombstone_capacity}"
            )
        if not 0 < self.tombstone_ttl <= 3600:
            raise ConfigError(f"tombstone_ttl must be in (0, 3600], not {self.tombstone_ttl}")
        if not 0 <= self.orphan_grace <= 86400:
            raise ConfigError(f"orphan_grace must be 0..86400, not {self.orphan_grace}")


class Outcome(StrEnum):
    APPLIED = "applied"  # the store changed (a DELETE of an unknown key: tombstone only)
    DUPLICATE = "duplicate"  # the same (version, origin) is already held
    STALE = "stale"  # older than the held record or tombstone
    BLOCKED = "blocked"  # a create/update at or below a tombstone: resurrection refused
    FULL = "full"  # a new key while the store is at capacity (counted)


class ChangeKind(StrEnum):
    UPSERT = "upsert"  # the record was created or replaced
    REMOVE = "remove"  # the record was removed (deleted, swept or expired orphan)


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    record: FlowRecord  # UPSERT: the record now held; REMOVE: the record removed


@dataclass(frozen=True, slots=True)
class Replica:
    record: FlowRecord
    deadline: float  # apply time + record.timeout: when the origin would idle it out


@dataclass(frozen=True, slots=True)
class Page:
    records: tuple[FlowRecord, ...]  # in the order asked (syncd.keyindex), all after the cursor
    next_cursor: bytes  # position of the last key examined: pass it to get the next page
    last: bool  # no keys after this page


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    live: int  # records held
    tombstones: int  # tombstones held
    orphans: int  # live records whose origin has left
    sweeps_active: int  # origins being resynced
    applied: int  # applies that changed the store
    duplicates: int
    stale: int
    blocked: int  # late creates refused by a tombstone
    overflow: int  # records refused because the store was full
    tombstone_overflow: int  # tombstones dropped before their TTL to stay bounded
    expired_tombstones: int
    expired_orphans: int
    swept: int  # records removed at the end of a sweep (their DELETE was lost)
    repair_removed: int  # records removed by anti-entropy (their origin no longer held them)


@dataclass(frozen=True, slots=True)
class _Tombstone:
    order: tuple[int, str]  # (version, origin) of the delete
    expires_at: float


def _index_fresh(keys: KeyIndex | None, fresh: list[bytes]) -> None:
    """Add the new keys gathered by ``upsert_many`` to their origin's index, and
    forget them (before anything else may read or change that index)."""
    if fresh:
        assert keys is not None
        keys.add_many(fresh)
        fresh.clear()


class ReplicaStore:
    """All flows a node knows of, keyed by flow key; see the module docstring."""

    def __init__(self, config: ReplicaConfig | None = None) -> None:
        self._config = config or ReplicaConfig()
        self._live: dict[bytes, Replica] = {}
        # Each origin's keys, in buckets that serve snapshot pages (keyindex).
        self._by_origin: dict[str, KeyIndex] = {}
        self._tombstones: dict[bytes, _Tombstone] = {}
        # Tombstones in creation order: the TTL is constant, so this is also
        # expiry order.  Entries whose tombstone was replaced are skipped.
        self._tomb_fifo: deque[tuple[float, bytes]] = deque()
        self._left: dict[str, float] = {}  # origin -> when it left the membership
        self._orphan_heap: list[tuple[float, bytes]] = []  # (expiry, key), checked lazily
        self._sweeps: dict[str, set[bytes]] = {}  # origin -> keys confirmed since begin
        # ORDER_KEY snapshots (older peers): origin -> every key, sorted at
        # the snapshot's start.
        self._page_keys: dict[str, list[bytes]] = {}
        self._counts = dict.fromkeys(
            ("applied", "duplicates", "stale", "blocked", "overflow", "tombstone_overflow",
             "expired_tombstones", "expired_orphans", "swept", "repair_removed"),
            0,
        )  # fmt: skip

    # --- reading ------------------------------------------------------------------

    @property
    def config(self) -> ReplicaConfig:
        return self._config

    def __len__(self) -> int:
        return len(self._live)

    def get(self, key: bytes) -> Replica | None:
        return self._live.get(key)

    def records(self, origin: str | None = None) -> Iterator[FlowRecord]:
        """Live records (of one origin if given), in no particular order."""
        if origin is None:
            return (rep.record for rep in self._live.values())
        return (self._live[key].record for key in self._by_origin.get(origin, ()))

    def record_slices(self, origin: str, size: int) -> Iterator[list[FlowRecord]]:
        """The origin's live records, about ``size`` at a time, each slice read
        when the iteration reaches it (not one copy of them all up front).

        The caller may let the loop run between two slices while the store
        changes: a record is in at most one slice, and every record held
        (with this origin) from the first slice to the last is in one.
        Anti-entropy reads an origin this way: a whole list of 1M records
        stalled the loop for 0.5-1 s per call.
        """
        index = self._by_origin.get(origin)
        if index is None or size < 1:
            return
        live, bucket = self._live, 0
        while bucket < BUCKETS:
            keys, bucket = index.keys_from(bucket, size)
            out = [rep.record for key in keys if (rep := live.get(key)) is not None]
            out = [r for r in out if r.origin == origin]  # taken over since: not its own now
            if out:
                yield out

    def count(self, origin: str) -> int:
        """Live records of ``origin`` (O(1))."""
        return len(self._by_origin.get(origin, ()))

    def origins(self) -> list[str]:
        """The origins of the live records held."""
        return list(self._by_origin)

    def tombstone(self, key: bytes) -> tuple[int, str] | None:
        """The (version, origin) of the key's tombstone, if it has one."""
        tomb = self._tombstones.get(key)
        return tomb.order if tomb is not None else None

    # --- applying ---------------------------------------------------------------------

    def apply(self, op: Op, record: FlowRecord, now: float) -> tuple[Outcome, Change | None]:
        """Apply one delta's op and record; returns what happened and the change made."""
        sweep = self._sweeps.get(record.origin)
        if sweep is not None:
            sweep.add(record.key)
        current = self._live.get(record.key)
        if op is _DELETE:
            outcome, change = self._delete(record.key, record.order, current, now)
            if sweep is not None:
                sweep.discard(record.key)
        else:
            outcome, change = self._upsert(record, current, now)
        self._counts[_COUNTER[outcome]] += 1
        return outcome, change

    def upsert_many(self, records: list[FlowRecord], now: float) -> tuple[list[Change], int]:
        """``apply(Op.UPDATE, r, now)`` for each record; the changes and the FULL count.

        The same rules as :meth:`apply`, in one loop: snapshot pages and
        batches of upserts spend most of their time in per-call overhead.
        """
        changes: list[Change] = []
        counts = Counter[Outcome]()
        sweeps, live, tombstones = self._sweeps, self._live, self._tombstones
        capacity = self._config.capacity
        append = changes.append
        new, upsert = _new, self._upsert
        # Per origin, looked up again whenever it changes or the slow path
        # ran (it may drop an origin's key index).
        origin: str | None = None
        sweep: set[bytes] | None = None
        keys: KeyIndex | None = None
        orphaned = False
        fresh = 0
        # New keys of the current origin, added to its index in one call
        # before anything else may read or change the index.
        fresh_keys: list[bytes] = []
        upsert_kind = _UPSERT
        for record in records:
            key = record.key
            if record.origin != origin:
                _index_fresh(keys, fresh_keys)
                origin = record.origin
                sweep = sweeps.get(origin)
                keys = self._by_origin.get(origin)
                orphaned = origin in self._left
            if sweep is not None:
                sweep.add(key)
            if (
                keys is not None
                and not orphaned
                and key not in live
                and key not in tombstones
                and len(live) < capacity
            ):
                # The common case of a snapshot page, inline: a new key (so
                # also new to its origin's set) and nothing to compare with.
                # Every other case takes _upsert.
                replica = new(Replica)
                _REP_RECORD(replica, record)
                _REP_DEADLINE(replica, now + record.timeout)
                live[key] = replica
                fresh_keys.append(key)
                change = new(Change)
                _CH_KIND(change, upsert_kind)
                _CH_RECORD(change, record)
                append(change)
                fresh += 1
                continue
            _index_fresh(keys, fresh_keys)
            outcome, done = upsert(record, live.get(key), now)
            counts[outcome] += 1
            if done is not None:
                append(done)
            origin = None  # the slow path may have changed the per-origin state
        _index_fresh(keys, fresh_keys)
        counts[_APPLIED] += fresh
        for outcome, n in counts.items():
            self._counts[_COUNTER[outcome]] += n
        return changes, counts[_FULL]

    def _upsert(
        self, record: FlowRecord, current: Replica | None, now: float
    ) -> tuple[Outcome, Change | None]:
        # The hot path of every delta and snapshot record: orders compared
        # inline, values built without re-validating (see _replica/_change).
        order = (record.version, record.origin)
        if current is not None:
            held = current.record
            held_order = (held.version, held.origin)
            if order == held_order:
                return _DUPLICATE, None
            if order < held_order:
                return _STALE, None
            self._remove(held)
        else:
            tomb = self._tombstones.get(record.key)
            if tomb is not None:
                if order <= tomb.order:
                    return _BLOCKED, None
                if len(self._live) >= self._config.capacity:
                    return _FULL, None
                del self._tombstones[record.key]
            elif len(self._live) >= self._config.capacity:
                return _FULL, None
        self._insert(_replica(record, now + record.timeout))
        return _APPLIED, _change(_UPSERT, record)

    def _delete(
        self, key: bytes, order: tuple[int, str], current: Replica | None, now: float
    ) -> tuple[Outcome, Change | None]:
        if current is not None:
            if order <= current.record.order:
                return _STALE, None
            self._remove(current.record)
            self._bury(key, order, now)
            return _APPLIED, Change(_REMOVE, current.record)
        tomb = self._tombstones.get(key)
        if tomb is not None and order <= tomb.order:
            return (_DUPLICATE if order == tomb.order else _STALE), None
        self._bury(key, order, now)
        return _APPLIED, None

    def bury(self, key: bytes, order: tuple[int, str], now: float) -> tuple[Outcome, Change | None]:
        """A DELETE known only by its tombstone's (version, origin) (anti-entropy)."""
        sweep = self._sweeps.get(order[1])
        if sweep is not None:
            sweep.discard(key)
        outcome, change = self._delete(key, order, self._live.get(key), now)
        self._counts[_COUNTER[outcome]] += 1
        return outcome, change

    def remove_exact(self, key: bytes, order: tuple[int, str], now: float) -> Change | None:
        """Remove the record of ``key`` if it still has exactly ``order``; bury it.

        Anti-entropy's removal of a record its origin no longer holds: a
        newer record that arrived meanwhile is left alone, and the tombstone
        (at the removed record's order) refuses only that record or older.
        """
        current = self._live.get(key)
        if current is None or current.record.order != order:
            return None
        self._remove(current.record)
        self._bury(key, order, now)
        self._counts["repair_removed"] += 1
        return Change(_REMOVE, current.record)

    def tombstones(self) -> Iterator[tuple[bytes, tuple[int, str]]]:
        """(key, (version, origin)) of every tombstone held, in no particular order."""
        return ((key, tomb.order) for key, tomb in self._tombstones.items())

    def _insert(self, replica: Replica) -> None:
        record = replica.record
        key, origin = record.key, record.origin
        self._live[key] = replica
        keys = self._by_origin.get(origin)
        if keys is None:
            keys = self._by_origin[origin] = KeyIndex()
        keys.add(key)
        if self._left and origin in self._left:
            self._push_orphan(key)

    def _push_orphan(self, key: bytes) -> None:
        heap = self._orphan_heap
        heapq.heappush(heap, (self._orphan_expiry(self._live[key]), key))
        if len(heap) > 2 * len(self._live) + 64:  # stale entries piled up: rebuild
            self._orphan_heap = [
                (self._orphan_expiry(rep), k)
                for k, rep in self._live.items()
                if rep.record.origin in self._left
            ]
            heapq.heapify(self._orphan_heap)

    def _remove(self, record: FlowRecord) -> None:
        del self._live[record.key]
        keys = self._by_origin[record.origin]
        keys.discard(record.key)
        if not keys:
            del self._by_origin[record.origin]

    def _bury(self, key: bytes, order: tuple[int, str], now: float) -> None:
        if key not in self._tombstones and len(self._tombstones) >= self._config.tombstone_capacity:
            self._drop_oldest_tombstone()
        expires_at = now + self._config.tombstone_ttl
        self._tombstones[key] = _Tombstone(order, expires_at)
        self._tomb_fifo.append((expires_at, key))

    def _drop_oldest_tombstone(self) -> None:
        while self._tomb_fifo:
            expires_at, key = self._tomb_fifo.popleft()
            tomb = self._tombstones.get(key)
            if tomb is not None and tomb.expires_at == expires_at:
                del self._tombstones[key]
                self._counts["tombstone_overflow"] += 1
                return

    # --- membership and expiry -------------------------------------------------------

    def origin_left(self, origin: str, now: float) -> None:
        """``origin`` left the membership: its replicas become orphans and expire."""
        if origin in self._left:
            return  # keep the first departure time: repeated events must not extend it
        self._left[origin] = now
        for key in self._by_origin.get(origin, ()):
            self._push_orphan(key)

    def origin_joined(self, origin: str) -> None:
        """``origin`` is a member (again): its replicas are no longer orphans."""
        self._left.pop(origin, None)

    def _orphan_expiry(self, replica: Replica) -> float:
        left_at = self._left[replica.record.origin]
        return max(left_at + self._config.orphan_grace, replica.deadline)

    def expire(self, now: float) -> list[Change]:
        """Drop tombstones past their TTL and orphans past their expiry."""
        fifo = self._tomb_fifo
        while fifo and fifo[0][0] <= now:
            expires_at, key = fifo.popleft()
            tomb = self._tombstones.get(key)
            if tomb is not None and tomb.expires_at == expires_at:
                del self._tombstones[key]
                self._counts["expired_tombstones"] += 1
        changes: list[Change] = []
        heap = self._orphan_heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            replica = self._live.get(key)
            if replica is None or replica.record.origin not in self._left:
                continue  # taken over, deleted, or its origin came back
            expiry = self._orphan_expiry(replica)
            if expiry > now:  # updated since this entry was pushed
                heapq.heappush(heap, (expiry, key))
                continue
            self._remove(replica.record)
            self._bury(key, replica.record.order, now)
            self._counts["expired_orphans"] += 1
            changes.append(Change(_REMOVE, replica.record))
        return changes

    def next_deadline(self) -> float | None:
        """When :meth:`expire` may next have work (possibly early, never late)."""
        times = [q[0][0] for q in (self._tomb_fifo, self._orphan_heap) if q]
        return min(times) if times else None

    # --- resync support -----------------------------------------------------------------

    def begin_sweep(self, origin: str) -> None:
        """Start (or restart, forgetting earlier confirmations) a sweep of ``origin``."""
        self._sweeps[origin] = set()

    def sweeping(self, origin: str) -> bool:
        return origin in self._sweeps

    def end_sweep(self, origin: str, now: float) -> list[Change]:
        """Remove ``origin``'s records not confirmed since :meth:`begin_sweep`."""
        confirmed = self._sweeps.pop(origin, None)
        if confirmed is None:
            raise Misuse(f"no sweep of origin {origin!r} in progress")
        stale = [k for k in self._by_origin.get(origin, ()) if k not in confirmed]
        changes = []
        for key in stale:
            record = self._live[key].record
            self._remove(record)
            self._bury(key, record.order, now)
            changes.append(Change(_REMOVE, record))
        self._counts["swept"] += len(changes)
        return changes

    def cancel_sweep(self, origin: str) -> None:
        self._sweeps.pop(origin, None)

    def snapshot_page(self, origin: str, after: bytes, limit: int, order: int = ORDER_KEY) -> Page:
        """Up to ``limit`` of ``origin``'s records positioned after ``after``, in ``order``.

        Every key live from the start of a snapshot (``after=b""``) to the end
        is returned exactly once; keys created or deleted meanwhile may or
        may not be, so a snapshot is paired with the deltas numbered after
        its start.  ``ORDER_BUCKET`` reads the live key index: a page costs a
        page's worth of work.  ``ORDER_KEY`` (older peers) sorts every key of
        the origin at the start of each snapshot.
        """
        if limit < 1:
            raise Misuse(f"page limit must be >= 1, not {limit}")
        if order not in ORDERS:
            raise Misuse(f"unknown snapshot order {order}")
        if order == ORDER_BUCKET:
            held = self._by_origin.get(origin)
            if held is None:
                return Page((), after, True)
            found, next_cursor, last = held.page(after, limit)
            live = self._live
            return Page(tuple([live[k].record for k in found]), next_cursor, last)
        keys = self._page_keys.get(origin)
        if after == b"" or keys is None:
            keys = self._page_keys[origin] = sorted(self._by_origin.get(origin, ()))
        start = index = bisect.bisect_right(keys, after)
        out: list[FlowRecord] = []
        while index < len(keys) and len(out) < limit:
            replica = self._live.get(keys[index])
            if replica is not None and replica.record.origin == origin:
                out.append(replica.record)
            index += 1
        last = index >= len(keys)
        if last:
            del self._page_keys[origin]  # free it; a later page request rebuilds it
        return Page(tuple(out), keys[index - 1] if index > start else after, last)

    def digest(self, bucket_count: int, origin: str | None = None) -> tuple[int, ...]:
        """Per-bucket 64-bit hashes of the live records (of one origin if given).

        A key always falls in the same bucket; a bucket's hash is the XOR of
        its records' (key, version, origin) hashes, so two stores holding the
        same records agree bucket by bucket whatever their insertion order,
        and a mismatch names the buckets to compare (anti-entropy).
        """
        if not 1 <= bucket_count <= 1 << 16:
            raise Misuse(f"bucket_count must be 1..65536, not {bucket_count}")
        buckets = [0] * bucket_count
        for record in self.records(origin):
            slot = int.from_bytes(hashlib.blake2b(record.key, digest_size=8).digest(), "big")
            content = record.key + record.version.to_bytes(8, "big") + record.origin.encode()
            value = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "big")
            buckets[slot % bucket_count] ^= value
        return tuple(buckets)

    def statistics(self) -> ReplicaStats:
        orphans = sum(len(self._by_origin.get(o, ())) for o in self._left)
        return ReplicaStats(
            live=len(self._live),
            tombstones=len(self._tombstones),
            orphans=orphans,
            sweeps_active=len(self._sweeps),
            **self._counts,
        )


# Building Replica and Change values without the dataclass __init__ (the
# per-record cost of apply); their fields need no checks.
_new = object.__new__
_REP_RECORD, _REP_DEADLINE = (Replica.__dict__[n].__set__ for n in ("record", "deadline"))
_CH_KIND, _CH_RECORD = (Change.__dict__[n].__set__ for n in ("kind", "record"))


def _replica(record: FlowRecord, deadline: float) -> Replica:
    replica = _new(Replica)
    _REP_RECORD(replica, record)
    _REP_DEADLINE(replica, deadline)
    return replica


def _change(kind: ChangeKind, record: FlowRecord) -> Change:
    change = _new(Change)
    _CH_KIND(change, kind)
    _CH_RECORD(change, record)
    return change


_COUNTER = {
    Outcome.APPLIED: "applied",
    Outcome.DUPLICATE: "duplicates",
    Outcome.STALE: "stale",
    Outcome.BLOCKED: "blocked",
    Outcome.FULL: "overflow",
}
# Enum members as plain globals: ``Outcome.FULL`` is a descriptor call in
# Python 3.11 (137 ns, measured), and the apply path names several per delta.
_DELETE: Final = Op.DELETE
_UPSERT: Final = ChangeKind.UPSERT
_REMOVE: Final = ChangeKind.REMOVE
_APPLIED: Final = Outcome.APPLIED
_DUPLICATE: Final = Outcome.DUPLICATE
_STALE: Final = Outcome.STALE
_BLOCKED: Final = Outcome.BLOCKED
_FULL: Final = Outcome.FULL
