"""TCP connection tracking, following Linux ``net/netfilter/nf_conntrack_proto_tcp.c``.

Two layers, as in the kernel:

1. :data:`TRANSITIONS` maps ``(state, direction, input)`` to the next state
   or to one of two marks.  ``input`` is the packet class the kernel derives
   from the flags (``get_conntrack_index``): RST wins, then SYN (SYNACK when
   ACK is set too), FIN, ACK, else NONE.  ``direction`` is ORIGINAL for the
   side that sent the first packet, REPLY for the other.

   * :attr:`Special.INVALID` (the kernel's ``sIV``): the packet cannot
     happen in this state (FIN before any SYN/ACK, a SYN from the server in
     ESTABLISHED ...).  The packet is INVALID and nothing changes.
   * :attr:`Special.IGNORE` (``sIG``): the packet may be valid while we are
     out of sync with both ends (a SYN on an ESTABLISHED tuple the client
     has reused, a late SYN/ACK).  The packet is accepted without changing
     state or timers, and remembered; if the other side then answers it
     consistently (a SYN/ACK acknowledging the ignored SYN) the flow resyncs
     to SYN_RECV from the remembered values.
   * The NONE column exists only for the ORIGINAL direction (a flow is
     created by its first packet); ``(NONE, REPLY, *)`` is absent and
     :func:`transition` raises :class:`node.errors.Misuse` for it.

   Special cases the table cannot express, handled in :meth:`TcpTracker.step`
   as the kernel does:

   * a SYN on a TIME_WAIT or CLOSE flow that was closed by FIN or aborted by
     RST from the same side *reopens* the tuple: the caller deletes the old
     flow (reason ``replaced``) and treats the SYN as new.  Otherwise the SYN
     is IGNOREd (the server may still hold the old connection);
   * simultaneous open (SYN_SENT2) is remembered, so the final ACK from
     either side reaches ESTABLISHED;
   * an RST is checked against the highest ACK its receiver sent
     (``td_maxack``): below it the RST is INVALID (``tcp-invalid-rst``); not
     exactly at it on an assured ESTABLISHED flow, the state is kept so an
     RFC 5961 challenge ACK can follow;
   * an RST before any reply aborts the flow (the caller deletes it).

2. The window check (:meth:`TcpTracker._in_window`), modelled on
   ``tcp_in_window``: per direction the highest sequence sent (``td_end``),
   the highest the receiver allows (``td_maxend``), the largest window seen
   (``td_maxwin``) and the window scale from the SYN options (both sides
   must send it, RFC 7323).  A packet must start below ``td_maxend``, end
   inside the receiver's window, and acknowledge data the other side has
   sent (not more than ``max(td_maxwin, 66000)`` behind).  As in current
   kernels, a failed check is INVALID (``tcp-out-of-window``) for data
   beyond the window or an ACK of unseen data, and IGNORE (accepted, no
   update) for retransmissions and overly delayed ACKs.

   *Liberal* tracking never marks a packet out of window: it re-seeds the
   tracking forward from the packet instead.  It applies with
   ``TableConfig.tcp_liberal``, to flows picked up mid-stream, and to
   *offloaded* flows: the kernel fast path forwards their ordinary data and
   we only see samples plus SYN/FIN/RST, so their window data is stale by
   design.  Clearing the offload flag (:meth:`TcpTracker.forget_windows`)
   makes the next packets seed fresh windows.  Even liberal flows get the
   RST ``td_maxack`` check, as with the kernel's ``be_liberal``.

Differences from the kernel, all deliberate: SACK blocks are not parsed
(``Packet`` carries none), so the SACK edge equals the ACK; NAT sequence
offsets do not exist here; RFC 5961 challenge-ACK bookkeeping in LAST_ACK
and SYN_SENT and the "shrink the timeout after out-of-window FIN/RST" rule
are not modelled.

Storage: per-flow tracking lives in ``array`` columns indexed by the flow's
slot number (see ``node.flow.table``), because a Python object per flow with
a dozen 32-bit integers would cost several hundred bytes.
"""

from __future__ import annotations

from array import array
from enum import IntEnum, StrEnum
from typing import Final

from node.errors import Misuse
from node.flow.timeouts import Timeouts
from node.packet import ACK, CWR, ECE, FIN, PSH, RST, SYN, URG, Packet

