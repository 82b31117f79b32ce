"""Start one lab node again after ``kill`` (the ``restart`` fault).

What a reboot undoes comes first: VIPs that software placed (the cluster
agent, keepalived) are removed from the node's interfaces while its links
are still down, so the node does not come back claiming addresses another
node now holds, and the kernel's connection tracking table is emptied;
then the links come up, the node's routes (which the
kernel dropped with the links) are set again, and the node's daemons start
the way ``lab up`` starts them.  The namespace's iptables rules stay.

:func:`reboot_commands` is pure; :func:`restart_node` runs it and starts the
processes (Stockade: ``stockade node run``; baseline: conntrackd and
keepalived via :mod:`chaos.lab.baseline_lab`), records the new PIDs in the
state file and waits until the node is ready.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chaos.errors import LabError
from chaos.lab import build
from chaos.lab.build import proc_start, same_process
from chaos.lab.state import state_path, write_state
from chaos.lab.topology import LabTopology, load_template, render

STOCKADE = "stockade"


def system_of(state: Mapping[str, Any]) -> str:
    return str(state.get("system") or STOCKADE)


def software_places_vips(state: Mapping[str, Any]) -> bool:
    """Whether VIPs are placed by a daemon (cluster agent, keepalived), not by the lab."""
    return system_of(state) != STOCKADE or state.get("mode") == "cluster"


def held_vips(addr_json: str, vips: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(address with prefix, interface) of the pool's VIPs found in ``ip -j addr`` output."""
    wanted = {v["address"].split("/")[0]: v for v in vips}
    found = []
    for link in json.loads(addr_json or "[]"):
        for a in link.get("addr_info", []):
            vip = wanted.get(a.get("local"))
            if vip is not None:
                found.append((f"{a['local']}/{a.get('prefixlen', 32)}", str(link["ifname"])))
    return found


def lab_topology(state: Mapping[str, Any]) -> LabTopology:
    """The topology the lab was built from (rendered again from its state file)."""
    return render(
        load_template(state.get("topology")),
        len(state["nodes"]),
        state["base"],
        state["asymmetric"],
    )


def reboot_commands(
    ns: str,
    held: Sequence[tuple[str, str]],
    links: Sequence[str],
    routes: Sequence[list[str]] = (),
) -> list[list[str]]:
    """Remove the software-placed VIPs, bring the links up, set the routes (pure)."""
    cmds = [["ip", "-n", ns, "addr", "del", addr, "dev", ifname] for addr, ifname in held]
    cmds += [["ip", "-n", ns, "link", "set", name, "up"] for name in links]
    return cmds + [list(r) for r in routes]


def _software_vips(state: dict[str, Any], ns: str) -> list[tuple[str, str]]:
    """The VIPs (address, interface) on the node when the agent places them, else none."""
    if not software_places_vips(state):
        return []
    out = build.run(["ip", "-n", ns, "-j", "-4", "addr", "show"], check=False)
    return held_vips(out, state["vips"])


def restart_node(
    state: dict[str, Any], node: str, links: Sequence[str], wait: float | None = 30.0
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Start ``node`` again; return (new PIDs, commands run)."""
    entry = state["nodes"][node]
    ns = entry["namespace"]
    held = _software_vips(state, ns)
    names = build.LabNames(state["name"])
    topo = lab_topology(state)
    spec = topo.node(node)
    routes = [build.route_command(names, r.host, r.dest, r.via) for r in spec.routes]
    # The sync segment's route with its rto_min went with the links, too.
    routes += [c for c in build.sync_route_commands(topo, names) if c[2] == names.ns(spec.host)]
    cmds = reboot_commands(ns, held, links, routes)
    # A rebooted machine's connection tracking table is empty; entries kept
    # from before the kill carry TCP windows that are stale by now, and the
    # kernel would drop the flows as INVALID once they come back.
    build.run(["ip", "netns", "exec", ns, "conntrack", "-F"], check=False)
    # The agent adds VIPs with a lifetime (vip_lifetime): one listed above may
    # have expired by the time it is deleted, which is the end we want; only
    # an address still there afterwards is an error.
    deletes, rest = cmds[: len(held)], cmds[len(held) :]
    for argv in deletes:
        build.run(argv, check=False)
    if held and (left := _software_vips(state, ns)):
        raise LabError(f"{node}: VIPs still on the node after removing them: {left}")
    build.run_commands(rest)
    if system_of(state) == STOCKADE:
        pids: tuple[int, ...] = (_start_stockade(state, node),)
    else:
        from chaos.lab.baseline_lab import start_node

        pids = start_node(state, node)
    write_state(state_path(state["name"], Path(state["state_dir"]).parent), state)
    if wait:
        wait_node_ready(state, node, wait)
    return pids, tuple(" ".join(c) for c in cmds)


def _start_stockade(state: dict[str, Any], node: str) -> int:
    from chaos.lab.cluster_lab import _spawn

    entry = state["nodes"][node]
    argv = [sys.executable, "-m", "node.cli", "node", "run", "--config", entry["config"]]
    entry["pid"] = _spawn(entry["namespace"], argv, Path(entry["log"]))
    entry["start"] = proc_start(entry["pid"])
    return int(entry["pid"])


def node_ready(state: Mapping[str, Any], node: str) -> bool:
    """The node's daemons run and answer (Stockade: control sockets, agent status)."""
    entry = state["nodes"][node]
    if system_of(state) != STOCKADE:
        from chaos.lab.baseline_lab import node_ready as baseline_ready

        return baseline_ready(state, node)
    from chaos.lab.cluster_lab import _node_ready, _status_up
    from chaos.lab.nodefiles import Features

    if not same_process(entry["pid"], entry["start"]):
        return False
    features = Features(state["mode"] or "standalone")
    if not _node_ready(node, entry, features):
        return False
    return not features.cluster or _status_up(dict(state), node)


def wait_node_ready(state: Mapping[str, Any], node: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node_ready(state, node):
            return
        time.sleep(0.1)
    raise LabError(
        f"{node} not ready {timeout:g} s after restart (log {state['nodes'][node]['log']})"
    )
