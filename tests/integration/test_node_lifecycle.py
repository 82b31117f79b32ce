"""Node lifecycle: fast path, clean stop, crash and restart, rules reload."""

from __future__ import annotations

import signal
import time

import pytest

from tests.integration.conftest import RULES
from tests.integration.netns import SERVER4, Topology

pytestmark = pytest.mark.integration

BULK = 8 * 1024 * 1024
MSS = 1448  # IPv4 over a 1500-byte MTU with TCP timestamps


def our_traces(topo: Topology) -> list[str]:
    """Every line of the fw namespace's rules that mentions Stockade."""
    lines = []
    for tool in ("iptables-save", "ip6tables-save"):
        saved = topo.exec(topo.fw, [tool]).stdout
        lines += [x for x in saved.splitlines() if "STK-" in x or "stockade:" in x]
    return lines


def bulk_transfer(topo: Topology, nbytes: int) -> None:
    topo.server_tool(topo.server, "tcp-send", SERVER4, "8080", str(nbytes))
    result = topo.tool(topo.client, "tcp-receive", SERVER4, "8080", "20", timeout=30)
    assert result.split()[:2] == ["bytes", str(nbytes)], result


def test_fast_path_offloads_a_bulk_transfer_and_clean_stop_removes_everything(topo, start_node):
    node = start_node()
    before = node.stats()["adapter"]["packets_total"]
    bulk_transfer(topo, BULK)
    stats = node.stats()
    seen = stats["adapter"]["packets_total"] - before
    data_segments = BULK // MSS
    print(f"fast path: {seen} packets seen by userspace for {data_segments}+ data segments")
    assert stats["adapter"]["offloaded_total"] >= 1
    assert seen < data_segments // 20
    # The FIN took the flow back from the kernel, so the table saw the whole
    # close and agrees with the kernel: TIME_WAIT, not stuck in LAST_ACK.
    assert stats["adapter"]["unoffloaded_total"] >= 1
    states = [f["state"] for f in node.request("flows")["flows"] if f["dport"] == 8080]
    assert states == ["TIME_WAIT"], states
    assert our_traces(topo)
    assert node.stop() == 0
    assert our_traces(topo) == []


def test_without_fast_path_every_packet_reaches_userspace(topo, start_node):
    node = start_node(config={"fast_path": {"enabled": False}})
    nbytes = 2 * 1024 * 1024
    bulk_transfer(topo, nbytes)
    stats = node.stats()
    print(f"no fast path: {stats['adapter']['packets_total']} packets for {nbytes} bytes")
    assert stats["adapter"]["packets_total"] >= nbytes // MSS
    assert stats["adapter"]["offloaded_total"] == 0
    assert not any("STK-OFFLOAD" in x for x in our_traces(topo))


def test_after_sigkill_traffic_stops_and_the_next_start_cleans_up(topo, start_node):
    node = start_node()
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    node.kill()
    assert our_traces(topo), "a killed node cannot remove its rules"
    # Fail closed: the rules still queue to a queue nobody reads.
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "1") == "timeout"
    again = start_node()
    assert again.stats()["dataplane"]["stale_jumps_removed_total"] == 2  # IPv4 and IPv6
    jumps = [x for x in our_traces(topo) if x.startswith("-A FORWARD")]
    assert len(jumps) == 2
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"
    assert again.stop() == 0
    assert our_traces(topo) == []


BROKEN = RULES.replace("action: accept\n  - name: dns", "acton: accept\n  - name: dns")
ONLY_9000 = RULES.replace('dport: "8000-8100"', "dport: 9000")


def test_control_reload_refuses_a_broken_file_and_swaps_a_good_one(topo, start_node):
    node = start_node()
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    running = node.stats()["ruleset"]["revision"]

    node.write_rules(BROKEN)
    reply = node.request("reload")
    assert reply["ok"] is False
    assert "rules.yaml:" in reply["error"] and "acton" in reply["error"]
    assert node.stats()["ruleset"]["revision"] == running
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"

    node.write_rules(ONLY_9000)
    reply = node.request("reload")
    assert reply["ok"] is True and reply["revision"] != running
    assert node.stats()["engine"]["ruleset_swaps_total"] == 1
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "1") == "timeout"


def wait_until(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sighup_reloads_the_same_way(topo, start_node):
    node = start_node(rules=ONLY_9000)
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    running = node.stats()["ruleset"]["revision"]

    node.write_rules(BROKEN)
    node.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in node.stderr())
    assert node.stats()["ruleset"]["revision"] == running

    node.write_rules(RULES)
    node.signal(signal.SIGHUP)
    assert wait_until(lambda: node.stats()["engine"]["ruleset_swaps_total"] == 1)
    assert node.stats()["ruleset"]["revision"] != running
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"


def test_a_broken_rules_file_stops_the_start_with_exit_2_and_touches_nothing(topo, start_node):
    node = start_node(rules=BROKEN, ready=False)
    assert node.proc.wait(timeout=15) == 2
    assert "rules.yaml:" in node.stderr() and "acton" in node.stderr()
    assert our_traces(topo) == []


def test_a_second_node_on_the_same_queue_fails_and_leaves_the_first_alone(topo, start_node):
    first = start_node()
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    rules_before = our_traces(topo)
    second = start_node(ready=False, name="b")
    assert second.proc.wait(timeout=15) == 1
    assert "cannot bind NFQUEUE 0" in second.stderr()
    assert our_traces(topo) == rules_before
    assert first.request("ping")["ok"] is True
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"


def test_with_queue_bypass_a_killed_node_fails_open(topo, start_node):
    node = start_node(config={"queue": {"bypass": True}})
    assert any("--queue-bypass" in x for x in our_traces(topo))
    topo.server_tool(topo.server, "tcp-echo", SERVER4, "8080")
    node.kill()
    assert topo.tool(topo.client, "tcp-connect", SERVER4, "8080", "3") == "ok ping"
