"""Prometheus metrics of syncd, read from ``statistics()`` snapshots at scrape time.

Like ``node/metrics.py``: nothing on the delta path touches prometheus_client;
the components keep plain counters and :class:`SyncCollector` turns their
frozen snapshots into metric families when scraped.  Names have the
``stockade_sync_`` prefix, base units, counters end in ``_total``, and every
family carries a ``node`` label.  A scrape reads the snapshots on the event
loop (the thread that owns the counters) and renders the text on a worker
thread (the shared endpoint, ``node.metrics.MetricsServer``).

Metrics (labels besides ``node``); docs/metrics.md "Sync" lists exactly
these, and tests/unit/test_sync_metrics.py keeps the two equal:

* ``stockade_sync_lag_seconds`` histogram {origin}: a delta's creation at its
  origin (the origin's wall clock) to its application here.  Needs the
  nodes' clocks synchronized; deltas stamped in our future count as 0 s and
  in ``stockade_sync_lag_skewed_total`` {origin}.
* ``stockade_sync_deltas_sent_total`` / ``_resent_total`` {peer}: our deltas
  handed to the stream (resends included / only resends);
  ``stockade_sync_deltas_received_total`` {origin, outcome}: the peer's
  deltas by what happened (applied, duplicate, out_of_order, deferred);
  ``stockade_sync_deltas_dropped_total`` {peer, reason}: deltas that did not
  reach their target by the delta path (``outbox_overflow``: ours, the peer
  must resync; ``store_full``: theirs, refused here).
* ``stockade_sync_peer_up`` {peer}: 1 while the stream is LIVE, else 0;
  ``stockade_sync_peer_state`` {peer, state}: 1 for the stream's state.
* ``stockade_sync_outbox_deltas`` / ``_outbox_capacity_deltas`` {peer}.
* ``stockade_sync_resyncs_total``, ``_resync_in_progress``,
  ``_resync_pages`` (pages applied by the pull in progress),
  ``_last_resync_seconds`` {origin}.
* ``stockade_sync_stream_ends_total`` {peer, reason},
  ``stockade_sync_peer_errors_total`` {peer, reason},
  ``stockade_sync_refused_total`` {reason} (Exchange/Snapshot admission).
* ``stockade_sync_store_records``, ``_store_tombstones``, ``_store_orphans``,
  ``_store_applies_total`` {outcome}, ``_store_swept_total``.
* ``stockade_sync_local_changes_total``, ``_local_refused_total``,
  ``_epoch`` (this node's own origin).
* ``stockade_sync_local_connected``, ``_local_deltas_total``,
  ``_local_replica_updates_total``, ``_local_overflows_total``.
* ``stockade_sync_antientropy_rounds_total`` {result},
  ``_antientropy_buckets_compared_total``, ``_antientropy_buckets_differing_total``,
  ``_antientropy_repairs_total`` {side: local|peer, kind},
  ``_antientropy_resyncs_requested_total``.
* ``stockade_sync_beacon_thread_running``, ``_beacons_sent_total``,
  ``_beacons_suppressed_total``, ``_beacons_received_total`` {peer},
  ``_beacons_lost_total`` {peer}, ``_beacon_loss_ratio`` {peer},
  ``_beacons_dropped_total`` {reason},
  ``_beacon_send_errors_total`` {errno}, ``_beacon_thread_errors_total``,
  ``_beacon_revocations_heard_total``:
  the UDP liveness beacons (``syncd.beacon``), only while beacons run.
* ``stockade_sync_loop_lag_max_seconds``: only with a
  ``SyncMetricSources.loop_lag_max_seconds`` source, which
  :func:`sources_from_node` does not give (so not in the contract).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from node.metrics import MetricsServer, process_collector
from syncd.antientropy import AntiEntropyStats
from syncd.beacon_io import BeaconIoStats
from syncd.errors import ConfigError
from syncd.local import LocalStats
from syncd.peers import OriginStats, PeerStats
from syncd.replica import ReplicaStats
from syncd.service import ServiceStats
from syncd.session import State

if TYPE_CHECKING:
    from syncd.daemon import SyncNode

log = logging.getLogger("syncd.metrics")

PREFIX: Final = "stockade_sync_"
_STATES: Final = (*(s.value for s in State), "disconnected")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # HOST:PORT of the HTTP endpoint (GET /metrics); port 0 picks a free one.
    listen: str

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"metrics.listen must be HOST:PORT, not {self.listen!r}")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def metrics_config(raw: object) -> MetricsConfig | None:
    """The ``metrics`` section of a syncd (or a node file's ``sync``) section.

    ``None`` or absent: no endpoint.  Else a mapping with ``listen``.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or set(raw) - {"listen"} or "listen" not in raw:
        raise ConfigError("metrics must be a mapping with one key, listen: HOST:PORT")
    listen = raw["listen"]
    if not isinstance(listen, str):
        raise ConfigError("metrics.listen must be a string HOST:PORT")
    return MetricsConfig(listen)


# --- snapshots and families -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncSnapshot:
    origin: OriginStats
    store: ReplicaStats
    peers: Mapping[str, PeerStats]
    local: LocalStats
    service: ServiceStats
    anti_entropy: AntiEntropyStats | None
    loop_lag_max_seconds: float | None
    beacons: BeaconIoStats | None = None


@dataclass(frozen=True, slots=True)
class SyncMetricSources:
    """Zero-argument callables giving each snapshot (read at scrape time)."""

    origin: Callable[[], OriginStats]
    store: Callable[[], ReplicaStats]
    peers: Callable[[], Mapping[str, PeerStats]]
    local: Callable[[], LocalStats]
    service: Callable[[], ServiceStats]
    anti_entropy: Callable[[], AntiEntropyStats] | None = None
    loop_lag_max_seconds: Callable[[], float] | None = None
    beacons: Callable[[], BeaconIoStats | None] | None = None


def sources_from_node(node: SyncNode) -> SyncMetricSources:
    """The sources of a running :class:`syncd.daemon.SyncNode`."""
    anti_entropy = getattr(node, "anti_entropy", None)
    return SyncMetricSources(
        origin=node.origin.statistics,
        store=node.store.statistics,
        peers=lambda: {p: link.statistics() for p, link in node.links.items()},
        local=node.local.statistics,
        service=node.service.statistics,
        anti_entropy=anti_entropy.statistics if anti_entropy is not None else None,
        loop_lag_max_seconds=lambda: node.loop_lag_max,
        beacons=lambda: node.beacons.statistics() if node.beacons is not None else None,
    )


class _Families:
    """Builds metric families with the ``node`` label on every sample."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.out: list[Metric] = []

    def counter(
        self, name: str, doc: str, labels: Iterable[str], rows: Iterable[tuple[Any, ...]]
    ) -> None:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["node", *labels])
        for *values, value in rows:
            family.add_metric([self.node, *map(str, values)], value)
        self.out.append(family)

    def gauge(
        self, name: str, doc: str, labels: Iterable[str], rows: Iterable[tuple[Any, ...]]
    ) -> None:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["node", *labels])
        for *values, value in rows:
            family.add_metric([self.node, *map(str, values)], value)
        self.out.append(family)


def families(node_id: str, s: SyncSnapshot) -> list[Metric]:
    f = _Families(node_id)
    _lag(f, s.peers)
    _peers(f, s.peers)
    _store(f, s.store)
    o = s.origin
    f.counter("local_changes_total", "Own changes numbered and sent.", [], [(o.changes,)])
    f.counter("local_refused_total", "Own changes refused (store full).", [], [(o.refused_full,)])
    f.gauge("epoch", "This node's incarnation.", [], [(o.epoch,)])
    loc = s.local
    f.gauge("local_connected", "1 if the filter is connected.", [], [(int(loc.connected),)])
    f.counter("local_deltas_total", "Filter changes received.", [], [(loc.deltas,)])
    f.counter("local_replica_updates_total", "Replica updates sent to the filter.", [],
              [(loc.replica_updates,)])  # fmt: skip
    f.counter("local_overflows_total", "Filter queue overflows (filter reloads).", [],
              [(loc.overflows,)])  # fmt: skip
    f.counter("refused_total", "Exchange/Snapshot calls refused, by reason.", ["reason"],
              sorted(s.service.refused.items()))  # fmt: skip
    if s.anti_entropy is not None:
        _anti_entropy(f, s.anti_entropy)
    if s.loop_lag_max_seconds is not None:
        f.gauge("loop_lag_max_seconds", "Longest event-loop stall seen.", [],
                [(s.loop_lag_max_seconds,)])  # fmt: skip
    if s.beacons is not None:
        _beacons(f, s.beacons)
    return f.out


def _beacons(f: _Families, s: BeaconIoStats) -> None:
    peers = sorted(s.beacons.peers.items())
    f.gauge("beacon_thread_running", "1 while the liveness beacon thread runs.", [],
            [(int(s.running),)])  # fmt: skip
    f.counter("beacons_sent_total", "Liveness beacons handed to the kernel.", [], [(s.sent,)])
    f.counter("beacons_suppressed_total",
              "Beacon rounds not sent because our event loop had stalled.", [],
              [(s.suppressed,)])  # fmt: skip
    f.counter("beacons_received_total", "Beacons accepted, by peer.", ["peer"],
              [(p, b.received) for p, b in peers])  # fmt: skip
    f.counter("beacons_lost_total", "Beacons missing from a peer's sequence, by peer.",
              ["peer"], [(p, b.lost) for p, b in peers])  # fmt: skip
    f.gauge("beacon_loss_ratio",
            "Recent loss of a peer's beacons, 0..1 (stretches its suspicion window).",
            ["peer"], [(p, b.loss) for p, b in peers])  # fmt: skip
    f.counter("beacons_dropped_total", "Datagrams refused on the beacon port, by reason.",
              ["reason"], sorted(s.beacons.dropped.items()))  # fmt: skip
    errors = sorted(s.send_errors.items())
    f.counter("beacon_send_errors_total", "Beacon sends that failed, by errno.", ["errno"],
              errors)  # fmt: skip
    f.counter("beacon_thread_errors_total", "Unexpected errors caught in the beacon thread.",
              [], [(s.thread_errors,)])  # fmt: skip
    f.counter("beacon_revocations_heard_total",
              "Peers' beacons saying they revoked our membership (ARP guard closed at once).",
              [], [(s.revoked_heard,)])  # fmt: skip


def _lag(f: _Families, peers: Mapping[str, PeerStats]) -> None:
    family = HistogramMetricFamily(
        PREFIX + "lag_seconds",
        "Delta created at its origin -> applied here (origin's wall clock; needs synced clocks).",
        labels=["node", "origin"],
    )
    skewed = []
    for peer, stats in sorted(peers.items()):
        lag = stats.lag
        cumulative, buckets = 0, []
        for bound, count in zip((*lag.bounds, float("inf")), lag.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric([f.node, peer], buckets, lag.sum_seconds)
        skewed.append((peer, lag.skewed))
    f.out.append(family)
    f.counter("lag_skewed_total", "Deltas stamped in our future (clock skew), counted as 0 s.",
              ["origin"], skewed)  # fmt: skip


def _peers(f: _Families, peers: Mapping[str, PeerStats]) -> None:
    items = sorted(peers.items())
    f.counter("deltas_sent_total", "Own deltas handed to the stream, resends included.",
              ["peer"], [(p, s.outbox.sent) for p, s in items])  # fmt: skip
    f.counter("deltas_resent_total", "Own deltas sent again.", ["peer"],
              [(p, s.outbox.resent) for p, s in items])  # fmt: skip
    received = []
    for p, s in items:
        i = s.inbox
        received += [(p, "applied", i.deltas_applied), (p, "duplicate", i.duplicates),
                     (p, "out_of_order", i.out_of_order), (p, "deferred", i.deferred)]  # fmt: skip
    f.counter("deltas_received_total", "The peer's deltas, by what happened to them.",
              ["origin", "outcome"], received)  # fmt: skip
    dropped = []
    for p, s in items:
        dropped += [(p, "outbox_overflow", s.outbox.overflow),
                    (p, "store_full", s.session.get("store_full", 0))]  # fmt: skip
    f.counter("deltas_dropped_total", "Deltas lost to the delta path (a resync follows).",
              ["peer", "reason"], dropped)  # fmt: skip
    # One plain series per peer (what operators and StockadeSyncPeerDown want);
    # peer_state keeps the detail.  Only LIVE counts: a SUSPECT stream has gone
    # quiet and a SYNCING one does not carry deltas yet.
    f.gauge("peer_up", "1 while the stream with the peer is live, else 0.", ["peer"],
            [(p, int(s.state == State.LIVE.value)) for p, s in items])  # fmt: skip
    f.gauge("peer_state", "1 for the current state of the stream with the peer.",
            ["peer", "state"],
            [(p, st, int(s.state == st)) for p, s in items for st in _STATES])  # fmt: skip
    f.gauge("outbox_deltas", "Own deltas not yet acked by the peer.", ["peer"],
            [(p, s.outbox.held) for p, s in items])  # fmt: skip
    f.gauge("outbox_capacity_deltas", "Outbox bound.", ["peer"],
            [(p, s.outbox.capacity) for p, s in items])  # fmt: skip
    f.counter("resyncs_total", "Snapshot pulls of the origin started.", ["origin"],
              [(p, s.resyncs) for p, s in items])  # fmt: skip
    f.gauge("resync_in_progress", "1 while a snapshot of the origin is pulled.", ["origin"],
            [(p, int(s.resyncing)) for p, s in items])  # fmt: skip
    f.gauge("resync_pages", "Pages applied by the pull in progress.", ["origin"],
            [(p, s.resync_pages) for p, s in items])  # fmt: skip
    done = [(p, s.last_resync_seconds) for p, s in items if s.last_resync_seconds is not None]
    f.gauge("last_resync_seconds", "Duration of the last completed pull.", ["origin"], done)
    f.counter("stream_ends_total", "Streams ended, by reason.", ["peer", "reason"],
              [(p, r, n) for p, s in items for r, n in sorted(s.stream_ends.items())])  # fmt: skip
    f.counter("peer_errors_total", "Protocol errors by the peer, by reason.", ["peer", "reason"],
              [(p, r, n) for p, s in items for r, n in sorted(s.peer_errors.items())])  # fmt: skip


def _store(f: _Families, s: ReplicaStats) -> None:
    f.gauge("store_records", "Live records held (all origins).", [], [(s.live,)])
    f.gauge("store_tombstones", "Tombstones held.", [], [(s.tombstones,)])
    f.gauge("store_orphans", "Records whose origin left.", [], [(s.orphans,)])
    outcomes = [("applied", s.applied), ("duplicate", s.duplicates), ("stale", s.stale),
                ("blocked", s.blocked), ("full", s.overflow)]  # fmt: skip
    f.counter("store_applies_total", "Records applied to the store, by outcome.", ["outcome"],
              outcomes)  # fmt: skip
    f.counter("store_swept_total", "Records removed by a resync sweep (lost DELETEs).", [],
              [(s.swept,)])  # fmt: skip


def _anti_entropy(f: _Families, s: AntiEntropyStats) -> None:
    f.counter("antientropy_rounds_total", "Anti-entropy rounds started here, by result.",
              ["result"], [("ok", s.rounds), ("failed", s.rounds_failed),
                           ("skipped", s.rounds_skipped)])  # fmt: skip
    f.counter("antientropy_buckets_compared_total", "Buckets compared.", [],
              [(s.buckets_compared,)])  # fmt: skip
    f.counter("antientropy_buckets_differing_total", "Buckets found different.", [],
              [(s.buckets_differing,)])  # fmt: skip
    rows = [("local", k, n) for k, n in sorted(s.repairs.items())]
    rows += [("peer", k, n) for k, n in sorted(s.peer_repairs.items())]
    f.counter("antientropy_repairs_total",
              "Repairs (local: from our rounds; peer: for peers' rounds), by kind.",
              ["side", "kind"], rows)  # fmt: skip
    f.counter("antientropy_resyncs_requested_total", "Snapshot pulls asked for by rounds.", [],
              [(s.resyncs_requested,)])  # fmt: skip


def _call(source: Callable[[], Any] | None) -> Any:
    return source() if source is not None else None


class SyncCollector:
    """A prometheus_client collector over one syncd's snapshots."""

    def __init__(self, node_id: str, sources: SyncMetricSources) -> None:
        self.node_id = node_id
        self._sources = sources

    def snapshot(self) -> SyncSnapshot:
        """Read every source now (on the thread that owns the components)."""
        src = self._sources
        return SyncSnapshot(
            src.origin(), src.store(), src.peers(), src.local(), src.service(),
            _call(src.anti_entropy), _call(src.loop_lag_max_seconds), _call(src.beacons),
        )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.node_id, self.snapshot()))


