"""The ARP guard's ``alive`` set read over NETLINK_NETFILTER, on a real kernel.

Two namespaces joined by a veth: ``stk-nftalive-<pid>`` carries the VIP
and the guard table (the same script as ``cluster.arpguard``'s, written
out here), ``stk-nftalive-<pid>-peer`` asks for the VIP with raw ARP
requests.  Checks the codec of ``chaos.samplers`` against the kernel
(ENOENT without the table, the keepalive's element, its expiry) and that
:class:`VipSampler` counts a VIP only while its node would answer ARP.
Root only.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

from chaos.samplers import (
    ALIVE_SET,
    GUARD_TABLE,
    NETLINK_NETFILTER,
    VipSampler,
    _socket_in,
    nft_setelem_dump_request,
    parse_setelem_messages,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, nft)"),
]

T = TypeVar("T")
VIP, OTHER, PEER = "10.252.0.10", "10.252.0.20", "10.252.0.1"
TIMEOUT_MS = 500  # the element's lifetime, as the agent's guard uses
GUARD = f"""
table netdev stockade_vips {{
  set alive {{ type ifname; flags dynamic,timeout; }}
  set vips {{ type ipv4_addr; elements = {{ {VIP} }}; }}
  chain eg_v0 {{
    type filter hook egress device "v0" priority filter; policy accept;
    ether type 0x88b5 update @alive {{ oifname timeout {TIMEOUT_MS}ms }} drop
    arp saddr ip @vips oifname != @alive drop
  }}
}}
"""
# Generous: the machine may be busy with a benchmark.
EXPIRY_DEADLINE = 3.0  # seconds after the keepalive by which the element must be gone


@dataclass(frozen=True)
class Lab:
    node: str
    peer: str


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=20)


def _nft(ns: str, script: str) -> None:
    argv = ["ip", "netns", "exec", ns, "nft", "-f", "-"]
    subprocess.run(argv, input=script, text=True, check=True, capture_output=True, timeout=20)


@pytest.fixture
def lab() -> Iterator[Lab]:
    node, peer = f"stk-nftalive-{os.getpid()}", f"stk-nftalive-{os.getpid()}-peer"
    try:
        _ip("netns", "add", node)
        _ip("netns", "add", peer)
        _ip("-n", node, "link", "add", "v0", "type", "veth", "peer", "name", "r0", "netns", peer)
        _ip("-n", node, "addr", "add", f"{VIP}/24", "dev", "v0")
        _ip("-n", node, "addr", "add", f"{OTHER}/24", "dev", "v0")
        _ip("-n", peer, "addr", "add", f"{PEER}/24", "dev", "r0")
        _ip("-n", node, "link", "set", "v0", "up")
        _ip("-n", peer, "link", "set", "r0", "up")
        yield Lab(node, peer)
    finally:
        for ns in (node, peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _in_ns(ns: str, work: Callable[[], T]) -> T:
    """Run ``work`` on a thread moved into ``ns`` (setns(2) moves only the calling thread)."""
    from pyroute2.netns import setns

    out: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            setns(ns, flags=0)
            out.append(work())
        except BaseException as e:  # handed to the test
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    if failed:
        raise failed[0]
    return out[0]


def _packet_socket(ns: str, ifname: str, proto: int) -> socket.socket:
    def open_() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        s.bind((ifname, 0))
        return s

    return _in_ns(ns, open_)


def _keepalive(sock: socket.socket) -> None:
    """One frame of the agent's ethertype; the guard drops it (ENOBUFS to the sender)."""
    mac = sock.getsockname()[4]
    try:
        sock.send(b"\xff" * 6 + mac + b"\x88\xb5" + b"STKA" + bytes(42))
    except OSError as e:
        if e.errno != errno.ENOBUFS:
            raise


class Dumper:
    """The ``alive`` dump over a NETLINK_NETFILTER socket opened in the namespace."""

    def __init__(self, ns: str) -> None:
        self.sock = _socket_in(ns, NETLINK_NETFILTER)
        self.seq = 0
        self.raw = b""  # the last reply, as the kernel sent it

    def dump(
        self, table: str = GUARD_TABLE, set_name: str = ALIVE_SET
    ) -> tuple[set[str], int | None]:
        self.seq += 1
        self.sock.send(nft_setelem_dump_request(self.seq, table=table, set=set_name))
        names: set[str] = set()
        self.raw = b""
        done, error = False, None
        while not done:
            part = self.sock.recv(65536)
            self.raw += part
            found, done, error = parse_setelem_messages(part, self.seq)
            names |= found
        return names, error

    def close(self) -> None:
        self.sock.close()


