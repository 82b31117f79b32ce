"""The cluster agent's pure core: membership, suspicion, VIPs, fencing, drain, status.

Values and ``now`` in, actions out; :mod:`cluster.agent_runner` does the I/O
(etcd, syncd's peer links, addresses) inside the syncd process.  Rules, each
tested in ``tests/unit/test_agent*.py``:

* **Lifecycle** only through :data:`cluster.membership.TRANSITIONS`
  (joining -> syncing -> up -> draining -> left; fenced on isolation, a
  loop stall or a lost lease; fenced -> syncing by registering again).
* **Syncing gate.**  A node that starts or rejoins owns nothing until
  syncd's bulk recovery is done *and* the filter reports its table synced
  (``require_filter``); without a filter it stays syncing and says so.
* **Suspicion -> confirmation.**  A peer silent for more than its window
  (``suspect_after``, stretched on a lossy link by :mod:`cluster.liveness`
  from its beacons' measured loss; a member never heard since it joined
  only after ``join_grace``) is a suspect.  The agent confirms by
  revoking the suspect's lease, only while this node is ``up``, etcd is
  healthy and it sees a strict majority of the members alive (heard within
  ``suspect_after / 2``), or exactly half including the lowest node id
  (:func:`has_quorum`): the two sides of a partition can never both revoke.
* **VIPs.**  Targets from :func:`cluster.vip.plan_vips` over the ``up``
  members, a VIP's ``home`` first when it is up; release before claim.
  Claims wait ``takeover_guard`` after the previous holder's record
  vanished (the revoked node takes its addresses off first) and until a
  frozen holder's ARP guard ran out (``arp_guard`` after it was last
  heard, one beacon interval of margin), and never
  take a VIP whose last holder lost its record but is still heard over
  sync: that node is cut off from etcd only and holds its VIPs fail static.
* **Fencing.**  Lease lost (keepalive TTL 0, or our own record deleted
  from the watch), :func:`cluster.membership.should_fence`, or a loop stall
  longer than ``stall_limit``: drop every address first, then register
  again (a fresh lease and epoch) and go through syncing.
* **ARP guard** (``cluster.arpguard``): shut when every peer fell silent
  (we may be the cut-off side, and the peers claim our VIPs before a probe
  of etcd can answer), reopened when etcd answers or a peer speaks again;
  while neither happens it stays shut and the fence waits for etcd's
  health grace (:meth:`Agent.etcd_probed`);
  shut by syncd's beacon thread when a peer says it revoked us
  (:meth:`Agent.revoked_notice` then fences); every reason is dropped when
  we register again.
* **etcd down**: fail static.  Keep VIPs, move nothing, revoke nobody,
  report it (status, events).
* **Drain**: release all VIPs, wait until other nodes hold them (or
  ``drain_timeout``), then ``drained`` and leave.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cluster.config import AgentConfig
from cluster.errors import Misuse
from cluster.liveness import suspect_window
from cluster.membership import (
    EtcdHealth,
    Lifecycle,
    LocalInput,
    MemberChange,
    MemberChanged,
    MemberDeleted,
    MemberJoined,
    MemberLeft,
    MemberPut,
    MemberRecord,
    Membership,
    MembersSnapshot,
    NodeState,
    should_fence,
)
from cluster.ring import HashRing
from cluster.vip import plan_vips

__all__ = [
    "Action",
    "Agent",
    "CheckLease",
    "ClaimVip",
    "DropVips",
    "Emit",
    "GuardArp",
    "Leave",
    "Log",
    "ProbeEtcd",
    "PublishStatus",
    "RefreshHolders",
    "Register",
    "ReleaseVip",
    "RevokePeer",
    "SetPeers",
    "UpdateRecord",
    "has_quorum",
]

ISOLATED: Final = "isolated"  # GuardArp reason while an isolation probe is out
_FAILOVER_FORGET: Final = 60.0  # a failover not completed within this is dropped
_REGISTER_RETRY: Final = 0.5  # seconds between registration attempts
_HEARD_KEEP: Final = 3600.0  # forget last-heard times of departed peers after this
# Deadlines are met a little late on purpose: suspicion and the guard
# compare with a strict ">" (and clocks are floats): tick just past them.
_DEADLINE_SLACK: Final = 0.0005
# A departed holder's ARP guard may have been refreshed up to one beacon
# interval (syncd.beacon: 10 ms) after the last beacon we heard from it.
_ARP_GUARD_MARGIN: Final = 0.01


# --- actions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetPeers:
    """Make these (node_id, address) syncd's peers."""

    peers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RevokePeer:
    """Confirm a suspicion: revoke this incarnation's lease in etcd."""

    node_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ClaimVip:
    """Claim in etcd, then add the address and announce it (``cluster.vip.acquire``)."""

    vip: str


@dataclass(frozen=True, slots=True)
class ReleaseVip:
    """Remove the address, then release the claim (``cluster.vip.relinquish``)."""

    vip: str


