"""Where a failover's time went: the survivors' own events, against the fault.

The bench measures what the end hosts see (:mod:`chaos.failover_report`);
this module reads what the cluster agents say they did in the same trial,
so a slow trial can be told apart: a late suspicion (the liveness window),
a slow confirmation (the etcd lease revocation) or a slow claim (etcd
transaction, takeover guard, address and gratuitous ARP).

The events are the agents' contract-C event records (``kind``, ``node``,
``detail``, ``ts`` = wall clock of the node that wrote it, see
:mod:`cluster.agent_runner`): every node of a lab shares the machine's
clock, so ``ts - fault_wall`` is a duration.  Pure: events and the fault's
wall time in, a :class:`Phases` out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Phases", "failover_phases"]


@dataclass(frozen=True, slots=True)
class Phases:
    """Seconds after the fault; None where no survivor reported that step."""

    suspected: float | None  # the first survivor found the victim silent
    revoked: float | None  # a survivor revoked the victim's lease (confirmation)
    claimed: float | None  # survivors held the last of the victim's VIPs
    vips_claimed: int  # how many of the victim's VIPs were acquired from it


def failover_phases(
    events: Iterable[Mapping[str, Any]], victim: str, fault_wall: float, until: float
) -> Phases:
    """The first suspicion and revocation of ``victim`` in the ``until`` seconds
    after ``fault_wall``, and the last ``vip-acquired ... (from victim)`` of
    the first takeover.  ``until`` is where the trial's observation ended: the
    recovery that follows (a restart, a thaw) brings events of its own.

    A VIP acquired from the victim twice (it moved on again) counts once, at
    its first acquisition: the path came back then.  Malformed records are
    skipped: the events are written by other processes.
    """
    suspected = revoked = None
    acquired: dict[str, float] = {}
    for event in events:
        try:
            kind, node, detail = str(event["kind"]), str(event["node"]), str(event["detail"])
            at = float(event["ts"]) - fault_wall
        except (KeyError, TypeError, ValueError):
            continue
        if not 0 <= at <= until or node == victim:
            continue
        words = detail.split()
        if kind == "suspect" and words[:1] == [victim]:
            suspected = at if suspected is None else min(suspected, at)
        elif kind == "revoked" and words[:1] == [victim]:
            revoked = at if revoked is None else min(revoked, at)
        elif kind == "vip-acquired" and words[1:] == ["(from", f"{victim})"]:
            vip = words[0]
            acquired[vip] = min(at, acquired.get(vip, at))
    claimed = max(acquired.values()) if acquired else None
    return Phases(suspected, revoked, claimed, len(acquired))
