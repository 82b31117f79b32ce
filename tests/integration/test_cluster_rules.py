"""The rules CLI and the follower against a real etcd on loopback (``tests/etcd_fixture.py``).

Measured numbers are printed (run with ``-s``): how long after ``rules apply``
returns a follower has swapped the new ruleset in, and how long a CLI call
against a dead endpoint takes to fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.errors import EtcdUnavailable
from cluster.etcd import EtcdConfig, EtcdStore
from cluster.etcd_server import LocalEtcd, free_port
from cluster.rules import RulesetFollower, add_rules_subcommands
from node.policy import Ruleset, parse_ruleset

pytest_plugins = ["tests.etcd_fixture"]
pytestmark = pytest.mark.integration

T = TypeVar("T")

DROP = "default: drop\n"
WEB = "default: drop\nrules:\n  - name: web\n    proto: tcp\n    dport: 80\n    action: accept\n"
BAD = "default: drop\nrules:\n  - name: x\n    proto: tcpx\n    action: accept\n"


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stockade")
    sub = parser.add_subparsers(dest="command", required=True)
    rules = sub.add_parser("rules")
    add_rules_subcommands(rules.add_subparsers(dest="rules_command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def flags(etcd: str, cluster_id: str) -> list[str]:
    return ["--etcd", f"http://{etcd}", "--cluster", cluster_id]


def run(coro: Coroutine[Any, Any, T], limit: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_apply_history_show_rollback_round_trip(
    etcd: str, cluster_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = flags(etcd, cluster_id)
    assert cli(["rules", "history", *at]) == 0
    assert "no ruleset stored" in capsys.readouterr().out

    assert cli(["rules", "apply", write(tmp_path, "a.yaml", DROP), "--comment", "base", *at]) == 0
    out = capsys.readouterr().out
    assert out.startswith("applied revision 1 (0 rules, ruleset ")
    assert parse_ruleset(DROP).revision in out
    assert cli(["rules", "apply", write(tmp_path, "b.yaml", WEB), *at]) == 0
    assert capsys.readouterr().out.startswith("applied revision 2 (1 rule, ")
    # The same text again is not a new revision.
    assert cli(["rules", "apply", str(tmp_path / "b.yaml"), *at]) == 0
    assert "unchanged: revision 2" in capsys.readouterr().out

    assert cli(["rules", "show", *at]) == 0
    assert capsys.readouterr().out == WEB
    assert cli(["rules", "show", "1", *at]) == 0
    assert capsys.readouterr().out == DROP

    assert cli(["rules", "rollback", "1", "--comment", "web broke", *at]) == 0
    assert "revision 3 has revision 1's text" in capsys.readouterr().out
    assert cli(["rules", "show", *at]) == 0
    assert capsys.readouterr().out == DROP

    assert cli(["rules", "history", *at]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "REV" in lines[0] and len(lines) == 4
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["1", "2", "*"]  # the current one is marked
    assert rows[2][1] == "3" and lines[3].endswith("rollback to 1: web broke")
    assert rows[0][3] == rows[2][4]  # same text, same hash; revision 2's differs
    assert rows[1][3] != rows[0][3]
    assert lines[1].endswith("base")

    assert cli(["rules", "show", "9", *at]) == 2
    assert cli(["rules", "rollback", "9", *at]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("no ruleset revision 9" in line for line in err)


def test_a_bad_file_is_refused_with_file_line_and_nothing_is_stored(
    etcd: str, cluster_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = flags(etcd, cluster_id)
    bad = write(tmp_path, "bad.yaml", BAD)
    assert cli(["rules", "apply", bad, *at]) == 2
    assert capsys.readouterr().err == (
        f"stockade: {bad}:4: bad proto 'tcpx': expected any | icmp | tcp | udp | icmpv6 | "
        "ipv6-icmp or a number 0-255\n"
    )

    async def stored() -> int:
        async with EtcdStore(EtcdConfig(etcd), cluster_id) as store:
            return len(await store.history())

    assert run(stored()) == 0


def test_rollback_to_a_revision_this_version_cannot_parse_stores_nothing(
    etcd: str, cluster_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def seed() -> None:
        async with EtcdStore(EtcdConfig(etcd), cluster_id) as store:
            await store.put_ruleset(BAD, "written by a newer CLI")
            await store.put_ruleset(DROP)

    run(seed())
    assert cli(["rules", "rollback", "1", *flags(etcd, cluster_id)]) == 2
    assert "revision 1:4: bad proto" in capsys.readouterr().err
    assert cli(["rules", "show", *flags(etcd, cluster_id)]) == 0
    assert capsys.readouterr().out == DROP


def test_etcd_down_is_one_clean_line_naming_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    good = write(tmp_path, "a.yaml", DROP)
    timings = []
    for argv in (["apply", good], ["history"], ["show"], ["rollback", "1"]):
        started = time.monotonic()
        code = cli(["rules", *argv, "--etcd", url, "--timeout", "0.5"])
        elapsed = time.monotonic() - started
        captured = capsys.readouterr()
        timings.append(f"{argv[0]} {1000 * elapsed:.0f} ms")
        assert code == 1 and elapsed < 2.0
        assert captured.out == ""
        assert captured.err.startswith(f"stockade: etcd at {url} is unreachable: ")
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    print("\nrules against a dead endpoint, exit 1 after: " + ", ".join(timings))


class SwapLog:
    def __init__(self) -> None:
        self.swaps: list[tuple[float, int, str]] = []

    def swap(self, ruleset: Ruleset, revision: int) -> None:
        self.swaps.append((time.monotonic(), revision, ruleset.revision))


async def start_follower(
    etcd: str, cluster_id: str, node: SwapLog, retry: float = 0.1
) -> tuple[EtcdStore, RulesetFollower, asyncio.Task[None]]:
    store = EtcdStore(EtcdConfig(etcd, timeout=0.5), cluster_id)
    follower = RulesetFollower(store, node.swap, retry_delay=retry, name=f"etcd {etcd}")
    return store, follower, asyncio.create_task(follower.run())


async def stop_follower(store: EtcdStore, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()


def test_followers_hot_swap_each_applied_revision(
    etcd: str, cluster_id: str, tmp_path: Path
) -> None:
    texts = [DROP, WEB] * 5
    files = [write(tmp_path, f"r{i}.yaml", text) for i, text in enumerate(texts)]
    at = flags(etcd, cluster_id)

    async def scenario() -> tuple[list[float], list[float]]:
        nodes = [SwapLog(), SwapLog()]
        running = [await start_follower(etcd, cluster_id, node) for node in nodes]
        await asyncio.sleep(0.3)  # both watches established
        delays, from_start = [], []
        try:
            for i, path in enumerate(files, start=1):
                started = time.monotonic()
                code = await asyncio.to_thread(cli, ["rules", "apply", path, *at])
                applied = time.monotonic()
                assert code == 0
                for _store, follower, _task in running:
                    await asyncio.wait_for(follower.wait_running(i), 2.0)
                delays += [node.swaps[-1][0] - applied for node in nodes]
                from_start += [node.swaps[-1][0] - started for node in nodes]
            for node, (_store, follower, _task) in zip(nodes, running, strict=True):
                assert [rev for _, rev, _ in node.swaps] == list(range(1, len(files) + 1))
                stats = follower.statistics()
                assert stats.running_revision == len(files) and stats.refused == 0
                assert stats.policy_revision == parse_ruleset(texts[-1]).revision
        finally:
            for store, _follower, task in running:
                await stop_follower(store, task)
        return delays, from_start

    delays, from_start = run(scenario())
    ms = sorted(1000 * d for d in delays)
    ms_start = sorted(1000 * d for d in from_start)
    print(
        f"\nfollower swap, {len(ms)} swaps: after `rules apply` started median "
        f"{statistics.median(ms_start):.1f} ms, max {ms_start[-1]:.1f} ms; after it returned "
        f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms (negative: before)"
    )
    assert ms[-1] < 1000


def test_a_ruleset_the_node_cannot_parse_is_refused_and_reported(
    etcd: str, cluster_id: str
) -> None:
    async def scenario() -> None:
        node = SwapLog()
        store, follower, task = await start_follower(etcd, cluster_id, node)
        try:
            await store.put_ruleset(DROP)
            await asyncio.wait_for(follower.wait_running(1), 2.0)
            await store.put_ruleset(BAD, "bypassing the CLI")
            deadline = time.monotonic() + 2.0
            while follower.statistics().refused == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stats = follower.statistics()
            assert stats.refused == 1 and stats.refused_revision == 2
            assert stats.running_revision == 1 and len(node.swaps) == 1
            assert stats.last_refusal is not None and ":rules/2:4: bad proto" in stats.last_refusal
            await store.put_ruleset(WEB)
            await asyncio.wait_for(follower.wait_running(3), 2.0)
        finally:
            await stop_follower(store, task)

    run(scenario())


def test_follower_is_fail_static_while_etcd_is_down_and_catches_up(
    private_etcd: LocalEtcd,
) -> None:
    endpoint = private_etcd.endpoint

    async def scenario() -> None:
        node = SwapLog()
        store, follower, task = await start_follower(endpoint, "lab", node)
        try:
            async with EtcdStore(EtcdConfig(endpoint), "lab") as writer:
                await writer.put_ruleset(DROP)
            await asyncio.wait_for(follower.wait_running(1), 2.0)
            private_etcd.kill()
            killed = time.monotonic()
            while not follower.statistics().degraded:
                assert time.monotonic() - killed < 3.0, "outage not noticed"
                await asyncio.sleep(0.01)
            print(f"\nfollower degraded {1000 * (time.monotonic() - killed):.0f} ms after kill")
            await asyncio.sleep(1.0)  # retries keep failing; the ruleset stays
            stats = follower.statistics()
            assert stats.running_revision == 1 and stats.degraded and stats.etcd_failures >= 2
            await asyncio.to_thread(private_etcd.start)
            healthy = time.monotonic()
            async with EtcdStore(EtcdConfig(endpoint), "lab") as writer:
                # grpc shares subchannels per process: a fresh client may first
                # meet the reconnect backoff left by the outage (at most 2 s).
                deadline = time.monotonic() + 5.0
                while True:
                    try:
                        assert await writer.put_ruleset(WEB) == 2
                        break
                    except EtcdUnavailable:
                        assert time.monotonic() < deadline, "etcd not reachable after restart"
                        await asyncio.sleep(0.05)
            await asyncio.wait_for(follower.wait_running(2), 5.0)
            print(f"follower on revision 2 {1000 * (time.monotonic() - healthy):.0f} ms "
                  "after etcd was healthy again")  # fmt: skip
            assert not follower.statistics().degraded
            assert [rev for _, rev, _ in node.swaps] == [1, 2]
        finally:
            await stop_follower(store, task)

    run(scenario())