@dataclass(frozen=True, slots=True)
class DropVips:
    """Take every VIP address off the host now; etcd is not asked (fencing)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Register:
    """Give up any lease we still have (revoke), then register afresh."""

    reason: str


@dataclass(frozen=True, slots=True)
class CheckLease:
    """Ask etcd whether our lease is still alive (after a loop delay)."""


@dataclass(frozen=True, slots=True)
class ProbeEtcd:
    """Every peer is silent: can we still reach etcd?  Answer with
    :meth:`Agent.etcd_probed` within ``timeout`` seconds (a timeout is a no)."""

    timeout: float


@dataclass(frozen=True, slots=True)
class GuardArp:
    """Shut the ARP guard for ``reason`` now (``open=False``), or drop that
    reason (``open=True``): ARP for the VIPs resumes once no reason is left."""

    open: bool
    reason: str


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """Publish our state (and the VIPs we hold) in our member record."""

    state: NodeState
    vips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RefreshHolders:
    """List the VIP claims in etcd and report them with :meth:`Agent.holders_listed`."""


@dataclass(frozen=True, slots=True)
class PublishStatus:
    """Write ``status/<node_id>`` now (:meth:`Agent.status_fields` plus syncd's figures)."""


@dataclass(frozen=True, slots=True)
class Leave:
    """Drained: revoke our lease (record, claims and status go with it)."""


@dataclass(frozen=True, slots=True)
class Log:
    """Something the operator should read that is not a contract event."""

    level: str  # "info" | "warning" | "error"
    message: str


@dataclass(frozen=True, slots=True)
class Emit:
    """Append an event to ``events/<node_id>/`` (contract C)."""

    kind: str
    detail: str = ""
    duration_ms: float | None = None


Action = (
    SetPeers | RevokePeer | ClaimVip | ReleaseVip | DropVips | Register | CheckLease
    | ProbeEtcd | GuardArp | UpdateRecord | RefreshHolders | PublishStatus | Leave | Emit
    | Log
)  # fmt: skip


def has_quorum(members: Collection[str], alive: Collection[str]) -> bool:
    """A strict majority of ``members`` alive, or exactly half including the lowest id.

    Two disjoint halves cannot both have it: only one holds the lowest id.
    """
    if not members:
        return False
    live = set(alive) & set(members)
    return 2 * len(live) > len(members) or (2 * len(live) == len(members) and min(members) in live)


@dataclass(slots=True)
class _Failover:
    peer: str
    last_heard: float | None
    vips: frozenset[str]
    started: float
    mine: set[str] = field(default_factory=set)
    acquired_at: float | None = None


@dataclass(frozen=True, slots=True)
class AgentStats:
    state: NodeState
    epoch: int | None
    members: int
    suspects: tuple[str, ...]
    holders_known: bool
    revocations: int
    claims: int
    releases: int
    fences: int
    failovers: int
    registering: bool
    suspicions: int  # peers suspected (heartbeats silent), counted once per suspicion
    etcd_degraded: bool  # fail static: etcd unreachable for longer than its grace
    resync_progress: float  # bulk resync 0..1 (1: none running)
    vips_held: tuple[str, ...]  # VIPs etcd says we hold


class Agent:
    """The agent's decisions for one node; feed it inputs, run what :meth:`tick` returns."""

    def __init__(
        self,
        config: AgentConfig,
        node_id: str,
        address: str,
        suspect_after: float,
        now: float,
        beacon_interval: float | None = None,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.address = address
        # The silence that makes a peer on a clean link a suspect; a lossy
        # link stretches it (cluster.liveness), given the beacons' interval
        # (None: no beacons, no stretching).
        self.suspect_after = suspect_after
        self.beacon_interval = beacon_interval
        self.lifecycle = Lifecycle(now)
        self.membership = Membership()
        self.health = EtcdHealth(grace=float(config.etcd.lease_ttl))
        self.epoch: int | None = None
        self._vips = tuple(spec.vip for spec in config.vips)
        self._homes = {spec.vip: spec.home for spec in config.vips if spec.home is not None}
        self._holders: dict[str, str] | None = None  # None: not listed since (re)registering
        self._last_holder: dict[str, str] = {}
        self._pending: set[str] = set()
        self._last_heard: dict[str, float] = {}
        self._link_loss: dict[str, float] = {}  # peer -> its beacons' recent loss estimate
        self._heard_this_epoch: set[str] = set()
        self._joined_at: dict[str, float] = {}
        self._left_at: dict[str, float] = {}
        self._last_records: dict[str, MemberRecord] = {}
        self._suspected: set[str] = set()
        self._revoking: dict[str, int] = {}
        self._peers_sent: tuple[tuple[str, str], ...] | None = None
        self._rings: dict[frozenset[str], HashRing] = {}
        self._failovers: dict[str, _Failover] = {}
        self._targeted: frozenset[str] = frozenset()  # VIPs the last plan gives us
        self._probing = False  # a ProbeEtcd is out
        self._probe_at = -math.inf  # when the last one went out
        self._probe_wait = config.isolation_probe  # its deadline; doubles while unanswered
        self._shut_isolated = False  # ARP guard shut by an isolation probe, not reopened yet
        self._quiet_until = now + suspect_after
        self._registering = False
        self._register_at = now
        self._drop_incomplete = False  # a DropVips left addresses: retry before registering
        self._lease_lost = False
        self._sync_ready = False
        self._sync_progress = 0.0
        self._resync_started: float | None = None
        self._resync_done_at: float | None = None
        self._filter_connected: bool | None = None
        self._filter_synced: bool | None = None
        self._said_waiting_filter = False
        self._drain_started: float | None = None
        self._drain_vips: frozenset[str] = frozenset()
        self._degraded_reported = False
        self._status_at = now
        self._holders_at = now
        self._listing = False
        self._counts = {
            "revocations": 0,
            "claims": 0,
            "releases": 0,
            "failovers": 0,
            "suspicions": 0,
        }

    # --- read side ---------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        return self.lifecycle.state

    def held(self) -> tuple[str, ...]:
        """VIPs etcd says we hold (as last listed, plus our own successful claims)."""
        holders = self._holders or {}
        return tuple(sorted(v for v, h in holders.items() if h == self.node_id))

    def suspects(self, now: float) -> frozenset[str]:
        """Members (other than us) silent too long to be trusted."""
        if now < self._quiet_until:
            return frozenset()
        found = set()
        for peer in self.membership.members():
            if peer == self.node_id:
                continue
            if peer in self._heard_this_epoch:
                if now - self._last_heard[peer] > self.window(peer):
                    found.add(peer)
            elif now - self._joined_at.get(peer, now) > self.config.join_grace:
                found.add(peer)
        return frozenset(found)

    def next_deadline(self, now: float) -> float | None:
        """The earliest moment after ``now`` at which :meth:`tick` would decide
        something new on its own (a peer crossing its suspicion window, a
        takeover guard ending); None: nothing due.  The runner ticks at least
        every ``config.tick`` and sooner when this is earlier, so a failover
        does not wait for the tick grid (up to a tick, twice: at suspicion and
        at the claim).  Beacons arriving meanwhile move a suspicion deadline
        away; ticking at the old one is harmless.
        """
        due = [
            self._last_heard[p] + self.window(p) + _DEADLINE_SLACK
            for p in self.membership.members()
            if p != self.node_id and p in self._heard_this_epoch and p not in self._suspected
        ]
        guard = self.config.takeover_guard
        due += [at + guard + _DEADLINE_SLACK for at in self._left_at.values()]
        due += [
            self._arp_guard_expiry(self._last_heard[p]) + _DEADLINE_SLACK
            for p in self._left_at
            if p in self._last_heard
        ]
        later = [t for t in due if t > now]
        return min(later) if later else None

    def window(self, peer: str) -> float:
        """Seconds of silence after which ``peer`` is a suspect (its link's loss considered)."""
        loss = self._link_loss.get(peer, 0.0)
        return suspect_window(self.suspect_after, self.beacon_interval, loss)

    def statistics(self, now: float) -> AgentStats:
        return AgentStats(
            state=self.state,
            epoch=self.epoch,
            members=len(self.membership.members()),
            suspects=tuple(sorted(self.suspects(now))),
            holders_known=self._holders is not None,
            revocations=self._counts["revocations"],
            claims=self._counts["claims"],
            releases=self._counts["releases"],
            fences=self.lifecycle.statistics().fenced,
            failovers=self._counts["failovers"],
            registering=self._registering,
            suspicions=self._counts["suspicions"],
            etcd_degraded=self.health.degraded(now),
            resync_progress=self._sync_progress,
            vips_held=self.held(),
        )

    def status_fields(self, now: float) -> dict[str, Any]:
        """The agent's part of ``status/<node_id>`` (contract C); syncd adds the rest."""
        life = self.lifecycle.statistics()
        etcd = self.health.statistics()
        suspects = self.suspects(now)
        return {
            "node_id": self.node_id,
            "epoch": self.epoch,
            "state": self.state.value,
            "since": life.since,
            "address": self.address,
            "vips": list(self.held()),
            "resync": {
                "active": self.state in (NodeState.JOINING, NodeState.SYNCING),
                "progress": self._sync_progress,
                "done_at": self._resync_done_at,
            },
            "etcd": {"degraded": self.health.degraded(now), "failures": etcd.failures},
            "filter": {"connected": self._filter_connected, "synced": self._filter_synced},
            "peers": {
                peer: {"state": "suspect" if peer in suspects else "up"}
                for peer in sorted(self.membership.members())
                if peer != self.node_id
            },
        }

    # --- inputs ---------------------------------------------------------------------

    def registered(self, epoch: int, now: float) -> list[Action]:
        """Our lease was granted and our record written (first time or after a fence)."""
        self._registering = False
        self._lease_lost = False
        self.epoch = epoch
        self.health.succeeded(now)
        self._holders = None
        self._pending.clear()
        self._quiet_until = max(self._quiet_until, now + self.suspect_after)
        first = self.state is NodeState.JOINING
        self.lifecycle.handle(LocalInput.REGISTERED if first else LocalInput.RECOVERED, now)
        self._resync_started, self._resync_done_at = now, None
        kind = "joined" if first else "recovered"
        return [
            Emit(kind, f"epoch {epoch}"),
            Emit("resync-started"),
            RefreshHolders(),
            PublishStatus(),
        ]

    def register_failed(self, now: float, error: str) -> list[Action]:
        self._registering = False
        self._register_at = now + _REGISTER_RETRY
        self.health.failed(now, error)
        return []

    def etcd_result(self, ok: bool, now: float, error: str = "") -> None:
        """Every etcd call's outcome (fail-static bookkeeping)."""
        if ok:
            self.health.succeeded(now)
        else:
            self.health.failed(now, error)

    def members_snapshot(self, snapshot: MembersSnapshot, now: float) -> list[Action]:
        self.health.succeeded(now)
        return self._changes(self.membership.resync(snapshot, now), now)

    def member_event(self, event: MemberPut | MemberDeleted, now: float) -> list[Action]:
        self.health.succeeded(now)
        return self._changes(self.membership.apply(event, now), now)

    def heard(self, peer: str, now: float) -> None:
        """A message from ``peer`` arrived over sync (heartbeat or data)."""
        self._last_heard[peer] = max(now, self._last_heard.get(peer, now))
        self._heard_this_epoch.add(peer)
        self._suspected.discard(peer)

    def link_loss(self, peer: str, loss: float) -> None:
        """The recent loss of ``peer``'s beacons, 0..1 (``syncd.beacon``): stretches its window."""
        if not 0.0 <= loss <= 1.0:
            raise Misuse(f"link loss {loss!r} is not in 0..1")
        self._link_loss[peer] = loss

    def lease_lost(self, now: float, why: str = "lease lost") -> list[Action]:
        """etcd says our lease is gone (keepalive TTL 0, lease not found, record deleted)."""
        if self._registering or self.state in (NodeState.JOINING, NodeState.LEFT):
            return []
        if self.state is NodeState.FENCED:
            self._lease_lost = True
            return []
        self._lease_lost = True
        new = self.lifecycle.handle(LocalInput.LEASE_LOST, now)
        actions: list[Action] = [DropVips(why), Emit("fenced", why)]
        self._after_fence(now)
        if new is NodeState.LEFT:
            actions.append(Emit("left", "lease lost while draining"))
        return [*actions, PublishStatus()]

    def revoked_notice(self, peer: str, epoch: int, now: float) -> list[Action]:
        """``peer``'s beacon says it revoked our membership ``epoch`` (``syncd.beacon``).

        The same as losing the lease, learnt before our own watch says so: a
        node that only looked dead (late beacons under load) takes its VIPs
        off before the peer claims them.  A notice for an earlier epoch is old
        news (we registered again since).
        """
        if self.epoch is None or epoch != self.epoch:
            return []
        return self.lease_lost(now, f"revoked by {peer}")

    def stalled(self, lag: float, now: float) -> list[Action]:
        """The event loop was late by ``lag`` seconds (a SIGSTOP, swap, a long GC)."""
        self._quiet_until = max(self._quiet_until, now + self.suspect_after)
        live = self.state in (NodeState.SYNCING, NodeState.UP, NodeState.DRAINING)
        if lag > self.config.stall_limit and live:
            why = f"event loop stalled {lag:.3f} s"
            self.lifecycle.handle(LocalInput.ISOLATED, now)
            self._after_fence(now)
            return [DropVips(why), Emit("fenced", why), PublishStatus()]
        if lag > self.suspect_after and live:
            return [CheckLease()]
        return []

    def sync_status(self, ready: bool, progress: float, now: float) -> None:
        """syncd: bulk recovery from peers done (``ready``) and how far (0..1)."""
        self._sync_ready = ready
        self._sync_progress = max(0.0, min(1.0, progress))

    def filter_status(self, connected: bool, synced: bool | None, now: float) -> None:
        """The filter's link: connected to syncd, and its table synced (None: unknown)."""
        self._filter_connected, self._filter_synced = connected, synced

    def drain(self, now: float) -> tuple[bool, str, list[Action]]:
        """Operator asked to drain: (accepted, message, actions)."""
        if self.state is NodeState.DRAINING:
            return True, "already draining", []
        if self.state not in (NodeState.SYNCING, NodeState.UP):
            return False, f"cannot drain in state {self.state.value}", []
        self.lifecycle.handle(LocalInput.DRAIN, now)
        self._drain_started = now
        self._drain_vips = frozenset(self.held())
        vips = ", ".join(sorted(self._drain_vips)) or "no VIPs"
        return (
            True,
            "draining",
            [Emit("drain-started", vips), UpdateRecord(NodeState.DRAINING, ()), PublishStatus()],
        )

    def holders_listed(self, holders: Mapping[str, str], now: float) -> list[Action]:
        self._listing = False
        self.health.succeeded(now)
        if self.state in (NodeState.JOINING, NodeState.FENCED, NodeState.LEFT):
            return []
        # A listing that left before a member's departure reached us may still
        # show its claims: they are gone (see _forget_claims_of).
        departed = self._left_at.keys() - self.membership.members().keys()
        self._holders = {v: h for v, h in holders.items() if h not in departed}
        for vip, holder in self._holders.items():
            self._last_holder[vip] = holder
        return self._check_failovers(now)

    def holders_failed(self, now: float, error: str) -> None:
        self._listing = False
        self.health.failed(now, error)

    def vip_result(
        self, vip: str, claim: bool, ok: bool, now: float, error: str = ""
    ) -> list[Action]:
        """The outcome of a :class:`ClaimVip` / :class:`ReleaseVip` (``ok``: it happened)."""
        self._pending.discard(vip)
        self._holders_at = now  # list again soon: the view moved
        if self._holders is None:
            return []
        actions: list[Action] = []
        if claim and ok:
            self._holders[vip] = self._last_holder[vip] = self.node_id
            self._counts["claims"] += 1
            source = self._failover_source(vip, now)
            detail = vip if source is None else f"{vip} (from {source})"
            actions += [Emit("vip-acquired", detail), *self._check_failovers(now)]
        elif not claim and ok:
            if self._holders.get(vip) == self.node_id:
                del self._holders[vip]
            self._counts["releases"] += 1
            actions.append(Emit("vip-released", vip))
        elif error:
            actions.append(Log("warning", f"VIP {vip}: {error}"))
        if ok:
            actions += [UpdateRecord(self.state, self.held()), PublishStatus()]
        return actions

    def revoke_result(self, peer: str, epoch: int, ok: bool, now: float) -> list[Action]:
        if not ok:
            self._revoking.pop(peer, None)  # retried at the next tick if still suspect
            return []
        self._counts["revocations"] += 1
        actions: list[Action] = [Emit("revoked", f"{peer} epoch {epoch}")]
        # Its claims went with its lease: list them now, not at the next tick
        # or polling interval (every ms here is failover time).
        if self._listing:
            self._holders_at = -math.inf  # the listing out may predate the revoke
        else:
            self._listing, self._holders_at = True, now
            actions.append(RefreshHolders())
        return actions

    def dropped(self, now: float, complete: bool = True) -> None:
        """The outcome of a :class:`DropVips`: every VIP address is off the host, or
        (``complete=False``) the host kept refusing to take some off.

        A fenced node with an address left must not register again (and
        claim, and reopen its ARP guard): it retries the drop every
        ``_REGISTER_RETRY`` first.
        """
        if not complete:
            self._register_at = max(self._register_at, now + _REGISTER_RETRY)
        elif self._drop_incomplete:
            self._register_at = now  # clean at last: register without more delay
        self._drop_incomplete = not complete
        if self._holders is not None:
            self._holders = {v: h for v, h in self._holders.items() if h != self.node_id}

    # --- the decisions ------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Everything due at ``now``; call every ``config.tick`` seconds and after inputs."""
        actions: list[Action] = []
        state = self.state
        if state is NodeState.LEFT:
            return self._status_due(now, actions)
        degraded = self.health.degraded(now)
        if degraded != self._degraded_reported and state is not NodeState.JOINING:
            self._degraded_reported = degraded
            error = self.health.statistics().last_error
            kind = "etcd-degraded" if degraded else "etcd-recovered"
            actions += [Emit(kind, error if degraded else ""), PublishStatus()]
        if state in (NodeState.JOINING, NodeState.FENCED):
            if self._drop_incomplete and now >= self._register_at:
                self._register_at = now + _REGISTER_RETRY
                return [*actions, DropVips("addresses left after the fence")]
            if not self._registering and now >= self._register_at:
                self._registering = True
                why = "start" if state is NodeState.JOINING else "rejoin after fence"
                actions.append(Register(why))
            return self._status_due(now, actions)
        suspects = self.suspects(now)
        for peer in sorted(suspects - self._suspected):
            self._suspected.add(peer)
            self._counts["suspicions"] += 1
            actions.append(Emit("suspect", f"{peer} silent"))
        peers = set(self.membership.members()) - {self.node_id}
        if should_fence(degraded, peers, suspects):
            return [*actions, *self._fence_isolated(now)]
        if degraded:
            return self._status_due(now, actions)  # fail static: move nothing, revoke nobody
        actions += self._confirm(suspects, now)
        actions += self._gate(now)
        if self._holders is not None:
            actions += self._plan(suspects, now)
            actions += self._drain_progress(now)
        # The listing goes after the claims: the runner runs actions in order,
        # and a claim due now must not wait for an etcd round trip whose answer
        # this tick's plan cannot use anyway.
        due = self._holders is None or now - self._holders_at >= self.config.holders_interval
        if due and not self._listing:
            self._listing = True
            self._holders_at = now
            actions.append(RefreshHolders())
        return self._status_due(now, actions)

    def _fence_isolated(self, now: float) -> list[Action]:
        self.lifecycle.handle(LocalInput.ISOLATED, now)
        self._after_fence(now)
        why = "etcd and every peer unreachable"
        return [DropVips(why), Emit("fenced", why), PublishStatus()]

    def isolation_check(self, now: float) -> list[Action]:
        """Every peer silent while etcd still looks fine: ask etcd now (a :class:`ProbeEtcd`).

        The peers (if they are alive and together) revoke us about
        ``suspect_after`` after our last message reached them and claim our
        VIPs ``takeover_guard`` later; etcd's own grace is a whole lease TTL.
        So ARP for our VIPs stops while we ask (the ARP guard: routers then
        follow the peers' announcements, as they would after a fence), and
        comes back when etcd answers or any peer is heard again.  One probe
        per ``suspect_after`` while the silence lasts, each unanswered one
        with twice the deadline (up to half the lease TTL): a slow etcd
        answers eventually.  Called by the runner from a task of its own,
        every tick: the main task may be waiting on etcd (up to its timeout)
        exactly when etcd is cut off.
        """
        if self.state not in (NodeState.SYNCING, NodeState.UP, NodeState.DRAINING):
            return []
        silent = self._all_peers_silent(now)
        if self._shut_isolated and not silent and not self._probing:
            return self._reopen_isolated()  # a peer spoke: we are not the cut-off side
        if self.health.degraded(now):
            return []  # tick() decides with should_fence()
        if not silent or now - self._probe_at < self.suspect_after:
            return []
        # An answer always comes (the runner turns every failure into one);
        # a probe older than its deadline plus a window is forgotten anyway.
        if self._probing and now - self._probe_at < self.suspect_after + self._probe_wait:
            return []
        self._probing, self._probe_at = True, now
        actions: list[Action] = [ProbeEtcd(self._probe_wait)]
        if not self._shut_isolated:
            self._shut_isolated = True
            actions.insert(0, GuardArp(False, ISOLATED))
        return actions

    def etcd_probed(self, ok: bool, now: float, error: str = "") -> list[Action]:
        """The outcome of a :class:`ProbeEtcd`.

        Answered: etcd is there, so we are not the isolated side (the peers
        may all be dead; alive, they revoke us and the watch tells us): ARP
        back on.  Unanswered while every peer is still silent: we may be the
        cut-off side; ARP stays off, the next probe waits longer, and we
        fence as soon as etcd's health grace runs out (:meth:`tick`) or our
        lease is gone.  Fencing at the first unanswered probe turned a slow
        etcd at the moment a peer died into an outage of the survivor.
        """
        self._probing = False
        if ok:
            self.health.succeeded(now)
            return self._reopen_isolated()
        self.health.failed(now, error or "etcd probe timed out")
        live = self.state in (NodeState.SYNCING, NodeState.UP, NodeState.DRAINING)
        if not live or not self._all_peers_silent(now):
            return self._reopen_isolated()  # someone spoke meanwhile: the tick decides as usual
        first = self._probe_wait == self.config.isolation_probe
        self._probe_wait = min(self._probe_wait * 2, self.config.etcd.lease_ttl / 2)
        if not first:
            return []
        why = f"every peer silent and etcd did not answer within {self.config.isolation_probe} s"
        return [Log("warning", f"{why}: ARP for our VIPs off while we keep asking")]

    def _all_peers_silent(self, now: float) -> bool:
        """We have peers and every one of them is a suspect: we may be the cut-off side."""
        peers = set(self.membership.members()) - {self.node_id}
        return bool(peers) and peers <= self.suspects(now)

    def _reopen_isolated(self) -> list[Action]:
        self._probe_wait = self.config.isolation_probe
        if not self._shut_isolated:
            return []
        self._shut_isolated = False
        return [GuardArp(True, ISOLATED)]

    def _status_due(self, now: float, actions: list[Action]) -> list[Action]:
        if any(isinstance(a, PublishStatus) for a in actions):
            self._status_at = now
        elif now - self._status_at >= self.config.status_interval:
            self._status_at = now
            actions.append(PublishStatus())
        return actions

    def _confirm(self, suspects: frozenset[str], now: float) -> list[Action]:
        if self.state is not NodeState.UP or not suspects:
            return []
        members = set(self.membership.members()) | {self.node_id}
        # Alive for the quorum means heard within half the suspicion window,
        # not merely "not suspect yet": when a partition cuts us off, our
        # peers fall silent at the same moment but cross suspect_after a few
        # ms apart, and the first suspect must not find the others still
        # counted alive (the minority would revoke the majority).
        alive = {self.node_id} | {
            p for p in members if now - self._last_heard.get(p, -math.inf) <= self.window(p) / 2
        }
        if not has_quorum(members, alive):
            return []
        actions: list[Action] = []
        for peer in sorted(suspects):
            record = self.membership.get(peer)
            if record is None or self._revoking.get(peer) == record.epoch:
                continue
            self._revoking[peer] = record.epoch
            actions.append(RevokePeer(peer, record.epoch))
        return actions

    def _gate(self, now: float) -> list[Action]:
        """syncing -> up once syncd recovered and the filter is synced."""
        if self.state is not NodeState.SYNCING or not self._sync_ready:
            return []
        if self.config.require_filter and self._filter_synced is not True:
            if self._said_waiting_filter:
                return []
            self._said_waiting_filter = True
            why = "no filter connected" if not self._filter_connected else "filter not synced"
            return [Log("warning", f"{why}: staying syncing"), PublishStatus()]
        self._said_waiting_filter = False
        self.lifecycle.handle(LocalInput.SYNCED, now)
        self._resync_done_at = now
        took = None if self._resync_started is None else (now - self._resync_started) * 1000
        return [
            Emit("resync-done", "", took),
            UpdateRecord(NodeState.UP, self.held()),
            PublishStatus(),
        ]

    def _live(self) -> frozenset[str]:
        live = set(self.membership.live())
        if self.state is NodeState.UP:
            live.add(self.node_id)
        else:
            live.discard(self.node_id)
        return frozenset(live)

    def _ring(self, live: frozenset[str]) -> HashRing:
        ring = self._rings.get(live)
        if ring is None:
            if len(self._rings) >= 8:
                self._rings.pop(next(iter(self._rings)))
            ring = self._rings[live] = HashRing(live)
        return ring

    def _plan(self, suspects: frozenset[str], now: float) -> list[Action]:
        assert self._holders is not None
        live = self._live()
        if not live:
            release = [v for v, h in self._holders.items() if h == self.node_id]
            return self._releases(release)
        plan = plan_vips(self._vips, self._ring(live), self._holders, self.node_id,
                         homes=self._homes)  # fmt: skip
        self._targeted = frozenset(a.vip for a in plan.assignments if a.target == self.node_id)
        actions = self._releases(plan.release)
        if self.state is not NodeState.UP:
            return actions
        for vip in plan.claim:
            if vip in self._pending or self._held_elsewhere(vip, now):
                continue
            self._pending.add(vip)
            actions.append(ClaimVip(vip))
        return actions

    def _releases(self, vips: Iterable[str]) -> list[Action]:
        actions: list[Action] = []
        for vip in vips:
            if vip not in self._pending:
                self._pending.add(vip)
                actions.append(ReleaseVip(vip))
        return actions

    def _held_elsewhere(self, vip: str, now: float) -> bool:
        """A free VIP we should still not claim (see the module docstring)."""
        last = self._last_holder.get(vip)
        if last is None or last == self.node_id or last in self.membership.members():
            return False
        if now - self._left_at.get(last, -math.inf) < self.config.takeover_guard:
            return True
        heard = self._last_heard.get(last, -math.inf)
        if now < self._arp_guard_expiry(heard):
            return True  # a frozen holder's kernel may still answer ARP for it
        return now - heard <= self.window(last)  # cut off from etcd only: fail static there

    def _arp_guard_expiry(self, last_heard: float) -> float:
        """When a holder last heard at ``last_heard`` surely stopped answering ARP.

        A frozen node keeps its addresses, and its kernel answers ARP for
        them until its guard's keepalive (``arp_guard`` after the agent's
        last frame, ``cluster.arpguard``) runs out: claiming before that
        would leave two nodes answering for the VIP.  Every node of a
        cluster runs with the same ``arp_guard``.
        """
        if not self.config.arp_guard:
            return -math.inf
        return last_heard + self.config.arp_guard + _ARP_GUARD_MARGIN

    def _drain_progress(self, now: float) -> list[Action]:
        if self.state is not NodeState.DRAINING or self._drain_started is None:
            return []
        assert self._holders is not None
        mine = [v for v, h in self._holders.items() if h == self.node_id]
        taken = all(self._holders.get(v) not in (None, self.node_id) for v in self._drain_vips)
        timed_out = now - self._drain_started > self.config.drain_timeout
        if (mine or not taken) and not timed_out:
            return []
        self.lifecycle.handle(LocalInput.DRAINED, now)
        took = (now - self._drain_started) * 1000
        detail = "timed out waiting for other nodes" if timed_out and not taken else ""
        actions: list[Action] = [Emit("drained", detail, took)]
        if mine:
            actions.append(DropVips("drain timed out"))
        return [*actions, Leave(), Emit("left", "drained"), PublishStatus()]

    # --- membership bookkeeping ----------------------------------------------------------

    def _changes(self, changes: list[MemberChange], now: float) -> list[Action]:
        actions: list[Action] = []
        for change in changes:
            if isinstance(change, MemberLeft):
                actions += self._member_left(change.record, now)
            elif isinstance(change, MemberJoined):
                self._member_seen(change.record, now, fresh=True)
            elif isinstance(change, MemberChanged):
                self._member_seen(change.new, now, fresh=change.restarted)
        if changes:
            self._holders_at = -math.inf  # list the claims again at the next tick
        return actions + self._peers_changed(now)

    def _member_seen(self, record: MemberRecord, now: float, fresh: bool) -> None:
        self._last_records[record.node_id] = record
        if record.node_id == self.node_id:
            return
        if fresh:
            self._joined_at[record.node_id] = now
            self._heard_this_epoch.discard(record.node_id)
            self._revoking.pop(record.node_id, None)
            # It is back: a takeover of its old VIPs still pending is no
            # longer a failover (and its duration would count from before).
            self._failovers.pop(record.node_id, None)
        self._left_at.pop(record.node_id, None)

    def _member_left(self, record: MemberRecord, now: float) -> list[Action]:
        peer = record.node_id
        if peer == self.node_id:
            if self.epoch is not None and record.epoch == self.epoch:
                return self.lease_lost(now, "our member record was deleted")
            return []
        self._left_at[peer] = now
        self._joined_at.pop(peer, None)
        self._heard_this_epoch.discard(peer)
        self._suspected.discard(peer)
        self._revoking.pop(peer, None)
        vips = frozenset(v for v, h in self._last_holder.items() if h == peer)
        if vips:
            self._failovers[peer] = _Failover(peer, self._last_heard.get(peer), vips, now)
        self._forget_claims_of(peer)
        for old, at in list(self._last_heard.items()):
            if now - at > _HEARD_KEEP:
                del self._last_heard[old]
                self._link_loss.pop(old, None)
        return []

    def _forget_claims_of(self, peer: str) -> None:
        """A departed member's VIP claims went with its lease (one etcd revision
        deletes the record and every key bound to that lease): treat them as
        gone now instead of waiting up to ``holders_interval`` for the next
        listing, which made a taker that did not revoke the peer itself claim
        up to 250 ms late.  The claim transaction still decides (create only
        if absent), and ``_held_elsewhere`` keeps the takeover guard and the
        fail-static rule; a listing follows to confirm the view (``_changes``
        asks for one after any membership change).
        """
        if self._holders is not None and peer in self._holders.values():
            self._holders = {v: h for v, h in self._holders.items() if h != peer}

    def _peers_changed(self, now: float) -> list[Action]:
        members = self.membership.members()
        peers = {n: r.address for n, r in members.items() if n != self.node_id}
        # Departed holders still heard keep their sync link: we must keep hearing them.
        for vip_holder in set(self._last_holder.values()) - set(peers) - {self.node_id}:
            record = self._last_records.get(vip_holder)
            heard = self._last_heard.get(vip_holder, -math.inf)
            if record is not None and now - heard <= self.window(vip_holder):
                peers[vip_holder] = record.address
        wanted = tuple(sorted(peers.items()))
        if wanted == self._peers_sent:
            return []
        self._peers_sent = wanted
        return [SetPeers(wanted)]

    def _after_fence(self, now: float) -> None:
        self._holders = None
        self._pending.clear()
        self._revoking.clear()
        self._register_at = now
        self._drain_started = None
        # The runner reopens every guard reason when we register again.
        self._shut_isolated = False
        self._probe_wait = self.config.isolation_probe

    # --- failover measurement ------------------------------------------------------------

    def _failover_source(self, vip: str, now: float) -> str | None:
        for failover in self._failovers.values():
            if vip in failover.vips:
                failover.mine.add(vip)
                failover.acquired_at = now
                return failover.peer
        return None

    def _check_failovers(self, now: float) -> list[Action]:
        actions: list[Action] = []
        holders = self._holders or {}
        for peer, f in list(self._failovers.items()):
            if now - f.started > _FAILOVER_FORGET:
                del self._failovers[peer]
                continue
            if not f.mine or f.acquired_at is None:
                if all(holders.get(v) not in (None, peer) for v in f.vips):
                    del self._failovers[peer]  # other nodes took them all
                continue
            # Our share is done once we hold every one of its VIPs the ring
            # gives us; VIPs going to other nodes are their events, not ours.
            if any(v in self._targeted and holders.get(v) != self.node_id for v in f.vips):
                continue
            del self._failovers[peer]
            self._counts["failovers"] += 1
            duration = None if f.last_heard is None else (f.acquired_at - f.last_heard) * 1000
            detail = f"{peer}: {', '.join(sorted(f.mine))} of {len(f.vips)} VIPs"
            actions.append(Emit("failover", detail, duration))
        return actions
