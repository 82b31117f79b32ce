"""Prometheus metrics: the collector over snapshots, the endpoint, the alert rules."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.config import MetricsConfig, NodeConfig, node_config_from_mapping
from node.daemon import Node
from node.engine import Engine
from node.errors import ConfigError
from node.flow.table import TableConfig
from node.flowlog import FlowLogFileStats, FlowLogStats
from node.kernel_ct import KernelCtStats
from node.metrics import (
    MetricsError,
    MetricSources,
    MetricsServer,
    NodeCollector,
    build_registry,
    render,
)
from node.nfq import AdapterStats, KernelQueueStats
from node.packet import SYN
from node.policy import parse_ruleset
from tests.packets import tcp4, udp4

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALERTS = os.path.join(REPO, "ops", "prometheus", "alerts.yml")
PROMETHEUS_YML = os.path.join(REPO, "ops", "prometheus", "prometheus.yml")
PROMTOOL = shutil.which("promtool") or "promtool"  # tests using it skip when absent
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)"
)
C, S = "10.10.1.2", "10.10.2.2"
RULES = """
default: drop
rules:
  - name: dns
    proto: udp
    dport: 53
    action: accept
  - name: web
    proto: tcp
    dport: 80
    action: accept
"""
NODE = {"node": "fw1"}


def engine_with_traffic() -> Engine:
    engine = Engine(TableConfig(capacity=100), parse_ruleset(RULES, "rules"))
    engine.process(udp4(C, 4000, S, 53), 1.0)
    engine.process(udp4(S, 53, C, 4000), 1.1)
    engine.process(udp4(C, 4001, S, 53), 1.2)
    engine.process(tcp4(C, 5000, S, 22, SYN, seq=1), 1.3)  # default drop
    return engine


def sources(engine: Engine, **more: Any) -> MetricSources:
    return MetricSources(
        engine=engine.statistics,
        table=engine.table.statistics,
        ruleset=lambda: engine.ruleset.statistics(),
        **more,
    )


def registry_of(engine: Engine, **more: Any) -> CollectorRegistry:
    return build_registry("fw1", sources(engine, **more), process=False)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {**NODE, **labels})


# -- the collector ---------------------------------------------------------------


def test_engine_table_and_ruleset_metrics_follow_the_snapshots():
    engine = engine_with_traffic()
    reg = registry_of(engine)
    assert value(reg, "stockade_engine_packets_total") == 4
    assert value(reg, "stockade_engine_verdicts_total", verdict="accept") == 3
    assert value(reg, "stockade_engine_verdicts_total", verdict="drop") == 1
    assert value(reg, "stockade_engine_ct_states_total", ct_state="new") == 3
    assert value(reg, "stockade_engine_ct_states_total", ct_state="established") == 1
    assert value(reg, "stockade_flow_table_entries") == 2
    assert value(reg, "stockade_flow_table_capacity") == 100
    assert value(reg, "stockade_flow_table_assured_entries") == 1
    assert value(reg, "stockade_flows_created_total") == 2
    assert value(reg, "stockade_flows_deleted_total", reason="timeout") == 0
    assert value(reg, "stockade_rule_hits_total", rule="dns") == 2
    assert value(reg, "stockade_rule_hits_total", rule="web") == 0
    assert value(reg, "stockade_ruleset_default_hits_total") == 1
    assert value(reg, "stockade_ruleset_established_hits_total") == 1
    revision = engine.ruleset.revision
    assert value(reg, "stockade_ruleset_info", revision=revision) == 1
    assert value(reg, "stockade_ruleset_rules") == 2
    # Read at scrape time: later traffic shows without re-registering.
    engine.expire(1000.0)
    assert value(reg, "stockade_flow_table_entries") == 0
    assert value(reg, "stockade_flows_deleted_total", reason="timeout") == 2


def test_drop_and_invalid_reasons_are_labelled():
    engine = Engine(TableConfig(capacity=1), parse_ruleset(RULES, "rules"))
    engine.process(udp4(C, 4000, S, 53), 1.0)
    engine.process(udp4(S, 53, C, 4000), 1.1)  # assured
    engine.process(udp4(C, 4001, S, 53), 1.2)  # table full
    engine.process(tcp4(C, 5000, S, 80, 0x10, seq=1, ack=1), 1.3)  # ACK without a flow
    reg = registry_of(engine)
    assert value(reg, "stockade_flows_refused_full_total") == 1
    assert value(reg, "stockade_engine_drop_reasons_total", reason="table-full") == 1
    assert value(reg, "stockade_engine_drop_reasons_total", reason="tcp-no-flow") == 1
    assert value(reg, "stockade_flow_table_invalid_total", reason="tcp-no-flow") == 1


def test_swapped_ruleset_changes_the_info_revision():
    engine = engine_with_traffic()
    reg = registry_of(engine)
    old = engine.ruleset.revision
    engine.swap_ruleset(parse_ruleset(RULES.replace("53", "5353"), "rules"))
    assert value(reg, "stockade_ruleset_info", revision=old) is None
    assert value(reg, "stockade_ruleset_info", revision=engine.ruleset.revision) == 1
    assert value(reg, "stockade_ruleset_swaps_total") == 1
    assert value(reg, "stockade_rule_hits_total", rule="dns") == 0  # a new ruleset counts anew


def test_optional_components_appear_only_when_present():
    engine = engine_with_traffic()
    bare = {f.name for f in registry_of(engine).collect()}
    assert not any(n.startswith(("stockade_nfq", "stockade_kernel_ct", "stockade_flow_log"))
                   for n in bare)  # fmt: skip
    reg = registry_of(
        engine,
        adapter=lambda: AdapterStats(10, 6, 2, 1, 1, 0, 0, 3, 4, 5, 9),
        kernel_queue=lambda: KernelQueueStats(waiting=2, queue_dropped=11, user_dropped=12),
        kernel_ct=lambda: KernelCtStats(1, 2, 3, 4, 5, 6, 7),
        dataplane_installed=lambda: True,
        flow_log=lambda: FlowLogStats(20, 21, 22, 23, 24),
        flow_log_file=lambda: FlowLogFileStats(30, 31, 32, 33, 34),
    )
    assert value(reg, "stockade_nfq_packets_total") == 10
    assert value(reg, "stockade_nfq_verdicts_total", verdict="offload") == 2
    assert value(reg, "stockade_nfq_enobufs_total") == 3
    assert value(reg, "stockade_flow_events_total") == 5
    assert value(reg, "stockade_flow_expiry_runs_total") == 9
    assert value(reg, "stockade_nfq_kernel_waiting") == 2
    assert value(reg, "stockade_nfq_kernel_queue_dropped_total") == 11
    assert value(reg, "stockade_nfq_kernel_user_dropped_total") == 12
    assert value(reg, "stockade_kernel_ct_overflow_total") == 4
    assert value(reg, "stockade_kernel_ct_pending") == 7
    assert value(reg, "stockade_dataplane_installed") == 1
    assert value(reg, "stockade_flow_log_suppressed_total", cause="rate-limit") == 21
    assert value(reg, "stockade_flow_log_suppressed_total", cause="queue-full") == 22
    assert value(reg, "stockade_flow_log_rotations_total") == 32
    assert value(reg, "stockade_flow_log_file_size_bytes") == 34
    unbound = registry_of(engine, kernel_queue=lambda: None)
    assert value(unbound, "stockade_nfq_kernel_waiting") is None


def test_render_shows_the_snapshot_as_it_was_taken():
    engine = engine_with_traffic()
    collector = NodeCollector("fw1", sources(engine))
    snapshot = collector.snapshot()
    engine.expire(1000.0)  # after the snapshot: the endpoint renders it on another thread
    assert b'stockade_flow_table_entries{node="fw1"} 2.0' in render("fw1", snapshot, False)
    assert b'stockade_flow_table_entries{node="fw1"} 0.0' in render(
        "fw1", collector.snapshot(), False
    )


def test_exposition_follows_the_naming_conventions():
    engine = engine_with_traffic()
    reg = build_registry("fw1", sources(engine), process=True)
    families = list(text_string_to_metric_families(generate_latest(reg).decode()))
    names = {f.name for f in families}
    assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= names
    for family in families:
        assert family.name.startswith(("stockade_", "process_")), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            assert sample.labels["node"] == "fw1", sample
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name


def test_node_daemon_exposes_every_component(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = NodeConfig(node_id="fw1", rules_path=str(rules), metrics=MetricsConfig(port=0))
    node = Node(config, parse_ruleset(RULES, "rules"))
    assert node.metrics is not None
    node.engine.process(udp4(C, 4000, S, 53), 1.0)
    reg = build_registry("fw1", node.metric_sources(), process=False)
    assert value(reg, "stockade_flows_created_total") == 1
    assert value(reg, "stockade_nfq_packets_total") == 0  # the adapter never started
    assert value(reg, "stockade_dataplane_installed") == 0
    assert value(reg, "stockade_kernel_ct_pending") == 0  # fast path on by default
    assert node.stats()["metrics"]["scrapes_total"] == 0


# -- the endpoint ------------------------------------------------------------------


async def http(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *headers = head.decode().split("\r\n")
    return status, dict(h.split(": ", 1) for h in headers), body


def serve(collector: NodeCollector, test: Callable[[MetricsServer], Any]) -> None:
    async def run() -> None:
        server = MetricsServer(collector, "127.0.0.1", 0)
        await server.start()
        try:
            await test(server)
        finally:
            await server.close()

    asyncio.run(run())


def test_endpoint_serves_metrics_and_refuses_the_rest():
    engine = engine_with_traffic()

    async def test(server: MetricsServer) -> None:
        status, headers, body = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and headers["Content-Type"].startswith("text/plain")
        assert b'stockade_flow_table_entries{node="fw1"} 2.0' in body
        assert b'process_resident_memory_bytes{node="fw1"}' in body
        assert int(headers["Content-Length"]) == len(body)
        status, headers, body = await http(server.port, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert status.endswith("200 OK") and body == b"" and int(headers["Content-Length"]) > 0
        assert (await http(server.port, b"GET / HTTP/1.1\r\n\r\n"))[0].endswith("200 OK")
        assert (await http(server.port, b"GET /x HTTP/1.1\r\n\r\n"))[0].endswith("404 Not Found")
        assert (await http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].endswith(
            "405 Method Not Allowed"
        )
        assert (await http(server.port, b"hello\r\n\r\n"))[0].endswith("400 Bad Request")
        assert (await http(server.port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000)) == (
            "",
            {},
            b"",
        )  # oversized head: closed unanswered
        stats = server.statistics()
        assert (stats.requests_total, stats.scrapes_total, stats.bad_requests_total) == (6, 2, 2)
        assert stats.active == 0

    serve(NodeCollector("fw1", sources(engine)), test)


def test_endpoint_answers_500_when_a_collector_fails():
    def broken() -> AdapterStats:
        raise RuntimeError("bug")

    collector = NodeCollector("fw1", sources(engine_with_traffic(), adapter=broken))

    async def test(server: MetricsServer) -> None:
        status, _, _ = await http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status.endswith("500 Internal Server Error")
        assert server.statistics().collect_errors_total == 1

    serve(collector, test)


def test_endpoint_that_cannot_listen_is_a_metrics_error():
    collector = NodeCollector("fw1", sources(engine_with_traffic()))

    async def run() -> None:
        first = MetricsServer(collector, "127.0.0.1", 0)
        await first.start()
        try:
            with pytest.raises(MetricsError, match="cannot listen"):
                await MetricsServer(collector, "127.0.0.1", first.port).start()
        finally:
            await first.close()

    asyncio.run(run())


# -- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({}, MetricsConfig("127.0.0.1", 9641)),
        ({"listen": "0.0.0.0:9100"}, MetricsConfig("0.0.0.0", 9100)),
        ({"listen": "[::1]:9641"}, MetricsConfig("::1", 9641)),
    ],
)
def test_metrics_config(section, expected):
    raw = {"node_id": "fw1", "rules": "r", "metrics": section}
    assert node_config_from_mapping(raw).metrics == expected
    assert node_config_from_mapping({"node_id": "fw1", "rules": "r"}).metrics is None
    assert node_config_from_mapping({**raw, "metrics": None}).metrics is None


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("9641", "HOST:PORT"),
        ("localhost:9641", "not an IP address"),
        ("::1:9641", r"\[ADDR\]:PORT"),
        ("127.0.0.1:99999", "port must be"),
        ("127.0.0.1:x", "HOST:PORT"),
        (9641, "expected str"),
    ],
)
def test_invalid_metrics_listen_is_refused(listen, message):
    with pytest.raises(ConfigError, match=message):
        node_config_from_mapping({"node_id": "fw1", "rules": "r", "metrics": {"listen": listen}})


# -- alert rules ------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_alert_rules_and_the_example_config():
    for argv in (["check", "rules", ALERTS], ["check", "config", PROMETHEUS_YML]):
        done = subprocess.run([PROMTOOL, *argv], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": "stockade-node", **labels}
    text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def _alerts(at: str, name: str, *label_sets: dict[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": ls} for ls in label_sets],
    }


def _fw(node: str, severity: str) -> dict[str, str]:
    return {"node": node, "instance": f"{node}:9641", "job": "stockade-node", "severity": severity}


ALERT_CASES: dict[str, Any] = {
    "interval": "1m",
    "input_series": [
        # fw1: 80% full; fw2: 50%.
        _series("stockade_flow_table_entries", "800x10", node="fw1", instance="fw1:9641"),
        _series("stockade_flow_table_capacity", "1000x10", node="fw1", instance="fw1:9641"),
        _series("stockade_flow_table_entries", "500x10", node="fw2", instance="fw2:9641"),
        _series("stockade_flow_table_capacity", "1000x10", node="fw2", instance="fw2:9641"),
        # fw1 refuses flows from minute 2 to 3; fw2 never.
        _series("stockade_flows_refused_full_total", "0 0 5 5x20", node="fw1", instance="fw1:9641"),
        _series("stockade_flows_refused_full_total", "0x20", node="fw2", instance="fw2:9641"),
        # fw2's kernel queue overflows at minute 2.
        _series("stockade_nfq_kernel_queue_dropped_total", "0x20", node="fw1", instance="fw1:9641"),
        _series("stockade_nfq_kernel_user_dropped_total", "0x20", node="fw1", instance="fw1:9641"),
        _series(
            "stockade_nfq_kernel_queue_dropped_total", "0 0 3x20", node="fw2", instance="fw2:9641"
        ),
        _series("stockade_nfq_kernel_user_dropped_total", "0x20", node="fw2", instance="fw2:9641"),
        _series("stockade_nfq_engine_errors_total", "0 1 1x20", node="fw1", instance="fw1:9641"),
        _series("stockade_nfq_engine_errors_total", "0x20", node="fw2", instance="fw2:9641"),
        # fw2 stops answering at minute 2.
        _series("up", "1x20", instance="fw1:9641"),
        _series("up", "1 1 0x20", instance="fw2:9641"),
        # fw1 runs aaa throughout; fw2 moves from aaa to bbb at minute 4.
        _series("stockade_ruleset_info", "1x20", node="fw1", revision="aaa"),
        _series("stockade_ruleset_info", "1 1 1 1 stale", node="fw2", revision="aaa"),
        _series("stockade_ruleset_info", "_ _ _ _ 1x16", node="fw2", revision="bbb"),
    ],
    "alert_rule_test": [
        _alerts("4m", "StockadeFlowTableHighUsage"),  # pending: not yet 5 minutes
        _alerts("6m", "StockadeFlowTableHighUsage", _fw("fw1", "warning")),
        _alerts("1m", "StockadeFlowTableRefusingFlows"),
        _alerts("3m", "StockadeFlowTableRefusingFlows", _fw("fw1", "critical")),
        _alerts("9m", "StockadeFlowTableRefusingFlows"),  # 5 minutes without a refusal
        _alerts("1m", "StockadeKernelQueueDrops"),
        _alerts("3m", "StockadeKernelQueueDrops", _fw("fw2", "warning")),
        _alerts("2m", "StockadeEngineErrors", _fw("fw1", "warning")),
        _alerts("2m", "StockadeNodeDown"),  # down, but not for a minute yet
        _alerts(
            "4m",
            "StockadeNodeDown",
            {"instance": "fw2:9641", "job": "stockade-node", "severity": "critical"},
        ),
        _alerts("3m", "StockadeRulesetDrift"),
        _alerts("6m", "StockadeRulesetDrift"),  # differing, but a rollout may take a moment
        _alerts("10m", "StockadeRulesetDrift", {"severity": "warning"}),
    ],
}


@needs_promtool
def test_each_alert_fires_when_it_should_and_not_otherwise(tmp_path):
    # Annotations are prose (checked by `promtool check rules`); compare labels only.
    with open(ALERTS, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [ALERT_CASES]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    done = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {case["alertname"] for case in ALERT_CASES["alert_rule_test"]}
    assert tested == {r["alert"] for g in rules["groups"] for r in g["rules"]}
