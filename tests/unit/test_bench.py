"""The benchmark's pure parts: rate search, statistics, parsers, summary; and a smoke run.

The network figures themselves are only meaningful on a quiet machine, so
nothing here checks a speed; the tests check that the arithmetic and the
parsing behind the figures are right.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.bench import PARTS, BenchOptions, options_from_args, quick_options
from node.bench_calc import (
    BenchError,
    QueueCounters,
    RateSearch,
    SearchConfig,
    UdpRun,
    cost_over,
    loss_fraction,
    median,
    paired_ratios,
    parse_iperf_tcp,
    parse_iperf_udp,
    parse_nfqueue_proc,
    parse_rule_packets,
    parse_schedstat,
    queue_delta,
    ratio,
)
from node.bench_report import format_report, summarize
from node.cli import build_parser
from node.errors import ConfigError, Misuse

REPO = Path(__file__).resolve().parents[2]

# -- statistics ------------------------------------------------------------------


def test_median_of_odd_and_even_counts_and_of_nothing():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([]) is None


def test_ratio_is_none_when_a_side_is_missing_or_zero():
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 4.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_paired_ratios_keep_repeats_aligned_and_skip_incomplete_ones():
    assert paired_ratios([1.0, None, 3.0], [2.0, 5.0, 6.0]) == [0.5, 0.5]
    with pytest.raises(Misuse):
        paired_ratios([1.0], [1.0, 2.0])


def test_cost_is_extra_time_per_packet():
    # bare 60k pps, node 50k pps: 1/50k is 20% more time per packet than 1/60k.
    assert cost_over(60_000.0, 50_000.0) == pytest.approx(0.2)
    assert cost_over(60_000.0, 60_000.0) == 0.0
    assert cost_over(60_000.0, None) is None


# -- rate search -----------------------------------------------------------------


def config(**changes: float) -> SearchConfig:
    base: dict[str, Any] = dict(
        low=1000.0, high=100_000.0, max_steps=20, precision=0.05, loss_threshold=0.001
    )
    base.update(changes)
    return SearchConfig(**base)


def probe(search: RateSearch) -> float:
    """The next rate of a search that must not be over yet."""
    rate = search.next_rate()
    assert rate is not None
    return rate


def run_search(search: RateSearch, capacity: float, generator_max: float = math.inf):
    """Drive ``search`` against a system that loses everything above ``capacity``."""
    probes = []
    while (rate := search.next_rate()) is not None:
        achieved = min(rate, generator_max)
        loss = 0.0 if achieved <= capacity else (achieved - capacity) / achieved
        probes.append(rate)
        search.record(rate, achieved, loss)
    return probes, search.result()


@pytest.mark.parametrize("capacity", [1500.0, 7_300.0, 42_000.0, 61_234.0, 99_000.0])
def test_search_converges_on_the_capacity_within_the_precision(capacity):
    probes, result = run_search(RateSearch(config()), capacity)
    assert result.best_pps is not None
    assert capacity / 1.05 <= result.best_pps <= capacity
    assert not result.capped
    assert probes[0] == 100_000.0  # the ceiling first
    assert len(probes) <= 20


def test_after_a_failed_ceiling_the_next_probe_is_the_geometric_middle():
    search = RateSearch(config())
    assert search.next_rate() == 100_000.0
    search.record(100_000.0, 100_000.0, 0.5)
    assert search.next_rate() == pytest.approx(math.sqrt(1000.0 * 100_000.0))


def test_a_passing_ceiling_ends_the_search_and_says_the_generator_was_the_limit():
    probes, result = run_search(RateSearch(config()), capacity=1e9, generator_max=80_000.0)
    assert probes == [100_000.0]
    assert result.capped
    assert result.best_pps == 80_000.0  # what was really sent, not what was asked


def test_the_interval_follows_the_rates_really_sent():
    search = RateSearch(config())
    search.record(probe(search), 40_000.0, 0.3)  # asked 100k, the generator sent 40k: lost
    nxt = probe(search)
    assert nxt == pytest.approx(math.sqrt(1000.0 * 40_000.0))
    search.record(nxt, 4_000.0, 0.0)  # passed, but only 4k were sent
    assert search.next_rate() == pytest.approx(math.sqrt(4_000.0 * 40_000.0))


def test_a_pass_well_below_its_target_is_marked_as_the_generators_limit():
    search = RateSearch(config())
    search.record(probe(search), 50_000.0, 0.2)
    first = probe(search)
    search.record(first, first / 2, 0.0)
    while (rate := search.next_rate()) is not None:
        search.record(rate, rate, 1.0)  # everything above fails
    result = search.result()
    assert result.capped
    assert result.best_pps == pytest.approx(math.sqrt(1000.0 * 50_000.0) / 2)


def test_a_failure_below_an_earlier_pass_ends_the_search():
    search = RateSearch(config())
    search.record(probe(search), 100_000.0, 0.5)
    rate = probe(search)
    search.record(rate, rate, 0.0)
    search.record(probe(search), rate / 2, 0.5)  # noise: fails below the pass
    assert search.next_rate() is None
    assert search.result().best_pps == rate


def test_search_stops_after_max_steps():
    probes, result = run_search(RateSearch(config(max_steps=3, precision=0.001)), 5000.0)
    assert len(probes) == 3
    assert len(result.steps) == 3


def test_nothing_passing_gives_no_rate():
    _probes, result = run_search(RateSearch(config(max_steps=6)), capacity=10.0)
    assert result.best_pps is None
    assert not any(s.passed for s in result.steps)


def test_loss_equal_to_the_threshold_fails():
    search = RateSearch(config())
    rate = probe(search)
    assert not search.record(rate, rate, 0.001).passed


def test_next_rate_repeats_until_recorded():
    search = RateSearch(config())
    assert search.next_rate() == search.next_rate()


@pytest.mark.parametrize(
    ("target", "achieved", "loss"), [(123.0, 100.0, 0.0), (None, -1.0, 0.0), (None, 1.0, 1.5)]
)
def test_record_refuses_a_probe_that_was_not_asked_or_a_bad_outcome(target, achieved, loss):
    search = RateSearch(config())
    rate = probe(search)
    with pytest.raises(Misuse):
        search.record(rate if target is None else target, achieved, loss)


def test_record_before_next_rate_is_misuse():
    with pytest.raises(Misuse):
        RateSearch(config()).record(100_000.0, 1.0, 0.0)


@pytest.mark.parametrize(
    "changes",
    [
        {"low": 0.0},
        {"low": 5.0, "high": 5.0},
        {"max_steps": 0},
        {"precision": 0.0},
        {"precision": 1.0},
        {"loss_threshold": 0.0},
    ],
)
def test_bad_search_config_is_misuse(changes):
    with pytest.raises(Misuse):
        config(**changes)


# -- iperf3 ------------------------------------------------------------------------

UDP_JSON: dict[str, Any] = {
    "start": {"test_start": {"protocol": "UDP", "blksize": 64}},
    "end": {
        "sum": {"seconds": 1.000056, "packets": 96210, "lost_packets": 731, "sender": True},
        "sum_sent": {"seconds": 1.00001, "packets": 96210, "lost_packets": 0, "sender": True},
        "sum_received": {
            "seconds": 1.000056,
            "packets": 96210,
            "lost_packets": 731,
            "lost_percent": 0.7597962789730798,
            "sender": False,
        },
    },
}

RECV = {"sum_received": {"lost_packets": 0}}

TCP_JSON = {
    "end": {
        "sum_sent": {"seconds": 5.0, "bits_per_second": 2.4e10, "retransmits": 203},
        "sum_received": {"seconds": 5.0004, "bits_per_second": 2.37e10},
    }
}


def test_udp_run_is_read_from_sent_and_received_sums():
    run = parse_iperf_udp(json.dumps(UDP_JSON))
    assert run == UdpRun(sent_packets=96210, seconds=1.00001, lost_packets=731)
    assert run.achieved_pps == pytest.approx(96209.0, rel=1e-4)


def test_udp_run_falls_back_to_the_single_sum_of_older_iperf3():
    doc = {"end": {"sum": UDP_JSON["end"]["sum"]}}
    assert parse_iperf_udp(json.dumps(doc)).lost_packets == 731


def test_loss_takes_the_larger_of_missing_packets_and_queue_drops():
    assert loss_fraction(1000, 998) == 0.002
    assert loss_fraction(1000, 998, queue_drops=7) == 0.007
    assert loss_fraction(1000, 1000) == 0.0
    assert loss_fraction(1000, 1003) == 0.0  # a stray extra packet is no negative loss
    assert loss_fraction(10, 0, queue_drops=50) == 1.0
    assert loss_fraction(0, 0) == 1.0  # nothing sent: nothing shown to pass
    assert UdpRun(0, 0.0, 0).achieved_pps == 0.0


def test_tcp_run_is_the_receivers_goodput():
    run = parse_iperf_tcp(json.dumps(TCP_JSON))
    assert run.bits_per_second == 2.37e10
    assert run.retransmits == 203


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("iperf3: error - unable to connect", "no JSON"),
        ("[1, 2]", "not an object"),
        (json.dumps({"error": "the server is busy running a test"}), "server is busy"),
        (json.dumps({"start": {}}), "no 'end'"),
        (json.dumps({"end": {"sum_sent": {"seconds": 1.0}}}), "none of sum_received"),
        (json.dumps({"end": {"sum_sent": {"seconds": "x", "packets": 1}, **RECV}}), "'seconds'"),
        (json.dumps({"end": {"sum_sent": {"seconds": True, "packets": 1}, **RECV}}), "'seconds'"),
        (json.dumps({"end": {"sum_sent": {"seconds": 1.0, "packets": 1}}, "x": 1}), "sum_rec"),
    ],
)
def test_bad_iperf_output_is_a_bench_error_with_its_reason(text, fragment):
    with pytest.raises(BenchError, match=fragment):
        parse_iperf_udp(text)


def test_tcp_needs_both_sums():
    with pytest.raises(BenchError, match="sum_received"):
        parse_iperf_tcp(json.dumps({"end": {"sum_sent": TCP_JSON["end"]["sum_sent"]}}))


# -- iptables counters, schedstat ---------------------------------------------------

LISTING = """\
Chain INPUT (policy ACCEPT 0 packets, 0 bytes)
    pkts      bytes target     prot opt in     out     source               destination
       3      180 ACCEPT     6    --  *      *       0.0.0.0/0            0.0.0.0/0
  123456  11357952 DROP       17   --  *      *       0.0.0.0/0            0.0.0.0/0            \
