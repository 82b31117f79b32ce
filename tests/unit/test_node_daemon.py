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


def clustered_node(tmp_path, supervise: bool = False) -> Node:
    from node.config import node_config_from_mapping

    (tmp_path / "rules.yaml").write_text(RULES)
    raw = {
        "node_id": "fw1", "rules": "rules.yaml", "cluster_id": "lab",
        "sync": {"insecure": True, "state_dir": "state", "local_socket": "sync.sock",
                 "supervise": supervise},
    }  # fmt: skip
    config = node_config_from_mapping(raw, str(tmp_path), str(tmp_path / "fw1.yaml"))
    return Node(config, load_ruleset(str(tmp_path / "rules.yaml")), clock=lambda: 10.0)


def test_a_standalone_node_is_synced_and_never_holds(tmp_path):
    node = node_with_rules(tmp_path)
    stats = handle(node, {"cmd": "stats"})
    assert stats["synced"] is True and stats["sync"] is None
    assert node.adapter.hold is None and node.syncd is None


def test_a_clustered_node_is_not_synced_before_its_table_is_restored(tmp_path):
    node = clustered_node(tmp_path)
    assert node.adapter.hold is not None and node.syncd is None  # supervise: false
    # A packet that another node's replica could explain is holdable here.
    assert node.engine.process(udp_packet(53, 4000), 10.0).hold_key is not None
    stats = handle(node, {"cmd": "stats"})
    assert stats["synced"] is False
    sync = stats["sync"]
    assert (sync["connected"], sync["synced"], sync["link"], sync["supervised"]) == (
        False, False, None, False,
    )  # fmt: skip
    assert sync["hold"]["held_total"] == 0


def test_a_clustered_node_links_to_syncd_and_sends_its_flows(tmp_path):
    async def run() -> None:
        node = clustered_node(tmp_path)
        node.link = node._make_link()  # what start() does, without NFQUEUE
        assert (tmp_path / "state" / "filter" / "epoch").read_text() == "1\n"
        node._offer(node.engine.process(udp_packet(4000, 53), 10.0).events)
        stats = await node.handle({"cmd": "stats"})
        json.dumps(stats)
        assert stats["sync"]["link"]["queued"] == 1  # syncd is down: queued, not lost
        assert stats["synced"] is False
        assert node.metrics is None  # metric sources still resolve:
        sources = node.metric_sources()
        assert sources.sync_link is not None and sources.sync_link().queued == 1
        assert sources.hold is not None and sources.hold().waiting == 0

    asyncio.run(run())


def test_supervised_syncd_runs_the_node_file(tmp_path):
    node = clustered_node(tmp_path, supervise=True)
    assert node.syncd is not None
    assert node.syncd._argv[1:] == ["-m", "syncd.cli", "syncd", "run", "--config",
                                    str(tmp_path / "fw1.yaml")]  # fmt: skip
