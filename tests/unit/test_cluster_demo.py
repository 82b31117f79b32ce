from chaos.cluster_demo import demo_outcome, report_text


def summary(gaps, resets=0, connections=8):
    return {
        "long_lived": {"connections": connections, "resets": resets},
        "gap_events": gaps,
        "churn": {"ok": 10, "failed": 0},
        "udp": {"ok": 5, "failed": 0},
        "ping": {"ok": 3, "failed": 0},
    }


def gap(conn, start, end):
    return {"conn": conn, "start": start, "end": end, "gap_ms": None}


def test_stalls_spanning_the_fault_are_the_dead_nodes_connections():
    gaps = [gap(1, 99.99, 100.21), gap(2, 100.03, 100.40), gap(3, 50.0, 50.2)]
    outcome = demo_outcome(summary(gaps), fault_at=100.0)
    assert (outcome.affected, outcome.resumed, outcome.unrelated_stalls) == (2, 2, 1)
    assert [round(s, 3) for s in outcome.stalls] == [0.21, 0.4]
    assert outcome.clean


def test_a_connection_that_never_came_back_or_was_reset_is_not_clean():
    outcome = demo_outcome(summary([gap(1, 99.99, None)]), fault_at=100.0)
    assert outcome.affected == 1 and outcome.resumed == 0 and not outcome.clean
    assert not demo_outcome(summary([], resets=1), 100.0).clean


def test_report_names_the_victim_and_the_verdict():
    s = summary([gap(1, 99.99, 100.25)])
    text = report_text(demo_outcome(s, 100.0), s, "fw2")
    assert "through fw2: 1, resumed: 1, reset: 0" in text
    assert "p50 250 ms" in text and "no connection lost" in text
