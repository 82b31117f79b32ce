"""``stockade bench dataplane``: how fast the filter is, as ratios measured side by side.

One run prints (the issue's targets in brackets):

1. engine decisions/s in-process (no target: the figure the others explain);
2. UDP packets/s without loss (< ``--loss`` fraction) through NFQUEUE: the
   bare accept-all loop and the node with the fast path off, and the node's
   extra time per packet over the bare loop [at most +20%];
3. the firewall process's CPU time per packet at a fixed rate, node and bare
   loop: the same cost, estimated without depending on the generator [+20%];
4. bulk TCP throughput with no firewall, through the bare loop, through the
   node with and without the fast path, as ratios to no firewall [node with
   fast path at least 0.5];
5. bytes per flow with ``--flows`` flows in the table [at most 300 B].

Network figures are repeated ``--repeats`` times; each repeat measures every
system one after another (see :mod:`node.bench_repeat`), and the report
gives the median of the per-repeat ratios (see :mod:`node.bench_calc` for
why).  ``--json FILE`` writes every step of every repeat.  The targets are
checked here, never in timed tests.  docs/benchmarks.md explains each
method and keeps the latest results.

Parts 2-4 need root: they build a ``client -- fw -- server`` lab in network
namespaces (:mod:`node.bench_lab`), removed at the end (also on Ctrl-C or
SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from node.bench_calc import BenchError
from node.errors import ConfigError

PARTS: Final = ("engine", "pps", "tcp", "memory")
LAB_PARTS: Final = frozenset({"pps", "tcp"})
BUSY_LOAD: Final = 0.5  # load average above which the report warns of noise
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchOptions:
    # Lab repeats (network parts) and engine runs; the report gives medians.
    repeats: int = 3
    # Parts to run, a subset of PARTS.
    parts: tuple[str, ...] = PARTS
    # Flows admitted for the bytes-per-flow figure.
    flows: int = 1_000_000
    # Conversations in the engine trace (11 packets each).
    engine_flows: int = 20_000
    # Seconds of traffic per UDP rate step.
    step_seconds: float = 3.0
    # Seconds of each TCP transfer, and seconds at its start left out (slow start).
    tcp_seconds: int = 5
    tcp_omit: int = 1
    # A UDP step passes when its loss fraction is below this.
    loss_threshold: float = 0.001
    # Rate steps per search at most, and the precision the search stops at.
    max_steps: int = 8
    precision: float = 0.05
    # Lowest rate (packets/s) the search considers.
    low_pps: float = 1000.0
    # Fixed rate (packets/s) at which the firewall's CPU time per packet is read.
    cpu_pps: float = 10_000.0
    # Two cores as two machines (2+ CPUs): the firewall process and fw's packet
    # processing on CPU 1, iperf3 on CPU 0 (see node.bench_lab).
    pin: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, not {self.repeats}")
        if not self.parts or not set(self.parts) <= set(PARTS):
            raise ConfigError(f"parts must be some of {', '.join(PARTS)}, not {self.parts}")
        if self.flows < 1 or self.engine_flows < 1:
            raise ConfigError("--flows and the engine trace need at least one flow")
        if self.step_seconds <= 0 or self.tcp_seconds < 1 or self.tcp_omit < 0:
            raise ConfigError("step and transfer durations must be positive")
        if not 0 < self.loss_threshold < 1:
            raise ConfigError(f"--loss must be a fraction in (0, 1), not {self.loss_threshold}")
        if self.max_steps < 2 or not 0 < self.precision < 1 or self.low_pps <= 0:
            raise ConfigError("search needs max_steps >= 2, precision in (0, 1), low_pps > 0")
        if self.cpu_pps <= 0:
            raise ConfigError(f"--cpu-pps must be positive, not {self.cpu_pps}")


def quick_options(**overrides: Any) -> BenchOptions:
    """A smoke run: small sizes, a few hundred ms per step, one repeat."""
    base: dict[str, Any] = dict(
        repeats=1,
        flows=20_000,
        engine_flows=1_000,
        step_seconds=0.4,
        tcp_seconds=1,
        tcp_omit=0,
        max_steps=4,
        precision=0.2,
    )
    base.update(overrides)
    return BenchOptions(**base)


# -- measurements -----------------------------------------------------------------


def measure_engine(opts: BenchOptions, progress: Progress) -> list[dict[str, Any]]:
    from node.bench_inproc import engine_trace, run_engine_trace

    trace = engine_trace(opts.engine_flows)
    runs = []
    for i in range(opts.repeats):
        run = run_engine_trace(trace, opts.engine_flows)
        runs.append(
            {
                "packets": run.packets,
                "new_flows": run.new_flows,
                "seconds": run.seconds,
                "decisions_per_second": run.decisions_per_second,
            }
        )
        progress(f"engine run {i + 1}/{opts.repeats}: {run.decisions_per_second:,.0f} decisions/s")
    return runs


def measure_memory(opts: BenchOptions, progress: Progress) -> dict[str, Any]:
    from node.bench_inproc import measure_bytes_per_flow

    progress(f"admitting {opts.flows:,} flows under tracemalloc ...")
    run = measure_bytes_per_flow(opts.flows)
    progress(f"bytes/flow: {run.bytes_per_flow:.1f}")
    return {
        "flows": run.flows,
        "bytes_total": run.bytes_total,
        "peak_bytes": run.peak_bytes,
        "bytes_per_flow": run.bytes_per_flow,
        "rss_bytes_per_flow": run.rss_bytes_per_flow,
    }


# -- the command ----------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` cleans up."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _load() -> float:
    """The 1-minute load average: other work on the machine shows in every figure."""
    return os.getloadavg()[0]


def header(opts: BenchOptions, quick: bool, info: Mapping[str, Any]) -> str:
    text = (
        f"stockade bench dataplane: repeats={opts.repeats}{' (quick)' if quick else ''}"
        f", {info['cpus']} CPUs, Linux {info['kernel']}, Python {info['python']}"
    )
    # Only the load before counts: the benchmark itself keeps both cores busy.
    if info["load_before"] > BUSY_LOAD:
        text += (
            f"\n  note: load average {info['load_before']:.2f} before the run: other work "
            "shares the CPUs, figures are noisy"
        )
    return text


def run_dataplane(opts: BenchOptions, progress: Progress) -> dict[str, Any]:
    """Run the chosen parts; returns the raw record (see :mod:`node.bench_report`)."""
    raw: dict[str, Any] = {}
    with _sigterm_as_interrupt():
        if "engine" in opts.parts:
            raw["engine"] = measure_engine(opts, progress)
        if LAB_PARTS & set(opts.parts):
            from node.bench_repeat import measure_lab

            raw["repeats"] = measure_lab(opts, progress)
        if "memory" in opts.parts:
            raw["memory"] = measure_memory(opts, progress)
    return raw


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    given = {
        name: value
        for name, value in (
            ("repeats", args.repeats),
            ("flows", args.flows),
            ("step_seconds", args.step_seconds),
            ("tcp_seconds", args.tcp_seconds),
            ("loss_threshold", args.loss),
            ("cpu_pps", args.cpu_pps),
        )
        if value is not None
    }
    given["parts"] = tuple(dict.fromkeys(args.only)) if args.only else PARTS
    given["pin"] = not args.no_pin
    return quick_options(**given) if args.quick else BenchOptions(**given)


def _cmd_dataplane(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from node.bench_report import format_report, summarize

    opts = options_from_args(args)
    started = time.time()
    info = {**machine(), "load_before": _load()}

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    raw = run_dataplane(opts, progress)
    summary = summarize(raw)
    info["load_after"] = _load()
    out.write(format_report(summary, header(opts, args.quick, info)))
    if args.json:
        document = {
            "command": " ".join(["stockade", *sys.argv[1:]]),
            "started_unix": started,
            "seconds": time.time() - started,
            "machine": info,
            "options": dataclasses.asdict(opts),
            "raw": raw,
            "summary": summary,
        }
        try:
            Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        except OSError as e:
            raise BenchError(f"cannot write {args.json}: {e.strerror}") from e
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="performance benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser(
        "dataplane", help="engine decisions/s, NFQUEUE pps, TCP throughput, bytes per flow"
    )
    p.add_argument("--repeats", type=int, help="repeats of each measurement (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: short steps, small sizes")
    p.add_argument("--json", metavar="FILE", help="write every measurement to FILE")
    p.add_argument("--flows", type=int, help="flows for bytes/flow (default 1000000)")
    p.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    p.add_argument("--step-seconds", type=float, help="seconds per UDP rate step (default 3)")
    p.add_argument("--tcp-seconds", type=int, help="seconds per TCP transfer (default 5)")
    p.add_argument("--loss", type=float, help="loss fraction a UDP step may have (default 0.001)")
    p.add_argument(
        "--cpu-pps", type=float, help="UDP rate of the CPU-per-packet step (default 10000)"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.set_defaults(handler=_cmd_dataplane)
