"""Chaos invariants: pure functions over what the runner collected.

Each check takes plain values (the traffic driver's summary, timestamped
samples, digests) and its parameters, and returns a :class:`Result` with
pass/fail, a one-line summary and the evidence behind it.  Nothing here
reads a clock, a socket or a file: the runner (``chaos.runner``) samples,
these judge, and the unit tests feed them hand-made snapshots.

All times are ``CLOCK_MONOTONIC`` seconds (the traffic driver's clock and
the runner's are the same clock on one machine).

* ``established_flows``: no long-lived connection reset, none lost (still
  stalled at the end or never carrying data); optionally a bound on the
  longest stall.
* ``new_connections``: the fraction of new TCP connections that succeeded,
  counting only attempts that did not overlap a fault window (a
  disruptive step, from its start to ``window`` seconds after its end).
* ``replicas_converge``: after the load stopped, every live node's syncd
  holds the same records per origin (count and order-independent hash).
* ``single_vip_holder``: no sample ever saw a VIP on two nodes'
  interfaces; every VIP has a holder at the end; optional bounds on the
  longest time a VIP had no holder and on interface/etcd disagreement.
* ``memory_bounded``: RSS growth of each node process (filter, syncd)
  between the first and the last third of its samples stays under a bound;
  a process started during the run is judged from ``warmup`` seconds on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

EVIDENCE_ITEMS: Final = 10  # examples kept per kind of violation


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    passed: bool
    summary: str  # one line, with the figures that decided it
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "summary": self.summary,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    """One new-connection attempt of the load driver."""

    start: float
    end: float
    ok: bool
    reason: str | None = None  # failure reason (timeout, refused, reset, ...)


@dataclass(frozen=True, slots=True)
class VipSample:
    """Which nodes carried each VIP on an interface at time ``t``."""

    t: float
    holders: Mapping[str, tuple[str, ...]]  # VIP address -> node ids (empty: nobody)


@dataclass(frozen=True, slots=True)
class ClaimSample:
    """etcd's ``vips/`` claims at time ``t`` (VIP address -> holder node)."""

    t: float
    claims: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class RssSample:
    t: float
    node: str
    role: str  # filter | syncd
    pid: int
    rss_kb: int


# --- parameters ------------------------------------------------------------------------

_Num = (int, float)
# invariant -> parameter -> (accepted types, lowest, highest); None as a value means "off".
PARAMS: Final[dict[str, dict[str, tuple[tuple[type, ...], float, float]]]] = {
    "established_flows": {
        "max_resets": ((int,), 0, 1e9),
        "max_lost": ((int,), 0, 1e9),
        "max_gap_ms": (_Num, 0, 1e9),
    },
    "new_connections": {
        "min_success": (_Num, 0, 1),
        "window": (_Num, 0, 3600),
        "min_attempts": ((int,), 0, 1e9),
    },
    "replicas_converge": {"settle": (_Num, 0, 3600)},
    "single_vip_holder": {
        "max_unheld_ms": (_Num, 0, 1e9),
        "max_disagree_ms": (_Num, 0, 1e9),
        "held_at_end": ((bool,), 0, 1),
    },
    "memory_bounded": {
        "max_growth_mb": (_Num, 0, 1e6),
        "max_rss_mb": (_Num, 0, 1e6),
        "warmup": (_Num, 0, 3600),
    },
}
DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    "established_flows": {"max_resets": 0, "max_lost": 0, "max_gap_ms": None},
    "new_connections": {"min_success": 0.999, "window": 5.0, "min_attempts": 10},
    "replicas_converge": {"settle": 15.0},
    "single_vip_holder": {"max_unheld_ms": None, "max_disagree_ms": None, "held_at_end": True},
    "memory_bounded": {"max_growth_mb": 64.0, "max_rss_mb": None, "warmup": 5.0},
}


