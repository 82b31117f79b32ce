"""The cluster status view: "is my cluster healthy?" from one etcd snapshot.

Pure: :func:`build_view` takes a :class:`Snapshot` (raw values read from
``/stockade/<cluster>/``, see docs/cluster.md and contract C in docs/status.md)
and ``now`` (unix seconds, the clock the nodes stamp ``updated`` with) and
returns a frozen :class:`ClusterView`.  ``cluster.status_cli`` reads etcd and
renders the view; nothing here touches a socket or the clock.

Where each fact comes from, and why:

* **Which nodes exist.**  ``members/`` and ``status/`` keys are bound to the
  node's lease, so a dead node's keys vanish.  ``epochs/`` (durable) and
  ``events/<node>/`` (durable ring) remember it, so a node that died is shown
  as ``down`` instead of silently disappearing; one whose last event is
  ``left`` or ``drained`` left on purpose and is shown as ``left``.
* **State.**  The member record is the authority (its lease is what peers
  trust).  ``suspect`` is derived: a live peer whose own status is fresh
  reports the node as ``suspect`` or ``down`` in its ``peers`` map.
  ``stale``: the node's ``updated`` stamp is older than
  ``stale_factor x status_interval``: its agent stopped publishing while its
  lease is still kept alive, or its clock is off.
* **VIPs.**  The ``vips/`` claim is the authority; the node's status says
  whether the address is really held.  Two nodes reporting one VIP, or a claim
  without a live holder, is a split-brain risk.
* **Unknown is not invented.**  A field missing or of the wrong type is
  ``None`` in the view (``-`` on screen) and counted under ``bad_fields``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "EVENT_KINDS",
    "ClusterView",
    "EtcdProbe",
    "Event",
    "Health",
    "NodeView",
    "PeerLink",
    "Problem",
    "Severity",
    "Snapshot",
    "VipView",
    "build_view",
    "parse_event",
    "view_to_json",
]

EVENT_KINDS: Final = frozenset({
    "joined", "left", "suspect", "revoked", "fenced", "recovered", "vip-acquired",
    "vip-released", "resync-started", "resync-done", "drain-started", "drained",
    "rules-applied", "failover", "etcd-degraded", "etcd-recovered",
})  # fmt: skip
TABLE_WARN: Final = 0.70  # same threshold as the StockadeFlowTableHighUsage alert
TABLE_CRIT: Final = 0.90
LAG_WARN_MS: Final = 100.0  # a p99 above this means replicas trail by a visible amount
# Beacon loss from a peer above this is worth an operator's look: a LAN
# link should lose nothing, and from about 25 % on (cluster.liveness) the
# agent stretches that peer's suspicion window.
LOSS_WARN: Final = 0.05
FAILOVER_TARGET_MS: Final = 300.0  # the StockadeFailoverSlow alert's threshold
_GONE_ON_PURPOSE: Final = frozenset({"left", "drained"})
_MAX_EVENT_BYTES: Final = 4096


class Severity(StrEnum):
    INFO = "info"
    WARN = "warn"
    CRIT = "crit"


class Health(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"  # something needs a look; traffic still flows
    CRITICAL = "critical"  # traffic is or may be lost (VIP unheld, split brain, node down)


# --- inputs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EtcdProbe:
    """What the adapter learnt about etcd itself while reading."""

    endpoint: str  # host:port asked
    leader: str | None  # leader member name (None: unknown / no leader)
    version: str | None  # etcd server version
    revision: int  # etcd revision of the status read
    latency: float  # seconds the status/ prefix read took


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Raw values under ``/stockade/<cluster>/`` (keys relative to their folder)."""

    cluster_id: str
    etcd: EtcdProbe
    members: Mapping[str, bytes] = field(default_factory=dict)  # node -> MemberRecord JSON
    epochs: Mapping[str, bytes] = field(default_factory=dict)  # node -> decimal
    statuses: Mapping[str, bytes] = field(default_factory=dict)  # node -> status JSON
    vips: Mapping[str, str] = field(default_factory=dict)  # vip -> holder node id
    events: tuple[bytes, ...] = ()  # every events/<node>/<slot> value
    rules_current: int | None = None  # rules/current
    rules_sha256: str | None = None  # sha256 of rules/<current>'s text


