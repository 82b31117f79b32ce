"""Fixtures for tests that run a real node in network namespaces.

``topo`` builds a fresh client -- fw -- server topology per test (see
``netns.py``); ``start_node`` starts ``python -m node.cli node run`` inside
the fw namespace with a config and rules written to a private temporary
directory, waits for its ready line and always stops it at the end.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from node.control import request
from tests.integration.netns import AsymTopology, Topology, netns_available

READY_TIMEOUT = 15.0

# Clients 10.10.1.0/24 reach servers 10.10.2.0/24 on 8000-8100 (TCP) and 53
# (UDP); SMTP is refused with a RST; ping both families; the rest dropped.
RULES = """\
default: drop
established: accept
invalid: drop
rules:
  - name: no-smtp
    from: [10.10.1.0/24, "fd00:10:1::/64"]
    proto: tcp
    dport: 25
    action: reject
  - name: web
    from: [10.10.1.0/24, "fd00:10:1::/64"]
    to: [10.10.2.0/24, "fd00:10:2::/64"]
    proto: tcp
    dport: "8000-8100"
    action: accept
  - name: dns
    from: [10.10.1.0/24, "fd00:10:1::/64"]
    to: [10.10.2.0/24, "fd00:10:2::/64"]
    proto: udp
    dport: 53
    action: accept
  - name: ping
    from: 10.10.1.0/24
    proto: icmp
    icmp-type: echo-request
    action: accept
  - name: ping6
    from: "fd00:10:1::/64"
    proto: icmpv6
    icmp-type: echo-request
    action: accept
"""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every integration test at once, with the reason, where namespaces cannot work."""
    integration = [item for item in items if item.get_closest_marker("integration")]
    if not integration:
        return
    reason = netns_available()
    if reason is not None:
        for item in integration:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as t:
        yield t


class NodeProcess:
    """A node running in the fw namespace, driven through signals and its control socket."""

    def __init__(
        self, topo: Topology, workdir: str, config: dict[str, Any], rules: str,
        ns: str | None = None, node_id: str = "fw1",
    ) -> None:  # fmt: skip
        self.topo = topo
        self.ns = ns or topo.fw
        self.node_id = node_id
        self.workdir = workdir
        self.rules_path = os.path.join(workdir, "rules.yaml")
        self.config_path = os.path.join(workdir, "node.yaml")
        self.socket = os.path.join(workdir, "ctl.sock")
        self.write_rules(rules)
        full = {"node_id": node_id, "rules": "rules.yaml", "control_socket": "ctl.sock", **config}
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(full, f)
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_path = os.path.join(workdir, "stderr.log")

    def write_rules(self, text: str) -> None:
        tmp = self.rules_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.rules_path)

    def start(self, ready: bool = True) -> NodeProcess:
        """Launch; with ``ready`` wait for the ready line (else the test waits)."""
        argv = [sys.executable, "-m", "node.cli", "node", "run", "--config", self.config_path]
        with open(self.stderr_path, "a", encoding="utf-8") as err:
            self.proc = self.topo.popen(self.ns, argv, stderr=err)
        if ready:
            self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(f"stockade node {self.node_id} ready"):
                    return
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"node did not become ready; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8") as f:
            return f.read()

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return request(self.socket, {"cmd": cmd, **args}, timeout=5.0)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        # `ip netns exec` execs the command, so the PID is the node's own.
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=5)


@pytest.fixture
def start_node(topo: Topology) -> Iterator[Callable[..., NodeProcess]]:
    """``start_node(config={...}, rules=TEXT)`` -> a ready :class:`NodeProcess`.

    ``ready=False`` only launches it (for nodes expected to fail).
    """
    with node_starter(topo) as start:
        yield start


@pytest.fixture
def asym() -> Iterator[AsymTopology]:
    with AsymTopology() as t:
        yield t


@pytest.fixture
def start_asym_node(asym: AsymTopology) -> Iterator[Callable[..., NodeProcess]]:
    """As ``start_node``, in the asymmetric topology (give ``ns`` and ``node_id``)."""
    with node_starter(asym) as start:
        yield start


@contextlib.contextmanager
def node_starter(topo: Topology) -> Iterator[Callable[..., NodeProcess]]:
    workdir = tempfile.mkdtemp(prefix="stk-node-")  # short: unix socket path limit
    nodes: list[NodeProcess] = []

    def start(
        config: dict[str, Any] | None = None,
        rules: str = RULES,
        ready: bool = True,
        name: str = "a",
        ns: str | None = None,
        node_id: str = "fw1",
    ) -> NodeProcess:
        # Nodes of one name share a directory (config, rules, control socket),
        # as a restarted node does.
        os.makedirs(os.path.join(workdir, name), exist_ok=True)
        node = NodeProcess(topo, os.path.join(workdir, name), config or {}, rules, ns, node_id)
        nodes.append(node)
        return node.start(ready)

    try:
        yield start
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                try:
                    node.stop(timeout=5)
                except subprocess.TimeoutExpired:
                    node.kill()
        shutil.rmtree(workdir, ignore_errors=True)
