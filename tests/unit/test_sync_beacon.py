"""Liveness beacons, the pure part (syncd.beacon): wire format, sender, tracker."""

from __future__ import annotations

import hmac
from typing import Any

import pytest

from syncd.beacon import (
    DROP_REASONS,
    MAX_SIZE,
    MIN_SIZE,
    Beacon,
    BeaconError,
    BeaconSender,
    BeaconTracker,
    decode_beacon,
    encode_beacon,
    next_round,
)
from syncd.beacon_io import BeaconService
from syncd.errors import ConfigError, Misuse, PeerError

KEY = b"cluster-secret"
OTHER_KEY = b"another-secret"
BEACON = Beacon(cluster_id="prod", node_id="fw2", epoch=7, seq=42)


def reason_of(data: bytes, key: bytes | None) -> str:
    with pytest.raises(BeaconError) as raised:
        decode_beacon(data, key)
    return raised.value.reason


def tracker(peers: tuple[str, ...] = ("fw2", "fw3")) -> BeaconTracker:
    t = BeaconTracker("prod", "fw1")
    t.set_peers(peers)
    return t


def beacon_bytes(node: str = "fw2", epoch: int = 7, seq: int = 1, cluster: str = "prod") -> bytes:
    return encode_beacon(Beacon(cluster, node, epoch, seq), KEY)


def dropped(t: BeaconTracker) -> dict[str, int]:
    return {r: n for r, n in t.statistics().dropped.items() if n}


# --- wire format -------------------------------------------------------------------------


@pytest.mark.parametrize("key", [KEY, None])
def test_round_trip(key: bytes | None) -> None:
    assert decode_beacon(encode_beacon(BEACON, key), key) == BEACON


def test_layout_matches_the_documented_format() -> None:
    data = encode_beacon(BEACON, KEY)
    body = (
        b"STKB\x02\x00"
        + (7).to_bytes(4, "big")
        + (42).to_bytes(8, "big")
        + bytes(8)  # revoked: none
        + b"\x03fw2\x04prod"
    )
    assert data == body + hmac.digest(KEY, body, "sha256")[:16]
    assert encode_beacon(BEACON, None) == body + bytes(16)
    notice = encode_beacon(Beacon("prod", "fw2", 7, 42, revoked=9), KEY)
    assert notice[18:26] == (9).to_bytes(8, "big")
    assert decode_beacon(notice, KEY).revoked == 9


def test_longest_valid_beacon_is_small_and_round_trips() -> None:
    b = Beacon(
        cluster_id="c" * 64, node_id="n" * 31, epoch=2**32 - 1, seq=2**64 - 1, revoked=2**64 - 1
    )
    data = encode_beacon(b, KEY)
    assert MIN_SIZE <= len(data) <= MAX_SIZE < 600
    assert decode_beacon(data, KEY) == b


def test_every_truncation_is_malformed() -> None:
    data = encode_beacon(BEACON, KEY)
    for length in range(len(data)):
        assert reason_of(data[:length], KEY) == "malformed", length


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 100, b"y" * 600])
def test_trailing_bytes_are_malformed(extra: bytes) -> None:
    assert reason_of(encode_beacon(BEACON, KEY) + extra, KEY) == "malformed"


def test_every_byte_flip_of_a_keyed_beacon_is_refused() -> None:
    data = encode_beacon(BEACON, KEY)
    seen = set()
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            reason = reason_of(bytes(bad), KEY)
            assert reason in ("mac", "malformed", "version"), (i, mask)
            seen.add(reason)
    assert seen == {"mac", "malformed", "version"}  # magic, version byte, everything else


def test_version_byte_is_reported_as_version() -> None:
    data = bytearray(encode_beacon(BEACON, KEY))
    data[4] = 1  # the layout before `revoked`
    assert reason_of(bytes(data), KEY) == "version"


def test_wrong_key_is_mac() -> None:
    assert reason_of(encode_beacon(BEACON, KEY), OTHER_KEY) == "mac"


def test_keyed_and_unkeyed_refuse_each_other() -> None:
    assert reason_of(encode_beacon(BEACON, None), KEY) == "mac"
    assert reason_of(encode_beacon(BEACON, KEY), None) == "mac"


