"""NFQUEUE adapter: kernel packets -> :class:`node.engine.Engine` -> verdicts, on asyncio.

The only code on the packet path that touches I/O.  One readable event on
the queue's netlink socket handles at most ``batch`` packets (then the loop
runs timers and the control socket before the next batch; epoll is level
triggered, so the rest follows at once).  netfilterqueue's ``run_socket``
is given a small wrapper whose ``recv`` reports EAGAIN once the budget is
spent -- the library's own ``run(block=False)`` reads until the socket is
empty, which under load would starve the loop.

Verdicts (see :mod:`node.dataplane` for the rules that finish them):

* ACCEPT -> ``accept()``; with ``offload`` (fast path on and the engine
  allows it) -> mark |= OFFLOAD, ``repeat()``: the chain sets the FAST
  connmark and accepts.
* REJECT -> mark |= REJECT, ``repeat()``: the kernel's REJECT target sends
  the TCP RST or ICMP unreachable.
* DROP -> ``drop()``.

The packet's existing mark is kept (``nfq_set_verdict2`` replaces the whole
mark).  Any exception while judging one packet drops that packet (fail
closed), is counted and logged at most once a minute per exception type;
the loop never dies of it.  The callback must never raise: netfilterqueue
calls it from C and does not check for a pending Python exception.

Flow events go to ``on_events`` when given (the sync link's ``offer``:
O(1), bounded, never blocks; a standalone node has no consumer and keeps
none); ``FlowDeleted`` of an offloaded flow is also handed to
``on_offloaded_delete``
(:class:`node.kernel_ct.KernelConntrack`).  One timer, armed from
``engine.next_deadline()``, expires flows.

Held packets (``hold``, clustered nodes only; see :mod:`node.hold`): a
decision with a ``hold_key`` keeps its packet object without a verdict
(netfilterqueue sends a verdict for a kept packet whenever it is given, as
long as the queue is bound; the payload was copied by ``get_payload``).
:meth:`NfqAdapter.release` (the sync link installed a record) and a second
timer (the hold timeout) judge held packets again with
``engine.reprocess``; :meth:`stop` judges whatever is still held before it
unbinds.  A full hold queue means the packet is judged at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from node.config import QueueConfig
from node.dataplane import MarkBits
from node.engine import Decision, Engine, Verdict
from node.errors import DataplaneError
from node.flow.events import FlowDeleted, FlowEvent, FlowSnapshot
from node.flow.key import flow_key_bytes
from node.hold import Held, HoldQueue

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256  # packets per readable event before yielding to the loop
IFNAME_REFRESH = 60.0  # seconds; interface renames show up within this
MIN_TIMER_DELAY = 0.01  # never re-arm the expiry timer tighter than this (no spinning)
LOG_EVERY = 60.0  # seconds between two log lines about the same exception type
# Bytes of kernel socket buffer per queued packet (netfilterqueue's own
# estimate: copy size plus netlink overhead).
# Bytes of each packet the kernel copies to us.  The engine needs only the
# headers (IPv6 extension headers, TCP options, the header quoted in an ICMP
# error); it parses with prefix=True and takes lengths from the headers.
# Copying less also lifts netfilterqueue's fixed 4 KiB receive buffer limit
# on large (reassembled) packets.
COPY_RANGE = 512
_SOCK_BYTES_PER_PACKET = 4796


class NfqPacket(Protocol):
    """The part of ``netfilterqueue.Packet`` the adapter uses."""

    indev: int
    outdev: int

    def get_payload(self) -> bytes: ...
    def get_mark(self) -> int: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...
    def repeat(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AdapterStats:
    packets_total: int  # packets handed to us by the kernel
    accepted_total: int  # plain accepts
    offloaded_total: int  # accepts re-injected to set the FAST connmark
    rejected_total: int  # re-injected for the kernel's REJECT
    dropped_total: int  # drops, including fail-closed ones
    engine_errors_total: int  # packets the engine raised on (dropped)
    verdict_errors_total: int  # verdicts the library refused
    enobufs_total: int  # times the kernel said our socket overflowed (packets lost)
    batches_total: int
    events_total: int  # flow events produced
    expiry_runs_total: int
    unoffloaded_total: int = 0  # offloaded flows taken back from the kernel (FIN/RST)
    held_now: int = 0  # packets waiting in the hold queue for a verdict


# A held packet: the library's packet, its payload and interface names.
HeldPacket = tuple["NfqPacket", bytes, str | None, str | None]
EventSink = Callable[[tuple[FlowEvent, ...]], None]


class _RateLimitedLog:
    def __init__(self, every: float) -> None:
        self._every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def error(self, kind: str, now: float, message: str, exc: BaseException) -> None:
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        more = f" ({skipped} more since last report)" if skipped else ""
        log.error("%s%s: %s", message, more, exc, exc_info=exc)


class _BudgetedSocket:
    """``recv`` that reports EAGAIN after ``budget`` reads (see module doc)."""

    def __init__(self, sock: socket.socket, budget: int, on_enobufs: Callable[[], None]) -> None:
        self._sock = sock
        self._left = budget
        self._on_enobufs = on_enobufs

    def recv(self, size: int) -> bytes:
        if self._left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch budget spent")
        self._left -= 1
        try:
            return self._sock.recv(size)
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                self._on_enobufs()
            raise


class _IfNames:
    """ifindex -> name, cached; misses look the index up, the cache ages out."""

    def __init__(self, lookup: Callable[[int], str]) -> None:
        self._lookup = lookup
        self._names: dict[int, str | None] = {}
        self._since = float("-inf")

    def name(self, index: int, now: float) -> str | None:
        if index == 0:
            return None
        if now - self._since > IFNAME_REFRESH:
            self._names.clear()
            self._since = now
        if index not in self._names:
            try:
                self._names[index] = self._lookup(index)
            except OSError:
                self._names[index] = None
        return self._names[index]


class NfqAdapter:
    """Binds one NFQUEUE and runs every packet through the engine."""

    def __init__(
        self,
        engine: Engine,
        queue: QueueConfig,
        marks: MarkBits,
        *,
        offload: bool,
        on_offloaded_delete: Callable[[FlowSnapshot], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch: int = DEFAULT_BATCH,
        ifname: Callable[[int], str] = socket.if_indextoname,
        hold: HoldQueue[HeldPacket] | None = None,
        on_events: EventSink | None = None,
    ) -> None:
        self._engine = engine
        self._queue_cfg = queue
        self._marks = marks
        self._offload = offload
        self._on_offloaded_delete = on_offloaded_delete
        self._clock = clock
        self._batch = batch
        self._ifnames = _IfNames(ifname)
        self._errors = _RateLimitedLog(LOG_EVERY)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nfq: Any = None
        self._sock: socket.socket | None = None
        self._fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.hold = hold
        self._on_events = on_events
        self._hold_timer: asyncio.TimerHandle | None = None
        self._n = dict.fromkeys(
            ("packets", "accepted", "offloaded", "rejected", "dropped", "engine_errors",
             "verdict_errors", "enobufs", "batches", "events", "expiries",
             "unoffloaded"),
            0,
        )  # fmt: skip

    # -- lifecycle ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, nfq: Any = None) -> None:
        """Bind the queue and start reading (``nfq``: a NetfilterQueue, for tests)."""
        if nfq is None:
            from netfilterqueue import NetfilterQueue

            try:
                nfq = NetfilterQueue()
            except OSError as e:
                raise DataplaneError(f"cannot open NFQUEUE (are you root?): {e}") from e
        num, max_len = self._queue_cfg.num, self._queue_cfg.max_len
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                nfq.bind(num, self.handle, max_len=max_len, range=COPY_RANGE,
                         sock_len=max_len * _SOCK_BYTES_PER_PACKET // 2)  # fmt: skip
        except OSError as e:
            raise DataplaneError(
                f"cannot bind NFQUEUE {num} (another process bound to it?): {e}"
            ) from e
        for w in caught:
            log.warning("NFQUEUE %d: %s", num, w.message)
        self._nfq, self._loop = nfq, loop
        self._fd = nfq.get_fd()
        self._sock = socket.socket(fileno=os.dup(self._fd))
        self._sock.setblocking(False)
        loop.add_reader(self._fd, self._on_readable)
        self._rearm()

    def stop(self) -> None:
        """Judge held packets, stop reading and unbind; the kernel drops the rest queued."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, float("inf")
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.hold is not None and self._nfq is not None:
            self._judge_again(self.hold.flush())
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        if self._nfq is not None:
            self._nfq.unbind()
        if self._sock is not None:
            self._sock.close()
        self._nfq = self._sock = self._loop = None
        self._fd = -1

    # -- packet path -------------------------------------------------------

    def _on_readable(self) -> None:
        assert self._sock is not None and self._nfq is not None
        reader = _BudgetedSocket(self._sock, self._batch, self._count_enobufs)
        try:
            self._nfq.run_socket(reader)
        except OSError as e:
            self._errors.error("recv", self._clock(), "NFQUEUE receive failed", e)
        self._n["batches"] += 1
        self._rearm()

    def _count_enobufs(self) -> None:
        self._n["enobufs"] += 1

    def handle(self, pkt: NfqPacket) -> None:
        """Judge one packet and give its verdict; never raises (see module doc)."""
        self._n["packets"] += 1
        try:
            now = self._clock()
            payload = pkt.get_payload()
            in_name = self._ifnames.name(pkt.indev, now)
            out_name = self._ifnames.name(pkt.outdev, now)
            decision = self._engine.process(payload, now, in_name, out_name)
            key = decision.hold_key
            if key is not None:
                if self.hold is not None and self.hold.hold(
                    key, (pkt, payload, in_name, out_name), now
                ):
                    self._arm_hold_timer()
                    self._events(decision.events)
                    return
                decision = self._engine.settle(decision, now)
        except Exception as e:
            self._n["engine_errors"] += 1
            self._errors.error(type(e).__name__, self._clock(), "engine failed on a packet", e)
            self._give(pkt, "dropped", pkt.drop)
            return
        self._verdict(pkt, decision)
        self._events(decision.events)

    def _events(self, events: tuple[FlowEvent, ...] | list[FlowEvent]) -> None:
        if not events:
            return
        try:
            self._push_events(events)
        except Exception as e:
            self._errors.error("events", self._clock(), "handling flow events failed", e)

    # -- held packets --------------------------------------------------------

    def release(self, key: bytes) -> None:
        """A record for ``key`` was installed: judge the packets held for it, in order."""
        if self.hold is None or key not in self.hold or self._nfq is None:
            return
        self._judge_again(self.hold.release(key, self._clock()))

    def _judge_again(self, released: list[Held[HeldPacket]]) -> None:
        for held in released:
            pkt, payload, in_name, out_name = held.item
            try:
                decision = self._engine.reprocess(payload, self._clock(), in_name, out_name)
            except Exception as e:
                self._n["engine_errors"] += 1
                self._errors.error(type(e).__name__, self._clock(), "engine failed on a packet", e)
                self._give(pkt, "dropped", pkt.drop)
                continue
            self._verdict(pkt, decision)
            self._events(decision.events)
        if released:
            self._rearm()  # a flow may have been created or changed

    def _arm_hold_timer(self) -> None:
        if self._hold_timer is not None or self._loop is None or self.hold is None:
            return
        deadline = self.hold.next_deadline()
        if deadline is not None:
            delay = max(deadline - self._clock(), 0.0)
            self._hold_timer = self._loop.call_later(delay, self._on_hold_timer)

    def _on_hold_timer(self) -> None:
        self._hold_timer = None
        if self.hold is None:
            return
        try:
            self._judge_again(self.hold.expire(self._clock()))
        except Exception as e:  # a bug; the packets' verdicts were attempted one by one
            self._errors.error("hold", self._clock(), "hold queue expiry failed", e)
        self._arm_hold_timer()

    def _verdict(self, pkt: NfqPacket, d: Decision) -> None:
        if d.verdict is Verdict.ACCEPT and not ((d.offload or d.unoffload) and self._offload):
            self._give(pkt, "accepted", pkt.accept)
        elif d.verdict is Verdict.ACCEPT and d.unoffload:
            # FIN or RST of an offloaded flow: the re-injected accept clears
            # the kernel's FAST mark, so the last ACK reaches the table too.
            self._give(pkt, "unoffloaded", pkt.repeat, self._marks.unoffload)
        elif d.verdict is Verdict.ACCEPT:
            if self._give(pkt, "offloaded", pkt.repeat, self._marks.offload):
                self._record_offload(d)
        elif d.verdict is Verdict.REJECT:
            self._give(pkt, "rejected", pkt.repeat, self._marks.reject)
        else:
            self._give(pkt, "dropped", pkt.drop)

    def _record_offload(self, d: Decision) -> None:
        # The table must know, so the flow's FlowDeleted makes kernel_ct clear FAST.
        if d.packet is None:
            return
        try:
            self._engine.table.set_offloaded(flow_key_bytes(d.packet)[0], True)
        except Exception as e:
            self._errors.error("offload", self._clock(), "recording an offload failed", e)

    def _give(
        self, pkt: NfqPacket, counter: str, verdict: Callable[[], None], mark: int = 0
    ) -> bool:
        try:
            if mark:
                pkt.set_mark(pkt.get_mark() | mark)
            verdict()
        except Exception as e:
            self._n["verdict_errors"] += 1
            self._errors.error("verdict", self._clock(), "NFQUEUE verdict failed", e)
            return False
        self._n[counter] += 1
        return True

    def _push_events(self, events: tuple[FlowEvent, ...] | list[FlowEvent]) -> None:
        self._n["events"] += len(events)
        if self._on_events is not None:
            self._on_events(tuple(events))
        for event in events:
            if (
                isinstance(event, FlowDeleted)
                and event.snapshot.offloaded
                and self._on_offloaded_delete is not None
            ):
                self._on_offloaded_delete(event.snapshot)

    # -- expiry timer ------------------------------------------------------

    def _rearm(self, floor: float = 0.0) -> None:
        if self._loop is None:
            return
        deadline = self._engine.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(deadline - self._clock(), floor)
        self._timer_at = deadline
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._n["expiries"] += 1
        try:
            events = self._engine.expire(self._clock())
        except Exception as e:
            self._errors.error("expire", self._clock(), "flow expiry failed", e)
            events = []
        try:
            self._push_events(events)
        except Exception as e:
            self._errors.error("events", self._clock(), "handling expiry events failed", e)
        self._rearm(floor=MIN_TIMER_DELAY)

    def statistics(self) -> AdapterStats:
        n = self._n
        return AdapterStats(
            n["packets"], n["accepted"], n["offloaded"], n["rejected"], n["dropped"],
            n["engine_errors"], n["verdict_errors"], n["enobufs"], n["batches"], n["events"],
            n["expiries"], n["unoffloaded"],
            len(self.hold) if self.hold is not None else 0,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class KernelQueueStats:
    waiting: int  # packets queued to userspace now
    queue_dropped: int  # dropped by the kernel: queue full (max_len)
    user_dropped: int  # dropped by the kernel: our socket buffer full


def kernel_queue_stats(
    num: int, path: str = "/proc/net/netfilter/nfnetlink_queue"
) -> KernelQueueStats | None:
    """The kernel's counters for queue ``num`` (None when not bound or unreadable)."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 7 and cols[0].isdigit() and int(cols[0]) == num:
            return KernelQueueStats(int(cols[2]), int(cols[5]), int(cols[6]))
    return None
