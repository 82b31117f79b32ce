"""The pure parts of the chaos samplers, the flood packet and the timed load."""

from __future__ import annotations

import socket
import struct

import pytest

from chaos.errors import ChaosError
from chaos.flood import _checksum, sources, syn_packet
from chaos.load import TimedRequests
from chaos.samplers import (
    IFF_LOWER_UP,
    IFF_UP,
    NLMSG_DONE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    addr_dump_request,
    link_dump_request,
    parse_addr_messages,
    parse_link_messages,
    role_of,
)

HDR = struct.Struct("=IHHII")


def _msg(kind: int, body: bytes) -> bytes:
    pad = b"\0" * (-len(body) % 4)
    return HDR.pack(HDR.size + len(body), kind, 2, 1, 0) + body + pad


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value


def _addr(index: int, local: str) -> bytes:
    body = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, index)
    body += _attr(1, socket.inet_aton(local)) + _attr(2, socket.inet_aton(local))
    body += _attr(3, b"out0\0")  # IFA_LABEL, ignored (and not 4-byte aligned)
    return _msg(RTM_NEWADDR, body)


def _link(index: int, flags: int, name: str = "") -> bytes:
    body = struct.pack("=BBHiII", 0, 0, 1, index, flags, 0)
    body += _attr(4, struct.pack("=I", 1500))  # IFLA_MTU, ignored
    if name:
        body += _attr(3, name.encode() + b"\0")  # IFLA_IFNAME
        body += b"\0" * (-len(body) % 4)
    return _msg(RTM_NEWLINK, body)


DONE = _msg(NLMSG_DONE, struct.pack("=i", 0))


def test_requests_are_dump_requests() -> None:
    length, kind, flags, seq, _ = HDR.unpack_from(addr_dump_request(7))
    assert (kind, flags & 0x301, seq) == (22, 0x301, 7) and length == 24
    length, kind, _, _, _ = HDR.unpack_from(link_dump_request(8))
    assert kind == 18 and length == 32


def test_parse_addresses_across_batches() -> None:
    found, done = parse_addr_messages(_addr(2, "10.0.10.101") + _addr(3, "10.0.20.11"))
    assert found == [(2, "10.0.10.101"), (3, "10.0.20.11")] and not done
    found, done = parse_addr_messages(_addr(2, "10.0.10.102") + DONE)
    assert found == [(2, "10.0.10.102")] and done


def test_parse_links_keeps_only_up_with_carrier() -> None:
    live, done = parse_link_messages(
        _link(1, IFF_UP | IFF_LOWER_UP, "lo")
        + _link(2, IFF_UP, "down0")
        + _link(3, 0, "off0")
        + _link(4, IFF_UP | IFF_LOWER_UP, "vip-if.10")
    )
    assert live == {1: "lo", 4: "vip-if.10"} and not done
    assert parse_link_messages(_link(5, IFF_UP | IFF_LOWER_UP, "eth0") + DONE) == (
        {5: "eth0"},
        True,
    )


def test_parse_short_or_broken_link_messages() -> None:
    with pytest.raises(ChaosError, match="too short"):
        parse_link_messages(_msg(RTM_NEWLINK, b"\0" * 8))
    broken = _msg(
        RTM_NEWLINK,
        struct.pack("=BBHiII", 0, 0, 1, 1, IFF_UP | IFF_LOWER_UP, 0) + struct.pack("=HH", 99, 3),
    )
    with pytest.raises(ChaosError, match="bad attribute length 99"):
        parse_link_messages(broken)


def test_parse_netlink_errors() -> None:
    error = _msg(2, struct.pack("=i", -1) + b"\0" * 16)
    with pytest.raises(ChaosError, match="netlink: error -1"):
        parse_addr_messages(error)
    bad = HDR.pack(500, RTM_NEWADDR, 0, 0, 0)
    with pytest.raises(ChaosError, match="bad message length 500"):
        parse_link_messages(bad)


def test_role_of_command_lines() -> None:
    assert role_of(b"/venv/bin/python\0-m\0node.cli\0node\0run\0--config\0f.yaml\0") == "filter"
    assert role_of(b"python\0-m\0syncd.cli\0syncd\0run\0--config\0f\0") == "syncd"
    assert role_of(b"/usr/bin/etcd\0--name\0etcd\0") is None


def test_syn_packet_checksums() -> None:
    pkt = syn_packet("10.0.1.150", "10.0.2.2", 40000, 8000, 12345)
    assert len(pkt) == 44 and pkt[0] == 0x45 and pkt[9] == socket.IPPROTO_TCP
    tcp = pkt[20:]
    sport, dport, seq = struct.unpack("!HHI", tcp[:8])
    assert (sport, dport, seq) == (40000, 8000, 12345)
    assert tcp[13] == 0x02  # SYN only
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    assert _checksum(pseudo + tcp) == 0  # a correct checksum sums to zero


def test_flood_sources_avoid_real_hosts() -> None:
    srcs = sources("10.0.1.0/24", 3)
    assert srcs == ["10.0.1.100", "10.0.1.101", "10.0.1.102"]
    assert sources("10.0.1.0/24", 150)[-1] == "10.0.1.249"
    with pytest.raises(ValueError, match="no 200 addresses"):
        sources("10.0.1.0/28", 200)


def test_timed_requests_keep_start_and_end() -> None:
    r = TimedRequests("churn")
    r.on_ok(0.01)
    r.on_failed("timeout")
    assert r.ok == 1 and r.failed == 1 and r.errors == {"timeout": 1}
    assert [a[2:] for a in r.attempts] == [(True, None), (False, "timeout")]
    assert all(a[0] <= a[1] for a in r.attempts)