__all__ = [
    "MAX_RETRANS",
    "TRANSITIONS",
    "Direction",
    "Next",
    "Special",
    "TcpInput",
    "TcpOutcome",
    "TcpState",
    "TcpTracker",
    "classify",
    "transition",
    "valid_flags",
]

MAX_RETRANS: Final = 3  # nf_conntrack_tcp_max_retrans: retransmissions before the short timer


class TcpState(IntEnum):
    NONE = 0  # before the first packet (only as a starting point)
    SYN_SENT = 1  # SYN seen
    SYN_RECV = 2  # SYN/ACK seen
    ESTABLISHED = 3  # handshake completed (or picked up mid-stream)
    FIN_WAIT = 4  # FIN seen from one side
    CLOSE_WAIT = 5  # that FIN was acknowledged
    LAST_ACK = 6  # FIN seen from both sides
    TIME_WAIT = 7  # last ACK seen
    CLOSE = 8  # reset
    SYN_SENT2 = 9  # SYN seen from both sides (simultaneous open)


class Direction(IntEnum):
    ORIGINAL = 0  # sent by the side that sent the flow's first packet
    REPLY = 1  # sent by the other side


class TcpInput(IntEnum):
    SYN = 0
    SYNACK = 1
    FIN = 2
    ACK = 3
    RST = 4
    NONE = 5


class Special(StrEnum):
    IGNORE = "IGNORE"  # accept, leave state and timers alone, remember the packet
    INVALID = "INVALID"  # cannot happen in this state


Next = TcpState | Special


class TcpOutcome(IntEnum):
    """What :meth:`TcpTracker.step` decided."""

    ACCEPT = 0  # in window; state and timer updated
    IGNORE = 1  # accepted without changing state, tracking or timer
    REOPEN = 2  # SYN reuses a closed tuple: delete the flow, treat the SYN as new
    ABORT = 3  # RST before any reply: accepted, then delete the flow
    INVALID_TRANSITION = 4  # TRANSITIONS says INVALID
    INVALID_WINDOW = 5  # outside the tracked sequence window
    INVALID_RST = 6  # RST below what its receiver already acknowledged


# Short names so the table below reads as a grid (same letters as the kernel's).
SS, SR, ES = TcpState.SYN_SENT, TcpState.SYN_RECV, TcpState.ESTABLISHED
FW, CW, LA = TcpState.FIN_WAIT, TcpState.CLOSE_WAIT, TcpState.LAST_ACK
TW, CL, S2 = TcpState.TIME_WAIT, TcpState.CLOSE, TcpState.SYN_SENT2
IG, IV = Special.IGNORE, Special.INVALID
# Inputs and outcomes as module globals too: the per-packet code below uses
# these, because attribute access on an Enum class costs ~100 ns in 3.11.
_I_SYN, _I_SYNACK, _I_FIN, _I_ACK, _I_RST, _I_NONE = TcpInput
_ACCEPT, _IGNORED, _REOPEN, _ABORT, _BAD_TRANSITION, _BAD_WINDOW, _BAD_RST = TcpOutcome
_ORIGINAL, _REPLY = Direction
_O, _R = Direction.ORIGINAL, Direction.REPLY
_COLUMNS: Final = tuple(TcpState)  # NONE, SYN_SENT, ..., SYN_SENT2

