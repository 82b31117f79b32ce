"""In-memory links joining pure syncd sessions (h11's connection-pair idea).

A :class:`Mesh` holds simulated nodes (:class:`SimNode`: a replica store, a
sequencer and one outbox/inbox per peer) and one :class:`Link` per pair.  A
link carries each side's envelopes to the other, serialized to bytes and
parsed back (so the wire form is exercised), and can drop, duplicate, delay
(reorder) and cut them, driven by a seeded ``random.Random``.  A cut closes
both sessions, loses what was in flight and reconnects after
``reconnect_delay`` with fresh sessions over the same outboxes and inboxes,
as the gRPC adapter will.  Time is simulated: :meth:`Mesh.run_until` jumps
from event to event (deliveries, session deadlines, reconnects).

Nothing here is pure-module code: it is the test harness, so it may keep
mutable state freely, but it never reads a clock and all randomness is seeded.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.errors import PeerError
from syncd.records import Delta, FlowRecord, Op, VersionClock
from syncd.replica import ReplicaConfig, ReplicaStore
from syncd.session import (
    Action,
    Inbox,
    Outbox,
    PeerSession,
    ReplicaChanged,
    Sequencer,
    SessionConfig,
    State,
)

CLUSTER = "test-cluster"


def make_record(
    key: bytes, origin: str, version: int, state: str = "ESTABLISHED", timeout: float = 60.0
) -> FlowRecord:
    """A TCP record whose addresses/ports are derived from the key (any bytes)."""
    n = int.from_bytes(key[:4].ljust(4, b"\0"), "big")
    return FlowRecord(
        key=key,
        proto=6,
        family=4,
        orig_src=0x0A000000 | (n & 0xFFFF),
        orig_sport=1024 + (n % 60000),
        orig_dst=0x0A010001,
        orig_dport=443,
        state=state,
        assured=state == "ESTABLISHED",
        timeout=timeout,
        origin=origin,
        version=version,
    )


@dataclass
class Faults:
    drop: float = 0.0  # probability a message is lost
    duplicate: float = 0.0  # probability a message is delivered twice
    reorder: float = 0.0  # probability a message gets an extra random delay
    latency: float = 0.0002  # base one-way delay, seconds
    reorder_delay: float = 0.01  # maximum extra delay of a reordered message

    @property
    def perfect(self) -> bool:
        return self.drop == self.duplicate == self.reorder == 0


class SimNode:
    """One syncd: its store (own flows + replicas), sequencer, outboxes, inboxes."""

    def __init__(
        self,
        node_id: str,
        peers: list[str],
        *,
        epoch: int = 1,
        outbox_capacity: int = 64,
        store_config: ReplicaConfig | None = None,
    ) -> None:
        self.node_id = node_id
        self.peers = [p for p in peers if p != node_id]
        self.outbox_capacity = outbox_capacity
        self.store = ReplicaStore(store_config)
        self.changes: list[ReplicaChanged] = []
        self._boot(epoch)

    def _boot(self, epoch: int) -> None:
        self.epoch = epoch
        self.sequencer = Sequencer(self.node_id, epoch)
        self.clock = VersionClock(epoch << 32)
        for record in self.store.records():
            self.clock.observe(record.version)
        self.outboxes = {
            p: Outbox(self.node_id, epoch, self.outbox_capacity, self.sequencer.last_seq)
            for p in self.peers
        }
        self.inboxes = {p: Inbox(p) for p in self.peers}

    def restart(self, keep_table: bool) -> None:
        """A new incarnation: outboxes, inboxes and numbering start over.

        ``keep_table`` models a node that recovered its table (bulk snapshot)
        before rejoining; otherwise it comes back empty.
        """
        if not keep_table:
            self.store = ReplicaStore(self.store.config)
        self._boot(self.epoch + 1)

    def emit(self, key: bytes, now: float, delete: bool = False) -> Delta | None:
        """Create/update (or delete) one of this node's flows, as the filter would."""
        current = self.store.get(key)
        owned = current is not None and current.record.origin == self.node_id
        if delete and not owned:
            return None
        op = Op.DELETE if delete else (Op.UPDATE if owned else Op.CREATE)
        state = "FIN_WAIT" if delete else ("ESTABLISHED" if owned else "SYN_SENT")
        record = make_record(key, self.node_id, self.clock.next(), state)
        self.store.apply(op, record, now)
        delta = self.sequencer.delta(op, record)
        for outbox in self.outboxes.values():
            outbox.push(delta, now)
        return delta

    def own_flows(self) -> dict[bytes, FlowRecord]:
        return {r.key: r for r in self.store.records(self.node_id)}

    def replicas_of(self, origin: str) -> dict[bytes, FlowRecord]:
        return {r.key: r for r in self.store.records(origin)}


