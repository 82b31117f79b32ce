"""What asymmetric routing costs a new connection (pure; ``stockade bench asymmetric``).

The same traffic runs through the same lab twice per repeat: once with
symmetric routing (both directions of a flow cross one node) and once with
every flow asymmetric (its reply crosses another node than its request, so
that node must wait for the flow's replica: the hold queue,
docs/asymmetric.md).  Two views of the added delay are kept apart:

* the clients' view: new-connection latency (connect + first echo) p50/p99
  per run, then the median over repeats; the added delay is asymmetric
  minus symmetric;
* the nodes' view: how long each held packet waited for its replica, read
  off the hold queues' release histograms (summed over nodes and runs,
  quantiles as Prometheus reads them, :func:`node.histogram.bucket_quantile`).

Nothing here does I/O; :mod:`chaos.bench_asymmetric` runs the lab.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from node.histogram import bucket_quantile

ROUTINGS: Final = ("symmetric", "asymmetric")


@dataclass(frozen=True, slots=True)
class HoldDelta:
    """One node's (or several nodes') hold queue activity over a run."""

    held: int
    released: int
    expired: int
    overflow: int
    bounds_ms: tuple[float, ...]
    counts: tuple[int, ...]  # release waits per bucket (not cumulative), +inf last

    @classmethod
    def between(cls, before: Mapping[str, Any], after: Mapping[str, Any]) -> HoldDelta:
        """From two ``stats`` snapshots of one node's ``sync.hold``."""
        bounds = tuple(float(b) for b in after["latency_bounds_ms"])
        if tuple(float(b) for b in before["latency_bounds_ms"]) != bounds:
            raise ValueError("hold histogram bounds changed between the snapshots")
        counts = tuple(
            int(a) - int(b)
            for a, b in zip(after["latency_counts"], before["latency_counts"], strict=True)
        )
        deltas = {
            name: int(after[f"{name}_total"]) - int(before[f"{name}_total"])
            for name in ("held", "released_by_replica", "expired", "overflow")
        }
        if min(counts, default=0) < 0 or min(deltas.values()) < 0:
            raise ValueError("hold counters went backwards (did the filter restart?)")
        return cls(
            deltas["held"], deltas["released_by_replica"], deltas["expired"],
            deltas["overflow"], bounds, counts,
        )  # fmt: skip

    def quantile_ms(self, q: float) -> float | None:
        return bucket_quantile(self.bounds_ms, self.counts, q)


def merge_holds(holds: Iterable[HoldDelta]) -> HoldDelta | None:
    """The sum of several nodes' or runs' hold activity (None for none)."""
    holds = list(holds)
    if not holds:
        return None
    bounds = holds[0].bounds_ms
    if any(h.bounds_ms != bounds for h in holds):
        raise ValueError("cannot merge hold histograms with different bounds")
    return HoldDelta(
        sum(h.held for h in holds),
        sum(h.released for h in holds),
        sum(h.expired for h in holds),
        sum(h.overflow for h in holds),
        bounds,
        tuple(map(sum, zip(*(h.counts for h in holds), strict=True))),
    )