# One row per (direction, input); one entry per state in _COLUMNS order.
# The NONE entry of REPLY rows is None: a flow never is in NONE when a reply
# arrives, so those keys are left out of TRANSITIONS.
# fmt: off
_ROWS: Final[dict[tuple[Direction, TcpInput], tuple[Next | None, ...]]] = {
    #                        NONE  SS  SR  ES  FW  CW  LA  TW  CL  S2
    (_O, TcpInput.SYN):     (SS,   SS, IG, IG, IG, IG, IG, SS, SS, S2),
    # new flow; retransmitted SYN; a SYN on a live tuple may be a reuse the
    # server will reject -> ignore; reopen after a close; late SYN in S2
    (_O, TcpInput.SYNACK):  (IV,   IV, SR, IV, IV, IV, IV, IV, IV, SR),
    # only a simultaneous-open side sends SYN/ACK from the original direction
    (_O, TcpInput.FIN):     (IV,   IV, FW, FW, LA, LA, LA, TW, CL, IV),
    # no FIN before the SYN/ACK; first FIN -> FIN_WAIT; FIN from both -> LAST_ACK
    (_O, TcpInput.ACK):     (ES,   IV, ES, ES, CW, CW, TW, TW, CL, IV),
    # NONE -> ES is a mid-stream pickup (tcp_loose); the ACK of the SYN/ACK
    # establishes; the ACK of the second FIN -> TIME_WAIT
    (_O, TcpInput.RST):     (IV,   CL, CL, CL, CL, CL, CL, CL, CL, CL),
    (_O, TcpInput.NONE):    (IV,   IV, IV, IV, IV, IV, IV, IV, IV, IV),
    (_R, TcpInput.SYN):     (None, S2, IV, IV, IV, IV, IV, SS, IV, S2),
    # SYNs crossed -> simultaneous open; after TIME_WAIT the server may reopen
    # the tuple with the roles swapped
    (_R, TcpInput.SYNACK):  (None, SR, IG, IG, IG, IG, IG, IG, IG, SR),
    # the normal answer; a later SYN/ACK may answer an ignored SYN -> ignore
    # (and resync if it acknowledges that SYN)
    (_R, TcpInput.FIN):     (None, IV, FW, FW, LA, LA, LA, TW, CL, IV),
    (_R, TcpInput.ACK):     (None, IG, SR, ES, CW, CW, TW, TW, CL, IG),
    # an ACK before the SYN/ACK may come from an old half-open connection
    # -> ignore; in SYN_RECV it may answer a retransmitted SYN
    (_R, TcpInput.RST):     (None, CL, CL, CL, CL, CL, CL, CL, CL, CL),
    (_R, TcpInput.NONE):    (None, IV, IV, IV, IV, IV, IV, IV, IV, IV),
}
# fmt: on

TRANSITIONS: Final[dict[tuple[TcpState, Direction, TcpInput], Next]] = {
    (state, direction, inp): nxt
    for (direction, inp), row in _ROWS.items()
    for state, nxt in zip(_COLUMNS, row, strict=True)
    if nxt is not None
}


def transition(state: TcpState, direction: Direction, inp: TcpInput) -> Next:
    """Apply :data:`TRANSITIONS`; a missing key is our bug, not the peer's."""
    try:
        return TRANSITIONS[(state, direction, inp)]
    except KeyError:
        raise Misuse(f"no TCP transition for {state!r}, {direction!r}, {inp!r}") from None


# Flag combinations the kernel's tcp_error() accepts, once ECE, CWR and PSH
# (which carry no connection-state meaning) are masked out.
_VALID_FLAG_SETS: Final = frozenset(
    {SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK, ACK | URG}
)
_IGNORED_FLAGS: Final = ECE | CWR | PSH


def valid_flags(flags: int) -> bool:
    """False for flag combinations no TCP stack sends (SYN+FIN, NULL, FIN without ACK ...)."""
    return (flags & 0xFF & ~_IGNORED_FLAGS) in _VALID_FLAG_SETS


def classify(flags: int) -> TcpInput:
    """The packet class used as the state machine's input."""
    if flags & RST:
        return TcpInput.RST
    if flags & SYN:
        return TcpInput.SYNACK if flags & ACK else TcpInput.SYN
    if flags & FIN:
        return TcpInput.FIN
    if flags & ACK:
        return TcpInput.ACK
    return TcpInput.NONE


# Flat lookup tables for the per-packet path, derived from TRANSITIONS.
_INPUT_OF: Final = tuple(int(classify(f)) for f in range(256))
_MISSING: Final = -1
_IGNORE: Final = 10
_INVALID: Final = 11
_CODE: Final[dict[Next, int]] = {**{s: int(s) for s in TcpState}, IG: _IGNORE, IV: _INVALID}
_FLAT: Final = tuple(
    _CODE[TRANSITIONS[key]] if key in TRANSITIONS else _MISSING
    for key in ((s, d, i) for s in TcpState for d in Direction for i in TcpInput)
)

_M32: Final = 0xFFFFFFFF
_HALF: Final = 0x80000000
_MAXACKWIN_FLOOR: Final = 66000  # the kernel's MAXACKWINCONST
_MAX_WSCALE: Final = 14  # RFC 7323 s2.3

# Per-direction flags (column _dflags, index 2*slot + direction).
_D_WSCALE: Final = 1  # this side sent the window-scale option
_D_CLOSE_INIT: Final = 2  # this side sent the first FIN
_D_DATA_UNACK: Final = 4  # this side has data the other has not acknowledged
_D_MAXACK_SET: Final = 8  # _maxack holds a value
_D_LIBERAL: Final = 16  # picked up mid-stream: never out of window

