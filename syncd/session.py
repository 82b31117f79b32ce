"""One peer's Exchange stream as a pure (sans-IO) state machine.

Like h11 or aioquic, nothing here touches a socket or a clock: the gRPC
adapter feeds :meth:`PeerSession.receive` with each incoming envelope,
sends what :meth:`PeerSession.messages_to_send` returns, and calls
:meth:`PeerSession.handle_timer` when :meth:`PeerSession.next_deadline` is
reached.  Local deltas enter through the peer's :class:`Outbox`.

Who holds what (they outlive a stream, so a reconnect resumes):

* :class:`Outbox` (one per peer): the local origin's deltas not yet acked by
  that peer, bounded; overflow drops the oldest and records ``lost_upto``.
* :class:`Inbox` (one per peer): how far the peer's origin stream has been
  applied here (epoch, seq) and the snapshot pull in progress, if any.
* :class:`syncd.replica.ReplicaStore` (one per node): every flow, the local
  ones included, so it is also what this node serves snapshots from.

Delivery (the scheme of TCP's cumulative ACK and retransmission timer, RFC
9293 s3.10 and RFC 6298, and of conntrackd's FTFW mode: sequence numbers,
ACK, NACK, ALIVE heartbeats and a resync when the resend queue cannot help):
deltas are numbered per (origin, epoch) and batched (flush at
``batch_max`` deltas or ``batch_delay`` after the oldest unsent one, or at
once when nothing sent is waiting for an ack: Nagle's rule).  The
receiver applies them strictly in order, drops duplicates, and acks
cumulatively; a delta after a hole gets an ack with ``gap`` set, which makes
the sender go back to the hole at once; otherwise unacked deltas are resent
after ``resend_after``.  At most ``max_in_flight`` deltas are sent and
unacked at a time (TCP's send window), so a resend is bounded too, and
resends and snapshot-request retries that bring no progress back off
exponentially (RFC 6298 s5.5).  Hello carries each side's cursor, so after
a reconnect the sender resends from the first unapplied delta.  When that
is no longer in the outbox (overflow, or a peer that was away too long) the
sender says ``ResyncRequired``; the receiver then pulls a snapshot of the
origin's flows page by page (``SnapshotRequest``/``SnapshotChunk``, retried
after the measured page round trip, at least ``resend_after``; a reply for
the current cursor is taken whichever retry of this pull it answers).
Deltas are dropped until the first page gives the
snapshot's base seq (they are in the snapshot or still in the outbox), then
flow again while the pages arrive; finally the receiver sweeps away that
origin's records that neither the snapshot nor a later delta confirmed.  A new epoch of the
peer (it restarted) also means a snapshot.  Nothing is dropped silently:
every such path is counted and ends in a resync.

Liveness: a side that has sent nothing for ``heartbeat_interval`` sends a
heartbeat.  A session that hears nothing for ``suspect_after`` reports the
peer SUSPECT, after ``dead_after`` it CLOSES (the adapter reconnects).

States and inputs (``TRANSITIONS``; any other pair raises :class:`Misuse`)::

    IDLE        --START-->            HELLO_SENT   (our Hello queued)
    HELLO_SENT  --HELLO_CURRENT-->    LIVE         (valid Hello, our copy is current)
    HELLO_SENT  --HELLO_BEHIND-->     SYNCING      (valid Hello, we need a snapshot)
    LIVE        --RESYNC-->           SYNCING      (ResyncRequired, overflow, request)
    SYNCING     --RESYNC-->           SYNCING      (snapshot restarted)
    SUSPECT     --RESYNC-->           SUSPECT      (snapshot pull started while silent)
    SYNCING     --SYNCED-->           LIVE         (last page applied, sweep done)
    LIVE        --SILENCE-->          SUSPECT      (nothing heard for suspect_after)
    SYNCING     --SILENCE-->          SUSPECT
    SUSPECT     --RECOVERED-->        LIVE         (a message arrived)
    SUSPECT     --RECOVERED_SYNCING--> SYNCING     (same, with a pull in progress)
    HELLO_SENT  --DEAD-->             CLOSED       (nothing heard for dead_after)
    SUSPECT     --DEAD-->             CLOSED
    any but IDLE/CLOSED --PEER_ERROR--> CLOSED     (PeerError/BadMessage raised)
    any but CLOSED      --CLOSE-->      CLOSED     (local close / stream ended)

Hello is resent every ``resend_after`` until the peer sends anything but a
Hello or heartbeat (it only does so once it has ours).  Messages before the
peer's Hello other than heartbeats are dropped and counted (a real stream
delivers Hello first; the in-memory test link may not).  A repeated Hello
with the same epoch is answered with an ack; a different epoch is a
:class:`PeerError`.  After CLOSED, ``receive`` drops and counts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import ClassVar, Final

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, ConfigError, Misuse, PeerError
from syncd.keyindex import MAX_CURSOR_LEN, ORDER_BUCKET, ORDERS, check_order
from syncd.records import (
    MAX_U63,
    Delta,
    FlowRecord,
    Op,
    check_node_id,
    delta_wire,
    deltas_from_pb,
    field_bytes,
    record_wire,
    records_from_pb,
    trusted_delta,
    varint,
)
from syncd.replica import Change, Outcome, ReplicaStore

PROTOCOL: Final = 1  # Hello.protocol spoken here
_FULL: Final = Outcome.FULL  # a global: Enum attributes cost a descriptor call (3.11)
MAX_BATCH_DELTAS: Final = 4096  # larger batches from a peer are BadMessage
MAX_PAGE_RECORDS: Final = 4096  # larger snapshot pages (asked or received) are BadMessage
MAX_SEEN: Final = 1024  # cursors in one Hello
# A resend or snapshot-request retry without progress doubles its wait, up
# to resend_after * 2**MAX_BACKOFF (RFC 6298 s5.5); progress resets it.
MAX_BACKOFF: Final = 5
# Seconds to wait for a snapshot page's reply before a round trip was measured.
INITIAL_PAGE_RTO: Final = 1.0


class State(StrEnum):
    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    SYNCING = "syncing"
    LIVE = "live"
    SUSPECT = "suspect"
    CLOSED = "closed"


class Event(StrEnum):
    START = "start"
    HELLO_CURRENT = "hello_current"
    HELLO_BEHIND = "hello_behind"
    RESYNC = "resync"
    SYNCED = "synced"
    SILENCE = "silence"
    RECOVERED = "recovered"
    RECOVERED_SYNCING = "recovered_syncing"
    DEAD = "dead"
    PEER_ERROR = "peer_error"
    CLOSE = "close"


_S, _E = State, Event
TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = {
    (_S.IDLE, _E.START): _S.HELLO_SENT,
    (_S.IDLE, _E.CLOSE): _S.CLOSED,
    (_S.HELLO_SENT, _E.HELLO_CURRENT): _S.LIVE,
    (_S.HELLO_SENT, _E.HELLO_BEHIND): _S.SYNCING,
    (_S.HELLO_SENT, _E.DEAD): _S.CLOSED,
    (_S.HELLO_SENT, _E.PEER_ERROR): _S.CLOSED,
    (_S.HELLO_SENT, _E.CLOSE): _S.CLOSED,
    (_S.SYNCING, _E.RESYNC): _S.SYNCING,
    (_S.SYNCING, _E.SYNCED): _S.LIVE,
    (_S.SYNCING, _E.SILENCE): _S.SUSPECT,
    (_S.SYNCING, _E.PEER_ERROR): _S.CLOSED,
    (_S.SYNCING, _E.CLOSE): _S.CLOSED,
    (_S.LIVE, _E.RESYNC): _S.SYNCING,
    (_S.LIVE, _E.SILENCE): _S.SUSPECT,
    (_S.LIVE, _E.PEER_ERROR): _S.CLOSED,
    (_S.LIVE, _E.CLOSE): _S.CLOSED,
    (_S.SUSPECT, _E.RESYNC): _S.SUSPECT,
    (_S.SUSPECT, _E.RECOVERED): _S.LIVE,
    (_S.SUSPECT, _E.RECOVERED_SYNCING): _S.SYNCING,
    (_S.SUSPECT, _E.DEAD): _S.CLOSED,
    (_S.SUSPECT, _E.PEER_ERROR): _S.CLOSED,
    (_S.SUSPECT, _E.CLOSE): _S.CLOSED,
}


def transition(state: State, event: Event) -> State:
    """The next state; :class:`Misuse` for a pair the table does not have."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise Misuse(f"illegal transition: {event.value} in state {state.value}") from None


