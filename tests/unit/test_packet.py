"""Unit tests for node.packet (parse, parse_embedded, address helpers)."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from node.errors import BadInput, Misuse, PacketError
from node.packet import (
    ACK,
    ERROR_REASONS,
    FIN,
    ICMP,
    ICMPV6,
    MAX_EXT_HEADERS,
    PSH,
    SYN,
    TCP,
    UDP,
    Packet,
    _PacketMaker,
    format_addr,
    parse,
    parse_addr,
    parse_embedded,
)
from tests.packets import (
    auth_header,
    dest_options,
    fragment6,
    hop_by_hop,
    icmp_echo,
    icmp_error,
    icmpv6_echo,
    icmpv6_error,
    ipv4,
    ipv6,
    ping4,
    ping6,
    routing,
    tcp,
    tcp4,
    tcp6,
    udp,
    udp4,
    udp6,
)

A4, B4, R4 = "192.0.2.1", "198.51.100.7", "203.0.113.254"
A6, B6, R6 = "2001:db8::1", "2001:db8:1::2", "2001:db8:ff::fe"
A4_INT = 0xC0000201
B4_INT = 0xC6336407
A6_INT = 0x20010DB8 << 96 | 1


# --- TCP / UDP ------------------------------------------------------------------


def test_tcp_ipv4_fields() -> None:
    data = tcp4(A4, 40000, B4, 443, ACK | PSH, seq=1000, ack=2000, payload=b"x" * 100, window=512)
    p = parse(data)
    assert (p.family, p.src, p.dst, p.proto) == (4, A4_INT, B4_INT, TCP)
    assert (p.sport, p.dport) == (40000, 443)
    assert (p.tcp_flags, p.seq, p.ack, p.window) == (ACK | PSH, 1000, 2000, 512)
    assert p.length == len(data) == 140
    assert p.payload_len == 100
    assert p.wscale is None and p.embedded is None and not p.is_fragment
    assert (p.icmp_type, p.icmp_code, p.ttl) == (-1, -1, 64)


def test_tcp_ipv6_fields() -> None:
    data = tcp6(A6, 1234, B6, 80, SYN | ACK, seq=2**32 - 1, ack=7, hop_limit=3)
    p = parse(data)
    assert (p.family, p.src, p.proto, p.sport, p.dport) == (6, A6_INT, TCP, 1234, 80)
    assert p.dst == parse_addr(B6)[1]
    assert (p.seq, p.ack, p.ttl, p.length, p.payload_len) == (2**32 - 1, 7, 3, 60, 0)


def test_packet_built_by_parser_is_a_real_frozen_packet() -> None:
    p = parse(tcp4(A4, 1, B4, 2, SYN, seq=5, wscale=7))
    same = Packet(4, A4_INT, B4_INT, TCP, 1, 2, 44, SYN, 5, 0, 65535, 7, 0, ttl=64)
    assert type(p) is Packet
    assert p == same and hash(p) == hash(same)
    assert dataclasses.replace(p, seq=6).seq == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seq = 1  # type: ignore[misc]


def test_fast_constructor_layout_matches_packet() -> None:
    names = tuple(f.name for f in dataclasses.fields(Packet))
    assert _PacketMaker.__slots__ == Packet.__slots__ == names


@pytest.mark.parametrize(
    ("flags", "wscale", "expected"),
    [(SYN, 7, 7), (SYN | ACK, 14, 14), (SYN, 0, 0), (ACK, 7, None), (SYN, None, None)],
)
def test_window_scale_read_only_from_syn(
    flags: int, wscale: int | None, expected: int | None
) -> None:
    segment = tcp(1, 2, flags, mss=1460, options=b"\x04\x02", wscale=wscale)  # SACK-permitted
    assert parse(ipv4(A4, B4, TCP, segment)).wscale == expected


def test_window_scale_reported_as_sent_even_above_14() -> None:
    assert parse(tcp4(A4, 1, B4, 2, SYN, wscale=20)).wscale == 20


@pytest.mark.parametrize(
    "options",
    [
        b"\x00\x01\x03\x03\x07\x00\x00\x00",  # end-of-list before the option
        b"\x02\x01\x03\x03\x07\x00\x00\x00",  # option length 1 is malformed: stop
        b"\x02\x40\x00\x00",  # length runs past the header
        b"\x01\x01\x01\x03",  # kind 3 without its length byte
        b"\x03\x04\x07\x00",  # window scale with the wrong length
    ],
)
def test_malformed_tcp_options_end_walk_without_error(options: bytes) -> None:
    p = parse(ipv4(A4, B4, TCP, tcp(1, 2, SYN, options=options)))
    assert p.wscale is None and p.sport == 1


def test_udp_ipv4_and_ipv6() -> None:
    p4 = parse(udp4(A4, 5353, B4, 53, b"q" * 33, ttl=1))
    assert (p4.proto, p4.sport, p4.dport, p4.payload_len, p4.ttl) == (UDP, 5353, 53, 33, 1)
    p6 = parse(udp6(A6, 53, B6, 5353, b""))
    assert (p6.family, p6.proto, p6.sport, p6.dport, p6.payload_len) == (6, UDP, 53, 5353, 0)


def test_udp_length_shorter_than_ip_payload_is_accepted() -> None:
    segment = udp(1, 2, b"abcd") + b"junk"  # UDP length 12, 16 bytes after the IP header
    assert parse(ipv4(A4, B4, UDP, segment)).payload_len == 4


def test_ipv4_options_are_skipped() -> None:
    options = b"\x94\x04\x00\x00"  # router alert
    p = parse(ipv4(A4, B4, UDP, udp(7, 9, b"z"), options=options))
    assert (p.sport, p.dport, p.payload_len, p.length) == (7, 9, 1, 33)


def test_trailing_link_padding_is_ignored() -> None:
    data = tcp4(A4, 1, B4, 2, ACK, payload=b"ab")
    p = parse(data + b"\0" * 6)
    assert (p.length, p.payload_len) == (len(data), 2)
    data6 = udp6(A6, 1, B6, 2, b"abc")
    assert parse(data6 + b"\xff" * 4).payload_len == 3


def test_other_protocol_has_zero_ports() -> None:
    gre = parse(ipv4(A4, B4, 47, b"\0" * 8))
    assert (gre.proto, gre.sport, gre.dport, gre.icmp_type) == (47, 0, 0, -1)
    esp6 = parse(ipv6(A6, B6, 50, b"\1" * 16))
    assert (esp6.proto, esp6.sport, esp6.payload_len) == (50, 0, 0)


def test_icmpv4_number_inside_ipv6_is_not_icmp() -> None:
    p = parse(ipv6(A6, B6, ICMP, icmp_echo(8, 99, 1)))
    assert (p.proto, p.sport, p.icmp_type) == (ICMP, 0, -1)


# --- ICMP ---------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "icmp_type"), [(False, 8), (True, 0)])
def test_icmp_echo_identifier_is_both_ports(reply: bool, icmp_type: int) -> None:
    p = parse(ping4(A4, B4, ident=0xBEEF, seq=3, reply=reply))
    assert (p.proto, p.sport, p.dport) == (ICMP, 0xBEEF, 0xBEEF)
    assert (p.icmp_type, p.icmp_code, p.payload_len) == (icmp_type, 0, 4)


@pytest.mark.parametrize(("reply", "icmp_type"), [(False, 128), (True, 129)])
def test_icmpv6_echo_identifier_is_both_ports(reply: bool, icmp_type: int) -> None:
    p = parse(ping6(A6, B6, ident=77, reply=reply))
    assert (p.proto, p.sport, p.dport, p.icmp_type) == (ICMPV6, 77, 77, icmp_type)


def test_icmp_non_echo_informational_has_zero_ports() -> None:
    timestamp = icmp_echo(13, 5, 5, b"\0" * 12)  # same layout as echo, other type
    p = parse(ipv4(A4, B4, ICMP, timestamp))
    assert (p.icmp_type, p.sport, p.embedded) == (13, 0, None)
    nd = parse(ipv6(A6, B6, ICMPV6, icmpv6_echo(135, 5, 5, b"\0" * 16)))
    assert (nd.icmp_type, nd.sport, nd.embedded) == (135, 0, None)


def test_icmp_error_quoting_tcp_rfc792_minimum() -> None:
    original = tcp4(B4, 443, A4, 40000, ACK, seq=123456, payload=b"y" * 50)
    quoted = original[:28]  # IP header + 64 bits: ports and sequence number
    p = parse(ipv4(R4, B4, ICMP, icmp_error(3, 4, quoted, rest=1400)))
    assert (p.icmp_type, p.icmp_code, p.sport, p.dport) == (3, 4, 0, 0)
    inner = p.embedded
    assert inner is not None
    assert (inner.family, inner.src, inner.dst, inner.proto) == (4, B4_INT, A4_INT, TCP)
    assert (inner.sport, inner.dport, inner.seq, inner.length) == (443, 40000, 123456, 90)
    assert inner.tcp_flags == 0 and inner.embedded is None


@pytest.mark.parametrize("icmp_type", [3, 4, 5, 11, 12])
def test_every_icmp_error_type_parses_embedded_udp(icmp_type: int) -> None:
    quoted = udp4(A4, 5000, B4, 53, b"dns query")
    p = parse(ipv4(R4, A4, ICMP, icmp_error(icmp_type, 0, quoted)))
    assert p.embedded is not None
    assert (p.embedded.proto, p.embedded.sport, p.embedded.dport) == (UDP, 5000, 53)


def test_icmp_error_quoting_echo_and_an_icmp_error() -> None:
    echo = ping4(A4, B4, ident=4242)
    p = parse(ipv4(R4, A4, ICMP, icmp_error(11, 0, echo)))
    assert p.embedded is not None
    assert (p.embedded.sport, p.embedded.dport, p.embedded.icmp_type) == (4242, 4242, 8)
    nested = ipv4(B4, A4, ICMP, icmp_error(3, 1, udp4(A4, 1, B4, 2)))
    q = parse(ipv4(R4, B4, ICMP, icmp_error(3, 1, nested)))
    assert q.embedded is not None
    assert (q.embedded.icmp_type, q.embedded.icmp_code, q.embedded.sport) == (3, 1, 0)
    assert q.embedded.embedded is None


def test_icmpv6_errors_with_embedded_tcp_and_udp() -> None:
    quoted = tcp6(A6, 5555, B6, 22, ACK, seq=99, payload=b"s" * 1300)
    too_big = icmpv6_error(2, 0, quoted[:1232], rest=1280, src=R6, dst=A6)
    p = parse(ipv6(R6, A6, ICMPV6, too_big))
    assert (p.icmp_type, p.sport) == (2, 0)
    assert p.embedded is not None
    assert (p.embedded.family, p.embedded.sport, p.embedded.dport) == (6, 5555, 22)
    assert (p.embedded.seq, p.embedded.length) == (99, 40 + 20 + 1300)
    for icmp_type in (1, 3, 4):
        err = icmpv6_error(icmp_type, 0, udp6(A6, 7, B6, 8, b"u"), src=R6, dst=A6)
        inner = parse(ipv6(R6, A6, ICMPV6, err)).embedded
        assert inner is not None and (inner.sport, inner.dport) == (7, 8)


def test_icmpv6_error_quoting_packet_with_extension_headers() -> None:
    quoted = ipv6(A6, B6, UDP, udp(10, 20), [hop_by_hop(), dest_options(b"\x01\x02\0\0")])
    p = parse(ipv6(R6, A6, ICMPV6, icmpv6_error(4, 1, quoted, rest=40)))
    assert p.embedded is not None
    assert (p.embedded.proto, p.embedded.sport, p.embedded.dport) == (UDP, 10, 20)


def test_parse_embedded_accepts_claimed_length_beyond_quote() -> None:
    original = udp4(A4, 1, B4, 2, b"p" * 1000)
    inner = parse_embedded(original[:28])
    assert (inner.length, inner.sport, inner.dport, inner.payload_len) == (1028, 1, 2, 0)


def test_parse_embedded_of_quoted_fragments() -> None:
    later = ipv4(A4, B4, UDP, b"\0" * 8, frag_offset=10)
    assert parse_embedded(later) == Packet(4, A4_INT, B4_INT, UDP, 0, 0, 28, is_fragment=True)
    first = ipv4(A4, B4, TCP, b"\0\1", more_fragments=True)  # cut before the ports
    assert parse_embedded(first).sport == 0
    first6 = ipv6(A6, B6, TCP, tcp(3, 4, SYN), [fragment6(0, more=True)])
    inner = parse_embedded(first6)
    assert (inner.is_fragment, inner.sport, inner.dport) == (True, 3, 4)


# --- IPv6 extension headers ---------------------------------------------------


@pytest.mark.parametrize(
    "chain",
    [
        [hop_by_hop()],
        [routing()],
        [dest_options(b"\x05\x02\0\0")],
        [auth_header()],
        [hop_by_hop(b"\x05\x02\0\0"), routing(), dest_options(), auth_header()],
        [dest_options()] * MAX_EXT_HEADERS,
    ],
)
def test_extension_headers_are_walked(chain: list[tuple[int, bytes]]) -> None:
    data = ipv6(A6, B6, TCP, tcp(9, 10, SYN, seq=1, payload=b"abc"), chain)
    p = parse(data)
    assert (p.proto, p.sport, p.dport, p.payload_len, p.length) == (TCP, 9, 10, 3, len(data))


def test_no_next_header_stops_walk() -> None:
    p = parse(ipv6(A6, B6, 59, b"", [dest_options()]))
    assert (p.proto, p.sport, p.length) == (59, 0, 48)


# --- fragments ----------------------------------------------------------------


def test_ipv4_first_fragment_with_complete_tcp_header() -> None:
    segment = tcp(1000, 80, ACK, seq=5, payload=b"d" * 64)
    p = parse(ipv4(A4, B4, TCP, segment[:48], more_fragments=True, ident=7))
    assert p.is_fragment and (p.sport, p.dport, p.seq, p.payload_len) == (1000, 80, 5, 28)


def test_ipv4_first_fragment_udp_length_not_checked() -> None:
    segment = udp(53, 53, b"z" * 100)
    p = parse(ipv4(A4, B4, UDP, segment[:40], more_fragments=True))
    assert p.is_fragment and (p.sport, p.dport, p.payload_len) == (53, 53, 32)


def test_ipv4_first_fragment_with_cut_l4_header_has_no_ports() -> None:
    p = parse(ipv4(A4, B4, TCP, tcp(1, 2, SYN)[:12], more_fragments=True))
    assert p.is_fragment and (p.proto, p.sport, p.dport) == (TCP, 0, 0)


@pytest.mark.parametrize("more", [True, False])
def test_ipv4_later_fragment_has_no_l4(more: bool) -> None:
    fake_header = udp(1, 2)  # looks like UDP but is the middle of the datagram
    p = parse(ipv4(A4, B4, UDP, fake_header, frag_offset=185, more_fragments=more))
    assert p == Packet(4, A4_INT, B4_INT, UDP, 0, 0, 28, is_fragment=True)


def test_dont_fragment_alone_is_not_a_fragment() -> None:
    p = parse(ipv4(A4, B4, UDP, udp(1, 2), dont_fragment=True))
    assert not p.is_fragment and p.sport == 1


def test_ipv6_fragments() -> None:
    first = parse(ipv6(A6, B6, UDP, udp(5, 6, b"q" * 20)[:16], [fragment6(0, more=True, ident=1)]))
    assert first.is_fragment and (first.proto, first.sport, first.dport) == (UDP, 5, 6)
    later = parse(ipv6(A6, B6, TCP, tcp(5, 6, ACK), [hop_by_hop(), fragment6(3, ident=1)]))
    assert later.is_fragment and (later.proto, later.sport, later.dport) == (TCP, 0, 0)
    atomic = parse(ipv6(A6, B6, TCP, tcp(5, 6, ACK), [fragment6(0, more=False)]))
    assert atomic.is_fragment and atomic.sport == 5


# --- errors ---------------------------------------------------------------------


def _set(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


_TCP4 = tcp4(A4, 1, B4, 2, ACK, payload=b"hello")
_UDP4 = udp4(A4, 1, B4, 2, b"hello")
_ERROR_CASES: list[tuple[str, str, bytes]] = [
    ("empty", "truncated", b""),
    ("short-ipv4", "truncated", _TCP4[:19]),
    ("short-ipv6", "truncated", udp6(A6, 1, B6, 2)[:39]),
    ("short-tcp", "truncated", ipv4(A4, B4, TCP, tcp(1, 2, ACK)[:19])),
    ("short-udp", "truncated", ipv4(A4, B4, UDP, b"\0" * 7)),
    ("short-icmp", "truncated", ipv4(A4, B4, ICMP, b"\x08\0\0\0")),
    ("short-icmpv6", "truncated", ipv6(A6, B6, ICMPV6, b"\x80\0\0\0\0\0\0")),
    ("short-ext", "truncated", ipv6(A6, B6, 60, b"\x06\0\0\0")),
    ("ext-past-end", "truncated", ipv6(A6, B6, 60, b"\x3b\x01" + b"\0" * 6)),
    ("version-5", "bad-version", b"\x55" + _TCP4[1:]),
    ("version-0", "bad-version", b"\x05" + _TCP4[1:]),
    ("ihl-4", "bad-ihl", b"\x44" + _TCP4[1:]),
    ("total-below-ihl", "bad-total-length", _set(_TCP4, 2, "!H", 19)),
    ("total-beyond-data", "bad-total-length", _set(_TCP4, 2, "!H", len(_TCP4) + 1)),
    ("ihl-beyond-total", "bad-total-length", b"\x4f" + _TCP4[1:]),
    ("v6-payload-beyond", "bad-payload-length", _set(udp6(A6, 1, B6, 2), 4, "!H", 9)),
    ("hbh-not-first", "bad-ext-order", ipv6(A6, B6, UDP, udp(1, 2), [routing(), hop_by_hop()])),
    (
        "ext-chain-too-long",
        "too-many-ext-headers",
        ipv6(A6, B6, UDP, udp(1, 2), [dest_options()] * (MAX_EXT_HEADERS + 1)),
    ),
    ("tcp-offset-4", "bad-tcp-offset", _set(_TCP4, 32, "!B", 0x40)),
    ("tcp-offset-past-end", "bad-tcp-offset", _set(_TCP4, 32, "!B", 0xF0)),
    ("udp-length-7", "bad-udp-length", _set(_UDP4, 24, "!H", 7)),
    ("udp-length-past-end", "bad-udp-length", _set(_UDP4, 24, "!H", 14)),
    ("quote-empty", "embedded-truncated", ipv4(R4, A4, ICMP, icmp_error(3, 1, b""))),
    ("quote-ip-cut", "embedded-truncated", ipv4(R4, A4, ICMP, icmp_error(3, 1, _TCP4[:19]))),
    ("quote-l4-cut", "embedded-truncated", ipv4(R4, A4, ICMP, icmp_error(3, 1, _TCP4[:27]))),
    (
        "quote-v6-ext-cut",
        "embedded-truncated",
        ipv6(R6, A6, ICMPV6, icmpv6_error(1, 0, ipv6(A6, B6, 60, b"\x11\x00\0\0"))),
    ),
    (
        "quote-wrong-family",
        "bad-embedded",
        ipv4(R4, A4, ICMP, icmp_error(3, 1, udp6(A6, 1, B6, 2))),
    ),
    (
        "quote-bad-version",
        "bad-embedded",
        ipv4(R4, A4, ICMP, icmp_error(3, 1, b"\x75" + _TCP4[1:])),
    ),
    ("quote-bad-ihl", "bad-embedded", ipv4(R4, A4, ICMP, icmp_error(3, 1, b"\x43" + _TCP4[1:]))),
    (
        "quote-total-below-ihl",
        "bad-embedded",
        ipv4(R4, A4, ICMP, icmp_error(3, 1, _set(_TCP4, 2, "!H", 10))),
    ),
]


@pytest.mark.parametrize(
    ("reason", "data"), [(r, d) for _, r, d in _ERROR_CASES], ids=[c[0] for c in _ERROR_CASES]
)
def test_error_reasons(reason: str, data: bytes) -> None:
    with pytest.raises(PacketError) as info:
        parse(data)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason)


def test_every_documented_reason_is_reachable() -> None:
    assert {reason for _, reason, _ in _ERROR_CASES} == set(ERROR_REASONS)


def test_packet_error_is_bad_input() -> None:
    with pytest.raises(BadInput):
        parse(b"\x45")


def test_parse_embedded_raises_only_embedded_reasons() -> None:
    with pytest.raises(PacketError) as cut:
        parse_embedded(_TCP4[:25])
    assert cut.value.reason == "embedded-truncated"
    with pytest.raises(PacketError) as bad:
        parse_embedded(b"\x75" + _TCP4[1:])
    assert bad.value.reason == "bad-embedded"
    assert "bad-version" in bad.value.detail


def test_fin_flag_survives() -> None:
    assert parse(tcp4(A4, 1, B4, 2, FIN | ACK)).tcp_flags == FIN | ACK


# --- address helpers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "family", "value"),
    [
        ("192.0.2.1", 4, A4_INT),
        ("0.0.0.0", 4, 0),
        ("2001:db8::1", 6, A6_INT),
        ("fe80::1", 6, 0xFE80 << 112 | 1),
    ],
)
def test_parse_and_format_addr_round_trip(text: str, family: int, value: int) -> None:
    assert parse_addr(text) == (family, value)
    assert format_addr(family, value) == text


@pytest.mark.parametrize("text", ["", "1.2.3", "10.0.0.256", "fe80::1%eth0", "2001:db8::/32", "x"])
def test_parse_addr_rejects_non_addresses(text: str) -> None:
    with pytest.raises(BadInput):
        parse_addr(text)


@pytest.mark.parametrize(("family", "value"), [(5, 1), (4, 2**32), (6, -1), (0, 0)])
def test_format_addr_misuse(family: int, value: int) -> None:
    with pytest.raises(Misuse):
        format_addr(family, value)


def test_prefix_capture_takes_lengths_from_headers():
    # NFQUEUE hands over at most its copy range; pcap files at most the snap length.
    full = tcp4(A4, 1000, B4, 80, ACK, seq=1, ack=1, payload=b"x" * 3000)
    p = parse(full[:80], prefix=True)
    assert (p.length, p.payload_len, p.dport) == (len(full), 3000, 80)
    with pytest.raises(PacketError) as e:
        parse(full[:80])
    assert e.value.reason == "bad-total-length"
    u6 = udp6(A6, 53, B6, 5353, b"y" * 2000)
    p6 = parse(u6[:64], prefix=True)
    assert (p6.length, p6.payload_len) == (len(u6), 2000)
    with pytest.raises(PacketError):
        parse(full[:30], prefix=True)  # the TCP header itself is cut