def test_authentic_but_invalid_fields_are_malformed() -> None:
    def signed(flags: int = 0, seq: int = 1, node: bytes = b"fw2") -> bytes:
        body = (
            b"STKB\x02"
            + bytes((flags,))
            + (1).to_bytes(4, "big")
            + seq.to_bytes(8, "big")
            + bytes(8)
            + bytes((len(node),))
            + node
            + b"\x04prod"
        )
        return body + hmac.digest(KEY, body, "sha256")[:16]

    assert decode_beacon(signed(), KEY).node_id == "fw2"  # the helper builds valid ones
    assert reason_of(signed(flags=1), KEY) == "malformed"
    assert reason_of(signed(seq=0), KEY) == "malformed"
    assert reason_of(signed(node=b"FW2"), KEY) == "malformed"
    assert reason_of(signed(node=b"fw\xff"), KEY) == "malformed"


def test_beacon_error_is_a_peer_error() -> None:
    with pytest.raises(PeerError):
        decode_beacon(b"", KEY)


@pytest.mark.parametrize(
    "fields",
    [
        ("Prod", "fw1", 1, 1),
        ("prod", "fw_1", 1, 1),
        ("prod", "fw1", -1, 1),
        ("prod", "fw1", 2**32, 1),
        ("prod", "fw1", 1, 0),
        ("prod", "fw1", 1, 2**64),
        ("prod", "fw1", 1, 1, -1),
        ("prod", "fw1", 1, 1, 2**64),
    ],
)
def test_building_a_bad_beacon_is_misuse(fields: tuple[Any, ...]) -> None:
    with pytest.raises(Misuse):
        Beacon(*fields)


def test_empty_key_is_misuse() -> None:
    with pytest.raises(Misuse):
        encode_beacon(BEACON, b"")


# --- sender ------------------------------------------------------------------------------


def test_sender_numbers_beacons_from_one() -> None:
    s = BeaconSender("prod", "fw2", 7, KEY)
    assert s.seq == 0
    got = [decode_beacon(s.next(), KEY) for _ in range(3)]
    assert [(b.node_id, b.epoch, b.seq) for b in got] == [
        ("fw2", 7, 1),
        ("fw2", 7, 2),
        ("fw2", 7, 3),
    ]
    assert s.seq == 3


@pytest.mark.parametrize(
    "args",
    [
        ("Prod", "fw1", 1, KEY),
        ("prod", "", 1, KEY),
        ("prod", "fw1", -1, KEY),
        ("prod", "fw1", 2**32, KEY),
        ("prod", "fw1", 1, b""),
    ],
)
def test_sender_refuses_bad_arguments(args: tuple[str, str, int, bytes]) -> None:
    with pytest.raises(ConfigError):
        BeaconSender(*args)


@pytest.mark.parametrize("args", [("prod", "FW1"), ("", "fw1")])
def test_tracker_refuses_bad_identity(args: tuple[str, str]) -> None:
    with pytest.raises(ConfigError):
        BeaconTracker(*args)


# --- tracker -----------------------------------------------------------------------------


def test_accepts_a_peer_and_records_when() -> None:
    t = tracker()
    assert t.receive(beacon_bytes(seq=1), KEY, 10.0) == "fw2"
    assert t.receive(beacon_bytes(seq=2), KEY, 10.5) == "fw2"
    assert t.heard() == {"fw2": 10.5}
    stats = t.statistics()
    assert stats.peers["fw2"].received == 2
    assert stats.peers["fw2"].last_heard == 10.5
    assert stats.peers["fw2"].epoch == 7
    assert stats.peers["fw3"].received == 0 and stats.peers["fw3"].last_heard is None
    assert dropped(t) == {}
    assert set(stats.dropped) == set(DROP_REASONS)


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        (b"garbage", KEY, "malformed"),
        (beacon_bytes(), OTHER_KEY, "mac"),
        (encode_beacon(Beacon("prod", "fw2", 7, 1), None), KEY, "mac"),
        (beacon_bytes(cluster="staging"), KEY, "cluster"),
        (beacon_bytes(node="fw9"), KEY, "unknown_peer"),
        (beacon_bytes(node="fw1"), KEY, "unknown_peer"),  # our own id
    ],
)
def test_drops_are_counted_by_reason(data: bytes, key: bytes, reason: str) -> None:
    t = tracker()
    assert t.receive(data, key, 1.0) is None
    assert dropped(t) == {reason: 1}
    assert t.heard() == {}


