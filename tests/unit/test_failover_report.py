import csv
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chaos.failover_report import (
    FlowTrace,
    evaluate_flow,
    evaluate_trial,
    percentile,
    plot_cdf,
    ratios,
    report_document,
    summarize,
    write_csv,
    write_json,
)


def steady(start: float, end: float, every: float = 0.001) -> tuple[float, ...]:
    n = round((end - start) / every)
    return tuple(start + i * every for i in range(n + 1))


def test_healthy_flow_is_not_affected():
    trace = FlowTrace("tcp-1", "tcp", steady(9.0, 11.0))
    outcome = evaluate_flow(trace, fault_at=10.0, window_end=12.0)
    assert not outcome.affected and not outcome.lost
    assert outcome.latency is not None and outcome.latency <= 0.0011


def test_stalled_flow_latency_is_first_delivery_after_fault():
    deliveries = steady(9.0, 9.999) + steady(10.250, 11.0)
    outcome = evaluate_flow(FlowTrace("tcp-1", "tcp", deliveries), 10.0, 12.0)
    assert outcome.affected and not outcome.lost
    assert outcome.latency == pytest.approx(0.250)


def test_reset_flow_is_lost_even_if_it_delivered_later():
    deliveries = (*steady(9.0, 9.999), 10.5)
    outcome = evaluate_flow(FlowTrace("tcp-1", "tcp", deliveries, reset_at=10.2), 10.0, 12.0)
    assert outcome.lost and outcome.affected


def test_reset_before_the_fault_is_not_this_trials_loss():
    trace = FlowTrace("tcp-1", "tcp", steady(9.0, 11.0), reset_at=8.0)
    assert not evaluate_flow(trace, 10.0, 12.0).lost


def test_flow_silent_until_window_end_is_lost():
    outcome = evaluate_flow(FlowTrace("tcp-1", "tcp", (*steady(9.0, 9.999), 13.0)), 10.0, 12.0)
    assert outcome.lost and outcome.latency is None


def test_unsorted_trace_is_refused():
    with pytest.raises(ValueError):
        FlowTrace("x", "tcp", (2.0, 1.0))
    with pytest.raises(ValueError):
        FlowTrace("x", "sctp", ())  # type: ignore[arg-type]


def test_trial_latency_is_worst_affected_tcp_flow_and_udp_is_path_restore():
    traces = [
        FlowTrace("tcp-1", "tcp", steady(9.0, 9.999) + steady(10.3, 11.0)),
        FlowTrace("tcp-2", "tcp", steady(9.0, 9.999) + steady(10.7, 11.0)),
        FlowTrace("tcp-3", "tcp", steady(9.0, 11.0)),
        FlowTrace("udp-1", "udp", steady(9.0, 9.999) + steady(10.2, 11.0)),
    ]
    trial = evaluate_trial("stockade", "kill", 1, "fw2", traces, 10.0, 12.0)
    assert trial.latency == pytest.approx(0.7)
    assert trial.path_restore == pytest.approx(0.2)
    assert trial.affected == 3 and trial.lost == 0


def test_trial_without_affected_flows_has_no_latency():
    trial = evaluate_trial("s", "kill", 1, "fw1", [FlowTrace("t", "tcp", steady(9, 11))], 10, 12)
    assert trial.latency is None
    (summary,) = summarize([trial])
    assert summary.trials_without_affected_flow == 1 and summary.p50 is None


def test_window_must_follow_fault():
    with pytest.raises(ValueError):
        evaluate_trial("s", "kill", 1, "fw1", [], 10.0, 10.0)


def test_nearest_rank_percentiles():
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 99) == 20.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1), st.floats(0, 100))
def test_percentile_is_a_member_and_monotone(values, p):
    value = percentile(values, p)
    assert value in values
    assert value <= percentile(values, min(100.0, p + 1)) if value is not None else True


def _trial(system, n, latency):
    traces = [FlowTrace("tcp-1", "tcp", steady(9.0, 9.999) + steady(10 + latency, 11.0))]
    return evaluate_trial(system, "kill", n, "fw1", traces, 10.0, 12.0)


def test_summaries_ratios_and_files(tmp_path):
    results = [_trial("stockade", i, 0.2) for i in range(1, 4)]
    results += [_trial("keepalived-conntrackd", i, 0.8) for i in range(1, 4)]
    summaries = summarize(results)
    assert [s.system for s in summaries] == ["stockade", "keepalived-conntrackd"]
    assert summaries[0].p99 == pytest.approx(0.2)
    r = ratios(summaries, "stockade")
    assert r["keepalived-conntrackd/kill"]["p50"] == pytest.approx(4.0)

    write_csv(results, tmp_path / "trials.csv")
    rows = list(csv.DictReader((tmp_path / "trials.csv").read_text().splitlines()))
    assert len(rows) == 6 and rows[0]["latency_ms"] == "200.0"

    document = report_document(results, {"trials": 3})
    write_json(document, tmp_path / "report.json")
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["trials"][0]["flows"][0]["affected"] is True
    assert "ratios_to_stockade" in loaded

    plot_cdf(results, tmp_path / "cdf.png", "test")
    assert (tmp_path / "cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