# Per-connection flags (column _cflags, index slot).
_C_LAST_REPLY: Final = 1  # direction of the last remembered packet
_C_SIMULTANEOUS: Final = 2  # SYNs crossed (SYN_SENT2 was visited)
_C_LAST_WSCALE: Final = 4  # the last ignored SYN carried the window-scale option

_RST_INVALID: Final = 1  # below the receiver's highest ACK
_RST_KEEP_STATE: Final = 2  # accept but do not close (challenge ACK expected)
_RST_SKIP_WINDOW: Final = 4  # answers a packet we let through out of sync

# Next-state codes that need more than the table lookup (see step()).
_NEEDS_CARE: Final = frozenset({_MISSING, _IGNORE, _INVALID, SS, SR, S2, CL})

_WINDOW_OK: Final = 0
_WINDOW_IGNORE: Final = 1
_WINDOW_INVALID: Final = 2


def _before(a: int, b: int) -> bool:
    """``a`` precedes ``b`` in 32-bit sequence space (RFC 1982 comparison)."""
    return ((a - b) & _M32) >= _HALF


TcpStep = tuple[TcpOutcome, int, float, bool]  # (outcome, new state, timeout or -1, now assured)


class TcpTracker:
    """Sequence tracking and the state-machine step for many flows, by slot."""

    __slots__ = (
        "_cflags",
        "_close_timeout",
        "_dflags",
        "_end",
        "_last_ack",
        "_last_end",
        "_last_index",
        "_last_seq",
        "_last_win",
        "_last_wscale",
        "_maxack",
        "_maxend",
        "_maxwin",
        "_retrans",
        "_retrans_cap",
        "_scale",
        "_timeout",
        "_unack_cap",
    )

    def __init__(self, timeouts: Timeouts) -> None:
        t = timeouts
        self._retrans_cap = t.tcp_max_retrans
        self._unack_cap = t.tcp_unacknowledged
        self._close_timeout = t.tcp_close
        self._timeout: tuple[float, ...] = (  # indexed by TcpState
            t.tcp_syn_sent,
            t.tcp_syn_sent,
            t.tcp_syn_recv,
            t.tcp_established,
            t.tcp_fin_wait,
            t.tcp_close_wait,
            t.tcp_last_ack,
            t.tcp_time_wait,
            t.tcp_close,
            t.tcp_syn_sent2,
        )
        # Per direction, index 2 * slot + direction.
        self._end: array[int] = array("I")  # highest sequence sent + 1 (td_end)
        self._maxend: array[int] = array("I")  # highest sequence the receiver allows (td_maxend)
        self._maxwin: array[int] = array("I")  # largest scaled window seen; 0 = unknown
        self._maxack: array[int] = array("I")  # highest ACK sent (td_maxack)
        self._scale: array[int] = array("B")  # window-scale shift
        self._dflags: array[int] = array("B")  # _D_* flags
        # Per connection, index slot: the last packet remembered, for
        # retransmission counting and for resyncing after an IGNORE.
        self._last_index: array[int] = array("B")  # its TcpInput
        self._cflags: array[int] = array("B")  # _C_* flags
        self._last_seq: array[int] = array("I")
        self._last_ack: array[int] = array("I")
        self._last_end: array[int] = array("I")
        self._last_win: array[int] = array("I")
        self._last_wscale: array[int] = array("B")
        self._retrans: array[int] = array("B")  # identical ACK segments in a row

    def grow(self, slots: int) -> None:
        """Make room for slot numbers below ``slots``."""
        extra = slots - len(self._cflags)
        if extra <= 0:
            return
        for column in (self._end, self._maxend, self._maxwin, self._maxack):
            column.frombytes(bytes(2 * extra * column.itemsize))
        for column in (self._scale, self._dflags):
            column.frombytes(bytes(2 * extra))
        for column in (self._last_seq, self._last_ack, self._last_end, self._last_win):
            column.frombytes(bytes(extra * column.itemsize))
        for column in (self._last_index, self._cflags, self._last_wscale, self._retrans):
            column.frombytes(bytes(extra))

    # --- flow start --------------------------------------------------------

    def start(self, slot: int, p: Packet, pickup: bool) -> None:
        """Seed tracking from a flow's first packet (kernel ``tcp_new``).

        ``pickup`` is a mid-stream pickup from an ACK (``tcp_loose``): the
        windows are guessed from this packet and both directions become
        liberal, since the handshake that carried the window scale was missed.
        """
        s = 2 * slot
        for d in (s, s + 1):
            self._end[d] = self._maxend[d] = self._maxwin[d] = self._maxack[d] = 0
            self._scale[d] = self._dflags[d] = 0
        self._last_seq[slot] = self._last_ack[slot] = 0
        self._last_end[slot] = self._last_win[slot] = 0
        self._cflags[slot] = self._last_wscale[slot] = self._retrans[slot] = 0
        self._last_index[slot] = _I_NONE
        end = _segment_end(p)
        window = p.window or 1
        self._end[s] = end
        self._maxwin[s] = window
        if pickup:
            self._maxend[s] = (end + window) & _M32
            self._dflags[s] = self._dflags[s + 1] = _D_LIBERAL
        else:
            self._maxend[s] = end
            self._set_scale(s, p.wscale)

    def forget_windows(self, slot: int) -> None:
        """Drop window data (it went stale while the flow was offloaded).

        The next packet in each direction seeds its window again, as in a
        mid-stream pickup; the window scales learnt from the SYNs are kept.
        """
        for d in (2 * slot, 2 * slot + 1):
            self._end[d] = self._maxend[d] = self._maxwin[d] = self._maxack[d] = 0
            self._dflags[d] &= _D_WSCALE | _D_CLOSE_INIT | _D_LIBERAL

    # --- per packet --------------------------------------------------------

    def step(
        self,
        slot: int,
        state: int,
        direction: int,
        p: Packet,
        liberal: bool,
        seen_reply: bool,
        assured: bool,
    ) -> TcpStep:
        """Track one packet of an existing flow (kernel ``tcp_packet``).

        ``state`` is the flow's TcpState, ``direction`` a Direction value,
        ``seen_reply`` whether a reply was accepted before this packet and
        ``liberal`` whether the window check may only update (config or
        offload).  The flags must pass :func:`valid_flags`.  Returns
        ``(outcome, new_state, timeout, assured_now)``; ``timeout`` is the
        idle timeout to apply from now, or -1 to keep the current deadline
        (retransmitted SYNs do not extend an unanswered flow, like Linux).
        """
        index = _INPUT_OF[p.tcp_flags & 0xFF]
        nxt = _FLAT[(state * 2 + direction) * 6 + index]
        old = state
        check_window = True
        if nxt in _NEEDS_CARE:  # everything but the routine moves (ES -> ES ...)
            if nxt == _MISSING:
                raise Misuse(f"TCP packet for a flow in state {state} direction {direction}")
            cflags = self._cflags[slot]
            last_dir = cflags & _C_LAST_REPLY
            last_index = self._last_index[slot]
            if nxt == SS and old in (TW, CL):
                closed = (self._dflags[2 * slot] | self._dflags[2 * slot + 1]) & _D_CLOSE_INIT
                if closed or (last_dir == direction and last_index == _I_RST):
                    return _REOPEN, old, -1.0, False
                nxt = _IGNORE
            if nxt == _IGNORE:
                if not (
                    index == _I_SYNACK
                    and last_index == _I_SYN
                    and last_dir != direction
                    and p.ack == self._last_end[slot]
                ):
                    self._remember_ignored(slot, direction, index, p)
                    return _IGNORED, old, -1.0, False
                # Both ends agree on a SYN we ignored: resync from what we remembered.
                self._resync_from_ignored_syn(slot, last_dir, direction)
                old, nxt = SS, SR
            elif nxt == _INVALID:
                return _BAD_TRANSITION, old, -1.0, False
            elif nxt == S2:
                self._cflags[slot] = cflags | _C_SIMULTANEOUS
            elif nxt == SR:
                if direction == _REPLY and index == _I_ACK and cflags & _C_SIMULTANEOUS:
                    nxt = ES
            elif nxt == CL and index == _I_RST:
                rst = self._check_rst(slot, old, direction, p, liberal, seen_reply, assured)
                if rst & _RST_INVALID:
                    return _BAD_RST, old, -1.0, False
                if rst & _RST_KEEP_STATE:  # not exactly at the expected sequence
                    nxt = old
                check_window = not rst & _RST_SKIP_WINDOW
        if check_window:
            verdict = self._in_window(slot, old, direction, index, p, liberal)
            if verdict == _WINDOW_INVALID:
                return _BAD_WINDOW, old, -1.0, False
            if verdict == _WINDOW_IGNORE:
                return _IGNORED, old, -1.0, False
        return self._accepted(slot, old, nxt, direction, index, seen_reply, assured)

    def _accepted(
        self,
        slot: int,
        old: int,
        nxt: int,
        direction: int,
        index: int,
        seen_reply: bool,
        assured: bool,
    ) -> TcpStep:
        """Commit an in-window packet: remember it, pick the timeout, assure."""
        self._last_index[slot] = index
        cflags = self._cflags[slot] & ~_C_LAST_REPLY
        self._cflags[slot] = (cflags | _C_LAST_REPLY) if direction else cflags
        if nxt != old and nxt == FW:
            self._dflags[2 * slot + direction] |= _D_CLOSE_INIT
        timeout = self._timeout_for(slot, nxt, index)
        if not seen_reply:
            if index == _I_RST:
                return _ABORT, nxt, timeout, False
            if index == _I_SYN and old == SS:
                timeout = -1.0
        assured_now = not assured and seen_reply and nxt == ES and old in (SR, ES)
        return _ACCEPT, nxt, timeout, assured_now

    def _timeout_for(self, slot: int, state: int, index: int) -> float:
        """The state's timeout, capped like the kernel's tcp_packet does."""
        normal = self._timeout[state]
        retrans_cap, unack_cap = self._retrans_cap, self._unack_cap
        if self._retrans[slot] >= MAX_RETRANS and normal > retrans_cap:
            return retrans_cap
        if index == _I_RST:
            return self._close_timeout
        if normal > unack_cap and (self._dflags[2 * slot] | self._dflags[2 * slot + 1]) & (
            _D_DATA_UNACK
        ):
            return unack_cap
        if normal > retrans_cap and self._last_win[slot] == 0:
            return retrans_cap  # zero window: the peer may be gone
        return normal

    def _check_rst(
        self,
        slot: int,
        old: int,
        direction: int,
        p: Packet,
        liberal: bool,
        seen_reply: bool,
        assured: bool,
    ) -> int:
        """Judge an RST against what its receiver acknowledged: ``_RST_*`` bits."""
        result = 0
        receiver = 2 * slot + 1 - direction
        last_index = self._last_index[slot]
        if self._dflags[receiver] & _D_MAXACK_SET and last_index != _I_SYN:
            seq = p.seq
            maxack = self._maxack[receiver]
            established = old == ES and assured
            if seq != 0 or established:  # seq 0 answers a SYN we let through
                if _before(seq, maxack):
                    return _RST_INVALID
                train = (
                    last_index == _I_ACK
                    and (self._cflags[slot] & _C_LAST_REPLY) == direction
                    and seq == self._last_end[slot]
                )
                # An RST not exactly where the receiver expects it may be
                # answered by an RFC 5961 challenge ACK, so the flow stays.
                # Liberal flows cannot know the exact value, so they close.
                if established and seq != maxack and not train and not liberal:
                    result = _RST_KEEP_STATE
        if p.ack == self._last_end[slot] and (
            (seen_reply and last_index == _I_SYN) or (not assured and last_index == _I_ACK)
        ):
            # RST answering a SYN or ACK we let through while out of sync:
            # it may acknowledge segments we ignored, so skip the window.
            result |= _RST_SKIP_WINDOW
        return result

    def _remember_ignored(self, slot: int, direction: int, index: int, p: Packet) -> None:
        self._last_index[slot] = index
        cflags = self._cflags[slot] & ~(_C_LAST_REPLY | _C_LAST_WSCALE)
        if direction:
            cflags |= _C_LAST_REPLY
        self._last_seq[slot] = p.seq
        self._last_end[slot] = _segment_end(p)
        self._last_win[slot] = p.window
        if index == _I_SYN and direction == _ORIGINAL and p.wscale is not None:
            cflags |= _C_LAST_WSCALE
            self._last_wscale[slot] = min(p.wscale, _MAX_WSCALE)
        self._cflags[slot] = cflags

    def _resync_from_ignored_syn(self, slot: int, syn_dir: int, direction: int) -> None:
        s, d = 2 * slot + syn_dir, 2 * slot + direction
        self._end[s] = self._maxend[s] = self._last_end[slot]
        self._maxwin[s] = self._last_win[slot] or 1
        wscale = self._cflags[slot] & _C_LAST_WSCALE
        self._scale[s] = self._last_wscale[slot] if wscale else 0
        self._dflags[s] = _D_WSCALE if wscale else 0
        self._end[d] = self._maxend[d] = self._maxwin[d] = self._maxack[d] = 0
        self._scale[d] = self._dflags[d] = 0

    def _set_scale(self, d: int, wscale: int | None) -> None:
        if wscale is None:
            self._scale[d] = 0
            self._dflags[d] &= ~_D_WSCALE
        else:
            self._scale[d] = min(wscale, _MAX_WSCALE)
            self._dflags[d] |= _D_WSCALE

    def _init_sender(self, s: int, r: int, end: int, window: int, wscale: int | None) -> None:
        """(Re)start a direction from its SYN or SYN/ACK."""
        self._end[s] = self._maxend[s] = end
        self._maxwin[s] = window or 1
        self._maxack[s] = 0
        self._dflags[s] = 0
        self._set_scale(s, wscale)
        if not (self._dflags[s] & self._dflags[r] & _D_WSCALE):
            self._scale[s] = self._scale[r] = 0  # scaling needs both sides' option

    def _in_window(
        self, slot: int, state: int, direction: int, index: int, p: Packet, liberal: bool
    ) -> int:
        # Sequence comparisons are inlined for speed (this runs per packet):
        # "x before y" is ((x - y) & _M32) >= _HALF, i.e. _before(x, y).
        s, r = 2 * slot + direction, 2 * slot + 1 - direction
        end_col, maxend, maxwin = self._end, self._maxend, self._maxwin
        flags = p.tcp_flags
        seq, ack = p.seq, p.ack
        end = (seq + p.payload_len + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)) & _M32
        sender_maxwin = maxwin[s]
        if sender_maxwin == 0 or flags & SYN:
            early = self._seed(s, r, state, direction, p, end)
            if early is not None:
                return early
            sender_maxwin = maxwin[s]
        if not flags & ACK or (flags & RST and ack == 0):
            ack = end_col[r]  # no ACK (or a broken RST ACK of 0): pretend it is current
        if flags & RST and seq == 0 and state == SS:
            seq = end = end_col[s]  # RST answering a SYN
        sender_end, receiver_end = end_col[s], end_col[r]
        receiver_maxwin = maxwin[r]
        ack_floor = (receiver_end - max(sender_maxwin, _MAXACKWIN_FLOOR) - 1) & _M32
        ack_ok = ((ack_floor - ack) & _M32) >= _HALF and ((ack - receiver_end - 1) & _M32) >= _HALF
        # Ends inside the receiver's window (lower edge); unknown window passes.
        in_recv_win = receiver_maxwin == 0 or (
            ((sender_end - receiver_maxwin - 1 - end) & _M32) >= _HALF
        )
        if ((seq - maxend[s] - 1) & _M32) < _HALF:
            # Starts beyond the receiver's window.  Data just past it with a
            # sane ACK is a sender overshooting the window: remember it and
            # let it pass without a state change (current kernels do so).
            overshot = (end - maxend[s] + 1) & _M32
            if receiver_maxwin and in_recv_win and ack_ok and overshot <= receiver_maxwin:
                end_col[s] = end
                self._dflags[s] |= _D_DATA_UNACK
                return self._out_of_window(s, r, p, end, ack, liberal, _WINDOW_IGNORE)
            return self._out_of_window(s, r, p, end, ack, liberal, _WINDOW_INVALID)
        if ((ack - receiver_end - 1) & _M32) < _HALF:  # acknowledges data not seen yet
            return self._out_of_window(s, r, p, end, ack, liberal, _WINDOW_INVALID)
        if not in_recv_win:  # a retransmission of data already acknowledged
            return self._out_of_window(s, r, p, end, ack, liberal, _WINDOW_IGNORE)
        if not ack_ok:  # an overly delayed ACK
            return self._out_of_window(s, r, p, end, ack, liberal, _WINDOW_IGNORE)
        self._update(slot, s, r, direction, index, p, seq, ack, end)
        return _WINDOW_OK

    def _seed(self, s: int, r: int, state: int, direction: int, p: Packet, end: int) -> int | None:
        """Start a direction's window from a SYN, SYN/ACK or first mid-stream packet.

        Returns a verdict when the packet needs no further check, else None.
        """
        maxwin, end_col, maxend = self._maxwin, self._end, self._maxend
        flags = p.tcp_flags
        if maxwin[s] == 0:
            if flags & SYN:
                self._init_sender(s, r, end, p.window, p.wscale)
                return None if flags & ACK else _WINDOW_OK  # crossing SYN, simultaneous open
            # First packet seen from this side mid-stream: trust it.
            end_col[s] = end
            scaled = (p.window << self._scale[s]) or 1
            maxwin[s] = scaled
            maxend[s] = (end + scaled) & _M32
            if maxwin[r] == 0:
                end_col[r] = maxend[r] = p.ack
            elif p.ack == (end_col[r] + 1) & _M32:
                end_col[r] = p.ack  # answer to a keep-alive probe
        elif _before(end_col[s], end) and state in (SS, SR):
            # SYN (or SYN/ACK) with a new ISN: the sender restarted (RFC 793 s3.3).
            self._init_sender(s, r, end, p.window, p.wscale)
            if direction == _REPLY and not flags & ACK:
                return _WINDOW_OK
        return None

    def _update(
        self,
        slot: int,
        s: int,
        r: int,
        direction: int,
        index: int,
        p: Packet,
        seq: int,
        ack: int,
        end: int,
    ) -> None:
        """Advance both directions' tracking from an in-window packet."""
        end_col, maxend, maxwin, dflags = self._end, self._maxend, self._maxwin, self._dflags
        flags = p.tcp_flags
        window = p.window if flags & SYN else p.window << self._scale[s]
        if maxwin[s] < window:
            maxwin[s] = window
        if ((end_col[s] - end) & _M32) >= _HALF:  # new data
            end_col[s] = end
            dflags[s] |= _D_DATA_UNACK
        if flags & ACK:
            if not dflags[s] & _D_MAXACK_SET:
                self._maxack[s] = ack
                dflags[s] |= _D_MAXACK_SET
            elif ((self._maxack[s] - ack) & _M32) >= _HALF:
                self._maxack[s] = ack
        sender_maxend = maxend[s]
        if maxwin[r] and ((sender_maxend - end) & _M32) >= _HALF:
            maxwin[r] = min(maxwin[r] + ((end - sender_maxend) & _M32), _M32)
        if ((maxend[r] - 1 - ack - window) & _M32) >= _HALF:  # the receiver may send more
            maxend[r] = (ack + window + (0 if window else 1)) & _M32
        if ack == end_col[r]:
            dflags[r] &= ~_D_DATA_UNACK
        if index != _I_ACK:
            return
        # Count identical ACK segments in a row (retransmissions).
        if (
            self._last_seq[slot] == seq
            and self._last_ack[slot] == ack
            and self._last_end[slot] == end
            and self._last_win[slot] == window
            and (self._cflags[slot] & _C_LAST_REPLY) == direction
            and self._last_index[slot] == _I_ACK
        ):
            self._retrans[slot] = min(self._retrans[slot] + 1, 255)
        else:
            self._last_seq[slot] = seq
            self._last_ack[slot] = ack
            self._last_end[slot] = end
            self._last_win[slot] = min(window, _M32)
            self._retrans[slot] = 0

    def _out_of_window(
        self, s: int, r: int, p: Packet, end: int, ack: int, liberal: bool, verdict: int
    ) -> int:
        """Return ``verdict``, or re-seed the tracking and accept when liberal."""
        if not (liberal or self._dflags[s] & _D_LIBERAL):
            return verdict
        end_col, maxend, maxwin = self._end, self._maxend, self._maxwin
        window = p.window if p.tcp_flags & SYN else p.window << self._scale[s]
        if _before(end_col[s], end):
            end_col[s] = end
        if maxwin[s] < window:
            maxwin[s] = window or 1
        if _before(maxend[s], end):
            maxend[s] = end
        if p.tcp_flags & ACK:
            if _before(end_col[r], ack):
                end_col[r] = ack
            if _before(maxend[r], (ack + window) & _M32):
                maxend[r] = (ack + window + (0 if window else 1)) & _M32
        return _WINDOW_OK


def _segment_end(p: Packet) -> int:
    """Sequence number after this segment (SYN and FIN count as one byte)."""
    flags = p.tcp_flags
    return (p.seq + p.payload_len + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)) & _M32