def test_own_id_in_set_peers_is_still_unknown() -> None:
    t = tracker(("fw1", "fw2"))
    assert t.receive(beacon_bytes(node="fw1"), KEY, 1.0) is None
    assert dropped(t) == {"unknown_peer": 1}
    assert set(t.statistics().peers) == {"fw2"}


@pytest.mark.parametrize(
    ("second", "accepted"),
    [
        ((7, 5), False),  # same seq
        ((7, 4), False),  # lower seq
        ((6, 9), False),  # lower epoch, higher seq
        ((7, 6), True),
        ((8, 1), True),  # higher epoch, seq starts again
    ],
)
def test_replay(second: tuple[int, int], accepted: bool) -> None:
    t = tracker()
    assert t.receive(beacon_bytes(epoch=7, seq=5), KEY, 1.0) == "fw2"
    epoch, seq = second
    got = t.receive(beacon_bytes(epoch=epoch, seq=seq), KEY, 2.0)
    assert (got == "fw2") is accepted
    assert dropped(t) == ({} if accepted else {"replay": 1})
    assert t.heard() == {"fw2": 2.0 if accepted else 1.0}


def test_replay_is_per_peer() -> None:
    t = tracker()
    assert t.receive(beacon_bytes(node="fw2", seq=5), KEY, 1.0) == "fw2"
    assert t.receive(beacon_bytes(node="fw3", seq=1), KEY, 1.0) == "fw3"


def test_lost_counts_gaps_within_an_epoch_only() -> None:
    t = tracker()
    for epoch, seq in [(7, 5), (7, 9), (7, 10), (7, 12), (8, 100), (8, 103)]:
        assert t.receive(beacon_bytes(epoch=epoch, seq=seq), KEY, 1.0) == "fw2"
    peer = t.statistics().peers["fw2"]
    # 5->9: 3, 10->12: 1; the jump to epoch 8 counts nothing; 100->103: 2.
    assert (peer.received, peer.lost, peer.epoch) == (6, 6, 8)


def feed(t: BeaconTracker, seqs: list[int], node: str = "fw2") -> None:
    for i, seq in enumerate(seqs):
        assert t.receive(beacon_bytes(node, seq=seq), KEY, float(i)) == node


def test_loss_estimate_is_zero_on_a_clean_link_and_unknown_before_hearing() -> None:
    t = tracker()
    assert t.loss() == {}
    feed(t, list(range(1, 200)))
    assert t.loss() == {"fw2": 0.0}
    assert t.statistics().peers["fw2"].loss == 0.0


def test_loss_estimate_follows_the_loss_rate() -> None:
    t = tracker()
    feed(t, list(range(1, 2000, 2)))  # every other beacon lost: 50 %
    assert 0.45 <= t.loss()["fw2"] <= 0.65
    t2 = tracker()
    feed(t2, [s for s in range(1, 4000) if s % 10])  # 10 % lost
    assert 0.05 <= t2.loss()["fw2"] <= 0.3


def test_loss_estimate_jumps_on_a_burst_and_decays_when_clean_again() -> None:
    t = tracker()
    feed(t, [1, 2, 3, 9])  # 5 lost in a row
    burst = t.loss()["fw2"]
    assert burst > 0.5
    feed(t, list(range(10, 400)))
    assert t.loss()["fw2"] < 0.01 < burst


def test_loss_estimate_ignores_the_seq_jump_of_a_new_epoch() -> None:
    t = tracker()
    t.receive(beacon_bytes(epoch=7, seq=5), KEY, 0.0)
    t.receive(beacon_bytes(epoch=8, seq=900), KEY, 0.1)  # restarted peer: not 894 lost
    assert t.loss()["fw2"] == 0.0