udp dpt:5201 length 92 /* stockade-bench-sink */
"""


def test_rule_counter_is_found_by_its_comment():
    assert parse_rule_packets(LISTING, "stockade-bench-sink") == 123456
    with pytest.raises(BenchError, match="no iptables rule tagged"):
        parse_rule_packets(LISTING, "other")
    with pytest.raises(BenchError, match="not understood"):
        parse_rule_packets("  x 1 DROP /* tag */\n", "tag")


def test_schedstat_first_field_is_cpu_nanoseconds():
    assert parse_schedstat("105112029 57969004 286\n") == 105112029
    for bad in ("", "1 2", "a b c"):
        with pytest.raises(BenchError):
            parse_schedstat(bad)


# -- /proc/net/netfilter/nfnetlink_queue -------------------------------------------

PROC = """\
    7 2851233829     0 2 65531     0     0       12  1
    8  123456789    15 2 65531   300    40   100004  1
"""


def test_nfqueue_lines_are_parsed_per_queue():
    queues = parse_nfqueue_proc(PROC)
    assert set(queues) == {7, 8}
    q = queues[8]
    assert q == QueueCounters(8, 123456789, 15, 2, 65531, 300, 40, 100004)
    assert q.dropped == 340
    assert parse_nfqueue_proc("") == {}


def test_nfqueue_garbage_is_a_bench_error():
    with pytest.raises(BenchError, match="line 2"):
        parse_nfqueue_proc("    7 1 0 2 65531 0 0 12 1\n  queue seven\n")


def test_queue_delta_counts_queued_and_dropped_packets():
    before = parse_nfqueue_proc(PROC)
    after = parse_nfqueue_proc(PROC.replace("   300    40   100004", "   310    45   100504"))
    assert queue_delta(before, after, 8) == (500, 15)


def test_queue_delta_survives_the_id_counter_wrapping():
    before = {1: QueueCounters(1, 5, 0, 2, 0, 0, 0, 2**32 - 10)}
    after = {1: QueueCounters(1, 5, 0, 2, 0, 0, 0, 20)}
    assert queue_delta(before, after, 1) == (30, 0)


def test_a_queue_unbound_or_rebound_during_a_step_is_a_bench_error():
    before = parse_nfqueue_proc(PROC)
    with pytest.raises(BenchError, match="not bound"):
        queue_delta(before, {}, 8)
    rebound = parse_nfqueue_proc(PROC.replace("123456789", "987654321"))
    with pytest.raises(BenchError, match="changed reader"):
        queue_delta(before, rebound, 8)


# -- summary and report ----------------------------------------------------------------


def search(best: float | None, capped: bool = False) -> dict[str, Any]:
    return {"best_pps": best, "capped": capped, "steps": []}


def cpu(bare_ns: float, node_ns: float) -> dict[str, Any]:
    return {
        "bare": {"target_pps": 20_000.0, "ns_per_packet": bare_ns},
        "node": {"target_pps": 20_000.0, "ns_per_packet": node_ns},
    }


RAW = {
    "engine": [{"decisions_per_second": v} for v in (100_000.0, 120_000.0, 110_000.0)],
    "memory": {"flows": 1000, "bytes_per_flow": 250.5},
    "repeats": [
        {
            "ceiling": {"pps": 100_000.0},
            "pps": {"bare": search(60_000.0), "node": search(50_000.0)},
            "cpu": cpu(10_000.0, 11_000.0),
            "tcp": {"none": 20e9, "bare": 1e9, "node_fast": 12e9, "node_slow": 0.8e9},
        },
        {
            "ceiling": {"pps": 90_000.0},
            "pps": {"bare": search(66_000.0), "node": search(60_000.0)},
            "cpu": cpu(10_000.0, 13_000.0),
            "tcp": {"none": 10e9, "bare": 1e9, "node_fast": 4e9, "node_slow": 0.5e9},
        },
        {
            "ceiling": {"pps": 95_000.0},
            "pps": {"bare": search(95_000.0, capped=True), "node": search(None)},
            "cpu": cpu(12_000.0, 15_000.0),
            "tcp": {"none": 16e9, "bare": 1e9, "node_fast": 9.6e9, "node_slow": 0.8e9},
        },
    ],
}


def test_summary_takes_medians_of_paired_ratios():
    s = summarize(RAW)
    assert s["engine_decisions_per_second"]["median"] == 110_000.0
    pps = s["pps_without_loss"]
    assert pps["bare"]["median"] == 66_000.0
    assert pps["node"]["median"] == 55_000.0  # the failed search is left out
    assert pps["node_over_bare"]["runs"] == pytest.approx([50 / 60, 60 / 66])
    assert pps["node_cost"]["median"] == pytest.approx(((60 / 50 - 1) + (66 / 60 - 1)) / 2)
    assert pps["node_cost"]["verdict"] == "met"  # +15% median against a 20% target
    assert pps["ceiling"]["median"] == 95_000.0
    per_packet = s["cpu_per_packet"]
    assert per_packet["node_cost"]["runs"] == pytest.approx([0.1, 0.3, 0.25])
    assert per_packet["node_cost"]["median"] == pytest.approx(0.25)
    assert per_packet["node_cost"]["verdict"] == "missed"
    assert per_packet["bare_ns"]["median"] == 10_000.0
    tcp = s["tcp"]["ratio_to_none"]
    assert tcp["node_fast"]["runs"] == pytest.approx([0.6, 0.4, 0.6])
    assert tcp["node_fast"]["median"] == pytest.approx(0.6)
    assert tcp["node_fast"]["verdict"] == "met"
    assert tcp["node_slow"]["verdict"] == "missed"
    assert tcp["bare"]["verdict"] is None
    assert s["bytes_per_flow"]["verdict"] == "met"


def test_summary_of_a_partial_run_has_only_its_parts():
    s = summarize({"engine": RAW["engine"]})
    assert set(s) == {"engine_decisions_per_second"}
    assert summarize({}) == {}


def test_missed_targets_are_reported_as_missed():
    raw = {
        "memory": {"flows": 10, "bytes_per_flow": 301.0},
        "repeats": [{"pps": {"bare": search(60_000.0), "node": search(40_000.0)}}],
    }
    s = summarize(raw)
    assert s["bytes_per_flow"]["verdict"] == "missed"
    assert s["pps_without_loss"]["node_cost"]["verdict"] == "missed"


def test_report_prints_every_figure_with_its_target():
    text = format_report(summarize(RAW), "HEADER")
    assert text.startswith("HEADER\n")
    assert "110,000" in text
    assert ">=95,000" in text  # a run that kept up with the generator
    assert "<= +20%: met" in text
    assert "<= +20%: missed" in text  # CPU per packet: +25%
    assert "fw CPU/packet at 20,000 pps: bare" in text
    assert "13,000 ns" in text
    assert ">= 0.50: met" in text
    assert ">= 0.50: missed" in text
    assert "250.5 B" in text
    assert "<= 300 B: met" in text
    assert "12.00 Gbit/s" in text  # node_fast runs


# -- options --------------------------------------------------------------------------


def parse_cli(*argv: str):
    return build_parser().parse_args(["bench", "dataplane", *argv])


def test_cli_defaults_are_the_full_benchmark():
    args = parse_cli()
    opts = options_from_args(args)
    assert opts == BenchOptions()
    assert opts.repeats == 3 and opts.flows == 1_000_000 and opts.parts == PARTS


def test_cli_quick_shrinks_everything_but_keeps_explicit_values():
    opts = options_from_args(parse_cli("--quick", "--repeats", "2", "--only", "engine"))
    assert opts.repeats == 2
    assert opts.parts == ("engine",)
    assert opts.step_seconds < 1 and opts.flows < 1_000_000
    assert opts == quick_options(repeats=2, parts=("engine",))


def test_cli_only_is_repeatable_and_deduplicated():
    opts = options_from_args(parse_cli("--only", "memory", "--only", "tcp", "--only", "memory"))
    assert opts.parts == ("memory", "tcp")


@pytest.mark.parametrize(
    "changes",
    [{"repeats": 0}, {"parts": ()}, {"parts": ("disk",)}, {"flows": 0}, {"loss_threshold": 1.0}],
)
def test_bad_options_are_config_errors(changes):
    with pytest.raises(ConfigError):
        BenchOptions(**changes)


# -- in-process parts (small sizes) ------------------------------------------------------


def test_engine_trace_is_judged_as_built():
    from node.bench_inproc import DATA_SEGMENTS, engine_trace, run_engine_trace

    ticks = iter([10.0, 12.5])
    run = run_engine_trace(engine_trace(30), 30, clock=lambda: next(ticks))
    assert run.packets == 30 * (3 + 2 * DATA_SEGMENTS)
    assert run.new_flows == 30
    assert run.seconds == 2.5
    assert run.decisions_per_second == run.packets / 2.5


def test_engine_trace_packets_parse_as_meant():
    from node.bench_inproc import SERVER_PORT, conversation
    from node.packet import ACK, SYN, parse

    syn, syn_ack, ack, data, data_ack = (parse(p) for p in conversation(70_001)[:5])
    assert syn.tcp_flags == SYN and syn.dport == SERVER_PORT
    assert syn_ack.tcp_flags == SYN | ACK and syn_ack.ack == syn.seq + 1
    assert ack.seq == syn.seq + 1 and ack.ack == syn_ack.seq + 1
    assert data.payload_len == 100
    assert data_ack.ack == data.seq + 100
    # flow 70001 uses the second client address (50000 ports per address)
    assert syn.src == 0x0A000002 and syn.sport == 10000 + 20_001


def test_a_trace_the_engine_drops_is_refused():
    from node.bench_inproc import SERVER, run_engine_trace, tcp_packet

    stray = [tcp_packet(0x0A000001, 1234, SERVER, 22, 0x02, 1, 0)]  # port 22: no rule
    with pytest.raises(BenchError, match="not judged as built"):
        run_engine_trace(stray, 1)


def test_bytes_per_flow_counts_what_the_table_keeps():
    from node.bench_inproc import measure_bytes_per_flow

    small, large = measure_bytes_per_flow(200), measure_bytes_per_flow(2000)
    assert small.flows == 200 and large.flows == 2000
    # Each extra flow costs memory: at least a dict slot and one Python object
    # (a flow stored in under 40 bytes would mean the table was not measured).
    assert (large.bytes_total - small.bytes_total) / 1800 > 40
    assert large.peak_bytes >= large.bytes_total
    with pytest.raises(BenchError):
        measure_bytes_per_flow(0)


# -- end to end ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.skipif(not shutil.which("iperf3"), reason="needs iperf3 (./dev.sh setup)")
def test_quick_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "node.cli", "bench", "dataplane", "--quick", "--json", str(out)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # the benchmark's own finally has no chance; the lab prefix shows it
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert set(summary) == {
        "engine_decisions_per_second",
        "pps_without_loss",
        "cpu_per_packet",
        "tcp",
        "bytes_per_flow",
    }
    assert summary["pps_without_loss"]["bare"]["median"] > 0
    assert summary["pps_without_loss"]["node"]["median"] > 0
    assert summary["cpu_per_packet"]["node_ns"]["median"] > 0
    assert all(v > 0 for v in summary["tcp"]["bits_per_second"]["none"]["runs"])
    fast = doc["raw"]["repeats"][0]["node_stats"]["node_fast"]
    assert fast["adapter"]["offloaded_total"] > 0  # the fast path was really engaged
    assert "node cost per packet over bare" in stdout
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"stkb{proc.pid % 100000}-" not in leftover
