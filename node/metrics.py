"""Prometheus metrics of one node, read from ``statistics()`` snapshots at scrape time.

Nothing on the packet path increments a Prometheus counter: the components
keep their own plain counters and :class:`NodeCollector` turns their frozen
snapshots into metric families when Prometheus asks.  Names follow the
Prometheus conventions: ``stockade_`` prefix, base units, counters end in
``_total``; every family carries a ``node`` label (the node id).  The
process metrics (``process_cpu_seconds_total``, ``process_resident_memory_bytes``
...) keep their standard names, as every Prometheus client exports them, and
get the ``node`` label too.  docs/metrics.md lists every metric.

The endpoint (:class:`MetricsServer`) is a small HTTP/1.1 server on the
node's asyncio loop, not prometheus_client's ``start_http_server`` thread,
and a scrape has two halves:

1. on the loop, between two packet batches: call every ``statistics()``
   (:meth:`NodeCollector.snapshot`).  This is the thread that owns every
   counter, so the snapshots are consistent and no component needs a lock or
   an argument about which dict operations are atomic under the GIL.
   Measured: 60 us with 10 rules, 260 us with 2000;
2. on one worker thread: turn the frozen snapshots into metric families and
   text (:func:`families`, ``generate_latest``), plus the process metrics.
   That is the expensive half (prometheus_client spends about 7 us a
   sample: 0.7 ms with 10 rules, 15 ms with 2000) and it reads only
   immutable values.  It still needs the GIL, but the loop gets it back
   within a switch interval (5 ms) instead of waiting out the whole scrape.

It serves ``GET``/``HEAD`` of ``/metrics`` only (and ``/``), closes every
connection after one answer, and bounds request size, time and concurrent
clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cluster.rules import FollowerStats
from node.engine import EngineStats
from node.errors import DataplaneError
from node.flow.table import TableStats
from node.flowlog import FlowLogFileStats, FlowLogStats
from node.hold import HoldStats
from node.kernel_ct import KernelCtStats
from node.nfq import AdapterStats, KernelQueueStats
from node.policy import RulesetStats
from node.supervise import SupervisorStats
from node.synclink import SyncLinkStats

log = logging.getLogger(__name__)

MAX_REQUEST: Final = 8192  # bytes of request line + headers
REQUEST_TIMEOUT: Final = 5.0  # seconds to read a request and send the answer
MAX_CLIENTS: Final = 8  # connections served at once; more are closed at once


_T = TypeVar("_T")


class MetricsError(DataplaneError):
    """The metrics endpoint could not be served (address in use, ...)."""


@dataclass(frozen=True, slots=True)
class MetricSources:
    """Where the collector finds each snapshot: zero-argument callables.

    Callables rather than objects, so a swapped ruleset or a component that
    is off (None) needs no re-registration.
    """

    engine: Callable[[], EngineStats]
    table: Callable[[], TableStats]
    ruleset: Callable[[], RulesetStats]
    adapter: Callable[[], AdapterStats] | None = None
    kernel_queue: Callable[[], KernelQueueStats | None] | None = None  # None: queue not bound
    kernel_ct: Callable[[], KernelCtStats] | None = None  # fast path off: None
    dataplane_installed: Callable[[], bool] | None = None
    flow_log: Callable[[], FlowLogStats] | None = None
    flow_log_file: Callable[[], FlowLogFileStats] | None = None
    sync_link: Callable[[], SyncLinkStats | None] | None = None  # standalone: None
    hold: Callable[[], HoldStats] | None = None  # standalone: None
    supervisor: Callable[[], SupervisorStats] | None = None  # syncd run by others: None
    rules: Callable[[], FollowerStats | None] | None = None  # rules from etcd: the follower


class _Families:
    """Collects metric families, each with the ``node`` label first."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.out: list[Metric] = []

    def counter(self, name: str, doc: str, value: float) -> None:
        family = CounterMetricFamily(name, doc, labels=["node"])
        family.add_metric([self.node], value)
        self.out.append(family)

    def gauge(self, name: str, doc: str, value: float) -> None:
        family = GaugeMetricFamily(name, doc, labels=["node"])
        family.add_metric([self.node], value)
        self.out.append(family)

    def counter_by(self, name: str, doc: str, label: str, items: Iterable[tuple[str, int]]) -> None:
        family = CounterMetricFamily(name, doc, labels=["node", label])
        for value, count in items:
            family.add_metric([self.node, value], count)
        self.out.append(family)

    def info(self, name: str, doc: str, label: str, value: str) -> None:
        family = GaugeMetricFamily(name, doc, labels=["node", label])
        family.add_metric([self.node, value], 1)
        self.out.append(family)


