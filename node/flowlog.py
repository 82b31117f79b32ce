"""JSON-lines flow log: flow created, flow deleted (with why), new flow denied (with rule).

Three parts, so that nothing on the packet path waits for a disk:

* :class:`FlowLog` (pure): the packet path hands it each decision and each
  batch of expiry events with ``now``.  A token bucket decides at once
  whether a line may be written; admitted records wait in a bounded queue
  (overflow counted), still unformatted.  :meth:`FlowLog.take_lines` turns
  them into text when the event loop asks, and adds one
  ``{"event":"suppressed",...}`` line per second at most when lines were
  rate-limited or lost to a full queue.
* :class:`FlowLogFile` (I/O): appends lines, rotating ``PATH`` to ``PATH.1``
  before the file would pass ``max_bytes`` (so the log never holds much more
  than twice that on disk).  It runs on one worker thread.
* :func:`pump` (asyncio): every ``interval`` takes the lines and hands them
  to the worker thread; while a write is in flight the queue fills, and a
  stalled disk shows as queue overflow, never as a slow packet path.

:class:`LoggingEngine` is the engine with the flow log attached: it sees
every decision (creations, deletions caused by packets, denies) and every
expiry.  A deny is a NEW packet dropped or rejected, by a rule or by the
default action (``"rule": "default"``); a NEW packet the rules accepted but
the full table refused is a deny with ``"reason": "table-full"``.

Line format (one JSON object per line, keys in this order)::

    {"ts":"2024-05-01T12:00:00.123+00:00","node":"fw1","event":"create",
     "proto":"tcp","src":"10.10.1.2","sport":40000,"dst":"10.10.2.2","dport":8080,
     "rule":"web"}
    {... "event":"delete", <flow>, "reason":"timeout","rule":"web","state":"TIME_WAIT",
     "duration":12.5,"packets_orig":7,"packets_reply":6,"bytes_orig":500,"bytes_reply":420}
    {... "event":"deny", <packet>, "verdict":"drop","rule":"default",
     "in_iface":"cl0","out_iface":"sv0"}          (+ "reason", "icmp_type", "icmp_code")
    {... "event":"suppressed","count":N,"rate_limited":R,"queue_full":Q}

``src/sport/dst/dport`` are the flow's original direction (the packet's for
a deny).  ``ts`` is wall-clock time: the caller passes the offset between its
monotonic clock and the wall clock, so the core never reads a clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from node.config import FlowLogConfig
from node.engine import Decision, Engine, Verdict
from node.errors import ConfigError, Misuse
from node.flow.events import CtState, FlowCreated, FlowDeleted, FlowEvent, FlowSnapshot
from node.flow.table import TableConfig
from node.packet import ICMP, ICMPV6, Packet, format_addr
from node.policy import Ruleset

log = logging.getLogger(__name__)

QUEUE_LEN: Final = 16384  # records waiting for the event loop; about 5 MB at most
SUPPRESSED_EVERY: Final = 1.0  # seconds between two "suppressed" report lines
PUMP_INTERVAL: Final = 0.25  # seconds between two hand-overs to the writer thread
_PROTO_NAMES: Final = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_CREATE, _DELETE, _DENY = "create", "delete", "deny"
_NEW, _ACCEPT = CtState.NEW, Verdict.ACCEPT


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise Misuse(f"token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one.  A clock stepping back adds nothing."""
        if now > self._at:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class FlowLogStats:
    queued_total: int  # records admitted to the queue (each becomes one line)
    rate_limited_total: int  # records suppressed by the token bucket
    queue_full_total: int  # records lost because the queue was full (writer stalled)
    pending: int  # records waiting in the queue now
    lines_total: int  # lines handed to the writer, "suppressed" reports included


# A queued record: (kind, now, payload, in_iface, out_iface); payload is a
# FlowSnapshot (create), a FlowDeleted (delete) or a Decision (deny).
_Record = tuple[str, float, Any, str | None, str | None]