# --- the view ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    severity: Severity
    subject: str  # node id, VIP, "etcd", "rules" or "cluster"
    code: str  # stable token: down, suspect, stale, drift, vip-unheld, ...
    text: str  # one line for humans


@dataclass(frozen=True, slots=True)
class PeerLink:
    peer: str
    state: str | None  # as the reporting node sees the peer
    lag_p99_ms: float | None
    outbox: int | None
    beacon_loss: float | None = None  # recent loss of the peer's beacons, 0..1


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    node: str
    kind: str
    detail: str | None
    duration_ms: float | None


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    state: str  # up, suspect, down, left, syncing, joining, draining, fenced, stale, unknown
    reported_state: str | None  # the node's own word (member record, else status)
    member: bool  # holds a live member record (lease alive)
    epoch: int | None
    address: str | None
    since: float | None  # unix time the node entered its state
    updated: float | None  # unix time of its last status
    status_age: float | None  # now - updated
    vips: tuple[str, ...]  # VIPs its status says it holds
    flows_own: int | None
    flows_replica: int | None
    table_entries: int | None
    table_capacity: int | None
    peers: tuple[PeerLink, ...]
    resync_active: bool | None
    resync_progress: float | None  # 0..1
    rules_revision: int | None
    rules_sha256: str | None
    rules_drift: bool  # runs something else than rules/current
    etcd_degraded: bool | None
    etcd_failures: int | None
    filter_connected: bool | None
    filter_synced: bool | None
    suspected_by: tuple[str, ...]
    last_event: Event | None

    @property
    def table_usage(self) -> float | None:
        if self.table_entries is None or not self.table_capacity:
            return None
        return self.table_entries / self.table_capacity

    @property
    def lag_p99_max_ms(self) -> float | None:
        lags = [p.lag_p99_ms for p in self.peers if p.lag_p99_ms is not None]
        return max(lags) if lags else None


@dataclass(frozen=True, slots=True)
class VipView:
    address: str
    holder: str | None  # the vips/ claim
    reported_by: tuple[str, ...]  # nodes whose status lists it
    ok: bool


@dataclass(frozen=True, slots=True)
class ClusterView:
    cluster_id: str
    now: float
    health: Health
    etcd: EtcdProbe
    rules_current: int | None
    rules_sha256: str | None
    nodes: tuple[NodeView, ...]
    vips: tuple[VipView, ...]
    problems: tuple[Problem, ...]  # most severe first
    events: tuple[Event, ...]  # the last N, oldest first
    failovers: tuple[Event, ...]  # the last few failover events, oldest first
    bad_fields: int  # values from etcd ignored because malformed
    status_interval: float

    @property
    def live(self) -> int:
        return sum(1 for n in self.nodes if n.member)

    @property
    def up(self) -> int:
        return sum(1 for n in self.nodes if n.state == "up")

    def signature(self) -> tuple[Any, ...]:
        """What ``--follow`` compares to decide a redraw (no ages, no clock)."""
        return (
            self.health,
            self.rules_current,
            tuple((n.node_id, n.state, n.vips, n.rules_revision) for n in self.nodes),
            tuple((v.address, v.holder, v.reported_by) for v in self.vips),
            tuple((p.severity, p.subject, p.code) for p in self.problems),
        )


# --- building --------------------------------------------------------------------------


class _Fields:
    """Typed reads of a JSON object; a wrong type counts and reads as None."""

    def __init__(self) -> None:
        self.bad = 0

    def get(self, body: Any, *path: str, kind: type | tuple[type, ...]) -> Any:
        value = body
        for name in path:
            if not isinstance(value, dict):
                return None
            value = value.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and kind is not bool:
            self.bad += 1
            return None
        if kind is float and isinstance(value, int | float):
            if not math.isfinite(value):
                self.bad += 1
                return None
            return float(value)
        if not isinstance(value, kind):
            self.bad += 1
            return None
        return value


