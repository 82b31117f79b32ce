"""Turn a :class:`LabTopology` into host commands, run them, and undo them.

:func:`build_commands` is pure: it returns the ``ip``/``sysctl`` argv lists
in order, so a unit test can read the ECMP routes and sysctls without root.
:func:`run_commands` executes them; :func:`teardown` removes a lab by its
names alone (namespaces with the lab's prefix, the root veth, processes by
PID), so it also cleans up after a crash or a half-finished ``up``.

Names: a lab called ``NAME`` (1-8 of a-z, 0-9) owns the namespaces
``stkl-NAME-<host>`` and the root-namespace interface ``stkl-NAME``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from chaos.errors import LabError
from chaos.lab.netns import run as run  # re-exported: the labs share one command runner
from chaos.lab.topology import LabTopology

_NAME = re.compile(r"^[a-z0-9]{1,8}$")
HASH_SEED_SYSCTL = Path("/proc/sys/net/ipv4/fib_multipath_hash_seed")
# The same multipath hash seed on both routers: with it, a flow's two
# directions hash alike even on kernels whose default seed were per
# namespace (6.11+ take a global random one; older ones have no seed).
HASH_SEED = 0x5707CADE & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class LabNames:
    name: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise LabError(f"lab name {self.name!r} must be 1-8 characters of a-z and 0-9")

    @property
    def prefix(self) -> str:
        return f"stkl-{self.name}"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @property
    def root_if(self) -> str:
        return self.prefix


def _sysctls(topo: LabTopology, host: str, hash_seed: bool) -> list[str]:
    values = [
        # Replies may arrive on another interface than the route back
        # (asymmetric mode, VIP moves): strict reverse-path checks would drop them.
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        # The lab is IPv4 only; no IPv6 means no DAD or router solicitations.
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]
    if host in topo.routers:
        values.append("net.ipv4.ip_forward=1")
    if host in topo.routers and host not in {n.host for n in topo.nodes}:
        values += [
            # Custom L4 hash over addresses, ports and protocol (fields
            # 0x37).  Not policy 1: that one reuses a packet's existing L4
            # hash, and over veth a TCP packet carries its sending socket's
            # random txhash, so the two directions of a TCP flow would pick
            # nodes independently.  Policy 3 always dissects the packet; the
            # kernel orders the addresses/ports first (flow_hash_from_keys),
            # so both directions hash alike.  See docs/lab.md.
            "net.ipv4.fib_multipath_hash_policy=3",
            "net.ipv4.fib_multipath_hash_fields=0x0037",
            # Gratuitous ARP from a node taking a VIP over creates / updates
            # the entry (locktime, per interface below, lets it update at once).
            "net.ipv4.conf.all.arp_accept=1",
            "net.ipv4.conf.default.arp_accept=1",
        ]
        if hash_seed:
            values.append(f"net.ipv4.fib_multipath_hash_seed={HASH_SEED}")
    if host in {n.host for n in topo.nodes}:
        values += [
            # Answer ARP only for addresses of the asking segment's interface
            # and source ARP from it: VIPs stay on their own segment.
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
        ]
    return values


def build_commands(
    topo: LabTopology, names: LabNames, hash_seed: bool | None = None
) -> list[list[str]]:
    """Every command that builds the lab's network, in order (pure)."""
    if hash_seed is None:
        hash_seed = HASH_SEED_SYSCTL.exists()
    cmds: list[list[str]] = []
    for host in topo.hosts:
        ns = names.ns(host)
        cmds.append(["ip", "netns", "add", ns])
        # Before any interface exists, so every interface inherits them.
        cmds.append(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_sysctls(topo, host, hash_seed)]
        )
        cmds.append(["ip", "-n", ns, "link", "set", "lo", "up"])
    for br in topo.bridges:
        ns = names.ns(br.host)
        cmds.append(["ip", "-n", ns, "link", "add", br.name, "type", "bridge", "stp_state", "0"])
        cmds.append(["ip", "-n", ns, "addr", "add", br.addr, "dev", br.name])
        cmds.append(["ip", "-n", ns, "link", "set", br.name, "up"])
    for v in topo.veths:
        a_if = v.a_if or names.root_if
        a_side = ["netns", names.ns(v.a)] if v.a else []
        peer = ["peer", "name", v.b_if, "netns", names.ns(v.b)]
        cmds.append(["ip", "link", "add", a_if, *a_side, "type", "veth", *peer])
        a_ip = ["ip", "-n", names.ns(v.a)] if v.a else ["ip"]
        b_ip = ["ip", "-n", names.ns(v.b)]
        cmds += [[*a_ip, "addr", "add", a, "dev", a_if] for a in v.a_addrs]
        cmds += [[*b_ip, "addr", "add", b, "dev", v.b_if] for b in v.b_addrs]
        if v.b_bridge:
            cmds.append([*b_ip, "link", "set", v.b_if, "master", v.b_bridge])
        cmds.append([*a_ip, "link", "set", a_if, "up"])
        cmds.append([*b_ip, "link", "set", v.b_if, "up"])
    for br in topo.bridges:
        if br.host in topo.routers:
            # Child namespaces have no neigh "default" set: per interface.
            # Locktime 0: a gratuitous ARP right after another update still counts.
            sysctl = f"net.ipv4.neigh.{br.name}.locktime=0"
            cmds.append(["ip", "netns", "exec", names.ns(br.host), "sysctl", "-q", "-w", sysctl])
    for r in topo.routes:
        cmds.append(route_command(names, r.host, r.dest, r.via))
    cmds += sync_route_commands(topo, names)
    return cmds


