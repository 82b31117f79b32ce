"""The one exception family of the ``cluster`` package.

Contract (what the cluster agent does with each):

* :class:`BadInput` means *the outside world gave us something bad*: a
  member record in etcd that fails validation (:class:`BadRecord`), an
  operator asking for a ruleset revision that does not exist.  Nothing held
  is lost: the pure :class:`cluster.membership.Membership` counts a bad
  record by ``reason`` and keeps its previous view; the CLI prints the
  message.
* :class:`EtcdError` means an etcd call did not do what was asked.  Its
  subclass :class:`EtcdUnavailable` is the one the agent plans for: etcd could
  not be reached within the bounded timeout, so the node goes *fail static*
  (keeps forwarding with the last membership it knew, moves no VIP) and says
  so.  :class:`EtcdRejected` means etcd answered but refused (an unknown
  lease, a compacted watch revision, a value too large); :class:`LeaseLost`
  means our own lease is gone, so peers already consider us dead.
  ``endpoint`` says which etcd, for the log line.
* :class:`Misuse` means *our own code called us wrongly* (an illegal state
  transition, an empty hash ring, a value outside a documented range).  It
  is a bug; adapters let it propagate.

Any exception that is none of these is also a bug.  Library errors (aetcd,
grpc.aio, JSON decoding) are translated into these once, at the edge
(``cluster.etcd`` and ``cluster.membership.MemberRecord.from_json``).
"""

from __future__ import annotations


class ClusterError(Exception):
    """Base of every error raised on purpose by ``cluster``."""


class BadInput(ClusterError):
    """Input from outside (etcd values, operator requests) is invalid."""


class BadRecord(BadInput):
    """A value read from etcd fails validation.

    ``reason`` is a short stable token (``not-json``, ``bad-field``,
    ``key-mismatch``, ``epoch-regressed`` ...) used as a counter label.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class UnknownRevision(BadInput):
    """A ruleset revision that etcd does not hold was asked for."""

    def __init__(self, revision: int | None) -> None:
        what = "no ruleset stored yet" if revision is None else f"no ruleset revision {revision}"
        super().__init__(what)
        self.revision = revision


class Misuse(ClusterError):
    """The package was used against its documented contract (a bug)."""


class EmptyRing(Misuse):
    """A hash ring was built from no members.

    Callers check that :meth:`cluster.membership.Membership.live` is not
    empty first: with no live member nobody owns a flow, which is a cluster
    state the agent handles, not something a ring can answer.
    """


class IllegalTransition(Misuse):
    """The local lifecycle state machine got an input its table does not allow."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"no transition from {state!r} on {event!r}")
        self.state = state
        self.event = event


class EtcdError(ClusterError):
    """An etcd call failed.  ``endpoint`` is the etcd it talked to."""

    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"etcd {endpoint}: {detail}")
        self.endpoint = endpoint
        self.detail = detail


class EtcdUnavailable(EtcdError):
    """etcd could not be reached, or did not answer within the timeout."""


class EtcdRejected(EtcdError):
    """etcd answered but refused the request."""


class LeaseLost(EtcdError):
    """Our membership lease expired or was revoked (by a peer confirming a suspicion)."""


class NodeIdInUse(EtcdError):
    """Another live record holds our node id (a duplicate id, or our previous
    incarnation whose lease has not expired yet and did not within the wait)."""
