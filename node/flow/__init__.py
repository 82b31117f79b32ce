"""Userspace connection tracking: flow keys, the TCP state machine, the flow table.

Pure code: values and ``now`` in, verdicts and events out.  Start with
:class:`FlowTable` (``node.flow.table``).
"""

from __future__ import annotations

from node.flow.events import (
    CtState,
    DeleteReason,
    FlowCreated,
    FlowDeleted,
    FlowEvent,
    FlowSnapshot,
    FlowStateChanged,
)
from node.flow.key import FlowKey, flow_key
from node.flow.table import FlowTable, TableConfig, TableStats, Tracked
from node.flow.tcp import TcpState
from node.flow.timeouts import Timeouts

__all__ = [
    "CtState",
    "DeleteReason",
    "FlowCreated",
    "FlowDeleted",
    "FlowEvent",
    "FlowKey",
    "FlowSnapshot",
    "FlowStateChanged",
    "FlowTable",
    "TableConfig",
    "TableStats",
    "TcpState",
    "Timeouts",
    "Tracked",
    "flow_key",
]
