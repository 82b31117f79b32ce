"""Pure parts of ``stockade bench dataplane``: the rate search, the statistics
and the parsers of what iperf3 and the kernel print.

Nothing here runs a process or reads a clock, so every rule the benchmark
follows (when a step passes, where the next probe goes, how a ratio is
formed) is unit-tested on its own.

Why a geometric bisection: the interesting packet rates span two orders of
magnitude (a few thousand to a few hundred thousand packets per second), so
the search halves the *ratio* between the highest passing and the lowest
failing rate rather than their difference.  The first probe is the ceiling
(what the traffic generator reaches with no firewall at all): a system that
keeps up there is limited by the generator, and the result says so.

Why medians of per-repeat ratios: the machine is noisy (2 cores shared by
generator, receiver and firewall).  Each repeat measures the systems side by
side, one after another, and the ratio of that repeat cancels whatever the
machine was doing at that moment; the median over repeats then discards the
odd repeat a neighbour disturbed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import DataplaneError, Misuse


class BenchError(DataplaneError):
    """A measurement could not be made (a tool failed, a process did not start).

    Raised by the benchmark only; the CLI prints it as one line.
    """


# -- statistics -----------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    """The median, or None for no values (a part that was skipped or failed)."""
    data = list(values)
    return statistics.median(data) if data else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is missing or the divisor is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def paired_ratios(
    numerators: Sequence[float | None], denominators: Sequence[float | None]
) -> list[float]:
    """Ratios of values measured in the same repeat; repeats missing either are left out."""
    if len(numerators) != len(denominators):
        raise Misuse(f"{len(numerators)} numerators for {len(denominators)} denominators")
    pairs = (ratio(n, d) for n, d in zip(numerators, denominators, strict=True))
    return [r for r in pairs if r is not None]


def cost_over(baseline_rate: float | None, rate: float | None) -> float | None:
    """Extra time per packet of ``rate`` over ``baseline_rate`` (0.2 = 20% more).

    At full load a loop's packet rate is the inverse of its time per packet,
    so the cost is ``baseline / rate - 1``.
    """
    r = ratio(baseline_rate, rate)
    return None if r is None else r - 1.0


# -- rate search ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchConfig:
    # Lowest rate (packets/s) the search considers; below it the result is "none".
    low: float
    # First probe and upper bound (packets/s): the generator's ceiling.
    high: float
    # Probes at most, the first included (each costs one traffic step).
    max_steps: int
    # Stop once the highest pass and the lowest failure are this close (0.05 = 5%).
    precision: float
    # A step passes when its loss fraction is below this (0.001 = 0.1%).
    loss_threshold: float

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise Misuse(f"need 0 < low < high, got low={self.low} high={self.high}")
        if self.max_steps < 1:
            raise Misuse(f"max_steps must be at least 1, not {self.max_steps}")
        if not 0 < self.precision < 1:
            raise Misuse(f"precision must be in (0, 1), not {self.precision}")
        if not 0 < self.loss_threshold < 1:
            raise Misuse(f"loss_threshold must be in (0, 1), not {self.loss_threshold}")


@dataclass(frozen=True, slots=True)
class Step:
    target_pps: float  # rate asked of the generator
    achieved_pps: float  # rate the generator really sent
    loss: float  # fraction of sent packets that never arrived or were dropped
    passed: bool


@dataclass(frozen=True, slots=True)
class SearchResult:
    best_pps: float | None  # highest achieved rate of a passing step; None if none passed
    # The generator, not the system, set the best rate: the ceiling probe
    # passed, or the best passing step sent clearly less than was asked.
    capped: bool
    steps: tuple[Step, ...]


class RateSearch:
    """Geometric bisection for the highest rate with loss below the threshold.

    Use: ``while (rate := s.next_rate()) is not None: s.record(rate, ...)``.
    Assumes loss grows with rate; a noisy non-monotonic answer only makes the
    search end on a narrower interval, never loop.
    """

    def __init__(self, config: SearchConfig) -> None:
        self._config = config
        self._low = config.low  # highest rate sent that passed (or the floor)
        self._high = config.high  # lowest rate sent that failed (or the ceiling)
        self._steps: list[Step] = []
        self._pending: float | None = None
        self._capped = False

    def next_rate(self) -> float | None:
        """The next target rate to probe, or None when the search is over."""
        c = self._config
        if self._pending is not None:
            return self._pending
        if self._capped or len(self._steps) >= c.max_steps:
            return None
        if not self._steps:
            self._pending = c.high
        elif self._high / self._low <= 1.0 + c.precision:
            return None
        else:
            self._pending = math.sqrt(self._low * self._high)
        return self._pending

    def record(self, target_pps: float, achieved_pps: float, loss: float) -> Step:
        """Report the outcome of the probe :meth:`next_rate` returned."""
        if self._pending is None or target_pps != self._pending:
            raise Misuse(f"record({target_pps}) without a matching next_rate()")
        if achieved_pps < 0 or not 0.0 <= loss <= 1.0:
            raise Misuse(f"bad step outcome: achieved={achieved_pps} loss={loss}")
        self._pending = None
        step = Step(target_pps, achieved_pps, loss, loss < self._config.loss_threshold)
        # The interval moves to the rates really sent: a pass at a rate the
        # generator fell short of proves only the rate it reached.
        if step.passed:
            self._capped = not self._steps  # the very first probe is the ceiling
            self._low = max(self._low, achieved_pps)
        else:
            self._high = min(self._high, achieved_pps)
        self._steps.append(step)
        return step

    def result(self) -> SearchResult:
        passing = [s for s in self._steps if s.passed]
        if not passing:
            return SearchResult(None, False, tuple(self._steps))
        best = max(passing, key=lambda s: s.achieved_pps)
        short = best.achieved_pps * (1.0 + self._config.precision) < best.target_pps
        return SearchResult(best.achieved_pps, self._capped or short, tuple(self._steps))


# -- iperf3 JSON ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpRun:
    sent_packets: int  # datagrams the client sent
    seconds: float  # sending time
    lost_packets: int  # sequence gaps iperf3's server saw (0 when a sink drops them)

    @property
    def achieved_pps(self) -> float:
        return self.sent_packets / self.seconds if self.seconds > 0 else 0.0


def loss_fraction(sent: int, received: int, queue_drops: int = 0) -> float:
    """Fraction of ``sent`` packets lost: not received, or dropped at the queue.

    The larger of the two counts wins: the receiver's count sees every loss
    on the path, the queue's own drop counters name where it happened.
    """
    if sent <= 0:
        return 1.0
    return min(1.0, max(sent - received, queue_drops, 0) / sent)


@dataclass(frozen=True, slots=True)
class TcpRun:
    bits_per_second: float  # goodput as received by the server
    seconds: float
    retransmits: int  # sender-side retransmitted segments (-1 if not reported)


def _iperf_end(text: str) -> Mapping[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise BenchError(f"iperf3 printed no JSON: {text.strip()[:200]!r}") from e
    if not isinstance(doc, dict):
        raise BenchError("iperf3 JSON is not an object")
    if doc.get("error"):
        raise BenchError(f"iperf3: {doc['error']}")
    end = doc.get("end")
    if not isinstance(end, dict):
        raise BenchError("iperf3 JSON has no 'end' section")
    return end


def _section(end: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    for name in names:
        value = end.get(name)
        if isinstance(value, dict):
            return value
    raise BenchError(f"iperf3 JSON has none of {', '.join(names)} in 'end'")


def _number(section: Mapping[str, Any], key: str) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BenchError(f"iperf3 JSON: {key!r} missing or not a number")
    return float(value)


def parse_iperf_udp(text: str) -> UdpRun:
    """A UDP client's ``iperf3 -J`` output (3.7+: sum_sent/sum_received, else sum)."""
    end = _iperf_end(text)
    sent = _section(end, "sum_sent", "sum")
    received = _section(end, "sum_received", "sum")
    return UdpRun(
        sent_packets=int(_number(sent, "packets")),
        seconds=_number(sent, "seconds"),
        lost_packets=int(_number(received, "lost_packets")),
    )


