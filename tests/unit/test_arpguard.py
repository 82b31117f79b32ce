"""The ARP guard's pure parts: the nft script and the keepalive frame."""

from __future__ import annotations

import struct

import pytest

from cluster.arpguard import (
    GUARD_TABLE,
    KEEPALIVE_ETHERTYPE,
    SHUT_ETHERTYPE,
    ArpGuard,
    guard_ruleset,
    keepalive_frame,
)
from cluster.errors import Misuse


def test_ruleset_replaces_the_table_and_guards_each_interface() -> None:
    script = guard_ruleset(["up0", "down0", "up0"], ["10.1.0.1/24", "10.2.0.9", "fd00::1"], 0.5)
    lines = script.splitlines()
    # Declare, delete, declare again: one transaction replaces a leftover table.
    assert lines[:3] == [
        f"table netdev {GUARD_TABLE} {{}}",
        f"delete table netdev {GUARD_TABLE}",
        f"table netdev {GUARD_TABLE} {{",
    ]
    assert "  set vips { type ipv4_addr; elements = { 10.1.0.1, 10.2.0.9 }; }" in lines
    assert script.count("hook egress") == 2  # up0 once
    assert 'type filter hook egress device "down0" priority filter; policy accept;' in script
    assert "ether type 0x88b5 update @alive { oifname timeout 500ms } drop" in script
    assert "ether type 0x88b6 delete @alive { oifname } drop" in script
    assert script.count("arp saddr ip @vips oifname != @alive drop") == 2
    # IPv6: neighbour discovery sourced from a VIP (the NA answering for it).
    assert "  set vips6 { type ipv6_addr; elements = { fd00::1 }; }" in lines
    nd = "ip6 saddr @vips6 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
    assert script.count(f"{nd} oifname != @alive drop") == 2


def test_ruleset_without_vips_of_a_family_has_an_empty_set() -> None:
    assert "  set vips { type ipv4_addr; }" in guard_ruleset(["up0"], ["fd00::1"], 1.0)
    assert "  set vips6 { type ipv6_addr; }" in guard_ruleset(["up0"], ["10.1.0.1"], 1.0)


@pytest.mark.parametrize(
    ("ifnames", "timeout"),
    [
        ([], 0.5),
        (["up0"], 0.01),
        (["bad name"], 0.5),
        (['x"; flush ruleset'], 0.5),
        (["a" * 16], 1),
    ],
)
def test_ruleset_refuses_what_it_cannot_guard(ifnames: list[str], timeout: float) -> None:
    with pytest.raises(Misuse):
        guard_ruleset(ifnames, ["10.1.0.1"], timeout)


def test_keepalive_frame() -> None:
    mac = bytes.fromhex("02aabbccddee")
    frame = keepalive_frame(mac)
    assert len(frame) == 60 and frame[:12] == mac + mac
    assert struct.unpack("!H", frame[12:14])[0] == KEEPALIVE_ETHERTYPE
    with pytest.raises(Misuse):
        keepalive_frame(b"\x00" * 5)


def test_shut_frame_and_refused_ethertypes() -> None:
    mac = bytes.fromhex("02aabbccddee")
    assert struct.unpack("!H", keepalive_frame(mac, SHUT_ETHERTYPE)[12:14])[0] == SHUT_ETHERTYPE
    with pytest.raises(Misuse):
        keepalive_frame(mac, 0x0800)


def test_a_shut_guard_sends_no_keepalive_until_reopened() -> None:
    guard = ArpGuard(["up0"], ["10.1.0.1"], 0.15)  # not installed: no sockets, no I/O
    guard.shut("revoked")
    guard.shut("isolated")
    stats = guard.statistics()
    assert (stats.shut, stats.shuts) == (("isolated", "revoked"), 1)  # closed once
    guard.reopen("isolated")
    assert guard.statistics().shut == ("revoked",)  # still shut for the other reason
    guard.shut("isolated")
    guard.reopen()
    assert guard.statistics().shut == ()
