"""Fuzz properties of the packet parser and the capture reader.

The contract under test (DESIGN.md, house rule 3): ``parse`` returns a
``Packet`` or raises exactly ``PacketError`` with a documented reason, for
any bytes at all; the same for ``parse_embedded`` (embedded reasons only)
and for ``iter_pcap`` (``PcapError``).  Inputs are random bytes and, more
usefully, valid packets from tests/packets.py with bits flipped, bytes
overwritten, tails cut and pieces of two packets spliced together.
"""

from __future__ import annotations

import io
import random
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import PacketError
from node.packet import (
    ERROR_REASONS,
    ICMP,
    ICMPV6,
    TCP,
    UDP,
    Packet,
    parse,
    parse_addr,
    parse_embedded,
)
from node.pcap import PcapError, iter_pcap
from tests import packets as pk

EMBEDDED_REASONS = {"embedded-truncated", "bad-embedded"}

ipv4_addr = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str(b) for b in n.to_bytes(4, "big")))
ipv6_addr = st.integers(0, 2**128 - 1).map(
    lambda n: ":".join(f"{w:x}" for w in struct.unpack("!8H", n.to_bytes(16, "big")))
)
port = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
flags = st.integers(0, 255)
small_payload = st.binary(max_size=64)
wscale = st.none() | st.integers(0, 255)


def _check(packet: Packet) -> None:
    """Invariants of every successfully parsed packet."""
    assert type(packet) is Packet
    assert packet.family in (4, 6)
    assert 0 <= packet.src < 2 ** (32 if packet.family == 4 else 128)
    assert 0 <= packet.dst < 2 ** (32 if packet.family == 4 else 128)
    assert 0 <= packet.sport <= 65535 and 0 <= packet.dport <= 65535
    assert 0 <= packet.proto <= 255
    assert packet.payload_len >= 0
    if packet.embedded is not None:
        assert packet.embedded.family == packet.family
        assert packet.embedded.embedded is None


def assert_parses_or_packet_error(data: bytes) -> None:
    try:
        packet = parse(data)
    except PacketError as exc:
        assert type(exc) is PacketError
        assert exc.reason in ERROR_REASONS, exc.reason
        return
    _check(packet)
    assert packet.length <= len(data)


def assert_embedded_or_embedded_error(data: bytes) -> None:
    try:
        packet = parse_embedded(data)
    except PacketError as exc:
        assert type(exc) is PacketError
        assert exc.reason in EMBEDDED_REASONS, exc.reason
        return
    assert packet.family in (4, 6) and packet.embedded is None


# --- valid packets ------------------------------------------------------------------


@st.composite
def valid_packets(draw: st.DrawFn, family: int | None = None) -> bytes:
    """A valid packet of any of the shapes the builder knows."""
    v6 = draw(st.booleans()) if family is None else family == 6
    src = draw(ipv6_addr if v6 else ipv4_addr)
    dst = draw(ipv6_addr if v6 else ipv4_addr)
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "error", "other"]))
    if kind == "tcp":
        segment = pk.tcp(
            draw(port), draw(port), draw(flags), draw(u32), draw(u32), draw(port),
            draw(small_payload), draw(wscale), src=src, dst=dst,
        )  # fmt: skip
        proto = TCP
    elif kind == "udp":
        segment, proto = pk.udp(draw(port), draw(port), draw(small_payload), src=src, dst=dst), UDP
    elif kind == "echo":
        if v6:
            t = draw(st.sampled_from([128, 129]))
            segment, proto = pk.icmpv6_echo(t, draw(port), draw(port), src=src, dst=dst), ICMPV6
        else:
            segment, proto = pk.icmp_echo(draw(st.sampled_from([0, 8])), draw(port), 1), ICMP
    elif kind == "error":
        quoted = draw(valid_packets(6 if v6 else 4))
        cut = quoted[: draw(st.integers(0, len(quoted)))]
        quoted = cut if _quotable(cut) else quoted
        if v6:
            t = draw(st.sampled_from([1, 2, 3, 4]))
            segment, proto = pk.icmpv6_error(t, 0, quoted, src=src, dst=dst), ICMPV6
        else:
            segment, proto = (
                pk.icmp_error(draw(st.sampled_from([3, 4, 5, 11, 12])), 0, quoted),
                ICMP,
            )
    else:
        segment, proto = draw(small_payload), draw(st.sampled_from([47, 50, 132, 59]))
    if v6:
        ext = draw(st.lists(st.sampled_from(_EXT_HEADERS), max_size=4))
        return pk.ipv6(src, dst, proto, segment, ext)
    return pk.ipv4(
        src, dst, proto, segment, ttl=draw(st.integers(0, 255)),
        frag_offset=draw(st.sampled_from([0, 0, 0, 1, 8191])), more_fragments=draw(st.booleans()),
    )  # fmt: skip