def parse_iperf_tcp(text: str) -> TcpRun:
    """A TCP client's ``iperf3 -J`` output: the receiver's goodput."""
    end = _iperf_end(text)
    received = _section(end, "sum_received")
    sent = _section(end, "sum_sent")
    retransmits = sent.get("retransmits", -1)
    return TcpRun(
        bits_per_second=_number(received, "bits_per_second"),
        seconds=_number(received, "seconds"),
        retransmits=retransmits if isinstance(retransmits, int) else -1,
    )


# -- iptables counters and CPU time --------------------------------------------------


def parse_rule_packets(listing: str, comment: str) -> int:
    """Packets of the rule tagged ``comment`` in ``iptables -x -v -n -L CHAIN`` output."""
    tag = f"/* {comment} */"
    for line in listing.splitlines():
        if tag in line:
            first = line.split()[0]
            if first.isdigit():
                return int(first)
            raise BenchError(f"iptables counter not understood: {line.strip()!r}")
    raise BenchError(f"no iptables rule tagged {comment!r}")


def parse_schedstat(text: str) -> int:
    """Nanoseconds on CPU from one ``/proc/PID/task/TID/schedstat`` (its first field)."""
    fields = text.split()
    if len(fields) != 3 or not all(f.isdigit() for f in fields):
        raise BenchError(f"schedstat not understood: {text.strip()!r}")
    return int(fields[0])


