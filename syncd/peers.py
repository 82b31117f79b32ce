"""Drives the pure sync core on asyncio: one :class:`PeerLink` per peer.

:class:`LocalOrigin` is this node's own stream: it stamps each change the
filter reports with a fresh version, applies it to the store and numbers it
(the caller then pushes the delta into every peer's outbox, in the same step).

:class:`PeerLink` holds what outlives a stream with one peer (its
:class:`~syncd.session.Outbox` and :class:`~syncd.session.Inbox`) and runs
one :class:`~syncd.session.PeerSession` per stream over a :class:`Transport`
(the gRPC client call or server context, see ``client.py``/``service.py``),
as ``tests/syncd_link.py`` does in simulated time:

* a reader task feeds every envelope to ``receive(msg, now)``;
* a pump task runs ``handle_timer`` when ``next_deadline()`` is reached and
  writes what ``messages_to_send`` returns; it sleeps until that deadline or
  until woken (an envelope arrived, a local delta was pushed);
* the stream ends when the peer closes it, the session raises
  :class:`PeerError` (nothing of that message applied), the session CLOSES on
  silence, a write stalls for ``dead_after``, a newer stream for the same peer
  arrives (the newest wins: a restarted peer need not wait for its old stream
  to time out), or :meth:`PeerLink.stop` is called.  The caller turns the
  :class:`StreamEnd` into a gRPC status and reconnects.

``now`` is ``time.monotonic()`` (injectable for tests).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Final, Protocol

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import Misuse, PeerError
from syncd.records import Delta, FlowRecord, Op, VersionClock, with_version
from syncd.replica import Change, ChangeKind, Outcome, ReplicaStore
from syncd.session import (
    Action,
    Event,
    Inbox,
    InboxStats,
    Outbox,
    OutboxStats,
    PeerSession,
    ReplicaChanged,
    Sequencer,
    SessionConfig,
    SessionStats,
    State,
    StateChanged,
)

log = logging.getLogger("syncd.peers")

# A pass that leaves the session's deadline already due (nothing more it
# will do now) sleeps this long rather than spin.
MIN_SLEEP: Final = 0.001
Clock = Callable[[], float]
ChangeSink = Callable[[tuple[Change, ...]], None]


# --- this node's own stream ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginStats:
    epoch: int
    last_seq: int  # last delta numbered in this epoch
    version: int  # last version issued or observed
    changes: int  # local changes applied and numbered
    recovered: int  # own records pulled back from peers at start
    refused_full: int  # local changes refused: the store was full
    delete_not_owned: int  # local DELETEs of flows another node owns, ignored


class LocalOrigin:
    """Versions and numbers this node's changes; see the module docstring."""

    def __init__(
        self, node_id: str, epoch: int, store: ReplicaStore, wall: Clock = time.time
    ) -> None:
        self.node_id = node_id
        # Stamps each delta's `created` (the sync lag metric), never ordering.
        self._wall = wall
        self.epoch = epoch
        self.store = store
        self.sequencer = Sequencer(node_id, epoch)
        # Floored at epoch << 32: a restarted node never reuses a version.
        self.clock = VersionClock(epoch << 32)
        self._counts = Counter[str]()

    @property
    def last_seq(self) -> int:
        return self.sequencer.last_seq

    def change(self, op: Op, record: FlowRecord, now: float) -> Delta | None:
        """Apply one change the filter reported; the delta to send, or None if refused.

        The filter's version is only a lower bound: the delta gets a version
        above everything this node has seen for the key (held record,
        tombstone), so its own store and every replica accept it.
        """
        if record.origin != self.node_id:
            raise Misuse(f"local change of origin {record.origin!r} at {self.node_id}")
        held = self.store.get(record.key)
        if op is _DELETE and held is not None and held.record.origin != self.node_id:
            self._counts["delete_not_owned"] += 1  # taken over: not ours to delete
            return None
        self.clock.observe(record.version)
        if held is not None:
            self.clock.observe(held.record.version)
        tomb = self.store.tombstone(record.key)
        if tomb is not None:
            self.clock.observe(tomb[0])
        stamped = with_version(record, self.clock.next())
        outcome, _ = self.store.apply(op, stamped, now)
        if outcome is _FULL:
            self._counts["refused_full"] += 1
            return None
        self._counts["changes"] += 1
        return self.sequencer.delta(op, stamped, self._wall())

    def recover(self, record: FlowRecord, now: float) -> None:
        """One of our own records from before a restart, as a peer held it."""
        self.clock.observe(record.version)
        outcome, _ = self.store.apply(Op.UPDATE, record, now)
        if outcome is Outcome.APPLIED:
            self._counts["recovered"] += 1

    def observe(self, changes: Iterable[Change]) -> None:
        """Replica changes applied from peers: their versions are seen here."""
        upsert = _UPSERT
        top = max((c.record.version for c in changes if c.kind is upsert), default=0)
        if top:
            self.clock.observe(top)

    def statistics(self) -> OriginStats:
        return OriginStats(
            epoch=self.epoch,
            last_seq=self.sequencer.last_seq,
            version=self.clock.last,
            changes=self._counts["changes"],
            recovered=self._counts["recovered"],
            refused_full=self._counts["refused_full"],
            delete_not_owned=self._counts["delete_not_owned"],
        )


