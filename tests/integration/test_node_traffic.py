"""A real node between client and server: what passes, what is dropped, what is refused."""

from __future__ import annotations

import pytest

from tests.integration.netns import CLIENT4, CLIENT6, SERVER4, SERVER6

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("server", [SERVER4, SERVER6])
def test_allowed_tcp_connection_carries_data_both_ways(topo, start_node, server):
    node = start_node()
    topo.server_tool(topo.server, "tcp-echo", server, "8080")
    assert topo.tool(topo.client, "tcp-connect", server, "8080", "3") == "ok ping"
    flows = node.request("flows")["flows"]
    assert [(f["proto"], f["dst"], f["dport"], f["rule"]) for f in flows] == [
        ("tcp", server, 8080, "web")
    ]
    adapter = node.stats()["adapter"]
    assert adapter["packets_total"] >= 3 and adapter["engine_errors_total"] == 0


def test_unsolicited_inbound_tcp_is_dropped(topo, start_node):
    node = start_node()
    topo.server_tool(topo.client, "tcp-echo", CLIENT4, "8080")
    assert topo.tool(topo.server, "tcp-connect", CLIENT4, "8080", "1") == "timeout"
    assert dict(node.stats()["engine"]["verdicts"])["drop"] >= 1


@pytest.mark.parametrize("server", [SERVER4, SERVER6])
def test_reject_rule_answers_with_a_reset(topo, start_node, server):
    node = start_node()
    # The server listens, so only the firewall can refuse the connection.
    topo.server_tool(topo.server, "tcp-echo", server, "25")
    result = topo.tool(topo.client, "tcp-connect", server, "25", "3")
    assert result.startswith("refused"), result
    assert float(result.split()[1]) < 0.5
    assert node.stats()["adapter"]["rejected_total"] >= 1


def test_udp_request_and_reply_pass(topo, start_node):
    start_node()
    topo.server_tool(topo.server, "udp-echo", SERVER4, "53")
    assert topo.tool(topo.client, "udp-request", SERVER4, "53", "2") == "ok ping"
    topo.server_tool(topo.server, "udp-echo", SERVER6, "53")
    assert topo.tool(topo.client, "udp-request", SERVER6, "53", "2") == "ok ping"


def test_unsolicited_udp_in_the_reply_direction_is_dropped(topo, start_node):
    start_node()
    sink = topo.server_tool(topo.client, "udp-sink", CLIENT4, "5353", "1")
    assert topo.tool(topo.server, "udp-send", CLIENT4, "5353", "53") == "sent"
    out, _ = sink.communicate(timeout=5)
    assert out.strip() == "nothing"


def test_ping_passes_outbound_only(topo, start_node):
    start_node()
    for target in (SERVER4, SERVER6):
        done = topo.exec(topo.client, ["ping", "-c", "1", "-W", "2", target], check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    for target in (CLIENT4, CLIENT6):
        done = topo.exec(topo.server, ["ping", "-c", "1", "-W", "1", target], check=False)
        assert done.returncode != 0


@pytest.mark.parametrize("fast_path", [True, False])
def test_fragmented_udp_is_reassembled_and_passes(topo, start_node, fast_path):
    # 3000 bytes over a 1500-byte MTU: the datagram leaves as IP fragments;
    # the kernel must reassemble it before the engine (which drops fragments).
    node = start_node(config={"fast_path": {"enabled": fast_path}})
    for server in (SERVER4, SERVER6):
        topo.server_tool(topo.server, "udp-echo", server, "53")
        assert topo.tool(topo.client, "udp-request", server, "53", "2", "0", "3000") == (
            "ok ping 3000"
        )
    assert dict(node.stats()["engine"]["drop_reasons"]).get("fragment", 0) == 0
