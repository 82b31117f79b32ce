"""Failover trials: from the end hosts' probe traces to figures, CSV, JSON and a plot.

What a failover costs is what the end hosts see, not what the cluster says
about itself.  During a trial every long-lived probe flow sends about every
millisecond and records the monotonic time of each echo it gets back.  A
fault is injected at ``fault_at``; for each flow:

* the flow is **affected** when its first delivery after the fault comes
  more than ``affected_after`` later (it crossed the failed node; a flow of a
  healthy node keeps its ~1 ms rhythm), or when it never delivers again;
* its **latency** is that first delivery minus ``fault_at``: the time until
  the flow passes traffic again;
* it is **lost** when it was reset, or delivered nothing between the fault
  and the end of the observation window.

A trial's latency is the largest latency among its affected TCP flows (the
moment *every* flow of the failed node delivers again).  TCP flows measure
the end-to-end stall, which includes the sender's retransmission backoff
(RFC 6298: a path restored just after an RTO fired costs the next, doubled
RTO); UDP probe flows have no backoff, so theirs is the time until the path
is restored.  Both are reported, as distributions over trials.

Percentiles are nearest-rank (the smallest value with at least p% of the
trials at or below it): with 20 trials, p99 is the worst trial, which is
the honest reading of so few samples.

Pure except the writers at the end (files) and :func:`plot_cdf` (matplotlib,
Agg backend, imported lazily so the rest never pays for it).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from chaos.failover_phases import Phases

__all__ = [
    "FlowOutcome",
    "FlowTrace",
    "GapRecord",
    "Summary",
    "TrialResult",
    "evaluate_gaps",
    "evaluate_trial",
    "percentile",
    "plot_cdf",
    "summarize",
    "write_csv",
    "write_json",
]

ProbeKind = Literal["tcp", "udp"]

DEFAULT_AFFECTED_AFTER: Final = 0.050  # 50 probe intervals: no healthy flow waits that long


@dataclass(frozen=True, slots=True)
class FlowTrace:
    """What one probe flow saw around one fault."""

    flow: str  # identifier within the run, e.g. "tcp-7"
    kind: ProbeKind  # tcp: end-to-end stall; udp: path restore
    deliveries: tuple[float, ...]  # monotonic times an echo came back, ascending
    reset_at: float | None = None  # when the connection failed (RST, error), if it did

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "udp"):
            raise ValueError(f"probe kind must be tcp or udp, not {self.kind!r}")
        if any(b < a for a, b in zip(self.deliveries, self.deliveries[1:], strict=False)):
            raise ValueError(f"deliveries of {self.flow} are not in ascending order")


@dataclass(frozen=True, slots=True)
class FlowOutcome:
    flow: str
    kind: ProbeKind
    affected: bool  # crossed the failed node (stalled or never came back)
    lost: bool  # reset, or nothing delivered after the fault within the window
    latency: float | None  # seconds from the fault to the first delivery after it


@dataclass(frozen=True, slots=True)
class TrialResult:
    system: str  # "stockade", "keepalived-conntrackd", ...
    fault: str  # "kill", "freeze", "partition"
    trial: int  # 1-based within (system, fault)
    victim: str  # node the fault hit
    outcomes: tuple[FlowOutcome, ...]
    # Seconds from the fault until another node held the victim's VIPs, as
    # the bench saw it (polled every ~50 ms); None: not observed.
    takeover: float | None = None
    # What the survivors' agents reported doing, against the fault (Stockade
    # only: chaos.failover_phases); None where the system has no such events.
    phases: Phases | None = None

    def _latencies(self, kind: ProbeKind) -> list[float]:
        return [
            o.latency
            for o in self.outcomes
            if o.kind == kind and o.affected and not o.lost and o.latency is not None
        ]

    @property
    def latency(self) -> float | None:
        """Until every affected TCP flow delivered again (None: no TCP flow was affected)."""
        values = self._latencies("tcp")
        return max(values) if values else None

    @property
    def path_restore(self) -> float | None:
        """Until every affected UDP probe flow delivered again."""
        values = self._latencies("udp")
        return max(values) if values else None

    @property
    def affected(self) -> int:
        return sum(o.affected for o in self.outcomes)

    @property
    def lost(self) -> int:
        return sum(o.lost for o in self.outcomes if o.kind == "tcp")


def evaluate_flow(
    trace: FlowTrace,
    fault_at: float,
    window_end: float,
    affected_after: float = DEFAULT_AFFECTED_AFTER,
) -> FlowOutcome:
    """Classify one flow's trace around a fault at ``fault_at`` (see the module text)."""
    after = next((t for t in trace.deliveries if t > fault_at), None)
    reset = trace.reset_at is not None and trace.reset_at >= fault_at
    if after is not None and after > window_end:
        after = None
    lost = reset or after is None
    latency = None if after is None else after - fault_at
    affected = lost or (latency is not None and latency > affected_after)
    return FlowOutcome(trace.flow, trace.kind, affected, lost, latency)


