"""The cluster agent's adapter: runs :class:`cluster.agent.Agent` on syncd's event loop.

It is the only agent code that does I/O: etcd (lease, member watch, claims,
status and events), the VIP addresses (:class:`cluster.vip.VipManager`, one
per configured interface, in this process's network namespace), syncd (a
:class:`SyncView`: peers, heartbeat counters, recovery progress) and the
filter's control socket (its ``synced`` flag).

One task (:meth:`AgentRunner.run`) does everything that touches VIPs, in
order, every ``tick``: first it measures how late it woke (a SIGSTOP, swap,
a long pause); a stall longer than ``stall_limit`` makes it take every VIP
address off *before anything else*, since peers have probably revoked us
and claimed them.  Then it feeds the agent its inputs and runs the actions
the agent returns.  Status and events go through a bounded queue to a writer
task, so a slow etcd never delays a failover; overflow is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cluster.agent import (
    Action,
    Agent,
    CheckLease,
    ClaimVip,
    DropVips,
    Emit,
    GuardArp,
    Leave,
    Log,
    ProbeEtcd,
    PublishStatus,
    RefreshHolders,
    Register,
    ReleaseVip,
    RevokePeer,
    SetPeers,
    UpdateRecord,
)
from cluster.arpguard import ArpGuard
from cluster.config import AgentConfig
from cluster.errors import ClusterError, EtcdError, EtcdRejected, LeaseLost
from cluster.etcd import EtcdMembership
from cluster.membership import MembersSnapshot, NodeState
from cluster.metrics import FailoverDurations
from cluster.vip import VipError, VipManager, acquire, relinquish

__all__ = ["AgentRunner", "RunnerStats", "SyncView"]

log = logging.getLogger("cluster.agent")

_EVENT_QUEUE: Final = 256  # events waiting for etcd; older ones are dropped (counted)
_WATCH_RETRY: Final = 0.2
# Seconds our beacons keep telling a revoked peer so: one arriving fences it
# (syncd.beacon); a live peer hears it within ms, a dead one never will.
_NOTICE_KEEP: Final = 5.0
_DROP_ATTEMPTS: Final = 20  # passes over the interfaces a fence makes before giving up
_DROP_RETRY: Final = 0.005  # seconds between them


class SyncView(Protocol):
    """What the agent needs from syncd (implemented in ``syncd.daemon``)."""

    def set_peers(self, peers: Sequence[tuple[str, str]]) -> None: ...

    def messages_received(self) -> Mapping[str, int]:
        """Per peer, messages received so far (grows with every heartbeat)."""
        ...

    def beacons_heard(self) -> Mapping[str, float]:
        """Per peer, when its last liveness beacon arrived (monotonic); {} without beacons."""
        ...

    def beacons_loss(self) -> Mapping[str, float]:
        """Per peer, the recent loss of its beacons (0..1); {} without beacons."""
        ...

    def on_revoked(self, hook: Callable[[str, int], None] | None) -> None:
        """Call ``hook(peer, epoch)`` from any thread when a peer says it revoked
        our membership ``epoch`` (beacon notices; never called without beacons)."""
        ...

    def on_beacon_round(self, hook: Callable[[], None] | None) -> bool:
        """Call ``hook()`` from the beacon thread after each round of our beacons
        (sent only while this process's loop runs, within its stall limit);
        False: no beacons, the hook is never called."""
        ...

    def set_own_epoch(self, epoch: int) -> None:
        """Our membership epoch: the one notices must name to count."""
        ...

    def set_notices(self, notices: Mapping[str, int]) -> None:
        """Tell each peer, as fast as we can, that we revoked this epoch of it."""
        ...

    def sync_progress(self) -> tuple[bool, float]:
        """(bulk recovery from peers done, fraction of peers synced)."""
        ...

    def filter_connected(self) -> bool: ...

    def status_extra(self) -> dict[str, Any]:
        """``flows`` and per-peer ``lag_p99_ms`` / ``outbox`` for the status document."""
        ...


@dataclass(frozen=True, slots=True)
class RunnerStats:
    events_written: int
    events_dropped: int  # queue overflow while etcd was slow or down
    status_written: int
    stalls: int
    max_lag_seconds: float
    vip_errors: int


class AgentRunner:
    """Drive the agent; ``await runner.run()`` until cancelled, then ``await runner.close()``."""

    def __init__(
        self,
        config: AgentConfig,
        node_id: str,
        cluster_id: str,
        address: str,
        suspect_after: float,
        sync: SyncView,
        filter_control: str | None = None,
        beacon_interval: float | None = None,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.sync = sync
        self.filter_control = filter_control
        self._filter_stats: dict[str, Any] | None = None  # last reply to {"cmd": "stats"}
        self.failover_durations = FailoverDurations()  # for stockade_cluster_failover_...
        self._rules_revision: int | None = None  # etcd ruleset revision the filter runs
        now = time.monotonic()
        self.agent = Agent(config, node_id, address, suspect_after, now, beacon_interval)
        self.etcd = EtcdMembership(config.etcd, cluster_id)
        self._managers: dict[str, VipManager] = {}
        self._pending: list[Action] = []
        self._seen_messages: dict[str, int] = {}
        self._seen_beacon: dict[str, float] = {}
        self._events: deque[bytes] = deque()
        self._status: bytes | None = None
        self._wake_writer = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0
        self._health_seen = (0, 0)
        self._counts = {"events": 0, "dropped": 0, "status": 0, "stalls": 0, "vip_errors": 0}
        self._max_lag = 0.0
        self._stall = 0.0
        self.last_failover_ms: float | None = None  # duration of the last failover event
        self._lease_lost_seen: object | None = None
        self._guard: ArpGuard | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # peer -> (its epoch we revoked, when): told in our beacons for a while.
        self._notices: dict[str, tuple[int, float]] = {}

    # --- life cycle ----------------------------------------------------------------

    async def open(self) -> None:
        """Open the interfaces, take off addresses a previous run left behind,
        install the ARP guard (before any VIP is added)."""
        for spec in self.config.vips:
            if spec.interface not in self._managers:
                manager = VipManager(spec.interface, lifetime=self.config.vip_lifetime or None)
                await manager.open()
                self._managers[spec.interface] = manager
        await self._drop_all("start: addresses left by a previous run")
        if self.config.arp_guard and self._managers:
            vips = [spec.address for spec in self.config.vips]
            self._guard = ArpGuard(list(self._managers), vips, self.config.arp_guard)
            await self._guard.install()
            self._guard.keepalive()
            # ARP for our VIPs lives as long as our peers hear us: a loop busy
            # for 150 ms (a SYN flood's deltas) must not silence ARP while the
            # peers, still hearing our beacons, leave the VIPs with us.  A
            # frozen process stops both at once; a hung loop stops the beacons
            # after the stall limit, and this with them.
            self.sync.on_beacon_round(self._guard.keepalive)
        self._loop = asyncio.get_running_loop()
        self.sync.on_revoked(self._revoked_in_thread)

    def _revoked_in_thread(self, peer: str, epoch: int) -> None:
        """A peer revoked us (beacon thread): stop ARP now, fence at the next tick.

        The guard first, from this thread: our loop may be the slow part, and
        the peer claims our VIPs ~40 ms after its revocation.
        """
        if self._guard is not None:
            self._guard.shut("revoked")
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._revoked_notice, peer, epoch)

    def _revoked_notice(self, peer: str, epoch: int) -> None:
        log.warning("%s revoked our membership (epoch %d): fencing", peer, epoch)
        self._pending += self.agent.revoked_notice(peer, epoch, time.monotonic())

    async def run(self) -> None:
        self._tasks = [
            asyncio.create_task(self._probe_loop(), name="agent-probe"),
            asyncio.create_task(self._watch_loop(), name="agent-watch"),
            asyncio.create_task(self._writer_loop(), name="agent-writer"),
        ]
        if self.filter_control:
            self._tasks.append(asyncio.create_task(self._filter_loop(), name="agent-filter"))
        if self.config.vip_lifetime:
            self._tasks.append(asyncio.create_task(self._renew_loop(), name="agent-renew"))
        self._tasks.append(asyncio.create_task(self._isolation_loop(), name="agent-isolation"))
        if self._guard is not None:
            self._tasks.append(asyncio.create_task(self._keepalive_loop(), name="agent-keepalive"))
        delay = self.config.tick
        while True:
            await asyncio.sleep(delay)
            stall, self._stall = self._stall, 0.0
            start = time.monotonic()
            due = self.agent.next_deadline(start)
            if stall:
                await self._execute(self.agent.stalled(stall, start))
            await self._step(time.monotonic())
            delay = self._until_next_step(due)

    def _until_next_step(self, due_during_step: float | None = None) -> float:
        """A tick, or less when the agent has a deadline sooner (``Agent.next_deadline``);
        no wait when a deadline came while the last step waited on etcd (a claim
        whose takeover guard ended during a slow listing must not wait a tick).
        """
        now = time.monotonic()
        if due_during_step is not None and due_during_step <= now:
            return 0.0
        due = self.agent.next_deadline(now)
        if due is None:
            return self.config.tick
        return min(self.config.tick, max(0.0, due - now))

    async def _probe_loop(self) -> None:
        """Measure how late the loop wakes; on a long stall take the addresses off at once.

        A task of its own, so a stall is caught even while the main task waits
        on etcd; after SIGCONT its short timer is among the first callbacks due.
        """
        tick = self.config.tick
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            lag = time.monotonic() - before - tick
            self._max_lag = max(self._max_lag, lag)
            if lag <= self.agent.suspect_after:
                continue
            self._counts["stalls"] += 1
            self._stall = max(self._stall, lag)
            log.warning("event loop stalled %.3f s", lag)
            if lag > self.config.stall_limit:
                await self._drop_all(f"event loop stalled {lag:.3f} s")

    async def _isolation_loop(self) -> None:
        """Probe etcd as soon as every peer falls silent (ARP off until it answers).

        A task of its own: when the node is cut off from etcd, the main task
        is typically waiting on an etcd call (up to the etcd timeout, 1 s),
        and the peers take our VIPs within ``suspect_after`` plus a few ms.
        Everything the probe's outcome asks for (addresses off, events,
        status) is local or queued: it never waits on etcd itself.
        """
        while True:
            await asyncio.sleep(self.config.tick)
            now = time.monotonic()
            self._feed_heard(now)
            for action in self.agent.isolation_check(now):
                if isinstance(action, ProbeEtcd):
                    await self._execute(await self._probe_etcd(action.timeout))
                elif isinstance(action, GuardArp):
                    await self._execute([action])

    async def _keepalive_loop(self) -> None:
        """Keep the ARP guard open while this loop runs (cluster.arpguard)."""
        guard = self._guard
        assert guard is not None
        every = guard.timeout / 5  # four keepalives may be late before ARP stops
        reported = 0
        while True:
            await asyncio.sleep(every)
            guard.keepalive()
            errors = guard.statistics().errors
            if errors > reported:
                reported = errors
                log.error("ARP guard keepalive refused (%d so far): VIP ARP may stop", errors)

    async def _renew_loop(self) -> None:
        """Renew the kernel lifetime of the VIPs we hold (see AgentConfig.vip_lifetime)."""
        every = self.config.vip_lifetime / 4
        while True:
            await asyncio.sleep(every)
            held = self.agent.held()
            for manager in self._managers.values():
                mine = [self._address(v) for v in held if self._manager(v) is manager]
                try:
                    await manager.refresh(mine)
                except VipError as exc:
                    self._counts["vip_errors"] += 1
                    log.error("cannot renew VIPs on %s: %s", manager.ifname, exc)

    async def close(self, leave: bool = True) -> None:
        """Stop the tasks, take our VIPs down and give the lease back (``leave``)."""
        self.sync.on_revoked(None)
        self.sync.on_beacon_round(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(ClusterError):
            for vip in self.agent.held():
                await relinquish(self.etcd, self._manager(vip), self._address(vip), self.node_id)
        await self._drop_all("stopping")
        if self._guard is not None:
            with contextlib.suppress(VipError):
                await self._guard.remove()
        await self._flush_events()
        try:
            if leave:
                await self.etcd.leave()
            else:
                await self.etcd.abandon()
        except EtcdError as exc:
            log.warning("leaving without revoking the lease: %s", exc)
        await self.etcd.close()
        for manager in self._managers.values():
            manager.close()

    def queue(self, actions: list[Action]) -> None:
        """Actions decided outside the loop (a control command); run at the next tick."""
        self._pending += actions

    def statistics(self) -> RunnerStats:
        return RunnerStats(
            events_written=self._counts["events"],
            events_dropped=self._counts["dropped"],
            status_written=self._counts["status"],
            stalls=self._counts["stalls"],
            max_lag_seconds=self._max_lag,
            vip_errors=self._counts["vip_errors"],
        )

    # --- one step ------------------------------------------------------------------

    async def _step(self, now: float) -> None:
        agent = self.agent
        self._expire_notices(now)
        self._feed_health()
        lost = self.etcd.lease_lost
        if lost is not None and lost is not self._lease_lost_seen:
            self._lease_lost_seen = lost
            await self._execute(agent.lease_lost(now, str(lost)))
        self._feed_heard(now)
        ready, progress = self.sync.sync_progress()
        agent.sync_status(ready, progress, now)
        if not self.filter_control:
            agent.filter_status(self.sync.filter_connected(), None, now)
        pending, self._pending = self._pending, []
        await self._execute(pending)
        # The actions above may have waited on etcd (up to its timeout when it
        # is down): read the peers' traffic again, or a slow etcd call would
        # make every peer look silent and a healthy cluster revoke or fence.
        now = time.monotonic()
        self._feed_heard(now)
        await self._execute(agent.tick(now))

    def _expire_notices(self, now: float) -> None:
        """Stop telling a revoked peer after _NOTICE_KEEP: it fenced, or it is dead."""
        old = [p for p, (_, at) in self._notices.items() if now - at > _NOTICE_KEEP]
        for peer in old:
            del self._notices[peer]
        if old:
            self._push_notices()

    def _push_notices(self) -> None:
        self.sync.set_notices({peer: epoch for peer, (epoch, _) in self._notices.items()})

    def _feed_heard(self, now: float) -> None:
        """A peer is heard if its sync stream or its UDP beacons brought anything.

        The beacons (``syncd.beacon``) are what keeps a live peer from
        looking dead when its stream waits on a lost TCP segment or on a
        busy event loop; their arrival time is the beacon thread's clock.
        """
        for peer, count in self.sync.messages_received().items():
            # Only growth is news: a replaced link (the peer left and came back)
            # starts again from 0 and must not count as a heartbeat.
            if count > self._seen_messages.get(peer, 0):
                self.agent.heard(peer, now)
            self._seen_messages[peer] = count
        for peer, at in self.sync.beacons_heard().items():
            if at > self._seen_beacon.get(peer, -math.inf):
                self._seen_beacon[peer] = at
                self.agent.heard(peer, min(at, now))
        for peer, loss in self.sync.beacons_loss().items():
            self.agent.link_loss(peer, min(max(loss, 0.0), 1.0))

    def _feed_health(self) -> None:
        stats = self.etcd.health.statistics()
        seen = (stats.successes, stats.failures)
        if seen == self._health_seen:
            return
        if stats.successes != self._health_seen[0] and stats.last_success is not None:
            self.agent.etcd_result(True, stats.last_success)
        if stats.failures != self._health_seen[1] and stats.last_failure is not None:
            self.agent.etcd_result(False, stats.last_failure, stats.last_error)
        self._health_seen = seen

    async def _execute(self, actions: list[Action]) -> None:
        i = 0
        while i < len(actions):
            # Claims of different VIPs are independent (one etcd transaction
            # each, then the address and its announcements): run a batch of
            # them at once, so taking over a dead node's VIPs costs one round
            # trip, not one per VIP.
            j = i
            while j < len(actions) and isinstance(actions[j], ClaimVip):
                j += 1
            if j - i > 1:
                results = await asyncio.gather(*(self._run_action(a) for a in actions[i:j]))
                more = [a for result in results for a in result]
                i = j
            else:
                more = await self._run_action(actions[i])
                i += 1
            if more:
                await self._execute(more)

    async def _run_action(self, action: Action) -> list[Action]:
        agent, now = self.agent, time.monotonic
        if isinstance(action, DropVips):
            log.warning("dropping every VIP: %s", action.reason)
            agent.dropped(now(), await self._drop_all(action.reason))
        elif isinstance(action, ClaimVip):
            return await self._claim(action.vip)
        elif isinstance(action, ReleaseVip):
            return await self._release(action.vip)
        elif isinstance(action, RevokePeer):
            try:
                ok = await self.etcd.revoke_member(action.node_id, action.epoch)
            except EtcdError as exc:
                log.warning("revoking %s failed: %s", action.node_id, exc)
                ok = False
            else:
                log.warning("revoked %s (epoch %d): %s", action.node_id, action.epoch, ok)
            if ok:  # tell it in our beacons: it may be alive, and must stop answering ARP
                self._notices[action.node_id] = (action.epoch, now())
                self._push_notices()
            return agent.revoke_result(action.node_id, action.epoch, ok, now())
        elif isinstance(action, SetPeers):
            self.sync.set_peers(action.peers)
        elif isinstance(action, RefreshHolders):
            try:
                holders = await self.etcd.vip_holders()
            except EtcdError as exc:
                agent.holders_failed(now(), str(exc))
                return []
            return agent.holders_listed(holders, now())
        elif isinstance(action, Register):
            return await self._register(action.reason)
        elif isinstance(action, CheckLease):
            try:
                await self.etcd.lease_info()
            except LeaseLost as exc:
                return agent.lease_lost(now(), str(exc))
            except (EtcdError, ClusterError) as exc:
                log.info("lease check: %s", exc)
        elif isinstance(action, GuardArp):
            if self._guard is not None:
                if action.open:
                    self._guard.reopen(action.reason)
                else:
                    self._guard.shut(action.reason)
        elif isinstance(action, ProbeEtcd):  # normally run by _isolation_loop
            return await self._probe_etcd(action.timeout)
        elif isinstance(action, UpdateRecord):
            with contextlib.suppress(EtcdError, ClusterError):
                await self.etcd.update(action.state, action.vips)
        elif isinstance(action, PublishStatus):
            self._queue_status()
        elif isinstance(action, Emit):
            self._queue_event(action)
        elif isinstance(action, Log):
            getattr(log, action.level, log.info)("%s", action.message)
        elif isinstance(action, Leave):
            with contextlib.suppress(EtcdError):
                await self.etcd.leave()
        return []

    # --- VIPs ------------------------------------------------------------------------

    def _address(self, vip: str) -> str:
        return self.config.spec(vip).address

    def _manager(self, vip: str) -> VipManager:
        return self._managers[self.config.spec(vip).interface]

    async def _claim(self, vip: str) -> list[Action]:
        now = time.monotonic
        try:
            ok = await acquire(
                self.etcd, self._manager(vip), self._address(vip), self.node_id,
                self.etcd.lease_id, announcements=self.config.announcements,
            )  # fmt: skip
        except (EtcdError, VipError) as exc:
            self._counts["vip_errors"] += isinstance(exc, VipError)
            return self.agent.vip_result(vip, True, False, now(), str(exc))
        except ClusterError as exc:  # not registered (fenced meanwhile)
            return self.agent.vip_result(vip, True, False, now(), str(exc))
        if ok and self.agent.state not in (NodeState.UP, NodeState.DRAINING):
            # Fenced while the claim was in flight (_isolation_loop, a stall):
            # the address went on after the fence took every address off.
            log.warning("VIP %s acquired after this node was fenced: giving it back", vip)
            try:
                await relinquish(self.etcd, self._manager(vip), self._address(vip), self.node_id)
            except (EtcdError, VipError):
                await self._drop_all("claimed while fenced")  # the address at least
            return self.agent.vip_result(vip, True, False, now(), "fenced during the claim")
        if ok:
            log.info("acquired VIP %s", vip)
        return self.agent.vip_result(vip, True, ok, now())

    async def _release(self, vip: str) -> list[Action]:
        try:
            ok = await relinquish(self.etcd, self._manager(vip), self._address(vip), self.node_id)
        except (EtcdError, VipError) as exc:
            self._counts["vip_errors"] += isinstance(exc, VipError)
            return self.agent.vip_result(vip, False, False, time.monotonic(), str(exc))
        log.info("released VIP %s", vip)
        return self.agent.vip_result(vip, False, ok, time.monotonic())

    async def _drop_all(self, reason: str) -> bool:
        """Take every VIP off every interface; True once none is left.

        A fence that leaves an address behind is a second holder as soon as
        a peer claims the VIP, so a failed pass (a netlink error) is tried
        again, ``_DROP_ATTEMPTS`` times ``_DROP_RETRY`` apart, before giving
        up loudly (the kernel lifetime, ``vip_lifetime``, still ends it).
        """
        pending = list(self._managers.values())
        for attempt in range(1, _DROP_ATTEMPTS + 1):
            failed = []
            for manager in pending:
                try:
                    for vip in await manager.remove_all():
                        log.info("VIP %s off %s (%s)", vip, manager.ifname, reason)
                except VipError as exc:
                    self._counts["vip_errors"] += 1
                    failed.append(manager)
                    log.error("cannot drop VIPs on %s (try %d of %d): %s",
                              manager.ifname, attempt, _DROP_ATTEMPTS, exc)  # fmt: skip
            if not failed:
                return True
            pending = failed
            await asyncio.sleep(_DROP_RETRY)
        return False

    # --- registration ------------------------------------------------------------------

    async def _probe_etcd(self, timeout: float) -> list[Action]:
        """Ask etcd about our lease within ``timeout``; tell the agent how it went."""
        agent = self.agent
        try:
            async with asyncio.timeout(timeout):
                await self.etcd.lease_info()
        except LeaseLost as exc:
            return agent.lease_lost(time.monotonic(), str(exc))
        except TimeoutError:
            return agent.etcd_probed(False, time.monotonic(), f"no answer within {timeout} s")
        except EtcdRejected:
            pass  # etcd answered: it is reachable
        except (EtcdError, ClusterError) as exc:
            return agent.etcd_probed(False, time.monotonic(), str(exc))
        return agent.etcd_probed(True, time.monotonic())

    async def _register(self, reason: str) -> list[Action]:
        etcd, now = self.etcd, time.monotonic
        if etcd.record is not None or etcd.lease_lost is not None:
            try:  # a lease we may still have: give it back first (claims go with it)
                await etcd.leave()
            except EtcdError:
                await etcd.abandon()
        try:
            record = await etcd.register(self.node_id, self.agent.address, NodeState.SYNCING)
            if self._seq == 0:
                self._seq = await etcd.last_event_seq(self.node_id)
        except EtcdError as exc:
            log.warning("register (%s) failed: %s", reason, exc)
            return self.agent.register_failed(now(), str(exc))
        self._lease_lost_seen = None
        self.sync.set_own_epoch(record.epoch)
        if self._guard is not None:
            self._guard.reopen()  # after a revocation notice shut it: a new membership
        log.info("registered (%s): epoch %d", reason, record.epoch)
        return self.agent.registered(record.epoch, now())

    # --- background tasks ------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            try:
                async for item in self.etcd.watch_members():
                    now = time.monotonic()
                    if isinstance(item, MembersSnapshot):
                        self._pending += self.agent.members_snapshot(item, now)
                    else:
                        self._pending += self.agent.member_event(item, now)
            except EtcdError as exc:
                log.info("member watch ended: %s", exc)
            await asyncio.sleep(_WATCH_RETRY)

    async def _filter_loop(self) -> None:
        assert self.filter_control is not None
        while True:
            connected = self.sync.filter_connected()
            synced: bool | None = None
            try:
                reply = await _control_request(self.filter_control, {"cmd": "stats"}, 1.0)
                value = reply.get("synced")
                synced = value if isinstance(value, bool) else None
                self._filter_stats = reply
                self._note_rules(_filter_rules(reply))
            except (OSError, ValueError, TimeoutError) as exc:
                log.debug("filter stats: %s", exc)
                self._filter_stats = None
            self.agent.filter_status(connected, synced, time.monotonic())
            await asyncio.sleep(self.config.filter_poll)

    def _note_rules(self, rules: dict[str, Any] | None) -> None:
        """An event when the filter starts running another etcd ruleset revision."""
        revision = rules.get("revision") if rules else None
        if revision is not None and revision != self._rules_revision:
            before = self._rules_revision
            self._rules_revision = revision
            self._queue_event(Emit("rules-applied", f"revision {before} -> {revision}"))

    def _queue_status(self) -> None:
        if self.etcd.record is None:
            return
        now = time.monotonic()
        body = self.agent.status_fields(now)
        extra = self.sync.status_extra()
        body["updated"] = time.time()
        body["since"] = time.time() - (now - body["since"])
        if body["resync"]["done_at"] is not None:
            body["resync"]["done_at"] = time.time() - (now - body["resync"]["done_at"])
        body["flows"] = _filter_flows(self._filter_stats) or extra.get("flows")
        for peer, fields in body["peers"].items():
            fields.update(extra.get("peers", {}).get(peer, {"lag_p99_ms": None, "outbox": None}))
        body["rules"] = _filter_rules(self._filter_stats)
        self._status = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        self._wake_writer.set()

    def _queue_event(self, event: Emit) -> None:
        if event.kind == "failover":
            self.last_failover_ms = event.duration_ms
            if event.duration_ms is not None:
                self.failover_durations.observe(event.duration_ms / 1000)
        self._seq += 1
        body = {
            "seq": self._seq, "ts": time.time(), "node": self.node_id, "kind": event.kind,
            "detail": event.detail, "duration_ms": event.duration_ms,
        }  # fmt: skip
        text = f"{event.detail} ({event.duration_ms:.1f} ms)" if event.duration_ms else event.detail
        log.info("event %s %s", event.kind, text)
        if len(self._events) >= _EVENT_QUEUE:
            self._events.popleft()
            self._counts["dropped"] += 1
        self._events.append(json.dumps(body, separators=(",", ":")).encode())
        self._wake_writer.set()

    async def _writer_loop(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            await self._flush_events()
            status, self._status = self._status, None
            record = self.etcd.record
            if status is not None and record is not None:
                try:
                    await self.etcd.put_status(self.node_id, status, self.etcd.lease_id)
                    self._counts["status"] += 1
                except (EtcdError, ClusterError) as exc:
                    log.debug("status not written: %s", exc)
            if self._events:
                await asyncio.sleep(0.2)  # etcd refused: retry soon
                self._wake_writer.set()

    async def _flush_events(self) -> None:
        while self._events:
            body = self._events[0]
            seq = json.loads(body)["seq"]
            try:
                await self.etcd.put_event(self.node_id, seq, body)
            except EtcdError:
                return
            self._events.popleft()
            self._counts["events"] += 1


async def _control_request(path: str, command: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One JSON-lines request to a control socket (``node.control``'s protocol)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ValueError("reply is not an object")
    return reply


def _filter_flows(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Own / replica / entries / capacity from the filter's table (the one packets meet)."""
    table = stats.get("table") if stats else None
    if not isinstance(table, dict):
        return None
    entries, replicas, capacity = (table.get(k) for k in ("entries", "replicas", "capacity"))
    if not (isinstance(entries, int) and isinstance(replicas, int) and isinstance(capacity, int)):
        return None
    return {"own": entries - replicas, "replica": replicas, "entries": entries,
            "capacity": capacity}  # fmt: skip


def _filter_rules(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ruleset the filter runs (revision None: its rules file, not etcd)."""
    rules = stats.get("rules") if stats else None
    if not isinstance(rules, dict):
        return None
    return {k: rules.get(k) for k in ("revision", "sha256", "policy")}
