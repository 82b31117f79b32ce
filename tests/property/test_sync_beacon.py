"""Liveness beacons under hostile input and reordering (syncd.beacon).

* decoding arbitrary bytes returns a Beacon or raises exactly BeaconError, and
  a keyed tracker never accepts any of them (the tag is 128 bits);
* no single-bit flip of a valid keyed beacon is accepted;
* whatever order beacons arrive in, with duplicates, the ones a tracker
  accepts from one peer have strictly increasing (epoch, seq), and its
  ``lost`` count equals the gaps between consecutive accepted seqs of one epoch.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.beacon import (
    MAGIC,
    Beacon,
    BeaconError,
    BeaconTracker,
    decode_beacon,
    encode_beacon,
)

KEY = b"cluster-secret"

node_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,30}", fullmatch=True)
cluster_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
beacons = st.builds(
    Beacon,
    cluster_id=cluster_ids,
    node_id=node_ids,
    epoch=st.integers(0, 2**32 - 1),
    seq=st.integers(1, 2**64 - 1),
)
# Random bytes rarely start with the magic: half the examples do, to reach the
# length and tag checks.
datagrams = st.one_of(
    st.binary(max_size=700),
    st.builds(lambda rest: MAGIC + b"\x01\x00" + rest, st.binary(max_size=600)),
)


def keyed_tracker() -> BeaconTracker:
    t = BeaconTracker("prod", "fw1")
    t.set_peers(["fw2"])
    return t


@settings(max_examples=500)
@given(datagrams, st.sampled_from([KEY, None]))
def test_decode_returns_or_raises_beacon_error(data: bytes, key: bytes | None) -> None:
    try:
        decoded = decode_beacon(data, key)
    except BeaconError as e:
        assert e.reason in ("malformed", "version", "mac")
    else:
        # Only reachable unkeyed, with a zero tag: then it must re-encode to the input.
        assert key is None
        assert encode_beacon(decoded, None) == data


@settings(max_examples=300)
@given(st.lists(datagrams, max_size=20))
def test_keyed_tracker_accepts_no_arbitrary_bytes(batch: list[bytes]) -> None:
    t = keyed_tracker()
    for i, data in enumerate(batch):
        assert t.receive(data, KEY, float(i)) is None
    assert t.heard() == {}
    assert sum(t.statistics().dropped.values()) == len(batch)


@settings(max_examples=200)
@given(beacons, st.data())
def test_no_single_bit_flip_is_accepted(beacon: Beacon, data: st.DataObject) -> None:
    wire = encode_beacon(beacon, KEY)
    bit = data.draw(st.integers(0, len(wire) * 8 - 1), label="bit")
    flipped = bytearray(wire)
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        decode_beacon(bytes(flipped), KEY)
    except BeaconError as e:
        assert e.reason in ("malformed", "version", "mac")
    else:
        raise AssertionError(f"bit {bit} flipped and still accepted")


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(1, 30)),  # (epoch, seq): few, to collide
        min_size=1,
        max_size=60,
    )
)
def test_accepted_beacons_strictly_increase(deliveries: list[tuple[int, int]]) -> None:
    t = keyed_tracker()
    accepted: list[tuple[int, int]] = []
    for i, (epoch, seq) in enumerate(deliveries):
        wire = encode_beacon(Beacon("prod", "fw2", epoch, seq), KEY)
        if t.receive(wire, KEY, float(i)) == "fw2":
            accepted.append((epoch, seq))
    assert all(a < b for a, b in itertools.pairwise(accepted))
    # Every delivery above all earlier ones is accepted: the tracker is not too strict.
    assert accepted == _running_maxima(deliveries)
    stats = t.statistics()
    assert stats.dropped["replay"] == len(deliveries) - len(accepted)
    gaps = sum(b[1] - a[1] - 1 for a, b in itertools.pairwise(accepted) if a[0] == b[0])
    assert stats.peers["fw2"].lost == gaps
    assert stats.peers["fw2"].received == len(accepted)


def _running_maxima(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for item in items:
        if not out or item > out[-1]:
            out.append(item)
    return out