@dataclass(frozen=True, slots=True)
class SessionConfig:
    # Shared by every node of one cluster; a Hello with another is refused.
    cluster_id: str
    # Deltas per batch: a batch is flushed as soon as this many are unsent.
    # (256 -> 1024: each gRPC message costs about 1 ms of the sender's loop
    # whatever its size; at 100k deltas/s small batches were the limit.)
    batch_max: int = 1024
    # Seconds after the oldest unsent delta was queued before a flush.
    batch_delay: float = 0.005
    # Batches sent at once, without batch_delay, while fewer than this many
    # are unacked (Nagle's rule allowed 1: at 1k deltas/s every delta sent
    # within a round trip of the previous one waited for its ack, so the
    # round trip's tail became the latency's).  Further deltas gather.
    eager_batches: int = 4
    # Batches received before their ack goes at once; an ack for fewer waits
    # up to ack_delay seconds (TCP's delayed ACK, RFC 9293 s3.8.6.3).  Each
    # gRPC message costs both loops more than the deltas in it: at 1k
    # deltas/s one ack per batch was half the messages of a stream.  Keep it
    # at most eager_batches, or the sender waits for the delayed acks.
    ack_every: int = 2
    ack_delay: float = 0.001
    # Seconds without sending anything before a heartbeat is sent.
    heartbeat_interval: float = 0.05
    # Seconds without hearing anything before the peer is reported SUSPECT.
    suspect_after: float = 0.15
    # Seconds without hearing anything before the session CLOSES.
    dead_after: float = 2.0
    # Seconds before unacked deltas / an unanswered snapshot request are resent.
    resend_after: float = 0.2
    # Records per snapshot page asked of the peer (512 -> 4096: fewer round
    # trips, during which the puller idles; a page is still < 0.5 MB).
    snapshot_page: int = 4096
    # Snapshot replies queued for sending; further requests are dropped
    # (counted) and the requester retries.
    max_pending_pages: int = 4
    # Seconds to wait before resyncing after the replica store refused a
    # record for lack of room (a snapshot right away would overflow again).
    full_resync_holdoff: float = 1.0
    # Deltas sent and not yet acked, at most (the send window).  Without it
    # every resend timeout re-sent the whole unacked outbox: on a real stream
    # a peer that had to drop them (pulling a snapshot after a restart) got a
    # backlog that delayed its snapshot pages past their retry, forever.
    # (2048 -> 16384: a window of two batches' worth capped throughput at
    # window / round trip, and the round trip includes the peer applying them.)
    max_in_flight: int = 16384

    def __post_init__(self) -> None:
        if not self.cluster_id or len(self.cluster_id) > 64:
            raise ConfigError("cluster_id must be 1..64 characters")
        if not 1 <= self.batch_max <= MAX_BATCH_DELTAS:
            raise ConfigError(f"batch_max must be 1..{MAX_BATCH_DELTAS}, not {self.batch_max}")
        if not 1 <= self.snapshot_page <= MAX_PAGE_RECORDS:
            raise ConfigError(f"snapshot_page must be 1..{MAX_PAGE_RECORDS}")
        if not 1 <= self.max_pending_pages <= 1024:
            raise ConfigError("max_pending_pages must be 1..1024")
        if not 1 <= self.max_in_flight <= 1 << 24:
            raise ConfigError(f"max_in_flight must be 1..16777216, not {self.max_in_flight}")
        if not 0 <= self.batch_delay <= 1:
            raise ConfigError(f"batch_delay must be 0..1 s, not {self.batch_delay}")
        if not 1 <= self.eager_batches <= 1024:
            raise ConfigError(f"eager_batches must be 1..1024, not {self.eager_batches}")
        if not 1 <= self.ack_every <= 1024 or not 0 <= self.ack_delay <= 0.1:
            raise ConfigError("ack_every must be 1..1024, ack_delay 0..0.1 s")
        if not 0 < self.heartbeat_interval < self.suspect_after < self.dead_after <= 3600:
            raise ConfigError("need 0 < heartbeat_interval < suspect_after < dead_after <= 3600")
        if not 0 < self.resend_after <= 60 or not 0 <= self.full_resync_holdoff <= 3600:
            raise ConfigError("resend_after must be in (0, 60], full_resync_holdoff in [0, 3600]")


def records_field(records: Iterable[FlowRecord], tag: bytes = b"\x32") -> bytes:
    """``records`` as a repeated FlowRecord field (SnapshotChunk.records is field 6).

    A snapshot page is 4096 of them: the common case (cached wire form
    shorter than 128 bytes: a one-byte length) is built inline, without two
    function calls per record.
    """
    out: list[bytes] = []
    append = out.append
    lengths = _ONE_BYTE_LENGTHS
    for r in records:
        wire = r.wire or record_wire(r)
        if len(wire) < 128:
            append(tag + lengths[len(wire)] + wire)
        else:
            append(field_bytes(tag, wire))
    return b"".join(out)


_ONE_BYTE_LENGTHS: Final = tuple(bytes((n,)) for n in range(128))


