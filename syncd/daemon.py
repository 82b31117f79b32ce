"""The syncd process: wires the pure core to gRPC, the filter and a control socket.

Start-up, in order (a node must recover its own table before its peers pull
a snapshot of it, or they would sweep away its live flows):

1. bump the epoch counter in ``state_dir`` (every start gets a higher one);
2. bind the gRPC server (Exchange refused with UNAVAILABLE until step 5,
   Snapshot served at once) and the control socket;
3. pull this node's own flows back from every peer (``Snapshot`` with
   origin = ourselves, all peers at once, within ``recovery_timeout``);
4. bind the local socket: only now may the filter connect, so the table it
   restores holds the own flows just recovered (a filter that restarted with
   the node would otherwise miss them, and drop them once the node takes
   its VIPs back); open one channel per peer and start a dialer for each
   peer with a higher node id;
5. accept Exchange streams and print ``stockade syncd <id> ready listen=<addr>``.

SIGTERM/SIGINT stop it cleanly.  Logs are one line each on stderr, naming
the node.  The control socket (``node.control``'s JSON lines) answers
``ping``, ``stats`` (status, per-peer state and counters, store size),
``flows`` (store content, optionally of one ``origin``, up to ``limit``)
and ``digest`` (per origin: record count and an order-independent hash,
for cheap convergence checks).

Status: ``recovering`` (step 3), then ``syncing`` while a snapshot of a peer
is being pulled or a stream is in its Hello exchange, or during
``recovery_timeout`` after start for a peer not heard from yet; else
``ready``.  A node must not take traffic ownership before ``ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO

import grpc

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.aerun import AntiEntropy
from syncd.beacon_io import BeaconService
from syncd.client import Dialer, make_channel, pull_origin
from syncd.config import (
    PeerConfig,
    SyncdConfig,
    bump_epoch,
    is_ip_literal,
    load_beacon_key,
    split_address,
)
from syncd.errors import ConfigError, SyncError
from syncd.keyindex import ORDER_KEY
from syncd.local import LocalDeltas, LocalServer
from syncd.peers import GcPause, LocalOrigin, PeerLink, tune_gc
from syncd.records import FlowRecord
from syncd.replica import Change, ReplicaStore
from syncd.service import StateSyncService, dials, make_server
from syncd.session import State, records_field
from syncd.tls import TlsMaterial, load_material, server_credentials, server_options

if TYPE_CHECKING:
    from syncd.agent_glue import ClusterAgent

log = logging.getLogger("syncd.daemon")

DEFAULT_FLOWS_LIMIT: Final = 100_000
_EXPIRE_EVERY: Final = 1.0  # seconds between store expiry checks at most
# The event loop is probed this often; how late the probe wakes is the lag
# every stream suffers (a lag near suspect_after makes peers suspect us).
_LAG_PROBE: Final = 0.05
# Without a cluster agent (static peers), beacons stop this long after the
# event loop last ran: the agent's own default stall limit (lease TTL / 2).
_ALIVE_WITHIN: Final = 0.5


class SyncNode:
    """One node's syncd: store, own origin, peer links, servers."""

    def __init__(
        self,
        config: SyncdConfig,
        epoch: int,
        material: TlsMaterial | None,
        beacon_key: bytes | None = None,
    ) -> None:
        self.config = config
        self.material = material
        self.beacon_key = beacon_key
        self.beacons: BeaconService | None = None  # started with the gRPC server
        self._beacon_addrs: dict[str, tuple[str, int]] = {}  # peer -> resolved UDP address
        self._resolving: dict[str, asyncio.Task[None]] = {}  # host-name peers being resolved
        self.store = ReplicaStore(config.store)
        self.origin = LocalOrigin(config.node_id, epoch, self.store)
        self.links: dict[str, PeerLink] = {}
        # No collector passes while a snapshot of a peer is pulled (syncd.peers.GcPause).
        self.gc_pause = GcPause()
        self.peers: dict[str, PeerConfig] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._dialers: dict[str, tuple[Dialer, asyncio.Task[None]]] = {}
        self._recovering = True
        self._ready_at: float | None = None
        self.service = StateSyncService(
            config.node_id, config.cluster_id, material is not None,
            config.session.dead_after, self.links.get, self.accepting, self.snapshot_chunk,
        )  # fmt: skip
        self.local = LocalServer(
            config.local_socket, config.node_id, epoch, self.apply_local,
            lambda: list(self.store.records()), config.local_queue,
        )  # fmt: skip
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lag_max = 0.0
        self._lag_over_100ms = 0
        # H2: anti-entropy (syncd/aerun.py): answers peers' rounds, runs ours.
        self.anti_entropy = AntiEntropy(
            config.node_id, self.store, lambda: self.origin.clock.last, self.links,
            self._channels, self.replica_changes, config.anti_entropy,
        )  # fmt: skip
        self.service.anti_entropy = self.anti_entropy
        self.agent: ClusterAgent | None = None  # set by _serve when configured

    # --- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Steps 2-5 of the module docstring; :class:`ConfigError` if a bind fails."""
        cfg = self.config
        self._server = make_server(self.service, server_options(cfg.max_message_bytes))
        try:
            if self.material is None:
                port = self._server.add_insecure_port(cfg.listen)
            else:
                port = self._server.add_secure_port(cfg.listen, server_credentials(self.material))
        except RuntimeError as e:
            raise ConfigError(f"listen {cfg.listen}: cannot bind: {e}") from None
        if not port:
            raise ConfigError(f"listen {cfg.listen}: cannot bind")
        await self._server.start()
        if cfg.beacons.enabled:
            self._start_beacons(port)
        self._tasks.append(asyncio.create_task(self._expire_loop()))
        self._tasks.append(asyncio.create_task(self._lag_loop()))
        self._tasks.append(asyncio.create_task(self.anti_entropy.run()))  # H2
        # With a cluster agent the peers come from etcd (set before start).
        peers = cfg.peers if cfg.cluster is None else tuple(self.peers.values())
        self.set_peers(peers)
        await self._recover()
        # Only now the filter may connect: its first reconcile round must see
        # the own flows just pulled back from the peers.  Served earlier, a
        # restarted node's filter restored a table without them, and when the
        # node took its VIPs back those flows were dropped as unknown.
        await self.local.start()
        self._recovering = False
        self._ready_at = time.monotonic()
        self.set_peers(peers if cfg.cluster is None else tuple(self.peers.values()))

    def _start_beacons(self, port: int) -> None:
        """UDP beacons on the listen address and the port gRPC got (syncd.beacon_io)."""
        cfg = self.config
        host, _ = split_address("listen", cfg.listen, ip_only=True)
        # A loop stalled this long fences its own node: stop vouching for it then.
        alive_within = cfg.cluster.stall_limit if cfg.cluster is not None else _ALIVE_WITHIN
        self.beacons = BeaconService(
            cluster_id=cfg.cluster_id, node_id=cfg.node_id, epoch=self.origin.epoch,
            bind=(host, port), key=self.beacon_key, interval=cfg.beacons.interval,
            alive_within=alive_within,
        )  # fmt: skip
        self.beacons.start()

    async def stop(self) -> None:
        if self.beacons is not None:
            self.beacons.stop()
        for task in list(self._resolving.values()):
            task.cancel()
        for link in self.links.values():
            link.stop("shutting down")
        for _, task in self._dialers.values():
            task.cancel()
        for task in self._tasks:
            task.cancel()
        for task in [t for _, t in self._dialers.values()] + self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._dialers.clear()
        if self._server is not None:
            await self._server.stop(0.5)
        for channel in self._channels.values():
            await channel.close()
        await self.local.close()

    async def _recover(self) -> None:
        """Pull our own flows back from every peer (see the module docstring)."""
        if not self.peers or self.config.recovery_timeout <= 0:
            return
        now = time.monotonic()

        def take(records: list[FlowRecord]) -> None:
            for record in records:
                self.origin.recover(record, now)

        pulls = [
            pull_origin(ch, peer, self.config.node_id, take, self.config.recovery_timeout)
            for peer, ch in self._channels.items()
        ]
        for result in await asyncio.gather(*pulls):
            if result.complete:
                log.info("recovered %d own flows from %s", result.records, result.peer)
            else:
                log.info("no recovery from %s: %s", result.peer, result.error)

    # --- membership ---------------------------------------------------------------

    def set_peers(self, peers: Sequence[PeerConfig]) -> None:
        """Make ``peers`` the membership: links, channels and dialers follow."""
        wanted = {p.node_id: p for p in peers if p.node_id != self.config.node_id}
        now = time.monotonic()
        for peer in [p for p in self.peers if p not in wanted]:
            self._drop_peer(peer, now)
        for peer, pc in wanted.items():
            if peer in self.peers and self.peers[peer].address != pc.address:
                self._drop_dialer(peer)
            if peer not in self.links:
                self.links[peer] = PeerLink(
                    peer, self.origin, self.config.session, self.config.outbox_capacity,
                    self.replica_changes, gc_pause=self.gc_pause,
                )  # fmt: skip
                self.store.origin_joined(peer)
            if peer not in self._channels or self.peers[peer].address != pc.address:
                self._channels[peer] = make_channel(
                    pc.address, peer, self.material, self.config.max_message_bytes
                )
            self.peers[peer] = pc
            if not self._recovering and dials(self.config.node_id, peer):
                self._start_dialer(peer)
        self._beacon_peers()

    def _beacon_peers(self) -> None:
        """Point the beacons at the peers' sync addresses (UDP, same port as gRPC).

        Member records carry IP literals; a static peer given by host name is
        resolved off the loop and added when the answer comes.
        """
        if self.beacons is None:
            return
        wanted: dict[str, tuple[str, int]] = {}
        for peer, pc in self.peers.items():
            host, port = split_address(f"peers.{peer}.address", pc.address)
            if is_ip_literal(host):
                wanted[peer] = (host, port)
            elif (resolved := self._beacon_addrs.get(peer)) is not None:
                wanted[peer] = resolved
            elif peer not in self._resolving:
                task = asyncio.get_running_loop().create_task(
                    self._resolve_beacon_peer(peer, host, port)
                )
                self._resolving[peer] = task  # a reference, or the task may be collected
        self.beacons.set_peers(wanted)

    async def _resolve_beacon_peer(self, peer: str, host: str, port: int) -> None:
        try:
            await self._resolve_into(peer, host, port)
        finally:
            self._resolving.pop(peer, None)

    async def _resolve_into(self, peer: str, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as e:
            log.warning("beacons: cannot resolve %s (%s): %s", host, peer, e)
            return
        if peer in self.peers and infos:
            self._beacon_addrs[peer] = (str(infos[0][4][0]), port)
            self._beacon_peers()

    def _start_dialer(self, peer: str) -> None:
        if peer in self._dialers:
            return
        dialer = Dialer(self.links[peer], self.peers[peer].address, self._channels[peer])
        self._dialers[peer] = (dialer, asyncio.create_task(dialer.run()))

    def _drop_dialer(self, peer: str) -> None:
        entry = self._dialers.pop(peer, None)
        if entry is not None:
            entry[1].cancel()
        channel = self._channels.pop(peer, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())

    def _drop_peer(self, peer: str, now: float) -> None:
        self._beacon_addrs.pop(peer, None)
        self._drop_dialer(peer)
        link = self.links.pop(peer)
        link.stop("left the membership")
        del self.peers[peer]
        self.store.origin_left(peer, now)

    # --- data paths ------------------------------------------------------------------

    def apply_local(self, deltas: LocalDeltas) -> None:
        """The filter's changes: applied, numbered and pushed to every peer in one step."""
        now = time.monotonic()
        links = list(self.links.values())
        for op, record in deltas:
            delta = self.origin.change(op, record, now)
            if delta is not None:
                for link in links:
                    link.push(delta, now)

    def replica_changes(self, changes: tuple[Change, ...]) -> None:
        self.origin.observe(changes)
        self.local.replica_changes(changes)

    def accepting(self) -> bool:
        return not self._recovering

    def snapshot_chunk(
        self, origin: str, cursor: bytes, limit: int, order: int = ORDER_KEY
    ) -> pb.SnapshotChunk:
        page = self.store.snapshot_page(origin, cursor, limit, order)
        if origin == self.config.node_id:
            epoch, base = self.origin.epoch, self.origin.last_seq
        elif origin in self.links:
            inbox = self.links[origin].inbox
            epoch, base = inbox.epoch, inbox.applied
        else:
            epoch = base = 0
        chunk = pb.SnapshotChunk(
            origin=origin, epoch=epoch, base_seq=base, cursor=cursor,
            next_cursor=page.next_cursor, last=page.last, order=order,
        )  # fmt: skip
        chunk.MergeFromString(records_field(page.records))  # the records' cached wire forms
        return chunk

    async def _expire_loop(self) -> None:
        while True:
            deadline = self.store.next_deadline()
            now = time.monotonic()
            delay = _EXPIRE_EVERY if deadline is None else min(_EXPIRE_EVERY, deadline - now)
            await asyncio.sleep(max(delay, 0.01))
            changes = self.store.expire(time.monotonic())
            if changes:
                self.local.replica_changes(changes)

    async def _lag_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(_LAG_PROBE)
            lag = loop.time() - before - _LAG_PROBE
            if self.beacons is not None:
                self.beacons.loop_alive(time.monotonic())  # the loop runs: keep vouching
            self._lag_max = max(self._lag_max, lag)
            if lag > 0.1:
                self._lag_over_100ms += 1

    # --- control -------------------------------------------------------------------

    def status(self) -> str:
        if self._recovering:
            return "recovering"
        grace = self._ready_at is not None and (
            time.monotonic() - self._ready_at < self.config.recovery_timeout
        )
        for link in self.links.values():
            if link.inbox.pulling or link.state is State.HELLO_SENT:
                return "syncing"
            if grace and link.inbox.epoch == 0:
                return "syncing"
        return "ready"

    def stats(self) -> dict[str, Any]:
        return {
            "node_id": self.config.node_id,
            "cluster_id": self.config.cluster_id,
            "status": self.status(),
            "origin": self.origin.statistics(),
            "store": self.store.statistics(),
            "peers": {p: link.statistics() for p, link in sorted(self.links.items())},
            "dialers": {p: d.statistics() for p, (d, _) in sorted(self._dialers.items())},
            "service": self.service.statistics(),
            "local": self.local.statistics(),
            "loop": {"lag_max_seconds": self._lag_max, "lags_over_100ms": self._lag_over_100ms},
            "gc": {"paused": self.gc_pause.held, "pauses": self.gc_pause.pauses},
            "anti_entropy": self.anti_entropy.statistics(),  # H2
            "beacons": self.beacons.statistics() if self.beacons is not None else None,
        }

    @property
    def loop_lag_max(self) -> float:
        """Longest event-loop stall seen since start, seconds (the lag probe's)."""
        return self._lag_max

    def flows(self, origin: str | None, limit: int) -> dict[str, Any]:
        records: list[dict[str, Any]] = []
        for record in self.store.records(origin):
            if len(records) >= limit:
                break
            records.append(_record_json(record))
        return {"count": len(self.store), "flows": records}

    def digest(self) -> dict[str, Any]:
        by_origin: dict[str, list[int]] = {}
        for record in self.store.records():
            content = record.key + record.version.to_bytes(8, "big") + record.origin.encode()
            value = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "big")
            entry = by_origin.setdefault(record.origin, [0, 0])
            entry[0] += 1
            entry[1] ^= value
        return {
            "origins": {o: {"count": n, "hash": f"{h:016x}"} for o, (n, h) in by_origin.items()}
        }

    async def handle(self, command: Mapping[str, Any]) -> dict[str, Any]:
        cmd = command.get("cmd")
        if cmd == "ping":
            return {"node_id": self.config.node_id, "status": self.status()}
        if cmd == "stats":
            return self.stats()
        if cmd == "digest":
            return self.digest()
        if cmd == "flows":
            limit = command.get("limit", DEFAULT_FLOWS_LIMIT)
            origin = command.get("origin")
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                return {"ok": False, "error": "limit must be a non-negative integer"}
            if origin is not None and not isinstance(origin, str):
                return {"ok": False, "error": "origin must be a node id"}
            return self.flows(origin, limit)
        if cmd in ("status", "drain"):
            if self.agent is None:
                return {
                    "ok": False,
                    "error": "no cluster agent (no cluster section)",
                }
            return self.agent.control(cmd)
        return {
            "ok": False,
            "error": f"unknown command {cmd!r} (ping, stats, flows, digest, status, drain)",
        }


