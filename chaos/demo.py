"""``stockade demo``: one firewall node between a client and a server.

Builds ``client -- fw -- server`` in network namespaces, runs a real node in
``fw`` with ``examples/rules.yaml`` and shows traffic allowed, denied
(silently dropped), rejected (RST) and tracked.  Everything is removed at
the end unless ``--keep`` is given (then ``stockade demo --down`` removes it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from chaos.errors import LabError
from chaos.lab.netns import NetnsLab, one_node_topology
from chaos.lab.probes import ProbeResult, ping, start_servers, tcp_request, udp_request

PREFIX = "stkdemo"
RUN_DIR = Path("/run/stockade-demo")
NODE_CONFIG = """\
node_id: fw1
rules: rules.yaml
queue: {num: 0}
hooks: [FORWARD]
control_socket: fw1.sock
"""


@dataclass(frozen=True, slots=True)
class Check:
    what: str
    expect: str  # allowed | dropped | rejected
    run: str  # probe kind
    src: str
    dst: str
    port: int = 0


CHECKS = (
    Check("HTTP to the web server (tcp/80)", "allowed", "tcp", "client", "10.10.2.2", 80),
    Check("HTTP over IPv6 (tcp/80)", "allowed", "tcp", "client", "fd00:10:2::2", 80),
    Check("DNS-style query (udp/53)", "allowed", "udp", "client", "10.10.2.2", 53),
    Check("ping", "allowed", "ping", "client", "10.10.2.2"),
    Check("ping over IPv6", "allowed", "ping", "client", "fd00:10:2::2"),
    Check("ssh to the server (tcp/22): no rule", "dropped", "tcp", "client", "10.10.2.2", 22),
    Check("SMTP (tcp/25): rule no-smtp rejects", "rejected", "tcp", "client", "10.10.2.2", 25),
    Check("server opens a connection to the client", "dropped", "tcp", "server", "10.10.1.2", 80),
    Check("unsolicited UDP from the server", "dropped", "udp", "server", "10.10.1.2", 53),
)


def _outcome(r: ProbeResult) -> str:
    return {"ok": "allowed", "timeout": "dropped", "refused": "rejected"}.get(r.result, r.result)


def _probe(lab: NetnsLab, c: Check) -> ProbeResult:
    if c.run == "tcp":
        return tcp_request(lab, c.src, c.dst, c.port)
    if c.run == "udp":
        return udp_request(lab, c.src, c.dst, c.port)
    return ping(lab, c.src, c.dst)


def _rules_text() -> str:
    repo_rules = Path(__file__).resolve().parent.parent / "examples" / "rules.yaml"
    if repo_rules.exists():
        return repo_rules.read_text()
    return resources.files("chaos").joinpath("demo_rules.yaml").read_text()


def _start_node(lab: NetnsLab, run_dir: Path) -> subprocess.Popen[bytes]:
    (run_dir / "rules.yaml").write_text(_rules_text())
    (run_dir / "node.yaml").write_text(NODE_CONFIG)
    log_path = run_dir / "node.log"
    # Output goes to a file, not a pipe: with --keep the node outlives us.
    with open(log_path, "wb") as log:
        argv = [sys.executable, "-m", "node.cli", "node", "run"]
        argv += ["--config", str(run_dir / "node.yaml")]
        proc = lab.popen("fw", argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        if b" ready " in log_path.read_bytes():
            return proc
        time.sleep(0.05)
    lab.stop(proc)
    raise LabError(f"node did not start; see {log_path}:\n{log_path.read_text()[-2000:]}")


def _show_flows(run_dir: Path) -> None:
    from node.control import request

    stats = request(str(run_dir / "fw1.sock"), {"cmd": "flows"})
    flows = stats.get("flows", [])
    print(f"\nfw1's connection-tracking table ({len(flows)} flows):")
    for f in flows:
        print(
            f"  {f.get('proto', '?'):<7} {f.get('src')}:{f.get('sport')} -> "
            f"{f.get('dst')}:{f.get('dport')}  {f.get('state')}  rule={f.get('rule') or '-'}"
        )
    rules = request(str(run_dir / "fw1.sock"), {"cmd": "stats"}).get("ruleset", {})
    hits = rules.get("rule_hits") or rules.get("hits") or []
    if hits:
        print("\nrule hits: " + ", ".join(f"{name}={n}" for name, n in hits))


def run_demo(keep: bool) -> int:
    lab = NetnsLab(one_node_topology(), PREFIX)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    print("building client -- fw -- server in network namespaces ...")
    lab.up()
    ok = True
    try:
        start_servers(lab, "server", ["tcp/80", "tcp/22", "tcp/25", "udp/53"])
        start_servers(lab, "client", ["tcp/80", "udp/53"])
        _start_node(lab, RUN_DIR)
        print(f"node fw1 running in namespace {lab.ns('fw')} with examples/rules.yaml\n")
        print(f"  {'from':<7} {'to':<14} {'what':<42} {'expected':<9} got")
        for c in CHECKS:
            r = _probe(lab, c)
            got = _outcome(r)
            mark = "ok " if got == c.expect else "BAD"
            ok &= got == c.expect
            print(
                f"  {c.src:<7} {c.dst:<14} {c.what:<42} {c.expect:<9} {got:<9} {mark} {r.ms:.0f} ms"
            )
        _show_flows(RUN_DIR)
    finally:
        if keep:
            print(
                f"\nlab kept: `ip netns exec {lab.ns('client')} bash` to explore; "
                "`stockade demo --down` removes it"
            )
        else:
            lab.down()
            print("\nlab removed")
    print("demo " + ("passed" if ok else "FAILED: some traffic did not get the expected verdict"))
    return 0 if ok else 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="three-node cluster demo: traffic, a node killed, failover report, status",
        description="Builds the three-node namespace lab, drives traffic, kills a node and "
        "reports what the end hosts saw; the lab stays up (`stockade lab down --name demo`). "
        "--single-node runs the one-node filter demo instead.",
    )
    p.add_argument("--single-node", action="store_true", help="the one-node filter demo")
    p.add_argument("--name", default="demo", help="cluster demo: lab name (default demo)")
    p.add_argument("--base", default="10.231", help="cluster demo: first two address octets")
    p.add_argument("--victim", default="fw2", help="cluster demo: node to kill")
    p.add_argument("--keep", action="store_true", help="single node: leave the lab running")
    p.add_argument("--down", action="store_true", help="single node: remove a kept lab and exit")
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("stockade demo: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    try:
        if args.down:
            NetnsLab(one_node_topology(), PREFIX).down()
            print("demo lab removed")
            return 0
        if not args.single_node:
            from chaos.cluster_demo import run_cluster_demo

            return run_cluster_demo(name=args.name, victim=args.victim, base=args.base)
        return run_demo(args.keep)
    except LabError as e:
        print(f"stockade demo: {e}", file=sys.stderr)
        return 1