def evaluate_trial(
    system: str,
    fault: str,
    trial: int,
    victim: str,
    traces: Iterable[FlowTrace],
    fault_at: float,
    window_end: float,
    affected_after: float = DEFAULT_AFFECTED_AFTER,
) -> TrialResult:
    if window_end <= fault_at:
        raise ValueError("the observation window must end after the fault")
    outcomes = tuple(evaluate_flow(t, fault_at, window_end, affected_after) for t in traces)
    return TrialResult(system, fault, trial, victim, outcomes)


# Echoes in flight (and a busy probe) may still arrive just after the fault.
DEFAULT_GAP_SLACK: Final = 0.050


@dataclass(frozen=True, slots=True)
class GapRecord:
    """One silence of a probe flow (the bench's probes report these, not every echo)."""

    flow: str
    kind: ProbeKind
    start: float  # last delivery before the silence
    end: float | None  # first delivery after it (None: still silent when observed)


def evaluate_gaps(
    system: str,
    fault: str,
    trial: int,
    victim: str,
    flows: Iterable[tuple[str, ProbeKind]],
    gaps: Iterable[GapRecord],
    resets: Iterable[tuple[str, float]],
    fault_at: float,
    window_end: float,
    slack: float = DEFAULT_GAP_SLACK,
    affected_after: float = DEFAULT_AFFECTED_AFTER,
    takeover: float | None = None,
) -> TrialResult:
    """A trial from gap records instead of full traces.

    A flow is **affected** when one of its gaps spans the fault (it began
    no later than ``slack`` after ``fault_at`` and had not ended by it) and
    ends more than ``affected_after`` after the fault, or never: as in
    :func:`evaluate_flow`, a short hiccup of every flow at once (the
    machine busy injecting the fault) is not a failover.  Its latency is the
    gap's end minus ``fault_at``; it is **lost** when the gap had not ended
    by ``window_end`` or the flow was reset in between.  Gaps shorter than
    the probes' stall threshold are never reported, so that threshold must
    be below ``affected_after``.
    """
    if window_end <= fault_at:
        raise ValueError("the observation window must end after the fault")
    spanning: dict[str, GapRecord] = {}
    for g in gaps:
        if g.start <= fault_at + slack and (g.end is None or g.end > fault_at):
            spanning.setdefault(g.flow, g)
    reset = {flow for flow, at in resets if fault_at <= at <= window_end}
    outcomes = []
    for flow, kind in flows:
        gap = spanning.get(flow)
        if gap is None and flow not in reset:
            outcomes.append(FlowOutcome(flow, kind, False, False, None))
            continue
        end = None if gap is None or gap.end is None or gap.end > window_end else gap.end
        if end is not None and end - fault_at <= affected_after and flow not in reset:
            outcomes.append(FlowOutcome(flow, kind, False, False, end - fault_at))
            continue
        lost = flow in reset or end is None
        latency = None if end is None else end - fault_at
        outcomes.append(FlowOutcome(flow, kind, True, lost, latency))
    return TrialResult(system, fault, trial, victim, tuple(outcomes), takeover)


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100); None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not in 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    system: str
    fault: str
    trials: int
    trials_without_affected_flow: int  # the victim carried no probe flow: no latency figure
    p50: float | None  # trial latency (TCP, end to end), seconds
    p95: float | None
    p99: float | None
    max: float | None
    path_restore_p50: float | None  # UDP probes, seconds
    path_restore_p99: float | None
    affected_flows: int
    lost_flows: int  # TCP flows reset or never resumed: the target is 0
    takeover_p50: float | None = None  # fault -> VIPs held by another node, seconds
    takeover_max: float | None = None


