"""The cluster agent end to end: three syncd processes, each in its own namespace, real etcd.

See ``tests/integration/failover_lab.py`` for the lab.  Every scenario runs
the claim sampler (etcd claims and the addresses on every node, every few
ms) and checks the invariant on every sample: no VIP address on two running
nodes, and no address on a running node while etcd says another holds it.
Measured times are printed (run with ``-s``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration.failover_lab import (
    NODES,
    REPO,
    VIP_ADDRS,
    VIPS,
    Cluster,
    address_without_claim,
    double_addresses,
    running_cluster,
    wait_for,
)
from tests.integration.netns import netns_available

_why = netns_available()
if _why is None and not os.access("/usr/bin/etcd", os.X_OK):
    _why = "/usr/bin/etcd missing"
pytestmark = [pytest.mark.integration]
if _why is not None:
    pytestmark.append(pytest.mark.skip(reason=_why))


@pytest.fixture
def cluster(tmp_path: str) -> Iterator[Cluster]:
    with running_cluster(str(tmp_path)) as c:
        c.wait_all_up()
        c.start_sampler()
        yield c


def settled(sample: dict[str, object], nodes: tuple[str, ...] = NODES) -> bool:
    vips = sample["vips"]
    addrs = sample["addrs"]
    assert isinstance(vips, dict) and isinstance(addrs, dict)
    if set(vips) != set(VIP_ADDRS):
        return False
    return all(vip in addrs[holder] for vip, holder in vips.items() if holder in nodes)


def check_invariant(c: Cluster, since: float, running: dict[str, tuple[float, float]]) -> int:
    """Every sample since ``since``: no double address among nodes running at that time.

    ``running`` maps a node to a (stopped_from, stopped_until) window in
    which it is not running (its kernel keeps answering for its addresses,
    but its process can do nothing about it).
    """
    assert c.sampler is not None
    samples = c.sampler.since(since)
    for sample in samples:
        live = set()
        for node in NODES:
            stopped_from, stopped_until = running.get(node, (0.0, 0.0))
            if not stopped_from <= sample["t"] < stopped_until:
                live.add(node)
        assert not double_addresses(sample, live), sample
        assert not address_without_claim(sample, live), sample
    return len(samples)


def test_all_up_each_vip_has_one_holder_and_homes_are_respected(cluster: Cluster) -> None:
    assert cluster.sampler is not None
    sample = cluster.sampler.wait(settled, 10.0, "every VIP held")
    for (_vip, home), address in zip(VIPS, VIP_ADDRS, strict=True):
        if home is not None:
            assert sample["vips"][address] == home
        assert sum(address in held for held in sample["addrs"].values()) == 1
    status = cluster.status("fw1")
    assert status is not None and status["state"] == "up" and "10.88.0.101" in status["vips"]
    check_invariant(cluster, 0.0, {})


def test_sigkill_moves_vips_to_survivors_and_the_router_follows(cluster: Cluster) -> None:
    assert cluster.sampler is not None
    cluster.sampler.wait(settled, 10.0, "every VIP held")
    victim = "fw2"
    theirs = [v for v, h in cluster.sampler.latest()["vips"].items() if h == victim]  # type: ignore[index]
    for vip in theirs:
        cluster.lab.run("router", ["ping", "-c", "1", "-W", "1", vip])
        assert cluster.router_mac(vip) == cluster.node_mac(victim)
    killed = time.monotonic()
    cluster.procs[victim].kill()

    def moved(sample: dict[str, object]) -> bool:
        vips = sample["vips"]
        assert isinstance(vips, dict)
        return all(vips.get(v) not in (None, victim) for v in theirs) and settled(sample)

    sample = cluster.sampler.wait(moved, 5.0, "VIPs held by survivors")
    took = sample["t"] - killed
    print(f"\nSIGKILL {victim}: its VIPs {theirs} held again after {took * 1000:.0f} ms")
    assert took < 1.0
    for vip in theirs:
        mac = cluster.node_mac(sample["vips"][vip])

        def router_follows(vip: str = vip, mac: str = mac) -> bool:
            return cluster.router_mac(vip) == mac

        wait_for(router_follows, 1.0, f"router maps {vip} to {mac}")
    # The dead node's kernel keeps its addresses; no running node doubles them.
    check_invariant(cluster, killed, {victim: (killed, float("inf"))})
    survivors = [cluster.status(n) for n in NODES if n != victim]
    assert sum(s["revocations"] for s in survivors if s) >= 1  # confirmed through etcd
    taken = [s["last_failover_ms"] for s in survivors if s and s["failovers"]]
    assert taken, survivors
    print(f"failover event (last heartbeat -> VIPs held): {taken[0]:.0f} ms")
    assert taken[0] < 1000


def test_sigstop_never_two_holders_and_the_node_rejoins(cluster: Cluster) -> None:
    assert cluster.sampler is not None
    cluster.sampler.wait(settled, 10.0, "every VIP held")
    victim = "fw3"
    pid = cluster.procs[victim].pid
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    time.sleep(2.0)
    resumed = time.monotonic()
    os.kill(pid, signal.SIGCONT)

    def dropped(sample: dict[str, object]) -> bool:
        addrs = sample["addrs"]
        assert isinstance(addrs, dict)
        return not addrs[victim]

    sample = cluster.sampler.wait(dropped, 3.0, f"{victim} takes its addresses off")
    print(f"\nSIGSTOP {victim} 2 s: addresses off {1000 * (sample['t'] - resumed):.0f} ms "
          "after SIGCONT")  # fmt: skip
    cluster.wait_all_up(timeout=20.0)
    cluster.sampler.wait(settled, 10.0, "settled again")
    # While stopped its kernel answers; from resume on (plus the removal) nothing doubles.
    window = sample["t"] + 0.001
    check_invariant(cluster, stopped, {victim: (stopped, window)})
    status = cluster.status(victim)
    assert status is not None and status["fences"] >= 1


def test_sync_partition_revokes_the_minority_only(cluster: Cluster) -> None:
    assert cluster.sampler is not None
    cluster.sampler.wait(settled, 10.0, "every VIP held")
    before = {n: cluster.status(n) for n in ("fw2", "fw3")}
    cut = time.monotonic()
    cluster.partition("fw1")
    try:

        def minority_out(sample: dict[str, object]) -> bool:
            vips = sample["vips"]
            members = sample["members"]
            assert isinstance(vips, dict) and isinstance(members, dict)
            return (
                "fw1" not in vips.values()
                and members.get("fw2") == "up"
                and members.get("fw3") == "up"
                and members.get("fw1") != "up"
                and settled(sample, ("fw2", "fw3"))
            )

        sample = cluster.sampler.wait(minority_out, 5.0, "fw1 revoked, VIPs on fw2/fw3")
        print(f"\npartition fw1: VIPs on the majority after {1000 * (sample['t'] - cut):.0f} ms")
        time.sleep(1.0)
        for node in ("fw2", "fw3"):
            status = cluster.status(node)
            was = before[node]
            assert status is not None and was is not None and status["state"] == "up"
            assert (status["fences"], status["epoch"]) == (was["fences"], was["epoch"]), (
                cluster.log(node)[-3000:]
            )
        check_invariant(cluster, cut, {})
    finally:
        cluster.partition("fw1", cut=False)
    cluster.wait_all_up(timeout=20.0)


def test_drain_moves_vips_away(cluster: Cluster) -> None:
    assert cluster.sampler is not None
    cluster.sampler.wait(settled, 10.0, "every VIP held")
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "node", "drain", "--socket", cluster.control("fw2")],
        capture_output=True, text=True, cwd=REPO, timeout=20, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr

    def drained(sample: dict[str, object]) -> bool:
        vips, members = sample["vips"], sample["members"]
        assert isinstance(vips, dict) and isinstance(members, dict)
        return "fw2" not in vips.values() and "fw2" not in members and settled(sample)

    sample = cluster.sampler.wait(drained, 10.0, "fw2 drained")
    print(f"\ndrain fw2: done after {1000 * (sample['t'] - started):.0f} ms")
    check_invariant(cluster, started, {})
    status = cluster.status("fw2")
    assert status is not None and status["state"] == "left" and status["vips"] == []
