"""Failover bench: the pure decisions, gap evaluation, CLI parsing and the summary table."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from chaos.bench.probe import parse as parse_probe
from chaos.bench.probe_reader import Tick
from chaos.bench.runner import SystemSpec, next_victim, open_gaps, restored
from chaos.bench_failover import add_parser, parse_advert_ints, summary_table, systems, write_report
from chaos.failover_report import GapRecord, evaluate_gaps, summarize
from chaos.lab.baseline_lab import established, node_commands

NODES = ["fw1", "fw2", "fw3"]
FLOWS = [("tcp-0", "tcp"), ("tcp-1", "tcp"), ("udp-0", "udp"), ("udp-1", "udp")]


def test_victims_go_round_robin_over_the_carriers() -> None:
    assert next_victim(NODES, NODES, None) == "fw1"
    assert next_victim(NODES, NODES, "fw1") == "fw2"
    assert next_victim(NODES, NODES, "fw3") == "fw1"
    assert next_victim(NODES, ["fw1", "fw3"], "fw1") == "fw3"
    assert next_victim(NODES, ["fw2"], "fw2") == "fw2"
    assert next_victim(NODES, [], "fw1") is None


def test_restored_needs_a_late_enough_tick_without_silent_flows() -> None:
    assert not restored(Tick(100.05, {}), fault_at=100.0, min_wait=0.16)
    assert not restored(Tick(100.5, {"tcp-0": 99.99}), fault_at=100.0, min_wait=0.16)
    assert restored(Tick(100.5, {}), fault_at=100.0, min_wait=0.16)


def test_open_gaps_turn_silent_flows_into_endless_gaps() -> None:
    tick = Tick(115.0, {"tcp-1": 99.99, "udp-9": 99.0, "udp-0": None})
    gaps = open_gaps(tick, dict(FLOWS), fault_at=100.0)  # type: ignore[arg-type]
    assert gaps == [GapRecord("tcp-1", "tcp", 99.99, None), GapRecord("udp-0", "udp", 100.0, None)]


def _trial(gaps: list[GapRecord], resets: list[tuple[str, float]] = (), end: float = 110.0):  # type: ignore[assignment]
    return evaluate_gaps("s", "kill", 1, "fw2", FLOWS, gaps, resets, 100.0, end)  # type: ignore[arg-type]


def test_a_gap_spanning_the_fault_is_the_failover() -> None:
    result = _trial(
        [
            GapRecord("tcp-0", "tcp", 95.0, 95.2),  # before the fault: not this trial
            GapRecord("tcp-0", "tcp", 99.999, 100.72),
            GapRecord("udp-0", "udp", 100.01, 100.31),  # began just after the fault
            GapRecord("udp-1", "udp", 99.99, 100.03),  # a 30 ms hiccup: not a failover
        ]
    )
    by_flow = {o.flow: o for o in result.outcomes}
    assert by_flow["tcp-0"].affected and by_flow["tcp-0"].latency == pytest.approx(0.72)
    assert by_flow["udp-0"].affected and by_flow["udp-0"].latency == pytest.approx(0.31)
    assert not by_flow["udp-1"].affected
    assert not by_flow["tcp-1"].affected and by_flow["tcp-1"].latency is None
    assert result.latency == pytest.approx(0.72)
    assert result.path_restore == pytest.approx(0.31)
    assert result.affected == 2 and result.lost == 0


def test_gaps_starting_well_after_the_fault_are_not_its_doing() -> None:
    result = _trial([GapRecord("tcp-0", "tcp", 100.2, 100.9)])
    assert result.affected == 0 and result.latency is None


def test_silent_past_the_window_or_reset_is_lost() -> None:
    result = _trial(
        [GapRecord("tcp-0", "tcp", 99.99, None), GapRecord("tcp-1", "tcp", 99.99, 112.0)],
        resets=[("udp-1", 100.5)],
    )
    by_flow = {o.flow: o for o in result.outcomes}
    assert by_flow["tcp-0"].lost and by_flow["tcp-1"].lost and by_flow["udp-1"].lost
    assert result.lost == 2  # TCP flows only
    assert result.latency is None


def test_evaluate_gaps_rejects_an_empty_window() -> None:
    with pytest.raises(ValueError):
        _trial([], end=100.0)


def test_advert_ints_and_systems() -> None:
    assert parse_advert_ints("1,0.1") == [1.0, 0.1]
    for bad in ("", "x", "0.001", "1,300"):
        with pytest.raises(ValueError):
            parse_advert_ints(bad)
    specs = systems(True, "keepalived-conntrackd", [1.0, 0.1])
    assert [s.label for s in specs] == [
        "stockade",
        "keepalived-conntrackd advert_int 1s",
        "keepalived-conntrackd advert_int 0.1s",
    ]
    assert systems(False, None, [1.0]) == []
    assert SystemSpec("stockade").label == "stockade"


def test_cli_registers_under_an_existing_bench_command() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench")
    bench_sub = bench.add_subparsers(dest="bench_command")
    bench_sub.add_parser("dataplane")
    add_parser(sub)
    args = parser.parse_args(
        ["bench", "failover", "--trials", "3", "--fault", "freeze", "--report", "/tmp/x"]
    )
    assert args.bench_command == "failover" and args.trials == 3 and args.fault == "freeze"
    assert parser.parse_args(["bench", "dataplane"]).bench_command == "dataplane"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "failover", "--fault", "explode", "--report", "x"])


def _results():  # type: ignore[no-untyped-def]
    a = evaluate_gaps(
        "stockade", "kill", 1, "fw1", FLOWS, [GapRecord("tcp-0", "tcp", 99.99, 100.25)], [],
        100.0, 110.0,
    )  # fmt: skip
    b = evaluate_gaps(
        "keepalived-conntrackd advert_int 1s", "kill", 1, "fw1", FLOWS,
        [GapRecord("tcp-0", "tcp", 99.99, 103.3), GapRecord("udp-0", "udp", 99.99, 103.0)],
        [], 100.0, 110.0,
    )  # fmt: skip
    return [a, b]


def test_summary_table_has_ratios_to_stockade() -> None:
    table = summary_table(summarize(_results()))
    rows = table.splitlines()
    assert rows[0].split()[:4] == ["system", "fault", "n", "p50"]
    assert rows[2].split()[:4] == ["stockade", "kill", "1", "250"]
    assert "13.2 / 13.2" in rows[3] and " 3300 " in rows[3] and " 3000 " in rows[3]


def test_write_report_writes_every_file(tmp_path: Path) -> None:
    meta = {"skipped": {"x": "lab up failed"}, "lost_in_recovery": {"stockade": []}}
    table = write_report(_results(), meta, tmp_path, "t")
    assert "skipped x: lab up failed" in table
    rows = list(csv.DictReader((tmp_path / "trials.csv").read_text().splitlines()))
    assert [r["latency_ms"] for r in rows] == ["250.0", "3300.0"]
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["ratios_to_stockade"]["keepalived-conntrackd advert_int 1s/kill"]["p50"] == (
        pytest.approx(13.2)
    )
    assert (tmp_path / "cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.txt").read_text().strip() == table.strip()


def test_probe_arguments_are_checked() -> None:
    args = parse_probe(["--server", "10.0.0.1", "--tcp-flows", "4", "--udp-flows", "0"])
    assert args.tcp_flows == 4 and args.stall_after == 0.02
    for bad in (["--tcp-flows", "0", "--udp-flows", "0"], ["--stall-after", "0.001"]):
        with pytest.raises(SystemExit):
            parse_probe(["--server", "10.0.0.1", *bad])


def test_baseline_commands_and_conntrack_parsing(tmp_path: Path) -> None:
    from chaos.lab.baseline_lab import baseline_paths

    cmds = node_commands("ns1", baseline_paths(tmp_path, "fw1"))
    assert cmds["keepalived"][:4] == ["ip", "netns", "exec", "ns1"]
    assert "--dont-fork" in cmds["keepalived"] and "--vrrp" in cmds["keepalived"]
    assert cmds["keepalived"][cmds["keepalived"].index("--pid") + 1] == str(
        tmp_path / "fw1" / "keepalived.pid"
    )
    assert cmds["resync"][-1] == "-n"
    out = (
        "tcp      6 431999 ESTABLISHED src=10.1.1.2 dst=10.1.2.2 sport=4000 dport=8000 "
        "src=10.1.2.2 dst=10.1.1.2 sport=8000 dport=4000 [ASSURED] mark=0 use=1\n"
        "tcp      6 299 ESTABLISHED src=10.1.1.2 dst=10.1.2.2 sport=4001 dport=8000 "
        "src=10.1.2.2 dst=10.1.1.2 sport=8000 dport=4001 [ASSURED] mark=0 use=1\n"
        "tcp      6 110 TIME_WAIT src=10.1.1.2 dst=10.1.2.2 sport=4002 dport=8000 "
        "src=10.1.2.2 dst=10.1.1.2 sport=8000 dport=4002 [ASSURED] mark=0 use=1\n"
    )
    assert established(out) == {
        ("10.1.1.2", "10.1.2.2", "4000", "8000"),
        ("10.1.1.2", "10.1.2.2", "4001", "8000"),
    }
    assert established(out, 431_000) == {("10.1.1.2", "10.1.2.2", "4000", "8000")}


def test_carriers_count_what_a_node_sends_not_what_the_bridge_floods() -> None:
    from chaos.bench.runner import forwarded_packets

    links = [
        {"ifname": "lo", "stats64": {"tx": {"packets": 999}, "rx": {"packets": 999}}},
        {"ifname": "out0", "stats64": {"tx": {"packets": 10}, "rx": {"packets": 5000}}},
        {"ifname": "in0", "stats64": {"tx": {"packets": 32}, "rx": {"packets": 7}}},
        {"ifname": "mgmt0", "stats64": {"tx": {"packets": 400}, "rx": {"packets": 400}}},
    ]
    assert forwarded_packets(json.dumps(links), ["mgmt0"]) == 42
    assert forwarded_packets("", ["mgmt0"]) == 0


def test_partition_is_a_bench_fault_that_cuts_etcd_too() -> None:
    from chaos.bench.probe_reader import BenchError
    from chaos.bench.runner import bench_fault

    assert str(bench_fault("partition")) == "partition (etcd too)"
    assert bench_fault("kill").kind == "kill" and bench_fault("freeze").etcd
    with pytest.raises(BenchError):
        bench_fault("loss")