# --- the local origin's stream ---------------------------------------------------------


class Sequencer:
    """Numbers the local origin's deltas: 1, 2, 3 ... per (origin, epoch)."""

    def __init__(self, origin: str, epoch: int) -> None:
        if not check_node_id(origin) or not 1 <= epoch <= MAX_U63:
            raise Misuse(f"bad origin {origin!r} or epoch {epoch!r}")
        self.origin = origin
        self.epoch = epoch
        self.last_seq = 0

    def delta(self, op: Op, record: FlowRecord, created: float = 0.0) -> Delta:
        """The next delta; ``created`` is the wall clock when the change was taken."""
        if record.origin != self.origin:
            raise Misuse(f"delta of {self.origin} for a record of {record.origin!r}")
        self.last_seq += 1
        return trusted_delta(op, self.origin, self.last_seq, record, created)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    held: int  # deltas held (unacked)
    capacity: int
    last_seq: int  # last delta pushed
    acked: int  # peer applied everything up to here
    lost_upto: int  # deltas up to here can no longer be sent (the peer needs a snapshot)
    pushed: int
    sent: int  # deltas handed out for sending, resends included
    resent: int
    overflow: int  # deltas dropped because the outbox was full


class Outbox:
    """The local origin's deltas for one peer, until that peer acks them.

    Bounded: pushing into a full outbox drops the oldest delta and raises
    ``lost_upto`` to its seq; the session then tells the peer to resync.
    Create it with ``last_seq`` = the sequencer's current seq: everything
    before is ``lost_upto`` for this peer (it gets a snapshot first anyway).
    """

    def __init__(self, origin: str, epoch: int, capacity: int, last_seq: int = 0) -> None:
        if not check_node_id(origin) or not 1 <= epoch <= MAX_U63:
            raise Misuse(f"bad origin {origin!r} or epoch {epoch!r}")
        if not 1 <= capacity <= 1 << 24 or not 0 <= last_seq <= MAX_U63:
            raise Misuse(f"bad outbox capacity {capacity} or last_seq {last_seq}")
        self.origin = origin
        self.epoch = epoch
        self.capacity = capacity
        self.last_seq = last_seq
        self.acked = 0
        self.lost_upto = last_seq
        self.next_send = last_seq + 1
        self._entries: deque[tuple[Delta, float]] = deque()  # seqs lost_upto/acked+1 .. last
        self._sent_upto = last_seq
        self._counts = {"pushed": 0, "sent": 0, "resent": 0, "overflow": 0}

    def push(self, delta: Delta, now: float) -> None:
        if delta.origin != self.origin or delta.seq != self.last_seq + 1:
            raise Misuse(f"outbox of {self.origin} expects seq {self.last_seq + 1}, got {delta}")
        if len(self._entries) >= self.capacity:
            self.lost_upto = self._entries.popleft()[0].seq
            self.next_send = max(self.next_send, self.lost_upto + 1)
            self._counts["overflow"] += 1
        self._entries.append((delta, now))
        self.last_seq = delta.seq
        self._counts["pushed"] += 1

    def ack(self, seq: int) -> bool:
        """The peer applied everything up to ``seq``; True if that is news."""
        if seq <= self.acked:
            return False
        if seq > self.last_seq:
            raise Misuse(f"ack {seq} beyond last seq {self.last_seq}")
        self.acked = seq
        while self._entries and self._entries[0][0].seq <= seq:
            self._entries.popleft()
        self.next_send = max(self.next_send, seq + 1)
        return True

    def rewind(self, seq: int) -> None:
        """Send again from ``seq`` (or the oldest delta still held, if later)."""
        self.next_send = max(seq, self.acked + 1, self.lost_upto + 1)

    @property
    def needs_snapshot(self) -> bool:
        """The peer has not applied deltas this outbox no longer holds."""
        return self.acked < self.lost_upto

    @property
    def unsent(self) -> int:
        return max(0, self.last_seq - self.next_send + 1)

    @property
    def sent_unacked(self) -> int:
        """Deltas handed out for sending, still held and not acked (the window in use)."""
        return max(0, self.next_send - 1 - max(self.acked, self.lost_upto))

    @property
    def in_flight(self) -> bool:
        """Some delta was sent and not acked yet."""
        return self.next_send - 1 > self.acked and bool(self._entries)

    def oldest_unsent_at(self) -> float | None:
        if not self.unsent:
            return None
        return self._entries[self.next_send - self._entries[0][0].seq][1]

    def take(self, limit: int) -> list[Delta]:
        """Up to ``limit`` deltas from ``next_send`` on, marking them sent."""
        if not self.unsent:
            return []
        start = self.next_send - self._entries[0][0].seq
        out = [delta for delta, _ in islice(self._entries, start, start + limit)]
        self.next_send += len(out)
        self._counts["sent"] += len(out)
        self._counts["resent"] += max(0, min(self._sent_upto, self.next_send - 1) - out[0].seq + 1)
        self._sent_upto = max(self._sent_upto, self.next_send - 1)
        return out

    def statistics(self) -> OutboxStats:
        return OutboxStats(
            held=len(self._entries),
            capacity=self.capacity,
            last_seq=self.last_seq,
            acked=self.acked,
            lost_upto=self.lost_upto,
            **self._counts,
        )


# --- the peer origin's stream ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboxStats:
    origin: str
    epoch: int  # the origin's incarnation applied here (0: none yet)
    applied: int  # last seq applied or covered by a snapshot
    pulling: bool  # a snapshot of the origin is needed or in progress
    deltas_applied: int
    duplicates: int  # deltas received again (resends), ignored
    out_of_order: int  # deltas after a hole, dropped until the hole is filled
    deferred: int  # deltas dropped while waiting for a snapshot's first page
    snapshots_started: int
    snapshots_completed: int
    pages: int  # snapshot pages applied