class FlowLog:
    """The pure core; see the module docstring.  Single-threaded."""

    def __init__(self, node_id: str, config: FlowLogConfig, now: float) -> None:
        self._node = node_id
        self._bucket = TokenBucket(config.rate_per_second, config.burst, now)
        self._queue: deque[_Record] = deque()
        self._queued = 0
        self._rate_limited = 0
        self._queue_full = 0
        self._lines = 0
        self._unreported = (0, 0)  # (rate-limited, queue-full) not yet in a report line
        self._reported_at = now - SUPPRESSED_EVERY

    # -- packet path: cheap, no formatting ----------------------------------

    def observe(
        self, d: Decision, now: float, in_iface: str | None = None, out_iface: str | None = None
    ) -> None:
        """Record what one decision changed: flow events, and a deny of a NEW packet."""
        if d.events:
            self.observe_events(d.events, now)
        # A held packet (asymmetric routing: its flow's state may be on the
        # way) is not denied yet: it is judged again, and logged then.
        if d.ct_state is _NEW and d.verdict is not _ACCEPT and d.hold_key is None:
            self._offer((_DENY, now, d, in_iface, out_iface), now)

    def observe_events(self, events: Iterable[FlowEvent], now: float) -> None:
        """Record creations and deletions (state changes are not logged)."""
        for event in events:
            if isinstance(event, FlowCreated):
                self._offer((_CREATE, event.at, event.snapshot, None, None), now)
            elif isinstance(event, FlowDeleted):
                self._offer((_DELETE, event.at, event, None, None), now)

    def _offer(self, record: _Record, now: float) -> None:
        if not self._bucket.take(now):
            self._rate_limited += 1
        elif len(self._queue) >= QUEUE_LEN:
            self._queue_full += 1
        else:
            self._queue.append(record)
            self._queued += 1

    # -- event loop: format --------------------------------------------------

    def take_lines(self, now: float, wall_offset: float, final: bool = False) -> list[str]:
        """Format and remove every queued record; add a "suppressed" report when due.

        ``wall_offset`` is wall-clock time minus the ``now`` clock.  ``final``
        (at shutdown) reports suppressed lines even within the report period.
        """
        queue = self._queue
        lines = [self._format(queue.popleft(), wall_offset) for _ in range(len(queue))]
        report = self._suppressed_report(now, wall_offset, final)
        if report is not None:
            lines.append(report)
        self._lines += len(lines)
        return lines

    def _suppressed_report(self, now: float, wall_offset: float, final: bool) -> str | None:
        reported_rate, reported_full = self._unreported
        rate, full = self._rate_limited - reported_rate, self._queue_full - reported_full
        if not (rate or full) or (not final and now - self._reported_at < SUPPRESSED_EVERY):
            return None
        self._unreported = (self._rate_limited, self._queue_full)
        self._reported_at = now
        fields = {"count": rate + full, "rate_limited": rate, "queue_full": full}
        return self._line("suppressed", now + wall_offset, fields)

    def _format(self, record: _Record, wall_offset: float) -> str:
        kind, at, payload, in_iface, out_iface = record
        if kind == _CREATE:
            fields = {**_flow_fields(payload), "rule": payload.rule}
        elif kind == _DELETE:
            fields = _delete_fields(payload)
        else:
            fields = _deny_fields(payload, in_iface, out_iface)
        return self._line(kind, at + wall_offset, fields)

    def _line(self, event: str, wall: float, fields: dict[str, Any]) -> str:
        head = {"ts": _timestamp(wall), "node": self._node, "event": event}
        return json.dumps({**head, **fields}, separators=(",", ":"))

    def statistics(self) -> FlowLogStats:
        return FlowLogStats(
            self._queued, self._rate_limited, self._queue_full, len(self._queue), self._lines
        )


