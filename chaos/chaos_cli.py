"""``stockade chaos run|list|check``: chaos scenarios on the namespace lab.

Registered by ``node.cli`` (optional module).  ``run`` prints one line per
step and per invariant (PASS/FAIL with its figures) and exits 1 if any
scenario failed; a scenario that cannot run at all (bad file, lab refused)
prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chaos.errors import ChaosError

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _log(message: str) -> None:
    print(f"stockade chaos: {message}", file=sys.stderr, flush=True)


def _scenarios(names: list[str]) -> list[object]:
    from chaos.scenario import all_scenarios, find_scenario

    if names == ["all"]:
        return list(all_scenarios())
    return [find_scenario(n) for n in names]


def _cmd_run(args: argparse.Namespace) -> int:
    from chaos.runner import RunOptions, run_scenario, summary_lines
    from chaos.scenario import Scenario

    if os.geteuid() != 0:
        print("stockade chaos: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    try:
        scenarios = _scenarios(args.scenario)
    except ChaosError as e:
        print(f"stockade chaos: {e}", file=sys.stderr)
        return 2
    report_dir = Path(args.report) if args.report else None
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
    options = RunOptions(
        lab=args.lab or args.name,
        base=args.base,
        reuse=args.lab is not None,
        keep=args.keep,
        report_dir=report_dir,
        mode=args.mode,
    )
    verdicts: dict[str, str] = {}
    for scenario in scenarios:
        assert isinstance(scenario, Scenario)
        s = scenario.scaled() if args.quick else scenario
        _log(f"running {s.name}{' (quick)' if s.quick else ''}: {s.description.splitlines()[0]}")
        try:
            report = run_scenario(s, options, _log)
        except ChaosError as e:
            print(f"{s.name}: ERROR: {e}", flush=True)
            verdicts[s.name] = "ERROR"
            continue
        print("\n".join(summary_lines(report)), flush=True)
        verdicts[s.name] = "PASS" if report["passed"] else "FAIL"
    if len(verdicts) > 1:
        print("summary: " + ", ".join(f"{n} {v}" for n, v in verdicts.items()))
    if report_dir is not None:
        (report_dir / "summary.json").write_text(json.dumps(verdicts, indent=2) + "\n")
    if "ERROR" in verdicts.values():
        return 2
    return 0 if all(v == "PASS" for v in verdicts.values()) else 1


def _cmd_list(args: argparse.Namespace) -> int:
    from chaos.scenario import scenario_files

    for path in scenario_files():
        from chaos.scenario import load_scenario

        try:
            s = load_scenario(path)
        except ChaosError as e:
            print(f"{path.stem}: INVALID: {e}")
            continue
        steps = ", ".join(f"{st.do}@{st.at:g}" for st in s.steps)
        print(f"{s.name:24} {s.load.duration:5g} s  {steps}")
        if args.verbose:
            print(f"    {s.description}")
            print(f"    invariants: {', '.join(s.invariants)}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from chaos.scenario import load_scenario

    code = 0
    for path in args.files:
        try:
            s = load_scenario(path)
            print(f"{path}: ok ({s.name}, {len(s.steps)} steps, {len(s.invariants)} invariants)")
        except ChaosError as e:
            print(str(e), file=sys.stderr)
            code = 2
    return code


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade chaos {run,list,check}``."""
    chaos = sub.add_parser("chaos", help="chaos scenarios on the namespace lab")
    chaos_sub = chaos.add_subparsers(dest="chaos_command", required=True)
    run = chaos_sub.add_parser("run", help="run scenarios and check their invariants")
    run.add_argument("scenario", nargs="+", help="scenario names, files, or 'all'")
    run.add_argument("--report", default=None, help="directory for <scenario>.json reports")
    run.add_argument("--quick", action="store_true", help="every time scaled by quick.scale")
    run.add_argument("--lab", default=None, help="reuse this running lab (default: build one)")
    run.add_argument("--name", default="chaos", help="name of the lab built (default chaos)")
    run.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    run.add_argument("--base", default="10.232", help="address base of the built lab")
    run.add_argument(
        "--mode", default=None, choices=["auto", "standalone", "sync", "cluster"],
        help="override the scenarios' lab mode",
    )  # fmt: skip
    run.set_defaults(handler=_cmd_run)
    ls = chaos_sub.add_parser("list", help="the shipped scenarios")
    ls.add_argument("-v", "--verbose", action="store_true")
    ls.set_defaults(handler=_cmd_list)
    check = chaos_sub.add_parser("check", help="validate scenario files")
    check.add_argument("files", nargs="+")
    check.set_defaults(handler=_cmd_check)
