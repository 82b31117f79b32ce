"""What the flow table tells the rest of the node: ct states, snapshots, events.

* :class:`CtState` is the per-packet answer, with Linux semantics
  (``ctstate NEW / ESTABLISHED / RELATED / INVALID``).
* :class:`FlowSnapshot` is an immutable copy of one flow.  The table keeps
  flows in compact columns and builds snapshots only when asked or when it
  reports an event.
* Events (:class:`FlowCreated`, :class:`FlowStateChanged`,
  :class:`FlowDeleted`) are what the sync daemon replicates.

:func:`frozen_builder` exists for speed: a frozen dataclass's generated
``__init__`` sets every field through ``object.__setattr__`` (about 0.15 us a
field on the target machines), which would make a per-packet snapshot cost
more than the whole state machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from node.errors import Misuse
from node.flow.key import FlowKey

__all__ = [
    "CtState",
    "DeleteReason",
    "FlowCreated",
    "FlowDeleted",
    "FlowEvent",
    "FlowSnapshot",
    "FlowStateChanged",
    "frozen_builder",
]


class CtState(StrEnum):
    """Conntrack state of one packet (nftables ``ct state``)."""

    NEW = "new"  # first packet(s) of a flow, before any reply
    ESTABLISHED = "established"  # a reply has been seen (or this is one)
    RELATED = "related"  # ICMP error about a tracked flow
    INVALID = "invalid"  # does not fit any flow; see Tracked.reason


class DeleteReason(StrEnum):
    """Why a flow left the table."""

    TIMEOUT = "timeout"  # its deadline passed
    RST = "rst"  # reset before any reply was seen (Linux kills these at once)
    EVICTED = "evicted"  # early drop: the table was full
    REPLACED = "replaced"  # a new SYN reopened a TIME_WAIT/CLOSE tuple
    FLUSH = "flush"  # FlowTable.flush()
    ADMIN = "admin"  # deleted by an operator or the sync daemon


@dataclass(frozen=True, slots=True)
class FlowSnapshot:
    """One flow, as of the moment the snapshot was taken."""

    key: FlowKey  # direction-independent key (see node.flow.key)
    orig_src: int  # source address of the first packet (the original direction)
    orig_sport: int  # its source port (ICMP echo: identifier; else 0)
    orig_dst: int  # destination address of the first packet
    orig_dport: int  # its destination port
    proto: int  # IP protocol number
    family: int  # 4 or 6
    state: str  # TCP: TcpState name; UDP/ICMP: UNREPLIED/ASSURED; other: UNREPLIED/REPLIED
    assured: bool  # never early-dropped (handshake done / reply seen)
    created_at: float  # `now` of the first packet
    last_seen: float  # `now` of the latest accepted packet
    deadline: float  # absolute time the flow expires unless refreshed
    packets_orig: int  # packets counted in the original direction
    packets_reply: int  # packets counted in the reply direction
    bytes_orig: int  # IP bytes counted in the original direction
    bytes_reply: int  # IP bytes counted in the reply direction
    rule: str | None  # name of the rule that admitted the flow
    offloaded: bool  # the kernel fast path forwards its ordinary packets


@dataclass(frozen=True, slots=True)
class FlowCreated:
    snapshot: FlowSnapshot  # the new flow
    at: float  # `now` when it was created


@dataclass(frozen=True, slots=True)
class FlowStateChanged:
    """The flow's state or its assured flag changed (the sync daemon replicates both)."""

    snapshot: FlowSnapshot  # the flow after the change
    old_state: str  # FlowSnapshot.state before the change
    at: float  # `now` of the packet that changed it


@dataclass(frozen=True, slots=True)
class FlowDeleted:
    snapshot: FlowSnapshot  # the flow as it was when deleted
    reason: DeleteReason  # why
    at: float  # `now` of the deletion


FlowEvent = FlowCreated | FlowStateChanged | FlowDeleted

_T = TypeVar("_T")


def frozen_builder(cls: type[_T]) -> Callable[..., _T]:
    """A fast positional constructor for the frozen, slotted dataclass ``cls``.

    It is a mutable twin with the same slot layout: its generated
    ``__init__`` stores fields with plain attribute stores (no
    ``object.__setattr__`` per field) and then switches the new object's
    ``__class__`` to ``cls``, which CPython allows between identical layouts.  The
    result is an ordinary, frozen ``cls`` instance, equal to one built the
    normal way.  Arguments are the fields in declaration order; nothing is
    validated, so use it only where the caller produced the values.
    """
    slots = getattr(cls, "__slots__", None)
    if not dataclasses.is_dataclass(cls) or slots is None:
        raise Misuse(f"{cls!r} is not a slotted dataclass")
    names = [f.name for f in dataclasses.fields(cls)]
    if tuple(names) != tuple(slots):
        raise Misuse(f"{cls!r}: slots {slots} differ from fields {names}")

    def become_frozen(self: Any) -> None:
        self.__class__ = cls

    twin: Any = dataclasses.make_dataclass(
        f"_Mutable{cls.__name__}",
        names,
        slots=True,
        eq=False,
        repr=False,
        namespace={"__post_init__": become_frozen},
    )
    return twin  # type: ignore[no-any-return]
