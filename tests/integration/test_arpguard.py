"""The ARP guard on a real kernel: a node answers ARP for a VIP only while its agent keeps it alive.

Two namespaces joined by a veth: ``node`` carries the VIP and the guard,
``router`` asks for the VIP with raw ARP requests.  Root only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from cluster.arpguard import GUARD_TABLE, ArpGuard

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, nft)"),
]

T = TypeVar("T")
VIP = "10.251.0.10"
ROUTER = "10.251.0.1"


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    node, router = f"stk-ag-n{os.getpid()}", f"stk-ag-r{os.getpid()}"
    try:
        _ip("netns", "add", node)
        _ip("netns", "add", router)
        _ip("-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "r0", "netns", router)
        _ip("-n", node, "addr", "add", f"{VIP}/24", "dev", "up0")
        _ip("-n", router, "addr", "add", f"{ROUTER}/24", "dev", "r0")
        _ip("-n", node, "link", "set", "up0", "up")
        _ip("-n", router, "link", "set", "r0", "up")
        yield node, router
    finally:
        for ns in (node, router):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in_netns(name: str) -> None:
    from pyroute2.netns import setns  # Python 3.11 has no os.setns

    setns(name, flags=0)


def _answers(router: str, vip: str, wait: float = 0.3) -> bool:
    """Send one ARP request for ``vip`` from the router namespace; True if a reply came."""
    code = f"""
import socket, struct, time, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("r0", 0)); mac = s.getsockname()[4]
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton("{ROUTER}"),
                  b"\\0" * 6, socket.inet_aton("{vip}"))
s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp)
s.settimeout(0.05); end = time.monotonic() + {wait}
while time.monotonic() < end:
    try:
        frame = s.recv(128)
    except TimeoutError:
        continue
    if frame[20:22] == b"\\x00\\x02" and frame[28:32] == socket.inet_aton("{vip}"):
        sys.exit(0)
sys.exit(1)
"""
    argv = ["ip", "netns", "exec", router, "python3", "-c", code]
    return subprocess.run(argv, capture_output=True).returncode == 0


def _in_node(node: str, scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an asyncio scenario in a worker thread moved into ``node`` (setns is per thread)."""

    def run() -> T:
        _in_netns(node)
        return asyncio.run(scenario())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result(timeout=30)


def test_arp_for_the_vip_stops_when_keepalives_stop_and_resumes(pair: tuple[str, str]) -> None:
    node, router = pair
    assert _answers(router, VIP)  # no guard: the kernel answers

    async def scenario() -> list[tuple[str, bool]]:
        seen: list[tuple[str, bool]] = []
        # A timeout long enough for a loaded machine to start the asking
        # process (python3 in another namespace) before the element expires.
        guard = ArpGuard(["up0"], [f"{VIP}/24", "10.251.0.11/24"], timeout=1.5)
        await guard.install()
        try:
            guard.keepalive()
            seen.append(("alive", _answers(router, VIP)))
            await asyncio.sleep(3.0)  # no keepalive for twice the timeout: "frozen"
            seen.append(("silent", _answers(router, VIP)))
            guard.keepalive()
            seen.append(("alive again", _answers(router, VIP)))
            stats = guard.statistics()
            assert stats.installed and stats.keepalives == 2 and stats.errors == 0
        finally:
            await guard.remove()
        listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        seen.append(("removed", GUARD_TABLE not in listed.stdout))
        return seen

    seen = _in_node(node, scenario)
    assert seen == [("alive", True), ("silent", False), ("alive again", True), ("removed", True)]
    assert _answers(router, VIP)  # guard gone: answering as before


