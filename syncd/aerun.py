"""Anti-entropy on asyncio and gRPC: the rounds and the two RPCs (adapter).

The decisions are :mod:`syncd.antientropy`'s; this module moves the values:

* :class:`AntiEntropy.run` starts a round with each peer every
  ``interval * (1 +- jitter)`` seconds.  Of two nodes only the one that
  dials the Exchange stream (the lower id) starts rounds: one round repairs
  both sides.  A round with a peer needs its stream LIVE (the digest of a
  peer that is still catching up would differ everywhere).
* A round: ``Digest`` for every origin either side may hold; for each origin
  whose buckets differ, ``Repair`` with our entries of (at most
  ``max_repair_buckets`` of) those buckets, in calls of at most
  :data:`syncd.antientropy.MAX_ENTRIES` entries; then repair from the
  reply.  When the peer's own origin differs in more buckets than that, a
  snapshot pull is cheaper and certain: the round asks the stream for one.
  Origins with a pull in progress are skipped.
* :meth:`AntiEntropy.serve_digest` / :meth:`AntiEntropy.serve_repair` answer
  a peer's round (called by :class:`syncd.service.StateSyncService`).

Hashing a large store takes a while (about 1 us per record); it runs in
slices of ``slice`` records with a yield to the event loop between them, over
a list of the records taken first (the store may change meanwhile; a change
in between makes a bucket look different, which costs an exchange, never a
wrong repair: see the ``as_of`` rule in :mod:`syncd.antientropy`).

Errors: a peer's malformed message raises :class:`BadMessage` (the round
stops, counted in ``rounds_failed``; the server answers INVALID_ARGUMENT);
gRPC errors end the round with the status in ``last_failure``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

import grpc

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd._pb.stockade.sync.v1 import sync_pb2_grpc as rpc
from syncd.antientropy import (
    CALL_ENTRIES,
    MAX_BUCKETS,
    MAX_ENTRIES,
    MAX_ORIGINS,
    AntiEntropyConfig,
    AntiEntropyCounters,
    AntiEntropyStats,
    Entry,
    Tombstone,
    apply_repairs,
    bucket_of,
    differing,
    digest,
    entries_in,
    plan_repairs,
)
from syncd.errors import BadMessage
from syncd.peers import PeerLink
from syncd.records import MAX_KEY_LEN, MAX_U63, check_node_id, record_from_pb, record_wire
from syncd.replica import Change, ReplicaStore
from syncd.session import State

log = logging.getLogger("syncd.aerun")

CALL_TIMEOUT: Final = 10.0  # seconds for one Digest or Repair call
ChangeSink = Callable[[tuple[Change, ...]], None]


# --- wire form --------------------------------------------------------------------------


def entries_to_pb(entries: Mapping[bytes, Entry]) -> list[pb.Entry]:
    out = []
    for key, entry in entries.items():
        if isinstance(entry, Tombstone):
            version, origin = entry.order
            out.append(pb.Entry(key=key, tomb_version=version, tomb_origin=origin))
        else:
            out.append(pb.Entry(key=key, record=pb.FlowRecord.FromString(record_wire(entry))))
    return out


def entries_from_pb(
    entries: Sequence[pb.Entry], origin: str, buckets: int, wanted: Iterable[int]
) -> dict[bytes, Entry]:
    """Validate a peer's entries of ``origin`` in the ``wanted`` buckets; BadMessage if bad."""
    if len(entries) > MAX_ENTRIES:
        raise BadMessage("bad-repair", f"{len(entries)} entries, limit {MAX_ENTRIES}")
    want = set(wanted)
    out: dict[bytes, Entry] = {}
    for msg in entries:
        key = bytes(msg.key)
        if not 1 <= len(key) <= MAX_KEY_LEN or key in out:
            raise BadMessage("bad-repair", "entry key empty, too long or repeated")
        if msg.HasField("record"):
            record = record_from_pb(msg.record)
            if record.key != key or record.origin != origin:
                raise BadMessage("bad-repair", "record does not match its entry's key or origin")
            out[key] = record
        else:
            if msg.tomb_origin != origin or not 1 <= msg.tomb_version <= MAX_U63:
                raise BadMessage("bad-repair", "tombstone of another origin or version")
            out[key] = Tombstone(key, (msg.tomb_version, origin))
        if bucket_of(key, buckets) not in want:
            raise BadMessage("bad-repair", "entry outside the buckets asked for")
    return out


