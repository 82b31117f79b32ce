"""Prometheus metrics of the cluster agent, read from snapshots at scrape time.

The names are the contract in docs/metrics.md ("Cluster"); the alert rules
in ops/prometheus/cluster-alerts.yml and the Grafana dashboard use them.
As everywhere in Stockade, nothing on the agent's path touches
prometheus_client: the agent keeps plain counters, :class:`FailoverDurations`
keeps histogram buckets as integers, and :class:`ClusterCollector` builds
the metric families when scraped.  It runs in syncd's process, beside
syncd's own collector (``syncd.metrics``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from cluster.agent import AgentStats
from cluster.membership import NodeState

__all__ = ["FAILOVER_BUCKETS", "ClusterCollector", "ClusterSources", "FailoverDurations"]

# Seconds; 0.3 is the failover target the alert rule tests against.
FAILOVER_BUCKETS: Final = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
_STATES: Final = (
    NodeState.JOINING,
    NodeState.SYNCING,
    NodeState.UP,
    NodeState.DRAINING,
    NodeState.FENCED,
)


class FailoverDurations:
    """Histogram counts of failover durations (one observation per takeover)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(FAILOVER_BUCKETS) + 1)  # the last: above every bound
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(FAILOVER_BUCKETS, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum."""
        buckets, running = [], 0
        for bound, count in zip((*FAILOVER_BUCKETS, float("inf")), self._counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        return buckets, self._sum


@dataclass(frozen=True, slots=True)
class ClusterSources:
    agent: Callable[[], AgentStats]
    vips_configured: int
    failovers: FailoverDurations


class ClusterCollector:
    """prometheus_client collector over the agent's snapshot (one ``node`` label)."""

    def __init__(self, node_id: str, sources: ClusterSources) -> None:
        self._node = node_id
        self._sources = sources

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are built at scrape time

    def collect(self) -> Iterator[Metric]:
        node, stats = self._node, self._sources.agent()
        labels = ["node"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([node], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([node], value)
            return family

        state = GaugeMetricFamily(
            "stockade_cluster_state", "1 for the node's lifecycle state", labels=["node", "state"]
        )
        for name in _STATES:
            state.add_metric([node, name.value], 1.0 if stats.state is name else 0.0)
        yield state
        yield gauge("stockade_cluster_members", "live members in etcd", stats.members)
        yield gauge(
            "stockade_cluster_vips_configured",
            "VIPs in the cluster pool",
            self._sources.vips_configured,
        )
        yield gauge("stockade_cluster_vips_held", "VIPs this node holds", len(stats.vips_held))
        holder = GaugeMetricFamily(
            "stockade_cluster_vip_holder", "1 per VIP this node holds", labels=["node", "vip"]
        )
        for vip in stats.vips_held:
            holder.add_metric([node, vip], 1.0)
        yield holder
        moves = CounterMetricFamily(
            "stockade_cluster_vip_moves",
            "VIP moves done by this node",
            labels=["node", "direction"],
        )
        moves.add_metric([node, "acquired"], stats.claims)
        moves.add_metric([node, "released"], stats.releases)
        yield moves
        buckets, total = self._sources.failovers.snapshot()
        histogram = HistogramMetricFamily(
            "stockade_cluster_failover_duration_seconds",
            "from a failed peer's last heartbeat until this node held the VIPs it took over",
            labels=labels,
        )
        histogram.add_metric([node], buckets, total)
        yield histogram
        yield counter("stockade_cluster_suspicions", "peers suspected", stats.suspicions)
        yield counter(
            "stockade_cluster_revocations", "suspects whose lease was revoked", stats.revocations
        )
        yield gauge(
            "stockade_cluster_etcd_degraded",
            "1 while etcd is unreachable (fail static)",
            1.0 if stats.etcd_degraded else 0.0,
        )
        yield gauge(
            "stockade_cluster_resync_progress", "bulk resync progress 0..1", stats.resync_progress
        )
