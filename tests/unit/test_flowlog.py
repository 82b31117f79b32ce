"""The JSON-lines flow log: what is logged, the rate limit, the bounded queue, rotation."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

import node.flowlog as flowlog
from node.config import FlowLogConfig, NodeConfig, node_config_from_mapping
from node.daemon import Node
from node.errors import ConfigError, Misuse
from node.flow.table import TableConfig
from node.flow.timeouts import Timeouts
from node.flowlog import FlowLog, FlowLogFile, LoggingEngine, TokenBucket, pump
from node.packet import ACK, SYN
from node.policy import parse_ruleset
from tests.packets import ping4, tcp4, udp4, udp6

C, S = "10.10.1.2", "10.10.2.2"
RULES = """
default: drop
rules:
  - name: no-smtp
    proto: tcp
    dport: 25
    action: reject
  - name: dns
    proto: udp
    dport: 53
    action: accept
"""
WALL = 1_700_000_000.0  # wall clock minus the engine clock in these tests


def logged_engine(
    rate: float = 1000.0, burst: int = 2000, capacity: int = 1024, udp: float = 30.0
) -> tuple[LoggingEngine, FlowLog]:
    log = FlowLog("fw1", FlowLogConfig("/unused", rate_per_second=rate, burst=burst), 0.0)
    config = TableConfig(capacity=capacity, timeouts=Timeouts.from_mapping({"udp": udp}))
    return LoggingEngine(config, parse_ruleset(RULES, "rules"), log), log


def records(log: FlowLog, now: float = 0.0, final: bool = False) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.take_lines(now, WALL, final=final)]


# -- token bucket -------------------------------------------------------------


def test_token_bucket_starts_full_then_refills_at_the_rate_up_to_burst():
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # 0.5 s x 2/s = one token
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_token_bucket_gains_nothing_when_the_clock_steps_back():
    bucket = TokenBucket(rate=10.0, burst=1, now=5.0)
    assert bucket.take(5.0)
    assert not bucket.take(1.0) and not bucket.take(5.0)
    assert bucket.take(5.25)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_token_bucket_refuses_nonsense(rate, burst):
    with pytest.raises(Misuse):
        TokenBucket(rate, burst, 0.0)


# -- what is logged -------------------------------------------------------------


def test_created_flow_is_logged_with_its_rule_and_wall_clock_time():
    engine, log = logged_engine()
    engine.process(udp4(C, 4000, S, 53), 10.0)
    engine.process(udp4(S, 53, C, 4000), 10.5)  # established: nothing to log
    assert records(log) == [
        {
            "ts": "2023-11-14T22:13:30.000+00:00",
            "node": "fw1",
            "event": "create",
            "proto": "udp",
            "src": C,
            "sport": 4000,
            "dst": S,
            "dport": 53,
            "rule": "dns",
        }
    ]


def test_expired_flow_is_logged_as_deleted_with_reason_and_counters():
    engine, log = logged_engine(udp=5.0)
    engine.process(udp4(C, 4000, S, 53, b"q"), 10.0)
    engine.process(udp4(S, 53, C, 4000, b"answer"), 11.0)
    log.take_lines(11.0, WALL)
    events = engine.expire(500.0)
    assert len(events) == 1
    [line] = records(log, 500.0)
    assert line["event"] == "delete" and line["reason"] == "timeout" and line["rule"] == "dns"
    assert (line["src"], line["dport"], line["duration"]) == (C, 53, 1.0)
    assert (line["packets_orig"], line["packets_reply"]) == (1, 1)
    assert line["bytes_orig"] == 20 + 8 + 1 and line["bytes_reply"] == 20 + 8 + 6


def test_new_packet_dropped_by_default_is_a_deny_naming_default():
    engine, log = logged_engine()
    engine.process(tcp4(C, 40000, S, 22, SYN, seq=1), 3.0, "cl0", "sv0")
    [line] = records(log)
    assert line["event"] == "deny" and line["verdict"] == "drop" and line["rule"] == "default"
    assert (line["proto"], line["src"], line["sport"], line["dst"], line["dport"]) == (
        "tcp", C, 40000, S, 22,
    )  # fmt: skip
    assert (line["in_iface"], line["out_iface"]) == ("cl0", "sv0")
    assert "reason" not in line and "icmp_type" not in line


def test_reject_rule_is_a_deny_naming_the_rule():
    engine, log = logged_engine()
    engine.process(tcp4(C, 40000, S, 25, SYN, seq=1), 3.0)
    [line] = records(log)
    assert (line["event"], line["verdict"], line["rule"]) == ("deny", "reject", "no-smtp")
    assert "in_iface" not in line


def test_icmp_deny_carries_type_and_code():
    engine, log = logged_engine()
    engine.process(ping4(C, S, ident=7), 3.0)
    [line] = records(log)
    assert (line["proto"], line["icmp_type"], line["icmp_code"]) == ("icmp", 8, 0)


def test_flow_refused_by_a_full_table_is_a_deny_with_reason():
    engine, log = logged_engine(capacity=1)
    engine.process(udp4(C, 4000, S, 53), 1.0)
    engine.process(udp4(S, 53, C, 4000), 1.1)  # assured: early drop spares it
    engine.process(udp4(C, 4001, S, 53), 1.2)
    create, deny = records(log)
    assert create["event"] == "create"
    assert (deny["event"], deny["rule"], deny["reason"], deny["sport"]) == (
        "deny", "dns", "table-full", 4001,
    )  # fmt: skip


def test_invalid_and_established_packets_are_not_denies():
    engine, log = logged_engine()
    engine.process(tcp4(C, 40000, S, 80, ACK, seq=1, ack=1), 1.0)  # INVALID: no flow
    assert records(log) == []
    assert dict(engine.statistics().verdicts)["drop"] == 1


def test_ipv6_addresses_are_written_in_text_form():
    engine, log = logged_engine()
    engine.process(udp6("fd00:10:1::2", 4000, "fd00:10:2::2", 53), 1.0)
    [line] = records(log)
    assert (line["src"], line["dst"]) == ("fd00:10:1::2", "fd00:10:2::2")


# -- rate limit and queue bound -------------------------------------------------


def test_flood_is_rate_limited_and_reported_once_per_period():
    engine, log = logged_engine(rate=1.0, burst=3)
    for sport in range(10):
        engine.process(tcp4(C, 1000 + sport, S, 22, SYN, seq=1), 0.0)
    lines = records(log, 0.0)
    assert [line["event"] for line in lines] == ["deny"] * 3 + ["suppressed"]
    assert (lines[-1]["count"], lines[-1]["rate_limited"], lines[-1]["queue_full"]) == (7, 7, 0)
    engine.process(tcp4(C, 2000, S, 22, SYN, seq=1), 0.5)  # no token yet: suppressed
    assert records(log, 0.5) == []  # within the report period
    report = records(log, 1.0)
    assert [(r["event"], r["count"]) for r in report] == [("suppressed", 1)]
    stats = log.statistics()
    assert (stats.queued_total, stats.rate_limited_total, stats.lines_total) == (3, 8, 5)


def test_final_take_reports_suppressed_lines_within_the_period():
    engine, log = logged_engine(rate=1.0, burst=1)
    engine.process(tcp4(C, 1, S, 22, SYN, seq=1), 0.0)
    engine.process(tcp4(C, 2, S, 22, SYN, seq=1), 0.0)
    assert [r["event"] for r in records(log, 0.0)] == ["deny", "suppressed"]
    engine.process(tcp4(C, 3, S, 22, SYN, seq=1), 0.1)
    assert records(log, 0.2) == []
    assert [(r["event"], r["count"]) for r in records(log, 0.2, final=True)] == [("suppressed", 1)]


def test_full_queue_loses_records_counted_and_reported(monkeypatch):
    monkeypatch.setattr(flowlog, "QUEUE_LEN", 2)
    engine, log = logged_engine()
    for sport in range(5):
        engine.process(tcp4(C, 1000 + sport, S, 22, SYN, seq=1), 0.0)
    assert log.statistics().pending == 2 and log.statistics().queue_full_total == 3
    lines = records(log)
    assert [line["event"] for line in lines] == ["deny", "deny", "suppressed"]
    assert (lines[-1]["count"], lines[-1]["queue_full"]) == (3, 3)
    assert log.statistics().pending == 0


# -- the file -------------------------------------------------------------------


def test_file_appends_and_rotates_before_passing_max_bytes(tmp_path):
    path = str(tmp_path / "flows.jsonl")
    f = FlowLogFile(path, max_bytes=100)
    f.open()
    f.write_lines(["a" * 39, "b" * 39])  # 80 bytes with newlines
    f.write_lines(["c" * 39])  # would make 120: rotate first
    with open(path + ".1") as old, open(path) as new:
        assert old.read() == "a" * 39 + "\n" + "b" * 39 + "\n"
        assert new.read() == "c" * 39 + "\n"
    f.write_lines(["d" * 39, "e" * 39, "f" * 39])  # rotates again in the middle
    with open(path + ".1") as old, open(path) as new:
        assert old.read().split() == ["c" * 39, "d" * 39]
        assert new.read().split() == ["e" * 39, "f" * 39]
    f.close()
    stats = f.statistics()
    assert (stats.lines_written_total, stats.bytes_written_total) == (6, 240)
    assert (stats.rotations_total, stats.size_bytes, stats.write_errors_total) == (2, 80, 0)


def test_reopened_file_continues_from_its_size(tmp_path):
    path = tmp_path / "flows.jsonl"
    path.write_text("x" * 90 + "\n")
    f = FlowLogFile(str(path), max_bytes=100)
    f.open()
    f.write_lines(["y" * 20])
    f.close()
    assert (tmp_path / "flows.jsonl.1").read_text() == "x" * 90 + "\n"
    assert path.read_text() == "y" * 20 + "\n"
    assert os.stat(path).st_mode & 0o137 == 0  # created 0640: no other access, no group write


def test_unusable_path_is_a_config_error_at_open(tmp_path):
    f = FlowLogFile(str(tmp_path / "missing-dir" / "flows.jsonl"), max_bytes=4096)
    with pytest.raises(ConfigError, match=r"flow_log\.path .*cannot open"):
        f.open()


def test_write_error_loses_the_batch_counted_and_the_next_batch_retries(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "flows.jsonl"
    f = FlowLogFile(str(path), max_bytes=50)
    f.open()
    f.write_lines(["a" * 30])
    path.unlink()  # rotation will fail: nothing to rename
    f.write_lines(["b" * 30])
    assert f.statistics().write_errors_total == 1
    f.write_lines(["c" * 30])  # reopens (creates) the file
    f.close()
    assert path.read_text() == "c" * 30 + "\n"
    assert f.statistics().write_errors_total == 1


def test_pump_writes_batches_and_flushes_on_cancel(tmp_path):
    engine, log = logged_engine(rate=1.0, burst=2)
    f = FlowLogFile(str(tmp_path / "flows.jsonl"), max_bytes=1 << 20)
    f.open()

    async def run() -> None:
        task = asyncio.create_task(pump(log, f, lambda: 0.0, lambda: WALL, interval=0.01))
        engine.process(udp4(C, 4000, S, 53), 0.0)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if f.statistics().lines_written_total:
                break
        engine.process(tcp4(C, 1, S, 22, SYN, seq=1), 0.0)  # the second token
        engine.process(tcp4(C, 2, S, 22, SYN, seq=1), 0.0)  # suppressed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    lines = [json.loads(x) for x in (tmp_path / "flows.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["create", "deny", "suppressed"]
    assert f.statistics().lines_written_total == 3


# -- config and daemon wiring -----------------------------------------------------


def test_flow_log_config_defaults_and_relative_path(tmp_path):
    raw = {"node_id": "fw1", "rules": "r.yaml", "flow_log": {"path": "flows.jsonl"}}
    config = node_config_from_mapping(raw, str(tmp_path)).flow_log
    assert config == FlowLogConfig(str(tmp_path / "flows.jsonl"), 1000.0, 2000, 100 * 1024**2)
    raw["flow_log"] = {"path": "/x", "rate_per_second": 5, "burst": 7, "max_bytes": 8192}
    assert node_config_from_mapping(raw).flow_log == FlowLogConfig("/x", 5.0, 7, 8192)
    del raw["flow_log"]
    assert node_config_from_mapping(raw).flow_log is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({}, "flow_log.path: required"),
        ({"path": "f", "burst": 0}, "flow_log.burst"),
        ({"path": "f", "rate_per_second": 0}, "flow_log.rate_per_second"),
        ({"path": "f", "rate_per_second": True}, "flow_log.rate_per_second: expected float"),
        ({"path": "f", "max_bytes": 100}, "flow_log.max_bytes"),
        ({"path": "f", "size": 1}, "unknown key"),
        ({"path": 3}, "flow_log.path: expected str"),
    ],
)
def test_invalid_flow_log_config_names_the_field(section, message):
    raw = {"node_id": "fw1", "rules": "r.yaml", "flow_log": section}
    with pytest.raises(ConfigError, match=message):
        node_config_from_mapping(raw)


def test_node_with_a_flow_log_logs_through_its_engine(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = NodeConfig(
        node_id="fw1", rules_path=str(rules), flow_log=FlowLogConfig(str(tmp_path / "f.jsonl"))
    )
    node = Node(config, parse_ruleset(RULES, "rules"), clock=lambda: 10.0)
    assert isinstance(node.engine, LoggingEngine)
    node.engine.process(tcp4(C, 1, S, 22, SYN, seq=1), 10.0)
    stats = asyncio.run(node.handle({"cmd": "stats"}))
    assert stats["flow_log"]["pending"] == 1 and stats["flow_log_file"]["lines_written_total"] == 0
    plain = Node(NodeConfig(node_id="fw1", rules_path=str(rules)), parse_ruleset(RULES, "r"))
    assert not isinstance(plain.engine, LoggingEngine) and plain.flow_log is None


def test_held_packet_is_not_a_deny_until_it_is_settled():
    engine, log = logged_engine()
    engine.enable_hold()
    # A DNS answer with no local flow: on a clustered node its query may have
    # crossed another node, so it is held, not denied.
    d = engine.process(udp4(S, 53, C, 40000, b"answer"), 3.0)
    assert d.hold_key is not None
    assert records(log) == []
    engine.settle(d, 3.02)  # the hold queue could not keep it: the drop stands
    [line] = records(log)
    assert (line["event"], line["verdict"], line["rule"]) == ("deny", "drop", "default")
