"""Anti-entropy: find and repair what the delta streams missed (pure).

Deltas and snapshots keep replicas right as long as the code is right and
nothing is lost in ways the protocol does not see (a bug, a store refusing a
record, a tombstone expiring before a late create...).  Anti-entropy is the
independent check, as in Dynamo and Cassandra's repair (Merkle trees) or
conntrackd's periodic resync, kept cheap by hashing per bucket:

1. Every record of an origin falls in one of ``buckets`` buckets
   (:func:`bucket_of`: CRC-32 of the key, modulo ``buckets``); a bucket's
   hash is the XOR of :func:`record_hash` (BLAKE2b-64 of key, version and
   origin) over the live records of that origin in it, so two nodes holding
   the same records agree bucket by bucket whatever the order they got them
   in.  ``DigestRequest``/``DigestReply`` swap these per origin.
2. For each origin, the buckets whose hashes differ (:func:`differing`,
   at most ``max_repair_buckets`` per round, the rest next round) are
   swapped entry by entry (``RepairRequest``/``RepairReply``): live records
   and tombstones.  The responder repairs its copy from the requester's
   entries, then answers with its own, from which the requester repairs.
3. :func:`plan_repairs` decides, per key, for the side that repairs:

   * the origin's own copy is the truth for its own flows: a node never
     repairs its own origin from a peer; when the peer *is* the origin, a
     record it no longer holds is removed here (``removed``), but only if
     its version is at most the peer's version clock when it read its
     entries (``as_of``): a record created after that is not missing;
   * otherwise the newest ``(version, origin)`` wins (``adopted``; a
     missing record counts as older than any), and a tombstone above a
     live record deletes it (``deleted``); a record at or below a tombstone
     is never adopted (no resurrection).  For a third origin, a record one
     side lacks may be a lost create or a lost delete whose tombstone has
     expired: it is adopted, and if it was dead, the round of either side
     with the origin itself removes it again (and the tombstone that
     leaves stops it spreading back).

   Applying goes through :class:`syncd.replica.ReplicaStore`'s own rules
   (versions, tombstones, capacity), so a repair can never undo a newer
   change that arrived meanwhile.

Everything here takes values and returns values; the gRPC calls, the
schedule (every ``interval`` seconds per peer, jittered) and the chunking
that keeps a large store from stalling the event loop are in
:mod:`syncd.aerun`.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from syncd.errors import ConfigError, Misuse
from syncd.records import FlowRecord, Op
from syncd.replica import Change, Outcome, ReplicaStore

__all__ = [
    "CALL_ENTRIES",
    "MAX_BUCKETS",
    "AntiEntropyConfig",
    "AntiEntropyCounters",
    "AntiEntropyStats",
    "Entry",
    "Repair",
    "RepairKind",
    "Tombstone",
    "apply_repairs",
    "bucket_of",
    "differing",
    "digest",
    "entries_in",
    "plan_repairs",
    "record_hash",
]

MAX_BUCKETS: Final = 4096  # per origin; DigestRequest.buckets above it is refused
MAX_ORIGINS: Final = 1024  # origins in one DigestRequest
MAX_ENTRIES: Final = 65536  # entries in one RepairRequest/RepairReply
CALL_ENTRIES: Final = 4096  # our entries per Repair call (the work of one step stays small)


@dataclass(frozen=True, slots=True)
class AntiEntropyConfig:
    # Seconds between two rounds with the same peer (0: anti-entropy off).
    # A round hashes every record held (about 1 us each; a digest is reused
    # for interval / 2): 1M flows cost about 1 s of CPU per 15 s at 30 s.
    interval: float = 30.0
    # Each wait is interval * (1 +- jitter), drawn at random, so the rounds
    # of a cluster's nodes do not line up.
    jitter: float = 0.2
    # Buckets per origin.  More buckets: smaller exchanges per difference
    # (1M flows: about 1000 records a bucket), bigger digests (8 bytes each).
    buckets: int = 1024
    # Differing buckets repaired per origin and round; the others wait for
    # the next round (bounds the work and the messages of one round).  The
    # peer's own origin differing in more asks for a snapshot pull instead.
    max_repair_buckets: int = 64
    # Records hashed (or scanned) between two yields to the event loop.
    slice: int = 4096
    # Seconds a digest is reused (our rounds and answers to peers'); None:
    # interval / 2.  A reused digest misses newer differences until then.
    digest_max_age: float | None = None

    def __post_init__(self) -> None:
        if not (self.interval == 0 or 0.1 <= self.interval <= 86400):
            raise ConfigError(f"anti_entropy.interval must be 0 or 0.1..86400, not {self.interval}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"anti_entropy.jitter must be in [0, 1), not {self.jitter}")
        if not 1 <= self.buckets <= MAX_BUCKETS:
            raise ConfigError(f"anti_entropy.buckets must be 1..{MAX_BUCKETS}, not {self.buckets}")
        if not 1 <= self.max_repair_buckets <= self.buckets:
            raise ConfigError("anti_entropy.max_repair_buckets must be 1..buckets")
        if self.digest_max_age is not None and not 0 <= self.digest_max_age <= 86400:
            raise ConfigError("anti_entropy.digest_max_age must be 0..86400")
        if not 1 <= self.slice <= 1 << 20:
            raise ConfigError(f"anti_entropy.slice must be 1..1048576, not {self.slice}")

    @property
    def digest_age(self) -> float:
        return self.interval / 2 if self.digest_max_age is None else self.digest_max_age


@dataclass(frozen=True, slots=True)
class Tombstone:
    key: bytes
    order: tuple[int, str]  # (version, origin) of the delete


Entry = FlowRecord | Tombstone


def _order(entry: Entry) -> tuple[int, str]:
    if isinstance(entry, Tombstone):
        return entry.order
    return (entry.version, entry.origin)


# --- hashing ---------------------------------------------------------------------------


def bucket_of(key: bytes, buckets: int) -> int:
    """The bucket of a flow key (CRC-32, cheap: every key of an origin is bucketed)."""
    return zlib.crc32(key) % buckets


def record_hash(record: FlowRecord) -> int:
    """64-bit hash of what identifies a record's content: key, version, origin."""
    content = record.key + record.version.to_bytes(8, "big") + record.origin.encode()
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "big")