# Minimum TCP retransmission timeout on the sync segment.  Linux's default
# (200 ms, RFC 6298's 1 s floor relaxed) is longer than the heartbeat silence
# that makes a peer suspect (150 ms): one lost segment on a sync stream then
# looks like a dead peer.  On a LAN whose RTT is well under a millisecond a
# 10 ms floor is safe, and it is what an operator should set on sync links
# (`ip route change ... rto_min 10ms`, docs/syncd.md).  Measured: chaos
# sync-loss-10 new connections 97.98 % -> 100 %, false revocations 2 -> 1.
SYNC_RTO_MIN: Final = "10ms"


def sync_route_commands(topo: LabTopology, names: LabNames) -> list[list[str]]:
    """Replace each node's connected route of the sync segment with one that has rto_min."""
    segment = topo.root_segment or "mgmt"
    cmds = []
    for node in topo.nodes:
        for name, ifname, addr in node.interfaces:
            if name != segment:
                continue
            net = str(ipaddress.ip_interface(addr).network)
            cmds.append(["ip", "-n", names.ns(node.host), "route", "replace", net, "dev", ifname,
                         "src", addr.split("/")[0], "rto_min", SYNC_RTO_MIN])  # fmt: skip
    return cmds


def route_command(names: LabNames, host: str, dest: str, via: Sequence[str]) -> list[str]:
    base = ["ip", "-n", names.ns(host), "route", "replace", dest]
    if len(via) == 1:
        return [*base, "via", via[0]]
    hops: list[str] = []
    for gw in via:
        hops += ["nexthop", "via", gw]
    return base + hops


def vip_commands(topo: LabTopology, names: LabNames) -> list[list[str]]:
    """Static VIPs on their home nodes (interim, while no cluster agent places them)."""
    cmds = []
    for vip in topo.vips:
        ns = names.ns(topo.node(vip.home).host)
        cmds.append(["ip", "-n", ns, "addr", "add", vip.address, "dev", vip.interface])
    return cmds


def run_commands(cmds: Iterable[Sequence[str]]) -> None:
    for argv in cmds:
        run(argv)


def lab_namespaces(names: LabNames) -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    found = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [ns for ns in found if ns.startswith(names.prefix + "-")]


def namespace_pids(ns: str) -> list[int]:
    return [int(p) for p in run(["ip", "netns", "pids", ns], check=False).split() if p.isdigit()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return False


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None = no such process).

    Recorded next to a PID so that ``down`` never signals a process that
    merely reused the number of one of ours (after a reboot, say).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def same_process(pid: int, start: int | None) -> bool:
    return start is not None and proc_start(pid) == start


def stop_pids(pids: Iterable[int], grace: float = 3.0) -> None:
    """SIGTERM each PID, SIGKILL what is left after ``grace`` seconds."""
    pids = [p for p in set(pids) if p > 1 and pid_alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def teardown(names: LabNames, recorded: Iterable[tuple[int, int | None]] = ()) -> list[str]:
    """Remove the lab's processes, namespaces and root veth; return what was removed.

    ``recorded`` are (pid, start time) pairs from the state file; a PID is
    signalled only if its start time still matches.  Processes inside the
    lab's namespaces are ours by construction and are found by namespace.
    """
    removed: list[str] = []
    namespaces = lab_namespaces(names)
    pids = {pid for pid, start in recorded if same_process(pid, start)}
    for ns in namespaces:
        pids.update(namespace_pids(ns))
    if pids:
        stop_pids(pids)
        removed.append(f"{len(pids)} process(es)")
    for ns in namespaces:
        # A process that survived (or was started meanwhile) in our namespace.
        stop_pids(namespace_pids(ns), grace=0.5)
        run(["ip", "netns", "del", ns], check=False)
        removed.append(f"namespace {ns}")
    if Path(f"/sys/class/net/{names.root_if}").exists():
        run(["ip", "link", "del", names.root_if], check=False)
        removed.append(f"link {names.root_if}")
    return removed