def _record_json(record: FlowRecord) -> dict[str, Any]:
    return {
        "key": record.key.hex(), "origin": record.origin, "version": record.version,
        "state": record.state, "proto": record.proto, "family": record.family,
        "orig_src": record.orig_src, "orig_sport": record.orig_sport,
        "orig_dst": record.orig_dst, "orig_dport": record.orig_dport,
        "assured": record.assured, "timeout": record.timeout,
    }  # fmt: skip


# --- process -----------------------------------------------------------------------


def configure_logging(node_id: str, stream: TextIO | None = None) -> None:
    """One human line per event on stderr, naming the node."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s stockade syncd {node_id} %(levelname)s %(name)s: %(message)s"
    ))  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


async def _serve(node: SyncNode, out: TextIO) -> int:
    from cluster.errors import ClusterError
    from node.control import ControlServer  # the node package's JSON-lines server
    from node.errors import NodeError
    from syncd.agent_glue import ClusterAgent

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cfg = node.config
    control = ControlServer(cfg.control_socket, node.handle) if cfg.control_socket else None
    agent = ClusterAgent(node) if cfg.cluster is not None else None
    node.agent = agent
    metrics = None
    try:
        if control is not None:
            await control.start()
        if cfg.metrics is not None:  # first: a scrape during a long recovery shows its progress
            from syncd.metrics import start_metrics

            metrics = await start_metrics(node, cfg.metrics, agent.collector() if agent else None)
        if agent is not None:
            await agent.start()  # registers; peers from etcd before recovery
        await node.start()
        log.info("started: epoch %d, %d peers, tls %s, local %s", node.origin.epoch,
                 len(node.peers), "on" if node.material else "OFF", cfg.local_socket)  # fmt: skip
        print(f"stockade syncd {cfg.node_id} ready listen={cfg.listen}", file=out, flush=True)
        await stop.wait()
        log.info("stopping")
        return 0
    except (SyncError, NodeError, ClusterError) as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        if agent is not None:
            await agent.stop()
        await node.stop()
        if metrics is not None:
            await metrics.close()
        if control is not None:
            await control.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def set_priority(nice: int) -> None:
    """Set this process's niceness (``SyncdConfig.nice``); warn if the kernel refuses."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as e:
        log.warning(
            "cannot set niceness %d (%s): beacons may be late when the CPUs are busy",
            nice, e.strerror or e,
        )  # fmt: skip


def run_syncd(config: SyncdConfig, out: TextIO | None = None) -> int:
    """Run syncd until SIGTERM/SIGINT.  Exit codes: 0 clean, 1 runtime, 2 configuration."""
    configure_logging(config.node_id)
    try:
        epoch = bump_epoch(config.state_dir)
        material = (
            None
            if config.tls is None
            else load_material(config.tls, config.cluster_id, config.node_id)
        )
        key_file = config.beacon_key_file if config.beacons.enabled else None
        beacon_key = load_beacon_key(key_file) if key_file is not None else None
    except ConfigError as e:
        log.error("cannot start: %s", e)
        return 2
    set_priority(config.nice)  # before any thread starts: threads inherit it
    node = SyncNode(config, epoch, material, beacon_key)
    tune_gc()  # H2 (syncd/peers.py): fewer collector passes per delta
    try:
        return asyncio.run(_serve(node, out or sys.stdout))
    finally:
        log.info("stopped")
