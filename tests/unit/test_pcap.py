"""Unit tests for node.pcap: classic pcap, pcapng, link layers, damaged files."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from node.errors import BadInput, Misuse
from node.packet import ACK, ICMP, SYN, parse
from node.pcap import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    PcapError,
    PcapRecord,
    iter_pcap,
    link_payload,
    read_pcap,
    write_pcap,
)
from tests.packets import icmp_error, ipv4, ping4, ping6, tcp4, tcp6, udp4, udp6

P1 = tcp4("10.0.0.1", 40000, "10.0.0.2", 80, SYN, seq=1, wscale=7)
P2 = udp6("2001:db8::1", 53, "2001:db8::2", 5353, b"answer")
P3 = ping4("10.0.0.2", "10.0.0.1", ident=9, reply=True)
MAC = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")


def records(data: bytes) -> list[PcapRecord]:
    return list(iter_pcap(io.BytesIO(data)))


def classic(frames: list[tuple[int, int, bytes]], linktype: int, endian: str, nano: bool) -> bytes:
    """A classic pcap by hand: frames are (seconds, fraction, bytes)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, frame in frames:
        out += struct.pack(endian + "IIII", sec, frac, len(frame), len(frame) + 10) + frame
    return out


# --- classic pcap -------------------------------------------------------------


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "raw.pcap"
    written = write_pcap(path, [(1700000000.25, P1), (1700000000.5000015, P2), (0.0, P3)])
    got = list(read_pcap(path))
    assert written == 3
    assert [r.index for r in got] == [1, 2, 3]
    assert [r.data for r in got] == [P1, P2, P3]
    assert [r.link_error for r in got] == [None] * 3
    assert got[0].ts == 1700000000.25
    assert got[1].ts == pytest.approx(1700000000.500002, abs=1e-6)
    assert parse(got[0].data or b"").wscale == 7


def test_write_accepts_path_as_str_and_empty_iterable(tmp_path: Path) -> None:
    path = str(tmp_path / "empty.pcap")
    assert write_pcap(path, []) == 0
    assert list(read_pcap(path)) == []


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_classic_byte_orders_and_resolutions(endian: str, nano: bool) -> None:
    frac = 123456789 if nano else 123456
    got = records(classic([(10, frac, P1), (11, 0, P2)], LINKTYPE_RAW, endian, nano))
    assert [r.data for r in got] == [P1, P2]
    assert got[0].ts == pytest.approx(10.123456789 if nano else 10.123456, abs=1e-9)


def test_classic_linktype_upper_bits_ignored() -> None:
    fcs_flagged = LINKTYPE_RAW | 0x1 << 26 | 0x2 << 28  # FCS flag and length bits
    assert records(classic([(1, 0, P1)], fcs_flagged, "<", False))[0].data == P1


@pytest.mark.parametrize("linktype", [LINKTYPE_IPV4, LINKTYPE_IPV6])
def test_ip_linktypes_pass_frames_through(linktype: int) -> None:
    assert records(classic([(1, 0, P2)], linktype, ">", False))[0].data == P2


def test_write_pcap_rejects_bad_timestamp(tmp_path: Path) -> None:
    with pytest.raises(Misuse):
        write_pcap(tmp_path / "x.pcap", [(-1.0, P1)])
    with pytest.raises(Misuse):
        write_pcap(tmp_path / "y.pcap", [(2.0**32, P1)])


def test_write_pcap_other_linktype(tmp_path: Path) -> None:
    path = tmp_path / "eth.pcap"
    write_pcap(path, [(1.0, MAC + b"\x08\x00" + P1)], linktype=LINKTYPE_ETHERNET)
    assert [r.data for r in read_pcap(path)] == [P1]


# --- link layers ----------------------------------------------------------------


