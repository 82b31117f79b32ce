"""ops/: the cluster alert rules (promtool unit tests) and the Grafana dashboard.

Every expression in ``ops/prometheus/cluster-alerts.yml`` and
``ops/grafana/stockade.json`` may only use metric names listed in
docs/metrics.md: that page is the contract with the exporters.  That the
``stockade_sync_*`` names (and their labels) are really exported is checked
against syncd's exporter in tests/unit/test_sync_metrics.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_ALERTS = os.path.join(REPO, "ops", "prometheus", "cluster-alerts.yml")
PROMETHEUS_YML = os.path.join(REPO, "ops", "prometheus", "prometheus.yml")
DASHBOARD = os.path.join(REPO, "ops", "grafana", "stockade.json")
METRICS_DOC = os.path.join(REPO, "docs", "metrics.md")
RUNBOOKS = os.path.join(REPO, "docs", "runbooks")
PROMTOOL = shutil.which("promtool") or "promtool"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
# Metric-looking tokens in PromQL: ours and the standard ones we document.
_NAME = re.compile(r"\b((?:stockade|process)_[a-z0-9_]+|up)\b(?!\s*\()")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def documented() -> set[str]:
    with open(METRICS_DOC, encoding="utf-8") as f:
        text = f.read()
    names = set(re.findall(r"`((?:stockade|process)_[a-z0-9_]+)`", text))
    return names | {"up"}


def used_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    expr = re.sub(r"\{[^}]*\}", "", expr)  # nor label names
    expr = re.sub(r"\b(?:by|on|ignoring|without|group_left|group_right)\s*\([^)]*\)", "", expr)
    out = set()
    for name in _NAME.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in documented():
                name = name[: -len(suffix)]
        out.add(name)
    return out


def alert_rules() -> list[dict[str, Any]]:
    with open(CLUSTER_ALERTS, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_the_name_extractor_sees_names_and_skips_labels_and_functions():
    expr = ('histogram_quantile(0.99, sum by (node, origin, le) '
            '(rate(stockade_sync_lag_seconds_bucket{origin="stockade_x"}[5m]))) > 0.1 '
            "and on (node) up == 1")  # fmt: skip
    assert used_names(expr) == {"stockade_sync_lag_seconds", "up"}
    assert used_names("stockade_made_up_total") == {"stockade_made_up_total"}


def test_alert_expressions_use_only_documented_metrics():
    known = documented()
    for rule in alert_rules():
        unknown = used_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} uses undocumented {sorted(unknown)}"


def test_every_alert_names_an_existing_runbook():
    for rule in alert_rules():
        found = re.findall(r"docs/runbooks/([a-z-]+\.md)", rule["annotations"]["description"])
        assert found, f"{rule['alert']} names no runbook"
        for name in found:
            assert os.path.exists(os.path.join(RUNBOOKS, name)), name


def test_dashboard_parses_has_three_rows_and_uses_only_documented_metrics():
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    rows = [p["title"].split(":")[0] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Executive", "On-call", "Debug"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    known = documented()
    for expr in exprs:
        names = used_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"undocumented {sorted(names - known)} in {expr!r}"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24


@needs_promtool
def test_promtool_accepts_the_cluster_rules_and_the_config():
    for argv in (["check", "rules", CLUSTER_ALERTS], ["check", "config", PROMETHEUS_YML]):
        done = subprocess.run([PROMTOOL, *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


def _s(name: str, values: str, **labels: str) -> dict[str, str]:
    node = labels.get("node")
    base = {"job": "stockade-syncd", **({"instance": f"{node}:9642"} if node else {})}
    text = ",".join(f'{k}="{v}"' for k, v in sorted({**base, **labels}.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def _a(at: str, name: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": ls} for ls in label_sets],
    }


def _node(node: str, severity: str, **more: str) -> dict[str, str]:
    return {"node": node, "instance": f"{node}:9642", "job": "stockade-syncd",
            "severity": severity, **more}  # fmt: skip


def _lag(node: str, origin: str, slow: bool) -> list[dict[str, str]]:
    """10 deltas a minute; fw1 <- fw2 land between 100 and 200 ms, the rest under 50 ms."""
    fast = "0x30" if slow else "0+10x30"
    name = "stockade_sync_lag_seconds_bucket"
    return [_s(name, fast, node=node, origin=origin, le="0.05"),
            _s(name, "0+10x30", node=node, origin=origin, le="0.2"),
            _s(name, "0+10x30", node=node, origin=origin, le="+Inf")]  # fmt: skip


def _syncd_down(instance: str) -> dict[str, str]:
    return {"job": "stockade-syncd", "instance": instance, "severity": "critical"}


CASES: dict[str, Any] = {
    "interval": "1m",
    "input_series": [
        *_lag("fw1", "fw2", slow=True),
        *_lag("fw2", "fw1", slow=False),
        # fw1 loses its session with fw2 at minute 2.
        _s("stockade_sync_peer_up", "1 1 0x20", node="fw1", peer="fw2"),
        _s("stockade_sync_peer_up", "1x22", node="fw2", peer="fw1"),
        # fw1's beacon thread dies at minute 1.
        _s("stockade_sync_beacon_thread_running", "1 0x20", node="fw1"),
        _s("stockade_sync_beacon_thread_running", "1x20", node="fw2"),
        # fw3's syncd stops answering scrapes at minute 1.
        _s("up", "1x20", job="stockade-syncd", instance="fw1:9642"),
        _s("up", "1 0x20", job="stockade-syncd", instance="fw3:9642"),
        # rules/current is 4; fw2 still runs 3.
        _s("stockade_rules_revision", "4x20", node="fw1"),
        _s("stockade_rules_current_revision", "4x20", node="fw1"),
        _s("stockade_rules_revision", "3x20", node="fw2"),
        _s("stockade_rules_current_revision", "3x20", node="fw2"),
        # 10.10.0.101 held by fw1, and by fw2 too from minute 2.
        _s("stockade_cluster_vip_holder", "1x20", node="fw1", vip="10.10.0.101"),
        _s("stockade_cluster_vip_holder", "_ _ 1x20", node="fw2", vip="10.10.0.101"),
        _s("stockade_cluster_vip_holder", "1x20", node="fw2", vip="10.10.0.102"),
        # fw2 fenced at minute 2; fw3 syncing all along.
        _s("stockade_cluster_state", "1x20", node="fw1", state="up"),
        _s("stockade_cluster_state", "0x20", node="fw1", state="fenced"),
        _s("stockade_cluster_state", "0 0 1x20", node="fw2", state="fenced"),
        _s("stockade_cluster_state", "1x20", node="fw3", state="syncing"),
        _s("stockade_cluster_state", "0x20", node="fw3", state="joining"),
        _s("stockade_cluster_state", "0x20", node="fw1", state="syncing"),
        # A pool of 4: fw1 holds 2, fw2 drops from 2 to 1 at minute 2.
        _s("stockade_cluster_vips_configured", "4x20", node="fw1"),
        _s("stockade_cluster_vips_configured", "4x20", node="fw2"),
        _s("stockade_cluster_vips_held", "2x20", node="fw1"),
        _s("stockade_cluster_vips_held", "2 2 1x20", node="fw2"),
        # fw1 fails over in more than 300 ms at minute 2; fw2 within it.
        _s("stockade_cluster_failover_duration_seconds_count", "0 0 1x20", node="fw1"),
        _s("stockade_cluster_failover_duration_seconds_bucket", "0x22", node="fw1", le="0.3"),
        _s("stockade_cluster_failover_duration_seconds_count", "0 0 1x20", node="fw2"),
        _s("stockade_cluster_failover_duration_seconds_bucket", "0 0 1x20", node="fw2", le="0.3"),
        # fw2 loses etcd at minute 1.
        _s("stockade_cluster_etcd_degraded", "0x20", node="fw1"),
        _s("stockade_cluster_etcd_degraded", "0 1x20", node="fw2"),
    ],
    "alert_rule_test": [
        _a("3m", "StockadeSyncLagHigh"),  # pending: not yet 5 minutes
        _a("10m", "StockadeSyncLagHigh", {"node": "fw1", "origin": "fw2", "severity": "warning"}),
        _a("2m", "StockadeSyncPeerDown"),
        _a("4m", "StockadeSyncPeerDown", _node("fw1", "critical", peer="fw2")),
        _a("1m", "StockadeBeaconThreadDown"),  # pending for 30 s
        _a("2m", "StockadeBeaconThreadDown", _node("fw1", "critical")),
        _a("1m", "StockadeSyncdDown"),
        _a("3m", "StockadeSyncdDown", _syncd_down("fw3:9642")),
        _a("3m", "StockadeClusterRulesDrift"),
        _a("6m", "StockadeClusterRulesDrift", _node("fw2", "warning")),
        _a("1m", "StockadeVipSplitBrain"),
        _a("2m", "StockadeVipSplitBrain"),  # pending for 30 s
        _a("3m", "StockadeVipSplitBrain", {"vip": "10.10.0.101", "severity": "critical"}),
        _a("1m", "StockadeNodeFenced"),
        _a("2m", "StockadeNodeFenced", _node("fw2", "critical", state="fenced")),
        _a("2m", "StockadeVipUnheld"),  # pending
        _a("4m", "StockadeVipUnheld", {"severity": "critical"}),
        _a("1m", "StockadeFailoverSlow"),
        _a("3m", "StockadeFailoverSlow", _node("fw1", "warning")),
        _a("15m", "StockadeFailoverSlow"),  # 10 minutes without a slow one
        _a("4m", "StockadeResyncStuck"),
        _a("6m", "StockadeResyncStuck", _node("fw3", "warning")),
        _a("1m", "StockadeEtcdDegraded"),
        _a("3m", "StockadeEtcdDegraded", _node("fw2", "warning")),
    ],
}


@needs_promtool
def test_each_cluster_alert_fires_when_it_should_and_not_otherwise(tmp_path):
    with open(CLUSTER_ALERTS, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # prose, checked by promtool check rules
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [CASES]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {case["alertname"] for case in CASES["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}