def _wait_until(check: Callable[[], bool], deadline: float) -> float | None:
    """Seconds until ``check()`` held (polled every 10 ms), or None at ``deadline`` (monotonic)."""
    start = time.monotonic()
    while time.monotonic() < deadline:
        if check():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def _arp_answered(peer_sock: socket.socket, vip: str, wait: float = 0.3) -> bool:
    """Ask for ``vip`` from the peer; True if a reply with ``vip`` as sender came."""
    mac = peer_sock.getsockname()[4]
    request = struct.pack(
        "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, socket.inet_aton(PEER),
        bytes(6), socket.inet_aton(vip),
    )  # fmt: skip
    peer_sock.send(b"\xff" * 6 + mac + b"\x08\x06" + request)
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        peer_sock.settimeout(left)
        try:
            frame = peer_sock.recv(128)
        except TimeoutError:
            break
        if frame[20:22] == b"\x00\x02" and frame[28:32] == socket.inet_aton(vip):
            return True
    return False


def test_dump_without_the_table_is_enoent(lab: Lab) -> None:
    dumper = Dumper(lab.node)
    try:
        assert dumper.dump() == (set(), -errno.ENOENT)
        _nft(lab.node, GUARD)
        assert dumper.dump() == (set(), None)
        assert dumper.dump(set_name="nosuchset") == (set(), -errno.ENOENT)
        assert dumper.dump(table="nosuchtable") == (set(), -errno.ENOENT)
    finally:
        dumper.close()


def test_keepalive_element_appears_and_expires_from_the_dump(lab: Lab) -> None:
    _nft(lab.node, GUARD)
    dumper = Dumper(lab.node)
    frames = _packet_socket(lab.node, "v0", 0x88B5)
    try:
        _keepalive(frames)
        sent = time.monotonic()
        assert dumper.dump() == ({"v0"}, None)
        key = b"v0" + bytes(14)
        assert key in dumper.raw  # the kernel's own bytes carry the 16-byte name
        gone = _wait_until(lambda: dumper.dump() == (set(), None), sent + EXPIRY_DEADLINE)
        assert gone is not None, f"still listed {EXPIRY_DEADLINE} s after the keepalive"
        waited = time.monotonic() - sent
        assert waited >= TIMEOUT_MS / 1000 * 0.9, f"gone after {waited:.3f} s, before its timeout"
        # The kernel itself skips the expired element (no garbage-collection
        # wait); the parser's expiration-0 filter is only a second line.
        assert key not in dumper.raw
        _keepalive(frames)
        assert dumper.dump() == ({"v0"}, None)
    finally:
        frames.close()
        dumper.close()


def test_the_peer_gets_arp_replies_only_while_alive(lab: Lab) -> None:
    _nft(lab.node, GUARD)
    dumper = Dumper(lab.node)
    frames = _packet_socket(lab.node, "v0", 0x88B5)
    peer = _packet_socket(lab.peer, "r0", 0x0806)
    try:
        assert not _arp_answered(peer, VIP)  # never kept alive
        assert _arp_answered(peer, OTHER)  # not a VIP: answered as usual
        _keepalive(frames)
        assert _arp_answered(peer, VIP)
        sent = time.monotonic()
        assert _wait_until(lambda: dumper.dump()[0] == set(), sent + EXPIRY_DEADLINE) is not None
        assert not _arp_answered(peer, VIP)
    finally:
        peer.close()
        frames.close()
        dumper.close()


def test_vip_sampler_counts_a_vip_only_while_its_node_would_answer(lab: Lab) -> None:
    sampler = VipSampler({"n1": lab.node}, [VIP, "10.252.0.99"])
    frames = _packet_socket(lab.node, "v0", 0x88B5)

    def held() -> tuple[str, ...]:
        sampler.sample(time.monotonic())
        return sampler.samples[-1].holders[VIP]

    try:
        assert held() == ("n1",)  # no guard: the address counts
        _nft(lab.node, GUARD)
        assert held() == () and sampler.arp_held == 1  # guard, never kept alive
        _keepalive(frames)
        assert held() == ("n1",)
        sent = time.monotonic()
        assert _wait_until(lambda: held() == (), sent + EXPIRY_DEADLINE) is not None
        _keepalive(frames)
        _ip("-n", lab.node, "link", "set", "v0", "down")
        assert held() == ()  # alive, but the link is down
        assert sampler.samples[-1].holders["10.252.0.99"] == ()
        assert sampler.errors == 0
    finally:
        frames.close()
        sampler.stop()