def _engine(f: _Families, s: EngineStats) -> None:
    f.counter("stockade_engine_packets_total", "Packets judged by the engine.", s.packets_total)
    f.counter_by("stockade_engine_verdicts_total", "Engine verdicts, by verdict.",
                 "verdict", s.verdicts)  # fmt: skip
    f.counter_by("stockade_engine_ct_states_total", "Packets by conntrack state.",
                 "ct_state", s.ct_states)  # fmt: skip
    f.counter_by(
        "stockade_engine_drop_reasons_total",
        "Packets INVALID or refused outside the rules, by reason "
        "(dropped unless the ruleset's invalid action says otherwise).",
        "reason",
        s.drop_reasons,
    )
    f.counter("stockade_ruleset_swaps_total", "Rulesets swapped in by reloads.",
              s.ruleset_swaps_total)  # fmt: skip


def _table(f: _Families, s: TableStats) -> None:
    f.gauge("stockade_flow_table_entries", "Flows in the flow table.", s.entries)
    f.gauge("stockade_flow_table_capacity", "Most flows the table holds.", s.capacity)
    f.gauge("stockade_flow_table_assured_entries", "Flows early drop will not evict.", s.assured)
    f.counter("stockade_flows_created_total", "Flows admitted to the table.", s.created_total)
    f.counter_by("stockade_flows_deleted_total", "Flows removed from the table, by reason.",
                 "reason", sorted(s.deleted_total.items()))  # fmt: skip
    f.counter("stockade_flows_evicted_total",
              "Flows evicted by early drop to make room (also in deleted_total).",
              s.evicted_total)  # fmt: skip
    f.counter("stockade_flows_refused_full_total",
              "New flows refused: the table was full of assured flows.",
              s.refused_full_total)  # fmt: skip
    f.counter_by("stockade_flow_table_invalid_total",
                 "Packets the flow table classified INVALID, by reason.",
                 "reason", sorted(s.invalid_total.items()))  # fmt: skip
    f.counter("stockade_flow_table_ignored_total",
              "TCP packets accepted without tracking (kernel IGNORE cases).",
              s.ignored_total)  # fmt: skip


def _ruleset(f: _Families, s: RulesetStats) -> None:
    f.info("stockade_ruleset_info", "The running ruleset; value 1.", "revision", s.revision)
    f.gauge("stockade_ruleset_rules", "Rules in the running ruleset.", s.rule_count)
    f.counter_by("stockade_rule_hits_total",
                 "Packets matched by each rule (reset when a reload swaps the ruleset).",
                 "rule", s.rule_hits)  # fmt: skip
    f.counter("stockade_ruleset_default_hits_total",
              "Packets that matched no rule (default action).", s.default_hits)  # fmt: skip
    f.counter("stockade_ruleset_established_hits_total",
              "Established/related packets taken by the established shortcut.",
              s.established_hits)  # fmt: skip
    f.counter("stockade_ruleset_invalid_hits_total",
              "INVALID packets given the ruleset's invalid action.", s.invalid_hits)  # fmt: skip


