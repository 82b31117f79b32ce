"""`stockade lab`: a 3-node lab comes up, carries traffic, and goes away cleanly.

Runs the real CLI (`python -m node.cli lab ...`) as a user would, in
`--mode sync` (static peers, VIPs placed by the lab: works before the
cluster agent is wired).  Uses `--base 10.239` so a developer's own lab on
the default 10.231 addresses is not disturbed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos.lab.build import LabNames, lab_namespaces, pid_alive
from chaos.lab.cluster_lab import ETCD_NICE
from chaos.lab.state import state_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not Path("/usr/bin/etcd").exists(), reason="needs etcd"),
]

BASE = "10.239"


def _lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "node.cli", "lab", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = f"t{os.getpid() % 100000}"
    try:
        yield name
    finally:
        _lab("down", "--name", name)
        assert not lab_namespaces(LabNames(name))


def _pids(state: dict[str, object]) -> list[int]:
    nodes = state["nodes"]
    assert isinstance(nodes, dict)
    pids = [n["pid"] for n in nodes.values()]
    pids.append(state["etcd"]["pid"])  # type: ignore[index]
    pids.append(state["traffic"]["server_pid"])  # type: ignore[index]
    return [int(p) for p in pids]


def test_lab_up_traffic_status_down(lab_name: str) -> None:
    up = _lab("up", "--name", lab_name, "--nodes", "3", "--mode", "sync", "--base", BASE)
    assert up.returncode == 0, up.stderr + up.stdout
    again = _lab("up", "--name", lab_name, "--nodes", "3", "--mode", "sync", "--base", BASE)
    assert again.returncode == 1 and "already up" in again.stderr

    state = json.loads((state_dir(lab_name) / "lab.json").read_text())
    assert state["status"] == "up" and state["mode"] == "sync"
    assert len(state["namespaces"]) == 8
    assert all(pid_alive(p) for p in _pids(state))
    # etcd gets syncd's CPU share, every thread of it (chaos.lab.cluster_lab).
    etcd_tasks = Path(f"/proc/{state['etcd']['pid']}/task").iterdir()
    assert {int(Path(t, "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in etcd_tasks} == {
        ETCD_NICE
    }

    status = _lab("status", "--name", lab_name, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    s = json.loads(status.stdout)
    assert all(s["namespaces"].values())
    assert s["etcd"]["healthy"] and s["traffic_server"]
    assert all(n["ready"] for n in s["nodes"].values())
    for ip, vip in s["vips"].items():
        assert vip["held_by"] == [vip["home"]], ip

    traffic = _lab("traffic", "--name", lab_name, "--seconds", "3", "--long-lived", "4", "--json")
    report = json.loads(traffic.stdout)
    assert traffic.returncode == 0 and report["clean"], traffic.stdout
    ll = report["long_lived"]
    assert ll["resets"] == 0 and ll["stalls"] == 0
    assert all(c["echoed"] > 1000 for c in ll["per_connection"])
    assert report["churn"]["ok"] >= 50 and report["churn"]["failed"] == 0
    assert report["udp"]["failed"] == 0 and report["ping"]["failed"] == 0

    pids = _pids(state)
    down = _lab("down", "--name", lab_name)
    assert down.returncode == 0, down.stderr
    assert not lab_namespaces(LabNames(lab_name))
    assert not any(pid_alive(p) for p in pids)
    assert not state_dir(lab_name).exists()
    assert not Path(f"/sys/class/net/stkl-{lab_name}").exists()


def test_down_after_half_finished_up(lab_name: str) -> None:
    # Leftovers by hand: two of the lab's namespaces, one with a process in it.
    names = LabNames(lab_name)
    for host in ("client", "fw1"):
        subprocess.run(["ip", "netns", "add", names.ns(host)], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", names.ns("fw1"), "sleep", "300"])
    try:
        down = _lab("down", "--name", lab_name)
        assert down.returncode == 0, down.stderr
        assert not lab_namespaces(names)
        assert sleeper.wait(timeout=5) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()

    # A builder killed mid-way: whatever it had made, `down` removes.
    argv = [sys.executable, "-m", "node.cli", "lab", "up", "--name", lab_name]
    builder = subprocess.Popen(
        [*argv, "--nodes", "2", "--mode", "standalone", "--base", BASE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(lab_namespaces(names)) < 3:
        time.sleep(0.02)
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    assert lab_namespaces(names), "the builder made nothing before it was killed"
    down = _lab("down", "--name", lab_name)
    assert down.returncode == 0, down.stderr
    assert not lab_namespaces(names)
    assert not state_dir(lab_name).exists()
    assert not Path(f"/sys/class/net/stkl-{lab_name}").exists()