class _Frozen:
    def __init__(self, built: list[Metric]) -> None:
        self._built = built

    def collect(self) -> Iterator[Metric]:
        return iter(self._built)


def build_registry(node_id: str, sources: SyncMetricSources) -> CollectorRegistry:
    """A private registry with the collector (reads the sources when collected)."""
    registry = CollectorRegistry()
    registry.register(SyncCollector(node_id, sources))
    return registry


def render(
    node_id: str, snapshot: SyncSnapshot, extra: Iterable[Metric] = (), process: bool = False
) -> bytes:
    """The text exposition of ``snapshot`` (and families built earlier); any thread."""
    registry = CollectorRegistry()
    registry.register(_Frozen([*families(node_id, snapshot), *extra]))
    if process:
        registry.register(process_collector(node_id))
    return generate_latest(registry)


# --- HTTP endpoint ------------------------------------------------------------------


class _SyncScrape:
    """What the shared endpoint (``node.metrics.MetricsServer``) serves for syncd."""

    def __init__(self, collector: SyncCollector, extra: Collector | None) -> None:
        self._collector = collector
        self._extra = extra

    def prepare(self, process: bool) -> Callable[[], bytes]:
        """Read syncd's and the agent's snapshots now, on the loop; render later."""
        node_id, snapshot = self._collector.node_id, self._collector.snapshot()
        extra = list(self._extra.collect()) if self._extra is not None else []
        return lambda: render(node_id, snapshot, extra, process)


async def start_metrics(
    node: SyncNode, config: MetricsConfig, extra: Collector | None = None
) -> MetricsServer:
    """Serve ``node``'s metrics on ``config.listen`` (call on the node's loop; close() at stop).

    The endpoint is the filter's (``node.metrics.MetricsServer``: bounded
    requests, rendering on a worker thread), with the process metrics.
    ``extra``: another collector of this process (the cluster agent's),
    read on the loop at each scrape and served on the same endpoint.
    Raises ``node.metrics.MetricsError`` if the address cannot be bound.
    """
    collector = SyncCollector(node.config.node_id, sources_from_node(node))
    server = MetricsServer(_SyncScrape(collector, extra), config.host, config.port)
    await server.start()
    log.info("metrics on http://%s:%d/metrics", config.host, server.port)
    return server