def eth(ethertype: int, payload: bytes, tags: tuple[int, ...] = ()) -> bytes:
    out = MAC
    for tpid in tags:
        out += struct.pack("!HH", tpid, 100)  # tag with VLAN id 100
    return out + struct.pack("!H", ethertype) + payload


def sll(protocol: int, payload: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, MAC[:6], protocol) + payload


def sll2(protocol: int, payload: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", protocol, 0, 3, 1, 4, 6, MAC[:6]) + payload


@pytest.mark.parametrize(
    ("linktype", "frame", "data", "error"),
    [
        (LINKTYPE_ETHERNET, eth(0x0800, P1), P1, None),
        (LINKTYPE_ETHERNET, eth(0x86DD, P2) + b"\0" * 4, P2 + b"\0" * 4, None),
        (LINKTYPE_ETHERNET, eth(0x0800, P1, (0x8100,)), P1, None),
        (LINKTYPE_ETHERNET, eth(0x86DD, P2, (0x88A8, 0x8100)), P2, None),
        (LINKTYPE_ETHERNET, eth(0x0800, P1, (0x88A8, 0x8100, 0x8100)), None, "vlan-too-deep"),
        (LINKTYPE_ETHERNET, eth(0x0806, b"\0" * 28), None, "non-ip"),
        (LINKTYPE_ETHERNET, MAC + b"\x08", None, "link-truncated"),
        (LINKTYPE_ETHERNET, eth(0x8100, b"\0\x64"), None, "link-truncated"),
        (LINKTYPE_LINUX_SLL, sll(0x0800, P3), P3, None),
        (LINKTYPE_LINUX_SLL, sll(0x8100, b"\0\x64\x86\xdd" + P2), P2, None),
        (LINKTYPE_LINUX_SLL, sll(0x0003, b"x"), None, "non-ip"),
        (LINKTYPE_LINUX_SLL, sll(0x0800, b"")[:15], None, "link-truncated"),
        (LINKTYPE_LINUX_SLL2, sll2(0x86DD, P2), P2, None),
        (LINKTYPE_LINUX_SLL2, sll2(0x0800, P1), P1, None),
        (LINKTYPE_LINUX_SLL2, sll2(0x88CC, b"lldp"), None, "non-ip"),
        (105, b"\0" * 40, None, "unsupported-linktype"),
    ],
)
def test_link_layers(linktype: int, frame: bytes, data: bytes | None, error: str | None) -> None:
    got_data, got_error = link_payload(linktype, frame)
    assert got_data == data
    if error is None:
        assert got_error is None
    else:
        assert got_error is not None and got_error.split(":")[0] == error


def test_non_ip_frames_are_yielded_not_raised() -> None:
    frames = [(1, 0, eth(0x0800, P1)), (2, 0, eth(0x0806, b"\0" * 28)), (3, 0, eth(0x86DD, P2))]
    got = records(classic(frames, LINKTYPE_ETHERNET, "<", False))
    assert [(r.index, r.data) for r in got] == [(1, P1), (2, None), (3, P2)]
    assert got[1].link_error == "non-ip: ethertype 0x0806"


# --- pcapng ---------------------------------------------------------------------


def block(endian: str, kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(endian + "II", kind, length) + body + struct.pack(endian + "I", length)


def option(endian: str, code: int, value: bytes) -> bytes:
    return struct.pack(endian + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(endian: str) -> bytes:
    comment = option(endian, 1, b"made by hand")  # shb_comment: an option to skip
    body = struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1) + comment + option(endian, 0, b"")
    return block(endian, 0x0A0D0D0A, body)


def idb(endian: str, linktype: int, *options: bytes, snaplen: int = 0) -> bytes:
    return block(endian, 1, struct.pack(endian + "HHI", linktype, 0, snaplen) + b"".join(options))


def epb(endian: str, if_id: int, ts: int, frame: bytes) -> bytes:
    head = struct.pack(endian + "IIIII", if_id, ts >> 32, ts & 0xFFFFFFFF, len(frame), len(frame))
    return block(endian, 6, head + frame + b"\0" * (-len(frame) % 4))


def spb(endian: str, frame: bytes) -> bytes:
    return block(endian, 3, struct.pack(endian + "I", len(frame)) + frame)


def obsolete_pb(endian: str, if_id: int, ts: int, frame: bytes) -> bytes:
    head = struct.pack(endian + "HHIIII", if_id, 0, ts >> 32, ts & 0xFFFFFFFF, len(frame), 99)
    return block(endian, 2, head + frame)


def pcapng_sample() -> bytes:
    le, be = "<", ">"
    ns = option(le, 9, b"\x09")  # if_tsresol: 10^-9
    return b"".join(
        [
            shb(le),
            idb(le, LINKTYPE_ETHERNET, ns, option(le, 14, struct.pack("<q", 100))),  # +100 s
            idb(le, LINKTYPE_RAW),  # default microseconds
            block(le, 4, b"\0\0\0\0"),  # name resolution block: skipped
            epb(le, 0, 1_500_000_000, eth(0x0800, P1)),
            epb(le, 1, 2_000_001, P3),
            block(le, 0x0BAD, b"unknown block type"),
            spb(le, eth(0x86DD, P2)),  # interface 0
            epb(le, 0, 7, eth(0x0806, b"arp!")),
            shb(be),  # a new section, big-endian, interfaces start over
            idb(be, LINKTYPE_LINUX_SLL2, option(be, 9, b"\x8a")),  # 2^-10 s
            epb(be, 0, 3 << 10, sll2(0x86DD, P2)),
            obsolete_pb(be, 0, 1 << 10, sll2(0x0800, P3)),
        ]
    )


def test_pcapng_sections_interfaces_and_blocks() -> None:
    got = records(pcapng_sample())
    assert [r.index for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r.data for r in got] == [P1, P3, P2, None, P2, P3]
    assert got[3].link_error == "non-ip: ethertype 0x0806"
    assert got[0].ts == pytest.approx(101.5)
    assert got[1].ts == pytest.approx(2.000001)
    assert got[2].ts == got[1].ts  # a simple packet block has no timestamp of its own
    assert got[4].ts == pytest.approx(3.0)
    assert got[5].ts == pytest.approx(1.0)


def test_pcapng_simple_packet_block_respects_snaplen() -> None:
    data = shb("<") + idb("<", LINKTYPE_RAW, snaplen=20) + spb("<", P1)
    assert records(data)[0].data == P1[:20]


def test_pcapng_from_file(tmp_path: Path) -> None:
    path = tmp_path / "sample.pcapng"
    path.write_bytes(pcapng_sample())
    assert len(list(read_pcap(path))) == 6


# --- damaged files ----------------------------------------------------------------


def _pcap_bytes() -> bytes:
    return classic([(1, 0, P1), (2, 0, P2)], LINKTYPE_RAW, "<", False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a capture file"),
        (b"\xd4\xc3", "not a capture file"),
        (b"GET / HTTP/1.1\r\n", "not a pcap or pcapng file"),
        (_pcap_bytes()[:23], "truncated file header"),
        (_pcap_bytes()[:4] + b"\x03\x00" + _pcap_bytes()[6:], "unsupported pcap version 3"),
        (_pcap_bytes()[: 24 + 16 + len(P1) + 5], "record 2: truncated record header"),
        (_pcap_bytes()[:-1], "truncated record 2 data"),
        (_pcap_bytes()[:32] + struct.pack("<I", 300000) + _pcap_bytes()[36:], "record 1: captured"),
    ],
)
def test_damaged_classic_files(data: bytes, message: str) -> None:
    with pytest.raises(PcapError, match=message):
        records(data)


def test_records_before_damage_are_yielded_first() -> None:
    stream = iter_pcap(io.BytesIO(_pcap_bytes()[:-1]))
    assert next(stream).data == P1
    with pytest.raises(PcapError, match="record 2"):
        next(stream)


def _shb_bad_bom() -> bytes:
    head = shb("<")
    return head[:8] + b"\1\2\3\4" + head[12:]


def _trailer_mismatch() -> bytes:
    good = shb("<") + idb("<", LINKTYPE_RAW)
    return good[:-4] + struct.pack("<I", 999)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (shb("<")[:10], "truncated section header"),
        (_shb_bad_bom(), "byte-order magic"),
        (shb("<")[:4] + struct.pack("<I", 30) + shb("<")[8:], "bad block length 30"),
        (_trailer_mismatch(), "trailer says 999"),
        (shb("<") + idb("<", 1)[:-6], "truncated block"),
        (shb("<") + b"\x06\0", "truncated block header after record 0"),
        (shb("<") + epb("<", 0, 0, P1), "record 1: unknown interface 0"),
        (shb("<") + spb("<", P1), "record 1: bad simple packet block"),
        (shb("<") + idb("<", 101) + block("<", 6, b"\0" * 8), "record 1: packet block too short"),
        (shb("<") + idb("<", 101, struct.pack("<HH", 9, 40) + b"\6\0\0\0"), "runs past"),
        (shb("<") + block("<", 1, b"\0\0"), "interface description too short"),
        (block("<", 0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 2, 0, -1)), "version 2"),
    ],
)
def test_damaged_pcapng_files(data: bytes, message: str) -> None:
    with pytest.raises(PcapError, match=message):
        records(data)


