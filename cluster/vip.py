"""Virtual IPs: who should hold each one (pure) and moving them on the host (adapter).

**One holder per VIP.**  Upstream routers use the VIPs as next hops, so a VIP
answered by two nodes at once splits a router's traffic unpredictably, and a
VIP answered by none black-holes it.  Three pieces keep one holder:

1. The etcd claim is the authority.  ``vips/<vip>`` is created only if absent
   (``EtcdStore.claim_vip``: ``create(key) == 0`` in one transaction) and is
   bound to the holder's lease, so at any etcd revision at most one node holds
   it, and a dead holder's claim vanishes with its lease.
2. :func:`plan_vips` (pure) never proposes a claim for a VIP someone holds,
   live or not: the current holder releases first (it sees that the ring moved
   the VIP away), or its lease expires.  The plan is a proposal computed from
   a possibly stale view; the transaction is what makes it safe.
3. The address follows the claim: :func:`acquire` adds the address only after
   the claim succeeded, and :func:`relinquish` removes it *before* releasing
   the claim, so the time ranges in which two nodes carry the address on the
   wire never overlap while both can reach etcd.

What this cannot cover alone: a holder cut off from etcd keeps its address
while its lease expires and a peer claims the VIP.  The agent closes that
window by fencing (``cluster.membership.should_fence``) and by dropping VIPs
on ``LeaseLost``; see docs/vip.md.  A holder that stops running altogether
(frozen, hung) fences nothing: its addresses carry a kernel lifetime
(``VipManager(lifetime=...)``, renewed by :meth:`VipManager.refresh` while
the agent runs), so the kernel drops them within about that long.

**Telling the routers.**  Moving an address does not update the neighbour
caches that still map it to the old holder's MAC.  After adding it the new
holder announces it:

* IPv4: an ARP request with sender IP = target IP = the VIP from the
  interface's MAC, broadcast (an "ARP announcement", RFC 5227 section 2.3).
  Linux (``arp_is_garp`` in net/ipv4/arp.c) treats a request whose sender and
  target IP are equal as gratuitous: it overrides an existing entry even
  within ``locktime`` and leaves it STALE with the new MAC; a gratuitous
  *reply* would also need target MAC = sender MAC.  Existing entries are
  updated whatever ``arp_accept`` says; new ones are created only with it.
* IPv6: an unsolicited neighbour advertisement (RFC 4861 section 7.2.6):
  ICMPv6 type 136, Override set, Solicited clear, target = the VIP, the
  target link-layer address option, to ff02::1 with hop limit 255 (receivers
  drop NDP with any other hop limit).  The kernel fills in the ICMPv6
  checksum of raw ICMPv6 sockets (RFC 3542 section 3.1).

IPv6 VIPs are added with ``IFA_F_NODAD``: duplicate address detection would
hold the address tentative for a second or more, and the claim already
guarantees uniqueness.  Addresses we add carry ``IFA_PROTO`` = :data:`VIP_PROTO`
(Linux >= 6.0), so :meth:`VipManager.held` lists exactly ours, also after a
restart, and never touches the interface's own addresses.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

from cluster.errors import BadInput, ClusterError, Misuse
from cluster.ring import HashRing

__all__ = [
    "VIP_PROTO",
    "VipAssignment",
    "VipClaims",
    "VipError",
    "VipHost",
    "VipManager",
    "VipPlan",
    "VipStats",
    "acquire",
    "arp_announcement",
    "parse_vip",
    "plan_vips",
    "relinquish",
    "unsolicited_na",
    "vip_key",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
VipInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

VIP_PROTO: Final = 0x53  # IFA_PROTO of addresses we add ("S"); the kernel uses 0-3
_IFA_F_NODAD: Final = 0x02
_ETH_P_ARP: Final = 0x0806
_ETH_P_IP: Final = 0x0800
_ARP_REQUEST: Final = 1
_BROADCAST_MAC: Final = b"\xff" * 6
_ALL_NODES: Final = "ff02::1"
_ND_NEIGHBOR_ADVERT: Final = 136
_ND_OVERRIDE: Final = 0x20  # in the first byte of the flags word (R=0x80, S=0x40, O=0x20)
_ND_OPT_TARGET_LLADDR: Final = 2
_ICMP6_FILTER: Final = 1  # <netinet/icmp6.h>; not exported by the socket module
_ERRNO_EXISTS: Final = 17
_ERRNO_GONE: Final = frozenset({2, 3, 19, 99})  # ENOENT, ESRCH, ENODEV, EADDRNOTAVAIL


class VipError(ClusterError):
    """The host refused a VIP operation (address add/remove, an announcement).

    ``op`` says which, ``errno`` is the OS / netlink error number if known.
    The agent treats it like an unreachable etcd for that VIP: it does not
    claim it (or releases the claim it just made) and retries later.
    """

    def __init__(self, op: str, detail: str, errno: int | None = None) -> None:
        super().__init__(f"{op}: {detail}")
        self.op = op
        self.detail = detail
        self.errno = errno


# --- pure: parsing, planning, frames -------------------------------------------------


@functools.lru_cache(maxsize=1024)
def parse_vip(text: str) -> VipInterface:
    """``"addr"`` or ``"addr/prefix"`` -> interface (a bare address is /32 or /128).

    Raises :class:`cluster.errors.BadInput`: VIPs come from operator config.
    Cached (interfaces are immutable): the agent plans its VIPs every tick,
    and parsing them was a fifth of an idle agent's work.
    """
    try:
        vip = ipaddress.ip_interface(text)
    except ValueError as exc:
        raise BadInput(f"VIP {text!r} is not an address or address/prefix: {exc}") from None
    address = vip.ip
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        raise BadInput(f"VIP {text!r} must be a unicast address")
    if address.is_link_local:
        raise BadInput(f"VIP {text!r} is link-local: routers cannot use it as a next hop")
    return vip


def vip_key(vip: str) -> bytes:
    """The bytes the ring hashes for a VIP: its packed address (prefix ignored)."""
    return parse_vip(vip).ip.packed


@dataclass(frozen=True, slots=True)
class VipAssignment:
    vip: str  # canonical address text (the etcd claim key)
    order: tuple[str, ...]  # failover order over the ring; order[0] should hold it
    holder: str | None  # who holds the etcd claim now (None: nobody)

    @property
    def target(self) -> str:
        return self.order[0]


@dataclass(frozen=True, slots=True)
class VipPlan:
    """What one node should do about VIPs now (addresses, canonical text)."""

    node_id: str  # the node this plan is for
    assignments: tuple[VipAssignment, ...]  # every configured VIP, in input order
    claim: tuple[str, ...]  # free VIPs the ring gives us: claim, then add + announce
    release: tuple[str, ...]  # VIPs we hold that are not ours (any more): remove, then release
    waiting: tuple[str, ...]  # ours by the ring, held by another node until it lets go

    @property
    def settled(self) -> bool:
        """Every VIP is held by its target: nothing to do anywhere."""
        return all(a.holder == a.target for a in self.assignments)


def plan_vips(
    vips: Sequence[str],
    ring: HashRing,
    holders: Mapping[str, str],
    node_id: str,
    *,
    depth: int = 2,
    homes: Mapping[str, str] | None = None,
) -> VipPlan:
    """Decide each VIP's target and this node's actions (release-before-claim).

    ``ring`` is built over the live members that may hold VIPs (state ``up``);
    a VIP's target is its ring owner, ``ring.owners(vip_key, depth)`` the
    failover order reported with it.  ``homes`` (canonical VIP -> node id)
    pins a VIP to its home node whenever that node is in the ring; the rest
    of its order is the ring's without the home.  ``holders`` is ``EtcdStore.vip_holders()``
    (VIP -> node id).  A node outside the ring (draining, syncing) gets a plan
    that releases everything it holds and claims nothing.  VIPs we hold that
    are no longer configured are released too.  Raises ``BadInput`` for a VIP
    that is not an address.
    """
    assignments: list[VipAssignment] = []
    claim: list[str] = []
    release: list[str] = []
    waiting: list[str] = []
    seen: set[str] = set()
    for text in vips:
        vip, packed = _canonical(text)
        if vip in seen:
            continue
        seen.add(vip)
        holder = holders.get(vip)
        order = _order(ring, packed, depth, (homes or {}).get(vip))
        assignment = VipAssignment(vip, order, holder)
        assignments.append(assignment)
        mine = assignment.target == node_id
        if mine and holder is None:
            claim.append(vip)
        elif mine and holder != node_id:
            waiting.append(vip)  # never claim over a holder: it releases or its lease ends
        elif not mine and holder == node_id:
            release.append(vip)
    release.extend(sorted(v for v, h in holders.items() if h == node_id and v not in seen))
    return VipPlan(node_id, tuple(assignments), tuple(claim), tuple(release), tuple(waiting))


@functools.lru_cache(maxsize=1024)
def _canonical(text: str) -> tuple[str, bytes]:
    """A VIP's canonical address text and packed bytes (what the ring hashes)."""
    address = parse_vip(text).ip
    return str(address), address.packed