class Link:
    """The Exchange stream between two nodes, with faults."""

    def __init__(
        self,
        a: SimNode,
        b: SimNode,
        config: SessionConfig,
        faults: Faults,
        rng: random.Random,
        reconnect_delay: float = 0.05,
    ) -> None:
        self.ends = (a, b)
        self.config = config
        self.faults = faults
        self.rng = rng
        self.reconnect_delay = reconnect_delay
        self.sessions: dict[str, PeerSession] = {}
        self.reopen_at: float | None = None
        self._flight: list[tuple[float, int, str, bytes, str]] = []  # (at, n, to, bytes, kind)
        self._counter = itertools.count()
        self.errors: list[PeerError] = []
        self.delivered = 0

    def open(self, now: float) -> None:
        a, b = self.ends
        self._flight.clear()
        self.reopen_at = None
        for me, other in ((a, b), (b, a)):
            session = PeerSession(
                self.config, me.outboxes[other.node_id], me.inboxes[other.node_id], me.store
            )
            self.sessions[me.node_id] = session
            self._record(me, session.start(now))

    def cut(self, now: float) -> None:
        for node in self.ends:
            session = self.sessions.get(node.node_id)
            if session is not None:
                self._record(node, session.close(now))
        self._flight.clear()
        self.reopen_at = now + self.reconnect_delay

    def _record(self, node: SimNode, actions: list[Action]) -> None:
        node.changes += [a for a in actions if isinstance(a, ReplicaChanged)]

    def _node(self, node_id: str) -> SimNode:
        return self.ends[0] if self.ends[0].node_id == node_id else self.ends[1]

    def pump(self, now: float) -> None:
        """Timers, then everything both sessions want to send, onto the wire."""
        for node in self.ends:
            session = self.sessions[node.node_id]
            deadline = session.next_deadline()
            if deadline is not None and deadline <= now:
                self._record(node, session.handle_timer(now))
            other = self.ends[1] if node is self.ends[0] else self.ends[0]
            for envelope in session.messages_to_send(now):
                kind = envelope.WhichOneof("body") or ""
                self._send(other.node_id, envelope.SerializeToString(), kind, now)
        if any(s.state is State.CLOSED for s in self.sessions.values()) and self.reopen_at is None:
            self.cut(now)  # a session gave up (dead peer): the adapter reconnects

    def _send(self, to: str, data: bytes, kind: str, now: float) -> None:
        f = self.faults
        copies = 0 if self.rng.random() < f.drop else 1
        if copies and self.rng.random() < f.duplicate:
            copies = 2
        for _ in range(copies):
            delay = f.latency
            if self.rng.random() < f.reorder:
                delay += self.rng.random() * f.reorder_delay
            heapq.heappush(self._flight, (now + delay, next(self._counter), to, data, kind))

    def deliver(self, now: float) -> None:
        while self._flight and self._flight[0][0] <= now:
            _, _, to, data, _ = heapq.heappop(self._flight)
            session = self.sessions[to]
            try:
                actions = session.receive(pb.Envelope.FromString(data), now)
            except PeerError as exc:
                self.errors.append(exc)
                continue
            self.delivered += 1
            self._record(self._node(to), actions)

    def next_time(self) -> float | None:
        if self.reopen_at is not None:
            return self.reopen_at
        times = [s.next_deadline() for s in self.sessions.values()]
        if self._flight:
            times.append(self._flight[0][0])
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def quiet(self) -> bool:
        """Both sessions LIVE, everything acked, no pull, only heartbeats in flight."""
        if self.reopen_at is not None or any(m[4] != "heartbeat" for m in self._flight):
            return False
        for me in self.ends:
            other = self.ends[1] if me is self.ends[0] else self.ends[0]
            outbox, inbox = me.outboxes[other.node_id], me.inboxes[other.node_id]
            if self.sessions[me.node_id].state is not State.LIVE:
                return False
            if outbox.acked != outbox.last_seq or inbox.pulling:
                return False
        return True


