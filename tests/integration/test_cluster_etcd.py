"""The etcd adapter against a real etcd on loopback (``tests/etcd_fixture.py``).

Timings measured here are printed (run with ``-s``) and bounded by asserts:
a clean leave is seen at once, a crashed node's record vanishes about
TTL + 0.5 s after its last keepalive (etcd 3.4), a dead etcd costs at most the
call timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from cluster.errors import (
    BadInput,
    EtcdError,
    EtcdUnavailable,
    LeaseLost,
    NodeIdInUse,
    UnknownRevision,
)
from cluster.etcd import EtcdConfig, EtcdMembership, EtcdStore
from cluster.etcd_server import LocalEtcd, free_port
from cluster.membership import (
    MemberChange,
    MemberJoined,
    MemberLeft,
    Membership,
    MembersSnapshot,
    NodeState,
)

pytest_plugins = ["tests.etcd_fixture"]
pytestmark = pytest.mark.integration

T = TypeVar("T")
TTL = 1.0


def run(coro: Coroutine[Any, Any, T], limit: float = 20.0) -> T:
    """Run one test's coroutine with a hard bound, so a bug fails instead of hanging."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


class Observer:
    """Feeds a store's member watch into a pure Membership, timestamping changes."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.view = Membership()
        self.changes: list[tuple[float, MemberChange]] = []
        self.error: EtcdError | None = None
        self.ended_at: float | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 5.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        try:
            async with contextlib.aclosing(self.store.watch_members()) as stream:
                async for event in stream:
                    now = time.monotonic()
                    if isinstance(event, MembersSnapshot):
                        changes = self.view.resync(event, now)
                        self._ready.set()
                    else:
                        changes = self.view.apply(event, now)
                    self.changes.extend((now, change) for change in changes)
        except EtcdError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self._ready.set()

    async def wait_for(self, kind: type, node_id: str, timeout: float = 5.0) -> float:
        """When a change of ``kind`` about ``node_id`` arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, change in self.changes:
                record = change.record if isinstance(change, MemberJoined | MemberLeft) else None
                if isinstance(change, kind) and record is not None and record.node_id == node_id:
                    return at
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind.__name__} for {node_id} within {timeout} s: {self.changes}")


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def timed(call: Awaitable[Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call
    except BaseException as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_members_see_each_other_join_and_a_clean_leave(etcd: str, cluster_id: str) -> None:
    async def scenario() -> None:
        config = EtcdConfig(etcd)
        async with EtcdMembership(config, cluster_id) as a, EtcdMembership(config, cluster_id) as b:
            await a.register("a", "127.0.0.1:7001")
            async with Observer(a) as seen_by_a, Observer(b) as seen_by_b:
                await b.register("b", "127.0.0.1:7002")
                await seen_by_a.wait_for(MemberJoined, "b")
                await seen_by_b.wait_for(MemberJoined, "b")
                assert set(seen_by_b.view.members()) == {"a", "b"}
                await b.update(state=NodeState.UP, vips=("10.9.0.1",))
                await until(lambda: seen_by_a.view.live() == {"b"}, 2.0, "b up")
                assert seen_by_a.view.get("b").vips == ("10.9.0.1",)  # type: ignore[union-attr]
                left = time.monotonic()
                await b.leave()
                seen = await seen_by_a.wait_for(MemberLeft, "b")
                print(f"\nclean leave seen after {1000 * (seen - left):.0f} ms")
                assert seen - left < 0.5
                assert set(seen_by_a.view.members()) == {"a"}

    run(scenario())


def test_lease_ttl_of_one_second_is_granted(etcd: str, cluster_id: str) -> None:
    async def scenario() -> None:
        async with EtcdMembership(EtcdConfig(etcd, lease_ttl=1), cluster_id) as a:
            await a.register("a", "127.0.0.1:7001")
            remaining, granted = await a.lease_info()
            assert a.granted_ttl == granted == 1
            assert 0 <= remaining <= 1
            await asyncio.sleep(1.5)  # keepalives hold it past the TTL
            remaining, _ = await a.lease_info()
            assert remaining >= 0 and a.statistics().keepalives >= 3

    run(scenario())


def test_crashed_member_leaves_within_ttl_and_restarts_with_a_new_epoch(
    etcd: str, cluster_id: str
) -> None:
    async def scenario() -> None:
        config = EtcdConfig(etcd)
        async with EtcdMembership(config, cluster_id) as a, EtcdMembership(config, cluster_id) as b:
            first = await b.register("b", "127.0.0.1:7002")
            async with Observer(a) as seen_by_a:
                await a.register("a", "127.0.0.1:7001")
                await asyncio.sleep(0.5)
                await b.abandon()  # keepalives stop; the lease is not revoked
                last_heard = b.statistics().health.last_success
                assert last_heard is not None
                gone = await seen_by_a.wait_for(MemberLeft, "b", timeout=5.0)
                latency = gone - last_heard
                print(f"\ncrash seen {1000 * latency:.0f} ms after the last keepalive (TTL 1 s)")
                assert TTL - 0.1 <= latency <= TTL + 0.8
                again = await b.register("b", "127.0.0.1:7002")
                assert again.epoch == first.epoch + 1
                await seen_by_a.wait_for(MemberJoined, "b")

    run(scenario())


def test_revoking_a_suspect_removes_it_and_it_learns_its_lease_is_lost(
    etcd: str, cluster_id: str
) -> None:
    async def scenario() -> None:
        config = EtcdConfig(etcd)
        async with EtcdMembership(config, cluster_id) as a, EtcdMembership(config, cluster_id) as b:
            await a.register("a", "127.0.0.1:7001")
            record = await b.register("b", "127.0.0.1:7002")
            assert await b.claim_vip("10.9.0.7", "b", b.lease_id)
            async with Observer(a) as seen_by_a:
                assert not await a.revoke_member("b", epoch=record.epoch + 1)  # other incarnation
                started = time.monotonic()
                assert await a.revoke_member("b", epoch=record.epoch)
                await seen_by_a.wait_for(MemberLeft, "b", timeout=2.0)
                lost = await asyncio.wait_for(b.wait_lease_lost(), 2.0)
                print(f"\nrevoked node learned it in {1000 * (time.monotonic() - started):.0f} ms")
                assert isinstance(lost, LeaseLost) and b.statistics().lease_lost
                assert await a.vip_holders() == {}  # its VIP went with its lease
                assert not await a.revoke_member("b")
                with pytest.raises(LeaseLost):
                    await b.update(state=NodeState.UP)
                # Recovery: the revoked node joins again as a new incarnation.
                again = await b.register("b", "127.0.0.1:7002")
                assert again.epoch == record.epoch + 1 and b.lease_lost is None
                await seen_by_a.wait_for(MemberJoined, "b")

    run(scenario())


def test_a_live_node_id_cannot_be_registered_twice(etcd: str, cluster_id: str) -> None:
    async def scenario() -> None:
        async with (
            EtcdMembership(EtcdConfig(etcd), cluster_id) as a,
            EtcdMembership(EtcdConfig(etcd, register_wait=0.3), cluster_id) as twin,
        ):
            await a.register("x", "127.0.0.1:7001")
            with pytest.raises(NodeIdInUse):
                await twin.register("x", "127.0.0.1:7009")
            assert twin.statistics().lease_id is None
            snapshot = await a.list_members()
            assert [p.node_id for p in snapshot.puts] == ["x"]

    run(scenario())


def test_racing_vip_claims_have_exactly_one_winner(etcd: str, cluster_id: str) -> None:
    vips = [f"10.9.1.{i}" for i in range(1, 21)]

    async def scenario() -> None:
        config = EtcdConfig(etcd)
        async with EtcdMembership(config, cluster_id) as a, EtcdMembership(config, cluster_id) as b:
            await a.register("a", "127.0.0.1:7001")
            await b.register("b", "127.0.0.1:7002")
            claims = [
                claim
                for vip in vips
                for claim in (
                    a.claim_vip(vip, "a", a.lease_id),
                    b.claim_vip(vip, "b", b.lease_id),
                )
            ]
            results = await asyncio.gather(*claims)
            winners = {}
            for vip, (a_won, b_won) in zip(
                vips, zip(results[::2], results[1::2], strict=True), strict=True
            ):
                assert a_won != b_won, vip
                winners[vip] = "a" if a_won else "b"
            assert await a.vip_holders() == winners
            vip = vips[0]
            holder, other = (a, b) if winners[vip] == "a" else (b, a)
            assert await holder.claim_vip(vip, winners[vip], holder.lease_id)  # idempotent
            loser = "b" if winners[vip] == "a" else "a"
            assert not await other.claim_vip(vip, loser, other.lease_id)
            assert not await other.release_vip(vip, loser)
            assert await holder.release_vip(vip, winners[vip])
            assert await other.claim_vip(vip, loser, other.lease_id)

    run(scenario())


def test_rulesets_put_history_get_watch_and_rollback(etcd: str, cluster_id: str) -> None:
    async def scenario() -> None:
        async with EtcdStore(EtcdConfig(etcd), cluster_id) as store:
            with pytest.raises(UnknownRevision):
                await store.get_ruleset()
            seen: list[int] = []

            async def follow() -> None:
                async with contextlib.aclosing(store.watch_ruleset()) as stream:
                    async for ruleset in stream:
                        seen.append(ruleset.revision)

            follower = asyncio.create_task(follow())
            await asyncio.sleep(0.2)
            assert await store.put_ruleset("default: drop\n", "first") == 1
            assert await store.put_ruleset("default: accept\n") == 2
            assert await store.rollback_ruleset(1) == 3
            current = await store.get_ruleset()
            assert (current.revision, current.text, current.comment) == (
                3,
                "default: drop\n",
                "rollback to 1",
            )
            assert (await store.get_ruleset(2)).text == "default: accept\n"
            with pytest.raises(UnknownRevision):
                await store.get_ruleset(9)
            history = await store.history()
            assert [(h.revision, h.current) for h in history] == [(1, False), (2, False), (3, True)]
            assert history[0].sha256 == history[2].sha256 != history[1].sha256
            await until(lambda: seen == [1, 2, 3], 2.0, "watched revisions")
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            # A new watcher starts from the current ruleset.
            async with contextlib.aclosing(store.watch_ruleset()) as stream:
                first = await anext(stream)
                assert first.revision == 3
            with pytest.raises(BadInput):
                await store.put_ruleset("x" * (1 << 20))

    run(scenario())


def test_nothing_listening_is_unavailable_at_once() -> None:
    async def scenario() -> None:
        async with EtcdMembership(EtcdConfig(f"127.0.0.1:{free_port()}", timeout=0.5), "lab") as m:
            elapsed, error = await timed(m.register("a", "127.0.0.1:7001"))
            print(f"\nrefused endpoint: EtcdUnavailable after {1000 * elapsed:.0f} ms")
            assert isinstance(error, EtcdUnavailable) and elapsed < 1.0
            assert m.health.degraded(time.monotonic())

    run(scenario())


def test_a_silent_endpoint_times_out_instead_of_hanging() -> None:
    # A listener that completes TCP handshakes but never speaks HTTP/2.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"

        async def scenario() -> None:
            async with EtcdStore(EtcdConfig(endpoint, timeout=0.5), "lab") as store:
                elapsed, error = await timed(store.list_members())
                print(f"\nsilent endpoint: EtcdUnavailable after {1000 * elapsed:.0f} ms")
                assert isinstance(error, EtcdUnavailable) and elapsed < 1.5

        run(scenario())


def test_killed_etcd_is_unavailable_quickly_and_the_view_stays(private_etcd: LocalEtcd) -> None:
    async def scenario() -> None:
        config = EtcdConfig(private_etcd.endpoint, timeout=0.5)
        async with EtcdMembership(config, "lab") as a, EtcdMembership(config, "lab") as b:
            await a.register("a", "127.0.0.1:7001", NodeState.UP)
            await b.register("b", "127.0.0.1:7002", NodeState.UP)
            async with Observer(b) as seen_by_b:
                assert seen_by_b.view.live() == {"a", "b"}
                private_etcd.kill()
                killed = time.monotonic()
                elapsed, error = await timed(b.list_members())
                print(f"\nkilled etcd: EtcdUnavailable after {1000 * elapsed:.0f} ms")
                assert isinstance(error, EtcdUnavailable) and elapsed < 1.0
                ended = await until(lambda: seen_by_b.ended_at is not None, 2.0, "watch end")
                print(f"killed etcd: watch ended {1000 * (ended - killed):.0f} ms after the kill")
                assert isinstance(seen_by_b.error, EtcdUnavailable)
                # Fail static: the last membership stays as it was.
                assert seen_by_b.view.live() == {"a", "b"}
                await until(lambda: b.health.degraded(time.monotonic()), 2.0, "degraded")
                await until(lambda: a.statistics().keepalive_failures > 0, 2.0, "a keepalive fails")
                assert a.lease_lost is None  # etcd never said the lease is gone

            # etcd comes back with its data: leases are renewed, a fresh watch resyncs.
            await asyncio.to_thread(private_etcd.start)  # returns once etcd is healthy
            healthy = time.monotonic()
            await until(lambda: not b.health.degraded(time.monotonic()), 5.0, "recovered")
            resumed = 1000 * (time.monotonic() - healthy)
            print(f"etcd back: keepalives resumed {resumed:.0f} ms after it was healthy")
            async with Observer(b) as again:
                assert again.view.live() == {"a", "b"}

    run(scenario(), limit=30.0)
