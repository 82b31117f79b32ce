"""The one exception family of the ``node`` package.

Contract:

* :class:`BadInput` means *the outside world sent us something bad*: a
  malformed packet, a broken rules file, a bad config value.  Adapters turn
  it into a verdict (INVALID, counted by reason), an error message with
  ``file:line``, or a refused reload.  Nothing already held is lost.
* :class:`Misuse` means *our own code called us wrongly* (an illegal state
  transition, a value outside a documented range).  It is a bug; adapters
  let it propagate.

Any exception that is neither is also a bug.  Library errors (netfilterqueue,
pyroute2, iptables exit codes, YAML) are translated into these once, at the
edge that calls the library.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error raised on purpose by ``node``."""


class BadInput(NodeError):
    """Input from outside (network, files, operator) is invalid."""


class Misuse(NodeError):
    """The package was used against its documented contract (a bug)."""


class PacketError(BadInput):
    """A packet could not be parsed.

    ``reason`` is a short stable token (``truncated``, ``bad-version``,
    ``bad-header-length`` ...) used as the label of the drop counter.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RulesError(BadInput):
    """A rules file is invalid.  ``str()`` reads ``file:line: message``."""

    def __init__(self, filename: str, line: int | None, message: str) -> None:
        where = f"{filename}:{line}" if line is not None else filename
        super().__init__(f"{where}: {message}")
        self.filename = filename
        self.line = line
        self.message = message


class ConfigError(BadInput):
    """A node configuration file or flag is invalid."""


class DataplaneError(NodeError):
    """The host refused a data-plane operation (iptables, NFQUEUE bind).

    Raised by adapters only; carries the command or call that failed.
    """
