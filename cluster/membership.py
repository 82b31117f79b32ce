"""Cluster membership seen through etcd, failure suspicion, and the local lifecycle.

All pure: values and ``now`` in, events out; ``cluster.etcd`` feeds them.

**Member records.**  Each node keeps one key, ``/stockade/<cluster>/members/
<node_id>``, bound to its etcd lease, holding a :class:`MemberRecord` as JSON.
The key vanishes when the lease is revoked (clean exit, or a peer confirming
a suspicion) or expires (about TTL + 0.5 s after the last keepalive with
etcd 3.4).  :class:`Membership` turns the watch stream of those keys into
``MemberJoined`` / ``MemberLeft`` / ``MemberChanged``.  A value that fails
validation is counted by reason and ignored (the previous view is kept),
never a crash: etcd is shared and a bad writer must not take every node down.

**Suspicion then confirmation.**  :class:`Suspicion` notices a silent peer
fast (heartbeats, default 150 ms of silence); it is only a suspicion.  The
agent confirms it through etcd by revoking the suspect's lease, so a node is
declared dead only by the one store every member agrees on, and a slow node
is never doubly active: once its lease is gone its keepalive fails and it
stops owning anything (:data:`LocalInput.LEASE_LOST`).  The same split is
SWIM's (Das et al., 2002): local suspicion, then cluster-wide confirmation.

**Local lifecycle** (:data:`TRANSITIONS`)::

    joining --registered--> syncing --synced--> up --drain--> draining --drained--> left
        any (not left) --isolated--> fenced --recovered--> syncing
        syncing/up --lease-lost--> fenced;  draining --lease-lost--> left
        any (not left) --stop--> left

Only ``up`` owns flows and holds VIPs: a node that starts, or comes back
from ``fenced``, owns nothing until its bulk resync is done (``syncing``),
because owning a flow whose state it has not received would drop it.
``isolated`` means etcd *and* every peer are unreachable
(:func:`should_fence`): such a node cannot know whether the others revoked
it and took its VIPs, so it stops claiming anything.  If only etcd is lost
the cluster goes fail static instead (:class:`EtcdHealth`): keep forwarding
with the last membership known, move no VIP, say so loudly.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from cluster.errors import BadRecord, IllegalTransition, Misuse

__all__ = [
    "TRANSITIONS",
    "EtcdHealth",
    "EtcdHealthStats",
    "Lifecycle",
    "LifecycleStats",
    "LocalInput",
    "MemberChange",
    "MemberChanged",
    "MemberDeleted",
    "MemberJoined",
    "MemberLeft",
    "MemberPut",
    "MemberRecord",
    "MembersSnapshot",
    "Membership",
    "MembershipStats",
    "NodeState",
    "Suspicion",
    "SuspicionStats",
    "next_state",
    "should_fence",
    "validate_name",
]

MAX_RECORD_BYTES: Final = 4096  # a record is ~200 bytes; anything huge is not ours
MAX_VIPS: Final = 256
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_RECORD_FIELDS: Final = frozenset({"node_id", "address", "state", "epoch", "vips"})


class NodeState(StrEnum):
    JOINING = "joining"
    SYNCING = "syncing"
    UP = "up"
    DRAINING = "draining"
    FENCED = "fenced"
    LEFT = "left"  # local only: a node that left has no record to publish


PUBLISHED_STATES: Final = frozenset(NodeState) - {NodeState.LEFT}


def validate_name(kind: str, name: str) -> str:
    """Check a node or cluster id (it becomes an etcd key component); raise ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} is not 1-63 of [A-Za-z0-9._-] starting alphanumeric")
    return name


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """What a node publishes about itself under its leased member key.

    Raises :class:`cluster.errors.Misuse` when built with invalid fields;
    :meth:`from_json` raises :class:`cluster.errors.BadRecord` instead.
    """

    # Node id: 1-63 of [A-Za-z0-9._-]; also the last component of its etcd key.
    node_id: str
    # host:port where the node's syncd accepts peer streams ([v6]:port for IPv6).
    address: str
    # Lifecycle state; only "up" owns flows and VIPs.  Never "left".
    state: NodeState
    # >= 1, strictly increasing at every start of the node (a durable etcd
    # counter), so peers tell a restart from a state change.
    epoch: int
    # VIPs the node holds, canonical text, sorted (informational: the claims
    # themselves are the vips/ keys).
    vips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            _check_record(self)
        except ValueError as exc:
            raise Misuse(f"member record: {exc}") from exc

    @property
    def owns_flows(self) -> bool:
        return self.state is NodeState.UP

    def to_json(self) -> bytes:
        """The etcd value (compact, keys sorted, so equal records are equal bytes)."""
        body = {
            "node_id": self.node_id,
            "address": self.address,
            "state": self.state.value,
            "epoch": self.epoch,
            "vips": list(self.vips),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MemberRecord:
        """Decode an etcd value; raise :class:`BadRecord` unless it is exactly valid."""
        if len(data) > MAX_RECORD_BYTES:
            raise BadRecord("too-large", f"{len(data)} bytes")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise BadRecord("not-json", str(exc)) from exc
        if not isinstance(body, dict) or set(body) != _RECORD_FIELDS:
            raise BadRecord("bad-fields", f"want exactly {sorted(_RECORD_FIELDS)}")
        try:
            return cls(
                node_id=_typed(body, "node_id", str),
                address=_typed(body, "address", str),
                state=NodeState(_typed(body, "state", str)),
                epoch=_typed(body, "epoch", int),
                vips=tuple(_typed(body, "vips", list)),
            )
        except (ValueError, Misuse) as exc:
            raise BadRecord("bad-field", str(exc)) from exc


def _typed(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body[name]
    # bool is an int subclass; a JSON true is not an epoch.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {kind.__name__}")
    return value


def _check_record(record: MemberRecord) -> None:
    validate_name("node id", record.node_id)
    _check_address(record.address)
    if not isinstance(record.state, NodeState) or record.state not in PUBLISHED_STATES:
        raise ValueError(f"state {record.state!r} cannot be published")
    if isinstance(record.epoch, bool) or not isinstance(record.epoch, int) or record.epoch < 1:
        raise ValueError(f"epoch must be an int >= 1, got {record.epoch!r}")
    if len(record.vips) > MAX_VIPS:
        raise ValueError(f"more than {MAX_VIPS} VIPs")
    for vip in record.vips:
        if not isinstance(vip, str) or str(ipaddress.ip_address(vip)) != vip:
            raise ValueError(f"VIP {vip!r} is not a canonical IP address")
    if list(record.vips) != sorted(set(record.vips)):
        raise ValueError("VIPs must be sorted and unique")


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"address host {host!r} is neither an IPv4/[IPv6] address nor a name")


# --- watch events in -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberPut:
    """A member key was written (from the watch, or a listing)."""

    node_id: str  # the key's last component
    value: bytes  # the raw etcd value, validated by Membership
    revision: int  # etcd mod_revision of this write
    lease: int = 0  # etcd lease the key is bound to (0: none)


@dataclass(frozen=True, slots=True)
class MemberDeleted:
    """A member key vanished: lease revoked or expired, or deleted."""

    node_id: str
    revision: int  # etcd revision of the deletion


@dataclass(frozen=True, slots=True)
class MembersSnapshot:
    """A full listing of the member prefix at one etcd revision."""

    puts: tuple[MemberPut, ...]
    revision: int


# --- membership changes out ------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberJoined:
    record: MemberRecord


@dataclass(frozen=True, slots=True)
class MemberLeft:
    record: MemberRecord  # the last record known


@dataclass(frozen=True, slots=True)
class MemberChanged:
    old: MemberRecord
    new: MemberRecord

    @property
    def restarted(self) -> bool:
        """A new epoch: the node restarted, so its sync sessions start over."""
        return self.new.epoch != self.old.epoch


MemberChange = MemberJoined | MemberLeft | MemberChanged


@dataclass(frozen=True, slots=True)
class MembershipStats:
    members: int  # records held
    live: int  # members that own flows (state up)
    revision: int  # etcd revision the view is at
    events: int  # watch events applied (puts and deletes, not stale)
    stale: int  # events older than the view, ignored
    resyncs: int  # full listings applied
    bad_records: tuple[tuple[str, int], ...]  # (reason, count), sorted by reason


class Membership:
    """The member view built from etcd watch events and listings."""

    def __init__(self) -> None:
        self._records: dict[str, MemberRecord] = {}
        self._since: dict[str, float] = {}  # when each member entered its state
        self._revision = 0
        self._events = 0
        self._stale = 0
        self._resyncs = 0
        self._bad: Counter[str] = Counter()

    @property
    def revision(self) -> int:
        return self._revision

    def get(self, node_id: str) -> MemberRecord | None:
        return self._records.get(node_id)

    def members(self) -> Mapping[str, MemberRecord]:
        """Every known member, read-only."""
        return MappingProxyType(self._records)

    def live(self) -> frozenset[str]:
        """Members eligible for flow and VIP ownership: state ``up`` only."""
        return frozenset(n for n, r in self._records.items() if r.owns_flows)

    def since(self, node_id: str) -> float | None:
        """When ``node_id`` was last seen to join or change state."""
        return self._since.get(node_id)

    def apply(self, event: MemberPut | MemberDeleted, now: float) -> list[MemberChange]:
        """Apply one watch event.  Stale and invalid events change nothing."""
        if event.revision < self._revision:
            self._stale += 1
            return []
        self._revision = event.revision
        self._events += 1
        if isinstance(event, MemberDeleted):
            gone = self._records.pop(event.node_id, None)
            self._since.pop(event.node_id, None)
            return [MemberLeft(gone)] if gone is not None else []
        record = self._parse(event)
        return [] if record is None else self._store(record, now)

    def resync(self, snapshot: MembersSnapshot, now: float) -> list[MemberChange]:
        """Replace the view by a full listing (after a watch was lost) and diff it."""
        self._resyncs += 1
        self._revision = snapshot.revision
        fresh: dict[str, MemberRecord] = {}
        for put in snapshot.puts:
            record = self._parse(put)
            if record is not None:
                fresh[record.node_id] = record
        changes: list[MemberChange] = []
        for node_id in sorted(set(self._records) - set(fresh)):
            self._since.pop(node_id, None)
            changes.append(MemberLeft(self._records.pop(node_id)))
        for node_id in sorted(fresh):
            changes.extend(self._store(fresh[node_id], now))
        return changes

    def _parse(self, put: MemberPut) -> MemberRecord | None:
        try:
            record = MemberRecord.from_json(put.value)
            if record.node_id != put.node_id:
                raise BadRecord("key-mismatch", f"{record.node_id!r} under key {put.node_id!r}")
            held = self._records.get(put.node_id)
            if held is not None and record.epoch < held.epoch:
                raise BadRecord("epoch-regressed", f"{put.node_id}: {held.epoch} -> {record.epoch}")
        except BadRecord as exc:
            self._bad[exc.reason] += 1
            return None
        return record

    def _store(self, record: MemberRecord, now: float) -> list[MemberChange]:
        old = self._records.get(record.node_id)
        if old == record:
            return []
        self._records[record.node_id] = record
        if old is None or old.state is not record.state or old.epoch != record.epoch:
            self._since[record.node_id] = now
        return [MemberJoined(record) if old is None else MemberChanged(old, record)]

    def statistics(self) -> MembershipStats:
        return MembershipStats(
            members=len(self._records),
            live=len(self.live()),
            revision=self._revision,
            events=self._events,
            stale=self._stale,
            resyncs=self._resyncs,
            bad_records=tuple(sorted(self._bad.items())),
        )


# --- failure suspicion -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SuspicionStats:
    peers: int  # peers tracked
    heartbeats: int  # heartbeats observed
    cleared: int  # suspicions ended by a late heartbeat (false suspicions)


class Suspicion:
    """Which peers have been silent longer than ``silence`` seconds.

    A peer is tracked from the moment it is known (:meth:`track`, or its first
    heartbeat), so a peer that never speaks becomes a suspect too.
    """

    def __init__(self, silence: float = 0.150) -> None:
        if not silence > 0:
            raise Misuse(f"silence must be > 0 s, got {silence!r}")
        self._silence = silence
        self._last: dict[str, float] = {}
        self._heartbeats = 0
        self._cleared = 0

    def track(self, peer: str, now: float) -> None:
        """Start expecting heartbeats from ``peer`` (no-op if already tracked)."""
        self._last.setdefault(peer, now)

    def forget(self, peer: str) -> None:
        """Stop tracking ``peer`` (it left the membership)."""
        self._last.pop(peer, None)

    def heard(self, peer: str, now: float) -> bool:
        """Record a heartbeat; True when it ends a suspicion of ``peer``."""
        self._heartbeats += 1
        last = self._last.get(peer)
        was_suspect = last is not None and now - last > self._silence
        # A clock that steps back must not make a peer look fresher than it was.
        self._last[peer] = now if last is None else max(last, now)
        self._cleared += was_suspect
        return was_suspect

    def suspects(self, now: float) -> frozenset[str]:
        return frozenset(p for p, last in self._last.items() if now - last > self._silence)

    def next_deadline(self) -> float | None:
        """When the next currently-trusted peer becomes a suspect if still silent."""
        return min(self._last.values()) + self._silence if self._last else None

    def statistics(self) -> SuspicionStats:
        return SuspicionStats(
            peers=len(self._last), heartbeats=self._heartbeats, cleared=self._cleared
        )


# --- etcd health (fail static) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class EtcdHealthStats:
    last_success: float | None  # time of the last successful etcd call
    last_failure: float | None  # time of the last failed etcd call
    successes: int
    failures: int
    last_error: str  # the last failure's message ("" if none)


class EtcdHealth:
    """Whether etcd answered recently enough to act on the membership it gives.

    While :meth:`degraded`, the agent keeps the last membership it knew, moves
    no VIP and reports the fact (fail static).  Before any success it is
    degraded: a node that never reached etcd knows nothing to act on.
    """

    def __init__(self, grace: float = 1.0) -> None:
        if not grace > 0:
            raise Misuse(f"grace must be > 0 s, got {grace!r}")
        self._grace = grace
        self._last_success: float | None = None
        self._last_failure: float | None = None
        self._successes = 0
        self._failures = 0
        self._last_error = ""

    def succeeded(self, now: float) -> None:
        self._successes += 1
        self._last_success = now if self._last_success is None else max(self._last_success, now)

    def failed(self, now: float, error: str) -> None:
        self._last_failure = now
        self._failures += 1
        self._last_error = error

    def degraded(self, now: float) -> bool:
        return self._last_success is None or now - self._last_success > self._grace

    def statistics(self) -> EtcdHealthStats:
        return EtcdHealthStats(
            last_success=self._last_success,
            last_failure=self._last_failure,
            successes=self._successes,
            failures=self._failures,
            last_error=self._last_error,
        )


def should_fence(etcd_degraded: bool, peers: Collection[str], suspects: Collection[str]) -> bool:
    """Whether the local node is isolated: etcd and every known peer unreachable.

    With no known peer nobody can have taken over, so there is nothing to
    fence against.
    """
    return etcd_degraded and bool(peers) and all(p in suspects for p in peers)


# --- local lifecycle -------------------------------------------------------


class LocalInput(StrEnum):
    REGISTERED = "registered"  # lease granted and record written
    SYNCED = "synced"  # bulk resync from peers complete
    DRAIN = "drain"  # operator asked to drain
    DRAINED = "drained"  # flows and VIPs handed over
    ISOLATED = "isolated"  # should_fence(): etcd and all peers lost
    RECOVERED = "recovered"  # re-registered in etcd after isolation
    LEASE_LOST = "lease-lost"  # our lease was revoked or expired
    STOP = "stop"  # process exits now (lease revoked on the way out)


_S, _I = NodeState, LocalInput
_LIVE_STATES: Final = (_S.JOINING, _S.SYNCING, _S.UP, _S.DRAINING, _S.FENCED)

TRANSITIONS: Final[Mapping[tuple[NodeState, LocalInput], NodeState]] = MappingProxyType(
    {
        (_S.JOINING, _I.REGISTERED): _S.SYNCING,
        (_S.SYNCING, _I.SYNCED): _S.UP,
        (_S.SYNCING, _I.DRAIN): _S.DRAINING,
        (_S.UP, _I.DRAIN): _S.DRAINING,
        (_S.DRAINING, _I.DRAINED): _S.LEFT,
        (_S.FENCED, _I.RECOVERED): _S.SYNCING,
        (_S.SYNCING, _I.LEASE_LOST): _S.FENCED,
        (_S.UP, _I.LEASE_LOST): _S.FENCED,
        (_S.DRAINING, _I.LEASE_LOST): _S.LEFT,
        **{(state, _I.ISOLATED): _S.FENCED for state in _LIVE_STATES if state is not _S.FENCED},
        **{(state, _I.STOP): _S.LEFT for state in _LIVE_STATES},
    }
)


def next_state(state: NodeState, event: LocalInput) -> NodeState:
    """The table lookup; a missing key raises :class:`IllegalTransition`."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state.value, event.value) from None


@dataclass(frozen=True, slots=True)
class LifecycleStats:
    state: NodeState
    since: float  # when the current state was entered
    transitions: int
    fenced: int  # times the node fenced itself


class Lifecycle:
    """The local node's state, driven only through :data:`TRANSITIONS`."""

    def __init__(self, now: float) -> None:
        self._state = NodeState.JOINING
        self._since = now
        self._transitions = 0
        self._fenced = 0

    @property
    def state(self) -> NodeState:
        return self._state

    def handle(self, event: LocalInput, now: float) -> NodeState:
        """Apply ``event``; raise :class:`IllegalTransition` if the table has no entry."""
        self._state = next_state(self._state, event)
        self._since = now
        self._transitions += 1
        self._fenced += self._state is NodeState.FENCED
        return self._state

    def statistics(self) -> LifecycleStats:
        return LifecycleStats(
            state=self._state, since=self._since, transitions=self._transitions, fenced=self._fenced
        )