def check_params(name: str, params: Mapping[str, Any]) -> str | None:
    """What is wrong with an invariant's parameters, or None."""
    spec = PARAMS.get(name)
    if spec is None:
        return f"unknown invariant {name!r}"
    for key, value in params.items():
        if key not in spec:
            return f"unknown parameter {key!r} (known: {', '.join(spec)})"
        kinds, lo, hi = spec[key]
        if value is None:
            continue
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            return f"{key}: {value!r} is not {' or '.join(k.__name__ for k in kinds)}"
        if not lo <= float(value) <= hi:  # type: ignore[arg-type]  # isinstance narrowed Any to object
            return f"{key}: {value!r} not in [{lo:g}, {hi:g}]"
    return None


def params_for(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS[name], **given}


# --- fault windows -------------------------------------------------------------------------


def fault_windows(steps: Sequence[tuple[float, float]], window: float) -> list[tuple[float, float]]:
    """Disruptive steps (start, end) -> merged windows ``[start, end + window]``."""
    spans = sorted((s, e + window) for s, e in steps)
    merged: list[tuple[float, float]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _overlaps(a: float, b: float, windows: Sequence[tuple[float, float]]) -> bool:
    return any(a <= we and b >= ws for ws, we in windows)


# --- the checks ------------------------------------------------------------------------


def established_flows(traffic: Mapping[str, Any], params: Mapping[str, Any]) -> Result:
    p = params_for("established_flows", params)
    ll = traffic["long_lived"]
    conns = ll["per_connection"]
    still = [g for g in traffic.get("gap_events", []) if g.get("end") is None]
    silent = [c["conn"] for c in conns if c["echoed"] == 0]
    lost = len({g["conn"] for g in still} | set(silent))
    resets = int(ll["resets"])
    failures: list[str] = []
    if resets > p["max_resets"]:
        failures.append(f"{resets} resets > {p['max_resets']}")
    if lost > p["max_lost"]:
        failures.append(f"{lost} lost > {p['max_lost']}")
    longest = float(ll["longest_gap_ms"])
    if p["max_gap_ms"] is not None and longest > p["max_gap_ms"]:
        failures.append(f"longest stall {longest:.0f} ms > {p['max_gap_ms']:g} ms")
    if not conns:
        failures.append("no long-lived connections were driven")
    summary = (
        f"{len(conns)} connections, {resets} resets, {lost} lost, "
        f"{ll['stalls']} stalls, longest {longest:.0f} ms"
    )
    evidence = {
        "resets_by_connection": {c["conn"]: c["resets"] for c in conns if c["resets"]},
        "still_stalled": still[:EVIDENCE_ITEMS],
        "never_carried_data": silent[:EVIDENCE_ITEMS],
        "stalls": traffic.get("gap_events", [])[:EVIDENCE_ITEMS],
        "echoed": ll["echoed"],
    }
    return _result("established_flows", failures, summary, evidence)


def new_connections(
    attempts: Sequence[Attempt],
    windows: Sequence[tuple[float, float]],
    params: Mapping[str, Any],
) -> Result:
    p = params_for("new_connections", params)
    outside = [a for a in attempts if not _overlaps(a.start, a.end, windows)]
    inside = len(attempts) - len(outside)
    ok = sum(a.ok for a in outside)
    failed = [a for a in outside if not a.ok]
    rate = ok / len(outside) if outside else 1.0
    failures = []
    if len(outside) < p["min_attempts"]:
        failures.append(f"only {len(outside)} attempts outside fault windows")
    if rate < p["min_success"]:
        failures.append(f"success {rate:.4%} < {p['min_success']:.2%}")
    inside_ok = sum(a.ok for a in attempts if _overlaps(a.start, a.end, windows))
    reasons: dict[str, int] = {}
    for a in failed:
        reasons[a.reason or "?"] = reasons.get(a.reason or "?", 0) + 1
    summary = (
        f"{ok}/{len(outside)} ok outside fault windows ({rate:.2%}); {inside_ok}/{inside} ok inside"
    )
    evidence = {
        "windows": [[round(s, 3), round(e, 3)] for s, e in windows],
        "outside": {"attempts": len(outside), "ok": ok, "failed_by_reason": reasons},
        "inside": {"attempts": inside, "ok": inside_ok},
        "failed_examples": [
            {"start": round(a.start, 3), "end": round(a.end, 3), "reason": a.reason}
            for a in failed[:EVIDENCE_ITEMS]
        ],
    }
    return _result("new_connections", failures, summary, evidence)


Digest = Mapping[str, Mapping[str, Any]]  # origin -> {"count": n, "hash": "..."}


def replicas_converge(digests: Mapping[str, Digest | str], params: Mapping[str, Any]) -> Result:
    """``digests``: node -> its syncd digest, or an error string if it gave none."""
    errors = {n: d for n, d in digests.items() if isinstance(d, str)}
    good = {n: d for n, d in digests.items() if not isinstance(d, str)}
    origins = sorted({o for d in good.values() for o in d})
    differing = {}
    for origin in origins:
        seen = {n: _entry(d.get(origin)) for n, d in good.items()}
        if len(set(seen.values())) > 1:
            differing[origin] = {n: {"count": c, "hash": h} for n, (c, h) in seen.items()}
    failures = []
    if errors:
        failures.append(f"no digest from {', '.join(sorted(errors))}")
    if len(good) < 2 and not errors:
        failures.append(f"{len(good)} node(s) to compare: need 2")
    if differing:
        failures.append(f"{len(differing)} origin(s) differ: {', '.join(sorted(differing))}")
    counts = {o: _entry(next(iter(good.values())).get(o))[0] for o in origins if o not in differing}
    summary = (
        f"{len(good)} nodes, {len(origins)} origins, "
        f"{sum(counts.values())} agreed records, {len(differing)} differing"
    )
    evidence = {"nodes": sorted(good), "agreed_counts": counts, "differing": differing}
    evidence["errors"] = errors
    return _result("replicas_converge", failures, summary, evidence)


def _entry(e: Mapping[str, Any] | None) -> tuple[int, str]:
    return (0, "-") if e is None else (int(e["count"]), str(e["hash"]))


def single_vip_holder(
    vips: Sequence[str],
    samples: Sequence[VipSample],
    claims: Sequence[ClaimSample],
    params: Mapping[str, Any],
) -> Result:
    p = params_for("single_vip_holder", params)
    failures = []
    doubles = [(s.t, v, h) for s in samples for v, h in s.holders.items() if len(h) > 1]
    if not samples:
        failures.append("no interface samples")
    if doubles:
        span = doubles[-1][0] - doubles[0][0]
        failures.append(f"{len(doubles)} samples with two holders over {span * 1000:.0f} ms")
    unheld = {v: _longest(samples, _nobody(v)) for v in vips}
    worst_unheld = max(unheld.values(), default=0.0)
    if p["max_unheld_ms"] is not None and worst_unheld * 1000 > p["max_unheld_ms"]:
        failures.append(f"a VIP had no holder for {worst_unheld * 1000:.0f} ms")
    end = samples[-1].holders if samples else {}
    orphans = [v for v in vips if not end.get(v)]
    if p["held_at_end"] and orphans:
        failures.append(f"no holder at the end for {', '.join(orphans)}")
    disagree = {v: _disagreement(v, samples, claims) for v in vips}
    worst_disagree = max(disagree.values(), default=0.0)
    if p["max_disagree_ms"] is not None and worst_disagree * 1000 > p["max_disagree_ms"]:
        failures.append(f"interfaces and etcd disagreed for {worst_disagree * 1000:.0f} ms")
    summary = (
        f"{len(samples)} interface samples, {len(claims)} etcd samples, "
        f"{len(doubles)} with two holders, longest unheld {worst_unheld * 1000:.0f} ms"
    )
    evidence = {
        "two_holders": [
            {"t": round(t, 3), "vip": v, "holders": list(h)} for t, v, h in doubles[:EVIDENCE_ITEMS]
        ],
        "longest_unheld_ms": {v: round(s * 1000, 1) for v, s in unheld.items()},
        "longest_disagreement_ms": {v: round(s * 1000, 1) for v, s in disagree.items()},
        "holders_at_end": {v: list(end.get(v, ())) for v in vips},
        "sample_interval_ms": _median_interval(samples),
    }
    return _result("single_vip_holder", failures, summary, evidence)


def _nobody(vip: str) -> Callable[[VipSample], bool]:
    return lambda s: not s.holders.get(vip)


def _longest(samples: Sequence[VipSample], bad: Callable[[VipSample], bool]) -> float:
    """Longest run of consecutive samples for which ``bad`` holds (first to next good)."""
    longest, since = 0.0, None
    for s in samples:
        if bad(s):
            since = s.t if since is None else since
        elif since is not None:
            longest, since = max(longest, s.t - since), None
    if since is not None and samples:
        longest = max(longest, samples[-1].t - since)
    return longest


def _disagreement(vip: str, samples: Sequence[VipSample], claims: Sequence[ClaimSample]) -> float:
    """Longest time the interfaces showed another holder set than etcd's claim."""
    if not claims:
        return 0.0
    i, longest, since = 0, 0.0, None
    for s in samples:
        while i + 1 < len(claims) and claims[i + 1].t <= s.t:
            i += 1
        if claims[i].t > s.t:
            continue
        claim = claims[i].claims.get(vip)
        agree = tuple(s.holders.get(vip, ())) == ((claim,) if claim else ())
        if not agree:
            since = s.t if since is None else since
        elif since is not None:
            longest, since = max(longest, s.t - since), None
    if since is not None:
        longest = max(longest, samples[-1].t - since)
    return longest


def _median_interval(samples: Sequence[VipSample]) -> float | None:
    gaps = sorted(b.t - a.t for a, b in itertools.pairwise(samples))
    return round(gaps[len(gaps) // 2] * 1000, 2) if gaps else None


def memory_bounded(samples: Sequence[RssSample], params: Mapping[str, Any]) -> Result:
    p = params_for("memory_bounded", params)
    ordered = sorted(samples, key=lambda s: s.t)
    first_pass = ordered[0].t if ordered else 0.0
    by_proc: dict[tuple[str, str, int], list[RssSample]] = {}
    born: dict[tuple[str, str, int], float] = {}
    for s in ordered:
        key = (s.node, s.role, s.pid)
        born.setdefault(key, s.t)
        # A process first seen mid-run (restarted) is still loading its modules.
        if born[key] == first_pass or s.t - born[key] >= p["warmup"]:
            by_proc.setdefault(key, []).append(s)
    failures = []
    if not samples:
        failures.append("no RSS samples")
    table: dict[str, dict[str, Any]] = {}
    worst = 0.0
    for (node, role, pid), series in sorted(by_proc.items()):
        third = max(1, len(series) // 3)
        first = min(x.rss_kb for x in series[:third])
        last = max(x.rss_kb for x in series[-third:])
        growth_mb = (last - first) / 1024 if len(series) >= 3 else 0.0
        peak_mb = max(x.rss_kb for x in series) / 1024
        worst = max(worst, growth_mb)
        table[f"{node}/{role}/{pid}"] = {
            "samples": len(series),
            "first_mb": round(first / 1024, 1),
            "last_mb": round(last / 1024, 1),
            "peak_mb": round(peak_mb, 1),
            "growth_mb": round(growth_mb, 1),
        }
        if growth_mb > p["max_growth_mb"]:
            failures.append(f"{node} {role} grew {growth_mb:.1f} MB > {p['max_growth_mb']:g}")
        if p["max_rss_mb"] is not None and peak_mb > p["max_rss_mb"]:
            failures.append(f"{node} {role} peaked at {peak_mb:.1f} MB > {p['max_rss_mb']:g}")
    peak = max((v["peak_mb"] for v in table.values()), default=0.0)
    summary = f"{len(table)} processes, worst growth {worst:.1f} MB, peak {peak:.1f} MB"
    return _result("memory_bounded", failures, summary, {"processes": table})


def _result(name: str, failures: list[str], summary: str, evidence: dict[str, Any]) -> Result:
    if failures:
        summary = "; ".join(failures) + " (" + summary + ")"
    return Result(name, not failures, summary, evidence)
