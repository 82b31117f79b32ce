"""`stockade lab up --prometheus`: a real Prometheus scrapes every node of a
clustered lab (filter and syncd + agent endpoints) and loads the shipped
alert rules; the cluster and rules metrics carry the values the cluster has."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.lab.build import LabNames, lab_namespaces
from chaos.lab.prometheus import api

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not Path("/usr/bin/etcd").exists(), reason="needs etcd"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus"),
]

BASE = "10.234"
URL = f"http://{BASE}.30.2:9090"


def _lab(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "node.cli", "lab", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = f"p{os.getpid() % 100000}"
    try:
        yield name
    finally:
        _lab("down", "--name", name)
        assert not lab_namespaces(LabNames(name))


def query(promql: str) -> dict[str, float]:
    data: Any = api(URL, "query?" + urllib.parse.urlencode({"query": promql}))
    return {r["metric"].get("node", ""): float(r["value"][1]) for r in data["result"]}


def eventually(promql: str, want: dict[str, float], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, float] = {}
    while time.monotonic() < deadline:
        seen = query(promql)
        if seen == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql}: {seen}, want {want}")


def test_lab_prometheus_scrapes_every_node_and_loads_the_alert_rules(lab_name: str) -> None:
    up = _lab("up", "--name", lab_name, "--nodes", "2", "--base", BASE, "--prometheus")
    assert up.returncode == 0, up.stderr + up.stdout
    assert f"prometheus {URL}" in up.stdout

    targets = api(URL, "targets")["activeTargets"]
    assert sorted(t["labels"]["job"] for t in targets if t["health"] == "up") == [
        "stockade-node", "stockade-node", "stockade-syncd", "stockade-syncd",
    ]  # fmt: skip
    groups = {g["name"]: len(g["rules"]) for g in api(URL, "rules")["groups"]}
    assert groups.get("stockade-cluster", 0) >= 9 and groups.get("stockade-node", 0) >= 1

    both = {"fw1": 1.0, "fw2": 1.0}
    eventually('stockade_cluster_state{state="up"}', both)
    eventually("stockade_cluster_vips_held", {"fw1": 2.0, "fw2": 2.0})
    eventually("stockade_rules_revision", both)  # the lab stores its rules in etcd
    eventually("stockade_synclink_synced", both)
    assert api(URL, "alerts")["alerts"] == []  # a healthy lab fires nothing
