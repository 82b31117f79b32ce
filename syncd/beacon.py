"""UDP liveness beacons (BFD-like): wire format, sender and receiver state, pure.

Why: a peer judged alive only by its gRPC stream looks dead whenever one lost
TCP segment stalls the stream for an RTO, or whenever its asyncio loop is
late with a heartbeat.  Like BFD (RFC 5880), each syncd also sends a small,
independent, signed datagram to every peer every few milliseconds; a lost
datagram costs nothing but itself.  This module is the pure part: encoding,
decoding and the per-peer bookkeeping.  ``syncd.beacon_io`` owns the socket,
the clock and the thread.

Wire format (version 2, integers big-endian)::

    offset  size  field
    0       4     magic b"STKB"
    4       1     version = 2
    5       1     flags = 0 (reserved; nonzero is malformed)
    6       4     epoch, u32: the sender's syncd epoch (grows at every start)
    10      8     seq, u64: 1, 2, 3 ... per beacon built in that epoch
    18      8     revoked, u64: the recipient's cluster epoch (its membership
                  incarnation) whose lease the sender has revoked; 0: none
    26      1     n = length of node_id
    27      n     node_id, ASCII (syncd.records.check_node_id)
    27+n    1     c = length of cluster_id
    28+n    c     cluster_id, ASCII (syncd.config.check_cluster_id)
    28+n+c  16    tag = HMAC-SHA256(key, bytes 0 .. 28+n+c)[:16]

A datagram is exactly ``44 + n + c`` bytes: anything shorter, longer or with
trailing bytes is ``malformed``.

Why ``revoked``.  A peer that merely looked dead (its beacons late under
load) is revoked and its VIPs claimed within ~40 ms.  If it is alive it must
stop answering ARP for them first; its etcd watch tells it, but only as fast
as its event loop runs.  The taker's next beacons (every 10 ms, to that peer
alone) carry the revoked incarnation, and the peer's beacon thread closes
its ARP guard the moment one arrives, without waiting for its loop
(``syncd.beacon_io``, ``cluster.arpguard``).  The field is signed like the
rest: nobody without the key can fence a node this way.  With ``key=None`` (insecure test mode) the
tag is 16 zero bytes and a receiver without a key demands exactly that, so a
keyed and an unkeyed node reject each other's beacons (``mac``) instead of
one of them silently accepting forgeries.

Decoding order: magic, then version (it selects the layout, so an unknown
version is reported as ``version`` rather than as a layout error; the worst a
forger gets from that is a different drop counter), then the two lengths,
then the tag, and only after the tag every other field.

Replay protection: per peer, a beacon is accepted only if its
``(epoch, seq)`` is strictly above the last accepted one.  An attacker who
captured a beacon can replay it only before the sender's next one arrives.
"""

from __future__ import annotations

import hmac
import math
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from syncd.config import check_cluster_id
from syncd.errors import ConfigError, Misuse, PeerError
from syncd.records import check_node_id

MAGIC: Final = b"STKB"
VERSION: Final = 2
TAG_SIZE: Final = 16
MAX_EPOCH: Final = (1 << 32) - 1
MAX_SEQ: Final = (1 << 64) - 1

# magic, version, flags, epoch, seq: the fixed part before the strings.
_FIXED: Final = struct.Struct(">4sBBIQQ")
_OVERHEAD: Final = _FIXED.size + 1 + 1 + TAG_SIZE  # 44: everything but the two strings
MIN_SIZE: Final = _OVERHEAD + 2  # both ids have at least one character
MAX_SIZE: Final = _OVERHEAD + 255 + 255  # the u8 lengths allow this much (554 bytes)
_ZERO_TAG: Final = bytes(TAG_SIZE)

DECODE_REASONS: Final = ("malformed", "version", "mac")
DROP_REASONS: Final = (*DECODE_REASONS, "cluster", "unknown_peer", "replay")


