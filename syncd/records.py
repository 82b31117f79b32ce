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
from dataclasses import dataclass
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
    "record_from_pb",
    "record_to_pb",
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
    """Validate and convert; :class:`BadMessage` (reason ``bad-record``) if invalid."""
    size = _ADDR_BYTES.get(msg.family)
    if size is None:
        raise BadMessage("bad-record", f"family must be 4 or 6, not {msg.family}")
    if len(msg.orig_src) != size or len(msg.orig_dst) != size:
        raise BadMessage("bad-record", f"IPv{msg.family} addresses must be {size} bytes")
    try:
        # The constructor's validation is the single definition of a valid
        # record; here its Misuse means the *peer* sent bad values.
        return FlowRecord(
            key=bytes(msg.key),
            proto=msg.proto,
            family=msg.family,
            orig_src=int.from_bytes(msg.orig_src, "big"),
            orig_sport=msg.orig_sport,
            orig_dst=int.from_bytes(msg.orig_dst, "big"),
            orig_dport=msg.orig_dport,
            state=msg.state,
            assured=msg.assured,
            timeout=msg.timeout,
            origin=msg.origin,
            version=msg.version,
        )
    except Misuse as exc:
        raise BadMessage("bad-record", str(exc)) from None


def delta_to_pb(delta: Delta) -> pb.Delta:
    return pb.Delta(
        op=_OP_TO_PB[delta.op],
        origin=delta.origin,
        seq=delta.seq,
        record=record_to_pb(delta.record),
    )


def delta_from_pb(msg: pb.Delta) -> Delta:
    """Validate and convert; :class:`BadMessage` (reason ``bad-delta``/``bad-record``)."""
    op = _OP_FROM_PB.get(msg.op)
    if op is None:
        raise BadMessage("bad-delta", f"unknown op {msg.op}")
    if not msg.HasField("record"):
        raise BadMessage("bad-delta", "delta without a record")
    record = record_from_pb(msg.record)
    if msg.origin != record.origin:
        raise BadMessage("bad-delta", f"delta origin {msg.origin!r} != record origin")
    if not 1 <= msg.seq <= MAX_U63:
        raise BadMessage("bad-delta", f"seq {msg.seq} out of range")
    return Delta(op, msg.origin, msg.seq, record)