def summarize(results: Iterable[TrialResult]) -> list[Summary]:
    """One summary per (system, fault), in first-seen order."""
    groups: dict[tuple[str, str], list[TrialResult]] = {}
    for result in results:
        groups.setdefault((result.system, result.fault), []).append(result)
    summaries = []
    for (system, fault), trials in groups.items():
        latencies = [t.latency for t in trials if t.latency is not None]
        restores = [t.path_restore for t in trials if t.path_restore is not None]
        takeovers = [t.takeover for t in trials if t.takeover is not None]
        summaries.append(
            Summary(
                system=system,
                fault=fault,
                trials=len(trials),
                trials_without_affected_flow=sum(t.latency is None for t in trials),
                p50=percentile(latencies, 50),
                p95=percentile(latencies, 95),
                p99=percentile(latencies, 99),
                max=max(latencies) if latencies else None,
                path_restore_p50=percentile(restores, 50),
                path_restore_p99=percentile(restores, 99),
                affected_flows=sum(t.affected for t in trials),
                lost_flows=sum(t.lost for t in trials),
                takeover_p50=percentile(takeovers, 50),
                takeover_max=max(takeovers) if takeovers else None,
            )
        )
    return summaries


def ratios(summaries: Sequence[Summary], reference: str) -> dict[str, dict[str, float]]:
    """p50 and p99 of every other system divided by ``reference``'s, per fault."""
    base = {s.fault: s for s in summaries if s.system == reference}
    out: dict[str, dict[str, float]] = {}
    for s in summaries:
        ref = base.get(s.fault)
        if s.system == reference or ref is None:
            continue
        for name in ("p50", "p99"):
            mine, theirs = getattr(s, name), getattr(ref, name)
            if mine is not None and theirs:
                out.setdefault(f"{s.system}/{s.fault}", {})[name] = mine / theirs
    return out


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value * 1000:.1f}"


CSV_FIELDS: Final = (
    "system",
    "fault",
    "trial",
    "victim",
    "latency_ms",
    "path_restore_ms",
    "affected_flows",
    "lost_flows",
    "takeover_ms",
    "suspected_ms",
    "revoked_ms",
    "claimed_ms",
)


def write_csv(results: Iterable[TrialResult], path: Path) -> None:
    """One row per trial (empty cells where a figure does not exist)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for r in results:
            writer.writerow(
                [
                    r.system,
                    r.fault,
                    r.trial,
                    r.victim,
                    _ms(r.latency),
                    _ms(r.path_restore),
                    r.affected,
                    r.lost,
                    _ms(r.takeover),
                    *_phase_cells(r.phases),
                ]
            )


def _phase_cells(phases: Phases | None) -> list[str]:
    if phases is None:
        return ["", "", ""]
    return [_ms(phases.suspected), _ms(phases.revoked), _ms(phases.claimed)]


def report_document(
    results: Sequence[TrialResult], meta: Mapping[str, Any], reference: str = "stockade"
) -> dict[str, Any]:
    """Everything, JSON-ready: settings, summaries, ratios, and every flow of every trial."""
    summaries = summarize(results)
    return {
        "meta": dict(meta),
        "summaries": [asdict(s) for s in summaries],
        "ratios_to_" + reference: ratios(summaries, reference),
        "trials": [
            {
                "system": r.system,
                "fault": r.fault,
                "trial": r.trial,
                "victim": r.victim,
                "latency": r.latency,
                "path_restore": r.path_restore,
                "affected_flows": r.affected,
                "lost_flows": r.lost,
                "takeover": r.takeover,
                "phases": None if r.phases is None else asdict(r.phases),
                "flows": [asdict(o) for o in r.outcomes],
            }
            for r in results
        ],
    }


def write_json(document: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def plot_cdf(results: Sequence[TrialResult], path: Path, title: str) -> None:
    """PNG: CDF of per-flow failover latency (affected TCP flows), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[float]] = {}
    for r in results:
        key = f"{r.system} ({r.fault})"
        series.setdefault(key, []).extend(
            o.latency * 1000
            for o in r.outcomes
            if o.kind == "tcp" and o.affected and o.latency is not None and not o.lost
        )
    figure, axes = plt.subplots(figsize=(8, 6), dpi=100)
    try:
        for label, values in sorted(series.items()):
            if not values:
                continue
            ordered = sorted(values)
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axes.step(ordered, fractions, where="post", label=f"{label}, n={len(ordered)}")
        axes.set_xscale("log")
        axes.set_xlabel("time from fault until the flow delivers again (ms, log scale)")
        axes.set_ylabel("fraction of affected long-lived TCP flows")
        axes.set_ylim(0, 1.02)
        axes.grid(True, which="both", alpha=0.3)
        axes.set_title(title)
        if any(series.values()):
            # Below the axes: inside, it hid the steps of the slower systems.
            axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize="small")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
