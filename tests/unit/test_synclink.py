"""The filter's sync link against a fake syncd on a real unix socket (asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from node.engine import Engine, Verdict
from node.errors import ConfigError
from node.flow.events import DeleteReason, FlowEvent
from node.flow.key import flow_key
from node.flow.replica import FlowOrigin, ReplicaDeleted
from node.flow.table import TableConfig
from node.packet import ACK, SYN, TCP, Packet
from node.policy import parse_ruleset
from node.synclink import SyncLink, SyncLinkConfig
from syncd._pb.stockade.sync.v1 import local_pb2, sync_pb2
from syncd.convert import LocalChange, change_from_pb, change_to_replica_pb
from syncd.errors import BadMessage
from syncd.framing import read_frame, write_frame
from syncd.local import LocalServer
from syncd.records import FlowRecord, Op, VersionClock, record_to_pb
from syncd.replica import Change, ChangeKind
from tests.packets import tcp4

NODE = "fw1"
C, S = "10.10.1.2", "10.10.2.2"
RULES = "default: drop\nrules:\n  - {name: web, proto: tcp, dport: 80, action: accept}\n"
FAST = SyncLinkConfig(retry_min=0.01, retry_max=0.05, hello_timeout=1.0)


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def record(sport: int, origin: str = "fw2", version: int = 5, **change: Any) -> FlowRecord:
    key, _ = flow_key(Packet(4, ip(C), ip(S), TCP, sport, 80, 40))
    values: dict[str, Any] = {
        "key": key.to_bytes(), "proto": TCP, "family": 4, "orig_src": ip(C),
        "orig_sport": sport, "orig_dst": ip(S), "orig_dport": 80, "state": "ESTABLISHED",
        "assured": True, "timeout": 300.0, "origin": origin, "version": version,
    }  # fmt: skip
    values.update(change)
    return FlowRecord(**values)


class FakeSyncd:
    """Just enough of syncd's side of local.proto: a table the filter's deltas
    update (without re-versioning), TableChunks of it on request, and a record
    of every frame the filter sent."""

    def __init__(
        self,
        path: str,
        *,
        table: tuple[FlowRecord, ...] = (),
        chunk: int = 2,
        node_id: str = NODE,
        epoch: int = 1,
    ) -> None:
        self.path = path
        self.table = {r.key: r for r in table}
        self.chunk = chunk
        self.node_id = node_id
        self.epoch = epoch
        self.frames: list[local_pb2.LocalFrame] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> FakeSyncd:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(BadMessage, ConnectionError):
            while (frame := await read_frame(reader)) is not None:
                self.frames.append(frame)
                kind = frame.WhichOneof("body")
                if kind == "hello":
                    hello = local_pb2.LocalHello(
                        protocol=1, node_id=self.node_id, role="syncd", epoch=self.epoch
                    )
                    await write_frame(writer, local_pb2.LocalFrame(hello=hello))
                elif kind == "table_request":
                    await self._send_table(writer, frame.table_request.request_id)
                elif kind == "local":
                    self._apply(frame.local)
        writer.close()

    def _apply(self, batch: local_pb2.LocalBatch) -> None:
        for delta in batch.deltas:
            change = change_from_pb(delta)
            if change.op is Op.DELETE:
                self.table.pop(change.record.key, None)
            else:
                self.table[change.record.key] = change.record

    async def _send_table(self, writer: asyncio.StreamWriter, request_id: int) -> None:
        records = [record_to_pb(r) for r in self.table.values()]
        pages = [records[i : i + self.chunk] for i in range(0, len(records), self.chunk)] or [[]]
        for i, page in enumerate(pages):
            chunk = local_pb2.TableChunk(
                request_id=request_id, records=page, last=i == len(pages) - 1
            )
            await write_frame(writer, local_pb2.LocalFrame(table_chunk=chunk))

    async def push(self, *changes: LocalChange) -> None:
        batch = local_pb2.ReplicaBatch(updates=[change_to_replica_pb(c) for c in changes])
        await write_frame(self.writers[-1], local_pb2.LocalFrame(replicas=batch))

    async def send_raw(self, data: bytes) -> None:
        self.writers[-1].write(data)
        await self.writers[-1].drain()

    def drop_connection(self) -> None:
        """Close the filter's connection; syncd and its table stay."""
        self.writers[-1].close()

    async def crash(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    def kinds(self) -> list[str | None]:
        return [f.WhichOneof("body") for f in self.frames]

    def deltas(self) -> list[LocalChange]:
        batches = [f.local for f in self.frames if f.HasField("local")]
        return [change_from_pb(d) for batch in batches for d in batch.deltas]

    def own_ports(self) -> set[int]:
        """Source ports of the flows syncd holds for this node."""
        return {r.orig_sport for r in self.table.values() if r.origin == NODE}


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def engine() -> Engine:
    return Engine(TableConfig(), parse_ruleset(RULES, "rules"))


def link_for(e: Engine, path: str, config: SyncLinkConfig = FAST, **kw: Any) -> SyncLink:
    """A link on the engine's clock (packets here run at 1.0 .. 2.0)."""
    kw.setdefault("now", lambda: 5.0)
    return SyncLink(NODE, path, e.table, VersionClock(1000), epoch=7, config=config, **kw)


def fast(**change: Any) -> SyncLinkConfig:
    return SyncLinkConfig(retry_min=0.01, retry_max=0.05, hello_timeout=1.0, **change)


def new_flows(e: Engine, link: SyncLink, first: int, count: int) -> list[FlowEvent]:
    events: list[FlowEvent] = []
    for sport in range(first, first + count):
        d = e.process(tcp4(C, sport, S, 80, SYN, seq=1), 1.0)
        assert d.verdict is Verdict.ACCEPT
        link.offer(d.events)
        events += d.events
    return events


def run(scenario: Callable[[str], Coroutine[Any, Any, None]], tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(scenario(str(tmp_path / "sync.sock")), 20.0))


async def stopped(link: SyncLink, *syncds: FakeSyncd) -> None:
    await link.stop()
    for syncd in syncds:
        await syncd.crash()


# --- the first round: restore ----------------------------------------------------------


def test_fresh_start_restores_the_table_then_reports_synced(tmp_path):
    own, peer = record(1, origin=NODE, version=3, timeout=60.0), record(2, origin="fw2")

    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path, table=(own, peer, record(3)), chunk=2).start()
        e = engine()
        link = link_for(e, path, now=lambda: 100.0)
        assert not link.is_synced
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        assert syncd.kinds()[:2] == ["hello", "table_request"]
        hello = syncd.frames[0].hello
        assert (hello.protocol, hello.node_id, hello.role, hello.epoch) == (1, NODE, "filter", 7)
        assert e.table.origin_of(own.key) == FlowOrigin(NODE, 3, False)
        assert e.table.origin_of(peer.key) == FlowOrigin("fw2", 5, True)
        flow = e.table.get(own.key)
        assert flow is not None and flow.deadline == 160.0  # expires here: it is ours
        stats = link.statistics()
        assert (stats.connected, stats.synced, stats.rounds_total, stats.chunks_total) == (
            True, True, 1, 2,
        )  # fmt: skip
        assert (stats.chunk_records_total, stats.replicas_applied_total) == (3, 3)
        assert (stats.resent_total, stats.deletes_resent_total, stats.swept_total) == (0, 0, 0)
        assert syncd.deltas() == []
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_versions_seen_in_the_restore_outrank_new_local_changes(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path, table=(record(1, version=50_000),)).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        new_flows(e, link, 40000, 1)
        await until(lambda: len(syncd.deltas()) == 1)
        assert syncd.deltas()[0].record.version > 50_000
        await stopped(link, syncd)

    run(scenario, tmp_path)


