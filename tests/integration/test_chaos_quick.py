"""`stockade chaos run --quick` end to end on a real lab (root, etcd, namespaces).

Two scenarios, about 60 s together: ``rules-push`` (nothing moves; every
invariant must pass) and ``node-killed`` (SIGKILL, failover, restart).  For
the kill the machinery is checked against what really happened: the step
ran, the sampler saw the node's VIPs leave it and come back, each VIP had
exactly one holder throughout, the replicas agreed, memory stayed bounded.
Uses its own lab name and ``--base 10.236``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.lab.build import LabNames, lab_namespaces
from chaos.runner import RunOptions, run_scenario
from chaos.scenario import find_scenario

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not Path("/usr/bin/etcd").exists(), reason="needs etcd"),
]

BASE = "10.236"


def _name() -> str:
    return f"q{os.getpid() % 10000}"


def test_cli_rules_push_quick_passes(tmp_path: Path) -> None:
    name = _name()
    argv = [sys.executable, "-m", "node.cli", "chaos", "run", "rules-push", "--quick"]
    argv += ["--report", str(tmp_path), "--base", BASE, "--name", name]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    finally:
        assert not lab_namespaces(LabNames(name)), "the lab was not removed"
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "rules-push.json").read_text())
    assert report["passed"] and report["quick"]
    assert [s["do"] for s in report["steps"]] == ["rules-push", "rules-push"]
    assert all(s["ok"] for s in report["steps"])
    assert set(report["invariants"]) == {
        "established_flows", "new_connections", "replicas_converge",
        "single_vip_holder", "memory_bounded",
    }  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0].startswith("rules-push (quick): PASS")
    assert sum(line.startswith("  PASS ") for line in lines) == 5
    # The samplers really ran: ~10 ms VIP samples, etcd claims, RSS of 6 processes.
    vip = report["invariants"]["single_vip_holder"]["evidence"]
    assert vip["sample_interval_ms"] < 30
    assert report["samplers"]["ClaimSampler"]["samples"] > 100
    assert len(report["invariants"]["memory_bounded"]["evidence"]["processes"]) == 6
    assert json.loads((tmp_path / "summary.json").read_text()) == {"rules-push": "PASS"}


def _explain(report: dict[str, object], invariant: str) -> str:
    """What CI prints when an invariant fails: its summary, its evidence, the
    steps and failover events (the report file itself is gone with tmp_path)."""
    inv = report["invariants"]
    assert isinstance(inv, dict)
    keep = {k: report.get(k) for k in ("steps", "failovers", "events")}
    return json.dumps({"invariant": inv[invariant], **keep}, indent=1, default=str)[:20000]


def test_node_killed_quick(tmp_path: Path) -> None:
    name = _name()
    scenario = find_scenario("node-killed").scaled()
    options = RunOptions(lab=name, base=BASE, report_dir=tmp_path)
    try:
        report = run_scenario(scenario, options, log=lambda m: None)
    finally:
        assert not lab_namespaces(LabNames(name)), "the lab was not removed"
    assert [(s["do"], s["node"], s["ok"]) for s in report["steps"]] == [
        ("kill", "fw2", True),
        ("start", "fw2", True),
    ]
    inv = report["invariants"]
    for must in ("single_vip_holder", "replicas_converge", "memory_bounded"):
        assert inv[must]["passed"], _explain(report, must)
    # The killed node's processes are gone from the RSS samples, the new ones appear.
    procs = inv["memory_bounded"]["evidence"]["processes"]
    assert len([p for p in procs if p.startswith("fw2/filter/")]) == 2
    if report["lab"]["mode"] == "cluster":
        # Its VIPs were taken over (one failover event per VIP side), then came home.
        taken = " ".join(f["detail"] for f in report["failovers"])
        assert f"{BASE}.10.102" in taken and f"{BASE}.20.102" in taken
        unheld = inv["single_vip_holder"]["evidence"]["longest_unheld_ms"]
        assert 0 < unheld[f"{BASE}.10.102"] < 5000
        assert inv["single_vip_holder"]["evidence"]["holders_at_end"][f"{BASE}.10.102"] == ["fw2"]
    # Traffic ran through the kill; the verdicts are in the report either way.
    assert report["traffic"]["long_lived"]["echoed"] > 1000
    assert "passed" in inv["established_flows"] and "passed" in inv["new_connections"]
    assert (tmp_path / "node-killed.json").exists()