def _order(ring: HashRing, key: bytes, depth: int, home: str | None) -> tuple[str, ...]:
    """Failover order: the home first when it is in the ring, then the ring's order."""
    if home is None or home not in ring.members:
        return ring.owners(key, depth)
    rest = ring.owners(key, min(depth + 1, len(ring.members)))
    return ((home, *tuple(m for m in rest if m != home)))[:depth]


def arp_announcement(mac: bytes, vip: ipaddress.IPv4Address) -> bytes:
    """A broadcast Ethernet frame carrying an ARP request with sender = target = ``vip``."""
    if len(mac) != 6:
        raise Misuse(f"an Ethernet MAC has 6 bytes, got {len(mac)}")
    ethernet = _BROADCAST_MAC + mac + struct.pack("!H", _ETH_P_ARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op request; RFC 5227: target MAC zero.
    arp = struct.pack("!HHBBH", 1, _ETH_P_IP, 6, 4, _ARP_REQUEST)
    arp += mac + vip.packed + b"\x00" * 6 + vip.packed
    return ethernet + arp


def unsolicited_na(mac: bytes, vip: ipaddress.IPv6Address) -> bytes:
    """An ICMPv6 neighbour advertisement (Override, not Solicited) for ``vip``.

    The checksum field is zero: the kernel computes it on raw ICMPv6 sockets.
    """
    if len(mac) != 6:
        raise Misuse(f"an Ethernet MAC has 6 bytes, got {len(mac)}")
    header = struct.pack("!BBHB3x", _ND_NEIGHBOR_ADVERT, 0, 0, _ND_OVERRIDE)
    option = struct.pack("!BB", _ND_OPT_TARGET_LLADDR, 1) + mac  # length in units of 8 bytes
    return header + vip.packed + option


# --- adapter: addresses through pyroute2, announcements on raw sockets -----------------


@dataclass(frozen=True, slots=True)
class VipStats:
    ifname: str  # interface the VIPs live on
    netns: str | None  # network namespace (None: ours)
    added: int  # addresses added (not counting ones already present)
    removed: int  # addresses removed
    announcements: int  # ARP / NA messages sent
    errors: int  # operations that raised VipError
    last_add_seconds: float | None  # duration of the last successful add
    last_announce_seconds: float | None  # duration of the last announce() call


class VipManager:
    """VIP addresses on one interface, optionally inside a named network namespace.

    ``async with VipManager("eth0", netns=None) as vips:`` (or ``await
    vips.open()`` ... ``vips.close()``).  Netlink goes through pyroute2's
    ``AsyncIPRoute``; its socket, the ARP packet socket and the ICMPv6 socket
    are all created here, in the namespace, by a short-lived thread (no fork:
    pyroute2's own netns support forks a helper, which a process running
    grpc threads should not).  Raises :class:`VipError` for anything the host
    refuses (missing namespace or interface, netlink or socket errors) and
    :class:`cluster.errors.BadInput` for VIP text that is not an address.
    """

    def __init__(self, ifname: str, netns: str | None = None, lifetime: int | None = None) -> None:
        if lifetime is not None and not 2 <= lifetime <= 3600:
            raise BadInput(f"VIP lifetime {lifetime} s is not 2..3600")
        self.ifname = ifname
        self.netns = netns
        # Kernel address lifetime (valid_lft = preferred_lft), renewed by
        # refresh(): a holder that stops running (SIGSTOP, a hung process)
        # loses its VIPs to the kernel within about this long, instead of
        # answering ARP for them for as long as it is frozen.  None: permanent.
        self.lifetime = lifetime
        self.ifindex = 0  # set by open()
        self.mac = b""  # the interface's Ethernet address, set by open()
        self._ipr: Any = None
        self._sockets: _Sockets | None = None
        self._host_errors: tuple[type[Exception], ...] = (OSError,)
        self._added = self._removed = self._announcements = self._errors = 0
        self._last_add: float | None = None
        self._last_announce: float | None = None
        # add, remove and refresh each read then write the interface's
        # addresses across awaits; one at a time, or a renewal listing an
        # address just before a release re-creates it (IPv4's RTM_NEWADDR
        # "replace" adds a missing address): the old holder would carry a
        # released VIP again for a whole lifetime.
        self._lock = asyncio.Lock()

    async def open(self) -> VipManager:
        """Open the sockets and find the interface; :class:`VipError` if the host says no."""
        if self._sockets is not None:
            raise Misuse("VipManager opened twice")
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        self._host_errors = (OSError, NetlinkError)
        try:
            self._sockets = self._guard("open sockets", lambda: _in_netns(self.netns, _Sockets))
            self._ipr = AsyncIPRoute(use_socket=self._sockets.netlink)
            found = await self._await("find interface", self._ipr.link_lookup(ifname=self.ifname))
            if not found:
                raise VipError("find interface", f"no interface {self.ifname!r} in {self._where}")
            self.ifindex = int(found[0])
            links = await self._await("read interface", _listed(self._ipr.get_links(self.ifindex)))
            mac = links[0].get_attr("IFLA_ADDRESS") or ""
            self.mac = bytes.fromhex(mac.replace(":", ""))
            if len(self.mac) != 6:
                raise VipError("read interface", f"{self.ifname} has no Ethernet address")
            self._guard("set up sockets", lambda: self._sockets_for_interface())
        except BaseException:
            self.close()
            raise
        return self

    def _sockets_for_interface(self) -> None:
        assert self._sockets is not None
        self._sockets.arp.bind((self.ifname, 0))
        icmp6 = self._sockets.icmp6
        icmp6.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
        icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)

    @property
    def _where(self) -> str:
        return f"netns {self.netns}" if self.netns else "this namespace"

    def _guard(self, op: str, call: Callable[[], T]) -> T:
        """Run one socket call, its errors translated."""
        try:
            return call()
        except self._host_errors as exc:
            raise self._fail(op, exc) from exc

    async def _await(self, op: str, call: Awaitable[T]) -> T:
        """Await one pyroute2 call, its errors translated."""
        try:
            return await call
        except self._host_errors as exc:
            raise self._fail(op, exc) from exc

    def _fail(self, op: str, exc: Exception) -> VipError:
        """The one translation of pyroute2 (NetlinkError) and OS errors."""
        self._errors += 1
        return VipError(op, f"{self.ifname} in {self._where}: {exc}", _errno(exc))

    def _netlink(self) -> Any:
        if self._ipr is None:
            raise Misuse("VipManager used before open() or after close()")
        return self._ipr

    async def add(self, vip: str) -> bool:
        """Put ``vip`` (``addr[/prefix]``) on the interface; False if it was already there."""
        async with self._lock:
            return await self._add(vip)

    async def _add(self, vip: str) -> bool:
        iface = parse_vip(vip)
        ipr = self._netlink()
        started = time.perf_counter()
        try:
            await ipr.addr("add", **self._address_args(iface))
        except self._host_errors as exc:
            if _errno(exc) != _ERRNO_EXISTS:
                raise self._fail("add address", exc) from exc
            if str(iface.ip) not in await self._held():
                log.warning("VIP %s already on %s, not added by stockade", vip, self.ifname)
            return False
        self._added += 1
        self._last_add = time.perf_counter() - started
        return True

    def _address_args(self, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> Any:
        args: dict[str, Any] = {
            "index": self.ifindex,
            "address": str(iface.ip),
            "prefixlen": iface.network.prefixlen,
            "flags": _IFA_F_NODAD if iface.version == 6 else 0,
            "proto": VIP_PROTO,
        }
        if self.lifetime is not None:
            args.update(valid_lft=self.lifetime, preferred_lft=self.lifetime)
        return args

    async def refresh(self, vips: Iterable[str]) -> int:
        """Renew the lifetime of those of ``vips`` still on the interface; how many.

        Never re-adds one that is gone: the kernel expired it (we stalled for
        a whole lifetime, and peers may hold it now) or someone removed it.
        """
        if self.lifetime is None:
            return 0
        async with self._lock:
            return await self._refresh(vips)

    async def _refresh(self, vips: Iterable[str]) -> int:
        present = await self._held()
        renewed = 0
        for vip in vips:
            iface = parse_vip(vip)
            if str(iface.ip) not in present:
                continue
            try:
                await self._netlink().addr("replace", **self._address_args(iface))
            except self._host_errors as exc:
                raise self._fail("renew address", exc) from exc
            renewed += 1
        return renewed

    async def remove(self, vip: str) -> bool:
        """Take ``vip`` off the interface if we added it; False if it was not there."""
        async with self._lock:
            return await self._remove(vip)

    async def _remove(self, vip: str) -> bool:
        address = str(parse_vip(vip).ip)
        ipr = self._netlink()
        removed = False
        # Every entry: IPv4 keeps one per prefix length if added twice differently.
        for entry in await self._ours():
            if entry.get_attr("IFA_ADDRESS") != address:
                continue
            prefixlen = entry["prefixlen"]
            try:
                await ipr.addr("del", index=self.ifindex, address=address, prefixlen=prefixlen)
            except self._host_errors as exc:
                if _errno(exc) in _ERRNO_GONE:
                    continue  # removed meanwhile (by hand, or the link went away)
                raise self._fail("remove address", exc) from exc
            self._removed += 1
            removed = True
        return removed

    async def remove_all(self) -> list[str]:
        """Take every VIP we put on the interface off it, in one locked pass; which.

        One pass under the lock, not ``held()`` then ``remove()``: a renewal
        between the two could list (netlink allows one dump at a time per
        socket: a second one fails with EBUSY) or re-create an address.
        """
        async with self._lock:
            gone = []
            for vip in sorted(await self._held()):
                if await self._remove(vip):
                    gone.append(vip)
            return gone

    async def held(self) -> frozenset[str]:
        """The VIPs (canonical address text) we put on the interface."""
        async with self._lock:
            return await self._held()

    async def _held(self) -> frozenset[str]:
        return frozenset(
            str(ipaddress.ip_address(e.get_attr("IFA_ADDRESS"))) for e in await self._ours()
        )

    async def _ours(self) -> list[Any]:
        listing = await self._await(
            "list addresses", _listed(self._netlink().get_addr(index=self.ifindex))
        )
        return [e for e in listing if e.get_attr("IFA_PROTO") == VIP_PROTO]

    async def announce(self, vip: str, count: int = 3, spacing: float = 0.005) -> None:
        """Tell the segment ``vip`` is here: ``count`` ARP announcements / unsolicited NAs."""
        if not 1 <= count <= 10 or not 0 <= spacing <= 1:
            raise Misuse(f"announce(count={count}, spacing={spacing}) out of range")
        address = parse_vip(vip).ip
        if isinstance(address, ipaddress.IPv4Address):
            what, send = "send ARP announcement", self._arp_sender(address)
        else:
            what, send = "send neighbour advertisement", self._na_sender(address)
        started = time.perf_counter()
        for i in range(count):
            if i:
                await asyncio.sleep(spacing)
            self._guard(what, send)
            self._announcements += 1
        self._last_announce = time.perf_counter() - started

    def _arp_sender(self, address: ipaddress.IPv4Address) -> Callable[[], int]:
        sock, frame = self._open_sockets().arp, arp_announcement(self.mac, address)
        return lambda: sock.send(frame)

    def _na_sender(self, address: ipaddress.IPv6Address) -> Callable[[], int]:
        sock, message = self._open_sockets().icmp6, unsolicited_na(self.mac, address)
        # Source = the VIP itself (as the kernel's own unsolicited NAs do), set per message.
        pktinfo = address.packed + struct.pack("@I", self.ifindex)
        ancillary = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
        destination = (_ALL_NODES, 0, 0, self.ifindex)
        return lambda: sock.sendmsg([message], ancillary, 0, destination)

    def _open_sockets(self) -> _Sockets:
        if self._sockets is None:
            raise Misuse("VipManager used before open() or after close()")
        return self._sockets

    def statistics(self) -> VipStats:
        return VipStats(
            self.ifname,
            self.netns,
            self._added,
            self._removed,
            self._announcements,
            self._errors,
            self._last_add,
            self._last_announce,
        )

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()
        sockets, self._sockets = self._sockets, None
        if sockets is not None:
            sockets.close()  # pyroute2 does not close a socket it was given

    async def __aenter__(self) -> VipManager:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Sockets:
    """The three sockets of a manager, created in the calling thread's namespace."""

    def __init__(self) -> None:
        made: list[socket.socket] = []
        try:
            made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0))  # NETLINK_ROUTE
            # Protocol 0: the packet socket only sends, so nothing queues up on it.
            made.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
            made.append(socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
            icmp6 = made[2]
            icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            icmp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            # Block every ICMPv6 type from the receive queue: this socket only sends.
            icmp6.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, b"\xff" * 32)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        self.netlink, self.arp, self.icmp6 = made

    def close(self) -> None:
        for sock in (self.netlink, self.arp, self.icmp6):
            sock.close()


