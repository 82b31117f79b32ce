"""A real Prometheus scrapes a real node and loads the alert rules; the flow log on disk.

Prometheus (Debian package ``prometheus``) runs in the fw namespace beside
the node, scrapes it every second and evaluates ops/prometheus/alerts.yml;
the test reads its HTTP API from inside that namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import pytest
import yaml

from tests.integration.netns import REPO, SERVER4, Topology

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
ALERTS = os.path.join(REPO, "ops", "prometheus", "alerts.yml")
ALERT_NAMES = {
    "StockadeFlowTableHighUsage",
    "StockadeFlowTableRefusingFlows",
    "StockadeKernelQueueDrops",
    "StockadeEngineErrors",
    "StockadeNodeDown",
    "StockadeRulesetDrift",
}
METRICS = "127.0.0.1:9641"
PROMETHEUS_WEB = "127.0.0.1:9090"
WAIT = 20.0  # seconds for Prometheus to start, scrape and evaluate
# Runs inside the namespace: print one API answer (Prometheus listens on its loopback).
_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())"  # noqa: E501


def api(topo: Topology, path: str, **params: str) -> dict[str, Any] | None:
    """Prometheus's answer to ``GET /api/v1/<path>`` (None while it does not answer)."""
    url = f"http://{PROMETHEUS_WEB}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    done = topo.exec(topo.fw, [sys.executable, "-c", _GET, url], timeout=10, check=False)
    if done.returncode != 0:
        return None
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer["data"] if answer.get("status") == "success" else None


def query(topo: Topology, promql: str) -> dict[str, float]:
    """Instant query: {node label: value} of the result vector."""
    data = api(topo, "query", query=promql)
    if data is None:
        return {}
    return {r["metric"].get("node", ""): float(r["value"][1]) for r in data["result"]}


def wait_for(what: str, check: Any, proc: subprocess.Popen[str], log_path: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-3000:]
    raise AssertionError(f"timed out waiting for {what}; prometheus log:\n{tail}")


def start_prometheus(topo: Topology, workdir: str) -> tuple[subprocess.Popen[str], str]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [ALERTS],
        "scrape_configs": [
            {"job_name": "stockade-node", "static_configs": [{"targets": [METRICS]}]}
        ],
    }
    config_path = os.path.join(workdir, "prometheus.yml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    log_path = os.path.join(workdir, "prometheus.log")
    assert PROMETHEUS is not None
    argv = [
        PROMETHEUS,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
        f"--web.listen-address={PROMETHEUS_WEB}",
    ]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = topo.popen(topo.fw, argv, stdout=subprocess.DEVNULL, stderr=log)
    return proc, log_path


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_prometheus_scrapes_the_node_and_loads_the_alert_rules(topo, start_node, tmp_path):
    start_node(config={"metrics": {"listen": METRICS}})
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"
    proc, log_path = start_prometheus(topo, str(tmp_path))
    try:
        entries = wait_for(
            "stockade_flow_table_entries of fw1",
            lambda: query(topo, 'stockade_flow_table_entries{job="stockade-node"}'),
            proc,
            log_path,
        )
        assert entries == {"fw1": 1.0}
        assert query(topo, "stockade_flows_created_total") == {"fw1": 1.0}
        assert query(topo, 'stockade_rule_hits_total{rule="web"}') == {"fw1": 1.0}
        assert query(topo, "stockade_dataplane_installed") == {"fw1": 1.0}
        assert query(topo, "process_resident_memory_bytes")["fw1"] > 0
        assert query(topo, 'up{job="stockade-node"}') == {"": 1.0}

        def rules_evaluated() -> dict[str, str] | None:
            data = api(topo, "rules")
            if data is None:
                return None
            health = {r["name"]: r["health"] for g in data["groups"] for r in g["rules"]}
            return (
                health if set(health) == ALERT_NAMES and "unknown" not in health.values() else None
            )

        health = wait_for("the alert rules to be evaluated", rules_evaluated, proc, log_path)
        assert set(health.values()) == {"ok"}, health
        firing = api(topo, "alerts")
        assert firing is not None and firing["alerts"] == []  # a healthy node: nothing fires
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # `ip netns exec` execs: the PID is Prometheus's
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def test_flow_log_records_creations_and_denies(topo, start_node):
    node = start_node(config={"flow_log": {"path": "flows.jsonl"}})
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "25")
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "25", "3").startswith("refused")
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "22", "0.5") == "timeout"
    assert node.stop() == 0  # the last lines are written on the way out
    with open(os.path.join(node.workdir, "flows.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert all(line["node"] == "fw1" and line["ts"].endswith("+00:00") for line in lines)
    creates = [
        (x["proto"], x["dst"], x["dport"], x["rule"]) for x in lines if x["event"] == "create"
    ]
    assert creates == [("tcp", SERVER4, 8080, "web")]
    denies = {(x["dport"], x["verdict"], x["rule"]) for x in lines if x["event"] == "deny"}
    # The unanswered SYN to port 22 is retransmitted: one deny line per SYN seen.
    assert denies == {(25, "reject", "no-smtp"), (22, "drop", "default")}
    deny = next(x for x in lines if x["event"] == "deny" and x["dport"] == 25)
    assert (deny["in_iface"], deny["out_iface"]) == ("cl0", "sv0")