class BeaconError(PeerError):
    """A datagram is not a beacon we accept; ``reason`` is one of DECODE_REASONS."""


@dataclass(frozen=True, slots=True)
class Beacon:
    cluster_id: str  # the sender's cluster; receivers of another cluster drop it
    node_id: str  # the sender
    epoch: int  # the sender's syncd epoch, 0..2**32-1
    seq: int  # 1..2**64-1, +1 per beacon the sender built in this epoch
    revoked: int = 0  # the recipient's cluster epoch the sender revoked; 0: none

    def __post_init__(self) -> None:
        problem = _beacon_problem(self.cluster_id, self.node_id, self.epoch, self.seq, self.revoked)
        if problem:
            raise Misuse(f"bad beacon: {problem}")


def _beacon_problem(cluster_id: str, node_id: str, epoch: int, seq: int, revoked: int) -> str:
    """Why these fields cannot form a beacon, or "" if they can."""
    if not check_cluster_id(cluster_id):
        return f"cluster id {cluster_id!r}"
    if not check_node_id(node_id):
        return f"node id {node_id!r}"
    if not 0 <= epoch <= MAX_EPOCH:
        return f"epoch {epoch} outside 0..2**32-1"
    if not 1 <= seq <= MAX_SEQ:
        return f"seq {seq} outside 1..2**64-1"
    if not 0 <= revoked <= MAX_SEQ:
        return f"revoked {revoked} outside 0..2**64-1"
    return ""


def _tag(body: bytes, key: bytes | None) -> bytes:
    if key is None:
        return _ZERO_TAG
    if not key:
        # hmac accepts an empty key; a node configured with one has no secret.
        raise Misuse("beacon key must be None (insecure) or non-empty bytes")
    return hmac.digest(key, body, "sha256")[:TAG_SIZE]


def encode_beacon(b: Beacon, key: bytes | None) -> bytes:
    """The datagram for ``b``, signed with ``key`` (None: zero tag, tests only)."""
    node = b.node_id.encode("ascii")
    cluster = b.cluster_id.encode("ascii")
    body = b"".join(
        (
            _FIXED.pack(MAGIC, VERSION, 0, b.epoch, b.seq, b.revoked),
            bytes((len(node),)),
            node,
            bytes((len(cluster),)),
            cluster,
        )
    )
    return body + _tag(body, key)


def decode_beacon(data: bytes, key: bytes | None) -> Beacon:
    """The beacon in ``data`` if its tag matches ``key``; else BeaconError(reason)."""
    if not MIN_SIZE <= len(data) <= MAX_SIZE or data[:4] != MAGIC:
        raise BeaconError("malformed", f"{len(data)} bytes")
    if data[4] != VERSION:
        raise BeaconError("version", f"version {data[4]}")
    node_end = _FIXED.size + 1 + data[_FIXED.size]
    # The node id's length byte may point at or past the end: then there is no room left.
    if node_end >= len(data):
        raise BeaconError("malformed", "node id overruns the datagram")
    cluster_end = node_end + 1 + data[node_end]
    if cluster_end + TAG_SIZE != len(data):
        raise BeaconError("malformed", f"{len(data)} bytes, lengths say {cluster_end + TAG_SIZE}")
    body = data[:cluster_end]
    if not hmac.compare_digest(data[cluster_end:], _tag(body, key)):
        raise BeaconError("mac")
    # Authentic (or unkeyed) from here on: the other fields may be read.
    _, _, flags, epoch, seq, revoked = _FIXED.unpack_from(data)
    if flags != 0:
        raise BeaconError("malformed", f"flags {flags:#x}")
    try:
        node_id = data[_FIXED.size + 1 : node_end].decode("ascii")
        cluster_id = data[node_end + 1 : cluster_end].decode("ascii")
    except UnicodeDecodeError:
        raise BeaconError("malformed", "ids are not ASCII") from None
    problem = _beacon_problem(cluster_id, node_id, epoch, seq, revoked)
    if problem:
        raise BeaconError("malformed", problem)
    return Beacon(cluster_id, node_id, epoch, seq, revoked)


