"""Chaos invariants: each check on hand-made snapshots, passing and failing."""

from __future__ import annotations

from typing import Any

import pytest

from chaos import invariants as inv
from chaos.invariants import Attempt, ClaimSample, RssSample, VipSample


def _traffic(
    resets: int = 0, gaps: list[dict[str, Any]] | None = None, echoed: int = 100
) -> dict[str, Any]:
    gaps = gaps or []
    conns = [
        {"conn": i, "echoed": echoed, "resets": resets if i == 0 else 0, "stalls": 0}
        for i in range(4)
    ]
    return {
        "long_lived": {
            "per_connection": conns,
            "resets": resets,
            "stalls": len(gaps),
            "longest_gap_ms": max((g["gap_ms"] for g in gaps), default=3.0),
            "echoed": echoed * 4,
        },
        "gap_events": gaps,
    }


# --- established_flows ------------------------------------------------------------------


def test_established_flows_pass_with_stalls_that_resumed() -> None:
    gap = {"conn": 1, "start": 10.0, "end": 10.4, "gap_ms": 400.0}
    r = inv.established_flows(_traffic(gaps=[gap]), {})
    assert r.passed, r.summary
    assert "0 resets, 0 lost, 1 stalls, longest 400 ms" in r.summary


def test_established_flows_fail_on_a_reset() -> None:
    r = inv.established_flows(_traffic(resets=1), {})
    assert not r.passed and "1 resets > 0" in r.summary
    assert r.evidence["resets_by_connection"] == {0: 1}
    assert inv.established_flows(_traffic(resets=1), {"max_resets": 1}).passed


def test_established_flows_fail_on_a_stall_still_open_at_the_end() -> None:
    gap = {"conn": 2, "start": 10.0, "end": None, "gap_ms": 3000.0}
    r = inv.established_flows(_traffic(gaps=[gap]), {})
    assert not r.passed and "1 lost > 0" in r.summary
    assert r.evidence["still_stalled"] == [gap]


def test_established_flows_fail_when_a_connection_never_carried_data() -> None:
    r = inv.established_flows(_traffic(echoed=0), {})
    assert not r.passed and "4 lost" in r.summary


def test_established_flows_optional_gap_bound() -> None:
    gap = {"conn": 1, "start": 10.0, "end": 10.7, "gap_ms": 700.0}
    assert inv.established_flows(_traffic(gaps=[gap]), {"max_gap_ms": 1000}).passed
    r = inv.established_flows(_traffic(gaps=[gap]), {"max_gap_ms": 500})
    assert not r.passed and "longest stall 700 ms > 500 ms" in r.summary


# --- new_connections --------------------------------------------------------------------


def _attempts(n: int, failing: set[int], t0: float = 100.0) -> list[Attempt]:
    return [
        Attempt(
            t0 + i * 0.05,
            t0 + i * 0.05 + 0.01,
            i not in failing,
            "timeout" if i in failing else None,
        )
        for i in range(n)
    ]


def test_new_connections_pass_when_failures_fall_inside_a_fault_window() -> None:
    attempts = _attempts(2000, failing={1000, 1001, 1010})  # t = 150.0 .. 150.5
    windows = inv.fault_windows([(149.9, 150.0)], window=1.0)
    r = inv.new_connections(attempts, windows, {})
    assert r.passed, r.summary
    assert r.evidence["inside"]["attempts"] > 0
    assert r.evidence["inside"]["ok"] == r.evidence["inside"]["attempts"] - 3


def test_new_connections_fail_below_the_threshold_outside_windows() -> None:
    attempts = _attempts(2000, failing={10, 20, 30})
    r = inv.new_connections(attempts, [], {"min_success": 0.999})
    assert not r.passed and "success 99.8500% < 99.90%" in r.summary
    assert r.evidence["outside"]["failed_by_reason"] == {"timeout": 3}
    assert len(r.evidence["failed_examples"]) == 3
    assert inv.new_connections(attempts, [], {"min_success": 0.99}).passed