@dataclass(frozen=True, slots=True)
class RoutingRun:
    """One traffic run in one routing mode."""

    routing: str  # one of ROUTINGS
    repeat: int
    traffic: Mapping[str, Any]  # chaos.traffic's JSON summary
    hold: HoldDelta | None  # all nodes together; None when no node reported one
    asymmetric_fraction: float | None  # `stockade lab ecmp`'s measure; None: not measured

    def latency_ms(self, kind: str, q: int) -> float | None:
        value = self.traffic.get(kind, {}).get(f"latency_p{q}_ms")
        return None if value is None else float(value)

    def counts(self, kind: str) -> tuple[int, int]:
        r = self.traffic.get(kind, {})
        return int(r.get("ok", 0)), int(r.get("failed", 0))


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _side(runs: Sequence[RoutingRun]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs)}
    for kind in ("churn", "udp"):
        ok = sum(r.counts(kind)[0] for r in runs)
        failed = sum(r.counts(kind)[1] for r in runs)
        out[kind] = {
            "ok": ok,
            "failed": failed,
            "success": None if ok + failed == 0 else ok / (ok + failed),
            "p50_ms": _median([r.latency_ms(kind, 50) for r in runs]),
            "p99_ms": _median([r.latency_ms(kind, 99) for r in runs]),
            "p50_ms_runs": [r.latency_ms(kind, 50) for r in runs],
            "p99_ms_runs": [r.latency_ms(kind, 99) for r in runs],
        }
    ll = [r.traffic.get("long_lived", {}) for r in runs]
    out["long_lived"] = {
        "resets": sum(int(x.get("resets", 0)) for x in ll),
        "stalls": sum(int(x.get("stalls", 0)) for x in ll),
    }
    hold = merge_holds(r.hold for r in runs if r.hold is not None)
    out["hold"] = None if hold is None else {
        "held": hold.held,
        "released": hold.released,
        "expired": hold.expired,
        "overflow": hold.overflow,
        "wait_p50_ms": hold.quantile_ms(0.5),
        "wait_p99_ms": hold.quantile_ms(0.99),
    }  # fmt: skip
    out["asymmetric_fraction"] = _median([r.asymmetric_fraction for r in runs])
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarize(runs: Sequence[RoutingRun]) -> dict[str, Any]:
    """Per routing mode, and the added delay (asymmetric minus symmetric)."""
    unknown = {r.routing for r in runs} - set(ROUTINGS)
    if unknown:
        raise ValueError(f"unknown routing {sorted(unknown)}")
    sides = {name: _side([r for r in runs if r.routing == name]) for name in ROUTINGS}
    sym, asym = sides["symmetric"]["churn"], sides["asymmetric"]["churn"]
    return {
        **sides,
        "added_delay_ms": {
            "p50": _difference(asym["p50_ms"], sym["p50_ms"]),
            "p99": _difference(asym["p99_ms"], sym["p99_ms"]),
        },
    }


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


_COLUMNS: Final = (
    ("routing", 10), ("runs", 4), ("crossing", 8), ("new TCP ok", 10), ("failed", 6),
    ("success", 7), ("p50 ms", 7), ("p99 ms", 7), ("UDP ok", 6), ("failed", 6), ("held", 6),
    ("expired", 7), ("overflow", 8), ("wait p50", 8), ("wait p99", 8),
)  # fmt: skip


def _row(name: str, s: Mapping[str, Any]) -> list[str]:
    c, u, h = s["churn"], s["udp"], s["hold"] or {}
    return [
        name, str(s["runs"]), _pct(s["asymmetric_fraction"]), str(c["ok"]), str(c["failed"]),
        _pct(c["success"]), _ms(c["p50_ms"]), _ms(c["p99_ms"]), str(u["ok"]), str(u["failed"]),
        str(h.get("held", "-")), str(h.get("expired", "-")), str(h.get("overflow", "-")),
        _ms(h.get("wait_p50_ms")), _ms(h.get("wait_p99_ms")),
    ]  # fmt: skip


def summary_text(summary: Mapping[str, Any]) -> str:
    """The table an operator reads (also written to summary.txt)."""
    rows = [[title for title, _ in _COLUMNS]] + [_row(n, summary[n]) for n in ROUTINGS]
    lines = ["  ".join(v.rjust(w) for v, (_, w) in zip(row, _COLUMNS, strict=True)) for row in rows]
    added = summary["added_delay_ms"]
    lines += [
        "p50/p99: new TCP connection, connect + first echo (median over runs); crossing: flows "
        "whose reply crossed another node; wait: held packets' wait for their replica (ms)",
        f"added delay of asymmetric routing (median over runs): "
        f"p50 {_ms(added['p50'])} ms, p99 {_ms(added['p99'])} ms",
    ]
    return "\n".join(lines)
