"""``stockade bench asymmetric``: what fully asymmetric routing costs a new
connection, side by side with symmetric routing, in one run on the same
namespace lab.

    stockade bench asymmetric --report DIR [--repeat 3] [--seconds 20]
        [--rate 50] [--udp-rate 50] [--long-lived 4] [--nodes 3] [--warmup 3]

Each repeat brings the lab up twice (the order alternates between repeats so
neither mode always runs on a warmer machine): once with symmetric routing,
once with every flow's reply crossing another node than its request
(``stockade lab up --asymmetric``).  Per lab: the crossing fraction is
measured (``stockade lab ecmp``: proof that the routing is what it says), a
warm-up traffic run settles the sync streams (not counted; reported), then
the measured run: new TCP connections (connect + one echo), UDP requests and
long-lived connections, with every node's hold queue read before and after.
Written to DIR as it goes: ``runs.json`` (every run), ``report.json``
(settings and the summary), ``summary.txt``.  The arithmetic is in
:mod:`chaos.bench.asym`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.bench.asym import ROUTINGS, HoldDelta, RoutingRun, merge_holds, summarize, summary_text
from chaos.errors import ChaosError

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


@dataclass(frozen=True, slots=True)
class AsymSettings:
    repeat: int = 3
    seconds: float = 20.0
    warmup: float = 3.0
    rate: float = 50.0  # new TCP connections per second
    udp_rate: float = 50.0
    long_lived: int = 4
    nodes: int = 3
    ecmp_flows: int = 256  # 0: do not measure the crossing fraction
    lab_name: str = "abench"
    base: str = "10.237"

    def __post_init__(self) -> None:
        if self.repeat < 1 or self.seconds <= 0 or self.warmup < 0:
            raise ValueError("--repeat must be >= 1, --seconds > 0, --warmup >= 0")
        if not 2 <= self.nodes <= 9:
            raise ValueError("--nodes must be 2..9 (asymmetric routing needs two nodes)")
        if self.rate <= 0 or self.udp_rate < 0 or self.long_lived < 0:
            raise ValueError("--rate must be > 0; --udp-rate, --long-lived >= 0")


def schedule(repeat: int) -> list[tuple[int, str]]:
    """(repeat, routing) in run order: the order alternates between repeats."""
    out = []
    for r in range(repeat):
        order = ROUTINGS if r % 2 == 0 else tuple(reversed(ROUTINGS))
        out += [(r, routing) for routing in order]
    return out


def _traffic(state: dict[str, Any], s: AsymSettings, seconds: float) -> dict[str, Any]:
    t = state["traffic"]
    argv = ["ip", "netns", "exec", t["client_ns"], sys.executable, "-m", "chaos.traffic"]
    argv += ["client", "--server", t["server_addr"], "--tcp-port", str(t["tcp_port"])]
    argv += ["--udp-port", str(t["udp_port"]), "--seconds", str(seconds), "--json"]
    argv += ["--long-lived", str(s.long_lived), "--rate", str(s.rate)]
    argv += ["--udp-rate", str(s.udp_rate)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as e:
        raise ChaosError(f"traffic client still running {seconds + 60:.0f} s later") from e
    try:
        summary: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        tail = (done.stderr or done.stdout)[-500:]
        raise ChaosError(f"traffic client gave no report (exit {done.returncode}): {tail}") from e
    return summary


def _holds(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each node's ``sync.hold`` statistics (nodes that do not answer are left out)."""
    from node.control import request
    from node.errors import NodeError

    out = {}
    for node, entry in state["nodes"].items():
        try:
            hold = request(entry["control_socket"], {"cmd": "stats"}, timeout=2.0)["sync"]["hold"]
        except (OSError, NodeError, KeyError, TypeError):
            continue
        if hold is not None:
            out[node] = hold
    return out


def _crossing(state: dict[str, Any], s: AsymSettings) -> float | None:
    from chaos.lab.build import LabNames
    from chaos.lab.ecmp import measure
    from chaos.lab.topology import load_template, render

    if not s.ecmp_flows:
        return None
    topo = render(
        load_template(state.get("topology")), len(state["nodes"]), state["base"],
        state["asymmetric"],
    )  # fmt: skip
    result = measure(topo, LabNames(s.lab_name), flows=s.ecmp_flows)
    return result.asymmetric / max(1, result.symmetric + result.asymmetric)