def _json_object(raw: bytes | None, fields: _Fields) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        fields.bad += 1
        return None
    if not isinstance(body, dict):
        fields.bad += 1
        return None
    return body


def parse_event(raw: bytes) -> Event | None:
    """One ``events/`` value, or None when it is not a valid event."""
    if len(raw) > _MAX_EVENT_BYTES:
        return None
    fields = _Fields()
    body = _json_object(raw, fields)
    if body is None:
        return None
    seq = fields.get(body, "seq", kind=int)
    ts = fields.get(body, "ts", kind=float)
    node = fields.get(body, "node", kind=str)
    kind = fields.get(body, "kind", kind=str)
    if seq is None or ts is None or node is None or kind is None or fields.bad:
        return None
    detail = fields.get(body, "detail", kind=str)
    duration = fields.get(body, "duration_ms", kind=float)
    return Event(seq, ts, node, kind, detail, duration)


def build_view(
    snap: Snapshot,
    now: float,
    *,
    status_interval: float = 1.0,
    stale_factor: float = 3.0,
    events: int = 10,
    failovers: int = 5,
) -> ClusterView:
    """The whole picture; never raises on what etcd holds (bad values count)."""
    fields = _Fields()
    records = {n: _json_object(v, fields) for n, v in snap.members.items()}
    statuses = {n: _json_object(v, fields) for n, v in snap.statuses.items()}
    parsed = [parse_event(raw) for raw in snap.events]
    fields.bad += sum(1 for e in parsed if e is None)
    all_events = sorted((e for e in parsed if e is not None), key=lambda e: (e.ts, e.node, e.seq))
    last_event: dict[str, Event] = {}
    for event in all_events:
        last_event[event.node] = event
    stale_after = stale_factor * status_interval
    fresh = {
        n for n, s in statuses.items()
        if (u := fields.get(s, "updated", kind=float)) is not None and now - u <= stale_after
    }  # fmt: skip
    suspected_by = _suspicions(records, statuses, fresh, fields)
    names = sorted(set(snap.members) | set(snap.statuses) | set(snap.epochs) | set(last_event))
    nodes = tuple(
        _node(
            n, records.get(n), statuses.get(n), n in snap.members, now, stale_after,
            suspected_by.get(n, ()), last_event.get(n), snap, fields,
        )
        for n in names
    )  # fmt: skip
    vips = _vips(snap.vips, nodes)
    problems = _problems(snap, nodes, vips, stale_after, status_interval)
    failover_events = [e for e in all_events if e.kind == "failover"]
    return ClusterView(
        cluster_id=snap.cluster_id,
        now=now,
        health=_health(problems),
        etcd=snap.etcd,
        rules_current=snap.rules_current,
        rules_sha256=snap.rules_sha256,
        nodes=nodes,
        vips=vips,
        problems=problems,
        events=tuple(all_events[-events:]) if events > 0 else (),
        failovers=tuple(failover_events[-failovers:]) if failovers > 0 else (),
        bad_fields=fields.bad,
        status_interval=status_interval,
    )


def _suspicions(
    records: Mapping[str, dict[str, Any] | None],
    statuses: Mapping[str, dict[str, Any] | None],
    fresh: set[str],
    fields: _Fields,
) -> dict[str, tuple[str, ...]]:
    """node -> live peers (fresh status) that report it suspect or down."""
    found: dict[str, list[str]] = {}
    for reporter in sorted(fresh):
        if reporter not in records:
            continue  # a dead node's opinion does not count
        peers = fields.get(statuses[reporter], "peers", kind=dict) or {}
        for peer, link in sorted(peers.items()):
            if fields.get(link, "state", kind=str) in ("suspect", "down") and peer != reporter:
                found.setdefault(peer, []).append(reporter)
    return {peer: tuple(by) for peer, by in found.items()}