class Inbox:
    """How far one peer origin's stream is applied here, and its snapshot pull."""

    def __init__(self, origin: str) -> None:
        if not check_node_id(origin):
            raise Misuse(f"bad origin {origin!r}")
        self.origin = origin
        self.epoch = 0
        self.applied = 0
        self.pulling = False
        self.cursor = b""  # page to ask for next; b"" = (re)start the snapshot
        # Page order of the pull (syncd.keyindex): asked for ORDER_BUCKET, set
        # by the first page (an older peer answers in ORDER_KEY).
        self.order = ORDER_BUCKET
        self.base: int | None = None  # first page's base_seq (None: not received yet)
        self.required = 0  # the snapshot's base must reach this seq
        self.request_id = 0  # id of the latest request
        # First request id of the pull attempt in progress: replies to earlier
        # ids (a pull since restarted) are ignored.  Within an attempt, a
        # reply for the current cursor is taken whichever retry it answers.
        self.attempt_from = 1
        self.deferred = False  # deltas were dropped while waiting for the base
        self._counts = dict.fromkeys(
            ("deltas_applied", "duplicates", "out_of_order", "deferred", "snapshots_started",
             "snapshots_completed", "pages"),
            0,
        )  # fmt: skip

    def reset_epoch(self, epoch: int) -> None:
        """The origin restarted: its numbering starts over and needs a snapshot."""
        self.epoch = epoch
        self.applied = 0
        self.pulling = False
        self.start_pull(0)

    def start_pull(self, required: int) -> None:
        """Need a snapshot whose base reaches ``required``; restarts any pull."""
        self.required = max(self.required, required) if self.pulling else required
        self.pulling = True
        self.cursor = b""
        self.order = ORDER_BUCKET
        self.base = None
        self.attempt_from = self.request_id + 1

    def accept(self, deltas: list[Delta]) -> tuple[list[Delta], bool]:
        """The deltas to apply now (in order) and whether a hole was found.

        Until a snapshot's first page gives its base, deltas are dropped
        (``deferred``): those at or below the base are in the snapshot, and
        applying them would wrongly confirm their keys to the sweep; those
        above it are still in the sender's outbox and are resent.
        """
        if self.pulling and self.base is None:
            self._counts["deferred"] += len(deltas)
            self.deferred = True
            return [], False
        fresh: list[Delta] = []
        gap = False
        for index, delta in enumerate(deltas):
            if delta.seq <= self.applied:
                self._counts["duplicates"] += 1
            elif delta.seq == self.applied + 1:
                self.applied += 1
                fresh.append(delta)
            else:
                self._counts["out_of_order"] += len(deltas) - index
                gap = True
                break
        self._counts["deltas_applied"] += len(fresh)
        return fresh, gap

    def first_page(self, base: int) -> bool:
        """Take the snapshot's base; False if it is too old (restart the pull)."""
        if base < self.required:
            return False
        self.base = base
        self.applied = max(self.applied, base)
        return True

    def page_done(self, next_cursor: bytes, last: bool) -> None:
        self._counts["pages"] += 1
        if last:
            self.pulling = False
            self.cursor = b""
            self.required = 0
            self._counts["snapshots_completed"] += 1
        else:
            self.cursor = next_cursor

    def next_request_id(self) -> int:
        if not self.cursor:
            self._counts["snapshots_started"] += 1
        self.request_id += 1
        return self.request_id

    def statistics(self) -> InboxStats:
        return InboxStats(self.origin, self.epoch, self.applied, self.pulling, **self._counts)


# --- the session ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: State
    new: State
    event: Event


@dataclass(frozen=True, slots=True)
class ReplicaChanged:
    changes: tuple[Change, ...]  # to forward to the filter process
    # The origin's `created` stamps (wall clock) of the deltas applied, where
    # known: the adapter turns them into the sync lag metric.
    created: tuple[float, ...] = ()


Action = StateChanged | ReplicaChanged


@dataclass(frozen=True, slots=True)
class SessionStats:
    peer: str
    state: State
    messages_received: int
    messages_sent: int
    batches_sent: int
    batches_received: int
    heartbeats_sent: int
    acks_sent: int
    gap_acks_sent: int
    retransmits: int  # resend timer expiries that rewound the outbox
    resync_notices_sent: int
    pages_served: int
    pages_refused: int  # snapshot requests dropped: too many replies queued
    early_dropped: int  # messages before the peer's Hello
    stale_dropped: int  # replies to old snapshot requests
    pages_discarded: int  # pages received, not applied: the pull was restarted or closed first
    page_rtt_samples: int  # snapshot page round trips measured (they set the retry timer)
    after_close_dropped: int
    store_full: int  # records the replica store refused (leads to a resync)
    suspicions: int
    stalls: int  # timer calls more than suspect_after after our previous call (not silence)


