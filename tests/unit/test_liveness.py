"""The loss-stretched suspicion window (cluster.liveness)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.liveness import FALSE_SUSPICION, MAX_STRETCH, suspect_window
from syncd.beacon import Beacon, BeaconTracker, encode_beacon

BASE, INTERVAL = 0.1, 0.01


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.1, 0.25])
def test_a_clean_or_mildly_lossy_link_keeps_the_base_window(loss: float) -> None:
    # Ten beacons all lost at 25 % is 1e-6: the base window is already enough.
    assert suspect_window(BASE, INTERVAL, loss) == BASE


def test_without_beacons_nothing_stretches() -> None:
    assert suspect_window(BASE, None, 0.9) == BASE


def test_half_lost_needs_about_twenty_beacons() -> None:
    window = suspect_window(BASE, INTERVAL, 0.51)
    beacons = window / INTERVAL
    assert 20 <= beacons <= 21
    assert 0.51**beacons == pytest.approx(FALSE_SUSPICION, rel=1e-6)


@pytest.mark.parametrize("loss", [0.8, 0.99, 1.0])
def test_a_broken_link_is_capped(loss: float) -> None:
    assert suspect_window(BASE, INTERVAL, loss) == BASE * MAX_STRETCH


@given(
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.floats(0.02, 10.0),
    st.floats(0.001, 0.1),
)
def test_window_is_bounded_and_grows_with_loss(a: float, b: float, base: float, iv: float) -> None:
    low, high = sorted((a, b))
    w_low, w_high = suspect_window(base, iv, low), suspect_window(base, iv, high)
    assert base <= w_low <= w_high <= base * MAX_STRETCH
    if base < w_high < base * MAX_STRETCH:  # not clamped: meets the false-suspicion target
        assert high ** (w_high / iv) == pytest.approx(FALSE_SUSPICION, rel=1e-6)
        assert not math.isnan(w_high)


def false_suspicions(loss: float, seed: int, stretch: bool, beacons: int = 6000) -> int:
    """A live peer's beacons every INTERVAL, each lost with ``loss``: how many
    silences outlast the window the tracker's estimate gave at their start."""
    rng = random.Random(seed)
    tracker = BeaconTracker("prod", "fw1")
    tracker.set_peers(["fw2"])
    count, last = 0, 0.0
    window = BASE
    for seq in range(1, beacons + 1):
        if rng.random() < loss:
            continue
        now = seq * INTERVAL
        if now - last > window:
            count += 1
        tracker.receive(encode_beacon(Beacon("prod", "fw2", 1, seq), None), None, now)
        last = now
        if stretch:
            window = suspect_window(BASE, INTERVAL, tracker.loss()["fw2"])
    return count


def test_stretching_removes_the_false_suspicions_of_a_half_lossy_link() -> None:
    """sync-loss-30: 30 % on each of two links = 51 % per beacon; 5 x 60 s of beacons."""
    fixed = sum(false_suspicions(0.51, seed, stretch=False) for seed in range(5))
    stretched = sum(false_suspicions(0.51, seed, stretch=True) for seed in range(5))
    assert fixed >= 5  # about 3.5 a minute expected with a fixed 0.1 s window
    assert stretched == 0


def test_a_clean_link_is_never_stretched() -> None:
    assert false_suspicions(0.0, 1, stretch=True, beacons=500) == 0
