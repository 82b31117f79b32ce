"""Flow records and deltas: the values syncd replicates, and their wire form.

A :class:`FlowRecord` is one conntrack entry as its owner node (its
*origin*) last described it; a :class:`Delta` is one change to it, numbered
in the origin's stream (``seq``).  Both are frozen and validated on
construction: building one with out-of-range values is a bug (:class:`Misuse`).

Wire conversion (``*_to_pb`` / ``*_from_pb``) is strict.  A message from a
peer that is malformed or hostile (an address of the wrong length, an
unknown op, a timeout of NaN, a key of a megabyte) raises
:class:`BadMessage` and yields nothing, so a caller that converts a whole
batch before applying any of it never applies part of a bad message.

Ordering of versions.  Replicas keep, per flow key, the record with the
highest ``(version, origin)``; a DELETE leaves a tombstone with its version
so an older CREATE that arrives late cannot bring the flow back.  That only
works if every writer of a key issues versions above every version it has
seen for that key, including across delete/re-create of the same 5-tuple and
across a takeover by another node.  :class:`VersionClock` gives that: a
Lamport clock per node (``observe`` every version applied or recovered,
``next`` for every record emitted), started above a floor that grows with
the node's epoch so a restarted node never reuses its old versions.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, Misuse

__all__ = [
    "MAX_KEY_LEN",
    "MAX_TIMEOUT",
    "MAX_U63",
    "Delta",
    "FlowRecord",
    "Op",
    "VersionClock",
    "check_node_id",
    "delta_from_pb",
    "delta_to_pb",
    "delta_wire",
    "deltas_from_pb",
    "field_bytes",
    "record_body",
    "record_from_pb",
    "record_to_pb",
    "record_wire",
    "records_from_pb",
    "trusted_delta",
    "varint",
    "with_version",
]

# Flow keys are a few dozen bytes (FlowKey.to_bytes()); the bound stops a
# hostile peer from making us hold large blobs per entry.
MAX_KEY_LEN: Final = 64
# Linux's longest default conntrack timeout is 5 days (tcp established);
# anything beyond 30 days is not a flow timeout.
MAX_TIMEOUT: Final = 30 * 86400.0
# Versions and sequence numbers stay in 63 bits so they fit every signed
# 64-bit consumer (Prometheus, JSON, SQLite) unchanged.
MAX_U63: Final = (1 << 63) - 1
# Same shape as node.config node ids: short, lowercase, usable as labels.
_NODE_ID: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}\Z")
_STATE: Final = re.compile(r"^[A-Z0-9_]{1,32}\Z")
_ADDR_BYTES: Final = {4: 4, 6: 16}


class Op(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


_OP_TO_PB: Final = {Op.CREATE: pb.OP_CREATE, Op.UPDATE: pb.OP_UPDATE, Op.DELETE: pb.OP_DELETE}
_OP_FROM_PB: Final = {int(v): k for k, v in _OP_TO_PB.items()}


def check_node_id(node_id: str) -> bool:
    """Whether ``node_id`` is a valid node id (also used for origins)."""
    return bool(_NODE_ID.match(node_id))


@dataclass(frozen=True, slots=True)
class FlowRecord:
    key: bytes  # opaque flow key (FlowKey.to_bytes()), 1..MAX_KEY_LEN bytes
    proto: int  # IP protocol number, 0..255
    family: int  # 4 or 6
    orig_src: int  # original-direction source address as an int (like node.packet)
    orig_sport: int  # original-direction source port / ICMP echo id, 0..65535
    orig_dst: int  # original-direction destination address as an int
    orig_dport: int  # original-direction destination port / ICMP echo id, 0..65535
    state: str  # protocol state name, [A-Z0-9_]{1,32}
    assured: bool  # traffic seen both ways (conntrack ASSURED)
    timeout: float  # seconds left before idle expiry, as the origin saw it when sending
    origin: str  # node id of the flow's owner
    version: int  # 1..2**63-1; higher (version, origin) wins per key
    # Cache: the record serialized as a pb.FlowRecord, its version field last
    # (see record_wire).  Not part of the value (compare=False) and not an
    # __init__ argument, so dataclasses.replace() never copies a stale one.
    wire: bytes = field(default=b"", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        problem = _record_problem(self)
        if problem is not None:
            raise Misuse(f"invalid FlowRecord: {problem}")

    @property
    def order(self) -> tuple[int, str]:
        """The per-key ordering: higher wins; origin only breaks version ties."""
        return (self.version, self.origin)


def _record_problem(r: FlowRecord) -> str | None:
    if not isinstance(r.key, bytes) or not 1 <= len(r.key) <= MAX_KEY_LEN:
        return f"key must be 1..{MAX_KEY_LEN} bytes"
    if r.family not in _ADDR_BYTES:
        return f"family must be 4 or 6, not {r.family!r}"
    top = 1 << (8 * _ADDR_BYTES[r.family])
    if not (_is_int(r.orig_src) and 0 <= r.orig_src < top):
        return "orig_src out of range for the family"
    if not (_is_int(r.orig_dst) and 0 <= r.orig_dst < top):
        return "orig_dst out of range for the family"
    if not (_is_int(r.proto) and 0 <= r.proto <= 255):
        return f"proto must be 0..255, not {r.proto!r}"
    if not all(_is_int(p) and 0 <= p <= 65535 for p in (r.orig_sport, r.orig_dport)):
        return "ports must be 0..65535"
    if not isinstance(r.state, str) or not _STATE.match(r.state):
        return f"state must match [A-Z0-9_]{{1,32}}, not {r.state!r}"
    if not _is_bool(r.assured):
        return "assured must be a bool"
    if not isinstance(r.timeout, float | int) or not 0 <= r.timeout <= MAX_TIMEOUT:
        return f"timeout must be 0..{MAX_TIMEOUT:.0f} seconds, not {r.timeout!r}"
    if not isinstance(r.origin, str) or not check_node_id(r.origin):
        return f"origin is not a node id: {r.origin!r}"
    if not (_is_int(r.version) and 1 <= r.version <= MAX_U63):
        return f"version must be 1..2**63-1, not {r.version!r}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Delta:
    op: Op  # what happened to the flow
    origin: str  # node that made the change (equals record.origin)
    seq: int  # position in the origin's stream for its current epoch, from 1
    record: FlowRecord  # the flow after the change (DELETE: as deleted, new version)
    # The origin's wall clock (unix seconds) when it took the change, 0 =
    # unknown: only for the sync lag metric, never for ordering.
    created: float = field(default=0.0, compare=False)
    # Cache: the serialized pb.Delta (see delta_wire); not part of the value.
    wire: bytes = field(default=b"", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            raise Misuse(f"invalid Delta: op must be an Op, not {self.op!r}")
        if self.origin != self.record.origin:
            raise Misuse(f"invalid Delta: origin {self.origin!r} != {self.record.origin!r}")
        if not (_is_int(self.seq) and 1 <= self.seq <= MAX_U63):
            raise Misuse(f"invalid Delta: seq must be 1..2**63-1, not {self.seq!r}")


class VersionClock:
    """Issues flow versions that only grow, per node (a Lamport clock).

    ``floor`` is where a new incarnation starts; ``epoch << 32`` is a good
    choice when epochs grow on every restart.  ``observe`` every version the
    node applies or recovers (replicas, snapshots, its own table after a
    restart) so that a takeover or a re-created 5-tuple gets a higher version
    than anything the cluster has seen for that key.
    """

    def __init__(self, floor: int = 0) -> None:
        if not _is_int(floor) or not 0 <= floor < MAX_U63:
            raise Misuse(f"version floor must be 0..2**63-2, not {floor!r}")
        self._last = floor

    @property
    def last(self) -> int:
        return self._last

    def observe(self, version: int) -> None:
        if version > self._last:
            self._last = version

    def next(self) -> int:
        if self._last >= MAX_U63:
            raise Misuse("version clock exhausted")
        self._last += 1
        return self._last


# --- wire conversion ---------------------------------------------------------------


def record_to_pb(record: FlowRecord) -> pb.FlowRecord:
    size = _ADDR_BYTES[record.family]
    return pb.FlowRecord(
        key=record.key,
        proto=record.proto,
        family=record.family,
        orig_src=record.orig_src.to_bytes(size, "big"),
        orig_sport=record.orig_sport,
        orig_dst=record.orig_dst.to_bytes(size, "big"),
        orig_dport=record.orig_dport,
        state=record.state,
        assured=record.assured,
        timeout=float(record.timeout),
        origin=record.origin,
        version=record.version,
    )


def record_from_pb(msg: pb.FlowRecord) -> FlowRecord:
    """Validate and convert; :class:`BadMessage` (reason ``bad-record``) if invalid.

    The hot path of every received delta and snapshot record: the checks are
    those of :func:`_record_problem` (the single definition of a valid
    record; ``tests/unit/test_syncd_records.py`` holds the two to the same
    answers), done on the protobuf fields, whose types already bound most
    ranges, and the record is built without validating it twice.  The
    record's ``wire`` cache is ``msg`` serialized (unknown fields included:
    callers parse peers' messages with them discarded).
    """
    family = msg.family
    size = _ADDR_BYTES.get(family)
    if size is None:
        raise BadMessage("bad-record", f"family must be 4 or 6, not {family}")
    src = msg.orig_src
    dst = msg.orig_dst
    if len(src) != size or len(dst) != size:
        raise BadMessage("bad-record", f"IPv{family} addresses must be {size} bytes")
    key = msg.key
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise BadMessage("bad-record", f"invalid FlowRecord: key must be 1..{MAX_KEY_LEN} bytes")
    proto, sport, dport = msg.proto, msg.orig_sport, msg.orig_dport
    if proto > 255 or sport > 65535 or dport > 65535:
        raise BadMessage("bad-record", "invalid FlowRecord: proto or ports out of range")
    state = msg.state
    if state not in _GOOD_STATES:
        if not _STATE.match(state):
            raise BadMessage("bad-record", f"invalid FlowRecord: state {state[:40]!r}")
        _remember(_GOOD_STATES, state)
    timeout = msg.timeout
    if not 0 <= timeout <= MAX_TIMEOUT:  # NaN fails too
        raise BadMessage("bad-record", f"invalid FlowRecord: timeout {timeout!r}")
    origin = msg.origin
    if origin not in _GOOD_NODES:
        if not check_node_id(origin):
            raise BadMessage("bad-record", f"invalid FlowRecord: origin {origin[:40]!r}")
        _remember(_GOOD_NODES, origin)
    version = msg.version
    if not 1 <= version <= MAX_U63:
        raise BadMessage("bad-record", f"invalid FlowRecord: version {version}")
    # fmt: off
    return _trusted_record(
        key, proto, family, int.from_bytes(src, "big"), sport, int.from_bytes(dst, "big"),
        dport, state, msg.assured, timeout, origin, version, msg.SerializeToString(),
    )
    # fmt: on


def records_from_pb(msgs: Iterable[pb.FlowRecord]) -> list[FlowRecord]:
    """:func:`record_from_pb` of each, in one loop (snapshot pages, batches).

    The common case (a state and an origin already validated, every field
    in range) is checked and built inline; any other record goes through
    :func:`record_from_pb`, which accepts it or raises the precise error.
    So this accepts exactly what it accepts, with the same records.
    """
    out: list[FlowRecord] = []
    append = out.append
    addr_bytes, good_states, good_nodes = _ADDR_BYTES, _GOOD_STATES, _GOOD_NODES
    new, from_bytes = _new, int.from_bytes
    # fmt: off
    (set_key, set_proto, set_family, set_src, set_sport, set_dst, set_dport, set_state,
     set_assured, set_timeout, set_origin, set_version, set_wire) = _R_SETTERS
    # fmt: on
    for msg in msgs:
        family, src, dst, key = msg.family, msg.orig_src, msg.orig_dst, msg.key
        proto, sport, dport = msg.proto, msg.orig_sport, msg.orig_dport
        state, timeout, origin, version = msg.state, msg.timeout, msg.origin, msg.version
        size = addr_bytes.get(family)
        if (
            size is None or len(src) != size or len(dst) != size
            or not 1 <= len(key) <= MAX_KEY_LEN
            or proto > 255 or sport > 65535 or dport > 65535
            or state not in good_states or origin not in good_nodes
            or not 0 <= timeout <= MAX_TIMEOUT  # NaN fails too
            or not 1 <= version <= MAX_U63
        ):  # fmt: skip
            append(record_from_pb(msg))
            continue
        r = new(FlowRecord)
        set_key(r, key)
        set_proto(r, proto)
        set_family(r, family)
        set_src(r, from_bytes(src, "big"))
        set_sport(r, sport)
        set_dst(r, from_bytes(dst, "big"))
        set_dport(r, dport)
        set_state(r, state)
        set_assured(r, msg.assured)
        set_timeout(r, timeout)
        set_origin(r, origin)
        set_version(r, version)
        set_wire(r, msg.SerializeToString())
        append(r)
    return out


def delta_to_pb(delta: Delta) -> pb.Delta:
    return pb.Delta.FromString(delta_wire(delta))


def delta_from_pb(msg: pb.Delta) -> Delta:
    """Validate and convert; :class:`BadMessage` (reason ``bad-delta``/``bad-record``)."""
    op = _OP_FROM_PB.get(msg.op)
    if op is None:
        raise BadMessage("bad-delta", f"unknown op {msg.op}")
    if not msg.HasField("record"):
        raise BadMessage("bad-delta", "delta without a record")
    record = record_from_pb(msg.record)
    origin = msg.origin
    if origin != record.origin:
        raise BadMessage("bad-delta", f"delta origin {origin[:40]!r} != record origin")
    seq = msg.seq
    if not 1 <= seq <= MAX_U63:
        raise BadMessage("bad-delta", f"seq {seq} out of range")
    created = msg.created
    if not 0 <= created <= MAX_CREATED:  # NaN fails too
        raise BadMessage("bad-delta", f"created {created!r} out of range")
    return trusted_delta(op, origin, seq, record, created)


def deltas_from_pb(msgs: Iterable[pb.Delta]) -> list[Delta]:
    """:func:`delta_from_pb` of each, the records converted in one loop (batches).

    Accepts and refuses what :func:`delta_from_pb` does; when several are
    bad, the error raised may be another one's (the ops are checked first,
    then every record, then the rest).
    """
    msgs = list(msgs)
    ops = []
    for msg in msgs:
        op = _OP_FROM_PB.get(msg.op)
        if op is None or not msg.HasField("record"):
            delta_from_pb(msg)  # raises the precise error
        ops.append(op)
    records = records_from_pb([msg.record for msg in msgs])
    out = []
    for msg, op, record in zip(msgs, ops, records, strict=True):
        origin, seq, created = msg.origin, msg.seq, msg.created
        if (
            origin != record.origin
            or not 1 <= seq <= MAX_U63
            or not 0 <= created <= MAX_CREATED  # NaN fails too
            or op is None
        ):
            delta_from_pb(msg)  # raises the precise error
            raise AssertionError("delta_from_pb accepted what deltas_from_pb refused")
        out.append(trusted_delta(op, origin, seq, record, created))
    return out


# --- serialized forms, built once and shared -------------------------------------------
#
# Every delta goes to every peer, and every record a peer sends is forwarded
# to the filter: building protobuf objects field by field for each of them
# cost more than everything else syncd does per delta.  Instead a record
# carries its serialized form (``FlowRecord.wire``), and the messages around
# it are assembled from bytes: protobuf's wire format is a concatenation of
# (tag, value) pairs in any order, so a record at a new version is its wire
# plus the new version field (see with_version).

MAX_CREATED: Final = 1e11  # unix seconds (year 5138): a bound, not a check of the clock
_DOUBLE: Final = struct.Struct("<d")
_SMALL_VARINTS: Final = tuple(bytes((n,)) for n in range(128))
# Validated states and node ids, so each is matched against its regex once.
_GOOD_STATES: Final[set[str]] = set()
_GOOD_NODES: Final[set[str]] = set()
_MAX_REMEMBERED: Final = 4096  # a hostile peer cannot grow these without bound


def _remember(cache: set[str], value: str) -> None:
    if len(cache) < _MAX_REMEMBERED:
        cache.add(value)


# Two varint bytes, both with the continuation bit, for every 14-bit group:
# a version (epoch << 32 and up) takes 3 lookups instead of 6 rounds.
_VARINT_PAIRS: Final = tuple(bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14))


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = b""
    while n >= 0x4000:
        out += _VARINT_PAIRS[n & 0x3FFF]
        n >>= 14
    if n >= 0x80:
        return out + bytes(((n & 0x7F) | 0x80, n >> 7))
    return out + _SMALL_VARINTS[n]


def field_bytes(tag: bytes, value: bytes) -> bytes:
    """A length-delimited field: ``tag`` (one byte: field << 3 | 2), length, value."""
    return tag + varint(len(value)) + value


def record_wire(record: FlowRecord) -> bytes:
    """The serialized pb.FlowRecord (cached on the record: built once, sent many times)."""
    wire = record.wire
    if not wire:
        wire = record_to_pb(record).SerializeToString()
        _R_WIRE(record, wire)
    return wire


def record_body(record: FlowRecord) -> bytes:
    """The record serialized without its version field."""
    msg = pb.FlowRecord.FromString(record_wire(record))
    msg.version = 0
    return msg.SerializeToString()


def delta_wire(delta: Delta) -> bytes:
    """The serialized pb.Delta (cached on the delta: built once for every peer)."""
    wire = delta.wire
    if not wire:
        origin = delta.origin.encode()
        wire = (
            b"\x08" + _SMALL_VARINTS[int(_OP_TO_PB[delta.op])]  # 1: op
            + b"\x12" + _SMALL_VARINTS[len(origin)] + origin  # 2: origin (<= 31 bytes)
            + b"\x18" + varint(delta.seq)  # 3: seq
            + field_bytes(b"\x22", record_wire(delta.record))  # 4: record
        )  # fmt: skip
        if delta.created:
            wire += b"\x29" + _DOUBLE.pack(delta.created)  # 5: created (fixed64)
        _D_WIRE(delta, wire)
    return wire


def with_version(record: FlowRecord, version: int) -> FlowRecord:
    """``record`` at another version (kept valid: the version is checked).

    Its wire form is the old one with the new version field appended: for
    a scalar field that occurs twice, protobuf parsers take the last value
    (a receiver re-serializes it with one).  Only the local origin stamps
    versions, once per change the filter reports, so a record carries at
    most one extra field.
    """
    if not (_is_int(version) and 1 <= version <= MAX_U63):
        raise Misuse(f"version must be 1..2**63-1, not {version!r}")
    r = record
    # fmt: off
    return _trusted_record(
        r.key, r.proto, r.family, r.orig_src, r.orig_sport, r.orig_dst, r.orig_dport,
        r.state, r.assured, r.timeout, r.origin, version,
        record_wire(r) + b"\x60" + varint(version),  # field 12: the last value wins
    )
    # fmt: on


# Building a record from values already checked: the slot descriptors
# directly, skipping __init__ and __post_init__ (five times cheaper).
_new = object.__new__
_R_SETTERS: Final = tuple(
    FlowRecord.__dict__[name].__set__
    for name in ("key", "proto", "family", "orig_src", "orig_sport", "orig_dst", "orig_dport",
                 "state", "assured", "timeout", "origin", "version", "wire")
)  # fmt: skip
(_R_KEY, _R_PROTO, _R_FAMILY, _R_SRC, _R_SPORT, _R_DST, _R_DPORT, _R_STATE, _R_ASSURED,
 _R_TIMEOUT, _R_ORIGIN, _R_VERSION, _R_WIRE) = _R_SETTERS  # fmt: skip
_D_OP, _D_ORIGIN, _D_SEQ, _D_RECORD, _D_CREATED, _D_WIRE = (
    Delta.__dict__[name].__set__ for name in ("op", "origin", "seq", "record", "created", "wire")
)


def trusted_delta(op: Op, origin: str, seq: int, record: FlowRecord, created: float) -> Delta:
    """A Delta from values the caller has checked (origin == record.origin, seq in range)."""
    delta = _new(Delta)
    _D_OP(delta, op)
    _D_ORIGIN(delta, origin)
    _D_SEQ(delta, seq)
    _D_RECORD(delta, record)
    _D_CREATED(delta, created)
    _D_WIRE(delta, b"")
    return delta


def _trusted_record(
    key: bytes, proto: int, family: int, orig_src: int, orig_sport: int, orig_dst: int,
    orig_dport: int, state: str, assured: bool, timeout: float, origin: str, version: int,
    wire: bytes,
) -> FlowRecord:  # fmt: skip
    r = _new(FlowRecord)
    _R_KEY(r, key)
    _R_PROTO(r, proto)
    _R_FAMILY(r, family)
    _R_SRC(r, orig_src)
    _R_SPORT(r, orig_sport)
    _R_DST(r, orig_dst)
    _R_DPORT(r, orig_dport)
    _R_STATE(r, state)
    _R_ASSURED(r, assured)
    _R_TIMEOUT(r, timeout)
    _R_ORIGIN(r, origin)
    _R_VERSION(r, version)
    _R_WIRE(r, wire)
    return r
