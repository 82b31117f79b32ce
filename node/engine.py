"""The filter engine: raw packet bytes + ``now`` in, a :class:`Decision` out.

CONTRACT used by the adapters (nfq, replay, bench):

    engine = Engine(EngineConfig(...), ruleset)
    d = engine.process(data, now, in_iface="veth0", out_iface="veth1")
    d.verdict     -> Verdict.ACCEPT | Verdict.DROP | Verdict.REJECT
    d.ct_state    -> "new" | "established" | "related" | "invalid"
    d.rule        -> name of the matching rule, or None
    d.reason      -> why a packet was INVALID / dropped outside the rules, or None
    d.offload     -> True when the adapter may hand the flow (not yet
                     offloaded) to the kernel fast path (connmark); the adapter
                     records it with engine.table.set_offloaded(key, True)
    d.unoffload   -> True when an offloaded flow has left the states the
                     kernel may carry alone (FIN or RST seen): the adapter
                     clears the kernel mark so userspace sees the close
    d.flow        -> the flow's snapshot after this packet, or None
    d.events      -> flow events (created / state changed / deleted)
    engine.expire(now) -> list of flow events;  engine.next_deadline() -> float | None
    engine.swap_ruleset(ruleset)   (atomic: next packet uses the new one)
    engine.statistics() -> EngineStats (frozen)

Holding (asymmetric routing, see ``node.hold`` and docs/asymmetric.md):
after ``engine.enable_hold()``, a packet this node may lack the state for
comes back with ``d.hold_key`` set (the flow key whose replica would change
its fate) and is *not yet counted*.  The adapter either holds it and later
calls ``engine.reprocess(data, now, ...)`` (judged again, never held twice),
or cannot hold it and calls ``engine.settle(d, now)`` (counted as it stands).
Holdable: no local flow and the packet cannot start one (TCP other than a
SYN, an ICMP reply or error), a flow here still in SYN_SENT meeting an
INVALID packet (its SYN-ACK went through another node), and a non-TCP
packet the policy would refuse as a NEW flow (a reply datagram).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from node.errors import PacketError
from node.flow.events import CtState, FlowEvent, FlowSnapshot
from node.flow.key import flow_key_bytes
from node.flow.table import (
    R_ICMP_ERROR_NO_FLOW,
    R_ICMP_REPLY_NO_FLOW,
    R_TCP_NO_FLOW,
    TCP_TRACKING_REASONS,
    FlowTable,
    TableConfig,
)
from node.packet import ACK, FIN, RST, SYN, TCP, UDP, Packet, parse
from node.policy import Action, Ruleset


class Verdict(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"  # adapter answers with TCP RST / ICMP unreachable


_VERDICT_OF = {
    Action.ACCEPT: Verdict.ACCEPT,
    Action.DROP: Verdict.DROP,
    Action.REJECT: Verdict.REJECT,
}
_NO_EVENTS: tuple[FlowEvent, ...] = ()
# TCP states in which ordinary data packets may bypass userspace: the
# kernel still sends every SYN/FIN/RST (and a per-flow sample) to us.
_OFFLOADABLE_STATES = frozenset({"ESTABLISHED", "ASSURED"})
# INVALID reasons that mean "no local flow": another node may hold it.
_NO_FLOW_REASONS: Final = frozenset({R_TCP_NO_FLOW, R_ICMP_REPLY_NO_FLOW})
# A flow here that never saw its answer: the answer crossed another node.
_UNANSWERED_TCP: Final = frozenset({"SYN_SENT", "SYN_SENT2"})


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    ct_state: CtState
    rule: str | None  # matching rule name; None for default/established/invalid paths
    reason: str | None  # why INVALID or dropped outside the rules (counted)
    offload: bool  # adapter may let the kernel accept this flow's data packets
    events: tuple[FlowEvent, ...]
    packet: Packet | None  # parsed packet (None when it could not be parsed)
    unoffload: bool = False  # adapter must take the flow back from the kernel
    flow: FlowSnapshot | None = None  # the flow after this packet
    # Set (only after Engine.enable_hold) when a replica of this flow key
    # could change the verdict: the adapter may hold the packet (not counted yet).
    hold_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    packets_total: int
    verdicts: tuple[tuple[str, int], ...]  # (verdict, count)
    ct_states: tuple[tuple[str, int], ...]  # (ct state, count)
    drop_reasons: tuple[tuple[str, int], ...]  # (reason, count) outside the rules
    ruleset_swaps_total: int
    holdable_total: int = 0  # decisions returned with a hold_key (held or settled later)


class Engine:
    """Parse -> track -> policy -> verdict.  Pure: time only arrives as ``now``."""

    def __init__(self, table_config: TableConfig, ruleset: Ruleset) -> None:
        self.table = FlowTable(table_config)
        self._ruleset = ruleset
        self._packets = 0
        self._verdicts: dict[Verdict, int] = dict.fromkeys(Verdict, 0)
        self._ct_states: dict[CtState, int] = dict.fromkeys(CtState, 0)
        self._reasons: dict[str, int] = {}
        self._swaps = 0
        self._hold = False
        self._reprocessing = False
        self._holdable = 0

    @property
    def ruleset(self) -> Ruleset:
        return self._ruleset

    def swap_ruleset(self, ruleset: Ruleset) -> None:
        """Atomically replace the ruleset: the next packet is judged by it.

        Flows already admitted stay (as with Linux conntrack and an iptables
        reload); only new flows meet the new rules, unless the ruleset sends
        established traffic through the rules (``established: rules``).
        """
        self._ruleset = ruleset
        self._swaps += 1

    def enable_hold(self) -> None:
        """Mark holdable decisions (a clustered node with a hold queue); see the module doc."""
        self._hold = True

    def settle(self, d: Decision, now: float) -> Decision:
        """Count a holdable decision that was not held, as it stands (``now``: for subclasses)."""
        return self._count(replace(d, hold_key=None))

    def reprocess(
        self, data: bytes, now: float, in_iface: str | None = None, out_iface: str | None = None
    ) -> Decision:
        """Judge a held packet again (its record arrived, or it waited long enough).

        Goes through :meth:`process` (so subclasses see the final decision)
        without counting the packet twice and without holding it again.
        """
        self._reprocessing = True
        try:
            return self.process(data, now, in_iface, out_iface)
        finally:
            self._reprocessing = False

    def process(
        self, data: bytes, now: float, in_iface: str | None = None, out_iface: str | None = None
    ) -> Decision:
        if not self._reprocessing:
            self._packets += 1
        try:
            # The adapter may hand over only the first bytes of a packet
            # (NFQUEUE copy range, capture snap length): headers suffice.
            packet = parse(data, prefix=True)
        except PacketError as e:
            return self._invalid(None, f"malformed-{e.reason}", _NO_EVENTS, in_iface, out_iface)
        if packet.is_fragment:
            # With conntrack active the kernel reassembles before FORWARD
            # (nf_defrag_ipv4/6); a fragment here is abnormal.  See node.packet.
            return self._invalid(packet, "fragment", _NO_EVENTS, in_iface, out_iface)
        return self.decide(packet, now, in_iface, out_iface)

    def decide(
        self, packet: Packet, now: float, in_iface: str | None = None, out_iface: str | None = None
    ) -> Decision:
        """Judge an already-parsed packet (used by ``process`` and by replay)."""
        tracked = self.table.track(packet, now)
        ct_state = tracked.ct_state
        hold = self._hold and not self._reprocessing
        if ct_state is CtState.INVALID:
            why = tracked.reason or "invalid"
            key = self._invalid_hold_key(packet, why) if hold else None
            return self._invalid(packet, why, tracked.events, in_iface, out_iface, key)
        match = self._ruleset.evaluate(packet, ct_state.value, in_iface, out_iface)
        verdict = _VERDICT_OF[match.action]
        events = tracked.events
        flow = tracked.flow
        reason: str | None = None
        if (
            hold
            and ct_state is CtState.NEW
            and flow is None
            and verdict is not Verdict.ACCEPT
            and not _is_syn(packet)
        ):
            # A reply (datagram, TCP pickup) refused as a new flow: the flow
            # may exist on the node that saw the request.
            self._holdable += 1
            return Decision(
                verdict, ct_state, match.rule, None, False, events, packet,
                hold_key=flow_key_bytes(packet)[0],
            )  # fmt: skip
        if ct_state is CtState.NEW and verdict is Verdict.ACCEPT and flow is None:
            flow, created = self.table.admit(packet, now, match.rule)
            events = events + created
            if flow is None:
                verdict, reason = Verdict.DROP, "table-full"
        offload = (
            verdict is Verdict.ACCEPT
            and flow is not None
            and ct_state is CtState.ESTABLISHED
            and packet.proto in (TCP, UDP)
            and flow.state in _OFFLOADABLE_STATES
            # Once is enough: re-injecting every sampled packet of a flow the
            # kernel already carries would only repeat the same CONNMARK.
            and not flow.offloaded
        )
        unoffload = (
            flow is not None
            and flow.offloaded
            and flow.state not in _OFFLOADABLE_STATES
            and self.table.set_offloaded(flow.key, False)  # False: already deleted
        )
        decision = Decision(
            verdict, ct_state, match.rule, reason, offload, events, packet, unoffload, flow
        )
        return self._count(decision)

    def _invalid_hold_key(self, packet: Packet, reason: str) -> bytes | None:
        """The key whose replica could make this INVALID packet valid, if any."""
        if reason in _NO_FLOW_REASONS:
            return flow_key_bytes(packet)[0]
        if reason == R_ICMP_ERROR_NO_FLOW:
            quoted = packet.embedded
            return flow_key_bytes(quoted)[0] if quoted is not None else None
        if reason in TCP_TRACKING_REASONS:
            key = flow_key_bytes(packet)[0]
            flow = self.table.get(key)
            if flow is not None and flow.state in _UNANSWERED_TCP:
                return key
        return None

    def _invalid(
        self,
        packet: Packet | None,
        reason: str,
        events: tuple[FlowEvent, ...],
        in_iface: str | None,
        out_iface: str | None,
        hold_key: bytes | None = None,
    ) -> Decision:
        if packet is None:
            action = self._ruleset.invalid_action
            rule = None
        else:
            match = self._ruleset.evaluate(packet, CtState.INVALID.value, in_iface, out_iface)
            action, rule = match.action, match.rule
        decision = Decision(
            _VERDICT_OF[action], CtState.INVALID, rule, reason, False, events, packet,
            hold_key=hold_key,
        )  # fmt: skip
        if hold_key is not None:
            self._holdable += 1
            return decision  # counted when settled or judged again
        return self._count(decision)

    def _count(self, d: Decision) -> Decision:
        self._verdicts[d.verdict] += 1
        self._ct_states[d.ct_state] += 1
        if d.reason is not None:
            self._reasons[d.reason] = self._reasons.get(d.reason, 0) + 1
        return d

    def expire(self, now: float) -> list[FlowEvent]:
        return self.table.expire(now)

    def next_deadline(self) -> float | None:
        return self.table.next_deadline()

    def statistics(self) -> EngineStats:
        return EngineStats(
            packets_total=self._packets,
            verdicts=tuple((v.value, n) for v, n in self._verdicts.items()),
            ct_states=tuple((c.value, n) for c, n in self._ct_states.items()),
            drop_reasons=tuple(sorted(self._reasons.items())),
            ruleset_swaps_total=self._swaps,
            holdable_total=self._holdable,
        )


def _is_syn(packet: Packet) -> bool:
    """A pure SYN: the one TCP packet that may start a flow by itself."""
    return packet.proto == TCP and packet.tcp_flags & (SYN | ACK | FIN | RST) == SYN