def _quotable(data: bytes) -> bool:
    try:
        parse_embedded(data)
    except PacketError:
        return False
    return True


_EXT_HEADERS = [
    pk.routing(),
    pk.dest_options(),
    pk.dest_options(b"\x05\x02\0\0"),
    pk.auth_header(),
    pk.fragment6(0, more=True),
    pk.fragment6(5),
]


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_packets()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "cut-and-fix", "splice"]))
        if op == "splice":
            other = draw(valid_packets())
            data = (
                data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
            )
        elif not data:
            continue
        elif op == "flip":
            i = draw(st.integers(0, len(data) * 8 - 1))
            data[i // 8] ^= 1 << (i % 8)
        elif op == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        else:
            del data[draw(st.integers(0, len(data))) :]
            if op == "cut-and-fix":
                _fix_ip_length(data)
    return bytes(data)


def _fix_ip_length(data: bytearray) -> None:
    """Make the IP length field agree with a cut packet, so the cut reaches L4 checks."""
    if len(data) >= 20 and data[0] >> 4 == 4:
        data[2:4] = len(data).to_bytes(2, "big")
    elif len(data) >= 40 and data[0] >> 4 == 6:
        data[4:6] = (len(data) - 40).to_bytes(2, "big")


# --- properties ----------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_random_bytes_parse_or_packet_error(data: bytes) -> None:
    assert_parses_or_packet_error(data)


@given(st.sampled_from([b"\x45", b"\x46", b"\x4f", b"\x60"]), st.binary(max_size=120))
def test_random_bytes_behind_plausible_version_byte(first: bytes, rest: bytes) -> None:
    assert_parses_or_packet_error(first + rest)
    assert_embedded_or_embedded_error(first + rest)


@given(valid_packets())
def test_valid_packets_always_parse(data: bytes) -> None:
    packet = parse(data)
    _check(packet)
    assert packet.length == len(data)


@settings(max_examples=300)
@given(mutated_packets())
def test_mutated_packets_parse_or_packet_error(data: bytes) -> None:
    assert_parses_or_packet_error(data)
    assert_embedded_or_embedded_error(data)


@given(ipv4_addr, port, ipv4_addr, port, flags, u32, u32, small_payload, port)
def test_tcp4_round_trip(
    src: str, sport: int, dst: str, dport: int, fl: int, seq: int, ack: int, data: bytes, win: int
) -> None:
    p = parse(pk.tcp4(src, sport, dst, dport, fl, seq, ack, data, win))
    assert (p.src, p.dst) == (parse_addr(src)[1], parse_addr(dst)[1])
    assert (p.sport, p.dport, p.tcp_flags, p.seq, p.ack, p.window) == (
        sport,
        dport,
        fl,
        seq,
        ack,
        win,
    )
    assert (p.payload_len, p.length, p.proto) == (len(data), 40 + len(data), TCP)


@given(ipv6_addr, port, ipv6_addr, port, small_payload, st.lists(st.sampled_from(_EXT_HEADERS[:4])))
def test_udp6_round_trip_through_extension_headers(
    src: str, sport: int, dst: str, dport: int, data: bytes, ext: list[tuple[int, bytes]]
) -> None:
    raw = pk.ipv6(src, dst, UDP, pk.udp(sport, dport, data), ext[:8])
    p = parse(raw)
    assert (p.family, p.proto, p.sport, p.dport, p.payload_len) == (6, UDP, sport, dport, len(data))


@given(st.binary(max_size=300))
def test_random_capture_files_yield_or_pcap_error(data: bytes) -> None:
    _consume_capture(data)


@settings(max_examples=200)
@given(st.data())
def test_mutated_capture_files_yield_or_pcap_error(data: st.DataObject) -> None:
    frames = data.draw(st.lists(valid_packets(), max_size=3))
    capture = bytearray(_capture_bytes(frames, data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(capture) - 1))
        capture[i] = data.draw(st.integers(0, 255))
    capture = capture[: data.draw(st.integers(0, len(capture)))]
    _consume_capture(bytes(capture))


def _capture_bytes(frames: list[bytes], pcapng: bool) -> bytes:
    if not pcapng:
        out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
        for frame in frames:
            eth = b"\2" * 12 + (b"\x86\xdd" if frame[0] >> 4 == 6 else b"\x08\x00") + frame
            out += struct.pack("<IIII", 1, 2, len(eth), len(eth)) + eth
        return out
    shb = struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    idb = struct.pack("<IIHHII", 1, 20, 101, 0, 0, 20)
    out = shb + idb
    for frame in frames:
        padded = frame + b"\0" * (-len(frame) % 4)
        length = 32 + len(padded)
        head = struct.pack("<IIIIIII", 6, length, 0, 0, 5, len(frame), len(frame))
        out += head + padded + struct.pack("<I", length)
    return out


def _consume_capture(data: bytes) -> None:
    try:
        for record in iter_pcap(io.BytesIO(data)):
            assert record.index >= 1
            assert (record.data is None) != (record.link_error is None)
            if record.data is not None:
                assert_parses_or_packet_error(record.data)
    except PcapError:
        pass


# --- a long seeded run without Hypothesis ----------------------------------------------


def _seed_corpus() -> list[bytes]:
    a4, b4, a6, b6 = "10.1.2.3", "10.9.8.7", "2001:db8::5", "2001:db8::6"
    tcp = pk.tcp4(a4, 1234, b4, 80, 0x12, 1, 2, b"data", wscale=7)
    udp6 = pk.udp6(a6, 5, b6, 6, b"x" * 30)
    return [
        tcp,
        pk.tcp6(a6, 1, b6, 2, 0x02, wscale=3),
        pk.udp4(a4, 53, b4, 53, b"q" * 20),
        udp6,
        pk.ping4(a4, b4, 7),
        pk.ping6(a6, b6, 8),
        pk.ipv4(b4, a4, ICMP, pk.icmp_error(3, 3, tcp[:28])),
        pk.ipv6(b6, a6, ICMPV6, pk.icmpv6_error(1, 4, udp6)),
        pk.ipv6(
            a6, b6, TCP, pk.tcp(1, 2, 0x10), [pk.routing(), pk.dest_options(), pk.auth_header()]
        ),
        pk.ipv6(a6, b6, UDP, pk.udp(1, 2)[:6], [pk.fragment6(0, more=True)]),
        pk.ipv4(a4, b4, UDP, pk.udp(1, 2, b"z" * 40)[:24], more_fragments=True),
        pk.ipv4(a4, b4, TCP, b"\0" * 16, frag_offset=3),
        pk.ipv4(a4, b4, TCP, pk.tcp(1, 2, 0x02, mss=1460, wscale=2), options=b"\x01" * 8),
    ]


def _mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    choice = rng.random()
    if choice < 0.1:
        return rng.randbytes(rng.randrange(0, 80))
    data = bytearray(rng.choice(corpus))
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0 and data:
            i = rng.randrange(len(data) * 8)
            data[i // 8] ^= 1 << (i % 8)
        elif op == 1 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op in (2, 3):
            del data[rng.randrange(len(data) + 1) :]
            if op == 3:
                _fix_ip_length(data)
        else:
            other = rng.choice(corpus)
            data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
    return bytes(data)


@pytest.mark.slow
def test_hundred_thousand_seeded_mutations() -> None:
    rng = random.Random(20240607)
    corpus = _seed_corpus()
    parsed = failed = 0
    reasons: set[str] = set()
    start = time.perf_counter()
    for _ in range(100_000):
        data = _mutate(rng, corpus)
        try:
            packet = parse(data)
        except PacketError as exc:
            assert type(exc) is PacketError and exc.reason in ERROR_REASONS, exc
            reasons.add(exc.reason)
            failed += 1
            continue
        _check(packet)
        parsed += 1
    elapsed = time.perf_counter() - start
    # the run must exercise both outcomes and most reasons, or it tests little
    assert parsed > 10_000 and failed > 10_000
    assert len(reasons) >= 8, reasons
    assert elapsed < 60