def _adapter(f: _Families, s: AdapterStats) -> None:
    f.counter("stockade_nfq_packets_total", "Packets read from the NFQUEUE.", s.packets_total)
    verdicts = (("accept", s.accepted_total), ("offload", s.offloaded_total),
                ("reject", s.rejected_total), ("drop", s.dropped_total))  # fmt: skip
    f.counter_by("stockade_nfq_verdicts_total",
                 "Verdicts given to the kernel (offload: accepted and fast-pathed).",
                 "verdict", verdicts)  # fmt: skip
    f.counter("stockade_nfq_engine_errors_total",
              "Packets the engine failed on (dropped; a bug).", s.engine_errors_total)  # fmt: skip
    f.counter("stockade_nfq_verdict_errors_total",
              "Verdicts the kernel interface refused.", s.verdict_errors_total)  # fmt: skip
    f.counter("stockade_nfq_enobufs_total",
              "Times the queue socket overflowed (packets lost).", s.enobufs_total)  # fmt: skip
    f.counter("stockade_nfq_batches_total", "Batches read from the queue.", s.batches_total)
    f.counter("stockade_flow_events_total", "Flow events produced.", s.events_total)
    f.counter("stockade_flow_expiry_runs_total", "Flow expiry timer runs.", s.expiry_runs_total)


def _kernel_queue(f: _Families, s: KernelQueueStats) -> None:
    f.gauge("stockade_nfq_kernel_waiting", "Packets queued by the kernel, waiting for us.",
            s.waiting)  # fmt: skip
    f.counter("stockade_nfq_kernel_queue_dropped_total",
              "Packets the kernel dropped: queue full (queue.max_len).",
              s.queue_dropped)  # fmt: skip
    f.counter("stockade_nfq_kernel_user_dropped_total",
              "Packets the kernel dropped: our socket buffer full.", s.user_dropped)  # fmt: skip


def _kernel_ct(f: _Families, s: KernelCtStats) -> None:
    f.counter("stockade_kernel_ct_queued_total",
              "Fast-path mark clears asked for (offloaded flows forgotten).",
              s.queued_total)  # fmt: skip
    f.counter("stockade_kernel_ct_cleared_total",
              "Kernel conntrack entries whose fast-path mark was cleared.",
              s.cleared_total)  # fmt: skip
    f.counter("stockade_kernel_ct_absent_total",
              "Mark clears that found no kernel entry.", s.absent_total)  # fmt: skip
    f.counter("stockade_kernel_ct_overflow_total",
              "Mark clears dropped: queue full.", s.overflow_total)  # fmt: skip
    f.counter("stockade_kernel_ct_errors_total", "Mark clears or flushes that failed.",
              s.errors_total)  # fmt: skip
    f.counter("stockade_kernel_ct_flushed_total", "Entries cleared by start/stop flushes.",
              s.flushed_total)  # fmt: skip
    f.gauge("stockade_kernel_ct_pending", "Mark clears waiting.", s.pending)


def _flow_log(f: _Families, s: FlowLogStats) -> None:
    f.counter("stockade_flow_log_records_total", "Flow log records queued for writing.",
              s.queued_total)  # fmt: skip
    f.counter_by("stockade_flow_log_suppressed_total",
                 "Flow log records not written, by cause (rate limit, full queue).",
                 "cause", (("rate-limit", s.rate_limited_total),
                           ("queue-full", s.queue_full_total)))  # fmt: skip
    f.gauge("stockade_flow_log_pending", "Flow log records waiting to be written.", s.pending)


def _flow_log_file(f: _Families, s: FlowLogFileStats) -> None:
    f.counter("stockade_flow_log_lines_written_total", "Lines appended to the flow log file.",
              s.lines_written_total)  # fmt: skip
    f.counter("stockade_flow_log_written_bytes_total", "Bytes appended to the flow log file.",
              s.bytes_written_total)  # fmt: skip
    f.counter("stockade_flow_log_rotations_total", "Flow log file rotations.", s.rotations_total)
    f.counter("stockade_flow_log_write_errors_total", "Flow log batches lost to write errors.",
              s.write_errors_total)  # fmt: skip
    f.gauge("stockade_flow_log_file_size_bytes", "Size of the current flow log file.",
            s.size_bytes)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """Every component's snapshot at one moment; immutable, so any thread may read it."""

    engine: EngineStats
    table: TableStats
    ruleset: RulesetStats
    adapter: AdapterStats | None
    kernel_queue: KernelQueueStats | None
    kernel_ct: KernelCtStats | None
    dataplane_installed: bool | None
    flow_log: FlowLogStats | None
    flow_log_file: FlowLogFileStats | None
    sync_link: SyncLinkStats | None = None
    hold: HoldStats | None = None
    supervisor: SupervisorStats | None = None
    rules: FollowerStats | None = None