def test_new_connections_attempt_overlapping_a_window_edge_is_excluded() -> None:
    # Started before the window, failed (timed out) inside it.
    attempts = [Attempt(9.0, 11.0, False, "timeout"), *_attempts(50, set(), t0=20.0)]
    assert inv.new_connections(attempts, [(10.5, 12.0)], {}).passed
    assert not inv.new_connections(attempts, [(11.5, 12.0)], {}).passed


def test_new_connections_too_few_attempts_fail() -> None:
    r = inv.new_connections(_attempts(5, set()), [], {})
    assert not r.passed and "only 5 attempts" in r.summary


def test_fault_windows_extend_and_merge() -> None:
    assert inv.fault_windows([(10, 11), (12, 13), (30, 30)], 2) == [(10, 15), (30, 32)]
    assert inv.fault_windows([], 5) == []


# --- replicas_converge ------------------------------------------------------------------


def _digest(**origins: tuple[int, str]) -> dict[str, dict[str, Any]]:
    return {o: {"count": c, "hash": h} for o, (c, h) in origins.items()}


def test_replicas_converge_when_every_node_agrees() -> None:
    d = _digest(fw1=(10, "aa"), fw2=(5, "bb"))
    r = inv.replicas_converge({"fw1": d, "fw2": d, "fw3": d}, {})
    assert r.passed and "3 nodes, 2 origins, 15 agreed records, 0 differing" in r.summary


def test_replicas_differ_in_hash_or_a_missing_origin() -> None:
    a = _digest(fw1=(10, "aa"), fw2=(5, "bb"))
    b = _digest(fw1=(10, "ab"), fw2=(5, "bb"))
    c = _digest(fw2=(5, "bb"))
    r = inv.replicas_converge({"fw1": a, "fw2": b, "fw3": c}, {})
    assert not r.passed and "1 origin(s) differ: fw1" in r.summary
    assert r.evidence["differing"]["fw1"]["fw3"] == {"count": 0, "hash": "-"}
    assert r.evidence["differing"]["fw1"]["fw2"]["hash"] == "ab"


def test_replicas_a_node_without_digest_fails() -> None:
    d = _digest(fw1=(1, "aa"))
    r = inv.replicas_converge({"fw1": d, "fw2": "digest failed: refused"}, {})
    assert not r.passed and "no digest from fw2" in r.summary
    assert not inv.replicas_converge({"fw1": d}, {}).passed  # nothing to compare


# --- single_vip_holder ------------------------------------------------------------------

VIPS = ["10.0.10.101", "10.0.10.102"]


def _samples(holders_at: list[tuple[float, str, tuple[str, ...]]]) -> list[VipSample]:
    """Every 10 ms from 0 to 1 s: fw1 holds .101, fw2 holds .102, except the overrides."""
    out = []
    for i in range(101):
        t = i * 0.01
        h: dict[str, tuple[str, ...]] = {VIPS[0]: ("fw1",), VIPS[1]: ("fw2",)}
        for start, vip, who in holders_at:
            if t >= start:
                h[vip] = who
        out.append(VipSample(t, h))
    return out


def test_single_holder_pass_through_a_clean_move() -> None:
    samples = _samples([(0.5, VIPS[1], ()), (0.6, VIPS[1], ("fw3",))])
    claims = [ClaimSample(0.0, {VIPS[0]: "fw1", VIPS[1]: "fw2"})]
    claims.append(ClaimSample(0.55, {VIPS[0]: "fw1", VIPS[1]: "fw3"}))
    r = inv.single_vip_holder(VIPS, samples, claims, {})
    assert r.passed, r.summary
    assert r.evidence["longest_unheld_ms"][VIPS[1]] == pytest.approx(100, abs=1)
    assert r.evidence["holders_at_end"] == {VIPS[0]: ["fw1"], VIPS[1]: ["fw3"]}
    assert r.evidence["sample_interval_ms"] == pytest.approx(10, abs=0.1)
    bounded = inv.single_vip_holder(VIPS, samples, claims, {"max_unheld_ms": 50})
    assert not bounded.passed and "no holder for 100 ms" in bounded.summary