def _node(
    node_id: str,
    record: dict[str, Any] | None,
    status: dict[str, Any] | None,
    member: bool,
    now: float,
    stale_after: float,
    suspected_by: tuple[str, ...],
    last: Event | None,
    snap: Snapshot,
    f: _Fields,
) -> NodeView:
    s = status or {}
    reported = f.get(record, "state", kind=str) or f.get(s, "state", kind=str)
    updated = f.get(s, "updated", kind=float)
    age = None if updated is None else now - updated
    if not member:
        state = "left" if last is not None and last.kind in _GONE_ON_PURPOSE else "down"
    elif reported in ("fenced", "draining", "syncing", "joining"):
        state = reported
    elif suspected_by:
        state = "suspect"
    elif status is not None and (age is None or age > stale_after):
        state = "stale"
    elif reported == "up":
        state = "up"
    else:
        state = "unknown"
    epoch = f.get(record, "epoch", kind=int)
    if epoch is None:
        epoch = f.get(s, "epoch", kind=int)
    if epoch is None and node_id in snap.epochs:
        epoch = _decimal(snap.epochs[node_id], f)
    address = f.get(record, "address", kind=str) or f.get(s, "address", kind=str)
    vips = f.get(s, "vips", kind=list)
    peers = f.get(s, "peers", kind=dict) or {}
    revision = f.get(s, "rules", "revision", kind=int)
    sha = f.get(s, "rules", "sha256", kind=str)
    drift = member and status is not None and _drifts(revision, sha, snap)
    return NodeView(
        node_id=node_id,
        state=state,
        reported_state=reported,
        member=member,
        epoch=epoch,
        address=address,
        since=f.get(s, "since", kind=float),
        updated=updated,
        status_age=age,
        vips=tuple(sorted(v for v in vips or () if isinstance(v, str))),
        flows_own=f.get(s, "flows", "own", kind=int),
        flows_replica=f.get(s, "flows", "replica", kind=int),
        table_entries=f.get(s, "flows", "entries", kind=int),
        table_capacity=f.get(s, "flows", "capacity", kind=int),
        peers=tuple(
            PeerLink(
                peer,
                f.get(link, "state", kind=str),
                f.get(link, "lag_p99_ms", kind=float),
                f.get(link, "outbox", kind=int),
                f.get(link, "beacon_loss", kind=float),
            )
            for peer, link in sorted(peers.items())
        ),
        resync_active=f.get(s, "resync", "active", kind=bool),
        resync_progress=f.get(s, "resync", "progress", kind=float),
        rules_revision=revision,
        rules_sha256=sha,
        rules_drift=drift,
        etcd_degraded=f.get(s, "etcd", "degraded", kind=bool),
        etcd_failures=f.get(s, "etcd", "failures", kind=int),
        filter_connected=f.get(s, "filter", "connected", kind=bool),
        filter_synced=f.get(s, "filter", "synced", kind=bool),
        suspected_by=suspected_by,
        last_event=last,
    )


def _decimal(raw: bytes, f: _Fields) -> int | None:
    try:
        return int(raw)
    except ValueError:
        f.bad += 1
        return None


def _drifts(revision: int | None, sha: str | None, snap: Snapshot) -> bool:
    if snap.rules_current is None:
        return False  # no cluster ruleset: nodes run their files
    if revision != snap.rules_current:
        return True
    return sha is not None and snap.rules_sha256 is not None and sha != snap.rules_sha256


def _vips(claims: Mapping[str, str], nodes: Iterable[NodeView]) -> tuple[VipView, ...]:
    live = {n.node_id for n in nodes if n.member}
    reporters: dict[str, list[str]] = {}
    for node in nodes:
        if node.member:
            for vip in node.vips:
                reporters.setdefault(vip, []).append(node.node_id)
    out = []
    for vip in sorted(set(claims) | set(reporters), key=_vip_order):
        holder = claims.get(vip)
        by = tuple(sorted(reporters.get(vip, ())))
        out.append(VipView(vip, holder, by, holder in live and by == (holder,)))
    return tuple(out)


def _vip_order(vip: str) -> tuple[int, str]:
    return (1 if ":" in vip else 0, vip)


