"""Two clustered nodes, every flow asymmetric: client -> server via fw1, back via fw2.

Real NFQUEUE filters, each supervising a real syncd (plaintext gRPC over a
veth between the two firewalls).  Neither node ever sees both directions of
a flow: fw2 meets the SYN-ACK (or the UDP reply) before the replica of the
flow fw1 created, and fw1 meets the client's ACK while its flow is still in
SYN_SENT; both are held until syncd delivers the other node's record
(node.hold), so connections open without a retransmission.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import NodeProcess
from tests.integration.netns import FW1_SYNC4, FW2_SYNC4, SERVER4, AsymTopology

pytestmark = pytest.mark.integration

CLUSTER = "asym"
SESSION = {"heartbeat_interval": 0.05, "suspect_after": 0.15, "dead_after": 1.0}


def node_config(node_id: str, listen: str, peer: str, peer_addr: str, **sync: Any) -> dict:
    return {
        "cluster_id": CLUSTER,
        # The filter sees one direction of each flow: windows of the other
        # side are unknown here (as the kernel needs tcp_be_liberal).
        "table": {"tcp_liberal": True}, "fast_path": {"enabled": True},
        "sync": {
            "insecure": True, "listen": f"{listen}:7400",
            "peers": [{"node_id": peer, "address": f"{peer_addr}:7400"}],
            "state_dir": "state", "local_socket": "sync.sock", "control_socket": "syncd.sock",
            "session": SESSION, "recovery_timeout": 1.0, **sync,
        },
    }  # fmt: skip


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def start_pair(
    asym: AsymTopology, start: Callable[..., NodeProcess], **fw1_sync: Any
) -> tuple[NodeProcess, NodeProcess]:
    """Both nodes, ready (not yet synced: a node with supervise: false needs its syncd)."""
    fw1 = start(config=node_config("fw1", FW1_SYNC4, "fw2", FW2_SYNC4, **fw1_sync),
                ns=asym.fw1, node_id="fw1", name="fw1")  # fmt: skip
    fw2 = start(config=node_config("fw2", FW2_SYNC4, "fw1", FW1_SYNC4),
                ns=asym.fw2, node_id="fw2", name="fw2")  # fmt: skip
    return fw1, fw2


def wait_synced(*nodes: NodeProcess) -> None:
    for node in nodes:
        wait_until(lambda n=node: n.stats()["synced"], 15, f"{node.node_id} synced")


def test_every_asymmetric_tcp_connection_and_udp_exchange_succeeds(asym, start_asym_node):
    fw1, fw2 = start_pair(asym, start_asym_node)
    wait_synced(fw1, fw2)
    for node in (fw1, fw2):
        syncd = node.stats()["sync"]["syncd"]
        assert syncd["running"] and syncd["pid"], syncd
    asym.server_tool(asym.server, "tcp-echo", SERVER4, "8080")
    result = asym.tool(asym.client, "tcp-many", SERVER4, "8080", "200", "5", timeout=60)
    ok, failed, seconds = int(result.split()[1]), int(result.split()[3]), float(result.split()[4])
    print(f"200 asymmetric connections: {result}")
    assert (ok, failed) == (200, 0), result
    asym.server_tool(asym.server, "udp-echo", SERVER4, "53")
    for _ in range(5):
        assert asym.tool(asym.client, "udp-request", SERVER4, "53", "2") == "ok ping"
    holds = {n.node_id: n.stats()["sync"]["hold"] for n in (fw1, fw2)}
    for node_id, hold in holds.items():
        print(node_id, {k: v for k, v in hold.items() if not k.startswith("latency_b")})
    released = sum(h["released_by_replica_total"] for h in holds.values())
    assert released > 0
    # fw2 sees every SYN-ACK and UDP reply first without the flow.
    assert holds["fw2"]["released_by_replica_total"] >= 200
    assert all(h["overflow_total"] == 0 and h["waiting"] == 0 for h in holds.values())
    # Without holding, each connection would wait for a retransmission (>= 1 s).
    assert seconds < 200 * 0.5, result
    for node in (fw1, fw2):
        link = node.stats()["sync"]["link"]
        assert link["connected"] and link["bad_frames_total"] == 0, link


def test_a_killed_filter_restarts_and_its_connections_continue(asym, start_asym_node):
    # fw1's syncd runs on its own (supervise: false) and outlives the filter.
    fw1, fw2 = start_pair(asym, start_asym_node, supervise=False)
    argv = [sys.executable, "-m", "syncd.cli", "syncd", "run", "--config", fw1.config_path]
    syncd1 = asym.popen(asym.fw1, argv, stderr=subprocess.DEVNULL)
    wait_synced(fw1, fw2)
    assert fw1.stats()["sync"]["syncd"] is None  # not supervised
    asym.server_tool(asym.server, "tcp-echo", SERVER4, "8080")
    hold = asym.tool_popen(asym.client, "tcp-hold", SERVER4, "8080", "3", "12", "0.3", "10")
    assert hold.stdout is not None
    assert hold.stdout.readline().strip() == "open 3"
    before = {f["sport"] for f in fw1.request("flows")["flows"] if f["dport"] == 8080}
    assert len(before) == 3
    fw1.kill()
    again = start_asym_node(config=node_config("fw1", FW1_SYNC4, "fw2", FW2_SYNC4,
                                               supervise=False),
                            ns=asym.fw1, node_id="fw1", name="fw1")  # fmt: skip
    wait_until(lambda: again.stats()["synced"], 10, "restarted fw1 synced")
    after = {f["sport"] for f in again.request("flows")["flows"] if f["dport"] == 8080}
    assert after == before  # restored from syncd, not re-learned
    out, _ = hold.communicate(timeout=30)
    assert out.strip() == "echoed 36", out
    link = again.stats()["sync"]["link"]
    assert link["chunk_records_total"] >= 3
    assert syncd1.poll() is None
