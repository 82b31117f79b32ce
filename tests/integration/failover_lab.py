"""A three-node agent lab in network namespaces, and a sampler of the claim invariant.

    router eth0 10.88.0.1/24  ---+
    fw1    eth0 10.88.0.11/24 ---+
    fw2    eth0 10.88.0.12/24 ---+-- br0 10.88.0.2/24 in "sw" (a Linux bridge; etcd runs here)
    fw3    eth0 10.88.0.13/24 ---+

Each fw namespace runs one real syncd (``python -m syncd.cli run``) with a
node file (contract A) whose ``cluster`` section points at etcd in ``sw``;
VIPs go on each node's ``eth0``, the router-facing segment.  Sync streams,
etcd and the router share the segment; a sync partition is made with
iptables on port 7400 only.

The test process lives in the root namespace and cannot reach etcd, so the
:func:`sample` loop runs as a subprocess inside ``sw``
(``python -m tests.integration.failover_lab sample ...``): every few ms it
lists the ``vips/`` claims and member records in etcd and the VIP addresses
on every node (netlink sockets opened inside each namespace) and prints one
JSON line per change, stamped with ``time.monotonic()`` (the same clock in
every process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from chaos.lab.netns import Link, NetnsLab, TopologySpec
from node.control import ControlError, request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODES = ("fw1", "fw2", "fw3")
ADDR = {"router": "10.88.0.1", "fw1": "10.88.0.11", "fw2": "10.88.0.12", "fw3": "10.88.0.13"}
ETCD_HOST = "10.88.0.2"
ETCD = f"{ETCD_HOST}:2379"
VIPS = (
    ("10.88.0.101/24", "fw1"),
    ("10.88.0.102/24", "fw2"),
    ("10.88.0.103/24", "fw3"),
    ("10.88.0.104/24", None),
    ("10.88.0.105/24", None),
)
VIP_ADDRS = tuple(v.split("/")[0] for v, _ in VIPS)
SESSION = {"heartbeat_interval": 0.05, "suspect_after": 0.15, "dead_after": 1.0}


def segment() -> TopologySpec:
    hosts = ("router", *NODES)
    links = tuple(
        Link(host, "eth0", "sw", f"p{i}", (f"{ADDR[host]}/24",), ()) for i, host in enumerate(hosts)
    )
    return TopologySpec(hosts=(*hosts, "sw"), links=links)


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)


class Sampler:
    """The sampler subprocess and the snapshots it printed."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.samples: list[dict[str, Any]] = []
        self.count = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                sample = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "count" in sample:
                    self.count = sample["count"]
                else:
                    self.samples.append(sample)

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def since(self, t: float) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.samples if s["t"] >= t]

    def wait(
        self, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            latest = self.latest()
            return latest if latest is not None and check(latest) else None

        result: dict[str, Any] = wait_for(ok, timeout, what, every=0.005)
        return result


class Cluster:
    """Lab + etcd + three syncd processes with agents."""

    def __init__(self, workdir: str, overrides: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.cluster_id = f"fo-{uuid.uuid4().hex[:6]}"
        self.lab = NetnsLab(segment(), f"fo-{uuid.uuid4().hex[:5]}")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.etcd: subprocess.Popen[bytes] | None = None
        self.sampler: Sampler | None = None
        self.overrides = overrides or {}

    # --- build ----------------------------------------------------------------

    def up(self) -> None:
        lab = self.lab
        lab.up()
        lab.sh("sw", "ip link add br0 type bridge mcast_snooping 0")
        for i in range(len(NODES) + 1):
            lab.sh("sw", f"ip link set p{i} master br0")
        lab.sh("sw", f"ip addr add {ETCD_HOST}/24 dev br0")
        lab.sh("sw", "ip link set br0 up")
        for host in NODES:
            lab.run("router", ["ping", "-c", "1", "-W", "2", ADDR[host]])
        self._start_etcd()
        for node in NODES:
            self.start(node)

    def _start_etcd(self) -> None:
        data = os.path.join(self.workdir, "etcd")
        argv = [sys.executable, "-m", "cluster.etcd_server", "--host", ETCD_HOST,
                "--client-port", "2379", "--peer-port", "2380", "--data-dir", data]  # fmt: skip
        self.etcd = self.lab.popen("sw", argv, stdout=subprocess.PIPE, cwd=REPO)
        assert self.etcd.stdout is not None
        line = self.etcd.stdout.readline().decode()
        if "at" not in line:
            raise AssertionError(f"etcd did not start: {line!r}")

    def node_file(self, node: str) -> str:
        base = os.path.join(self.workdir, node)
        os.makedirs(base, exist_ok=True)
        cluster: dict[str, Any] = {
            "etcd": {"endpoint": ETCD, "lease_ttl": 1, "timeout": 1.0},
            "vips": [
                {"address": v, "interface": "eth0", **({"home": h} if h else {})} for v, h in VIPS
            ],
            "require_filter": False,
            "join_grace": 3.0,
            "status_interval": 0.5,
            **self.overrides,
        }
        body = {
            "node_id": node,
            "cluster_id": self.cluster_id,
            "rules": "rules.yaml",
            "sync": {
                "listen": f"{ADDR[node]}:7400",
                "state_dir": "state",
                "local_socket": "sync.sock",
                "control_socket": "syncd.ctl",
                "insecure": True,
                "session": SESSION,
                "recovery_timeout": 1.0,
            },
            "cluster": cluster,
        }
        path = os.path.join(base, "node.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(body, f)
        return path

    def control(self, node: str) -> str:
        return os.path.join(self.workdir, node, "syncd.ctl")

    def start(self, node: str) -> None:
        path = self.node_file(node)
        log = open(os.path.join(self.workdir, node, "stderr.log"), "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "syncd.cli", "syncd", "run", "--config", path]
        self.procs[node] = self.lab.popen(
            node, argv, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO
        )
        log.close()

    def status(self, node: str) -> dict[str, Any] | None:
        try:
            return request(self.control(node), {"cmd": "status"}, timeout=2.0)
        except ControlError:
            return None

    def wait_all_up(self, nodes: tuple[str, ...] = NODES, timeout: float = 20.0) -> None:
        def all_up() -> bool:
            states = [self.status(n) for n in nodes]
            return all(s is not None and s.get("state") == "up" for s in states)

        wait_for(all_up, timeout, f"{nodes} up", every=0.1)

    def log(self, node: str) -> str:
        with open(os.path.join(self.workdir, node, "stderr.log"), errors="replace") as f:
            return f.read()

    # --- observe ----------------------------------------------------------------

    def start_sampler(self) -> Sampler:
        argv = [sys.executable, "-m", "tests.integration.failover_lab", "sample",
                "--etcd", ETCD, "--cluster", self.cluster_id,
                *[f"{n}={self.lab.ns(n)}" for n in NODES]]  # fmt: skip
        proc = self.lab.popen("sw", argv, stdout=subprocess.PIPE, cwd=REPO)
        self.sampler = Sampler(proc)
        wait_for(self.sampler.latest, 10.0, "first sample")
        return self.sampler

    def router_mac(self, vip: str) -> str | None:
        argv = ["ip", "-j", "neigh", "show", "to", vip, "dev", "eth0"]
        entries = json.loads(self.lab.run("router", argv) or "[]")
        macs = [e["lladdr"] for e in entries if e.get("lladdr")]
        return str(macs[0]) if macs else None

    def node_mac(self, node: str) -> str:
        argv = ["ip", "-j", "link", "show", "eth0"]
        return str(json.loads(self.lab.run(node, argv))[0]["address"])

    def partition(self, node: str, cut: bool = True) -> None:
        """Cut (or heal) the node's sync traffic: the TCP streams and the UDP
        beacons, which share port 7400, as a broken link would."""
        op = "-A" if cut else "-D"
        for proto in ("tcp", "udp"):
            for chain, flag in (("INPUT", "--dport"), ("INPUT", "--sport"),
                                ("OUTPUT", "--dport"), ("OUTPUT", "--sport")):  # fmt: skip
                argv = ["iptables", op, chain, "-p", proto, flag, "7400", "-j", "DROP"]
                self.lab.run(node, argv)

    # --- teardown ---------------------------------------------------------------------

    def down(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a test may have left one stopped
        if self.sampler is not None:
            self.lab.stop(self.sampler.proc, timeout=2.0)
        for proc in self.procs.values():
            self.lab.stop(proc, timeout=5.0)
        if self.etcd is not None:
            self.lab.stop(self.etcd, timeout=5.0)
        self.lab.down()


@contextlib.contextmanager
def running_cluster(workdir: str, **overrides: Any) -> Iterator[Cluster]:
    cluster = Cluster(workdir, overrides)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


# --- invariants (pure, over samples) -------------------------------------------------


def double_addresses(sample: dict[str, Any], running: set[str]) -> dict[str, list[str]]:
    """VIPs whose address is on more than one of the ``running`` nodes."""
    on: dict[str, list[str]] = {}
    for node, vips in sample["addrs"].items():
        if node in running:
            for vip in vips:
                on.setdefault(vip, []).append(node)
    return {vip: nodes for vip, nodes in on.items() if len(nodes) > 1}


def address_without_claim(sample: dict[str, Any], running: set[str]) -> dict[str, str]:
    """Addresses on a running node that etcd says another node holds."""
    wrong = {}
    for node, vips in sample["addrs"].items():
        for vip in vips:
            holder = sample["vips"].get(vip)
            if node in running and holder is not None and holder != node:
                wrong[vip] = f"on {node}, claimed by {holder}"
    return wrong


# --- the sampler (runs inside the etcd namespace) ----------------------------------------


async def _sample(etcd: str, cluster_id: str, nodes: dict[str, str], every: float) -> None:
    from cluster.errors import EtcdError
    from cluster.etcd import EtcdConfig, EtcdStore
    from cluster.membership import MemberRecord
    from cluster.vip import VipError, VipManager

    managers = {n: await VipManager("eth0", ns).open() for n, ns in nodes.items()}
    last: Any = None
    count = 0
    async with EtcdStore(EtcdConfig(etcd, timeout=0.5), cluster_id) as store:
        while True:
            started = time.monotonic()
            try:
                holders = await store.vip_holders()
                listing = await store.list_members()
            except EtcdError:
                holders, listing = {"?": "etcd unreachable"}, None
            addrs = {}
            for node, manager in managers.items():
                try:
                    addrs[node] = sorted(await manager.held())
                except VipError:
                    addrs[node] = ["?"]
            members = {}
            for put in listing.puts if listing else ():
                with contextlib.suppress(Exception):
                    record = MemberRecord.from_json(put.value)
                    members[record.node_id] = record.state.value
            count += 1
            state = (holders, addrs, members)
            if state != last:
                last = state
                line = {"t": started, "vips": holders, "addrs": addrs, "members": members}
                print(json.dumps(line), flush=True)
            elif count % 200 == 0:
                print(json.dumps({"count": count}), flush=True)
            await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="failover_lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sample = sub.add_parser("sample")
    sample.add_argument("--etcd", required=True)
    sample.add_argument("--cluster", required=True)
    sample.add_argument("--every", type=float, default=0.003)
    sample.add_argument("nodes", nargs="+", help="node=netns")
    args = parser.parse_args(argv)
    nodes = dict(item.split("=", 1) for item in args.nodes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_sample(args.etcd, args.cluster, nodes, args.every))
    return 0


if __name__ == "__main__":
    sys.exit(main())