# --- deltas out --------------------------------------------------------------------------


def test_local_changes_are_batched_into_local_batches(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path, fast(batch_max=2, batch_delay=0.001))
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        created = new_flows(e, link, 40000, 5)
        deleted = e.table.delete(created[0].snapshot.key, DeleteReason.ADMIN, 2.0)
        assert deleted is not None
        link.offer([deleted])
        await until(lambda: len(syncd.deltas()) == 6)
        batches = [len(f.local.deltas) for f in syncd.frames if f.HasField("local")]
        assert max(batches) <= 2 and sum(batches) == 6
        changes = syncd.deltas()
        assert [c.op for c in changes] == [Op.CREATE] * 5 + [Op.DELETE]
        assert [c.record.version for c in changes] == list(range(1001, 1007))
        assert all(c.record.origin == NODE for c in changes)
        assert e.table.origin_of(created[1].snapshot.key) == FlowOrigin(NODE, 1002, False)
        assert syncd.own_ports() == {40001, 40002, 40003, 40004}
        stats = link.statistics()
        assert (stats.deltas_sent_total, stats.queued) == (6, 0)
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_a_change_on_an_idle_link_goes_at_once_and_a_busy_link_gathers_a_batch(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path, fast(batch_delay=0.4))
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        await asyncio.sleep(0.45)  # the hello and the first round's frames are history
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        new_flows(e, link, 40000, 1)
        await until(lambda: len(syncd.deltas()) == 1)
        assert loop.time() - t0 < 0.3  # not held back for batch_delay
        t1 = loop.time()
        new_flows(e, link, 40001, 1)  # the link just sent: this one waits for company
        await asyncio.sleep(0.05)
        new_flows(e, link, 40002, 2)
        await until(lambda: len(syncd.deltas()) == 4)
        assert loop.time() - t1 >= 0.35
        batches = [len(f.local.deltas) for f in syncd.frames if f.HasField("local")]
        assert batches == [1, 3]
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_replica_deletions_are_not_sent(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        e.table.install(record(1), 1.0)
        (quiet,) = e.table.flush(2.0)
        assert isinstance(quiet, ReplicaDeleted)
        link.offer([quiet])
        new_flows(e, link, 40000, 1)
        await until(lambda: len(syncd.deltas()) == 1)
        await asyncio.sleep(0.02)
        assert [c.op for c in syncd.deltas()] == [Op.CREATE]
        await stopped(link, syncd)

    run(scenario, tmp_path)


# --- replicas in -------------------------------------------------------------------------


def test_replica_batches_install_update_and_remove(tmp_path):
    removed: list[FlowEvent] = []

    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path, on_events=removed.extend)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        a, b = record(1, version=5), record(2, version=5)
        await syncd.push(LocalChange(Op.CREATE, a), LocalChange(Op.CREATE, b))
        await until(lambda: len(e.table) == 2)
        await syncd.push(
            LocalChange(Op.UPDATE, record(1, version=6, state="FIN_WAIT", assured=False)),
            LocalChange(Op.UPDATE, record(2, version=4, state="CLOSE")),  # stale
            LocalChange(Op.DELETE, record(2, version=9)),
        )
        await until(lambda: b.key not in e.table)
        flow = e.table.get(a.key)
        assert flow is not None and flow.state == "FIN_WAIT"
        assert [type(ev) for ev in removed] == [ReplicaDeleted]
        stats = link.statistics()
        assert (stats.replicas_applied_total, stats.replicas_ignored_total) == (4, 1)
        await asyncio.sleep(0.02)
        assert syncd.deltas() == []  # applying replicas sends nothing back
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_bad_record_is_skipped_and_the_rest_applied(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        wrong_tuple = record(1, orig_sport=9)  # the key says port 1
        short = local_pb2.ReplicaUpdate(op=sync_pb2.OP_CREATE, record=record_to_pb(record(3)))
        short.record.orig_dst = b"\x01"
        good = change_to_replica_pb(LocalChange(Op.CREATE, record(2)))
        bad = change_to_replica_pb(LocalChange(Op.CREATE, wrong_tuple))
        batch = local_pb2.ReplicaBatch(updates=[bad, short, good])
        await write_frame(syncd.writers[-1], local_pb2.LocalFrame(replicas=batch))
        await until(lambda: len(e.table) == 1)
        stats = link.statistics()
        assert (stats.bad_records_total, stats.connected) == (2, True)
        assert stats.last_error is not None and "bad record" in stats.last_error
        await stopped(link, syncd)

    run(scenario, tmp_path)


# --- reconnects and reconcile rounds -----------------------------------------------------------


def test_reconnect_after_syncd_restart_sends_every_own_flow_again(tmp_path):
    async def scenario(path: str) -> None:
        first = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        e.table.install(record(9), 1.0)  # a replica: never sent by this node
        created = new_flows(e, link, 40000, 3)
        await until(lambda: len(first.deltas()) == 3)
        await first.crash()
        await until(lambda: not link.connected)
        more = new_flows(e, link, 40003, 1)  # while syncd is away: queued
        second = await FakeSyncd(path, epoch=2).start()  # an empty table
        await until(lambda: link.statistics().resent_total == 3)
        assert second.kinds()[:3] == ["hello", "local", "table_request"]  # the queue first
        assert set(second.table) == {bytes(ev.snapshot.key) for ev in created + more}
        assert {c.op for c in second.deltas()} == {Op.CREATE}
        stats = link.statistics()
        assert (stats.connects_total, stats.disconnects_total, stats.rounds_total) == (2, 1, 2)
        await stopped(link, second)

    run(scenario, tmp_path)


def test_reconnect_to_the_same_syncd_resends_nothing(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        new_flows(e, link, 40000, 3)
        await until(lambda: len(syncd.deltas()) == 3)
        syncd.drop_connection()
        await until(lambda: link.statistics().chunks_total == 3)  # 1 + 2 pages: round 2 ended
        await asyncio.sleep(0.02)
        stats = link.statistics()
        assert (stats.rounds_total, stats.resent_total, stats.deletes_resent_total) == (2, 0, 0)
        assert len(syncd.deltas()) == 3
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_a_lost_replica_delete_is_swept_on_the_next_round(tmp_path):
    removed: list[FlowEvent] = []

    async def scenario(path: str) -> None:
        kept, lost = record(1), record(2)
        syncd = await FakeSyncd(path, table=(kept, lost)).start()
        e = engine()
        link = link_for(e, path, on_events=removed.extend)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        assert len(e.table) == 2
        del syncd.table[lost.key]  # its DELETE never reached this filter
        syncd.drop_connection()
        await until(lambda: link.statistics().swept_total == 1)
        assert lost.key not in e.table and kept.key in e.table
        assert [type(ev) for ev in removed] == [ReplicaDeleted]
        assert syncd.deltas() == []  # not this node's news
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_an_own_flow_that_ended_while_syncd_was_away_is_deleted_there(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path, fast(queue_len=1))
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        (a,) = new_flows(e, link, 40000, 1)
        await until(lambda: syncd.own_ports() == {40000})
        await link.stop()  # away
        new_flows(e, link, 40001, 1)  # queued: the queue is full now
        gone = e.table.delete(a.snapshot.key, DeleteReason.ADMIN, 2.0)
        assert gone is not None
        link.offer([gone])  # dropped: overflow
        assert link.statistics().overflow_total == 1
        await link.start()
        await until(lambda: syncd.own_ports() == {40001})
        assert link.statistics().deletes_resent_total == 1
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_a_lost_state_change_is_resent(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        new_flows(e, link, 40000, 1)
        await until(lambda: syncd.own_ports() == {40000})
        await link.stop()
        synack = e.process(tcp4(S, 80, C, 40000, SYN | ACK, seq=9, ack=2), 2.0)
        assert synack.events  # SYN_SENT -> SYN_RECV, never offered: "lost"
        await link.start()
        await until(lambda: link.statistics().resent_total == 1)
        (held,) = syncd.table.values()
        assert held.state == "SYN_RECV"
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_syncd_down_at_start_the_filter_keeps_filtering_and_retries(tmp_path):
    async def scenario(path: str) -> None:
        e = engine()
        link = link_for(e, path)
        await link.start()
        new_flows(e, link, 40000, 2)  # the packet path never waits
        await until(lambda: link.statistics().connect_failures_total >= 2)
        assert link.statistics().queued == 2 and not link.connected
        syncd = await FakeSyncd(path).start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        await until(lambda: syncd.own_ports() == {40000, 40001})
        stats = link.statistics()
        assert (stats.deltas_sent_total, stats.resent_total) == (2, 0)  # the queue had it all
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_overflow_before_the_first_round_is_repaired_by_it(tmp_path):
    async def scenario(path: str) -> None:
        e = engine()
        link = link_for(e, path, fast(queue_len=3))
        created = new_flows(e, link, 40000, 3)  # fills the queue
        gone = e.table.delete(created[0].snapshot.key, DeleteReason.ADMIN, 2.0)
        assert gone is not None
        link.offer([gone])  # dropped
        new_flows(e, link, 40003, 2)  # dropped
        stats = link.statistics()
        assert (stats.overflow_total, stats.queued) == (3, 3)
        syncd = await FakeSyncd(path).start()
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        # 40000 reached syncd, then ended here: deleted (not restored); 40003/4 resent.
        await until(lambda: syncd.own_ports() == {40001, 40002, 40003, 40004})
        stats = link.statistics()
        assert (stats.resent_total, stats.deletes_resent_total, stats.rounds_total) == (2, 1, 1)
        assert e.table.get(created[0].snapshot.key) is None
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_overflow_while_connected_starts_another_round(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path, fast(queue_len=2))
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        new_flows(e, link, 40000, 6)  # four of them overflow, in one loop turn
        await until(lambda: syncd.own_ports() == set(range(40000, 40006)))
        stats = link.statistics()
        assert (stats.overflow_total, stats.rounds_total, stats.resent_total) == (4, 2, 4)
        await stopped(link, syncd)

    run(scenario, tmp_path)


# --- bad input, lifecycle -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        ((5 * 1024 * 1024).to_bytes(4, "big"), "frame-too-large"),
        (b"\x00\x00\x00\x03\xff\xff\xff", "bad-frame"),
        (
            b"\x00\x00\x00\x02" + local_pb2.LocalFrame(table_request={}).SerializeToString(),
            "unexpected-frame",
        ),
    ],
)
def test_garbage_from_syncd_closes_the_session_and_the_link_recovers(tmp_path, garbage, reason):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        await syncd.send_raw(garbage)
        await until(lambda: link.statistics().bad_frames_total == 1)
        assert reason in (link.statistics().last_error or "")
        new_flows(e, link, 40000, 1)  # filtering goes on
        await until(lambda: link.statistics().connects_total == 2)
        await until(lambda: syncd.own_ports() == {40000})
        assert link.statistics().internal_errors_total == 0
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_syncd_of_another_node_is_refused(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path, node_id="fw9").start()
        link = link_for(engine(), path)
        await link.start()
        await until(lambda: link.statistics().bad_frames_total >= 2)
        stats = link.statistics()
        assert (stats.connected, stats.connects_total, stats.synced) == (False, 0, False)
        assert "bad-hello" in (stats.last_error or "")
        assert "table_request" not in syncd.kinds()
        await stopped(link, syncd)

    run(scenario, tmp_path)


def test_stop_closes_the_link(tmp_path):
    async def scenario(path: str) -> None:
        syncd = await FakeSyncd(path).start()
        link = link_for(engine(), path)
        await link.start()
        await until(lambda: link.connected)
        await link.stop()
        assert not link.connected and link.statistics().disconnects_total == 1
        await link.stop()  # idempotent
        await syncd.crash()

    run(scenario, tmp_path)


def test_config_and_identity_are_validated():
    e = engine()
    with pytest.raises(ConfigError):
        SyncLink("Not A Node", "/x", e.table, VersionClock(), epoch=1)
    with pytest.raises(ConfigError):
        SyncLink(NODE, "/x", e.table, VersionClock(), epoch=0)
    for bad in ({"batch_max": 0}, {"queue_len": True}, {"retry_min": 3.0, "retry_max": 1.0}):
        with pytest.raises(ConfigError):
            SyncLinkConfig(**bad)


# --- against the real syncd end (syncd.local) ----------------------------------------------


def test_contract_with_syncd_local_server(tmp_path):
    """Hello, restore, deltas out, replica changes in, against syncd's LocalServer."""
    received: list[tuple[Op, FlowRecord]] = []
    peer = record(7, origin="fw2")

    async def scenario(path: str) -> None:
        server = LocalServer(path, NODE, 3, received.extend, lambda: [peer], 1000)
        await server.start()
        e = engine()
        link = link_for(e, path)
        await link.start()
        await asyncio.wait_for(link.wait_synced(), 3.0)
        assert e.table.origin_of(peer.key) == FlowOrigin("fw2", 5, True)
        new_flows(e, link, 40000, 2)
        await until(lambda: len(received) == 2)
        sent = [(op, r.orig_sport) for op, r in received]
        assert sent == [(Op.CREATE, 40000), (Op.CREATE, 40001)]
        newer = record(7, origin="fw2", version=6, state="FIN_WAIT", assured=False)
        server.replica_changes([Change(ChangeKind.UPSERT, newer)])
        server.replica_changes([Change(ChangeKind.REMOVE, record(7, origin="fw2", version=8))])
        await until(lambda: peer.key not in e.table)
        stats = link.statistics()
        assert (stats.replicas_applied_total, stats.bad_frames_total) == (3, 0)
        await link.stop()
        await server.close()

    run(scenario, tmp_path)
