"""``stockade lab ...``: registered by ``node.cli`` (optional module).

Imports stay inside the handlers: building the parser costs nothing for the
other ``stockade`` commands.  A :class:`chaos.errors.ChaosError` becomes one
line on stderr and exit status 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from chaos.errors import ChaosError

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_NAME = "lab"


def _log(message: str) -> None:
    print(f"stockade lab: {message}", file=sys.stderr, flush=True)


def _guard(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("stockade lab: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    try:
        code: int = args.lab_handler(args)
        return code
    except ChaosError as e:
        print(f"stockade lab: {e}", file=sys.stderr)
        return 1


def _cmd_up(args: argparse.Namespace) -> int:
    from chaos.lab.cluster_lab import ClusterLab

    lab = ClusterLab(args.name)
    state = lab.up(
        nodes=args.nodes,
        asymmetric=args.asymmetric,
        topology=args.topology,
        base=args.base,
        mode=args.mode,
        ready_timeout=args.timeout,
        log=_log,
        system=args.system,
        advert_int=args.advert_int,
        prometheus=args.prometheus,
    )
    print(f"lab {args.name} up: state file {lab.state_file}")
    for node_id, entry in state["nodes"].items():
        print(f"  {node_id}: ns {entry['namespace']}  control {entry['control_socket']}")
    print(f"  etcd {state['etcd']['endpoint']} (from the host via {state['root_if']})")
    if state.get("prometheus"):
        url = state["prometheus"]["url"]
        print(f"  prometheus {url} (alerts: {url}/alerts)")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from chaos.lab.cluster_lab import ClusterLab

    removed = ClusterLab(args.name).down()
    print(f"lab {args.name}: " + (", ".join(removed) if removed else "nothing to remove"))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from chaos.lab.cluster_lab import ClusterLab

    status = ClusterLab(args.name).status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(_status_text(status))
    healthy = status["status"] == "up" and all(n["ready"] for n in status["nodes"].values())
    return 0 if healthy else 1


def _status_text(s: dict[str, Any]) -> str:
    if "nodes" not in s:
        extra = f" ({', '.join(s['leftover_namespaces'])})" if s.get("leftover_namespaces") else ""
        return f"lab {s['name']}: {s['status']}{extra}"
    ns_ok = sum(s["namespaces"].values())
    lines = [
        f"lab {s['name']}: {s['status']}, "
        + (f"mode {s['mode']}, " if s["mode"] else f"system {s.get('system')}, ")
        + ("asymmetric" if s["asymmetric"] else "symmetric")
        + f", namespaces {ns_ok}/{len(s['namespaces'])}",
        f"  etcd {s['etcd']['endpoint']}: "
        + (
            "not used (baseline)"
            if s.get("system", "stockade") != "stockade"
            else ("alive" if s["etcd"]["alive"] else "DEAD")
            + (", healthy" if s["etcd"]["healthy"] else ", not healthy")
        ),
        "  traffic server: " + ("alive" if s["traffic_server"] else "DEAD"),
    ]
    for node_id, n in s["nodes"].items():
        state = "ready" if n["ready"] else ("alive, not ready" if n["alive"] else "DEAD")
        lines.append(f"  {node_id}: {state}; VIPs {', '.join(n['vips']) or '-'}")
    for ip, v in s["vips"].items():
        held = ", ".join(v["held_by"]) or "nobody"
        mark = "" if v["held_by"] == [v["home"]] else "  (not at home)"
        lines.append(f"  VIP {ip}: {held}{mark}")
    return "\n".join(lines)


def _cmd_traffic(args: argparse.Namespace) -> int:
    import subprocess

    from chaos.lab.cluster_lab import ClusterLab

    t = ClusterLab(args.name).state()["traffic"]
    argv = ["ip", "netns", "exec", t["client_ns"], sys.executable, "-m", "chaos.traffic"]
    argv += ["client", "--server", t["server_addr"], "--tcp-port", str(t["tcp_port"])]
    argv += ["--udp-port", str(t["udp_port"]), "--seconds", str(args.seconds)]
    argv += ["--long-lived", str(args.long_lived), "--rate", str(args.rate)]
    argv += ["--udp-rate", str(args.udp_rate)] + (["--json"] if args.json else [])
    return subprocess.run(argv).returncode


def _cmd_ecmp(args: argparse.Namespace) -> int:
    from chaos.lab.build import LabNames
    from chaos.lab.cluster_lab import ClusterLab
    from chaos.lab.ecmp import measure
    from chaos.lab.topology import load_template, render

    state = ClusterLab(args.name).state()
    topo = render(
        load_template(args.topology or state.get("topology")),
        len(state["nodes"]),
        state["base"],
        state["asymmetric"],
    )
    result = measure(topo, LabNames(args.name), flows=args.flows, proto=args.proto).as_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['flows']} {args.proto.upper()} flows: {result['symmetric']} symmetric "
            f"({result['symmetric_fraction']:.1%}), {result['asymmetric']} asymmetric "
            f"({result['asymmetric_fraction']:.1%}), {result['unseen']} not seen once each way"
        )
        print(f"  requests per node {result['per_node_requests']}")
        print(f"  replies per node  {result['per_node_replies']}")
    return 0


def _cmd_fault(args: argparse.Namespace) -> int:
    from chaos.faults import inject, parse_fault, recover

    fault = parse_fault(args.fault, etcd=not args.cut_etcd)
    if args.recover:
        done = recover(args.name, args.node, fault, wait=args.wait or None)
    else:
        done = inject(args.name, args.node, fault, wait=args.wait or None)
    if args.json:
        print(json.dumps(done.as_dict()))
    else:
        took = (done.done - done.at) * 1000
        print(f"{args.node}: {done.fault} at monotonic {done.at:.6f} ({took:.1f} ms)")
        for step in done.steps:
            print(f"  {step}")
    return 0


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade lab {up,down,status,traffic,ecmp,fault}``."""
    lab = sub.add_parser("lab", help="N-node cluster lab in network namespaces")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)

    def command(name: str, handler: Any, help: str) -> argparse.ArgumentParser:
        p = lab_sub.add_parser(name, help=help)
        p.add_argument("--name", default=DEFAULT_NAME, help="lab name, 1-8 of a-z0-9 (default lab)")
        p.set_defaults(handler=_guard, lab_handler=handler)
        return p

    up = command("up", _cmd_up, "build the lab and start etcd and the nodes")
    up.add_argument("--nodes", type=int, default=3, help="firewall nodes (1-9, default 3)")
    up.add_argument(
        "--asymmetric", action="store_true", help="replies cross a different node than requests"
    )
    up.add_argument("--topology", default=None, help="topology template (default: shipped one)")
    up.add_argument("--base", default="10.231", help="first two octets of every address")
    up.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "standalone", "sync", "cluster"],
        help="node file sections (auto: the richest the node loader accepts)",
    )
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for readiness")
    up.add_argument(
        "--prometheus",
        action="store_true",
        help="also run Prometheus on the management segment, scraping every node "
        "and evaluating the shipped alert rules",
    )
    up.add_argument(
        "--system",
        default="stockade",
        choices=["stockade", "keepalived-conntrackd"],
        help="what runs on the firewall nodes (keepalived-conntrackd: the comparison baseline)",
    )
    up.add_argument(
        "--advert-int", type=float, default=1.0, help="baseline: VRRP advert_int in seconds"
    )
    command("down", _cmd_down, "remove the lab (also after a crash)")
    status = command("status", _cmd_status, "namespaces, processes, VIPs, readiness")
    status.add_argument("--json", action="store_true")
    traffic = command("traffic", _cmd_traffic, "drive client -> server traffic and report")
    traffic.add_argument("--seconds", type=float, default=10.0)
    traffic.add_argument("--long-lived", type=int, default=8, help="long-lived connections")
    traffic.add_argument("--rate", type=float, default=20.0, help="new connections per second")
    traffic.add_argument("--udp-rate", type=float, default=20.0, help="UDP requests per second")
    traffic.add_argument("--json", action="store_true")
    ecmp = command("ecmp", _cmd_ecmp, "measure which node each direction of a flow crosses")
    ecmp.add_argument("--flows", type=int, default=256)
    ecmp.add_argument("--proto", choices=["udp", "tcp"], default="udp")
    ecmp.add_argument("--topology", default=None)
    ecmp.add_argument("--json", action="store_true")
    fault = command("fault", _cmd_fault, "inject a fault on a node (see chaos/faults.py)")
    fault.add_argument("node", help="node id (fw1, ...)")
    fault.add_argument(
        "fault",
        nargs="+",
        metavar="FAULT",
        help="kill | freeze | thaw | partition | heal | restart | loss P (0.1 or 10%%)",
    )
    fault.add_argument(
        "--cut-etcd", action="store_true", help="partition/loss: hit etcd traffic too"
    )
    fault.add_argument(
        "--recover", action="store_true", help="undo FAULT instead (kill: restart, ...)"
    )
    fault.add_argument(
        "--wait", type=float, default=30.0, help="restart: seconds to wait for ready (0: none)"
    )
    fault.add_argument("--json", action="store_true")
