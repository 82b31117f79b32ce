"""Run one filter node: rules -> engine -> NFQUEUE, until SIGTERM/SIGINT.

Start order, chosen so no packet meets a half-built node:

1. load the ruleset (a broken file: message, exit 2, nothing touched);
   then open the flow log file and the metrics endpoint, when configured
   (a bad path or a taken port: message, exit 1, nothing else touched);
2. bind the NFQUEUE (packets the rules will send already have a reader);
3. install the iptables chains (removing a previous run's stale ones);
4. clear FAST connmarks left by a previous run (no flow is fast-pathed
   without this engine knowing it);
5. with ``sync``: start syncd (``sync.supervise``) and the sync link
   (:class:`node.synclink.SyncLink`: it connects in the background, and a
   syncd that is down never blocks or drops filtering);
6. start the control socket, then print ``stockade node <id> ready queue=<n>``.

Readiness for ownership is a separate flag: ``synced`` in ``stats`` turns
true once the link's first reconcile round has restored this node's table
from syncd (the cluster agent waits for it before the node takes
ownership).  A standalone node reports ``synced: true`` at once.

With ``sync`` the engine's flow events go to the link as they happen, the
link's own table events (replicas removed, evictions) clear kernel
fast-path marks and reach the flow log, and the NFQUEUE adapter holds
packets that may belong to a flow another node is replicating here
(:mod:`node.hold`, released by the link's installs).

SIGHUP reloads the rules file exactly as the control ``reload`` command
does: a broken file is refused and the running ruleset kept.

Stop order: remove the chains (the kernel stops queueing to us), judge the
held packets and unbind, clear FAST marks, close the control socket, stop
the sync link and then syncd, write the rest of the flow log and close it,
close the metrics endpoint.  Whatever happens, ``finally``
removes the chains.  Once they are gone the hook no longer passes through
Stockade at all (fail open): in a cluster the upstream router moves the
traffic to the other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from cluster.etcd import EtcdConfig, EtcdStore
from cluster.rules import RulesetFollower
from node.config import NodeConfig
from node.control import ControlServer, jsonable
from node.dataplane import Dataplane, MarkBits
from node.engine import Engine
from node.errors import BadInput, ConfigError, DataplaneError, NodeError
from node.flow.events import FlowDeleted, FlowEvent
from node.flowlog import FlowLog, FlowLogFile, LoggingEngine, pump
from node.hold import HoldQueue
from node.kernel_ct import KernelConntrack
from node.metrics import MetricSources, MetricsServer, NodeCollector
from node.nfq import HeldPacket, NfqAdapter, kernel_queue_stats
from node.policy import Ruleset, load_ruleset
from node.supervise import Supervisor
from node.synclink import SyncLink

log = logging.getLogger("node.daemon")

DEFAULT_FLOWS_LIMIT = 1000


class Node:
    """One running node: the engine with its adapters and the control commands."""

    def __init__(
        self,
        config: NodeConfig,
        ruleset: Ruleset,
        *,
        marks: MarkBits | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_stream: TextIO | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.started = clock()
        self.flow_log: FlowLog | None = None
        self.flow_log_file: FlowLogFile | None = None
        self.engine: Engine
        if config.flow_log is None:
            self.engine = Engine(config.table, ruleset)
        else:
            self.flow_log = FlowLog(config.node_id, config.flow_log, self.started)
            self.flow_log_file = FlowLogFile(config.flow_log.path, config.flow_log.max_bytes)
            self.engine = LoggingEngine(config.table, ruleset, self.flow_log)
        self.dataplane = Dataplane(config, marks)
        fast = config.fast_path.enabled
        self.kernel_ct = KernelConntrack(self.dataplane.marks.fast) if fast else None
        hold: HoldQueue[HeldPacket] | None = None
        if config.sync is not None:  # only a clustered node can expect replicas
            hold = HoldQueue(config.hold)
            self.engine.enable_hold()
        self.adapter = NfqAdapter(
            self.engine, config.queue, self.dataplane.marks, offload=fast, clock=clock,
            on_offloaded_delete=self.kernel_ct.forget if self.kernel_ct else None,
            hold=hold, on_events=self._offer if config.sync is not None else None,
        )  # fmt: skip
        # Built in start(): the link needs this run's epoch (a file in state_dir).
        self.link: SyncLink | None = None
        self.syncd: Supervisor | None = None
        sync = config.sync
        if sync is not None and sync.supervise and sync.config_file is not None:
            argv = [sys.executable, "-m", "syncd.cli", "syncd", "run", "--config",
                    sync.config_file]  # fmt: skip
            self.syncd = Supervisor(
                f"syncd {config.node_id}", argv, out=log_stream or sys.stderr,
                ready_prefix=f"stockade syncd {config.node_id} ready", clock=clock,
            )  # fmt: skip
        self.control = (
            ControlServer(config.control_socket, self.handle) if config.control_socket else None
        )
        # Built in start(): the cluster ruleset follower (rules_from_etcd).
        self.rules_follower: RulesetFollower | None = None
        self._follower_store: EtcdStore | None = None
        self._follower_task: asyncio.Task[None] | None = None
        self.metrics: MetricsServer | None = None
        if config.metrics is not None:
            collector = NodeCollector(config.node_id, self.metric_sources())
            self.metrics = MetricsServer(collector, config.metrics.host, config.metrics.port)
        self._pump: asyncio.Task[None] | None = None

    def metric_sources(self) -> MetricSources:
        """Every component's snapshot, for the Prometheus collector."""
        engine, flow_log, flow_log_file = self.engine, self.flow_log, self.flow_log_file
        return MetricSources(
            engine=engine.statistics,
            table=engine.table.statistics,
            ruleset=lambda: engine.ruleset.statistics(),  # the ruleset of the moment
            adapter=self.adapter.statistics,
            kernel_queue=lambda: kernel_queue_stats(self.config.queue.num),
            kernel_ct=self.kernel_ct.statistics if self.kernel_ct else None,
            dataplane_installed=lambda: self.dataplane.statistics().installed,
            flow_log=flow_log.statistics if flow_log else None,
            flow_log_file=flow_log_file.statistics if flow_log_file else None,
            sync_link=(lambda: self.link.statistics() if self.link else None)
            if self.config.sync
            else None,
            hold=self.adapter.hold.statistics if self.adapter.hold is not None else None,
            supervisor=self.syncd.statistics if self.syncd else None,
            rules=lambda: self.rules_follower.statistics() if self.rules_follower else None,
        )

    # -- sync ---------------------------------------------------------------

    def _offer(self, events: tuple[FlowEvent, ...]) -> None:
        """Engine events -> the sync link (O(1), never blocks); none before it exists."""
        if self.link is not None:
            self.link.offer(events)

    def _on_link_events(self, events: tuple[FlowEvent, ...]) -> None:
        """Table events the link's installs caused: clear FAST marks, log them."""
        if self.kernel_ct is not None:
            for event in events:
                if isinstance(event, FlowDeleted) and event.snapshot.offloaded:
                    self.kernel_ct.forget(event.snapshot)
        if self.flow_log is not None:
            self.flow_log.observe_events(events, self.clock())

    def _make_link(self) -> SyncLink:
        from syncd.config import bump_epoch
        from syncd.errors import ConfigError as SyncdConfigError
        from syncd.records import VersionClock

        assert self.config.sync is not None
        syncd = self.config.sync.syncd
        try:
            # The filter's own counter, beside syncd's: versions it stamps
            # start above anything an earlier run of this filter issued.
            epoch = bump_epoch(os.path.join(syncd.state_dir, "filter"))
        except SyncdConfigError as e:
            raise ConfigError(str(e)) from None
        return SyncLink(
            self.config.node_id, syncd.local_socket, self.engine.table,
            VersionClock(epoch << 32), epoch=epoch, now=self.clock,
            on_events=self._on_link_events, on_installed=self.adapter.release,
        )  # fmt: skip

    @property
    def synced(self) -> bool:
        """Ready for ownership: the table was restored from syncd (always, standalone)."""
        return self.config.sync is None or (self.link is not None and self.link.is_synced)

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.flow_log is not None and self.flow_log_file is not None:
            self.flow_log_file.open()
            self._pump = loop.create_task(
                pump(self.flow_log, self.flow_log_file, self.clock, time.time)
            )
            self._pump.add_done_callback(_report_pump_failure)
        if self.metrics is not None:
            await self.metrics.start()
        self.adapter.start(loop)
        self.dataplane.install()
        if self.kernel_ct is not None:
            self.kernel_ct.start()
            stale = await self.kernel_ct.flush_marks()
            if stale:
                log.info("cleared the fast-path mark of %d kernel flows from an earlier run", stale)
        if self.config.sync is not None:
            if self.syncd is not None:
                await self.syncd.start()
            self.link = self._make_link()
            await self.link.start()
        agent = self.config.sync.syncd.cluster if self.config.sync is not None else None
        if agent is not None and agent.rules_from_etcd:
            self._start_rules_follower(loop, agent.etcd)
        if self.control is not None:
            await self.control.start()

    def _start_rules_follower(self, loop: asyncio.AbstractEventLoop, etcd: EtcdConfig) -> None:
        """Follow rules/current in etcd (fail static: the file's ruleset runs until then)."""
        assert self.config.cluster_id is not None
        store = EtcdStore(etcd, self.config.cluster_id)
        self._follower_store = store
        self.rules_follower = RulesetFollower(
            store, self._on_cluster_ruleset, name=f"etcd {etcd.endpoint}"
        )
        self._follower_task = loop.create_task(self.rules_follower.run())
        self._follower_task.add_done_callback(_report_follower_failure)

    def _on_cluster_ruleset(self, ruleset: Ruleset, revision: int) -> None:
        self.engine.swap_ruleset(ruleset)

    async def stop(self) -> None:
        """Undo :meth:`start`; every step runs even when an earlier one fails.

        A node that failed to start touches only what it set up: its bind
        failing first means another node may own this namespace's chains
        and FAST marks, and those are left alone.
        """
        ours = self.dataplane.statistics().installed
        steps: list[tuple[str, Callable[[], Any]]] = [("unbind NFQUEUE", self.adapter.stop)]
        if ours:
            steps.insert(0, ("remove iptables chains", self.dataplane.remove))
        for what, step in steps:
            try:
                step()
            except Exception as e:
                log.error("shutdown: cannot %s: %s", what, e)
        if self.kernel_ct is not None:
            await self.kernel_ct.stop()
            if ours:
                await self.kernel_ct.flush_marks()
            self.kernel_ct.close()
        if self.control is not None:
            await self.control.close()
        if self._follower_task is not None:
            self._follower_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._follower_task
        if self._follower_store is not None:
            with contextlib.suppress(Exception):
                await self._follower_store.close()
        if self.link is not None:
            await self.link.stop()
        if self.syncd is not None:
            await self.syncd.stop()
        if self._pump is not None:
            self._pump.cancel()  # the pump writes what is left, then closes the file
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None
        if self.metrics is not None:
            await self.metrics.close()

    # -- commands (control socket and SIGHUP) -------------------------------

    def reload(self) -> dict[str, Any]:
        """Re-read the rules file; on any error keep the running ruleset."""
        running = self.engine.ruleset.revision
        try:
            ruleset = load_ruleset(self.config.rules_path)
        except BadInput as e:
            log.warning("reload refused, keeping revision %s: %s", running, e)
            return {"ok": False, "error": str(e), "revision": running}
        self.engine.swap_ruleset(ruleset)
        log.info("reloaded rules: revision %s -> %s (%d rules)",
                 running, ruleset.revision, len(ruleset.rules))  # fmt: skip
        return {"ok": True, "revision": ruleset.revision, "previous": running}

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "node_id": self.config.node_id,
            "uptime": round(self.clock() - self.started, 3),
            "synced": self.synced,
            "rules": self._rules_stats(),
            "sync": self._sync_stats(),
            "engine": jsonable(engine.statistics()),
            "table": jsonable(engine.table.statistics()),
            "ruleset": jsonable(engine.ruleset.statistics()),
            "adapter": jsonable(self.adapter.statistics()),
            "kernel_queue": jsonable(kernel_queue_stats(self.config.queue.num)),
            "kernel_ct": jsonable(self.kernel_ct.statistics() if self.kernel_ct else None),
            "dataplane": jsonable(self.dataplane.statistics()),
            "flow_log": jsonable(self.flow_log.statistics() if self.flow_log else None),
            "flow_log_file": jsonable(
                self.flow_log_file.statistics() if self.flow_log_file else None
            ),
            "metrics": jsonable(self.metrics.statistics() if self.metrics else None),
        }

    def _rules_stats(self) -> dict[str, Any]:
        """The ruleset this node runs: etcd revision (None: from the file) and hashes."""
        follower = self.rules_follower.statistics() if self.rules_follower else None
        return {
            "revision": follower.running_revision if follower else None,
            "sha256": follower.running_sha256 if follower else None,
            "policy": self.engine.ruleset.revision,
            "source": "etcd" if follower and follower.running_revision else "file",
            "follower": jsonable(follower),
        }

    def _sync_stats(self) -> dict[str, Any] | None:
        if self.config.sync is None:
            return None
        link = self.link.statistics() if self.link is not None else None
        hold = self.adapter.hold
        return {
            "connected": link.connected if link is not None else False,
            "synced": self.synced,
            "link": jsonable(link),
            "hold": jsonable(hold.statistics() if hold is not None else None),
            "syncd": jsonable(self.syncd.statistics() if self.syncd is not None else None),
            "supervised": self.syncd is not None,
        }

    def flows(self, limit: int) -> dict[str, Any]:
        from node.replay import flow_to_json

        now = self.clock()
        flows: list[dict[str, Any]] = []
        for snapshot in self.engine.table.flows():
            if len(flows) >= limit:
                break
            flows.append({**flow_to_json(snapshot, now), "offloaded": snapshot.offloaded})
        return {"count": len(self.engine.table), "flows": flows}

    async def handle(self, command: Mapping[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "ping":
            return {"node_id": self.config.node_id}
        if cmd == "stats":
            return self.stats()
        if cmd == "reload":
            return self.reload()
        if cmd == "flows":
            limit = command.get("limit", DEFAULT_FLOWS_LIMIT)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                return {"ok": False, "error": "limit must be a non-negative integer"}
            return self.flows(limit)
        return {"ok": False, "error": f"unknown command {cmd!r} (ping, stats, flows, reload)"}


async def _announce_synced(link: SyncLink) -> None:
    await link.wait_synced()
    log.info("synced: table restored from syncd, ready for ownership")


def _report_follower_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cluster ruleset follower failed: %r", task.exception())


def _report_pump_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("flow log stopped: %r", task.exception(), exc_info=task.exception())


def configure_logging(node_id: str, stream: TextIO | None = None) -> None:
    """One human line per event on stderr, naming the node."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s stockade node {node_id} %(levelname)s %(name)s: %(message)s"
    ))  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


async def _serve(node: Node, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, node.reload)
    cfg = node.config
    announce: asyncio.Task[None] | None = None
    try:
        await node.start(loop)
        metrics = f"{cfg.metrics.host}:{node.metrics.port}" if cfg.metrics and node.metrics else ""
        log.info("started: queue %d%s, hooks %s, fast path %s, control %s, metrics %s, flow log %s",
                 cfg.queue.num, " (bypass)" if cfg.queue.bypass else "", ",".join(cfg.hooks),
                 "on" if cfg.fast_path.enabled else "off", cfg.control_socket or "off",
                 metrics or "off",
                 cfg.flow_log.path if cfg.flow_log else "off")  # fmt: skip
        print(f"stockade node {cfg.node_id} ready queue={cfg.queue.num}", file=out, flush=True)
        if node.link is not None:
            announce = loop.create_task(_announce_synced(node.link))
        await stop.wait()
        log.info("stopping")
        return 0
    except (DataplaneError, ConfigError) as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        if announce is not None:
            announce.cancel()
        await node.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def run_node(config: NodeConfig, out: TextIO | None = None) -> int:
    """Run a node until SIGTERM/SIGINT.  Exit codes: 0 clean, 1 data plane, 2 rules."""
    configure_logging(config.node_id)
    try:
        ruleset = load_ruleset(config.rules_path)
    except BadInput as e:
        log.error("cannot load rules: %s", e)
        return 2
    node = Node(config, ruleset)
    try:
        return asyncio.run(_serve(node, out or sys.stdout))
    except NodeError as e:
        log.error("failed: %s", e)
        return 1
    finally:
        if node.dataplane.statistics().installed:
            try:
                node.dataplane.remove()
            except DataplaneError as e:
                log.error("cannot remove iptables chains: %s", e)
        log.info("stopped")
