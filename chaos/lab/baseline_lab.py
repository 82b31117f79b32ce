"""The comparison system in the lab: ``stockade lab up --system keepalived-conntrackd``.

Same namespaces, addresses, routers, VIP pool and traffic server as the
Stockade lab; in each firewall namespace, instead of ``stockade node run``:

* the stateful kernel rules of :func:`chaos.baseline.iptables_rules` and
  ``nf_conntrack_tcp_loose = 0`` (a mid-stream segment without synced
  state is INVALID, so the figures measure the state sync);
* conntrackd (FTFW over multicast on the management segment, entries
  written straight into the kernel), in the foreground, one lock file and
  socket per node;
* keepalived (VRRPv3, one instance per VIP, home node first) with
  ``--advert-int``, VRRP only, in the foreground, private PID files.

conntrackd starts first and asks its peers for their tables (``-n``)
before keepalived runs, so a restarted node holds the flows before it
takes its VIPs back (preemption).  No etcd: nothing here uses it.

:func:`node_commands` is pure (argv lists); the rest starts processes.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos import baseline
from chaos.errors import LabError
from chaos.lab import build
from chaos.lab.build import proc_start, same_process
from chaos.lab.topology import LabTopology

SYSTEM = "keepalived-conntrackd"
SYSTEMS = ("stockade", SYSTEM)
DEFAULT_ADVERT_INT = 1.0
RESYNC_TIMEOUT = 5.0  # seconds for the peers' tables to arrive after a resync request
_TUPLE = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")
# The kernel sets an established entry's timeout back to 432000 s (5 days)
# on every packet it forwards: above this, the node carries the flow now.
ACTIVE_TIMEOUT = 431_000


@dataclass(frozen=True, slots=True)
class BaselinePaths:
    dir: Path
    keepalived_conf: Path
    conntrackd_conf: Path
    rules: Path
    keepalived_pids: tuple[Path, Path, Path]  # parent, VRRP child, checker child

    @property
    def conntrackd_socket(self) -> Path:
        return self.dir / "conntrackd.ctl"

    @property
    def conntrackd_lock(self) -> Path:
        return self.dir / "conntrackd.lock"


def baseline_paths(state_dir: Path, node: str) -> BaselinePaths:
    d = state_dir / node
    return BaselinePaths(
        dir=d,
        keepalived_conf=d / "keepalived.conf",
        conntrackd_conf=d / "conntrackd.conf",
        rules=d / "iptables.rules",
        keepalived_pids=(d / "keepalived.pid", d / "vrrp.pid", d / "checkers.pid"),
    )


def _interface(topo: LabTopology, node: str, segment: str) -> tuple[str, str]:
    for seg, ifname, addr in topo.node(node).interfaces:
        if seg == segment:
            return ifname, addr.split("/")[0]
    raise LabError(f"topology: node {node} has no {segment!r} interface (baseline needs it)")


def write_files(topo: LabTopology, state_dir: Path, advert_int: float) -> None:
    """keepalived.conf, conntrackd.conf and the rules of every node."""
    mgmt = topo.root_segment or "mgmt"
    nodes = []
    for spec in topo.nodes:
        mgmt_if, mgmt_addr = _interface(topo, spec.node_id, mgmt)
        d = baseline_paths(state_dir, spec.node_id).dir
        nodes.append(baseline.BaselineNode(spec.node_id, spec.index, mgmt_if, mgmt_addr, str(d)))
    vips = [baseline.BaselineVip(v.address, v.interface, v.home) for v in topo.vips]
    # The management segment's own traffic (etcd, sync, host CLIs) is not synced.
    ignore = sorted({topo.etcd_address} | {n.mgmt_address for n in nodes})
    if topo.root_addr:
        ignore.append(topo.root_addr.split("/")[0])
    for node in nodes:
        paths = baseline_paths(state_dir, node.name)
        paths.dir.mkdir(parents=True, exist_ok=True)
        try:
            paths.keepalived_conf.write_text(
                baseline.keepalived_conf(node, nodes, vips, advert_int)
            )
        except ValueError as e:
            raise LabError(f"--advert-int: {e}") from e
        mode = "FTFW" if len(nodes) <= 2 else "NOTRACK"  # see chaos.baseline.conntrackd_conf
        paths.conntrackd_conf.write_text(baseline.conntrackd_conf(node, ignore, mode))
        outside, _ = _interface(topo, node.name, "outside")
        inside, _ = _interface(topo, node.name, "inside")
        paths.rules.write_text(baseline.iptables_rules(inside, outside, topo.client_net))


def node_commands(ns: str, paths: BaselinePaths) -> dict[str, list[str]]:
    """The argv of each step that starts one baseline node (pure)."""
    netns = ["ip", "netns", "exec", ns]
    kpid, vpid, cpid = (str(p) for p in paths.keepalived_pids)
    return {
        "rules": [*netns, "iptables-restore", "-w", "5", str(paths.rules)],
        # After the rules: their conntrack match loads conntrack in the namespace.
        "loose": [*netns, "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=0"],
        "conntrackd": [*netns, "conntrackd", "-C", str(paths.conntrackd_conf)],
        "resync": [*netns, "conntrackd", "-C", str(paths.conntrackd_conf), "-n"],
        "status": [*netns, "conntrackd", "-C", str(paths.conntrackd_conf), "-s"],
        "keepalived": [
            *netns,
            "keepalived",
            "--dont-fork",
            "--vrrp",
            "--log-console",
            "--log-detail",
            "--no-syslog",
            "--use-file",
            str(paths.keepalived_conf),
            "--pid",
            kpid,
            "--vrrp_pid",
            vpid,
            "--checkers_pid",
            cpid,
        ],
    }


def _spawn(argv: list[str], log: Path) -> int:
    from chaos.lab.cluster_lab import _DETACHED

    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _DETACHED.append(proc)
    return proc.pid


def _conntrackd_answers(cmds: Mapping[str, list[str]]) -> bool:
    done = subprocess.run(cmds["status"], capture_output=True, timeout=5)
    return done.returncode == 0


def start_node(state: dict[str, Any], node: str) -> tuple[int, ...]:
    """Rules, conntrackd (with a resync from the peers), then keepalived; PIDs recorded."""
    entry = state["nodes"][node]
    ns = entry["namespace"]
    paths = baseline_paths(Path(state["state_dir"]), node)
    cmds = node_commands(ns, paths)
    log = Path(entry["log"])
    build.run(cmds["rules"])
    build.run(cmds["loose"])
    # Left behind by a killed conntrackd: it refuses to start while they exist.
    for stale in (paths.conntrackd_lock, paths.conntrackd_socket, *paths.keepalived_pids):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    ct_pid = _spawn(cmds["conntrackd"], log)
    entry["conntrackd_pid"], entry["conntrackd_start"] = ct_pid, proc_start(ct_pid)
    deadline = time.monotonic() + 10
    while not _conntrackd_answers(cmds):
        if time.monotonic() > deadline or not same_process(ct_pid, entry["conntrackd_start"]):
            raise LabError(f"{node}: conntrackd did not start (see {paths.dir}/conntrackd.log)")
        time.sleep(0.05)
    build.run(cmds["resync"], check=False)
    _wait_resynced(state, node)
    pid = _spawn(cmds["keepalived"], log)
    entry["pid"], entry["start"] = pid, proc_start(pid)
    return (pid, ct_pid)


def established(conntrack_output: str, min_timeout: int = 0) -> set[tuple[str, str, str, str]]:
    """Original-direction tuples of the ESTABLISHED TCP entries in ``conntrack -L``
    output whose timeout is at least ``min_timeout`` seconds."""
    found = set()
    for line in conntrack_output.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != "ESTABLISHED" or not fields[2].isdigit():
            continue
        if int(fields[2]) >= min_timeout and (m := _TUPLE.search(line)):
            found.add((m[1], m[2], m[3], m[4]))
    return found


def _table(ns: str, min_timeout: int = 0) -> set[tuple[str, str, str, str]]:
    argv = ["ip", "netns", "exec", ns, "conntrack", "-L", "-p", "tcp"]
    return established(build.run(argv, check=False), min_timeout)


def _wait_resynced(state: Mapping[str, Any], node: str) -> None:
    """Until the node's kernel table holds every flow its live peers forward now
    (or RESYNC_TIMEOUT): only then may keepalived take the node's VIPs back."""
    peers = [
        e["namespace"]
        for n, e in state["nodes"].items()
        if n != node and e.get("pid") and same_process(e["pid"], e.get("start"))
    ]
    deadline = time.monotonic() + RESYNC_TIMEOUT
    own_ns = state["nodes"][node]["namespace"]
    while time.monotonic() < deadline:
        wanted = set().union(*(_table(ns, ACTIVE_TIMEOUT) for ns in peers)) if peers else set()
        if wanted <= _table(own_ns):
            return
        time.sleep(0.1)


def node_ready(state: Mapping[str, Any], node: str) -> bool:
    """keepalived and conntrackd run, and conntrackd answers on its socket."""
    entry = state["nodes"][node]
    if not (entry.get("pid") and same_process(entry["pid"], entry["start"])):
        return False
    if not (
        entry.get("conntrackd_pid")
        and same_process(entry["conntrackd_pid"], entry.get("conntrackd_start"))
    ):
        return False
    paths = baseline_paths(Path(state["state_dir"]), node)
    return _conntrackd_answers(node_commands(entry["namespace"], paths))


def mcast_commands(topo: LabTopology, ns_of: Mapping[str, str]) -> list[list[str]]:
    """No multicast snooping on the management bridge (the one in the etcd host):
    no IGMP querier runs there, and conntrackd's multicast must reach every
    node from the first packet."""
    return [
        ["ip", "-n", ns_of[b.host], "link", "set", b.name, "type", "bridge", "mcast_snooping", "0"]
        for b in topo.bridges
        if b.host == topo.etcd_host
    ]
