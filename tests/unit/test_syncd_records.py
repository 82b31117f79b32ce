"""FlowRecord / Delta validation and strict wire conversion."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, Misuse, PeerError
from syncd.records import (
    MAX_TIMEOUT,
    MAX_U63,
    Delta,
    FlowRecord,
    Op,
    VersionClock,
    check_node_id,
    delta_from_pb,
    delta_to_pb,
    delta_wire,
    deltas_from_pb,
    record_body,
    record_from_pb,
    record_to_pb,
    record_wire,
    records_from_pb,
    varint,
    with_version,
)


def record(**changes: Any) -> FlowRecord:
    base = FlowRecord(
        key=b"\x01\x02\x03",
        proto=6,
        family=4,
        orig_src=0x0A000001,
        orig_sport=40000,
        orig_dst=0xC0A80101,
        orig_dport=443,
        state="ESTABLISHED",
        assured=True,
        timeout=431999.5,
        origin="fw1",
        version=7,
    )
    return dataclasses.replace(base, **changes)


def test_record_round_trips_through_the_wire() -> None:
    for r in (record(), record(family=6, orig_src=(1 << 128) - 1, orig_dst=1, proto=17)):
        msg = pb.FlowRecord.FromString(record_to_pb(r).SerializeToString())
        assert record_from_pb(msg) == r


def test_addresses_are_sent_big_endian_with_the_family_length() -> None:
    msg = record_to_pb(record())
    assert msg.orig_src == bytes([10, 0, 0, 1])
    assert len(record_to_pb(record(family=6, orig_src=1, orig_dst=2)).orig_dst) == 16


def test_delta_round_trips() -> None:
    for op in Op:
        d = Delta(op, "fw1", 42, record())
        assert delta_from_pb(pb.Delta.FromString(delta_to_pb(d).SerializeToString())) == d


@pytest.mark.parametrize(
    "changes",
    [
        {"key": b""},
        {"key": b"x" * 65},
        {"family": 5},
        {"orig_src": 1 << 32},
        {"orig_dst": -1},
        {"proto": 256},
        {"orig_sport": 65536},
        {"orig_dport": -1},
        {"state": "established"},
        {"state": ""},
        {"state": "X" * 33},
        {"timeout": -0.1},
        {"timeout": MAX_TIMEOUT + 1},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"origin": "Bad_Node"},
        {"origin": ""},
        {"version": 0},
        {"version": MAX_U63 + 1},
        {"assured": 1},
        {"proto": True},
    ],
)
def test_invalid_record_values_are_misuse(changes: dict[str, Any]) -> None:
    with pytest.raises(Misuse):
        record(**changes)


def test_delta_checks_origin_and_seq() -> None:
    with pytest.raises(Misuse):
        Delta(Op.CREATE, "fw2", 1, record())
    with pytest.raises(Misuse):
        Delta(Op.CREATE, "fw1", 0, record())
    with pytest.raises(Misuse):
        Delta("create", "fw1", 1, record())  # type: ignore[arg-type]


def good_pb() -> pb.FlowRecord:
    return record_to_pb(record())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("family", 0),
        ("family", 6),  # addresses are 4 bytes: wrong length for IPv6
        ("orig_src", b"\x01\x02\x03"),
        ("orig_dst", b""),
        ("key", b""),
        ("key", b"k" * 1000),
        ("proto", 300),
        ("orig_sport", 70000),
        ("state", "bad state"),
        ("timeout", float("nan")),
        ("timeout", -1.0),
        ("timeout", 1e300),
        ("origin", "UPPER"),
        ("version", 0),
        ("version", 1 << 63),
    ],
)
def test_hostile_record_fields_are_bad_message(field: str, value: Any) -> None:
    msg = good_pb()
    setattr(msg, field, value)
    with pytest.raises(BadMessage) as info:
        record_from_pb(msg)
    assert info.value.reason == "bad-record"
    assert isinstance(info.value, PeerError)


def test_hostile_delta_fields_are_bad_message() -> None:
    ok = delta_to_pb(Delta(Op.UPDATE, "fw1", 3, record()))
    cases = []
    for mutate in (
        lambda m: setattr(m, "op", 0),
        lambda m: setattr(m, "op", 9),
        lambda m: m.ClearField("record"),
        lambda m: setattr(m, "origin", "fw2"),
        lambda m: setattr(m, "seq", 0),
        lambda m: setattr(m, "seq", 1 << 63),
        lambda m: setattr(m.record, "family", 9),
    ):
        msg = pb.Delta()
        msg.CopyFrom(ok)
        mutate(msg)
        cases.append(msg)
    for msg in cases:
        with pytest.raises(BadMessage):
            delta_from_pb(msg)


def test_node_id_shape() -> None:
    assert check_node_id("fw1") and check_node_id("a-b-c")
    assert not check_node_id("-a") and not check_node_id("a" * 32) and not check_node_id("A")
    assert not check_node_id("fw1\n")


def test_version_clock_grows_and_jumps_over_observed_versions() -> None:
    clock = VersionClock(floor=5 << 32)
    first = clock.next()
    assert first == (5 << 32) + 1
    clock.observe(first - 10)  # older: no effect
    assert clock.next() == first + 1
    clock.observe(9 << 32)
    assert clock.next() == (9 << 32) + 1 and clock.last == (9 << 32) + 1


def test_version_clock_bounds() -> None:
    with pytest.raises(Misuse):
        VersionClock(-1)
    clock = VersionClock(MAX_U63 - 1)
    assert clock.next() == MAX_U63
    with pytest.raises(Misuse):
        clock.next()


def test_order_breaks_version_ties_by_origin() -> None:
    assert record(origin="fw2").order > record(origin="fw1").order
    assert record(version=8, origin="fw1").order > record(origin="fw2").order


# --- the fast wire paths agree with the slow definitions --------------------------------

_PB_RECORDS = st.builds(
    pb.FlowRecord,
    key=st.binary(min_size=0, max_size=70),
    proto=st.sampled_from([0, 6, 17, 255, 256, 2**32 - 1]),
    family=st.sampled_from([0, 4, 6, 5]),
    orig_src=st.sampled_from([b"", b"\x0a\0\0\x01", b"\x0a\0\0", b"\x20\x01" + b"\0" * 14]),
    orig_sport=st.sampled_from([0, 80, 65535, 65536]),
    orig_dst=st.sampled_from([b"\x0a\0\0\x02", b"\xfd" + b"\0" * 15]),
    orig_dport=st.sampled_from([0, 443, 70000]),
    state=st.sampled_from(["ESTABLISHED", "SYN_SENT", "", "bad state", "X" * 33, "TIME_WAIT2"]),
    assured=st.booleans(),
    timeout=st.sampled_from([0.0, 30.0, -1.0, float("nan"), float("inf"), 30 * 86400.0 + 1]),
    origin=st.sampled_from(["fw1", "fw-2", "", "Fw1", "a" * 32]),
    version=st.sampled_from([0, 1, 2**40, (1 << 63) - 1, 1 << 63]),
)


def _slow_record_from_pb(msg: pb.FlowRecord) -> FlowRecord | None:
    """The definition: the validated constructor (None where it refuses)."""
    size = {4: 4, 6: 16}.get(msg.family)
    if size is None or len(msg.orig_src) != size or len(msg.orig_dst) != size:
        return None
    try:
        return FlowRecord(
            key=bytes(msg.key), proto=msg.proto, family=msg.family,
            orig_src=int.from_bytes(msg.orig_src, "big"), orig_sport=msg.orig_sport,
            orig_dst=int.from_bytes(msg.orig_dst, "big"), orig_dport=msg.orig_dport,
            state=msg.state, assured=msg.assured, timeout=msg.timeout, origin=msg.origin,
            version=msg.version,
        )  # fmt: skip
    except Misuse:
        return None


@settings(max_examples=500, deadline=None)
@given(msg=_PB_RECORDS)
def test_fast_record_from_pb_agrees_with_the_constructor(msg: pb.FlowRecord) -> None:
    expected = _slow_record_from_pb(msg)
    try:
        got = record_from_pb(msg)
    except BadMessage as e:
        assert expected is None, f"refused a valid record: {e}"
        return
    assert expected is not None and got == expected
    # The wire form built from the cached body parses back to the same record.
    again = record_from_pb(pb.FlowRecord.FromString(record_wire(got)))
    assert again == got and record_to_pb(got) == pb.FlowRecord.FromString(record_wire(got))


_BAD_FIELDS: dict[str, list[Any]] = {
    "key": [b"", b"k" * 65],
    "proto": [256],
    "family": [0, 5],
    "orig_src": [b"\x0a\0\0"],
    "orig_sport": [65536],
    "orig_dport": [70000],
    "state": ["", "bad state", "X" * 33],
    "timeout": [-1.0, float("nan"), float("inf")],
    "origin": ["", "Fw1", "a" * 32],
    "version": [0, 1 << 63],
}


def _one_bad(field: str, value: Any) -> pb.FlowRecord:
    """A valid record (its state and origin seen before) with one field out of range."""
    msg = record_to_pb(record())
    setattr(msg, field, value)
    return msg


# Mostly valid records, some with exactly one bad field: a check missing
# from one converter shows.
_MOSTLY_VALID = st.one_of(
    st.builds(lambda v: record_to_pb(record(version=v)), st.integers(1, 1000)),
    st.sampled_from([_one_bad(f, v) for f, values in _BAD_FIELDS.items() for v in values]),
    _PB_RECORDS,
)


def _outcome(convert: Any, arg: Any) -> Any:
    try:
        return convert(arg)
    except BadMessage:
        return BadMessage


@settings(max_examples=300)
@given(msgs=st.lists(_MOSTLY_VALID, max_size=6), repeat=st.booleans())
def test_records_from_pb_is_record_from_pb_of_each(msgs: list[pb.FlowRecord], repeat: bool) -> None:
    """The batch converter accepts and refuses what the single one does, with equal records."""
    if repeat:  # valid states and origins already seen: the inline path
        msgs = msgs + [pb.FlowRecord.FromString(m.SerializeToString()) for m in msgs]
    record_from_pb(record_to_pb(record()))  # its state and origin are known: the inline path
    singles = [_outcome(record_from_pb, m) for m in msgs]
    got = _outcome(records_from_pb, msgs)
    if BadMessage in singles:
        assert got is BadMessage
    else:
        assert got == singles and [r.wire for r in got] == [r.wire for r in singles]


@settings(max_examples=300)
@given(
    records=st.lists(_MOSTLY_VALID, min_size=1, max_size=4),
    op=st.sampled_from([pb.OP_CREATE, pb.OP_DELETE, 0, 9]),
    seq=st.sampled_from([0, 1, 2**40, 1 << 63]),
    created=st.sampled_from([0.0, 1.7e9, -1.0, float("nan")]),
    origin=st.sampled_from([None, "fw9"]),
)
def test_deltas_from_pb_is_delta_from_pb_of_each(
    records: list[pb.FlowRecord], op: int, seq: int, created: float, origin: str | None
) -> None:
    msgs = [
        pb.Delta(op=op, origin=origin or r.origin, seq=seq, record=r, created=created)  # type: ignore[arg-type]
        for r in records
    ]
    singles = [_outcome(delta_from_pb, m) for m in msgs]
    got = _outcome(deltas_from_pb, msgs)
    assert got == (BadMessage if BadMessage in singles else singles)


def test_delta_wire_round_trip_and_created() -> None:
    rec = record()
    delta = Delta(Op.UPDATE, rec.origin, 7, rec, created=1763800000.25)
    back = delta_from_pb(pb.Delta.FromString(delta_wire(delta)))
    assert back == delta and back.created == 1763800000.25
    plain = Delta(Op.DELETE, rec.origin, 8, rec)
    assert delta_from_pb(delta_to_pb(plain)).created == 0.0
    bad = delta_to_pb(plain)
    bad.created = float("nan")
    with pytest.raises(BadMessage):
        delta_from_pb(bad)


def test_with_version_keeps_the_body_and_checks_the_version() -> None:
    rec = record()
    body = record_body(rec)
    assert pb.FlowRecord.FromString(body).version == 0
    moved = with_version(rec, rec.version + 5)
    assert moved.version == rec.version + 5 and record_body(moved) == body
    assert pb.FlowRecord.FromString(moved.wire) == record_to_pb(moved)
    assert dataclasses.replace(rec, state="CLOSE").wire == b""  # never a stale cache
    with pytest.raises(Misuse):
        with_version(rec, 0)


@given(msg=_PB_RECORDS, version=st.integers(1, MAX_U63))
def test_the_cached_wire_parses_to_the_record(msg: pb.FlowRecord, version: int) -> None:
    try:
        rec = record_from_pb(msg)
    except BadMessage:
        return
    assert rec.wire == record_to_pb(rec).SerializeToString()
    moved = with_version(rec, version)
    assert pb.FlowRecord.FromString(moved.wire) == record_to_pb(moved)
    again = record_from_pb(pb.FlowRecord.FromString(moved.wire))
    assert again == moved and again.wire == record_to_pb(moved).SerializeToString()
    # Stamped twice: still the last version, and never more than one extra field.
    twice = with_version(again, version)
    assert pb.FlowRecord.FromString(twice.wire).version == version
    assert len(twice.wire) == len(again.wire) + 1 + len(varint(version))


@given(n=st.integers(0, MAX_U63))
def test_varint_is_protobufs(n: int) -> None:
    assert pb.FlowRecord.FromString(b"\x60" + varint(n)).version == n
    assert varint(n) == pb.FlowRecord(version=n).SerializeToString()[1:] or n == 0


def test_records_field_is_each_record_as_a_length_delimited_field() -> None:
    from syncd.records import field_bytes
    from syncd.session import records_field
    from tests.syncd_link import make_record

    short = make_record(b"k" * 5, "fw1", 3)
    long = make_record(b"k" * 64, "fw1", 1 << 60, "X" * 32)  # a wire form over 127 bytes
    with_v = with_version(short, 9)  # a wire form with a second version field
    records = [short, long, with_v, short]
    assert len(record_wire(long)) >= 128
    expected = b"".join(field_bytes(b"\x32", record_wire(r)) for r in records)
    assert records_field(records) == expected
    chunk = pb.SnapshotChunk.FromString(records_field(records))
    assert [r.version for r in chunk.records] == [3, 1 << 60, 9, 3]
    assert records_field([]) == b""
