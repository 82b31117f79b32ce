"""The rules CLI's input handling (no etcd needed) and the follower against a scripted source."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.errors import BadInput, BadRecord, EtcdUnavailable
from cluster.etcd import StoredRuleset
from cluster.rules import (
    DEFAULT_CLUSTER,
    DEFAULT_ETCD,
    RulesetFollower,
    add_rules_subcommands,
    etcd_endpoint,
)
from node.policy import Ruleset

T = TypeVar("T")

DROP = "default: drop\n"
WEB = "default: drop\nrules:\n  - name: web\n    proto: tcp\n    dport: 80\n    action: accept\n"
BAD = "default: drop\nrules:\n  - name: x\n    proto: tcpx\n    action: accept\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stockade")
    sub = p.add_subparsers(dest="command", required=True)
    rules = sub.add_parser("rules")
    add_rules_subcommands(rules.add_subparsers(dest="rules_command", required=True))
    return p


def cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    code: int = args.handler(args)
    return code


# --- CLI input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://127.0.0.1:2379", "127.0.0.1:2379"),
        ("http://127.0.0.1:2379/", "127.0.0.1:2379"),
        ("etcd.example:2379", "etcd.example:2379"),
        ("http://[::1]:2379", "[::1]:2379"),
    ],
)
def test_etcd_urls_become_endpoints(url: str, endpoint: str) -> None:
    assert etcd_endpoint(url) == endpoint


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1:2379", "http://127.0.0.1", "http://h:2379/v3", "h:99999", ""]
)
def test_bad_etcd_urls_are_refused(url: str) -> None:
    with pytest.raises(BadInput):
        etcd_endpoint(url)


def test_subcommands_and_defaults() -> None:
    args = parser().parse_args(["rules", "apply", "r.yaml", "--comment", "why"])
    assert (args.file, args.comment, args.etcd, args.cluster) == (
        "r.yaml",
        "why",
        DEFAULT_ETCD,
        DEFAULT_CLUSTER,
    )
    assert parser().parse_args(["rules", "show"]).revision is None
    assert parser().parse_args(["rules", "show", "3", "--cluster", "c1"]).revision == 3
    assert parser().parse_args(["rules", "rollback", "2"]).revision == 2
    with pytest.raises(SystemExit):
        parser().parse_args(["rules", "rollback", "0"])
    with pytest.raises(SystemExit):
        parser().parse_args(["rules", "show", "x"])


def test_apply_of_a_bad_file_prints_file_line_and_never_reaches_etcd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    # The endpoint is never contacted: validation comes first.
    assert cli(["rules", "apply", str(bad), "--etcd", "http://192.0.2.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stockade: {bad}:4: bad proto 'tcpx'") and err.count("\n") == 1


def test_apply_of_a_missing_or_non_utf8_file_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["rules", "apply", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"default: drop\n# caf\xe9\n")
    assert cli(["rules", "apply", str(latin)]) == 2
    assert f"{latin}:2: not valid UTF-8" in capsys.readouterr().err


def test_a_bad_cluster_id_or_url_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli(["rules", "history", "--cluster", "bad/id"]) == 2
    assert cli(["rules", "show", "--etcd", "https://127.0.0.1:2379"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("stockade: ") for line in lines)


# --- the follower ----------------------------------------------------------------------


def stored(revision: int, text: str) -> StoredRuleset:
    return StoredRuleset(revision, text, 1.7e9, "")


class ScriptedSource:
    """Each watch_ruleset() call plays the next script: rulesets, then maybe an error."""

    def __init__(self, *scripts: list[StoredRuleset | Exception]) -> None:
        self.scripts = list(scripts)
        self.watches = 0
        self.more = asyncio.Event()  # set to release a watch parked at its end

    async def watch_ruleset(self) -> AsyncGenerator[StoredRuleset, None]:
        self.watches += 1
        script = self.scripts.pop(0) if self.scripts else []
        for item in script:
            if isinstance(item, Exception):
                raise item
            yield item
        if not self.scripts:
            await asyncio.Event().wait()  # a healthy watch with nothing new: park


class Node:
    def __init__(self) -> None:
        self.swaps: list[tuple[int, str]] = []

    def swap(self, ruleset: Ruleset, revision: int) -> None:
        self.swaps.append((revision, ruleset.revision))


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 5.0)

    return asyncio.run(bounded())


async def following(
    source: ScriptedSource, until: Callable[[RulesetFollower], bool], node: Node
) -> RulesetFollower:
    follower = RulesetFollower(source, node.swap, retry_delay=0.001, name="test")
    task = asyncio.create_task(follower.run())
    try:
        while not until(follower):
            await asyncio.sleep(0.001)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return follower


def test_new_revisions_are_swapped_in_and_replays_are_not() -> None:
    node = Node()
    source = ScriptedSource([stored(1, DROP), stored(2, WEB)])

    async def scenario() -> RulesetFollower:
        follower = RulesetFollower(source, node.swap, retry_delay=0.001)
        task = asyncio.create_task(follower.run())
        assert await follower.wait_running(2) == 2
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return follower

    stats = run(scenario()).statistics()
    assert [rev for rev, _ in node.swaps] == [1, 2]
    assert stats.running_revision == 2 and stats.applied == 2 and stats.refused == 0
    assert stats.running_sha256 == stored(2, WEB).sha256
    assert stats.policy_revision == node.swaps[-1][1]
    assert not stats.degraded and stats.last_refusal is stats.last_etcd_error is None


def test_a_ruleset_this_node_cannot_parse_is_refused_and_the_old_one_kept() -> None:
    node = Node()
    source = ScriptedSource(
        [stored(1, DROP), stored(2, BAD)],
        [stored(2, BAD)],  # replayed after a reconnect: not counted twice
        [stored(2, BAD), stored(3, WEB)],
    )
    follower = run(following(source, lambda f: f.statistics().running_revision == 3, node))
    stats = follower.statistics()
    assert [rev for rev, _ in node.swaps] == [1, 3]
    assert stats.refused == 1 and stats.refused_revision == 2
    refusal = stats.last_refusal
    assert refusal is not None and refusal.startswith("test:rules/2:4: bad proto")


def test_etcd_outage_is_fail_static_and_the_follower_catches_up_after() -> None:
    node = Node()
    down = EtcdUnavailable("127.0.0.1:2379", "connection refused")
    source = ScriptedSource(
        [stored(1, DROP), down],
        [down],
        [down],
        [stored(4, WEB)],  # applied while etcd was away from us: read on reconnect
    )
    seen: list[tuple[bool, int | None]] = []

    def until(f: RulesetFollower) -> bool:
        s = f.statistics()
        seen.append((s.degraded, s.running_revision))
        return s.running_revision == 4

    stats = run(following(source, until, node)).statistics()
    assert (True, 1) in seen  # degraded, still running revision 1
    assert [rev for rev, _ in node.swaps] == [1, 4]
    assert stats.etcd_failures == 3 and not stats.degraded
    assert stats.last_etcd_error == str(down)
    assert source.watches == 4


def test_a_corrupt_value_in_etcd_is_refused_once_and_retried() -> None:
    node = Node()
    corrupt = BadRecord("bad-ruleset", "revision 2: not json")
    source = ScriptedSource([stored(1, DROP), corrupt], [corrupt], [corrupt], [stored(3, WEB)])
    stats = run(
        following(source, lambda f: f.statistics().running_revision == 3, node)
    ).statistics()
    assert [rev for rev, _ in node.swaps] == [1, 3]
    assert stats.refused == 1 and stats.refused_revision is None
    assert stats.etcd_failures == 0


def test_retry_delay_is_bounded() -> None:
    with pytest.raises(BadInput):
        RulesetFollower(ScriptedSource(), Node().swap, retry_delay=0)