def _problems(
    snap: Snapshot,
    nodes: tuple[NodeView, ...],
    vips: tuple[VipView, ...],
    stale_after: float,
    interval: float,
) -> tuple[Problem, ...]:
    out: list[Problem] = []
    add = out.append
    crit, warn, info = Severity.CRIT, Severity.WARN, Severity.INFO
    if not any(n.member for n in nodes):
        add(Problem(crit, "cluster", "no-members", "no live member: nothing forwards"))
    live = frozenset(n.node_id for n in nodes if n.member)
    for n in nodes:
        out.extend(_node_problems(n, live, stale_after, interval, snap.rules_current))
    for v in vips:
        if v.holder is None:
            add(Problem(crit, v.address, "vip-unclaimed",
                        f"no claim, reported by {_names(v.reported_by)}"))  # fmt: skip
        elif v.holder not in {n.node_id for n in nodes if n.member}:
            add(Problem(crit, v.address, "vip-holder-gone", f"claimed by {v.holder}, not a member"))
        elif not v.reported_by:
            add(Problem(warn, v.address, "vip-not-reported",
                        f"claimed by {v.holder}, which does not report holding it"))  # fmt: skip
        if len(v.reported_by) > 1:
            add(Problem(crit, v.address, "vip-split-brain",
                        f"split-brain risk: held by {_names(v.reported_by)}"))  # fmt: skip
        elif v.holder is not None and v.reported_by and v.reported_by != (v.holder,):
            add(Problem(crit, v.address, "vip-wrong-node",
                        f"claimed by {v.holder} but held by {v.reported_by[0]}"))  # fmt: skip
    drifted = [n.node_id for n in nodes if n.rules_drift]
    if drifted:
        add(Problem(warn, "rules", "drift",
                    f"{_names(drifted)} drift from revision {snap.rules_current}"))  # fmt: skip
    if snap.rules_current is None:
        add(Problem(info, "rules", "no-cluster-ruleset", "rules/current unset: nodes run files"))
    rank = {crit: 0, warn: 1, info: 2}
    return tuple(sorted(out, key=lambda p: rank[p.severity]))


def _node_problems(
    n: NodeView, live: frozenset[str], stale_after: float, interval: float, current: int | None
) -> list[Problem]:
    crit, warn, info = Severity.CRIT, Severity.WARN, Severity.INFO
    out: list[Problem] = []
    sid = n.node_id

    def add(severity: Severity, code: str, text: str) -> None:
        out.append(Problem(severity, sid, code, text))

    if n.state == "down":
        last = f"; last event {n.last_event.kind}" if n.last_event else ""
        add(crit, "down", f"down: no member record (lease expired or revoked){last}")
        return out
    if n.state == "left":
        add(info, "left", "left the cluster")
        return out
    if n.state == "fenced":
        add(crit, "fenced", "fenced: lost etcd and every peer, owns nothing")
    elif n.state == "suspect":
        add(crit, "suspect", f"suspected by {_names(n.suspected_by)}")
    elif n.state == "stale":
        age = "never" if n.status_age is None else f"{n.status_age:.1f} s old"
        add(warn, "stale", f"status {age} (> {stale_after:g} s = 3 x {interval:g} s interval)")
    elif n.state in ("syncing", "joining"):
        pct = "" if n.resync_progress is None else f" {n.resync_progress:.0%}"
        add(warn, n.state, f"{n.state}{pct}: owns no flows or VIPs yet")
    elif n.state == "draining":
        add(warn, "draining", "draining: handing its flows and VIPs away")
    elif n.state == "unknown":
        add(warn, "unknown", f"state {n.reported_state!r} unknown")
    if n.updated is None:
        add(warn, "no-status", "publishes no status")
    usage = n.table_usage
    if usage is not None and usage >= TABLE_WARN:
        sev = crit if usage >= TABLE_CRIT else warn
        add(
            sev, "table-full", f"flow table {usage:.0%} full ({n.table_entries}/{n.table_capacity})"
        )
    if n.rules_drift and n.rules_revision == current:
        add(warn, "drift", f"runs revision {current} with another text (sha256 differs)")
    elif n.rules_drift:
        add(warn, "drift", f"runs rules revision {_dash(n.rules_revision)}, current is {current}")
    if n.etcd_degraded:
        add(warn, "etcd-degraded", f"cannot reach etcd ({_dash(n.etcd_failures)} failures)")
    if n.filter_connected is False:
        add(warn, "filter-disconnected", "filter not connected to syncd")
    for p in n.peers:
        if p.state is not None and p.state not in ("up", "left") and p.peer in live:
            add(warn, "peer-" + p.state, f"sees peer {p.peer} {p.state}")
        if p.lag_p99_ms is not None and p.lag_p99_ms > LAG_WARN_MS:
            add(warn, "sync-lag", f"sync lag p99 to {p.peer} {p.lag_p99_ms:.0f} ms")
        if p.beacon_loss is not None and p.beacon_loss >= LOSS_WARN and p.peer in live:
            add(warn, "link-loss", f"loses {p.beacon_loss:.0%} of {p.peer}'s beacons "
                "(its suspicion waits longer; failover from it is slower)")  # fmt: skip
    return out