async def _listed(dump: Awaitable[Any]) -> list[Any]:
    """pyroute2 dumps are awaitables of async generators: collect one."""
    return [item async for item in await dump]


def _errno(exc: Exception) -> int | None:
    code = getattr(exc, "code", None)  # pyroute2's NetlinkError keeps errno here
    if isinstance(code, int):
        return code
    return exc.errno if isinstance(exc, OSError) else None


def _in_netns(netns: str | None, make: Callable[[], T]) -> T:
    """Call ``make`` with the calling thread in ``netns``; sockets stay in that namespace.

    setns(2) with CLONE_NEWNET changes only the calling thread, so a short-lived
    thread enters the namespace and the caller's thread never leaves its own.
    """
    if netns is None:
        return make()
    from pyroute2.netns import setns

    result: list[T] = []
    failure: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            setns(netns, flags=0)
            result.append(make())
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=enter_and_make, name=f"netns-{netns}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


# --- the claim and the address together -------------------------------------------------


class VipClaims(Protocol):
    """The etcd side (``cluster.etcd.EtcdStore`` / ``EtcdMembership``)."""

    async def claim_vip(self, vip: str, node_id: str, lease: int) -> bool: ...

    async def release_vip(self, vip: str, node_id: str) -> bool: ...


class VipHost(Protocol):
    """The host side (:class:`VipManager`)."""

    async def add(self, vip: str) -> bool: ...

    async def remove(self, vip: str) -> bool: ...

    async def announce(self, vip: str, count: int = 3, spacing: float = 0.005) -> None: ...


