"""Flow keys: direction independence, wire form, text."""

from __future__ import annotations

import ipaddress

import pytest

from node.errors import BadInput, Misuse
from node.flow.key import FlowKey, flow_key, flow_key_bytes
from node.packet import ICMP, ICMPV6, TCP, UDP, Packet

A4 = int(ipaddress.IPv4Address("10.0.0.1"))
B4 = int(ipaddress.IPv4Address("10.0.0.2"))
A6 = int(ipaddress.IPv6Address("2001:db8::1"))
B6 = int(ipaddress.IPv6Address("2001:db8::2"))


def pkt(family: int, src: int, sport: int, dst: int, dport: int, proto: int = TCP) -> Packet:
    return Packet(family, src, dst, proto, sport, dport, 40)


@pytest.mark.parametrize(("family", "a", "b"), [(4, A4, B4), (6, A6, B6)])
def test_both_directions_share_a_key(family: int, a: int, b: int) -> None:
    forward, a_to_b = flow_key(pkt(family, a, 40000, b, 80))
    backward, b_to_a = flow_key(pkt(family, b, 80, a, 40000))
    assert forward == backward
    assert hash(forward) == hash(backward)
    assert (a_to_b, b_to_a) == (True, False)


def test_endpoint_a_is_the_lower_address_port_pair() -> None:
    key, a_to_b = flow_key(pkt(4, B4, 1, A4, 65535))
    assert not a_to_b
    assert (key.a_addr, key.a_port, key.b_addr, key.b_port) == (A4, 65535, B4, 1)
    # Same address: the port decides.
    key, a_to_b = flow_key(pkt(4, A4, 9000, A4, 80))
    assert not a_to_b
    assert (key.a_port, key.b_port) == (80, 9000)


def test_packet_to_itself_counts_as_a_to_b() -> None:
    _key, a_to_b = flow_key(pkt(4, A4, 5, A4, 5))
    assert a_to_b


def test_protocol_and_family_are_part_of_the_key() -> None:
    tcp_key, _ = flow_key(pkt(4, A4, 1, B4, 2, TCP))
    udp_key, _ = flow_key(pkt(4, A4, 1, B4, 2, UDP))
    assert tcp_key != udp_key
    assert (tcp_key.proto, tcp_key.family) == (TCP, 4)
    v6_key, _ = flow_key(pkt(6, A4, 1, B4, 2, TCP))  # same integers, other family
    assert v6_key != tcp_key and v6_key.family == 6


def test_icmp_echo_request_and_reply_share_a_key() -> None:
    request = Packet(4, A4, B4, ICMP, 77, 77, 84, icmp_type=8, icmp_code=0)
    reply = Packet(4, B4, A4, ICMP, 77, 77, 84, icmp_type=0, icmp_code=0)
    assert flow_key(request)[0] == flow_key(reply)[0]
    other_id = Packet(4, A4, B4, ICMP, 78, 78, 84, icmp_type=8, icmp_code=0)
    assert flow_key(other_id)[0] != flow_key(request)[0]


@pytest.mark.parametrize(("family", "a", "b", "size"), [(4, A4, B4, 14), (6, A6, B6, 38)])
def test_wire_form_round_trips(family: int, a: int, b: int, size: int) -> None:
    key, _ = flow_key(pkt(family, b, 443, a, 50000, UDP))
    wire = key.to_bytes()
    assert type(wire) is bytes and len(wire) == size
    back = FlowKey.from_bytes(wire)
    assert back == key and isinstance(back, FlowKey)
    assert back.fields() == (family, UDP, a, 50000, b, 443)


def test_wire_form_is_stable() -> None:
    key, _ = flow_key(pkt(4, B4, 80, A4, 40000))
    assert key.to_bytes().hex() == "04060a000001" + "9c40" + "0a000002" + "0050"


def test_raw_key_equals_flow_key() -> None:
    p = pkt(6, A6, 1, B6, 2)
    raw, a_to_b = flow_key_bytes(p)
    key, same = flow_key(p)
    assert raw == key and a_to_b == same and type(raw) is bytes


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x04\x06" + bytes(11),  # IPv4 one byte short
        b"\x06\x06" + bytes(14),  # IPv6 family with IPv4 length
        b"\x05\x06" + bytes(12),  # unknown family
        bytes.fromhex("04060a00000200500a0000019c40"),  # endpoints in the wrong order
    ],
)
def test_from_bytes_rejects_what_flow_key_never_produces(data: bytes) -> None:
    with pytest.raises(BadInput):
        FlowKey.from_bytes(data)


def test_text_forms() -> None:
    assert str(flow_key(pkt(4, B4, 80, A4, 40000))[0]) == "tcp 10.0.0.1:40000 <-> 10.0.0.2:80"
    v6 = flow_key(pkt(6, A6, 53, B6, 5353, UDP))[0]
    assert str(v6) == "udp [2001:db8::1]:53 <-> [2001:db8::2]:5353"
    echo = flow_key(Packet(6, A6, B6, ICMPV6, 9, 9, 64, icmp_type=128, icmp_code=0))[0]
    assert str(echo) == "icmpv6 2001:db8::1 <-> 2001:db8::2 id=9"
    gre = flow_key(Packet(4, A4, B4, 47, 0, 0, 64))[0]
    assert str(gre) == "proto-47 10.0.0.1 <-> 10.0.0.2"
    assert repr(gre) == "FlowKey('proto-47 10.0.0.1 <-> 10.0.0.2')"


@pytest.mark.parametrize(
    "p",
    [
        Packet(5, A4, B4, TCP, 1, 2, 40),  # unknown family
        Packet(4, 1 << 32, B4, TCP, 1, 2, 40),  # address too large for IPv4
        Packet(4, A4, B4, TCP, 70000, 2, 40),  # port too large
        Packet(6, A6, B6, TCP, 1, 1 << 16, 40),
        Packet(6, 1 << 128, B6, TCP, 1, 2, 40),
        Packet(6, A6, B6, 300, 1, 2, 40),  # protocol too large
        Packet(6, -1, B6, TCP, 1, 2, 40),
    ],
)
def test_packets_breaking_the_contract_are_misuse(p: Packet) -> None:
    with pytest.raises(Misuse):
        flow_key(p)
