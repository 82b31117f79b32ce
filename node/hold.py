"""The asymmetric-routing hold queue: packets waiting for their flow's replica.

In an active-active cluster the two directions of a flow may cross
different nodes (ECMP upstream and downstream hash independently).  The node
that sees a SYN-ACK, a reply datagram or an ICMP error first may not hold
the flow yet: the node that saw the opening packet has created it and its
syncd is replicating it here, a millisecond or two behind the packet.
Judged at once, such a packet is INVALID (or a NEW flow the policy drops)
and the connection stalls for a retransmission timeout.

So the adapter *holds* it (its NFQUEUE verdict deferred) under its flow key
until the sync link installs a record for that key, then judges it again;
after ``timeout`` it is judged as it would have been without holding.  What
is holdable is the engine's call (``Decision.hold_key``); this module only
keeps the packets, pure: values and ``now`` in, packets out.

Bounds, all counted and none blocking: ``max_packets`` held in all,
``max_flows`` distinct keys.  A packet beyond either is refused
(:meth:`HoldQueue.hold` returns False): the caller judges it at once.
Refusing the newest instead of evicting the oldest keeps every held packet's
wait bounded by ``timeout``.

Order: packets of one key are released in arrival order; expiry goes
oldest first (one timeout for all, so arrival order is deadline order).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from node.config import HoldConfig

__all__ = ["LATENCY_BOUNDS_MS", "Held", "HoldQueue", "HoldStats"]

T = TypeVar("T")

# Upper bounds (milliseconds) of the release-latency histogram buckets; the
# last bucket is everything above.  Replication takes about 1.5-5 ms on a
# LAN (docs/syncd.md), the default timeout is 100 ms.  Fine enough that a
# p50/p99 read off the buckets (:func:`node.histogram.bucket_quantile`) is within a
# quarter of its value: the added delay of asymmetric routing is reported
# from these (docs/asymmetric.md).
LATENCY_BOUNDS_MS: Final = (
    0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
    12.5, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 75.0, 100.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Held(Generic[T]):
    key: bytes  # the flow key the packet waits for
    item: T  # what the caller stored (the packet and how to judge it again)
    since: float  # when it was held (the caller's clock)


@dataclass(frozen=True, slots=True)
class HoldStats:
    held_total: int  # packets held
    released_by_replica_total: int  # released because a record for their key arrived
    expired_total: int  # released by the timeout (judged as without holding)
    flushed_total: int  # released at shutdown
    overflow_total: int  # refused: max_packets or max_flows reached (judged at once)
    waiting: int  # packets held now
    waiting_flows: int  # distinct keys held now
    # Release latency (hold -> replica) histogram: bucket upper bounds in ms
    # (LATENCY_BOUNDS_MS, then +inf), per-bucket counts (not cumulative), sum.
    latency_bounds_ms: tuple[float, ...]
    latency_counts: tuple[int, ...]
    latency_sum_ms: float
    latency_max_ms: float


class HoldQueue(Generic[T]):
    """Packets keyed by flow key, bounded, released by key or by timeout."""

    def __init__(self, config: HoldConfig) -> None:
        self._timeout = config.timeout
        self._max_packets = config.max_packets
        self._max_flows = config.max_flows
        self._seq = 0
        # seq -> entry, in arrival (= deadline) order; O(1) removal anywhere.
        self._all: OrderedDict[int, Held[T]] = OrderedDict()
        self._by_key: dict[bytes, deque[int]] = {}
        self._buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self._latency_sum = 0.0
        self._latency_max = 0.0
        self._n = dict.fromkeys(("held", "released", "expired", "flushed", "overflow"), 0)

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def hold(self, key: bytes, item: T, now: float) -> bool:
        """Hold ``item`` under ``key``; False (counted) when a bound is reached."""
        seqs = self._by_key.get(key)
        if len(self._all) >= self._max_packets or (
            seqs is None and len(self._by_key) >= self._max_flows
        ):
            self._n["overflow"] += 1
            return False
        if seqs is None:
            seqs = self._by_key[key] = deque()
        self._seq += 1
        seqs.append(self._seq)
        self._all[self._seq] = Held(key, item, now)
        self._n["held"] += 1
        return True

    def release(self, key: bytes, now: float) -> list[Held[T]]:
        """Every packet held under ``key``, in arrival order (its record arrived)."""
        seqs = self._by_key.pop(key, None)
        if seqs is None:
            return []
        out = [self._all.pop(seq) for seq in seqs]
        for held in out:
            self._observe_latency((now - held.since) * 1000.0)
        self._n["released"] += len(out)
        return out

    def expire(self, now: float) -> list[Held[T]]:
        """Packets whose wait reached ``timeout``, oldest first."""
        out: list[Held[T]] = []
        while self._all:
            seq, held = next(iter(self._all.items()))
            if held.since + self._timeout > now:  # as next_deadline() computes it
                break
            self._all.popitem(last=False)
            self._forget(held.key, seq)
            out.append(held)
        self._n["expired"] += len(out)
        return out

    def flush(self) -> list[Held[T]]:
        """Everything held, oldest first (shutdown: judge them all now)."""
        out = list(self._all.values())
        self._all.clear()
        self._by_key.clear()
        self._n["flushed"] += len(out)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to release, or None when empty."""
        if not self._all:
            return None
        return next(iter(self._all.values())).since + self._timeout

    def _forget(self, key: bytes, seq: int) -> None:
        seqs = self._by_key[key]
        seqs.popleft()  # the oldest of its key: expiry is in arrival order
        if not seqs:
            del self._by_key[key]

    def _observe_latency(self, ms: float) -> None:
        self._buckets[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
        self._latency_sum += ms
        if ms > self._latency_max:
            self._latency_max = ms

    def statistics(self) -> HoldStats:
        n = self._n
        return HoldStats(
            n["held"], n["released"], n["expired"], n["flushed"], n["overflow"],
            len(self._all), len(self._by_key), LATENCY_BOUNDS_MS, tuple(self._buckets),
            round(self._latency_sum, 3), round(self._latency_max, 3),
        )  # fmt: skip
