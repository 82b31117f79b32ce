"""The TCP state machine: every (state, direction, input) has a documented
outcome, and the per-packet step never does anything undocumented."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from node.errors import Misuse
from node.flow.tcp import (
    TRANSITIONS,
    Direction,
    Special,
    TcpInput,
    TcpOutcome,
    TcpState,
    TcpTracker,
    classify,
    transition,
    valid_flags,
)
from node.flow.timeouts import Timeouts
from node.packet import ACK, FIN, PSH, RST, SYN, TCP, URG, Packet

TIMEOUTS = Timeouts()
VALID_FLAGS = [f for f in range(64) if valid_flags(f)]
NO_CHANGE = {TcpOutcome.IGNORE, TcpOutcome.REOPEN} | {
    TcpOutcome.INVALID_TRANSITION,
    TcpOutcome.INVALID_WINDOW,
    TcpOutcome.INVALID_RST,
}


def _documented(state: TcpState, direction: Direction, inp: TcpInput) -> bool:
    try:
        nxt = transition(state, direction, inp)
    except Misuse:
        return False
    assert isinstance(nxt, TcpState | Special)
    return True


def test_every_triple_is_documented_or_misuse() -> None:
    for state, direction, inp in itertools.product(TcpState, Direction, TcpInput):
        documented = _documented(state, direction, inp)
        # Only a reply to a flow that has not started is our own bug.
        assert documented != (state == TcpState.NONE and direction == Direction.REPLY)
        assert documented == ((state, direction, inp) in TRANSITIONS)


@given(st.sampled_from(TcpState), st.sampled_from(Direction), st.sampled_from(TcpInput))
def test_transition_returns_an_outcome_or_raises_misuse(
    state: TcpState, direction: Direction, inp: TcpInput
) -> None:
    try:
        nxt = transition(state, direction, inp)
    except Misuse:
        assert state == TcpState.NONE and direction == Direction.REPLY
    else:
        assert nxt in set(TcpState) | set(Special)


sequence = st.one_of(st.integers(0, 2**32 - 1), st.integers(990, 1200), st.integers(4990, 5200))
packets = st.builds(
    lambda flags, seq, ack, window, wscale, data: Packet(
        4, 1, 2, TCP, 1000, 80, 40 + data, flags, seq, ack, window, wscale, data
    ),
    flags=st.sampled_from([*VALID_FLAGS, ACK | PSH, FIN | ACK | PSH, SYN | URG]),
    seq=sequence,
    ack=sequence,
    window=st.one_of(st.just(0), st.integers(1, 65535)),
    wscale=st.one_of(st.none(), st.integers(0, 20)),
    data=st.sampled_from([0, 0, 1, 100, 1460, 70000]),
)


@given(
    first=st.sampled_from([SYN, ACK]),
    history=st.lists(st.tuples(st.sampled_from(Direction), packets), max_size=12),
    last_state=st.sampled_from(TcpState),
    last_direction=st.sampled_from(Direction),
    last=packets,
    liberal=st.booleans(),
    seen_reply=st.booleans(),
    assured=st.booleans(),
)
def test_step_only_returns_documented_results(
    first: int,
    history: list[tuple[Direction, Packet]],
    last_state: TcpState,
    last_direction: Direction,
    last: Packet,
    liberal: bool,
    seen_reply: bool,
    assured: bool,
) -> None:
    """Drive one slot through arbitrary packets, then force any state."""
    tracker = TcpTracker(TIMEOUTS)
    tracker.grow(1)
    tracker.start(0, Packet(4, 1, 2, TCP, 1000, 80, 40, first, 1000, 0, 512, 7), first == ACK)
    state = TcpState.SYN_SENT if first == SYN else TcpState.ESTABLISHED
    for direction, p in history:
        outcome, new, _, _ = _checked_step(tracker, state, direction, p, liberal, True, False)
        if outcome in (TcpOutcome.ACCEPT, TcpOutcome.ABORT):
            state = TcpState(new)
    _checked_step(tracker, last_state, last_direction, last, liberal, seen_reply, assured)


def _checked_step(
    tracker: TcpTracker,
    state: TcpState,
    direction: Direction,
    p: Packet,
    liberal: bool,
    seen_reply: bool,
    assured: bool,
) -> tuple[TcpOutcome, int, float, bool]:
    try:
        result = tracker.step(0, state, direction, p, liberal, seen_reply, assured)
    except Misuse:
        assert state == TcpState.NONE and direction == Direction.REPLY
        return TcpOutcome.INVALID_TRANSITION, state, -1.0, False
    outcome, new, timeout, assured_now = result
    assert isinstance(outcome, TcpOutcome)
    assert new in set(TcpState) and isinstance(timeout, float) and isinstance(assured_now, bool)
    planned = TRANSITIONS[(state, direction, classify(p.tcp_flags))]
    if planned == Special.INVALID:
        assert outcome == TcpOutcome.INVALID_TRANSITION
    if outcome in NO_CHANGE:
        assert (new, timeout, assured_now) == (state, -1.0, False)
    else:
        assert timeout == -1.0 or timeout in set(TIMEOUTS.__dict__.values())
    if liberal:
        assert outcome != TcpOutcome.INVALID_WINDOW
    if assured_now:
        assert new == TcpState.ESTABLISHED and seen_reply and not assured
    if outcome == TcpOutcome.ABORT:
        assert p.tcp_flags & RST and not seen_reply
    return outcome, new, timeout, assured_now
