"""``stockade status`` against a real etcd (tests/etcd_fixture.py).

The test itself writes member, status, VIP and event keys in contract C's
shape (docs/status.md), as the cluster agent would, then runs the real CLI
as a subprocess.  Follow mode must show an event written meanwhile within
1 s; the measured delay is printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aetcd
import pytest

from cluster.etcd_server import free_port

pytest_plugins = ["tests.etcd_fixture"]
pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def status_value(node: str, now: float, vips: list[str], **over: Any) -> bytes:
    body: dict[str, Any] = {
        "node_id": node, "epoch": 1, "state": "up", "since": now - 60, "updated": now,
        "address": f"127.0.0.1:74{node[-1]}0", "vips": vips,
        "flows": {"own": 10, "replica": 20, "entries": 30, "capacity": 1000},
        "peers": {}, "resync": {"active": False, "progress": 1.0, "done_at": now - 59},
        "rules": {"revision": 1, "sha256": None, "policy": None},
        "etcd": {"degraded": False, "failures": 0},
        "filter": {"connected": True, "synced": True},
    }  # fmt: skip
    body.update(over)
    return json.dumps(body, separators=(",", ":")).encode()


def member_value(node: str, vips: list[str]) -> bytes:
    body = {"address": f"127.0.0.1:74{node[-1]}0", "epoch": 1, "node_id": node, "state": "up",
            "vips": sorted(vips)}  # fmt: skip
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def event_value(seq: int, node: str, kind: str, detail: str, ms: float | None = None) -> bytes:
    body = {"seq": seq, "ts": time.time(), "node": node, "kind": kind, "detail": detail,
            "duration_ms": ms}  # fmt: skip
    return json.dumps(body).encode()


class Cluster:
    """Writes one cluster's keys the way the agent does (one lease per node)."""

    def __init__(self, endpoint: str, cluster_id: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.client = aetcd.Client(host, int(port), timeout=5)
        self.prefix = f"/stockade/{cluster_id}/".encode()
        self.leases: dict[str, Any] = {}

    async def node(self, node: str, vips: list[str], **status: Any) -> None:
        lease = self.leases.get(node) or await self.client.lease(60)
        self.leases[node] = lease
        p = self.prefix
        await self.client.put(p + b"epochs/" + node.encode(), b"1")
        await self.client.put(
            p + b"members/" + node.encode(), member_value(node, vips), lease=lease
        )
        await self.client.put(
            p + b"status/" + node.encode(), status_value(node, time.time(), vips, **status),
            lease=lease,
        )  # fmt: skip
        for vip in vips:
            await self.client.put(p + b"vips/" + vip.encode(), node.encode(), lease=lease)

    async def kill(self, node: str) -> None:
        await self.client.revoke_lease(self.leases.pop(node).id)

    async def event(self, seq: int, node: str, kind: str, detail: str, ms: float | None = None):
        key = self.prefix + f"events/{node}/{seq % 256:03d}".encode()
        await self.client.put(key, event_value(seq, node, kind, detail, ms))

    async def rules(self, revision: int, text: str) -> None:
        body = json.dumps({"text": text, "stored_at": time.time(), "comment": ""}).encode()
        await self.client.put(self.prefix + f"rules/{revision:010d}".encode(), body)
        await self.client.put(self.prefix + b"rules/current", str(revision).encode())


def do(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def with_cluster(endpoint: str, cluster_id: str, body: Any) -> Any:
    async def run() -> Any:
        c = Cluster(endpoint, cluster_id)
        async with c.client:
            return await body(c)

    return do(run())


def stockade(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)  # fmt: skip


def test_status_reads_what_the_agents_wrote(etcd, cluster_id):
    async def setup(c: Cluster) -> None:
        await c.rules(1, "default: accept\n")
        await c.rules(2, "default: drop\n")
        await c.node("fw1", ["10.10.0.101"], peers={"fw2": {"state": "up", "lag_p99_ms": 1.5}})
        await c.node("fw2", ["10.10.0.102"], peers={"fw1": {"state": "up", "lag_p99_ms": 2.5}})
        await c.event(1, "fw1", "joined", "epoch 1")

    with_cluster(etcd, cluster_id, setup)
    done = stockade("status", "--etcd", etcd, "--cluster", cluster_id)
    assert done.returncode == 3, done.stdout + done.stderr  # both run revision 1, current is 2
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"cluster {cluster_id}: DEGRADED  2/2 up")
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("fw1          up") for line in lines)
    assert "joined" in done.stdout and "\x1b[" not in done.stdout

    async def converge(c: Cluster) -> None:  # both now run revision 2's exact text
        import hashlib

        sha = hashlib.sha256(b"default: drop\n").hexdigest()
        for node, vip in (("fw1", "10.10.0.101"), ("fw2", "10.10.0.102")):
            await c.node(node, [vip], rules={"revision": 2, "sha256": sha})

    with_cluster(etcd, cluster_id, converge)
    done = stockade("status", "--etcd", etcd, "--cluster", cluster_id, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["health"] == "healthy" and doc["rules"]["current"] == 2
    assert doc["etcd"]["reachable"] and doc["etcd"]["leader"] == "stockade-test"
    assert 0 < doc["etcd"]["latency_ms"] < 1000
    assert [(v["address"], v["holder"], v["ok"]) for v in doc["vips"]] == [
        ("10.10.0.101", "fw1", True), ("10.10.0.102", "fw2", True)]  # fmt: skip
    assert {n["node_id"]: n["state"] for n in doc["nodes"]} == {"fw1": "up", "fw2": "up"}


def test_a_dead_node_is_down_and_critical(etcd, cluster_id):
    async def setup(c: Cluster) -> None:
        await c.node("fw1", ["10.10.0.101"])
        await c.node("fw2", ["10.10.0.102"])
        await c.kill("fw2")  # lease revoked: its member, status and VIP claim vanish

    with_cluster(etcd, cluster_id, setup)
    done = stockade("status", "--etcd", etcd, "--cluster", cluster_id, "--json")
    assert done.returncode == 4, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    states = {n["node_id"]: n["state"] for n in doc["nodes"]}
    assert states == {"fw1": "up", "fw2": "down"}
    assert {p["code"] for p in doc["problems"] if p["subject"] == "fw2"} == {"down"}


def test_unreachable_etcd_and_bad_input_exit_codes():
    port = free_port()
    started = time.monotonic()
    done = stockade("status", "--etcd", f"127.0.0.1:{port}", "--timeout", "0.5")
    took = time.monotonic() - started
    print(f"\nstatus against a refused port failed in {took:.2f} s (process start included)")
    assert done.returncode == 1 and done.stdout == ""
    assert f"etcd at 127.0.0.1:{port} is unreachable" in done.stderr
    assert "Traceback" not in done.stderr
    done = stockade("status", "--etcd", "127.0.0.1:2379", "--cluster", "bad/id")
    assert done.returncode == 2 and "cluster id" in done.stderr
    done = stockade("status", "--etcd", "nonsense")
    assert done.returncode == 2 and "host:port" in done.stderr
    done = stockade("status", "--lab", f"no-such-lab-{os.getpid()}")
    assert done.returncode == 2 and "no lab" in done.stderr


class Follower:
    """``stockade status --follow --json`` as a subprocess, read line by line."""

    def __init__(self, etcd: str, cluster_id: str) -> None:
        argv = ["status", "--etcd", etcd, "--cluster", cluster_id, "--follow", "--json"]
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", *argv], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.buffer = b""

    def line(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\n", 1)
        doc: dict[str, Any] = json.loads(raw)
        return doc

    def until(self, kind: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            doc = self.line(left)
            if doc is None:
                return None
            if doc["type"] == kind:
                return doc
        return None

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


@pytest.fixture
def follower(etcd: str, cluster_id: str) -> Iterator[Follower]:
    f = Follower(etcd, cluster_id)
    try:
        yield f
    finally:
        err = f.stop()
        assert "Traceback" not in err, err


def test_follow_tails_events_within_a_second_and_redraws_on_change(etcd, cluster_id, follower):
    delays = []

    async def scenario(c: Cluster) -> None:
        await c.node("fw1", ["10.10.0.101"])
        await c.node("fw2", ["10.10.0.102"])
        first = await asyncio.to_thread(follower.until, "status", 10)
        assert first is not None and first["health"] in ("healthy", "degraded")
        for seq in range(1, 4):
            written = time.monotonic()
            await c.event(seq, "fw1", "rules-applied", f"revision {seq}")
            got = await asyncio.to_thread(follower.until, "event", 1.0)
            assert got is not None, f"event {seq} not shown within 1 s"
            delays.append(time.monotonic() - written)
            assert (got["seq"], got["node"], got["kind"]) == (seq, "fw1", "rules-applied")
        await c.kill("fw2")
        await c.event(4, "fw1", "failover", "fw2: 10.10.0.102", 180.5)

    with_cluster(etcd, cluster_id, scenario)
    print(f"\nevent shown by --follow after {', '.join(f'{d * 1000:.0f}' for d in delays)} ms")
    got = follower.until("event", 2)
    assert got is not None and got["kind"] == "failover" and got["duration_ms"] == 180.5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        doc = follower.until("status", deadline - time.monotonic())
        assert doc is not None, "no redraw after fw2 died"
        if {n["node_id"]: n["state"] for n in doc["nodes"]}.get("fw2") == "down":
            assert doc["health"] == "critical"
            assert doc["failovers"][-1]["detail"] == "fw2: 10.10.0.102"
            break
    else:
        pytest.fail("fw2 never shown down")
