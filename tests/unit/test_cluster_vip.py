"""VIP planning (one holder per VIP, release before claim), frames, claim/address order."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct

import pytest

from cluster.errors import BadInput, Misuse
from cluster.ring import HashRing
from cluster.vip import (
    VipError,
    acquire,
    arp_announcement,
    parse_vip,
    plan_vips,
    relinquish,
    unsolicited_na,
    vip_key,
)

TABLE = 1009  # small prime: builds in well under a millisecond
VIPS = [f"10.9.0.{i}" for i in range(1, 9)] + [f"fd00:9::{i:x}" for i in range(1, 9)]
MAC = bytes.fromhex("020000000a0b")


_RINGS: dict[frozenset[str], HashRing] = {}


def ring(*members: str) -> HashRing:
    """Rings are immutable values: share them (a build costs about a millisecond)."""
    key = frozenset(members)
    if key not in _RINGS:
        _RINGS[key] = HashRing(members, table_size=TABLE)
    return _RINGS[key]


def targets(r: HashRing) -> dict[str, str]:
    return {str(parse_vip(v).ip): r.owner(vip_key(v)) for v in VIPS}


# --- parsing ---------------------------------------------------------------------------


def test_parse_vip_defaults_to_a_host_prefix_and_canonicalizes() -> None:
    assert str(parse_vip("10.9.0.1")) == "10.9.0.1/32"
    assert str(parse_vip("FD00:9:0::1/64")) == "fd00:9::1/64"
    assert vip_key("10.9.0.1/24") == bytes([10, 9, 0, 1])
    assert vip_key("fd00:9::1") == ipaddress.IPv6Address("fd00:9::1").packed


@pytest.mark.parametrize(
    "text", ["", "10.9.0", "10.9.0.1/33", "224.0.0.5", "ff02::1", "0.0.0.0", "::1", "fe80::1"]
)
def test_parse_vip_refuses_what_cannot_be_a_next_hop(text: str) -> None:
    with pytest.raises(BadInput):
        parse_vip(text)


# --- planning --------------------------------------------------------------------------


def test_a_fresh_cluster_claims_every_vip_exactly_once_at_its_ring_owner() -> None:
    r = ring("a", "b", "c")
    plans = {n: plan_vips(VIPS, r, {}, n) for n in r.members}
    claimed = [v for p in plans.values() for v in p.claim]
    assert sorted(claimed) == sorted(targets(r))  # each VIP once, by one node
    for node, plan in plans.items():
        assert set(plan.claim) == {v for v, t in targets(r).items() if t == node}
        assert plan.release == plan.waiting == ()
        assert not plan.settled


def test_assignments_report_the_failover_order() -> None:
    r = ring("a", "b", "c")
    plan = plan_vips(VIPS, r, {}, "a", depth=3)
    for a in plan.assignments:
        assert a.order == r.owners(vip_key(a.vip), 3)
        assert a.target == a.order[0] and sorted(a.order) == ["a", "b", "c"]
        # The second entry is who takes over when the first leaves.
        assert r.without(a.order[0]).owner(vip_key(a.vip)) == a.order[1]


def test_a_settled_cluster_has_nothing_to_do() -> None:
    r = ring("a", "b", "c")
    held = targets(r)
    for node in r.members:
        plan = plan_vips(VIPS, r, held, node)
        assert plan.settled and plan.claim == plan.release == plan.waiting == ()


def test_a_vip_held_by_another_node_is_never_claimed_the_holder_releases_first() -> None:
    old, new = ring("a", "b", "c"), ring("a", "b")
    held = targets(old)
    moving = {v for v, t in held.items() if t == "c"}
    assert moving
    # c is draining: out of the ring, still holding its claims.
    drain = plan_vips(VIPS, new, held, "c")
    assert set(drain.release) == moving and drain.claim == drain.waiting == ()
    for node in ("a", "b"):
        plan = plan_vips(VIPS, new, held, node)
        assert plan.claim == ()  # nothing free yet
        assert set(plan.waiting) == {v for v in moving if new.owner(vip_key(v)) == node}
    # Once c released (or its lease ended), the new owners claim.
    after = {v: h for v, h in held.items() if h != "c"}
    claims = [v for n in ("a", "b") for v in plan_vips(VIPS, new, after, n).claim]
    assert sorted(claims) == sorted(moving)


def test_a_holder_that_is_not_the_target_releases_and_nobody_else_acts() -> None:
    r = ring("a", "b", "c")
    vip = next(v for v, t in targets(r).items() if t == "a")
    held = {**targets(r), vip: "b"}  # b holds a's VIP (e.g. a just came back)
    assert plan_vips(VIPS, r, held, "b").release == (vip,)
    assert plan_vips(VIPS, r, held, "a").waiting == (vip,)
    plan_c = plan_vips(VIPS, r, held, "c")
    assert plan_c.claim == plan_c.release == plan_c.waiting == ()


def test_claims_on_vips_no_longer_configured_are_released_only_by_their_holder() -> None:
    r = ring("a", "b")
    held = {**targets(r), "10.9.9.9": "a", "10.9.9.8": "b"}
    assert plan_vips(VIPS, r, held, "a").release == ("10.9.9.9",)
    assert plan_vips(VIPS, r, held, "b").release == ("10.9.9.8",)


def test_vips_are_canonicalized_and_deduplicated() -> None:
    r = ring("a")
    plan = plan_vips(["10.9.0.1/32", "10.9.0.1", "FD00:9::1/128"], r, {}, "a")
    assert plan.claim == ("10.9.0.1", "fd00:9::1")
    with pytest.raises(BadInput):
        plan_vips(["not-an-ip"], r, {}, "a")


def test_interleaved_agents_never_put_a_vip_on_two_nodes_and_converge() -> None:
    """Nodes act one half-step at a time, in random order, against a create-if-absent store.

    Half-steps: claim = (txn, then add address); release = (remove address,
    then delete the key).  Members drain (alive, keep claims until released)
    or crash (claims and addresses vanish with the machine).  At every step
    each VIP's address is on at most one node; once membership is quiet
    every VIP ends on its ring owner.
    """
    rnd = random.Random(7)
    names = ["a", "b", "c", "d"]
    vips = [str(parse_vip(v).ip) for v in VIPS[::2]]
    for _trial in range(6):
        live = set(names)
        crashed: set[str] = set()
        claims: dict[str, str] = {}
        addresses: dict[str, set[str]] = {n: set() for n in names}
        pending: dict[str, list[tuple[str, str]]] = {n: [] for n in names}
        for step in range(300):
            if step % 50 == 25 and len(live) > 1:
                gone = rnd.choice(sorted(live))
                live.discard(gone)
                if rnd.random() < 0.5:  # crash: its lease ends, its machine is gone
                    crashed.add(gone)
                    claims = {v: h for v, h in claims.items() if h != gone}
                    addresses[gone].clear()
                    pending[gone].clear()
            elif step % 50 == 40 and len(live) < len(names):
                back = rnd.choice(sorted(set(names) - live))
                live.add(back)
                crashed.discard(back)
            node = rnd.choice(names)
            if node not in crashed:  # draining nodes still act: they release
                _half_step(node, live, claims, addresses, pending[node], vips)
            on_wire = [v for n in names for v in addresses[n]]
            assert len(on_wire) == len(set(on_wire)), (step, addresses)
        for _ in range(8):  # quiet: everyone alive keeps acting
            for node in sorted(set(names) - crashed):
                _half_step(node, live, claims, addresses, pending[node], vips)
        final = ring(*live)
        assert claims == {v: final.owner(vip_key(v)) for v in vips}
        assert {v for n in names for v in addresses[n]} == set(vips)
        for n in names:
            assert addresses[n] == {v for v, h in claims.items() if h == n}


def _half_step(
    node: str,
    live: set[str],
    claims: dict[str, str],
    addresses: dict[str, set[str]],
    pending: list[tuple[str, str]],
    vips: list[str],
) -> None:
    if pending:
        what, vip = pending.pop(0)
        if what == "add":
            addresses[node].add(vip)
        elif claims.get(vip) == node:  # "release": delete only if ours (release_vip's txn)
            del claims[vip]
        return
    plan = plan_vips(vips, ring(*live), claims, node)
    for vip in plan.release:
        addresses[node].discard(vip)  # address first ...
        pending.append(("release", vip))  # ... the key on a later step
    for vip in plan.claim:
        if vip not in claims:  # the create-if-absent transaction
            claims[vip] = node
            pending.append(("add", vip))


# --- frames ----------------------------------------------------------------------------


def test_arp_announcement_is_a_broadcast_request_with_sender_equal_to_target() -> None:
    frame = arp_announcement(MAC, ipaddress.IPv4Address("10.9.0.1"))
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC and frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    sha, spa, tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
    assert sha == MAC and spa == tpa == bytes([10, 9, 0, 1]) and tha == b"\x00" * 6


def test_unsolicited_na_has_override_not_solicited_and_the_target_lladdr() -> None:
    vip = ipaddress.IPv6Address("fd00:9::1")
    msg = unsolicited_na(MAC, vip)
    assert len(msg) == 32
    kind, code, checksum, flags = struct.unpack("!BBHI", msg[:8])
    assert (kind, code, checksum) == (136, 0, 0)
    assert flags == 0x20000000  # O set; R and S clear
    assert msg[8:24] == vip.packed
    assert msg[24:26] == b"\x02\x01" and msg[26:32] == MAC


def test_frames_refuse_a_mac_that_is_not_six_bytes() -> None:
    with pytest.raises(Misuse):
        arp_announcement(b"\x00" * 5, ipaddress.IPv4Address("10.9.0.1"))
    with pytest.raises(Misuse):
        unsolicited_na(b"\x00" * 8, ipaddress.IPv6Address("fd00::1"))


# --- claim and address together ----------------------------------------------------------


class Journal:
    """A fake store and host that record the order of operations."""

    def __init__(self, free: bool = True, fails: frozenset[str] = frozenset()) -> None:
        self.free = free
        self.fails = fails  # host operations that raise VipError
        self.log: list[tuple[str, str]] = []

    async def claim_vip(self, vip: str, node_id: str, lease: int) -> bool:
        self.log.append(("claim", vip))
        return self.free

    async def release_vip(self, vip: str, node_id: str) -> bool:
        self.log.append(("release", vip))
        return True

    async def add(self, vip: str) -> bool:
        self.log.append(("add", vip))
        if "add" in self.fails:
            raise VipError("add address", "refused", 1)
        return True

    async def remove(self, vip: str) -> bool:
        self.log.append(("remove", vip))
        if "remove" in self.fails:
            raise VipError("remove address", "refused", 1)
        return True

    async def announce(self, vip: str, count: int = 3, spacing: float = 0.005) -> None:
        self.log.extend([("announce", vip)] * count)
        if "announce" in self.fails:
            raise VipError("send ARP announcement", "refused", 100)


def test_acquire_claims_before_touching_the_host() -> None:
    j = Journal()
    assert asyncio.run(acquire(j, j, "10.9.0.1/32", "a", 7, spacing=0))
    assert j.log == [
        ("claim", "10.9.0.1"),
        ("add", "10.9.0.1/32"),
        ("announce", "10.9.0.1/32"),
        ("announce", "10.9.0.1/32"),
        ("announce", "10.9.0.1/32"),
    ]


def test_acquire_of_a_held_vip_leaves_the_host_alone() -> None:
    j = Journal(free=False)
    assert not asyncio.run(acquire(j, j, "fd00:9::1", "a", 7))
    assert j.log == [("claim", "fd00:9::1")]


@pytest.mark.parametrize("failing", ["add", "announce"])
def test_acquire_gives_the_vip_back_address_first_when_the_host_refuses(failing: str) -> None:
    j = Journal(fails=frozenset({failing}))
    with pytest.raises(VipError):
        asyncio.run(acquire(j, j, "10.9.0.1", "a", 7))
    announced = [("announce", "10.9.0.1")] * 3 if failing == "announce" else []
    assert j.log == [
        ("claim", "10.9.0.1"),
        ("add", "10.9.0.1"),
        *announced,
        ("remove", "10.9.0.1"),
        ("release", "10.9.0.1"),
    ]


def test_a_vip_that_cannot_be_removed_keeps_its_claim() -> None:
    j = Journal(fails=frozenset({"announce", "remove"}))
    with pytest.raises(VipError, match="remove address"):
        asyncio.run(acquire(j, j, "10.9.0.1", "a", 7, announcements=1))
    assert ("release", "10.9.0.1") not in j.log
    j.log.clear()
    with pytest.raises(VipError, match="remove address"):
        asyncio.run(relinquish(j, j, "10.9.0.1", "a"))
    assert j.log == [("remove", "10.9.0.1")]


def test_relinquish_removes_the_address_before_releasing_the_claim() -> None:
    j = Journal()
    assert asyncio.run(relinquish(j, j, "FD00:9::1/128", "a"))
    assert j.log == [("remove", "FD00:9::1/128"), ("release", "fd00:9::1")]