def test_epb_captured_length_beyond_block() -> None:
    good = epb("<", 0, 0, P1)
    lying = good[:20] + struct.pack("<I", len(P1) + 100) + good[24:]
    with pytest.raises(PcapError, match="record 1: captured length"):
        records(shb("<") + idb("<", LINKTYPE_RAW) + lying)


def test_pcap_error_is_bad_input() -> None:
    assert issubclass(PcapError, BadInput)


def test_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_pcap(tmp_path / "absent.pcap"))


# --- an independent reader agrees -----------------------------------------------


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_tcpdump_reads_our_file_and_finds_checksums_correct(tmp_path: Path) -> None:
    packets = [
        tcp4("10.0.0.1", 40000, "10.0.0.2", 80, SYN, seq=1, wscale=7),
        tcp4("10.0.0.2", 80, "10.0.0.1", 40000, ACK, seq=9, ack=2, payload=b"odd-length!"),
        udp4("10.0.0.1", 1000, "10.0.0.2", 53, b"dns"),
        tcp6("2001:db8::1", 1, "2001:db8::2", 2, ACK, payload=b"x"),
        udp6("2001:db8::1", 3, "2001:db8::2", 4, b"yy"),
        ping6("2001:db8::1", "2001:db8::2", 5),
        ping4("10.0.0.1", "10.0.0.2", 6),
        ipv4("10.0.0.9", "10.0.0.1", ICMP, icmp_error(3, 3, udp4("10.0.0.1", 1, "10.0.0.2", 2))),
    ]
    path = tmp_path / "check.pcap"
    write_pcap(path, [(1.0 + i, p) for i, p in enumerate(packets)])
    result = subprocess.run(
        ["tcpdump", "-nn", "-vv", "-r", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = result.stdout
    # tcpdump -vv says "(correct)" for TCP, "sum ok" for UDP and ICMPv6 and
    # complains about a wrong IPv4 header or ICMP checksum
    assert out.count("(correct)") == 3
    assert out.count("[udp sum ok]") == 3 and out.count("[icmp6 sum ok]") == 1
    for complaint in ("incorrect", "bad cksum", "wrong icmp cksum", "bad udp", "bad icmp6"):
        assert complaint not in out
    assert "ICMP echo request, id 6" in out and "udp port 2 unreachable" in out
    assert "wscale 7" in out
