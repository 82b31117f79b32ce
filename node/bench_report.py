"""From raw measurements to the benchmark's summary and its printed table (pure).

The raw record (what :mod:`node.bench` collects) is plain JSON-able data:

    {"engine": [{"decisions_per_second": ...}, ...],
     "memory": {"flows": N, "bytes_per_flow": ...} | None,
     "repeats": [{"ceiling": {"pps": ...},
                  "pps": {"bare": {...}, "node": {...}},
                  "cpu": {"bare": {"ns_per_packet": ...}, "node": {...}},
                  "tcp": {"none": bps, "bare": bps, "node_fast": bps, "node_slow": bps}}, ...]}

where each ``pps`` entry is ``{"best_pps": float | None, "capped": bool, ...}``.
Missing parts are simply absent.  :func:`summarize` turns it into medians,
side-by-side ratios and target verdicts; :func:`format_report` prints them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from node.bench_calc import cost_over, median, paired_ratios, ratio

# Targets from the issue; they belong to the benchmark, never to timed tests.
TARGET_NODE_COST: Final = 0.20  # node's time per packet at most 20% over the bare loop
TARGET_TCP_RATIO: Final = 0.50  # TCP through the node at least half of no firewall
TARGET_BYTES_PER_FLOW: Final = 300.0
TCP_SYSTEMS: Final = ("none", "bare", "node_fast", "node_slow")


def _series(values: Sequence[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {"runs": list(values), "median": median(present)}


def _verdict(value: float | None, target: float, *, at_most: bool) -> str:
    if value is None:
        return "n/a"
    ok = value <= target if at_most else value >= target
    return "met" if ok else "missed"


def _pps_summary(repeats: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    with_pps = [r for r in repeats if "pps" in r]
    if not with_pps:
        return None
    bare = [r["pps"]["bare"]["best_pps"] for r in with_pps]
    node = [r["pps"]["node"]["best_pps"] for r in with_pps]
    costs = [cost_over(b, n) for b, n in zip(bare, node, strict=True)]
    cost = median(c for c in costs if c is not None)
    return {
        "ceiling": _series([r.get("ceiling", {}).get("pps") for r in with_pps]),
        "bare": {**_series(bare), "capped": [r["pps"]["bare"]["capped"] for r in with_pps]},
        "node": {**_series(node), "capped": [r["pps"]["node"]["capped"] for r in with_pps]},
        "node_over_bare": _series(paired_ratios(node, bare)),
        "node_cost": {
            **_series(costs),
            "target": TARGET_NODE_COST,
            "verdict": _verdict(cost, TARGET_NODE_COST, at_most=True),
        },
    }


def _cpu_summary(repeats: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    with_cpu = [r["cpu"] for r in repeats if r.get("cpu")]
    if not with_cpu:
        return None
    bare = [c["bare"]["ns_per_packet"] for c in with_cpu]
    node = [c["node"]["ns_per_packet"] for c in with_cpu]
    costs = [None if r is None else r - 1.0 for r in map(ratio, node, bare)]
    cost = median(c for c in costs if c is not None)
    return {
        "pps": [c["bare"]["target_pps"] for c in with_cpu],
        "bare_ns": _series(bare),
        "node_ns": _series(node),
        "node_cost": {
            **_series(costs),
            "target": TARGET_NODE_COST,
            "verdict": _verdict(cost, TARGET_NODE_COST, at_most=True),
        },
    }


def _tcp_summary(repeats: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    with_tcp = [r["tcp"] for r in repeats if "tcp" in r]
    if not with_tcp:
        return None
    bps = {s: [t.get(s) for t in with_tcp] for s in TCP_SYSTEMS}
    ratios: dict[str, Any] = {}
    for system in ("node_fast", "node_slow", "bare"):
        series = _series(paired_ratios(bps[system], bps["none"]))
        target = TARGET_TCP_RATIO if system.startswith("node") else None
        verdict = _verdict(series["median"], TARGET_TCP_RATIO, at_most=False) if target else None
        ratios[system] = {**series, "target": target, "verdict": verdict}
    return {"bits_per_second": {s: _series(v) for s, v in bps.items()}, "ratio_to_none": ratios}


def summarize(raw: Mapping[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if raw.get("engine"):
        summary["engine_decisions_per_second"] = _series(
            [run["decisions_per_second"] for run in raw["engine"]]
        )
    memory = raw.get("memory")
    if memory:
        value = memory["bytes_per_flow"]
        summary["bytes_per_flow"] = {
            "flows": memory["flows"],
            "value": value,
            "rss": memory.get("rss_bytes_per_flow"),
            "target": TARGET_BYTES_PER_FLOW,
            "verdict": _verdict(value, TARGET_BYTES_PER_FLOW, at_most=True),
        }
    repeats = raw.get("repeats") or []
    pps = _pps_summary(repeats)
    if pps is not None:
        summary["pps_without_loss"] = pps
    cpu = _cpu_summary(repeats)
    if cpu is not None:
        summary["cpu_per_packet"] = cpu
    tcp = _tcp_summary(repeats)
    if tcp is not None:
        summary["tcp"] = tcp
    return summary


# -- printing --------------------------------------------------------------------

Fmt = Callable[[float | None], str]


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def _nanos(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ns"


def _gbit(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f} Gbit/s"


def _row(name: str, value: str, runs: str = "", target: str = "") -> str:
    return f"  {name:<34} {value:>15}   {target:<22} {runs}".rstrip()


def _series_row(name: str, series: Mapping[str, Any], fmt: Fmt, target: str = "") -> str:
    runs = " ".join(fmt(v) for v in series["runs"])
    return _row(name, fmt(series["median"]), runs, target)


def _capped_row(name: str, series: Mapping[str, Any]) -> str:
    runs = " ".join(
        (">=" if capped else "") + _count(v)
        for v, capped in zip(series["runs"], series["capped"], strict=True)
    )
    return _row(name, _count(series["median"]), runs)


def _cost_row(name: str, cost: Mapping[str, Any]) -> str:
    target = f"<= +{cost['target'] * 100:.0f}%: {cost['verdict']}"
    return _series_row(name, cost, _percent, target)


def format_report(summary: Mapping[str, Any], header: str) -> str:
    lines = [header, _row("measurement", "median", "runs", "target")]
    engine = summary.get("engine_decisions_per_second")
    if engine:
        lines.append(_series_row("engine decisions/s (in-process)", engine, _count))
    pps = summary.get("pps_without_loss")
    if pps:
        lines += _pps_lines(pps)
    cpu = summary.get("cpu_per_packet")
    if cpu:
        lines += _cpu_lines(cpu)
    tcp = summary.get("tcp")
    if tcp:
        lines += _tcp_lines(tcp)
    mem = summary.get("bytes_per_flow")
    if mem:
        name = f"bytes/flow ({mem['flows']:,} flows)"
        target = f"<= {mem['target']:.0f} B: {mem['verdict']}"
        lines.append(_row(name, f"{mem['value']:,.1f} B", "", target))
        if mem.get("rss") is not None:
            lines.append(_row("  resident memory growth/flow", f"{mem['rss']:,.1f} B"))
    return "\n".join(lines) + "\n"


def _pps_lines(pps: Mapping[str, Any]) -> list[str]:
    lines = [
        _series_row("UDP pps ceiling (generator)", pps["ceiling"], _count),
        _capped_row("pps without loss: bare loop", pps["bare"]),
        _capped_row("pps without loss: node (no fast)", pps["node"]),
        _series_row("  node / bare", pps["node_over_bare"], _fraction),
        _cost_row("  node cost per packet over bare", pps["node_cost"]),
    ]
    if any(pps["bare"]["capped"]) or any(pps["node"]["capped"]):
        lines.append(
            "  (>= : the generator, not the firewall, set this rate; the true one is higher)"
        )
    return lines


def _cpu_lines(cpu: Mapping[str, Any]) -> list[str]:
    rate = f"{cpu['pps'][0]:,.0f} pps" if cpu["pps"] else "-"
    return [
        _series_row(f"fw CPU/packet at {rate}: bare", cpu["bare_ns"], _nanos),
        _series_row("fw CPU/packet: node (no fast)", cpu["node_ns"], _nanos),
        _cost_row("  node CPU per packet over bare", cpu["node_cost"]),
    ]


_TCP_NAMES: Final = {
    "none": "TCP bulk: no firewall",
    "bare": "TCP bulk: bare loop",
    "node_fast": "TCP bulk: node, fast path",
    "node_slow": "TCP bulk: node, no fast path",
}


def _tcp_lines(tcp: Mapping[str, Any]) -> list[str]:
    lines = []
    for system in TCP_SYSTEMS:
        lines.append(_series_row(_TCP_NAMES[system], tcp["bits_per_second"][system], _gbit))
        share = tcp["ratio_to_none"].get(system)
        if share is not None:
            target = (
                "" if share["target"] is None else f">= {share['target']:.2f}: {share['verdict']}"
            )
            lines.append(_series_row("  / no firewall", share, _fraction, target))
    return lines