def check_digest_request(request: pb.DigestRequest) -> None:
    if not 1 <= request.buckets <= MAX_BUCKETS or len(request.origins) > MAX_ORIGINS:
        raise BadMessage("bad-digest", f"buckets 1..{MAX_BUCKETS}, origins <= {MAX_ORIGINS}")
    if not all(check_node_id(o) for o in request.origins):
        raise BadMessage("bad-digest", "origins must be node ids")


def check_repair_request(request: pb.RepairRequest) -> None:
    buckets = request.buckets
    if not 1 <= buckets <= MAX_BUCKETS or not check_node_id(request.origin):
        raise BadMessage("bad-repair", f"buckets 1..{MAX_BUCKETS} and an origin node id")
    ids = list(request.bucket_ids)
    if not ids or len(ids) > buckets or len(set(ids)) != len(ids) or max(ids) >= buckets:
        raise BadMessage("bad-repair", "bucket ids empty, repeated or out of range")
    if request.as_of_version > MAX_U63:
        raise BadMessage("bad-repair", "as_of_version out of range")


# --- the node side -----------------------------------------------------------------------


class _Abandoned(Exception):
    """A round stopped half-way: its stream is no longer LIVE or a pull began (skipped)."""


class AntiEntropy:
    """Rounds with peers and answers to theirs; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        store: ReplicaStore,
        clock_version: Callable[[], int],
        links: Mapping[str, PeerLink],
        channels: Mapping[str, grpc.aio.Channel],
        on_changes: ChangeSink,
        config: AntiEntropyConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config or AntiEntropyConfig()
        self._store = store
        self._clock_version = clock_version  # our version clock's last value
        self._links = links
        self._channels = channels
        self._on_changes = on_changes
        self._rng = rng or random.Random(node_id)  # jitter and bucket choice only
        self.counters = AntiEntropyCounters()
        # origin -> (buckets, loop time computed, digest): reused for
        # interval / 2 by our rounds and by answers to peers' rounds.
        self._digests: dict[str, tuple[int, float, list[int]]] = {}

    def busy(self) -> bool:
        """A snapshot pull runs here: digests would differ everywhere, wait."""
        return any(link.inbox.pulling for link in self._links.values())

    def statistics(self) -> AntiEntropyStats:
        return self.counters.statistics()

    # --- schedule ------------------------------------------------------------------

    async def run(self) -> None:
        """Rounds with every peer we dial, every interval (jittered), until cancelled."""
        cfg = self.config
        if cfg.interval <= 0:
            return
        while True:
            await asyncio.sleep(cfg.interval * (1 + cfg.jitter * (2 * self._rng.random() - 1)))
            for peer in sorted(self._links):
                if peer > self.node_id:  # the lower id dials, and runs the rounds
                    await self.round(peer)

    # --- one round (requester) -------------------------------------------------------------

    async def round(self, peer: str) -> bool:
        """One round with ``peer``; False if it was skipped or failed (counted)."""
        link, channel = self._links.get(peer), self._channels.get(peer)
        if (
            link is None
            or channel is None
            or link.state is not State.LIVE
            or link.outbox.needs_snapshot  # the peer must pull us first
            or self.busy()
        ):
            self.counters.counts["rounds_skipped"] += 1
            return False
        started = time.monotonic()
        stub = rpc.StateSyncStub(channel)  # type: ignore[no-untyped-call]
        try:
            await self._round(peer, link, stub)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNAVAILABLE and "syncing" in (e.details() or ""):
                self.counters.counts["rounds_skipped"] += 1  # the peer is pulling a snapshot
                return False
            return self._failed(peer, f"{e.code().name}: {e.details()}")
        except BadMessage as e:
            return self._failed(peer, str(e))
        except _Abandoned:
            self.counters.counts["rounds_skipped"] += 1
            return False
        self.counters.counts["rounds"] += 1
        self.counters.last_round_seconds = time.monotonic() - started
        return True

    def _failed(self, peer: str, why: str) -> bool:
        self.counters.counts["rounds_failed"] += 1
        self.counters.last_failure = f"{peer}: {why}"
        log.info("anti-entropy round with %s failed: %s", peer, why)
        return False

    async def _round(self, peer: str, link: PeerLink, stub: rpc.StateSyncStub) -> None:
        cfg = self.config
        origins = sorted(set(self._store.origins()) | {self.node_id, peer})
        request = pb.DigestRequest(buckets=cfg.buckets, origins=origins)
        reply = await stub.Digest(request, timeout=CALL_TIMEOUT)
        theirs = self._their_digests(reply, origins)
        for origin in origins:
            if origin == peer and link.inbox.pulling:
                continue  # a snapshot of it is on its way
            mine = await self._digest(origin)
            diff = differing(mine, theirs.get(origin, [0] * cfg.buckets))
            counts = self.counters.counts
            counts["origins_compared"] += 1
            counts["buckets_compared"] += cfg.buckets
            counts["buckets_differing"] += len(diff)
            if not diff:
                continue
            if origin == peer and len(diff) > cfg.max_repair_buckets:
                if link.request_resync():
                    counts["resyncs_requested"] += 1
                continue
            chosen = sorted(self._rng.sample(diff, min(len(diff), cfg.max_repair_buckets)))
            await self._repair(peer, origin, chosen, stub)

    def _their_digests(self, reply: pb.DigestReply, asked: list[str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for entry in reply.origins:
            if entry.origin not in asked or entry.origin in out:
                raise BadMessage(
                    "bad-digest", f"origin {entry.origin[:40]!r} not asked or repeated"
                )
            if len(entry.hashes) != self.config.buckets:
                raise BadMessage("bad-digest", f"{len(entry.hashes)} hashes")
            out[entry.origin] = list(entry.hashes)
        return out

    async def _repair(
        self, peer: str, origin: str, chosen: list[int], stub: rpc.StateSyncStub
    ) -> None:
        link = self._links.get(peer)
        for group in await self._groups(origin, chosen):
            if link is None or link.state is not State.LIVE or self.busy():
                # The stream broke or a pull began since the digests were
                # compared (e.g. the peer restarted): they are stale.
                raise _Abandoned
            as_of = self._clock_version()
            mine = await self._entries(origin, group)
            request = pb.RepairRequest(
                origin=origin, buckets=self.config.buckets, bucket_ids=group,
                entries=entries_to_pb(mine), as_of_version=as_of, node_id=self.node_id,
            )  # fmt: skip
            reply = await stub.Repair(request, timeout=CALL_TIMEOUT)
            if reply.as_of_version > MAX_U63:
                raise BadMessage("bad-repair", "as_of_version out of range")
            theirs = entries_from_pb(reply.entries, origin, self.config.buckets, group)
            mine = await self._entries(origin, group)  # as held now, after any deltas
            repairs = plan_repairs(self.node_id, peer, origin, mine, theirs, reply.as_of_version)
            changes, counts = apply_repairs(self._store, repairs, time.monotonic())
            self.counters.repairs.update(counts)
            self.counters.counts["buckets_repaired"] += len(group)
            if changes:
                self._on_changes(tuple(changes))

    async def _groups(self, origin: str, chosen: list[int]) -> list[list[int]]:
        """``chosen`` split so that no call carries more than MAX_ENTRIES of our entries."""
        sizes = dict.fromkeys(chosen, 0)
        buckets = self.config.buckets
        for records in self._store.record_slices(origin, self.config.slice):
            for record in records:
                b = bucket_of(record.key, buckets)
                if b in sizes:
                    sizes[b] += 1
            await asyncio.sleep(0)
        groups: list[list[int]] = []
        total = 0
        for b in chosen:
            if sizes[b] > MAX_ENTRIES // 2:  # room left for tombstones and growth
                self.counters.counts["buckets_oversized"] += 1
                continue
            if not groups or total + sizes[b] > CALL_ENTRIES:  # (a first bucket may be empty)
                groups.append([])
                total = 0
            groups[-1].append(b)
            total += sizes[b]
        return groups

    # --- answering a peer's round (responder) --------------------------------------------

    async def serve_digest(self, request: pb.DigestRequest) -> pb.DigestReply | None:
        """Our digests of the origins asked for; None while :meth:`busy`.

        BadMessage if the request is malformed.
        """
        check_digest_request(request)
        if self.busy():
            return None
        reply = pb.DigestReply()
        held = set(self._store.origins())
        for origin in request.origins:
            if origin in held:
                hashes = await self._digest(origin, request.buckets)
                count = self._store.count(origin)
                reply.origins.append(pb.OriginDigest(origin=origin, count=count, hashes=hashes))
        return reply

    async def serve_repair(self, request: pb.RepairRequest, peer: str) -> pb.RepairReply | None:
        """Repair from ``peer``'s entries, answer with ours (read after the repair).

        None while :meth:`busy`, as for a digest: a round that began before
        this node started a pull (a restart: its store is being filled)
        would otherwise go on comparing a half-filled store, and walk the
        whole store of the origin for every call, in the middle of the pull.
        BadMessage if the request is malformed.
        """
        check_repair_request(request)
        if self.busy():
            return None
        origin, buckets, group = request.origin, request.buckets, list(request.bucket_ids)
        theirs = entries_from_pb(request.entries, origin, buckets, group)
        mine = await self._entries(origin, group, buckets)
        repairs = plan_repairs(self.node_id, peer, origin, mine, theirs, request.as_of_version)
        changes, counts = apply_repairs(self._store, repairs, time.monotonic())
        self.counters.peer_repairs.update(counts)
        if changes:
            self._on_changes(tuple(changes))
        as_of = self._clock_version()
        after = await self._entries(origin, group, buckets)
        return pb.RepairReply(entries=entries_to_pb(after), as_of_version=as_of)

    # --- chunked reads of the store -----------------------------------------------------

    async def _digest(self, origin: str, buckets: int | None = None) -> list[int]:
        size = buckets or self.config.buckets
        now = asyncio.get_running_loop().time()
        cached = self._digests.get(origin)
        if cached is not None and cached[0] == size and now - cached[1] < self.config.digest_age:
            return cached[2]
        out = await self._compute_digest(origin, size)
        self._digests[origin] = (size, now, out)
        return out

    async def _compute_digest(self, origin: str, size: int) -> list[int]:
        # Slices read as they are reached (ReplicaStore.record_slices): a
        # list of every record first stalled the loop 0.5-1 s at 1M records.
        out = [0] * size
        for records in self._store.record_slices(origin, self.config.slice):
            digest(records, size, out)
            await asyncio.sleep(0)
        return out

    async def _entries(
        self, origin: str, group: list[int], buckets: int | None = None
    ) -> dict[bytes, Entry]:
        size = buckets or self.config.buckets
        out: dict[bytes, Entry] = {}
        for records in self._store.record_slices(origin, self.config.slice):
            out.update(entries_in(records, (), origin, size, group))
            await asyncio.sleep(0)
        # After the records: one deleted during the walk is still seen, as a
        # tombstone (a live record read earlier wins, as it did in one copy).
        tombs = [t for t in self._store.tombstones() if t[1][1] == origin]
        for key, entry in entries_in((), tombs, origin, size, group).items():
            out.setdefault(key, entry)
        return out