async def acquire(
    claims: VipClaims,
    manager: VipHost,
    vip: str,
    node_id: str,
    lease: int,
    *,
    announcements: int = 3,
    spacing: float = 0.005,
) -> bool:
    """Claim ``vip`` in etcd, then add and announce it; False if another node holds it.

    If the host refuses the address or the announcement, the VIP is given up
    again the :func:`relinquish` way (address off, then the claim), so the next
    node in the failover order can take it, and the :class:`VipError` raised.
    Raises ``EtcdError`` from the claim (nothing changed on the host then).
    """
    address = str(parse_vip(vip).ip)
    if not await claims.claim_vip(address, node_id, lease):
        return False
    try:
        await manager.add(vip)
        await manager.announce(vip, announcements, spacing)
    except VipError:
        await relinquish(claims, manager, vip, node_id)
        raise
    return True


async def relinquish(claims: VipClaims, manager: VipHost, vip: str, node_id: str) -> bool:
    """Remove ``vip`` from the host, then release the claim; True if a claim was released.

    Address first: once the claim is gone another node may add the address,
    and it must not find ours still answering.  A :class:`VipError` leaves the
    claim in place (we may still carry the address); an ``EtcdError`` after the
    address is gone leaves a claim that ends with our lease or a retry.
    """
    await manager.remove(vip)
    return await claims.release_vip(str(parse_vip(vip).ip), node_id)