def _rules(f: _Families, s: FollowerStats) -> None:
    running = s.running_revision or 0
    # rules/current as last read: a refused newer revision is current, not running.
    current = max(running, s.refused_revision or 0)
    f.gauge("stockade_rules_revision",
            "Cluster ruleset revision the filter runs (0: its own rules file).",
            running)  # fmt: skip
    f.gauge("stockade_rules_current_revision",
            "rules/current in etcd as this node last read it.", current)  # fmt: skip
    f.counter("stockade_rules_refused_total",
              "Cluster rulesets this node could not use (kept the running one).",
              s.refused)  # fmt: skip
    f.gauge("stockade_rules_etcd_degraded",
            "1 while the ruleset watch cannot reach etcd (fail static).",
            int(s.degraded))  # fmt: skip


def _sync_link(f: _Families, s: SyncLinkStats) -> None:
    f.gauge("stockade_synclink_connected", "1 while the local link to syncd is up.",
            int(s.connected))  # fmt: skip
    f.gauge("stockade_synclink_synced",
            "1 once the table was restored from syncd (ready for ownership).",
            int(s.synced))  # fmt: skip
    f.gauge("stockade_synclink_queued", "Flow changes waiting to be sent to syncd.", s.queued)
    for name, doc, value in (
        ("connects", "Sessions with syncd established.", s.connects_total),
        ("connect_failures", "Connection attempts to syncd that failed.",
         s.connect_failures_total),
        ("disconnects", "Sessions with syncd that ended.", s.disconnects_total),
        ("deltas_sent", "Flow changes sent to syncd.", s.deltas_sent_total),
        ("replicas_applied", "Records from syncd that changed the table.",
         s.replicas_applied_total),
        ("replicas_ignored", "Records from syncd ignored (duplicate, stale, confirmed).",
         s.replicas_ignored_total),
        ("replicas_refused", "Records refused: the table was full of assured flows.",
         s.replicas_refused_total),
        ("bad_records", "Records from syncd that failed validation.", s.bad_records_total),
        ("bad_frames", "Bad frames from syncd (session closed).", s.bad_frames_total),
        ("rounds", "Reconcile rounds (table requests) started.", s.rounds_total),
        ("swept", "Replicas removed because syncd no longer held them.", s.swept_total),
        ("resent", "Own flows sent again after a reconcile round.", s.resent_total),
        ("overflow", "Flow changes dropped: the queue to syncd was full.", s.overflow_total),
        ("internal_errors", "Unexpected errors in the sync link (bugs).",
         s.internal_errors_total),
    ):  # fmt: skip
        f.counter(f"stockade_synclink_{name}_total", doc, value)


def _hold(f: _Families, s: HoldStats) -> None:
    f.counter("stockade_hold_held_total", "Packets held waiting for their flow's replica.",
              s.held_total)  # fmt: skip
    f.counter("stockade_hold_released_by_replica_total",
              "Held packets released because their flow's record arrived.",
              s.released_by_replica_total)  # fmt: skip
    f.counter("stockade_hold_expired_total",
              "Held packets judged after the hold timeout.", s.expired_total)  # fmt: skip
    f.counter("stockade_hold_flushed_total", "Held packets judged at shutdown.", s.flushed_total)
    f.counter("stockade_hold_overflow_total",
              "Packets not held because the hold queue was full.", s.overflow_total)  # fmt: skip
    f.gauge("stockade_hold_waiting", "Packets held now.", s.waiting)
    f.gauge("stockade_hold_waiting_flows", "Flow keys held now.", s.waiting_flows)
    family = HistogramMetricFamily(
        "stockade_hold_release_latency_seconds",
        "Wait of held packets released by a replica (hold -> record installed).",
        labels=["node"],
    )
    cumulative, buckets = 0, []
    for bound, count in zip((*s.latency_bounds_ms, float("inf")), s.latency_counts, strict=True):
        cumulative += count
        buckets.append((_le(bound), cumulative))
    family.add_metric([f.node], buckets, sum_value=s.latency_sum_ms / 1000.0)
    f.out.append(family)


