"""Snapshots and events: the fast frozen constructor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from node.errors import Misuse
from node.flow.events import CtState, DeleteReason, FlowDeleted, FlowSnapshot, frozen_builder
from node.flow.key import FlowKey

KEY = FlowKey.from_bytes(bytes.fromhex("04060a0000019c400a0000020050"))
VALUES = (KEY, 1, 40000, 2, 80, 6, 4, "ESTABLISHED", True, 0.0, 1.0, 2.0, 3, 4, 5, 6, "r", False)


def test_builder_makes_equal_frozen_instances() -> None:
    fast = frozen_builder(FlowSnapshot)(*VALUES)
    slow = FlowSnapshot(*VALUES)
    assert type(fast) is FlowSnapshot
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.state = "CLOSE"  # type: ignore[misc]
    assert dataclasses.replace(fast, state="CLOSE").state == "CLOSE"


def test_builder_refuses_classes_without_matching_slots() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    with pytest.raises(Misuse):
        frozen_builder(NoSlots)
    with pytest.raises(Misuse):
        frozen_builder(int)


def test_enums_are_their_nftables_words() -> None:
    assert [s.value for s in CtState] == ["new", "established", "related", "invalid"]
    assert DeleteReason.REPLACED.value == "replaced"
    event = FlowDeleted(FlowSnapshot(*VALUES), DeleteReason.TIMEOUT, 9.0)
    assert event.reason == "timeout" and event.snapshot.key == KEY