def digest(records: Iterable[FlowRecord], buckets: int, into: list[int] | None = None) -> list[int]:
    """Per-bucket XOR of :func:`record_hash`; ``into`` continues a partial digest."""
    if not 1 <= buckets <= MAX_BUCKETS:
        raise Misuse(f"buckets must be 1..{MAX_BUCKETS}, not {buckets}")
    out = into if into is not None else [0] * buckets
    crc, blake = zlib.crc32, hashlib.blake2b
    for r in records:
        content = r.key + r.version.to_bytes(8, "big") + r.origin.encode()
        out[crc(r.key) % buckets] ^= int.from_bytes(blake(content, digest_size=8).digest(), "big")
    return out


def differing(mine: Sequence[int], theirs: Sequence[int]) -> list[int]:
    """The buckets whose hashes differ; Misuse if the digests have different sizes."""
    if len(mine) != len(theirs):
        raise Misuse(f"digests of {len(mine)} and {len(theirs)} buckets")
    return [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]


def entries_in(
    records: Iterable[FlowRecord],
    tombstones: Iterable[tuple[bytes, tuple[int, str]]],
    origin: str,
    buckets: int,
    wanted: Iterable[int],
) -> dict[bytes, Entry]:
    """``origin``'s live records and tombstones whose keys fall in the ``wanted`` buckets.

    A key is live or a tombstone, never both (the store guarantees it).
    """
    want = set(wanted)
    out: dict[bytes, Entry] = {}
    for r in records:
        if r.origin == origin and zlib.crc32(r.key) % buckets in want:
            out[r.key] = r
    for key, order in tombstones:
        if order[1] == origin and key not in out and zlib.crc32(key) % buckets in want:
            out[key] = Tombstone(key, order)
    return out


# --- deciding and applying ------------------------------------------------------------


class RepairKind(StrEnum):
    ADOPTED = "adopted"  # a newer or missing record taken from the peer
    DELETED = "deleted"  # a live record below the peer's tombstone removed
    REMOVED = "removed"  # a record the origin (the peer) no longer holds removed


@dataclass(frozen=True, slots=True)
class Repair:
    kind: RepairKind
    key: bytes
    record: FlowRecord | None  # ADOPTED: the record to upsert
    order: tuple[int, str]  # DELETED: the tombstone's order; REMOVED: the held record's


