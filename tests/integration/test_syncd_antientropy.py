"""Anti-entropy between two real syncd nodes over gRPC (in one process, loopback).

Two :class:`syncd.daemon.SyncNode`s (insecure gRPC on 127.0.0.1, no filter)
exchange their own flows through the Exchange stream.  The replica stores
are then damaged behind the protocol's back (a lost create, a lost delete, a
stale version, a record of the wrong version), which the streams alone would
never notice; one anti-entropy round repairs both sides through the real
``Digest`` and ``Repair`` calls.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from syncd.antientropy import AntiEntropyConfig
from syncd.config import PeerConfig, SyncdConfig
from syncd.daemon import SyncNode
from syncd.records import Op
from syncd.session import SessionConfig, State
from tests.syncd_link import make_record

pytestmark = pytest.mark.integration


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def _pair(tmp: str, **extra: Any) -> tuple[SyncNode, SyncNode]:
    """fwa and fwb, peers of each other on loopback (plaintext), not started."""
    ports = {"fwa": _port(), "fwb": _port()}
    nodes = {}
    for n, other in (("fwa", "fwb"), ("fwb", "fwa")):
        config = SyncdConfig(
            node_id=n, cluster_id="ae", state_dir=f"{tmp}/{n}", local_socket=f"{tmp}/{n}.sock",
            listen=f"127.0.0.1:{ports[n]}", insecure=True, recovery_timeout=0.5,
            peers=(PeerConfig(other, f"127.0.0.1:{ports[other]}"),), **extra,
        )  # fmt: skip
        nodes[n] = SyncNode(config, 1, None)
    return nodes["fwa"], nodes["fwb"]


def _held(node: SyncNode, origin: str) -> dict[bytes, int]:
    return {r.key: r.version for r in node.store.records(origin)}


def test_one_round_repairs_both_sides(tmp_path) -> None:
    asyncio.run(_scenario(str(tmp_path)))


async def _scenario(tmp: str) -> None:
    a, b = _pair(tmp, session=SessionConfig(cluster_id="ae"))
    for node in (a, b):  # every round hashes the stores afresh
        node.anti_entropy.config = AntiEntropyConfig(digest_max_age=0)
    try:
        await asyncio.gather(a.start(), b.start())
        await _until(lambda: a.links["fwb"].state is State.LIVE, 10, "stream up")
        await _until(lambda: b.links["fwa"].state is State.LIVE, 10, "stream up")
        for node in (a, b):
            me = node.config.node_id
            deltas = [(Op.CREATE, make_record(b"%s-%03d" % (me.encode(), i), me, 1))
                      for i in range(300)]  # fmt: skip
            node.apply_local(deltas)
        await _until(lambda: len(a.store) == len(b.store) == 600, 10, "streams converge")
        assert await a.anti_entropy.round("fwb")
        assert a.anti_entropy.statistics().buckets_differing == 0

        # Damage behind the protocol's back.
        now = 1.0
        gone = b.store.get(b"fwa-000").record  # a lost create
        b.store.remove_exact(gone.key, gone.order, now)
        b.store._tombstones.clear()  # the tombstone expired too
        dead = make_record(b"fwa-999", "fwa", 5)  # a lost delete, tombstone expired
        b.store.apply(Op.CREATE, dead, now)
        stale = a.store.get(b"fwb-007").record  # fwa missed an update of fwb's flow
        newer = make_record(stale.key, "fwb", stale.version + 1, "FIN_WAIT")
        b.origin.change(Op.UPDATE, newer, now)  # fwb's own change, never streamed
        a_before, b_before = _held(a, "fwa"), _held(b, "fwb")
        assert _held(b, "fwa") != a_before and _held(a, "fwb") != b_before

        assert await a.anti_entropy.round("fwb")

        assert _held(b, "fwa") == a_before == _held(a, "fwa")
        assert _held(a, "fwb") == b_before == _held(b, "fwb")
        stats = a.anti_entropy.statistics()
        assert stats.rounds == 2 and stats.buckets_differing >= 2
        assert stats.repairs["adopted"] >= 1  # fwb's newer record
        peer_side = b.anti_entropy.statistics().peer_repairs
        assert peer_side["adopted"] >= 1 and peer_side["removed"] >= 1
        assert await a.anti_entropy.round("fwb")
        assert a.anti_entropy.statistics().buckets_differing == stats.buckets_differing
    finally:
        await asyncio.gather(a.stop(), b.stop())


def test_metrics_endpoint_shows_lag_and_counters(tmp_path) -> None:
    asyncio.run(_metrics_scenario(str(tmp_path)))


async def _metrics_scenario(tmp: str) -> None:
    from syncd.metrics import MetricsConfig, start_metrics

    a, b = _pair(tmp)
    server = None
    try:
        await asyncio.gather(a.start(), b.start())
        await _until(lambda: a.links["fwb"].state is State.LIVE, 10, "stream up")
        a.apply_local([(Op.CREATE, make_record(b"m-%03d" % i, "fwa", 1)) for i in range(200)])
        await _until(lambda: len(b.store) == 200, 10, "deltas arrive")
        await a.anti_entropy.round("fwb")
        server = await start_metrics(b, MetricsConfig("127.0.0.1:0"))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
        assert text.startswith("HTTP/1.1 200")
        assert 'stockade_sync_lag_seconds_count{node="fwb",origin="fwa"} 200.0' in text
        assert 'stockade_sync_lag_seconds_bucket{le="+Inf",node="fwb",origin="fwa"} 200.0' in text
        assert (
            'stockade_sync_deltas_received_total{node="fwb",origin="fwa",outcome="applied"} 200.0'
            in text
        )
        assert 'stockade_sync_peer_state{node="fwb",peer="fwa",state="live"} 1.0' in text
        assert 'stockade_sync_store_records{node="fwb"} 200.0' in text
        assert (
            'stockade_sync_antientropy_repairs_total{kind="adopted",node="fwb",side="peer"}' in text
        )
    finally:
        if server is not None:
            await server.close()
        await asyncio.gather(a.stop(), b.stop())


def test_no_repair_while_a_pull_runs(tmp_path) -> None:
    """A round that outlives its digests (the peer restarted and pulls) stops, refused."""
    asyncio.run(_busy_scenario(str(tmp_path)))


async def _busy_scenario(tmp: str) -> None:
    import grpc

    from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
    from syncd._pb.stockade.sync.v1 import sync_pb2_grpc as rpc
    from syncd.aerun import _Abandoned

    a, b = _pair(tmp)
    try:
        await asyncio.gather(a.start(), b.start())
        await _until(lambda: a.links["fwb"].state is State.LIVE, 10, "stream up")
        a.apply_local([(Op.CREATE, make_record(b"p-%03d" % i, "fwa", 1)) for i in range(100)])
        await _until(lambda: len(b.store) == 100, 10, "deltas arrive")
        b.links["fwa"].inbox.pulling = True  # fwb pulls a snapshot (as after a restart)
        stub = rpc.StateSyncStub(a._channels["fwb"])  # type: ignore[no-untyped-call]
        request = pb.RepairRequest(
            origin="fwa", buckets=16, bucket_ids=[0, 1], as_of_version=1, node_id="fwa"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Repair(request, timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "syncing" in (info.value.details() or "")
        assert len(b.store) == 100  # nothing of fwa's (empty) entries applied
        assert not await a.anti_entropy.round("fwb")  # the digest is refused too
        skipped = a.anti_entropy.statistics().rounds_skipped
        b.links["fwa"].inbox.pulling = False
        a.links["fwb"].inbox.pulling = True  # the requester's own pull began mid-round
        with pytest.raises(_Abandoned):
            await a.anti_entropy._repair("fwb", "fwa", [0, 1], stub)
        a.links["fwb"].inbox.pulling = False
        assert await a.anti_entropy.round("fwb")
        assert a.anti_entropy.statistics().rounds_skipped == skipped
    finally:
        await asyncio.gather(a.stop(), b.stop())
