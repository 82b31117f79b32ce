"""The pure agent core: one test per rule, a simulated three-node cluster, Hypothesis."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.agent import (
    Action,
    Agent,
    CheckLease,
    ClaimVip,
    DropVips,
    Emit,
    GuardArp,
    Leave,
    Log,
    ProbeEtcd,
    RefreshHolders,
    Register,
    ReleaseVip,
    RevokePeer,
    SetPeers,
    UpdateRecord,
    has_quorum,
)
from cluster.config import AgentConfig, VipSpec
from cluster.errors import IllegalTransition, Misuse
from cluster.etcd import EtcdConfig
from cluster.membership import (
    TRANSITIONS,
    LocalInput,
    MemberDeleted,
    MemberPut,
    MemberRecord,
    MembersSnapshot,
    NodeState,
)
from cluster.ring import HashRing
from cluster.vip import plan_vips

SUSPECT = 0.15
VIPS = (
    VipSpec("10.9.0.1/24", "eth0", "fw1"),
    VipSpec("10.9.0.2/24", "eth0", "fw2"),
    VipSpec("10.9.0.3/24", "eth0", "fw3"),
    VipSpec("10.9.0.4/24", "eth0"),
)
CONFIG = AgentConfig(EtcdConfig("127.0.0.1:2379"), VIPS, require_filter=False, join_grace=2.0)
_rev = itertools.count(10)


def record(node: str, state: NodeState = NodeState.UP, epoch: int = 1) -> MemberRecord:
    return MemberRecord(node, f"10.0.0.{node[-1]}:7400", state, epoch)


def put(node: str, state: NodeState = NodeState.UP, epoch: int = 1) -> MemberPut:
    return MemberPut(node, record(node, state, epoch).to_json(), next(_rev), 1)


def state_of(agent: Agent) -> NodeState:
    """Read the state afresh (mypy would narrow ``agent.state`` across calls)."""
    return agent.state


def kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, Emit)]


def of(actions: list[Action], kind: type[Any]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def up_agent(node: str = "fw1", nodes: tuple[str, ...] = ("fw1", "fw2", "fw3"),
             config: AgentConfig = CONFIG, now: float = 0.0) -> Agent:  # fmt: skip
    """An agent that registered, synced and sees every node up and heard."""
    agent = Agent(config, node, f"10.0.0.{node[-1]}:7400", SUSPECT, now)
    assert of(agent.tick(now), Register)
    agent.registered(1, now)
    agent.members_snapshot(MembersSnapshot(tuple(put(n) for n in nodes), next(_rev)), now)
    agent.sync_status(True, 1.0, now)
    for peer in nodes:
        if peer != node:
            agent.heard(peer, now)
    agent.holders_listed({}, now)
    acts = agent.tick(now + 0.2)
    assert state_of(agent) is NodeState.UP, kinds(acts)
    for claim in of(acts, ClaimVip):  # forget them: tests decide what etcd holds
        agent.vip_result(claim.vip, True, False, now + 0.2)
    return agent


def test_joining_registers_then_syncs_then_goes_up() -> None:
    agent = Agent(CONFIG, "fw1", "10.0.0.1:7400", SUSPECT, 0.0)
    assert state_of(agent) is NodeState.JOINING
    assert of(agent.tick(0.0), Register)
    assert not of(agent.tick(0.01), Register)  # one registration at a time
    acts = agent.registered(3, 0.1)
    assert state_of(agent) is NodeState.SYNCING and kinds(acts) == ["joined", "resync-started"]
    agent.holders_listed({}, 0.1)
    agent.tick(0.2)
    assert state_of(agent) is NodeState.SYNCING  # syncd not ready
    agent.sync_status(True, 1.0, 0.3)
    acts = agent.tick(0.3)
    assert state_of(agent) is NodeState.UP
    assert of(acts, UpdateRecord) == [UpdateRecord(NodeState.UP, ())]
    assert "resync-done" in kinds(acts)


def test_registration_failure_is_retried_later() -> None:
    agent = Agent(CONFIG, "fw1", "10.0.0.1:7400", SUSPECT, 0.0)
    agent.tick(0.0)
    agent.register_failed(0.01, "etcd down")
    assert not of(agent.tick(0.1), Register)
    assert of(agent.tick(0.6), Register)


def test_stays_syncing_without_a_synced_filter_and_says_why() -> None:
    config = replace(CONFIG, require_filter=True)
    agent = Agent(config, "fw1", "10.0.0.1:7400", SUSPECT, 0.0)
    agent.tick(0.0)
    agent.registered(1, 0.0)
    agent.sync_status(True, 1.0, 0.0)
    agent.filter_status(False, None, 0.0)
    acts = agent.tick(0.1)
    assert state_of(agent) is NodeState.SYNCING
    assert [e.message for e in of(acts, Log)] == ["no filter connected: staying syncing"]
    assert not of(agent.tick(0.2), Log)  # said once
    agent.filter_status(True, False, 0.3)
    agent.tick(0.3)
    assert state_of(agent) is NodeState.SYNCING
    agent.filter_status(True, True, 0.4)
    agent.tick(0.4)
    assert state_of(agent) is NodeState.UP
    assert agent.status_fields(0.4)["filter"] == {"connected": True, "synced": True}


def test_up_node_claims_its_home_vip_and_the_ring_share() -> None:
    agent = up_agent("fw1")
    claims = {a.vip for a in of(agent.tick(0.3), ClaimVip)}
    ring = HashRing({"fw1", "fw2", "fw3"})
    expected = {"10.9.0.1"} | ({"10.9.0.4"} if ring.owner(bytes([10, 9, 0, 4])) == "fw1" else set())
    assert claims == expected
    assert not of(agent.tick(0.31), ClaimVip)  # pending: not asked twice
    acts = agent.vip_result("10.9.0.1", True, True, 0.32)
    assert "vip-acquired" in kinds(acts) and agent.held() == ("10.9.0.1",)
    assert of(acts, UpdateRecord)[0].vips == ("10.9.0.1",)


def test_a_held_vip_is_never_claimed_and_a_moved_one_is_released() -> None:
    agent = up_agent("fw1")
    agent.holders_listed({"10.9.0.1": "fw2", "10.9.0.2": "fw1"}, 0.3)
    acts = agent.tick(0.3)
    assert "10.9.0.1" not in {a.vip for a in of(acts, ClaimVip)}  # fw2 must let go first
    assert [a.vip for a in of(acts, ReleaseVip)] == ["10.9.0.2"]  # fw2's home, fw2 is up


def test_suspect_is_revoked_with_a_majority() -> None:
    agent = up_agent("fw1")
    agent.heard("fw2", 1.0)
    agent.heard("fw3", 1.0)
    agent.heard("fw2", 1.2)
    agent.etcd_result(True, 1.2)  # fw2 heard just now: alive for the quorum
    acts = agent.tick(1.2)  # fw3 silent 0.2 s > 0.15
    assert "suspect" in kinds(acts)
    assert of(acts, RevokePeer) == [RevokePeer("fw3", 1)]
    assert not of(agent.tick(1.21), RevokePeer)  # once per incarnation
    agent.holders_listed({}, 1.215)  # the listing the ticks asked for came back
    acts = agent.revoke_result("fw3", 1, True, 1.22)
    assert "revoked" in kinds(acts)
    assert of(acts, RefreshHolders) == [RefreshHolders()]  # its claims are gone: list now


def test_a_lossy_link_stretches_the_suspicion_window() -> None:
    """SUSPECT 0.15 s is 15 beacons at 10 ms; at 51 % loss a live peer loses
    15 in a row once in 24,000 windows, so its window stretches to ~0.21 s."""
    agent = Agent(CONFIG, "fw1", "10.0.0.1:7400", SUSPECT, 0.0, beacon_interval=0.01)
    assert of(agent.tick(0.0), Register)
    agent.registered(1, 0.0)
    members = tuple(put(n) for n in ("fw1", "fw2", "fw3"))
    agent.members_snapshot(MembersSnapshot(members, next(_rev)), 0.0)
    agent.sync_status(True, 1.0, 0.0)
    agent.holders_listed({}, 0.0)
    for peer in ("fw2", "fw3"):
        agent.heard(peer, 0.0)
    agent.tick(0.2)
    assert state_of(agent) is NodeState.UP
    for peer in ("fw2", "fw3"):
        agent.heard(peer, 1.0)
    agent.link_loss("fw2", 0.51)
    agent.link_loss("fw3", 0.0)
    assert agent.window("fw3") == SUSPECT
    assert 0.20 <= agent.window("fw2") <= 0.22
    agent.heard("fw3", 1.18)
    agent.etcd_result(True, 1.18)
    assert agent.suspects(1.18) == frozenset()  # fw2 silent 0.18 s: more than 0.15, fine
    agent.heard("fw3", 1.25)
    assert agent.suspects(1.25) == {"fw2"}
    assert of(agent.tick(1.25), RevokePeer) == [RevokePeer("fw2", 1)]


def test_next_deadline_is_the_next_suspicion_then_the_takeover_guard() -> None:
    agent = up_agent("fw1")  # everyone heard at 0.0; SUSPECT 0.15
    agent.heard("fw2", 1.0)
    agent.heard("fw3", 1.05)
    due = agent.next_deadline(1.1)
    assert due is not None and 1.15 < due < 1.151  # fw2's window ends first
    assert agent.suspects(due) == {"fw2"} and agent.suspects(1.149) == frozenset()
    agent.heard("fw3", 1.2)
    agent.etcd_result(True, 1.2)
    agent.tick(due)  # fw2 is a suspect now: its deadline is spent
    after = agent.next_deadline(due)
    assert after is not None and 1.35 < after < 1.351  # fw3's
    agent.member_event(MemberDeleted("fw2", next(_rev)), 1.3)
    guard = agent.next_deadline(1.3)
    assert guard is not None and 1.3 + CONFIG.takeover_guard < guard < 1.301 + CONFIG.takeover_guard


def test_no_deadline_when_alone_and_nothing_pending() -> None:
    agent = up_agent("fw1", nodes=("fw1",))
    assert agent.next_deadline(5.0) is None


def test_link_loss_outside_zero_to_one_is_misuse() -> None:
    agent = up_agent("fw1")
    with pytest.raises(Misuse):
        agent.link_loss("fw2", 1.5)


def test_a_minority_never_revokes() -> None:
    agent = up_agent("fw2")
    agent.heard("fw1", 1.0)
    agent.heard("fw3", 1.0)
    agent.etcd_result(True, 1.5)
    acts = agent.tick(1.5)  # both peers silent: fw2 sees 1 of 3 alive
    assert set(agent.suspects(1.5)) == {"fw1", "fw3"}
    assert not of(acts, RevokePeer)


def test_partition_race_first_suspect_does_not_count_the_other_as_alive() -> None:
    """Cut off at t=1.0: fw3 crosses suspect_after a few ms before fw2 does."""
    agent = up_agent("fw1")
    agent.heard("fw3", 1.0)
    agent.heard("fw2", 1.02)
    agent.etcd_result(True, 1.16)
    acts = agent.tick(1.16)  # fw3 suspect, fw2 heard 140 ms ago: not alive for the quorum
    assert agent.suspects(1.16) == {"fw3"}
    assert not of(acts, RevokePeer)


@pytest.mark.parametrize(("me", "revokes"), [("fw1", True), ("fw2", False)])
def test_exactly_half_revokes_only_with_the_lowest_id(me: str, revokes: bool) -> None:
    agent = up_agent(me, ("fw1", "fw2"))
    other = "fw2" if me == "fw1" else "fw1"
    agent.heard(other, 1.0)
    agent.etcd_result(True, 1.5)
    assert bool(of(agent.tick(1.5), RevokePeer)) is revokes


def test_a_syncing_node_never_revokes() -> None:
    agent = Agent(CONFIG, "fw1", "10.0.0.1:7400", SUSPECT, 0.0)
    agent.tick(0.0)
    agent.registered(1, 0.0)
    agent.members_snapshot(MembersSnapshot((put("fw1", NodeState.SYNCING), put("fw2"),
                                            put("fw3")), next(_rev)), 0.0)  # fmt: skip
    agent.heard("fw2", 0.0)
    agent.heard("fw3", 0.0)
    assert not of(agent.tick(1.0), RevokePeer)


def test_new_member_gets_join_grace_before_suspicion() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.heard("fw2", 1.0)
    agent.member_event(put("fw3", NodeState.SYNCING), 1.0)
    agent.heard("fw2", 2.5)
    assert "fw3" not in agent.suspects(2.5)
    agent.heard("fw2", 3.1)
    assert "fw3" in agent.suspects(3.1)  # join_grace 2 s passed, never heard


def test_etcd_down_is_fail_static() -> None:
    agent = up_agent("fw1")
    agent.vip_result("10.9.0.1", True, True, 0.3)
    agent.etcd_result(False, 0.5, "connection refused")
    agent.heard("fw2", 2.0)
    acts = agent.tick(2.0)  # fw3 silent, etcd silent since 0.3 (> 1 s lease)
    assert "etcd-degraded" in kinds(acts)
    assert not of(acts, RevokePeer) and not of(acts, ClaimVip) and not of(acts, ReleaseVip)
    assert state_of(agent) is NodeState.UP and agent.held() == ("10.9.0.1",)
    assert agent.status_fields(2.0)["etcd"]["degraded"] is True
    agent.etcd_result(True, 2.1)
    assert "etcd-recovered" in kinds(agent.tick(2.1))


def test_isolated_node_fences_then_reregisters() -> None:
    agent = up_agent("fw1")
    agent.vip_result("10.9.0.1", True, True, 0.3)
    acts = agent.tick(2.0)  # etcd silent since 0.3, both peers silent
    assert state_of(agent) is NodeState.FENCED
    assert of(acts, DropVips) and "fenced" in kinds(acts)
    agent.dropped(2.0)
    agent.etcd_result(True, 2.5)
    assert of(agent.tick(2.5), Register)
    acts = agent.registered(2, 2.6)
    assert state_of(agent) is NodeState.SYNCING and "recovered" in kinds(acts)


def test_fenced_node_with_an_address_left_retries_the_drop_before_registering() -> None:
    agent = up_agent("fw1")
    agent.vip_result("10.9.0.1", True, True, 0.3)
    acts = agent.lease_lost(2.0, "our member record was deleted")
    assert of(acts, DropVips)
    agent.dropped(2.0, complete=False)  # the host refused to take an address off
    agent.etcd_result(True, 2.0)
    assert not of(agent.tick(2.1), Register)  # not before the retry is due
    acts = agent.tick(2.6)
    assert of(acts, DropVips) and not of(acts, Register)
    agent.dropped(2.6, complete=False)
    acts = agent.tick(2.7)
    assert not of(acts, Register) and not of(acts, DropVips)
    acts = agent.tick(3.2)
    assert of(acts, DropVips)
    agent.dropped(3.2)  # clean now
    assert of(agent.tick(3.2), Register)


def test_every_peer_silent_and_etcd_gone_keeps_arp_off_then_fences_at_etcd_grace() -> None:
    agent = up_agent("fw1")
    agent.vip_result("10.9.0.1", True, True, 0.3)
    agent.etcd_result(True, 0.3)
    for peer in ("fw2", "fw3"):
        agent.heard(peer, 0.3)
    assert agent.isolation_check(0.4) == []  # silent for 0.1 s: not suspects yet
    acts = agent.isolation_check(0.5)  # both silent 0.2 s > 0.15; etcd answered 0.2 s ago
    # ARP for our VIPs stops while we ask: the peers may be claiming them.
    assert acts == [GuardArp(False, "isolated"), ProbeEtcd(CONFIG.isolation_probe)]
    assert state_of(agent) is NodeState.UP  # nothing dropped on silence alone
    assert agent.isolation_check(0.52) == []  # one probe out at a time
    acts = agent.etcd_probed(False, 0.55, "no answer within 0.05 s")
    assert state_of(agent) is NodeState.UP and not of(acts, GuardArp)  # ARP stays off
    assert [a.level for a in of(acts, Log)] == ["warning"]
    # The next probe a suspicion window later, with twice the deadline; ARP still off.
    assert agent.isolation_check(0.6) == []
    assert agent.isolation_check(0.66) == [ProbeEtcd(2 * CONFIG.isolation_probe)]
    assert agent.etcd_probed(False, 0.76) == []
    # etcd's grace (the lease TTL, 1 s after its last answer at 0.3) ends it: fenced.
    assert not of(agent.tick(1.2), DropVips)
    acts = agent.tick(1.31)
    assert state_of(agent) is NodeState.FENCED and of(acts, DropVips)


def test_two_node_survivor_with_a_slow_etcd_is_not_fenced() -> None:
    """fw2 died; etcd took longer than the first probe's deadline to answer.
    Fencing there took the only node left down with it."""
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.etcd_result(True, 0.3)
    agent.heard("fw2", 0.3)
    assert of(agent.isolation_check(0.5), GuardArp) == [GuardArp(False, "isolated")]
    assert agent.etcd_probed(False, 0.55, "no answer within 0.05 s")  # a warning only
    probe = of(agent.isolation_check(0.66), ProbeEtcd)
    assert probe == [ProbeEtcd(2 * CONFIG.isolation_probe)]
    assert agent.etcd_probed(True, 0.72) == [GuardArp(True, "isolated")]  # slow, but there
    assert state_of(agent) is NodeState.UP
    # A later episode starts again from the configured deadline.
    assert of(agent.isolation_check(0.83), ProbeEtcd) == [ProbeEtcd(CONFIG.isolation_probe)]


def test_arp_comes_back_when_a_peer_speaks_after_an_unanswered_probe() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.etcd_result(True, 0.3)
    agent.heard("fw2", 0.3)
    assert agent.isolation_check(0.5)
    agent.etcd_probed(False, 0.55)
    agent.heard("fw2", 0.58)
    assert agent.isolation_check(0.59) == [GuardArp(True, "isolated")]
    assert agent.isolation_check(0.6) == []


def test_etcd_probe_answered_keeps_the_node_and_repeats_while_the_silence_lasts() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.etcd_result(True, 0.3)
    agent.heard("fw2", 0.3)
    assert agent.isolation_check(0.5)
    assert agent.etcd_probed(True, 0.51) == [GuardArp(True, "isolated")]
    assert state_of(agent) is NodeState.UP
    assert agent.isolation_check(0.55) == []  # the next one a suspicion window later
    assert of(agent.isolation_check(0.66), ProbeEtcd) == [ProbeEtcd(CONFIG.isolation_probe)]


def test_failed_probe_after_a_peer_spoke_again_does_not_fence() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.etcd_result(True, 0.3)
    agent.heard("fw2", 0.3)
    assert agent.isolation_check(0.5)
    agent.heard("fw2", 0.52)
    assert agent.etcd_probed(False, 0.53, "timeout") == [GuardArp(True, "isolated")]
    assert state_of(agent) is NodeState.UP


def test_one_peer_heard_means_no_probe() -> None:
    agent = up_agent("fw1")
    agent.etcd_result(True, 0.3)
    agent.heard("fw2", 0.45)
    assert agent.isolation_check(0.5) == []


def test_no_probe_when_etcd_is_already_known_gone_or_the_node_is_not_live() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.heard("fw2", 0.3)
    agent.etcd_result(False, 0.3, "refused")  # last success at 0.2 (up_agent)
    assert agent.isolation_check(1.5) == []  # degraded: tick's should_fence decides
    assert of(agent.tick(1.5), DropVips)
    assert agent.isolation_check(1.6) == []  # fenced


def test_lease_lost_fences_and_own_record_deletion_counts_as_lease_lost() -> None:
    agent = up_agent("fw1")
    acts = agent.member_event(MemberDeleted("fw1", next(_rev)), 0.5)
    assert state_of(agent) is NodeState.FENCED and of(acts, DropVips)
    assert agent.lease_lost(0.6) == []  # already fenced
    assert of(agent.tick(0.7), Register)


def test_a_revocation_notice_for_our_epoch_fences_at_once() -> None:
    agent = up_agent("fw1")
    assert agent.epoch is not None
    assert agent.revoked_notice("fw2", agent.epoch + 1, 0.5) == []  # not this incarnation
    assert state_of(agent) is NodeState.UP
    acts = agent.revoked_notice("fw2", agent.epoch, 0.5)
    assert state_of(agent) is NodeState.FENCED
    assert acts[0] == DropVips("revoked by fw2") and "fenced" in kinds(acts)
    assert agent.revoked_notice("fw3", agent.epoch, 0.6) == []  # already fenced
    assert of(agent.tick(0.7), Register)


def test_lease_lost_while_draining_leaves() -> None:
    agent = up_agent("fw1")
    agent.drain(0.3)
    acts = agent.lease_lost(0.4)
    assert state_of(agent) is NodeState.LEFT and of(acts, DropVips) and "left" in kinds(acts)


def test_long_stall_fences_a_short_one_checks_the_lease() -> None:
    agent = up_agent("fw1")
    assert of(agent.stalled(0.3, 1.0), CheckLease)
    assert state_of(agent) is NodeState.UP
    acts = agent.stalled(2.0, 3.0)
    assert state_of(agent) is NodeState.FENCED and acts[0] == DropVips("event loop stalled 2.000 s")
    assert agent.stalled(2.0, 3.1) == []  # fenced already


def test_stall_does_not_make_peers_suspect_at_once() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.stalled(0.3, 5.0)  # peers' heartbeats still queued behind the stall
    assert agent.suspects(5.05) == frozenset()
    assert not of(agent.tick(5.05), RevokePeer)


def test_takeover_waits_for_the_guard_after_the_holder_left() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.heard("fw2", 0.9)
    agent.etcd_result(True, 1.2)
    agent.holders_listed({"10.9.0.2": "fw2"}, 1.0)
    agent.member_event(MemberDeleted("fw2", next(_rev)), 1.2)
    agent.holders_listed({}, 1.205)
    guard = agent.config.takeover_guard
    assert "10.9.0.2" not in {a.vip for a in of(agent.tick(1.2 + guard * 0.75), ClaimVip)}
    assert "10.9.0.2" in {a.vip for a in of(agent.tick(1.2 + guard + 0.005), ClaimVip)}


def after_holder_left(heard: float, left: float, config: AgentConfig = CONFIG) -> Agent:
    """fw1 of fw1+fw2; fw2 held 10.9.0.2, was last heard at ``heard`` and its
    record vanished at ``left`` (revoked by someone, seen in the watch)."""
    agent = up_agent("fw1", ("fw1", "fw2"), config)
    agent.heard("fw2", heard)
    agent.etcd_result(True, 1.0)
    agent.holders_listed({"10.9.0.2": "fw2"}, 1.0)
    agent.member_event(MemberDeleted("fw2", next(_rev)), left)
    return agent


def test_a_taker_that_did_not_revoke_claims_after_the_guard_without_a_new_listing() -> None:
    # fw3 revoked fw2; fw1 learns it from the watch only.  fw2's claims went
    # with its lease, so fw1 must not wait for its next periodic listing.
    agent = after_holder_left(heard=0.9, left=1.05)
    guard = agent.config.takeover_guard
    acts = agent.tick(1.05 + guard + 0.001)
    assert "10.9.0.2" in {a.vip for a in of(acts, ClaimVip)}
    assert of(acts, RefreshHolders)  # and a listing to confirm the view,
    # after the claims: the runner runs actions in order, a claim must not
    # wait for a listing's round trip.
    assert acts.index(of(acts, ClaimVip)[0]) < acts.index(of(acts, RefreshHolders)[0])


def test_a_frozen_holders_vip_waits_until_its_arp_guard_ran_out() -> None:
    # fw2 froze right after its last beacon (1.0): its kernel answers ARP for
    # its VIPs until the guard's keepalive runs out (arp_guard after its last
    # frame, which may follow that beacon by one beacon interval).
    # A guard longer than the suspicion window (SUSPECT), which would let
    # the claim go first otherwise.
    config = replace(CONFIG, arp_guard=SUSPECT + 0.05)
    agent = after_holder_left(heard=1.0, left=1.005, config=config)  # revoked at once
    expiry = 1.0 + agent.config.arp_guard + 0.01
    assert agent.next_deadline(expiry - 0.004) == pytest.approx(expiry, abs=0.001)
    assert "10.9.0.2" not in {a.vip for a in of(agent.tick(expiry - 0.002), ClaimVip)}
    assert "10.9.0.2" in {a.vip for a in of(agent.tick(expiry + 0.001), ClaimVip)}


def test_a_listing_from_before_the_departure_does_not_bring_its_claims_back() -> None:
    agent = after_holder_left(heard=0.9, left=1.05)
    agent.holders_listed({"10.9.0.2": "fw2"}, 1.06)  # it left before the revocation
    guard = agent.config.takeover_guard
    assert "10.9.0.2" in {a.vip for a in of(agent.tick(1.05 + guard + 0.001), ClaimVip)}
    agent.vip_result("10.9.0.2", True, False, 1.09)  # lost the race: fw2 is back
    agent.member_event(put("fw2", epoch=2), 1.1)  # with a new lease and claims
    agent.heard("fw2", 1.1)
    agent.holders_listed({"10.9.0.2": "fw2"}, 1.11)
    assert "10.9.0.2" not in {a.vip for a in of(agent.tick(1.2), ClaimVip)}


def test_a_holder_cut_off_from_etcd_but_heard_keeps_its_vip() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.heard("fw2", 1.0)
    agent.holders_listed({"10.9.0.2": "fw2"}, 1.0)
    acts = agent.member_event(MemberDeleted("fw2", next(_rev)), 1.0)
    assert of(acts, SetPeers) == []  # fw2 still heard: keep its link
    agent.holders_listed({}, 1.1)
    agent.etcd_result(True, 1.5)
    for t in (1.1, 1.2, 1.3):
        agent.heard("fw2", t)
        assert "10.9.0.2" not in {a.vip for a in of(agent.tick(t), ClaimVip)}
    assert "10.9.0.2" in {a.vip for a in of(agent.tick(1.5), ClaimVip)}  # silent now


def test_failover_event_measures_from_last_heartbeat() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.heard("fw2", 1.0)
    agent.holders_listed({"10.9.0.2": "fw2", "10.9.0.1": "fw1"}, 1.0)
    agent.member_event(MemberDeleted("fw2", next(_rev)), 1.3)
    agent.holders_listed({"10.9.0.1": "fw1"}, 1.36)
    agent.etcd_result(True, 1.4)
    acts = agent.tick(1.4)
    assert "10.9.0.2" in [a.vip for a in of(acts, ClaimVip)]  # and the others, now ours
    acts = agent.vip_result("10.9.0.2", True, True, 1.45)
    failover = [e for e in of(acts, Emit) if e.kind == "failover"]
    assert len(failover) == 1 and failover[0].duration_ms == pytest.approx(450)
    assert "from fw2" in next(e.detail for e in of(acts, Emit) if e.kind == "vip-acquired")


def test_failover_event_when_our_share_is_taken_not_when_every_vip_moved() -> None:
    agent = up_agent("fw1")
    for peer in ("fw2", "fw3"):
        agent.heard(peer, 1.0)
    ring = HashRing(frozenset({"fw1", "fw3"}))
    # fw2 held its home VIP and the shared one; find who takes which after it leaves.
    held = {"10.9.0.2": "fw2", "10.9.0.4": "fw2", "10.9.0.1": "fw1", "10.9.0.3": "fw3"}
    agent.holders_listed(held, 1.0)
    agent.member_event(MemberDeleted("fw2", next(_rev)), 1.3)
    free = {v: h for v, h in held.items() if h != "fw2"}
    agent.holders_listed(free, 1.31)
    agent.etcd_result(True, 1.4)
    agent.heard("fw3", 1.4)
    plan = plan_vips(["10.9.0.2/24", "10.9.0.4/24"], ring, free, "fw1")
    mine = [v for v in plan.claim]
    assert mine and set(mine) != {"10.9.0.2", "10.9.0.4"}  # the ring splits them
    claims = [a.vip for a in of(agent.tick(1.4), ClaimVip)]
    assert sorted(claims) == sorted(mine)
    acts: list[Action] = []
    for vip in mine:
        acts += agent.vip_result(vip, True, True, 1.45)
    failover = [e for e in of(acts, Emit) if e.kind == "failover"]
    # fw3 has not taken its share yet: our event is out anyway, 450 ms after fw2's last message.
    assert len(failover) == 1 and failover[0].duration_ms == pytest.approx(450)
    assert failover[0].detail.endswith("of 2 VIPs")


def test_a_peer_that_comes_back_ends_its_pending_failover() -> None:
    agent = up_agent("fw1", ("fw1", "fw2"))
    agent.heard("fw2", 1.0)
    agent.holders_listed({"10.9.0.2": "fw2"}, 1.0)
    agent.member_event(MemberDeleted("fw2", next(_rev)), 1.3)
    agent.member_event(put("fw2", NodeState.SYNCING, epoch=2), 1.35)  # back before we took it
    agent.holders_listed({}, 1.4)
    agent.etcd_result(True, 1.4)
    acts = agent.tick(1.4)
    acts += agent.vip_result("10.9.0.2", True, True, 9.0)  # taken much later
    assert not [e for e in of(acts, Emit) if e.kind == "failover"]


def test_drain_releases_waits_for_others_then_leaves() -> None:
    agent = up_agent("fw1")
    agent.vip_result("10.9.0.1", True, True, 0.3)
    ok, _, acts = agent.drain(0.4)
    assert ok and state_of(agent) is NodeState.DRAINING and "drain-started" in kinds(acts)
    acts = agent.tick(0.5)
    assert [a.vip for a in of(acts, ReleaseVip)] == ["10.9.0.1"] and not of(acts, ClaimVip)
    agent.vip_result("10.9.0.1", False, True, 0.51)
    agent.holders_listed({}, 0.52)
    assert state_of(agent) is NodeState.DRAINING and not of(agent.tick(0.53), Leave)
    agent.holders_listed({"10.9.0.1": "fw2"}, 0.6)
    acts = agent.tick(0.6)
    assert state_of(agent) is NodeState.LEFT and of(acts, Leave)
    assert kinds(acts)[:1] == ["drained"]
    ok, _, _ = agent.drain(0.7)
    assert not ok


def test_drain_times_out() -> None:
    agent = up_agent("fw1", ("fw1",))
    agent.vip_result("10.9.0.1", True, True, 0.3)
    agent.drain(0.4)
    agent.vip_result("10.9.0.1", False, True, 0.5)
    agent.holders_listed({}, 0.5)
    assert state_of(agent) is NodeState.DRAINING
    agent.etcd_result(True, 11.0)
    agent.tick(11.0)
    assert state_of(agent) is NodeState.LEFT


def test_set_peers_follows_membership() -> None:
    agent = Agent(CONFIG, "fw1", "10.0.0.1:7400", SUSPECT, 0.0)
    agent.tick(0.0)
    agent.registered(1, 0.0)
    acts = agent.members_snapshot(MembersSnapshot((put("fw1"), put("fw2")), next(_rev)), 0.0)
    assert of(acts, SetPeers) == [SetPeers((("fw2", "10.0.0.2:7400"),))]
    acts = agent.member_event(put("fw3"), 0.1)
    assert of(acts, SetPeers)[0].peers == (("fw2", "10.0.0.2:7400"), ("fw3", "10.0.0.3:7400"))


def test_quorum() -> None:
    assert has_quorum({"a", "b", "c"}, {"a", "b"})
    assert not has_quorum({"a", "b", "c"}, {"c"})
    assert has_quorum({"a", "b"}, {"a"}) and not has_quorum({"a", "b"}, {"b"})
    assert not has_quorum(set(), set())


@given(st.sets(st.sampled_from("abcdefg"), min_size=1), st.data())
def test_two_sides_of_a_partition_never_both_have_quorum(members: set[str], data: Any) -> None:
    side = data.draw(st.sets(st.sampled_from(sorted(members))))
    assert not (has_quorum(members, side) and has_quorum(members, members - side))


def test_lifecycle_only_through_the_table() -> None:
    agent = up_agent("fw1")
    assert (NodeState.UP, LocalInput.REGISTERED) not in TRANSITIONS
    with pytest.raises(IllegalTransition):
        agent.lifecycle.handle(LocalInput.REGISTERED, 0.0)
    assert state_of(agent) is NodeState.UP


NODES = ("fw1", "fw2", "fw3", "fw4")


@settings(max_examples=150, deadline=None)
@given(
    st.sets(st.sampled_from(NODES), min_size=1),
    st.dictionaries(st.sampled_from([s.vip for s in VIPS]), st.sampled_from(NODES)),
    st.sets(st.sampled_from(NODES)),
)
def test_no_two_nodes_plan_to_claim_one_vip(
    up: set[str], holders: dict[str, str], homes_up: set[str]
) -> None:
    """Given the same view, at most one node proposes to claim any VIP."""
    ring = HashRing(up)
    homes = {s.vip: s.home for s in VIPS if s.home is not None}
    claimers: dict[str, list[str]] = {}
    for node in NODES:
        plan = plan_vips([s.address for s in VIPS], ring, holders, node, homes=homes)
        for vip in plan.claim:
            claimers.setdefault(vip, []).append(node)
            assert vip not in holders  # never over a holder
    assert all(len(c) == 1 for c in claimers.values())
    for a in plan.assignments:
        home = homes.get(a.vip)
        assert a.target == home if home in up else a.target in up


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NODES), st.sampled_from(["claim", "release", "tick"])),
                max_size=40))  # fmt: skip
def test_agents_sharing_a_view_never_hold_one_vip_twice(steps: list[tuple[str, str]]) -> None:
    """Four agents with one etcd (a dict with create-if-absent claims), stepped in any order."""
    agents = {n: up_agent(n, NODES) for n in NODES}
    claims: dict[str, str] = {}
    queued: dict[str, list[Action]] = {n: [] for n in NODES}
    now = 0.3
    for node, step in steps:
        now += 0.01
        agent = agents[node]
        for peer in NODES:
            agent.heard(peer, now) if peer != node else None
        agent.holders_listed(dict(claims), now)
        if step == "tick":
            queued[node] += [a for a in agent.tick(now) if isinstance(a, ClaimVip | ReleaseVip)]
            continue
        for action in list(queued[node]):
            want = ClaimVip if step == "claim" else ReleaseVip
            if not isinstance(action, want):
                continue
            queued[node].remove(action)
            if isinstance(action, ClaimVip):
                ok = claims.setdefault(action.vip, node) == node
            else:
                ok = claims.get(action.vip) == node and claims.pop(action.vip) == node
            agent.vip_result(action.vip, step == "claim", ok, now)
        held = [v for a in agents.values() for v in a.held()]
        assert len(held) == len(set(held))