# Enum members as plain globals (an attribute of an Enum class is a descriptor
# call in Python 3.11, 137 ns; these are read once or more per delta).
_DELETE: Final = Op.DELETE
_FULL: Final = Outcome.FULL
_UPSERT: Final = ChangeKind.UPSERT


# --- sync lag ------------------------------------------------------------------------

# Upper bounds (seconds) of the sync lag histogram's buckets; the last is +Inf.
LAG_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                      5.0, 10.0)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LagStats:
    bounds: tuple[float, ...]  # bucket upper bounds, seconds (+Inf implied after the last)
    counts: tuple[int, ...]  # deltas per bucket (not cumulative), len(bounds) + 1
    total: int  # deltas observed
    sum_seconds: float
    skewed: int  # deltas stamped in our future (clock skew): counted as 0 s


class LagHistogram:
    """Create at the origin -> applied here, per delta (wall clocks: needs synced clocks)."""

    def __init__(self, bounds: tuple[float, ...] = LAG_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._skewed = 0

    def observe_since(self, created: Iterable[float], now: float) -> None:
        bounds, counts = self._bounds, self._counts
        for stamp in created:
            lag = now - stamp
            if lag < 0:
                self._skewed += 1
                lag = 0.0
            counts[bisect.bisect_left(bounds, lag)] += 1
            self._sum += lag

    def statistics(self) -> LagStats:
        counts = tuple(self._counts)
        return LagStats(self._bounds, counts, sum(counts), self._sum, self._skewed)


# --- one peer ------------------------------------------------------------------------


class Transport(Protocol):
    """One Exchange stream as the link sees it (library errors already translated)."""

    async def read(self) -> pb.Envelope | None:
        """The next envelope; None when the stream ended or broke (see ``ended_by``)."""
        ...

    async def write(self, envelope: pb.Envelope) -> bool:
        """Send one envelope; False if the stream is gone."""
        ...

    @property
    def ended_by(self) -> str:
        """Why reading or writing stopped (status and details), for logs and counters."""
        ...


class EndReason(StrEnum):
    PEER_CLOSED = "peer-closed"  # ended or broke on the other side
    PEER_ERROR = "peer-error"  # the peer broke the protocol (PeerError/BadMessage)
    DEAD = "dead"  # the session closed: nothing heard for dead_after
    WRITE_STALLED = "write-stalled"  # a write did not complete within dead_after
    REPLACED = "replaced"  # a newer stream for the same peer took over
    STOPPED = "stopped"  # local shutdown, or the peer left the membership


@dataclass(frozen=True, slots=True)
class StreamEnd:
    reason: EndReason
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PeerStats:
    peer: str
    state: str  # session state of the current stream, or "disconnected"
    streams: int  # streams run (both directions of dialing)
    stream_ends: Mapping[str, int]  # by EndReason
    peer_errors: Mapping[str, int]  # by PeerError.reason
    last_error: str
    outbox: OutboxStats
    inbox: InboxStats
    session: Mapping[str, int]  # SessionStats counters summed over every stream
    resyncs: int  # snapshot pulls of this peer started (SYNCING entered)
    resyncing: bool
    resync_pages: int  # pages applied by the pull in progress
    last_resync_seconds: float | None  # duration of the last completed pull
    changes_forwarded: int  # replica changes handed on (to the filter)
    lag: LagStats  # create at the peer -> applied here, per delta
    timer_spins: int  # passes that found their deadline still due (slept MIN_SLEEP)


class Wake:
    """An :class:`asyncio.Event` for one waiter whose timed wait creates no task.

    The pump waits on it after every pass, for each delta at low rates:
    ``asyncio.wait_for(event.wait(), delay)`` wraps the wait in a new task
    each time (Python 3.11), a few scheduling rounds of the loop that every
    delta paid for.  Here a wait is one future and one timer handle.
    """

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float | None = None) -> None:
        """Until :meth:`set` (at once if it is set) or ``timeout`` seconds passed."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Stream:
    """Book-keeping of one running stream."""

    def __init__(self, session: PeerSession) -> None:
        self.session = session
        self.wake = Wake()
        self.done = asyncio.Event()
        self.end: StreamEnd | None = None

    def finish(self, end: StreamEnd) -> None:
        if self.end is None:  # the first reason wins
            self.end = end
        self.done.set()
        self.wake.set()


_COUNTED: Final = tuple(f.name for f in fields(SessionStats) if f.name not in ("peer", "state"))


class PeerLink:
    """Everything about one peer; :meth:`run` drives one stream at a time."""

    def __init__(
        self,
        peer: str,
        origin: LocalOrigin,
        config: SessionConfig,
        outbox_capacity: int,
        on_changes: ChangeSink,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        gc_pause: GcPause | None = None,
    ) -> None:
        self.peer = peer
        # Held while a stream of ours pulls a snapshot (SYNCING), if given.
        self._gc_pause = gc_pause
        self._gc_held = False
        self._wall = wall  # only for the sync lag (the origin stamps its wall clock)
        self.lag = LagHistogram()
        self.config = config
        self.store = origin.store
        # Everything numbered before this outbox existed is lost_upto for the
        # peer: it pulls a snapshot of us first anyway.
        self.outbox = Outbox(origin.node_id, origin.epoch, outbox_capacity, origin.last_seq)
        self.inbox = Inbox(peer)
        self._on_changes = on_changes
        self._clock = clock
        self._lock = asyncio.Lock()
        self._ticket = 0
        self._current: _Stream | None = None
        self._totals = Counter[str]()
        self._ends = Counter[str]()
        self._errors = Counter[str]()
        self._last_error = ""
        self._streams = 0
        self._resyncs = 0
        self._resync_since: float | None = None
        self._resync_pages0 = 0
        self._last_resync: float | None = None
        self._forwarded = 0
        self._spins = 0

    # --- inputs from the node ------------------------------------------------------

    def push(self, delta: Delta, now: float) -> None:
        """One of our deltas for this peer (the outbox bounds and numbers them)."""
        self.outbox.push(delta, now)
        if self._current is not None:
            self._current.wake.set()

    def request_resync(self) -> bool:
        """Pull a fresh snapshot of the peer's flows (anti-entropy found too much amiss).

        False if no stream runs (the next stream's Hello decides then).
        """
        current = self._current
        if current is None:
            return False
        now = self._clock()
        self._handle(current.session.request_resync(now), now)
        current.wake.set()
        return True

    def stop(self, detail: str = "") -> None:
        """End the current stream, if any (shutdown, or the peer left)."""
        if self._current is not None:
            self._current.finish(StreamEnd(EndReason.STOPPED, detail))

    @property
    def state(self) -> State | None:
        """The current stream's session state; None while no stream runs."""
        return self._current.session.state if self._current is not None else None

    # --- one stream ---------------------------------------------------------------

    async def run(self, transport: Transport, first: pb.Envelope | None = None) -> StreamEnd:
        """Run one stream until it ends; ``first`` is an envelope already read from it."""
        self._ticket += 1
        ticket = self._ticket
        if self._current is not None:
            self._current.finish(StreamEnd(EndReason.REPLACED, "a newer stream arrived"))
        async with self._lock:
            if ticket != self._ticket:  # an even newer stream is waiting behind us
                return self._ended(StreamEnd(EndReason.REPLACED, "a newer stream arrived"))
            session = PeerSession(self.config, self.outbox, self.inbox, self.store)
            stream = self._current = _Stream(session)
            self._streams += 1
            now = self._clock()
            self._handle(session.start(now), now)
            reader = asyncio.create_task(self._read_loop(stream, transport, first))
            pump = asyncio.create_task(self._pump_loop(stream, transport))
            try:
                await stream.done.wait()
            finally:
                stream.done.set()  # also when run() itself is cancelled
                reader.cancel()
                # A write cancelled half-way leaves gRPC's send operation
                # pending and the status sent next (context.abort) fails: let
                # the pump finish its write and stop; cancel it only if stuck.
                await asyncio.wait({pump}, timeout=self.config.dead_after)
                pump.cancel()
                for task in (reader, pump):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self._handle(session.close(self._clock()), self._clock())
                self._hold_gc(False)  # whatever the session said last
                self._totals.update(self._counters(session.statistics()))
                self._current = None
            assert stream.end is not None
            return self._ended(stream.end)

    def _ended(self, end: StreamEnd) -> StreamEnd:
        self._ends[end.reason.value] += 1
        return end

    async def _read_loop(
        self, stream: _Stream, transport: Transport, first: pb.Envelope | None
    ) -> None:
        if first is not None and not self._receive(stream, first):
            return
        while True:
            envelope = await transport.read()
            if envelope is None:
                stream.finish(StreamEnd(EndReason.PEER_CLOSED, transport.ended_by))
                return
            if not self._receive(stream, envelope):
                return
            await asyncio.sleep(0)  # a read may complete at once: let the pump run

    def _receive(self, stream: _Stream, envelope: pb.Envelope) -> bool:
        now = self._clock()
        try:
            actions = stream.session.receive(envelope, now)
        except PeerError as e:
            self._peer_error(stream, e)
            return False
        self._handle(actions, now)
        stream.wake.set()
        return True

    def _peer_error(self, stream: _Stream, error: PeerError) -> None:
        self._errors[error.reason] += 1
        self._last_error = str(error)
        stream.finish(StreamEnd(EndReason.PEER_ERROR, str(error)))

    async def _pump_loop(self, stream: _Stream, transport: Transport) -> None:
        session = stream.session
        while not stream.done.is_set():
            stream.wake.clear()  # wakes set from here on are kept for the wait below
            now = self._clock()
            if session.page_pending:
                # The next page's request goes out before this page is
                # checked and applied.
                envelopes = session.messages_to_send(now)
                if envelopes and not await self._write(stream, transport, envelopes):
                    return
                try:
                    self._handle(session.apply_pending(now), now)
                except PeerError as e:
                    self._peer_error(stream, e)
                    return
                # The next page may have arrived while this one was applied:
                # let the reader hand it over before timers are looked at.
                await asyncio.sleep(0)
                now = self._clock()
            due = session.next_deadline()
            if due is not None and due <= now:
                try:
                    self._handle(session.handle_timer(now), now)
                except PeerError as e:  # a page checked there (see apply_pending)
                    self._peer_error(stream, e)
                    return
            envelopes = session.messages_to_send(now)
            if envelopes and not await self._write(stream, transport, envelopes):
                return
            if session.state is State.CLOSED:
                stream.finish(StreamEnd(EndReason.DEAD, "nothing heard from the peer"))
                return
            if stream.wake.is_set():
                continue
            due = session.next_deadline()
            delay = None if due is None else due - self._clock()
            if delay is not None and delay <= 0:
                self._spins += 1
                delay = MIN_SLEEP
            await stream.wake.wait(delay)

    async def _write(
        self, stream: _Stream, transport: Transport, envelopes: list[pb.Envelope]
    ) -> bool:
        try:
            async with asyncio.timeout(self.config.dead_after):
                for envelope in envelopes:
                    if stream.done.is_set():
                        return False  # the stream is ending: write nothing more
                    if not await transport.write(envelope):
                        stream.finish(StreamEnd(EndReason.PEER_CLOSED, transport.ended_by))
                        return False
        except TimeoutError:
            stream.finish(StreamEnd(EndReason.WRITE_STALLED, f"{self.config.dead_after:g} s"))
            return False
        return True

    # --- actions and statistics ---------------------------------------------------------

    def _handle(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, ReplicaChanged):
                if action.created:
                    self.lag.observe_since(action.created, self._wall())
                if action.changes:
                    self._forwarded += len(action.changes)
                    self._on_changes(action.changes)
            elif isinstance(action, StateChanged):
                self._state_changed(action, now)

    def _hold_gc(self, hold: bool) -> None:
        if self._gc_pause is None or hold is self._gc_held:
            return
        self._gc_held = hold
        if hold:
            self._gc_pause.hold()
        else:
            self._gc_pause.release()

    def _state_changed(self, change: StateChanged, now: float) -> None:
        self._hold_gc(change.new is State.SYNCING)
        entering = change.new is State.SYNCING and change.old is not State.SUSPECT
        if entering and self._resync_since is None:
            self._resyncs += 1
            self._resync_since = now
            self._resync_pages0 = self.inbox.statistics().pages
        if change.event is Event.SYNCED and self._resync_since is not None:
            self._last_resync = now - self._resync_since
            self._resync_since = None
            log.info("%s: snapshot pulled in %.3f s", self.peer, self._last_resync)
        if change.new is State.CLOSED and self._resync_since is not None and not self.inbox.pulling:
            self._resync_since = None
        if change.new in (State.LIVE, State.SUSPECT) or change.event is Event.PEER_ERROR:
            log.info("%s: %s -> %s", self.peer, change.old.value, change.new.value)

    @staticmethod
    def _counters(stats: SessionStats) -> dict[str, int]:
        return {name: getattr(stats, name) for name in _COUNTED}

    @property
    def messages_received(self) -> int:
        """Envelopes received from the peer over every stream so far, in O(1)
        (the cluster agent's sign of life, read several times per tick)."""
        current = self._current
        now = current.session.messages_received if current is not None else 0
        return self._totals["messages_received"] + now

    def statistics(self) -> PeerStats:
        totals = Counter(self._totals)
        current = self._current
        if current is not None:
            totals.update(self._counters(current.session.statistics()))
        inbox = self.inbox.statistics()
        resyncing = self._resync_since is not None
        return PeerStats(
            peer=self.peer,
            state=current.session.state.value if current is not None else "disconnected",
            streams=self._streams,
            stream_ends=dict(self._ends),
            peer_errors=dict(self._errors),
            last_error=self._last_error,
            outbox=self.outbox.statistics(),
            inbox=inbox,
            session={name: totals[name] for name in _COUNTED},
            resyncs=self._resyncs,
            resyncing=resyncing,
            resync_pages=inbox.pages - self._resync_pages0 if resyncing else 0,
            last_resync_seconds=self._last_resync,
            changes_forwarded=self._forwarded,
            lag=self.lag.statistics(),
            timer_spins=self._spins,
        )


# --- process tuning ------------------------------------------------------------------

# Allocations between two young-generation collections (CPython's default is
# 700).  syncd allocates a few objects per delta and keeps most of them (the
# store), so the collector ran every ~150 deltas and its passes over the
# young and middle generations took a third of the per-delta cost (measured:
# sender 13.8 -> 9.3 us, receiver 11.8 -> 6.3 us per delta with 100k records).
# Cycles are rare here (asyncio internals, exception tracebacks): collecting
# them every 50k allocations bounds the garbage they hold all the same.
GC_YOUNG_THRESHOLD: Final = 50_000


# Seconds a thread may hold the GIL while another waits for it (CPython's
# default is 0.005).  grpc.aio completes reads and writes on its own threads,
# which must take the GIL to hand each completion to the event loop: with the
# loop busy, every completion waited up to the default 5 ms, and a delta's
# time from fwa's syncd to fwb's store at 10k deltas/s was 24 ms on average
# (up to 200 ms) instead of 1.9 ms (2 nodes, loopback, measured side by side).
SWITCH_INTERVAL: Final = 0.0005


class GcPause:
    """The cyclic garbage collector off while anyone holds it (snapshot pulls).

    A pull inserts records (two tracked objects each, no reference cycles)
    that all stay: every collector pass traversed them and freed nothing.
    A 1M-flow pull on this VM: 44 passes over 0.5 ms, 0.78 s of the
    puller's 5.8 CPU-s, one of them a full pass of 0.36 s with the loop
    stalled.  Reference counting still frees everything that is not in a
    cycle.  When the last hold ends, every object is frozen (``gc.freeze``:
    moved out of the collector's generations, never traversed again) before
    the collector is enabled: else its first pass traversed all that the
    pull allocated (0.33 s at 1M, measured).  The price: cycles made during
    the pull are never freed (a collection at the end of a 1M-flow pull
    found 251 unreachable objects).  Holds nest (several peers may be
    pulled at once); the collector is enabled again only if it was when
    first held.
    """

    def __init__(self) -> None:
        self._holders = 0
        self._restore = False
        self.pauses = 0  # times the collector was turned off

    @property
    def held(self) -> bool:
        return self._holders > 0

    def hold(self) -> None:
        self._holders += 1
        if self._holders == 1:
            self._restore = gc.isenabled()
            gc.disable()
            self.pauses += 1

    def release(self) -> None:
        if self._holders == 0:
            raise Misuse("GcPause released more often than held")
        self._holders -= 1
        if self._holders == 0:
            gc.freeze()
            if self._restore:
                gc.enable()


def tune_gc() -> None:
    """Process-wide knobs for syncd (call once, at start): GC thresholds, GIL switch interval."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    sys.setswitchinterval(SWITCH_INTERVAL)
