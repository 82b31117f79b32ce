"""Pure bookkeeping of the lab traffic driver (``chaos.traffic``).

Every method takes ``now`` (``time.monotonic()`` in the driver: one clock
for all processes on the machine, so a fault injector's timestamps and the
gap events below can be compared directly).  Nothing here does I/O.

A *stall* is a gap longer than ``stall_after`` between two echoes received
on one long-lived connection; each becomes a :class:`GapEvent` with the
time of the last echo before it and of the first after it: the failover
bench reads "fault -> flow delivers again" from these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

STALL_AFTER = 0.1
MAX_GAP_EVENTS = 10_000  # per run; more are counted, not kept
MAX_SAMPLES = 100_000  # latency samples kept per kind (reservoir-free: first N)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


@dataclass(frozen=True, slots=True)
class GapEvent:
    conn: int
    start: float  # monotonic time of the last echo before the gap
    end: float | None  # first echo after it; None = still stalled at the end
    gap_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class LongLived:
    """One long-lived TCP connection's counters and gap detection."""

    conn: int
    started: float
    stall_after: float = STALL_AFTER
    sent: int = 0
    echoed: int = 0
    bytes_sent: int = 0
    bytes_echoed: int = 0
    send_skipped: int = 0  # ticks skipped: the socket buffer was full
    resets: int = 0  # connection reset / closed by the other end / timed out
    reconnects: int = 0
    connect_failures: int = 0
    longest_gap: float = 0.0
    last_echo: float | None = None
    up: bool = False
    gaps: list[GapEvent] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)

    def on_connected(self, now: float) -> None:
        if self.up:
            return
        self.up = True
        # The gap clock starts again on a new connection: a reconnect is a new flow.
        self.last_echo = now

    def on_sent(self, nbytes: int) -> None:
        self.sent += 1
        self.bytes_sent += nbytes

    def on_echo(self, nbytes: int, sent_at: float, now: float) -> GapEvent | None:
        self.echoed += 1
        self.bytes_echoed += nbytes
        if len(self.rtts) < MAX_SAMPLES:
            self.rtts.append(now - sent_at)
        event = None
        if self.last_echo is not None:
            gap = now - self.last_echo
            self.longest_gap = max(self.longest_gap, gap)
            if gap > self.stall_after:
                event = GapEvent(self.conn, self.last_echo, now, round(gap * 1000, 3))
                self.gaps.append(event)
        self.last_echo = now
        return event

    def on_lost(self, now: float, reset: bool) -> None:
        """The connection ended: reset (or closed) by the network, or could not be made."""
        if self.up:
            self.resets += int(reset)
            self.up = False
        elif not reset:
            self.connect_failures += 1

    def open_gap(self, now: float) -> float:
        """Seconds since the last echo (0 when none is expected yet)."""
        return 0.0 if self.last_echo is None else now - self.last_echo

    def finish(self, now: float) -> None:
        """Close the books: a stall still running at the end is reported, end None."""
        if self.up and self.last_echo is not None:
            gap = now - self.last_echo
            self.longest_gap = max(self.longest_gap, gap)
            if gap > self.stall_after:
                self.gaps.append(GapEvent(self.conn, self.last_echo, None, round(gap * 1000, 3)))

    def summary(self) -> dict[str, Any]:
        return {
            "conn": self.conn,
            "sent": self.sent,
            "echoed": self.echoed,
            "bytes_sent": self.bytes_sent,
            "bytes_echoed": self.bytes_echoed,
            "send_skipped": self.send_skipped,
            "resets": self.resets,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "stalls": len(self.gaps),
            "longest_gap_ms": _ms(self.longest_gap),
            "rtt_p50_ms": _ms(percentile(self.rtts, 50)),
            "rtt_p99_ms": _ms(percentile(self.rtts, 99)),
        }


