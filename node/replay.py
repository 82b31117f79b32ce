"""``stockade replay``: run a capture through the same engine, offline.

The policy-as-code check operators run in their own CI ("does this ruleset
still allow this capture?") and the way the engine is compared with the
kernel.  Packet timestamps from the capture are the engine's ``now``, so
timeouts behave as they would have on the wire.

Output with ``--json``: one line per frame
``{"i": N, "verdict": ..., "ct_state": ..., "rule": ..., "reason": ...}``
(``i`` is the 1-based frame number, as Wireshark and ``tcpdump -#`` count),
then one line ``{"flows": [...]}`` with the final flow table.  Frames that
carry no IP packet (ARP in an Ethernet capture) get ``"verdict": "skipped"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from node.engine import Decision, Engine, Verdict
from node.flow.events import FlowSnapshot
from node.flow.table import TableConfig
from node.packet import format_addr
from node.pcap import PcapRecord, read_pcap
from node.policy import load_ruleset

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", required=True, help="rules file (YAML)")
    parser.add_argument("trace", help="capture file (pcap or pcapng)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--in-iface", help="ingress interface name to match rules against")
    parser.add_argument("--out-iface", help="egress interface name to match rules against")
    parser.add_argument(
        "--fail-on-drop", action="store_true", help="exit 1 if any packet is dropped or rejected"
    )
    parser.add_argument("--tcp-loose", action="store_true", help="pick up mid-stream TCP flows")
    parser.add_argument("--tcp-liberal", action="store_true", help="skip TCP window checks")


def flow_to_json(flow: FlowSnapshot, now: float) -> dict[str, Any]:
    return {
        "proto": _PROTO_NAMES.get(flow.proto, str(flow.proto)),
        "family": flow.family,
        "src": format_addr(flow.family, flow.orig_src),
        "sport": flow.orig_sport,
        "dst": format_addr(flow.family, flow.orig_dst),
        "dport": flow.orig_dport,
        "state": flow.state,
        "assured": flow.assured,
        "timeout": round(max(0.0, flow.deadline - now), 3),
        "rule": flow.rule,
    }


def replay(
    engine: Engine, records: Iterator[PcapRecord], in_iface: str | None, out_iface: str | None
) -> Iterator[tuple[PcapRecord, Decision | None]]:
    """Yield each record with the engine's decision (None for non-IP frames)."""
    for record in records:
        engine.expire(record.ts)
        if record.data is None:
            yield record, None
            continue
        yield record, engine.process(record.data, record.ts, in_iface, out_iface)


def _line(record: PcapRecord, d: Decision | None) -> dict[str, Any]:
    if d is None:
        return {
            "i": record.index,
            "verdict": "skipped",
            "ct_state": None,
            "rule": None,
            "reason": record.link_error,
        }
    return {
        "i": record.index,
        "verdict": d.verdict.value,
        "ct_state": d.ct_state.value,
        "rule": d.rule,
        "reason": d.reason,
    }


def _print_human(out: TextIO, line: dict[str, Any]) -> None:
    rule = line["rule"] or "-"
    reason = f"  ({line['reason']})" if line["reason"] else ""
    ct = line["ct_state"] or "-"
    out.write(f"{line['i']:>6}  {line['verdict']:<8} {ct:<12} {rule}{reason}\n")


def _print_flows(out: TextIO, flows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({"flows": flows}) + "\n")
        return
    out.write(f"\nflow table: {len(flows)} flows\n")
    for f in flows:
        out.write(
            f"  {f['proto']:<6} {f['src']}:{f['sport']} -> {f['dst']}:{f['dport']}"
            f"  {f['state']}  timeout={f['timeout']}s  rule={f['rule'] or '-'}\n"
        )


def run_replay(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    ruleset = load_ruleset(args.rules)
    engine = Engine(TableConfig(tcp_loose=args.tcp_loose, tcp_liberal=args.tcp_liberal), ruleset)
    dropped = 0
    last_ts = 0.0
    if not args.json:
        out.write(f"{'frame':>6}  {'verdict':<8} {'ct_state':<12} rule\n")
    for record, decision in replay(engine, read_pcap(args.trace), args.in_iface, args.out_iface):
        last_ts = record.ts
        line = _line(record, decision)
        if decision is not None and decision.verdict is not Verdict.ACCEPT:
            dropped += 1
        if args.json:
            out.write(json.dumps(line) + "\n")
        else:
            _print_human(out, line)
    flows = sorted(
        (flow_to_json(f, last_ts) for f in engine.table.flows()),
        key=lambda f: (f["proto"], f["src"], f["sport"], f["dst"], f["dport"]),
    )
    _print_flows(out, flows, args.json)
    if args.fail_on_drop and dropped:
        print(f"stockade replay: {dropped} packet(s) dropped or rejected", file=sys.stderr)
        return 1
    return 0
