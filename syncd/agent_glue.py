"""The cluster agent inside syncd: a `cluster.agent_runner.SyncView` over a SyncNode.

``syncd.daemon`` creates a :class:`ClusterAgent` when the config has a
``cluster`` section.  ``start()`` opens the VIP interfaces (taking off any
address a previous run left), starts the agent, and waits briefly for the
first member listing so syncd's start-up recovery pulls from the peers etcd
knows.  Control commands ``status`` and ``drain`` land in :meth:`control`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from cluster.agent_runner import AgentRunner
from cluster.metrics import ClusterCollector, ClusterSources
from node.histogram import bucket_upper_bound
from syncd.config import PeerConfig
from syncd.errors import ConfigError
from syncd.peers import LagStats
from syncd.session import State

if TYPE_CHECKING:
    from syncd.config import SyncdConfig
    from syncd.daemon import SyncNode

log = logging.getLogger("syncd.agent")

_FIRST_LISTING: Final = 3.0  # seconds start() waits for etcd's member listing
_LAG_WINDOW: Final = 10  # status publications (about 10 s) the lag p99 looks back


class _View:
    """What the agent reads from and does to syncd."""

    def __init__(self, node: SyncNode) -> None:
        self.node = node
        self.peers_set = asyncio.Event()
        # Per peer, the lag histogram counts of the last status publications:
        # the status shows the p99 of a recent window, not since start.
        self._lag_history: dict[str, deque[tuple[int, ...]]] = {}

    def set_peers(self, peers: Sequence[tuple[str, str]]) -> None:
        try:
            wanted = [PeerConfig(node_id, address) for node_id, address in peers]
        except ConfigError as exc:  # a member record syncd cannot use
            log.error("ignoring member list: %s", exc)
            return
        self.node.set_peers(wanted)
        self.peers_set.set()

    def messages_received(self) -> Mapping[str, int]:
        return {peer: link.messages_received for peer, link in self.node.links.items()}

    def beacons_heard(self) -> Mapping[str, float]:
        beacons = self.node.beacons
        return beacons.heard() if beacons is not None else {}

    def beacons_loss(self) -> Mapping[str, float]:
        beacons = self.node.beacons
        return beacons.loss() if beacons is not None else {}

    def on_revoked(self, hook: Callable[[str, int], None] | None) -> None:
        if self.node.beacons is not None:
            self.node.beacons.on_revoked(hook)

    def on_beacon_round(self, hook: Callable[[], None] | None) -> bool:
        if self.node.beacons is None:
            return False
        self.node.beacons.on_round(hook)
        return True

    def set_own_epoch(self, epoch: int) -> None:
        if self.node.beacons is not None:
            self.node.beacons.set_own_epoch(epoch)

    def set_notices(self, notices: Mapping[str, int]) -> None:
        if self.node.beacons is not None:
            self.node.beacons.set_notices(notices)

    def sync_progress(self) -> tuple[bool, float]:
        links = self.node.links.values()
        live = sum(1 for link in links if link.state is State.LIVE)
        total = len(self.node.links)
        ready = self.node.status() == "ready" and live == total
        return ready, 1.0 if not total else live / total

    def filter_connected(self) -> bool:
        return bool(self.node.local.statistics().connected)

    def status_extra(self) -> dict[str, Any]:
        node = self.node
        stats = node.store.statistics()
        own = node.store.count(node.config.node_id)  # O(1): this runs every status_interval
        loss = self.beacons_loss()
        peers: dict[str, dict[str, Any]] = {}
        for peer, link in node.links.items():
            link_stats = link.statistics()
            peers[peer] = {
                "lag_p99_ms": self._recent_lag_p99_ms(peer, link_stats.lag),
                "outbox": link_stats.outbox.held,
                "beacon_loss": round(loss[peer], 4) if peer in loss else None,
            }
        return {
            "flows": {
                "own": own, "replica": stats.live - own, "entries": stats.live,
                "capacity": node.config.store.capacity,
            },
            "peers": peers,
            "rules": None,
        }  # fmt: skip

    def _recent_lag_p99_ms(self, peer: str, lag: LagStats) -> float | None:
        history = self._lag_history.setdefault(peer, deque(maxlen=_LAG_WINDOW))
        history.append(lag.counts)
        return lag_p99_ms(lag.bounds, history[0], lag.counts)


def lag_p99_ms(bounds: Sequence[float], before: Sequence[int], now: Sequence[int]) -> float | None:
    """p99 of the deltas observed between two histogram snapshots, as the upper
    bound of its bucket in ms (a histogram cannot say better); None: no deltas.
    Beyond the last bound it is that bound (the +Inf bucket)."""
    window = [b - a for a, b in zip(before, now, strict=True)]
    p99 = bucket_upper_bound(bounds, window, 0.99)
    return None if p99 is None else round(p99 * 1000, 3)


# With beacons every 10 ms a live peer is heard ten times in this window
# even when its stream waits on a lost segment or its loop is busy; the
# failover budget (300 ms, the first TCP retransmission at ~200 ms) wants
# detection well under it.
BEACON_SUSPECT_AFTER: Final = 0.1


def agent_suspect_after(config: SyncdConfig) -> float:
    """The agent's suspicion window: ``cluster.suspect_after``, else 0.1 s with
    beacons, else the sync session's (whose heartbeats are all it has)."""
    assert config.cluster is not None
    if config.cluster.suspect_after is not None:
        return config.cluster.suspect_after
    if config.beacons.enabled:
        return max(BEACON_SUSPECT_AFTER, 5 * config.beacons.interval)
    return config.session.suspect_after


class ClusterAgent:
    """The agent's life inside syncd."""

    def __init__(self, node: SyncNode) -> None:
        config = node.config
        assert config.cluster is not None
        self.view = _View(node)
        self.runner = AgentRunner(
            config.cluster, config.node_id, config.cluster_id, config.listen,
            agent_suspect_after(config), self.view, config.filter_control_socket,
            config.beacons.interval if config.beacons.enabled else None,
        )  # fmt: skip
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.runner.open()
        self._task = asyncio.create_task(self._run(), name="cluster-agent")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FIRST_LISTING):
                await self.view.peers_set.wait()

    async def _run(self) -> None:
        try:
            await self.runner.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: say so loudly, the VIPs come off in stop()
            log.exception("cluster agent failed")
            raise

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.runner.close()

    def collector(self) -> ClusterCollector:
        """The agent's Prometheus collector (served by syncd's metrics endpoint)."""
        runner = self.runner
        sources = ClusterSources(
            agent=lambda: runner.agent.statistics(time.monotonic()),
            vips_configured=len(runner.config.vips),
            failovers=runner.failover_durations,
        )
        return ClusterCollector(self.runner.node_id, sources)

    def control(self, cmd: str) -> dict[str, Any]:
        agent, now = self.runner.agent, time.monotonic()
        if cmd == "drain":
            ok, message, actions = agent.drain(now)
            self.runner.queue(actions)
            return {"ok": ok, "state": agent.state.value, "message": message}
        body = agent.status_fields(now)
        stats = agent.statistics(now)
        runner = self.runner.statistics()
        body.update(
            members=stats.members, revocations=stats.revocations, claims=stats.claims,
            releases=stats.releases, fences=stats.fences, failovers=stats.failovers,
            events_written=runner.events_written, events_dropped=runner.events_dropped,
            stalls=runner.stalls, max_lag_seconds=runner.max_lag_seconds,
            vip_errors=runner.vip_errors, last_failover_ms=self.runner.last_failover_ms,
        )  # fmt: skip
        return body
