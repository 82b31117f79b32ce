"""Errors of the ``chaos`` package (labs, fault injection, scenarios).

Contract: :class:`LabError` means the host refused to build or change a lab
(a command failed, a name is invalid); the CLI prints it as one line and
exits non-zero.  Anything else is a bug.
"""

from __future__ import annotations


class ChaosError(Exception):
    """Base of every error raised on purpose by ``chaos``."""


class LabError(ChaosError):
    """Building, changing or removing a lab failed."""
