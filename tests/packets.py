"""Build packets as bytes for tests (the inverse of ``node.packet.parse``).

Every builder writes correct checksums (IPv4 header; TCP, UDP and ICMPv6
with their pseudo-header when ``src``/``dst`` are given; ICMP always), so
the bytes can also go into pcaps or onto real interfaces.

Layers compose: ``ipv4(src, dst, TCP, tcp(1234, 80, SYN, src=src, dst=dst))``
or, shorter, ``tcp4(src, 1234, dst, 80, SYN)``.  Addresses are text.

IPv6 extension headers are given as ``(kind, body)`` pairs, built by
``hop_by_hop()``, ``routing()``, ``fragment6()``, ``dest_options()`` and
``auth_header()``; ``ipv6()`` chains their next-header fields and fills in
their length fields.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

from node.packet import ICMP, ICMPV6, TCP, UDP

__all__ = [
    "auth_header",
    "checksum",
    "dest_options",
    "fragment6",
    "hop_by_hop",
    "icmp_echo",
    "icmp_error",
    "icmpv6_echo",
    "icmpv6_error",
    "ipv4",
    "ipv6",
    "ping4",
    "ping6",
    "routing",
    "tcp",
    "tcp4",
    "tcp6",
    "udp",
    "udp4",
    "udp6",
]

ExtHeader = tuple[int, bytes]  # (header kind, bytes after next-header and length)


def addr_bytes(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = addr_bytes(src), addr_bytes(dst)
    if len(s) != len(d):
        raise ValueError("src and dst must be the same family")
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def _with_checksum(
    segment: bytes, offset: int, proto: int, src: str | None, dst: str | None
) -> bytes:
    """``segment`` with its checksum field at ``offset`` filled in (0 without addresses)."""
    if src is None or dst is None:
        return segment
    value = checksum(_pseudo_header(src, dst, proto, len(segment)) + segment)
    if proto == UDP and value == 0:
        value = 0xFFFF  # 0 means "no checksum" in UDP (RFC 768)
    return segment[:offset] + struct.pack("!H", value) + segment[offset + 2 :]


# --- network layer -------------------------------------------------------------


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    ttl: int = 64,
    frag_offset: int = 0,
    more_fragments: bool = False,
    ident: int = 0,
    *,
    dont_fragment: bool = False,
    options: bytes = b"",
    tos: int = 0,
) -> bytes:
    """An IPv4 packet.  ``frag_offset`` is the header field: units of 8 bytes."""
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)  # pad with End-of-Options
    hlen = 20 + len(options)
    flags = (0x4000 if dont_fragment else 0) | (0x2000 if more_fragments else 0)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | hlen // 4,
        tos,
        hlen + len(payload),
        ident,
        flags | frag_offset,
        ttl,
        proto,
        0,
        addr_bytes(src),
        addr_bytes(dst),
    )
    header += options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv6(
    src: str,
    dst: str,
    next_header: int,
    payload: bytes,
    ext_headers: Sequence[ExtHeader] = (),
    hop_limit: int = 64,
    *,
    flow_label: int = 0,
) -> bytes:
    """An IPv6 packet; ``ext_headers`` in wire order, ``next_header`` is the L4 proto."""
    chain = b""
    kinds = [kind for kind, _ in ext_headers] + [next_header]
    for (kind, body), following in zip(ext_headers, kinds[1:], strict=True):
        chain += _ext_header(kind, following, body)
    payload = chain + payload
    head = struct.pack("!IHBB", 0x6000_0000 | flow_label, len(payload), kinds[0], hop_limit)
    return head + addr_bytes(src) + addr_bytes(dst) + payload


def _ext_header(kind: int, next_header: int, body: bytes) -> bytes:
    if kind == 44:  # fixed 8 bytes; the second byte is reserved, not a length
        return bytes([next_header, 0]) + body
    unit = 4 if kind == 51 else 8  # AH counts 4-byte words (RFC 4302)
    if (2 + len(body)) % unit:
        raise ValueError(f"extension header {kind} body of {len(body)} bytes is not aligned")
    length = (2 + len(body)) // unit - (2 if kind == 51 else 1)
    return bytes([next_header, length]) + body


def _pad_options(options: bytes) -> bytes:
    """Options padded so that 2 + len is a multiple of 8 (Pad1 / PadN, RFC 8200 s4.2)."""
    missing = (-(2 + len(options))) % 8
    if missing == 1:
        return options + b"\0"
    if missing:
        return options + bytes([1, missing - 2]) + b"\0" * (missing - 2)
    return options


def hop_by_hop(options: bytes = b"") -> ExtHeader:
    return 0, _pad_options(options)


def dest_options(options: bytes = b"") -> ExtHeader:
    return 60, _pad_options(options)


def routing(routing_type: int = 4, segments_left: int = 0, data: bytes = b"\0" * 4) -> ExtHeader:
    """A routing header; ``data`` follows the type and segments-left bytes."""
    return 43, bytes([routing_type, segments_left]) + data


def fragment6(offset: int = 0, more: bool = False, ident: int = 0) -> ExtHeader:
    """A fragment header; ``offset`` in 8-byte units as in the header field."""
    return 44, struct.pack("!HI", (offset << 3) | int(more), ident)


def auth_header(spi: int = 1, seq: int = 1, icv: bytes = b"\0" * 12) -> ExtHeader:
    return 51, struct.pack("!HII", 0, spi, seq) + icv


# --- transport layer -----------------------------------------------------------


def tcp(
    sport: int,
    dport: int,
    flags: int,
    seq: int = 0,
    ack: int = 0,
    window: int = 65535,
    payload: bytes = b"",
    wscale: int | None = None,
    *,
    mss: int | None = None,
    options: bytes = b"",
    urgent: int = 0,
    src: str | None = None,
    dst: str | None = None,
) -> bytes:
    """A TCP segment (header + payload); checksum filled in when src/dst given."""
    opts = b""
    if mss is not None:
        opts += struct.pack("!BBH", 2, 4, mss)
    opts += options
    if wscale is not None:
        opts += bytes([1, 3, 3, wscale])  # NOP + window scale, as Linux aligns it
    if len(opts) % 4:
        opts += b"\0" * (4 - len(opts) % 4)
    offset = (20 + len(opts)) // 4
    header = struct.pack(
        "!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, urgent
    )
    return _with_checksum(header + opts + payload, 16, TCP, src, dst)


def udp(
    sport: int, dport: int, payload: bytes = b"", *, src: str | None = None, dst: str | None = None
) -> bytes:
    segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _with_checksum(segment, 6, UDP, src, dst)


def _icmp4(icmp_type: int, code: int, rest: bytes, body: bytes) -> bytes:
    message = struct.pack("!BBH", icmp_type, code, 0) + rest + body
    return message[:2] + struct.pack("!H", checksum(message)) + message[4:]


def icmp_echo(type_: int, ident: int, seq: int, payload: bytes = b"") -> bytes:
    """ICMP echo request (8) or reply (0)."""
    return _icmp4(type_, 0, struct.pack("!HH", ident, seq), payload)


def icmp_error(type_: int, code: int, quoted: bytes, *, rest: int = 0) -> bytes:
    """ICMP error quoting ``quoted``; ``rest`` is the 32-bit word after the checksum."""
    return _icmp4(type_, code, struct.pack("!I", rest), quoted)


def _icmp6(
    icmp_type: int, code: int, rest: bytes, body: bytes, src: str | None, dst: str | None
) -> bytes:
    message = struct.pack("!BBH", icmp_type, code, 0) + rest + body
    return _with_checksum(message, 2, ICMPV6, src, dst)


def icmpv6_echo(
    type_: int,
    ident: int,
    seq: int,
    payload: bytes = b"",
    *,
    src: str | None = None,
    dst: str | None = None,
) -> bytes:
    """ICMPv6 echo request (128) or reply (129)."""
    return _icmp6(type_, 0, struct.pack("!HH", ident, seq), payload, src, dst)


def icmpv6_error(
    type_: int,
    code: int,
    quoted: bytes,
    *,
    rest: int = 0,
    src: str | None = None,
    dst: str | None = None,
) -> bytes:
    """ICMPv6 error (1-4) quoting ``quoted``; ``rest`` is e.g. the MTU for type 2."""
    return _icmp6(type_, code, struct.pack("!I", rest), quoted, src, dst)


# --- whole packets -------------------------------------------------------------


def tcp4(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
    seq: int = 0,
    ack: int = 0,
    payload: bytes = b"",
    window: int = 65535,
    *,
    wscale: int | None = None,
    ttl: int = 64,
) -> bytes:
    segment = tcp(sport, dport, flags, seq, ack, window, payload, wscale, src=src, dst=dst)
    return ipv4(src, dst, TCP, segment, ttl=ttl)


def tcp6(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    flags: int,
    seq: int = 0,
    ack: int = 0,
    payload: bytes = b"",
    window: int = 65535,
    *,
    wscale: int | None = None,
    hop_limit: int = 64,
) -> bytes:
    segment = tcp(sport, dport, flags, seq, ack, window, payload, wscale, src=src, dst=dst)
    return ipv6(src, dst, TCP, segment, hop_limit=hop_limit)


def udp4(
    src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, ttl: int = 64
) -> bytes:
    return ipv4(src, dst, UDP, udp(sport, dport, payload, src=src, dst=dst), ttl=ttl)


def udp6(
    src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, hop_limit: int = 64
) -> bytes:
    segment = udp(sport, dport, payload, src=src, dst=dst)
    return ipv6(src, dst, UDP, segment, hop_limit=hop_limit)


def ping4(src: str, dst: str, ident: int, seq: int = 0, *, reply: bool = False) -> bytes:
    return ipv4(src, dst, ICMP, icmp_echo(0 if reply else 8, ident, seq, b"ping"))


def ping6(src: str, dst: str, ident: int, seq: int = 0, *, reply: bool = False) -> bytes:
    message = icmpv6_echo(129 if reply else 128, ident, seq, b"ping", src=src, dst=dst)
    return ipv6(src, dst, ICMPV6, message)
