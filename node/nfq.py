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

Flow events go to a bounded outbox (a later consumer is the sync daemon);
``FlowDeleted`` of an offloaded flow is also handed to ``on_offloaded_delete``
(:class:`node.kernel_ct.KernelConntrack`).  One timer, armed from
``engine.next_deadline()``, expires flows.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from node.config import QueueConfig
from node.dataplane import MarkBits
from node.engine import Decision, Engine, Verdict
from node.errors import DataplaneError
from node.flow.events import FlowDeleted, FlowEvent, FlowSnapshot
from node.flow.key import flow_key_bytes

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256  # packets per readable event before yielding to the loop
DEFAULT_OUTBOX = 65536  # flow events kept for a consumer; older ones dropped, counted
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
    outbox_overflow_total: int  # events dropped because no consumer kept up
    outbox_pending: int
    expiry_runs_total: int
    unoffloaded_total: int = 0  # offloaded flows taken back from the kernel (FIN/RST)


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
        outbox_len: int = DEFAULT_OUTBOX,
        ifname: Callable[[int], str] = socket.if_indextoname,
    ) -> None:
        self._engine = engine
        self._queue_cfg = queue
        self._marks = marks
        self._offload = offload
        self._on_offloaded_delete = on_offloaded_delete
        self._clock = clock
        self._batch = batch
        self.outbox: deque[FlowEvent] = deque(maxlen=outbox_len)
        self._ifnames = _IfNames(ifname)
        self._errors = _RateLimitedLog(LOG_EVERY)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nfq: Any = None
        self._sock: socket.socket | None = None
        self._fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._n = dict.fromkeys(
            ("packets", "accepted", "offloaded", "rejected", "dropped", "engine_errors",
             "verdict_errors", "enobufs", "batches", "events", "overflow", "expiries",
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
        """Stop reading and unbind; the kernel drops packets still queued to us."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, float("inf")
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
            decision = self._engine.process(
                pkt.get_payload(), now,
                self._ifnames.name(pkt.indev, now), self._ifnames.name(pkt.outdev, now),
            )  # fmt: skip
        except Exception as e:
            self._n["engine_errors"] += 1
            self._errors.error(type(e).__name__, self._clock(), "engine failed on a packet", e)
            self._give(pkt, "dropped", pkt.drop)
            return
        self._verdict(pkt, decision)
        try:
            self._push_events(decision.events)
        except Exception as e:
            self._errors.error("events", self._clock(), "handling flow events failed", e)

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
        for event in events:
            self._n["events"] += 1
            if len(self.outbox) == self.outbox.maxlen:
                self._n["overflow"] += 1
            self.outbox.append(event)
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

    # -- consumers ---------------------------------------------------------

    def drain_events(self, limit: int | None = None) -> list[FlowEvent]:
        """Take up to ``limit`` (all when None) events from the outbox, oldest first."""
        n = len(self.outbox) if limit is None else min(limit, len(self.outbox))
        return [self.outbox.popleft() for _ in range(n)]

    def statistics(self) -> AdapterStats:
        n = self._n
        return AdapterStats(
            n["packets"], n["accepted"], n["offloaded"], n["rejected"], n["dropped"],
            n["engine_errors"], n["verdict_errors"], n["enobufs"], n["batches"], n["events"],
            n["overflow"], len(self.outbox), n["expiries"], n["unoffloaded"],
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
