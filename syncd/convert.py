"""The filter's flow events <-> syncd's records, deltas and local-link messages.

The filter (``node.flow``) speaks in :class:`FlowSnapshot` and flow events;
syncd speaks in :class:`FlowRecord` and :class:`Delta`.  Addresses are
integers on both sides and a flow's key is the same bytes
(``FlowKey.to_bytes()`` is ``FlowRecord.key``), so conversion is field by
field, with two translations:

* time: a snapshot holds an absolute ``deadline`` on the filter's clock, a
  record the seconds left (``timeout``), so records travel between clocks;
  ``timeout = deadline - now``, clamped to ``0..MAX_TIMEOUT``;
* ownership: a record names its ``origin`` and ``version``; the filter's
  change events do not carry them, the caller supplies both.

Which events become deltas: ``FlowCreated`` -> CREATE, ``FlowStateChanged``
-> UPDATE (every state change: peers need the state and the assured flag),
``FlowDeleted`` -> DELETE (the record as deleted).  A
:class:`node.flow.replica.ReplicaDeleted` becomes nothing: it is a replica
leaving this table, or a peer's DELETE applied here, and sending it would
echo other nodes' news back as ours.  Installing a replica emits no event
at all, so nothing else can loop.

The inverse direction is :func:`apply_change`: a CREATE / UPDATE installs
the record in the table, a DELETE removes it (``FlowRecord`` satisfies
:class:`node.flow.replica.RecordLike` as it is).

Errors: building a record from a snapshot with values syncd would refuse
(a version of 0) is a bug (:class:`syncd.errors.Misuse`); a local-link
message with a bad record raises :class:`syncd.errors.BadMessage`; the
table raises :class:`node.errors.BadInput` for a record that contradicts
its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from node.flow.events import FlowCreated, FlowDeleted, FlowEvent, FlowSnapshot, FlowStateChanged
from node.flow.replica import ApplyOutcome, ReplicaDeleted
from node.flow.table import FlowTable
from syncd._pb.stockade.sync.v1 import local_pb2
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import BadMessage, Misuse
from syncd.records import (
    MAX_TIMEOUT,
    Delta,
    FlowRecord,
    Op,
    VersionClock,
    record_from_pb,
    record_to_pb,
)
from syncd.session import Sequencer

__all__ = [
    "LocalChange",
    "apply_change",
    "change_from_event",
    "change_from_pb",
    "change_to_local_pb",
    "change_to_replica_pb",
    "delta_from_event",
    "is_replicated",
    "record_from_snapshot",
]

_OP_TO_PB: Final = {Op.CREATE: pb.OP_CREATE, Op.UPDATE: pb.OP_UPDATE, Op.DELETE: pb.OP_DELETE}
_OP_FROM_PB: Final = {int(v): k for k, v in _OP_TO_PB.items()}


@dataclass(frozen=True, slots=True)
class LocalChange:
    """One change on the local link: a LocalDelta (filter -> syncd) or a ReplicaUpdate."""

    op: Op  # CREATE and UPDATE are one upsert for the receiver
    record: FlowRecord  # the flow after the change (DELETE: as deleted)


def record_from_snapshot(
    snapshot: FlowSnapshot, origin: str, version: int, now: float
) -> FlowRecord:
    """The record of ``snapshot`` owned by ``origin`` at ``version``, as of ``now``."""
    timeout = min(max(snapshot.deadline - now, 0.0), MAX_TIMEOUT)
    return FlowRecord(
        key=bytes(snapshot.key),
        proto=snapshot.proto,
        family=snapshot.family,
        orig_src=snapshot.orig_src,
        orig_sport=snapshot.orig_sport,
        orig_dst=snapshot.orig_dst,
        orig_dport=snapshot.orig_dport,
        state=snapshot.state,
        assured=snapshot.assured,
        timeout=timeout,
        origin=origin,
        version=version,
    )


def is_replicated(event: FlowEvent) -> bool:
    """Whether ``event`` is this node's news for the cluster (see the module docstring)."""
    return not isinstance(event, ReplicaDeleted)


def _op_of(event: FlowEvent) -> Op:
    if isinstance(event, FlowCreated):
        return Op.CREATE
    if isinstance(event, FlowStateChanged):
        return Op.UPDATE
    if isinstance(event, FlowDeleted):
        return Op.DELETE
    raise Misuse(f"not a flow event: {event!r}")


def change_from_event(
    event: FlowEvent, origin: str, version: int, now: float
) -> LocalChange | None:
    """The local-link change for this node's ``event``; None if it is not replicated."""
    if not is_replicated(event):
        return None
    return LocalChange(_op_of(event), record_from_snapshot(event.snapshot, origin, version, now))


def delta_from_event(
    event: FlowEvent, sequencer: Sequencer, clock: VersionClock, now: float
) -> Delta | None:
    """The next delta of ``sequencer``'s origin for ``event``; None if not replicated.

    Takes a version from ``clock`` (and a seq) only for a replicated event.
    For syncd running in the same process as a table (tests, simulations);
    the filter process uses :func:`change_from_event` with a version it
    stamped into the table when the event happened.
    """
    if not is_replicated(event):
        return None
    record = record_from_snapshot(event.snapshot, sequencer.origin, clock.next(), now)
    return sequencer.delta(_op_of(event), record)


def apply_change(
    table: FlowTable, op: Op, record: FlowRecord, now: float
) -> tuple[ApplyOutcome, tuple[FlowEvent, ...]]:
    """Apply a peer's (or a restored) record to the filter's table.

    CREATE / UPDATE -> :meth:`FlowTable.install`, DELETE ->
    :meth:`FlowTable.remove_replica`.  Returns the outcome and the events
    (evictions, ReplicaDeleted).  Raises :class:`node.errors.BadInput` for a
    record that contradicts its key.
    """
    if op is Op.DELETE:
        return table.remove_replica(record, now)
    return table.install(record, now)


def change_to_local_pb(change: LocalChange) -> local_pb2.LocalDelta:
    return local_pb2.LocalDelta(op=_OP_TO_PB[change.op], record=record_to_pb(change.record))


def change_to_replica_pb(change: LocalChange) -> local_pb2.ReplicaUpdate:
    return local_pb2.ReplicaUpdate(op=_OP_TO_PB[change.op], record=record_to_pb(change.record))


def change_from_pb(msg: local_pb2.LocalDelta | local_pb2.ReplicaUpdate) -> LocalChange:
    """Validate and convert a LocalDelta or ReplicaUpdate; BadMessage if invalid."""
    op = _OP_FROM_PB.get(msg.op)
    if op is None:
        raise BadMessage("bad-delta", f"unknown op {msg.op}")
    if not msg.HasField("record"):
        raise BadMessage("bad-delta", "change without a record")
    return LocalChange(op, record_from_pb(msg.record))
