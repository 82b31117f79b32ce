"""The filter's end of the local link to syncd: flow changes out, replicas in.

Wiring (all on the daemon's event loop, next to the NFQUEUE adapter)::

    clock = VersionClock(floor=epoch << 32)       # syncd.records; epoch grows per restart
    link = SyncLink(node_id, socket_path, engine.table, clock, epoch=epoch,
                    now=node.clock, on_events=kernel_ct_and_flow_log)
    link.offer(decision.events)      # packet path: every engine / expire event, at once
    await link.start()               # returns at once; connects in the background
    await link.wait_synced()         # optional: the first table restore is done
    link.is_synced, link.connected, link.statistics()
    await link.stop()

``now`` must be the clock the engine gets (deadlines become seconds left
with it).  ``on_installed(key)`` is called for every record that installed
or updated a flow (the adapter releases packets held for that key, see
``node.hold``).  ``on_events`` receives the table events that applying syncd's
records produced (``ReplicaDeleted`` of removed replicas, evictions), so the
daemon can clear kernel fast-path marks and log them; they are not engine
events, so the NFQUEUE outbox never sees them.

The conversation follows the contract in ``syncd/local.py``; why each part:

* **Filtering never waits on sync.**  :meth:`offer` is synchronous and O(1)
  per event: it stamps the event's version into the table
  (:meth:`FlowTable.stamp`: version ordering and tombstones then cover this
  node's own flows) and appends to a bounded queue.  Protobuf work happens
  in the link's task, which yields to the loop between slices of ``slice``
  records.  No error of the link reaches the packet path: a syncd crash
  only stops replication.
* **Connection.**  A unix stream to ``socket_path``; LocalHello both ways
  (role ``filter``; syncd must answer with role ``syncd`` and the same node
  id).  Failures retry with doubling backoff, ``retry_min`` ..
  ``retry_max`` (reset after a session that lasted ``retry_max``).
* **Out.**  This node's changes in ``LocalBatch`` frames of up to
  ``batch_max`` deltas, sent at most ``batch_delay`` after the first one was
  queued.  A change on a link that sent nothing for ``batch_delay`` goes at
  once (Nagle's rule, as syncd's peer streams do): on an asymmetric path a
  peer holds the reply packet until this delta arrives, so waiting to fill
  a batch that will not fill is pure added delay.  ``ReplicaDeleted`` is
  never sent (no echo; see ``node.flow.replica``).  syncd re-versions what it receives; our version
  is a lower bound.
* **In.**  ``ReplicaBatch`` updates are installed / removed with version
  ordering (:func:`syncd.convert.apply_change`); every version seen feeds
  the clock, so this node's next change outranks it.  A record that fails
  validation is skipped and counted; the rest of the batch applies.
* **Reconcile rounds.**  Every session starts with one, and a queue
  overflow (events dropped, counted) schedules another.  A round marks every
  flow (:meth:`FlowTable.begin_sweep`), sends ``TableRequest`` and walks the
  ``TableChunk`` pages:

  - a peer's record is installed (a held replica is thereby confirmed);
  - a record of this node confirms the own flow when syncd has its current
    state; one for a flow this node does not hold is installed on the
    first round after start (the restore after a filter restart) unless
    this node deleted the flow since (its tombstone), and is answered with
    a DELETE otherwise (the flow ended while syncd was away, or the DELETE
    was lost);
  - after the page marked ``last``, replicas syncd no longer holds are
    removed (lost DELETEs) and every unconfirmed own flow is sent again as
    a CREATE at its version (syncd restarted, or changes were lost).

  ``is_synced`` turns True when the first round ends: the daemon may hold
  traffic until then; a standalone node just proceeds.
* **Bad input from syncd:** an undecodable or oversized frame, a missing
  or wrong Hello, or a frame syncd must not send closes the session
  (``bad_frames_total``, ``last_error``); the link reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from node.errors import BadInput, ConfigError
from node.flow.events import FlowCreated, FlowEvent
from node.flow.replica import ApplyOutcome, ReplicaDeleted
from node.flow.table import FlowTable
from syncd._pb.stockade.sync.v1 import local_pb2
from syncd.convert import (
    LocalChange,
    apply_change,
    change_from_event,
    change_from_pb,
    change_to_local_pb,
    record_from_snapshot,
)
from syncd.errors import BadMessage, PeerError
from syncd.framing import read_frame, write_frame
from syncd.records import MAX_U63, FlowRecord, Op, VersionClock, check_node_id, record_from_pb

__all__ = ["SyncLink", "SyncLinkConfig", "SyncLinkStats"]

log = logging.getLogger(__name__)

PROTOCOL: Final = 1  # LocalHello.protocol
ROLE: Final = "filter"
PEER_ROLE: Final = "syncd"
_MAX_BATCH: Final = 16384  # deltas per frame; IPv6 records of ~150 bytes stay far below 4 MiB

_APPLIED: Final = frozenset(
    {ApplyOutcome.INSTALLED, ApplyOutcome.UPDATED, ApplyOutcome.REMOVED, ApplyOutcome.TOMBSTONED}
)
_IGNORED: Final = frozenset({ApplyOutcome.DUPLICATE, ApplyOutcome.STALE, ApplyOutcome.BLOCKED})
_PRESENT: Final = frozenset({ApplyOutcome.INSTALLED, ApplyOutcome.UPDATED})

EventSink = Callable[[tuple[FlowEvent, ...]], None]
_Item = tuple[FlowEvent, int] | LocalChange  # an event with its version, or a ready change


@dataclass(frozen=True)
class SyncLinkConfig:
    queue_len: int = 65536  # changes waiting for syncd; beyond it: dropped, reconcile round
    batch_max: int = 512  # deltas per LocalBatch frame
    batch_delay: float = 0.001  # seconds from the first queued change to its frame
    retry_min: float = 0.05  # first reconnect delay, seconds
    retry_max: float = 2.0  # reconnect delay cap; a session this long resets the delay
    hello_timeout: float = 2.0  # seconds to connect and get syncd's Hello
    slice: int = 512  # records handled before yielding to packets

    def __post_init__(self) -> None:
        for name, top in (("queue_len", 1 << 24), ("batch_max", _MAX_BATCH), ("slice", 1 << 20)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ConfigError(f"sync link {name}: {value!r} not in 1..{top}")
        for name in ("batch_delay", "retry_min", "retry_max", "hello_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"sync link {name}: {value!r} is not a number")
            if not 0 <= value <= 3600 or (name != "batch_delay" and value == 0):
                raise ConfigError(f"sync link {name}: {value!r} out of range")
        if self.retry_min > self.retry_max:
            raise ConfigError("sync link retry_min is above retry_max")


@dataclass(frozen=True, slots=True)
class SyncLinkStats:
    connected: bool  # a session with syncd is up (Hellos exchanged)
    synced: bool  # the first reconcile round (the restore) finished
    connects_total: int  # sessions established
    connect_failures_total: int  # connection attempts that failed (syncd down ...)
    disconnects_total: int  # sessions that ended, for any reason
    frames_sent_total: int
    deltas_sent_total: int  # LocalDeltas sent, resent own flows included
    frames_received_total: int
    replicas_applied_total: int  # records that changed the table (installed/updated/removed)
    replicas_ignored_total: int  # duplicate, stale, blocked, or an own flow syncd confirmed
    replicas_refused_total: int  # new keys refused: the table was full of assured flows
    bad_records_total: int  # records from syncd that failed validation (skipped)
    bad_frames_total: int  # garbage, oversized or unexpected frames (session closed)
    rounds_total: int  # reconcile rounds started (TableRequests)
    chunks_total: int  # TableChunks applied
    chunk_records_total: int  # records in them
    swept_total: int  # replicas removed: syncd no longer held them
    resent_total: int  # own flows sent again: syncd lacked them or held another state
    deletes_resent_total: int  # DELETEs sent for own flows syncd held but this node did not
    queued: int  # changes waiting to be sent
    overflow_total: int  # changes dropped: the queue was full (each leads to a round)
    internal_errors_total: int  # unexpected exceptions in the link task (bugs)
    last_error: str | None  # the latest reason a session ended or a record was refused


class _LinkClosed(Exception):
    """syncd ended the stream."""


class SyncLink:
    """Asyncio client of syncd's local socket; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        socket_path: str,
        table: FlowTable,
        clock: VersionClock,
        *,
        epoch: int,
        config: SyncLinkConfig | None = None,
        now: Callable[[], float] = time.monotonic,
        on_events: EventSink | None = None,
        on_installed: Callable[[bytes], None] | None = None,
    ) -> None:
        if not check_node_id(node_id):
            raise ConfigError(f"sync link: node id {node_id!r} is invalid")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_U63:
            raise ConfigError(f"sync link: epoch {epoch!r} not in 1..2**63-1")
        self._node_id = node_id
        self._path = socket_path
        self._table = table
        self._clock = clock
        self._epoch = epoch
        self._config = config or SyncLinkConfig()
        self._now = now
        self._on_events = on_events
        self._on_installed = on_installed
        table.set_local_origin(node_id)
        self._queue: deque[_Item] = deque()
        self._inflight: list[_Item] = []  # in the frame being written
        self._last_frame_at = float("-inf")  # loop time of the last frame sent (Nagle)
        self._resend: deque[bytes] = deque()  # own flows a round found unconfirmed
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._round_wanted = False
        self._round_active = False
        self._request_id = 0
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._last_error: str | None = None
        self._n = dict.fromkeys(
            ("connects", "connect_failures", "disconnects", "frames_sent", "deltas_sent",
             "frames_received", "applied", "ignored", "refused", "bad_records", "bad_frames",
             "rounds", "chunks", "chunk_records", "swept", "resent", "deletes_resent",
             "overflow", "internal"),
            0,
        )  # fmt: skip

    # --- the packet path ----------------------------------------------------

    def offer(self, events: Iterable[FlowEvent]) -> None:
        """Queue this node's flow events for syncd; O(1) each, never blocks or raises."""
        for event in events:
            if isinstance(event, ReplicaDeleted):
                continue  # not this node's news (node.flow.replica)
            version = self._clock.next()
            self._table.stamp(event, version)
            self._enqueue((event, version))

    def _enqueue(self, item: _Item) -> None:
        if len(self._queue) >= self._config.queue_len:
            # The next reconcile round finds whatever this change was.
            self._n["overflow"] += 1
            self._round_wanted = True
        else:
            self._queue.append(item)
        if not self._wake.is_set():
            self._wake.set()

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"synclink-{self._node_id}"
            )

    async def stop(self) -> None:
        """Close the link and stop reconnecting; queued changes stay queued."""
        task, self._task = self._task, None
        # Cancel until done: a cancellation that lands while a library call
        # completes can be lost, and stop() must not hang on it.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)

    async def wait_synced(self) -> None:
        """Return once the first reconcile round (the table restore) has finished."""
        await self._synced.wait()

    @property
    def is_synced(self) -> bool:
        return self._synced.is_set()

    @property
    def connected(self) -> bool:
        return self._connected

    def statistics(self) -> SyncLinkStats:
        n = self._n
        return SyncLinkStats(
            self._connected, self._synced.is_set(), n["connects"], n["connect_failures"],
            n["disconnects"], n["frames_sent"], n["deltas_sent"], n["frames_received"],
            n["applied"], n["ignored"], n["refused"], n["bad_records"], n["bad_frames"],
            n["rounds"], n["chunks"], n["chunk_records"], n["swept"], n["resent"],
            n["deletes_resent"], len(self._queue) + len(self._inflight), n["overflow"],
            n["internal"], self._last_error,
        )  # fmt: skip

    # --- connection loop -------------------------------------------------------

    async def _run(self) -> None:
        cfg = self._config
        delay = cfg.retry_min
        while True:
            started = self._now()
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                # cancellation that arrives as the inner call completes.
                async with asyncio.timeout(cfg.hello_timeout):
                    reader, writer = await asyncio.open_unix_connection(self._path)
            except (OSError, TimeoutError) as exc:
                self._n["connect_failures"] += 1
                self._failed(f"connect: {exc!r}", quiet=self._n["connect_failures"] > 1)
            else:
                await self._serve(reader, writer)
                if self._now() - started >= cfg.retry_max:
                    delay = cfg.retry_min  # that session was stable: reconnect quickly
            await asyncio.sleep(delay)
            delay = min(delay * 2, cfg.retry_max)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one session to its end and account for how it ended."""
        try:
            await self._session(reader, writer)
        except BadMessage as exc:
            self._n["bad_frames"] += 1
            self._failed(f"bad frame from syncd: {exc}")
        except PeerError as exc:
            self._n["bad_frames"] += 1
            self._failed(f"protocol error from syncd: {exc}")
        except (OSError, TimeoutError, _LinkClosed) as exc:
            self._failed(f"link lost: {exc!r}")
        except Exception as exc:  # a bug: keep filtering, count it, reconnect
            self._n["internal"] += 1
            self._failed(f"internal error: {exc!r}")
            log.exception("sync link: internal error")
        finally:
            if self._connected:
                self._connected = False
                self._n["disconnects"] += 1
            # A frame that may not have arrived goes again (duplicates are harmless).
            self._queue.extendleft(reversed(self._inflight))
            self._inflight = []
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self._config.hello_timeout):
                    await writer.wait_closed()

    def _failed(self, reason: str, quiet: bool = False) -> None:
        self._last_error = reason
        (log.debug if quiet else log.warning)("sync link: %s", reason)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = local_pb2.LocalHello(
            protocol=PROTOCOL, node_id=self._node_id, role=ROLE, epoch=self._epoch
        )
        await self._send_frame(writer, local_pb2.LocalFrame(hello=hello))
        async with asyncio.timeout(self._config.hello_timeout):
            self._check_hello(await read_frame(reader))
        self._n["connects"] += 1
        self._n["frames_received"] += 1
        self._connected = True
        log.info("sync link: connected to syncd at %s", self._path)
        self._round_wanted, self._round_active = True, False
        self._resend.clear()  # the new round recomputes it
        receiving = asyncio.create_task(self._receive(reader))
        sending = asyncio.create_task(self._send(writer))
        try:
            done, _ = await asyncio.wait({receiving, sending}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, sending):
                task.cancel()
            await asyncio.gather(receiving, sending, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
        raise _LinkClosed("syncd closed the link")

    def _check_hello(self, frame: local_pb2.LocalFrame | None) -> None:
        if frame is None:
            raise _LinkClosed("syncd closed the link before its Hello")
        if frame.WhichOneof("body") != "hello":
            raise PeerError("no-hello", f"first frame is {frame.WhichOneof('body')}")
        hello = frame.hello
        if hello.protocol != PROTOCOL or hello.role != PEER_ROLE:
            raise PeerError("bad-hello", f"protocol {hello.protocol} role {hello.role!r}")
        if hello.node_id != self._node_id:
            raise PeerError("bad-hello", f"syncd of node {hello.node_id!r}, we are {self._node_id}")

    async def _send_frame(self, writer: asyncio.StreamWriter, frame: local_pb2.LocalFrame) -> None:
        await write_frame(writer, frame)
        self._n["frames_sent"] += 1
        self._last_frame_at = self._loop_time()

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    # --- receiving --------------------------------------------------------------

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        """Apply syncd's frames until the stream ends (returns) or breaks (raises)."""
        while True:
            frame = await read_frame(reader)
            if frame is None:
                return
            self._n["frames_received"] += 1
            kind = frame.WhichOneof("body")
            if kind == "replicas":
                await self._apply_updates(frame.replicas.updates)
            elif kind == "table_chunk":
                await self._on_chunk(frame.table_chunk)
            else:
                raise PeerError("unexpected-frame", f"{kind} from syncd")

    async def _apply_updates(self, updates: Sequence[local_pb2.ReplicaUpdate]) -> None:
        for i, update in enumerate(updates, 1):
            try:
                change = change_from_pb(update)
            except BadMessage as exc:
                self._bad_record(exc)
                continue
            self._clock.observe(change.record.version)
            self._apply(change.op, change.record)
            if i % self._config.slice == 0:
                await asyncio.sleep(0)  # let packets through between slices

    async def _on_chunk(self, chunk: local_pb2.TableChunk) -> None:
        if chunk.request_id != self._request_id or not self._round_active:
            return  # an answer to an earlier request
        self._n["chunks"] += 1
        for i, msg in enumerate(chunk.records, 1):
            try:
                record = record_from_pb(msg)
            except BadMessage as exc:
                self._bad_record(exc)
                continue
            self._n["chunk_records"] += 1
            self._reconcile(record)
            if i % self._config.slice == 0:
                await asyncio.sleep(0)
        if chunk.last:
            await self._end_round()

    def _reconcile(self, record: FlowRecord) -> None:
        """One record of syncd's table during a round (see the module docstring)."""
        self._clock.observe(record.version)
        table = self._table
        if record.origin == self._node_id:
            if table.confirm_own(record.key, record.state, record.assured):
                self._n["ignored"] += 1
                return
            ended = self.is_synced or table.deleted_here(record.key, self._now())
            if ended and record.key not in table:
                # It ended while syncd was away, or its DELETE was lost.
                gone = dataclasses.replace(record, version=self._clock.next())
                self._enqueue(LocalChange(Op.DELETE, gone))
                self._n["deletes_resent"] += 1
                return
        self._apply(Op.CREATE, record)

    async def _end_round(self) -> None:
        keys, step = self._table.keys(), self._config.slice
        for start in range(0, len(keys), step):
            removed, unconfirmed = self._table.end_sweep(self._now(), keys[start : start + step])
            self._n["swept"] += len(removed)
            self._resend.extend(unconfirmed)
            if removed and self._on_events is not None:
                self._on_events(removed)
            await asyncio.sleep(0)
        self._round_active = False
        self._wake.set()
        if not self._synced.is_set():
            self._synced.set()
            log.info("sync link: table restored (%d records)", self._n["chunk_records"])

    def _apply(self, op: Op, record: FlowRecord) -> None:
        try:
            outcome, events = apply_change(self._table, op, record, self._now())
        except BadInput as exc:
            self._bad_record(exc)
            return
        if outcome in _APPLIED:
            self._n["applied"] += 1
        elif outcome in _IGNORED:
            self._n["ignored"] += 1
        else:
            self._n["refused"] += 1
        if events:
            self.offer(events)  # an own flow evicted to make room is news
            if self._on_events is not None:
                self._on_events(events)
        if outcome in _PRESENT and self._on_installed is not None:
            self._on_installed(record.key)

    def _bad_record(self, exc: Exception) -> None:
        self._n["bad_records"] += 1
        self._last_error = f"bad record from syncd: {exc}"

    # --- sending -----------------------------------------------------------------

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        cfg = self._config
        while True:
            while not (self._queue or self._resend or self._round_due()):
                self._wake.clear()
                await self._wake.wait()
            if self._queue and self._gather_first():
                await asyncio.sleep(cfg.batch_delay)  # busy link: let a batch gather
            # Queued changes go before a TableRequest: syncd's table then has them.
            await self._send_queued(writer)
            if self._round_due():
                await self._begin_round(writer)
            if self._resend:
                await self._resend_slice(writer)

    def _gather_first(self) -> bool:
        """Wait ``batch_delay`` for company: only when a frame left within it
        (Nagle's rule), the batch is not full and no round is waiting."""
        cfg = self._config
        return (
            len(self._queue) < cfg.batch_max
            and not self._round_due()
            and self._loop_time() - self._last_frame_at < cfg.batch_delay
        )

    def _round_due(self) -> bool:
        return self._round_wanted and not self._round_active

    async def _begin_round(self, writer: asyncio.StreamWriter) -> None:
        self._round_wanted, self._round_active = False, True
        self._resend.clear()
        keys, step = self._table.keys(), self._config.slice
        for start in range(0, len(keys), step):
            self._table.begin_sweep(keys[start : start + step])
            await asyncio.sleep(0)
        self._request_id += 1
        self._n["rounds"] += 1
        request = local_pb2.TableRequest(request_id=self._request_id)
        await self._send_frame(writer, local_pb2.LocalFrame(table_request=request))

    async def _send_queued(self, writer: asyncio.StreamWriter) -> None:
        queue, batch_max = self._queue, self._config.batch_max
        while queue:
            self._inflight = [queue.popleft() for _ in range(min(len(queue), batch_max))]
            now = self._now()
            deltas = []
            for item in self._inflight:
                change = (
                    item
                    if isinstance(item, LocalChange)
                    else change_from_event(item[0], self._node_id, item[1], now)
                )
                if change is not None:
                    deltas.append(change_to_local_pb(change))
            await self._send_deltas(writer, deltas)
            self._inflight = []

    async def _resend_slice(self, writer: asyncio.StreamWriter) -> None:
        """Send the next own flows a round found unconfirmed, as CREATEs at their version."""
        step = min(self._config.batch_max, self._config.slice)
        keys = [self._resend.popleft() for _ in range(min(step, len(self._resend)))]
        now = self._now()
        deltas = []
        for snapshot, version in self._table.own_flows(keys):
            if version == 0:  # never stamped (created before the link existed)
                version = self._clock.next()
                self._table.stamp(FlowCreated(snapshot, now), version)
            record = record_from_snapshot(snapshot, self._node_id, version, now)
            deltas.append(change_to_local_pb(LocalChange(Op.CREATE, record)))
        self._n["resent"] += len(deltas)
        await self._send_deltas(writer, deltas)
        await asyncio.sleep(0)  # packets first

    async def _send_deltas(
        self, writer: asyncio.StreamWriter, deltas: list[local_pb2.LocalDelta]
    ) -> None:
        if deltas:
            frame = local_pb2.LocalFrame(local=local_pb2.LocalBatch(deltas=deltas))
            await self._send_frame(writer, frame)
            self._n["deltas_sent"] += len(deltas)