def test_shut_stops_arp_at_once_and_keepalives_stay_off_until_reopen(
    pair: tuple[str, str],
) -> None:
    """A revoked node's beacon thread shuts the guard: no waiting for the timeout."""
    node, router = pair

    async def scenario() -> list[tuple[str, bool]]:
        seen: list[tuple[str, bool]] = []
        guard = ArpGuard(["up0"], [f"{VIP}/24"], timeout=5.0)  # expiry plays no part here
        await guard.install()
        try:
            guard.keepalive()
            seen.append(("alive", _answers(router, VIP)))
            guard.shut("revoked")
            seen.append(("shut", _answers(router, VIP)))
            guard.keepalive()  # the loop carries on: it must not re-open ARP
            seen.append(("keepalive while shut", _answers(router, VIP)))
            guard.reopen("revoked")
            guard.keepalive()
            seen.append(("reopened", _answers(router, VIP)))
        finally:
            await guard.remove()
        return seen

    seen = _in_node(node, scenario)
    assert seen == [
        ("alive", True), ("shut", False), ("keepalive while shut", False), ("reopened", True)
    ]  # fmt: skip


def test_the_node_keeps_forwarding_and_its_own_address_answers(pair: tuple[str, str]) -> None:
    """Only ARP with a VIP as sender is held back: other addresses of the node answer."""
    node, router = pair
    _ip("-n", node, "addr", "add", "10.251.0.20/24", "dev", "up0")

    async def scenario() -> tuple[bool, bool]:
        guard = ArpGuard(["up0"], [f"{VIP}/24"], timeout=0.2)
        await guard.install()
        try:
            await asyncio.sleep(0.3)  # never kept alive
            return _answers(router, VIP), _answers(router, "10.251.0.20")
        finally:
            await guard.remove()

    vip_answers, own_answers = _in_node(node, scenario)
    assert (vip_answers, own_answers) == (False, True)


def test_keepalive_frames_never_leave_the_host(pair: tuple[str, str]) -> None:
    node, router = pair
    code = """
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind(("r0", 0)); s.settimeout(1.0)
print("READY", flush=True)
try:
    s.recv(128); print("LEAKED")
except TimeoutError:
    print("NONE")
"""
    argv = ["ip", "netns", "exec", router, "python3", "-c", code]
    listener = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "READY"

    async def scenario() -> None:
        guard = ArpGuard(["up0"], [f"{VIP}/24"], timeout=0.5)
        await guard.install()
        try:
            for _ in range(5):
                guard.keepalive()
                await asyncio.sleep(0.05)
        finally:
            await guard.remove()

    _in_node(node, scenario)
    out, _ = listener.communicate(timeout=10)
    assert out.strip() == "NONE"


VIP6 = "fd00:251::10"
OWN6 = "fd00:251::20"


def _answers6(router: str, address: str) -> bool:
    """Resolve ``address`` afresh from the router (neighbour solicitation) and ping it."""
    _ip("-n", router, "-6", "neigh", "flush", "dev", "r0")
    argv = ["ip", "netns", "exec", router, "ping", "-6", "-c", "1", "-W", "1", address]
    return subprocess.run(argv, capture_output=True).returncode == 0


def test_ipv6_vip_stops_answering_neighbour_solicitations_when_silent(
    pair: tuple[str, str],
) -> None:
    """The NA for a VIP leaves from the VIP: the guard holds it back like ARP,
    while the node's own IPv6 address keeps answering."""
    node, router = pair
    _ip("-n", router, "addr", "add", "fd00:251::1/64", "dev", "r0", "nodad")
    _ip("-n", node, "addr", "add", f"{VIP6}/64", "dev", "up0", "nodad")
    _ip("-n", node, "addr", "add", f"{OWN6}/64", "dev", "up0", "nodad")
    assert _answers6(router, VIP6)  # no guard: the kernel answers

    async def scenario() -> list[tuple[str, bool]]:
        seen: list[tuple[str, bool]] = []
        guard = ArpGuard(["up0"], [f"{VIP6}/64"], timeout=5.0)
        await guard.install()
        try:
            guard.keepalive()
            seen.append(("alive", _answers6(router, VIP6)))
            guard.shut("revoked")
            seen.append(("shut", _answers6(router, VIP6)))
            seen.append(("own address while shut", _answers6(router, OWN6)))
            guard.reopen("revoked")
            guard.keepalive()
            seen.append(("reopened", _answers6(router, VIP6)))
        finally:
            await guard.remove()
        return seen

    seen = _in_node(node, scenario)
    assert seen == [
        ("alive", True), ("shut", False), ("own address while shut", True), ("reopened", True)
    ]  # fmt: skip