class PeerSession:
    """The Exchange stream with one peer; see the module docstring."""

    def __init__(
        self, config: SessionConfig, outbox: Outbox, inbox: Inbox, store: ReplicaStore
    ) -> None:
        if outbox.origin == inbox.origin:
            raise Misuse("a session joins two different nodes")
        self.config = config
        self.local = outbox.origin
        self.peer = inbox.origin
        self._outbox = outbox
        self._inbox = inbox
        self._store = store
        self._state = State.IDLE
        self._peer_epoch = 0  # 0 until the peer's Hello
        self._control: deque[pb.Envelope] = deque()  # hello, requests, pages
        self._ack_due = False
        self._gap_ack = False
        self._unacked_batches = 0  # batches received since our last ack
        self._ack_at: float | None = None  # a delayed ack is due then
        self._notified_upto = 0  # highest lost_upto told to the peer
        self._notice_due = False
        self._rewound_for = -1  # ack seq a gap ack already rewound to
        self._flights: deque[int] = deque()  # last seq of each batch sent and not acked
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._now = 0.0  # latest time seen, returned by next_deadline when work is queued
        self._rto_at: float | None = None
        self._request_at: float | None = None  # when the pending snapshot request was sent
        self._request_wait = config.resend_after  # before retrying it (backs off)
        self._request_retried = False  # the pending request is a retry (Karn: no RTT sample)
        # Page round trip estimate (RFC 6298 SRTT/RTTVAR), None before a sample.
        self._page_srtt: float | None = None
        self._page_rttvar = 0.0
        self._rto_wait = config.resend_after  # before resending unacked deltas (backs off)
        # When our Hello was last sent, until the peer shows it has it.
        self._hello_at: float | None = None
        self._full_resync_at: float | None = None
        self._heartbeats = 0
        # A snapshot page whose successor was requested, not yet applied:
        # apply_pending() (or any other input first) checks and applies it.
        # The first page is checked on arrival (records); a middle page
        # after its successor's request went out (the message).
        self._pending: list[FlowRecord] | pb.SnapshotChunk | None = None
        fields = SessionStats.__dataclass_fields__
        self._counts = dict.fromkeys((f for f in fields if f not in ("peer", "state")), 0)

    # --- inputs --------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def start(self, now: float) -> list[Action]:
        """Open the session: queue our Hello."""
        actions: list[Action] = []
        self._fire(Event.START, actions)
        self._outbox.rewind(0)  # resend point is decided by the peer's Hello
        self._last_heard = self._last_sent = self._now = now
        self._send_hello(now)
        return actions

    @property
    def page_pending(self) -> bool:
        """A snapshot page waits for :meth:`apply_pending` (send first, then check and apply)."""
        return self._pending is not None

    def apply_pending(self, now: float) -> list[Action]:
        """Check and apply the snapshot page whose successor was requested (no-op if none).

        Raises :class:`PeerError` after moving to CLOSED if that page is bad
        (nothing of it applied), as :meth:`receive` does for a bad message.
        """
        actions: list[Action] = []
        try:
            self._apply_pending(now, actions)
        except PeerError:
            self._fire(Event.PEER_ERROR, actions)
            raise
        return actions

    def close(self, now: float) -> list[Action]:
        """Local close or the stream ended; idempotent."""
        actions: list[Action] = []
        try:
            self._apply_pending(now, actions)  # valid records: the pull resumes after them
        except PeerError:
            self._counts["pages_discarded"] += 1  # not applied; the pull resumes before it
        if self._state is not State.CLOSED:
            self._now = max(self._now, now)
            self._fire(Event.CLOSE, actions)
        return actions

    def request_resync(self, now: float) -> list[Action]:
        """Pull a fresh snapshot of the peer's flows (e.g. anti-entropy mismatch)."""
        actions: list[Action] = []
        if self._pending is not None:  # of the pull being replaced: not checked, not needed
            self._pending = None
            self._counts["pages_discarded"] += 1
        self._now = max(self._now, now)
        self._inbox.start_pull(self._inbox.applied)
        if self._state in (State.LIVE, State.SYNCING, State.SUSPECT):
            self._fire(Event.RESYNC, actions)
            self._send_request(now)
        return actions  # before the Hello: the Hello exchange starts the pull

    def receive(self, msg: pb.Envelope, now: float) -> list[Action]:
        """Handle one envelope from the peer.

        Raises :class:`PeerError` (or its :class:`BadMessage`) after moving to
        CLOSED if the peer broke the protocol; nothing of that message is applied.
        """
        if self._state is State.IDLE:
            raise Misuse("receive() before start()")
        if self._state is State.CLOSED:
            self._counts["after_close_dropped"] += 1
            return []
        self._now = max(self._now, now)
        self._counts["messages_received"] += 1
        actions: list[Action] = []
        kind = msg.WhichOneof("body")
        try:
            self._apply_pending(now, actions)  # in order: that page before this message
            handler = self._HANDLERS.get(kind or "")
            if handler is None:
                raise BadMessage("empty-envelope", "envelope without a body")
            self._last_heard = now
            if kind not in ("hello", "heartbeat"):
                self._hello_at = None  # only sent by a peer that has our Hello
            if self._state is State.HELLO_SENT and kind not in ("hello", "heartbeat"):
                self._counts["early_dropped"] += 1
                return actions
            if self._state is State.SUSPECT:
                recovered = Event.RECOVERED_SYNCING if self._inbox.pulling else Event.RECOVERED
                self._fire(recovered, actions)
            handler(self, msg, now, actions)
        except PeerError:
            self._fire(Event.PEER_ERROR, actions)
            raise
        return actions

    def handle_timer(self, now: float) -> list[Action]:
        """Run what is due at ``now``: suspicion, resends, snapshot retries."""
        if self._state in (State.IDLE, State.CLOSED):
            return []
        away = now - self._now
        if away > self.config.suspect_after:
            # Nothing called us for that long (our loop stalled: a long
            # page, a full GC pass, a starved CPU): the peer's messages wait
            # in the transport, unread.  Time we were not listening is not
            # the peer's silence, or one stall would make us suspect it and
            # a stall of dead_after would end a healthy stream.
            self._last_heard += away
            self._counts["stalls"] += 1
        self._now = max(self._now, now)
        actions = self.apply_pending(now)  # raises PeerError if that page is bad
        # Compare as next_deadline() computes (t0 + delay), so float rounding
        # cannot leave a deadline that is due but never acted on.
        heard = self._last_heard
        if self._state in (State.LIVE, State.SYNCING) and now >= heard + self.config.suspect_after:
            self._counts["suspicions"] += 1
            self._fire(Event.SILENCE, actions)
        if (
            self._state in (State.HELLO_SENT, State.SUSPECT)
            and now >= heard + self.config.dead_after
        ):
            self._fire(Event.DEAD, actions)
            return actions
        if self._hello_at is not None and now >= self._hello_at + self.config.resend_after:
            self._send_hello(now)
        if self._rto_at is not None and now >= self._rto_at and self._peer_epoch:
            self._retransmit(now)
        if self._request_at is not None and now >= self._request_at + self._request_wait:
            self._send_request(now, retry=True)
        if self._full_resync_at is not None and now >= self._full_resync_at:
            self._full_resync_at = None
            if not self._inbox.pulling:
                actions += self.request_resync(now)
        return actions

    # --- outputs -------------------------------------------------------------------

    def messages_to_send(self, now: float) -> list[pb.Envelope]:
        """Everything to send now, in order.  Call after every input and timer."""
        if self._state in (State.IDLE, State.CLOSED):
            return []
        self._now = max(self._now, now)
        out = list(self._control)
        self._control.clear()
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_due = True
        if self._ack_due and self._peer_epoch:
            out.append(pb.Envelope(ack=self._ack()))
            self._unacked_batches = 0
            self._ack_at = None
        self._ack_due = self._gap_ack = False
        if self._peer_epoch:
            out += self._resync_notice()
            out += self._batches(now)
            if self._rto_at is None and self._awaiting_peer():
                self._rto_at = now + self._rto_wait
        if not out and now >= self._last_sent + self.config.heartbeat_interval:
            self._heartbeats += 1
            self._counts["heartbeats_sent"] += 1
            out.append(pb.Envelope(heartbeat=pb.Heartbeat(counter=self._heartbeats)))
        if out:
            self._last_sent = now
            self._counts["messages_sent"] += len(out)
        return out

    def next_deadline(self) -> float | None:
        """When ``handle_timer``/``messages_to_send`` next have work; None if never."""
        if self._state in (State.IDLE, State.CLOSED):
            return None
        if self._control or self._ack_due or self._notice_due or self._pending is not None:
            return self._now
        silence = (
            self.config.suspect_after
            if self._state in (State.LIVE, State.SYNCING)
            else self.config.dead_after
        )
        times = [self._last_heard + silence, self._last_sent + self.config.heartbeat_interval]
        oldest = self._outbox.oldest_unsent_at() if self._peer_epoch else None
        if oldest is not None and self._outbox.sent_unacked < self.config.max_in_flight:
            times.append(oldest if self._flush_now() else oldest + self.config.batch_delay)
        if self._request_at is not None:
            times.append(self._request_at + self._request_wait)
        if self._hello_at is not None:
            times.append(self._hello_at + self.config.resend_after)
        times += [t for t in (self._rto_at, self._full_resync_at, self._ack_at) if t is not None]
        return min(times)

    def statistics(self) -> SessionStats:
        return SessionStats(peer=self.peer, state=self._state, **self._counts)

    @property
    def messages_received(self) -> int:
        """Envelopes received from the peer (``statistics().messages_received``, in O(1)).

        The cluster agent reads it for every peer several times per tick, as
        a sign of life; a whole statistics snapshot each time was a quarter
        of an idle agent's work.
        """
        return self._counts["messages_received"]

    # --- internals: state ------------------------------------------------------------

    def _fire(self, event: Event, actions: list[Action]) -> None:
        old = self._state
        self._state = transition(old, event)
        if self._state is State.CLOSED:
            self._rto_at = self._request_at = self._full_resync_at = self._hello_at = None
            self._ack_at = None
            self._control.clear()
        if self._state is not old:
            actions.append(StateChanged(old, self._state, event))

    def _send_hello(self, now: float) -> None:
        """Queue our Hello; resent until the peer shows it has it (see receive)."""
        seen = pb.OriginCursor(origin=self.peer, epoch=self._inbox.epoch, seq=self._inbox.applied)
        hello = pb.Hello(
            protocol=PROTOCOL,
            node_id=self.local,
            cluster_id=self.config.cluster_id,
            epoch=self._outbox.epoch,
            seen=[seen],
        )
        self._control.append(pb.Envelope(hello=hello))
        self._hello_at = now

    def _ack(self) -> pb.Ack:
        if self._gap_ack:
            self._counts["gap_acks_sent"] += 1
        self._counts["acks_sent"] += 1
        return pb.Ack(
            origin=self.peer, epoch=self._peer_epoch, seq=self._inbox.applied, gap=self._gap_ack
        )

    def _check_peer_stream(self, origin: str, epoch: int, what: str) -> None:
        if origin != self.peer:
            raise PeerError("wrong-origin", f"{what} of origin {origin!r} from {self.peer}")
        if epoch != self._peer_epoch:
            raise PeerError("wrong-epoch", f"{what} of epoch {epoch}, peer is {self._peer_epoch}")

    def _check_own_stream(self, origin: str, epoch: int, what: str) -> None:
        if origin != self.local:
            raise PeerError("wrong-origin", f"{what} for origin {origin!r}, we are {self.local}")
        if epoch != self._outbox.epoch:
            raise PeerError(
                "wrong-epoch", f"{what} for epoch {epoch}, ours is {self._outbox.epoch}"
            )

    # --- internals: handlers (validate everything first, then act) ---------------------

    def _on_hello(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        hello = msg.hello
        if hello.protocol != PROTOCOL:
            raise PeerError("bad-protocol", f"protocol {hello.protocol}")
        if hello.cluster_id != self.config.cluster_id:
            raise PeerError("wrong-cluster", f"cluster {hello.cluster_id!r}")
        if hello.node_id != self.peer:
            raise PeerError("unexpected-node", f"expected {self.peer!r}, got {hello.node_id!r}")
        if not 1 <= hello.epoch <= MAX_U63:
            raise BadMessage("bad-hello", f"epoch {hello.epoch}")
        ours = self._our_cursor(hello)
        if self._state is not State.HELLO_SENT:
            if hello.epoch != self._peer_epoch:
                raise PeerError("epoch-changed", f"{self._peer_epoch} -> {hello.epoch}")
            self._ack_due = True  # a repeat means it has not seen our reply: send one
            return
        if hello.epoch < self._inbox.epoch:
            raise PeerError("epoch-regressed", f"{self._inbox.epoch} -> {hello.epoch}")
        self._peer_epoch = hello.epoch
        if hello.epoch > self._inbox.epoch:
            self._inbox.reset_epoch(hello.epoch)
        if ours is not None and ours.epoch == self._outbox.epoch:
            self._outbox.ack(ours.seq)
            self._outbox.rewind(ours.seq + 1)
            self._notice_due = self._outbox.needs_snapshot
        if self._inbox.pulling:
            self._fire(Event.HELLO_BEHIND, actions)
            if not self._store.sweeping(self.peer):
                self._inbox.start_pull(self._inbox.required)  # cannot resume: restart
            self._send_request(now)
        else:
            self._fire(Event.HELLO_CURRENT, actions)
        self._ack_due = True  # tells the peer where we are even before any delta

    def _our_cursor(self, hello: pb.Hello) -> pb.OriginCursor | None:
        if len(hello.seen) > MAX_SEEN:
            raise BadMessage("bad-hello", f"{len(hello.seen)} cursors")
        origins = [c.origin for c in hello.seen]
        if len(set(origins)) != len(origins) or not all(map(check_node_id, origins)):
            raise BadMessage("bad-hello", "cursor origins invalid or repeated")
        cursor: pb.OriginCursor
        for cursor in hello.seen:
            if cursor.origin == self.local:
                if cursor.epoch > self._outbox.epoch:
                    raise PeerError("future-epoch", f"peer saw our epoch {cursor.epoch}")
                if cursor.epoch == self._outbox.epoch and cursor.seq > self._outbox.last_seq:
                    raise PeerError("ack-beyond-sent", f"peer saw seq {cursor.seq}")
                return cursor
        return None

    def _on_batch(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        batch = msg.batch
        self._check_peer_stream(batch.origin, batch.epoch, "batch")
        # Records keep their received encoding (FlowRecord.wire) and are
        # forwarded as is: a peer's unknown fields stop here.
        batch.DiscardUnknownFields()
        if not 1 <= len(batch.deltas) <= MAX_BATCH_DELTAS:
            raise BadMessage("bad-batch", f"{len(batch.deltas)} deltas")
        deltas = deltas_from_pb(batch.deltas)
        first = deltas[0].seq
        for index, delta in enumerate(deltas):
            if delta.origin != self.peer:
                raise PeerError("wrong-origin", f"delta of {delta.origin!r} from {self.peer}")
            if delta.seq != first + index:
                raise BadMessage("bad-batch", "sequence numbers not consecutive")
        self._counts["batches_received"] += 1
        fresh, gap = self._inbox.accept(deltas)
        changes = [self._apply(d.op, d.record, now) for d in fresh]
        self._report(changes, actions, tuple([d.created for d in fresh if d.created]))
        self._unacked_batches += 1
        if gap or len(fresh) < len(deltas) or self._unacked_batches >= self.config.ack_every:
            self._ack_due = True  # a hole or a repeat: the sender needs to know at once
        elif self._ack_at is None:
            self._ack_at = now + self.config.ack_delay
        self._gap_ack = self._gap_ack or gap

    def _on_ack(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        ack = msg.ack
        self._check_own_stream(ack.origin, ack.epoch, "ack")
        if ack.seq > self._outbox.last_seq:
            raise PeerError("ack-beyond-sent", f"ack {ack.seq}, last sent {self._outbox.last_seq}")
        if self._outbox.ack(ack.seq):
            self._rewound_for = -1
            self._rto_wait = self.config.resend_after
            self._rto_at = now + self._rto_wait if self._awaiting_peer() else None
        if ack.gap and self._rewound_for != ack.seq:
            self._rewound_for = ack.seq  # one fast rewind per hole; the timer does the rest
            self._outbox.rewind(ack.seq + 1)
            self._notice_due = self._outbox.needs_snapshot

    def _on_heartbeat(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        pass  # hearing it is all that matters (done in receive)

    def _on_resync_required(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        notice = msg.resync_required
        self._check_peer_stream(notice.origin, notice.epoch, "resync notice")
        if not 1 <= notice.lost_upto <= MAX_U63:
            raise BadMessage("bad-resync", f"lost_upto {notice.lost_upto}")
        inbox = self._inbox
        self._ack_due = True  # whatever we do, tell the sender where we are
        if inbox.applied >= notice.lost_upto:
            return  # nothing we need was lost (a late or repeated notice)
        if inbox.pulling and inbox.base is None:
            inbox.required = max(inbox.required, notice.lost_upto)  # checked on the first page
            return
        if inbox.pulling and inbox.base is not None and inbox.base >= notice.lost_upto:
            return  # the snapshot in progress covers it
        inbox.start_pull(notice.lost_upto)
        self._fire(Event.RESYNC, actions)
        self._send_request(now)

    def _on_snapshot_request(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        req = msg.snapshot_request
        if req.origin != self.local:
            raise PeerError("wrong-origin", f"snapshot of {req.origin!r} asked of {self.local}")
        if (
            len(req.cursor) > MAX_CURSOR_LEN
            or req.max_records > MAX_PAGE_RECORDS
            or req.order not in ORDERS
        ):
            raise BadMessage("bad-snapshot-request", "cursor, page size or order out of range")
        if sum(1 for e in self._control if e.HasField("snapshot_chunk")) >= (
            self.config.max_pending_pages
        ):
            self._counts["pages_refused"] += 1
            return
        page = self._store.snapshot_page(
            self.local, bytes(req.cursor), req.max_records or self.config.snapshot_page, req.order
        )
        chunk = pb.SnapshotChunk(
            origin=self.local,
            epoch=self._outbox.epoch,
            request_id=req.request_id,
            base_seq=self._outbox.last_seq,
            cursor=req.cursor,
            next_cursor=page.next_cursor,
            last=page.last,
            order=req.order,
        )
        chunk.MergeFromString(records_field(page.records))
        self._counts["pages_served"] += 1
        self._control.append(pb.Envelope(snapshot_chunk=chunk))

    def _on_snapshot_chunk(self, msg: pb.Envelope, now: float, actions: list[Action]) -> None:
        chunk = msg.snapshot_chunk
        self._check_peer_stream(chunk.origin, chunk.epoch, "snapshot page")
        self._check_page_shape(chunk)
        inbox = self._inbox
        if (
            not inbox.pulling
            or not inbox.attempt_from <= chunk.request_id <= inbox.request_id
            or chunk.cursor != inbox.cursor
        ):
            self._check_page(chunk)  # a bad page is an error even when it comes late
            self._counts["stale_dropped"] += 1
            return
        if inbox.cursor and chunk.order != inbox.order:
            raise BadMessage("bad-snapshot-page", f"order {chunk.order} in a pull of {inbox.order}")
        self._page_rtt_sample(now)
        self._request_at = None
        self._ack_due = True
        if inbox.cursor and not chunk.last:
            # A middle page: ask for the next one first and check and apply
            # this one after (apply_pending), so the peer reads and sends it
            # while we work instead of both sides taking turns idling.  The
            # cursor advances only once this page has passed its checks; a
            # bad page closes the stream before anything of it is applied.
            self._send_request(now, cursor=bytes(chunk.next_cursor))
            self._pending = chunk
            return
        records = self._check_page(chunk)
        inbox.order = chunk.order
        if not inbox.cursor:
            if not inbox.first_page(chunk.base_seq):
                self._send_request(now)  # the snapshot began before the loss it must cover
                return
            # Deltas dropped while waiting are resent at once from base + 1.
            self._gap_ack, inbox.deferred = inbox.deferred, False
        inbox.page_done(bytes(chunk.next_cursor), chunk.last)
        if chunk.last:
            changes: list[Change | None] = [*self._apply_page(records, now)]
            changes += self._store.end_sweep(self.peer, now)
            self._fire(Event.SYNCED, actions)
            self._report(changes, actions)
        else:  # the first page: it gave the base; apply it after the next request
            self._send_request(now)
            self._pending = records

    def _apply_pending(self, now: float, actions: list[Action]) -> None:
        """Check (a middle page) and apply the page waiting since its successor was asked for."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if isinstance(pending, list):
            records = pending  # the first page, checked on arrival
        else:
            records = self._check_page(pending)
            if pending.order != self._inbox.order:
                raise BadMessage("bad-snapshot-page", "page order changed mid-pull")
            self._inbox.page_done(bytes(pending.next_cursor), False)
        self._report([*self._apply_page(records, now)], actions)

    @staticmethod
    def _check_page_shape(chunk: pb.SnapshotChunk) -> None:
        """The checks that need no record read (the rest: :meth:`_check_page`)."""
        if len(chunk.records) > MAX_PAGE_RECORDS or len(chunk.next_cursor) > MAX_CURSOR_LEN:
            raise BadMessage("bad-snapshot-page", "too many records or cursor too long")
        if not 0 <= chunk.base_seq <= MAX_U63:
            raise BadMessage("bad-snapshot-page", f"base_seq {chunk.base_seq}")
        if chunk.order not in ORDERS:
            raise BadMessage("bad-snapshot-page", f"order {chunk.order}")
        if not chunk.last and chunk.next_cursor <= chunk.cursor:
            raise BadMessage("bad-snapshot-page", "next_cursor does not advance")

    def _check_page(self, chunk: pb.SnapshotChunk) -> list[FlowRecord]:
        self._check_page_shape(chunk)
        chunk.DiscardUnknownFields()  # as in _on_batch
        records = records_from_pb(chunk.records)
        peer = self.peer
        for record in records:
            if record.origin != peer:
                raise PeerError("wrong-origin", f"snapshot record of {record.origin!r}")
        previous = check_order([r.key for r in records], chunk.cursor, chunk.order)
        if not chunk.last and (chunk.next_cursor < previous or chunk.next_cursor <= chunk.cursor):
            raise BadMessage("bad-snapshot-page", "next_cursor does not advance")
        return records

    _HANDLERS: ClassVar[
        Mapping[str, Callable[[PeerSession, pb.Envelope, float, list[Action]], None]]
    ]

    # --- internals: sending -------------------------------------------------------------

    def _apply(self, op: Op, record: FlowRecord, now: float) -> Change | None:
        outcome, change = self._store.apply(op, record, now)
        if outcome is _FULL:
            self._counts["store_full"] += 1
            if self._full_resync_at is None:
                self._full_resync_at = now + self.config.full_resync_holdoff
        return change

    def _apply_page(self, records: list[FlowRecord], now: float) -> list[Change]:
        changes, full = self._store.upsert_many(records, now)
        if full:
            self._counts["store_full"] += full
            if self._full_resync_at is None:
                self._full_resync_at = now + self.config.full_resync_holdoff
        return changes

    @staticmethod
    def _report(
        changes: list[Change | None], actions: list[Action], created: tuple[float, ...] = ()
    ) -> None:
        done = tuple(c for c in changes if c is not None)
        if done or created:
            actions.append(ReplicaChanged(done, created))

    def _send_request(self, now: float, retry: bool = False, cursor: bytes | None = None) -> None:
        """Queue the snapshot request for the inbox's cursor (a new id each time).

        A ``retry`` waits twice as long as the last one for its reply: a big
        first page (the sender sorts every key) must not be asked for again
        and again before its answer can arrive.
        """
        resend = self.config.resend_after
        self._request_wait = min(
            self._request_wait * 2 if retry else max(resend, self._page_rto()),
            resend * 2**MAX_BACKOFF,
        )
        self._request_retried = retry
        inbox = self._inbox
        if cursor is None:
            cursor = inbox.cursor
        if not cursor:
            inbox.base = None
            self._store.begin_sweep(self.peer)  # confirmations start counting from here
        request = pb.SnapshotRequest(
            origin=self.peer,
            cursor=cursor,
            request_id=inbox.next_request_id(),
            max_records=self.config.snapshot_page,
            order=inbox.order,
        )
        self._control.append(pb.Envelope(snapshot_request=request))
        self._request_at = now

    def _page_rtt_sample(self, now: float) -> None:
        """Time from a page's request to taking its reply, into the estimate (RFC 6298 s2).

        A reply is only taken once the page before it is applied here, so
        the estimate includes our own apply time: a retry timer shorter than
        that re-asked for every page of a large snapshot, the peer built and
        sent each page twice and we parsed each twice (the first reply was
        stale by then).  Karn's rule: a retried request gives no sample.
        """
        if self._request_at is None or self._request_retried:
            return
        sample = max(0.0, now - self._request_at)
        if self._page_srtt is None:
            self._page_srtt, self._page_rttvar = sample, sample / 2
        else:
            self._page_rttvar = 0.75 * self._page_rttvar + 0.25 * abs(self._page_srtt - sample)
            self._page_srtt = 0.875 * self._page_srtt + 0.125 * sample
        self._counts["page_rtt_samples"] += 1

    def _page_rto(self) -> float:
        """How long to wait for a page's reply before asking again (RFC 6298: SRTT + 4 RTTVAR).

        Before any sample, 1 s (RFC 6298 s2.1): the first page of a large
        snapshot makes the peer merge or sort every key first, and each retry
        of it made the peer do that again.  The stream is reliable, so a
        retry only helps when the peer refused the request (too many pages
        queued); waiting longer for the first reply costs nothing else.
        """
        if self._page_srtt is None:
            return INITIAL_PAGE_RTO
        return self._page_srtt + 4 * self._page_rttvar

    def _retransmit(self, now: float) -> None:
        self._counts["retransmits"] += 1
        self._outbox.rewind(self._outbox.acked + 1)
        self._notice_due = self._notice_due or self._outbox.needs_snapshot
        # No ack progress since the last resend: wait longer before the next.
        self._rto_wait = min(self._rto_wait * 2, self.config.resend_after * 2**MAX_BACKOFF)
        self._rto_at = now + self._rto_wait if self._awaiting_peer() else None

    def _awaiting_peer(self) -> bool:
        """Something sent needs the peer's ack: unacked deltas or a resync notice."""
        return self._outbox.in_flight or self._outbox.needs_snapshot

    def _resync_notice(self) -> list[pb.Envelope]:
        outbox = self._outbox
        if outbox.lost_upto > self._notified_upto and outbox.needs_snapshot:
            self._notice_due = True  # the outbox overflowed since the last notice
        if not self._notice_due or not outbox.needs_snapshot:
            self._notice_due = False
            return []
        self._notice_due = False
        self._notified_upto = outbox.lost_upto
        self._counts["resync_notices_sent"] += 1
        notice = pb.ResyncRequired(
            origin=self.local, epoch=outbox.epoch, lost_upto=outbox.lost_upto
        )
        return [pb.Envelope(resync_required=notice)]

    def _flush_now(self) -> bool:
        """Send unsent deltas without waiting for batch_delay?

        When a batch is full, or when fewer than ``eager_batches`` batches
        are in flight (Nagle's rule, RFC 896, with a few small segments
        allowed): a quiet link sends a lone delta at once, a busy one gathers
        deltas while it waits for acks.  Waiting the full delay on an idle
        link made a delta's median latency 1.5 ms, two thirds of it this wait;
        waiting for the one batch in flight made the ack's tail the delta's.
        """
        outbox = self._outbox
        if outbox.unsent >= self.config.batch_max:
            return True
        flights = self._flights
        done = max(outbox.acked, outbox.lost_upto)
        while flights and flights[0] <= done:
            flights.popleft()  # acked (or lost: a snapshot covers it)
        while flights and flights[-1] >= outbox.next_send:
            flights.pop()  # rewound: it will be sent again
        return len(flights) < self.config.eager_batches

    def _batches(self, now: float) -> list[pb.Envelope]:
        outbox = self._outbox
        oldest = outbox.oldest_unsent_at()
        if oldest is None:
            return []
        if not self._flush_now() and now < oldest + self.config.batch_delay:
            return []
        out = []
        room = self.config.max_in_flight - outbox.sent_unacked  # acks reopen the window
        # Assembled from each delta's cached wire form (built once for every
        # peer, see syncd.records): Batch = origin (1), epoch (2), deltas (3).
        head = field_bytes(b"\x0a", self.local.encode()) + b"\x10" + varint(outbox.epoch)
        while room > 0 and (deltas := outbox.take(min(self.config.batch_max, room))):
            room -= len(deltas)
            batch = head + b"".join([field_bytes(b"\x1a", delta_wire(d)) for d in deltas])
            out.append(pb.Envelope.FromString(field_bytes(b"\x12", batch)))  # Envelope.batch
            self._flights.append(deltas[-1].seq)
        self._counts["batches_sent"] += len(out)
        return out


PeerSession._HANDLERS = {
    "hello": PeerSession._on_hello,
    "batch": PeerSession._on_batch,
    "ack": PeerSession._on_ack,
    "heartbeat": PeerSession._on_heartbeat,
    "resync_required": PeerSession._on_resync_required,
    "snapshot_request": PeerSession._on_snapshot_request,
    "snapshot_chunk": PeerSession._on_snapshot_chunk,
}
