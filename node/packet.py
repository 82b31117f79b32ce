"""Packet parsing: raw IP bytes in, a frozen :class:`Packet` out.

CONTRACT (shared by every module; do not change field meanings casually):

* ``parse(data)`` returns a :class:`Packet` or raises exactly
  :class:`node.errors.PacketError` (with a stable ``reason`` token).
* Addresses are ``int`` (IPv4 32-bit, IPv6 128-bit); ``family`` says which.
* ``sport``/``dport`` are the TCP/UDP ports.  For ICMP/ICMPv6 echo request
  and reply both are the echo *identifier* (so a direction-independent flow
  key pairs request and reply, as Linux conntrack does).  For other
  protocols both are 0.
* ``embedded`` is set for ICMP/ICMPv6 *error* messages: the header of the
  offending packet as quoted in the error (RFC 792, RFC 4443 s2.4), parsed
  with ``parse_embedded`` which tolerates a truncated L4 header of at least
  8 bytes (enough for ports, RFC 792 guarantees 64 bits of the datagram).
* Fragments: see ``is_fragment``.

What is checked
---------------
IPv4: version, IHL >= 5, IHL <= total length <= bytes received (bytes after
the total length are link padding and ignored).  Options are skipped, not
interpreted: the kernel validated them in ``ip_rcv`` before FORWARD.
IPv6: payload length <= bytes received (trailing bytes ignored); extension
headers are walked (hop-by-hop 0, routing 43, fragment 44, destination
options 60, AH 51 whose length counts 4-byte units, RFC 4302 s2.2), at most
:data:`MAX_EXT_HEADERS` of them, hop-by-hop only first (RFC 8200 s4.1).  The
walk stops at No Next Header (59) or any other protocol, which becomes
``proto``.  Jumbograms (payload length 0, RFC 2675) are not supported.
TCP: data offset >= 5 and within the packet; the window-scale option (kind 3)
is read only from SYN segments (RFC 7323 s2.2) and reported as sent
(consumers clamp it to 14, RFC 7323 s2.3); malformed options end the option
walk silently, as Linux conntrack's ``tcp_options()`` does.  UDP: 8 <= length
<= bytes after the IP header(s).  ICMP/ICMPv6: at least the 8-byte header.
Checksums are NOT verified: forwarded traffic reaches NFQUEUE only after the
kernel checked the IPv4 header checksum, and the L4 checksum is the
endpoints' business (Linux conntrack only checks it for locally delivered
traffic or when ``nf_conntrack_checksum`` asks, and then drops silently).

Fragments
---------
An IPv4 packet with MF set or a non-zero fragment offset, or an IPv6 packet
with a Fragment header, has ``is_fragment=True``.  A *first* fragment
(offset 0) still has its L4 header parsed when that header is complete in
the fragment (UDP length is then not checked against the bytes present, and
``payload_len`` counts only this fragment's bytes); otherwise, and for every
non-first fragment, ``proto`` is set and ports are 0.  The engine treats
every fragment as INVALID (reason ``fragment``): with conntrack active the
kernel reassembles before FORWARD (nf_defrag_ipv4/ipv6), so a fragment that
reaches us is abnormal.

Embedded (quoted) packets
-------------------------
ICMP types 3, 4, 5, 11, 12 and ICMPv6 types 1-4 are errors; the packet they
quote is parsed by :func:`parse_embedded` and must have the same family as
the error.  A quoted IP header may claim more bytes than were quoted.  The
embedded :class:`Packet` carries family, addresses, proto, ports, ``seq``
(TCP), ICMP type/code, ttl, ``is_fragment`` and ``length`` as *claimed* by
the quoted header; other fields keep their defaults.  An error quoting an
ICMP error is not parsed further (``embedded`` stays None inside).

Error reasons (``PacketError.reason``, listed in :data:`ERROR_REASONS`):

* ``truncated`` -- fewer bytes than a header needs (IP, extension, L4).
* ``bad-version`` -- IP version is neither 4 nor 6.
* ``bad-ihl`` -- IPv4 header length below 5 words.
* ``bad-total-length`` -- IPv4 total length below the header length or
  beyond the bytes received.
* ``bad-payload-length`` -- IPv6 payload length beyond the bytes received.
* ``bad-ext-order`` -- IPv6 hop-by-hop header not directly after the header.
* ``too-many-ext-headers`` -- more than :data:`MAX_EXT_HEADERS`.
* ``bad-tcp-offset`` -- TCP data offset below 5 or past the packet end.
* ``bad-udp-length`` -- UDP length below 8 or past the packet end.
* ``embedded-truncated`` -- the packet quoted by an ICMP error is shorter
  than its IP header (+ extension headers) + 8 bytes of L4.
* ``bad-embedded`` -- the quoted packet is otherwise malformed or of the
  wrong family (``detail`` names the inner reason).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from node.errors import BadInput, Misuse, PacketError

__all__ = [
    "ERROR_REASONS",
    "Packet",
    "PacketError",
    "format_addr",
    "parse",
    "parse_addr",
    "parse_embedded",
]

# IP protocol numbers (IANA).
ICMP: Final = 1
TCP: Final = 6
UDP: Final = 17
ICMPV6: Final = 58

# TCP flag bits (RFC 9293 s3.1).
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80

# IPv6 extension headers walked by the parser (RFC 8200 s4, RFC 4302).
HOP_BY_HOP: Final = 0
ROUTING: Final = 43
FRAGMENT: Final = 44
AUTH_HEADER: Final = 51
NO_NEXT_HEADER: Final = 59
DEST_OPTIONS: Final = 60
_EXT_HEADERS: Final = frozenset({HOP_BY_HOP, ROUTING, FRAGMENT, AUTH_HEADER, DEST_OPTIONS})

# Fragment kinds found by the IPv6 header walk (0: not a fragment).
_FIRST_FRAGMENT: Final = 1
_LATER_FRAGMENT: Final = 2

# Real stacks send at most a handful; the bound stops crafted header chains
# from costing unbounded time per packet.
MAX_EXT_HEADERS: Final = 8

ICMP_ECHO_REPLY: Final = 0
ICMP_ECHO_REQUEST: Final = 8
# Destination unreachable, source quench, redirect, time exceeded, parameter
# problem: the types that quote the offending datagram (RFC 792).
ICMP_ERRORS: Final = frozenset({3, 4, 5, 11, 12})
ICMPV6_ECHO_REQUEST: Final = 128
ICMPV6_ECHO_REPLY: Final = 129
# Destination unreachable, packet too big, time exceeded, parameter problem.
ICMPV6_ERRORS: Final = frozenset({1, 2, 3, 4})

ERROR_REASONS: Final = (
    "truncated",
    "bad-version",
    "bad-ihl",
    "bad-total-length",
    "bad-payload-length",
    "bad-ext-order",
    "too-many-ext-headers",
    "bad-tcp-offset",
    "bad-udp-length",
    "embedded-truncated",
    "bad-embedded",
)

# Precompiled layouts; fields not needed are still unpacked because one
# unpack_from beats several small ones.
_IPV4: Final = struct.Struct("!BBHHHBBHII")  # ver/ihl tos len id frag ttl proto cksum src dst
_IPV6: Final = struct.Struct("!IHBBQQQQ")  # ver/tc/flow plen nh hlim src(2x64) dst(2x64)
_TCP: Final = struct.Struct("!HHIIBBH")  # sport dport seq ack offset flags window
_TCP_QUOTED: Final = struct.Struct("!HHI")  # sport dport seq: the 8 bytes RFC 792 promises
_UDP: Final = struct.Struct("!HHH")  # sport dport length
_ICMP: Final = struct.Struct("!BBHH")  # type code checksum identifier
_U16: Final = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Packet:
    family: int  # 4 or 6
    src: int  # source address as an integer
    dst: int  # destination address as an integer
    proto: int  # L4 protocol number (after any IPv6 extension headers)
    sport: int  # TCP/UDP source port; ICMP echo identifier; else 0
    dport: int  # TCP/UDP destination port; ICMP echo identifier; else 0
    length: int  # total length of the IP packet in bytes
    tcp_flags: int = 0  # TCP flag bits (FIN, SYN, ...); 0 for non-TCP
    seq: int = 0  # TCP sequence number
    ack: int = 0  # TCP acknowledgement number
    window: int = 0  # TCP window field as sent (unscaled)
    wscale: int | None = None  # TCP window-scale option value, if present
    payload_len: int = 0  # bytes of L4 payload (TCP: segment data length)
    icmp_type: int = -1  # ICMP/ICMPv6 type, -1 for non-ICMP
    icmp_code: int = -1  # ICMP/ICMPv6 code, -1 for non-ICMP
    embedded: Packet | None = None  # offending packet quoted by an ICMP error
    is_fragment: bool = False  # any IP fragment (MF set or offset != 0)
    ttl: int = 64  # IPv4 TTL / IPv6 hop limit


class _PacketMaker:
    """Builds a :class:`Packet` five times faster than its generated ``__init__``.

    A frozen dataclass assigns each of its 18 fields through
    ``object.__setattr__``, which costs about 2 us per packet, a large part of
    the per-packet budget.  This class has the same slots in the same order,
    assigns them directly and then becomes a ``Packet`` (``__class__``
    assignment is allowed between classes with identical slot layouts).  The
    result is indistinguishable from ``Packet(...)``: same type, equality,
    hash and immutability; tests/unit/test_packet.py checks the layouts match.
    """

    __slots__ = Packet.__slots__

    def __init__(
        self, family: int, src: int, dst: int, proto: int, sport: int, dport: int, length: int,
        tcp_flags: int, seq: int, ack: int, window: int, wscale: int | None, payload_len: int,
        icmp_type: int, icmp_code: int, embedded: Packet | None, is_fragment: bool, ttl: int,
    ) -> None:  # fmt: skip
        self.family = family
        self.src = src
        self.dst = dst
        self.proto = proto
        self.sport = sport
        self.dport = dport
        self.length = length
        self.tcp_flags = tcp_flags
        self.seq = seq
        self.ack = ack
        self.window = window
        self.wscale = wscale
        self.payload_len = payload_len
        self.icmp_type = icmp_type
        self.icmp_code = icmp_code
        self.embedded = embedded
        self.is_fragment = is_fragment
        self.ttl = ttl
        self.__class__ = Packet  # type: ignore[assignment]


# Call with all 18 fields positionally, in field order.
if TYPE_CHECKING:  # to the type checker it is simply the positional constructor
    _new_packet = Packet
else:
    _new_packet = _PacketMaker


def parse(data: bytes, *, prefix: bool = False) -> Packet:
    """Parse one IPv4 or IPv6 packet starting at the IP header.

    ``prefix=True`` accepts ``data`` that is only the first part of the
    packet (NFQUEUE copies at most its copy range, a capture its snap
    length): every header must still be complete, and ``length`` and
    ``payload_len`` come from the IP and UDP headers instead of the bytes.
    """
    if not data:
        raise PacketError("truncated", "empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, prefix)
    if version == 6:
        return _parse_ipv6(data, prefix)
    raise PacketError("bad-version", f"IP version {version}")


def parse_embedded(data: bytes) -> Packet:
    """Parse the (possibly truncated) datagram quoted by an ICMP error.

    Raises ``PacketError`` with reason ``embedded-truncated`` or
    ``bad-embedded`` only.
    """
    return _embedded(data, 0, len(data), 0)


# --- IPv4 / IPv6 --------------------------------------------------------------


def _parse_ipv4(data: bytes, prefix: bool) -> Packet:
    size = len(data)
    if size < 20:
        raise PacketError("truncated", f"{size} bytes, IPv4 header needs 20")
    vihl, _tos, total, _ident, frag, ttl, proto, _cksum, src, dst = _IPV4.unpack_from(data)
    hlen = (vihl & 0x0F) << 2
    if hlen < 20:
        raise PacketError("bad-ihl", f"IHL {hlen >> 2}")
    if total < hlen or (total > size and not prefix) or hlen > size:
        raise PacketError("bad-total-length", f"total length {total}, header {hlen}, have {size}")
    end = min(total, size)  # headers must lie within the bytes we have
    if frag & 0x3FFF:  # MF flag or a fragment offset
        return _fragment(4, src, dst, proto, total, ttl, not frag & 0x1FFF, data, hlen, end)
    return _transport(4, src, dst, proto, total, ttl, False, data, hlen, end)


def _parse_ipv6(data: bytes, prefix: bool) -> Packet:
    size = len(data)
    if size < 40:
        raise PacketError("truncated", f"{size} bytes, IPv6 header needs 40")
    _vtf, plen, nh, hlim, src_hi, src_lo, dst_hi, dst_lo = _IPV6.unpack_from(data)
    length = 40 + plen
    if length > size and not prefix:
        raise PacketError("bad-payload-length", f"payload length {plen}, have {size - 40}")
    end = min(length, size)  # headers must lie within the bytes we have
    src = (src_hi << 64) | src_lo
    dst = (dst_hi << 64) | dst_lo
    if nh not in _EXT_HEADERS:
        return _transport(6, src, dst, nh, length, hlim, False, data, 40, end)
    proto, off, frag = _walk_ipv6(data, nh, 40, end)
    if frag:
        first = frag == _FIRST_FRAGMENT
        return _fragment(6, src, dst, proto, length, hlim, first, data, off, end)
    return _transport(6, src, dst, proto, length, hlim, False, data, off, end)


def _walk_ipv6(data: bytes, nh: int, off: int, end: int) -> tuple[int, int, int]:
    """Skip extension headers from ``off``: return (proto, L4 offset, fragment kind).

    The fragment kind is 0 (none), ``_FIRST_FRAGMENT`` or ``_LATER_FRAGMENT``;
    a later fragment stops the walk since what follows is not a header.
    """
    first = off
    count = 0
    frag = 0
    while nh in _EXT_HEADERS:
        count += 1
        if count > MAX_EXT_HEADERS:
            raise PacketError("too-many-ext-headers", f"more than {MAX_EXT_HEADERS}")
        if end - off < 8:  # every extension header is at least 8 bytes
            raise PacketError("truncated", f"extension header {nh} at offset {off}")
        if nh == HOP_BY_HOP and off != first:
            raise PacketError("bad-ext-order", "hop-by-hop header not first")
        next_nh = data[off]
        if nh == FRAGMENT:
            offset_flags = _U16.unpack_from(data, off + 2)[0]
            if offset_flags >> 3:
                return next_nh, off + 8, _LATER_FRAGMENT
            frag = _FIRST_FRAGMENT
            hlen = 8
        elif nh == AUTH_HEADER:
            hlen = (data[off + 1] + 2) << 2
        else:
            hlen = (data[off + 1] + 1) << 3
        if off + hlen > end:
            raise PacketError("truncated", f"extension header {nh} claims {hlen} bytes")
        off += hlen
        nh = next_nh
    return nh, off, frag


def _fragment(
    family: int,
    src: int,
    dst: int,
    proto: int,
    length: int,
    ttl: int,
    first: bool,
    data: bytes,
    off: int,
    end: int,
) -> Packet:
    """A fragment: L4 parsed only for a first fragment holding a whole L4 header."""
    if first:
        try:
            return _transport(family, src, dst, proto, length, ttl, True, data, off, end)
        except PacketError:
            pass  # the L4 header continues in a later fragment
    return Packet(family, src, dst, proto, 0, 0, length, is_fragment=True, ttl=ttl)


# --- L4 -------------------------------------------------------------------------


def _transport(
    family: int,
    src: int,
    dst: int,
    proto: int,
    length: int,
    ttl: int,
    is_fragment: bool,
    data: bytes,
    off: int,
    end: int,
) -> Packet:
    if proto == TCP:
        if end - off < 20:
            raise PacketError("truncated", f"{end - off} bytes, TCP header needs 20")
        sport, dport, seq, ack, doff, flags, window = _TCP.unpack_from(data, off)
        thlen = (doff >> 4) << 2
        if thlen < 20 or off + thlen > end:
            raise PacketError("bad-tcp-offset", f"data offset {thlen >> 2}, {end - off} bytes")
        wscale = _window_scale(data, off + 20, off + thlen) if flags & SYN and thlen > 20 else None
        return _new_packet(
            family, src, dst, TCP, sport, dport, length, flags, seq, ack, window, wscale,
            length - off - thlen, -1, -1, None, is_fragment, ttl,
        )  # fmt: skip
    if proto == UDP:
        if end - off < 8:
            raise PacketError("truncated", f"{end - off} bytes, UDP header needs 8")
        sport, dport, ulen = _UDP.unpack_from(data, off)
        if is_fragment:  # the length covers fragments not yet seen
            ulen = length - off
        elif ulen < 8 or ulen > length - off:
            raise PacketError("bad-udp-length", f"UDP length {ulen}, {length - off} bytes")
        return _new_packet(
            family, src, dst, UDP, sport, dport, length, 0, 0, 0, 0, None, ulen - 8, -1, -1, None,
            is_fragment, ttl,
        )  # fmt: skip
    if (proto == ICMP and family == 4) or (proto == ICMPV6 and family == 6):
        return _icmp(family, src, dst, proto, length, ttl, is_fragment, data, off, end)
    return _new_packet(
        family, src, dst, proto, 0, 0, length, 0, 0, 0, 0, None, 0, -1, -1, None, is_fragment, ttl
    )


def _icmp(
    family: int,
    src: int,
    dst: int,
    proto: int,
    length: int,
    ttl: int,
    is_fragment: bool,
    data: bytes,
    off: int,
    end: int,
) -> Packet:
    if end - off < 8:
        raise PacketError("truncated", f"{end - off} bytes, ICMP header needs 8")
    icmp_type, code, _cksum, ident = _ICMP.unpack_from(data, off)
    port = 0
    embedded = None
    if family == 4:
        if icmp_type in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
            port = ident
        elif icmp_type in ICMP_ERRORS:
            embedded = _embedded(data, off + 8, end, 4)
    elif icmp_type in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY):
        port = ident
    elif icmp_type in ICMPV6_ERRORS:
        embedded = _embedded(data, off + 8, end, 6)
    return _new_packet(
        family, src, dst, proto, port, port, length, 0, 0, 0, 0, None, end - off - 8, icmp_type,
        code, embedded, is_fragment, ttl,
    )  # fmt: skip


def _window_scale(data: bytes, off: int, end: int) -> int | None:
    """The value of the window-scale option in options ``data[off:end]``."""
    while off < end:
        kind = data[off]
        if kind == 0:  # end of option list
            return None
        if kind == 1:  # no-operation padding
            off += 1
            continue
        if off + 1 >= end:
            return None
        size = data[off + 1]
        if size < 2 or off + size > end:
            return None  # malformed: stop like Linux tcp_options(), do not reject
        if kind == 3 and size == 3:
            return data[off + 2]
        off += size
    return None


# --- quoted packets inside ICMP errors ------------------------------------------


def _embedded(data: bytes, off: int, end: int, family: int) -> Packet:
    """Parse the quoted datagram in ``data[off:end]``; ``family`` 0 accepts both."""
    try:
        inner = _parse_quoted(data, off, end)
    except PacketError as exc:
        if exc.reason == "truncated":
            raise PacketError("embedded-truncated", exc.detail) from exc
        raise PacketError("bad-embedded", str(exc)) from exc
    if family and inner.family != family:
        raise PacketError("bad-embedded", f"IPv{family} ICMP error quotes IPv{inner.family}")
    return inner


def _parse_quoted(data: bytes, off: int, end: int) -> Packet:
    avail = end - off
    if avail < 1:
        raise PacketError("truncated", "nothing quoted")
    version = data[off] >> 4
    if version == 4:
        if avail < 20:
            raise PacketError("truncated", f"{avail} bytes, IPv4 header needs 20")
        vihl, _tos, total, _id, frag, ttl, proto, _ck, src, dst = _IPV4.unpack_from(data, off)
        hlen = (vihl & 0x0F) << 2
        if hlen < 20:
            raise PacketError("bad-ihl", f"IHL {hlen >> 2}")
        if total < hlen:
            raise PacketError("bad-total-length", f"total length {total}, header {hlen}")
        if hlen > avail:
            raise PacketError("truncated", f"{avail} bytes, IPv4 header needs {hlen}")
        l4_end = off + min(total, avail)
        is_frag, later = bool(frag & 0x3FFF), bool(frag & 0x1FFF)
        return _quoted_l4(4, src, dst, proto, total, ttl, is_frag, later, data, off + hlen, l4_end)
    if version == 6:
        if avail < 40:
            raise PacketError("truncated", f"{avail} bytes, IPv6 header needs 40")
        _vtf, plen, nh, hlim, src_hi, src_lo, dst_hi, dst_lo = _IPV6.unpack_from(data, off)
        l4_end = off + min(40 + plen, avail)
        proto, l4_off, frag = _walk_ipv6(data, nh, off + 40, l4_end)
        src, dst = (src_hi << 64) | src_lo, (dst_hi << 64) | dst_lo
        is_frag, later = frag != 0, frag == _LATER_FRAGMENT
        return _quoted_l4(6, src, dst, proto, 40 + plen, hlim, is_frag, later, data, l4_off, l4_end)
    raise PacketError("bad-version", f"IP version {version}")


def _quoted_l4(
    family: int,
    src: int,
    dst: int,
    proto: int,
    length: int,
    ttl: int,
    is_fragment: bool,
    later_fragment: bool,
    data: bytes,
    off: int,
    end: int,
) -> Packet:
    """Ports (and TCP seq) from the first 8 quoted bytes of the L4 header."""
    icmp = (proto == ICMP and family == 4) or (proto == ICMPV6 and family == 6)
    if later_fragment or not (proto in (TCP, UDP) or icmp):
        return Packet(family, src, dst, proto, 0, 0, length, is_fragment=is_fragment, ttl=ttl)
    if end - off < 8:
        if is_fragment:  # a first fragment may stop before its L4 header
            return Packet(family, src, dst, proto, 0, 0, length, is_fragment=True, ttl=ttl)
        raise PacketError("truncated", f"{end - off} bytes of quoted L4 header, need 8")
    if not icmp:
        sport, dport, seq = _TCP_QUOTED.unpack_from(data, off)
        seq = seq if proto == TCP else 0
        return Packet(
            family, src, dst, proto, sport, dport, length, seq=seq, is_fragment=is_fragment, ttl=ttl
        )
    icmp_type, code, _cksum, ident = _ICMP.unpack_from(data, off)
    echo = (
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
        if family == 4
        else (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    )
    port = ident if icmp_type in echo else 0
    return Packet(
        family, src, dst, proto, port, port, length, icmp_type=icmp_type, icmp_code=code,
        is_fragment=is_fragment, ttl=ttl,
    )  # fmt: skip


# --- display helpers (not for the hot path) ---------------------------------------


def format_addr(family: int, addr: int) -> str:
    """Text form of an address held as an int (``format_addr(4, 0x7F000001)``)."""
    try:
        if family == 4:
            return str(ipaddress.IPv4Address(addr))
        if family == 6:
            return str(ipaddress.IPv6Address(addr))
    except ValueError as exc:
        raise Misuse(f"address {addr!r} out of range for IPv{family}") from exc
    raise Misuse(f"unknown address family {family!r}")


def parse_addr(text: str) -> tuple[int, int]:
    """``(family, int)`` from an address in text form; ``BadInput`` if it is none.

    Scoped IPv6 addresses (``fe80::1%eth0``) are refused: a flow key has no
    zone, so accepting one would silently drop it.
    """
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise BadInput(f"not an IP address: {text!r}") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise BadInput(f"scoped IPv6 address not allowed: {text!r}")
    return addr.version, int(addr)