def test_single_holder_fail_on_two_holders() -> None:
    samples = _samples([(0.5, VIPS[1], ("fw2", "fw3")), (0.7, VIPS[1], ("fw3",))])
    r = inv.single_vip_holder(VIPS, samples, [], {})
    assert not r.passed and "20 samples with two holders over 190 ms" in r.summary
    first = r.evidence["two_holders"][0]
    assert first == {"t": 0.5, "vip": VIPS[1], "holders": ["fw2", "fw3"]}


def test_single_holder_fail_when_a_vip_ends_unheld() -> None:
    samples = _samples([(0.9, VIPS[0], ())])
    r = inv.single_vip_holder(VIPS, samples, [], {})
    assert not r.passed and f"no holder at the end for {VIPS[0]}" in r.summary
    assert inv.single_vip_holder(VIPS, samples, [], {"held_at_end": False}).passed


def test_single_holder_disagreement_with_etcd() -> None:
    samples = _samples([])
    claims = [ClaimSample(0.0, {VIPS[0]: "fw1", VIPS[1]: "fw2"})]
    claims.append(ClaimSample(0.4, {VIPS[0]: "fw1", VIPS[1]: "fw3"}))  # interfaces never follow
    r = inv.single_vip_holder(VIPS, samples, claims, {"max_disagree_ms": 300})
    assert not r.passed and "disagreed for 600 ms" in r.summary
    assert inv.single_vip_holder(VIPS, samples, claims, {}).passed  # reported only


def test_single_holder_no_samples_fail() -> None:
    assert not inv.single_vip_holder(VIPS, [], [], {}).passed


# --- memory_bounded ---------------------------------------------------------------------


def _rss(pid: int, start: float, kb: list[int], node: str = "fw1") -> list[RssSample]:
    return [RssSample(start + i, node, "filter", pid, v) for i, v in enumerate(kb)]


def test_memory_bounded_pass_for_a_flat_process() -> None:
    samples = _rss(10, 0, [60_000] * 30) + _rss(11, 0, [70_000 + i for i in range(30)], "fw2")
    r = inv.memory_bounded(samples, {})
    assert r.passed and "2 processes, worst growth 0.0 MB" in r.summary


def test_memory_bounded_fail_on_growth() -> None:
    samples = _rss(10, 0, [60_000 + i * 5_000 for i in range(30)])
    r = inv.memory_bounded(samples, {"max_growth_mb": 64})
    assert not r.passed and "fw1 filter grew" in r.summary
    assert r.evidence["processes"]["fw1/filter/10"]["growth_mb"] > 64


def test_memory_bounded_peak_bound() -> None:
    samples = _rss(10, 0, [300_000] * 10)
    assert not inv.memory_bounded(samples, {"max_rss_mb": 200}).passed
    assert inv.memory_bounded(samples, {"max_rss_mb": 400}).passed


def test_memory_restarted_process_is_judged_after_warmup() -> None:
    # A process started mid-run loads its modules first: 18 -> 60 MB in 3 s.
    first = _rss(10, 0, [60_000] * 30)
    restarted = _rss(20, 10, [18_000, 40_000, 55_000] + [60_000] * 17)
    assert inv.memory_bounded(first + restarted, {"max_growth_mb": 10, "warmup": 5}).passed
    assert not inv.memory_bounded(first + restarted, {"max_growth_mb": 10, "warmup": 0}).passed


def test_memory_no_samples_fail() -> None:
    assert not inv.memory_bounded([], {}).passed


# --- parameters --------------------------------------------------------------------------


def test_check_params() -> None:
    assert inv.check_params("new_connections", {"min_success": 0.99, "window": 5}) is None
    assert inv.check_params("established_flows", {"max_gap_ms": None}) is None
    assert "unknown invariant" in str(inv.check_params("nope", {}))
    assert "is not bool" in str(inv.check_params("single_vip_holder", {"held_at_end": 1}))
    assert "is not int" in str(inv.check_params("established_flows", {"max_resets": True}))


def test_result_as_dict() -> None:
    r = inv.Result("x", True, "fine", {"a": 1})
    assert r.as_dict() == {"name": "x", "passed": True, "summary": "fine", "evidence": {"a": 1}}