# -- /proc/net/netfilter/nfnetlink_queue -----------------------------------------


@dataclass(frozen=True, slots=True)
class QueueCounters:
    queue_num: int
    peer_portid: int  # netlink port of the bound process
    waiting: int  # packets queued to userspace now
    copy_mode: int
    copy_range: int
    queue_dropped: int  # kernel dropped: queue longer than max_len
    user_dropped: int  # kernel dropped: the reader's socket buffer was full
    id_sequence: int  # id of the last packet queued (counts packets ever queued)

    @property
    def dropped(self) -> int:
        return self.queue_dropped + self.user_dropped


def parse_nfqueue_proc(text: str) -> dict[int, QueueCounters]:
    """Parse the kernel's per-queue lines (nfnetlink_queue.c ``seq_show``).

    Each line is nine integers: queue_num, peer_portid, queue_total,
    copy_mode, copy_range, queue_dropped, user_dropped, id_sequence, 1.
    """
    queues: dict[int, QueueCounters] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        cols = line.split()
        if not cols:
            continue
        if len(cols) < 8 or not all(c.isdigit() for c in cols[:8]):
            raise BenchError(f"nfnetlink_queue line {lineno} not understood: {line.strip()!r}")
        counters = QueueCounters(*(int(c) for c in cols[:8]))
        queues[counters.queue_num] = counters
    return queues


def queue_delta(
    before: Mapping[int, QueueCounters], after: Mapping[int, QueueCounters], num: int
) -> tuple[int, int]:
    """(packets queued, packets dropped) on queue ``num`` between two readings.

    The queue must be bound at both readings: a queue that vanished means the
    process reading it died during the step, and the step means nothing.
    """
    if num not in before or num not in after:
        raise BenchError(f"NFQUEUE {num} was not bound during the whole step")
    b, a = before[num], after[num]
    if a.peer_portid != b.peer_portid:
        raise BenchError(f"NFQUEUE {num} changed reader during the step")
    return (a.id_sequence - b.id_sequence) % (1 << 32), a.dropped - b.dropped
