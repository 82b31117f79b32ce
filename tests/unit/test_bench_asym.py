"""chaos.bench.asym: the arithmetic of ``stockade bench asymmetric``."""

from __future__ import annotations

import pytest

from chaos.bench.asym import HoldDelta, RoutingRun, merge_holds, summarize, summary_text
from chaos.bench_asymmetric import AsymSettings, schedule

BOUNDS = [1.0, 2.0, 4.0]


def hold_stats(held: int, released: int, expired: int, counts: list[int]) -> dict:
    return {
        "held_total": held, "released_by_replica_total": released, "expired_total": expired,
        "overflow_total": 0, "latency_bounds_ms": BOUNDS, "latency_counts": counts,
    }  # fmt: skip


def traffic(ok: int, failed: int, p50: float, p99: float) -> dict:
    churn = {"ok": ok, "failed": failed, "latency_p50_ms": p50, "latency_p99_ms": p99}
    return {"churn": churn, "udp": {"ok": 10, "failed": 0}, "long_lived": {"resets": 0}}


def test_a_hold_delta_is_what_happened_between_two_snapshots():
    d = HoldDelta.between(hold_stats(5, 4, 1, [1, 2, 1, 0]), hold_stats(15, 13, 2, [1, 10, 2, 0]))
    assert (d.held, d.released, d.expired, d.overflow) == (10, 9, 1, 0)
    assert d.counts == (0, 8, 1, 0)
    assert d.quantile_ms(0.5) is not None and 1.0 < d.quantile_ms(0.5) <= 2.0


def test_a_hold_delta_refuses_counters_that_went_backwards():
    with pytest.raises(ValueError, match="backwards"):
        HoldDelta.between(hold_stats(5, 4, 1, [1, 2, 1, 0]), hold_stats(1, 0, 0, [0, 0, 0, 0]))


def test_holds_of_several_nodes_add_up_bucket_by_bucket():
    a = HoldDelta(2, 2, 0, 0, (1.0, 2.0), (1, 1, 0))
    b = HoldDelta(3, 2, 1, 0, (1.0, 2.0), (0, 2, 0))
    m = merge_holds([a, b])
    assert m == HoldDelta(5, 4, 1, 0, (1.0, 2.0), (1, 3, 0))
    assert merge_holds([]) is None
    with pytest.raises(ValueError, match="different bounds"):
        merge_holds([a, HoldDelta(0, 0, 0, 0, (1.0, 3.0), (0, 0, 0))])


def test_the_added_delay_is_the_difference_of_the_medians_over_runs():
    hold = HoldDelta(30, 30, 0, 0, (1.0, 2.0, 4.0), (0, 10, 20, 0))
    runs = [
        RoutingRun("symmetric", 0, traffic(100, 0, 2.0, 5.0), None, 0.0),
        RoutingRun("symmetric", 1, traffic(100, 0, 4.0, 9.0), None, 0.0),
        RoutingRun("symmetric", 2, traffic(100, 0, 3.0, 7.0), None, 0.0),
        RoutingRun("asymmetric", 0, traffic(99, 1, 8.0, 20.0), hold, 1.0),
        RoutingRun("asymmetric", 1, traffic(100, 0, 6.0, 30.0), hold, 1.0),
    ]
    s = summarize(runs)
    assert s["symmetric"]["churn"]["p50_ms"] == 3.0 and s["symmetric"]["churn"]["p99_ms"] == 7.0
    assert s["asymmetric"]["churn"]["p50_ms"] == 7.0 and s["asymmetric"]["churn"]["p99_ms"] == 25.0
    assert s["added_delay_ms"] == {"p50": 4.0, "p99": 18.0}
    assert s["asymmetric"]["churn"]["success"] == pytest.approx(199 / 200)
    assert s["asymmetric"]["hold"]["held"] == 60 and s["symmetric"]["hold"] is None
    assert 2.0 < s["asymmetric"]["hold"]["wait_p50_ms"] <= 4.0
    text = summary_text(s)
    assert "added delay of asymmetric routing (median over runs): p50 4.00 ms, p99 18.00 ms" in text
    assert "99.50%" in text


def test_a_summary_without_runs_of_one_mode_says_so_rather_than_inventing_figures():
    s = summarize([RoutingRun("asymmetric", 0, traffic(10, 0, 8.0, 9.0), None, 1.0)])
    assert s["symmetric"]["runs"] == 0 and s["symmetric"]["churn"]["p50_ms"] is None
    assert s["added_delay_ms"] == {"p50": None, "p99": None}
    assert "p50 - ms, p99 - ms" in summary_text(s)
    with pytest.raises(ValueError, match="unknown routing"):
        summarize([RoutingRun("sideways", 0, traffic(1, 0, 1.0, 1.0), None, None)])


def test_the_order_of_the_modes_alternates_between_repeats():
    assert schedule(3) == [
        (0, "symmetric"), (0, "asymmetric"), (1, "asymmetric"), (1, "symmetric"),
        (2, "symmetric"), (2, "asymmetric"),
    ]  # fmt: skip


def test_settings_refuse_a_one_node_lab_and_empty_runs():
    with pytest.raises(ValueError, match="nodes"):
        AsymSettings(nodes=1)
    with pytest.raises(ValueError, match="repeat"):
        AsymSettings(repeat=0)
