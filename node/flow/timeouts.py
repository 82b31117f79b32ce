"""Flow timeouts (Linux sysctl defaults) and the deadline heap.

:class:`Timeouts` holds one idle timeout per protocol state, in seconds,
with the defaults of ``net.netfilter.nf_conntrack_*_timeout*`` (see
``Documentation/networking/nf_conntrack-sysctl.rst``).  Two TCP values are
not states but caps applied like the kernel does in ``tcp_packet``:
``tcp_unacknowledged`` while either side has data in flight that the other
has not acknowledged, and ``tcp_max_retrans`` once the same segment has been
retransmitted ``node.flow.tcp.MAX_RETRANS`` times (or the peer advertises a
zero window); each cap applies only when it is shorter than the state's own
timeout.

:class:`DeadlineHeap` orders flows by deadline so the table can expire them
and tell an adapter when to wake (one timer, aioquic style).  It holds
exactly one entry per flow, addressed by the flow's slot number:

* a refresh that moves a deadline *later* (every ordinary packet) touches
  nothing; the entry keeps its older, earlier time and is re-keyed when it
  reaches the top (``FlowTable.expire`` compares it with the real deadline);
* a deadline moving *earlier* (ESTABLISHED -> FIN_WAIT, data in flight)
  sifts the entry up at once, and a deleted flow's entry is removed at once,
  so stale entries never accumulate.

It is a 4-ary heap over ``array`` columns: 16 bytes per flow instead of a
tuple per entry, and half the levels of a binary heap for the sift-ups that
dominate (new flows and shortened deadlines).
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from node.errors import ConfigError, Misuse

__all__ = ["DeadlineHeap", "Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds; defaults are Linux's."""

    tcp_syn_sent: float = 120.0  # SYN seen, no answer yet
    tcp_syn_recv: float = 60.0  # SYN/ACK seen, waiting for the final ACK
    tcp_established: float = 432000.0  # 5 days, as Linux
    tcp_fin_wait: float = 120.0  # one side sent FIN
    tcp_close_wait: float = 60.0  # FIN acknowledged, other side still open
    tcp_last_ack: float = 30.0  # FIN in both directions, last ACK pending
    tcp_time_wait: float = 120.0  # closed; lingers so late segments still match
    tcp_close: float = 10.0  # reset; lingers briefly for retransmitted RSTs
    tcp_syn_sent2: float = 120.0  # simultaneous open: SYNs crossed
    tcp_max_retrans: float = 300.0  # cap once a segment is retransmitted MAX_RETRANS times
    tcp_unacknowledged: float = 300.0  # cap while data is unacknowledged
    udp: float = 30.0  # UDP before any reply
    udp_stream: float = 120.0  # UDP once a reply was seen (assured)
    icmp: float = 30.0  # ICMP / ICMPv6 query flows (echo ...)
    generic: float = 600.0  # any other protocol

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"timeout {field.name}: {value!r} is not a number")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"timeout {field.name}: {value!r} is not a positive number")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Timeouts:
        """Defaults overridden by ``values`` (names as the fields, e.g. ``udp_stream``).

        Raises :class:`node.errors.ConfigError` for an unknown name or a value
        that is not a positive, finite number.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(name) for name in values if name not in known)
        if unknown:
            raise ConfigError(f"unknown timeout(s): {', '.join(unknown)}")
        return cls(**values)  # type: ignore[arg-type]  # __post_init__ checks the types


_ARITY: Final = 4
_ABSENT: Final = 0xFFFFFFFF  # _pos value of a slot with no entry


class DeadlineHeap:
    """Min-heap of ``(deadline, slot)`` with at most one entry per slot."""

    __slots__ = ("_heap", "_key", "_pos")

    def __init__(self) -> None:
        self._heap: array[int] = array("I")  # slots in heap order
        self._key: array[float] = array("d")  # per slot: the time its entry sorts by
        self._pos: array[int] = array("I")  # per slot: index in _heap, or _ABSENT

    def grow(self, slots: int) -> None:
        """Make room for slot numbers below ``slots``."""
        extra = slots - len(self._pos)
        if extra > 0:
            self._key.frombytes(bytes(8 * extra))
            self._pos.frombytes(b"\xff" * (4 * extra))

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, slot: int) -> bool:
        return slot < len(self._pos) and self._pos[slot] != _ABSENT

    def push(self, slot: int, deadline: float) -> None:
        """Add ``slot``; it must not be in the heap."""
        if slot in self:
            raise Misuse(f"slot {slot} already has a deadline")
        self._key[slot] = deadline
        self._heap.append(slot)
        self._sift_up(len(self._heap) - 1, slot, deadline)

    def lower(self, slot: int, deadline: float) -> None:
        """Move ``slot``'s entry earlier if ``deadline`` is before it.

        Later deadlines are deliberately ignored (see the module docstring):
        the caller re-keys the entry with :meth:`rekey_top` when it surfaces.
        """
        if deadline < self._key[slot]:
            self._key[slot] = deadline
            self._sift_up(self._pos[slot], slot, deadline)

    def top(self) -> tuple[float, int] | None:
        """``(time, slot)`` of the earliest entry, or None when empty."""
        if not self._heap:
            return None
        slot = self._heap[0]
        return self._key[slot], slot

    def rekey_top(self, deadline: float) -> None:
        """Give the top entry a later ``deadline`` and restore heap order."""
        slot = self._heap[0]
        if deadline < self._key[slot]:
            raise Misuse("rekey_top only moves the top entry later")
        self._key[slot] = deadline
        self._sift_down(0, slot, deadline)

    def remove(self, slot: int) -> None:
        """Remove ``slot``'s entry; it must be in the heap."""
        heap, pos = self._heap, self._pos
        i = pos[slot]
        if i == _ABSENT:
            raise Misuse(f"slot {slot} has no deadline")
        pos[slot] = _ABSENT
        last = heap.pop()
        if last == slot:
            return
        key = self._key[last]
        heap[i] = last
        pos[last] = i
        if i > 0 and key < self._key[heap[(i - 1) // _ARITY]]:
            self._sift_up(i, last, key)
        else:
            self._sift_down(i, last, key)

    def clear(self) -> None:
        for slot in self._heap:
            self._pos[slot] = _ABSENT
        del self._heap[:]

    def _sift_up(self, i: int, slot: int, key: float) -> None:
        heap, keys, pos = self._heap, self._key, self._pos
        while i > 0:
            parent = (i - 1) // _ARITY
            above = heap[parent]
            if keys[above] <= key:
                break
            heap[i] = above
            pos[above] = i
            i = parent
        heap[i] = slot
        pos[slot] = i

    def _sift_down(self, i: int, slot: int, key: float) -> None:
        heap, keys, pos = self._heap, self._key, self._pos
        size = len(heap)
        while True:
            first = _ARITY * i + 1
            if first >= size:
                break
            best, best_key = first, keys[heap[first]]
            child, stop = first + 1, first + _ARITY
            if stop > size:
                stop = size
            while child < stop:
                child_key = keys[heap[child]]
                if child_key < best_key:
                    best, best_key = child, child_key
                child += 1
            if best_key >= key:
                break
            below = heap[best]
            heap[i] = below
            pos[below] = i
            i = best
        heap[i] = slot
        pos[slot] = i

    def check(self) -> None:
        """Verify heap order and the position index (tests and debugging)."""
        for i, slot in enumerate(self._heap):
            if self._pos[slot] != i:
                raise Misuse(f"slot {slot} at {i} but indexed at {self._pos[slot]}")
            if i and self._key[self._heap[(i - 1) // _ARITY]] > self._key[slot]:
                raise Misuse(f"heap order broken at {i}")
        indexed = sum(1 for p in self._pos if p != _ABSENT)
        if indexed != len(self._heap):
            raise Misuse(f"{indexed} slots indexed, {len(self._heap)} in heap")
