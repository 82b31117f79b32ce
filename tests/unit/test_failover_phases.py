"""The survivors' account of a failover trial (chaos.failover_phases), and its place
in the bench's files."""

from __future__ import annotations

import csv
import dataclasses
import json

from chaos.bench.runner import describe_phases
from chaos.failover_phases import Phases, failover_phases
from chaos.failover_report import FlowTrace, evaluate_trial, report_document, write_csv
from tests.unit.test_failover_report import steady

FAULT = 1000.0


def ev(kind: str, node: str, detail: str, after_ms: float) -> dict[str, object]:
    return {"kind": kind, "node": node, "detail": detail, "ts": FAULT + after_ms / 1000}


def test_a_failover_read_from_the_survivors_events() -> None:
    events = [
        ev("suspect", "fw3", "fw2 silent", 104),
        ev("suspect", "fw1", "fw2 silent", 103),
        ev("revoked", "fw1", "fw2 epoch 4", 121),
        ev("vip-acquired", "fw3", "10.0.10.102 (from fw2)", 150),
        ev("vip-acquired", "fw1", "10.0.20.102 (from fw2)", 161),
        ev("failover", "fw3", "fw2: 10.0.10.102 of 1 VIPs", 150),
    ]
    phases = failover_phases(events, "fw2", FAULT, 5.0)
    assert phases.suspected is not None and round(phases.suspected * 1000) == 103
    assert phases.revoked is not None and round(phases.revoked * 1000) == 121
    assert phases.claimed is not None and round(phases.claimed * 1000) == 161
    assert phases.vips_claimed == 2
    assert describe_phases(phases) == " (agents: suspected +103, revoked +121, claimed +161 ms)"


def test_other_nodes_events_before_the_fault_and_junk_are_ignored() -> None:
    events = [
        ev("suspect", "fw1", "fw2 silent", -500),  # an earlier trial
        ev("revoked", "fw1", "fw2 epoch 1", 6000),  # after the observation: the recovery
        ev("suspect", "fw1", "fw3 silent", 90),  # another node
        ev("suspect", "fw2", "fw1 silent", 95),  # the victim's own view
        ev("vip-acquired", "fw1", "10.0.10.101", 120),  # a plain placement
        ev("vip-acquired", "fw1", "10.0.10.103 (from fw3)", 130),
        {"kind": "suspect", "node": "fw1"},  # no detail
        {"kind": "revoked", "node": "fw1", "detail": "fw2 epoch 1", "ts": "soon"},
    ]
    phases = failover_phases(events, "fw2", FAULT, 5.0)
    assert phases == Phases(None, None, None, 0)
    assert describe_phases(phases) == " (agents: no events)"
    assert describe_phases(None) == ""


def test_a_vip_that_moved_on_again_counts_at_its_first_acquisition() -> None:
    events = [
        ev("vip-acquired", "fw3", "10.0.10.102 (from fw2)", 150),
        ev("vip-acquired", "fw1", "10.0.10.102 (from fw2)", 900),
    ]
    phases = failover_phases(events, "fw2", FAULT, 5.0)
    assert phases.claimed is not None and round(phases.claimed * 1000) == 150
    assert phases.vips_claimed == 1


def test_phases_reach_the_csv_and_the_json(tmp_path) -> None:
    traces = [FlowTrace("tcp-1", "tcp", steady(9.0, 9.999) + steady(10.2, 11.0))]
    plain = evaluate_trial("stockade", "kill", 1, "fw1", traces, 10.0, 12.0)
    with_phases = dataclasses.replace(plain, phases=Phases(0.1, 0.12, 0.16, 2))
    write_csv([with_phases, plain], tmp_path / "trials.csv")
    rows = list(csv.DictReader((tmp_path / "trials.csv").read_text().splitlines()))
    assert [rows[0]["suspected_ms"], rows[0]["revoked_ms"], rows[0]["claimed_ms"]] == [
        "100.0",
        "120.0",
        "160.0",
    ]
    assert rows[1]["claimed_ms"] == ""
    document = json.loads(json.dumps(report_document([with_phases, plain], {})))
    assert document["trials"][0]["phases"]["vips_claimed"] == 2
    assert document["trials"][1]["phases"] is None