def test_set_peers_keeps_retained_and_forgets_removed() -> None:
    t = tracker(("fw2", "fw3"))
    t.receive(beacon_bytes(node="fw2", seq=5), KEY, 1.0)
    t.receive(beacon_bytes(node="fw3", seq=5), KEY, 2.0)
    t.set_peers(["fw2", "fw4"])
    assert t.heard() == {"fw2": 1.0}
    assert set(t.statistics().peers) == {"fw2", "fw4"}
    # fw2's replay state survived; fw3 is unknown now.
    assert t.receive(beacon_bytes(node="fw2", seq=5), KEY, 3.0) is None
    assert t.receive(beacon_bytes(node="fw3", seq=6), KEY, 3.0) is None
    assert dropped(t) == {"replay": 1, "unknown_peer": 1}
    # Re-adding fw3 starts it afresh: an old seq is accepted again.
    t.set_peers(["fw2", "fw3"])
    assert t.receive(beacon_bytes(node="fw3", seq=1), KEY, 4.0) == "fw3"
    assert t.statistics().peers["fw3"].received == 1


def test_sender_notice_shares_the_round_seq_and_names_the_epoch() -> None:
    s = BeaconSender("prod", "fw2", 7, KEY)
    with pytest.raises(Misuse):
        s.notice(3)  # no round started
    plain = decode_beacon(s.next(), KEY)
    notice = decode_beacon(s.notice(3), KEY)
    assert (plain.seq, plain.revoked) == (1, 0)
    assert (notice.seq, notice.revoked) == (1, 3)


def test_tracker_remembers_the_last_notice_per_peer() -> None:
    t = tracker()
    notice = encode_beacon(Beacon("prod", "fw2", 7, 1, revoked=5), KEY)
    assert t.receive(notice, KEY, 1.0) == "fw2"
    assert (t.revoked_by("fw2"), t.revoked_by("fw3"), t.revoked_by("fw9")) == (5, 0, 0)
    assert t.statistics().peers["fw2"].revoked == 5
    assert t.receive(beacon_bytes(seq=2), KEY, 1.1) == "fw2"  # the peer stopped telling
    assert t.revoked_by("fw2") == 0


def test_statistics_are_snapshots() -> None:
    t = tracker()
    before = t.statistics()
    t.receive(beacon_bytes(), KEY, 1.0)
    t.receive(b"", KEY, 1.0)
    assert before.peers["fw2"].received == 0
    assert before.dropped["malformed"] == 0


# --- round scheduling --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheduled", "now", "expected"),
    [
        (1.00, 1.00, 1.01),  # on time
        (1.00, 1.004, 1.01),  # a little late: stay on the grid
        (1.00, 1.0099, 1.01),
        (1.00, 1.01, 1.02),  # late by a whole interval: that slot is gone
        (1.00, 1.035, 1.04),  # late by 3.5 intervals: skip, no burst
    ],
)
def test_next_round(scheduled: float, now: float, expected: float) -> None:
    got = next_round(scheduled, now, 0.01)
    assert got == pytest.approx(expected)
    assert got > now


# --- the adapter's argument checks (no socket is opened) ---------------------------------


def service(**changes: object) -> BeaconService:
    args: dict[str, object] = {
        "cluster_id": "prod",
        "node_id": "fw1",
        "epoch": 1,
        "bind": ("127.0.0.1", 0),
        "key": KEY,
    } | changes
    return BeaconService(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"bind": ("localhost", 0)},  # IP literals only
        {"bind": ("127.0.0.1", 65536)},
        {"interval": 0.0},
        {"interval": float("nan")},
        {"alive_within": -1.0},
        {"alive_within": float("inf")},
        {"node_id": "FW1"},
        {"key": b""},
        {"epoch": 2**32},
    ],
)
def test_service_refuses_bad_arguments(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        service(**changes)


def test_service_accepts_ipv6_bind() -> None:
    service(bind=("::1", 7400))


@pytest.mark.parametrize(
    "peers",
    [{"fw2": ("fw2.example", 7400)}, {"fw2": ("10.0.0.2", 0)}, {"fw2": ("10.0.0.2", 70000)}],
)
def test_service_set_peers_takes_ip_literals_and_ports(peers: dict[str, tuple[str, int]]) -> None:
    with pytest.raises(Misuse):
        service().set_peers(peers)


def test_service_before_start() -> None:
    s = service()
    with pytest.raises(Misuse):
        _ = s.address
    assert not s.statistics().running
    s.stop()  # harmless, and final
    with pytest.raises(Misuse):
        s.start()