@dataclass
class Mesh:
    """Nodes joined pairwise by links; simulated time."""

    node_ids: list[str]
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    config: SessionConfig = field(default_factory=lambda: SessionConfig(cluster_id=CLUSTER))
    outbox_capacity: int = 64
    store_config: ReplicaConfig | None = None
    now: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.nodes = {
            n: SimNode(
                n,
                self.node_ids,
                outbox_capacity=self.outbox_capacity,
                store_config=self.store_config,
            )
            for n in self.node_ids
        }
        self.links: dict[frozenset[str], Link] = {}
        for a, b in itertools.combinations(self.node_ids, 2):
            link = Link(self.nodes[a], self.nodes[b], self.config, self.faults, self.rng)
            link.open(self.now)
            self.links[frozenset((a, b))] = link

    def link(self, a: str, b: str) -> Link:
        return self.links[frozenset((a, b))]

    def cut(self, a: str, b: str) -> None:
        self.link(a, b).cut(self.now)

    def restart(self, node_id: str, keep_table: bool = True) -> None:
        """Restart a node: its links drop, it comes back with a new epoch."""
        for link in self.links.values():
            if any(n.node_id == node_id for n in link.ends):
                link.cut(self.now)
        self.nodes[node_id].restart(keep_table)

    def heal(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            setattr(self.faults, name, 0.0)

    def run_until(self, end: float, max_events: int = 200_000) -> None:
        for _ in range(max_events):
            self._pump()
            upcoming = [t for t in (lk.next_time() for lk in self.links.values()) if t is not None]
            nxt = min(upcoming, default=end)
            if nxt > end:
                self.now = end
                self._pump()
                return
            self.now = max(self.now, nxt)
        raise AssertionError(f"simulation did not reach t={end} in {max_events} events")

    def _pump(self) -> None:
        for link in self.links.values():
            if link.reopen_at is not None and link.reopen_at <= self.now:
                link.open(self.now)
            if link.reopen_at is None:
                link.deliver(self.now)
                link.pump(self.now)

    def settle(self, limit: float = 60.0, step: float = 0.05) -> bool:
        """Run until every link is quiet (True) or ``limit`` more seconds pass."""
        end = self.now + limit
        while self.now < end:
            if all(link.quiet() for link in self.links.values()):
                return True
            self.run_until(self.now + step)
        return all(link.quiet() for link in self.links.values())

    def errors(self) -> list[PeerError]:
        return [e for link in self.links.values() for e in link.errors]

    def divergence(self) -> list[str]:
        """Human-readable differences between each origin and every replica of it."""
        problems = []
        for origin, source in self.nodes.items():
            truth = source.own_flows()
            for other in self.nodes.values():
                if other is source:
                    continue
                held = other.replicas_of(origin)
                for key in truth.keys() | held.keys():
                    if truth.get(key) != held.get(key):
                        problems.append(
                            f"{other.node_id} holds {held.get(key)} for {origin}'s {key!r}, "
                            f"origin has {truth.get(key)}"
                        )
        return problems
