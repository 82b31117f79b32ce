"""The one exception family of the ``syncd`` package.

Contract (what the gRPC adapters and the daemon do with each):

* :class:`PeerError` means *a peer sent us something bad*: a message that
  breaks the protocol (wrong cluster id, unexpected node id, an epoch going
  backwards, an ack for a delta never sent).  :class:`BadMessage`, its
  subclass, means the message itself is malformed (a field out of range, a
  missing record, an unknown op).  Either way nothing of that message has
  been applied, the session that raised it is CLOSED, and the adapter
  closes the stream, counts the error by ``reason`` and reconnects later
  (the next session resends or resyncs; nothing is lost silently).
* :class:`ConfigError` means the operator's configuration is invalid; it is
  raised while the daemon builds its frozen config and stops start-up.
* :class:`Misuse` means *our own code called us wrongly* (an illegal state
  transition, a delta numbered out of order, a value outside a documented
  range).  It is a bug; adapters let it propagate.

Any exception that is none of these is also a bug.  Library errors (grpc.aio,
protobuf decode errors) are translated into these once, at the adapter edge.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base of every error raised on purpose by ``syncd``."""


class PeerError(SyncError):
    """A peer broke the protocol.  ``reason`` is a short stable counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadMessage(PeerError):
    """A message from a peer is malformed (fails validation of its fields)."""


class ConfigError(SyncError):
    """The syncd configuration (file or flags) is invalid."""


class Misuse(SyncError):
    """The package was used against its documented contract (a bug)."""