def _timestamp(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def _proto(number: int) -> str:
    return _PROTO_NAMES.get(number, str(number))


def _flow_fields(s: FlowSnapshot) -> dict[str, Any]:
    return {
        "proto": _proto(s.proto),
        "src": format_addr(s.family, s.orig_src),
        "sport": s.orig_sport,
        "dst": format_addr(s.family, s.orig_dst),
        "dport": s.orig_dport,
    }


def _delete_fields(e: FlowDeleted) -> dict[str, Any]:
    s = e.snapshot
    return {
        **_flow_fields(s),
        "reason": e.reason.value,
        "rule": s.rule,
        "state": s.state,
        "duration": round(max(0.0, s.last_seen - s.created_at), 3),
        "packets_orig": s.packets_orig,
        "packets_reply": s.packets_reply,
        "bytes_orig": s.bytes_orig,
        "bytes_reply": s.bytes_reply,
    }


def _deny_fields(d: Decision, in_iface: str | None, out_iface: str | None) -> dict[str, Any]:
    p: Packet | None = d.packet
    fields: dict[str, Any] = {}
    if p is not None:
        fields = {
            "proto": _proto(p.proto),
            "src": format_addr(p.family, p.src),
            "sport": p.sport,
            "dst": format_addr(p.family, p.dst),
            "dport": p.dport,
        }
    fields |= {"verdict": d.verdict.value, "rule": d.rule or "default"}
    if d.reason is not None:
        fields["reason"] = d.reason
    if p is not None and p.proto in (ICMP, ICMPV6):
        fields |= {"icmp_type": p.icmp_type, "icmp_code": p.icmp_code}
    if in_iface is not None:
        fields["in_iface"] = in_iface
    if out_iface is not None:
        fields["out_iface"] = out_iface
    return fields


class LoggingEngine(Engine):
    """:class:`Engine` that also shows each decision and expiry to a :class:`FlowLog`.

    Flows removed outside ``process``/``expire`` (``FlowTable.flush``, admin
    deletes) are not logged.
    """

    def __init__(self, table_config: TableConfig, ruleset: Ruleset, flow_log: FlowLog) -> None:
        super().__init__(table_config, ruleset)
        self.flow_log = flow_log

    def process(
        self, data: bytes, now: float, in_iface: str | None = None, out_iface: str | None = None
    ) -> Decision:
        d = super().process(data, now, in_iface, out_iface)
        self.flow_log.observe(d, now, in_iface, out_iface)
        return d

    def settle(self, d: Decision, now: float) -> Decision:
        """A holdable decision that was not held (queue full) stands: log it now."""
        settled = super().settle(d, now)
        self.flow_log.observe(settled, now)
        return settled

    def expire(self, now: float) -> list[FlowEvent]:
        events = super().expire(now)
        if events:
            self.flow_log.observe_events(events, now)
        return events


# -- I/O ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowLogFileStats:
    lines_written_total: int  # lines appended to the file
    bytes_written_total: int  # bytes appended (all files, before and after rotation)
    rotations_total: int  # times PATH was moved to PATH.1
    write_errors_total: int  # batches lost to an OS error (disk full, ...)
    size_bytes: int  # size of the current file


class FlowLogFile:
    """Appends lines to ``path``, rotating to ``path.1`` at ``max_bytes``.

    Used from one thread at a time (the pump's worker); statistics may be read
    from the event loop meanwhile (each counter is one int: at worst a read
    is one batch behind).
    """

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self._max = max_bytes
        self._fd = -1
        self._size = 0
        self._lines = self._bytes = self._rotations = self._errors = 0

    def open(self) -> None:
        """Open (append, create 0640); an unusable path is a :class:`ConfigError`."""
        try:
            self._open()
        except OSError as e:
            raise ConfigError(f"flow_log.path {self.path}: cannot open: {e.strerror}") from e

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write_lines(self, lines: Sequence[str]) -> None:
        """Append ``lines``; rotates before a line would pass ``max_bytes``.

        An OS error loses the rest of this batch (counted, logged); the next
        batch tries again, reopening the file if it had to rotate.
        """
        try:
            self._write(lines)
        except OSError as e:
            self._errors += 1
            log.error("flow log %s: write failed, batch lost: %s", self.path, e)

    def _write(self, lines: Sequence[str]) -> None:
        if self._fd < 0:
            self._open()
        chunk: list[bytes] = []
        chunk_len = 0
        for line in lines:
            data = (line + "\n").encode()
            if self._size + chunk_len + len(data) > self._max and self._size + chunk_len > 0:
                self._flush(chunk)
                chunk, chunk_len = [], 0
                self._rotate()
            chunk.append(data)
            chunk_len += len(data)
        self._flush(chunk)

    def _flush(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        data = b"".join(chunk)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)
        self._bytes += len(data)
        self._lines += len(chunk)

    def _rotate(self) -> None:
        self.close()
        os.replace(self.path, self.path + ".1")
        self._rotations += 1
        self._size = 0
        self._open()

    def statistics(self) -> FlowLogFileStats:
        return FlowLogFileStats(self._lines, self._bytes, self._rotations, self._errors, self._size)


async def pump(
    flow_log: FlowLog,
    file: FlowLogFile,
    clock: Callable[[], float],
    wall_clock: Callable[[], float],
    interval: float = PUMP_INTERVAL,
) -> None:
    """Move lines from ``flow_log`` to ``file`` until cancelled, then flush and close.

    Writes run on one dedicated thread, one batch at a time, in order.  The
    last flush (at shutdown) waits for the batch in flight and writes what
    is left from the event loop's thread.
    """
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowlog")
    try:
        while True:
            await asyncio.sleep(interval)
            now = clock()
            lines = flow_log.take_lines(now, wall_clock() - now)
            if lines:
                await loop.run_in_executor(executor, file.write_lines, lines)
    finally:
        executor.shutdown(wait=True)
        now = clock()
        file.write_lines(flow_log.take_lines(now, wall_clock() - now, final=True))
        file.close()
