"""node.kernel_ct: the queue of FAST-mark clears, with an in-memory ctnetlink."""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

import pytest

from node.kernel_ct import KernelConntrack, Tuple5, tuple_of

FAST = 0x40000000


@dataclass(frozen=True)
class Flow:
    family: int
    proto: int
    orig_src: int
    orig_sport: int
    orig_dst: int
    orig_dport: int


V4_FLOW = Flow(4, 6, 0x0A0A0102, 40000, 0x0A0A0202, 80)


class FakeKernel:
    """Entries keyed by (which, tuple); marks per entry."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, Tuple5], int] = {}
        self.tried: list[tuple[str, Tuple5]] = []
        self.fail: OSError | Exception | None = None

    def add(self, orig: Tuple5, mark: int) -> None:
        self.entries[("orig", orig)] = mark
        self.entries[("reply", orig.reversed())] = mark

    async def clear_mark(self, which: str, t: Tuple5, mask: int) -> bool:
        self.tried.append((which, t))
        if self.fail is not None:
            raise self.fail
        if (which, t) not in self.entries:
            return False
        self.entries[(which, t)] &= ~mask
        return True

    async def clear_all(self, mask: int) -> int:
        if self.fail is not None:
            raise self.fail
        marked = [k for k, v in self.entries.items() if k[0] == "orig" and v & mask]
        for k in marked:
            self.entries[k] &= ~mask
        return len(marked)

    def close(self) -> None:
        pass


def test_tuple_of_formats_addresses_per_family():
    assert tuple_of(V4_FLOW) == Tuple5(4, 6, "10.10.1.2", 40000, "10.10.2.2", 80)
    v6 = Flow(6, 17, 0xFD000010000100000000000000000002, 5353, 1, 53)
    assert tuple_of(v6) == Tuple5(6, 17, "fd00:10:1::2", 5353, "::1", 53)


def test_forget_clears_the_kernel_entry_by_its_original_tuple():
    kernel = FakeKernel()
    kernel.add(tuple_of(V4_FLOW), FAST | 0x5)
    ct = KernelConntrack(FAST, backend=kernel)
    ct.forget(V4_FLOW)
    asyncio.run(ct.drain())
    assert kernel.entries[("orig", tuple_of(V4_FLOW))] == 0x5  # only our bit cleared
    stats = ct.statistics()
    assert (stats.queued_total, stats.cleared_total, stats.absent_total) == (1, 1, 0)
    assert stats.pending == 0


def test_a_flow_the_kernel_sees_reversed_is_found_by_the_later_attempts():
    kernel = FakeKernel()
    kernel.add(tuple_of(V4_FLOW).reversed(), FAST)  # kernel's orig is our reply
    ct = KernelConntrack(FAST, backend=kernel)
    ct.forget(V4_FLOW)
    asyncio.run(ct.drain())
    t = tuple_of(V4_FLOW)
    # orig=ours misses; reply=reversed(ours) misses; orig=reversed(ours) hits.
    assert kernel.tried == [("orig", t), ("reply", t.reversed()), ("orig", t.reversed())]
    assert ct.statistics().cleared_total == 1


def test_a_vanished_kernel_entry_is_counted_absent_not_an_error():
    kernel = FakeKernel()
    ct = KernelConntrack(FAST, backend=kernel)
    ct.forget(V4_FLOW)
    asyncio.run(ct.drain())
    assert len(kernel.tried) == 4
    stats = ct.statistics()
    assert (stats.absent_total, stats.errors_total) == (1, 0)


@pytest.mark.parametrize("error", [OSError(errno.EPERM, "denied"), RuntimeError("library bug")])
def test_kernel_errors_are_counted_and_never_raised(error, caplog):
    kernel = FakeKernel()
    kernel.fail = error
    ct = KernelConntrack(FAST, backend=kernel)
    ct.forget(V4_FLOW)
    ct.forget(V4_FLOW)
    asyncio.run(ct.drain())
    assert asyncio.run(ct.flush_marks()) == 0
    assert ct.statistics().errors_total == 3
    # Logged once per kind (update, flush), not per failure.
    assert len([r for r in caplog.records if "kernel conntrack" in r.getMessage()]) == 2


def test_the_queue_is_bounded_and_overflow_counted():
    ct = KernelConntrack(FAST, backend=FakeKernel(), max_pending=2)
    for port in range(5):
        ct.forget(Flow(4, 17, 1, port, 2, 53))
    stats = ct.statistics()
    assert (stats.pending, stats.overflow_total, stats.queued_total) == (2, 3, 5)


def test_the_drain_task_applies_updates_as_they_arrive_and_stop_finishes_them():
    kernel = FakeKernel()
    kernel.add(tuple_of(V4_FLOW), FAST)

    async def scenario() -> None:
        ct = KernelConntrack(FAST, backend=kernel)
        ct.start()
        ct.forget(V4_FLOW)
        for _ in range(10):
            await asyncio.sleep(0)
        assert ct.statistics().cleared_total == 1
        ct.forget(Flow(4, 17, 1, 2, 3, 4))
        await ct.stop()
        assert ct.statistics().pending == 0
        assert ct.statistics().absent_total == 1

    asyncio.run(scenario())


def test_flush_marks_clears_every_marked_entry():
    kernel = FakeKernel()
    kernel.add(Tuple5(4, 6, "1.1.1.1", 1, "2.2.2.2", 2), FAST)
    kernel.add(Tuple5(4, 6, "1.1.1.1", 3, "2.2.2.2", 4), 0x1)
    ct = KernelConntrack(FAST, backend=kernel)
    assert asyncio.run(ct.flush_marks()) == 1
    assert ct.statistics().flushed_total == 1
