"""node.hold.HoldQueue: bounds, timeouts, release order, latency histogram (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import HoldConfig
from node.errors import ConfigError
from node.hold import LATENCY_BOUNDS_MS, HoldQueue

A, B, C = b"key-a", b"key-b", b"key-c"


def queue(timeout: float = 0.02, max_packets: int = 8, max_flows: int = 4) -> HoldQueue[str]:
    return HoldQueue(HoldConfig(timeout, max_packets, max_flows))


def test_release_returns_one_keys_packets_in_arrival_order():
    q = queue()
    assert q.hold(A, "a1", 1.000) and q.hold(B, "b1", 1.001) and q.hold(A, "a2", 1.002)
    assert A in q and len(q) == 3
    assert [h.item for h in q.release(A, 1.004)] == ["a1", "a2"]
    assert A not in q and len(q) == 1
    assert q.release(A, 1.005) == [] and q.release(C, 1.005) == []
    s = q.statistics()
    assert (s.held_total, s.released_by_replica_total, s.waiting, s.waiting_flows) == (3, 2, 1, 1)


def test_expiry_is_oldest_first_at_the_timeout():
    q = queue(timeout=0.02)
    q.hold(A, "a1", 1.000)
    q.hold(B, "b1", 1.010)
    q.hold(A, "a2", 1.015)
    assert q.next_deadline() == pytest.approx(1.020)
    assert q.expire(1.0199) == []
    assert [h.item for h in q.expire(1.020)] == ["a1"]
    assert A in q  # a2 still waits
    assert q.next_deadline() == pytest.approx(1.030)
    assert [h.item for h in q.expire(1.05)] == ["b1", "a2"]
    assert q.next_deadline() is None and len(q) == 0 and A not in q
    assert q.statistics().expired_total == 3


def test_bounds_refuse_the_newest_and_count_it():
    q = queue(max_packets=3, max_flows=2)
    assert q.hold(A, "a1", 0) and q.hold(B, "b1", 0)
    assert not q.hold(C, "c1", 0)  # a third key
    assert q.hold(A, "a2", 0)  # a held key may grow
    assert not q.hold(A, "a3", 0)  # three packets in all
    s = q.statistics()
    assert (s.overflow_total, s.waiting, s.held_total) == (2, 3, 3)
    assert [h.item for h in q.release(A, 0)] == ["a1", "a2"]
    assert q.hold(C, "c1", 0)  # room again


def test_latency_histogram_and_flush():
    q = queue(timeout=1.0)
    for i, wait_ms in enumerate((0.1, 2.5, 4.0, 4.5, 150.0)):
        key = bytes([i])
        q.hold(key, str(i), 10.0)
        q.release(key, 10.0 + wait_ms / 1000)
    s = q.statistics()
    assert s.latency_bounds_ms == LATENCY_BOUNDS_MS
    counts = dict(zip((*LATENCY_BOUNDS_MS, "inf"), s.latency_counts, strict=True))
    # Upper bounds are inclusive (2.5 ms lands in le=2.5), as Prometheus' le.
    assert (counts[0.25], counts[2.5], counts[4.0], counts[5.0], counts["inf"]) == (1, 1, 1, 1, 1)
    assert s.latency_sum_ms == pytest.approx(161.1, abs=0.01)
    assert s.latency_max_ms == pytest.approx(150.0, abs=0.01)
    q.hold(A, "x", 11.0)
    q.hold(B, "y", 11.0)
    assert [h.item for h in q.flush()] == ["x", "y"]
    assert len(q) == 0 and q.statistics().flushed_total == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"timeout": 0}, "hold.timeout"), ({"timeout": 2.0}, "hold.timeout"),
     ({"max_packets": 0}, "hold.max_packets"), ({"max_flows": 0}, "hold.max_flows"),
     ({"max_packets": 4, "max_flows": 5}, "hold.max_flows")],
)  # fmt: skip
def test_config_is_validated(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        HoldConfig(**kwargs)


# Operations: ("hold", key, dt) / ("release", key, dt) / ("expire", dt), time only advancing.
_keys = st.sampled_from([A, B, C, b"d", b"e"])
_dt = st.floats(min_value=0, max_value=0.015)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("hold"), _keys, _dt),
        st.tuples(st.just("release"), _keys, _dt),
        st.tuples(st.just("expire"), st.just(b""), _dt),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_every_packet_leaves_once_in_order_within_its_timeout(ops):
    timeout = 0.02
    q: HoldQueue[int] = HoldQueue(HoldConfig(timeout, 6, 3))
    model: list[tuple[bytes, int, float]] = []  # held (key, item, since), arrival order
    now, item, out = 0.0, 0, []
    for op, key, dt in ops:
        now += dt
        if op == "hold":
            item += 1
            fits = len(model) < 6 and (key in {k for k, _, _ in model} or
                                        len({k for k, _, _ in model}) < 3)  # fmt: skip
            assert q.hold(key, item, now) == fits
            if fits:
                model.append((key, item, now))
        elif op == "release":
            got = [h.item for h in q.release(key, now)]
            assert got == [i for k, i, _ in model if k == key]
            model = [m for m in model if m[0] != key]
            out += got
        else:
            got = [h.item for h in q.expire(now)]
            assert got == [i for _, i, since in model if since + timeout <= now]
            model = [m for m in model if m[2] + timeout > now]
            out += got
        assert len(q) == len(model)
        deadline = q.next_deadline()
        assert deadline == (model[0][2] + timeout if model else None)
    out += [h.item for h in q.flush()]
    assert sorted(out) == sorted(set(out))  # nobody twice
    s = q.statistics()
    assert s.held_total == s.released_by_replica_total + s.expired_total + s.flushed_total