def _le(bound_ms: float) -> str:
    return "+Inf" if bound_ms == float("inf") else repr(bound_ms / 1000.0)


def _supervisor(f: _Families, s: SupervisorStats) -> None:
    f.gauge("stockade_syncd_running", "1 while the supervised syncd process is alive.",
            int(s.running))  # fmt: skip
    f.counter("stockade_syncd_restarts_total", "Supervised syncd restarts after an exit.",
              s.restarts_total)  # fmt: skip


def families(node_id: str, s: NodeSnapshot) -> list[Metric]:
    """The metric families of one snapshot (pure)."""
    f = _Families(node_id)
    _engine(f, s.engine)
    _table(f, s.table)
    _ruleset(f, s.ruleset)
    if s.adapter is not None:
        _adapter(f, s.adapter)
    if s.kernel_queue is not None:
        _kernel_queue(f, s.kernel_queue)
    if s.kernel_ct is not None:
        _kernel_ct(f, s.kernel_ct)
    if s.dataplane_installed is not None:
        f.gauge("stockade_dataplane_installed",
                "1 while the node's iptables chains are installed.",
                int(s.dataplane_installed))  # fmt: skip
    if s.flow_log is not None:
        _flow_log(f, s.flow_log)
    if s.flow_log_file is not None:
        _flow_log_file(f, s.flow_log_file)
    if s.sync_link is not None:
        _sync_link(f, s.sync_link)
    if s.hold is not None:
        _hold(f, s.hold)
    if s.supervisor is not None:
        _supervisor(f, s.supervisor)
    if s.rules is not None:
        _rules(f, s.rules)
    return f.out


def _call(source: Callable[[], _T] | None) -> _T | None:
    return None if source is None else source()


class NodeCollector:
    """A prometheus_client collector over one node's snapshots (see module doc)."""

    def __init__(self, node_id: str, sources: MetricSources) -> None:
        self.node_id = node_id
        self._sources = sources

    def snapshot(self) -> NodeSnapshot:
        """Read every source now (on the thread that owns the components)."""
        src = self._sources
        return NodeSnapshot(
            src.engine(), src.table(), src.ruleset(), _call(src.adapter),
            _call(src.kernel_queue), _call(src.kernel_ct), _call(src.dataplane_installed),
            _call(src.flow_log), _call(src.flow_log_file),
            src.sync_link() if src.sync_link is not None else None,
            _call(src.hold), _call(src.supervisor), _call(src.rules),
        )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.node_id, self.snapshot()))

    def prepare(self, process: bool) -> Callable[[], bytes]:
        """Snapshot now; the returned call renders it (any thread)."""
        snapshot, node_id = self.snapshot(), self.node_id
        return lambda: render(node_id, snapshot, process)


class _Frozen:
    """A collector that yields families built earlier."""

    def __init__(self, built: list[Metric]) -> None:
        self._built = built

    def collect(self) -> Iterator[Metric]:
        return iter(self._built)


class _NodeLabelled:
    """Re-emits another collector's families with the ``node`` label added."""

    def __init__(self, inner: Collector, node_id: str) -> None:
        self._inner = inner
        self._node = node_id

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                s._replace(labels={"node": self._node, **s.labels}) for s in family.samples
            ]
            yield labelled


def process_collector(node_id: str) -> Collector:
    """prometheus_client's process metrics (CPU, memory, fds) with the ``node`` label."""
    return _NodeLabelled(ProcessCollector(registry=None), node_id)


