"""The node's flow table seen from outside: expiry and capacity."""

from __future__ import annotations

import time

import pytest

from tests.integration.netns import SERVER4

pytestmark = pytest.mark.integration


def test_an_idle_flow_expires_and_its_fast_path_mark_is_cleared(topo, start_node):
    node = start_node(config={"table": {"timeouts": {"udp": 1, "udp_stream": 1}}})
    topo.server_tool(topo.server, "udp-echo", SERVER4, "53")
    assert topo.tool(topo.client, "udp-request", SERVER4, "53", "2", "40053") == "ok ping"
    flows = node.request("flows")["flows"]
    assert [(f["proto"], f["sport"], f["dport"]) for f in flows] == [("udp", 40053, 53)]
    deadline = time.monotonic() + 4
    while node.request("flows")["count"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = node.stats()
    assert stats["table"]["entries"] == 0
    assert stats["table"]["deleted_total"]["timeout"] == 1
    # The reply was handed to the kernel fast path; forgetting the flow must
    # clear the FAST connmark on the kernel's entry (which lives on: 30 s).
    assert stats["adapter"]["offloaded_total"] == 1
    assert stats["kernel_ct"]["cleared_total"] == 1
    listing = topo.exec(topo.fw, ["conntrack", "-L", "-p", "udp", "--dport", "53"]).stdout
    assert "sport=40053" in listing and "mark=0 " in listing, listing


def test_at_capacity_established_flows_pass_and_a_new_one_is_refused(topo, start_node):
    node = start_node(config={"table": {"capacity": 3}})
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    hold = topo.tool_popen(topo.client, "tcp-hold", SERVER4, "8080", "3", "3", "0.3")
    assert hold.stdout is not None
    assert hold.stdout.readline().strip() == "open 3"
    assert node.stats()["table"]["entries"] == 3
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "1") == "timeout"
    out, _ = hold.communicate(timeout=10)
    assert out.strip() == "echoed 9"
    stats = node.stats()
    assert stats["table"]["refused_full_total"] >= 1
    assert dict(stats["engine"]["drop_reasons"]).get("table-full", 0) >= 1