def _check_identity(cluster_id: str, node_id: str) -> None:
    if not check_cluster_id(cluster_id):
        raise ConfigError(f"beacons: bad cluster id {cluster_id!r}")
    if not check_node_id(node_id):
        raise ConfigError(f"beacons: bad node id {node_id!r}")


# --- sender ------------------------------------------------------------------------------


class BeaconSender:
    """Builds this node's beacons: one seq per round, sent to every peer.

    The payload is the same for every peer except one with a revocation
    notice (``revoked``): that peer's copy carries its revoked epoch.
    """

    def __init__(self, cluster_id: str, node_id: str, epoch: int, key: bytes | None) -> None:
        _check_identity(cluster_id, node_id)
        if not 0 <= epoch <= MAX_EPOCH:
            raise ConfigError(f"beacons: epoch {epoch} outside 0..2**32-1")
        if key is not None and not key:
            raise ConfigError("beacons: key must be None (insecure) or non-empty")
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.epoch = epoch
        self._key = key
        self._seq = 0

    @property
    def seq(self) -> int:
        """The seq of the last beacon built (0 before the first)."""
        return self._seq

    def next(self) -> bytes:
        """Start a round: the payload for peers without a notice."""
        # 2**64 beacons at 100/s is 5.8e9 years: overflow is not a practical concern,
        # but Beacon refuses it rather than wrapping into a replay.
        self._seq += 1
        return self.notice(0)

    def notice(self, revoked: int) -> bytes:
        """This round's payload for a peer whose cluster epoch ``revoked`` we revoked."""
        if self._seq == 0:
            raise Misuse("BeaconSender.notice before next()")
        beacon = Beacon(self.cluster_id, self.node_id, self.epoch, self._seq, revoked)
        return encode_beacon(beacon, self._key)


def next_round(scheduled: float, now: float, interval: float) -> float:
    """When the round after the one due at ``scheduled`` is due, given it ran at ``now``.

    Rounds stay on the grid ``scheduled + k * interval`` (no drift from the time
    each round took); a round late by more than an interval skips the missed
    slots instead of sending them in a burst: the result is always > ``now``.
    """
    following = scheduled + interval
    if following > now:
        return following
    following = scheduled + (math.floor((now - scheduled) / interval) + 1) * interval
    return following if following > now else following + interval  # float rounding


# --- receiver ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerBeaconStats:
    received: int  # beacons accepted from this peer
    lost: int  # seq gaps within one epoch (5 then 9: 3 lost); not counted across epochs
    last_heard: float | None  # `now` of the last accepted beacon; None: never heard
    epoch: int | None  # the peer's epoch in the last accepted beacon
    revoked: int  # our cluster epoch the peer says it revoked, last beacon; 0: none
    loss: float = 0.0  # recent loss estimate, 0..1 (BeaconTracker.loss)


@dataclass(frozen=True, slots=True)
class BeaconStats:
    peers: Mapping[str, PeerBeaconStats]  # every current peer, heard or not
    dropped: Mapping[str, int]  # datagrams refused, by reason (every DROP_REASONS key)


# Loss estimators, per peer: exponentially weighted averages over the
# beacons a peer sent (1 = lost, 0 = arrived), one quick to follow a burst
# of losses, one steady.  Their maximum is what the cluster agent stretches
# its suspicion window by (cluster.liveness): biased up on purpose, a
# longer wait on a lossy link is cheap, a live peer revoked is not.
LOSS_ALPHA_FAST: Final = 0.2  # about 5 beacons of memory (50 ms at 10 ms)
LOSS_ALPHA_SLOW: Final = 0.02  # about 50 beacons (0.5 s)


def _ewma_after(estimate: float, alpha: float, lost: int) -> float:
    """``estimate`` after ``lost`` lost beacons and then one that arrived."""
    estimate = 1.0 - (1.0 - estimate) * (1.0 - alpha) ** lost
    return estimate * (1.0 - alpha)