def build_registry(node_id: str, sources: MetricSources, process: bool = True) -> CollectorRegistry:
    """A private registry with the node's collector (and the process metrics).

    Collecting from it reads the sources on the calling thread: for tests
    and single-threaded use.  The endpoint uses :func:`render` instead.
    """
    registry = CollectorRegistry()
    registry.register(NodeCollector(node_id, sources))
    if process:
        registry.register(process_collector(node_id))
    return registry


def render(node_id: str, snapshot: NodeSnapshot, process: bool = True) -> bytes:
    """The text exposition of ``snapshot`` (and the process metrics); any thread."""
    registry = CollectorRegistry()
    registry.register(_Frozen(families(node_id, snapshot)))
    if process:
        registry.register(process_collector(node_id))
    return generate_latest(registry)


# -- HTTP endpoint ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricsServerStats:
    requests_total: int  # complete requests answered (any status)
    scrapes_total: int  # /metrics answered 200
    bad_requests_total: int  # malformed, oversized, too slow or cut off
    collect_errors_total: int  # scrapes that failed in a statistics() or rendering (a bug; 500)
    busy_total: int  # connections closed unanswered: MAX_CLIENTS already served
    active: int  # connections being served now


_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found",
                   405: "Method Not Allowed", 500: "Internal Server Error"}  # fmt: skip
_INDEX: Final = b"Stockade node. Metrics: /metrics\n"


class Scrapeable(Protocol):
    """What :class:`MetricsServer` serves: ``prepare`` reads every snapshot now (on
    the loop, which owns the counters) and returns the rendering to run on the
    worker thread.  :class:`NodeCollector` is one; syncd has its own."""

    def prepare(self, process: bool) -> Callable[[], bytes]: ...


class MetricsServer:
    """Serves ``collector`` at ``http://host:port/metrics`` on the running asyncio loop.

    ``process``: add the process metrics (CPU, memory, file descriptors).
    """

    def __init__(
        self, collector: Scrapeable, host: str, port: int, *, process: bool = True
    ) -> None:
        self._collector = collector
        self._process = process
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._n = dict.fromkeys(("requests", "scrapes", "bad", "errors", "busy"), 0)
        self._active = 0

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=MAX_REQUEST
            )
        except OSError as e:
            raise MetricsError(
                f"metrics endpoint {self._host}:{self._port}: cannot listen: {e.strerror}"
            ) from e
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # at most one render in flight
            self._executor = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CLIENTS:
            self._n["busy"] += 1
            writer.close()
            return
        self._active += 1
        try:
            await asyncio.wait_for(self._exchange(reader, writer), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):  # fmt: skip
            self._n["bad"] += 1
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, answer = self._route(head)
        status, body, content_type = answer if answer is not None else await self._scrape()
        self._n["requests"] += 1
        header = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(header.encode("ascii") + (b"" if method == "HEAD" else body))
        await writer.drain()

    def _route(self, head: bytes) -> tuple[str, tuple[int, bytes, str] | None]:
        """(method, (status, body, content type)) for one request head; None: the metrics."""
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._n["bad"] += 1
            return "GET", (400, b"bad request\n", text)
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return method, (405, b"only GET and HEAD\n", text)
        if path == "/":
            return method, (200, _INDEX, text)
        if path != "/metrics":
            return method, (404, b"not found; try /metrics\n", text)
        return method, None

    async def _scrape(self) -> tuple[int, bytes, str]:
        """Snapshot here, on the loop; render on the worker thread (module doc)."""
        try:
            rendering = self._collector.prepare(self._process)
            body = await asyncio.get_running_loop().run_in_executor(self._executor, rendering)
        except Exception:
            self._n["errors"] += 1
            log.exception("collecting metrics failed")
            return 500, b"collecting metrics failed\n", "text/plain; charset=utf-8"
        self._n["scrapes"] += 1
        return 200, body, CONTENT_TYPE_LATEST

    def statistics(self) -> MetricsServerStats:
        n = self._n
        return MetricsServerStats(
            n["requests"], n["scrapes"], n["bad"], n["errors"], n["busy"], self._active
        )
