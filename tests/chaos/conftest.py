"""Chaos runs are long: collected always, run only when selected with ``-m chaos``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "chaos" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long chaos run: select it with -m chaos")
    for item in items:
        if "chaos" in item.keywords:
            item.add_marker(skip)