@dataclass(slots=True)
class _PeerState:
    received: int = 0
    lost: int = 0
    last_heard: float | None = None
    epoch: int | None = None
    seq: int = 0  # last accepted seq in `epoch`
    revoked: int = 0  # `revoked` of the last accepted beacon
    loss_fast: float = 0.0
    loss_slow: float = 0.0

    @property
    def loss(self) -> float:
        return max(self.loss_fast, self.loss_slow)


class BeaconTracker:
    """When each peer's beacon last arrived.  Single-threaded: callers lock around it."""

    def __init__(self, cluster_id: str, node_id: str) -> None:
        _check_identity(cluster_id, node_id)
        self.cluster_id = cluster_id
        self.node_id = node_id
        self._peers: dict[str, _PeerState] = {}
        self._dropped = Counter[str]()

    def set_peers(self, peers: Iterable[str]) -> None:
        """Track exactly ``peers`` (our own id is ignored): keep retained, forget removed."""
        wanted = set(peers) - {self.node_id}
        self._peers = {p: self._peers.get(p) or _PeerState() for p in sorted(wanted)}

    def receive(self, data: bytes, key: bytes | None, now: float) -> str | None:
        """The peer whose beacon ``data`` is accepted at ``now``; None if dropped (counted)."""
        try:
            beacon = decode_beacon(data, key)
        except BeaconError as e:
            self._dropped[e.reason] += 1
            return None
        reason = self._refusal(beacon)
        if reason:
            self._dropped[reason] += 1
            return None
        self._accept(self._peers[beacon.node_id], beacon, now)
        return beacon.node_id

    def _refusal(self, beacon: Beacon) -> str:
        if beacon.cluster_id != self.cluster_id:
            return "cluster"
        state = self._peers.get(beacon.node_id)  # never holds our own id
        if state is None:
            return "unknown_peer"
        if state.epoch is not None and (beacon.epoch, beacon.seq) <= (state.epoch, state.seq):
            return "replay"
        return ""

    @staticmethod
    def _accept(state: _PeerState, beacon: Beacon, now: float) -> None:
        gap = 0
        if beacon.epoch == state.epoch:
            gap = beacon.seq - state.seq - 1
            state.lost += gap
        # else: first beacon heard of this epoch.  Its seq says nothing about loss:
        # we may have started (or added the peer) long after the peer did.
        state.loss_fast = _ewma_after(state.loss_fast, LOSS_ALPHA_FAST, gap)
        state.loss_slow = _ewma_after(state.loss_slow, LOSS_ALPHA_SLOW, gap)
        state.epoch = beacon.epoch
        state.seq = beacon.seq
        state.received += 1
        state.last_heard = now
        state.revoked = beacon.revoked

    def heard(self) -> dict[str, float]:
        """Peer -> ``now`` of its last accepted beacon, for peers heard at least once."""
        return {p: s.last_heard for p, s in self._peers.items() if s.last_heard is not None}

    def loss(self) -> dict[str, float]:
        """Peer -> recent beacon loss estimate (0..1), for peers heard at least once.

        Updated only when a beacon arrives: a peer that falls silent keeps
        the estimate of its link before the silence (a dead peer is judged
        by how its link behaved, not by its silence).
        """
        return {p: s.loss for p, s in self._peers.items() if s.last_heard is not None}

    def revoked_by(self, peer: str) -> int:
        """Our cluster epoch that ``peer``'s last accepted beacon says it revoked (0: none)."""
        state = self._peers.get(peer)
        return state.revoked if state is not None else 0

    def statistics(self) -> BeaconStats:
        return BeaconStats(
            peers={
                p: PeerBeaconStats(s.received, s.lost, s.last_heard, s.epoch, s.revoked, s.loss)
                for p, s in self._peers.items()
            },
            dropped={r: self._dropped[r] for r in DROP_REASONS},
        )
