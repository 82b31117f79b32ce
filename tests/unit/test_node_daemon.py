"""node.daemon.Node's commands (reload, stats, flows), without starting any I/O."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from node.config import NodeConfig
from node.daemon import Node
from node.policy import load_ruleset

RULES = """\
default: drop
rules:
  - name: dns
    proto: udp
    dport: 53
    action: accept
"""


def node_with_rules(tmp_path, text: str = RULES) -> Node:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    config = NodeConfig(node_id="fw1", rules_path=str(path))
    return Node(config, load_ruleset(str(path)), clock=lambda: 10.0)


def udp_packet(sport: int, dport: int) -> bytes:
    payload = b"ping"
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
        bytes([10, 10, 1, 2]), bytes([10, 10, 2, 2]),
    )  # fmt: skip
    return ip + udp


def handle(node: Node, command: dict[str, Any]) -> dict[str, Any]:
    reply = asyncio.run(node.handle(command))
    json.dumps(reply)  # every reply must be JSON as it stands
    return reply


def test_reload_keeps_the_running_ruleset_on_a_broken_file(tmp_path):
    node = node_with_rules(tmp_path)
    running = node.engine.ruleset.revision
    (tmp_path / "rules.yaml").write_text(RULES.replace("dport: 53", "dport: 53\n    acton: x"))
    reply = handle(node, {"cmd": "reload"})
    assert reply["ok"] is False and "rules.yaml:" in reply["error"]
    assert node.engine.ruleset.revision == running == reply["revision"]


def test_reload_swaps_in_a_good_file(tmp_path):
    node = node_with_rules(tmp_path)
    running = node.engine.ruleset.revision
    (tmp_path / "rules.yaml").write_text(RULES.replace("53", "5353"))
    reply = handle(node, {"cmd": "reload"})
    assert reply == {"ok": True, "revision": node.engine.ruleset.revision, "previous": running}
    assert reply["revision"] != running
    assert node.engine.statistics().ruleset_swaps_total == 1


def test_stats_report_every_component(tmp_path):
    node = node_with_rules(tmp_path)
    node.engine.process(udp_packet(4000, 53), 10.0)
    stats = handle(node, {"cmd": "stats"})
    assert stats["node_id"] == "fw1" and stats["engine"]["packets_total"] == 1
    assert stats["table"]["entries"] == 1
    assert ["dns", 1] in stats["ruleset"]["rule_hits"]
    for part in ("adapter", "kernel_ct", "dataplane", "kernel_queue"):
        assert part in stats


def test_flows_lists_snapshots_up_to_the_limit(tmp_path):
    node = node_with_rules(tmp_path)
    for sport in (4000, 4001, 4002):
        node.engine.process(udp_packet(sport, 53), 10.0)
    reply = handle(node, {"cmd": "flows", "limit": 2})
    assert reply["count"] == 3 and len(reply["flows"]) == 2
    flow = reply["flows"][0]
    assert (flow["proto"], flow["src"], flow["dport"], flow["rule"]) == (
        "udp",
        "10.10.1.2",
        53,
        "dns",
    )
    assert flow["offloaded"] is False
    assert handle(node, {"cmd": "flows", "limit": -1})["ok"] is False


def test_ping_and_unknown_commands(tmp_path):
    node = node_with_rules(tmp_path)
    assert handle(node, {"cmd": "ping"}) == {"node_id": "fw1"}
    reply = handle(node, {"cmd": "selfdestruct"})
    assert reply["ok"] is False and "unknown command" in reply["error"]
