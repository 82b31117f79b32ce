"""``stockade bench failover``: failover latency, Stockade side by side with
keepalived + conntrackd, in one run on the same namespace lab.

    stockade bench failover --trials 20 --fault kill|freeze|partition --report DIR
        [--baseline keepalived-conntrackd] [--advert-int 1,0.1] [--no-stockade]
        [--nodes 3] [--long-lived 8] [--udp-flows 8] [--deadline 15]

For each system (Stockade first, then the baseline at each ``advert_int``)
the lab comes up, the probe flows start and the trials run
(:mod:`chaos.bench.runner`); the lab goes down before the next system.
Written to DIR after each system (a run cut short keeps what it measured):
``trials.csv``, ``report.json`` (settings, summaries, ratios to Stockade,
every flow of every trial), ``cdf.png``, ``summary.txt``.  A system that
cannot run (say the lab does not come up) is reported as skipped, with the
reason, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.bench.runner import BENCH_FAULTS, BenchSettings, SystemSpec
from chaos.failover_report import (
    Summary,
    TrialResult,
    plot_cdf,
    ratios,
    report_document,
    summarize,
    write_csv,
    write_json,
)

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

REFERENCE = "stockade"


_LOG_FILE: list[Path] = []  # DIR/bench.log once the report directory is known


def _log(message: str) -> None:
    line = f"bench failover: {message}"
    print(line, file=sys.stderr, flush=True)
    for path in _LOG_FILE:
        with path.open("a") as handle:
            handle.write(f"{time.strftime('%H:%M:%S')} {line}\n")


def parse_advert_ints(text: str) -> list[float]:
    """``"1,0.1"`` -> [1.0, 0.1]; ValueError for junk or out-of-range values."""
    values = []
    for part in text.split(","):
        value = float(part.strip())
        if not 0.01 <= value <= 255:
            raise ValueError(f"advert_int {value:g} is not in [0.01, 255]")
        values.append(value)
    if not values:
        raise ValueError("no advert_int given")
    return values


def systems(stockade: bool, baseline: str | None, advert_ints: Sequence[float]) -> list[SystemSpec]:
    out = [SystemSpec(REFERENCE)] if stockade else []
    if baseline:
        out += [SystemSpec(baseline, a) for a in advert_ints]
    return out


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def summary_table(summaries: Sequence[Summary], reference: str = REFERENCE) -> str:
    """The run's figures as a fixed-width table (milliseconds)."""
    ratio = ratios(summaries, reference)
    head = (
        f"{'system':<38} {'fault':<6} {'n':>3} {'p50':>6} {'p95':>6} {'p99':>6} {'max':>6} "
        f"{'path50':>6} {'path99':>6} {'vip50':>6} {'vipmax':>6} {'aff':>4} {'lost':>4} "
        f"{'x ' + reference + ' p50/p99':>20}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        r = ratio.get(f"{s.system}/{s.fault}", {})
        rtext = "" if not r else f"{r.get('p50', 0):.1f} / {r.get('p99', 0):.1f}"
        lines.append(
            f"{s.system:<38} {s.fault:<6} {s.trials:>3} {_f(s.p50):>6} {_f(s.p95):>6} "
            f"{_f(s.p99):>6} {_f(s.max):>6} {_f(s.path_restore_p50):>6} "
            f"{_f(s.path_restore_p99):>6} {_f(s.takeover_p50):>6} {_f(s.takeover_max):>6} "
            f"{s.affected_flows:>4} {s.lost_flows:>4} {rtext:>20}"
        )
    lines.append(
        "times in ms: p50..max = until every affected long-lived TCP flow delivered again "
        "(per trial); path = same for UDP probe flows (no backoff); vip = until another node "
        "held the victim's VIPs; aff/lost = flows"
    )
    return "\n".join(lines)


def write_report(
    results: Sequence[TrialResult], meta: dict[str, Any], directory: Path, title: str
) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    write_csv(results, directory / "trials.csv")
    write_json(report_document(results, meta, REFERENCE), directory / "report.json")
    if results:
        plot_cdf(results, directory / "cdf.png", title)
    table = summary_table(summarize(results))
    for label, events in (meta.get("lost_in_recovery") or {}).items():
        flows = sum(len(e["flows"]) for e in events)
        if flows:
            table += (
                f"\n{label}: {flows} probe flows lost during recovery (failback) "
                f"in {len(events)} of the recoveries (not in the figures above)"
            )
    skipped = meta.get("skipped") or {}
    if skipped:
        table += "\n" + "\n".join(f"skipped {k}: {v}" for k, v in skipped.items())
    (directory / "summary.txt").write_text(table + "\n")
    return table


def run(args: argparse.Namespace) -> int:
    from chaos.bench.probe_reader import BenchError
    from chaos.bench.runner import run_system

    if os.geteuid() != 0:
        print("bench failover: needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        advert_ints = parse_advert_ints(args.advert_int)
    except ValueError as e:
        print(f"bench failover: --advert-int: {e}", file=sys.stderr)
        return 2
    specs = systems(not args.no_stockade, args.baseline, advert_ints)
    if not specs:
        print("bench failover: nothing to run (--no-stockade without --baseline)", file=sys.stderr)
        return 2
    settings = BenchSettings(
        trials=args.trials,
        fault=args.fault,
        nodes=args.nodes,
        tcp_flows=args.long_lived,
        udp_flows=args.udp_flows,
        deadline=args.deadline,
        lab_name=args.lab_name,
        base=args.base,
    )
    directory = Path(args.report)
    directory.mkdir(parents=True, exist_ok=True)
    _LOG_FILE[:] = [directory / "bench.log"]
    meta: dict[str, Any] = {
        "command": shlex.join(["stockade", *sys.argv[1:]]),
        "started": time.time(),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "settings": _settings(settings),
        "systems": [s.label for s in specs],
        "clock": "CLOCK_MONOTONIC",
        "skipped": {},
        # Probe flows killed by a recovery (failback), outside every trial's figures.
        "lost_in_recovery": {},
    }
    title = f"Failover after {args.fault} ({args.nodes} nodes, {args.trials} trials each)"
    results: list[TrialResult] = []
    for spec in specs:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            record = directory / f"probe-{spec.label.replace(' ', '-')}-{args.fault}.jsonl"
            done = run_system(spec, settings, _log, str(record))
            results += done.results
            meta["lost_in_recovery"][spec.label] = [
                {"after_trial": trial, "flows": flows} for trial, flows in done.lost_in_recovery
            ]
        except BenchError as e:
            meta["skipped"][spec.label] = str(e)
            _log(f"{spec.label}: SKIPPED: {e}")
        meta["finished"] = time.time()
        write_report(results, meta, directory, title)
    table = write_report(results, meta, directory, title)
    print(table)
    print(f"report: {directory}/trials.csv, report.json, cdf.png, summary.txt")
    return 0 if results and not meta["skipped"] else 1


def _settings(s: BenchSettings) -> dict[str, Any]:
    return {name: getattr(s, name) for name in s.__dataclass_fields__}


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade bench failover`` under the ``bench`` command (node.bench's)."""
    from chaos.bench import bench_subcommands

    p = bench_subcommands(sub).add_parser(
        "failover", help="failover latency: Stockade vs keepalived+conntrackd (namespace lab)"
    )
    p.add_argument("--trials", type=int, default=20, help="trials per system (default 20)")
    p.add_argument(
        "--fault", choices=BENCH_FAULTS, default="kill",
        help="kill (SIGKILL + links down), freeze (SIGSTOP), partition (management "
        "link cut, etcd too); default kill",
    )  # fmt: skip
    p.add_argument(
        "--baseline",
        choices=["keepalived-conntrackd"],
        default=None,
        help="also run this comparison system",
    )
    p.add_argument(
        "--advert-int", default="1", help="baseline VRRP advert_int values, comma separated"
    )
    p.add_argument("--no-stockade", action="store_true", help="run only the baseline")
    p.add_argument("--report", required=True, help="directory for the report files")
    p.add_argument("--nodes", type=int, default=3, help="firewall nodes (2-9, default 3)")
    p.add_argument("--long-lived", type=int, default=8, help="long-lived TCP probe flows")
    p.add_argument("--udp-flows", type=int, default=8, help="UDP probe flows (path restore)")
    p.add_argument(
        "--deadline", type=float, default=15.0, help="seconds to wait for the flows per trial"
    )
    p.add_argument("--lab-name", default="fbench", help="lab name (default fbench)")
    p.add_argument("--base", default="10.238", help="lab address base (default 10.238)")
    p.set_defaults(handler=run)
