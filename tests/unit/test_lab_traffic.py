"""The traffic driver's pure bookkeeping: gaps, resets, summaries."""

from __future__ import annotations

import json

import pytest

from chaos.traffic_stats import (
    LongLived,
    RequestStats,
    human_summary,
    percentile,
    progress_line,
    run_summary,
)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_gap_events_record_monotonic_times() -> None:
    c = LongLived(0, started=100.0)
    c.on_connected(100.0)
    assert c.on_echo(16, 100.0, 100.001) is None
    assert c.on_echo(16, 100.001, 100.05) is None  # 49 ms: not a stall
    event = c.on_echo(16, 100.06, 100.35)
    assert event is not None
    assert (event.conn, event.start, event.end) == (0, 100.05, 100.35)
    assert event.gap_ms == pytest.approx(300.0)
    assert c.longest_gap == pytest.approx(0.3)


def test_stall_open_at_the_end_is_reported_without_end() -> None:
    c = LongLived(1, started=0.0)
    c.on_connected(0.0)
    c.on_echo(16, 0.0, 0.01)
    c.finish(0.5)
    assert [(g.start, g.end) for g in c.gaps] == [(0.01, None)]


def test_reset_then_reconnect_restarts_the_gap_clock() -> None:
    c = LongLived(2, started=0.0)
    c.on_connected(0.0)
    c.on_echo(16, 0.0, 0.001)
    c.on_lost(0.002, reset=True)
    c.on_lost(0.1, reset=False)  # the next connect fails
    c.on_connected(1.0)
    assert c.on_echo(16, 1.0, 1.01) is None  # measured from the reconnect
    assert (c.resets, c.connect_failures) == (1, 1)


def test_summary_clean_and_not() -> None:
    c = LongLived(0, started=0.0)
    c.on_connected(0.0)
    c.on_sent(16)
    c.on_echo(16, 0.0, 0.001)
    churn = RequestStats("churn")
    churn.on_ok(0.002)
    s = run_summary(0.0, 1.0, [c], [churn], {"seconds": 1})
    assert s["clean"] and s["long_lived"]["echoed"] == 1
    json.dumps(s)  # JSON-ready
    assert "clean" in human_summary(s)
    churn.on_failed("timeout")
    s = run_summary(0.0, 1.0, [c], [churn], {})
    assert not s["clean"] and s["churn"]["errors"] == {"timeout": 1}
    assert "timeout 1" in human_summary(s)


def test_connection_without_echoes_is_not_clean() -> None:
    c = LongLived(0, started=0.0)
    s = run_summary(0.0, 1.0, [c], [], {})
    assert not s["clean"]


def test_progress_line() -> None:
    c = LongLived(0, started=0.0)
    c.on_connected(0.0)
    c.on_echo(16, 0.0, 0.001)
    line = progress_line(1.0, [c], [RequestStats("udp")], now=1.0)
    assert "long-lived 1/1 up" in line and "udp 0 ok 0 failed" in line
    assert "max gap 999 ms" in line  # the open gap counts while it runs