def _health(problems: Iterable[Problem]) -> Health:
    severities = {p.severity for p in problems}
    if Severity.CRIT in severities:
        return Health.CRITICAL
    if Severity.WARN in severities:
        return Health.DEGRADED
    return Health.HEALTHY


def _names(names: Iterable[str]) -> str:
    listed = list(names)
    return ", ".join(listed) if listed else "nobody"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


# --- JSON ------------------------------------------------------------------------------


def view_to_json(view: ClusterView) -> dict[str, Any]:
    """The machine-readable document of ``stockade status --json`` (docs/status.md)."""
    return {
        "cluster": view.cluster_id,
        "now": view.now,
        "health": view.health.value,
        "etcd": {
            "endpoint": view.etcd.endpoint,
            "reachable": True,
            "leader": view.etcd.leader,
            "version": view.etcd.version,
            "revision": view.etcd.revision,
            "latency_ms": round(view.etcd.latency * 1000, 3),
        },
        "rules": {"current": view.rules_current, "sha256": view.rules_sha256},
        "nodes": [_node_json(n) for n in view.nodes],
        "vips": [
            {
                "address": v.address,
                "holder": v.holder,
                "reported_by": list(v.reported_by),
                "ok": v.ok,
            }
            for v in view.vips
        ],
        "problems": [
            {"severity": p.severity.value, "subject": p.subject, "code": p.code, "text": p.text}
            for p in view.problems
        ],
        "events": [event_to_json(e) for e in view.events],
        "failovers": [event_to_json(e) for e in view.failovers],
        "bad_fields": view.bad_fields,
    }


def event_to_json(e: Event) -> dict[str, Any]:
    return {"seq": e.seq, "ts": e.ts, "node": e.node, "kind": e.kind, "detail": e.detail,
            "duration_ms": e.duration_ms}  # fmt: skip


def _node_json(n: NodeView) -> dict[str, Any]:
    return {
        "node_id": n.node_id,
        "state": n.state,
        "reported_state": n.reported_state,
        "member": n.member,
        "epoch": n.epoch,
        "address": n.address,
        "since": n.since,
        "updated": n.updated,
        "status_age": None if n.status_age is None else round(n.status_age, 3),
        "vips": list(n.vips),
        "flows": {
            "own": n.flows_own,
            "replica": n.flows_replica,
            "entries": n.table_entries,
            "capacity": n.table_capacity,
            "usage": n.table_usage,
        },
        "peers": {
            p.peer: {
                "state": p.state,
                "lag_p99_ms": p.lag_p99_ms,
                "outbox": p.outbox,
                "beacon_loss": p.beacon_loss,
            }
            for p in n.peers
        },
        "resync": {"active": n.resync_active, "progress": n.resync_progress},
        "rules": {"revision": n.rules_revision, "sha256": n.rules_sha256, "drift": n.rules_drift},
        "etcd": {"degraded": n.etcd_degraded, "failures": n.etcd_failures},
        "filter": {"connected": n.filter_connected, "synced": n.filter_synced},
        "suspected_by": list(n.suspected_by),
        "last_event": None if n.last_event is None else event_to_json(n.last_event),
    }
