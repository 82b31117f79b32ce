"""Direction-independent flow keys.

Both directions of a connection must find the same table entry, so the key
orders the two endpoints: endpoint *A* is the lower ``(addr, port)`` pair,
*B* the higher, and :func:`flow_key` also says whether the packet travels
A -> B.  Linux conntrack keeps two tuples per entry (original and reply) for
the same purpose; one ordered key costs half the memory and no second hash
insert.

The key *is* its wire form: a ``bytes`` subclass holding

    family (1 byte: 4 or 6) | proto (1) | a_addr (4 or 16) | a_port (2)
    | b_addr (4 or 16) | b_port (2)

big-endian, 14 bytes for IPv4 and 38 for IPv6.  That makes keys hashable,
compact (one object of about 47 bytes per IPv4 flow), cheap to build from a
packet, and stable across processes: the sync daemon sends ``to_bytes()``
and the consistent-hash ring hashes it.  A key compares equal to plain
``bytes`` with the same content, which the table uses to look up without
building a :class:`FlowKey` per packet.

ICMP echo request and reply share a key because the parser puts the echo
identifier in both ``sport`` and ``dport`` (see ``node.packet``).  Protocols
without ports have zeros there, so their flows are keyed by address pair.
A packet from an endpoint to itself is always "A -> B".
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from node.errors import BadInput, Misuse
from node.packet import ICMP, ICMPV6, TCP, UDP, Packet

__all__ = ["FlowKey", "flow_key", "flow_key_bytes"]

_V4: Final = struct.Struct(">BBIHIH")
_V4_LEN: Final = _V4.size  # 14
_V6_LEN: Final = 38
_PORTS: Final = 1 << 16
_V6_ENDPOINT_BITS: Final = 144  # 128-bit address + 16-bit port
_V6_ENDPOINT_MASK: Final = (1 << _V6_ENDPOINT_BITS) - 1
_PROTO_NAMES: Final = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmpv6"}
_PORTED: Final = frozenset({TCP, UDP, 132, 136})  # TCP, UDP, SCTP, UDP-Lite
_ECHO: Final = frozenset({ICMP, ICMPV6})


class FlowKey(bytes):
    """A direction-independent flow key; its bytes are its wire form."""

    __slots__ = ()

    @classmethod
    def from_bytes(cls, data: bytes) -> FlowKey:
        """Decode a key sent by a peer.

        Raises :class:`node.errors.BadInput` unless ``data`` is exactly a
        key this module would produce (right length for its family, and in
        canonical order, so one flow never has two encodings).
        """
        key = cls(data)
        if not key:
            raise BadInput("flow key: empty")
        family = key[0]
        if (family, len(key)) not in ((4, _V4_LEN), (6, _V6_LEN)):
            raise BadInput(f"flow key: {len(key)} bytes for family {family}")
        _family, _proto, a_addr, a_port, b_addr, b_port = key.fields()
        if (a_addr, a_port) > (b_addr, b_port):
            raise BadInput("flow key: endpoints not in canonical order")
        return key

    def to_bytes(self) -> bytes:
        """The stable wire form (the inverse of :meth:`from_bytes`)."""
        return bytes(self)

    def fields(self) -> tuple[int, int, int, int, int, int]:
        """``(family, proto, a_addr, a_port, b_addr, b_port)`` in one decode."""
        if self[0] == 4:
            v4: tuple[int, int, int, int, int, int] = _V4.unpack(self)
            return v4
        a = int.from_bytes(self[2:20], "big")
        b = int.from_bytes(self[20:38], "big")
        return 6, self[1], a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF

    @property
    def family(self) -> int:
        return self[0]

    @property
    def proto(self) -> int:
        return self[1]

    @property
    def a_addr(self) -> int:
        return self.fields()[2]

    @property
    def a_port(self) -> int:
        return self.fields()[3]

    @property
    def b_addr(self) -> int:
        return self.fields()[4]

    @property
    def b_port(self) -> int:
        return self.fields()[5]

    def __str__(self) -> str:
        family, proto, a_addr, a_port, b_addr, b_port = self.fields()
        name = _PROTO_NAMES.get(proto, f"proto-{proto}")
        a, b = _addr_text(family, a_addr), _addr_text(family, b_addr)
        if proto in _PORTED:
            return f"{name} {_endpoint(family, a, a_port)} <-> {_endpoint(family, b, b_port)}"
        if proto in _ECHO and a_port:
            return f"{name} {a} <-> {b} id={a_port}"
        return f"{name} {a} <-> {b}"

    def __repr__(self) -> str:
        return f"FlowKey({str(self)!r})"


def _addr_text(family: int, addr: int) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(addr))
    return str(ipaddress.IPv6Address(addr))


def _endpoint(family: int, addr: str, port: int) -> str:
    return f"{addr}:{port}" if family == 4 else f"[{addr}]:{port}"


def flow_key_bytes(p: Packet) -> tuple[bytes, bool]:
    """The key of ``p`` as plain ``bytes`` (the table's lookup fast path).

    Returns ``(key, a_to_b)``; raises :class:`node.errors.Misuse` when the
    packet breaks ``node.packet``'s contract (family, address or port range).
    """
    src_end = p.src * _PORTS + p.sport
    dst_end = p.dst * _PORTS + p.dport
    try:
        if p.family == 4:
            if src_end <= dst_end:
                return _V4.pack(4, p.proto, p.src, p.sport, p.dst, p.dport), True
            return _V4.pack(4, p.proto, p.dst, p.dport, p.src, p.sport), False
        if p.family == 6:
            a_to_b = src_end <= dst_end
            a, b = (src_end, dst_end) if a_to_b else (dst_end, src_end)
            if (p.sport | p.dport) >> 16 or p.proto >> 8 or b > _V6_ENDPOINT_MASK:
                raise OverflowError("IPv6 port, protocol or address out of range")
            value = (((6 << 8 | p.proto) << _V6_ENDPOINT_BITS | a) << _V6_ENDPOINT_BITS) | b
            return value.to_bytes(_V6_LEN, "big"), a_to_b
    except (struct.error, OverflowError) as exc:
        raise Misuse(f"packet fields out of range: {exc}") from exc
    raise Misuse(f"packet family {p.family} is neither 4 nor 6")


def flow_key(p: Packet) -> tuple[FlowKey, bool]:
    """The direction-independent key of ``p`` and whether ``p`` travels A -> B."""
    raw, a_to_b = flow_key_bytes(p)
    return FlowKey(raw), a_to_b
