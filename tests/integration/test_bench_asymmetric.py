"""``stockade bench asymmetric`` end to end on a real 3-node namespace lab:
one short run per routing mode (about 40 s).  The documented run (3
repeats of 20 s) is in docs/asymmetric.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.lab.build import LabNames, lab_namespaces

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

BASE = "10.235"  # no other test's lab


def _cli(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "node.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_one_run_per_routing_mode_reports_the_crossing_and_the_holds(tmp_path: Path) -> None:
    name = f"a{os.getpid() % 100000}"
    report = tmp_path / "report"
    try:
        done = _cli(
            "bench", "asymmetric", "--repeat", "1", "--seconds", "3", "--warmup", "1",
            "--rate", "20", "--udp-rate", "20", "--long-lived", "0", "--ecmp-flows", "32",
            "--report", str(report), "--lab-name", name, "--base", BASE,
        )  # fmt: skip
    finally:
        _cli("lab", "down", "--name", name)
    assert not lab_namespaces(LabNames(name))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    doc = json.loads((report / "report.json").read_text())
    sym, asym = doc["summary"]["symmetric"], doc["summary"]["asymmetric"]
    # The lab really routes as it says: no flow crosses two nodes in the
    # symmetric run, every flow does in the asymmetric one.
    assert sym["asymmetric_fraction"] == 0.0 and asym["asymmetric_fraction"] == 1.0
    # Only the asymmetric run holds anything, and its holds were released by
    # replicas (nearly every TCP connection's SYN-ACK at least).
    assert sym["hold"]["held"] == 0
    assert asym["hold"]["released"] >= asym["churn"]["ok"] // 2 > 0
    assert asym["hold"]["wait_p50_ms"] is not None
    for side in (sym, asym):
        assert side["churn"]["ok"] + side["churn"]["failed"] >= 50
    assert "added delay of asymmetric routing" in (report / "summary.txt").read_text()
    runs = json.loads((report / "runs.json").read_text())
    assert [r["routing"] for r in runs] == ["symmetric", "asymmetric"]
