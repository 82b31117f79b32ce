"""The lab benchmarks (``stockade bench failover``, ``stockade bench asymmetric``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def bench_subcommands(sub: SubParsers) -> SubParsers:
    """The subcommands of ``stockade bench`` (node.bench registers the command
    itself; a tree without it still gets one)."""
    bench = sub.choices.get("bench")
    if bench is None:
        bench = sub.add_parser("bench", help="performance benchmarks")
    actions = [a for a in bench._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0] if actions else bench.add_subparsers(dest="bench_command", required=True)
