"""ARP dead-man switch: a node whose agent stops running stops answering for the VIPs.

Why.  Fencing needs a running process.  A node whose agent is frozen
(SIGSTOP, a hung VM, a stuck event loop) keeps its VIP addresses, and its
kernel keeps answering ARP for them while the peers, which stopped hearing
it, take the VIPs over: a router that asks then gets two answers, and may
believe the frozen one.  Kernel address lifetimes (``cluster.vip_lifetime``)
end that after about 2 s; IPv4 lifetimes have whole-second granularity, so
they cannot go much lower.

How.  An nftables table in the node's network namespace, on the egress hook
of every VIP interface::

    ether type 0x88b5 update @alive { oifname timeout T } drop
    ether type 0x88b6 delete @alive { oifname } drop
    arp saddr ip @vips oifname != @alive drop
    ip6 saddr @vips6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } \
        oifname != @alive drop

The agent sends one frame of the local experimental ethertype 0x88b5
(IEEE 802) on each VIP interface every T/5 from its event loop (T:
``cluster.arp_guard``, 0.15 s), and after every round of syncd's liveness
beacons from the beacon thread, which sends only while the loop ran within
its stall limit (``syncd.beacon_io``): ARP for the VIPs lives as long as the
peers hear the node, so a loop busy for a moment does not silence it
(:meth:`ArpGuard.keepalive`); the first rule refreshes the interface's
element in the ``alive`` set (and drops the frame: it never leaves the
host); the second drops every ARP packet (replies, requests, gratuitous)
whose sender address is a VIP once the element has expired, and the
fourth does the same for IPv6 neighbour discovery: Linux sends the
neighbour advertisement answering a solicitation for one of its addresses
from that address (``ndisc_send_na``: source = the solicited target when
it is ours), so an NA or NS whose source is a VIP speaks for the VIP.  A frozen
agent (a stopped process, or a loop stuck past the stall limit) sends no
keepalive: within T its kernel no longer speaks for the VIPs,
while addresses, routes and forwarding stay as they are.  When the agent
runs again, its first keepalive re-opens ARP, and it fences (addresses off)
on the stall it measured, as before.

Shutting at once.  A node that is alive but was revoked (its peers stopped
hearing it for a moment) must stop answering before they claim its VIPs,
~40 ms after the revocation, and its event loop may be the slow part.  So
:meth:`ArpGuard.shut` (thread-safe, called from syncd's beacon thread when a
peer's beacon says it revoked us) sends one frame of ethertype 0x88b6 per
interface, whose rule deletes the element: ARP stops within microseconds,
and keepalives stay off until :meth:`ArpGuard.reopen` (the agent registers
again).  The agent also shuts it while it asks etcd whether it is the
isolated one (every peer fell silent at once), and reopens it if etcd
answers.

:func:`guard_ruleset` is pure (the nft script); :class:`ArpGuard` is the
adapter (runs ``nft -f -`` at install and removal, sends the frames).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cluster.errors import Misuse
from cluster.vip import VipError, parse_vip

__all__ = ["GUARD_TABLE", "KEEPALIVE_ETHERTYPE", "ArpGuard", "GuardStats", "guard_ruleset"]

GUARD_TABLE: Final = "stockade_vips"  # netdev family, one per network namespace
KEEPALIVE_ETHERTYPE: Final = 0x88B5  # IEEE 802 local experimental ethertype 1
SHUT_ETHERTYPE: Final = 0x88B6  # IEEE 802 local experimental ethertype 2
_NFT_TIMEOUT: Final = 10.0  # seconds an `nft -f` may take before it is a failure


def guard_ruleset(ifnames: Sequence[str], vips: Sequence[str], timeout: float) -> str:
    """The nft script that (re)creates the guard table (pure).

    Declaring the table, deleting it and declaring it again in one
    transaction replaces a table a previous run left behind atomically.
    """
    if not ifnames:
        raise Misuse("guard_ruleset: no interface")
    if not 0.05 <= timeout <= 60:
        raise Misuse(f"guard_ruleset: timeout {timeout} s is not 0.05..60")
    v4 = sorted({str(parse_vip(v).ip) for v in vips if parse_vip(v).version == 4})
    v6 = sorted({str(parse_vip(v).ip) for v in vips if parse_vip(v).version == 6})
    ms = round(timeout * 1000)
    lines = [
        f"table netdev {GUARD_TABLE} {{}}",
        f"delete table netdev {GUARD_TABLE}",
        f"table netdev {GUARD_TABLE} {{",
        "  set alive { type ifname; flags dynamic,timeout; }",
        f"  set vips {{ type ipv4_addr; {_elements(v4)}}}",
        f"  set vips6 {{ type ipv6_addr; {_elements(v6)}}}",
    ]
    for ifname in sorted(set(ifnames)):
        _check_ifname(ifname)
        lines += [
            f"  chain eg_{ifname.replace('-', '_').replace('.', '_')} {{",
            f'    type filter hook egress device "{ifname}" priority filter; policy accept;',
            f"    ether type {KEEPALIVE_ETHERTYPE:#06x} update @alive {{ oifname timeout {ms}ms }} "
            "drop",
            f"    ether type {SHUT_ETHERTYPE:#06x} delete @alive {{ oifname }} drop",
            "    arp saddr ip @vips oifname != @alive drop",
            "    ip6 saddr @vips6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } "
            "oifname != @alive drop",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _elements(addresses: Sequence[str]) -> str:
    return f"elements = {{ {', '.join(addresses)} }}; " if addresses else ""


def _check_ifname(ifname: str) -> None:
    # Interface names reach an nft script: only what Linux and nft both accept plainly.
    if not (0 < len(ifname) < 16 and all(c.isalnum() or c in "-_." for c in ifname)):
        raise Misuse(f"interface name {ifname!r} cannot be guarded")


def keepalive_frame(mac: bytes, ethertype: int = KEEPALIVE_ETHERTYPE) -> bytes:
    """An Ethernet frame of ``ethertype`` from and to ``mac`` (padded to 60 bytes)."""
    if len(mac) != 6:
        raise Misuse("keepalive_frame: a MAC is 6 bytes")
    if ethertype not in (KEEPALIVE_ETHERTYPE, SHUT_ETHERTYPE):
        raise Misuse(f"keepalive_frame: ethertype {ethertype:#06x} is not the guard's")
    header = mac + mac + ethertype.to_bytes(2, "big")
    return header + b"STKA" + bytes(60 - len(header) - 4)


@dataclass(frozen=True, slots=True)
class GuardStats:
    installed: bool
    keepalives: int  # frames handed to the kernel
    errors: int  # keepalives the kernel refused (counted, never raised)
    shut: tuple[str, ...]  # why shut() closed it (keepalives are not sent); (): open
    shuts: int  # shut() calls that closed an open guard


class ArpGuard:
    """The guard table and the keepalive frames for this namespace's VIP interfaces."""

    def __init__(self, ifnames: Sequence[str], vips: Sequence[str], timeout: float) -> None:
        self.script = guard_ruleset(ifnames, vips, timeout)
        self.ifnames = tuple(sorted(set(ifnames)))
        self.timeout = timeout
        # (socket, keepalive frame, shut frame) per interface; replaced whole,
        # never mutated: shut() reads it from another thread.
        self._sockets: tuple[tuple[socket.socket, bytes, bytes], ...] = ()
        self._installed = False
        self._keepalives = self._errors = self._shuts = 0
        # Why the guard is shut ("revoked", "isolated"); empty: open.  Replaced
        # whole under the lock; keepalive() reads it without.
        self._reasons: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    async def install(self) -> None:
        """Create (or replace) the table and open the sockets; :class:`VipError` if refused."""
        self.close_sockets()  # installing again replaces everything
        await _nft(self.script, "install the ARP guard")
        self._installed = True
        opened: list[tuple[socket.socket, bytes, bytes]] = []
        try:
            for ifname in self.ifnames:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                try:
                    sock.bind((ifname, 0))
                    mac = bytes(sock.getsockname()[4])
                    sock.setblocking(False)
                except OSError:
                    sock.close()
                    raise
                opened.append((sock, keepalive_frame(mac), keepalive_frame(mac, SHUT_ETHERTYPE)))
        except OSError as exc:
            for sock, _, _ in opened:
                sock.close()
            raise VipError("open keepalive socket", str(exc), exc.errno) from exc
        self._sockets = tuple(opened)

    def keepalive(self) -> None:
        """One frame per interface: the agent is running (never raises; thread-safe).

        Nothing is sent while the guard is shut (:meth:`shut`).
        """
        if self._reasons:
            return
        sent = sum(self._send(sock, frame) for sock, frame, _ in self._sockets)
        with self._lock:  # the beacon thread and the event loop both call this
            self._keepalives += sent
        if self._reasons:
            # shut() ran in another thread between the check above and the
            # sends: ours may have re-opened ARP after its frame.  Close again.
            self._send_shut()

    def shut(self, reason: str) -> None:
        """Stop ARP for the VIPs now, and keep it stopped until ``reason`` is reopened.

        Thread-safe (syncd's beacon thread calls it) and never raises.
        """
        with self._lock:
            if not self._reasons:
                self._shuts += 1
            self._reasons = self._reasons | {reason}  # before the frames: see keepalive()
        self._send_shut()

    def reopen(self, reason: str | None = None) -> None:
        """Drop ``reason`` (None: every reason); keepalives open ARP once none is left."""
        with self._lock:
            self._reasons = frozenset() if reason is None else self._reasons - {reason}

    def _send_shut(self) -> None:
        for sock, _, frame in self._sockets:
            self._send(sock, frame)

    def _send(self, sock: socket.socket, frame: bytes) -> bool:
        try:
            sock.send(frame)
        except OSError as exc:
            # The guard's rules drop the frame at egress, and the kernel
            # reports that drop to the sender as ENOBUFS: the normal case.
            if exc.errno != errno.ENOBUFS:
                self._errors += 1
                return False
        return True

    async def remove(self) -> None:
        """Delete the table (ARP for the VIPs answers as usual again) and close the sockets."""
        self.close_sockets()
        if self._installed:
            self._installed = False
            await _nft(f"delete table netdev {GUARD_TABLE}\n", "remove the ARP guard")

    def close_sockets(self) -> None:
        sockets, self._sockets = self._sockets, ()
        for sock, _, _ in sockets:
            sock.close()

    def statistics(self) -> GuardStats:
        return GuardStats(
            self._installed,
            self._keepalives,
            self._errors,
            tuple(sorted(self._reasons)),
            self._shuts,
        )


async def _nft(script: str, what: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            "nft", "-f", "-",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise VipError(what, f"cannot run nft: {exc.strerror or exc}", exc.errno) from exc
    try:
        async with asyncio.timeout(_NFT_TIMEOUT):
            _out, err = await proc.communicate(script.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise VipError(what, f"nft took more than {_NFT_TIMEOUT} s") from None
    if proc.returncode != 0:
        raise VipError(what, f"nft: {err.decode(errors='replace').strip()}")