@dataclass(slots=True)
class RequestStats:
    """Request/reply probes (new TCP connections, UDP datagrams, pings)."""

    kind: str
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def on_ok(self, latency: float) -> None:
        self.ok += 1
        if len(self.latencies) < MAX_SAMPLES:
            self.latencies.append(latency)

    def on_failed(self, reason: str) -> None:
        self.failed += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "errors": dict(self.errors),
            "latency_p50_ms": _ms(percentile(self.latencies, 50)),
            "latency_p99_ms": _ms(percentile(self.latencies, 99)),
            "latency_max_ms": _ms(max(self.latencies) if self.latencies else None),
        }


def progress_line(
    elapsed: float, conns: Iterable[LongLived], requests: Iterable[RequestStats], now: float
) -> str:
    conns = list(conns)
    up = sum(c.up for c in conns)
    stalls = sum(len(c.gaps) for c in conns)
    worst = max((max(c.longest_gap, c.open_gap(now) if c.up else 0.0) for c in conns), default=0)
    parts = [
        f"t={elapsed:5.1f}s",
        f"long-lived {up}/{len(conns)} up",
        f"echoes {sum(c.echoed for c in conns)}",
        f"resets {sum(c.resets for c in conns)}",
        f"stalls {stalls} (max gap {worst * 1000:.0f} ms)",
    ]
    for r in requests:
        parts.append(f"{r.kind} {r.ok} ok {r.failed} failed")
    return "  ".join(parts)


def run_summary(
    started: float,
    ended: float,
    conns: Sequence[LongLived],
    requests: Sequence[RequestStats],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The final report (JSON-ready); ``clean`` is True when nothing failed or stalled."""
    gaps = [g for c in conns for g in c.gaps]
    kept = sorted(gaps, key=lambda g: g.start)[:MAX_GAP_EVENTS]
    failures = sum(c.resets + c.connect_failures for c in conns) + sum(r.failed for r in requests)
    return {
        "clock": "CLOCK_MONOTONIC",
        "started": started,
        "ended": ended,
        "seconds": round(ended - started, 3),
        "settings": settings,
        "long_lived": {
            "connections": len(conns),
            "echoed": sum(c.echoed for c in conns),
            "bytes": sum(c.bytes_sent + c.bytes_echoed for c in conns),
            "resets": sum(c.resets for c in conns),
            "stalls": len(gaps),
            "longest_gap_ms": max((c.longest_gap for c in conns), default=0.0) * 1000,
            "per_connection": [c.summary() for c in conns],
        },
        "gap_events": [g.as_dict() for g in kept],
        "gap_events_dropped": len(gaps) - len(kept),
        **{r.kind: r.summary() for r in requests},
        "clean": failures == 0 and not gaps and all(c.echoed > 0 for c in conns),
    }


def human_summary(s: dict[str, Any]) -> str:
    ll = s["long_lived"]
    lines = [
        f"traffic for {s['seconds']:.1f} s: " + ("clean" if s["clean"] else "PROBLEMS"),
        f"  long-lived: {ll['connections']} connections, {ll['echoed']} echoes, "
        f"{ll['bytes']} bytes, {ll['resets']} resets, {ll['stalls']} stalls, "
        f"longest gap {ll['longest_gap_ms']:.1f} ms",
    ]
    for kind in ("churn", "udp", "ping"):
        r = s.get(kind)
        if r is None:
            continue
        p50, p99 = r["latency_p50_ms"], r["latency_p99_ms"]
        lat = "" if p50 is None else f", latency p50 {p50:.2f} ms p99 {p99:.2f} ms"
        errs = f" ({', '.join(f'{k} {v}' for k, v in r['errors'].items())})" if r["errors"] else ""
        lines.append(f"  {kind}: {r['ok']} ok, {r['failed']} failed{errs}{lat}")
    for g in s["gap_events"][:20]:
        end = "still stalled" if g["end"] is None else f"resumed {g['end']:.3f}"
        lines.append(f"  stall conn {g['conn']}: {g['gap_ms']:.1f} ms from {g['start']:.3f}, {end}")
    return "\n".join(lines)
