"""Replicas: flows the table holds on behalf of another node (their *origin*).

The sync daemon hands the filter other nodes' flows so that a packet of a
flow created elsewhere (a failover, or the reply direction under asymmetric
routing) finds its entry.  :meth:`node.flow.table.FlowTable.install` and
:meth:`~node.flow.table.FlowTable.remove_replica` apply such records; this
module holds what they need besides the table's columns.  The rules, and
why:

* **Ordering.**  Every flow carries ``(version, origin)``; versions come
  from a Lamport clock per node (``syncd.records.VersionClock``), origin
  names only break ties.  A record at or below what the table holds for its
  key is ignored (``stale`` / ``duplicate``, counted), so applying is
  idempotent and order-safe.  This node's own flows get their versions from
  the sync link (:meth:`FlowTable.stamp`) as their events leave the node.
* **Tombstones.**  A DELETE (from a peer, or of one of this node's own flows)
  leaves a :class:`Tombstones` entry for ``tombstone_ttl`` seconds; an
  install at or below it is refused (``blocked``), so a late create cannot
  resurrect a deleted flow.  Bounded: the oldest goes first, counted.
* **No idle expiry.**  A replica's deadline is ``inf``: it never expires on
  this node's timer, even when local packets touch it.  Its origin's DELETE
  removes it, and syncd's orphan handling covers an origin that is gone
  (nothing grows without bound).
* **Local traffic.**  A replica is tracked like any flow and passes packets
  (ESTABLISHED both ways once a reply was seen: the asymmetric-routing case).
  TCP is tracked *liberally* (we never saw its windows: as Linux does for a
  flow picked up mid-stream) until live packets teach the windows.  When
  local traffic *changes* a replica's state (or assures it), this node takes
  the flow over: it becomes an own flow with an ordinary deadline and the
  change is a normal ``FlowStateChanged``, which the sync link sends with
  this node as origin and a version above every one seen, so the cluster
  keeps the newest state.  Packets that change nothing leave it a replica.
* **No echo.**  Installing emits no event.  Any removal of a replica, and a
  removal by a peer's DELETE, is a :class:`ReplicaDeleted` (a
  ``FlowDeleted`` subclass, so adapters that clear kernel state still see
  it) that the sync link never sends: it is not this node's news.
* **Reconciliation.**  After a reconnect or lost changes, the sync link
  compares the table with syncd's copy: ``begin_sweep`` marks every flow,
  syncd's records confirm them, ``end_sweep`` removes the replicas syncd no
  longer holds (their DELETE was lost: a replica never expires by itself,
  so this is what bounds them) and names the own flows syncd lacks.
* **Capacity.**  Replicas count against capacity.  Assured replicas are
  assured flows and are never early-dropped; a non-assured one (a handshake
  in progress elsewhere) is as evictable as a local one, so a SYN flood
  replicated from a peer cannot lock this node's own flows out.  An install
  at capacity evicts like ``admit`` does (the eviction of an own flow is an
  ordinary ``FlowDeleted``), or is refused (``full``) when all are assured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple, Protocol

from node.errors import BadInput, Misuse
from node.flow.events import FlowDeleted
from node.flow.key import FlowKey
from node.flow.tcp import TcpState
from node.packet import ICMP, ICMPV6, TCP, UDP

__all__ = [
    "MAX_ORIGINS",
    "MAX_VERSION",
    "ApplyOutcome",
    "CheckedRecord",
    "FlowOrigin",
    "Order",
    "Origins",
    "RecordLike",
    "ReplicaDeleted",
    "Tombstones",
    "check_record",
]

MAX_ORIGINS: Final = 0xFFFF  # origin indexes are 16-bit; index 0 is this node
MAX_VERSION: Final = (1 << 63) - 1  # as syncd.records.MAX_U63

_TCP_STATES: Final = {s.name: int(s) for s in TcpState if s is not TcpState.NONE}
_QUERY_STATES: Final = ("UNREPLIED", "ASSURED")  # UDP and ICMP echo-like flows
_GENERIC_STATES: Final = ("UNREPLIED", "REPLIED")  # any other protocol


class RecordLike(Protocol):
    """What the table reads from a record (``syncd.records.FlowRecord`` fits)."""

    @property
    def key(self) -> bytes: ...  # FlowKey wire form
    @property
    def proto(self) -> int: ...
    @property
    def family(self) -> int: ...
    @property
    def orig_src(self) -> int: ...  # original direction, as integers
    @property
    def orig_sport(self) -> int: ...
    @property
    def orig_dst(self) -> int: ...
    @property
    def orig_dport(self) -> int: ...
    @property
    def state(self) -> str: ...  # FlowSnapshot.state form
    @property
    def assured(self) -> bool: ...
    @property
    def timeout(self) -> float: ...  # seconds left at the origin
    @property
    def origin(self) -> str: ...  # owner's node id
    @property
    def version(self) -> int: ...  # >= 1


class ApplyOutcome(StrEnum):
    """What applying one record did to the table."""

    INSTALLED = "installed"  # a new flow entered the table
    UPDATED = "updated"  # a held flow took the record's state
    REMOVED = "removed"  # a DELETE removed the held flow (and left a tombstone)
    TOMBSTONED = "tombstoned"  # a DELETE of a key not held: remembered only
    DUPLICATE = "duplicate"  # the same (version, origin) is held already
    STALE = "stale"  # below the held (version, origin): ignored
    BLOCKED = "blocked"  # at or below a tombstone: a late create cannot resurrect
    FULL = "full"  # a new key while every held flow is assured: refused


@dataclass(frozen=True, slots=True)
class ReplicaDeleted(FlowDeleted):
    """A deletion this node must not replicate.

    The flow was a replica (evicted, flushed, deleted by an operator or by
    its origin), or a peer's DELETE removed one of this node's flows.
    """


@dataclass(frozen=True, slots=True)
class FlowOrigin:
    origin: str  # node id of the flow's owner ("" for this node before set_local_origin)
    version: int  # version of the flow's latest record (0: not stamped yet)
    replica: bool  # held for another node (not this node's own flow)


class CheckedRecord(NamedTuple):
    """A record's values in the table's terms, after validation."""

    key: bytes  # plain bytes, canonical FlowKey form
    orig_is_a: bool  # the original direction is key endpoint A -> B
    tcp_state: int  # TcpState value (0 for non-TCP)
    seen_reply: bool  # a reply-direction packet was seen at the origin
    assured: bool


def check_record(record: RecordLike) -> CheckedRecord:
    """Validate ``record`` against the flow-key rules; BadInput if it breaks them.

    The sync daemon validated field ranges already; this checks what only
    the filter knows: the key is canonical and agrees with the family,
    protocol and original tuple, and the state name exists for the protocol.
    """
    version, timeout, origin = record.version, record.timeout, record.origin
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise BadInput(f"record: version {version!r} not in 1..2**63-1")
    if not isinstance(timeout, int | float) or not 0 <= timeout < math.inf:
        raise BadInput(f"record: timeout {timeout!r} is not a finite number >= 0")
    if not isinstance(origin, str) or not origin:
        raise BadInput(f"record: origin {origin!r} is not a node id")
    key = FlowKey.from_bytes(record.key)
    family, proto, a_addr, a_port, b_addr, b_port = key.fields()
    if (family, proto) != (record.family, record.proto):
        raise BadInput(f"record: key is family {family} proto {proto}, record says otherwise")
    src = (record.orig_src, record.orig_sport)
    dst = (record.orig_dst, record.orig_dport)
    a, b = (a_addr, a_port), (b_addr, b_port)
    if (src, dst) == (a, b):
        orig_is_a = True
    elif (src, dst) == (b, a):
        orig_is_a = False
    else:
        raise BadInput("record: original tuple does not match the key")
    state = record.state
    assured = bool(record.assured)
    if proto == TCP:
        tcp_state = _TCP_STATES.get(state)
        if tcp_state is None:
            raise BadInput(f"record: {state!r} is not a TCP state")
        # Only a SYN has been seen in SYN_SENT; every later state needs a reply.
        return CheckedRecord(bytes(key), orig_is_a, tcp_state, state != "SYN_SENT", assured)
    allowed = _QUERY_STATES if proto in (UDP, ICMP, ICMPV6) else _GENERIC_STATES
    if state not in allowed:
        raise BadInput(f"record: {state!r} is not a state of protocol {proto}")
    return CheckedRecord(bytes(key), orig_is_a, 0, state != "UNREPLIED", assured)


class Origins:
    """Origin names as small integers, so a flow stores 2 bytes, not a string.

    Index 0 is this node (named by :meth:`set_local`).  Names are never
    forgotten: a cluster has few nodes, and the bound stops a broken peer.
    """

    def __init__(self) -> None:
        self._names: list[str] = [""]
        self._ids: dict[str, int] = {}

    @property
    def local(self) -> str:
        return self._names[0]

    def set_local(self, name: str) -> None:
        """Name this node; Misuse when it was named differently or is known as a peer."""
        if not name or (self._names[0] and self._names[0] != name) or name in self._ids:
            raise Misuse(f"local origin {name!r}: already {self._names[0]!r} or a peer")
        self._names[0] = name

    def id_of(self, name: str) -> int:
        """The index of ``name`` (0 for this node); BadInput when too many origins."""
        if name == self._names[0]:
            return 0
        origin_id = self._ids.get(name)
        if origin_id is None:
            if len(self._names) > MAX_ORIGINS:
                raise BadInput(f"more than {MAX_ORIGINS} flow origins")
            origin_id = self._ids[name] = len(self._names)
            self._names.append(name)
        return origin_id

    def name(self, origin_id: int) -> str:
        return self._names[origin_id]


Order = tuple[int, str]  # (version, origin): higher wins


class Tombstones:
    """Deleted keys with the deleting order, for ``ttl`` seconds; at most ``capacity``.

    A dict keeps insertion order, and every entry lives ``ttl``: the oldest
    entries are the first to expire and the first to be dropped when full.
    """

    def __init__(self, capacity: int, ttl: float) -> None:
        self._capacity = capacity
        self._ttl = ttl
        self._held: dict[bytes, tuple[Order, float]] = {}  # key -> (order, expires at)
        self.dropped = 0  # entries dropped early because the set was full

    def __len__(self) -> int:
        return len(self._held)

    def add(self, key: bytes, order: Order, now: float) -> bool:
        """Remember that ``key`` was deleted at ``order``; False if a higher one is held."""
        self.purge(now)
        held = self._held.get(key)
        if held is not None and held[0] >= order:
            return False
        if held is not None:
            del self._held[key]  # re-inserted last: the dict stays in expiry order
        self._held[key] = (order, now + self._ttl)
        if len(self._held) > self._capacity:
            del self._held[next(iter(self._held))]
            self.dropped += 1
        return True

    def blocks(self, key: bytes, order: Order, now: float) -> bool:
        """Whether a record at ``order`` must be refused for ``key``."""
        held = self._held.get(key)
        if held is None:
            return False
        if held[1] <= now:
            del self._held[key]
            return False
        return order <= held[0]

    def order(self, key: bytes, now: float) -> Order | None:
        """The order ``key`` was deleted at, while its tombstone lives."""
        held = self._held.get(key)
        return held[0] if held is not None and held[1] > now else None

    def discard(self, key: bytes) -> None:
        self._held.pop(key, None)

    def purge(self, now: float) -> None:
        """Forget expired entries (oldest first; stops at the first live one)."""
        held = self._held
        while held:
            first = next(iter(held))
            if held[first][1] > now:
                break
            del held[first]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._held)