def plan_repairs(
    me: str,
    them: str,
    origin: str,
    mine: Mapping[bytes, Entry],
    theirs: Mapping[bytes, Entry],
    their_as_of: int,
) -> list[Repair]:
    """What ``me`` changes in its copy of ``origin``'s flows, given ``them``'s entries.

    ``mine`` and ``theirs`` hold both sides' entries of the same buckets;
    ``their_as_of`` is ``them``'s version clock when it read ``theirs``.
    See the module docstring for the rules.
    """
    if me == them:
        raise Misuse("anti-entropy between a node and itself")
    if origin == me:
        return []  # our own flows: our copy is the truth
    authority = origin == them
    repairs: list[Repair] = []
    for key in sorted(mine.keys() | theirs.keys()):  # sorted: a deterministic plan
        m, t = mine.get(key), theirs.get(key)
        if isinstance(t, FlowRecord):
            if m is None or _order(m) < (t.version, t.origin):
                repairs.append(Repair(RepairKind.ADOPTED, key, t, (t.version, t.origin)))
        elif isinstance(t, Tombstone):
            if isinstance(m, FlowRecord) and (m.version, m.origin) < t.order:
                repairs.append(Repair(RepairKind.DELETED, key, None, t.order))
        elif (
            authority
            and isinstance(m, FlowRecord)
            and m.origin == origin
            and m.version <= their_as_of
        ):
            repairs.append(Repair(RepairKind.REMOVED, key, None, (m.version, m.origin)))
    return repairs


def apply_repairs(
    store: ReplicaStore, repairs: Iterable[Repair], now: float
) -> tuple[list[Change], Counter[str]]:
    """Apply ``repairs`` through the store's rules; the changes made and counts by kind.

    A repair the store refuses (a newer record or tombstone arrived since
    the entries were read, or the store is full) is counted as ``refused``.
    """
    changes: list[Change] = []
    counts = Counter[str]()
    for repair in repairs:
        if repair.kind is RepairKind.ADOPTED:
            assert repair.record is not None
            outcome, change = store.apply(Op.UPDATE, repair.record, now)
            done = outcome is Outcome.APPLIED
        elif repair.kind is RepairKind.DELETED:
            outcome, change = store.bury(repair.key, repair.order, now)
            done = outcome is Outcome.APPLIED
        else:
            change = store.remove_exact(repair.key, repair.order, now)
            done = change is not None
        if change is not None:
            changes.append(change)
        counts[repair.kind.value if done else "refused"] += 1
    return changes, counts


# --- counters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AntiEntropyStats:
    rounds: int  # rounds completed (all origins compared with one peer)
    rounds_failed: int  # rounds cut short (peer unreachable, refused, bad reply)
    rounds_skipped: int  # not started or stopped: the stream not LIVE, or a pull on either side
    origins_compared: int
    buckets_compared: int
    buckets_differing: int  # found different (repaired now or in a later round)
    buckets_repaired: int  # exchanged entry by entry
    buckets_oversized: int  # too many records to exchange in one call: left alone
    repairs: Mapping[str, int]  # by RepairKind value, plus "refused"
    peer_repairs: Mapping[str, int]  # repairs made here for peers' requests, same keys
    resyncs_requested: int  # snapshot pulls asked for (an origin differing in too many buckets)
    last_round_seconds: float | None
    last_failure: str


class AntiEntropyCounters:
    """The mutable counters behind :class:`AntiEntropyStats`."""

    def __init__(self) -> None:
        self.counts = Counter[str]()
        self.repairs = Counter[str]()
        self.peer_repairs = Counter[str]()
        self.last_round_seconds: float | None = None
        self.last_failure = ""

    def statistics(self) -> AntiEntropyStats:
        c = self.counts
        return AntiEntropyStats(
            rounds=c["rounds"],
            rounds_failed=c["rounds_failed"],
            rounds_skipped=c["rounds_skipped"],
            origins_compared=c["origins_compared"],
            buckets_compared=c["buckets_compared"],
            buckets_differing=c["buckets_differing"],
            buckets_repaired=c["buckets_repaired"],
            buckets_oversized=c["buckets_oversized"],
            repairs={k.value: self.repairs[k.value] for k in RepairKind}
            | {"refused": self.repairs["refused"]},
            peer_repairs={k.value: self.peer_repairs[k.value] for k in RepairKind}
            | {"refused": self.peer_repairs["refused"]},
            resyncs_requested=c["resyncs_requested"],
            last_round_seconds=self.last_round_seconds,
            last_failure=self.last_failure,
        )
