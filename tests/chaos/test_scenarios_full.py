"""Every shipped chaos scenario at full length; each must pass (``-m chaos``, root, etcd).

About 50-80 s per scenario (lab up, load, convergence, lab down).  Reports
go to ``$STOCKADE_CHAOS_REPORT`` if set (a directory), else to a temporary
one; a failure prints the scenario's summary with its evidence line by line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chaos.lab.build import LabNames, lab_namespaces
from chaos.runner import RunOptions, run_scenario, summary_lines
from chaos.scenario import scenario_files

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not Path("/usr/bin/etcd").exists(), reason="needs etcd"),
]


@pytest.mark.parametrize("path", scenario_files(), ids=lambda p: p.stem)
def test_scenario(path: Path, tmp_path: Path) -> None:
    from chaos.scenario import load_scenario

    scenario = load_scenario(path)
    report_dir = Path(os.environ.get("STOCKADE_CHAOS_REPORT") or tmp_path)
    report_dir.mkdir(parents=True, exist_ok=True)
    name = f"c{os.getpid() % 10000}"
    options = RunOptions(lab=name, base="10.233", report_dir=report_dir)
    try:
        report = run_scenario(scenario, options, log=lambda m: None)
    finally:
        assert not lab_namespaces(LabNames(name)), "the lab was not removed"
    assert report["passed"], "\n".join(summary_lines(report))