def one_run(repeat: int, routing: str, s: AsymSettings, log: Callable[[str], None]) -> RoutingRun:
    """Lab up in ``routing``, crossing measure, warm-up, measured run, lab down."""
    from chaos.lab.cluster_lab import ClusterLab

    lab = ClusterLab(s.lab_name)
    log(f"run {repeat + 1}/{s.repeat} {routing}: lab up ({s.nodes} nodes)")
    state = lab.up(
        nodes=s.nodes, asymmetric=routing == "asymmetric", base=s.base, mode="cluster",
        ready_timeout=60.0, log=lambda m: log(f"  {m}"),
    )  # fmt: skip
    try:
        fraction = _crossing(state, s)
        log(f"  flows crossing two nodes: {'-' if fraction is None else f'{fraction:.1%}'}")
        if s.warmup:
            warm = _traffic(state, s, s.warmup)
            log(f"  warm-up ({s.warmup:g} s, not counted): churn {warm.get('churn')}")
        before = _holds(state)
        traffic = _traffic(state, s, s.seconds)
        after = _holds(state)
        try:
            hold = merge_holds(HoldDelta.between(before[n], after[n]) for n in before if n in after)
        except ValueError as e:  # a filter restarted during the run: its counters are not ours
            raise ChaosError(f"hold queue counters: {e}") from e
    finally:
        lab.down()
    churn = traffic.get("churn", {})
    log(
        f"  {churn.get('ok')} connections ok, {churn.get('failed')} failed, "
        f"p50 {churn.get('latency_p50_ms')} ms p99 {churn.get('latency_p99_ms')} ms; "
        f"held {hold.held if hold else '-'}, expired {hold.expired if hold else '-'}"
    )
    return RoutingRun(routing, repeat, traffic, hold, fraction)


def _log_to(path: Path) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"bench asymmetric: {message}"
        print(line, file=sys.stderr, flush=True)
        with path.open("a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    return log


def _run_document(run: RoutingRun) -> dict[str, Any]:
    return {
        "routing": run.routing,
        "repeat": run.repeat,
        "asymmetric_fraction": run.asymmetric_fraction,
        "hold": None if run.hold is None else asdict(run.hold),
        "traffic": run.traffic,
    }


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench asymmetric: needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        s = AsymSettings(
            repeat=args.repeat, seconds=args.seconds, warmup=args.warmup, rate=args.rate,
            udp_rate=args.udp_rate, long_lived=args.long_lived, nodes=args.nodes,
            ecmp_flows=args.ecmp_flows, lab_name=args.lab_name, base=args.base,
        )  # fmt: skip
    except ValueError as e:
        print(f"bench asymmetric: {e}", file=sys.stderr)
        return 2
    directory = Path(args.report)
    directory.mkdir(parents=True, exist_ok=True)
    log = _log_to(directory / "bench.log")
    meta: dict[str, Any] = {
        "command": shlex.join(["stockade", *sys.argv[1:]]),
        "started": time.time(),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "settings": asdict(s),
    }
    runs: list[RoutingRun] = []
    for repeat, routing in schedule(s.repeat):
        try:
            runs.append(one_run(repeat, routing, s, log))
        except ChaosError as e:
            log(f"run {repeat + 1} {routing}: FAILED: {e}")
            meta.setdefault("failed_runs", []).append(
                {"repeat": repeat, "routing": routing, "error": str(e)}
            )
        (directory / "runs.json").write_text(
            json.dumps([_run_document(r) for r in runs], indent=2) + "\n"
        )
    summary = summarize(runs)
    meta["finished"] = time.time()
    (directory / "report.json").write_text(
        json.dumps({**meta, "summary": summary}, indent=2) + "\n"
    )
    text = summary_text(summary)
    (directory / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"report: {directory}/summary.txt, report.json, runs.json")
    return 0 if runs and not meta.get("failed_runs") else 1


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade bench asymmetric`` under the ``bench`` command."""
    from chaos.bench import bench_subcommands

    d = AsymSettings()
    p = bench_subcommands(sub).add_parser(
        "asymmetric",
        help="new-connection success and added delay: asymmetric vs symmetric routing (lab)",
    )
    p.add_argument("--report", required=True, help="directory for the report files")
    p.add_argument("--repeat", type=int, default=d.repeat, help="runs per routing mode")
    p.add_argument("--seconds", type=float, default=d.seconds, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=d.warmup, help="uncounted seconds first")
    p.add_argument("--rate", type=float, default=d.rate, help="new TCP connections per second")
    p.add_argument("--udp-rate", type=float, default=d.udp_rate, help="UDP requests per second")
    p.add_argument("--long-lived", type=int, default=d.long_lived, help="long-lived connections")
    p.add_argument("--nodes", type=int, default=d.nodes, help="firewall nodes (2-9)")
    p.add_argument(
        "--ecmp-flows", type=int, default=d.ecmp_flows,
        help="UDP flows to measure the crossing fraction with (0: skip)",
    )  # fmt: skip
    p.add_argument("--lab-name", default=d.lab_name, help="lab name (default abench)")
    p.add_argument("--base", default=d.base, help="lab address base (default 10.237)")
    p.set_defaults(handler=run)
