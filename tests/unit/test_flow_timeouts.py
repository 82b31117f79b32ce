"""Timeouts config and the deadline heap."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from node.errors import ConfigError, Misuse
from node.flow.timeouts import DeadlineHeap, Timeouts


def test_defaults_are_linux_sysctl_defaults() -> None:
    t = Timeouts()
    assert (t.tcp_syn_sent, t.tcp_syn_recv, t.tcp_established) == (120, 60, 432000)
    assert (t.tcp_fin_wait, t.tcp_close_wait, t.tcp_last_ack) == (120, 60, 30)
    assert (t.tcp_time_wait, t.tcp_close, t.tcp_syn_sent2) == (120, 10, 120)
    assert (t.tcp_max_retrans, t.tcp_unacknowledged) == (300, 300)
    assert (t.udp, t.udp_stream, t.icmp, t.generic) == (30, 120, 30, 600)


def test_from_mapping_overrides_only_what_it_names() -> None:
    t = Timeouts.from_mapping({"tcp_established": 3600, "udp": 10.5})
    assert t.tcp_established == 3600 and t.udp == 10.5
    assert t.udp_stream == 120 and t.tcp_syn_sent == 120
    assert Timeouts.from_mapping({}) == Timeouts()


def test_from_mapping_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="udp_streem"):
        Timeouts.from_mapping({"udp_streem": 100})


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "30", None, True])
def test_bad_values_are_config_errors(value: object) -> None:
    with pytest.raises(ConfigError, match="icmp"):
        Timeouts.from_mapping({"icmp": value})


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError):
        Timeouts(generic=-5)
    assert dataclasses.replace(Timeouts(), generic=1e-3).generic == 1e-3


def _drain(heap: DeadlineHeap) -> list[tuple[float, int]]:
    out = []
    while (top := heap.top()) is not None:
        out.append(top)
        heap.remove(top[1])
    return out


def test_heap_orders_by_deadline_and_removes_anywhere() -> None:
    heap = DeadlineHeap()
    heap.grow(100)
    rng = random.Random(7)
    deadlines = {slot: rng.uniform(0, 1000) for slot in range(100)}
    for slot, deadline in deadlines.items():
        heap.push(slot, deadline)
    heap.check()
    for slot in range(0, 100, 3):
        heap.remove(slot)
        del deadlines[slot]
        heap.check()
    assert len(heap) == len(deadlines)
    assert _drain(heap) == sorted((d, s) for s, d in deadlines.items())


def test_heap_lower_moves_earlier_and_ignores_later() -> None:
    heap = DeadlineHeap()
    heap.grow(3)
    for slot, deadline in ((0, 10.0), (1, 20.0), (2, 30.0)):
        heap.push(slot, deadline)
    heap.lower(2, 5.0)
    assert heap.top() == (5.0, 2)
    heap.lower(2, 50.0)  # later: the entry keeps its earlier time
    assert heap.top() == (5.0, 2)
    heap.rekey_top(50.0)
    heap.check()
    assert _drain(heap) == [(10.0, 0), (20.0, 1), (50.0, 2)]


def test_heap_misuse() -> None:
    heap = DeadlineHeap()
    heap.grow(2)
    heap.push(0, 1.0)
    with pytest.raises(Misuse):
        heap.push(0, 2.0)
    with pytest.raises(Misuse):
        heap.remove(1)
    with pytest.raises(Misuse):
        heap.rekey_top(0.5)
    heap.clear()
    assert len(heap) == 0 and heap.top() is None and 0 not in heap
