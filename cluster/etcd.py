"""The etcd adapter: membership leases, VIP claims and ruleset revisions.

The only module that talks to etcd (through ``aetcd`` 1.0; the ``etcd3``
package cannot load with current protobuf).  Every aetcd / grpc error is
translated here, once, into :mod:`cluster.errors`; every unary call has a
deadline (``EtcdConfig.timeout``), so a dead etcd costs a bounded wait and an
:class:`EtcdUnavailable`, never a hang.  Key layout (``docs/cluster.md``)::

    /stockade/<cluster>/members/<node_id>  MemberRecord JSON, bound to the node's lease
    /stockade/<cluster>/epochs/<node_id>   last epoch (decimal), durable
    /stockade/<cluster>/vips/<vip>         holder node id, bound to the holder's lease
    /stockade/<cluster>/rules/<n>          ruleset revision n (10 digits), JSON, durable
    /stockade/<cluster>/rules/current      the revision nodes run (decimal)

:class:`EtcdStore` does what needs no lease (CLI: rules, listing, revoking a
suspect); :class:`EtcdMembership` adds this node's lease, keepalive and record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

import aetcd
import grpc

from cluster.errors import (
    BadInput,
    BadRecord,
    EtcdError,
    EtcdRejected,
    EtcdUnavailable,
    LeaseLost,
    Misuse,
    NodeIdInUse,
    UnknownRevision,
)
from cluster.membership import (
    EtcdHealth,
    EtcdHealthStats,
    MemberDeleted,
    MemberPut,
    MemberRecord,
    MembersSnapshot,
    NodeState,
    validate_name,
)

__all__ = [
    "EVENT_SLOTS",
    "EtcdConfig",
    "EtcdMembership",
    "EtcdStats",
    "EtcdStore",
    "Keys",
    "RulesetInfo",
    "StoredRuleset",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_RULESET_BYTES: Final = 1 << 20
EVENT_SLOTS: Final = (
    256  # events/<node>/<slot> ring size  # etcd refuses requests above 1.5 MiB by default
)
_TXN_RETRIES: Final = 8  # optimistic transactions retried on a concurrent writer
_SLACK: Final = 0.5  # asyncio guard above the grpc deadline
_UNAVAILABLE_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_TRANSPORT_CODES: Final = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# Retry the connection soon after etcd returns (grpc's default backoff grows to
# 120 s), but give each attempt a full second: the "min" backoff is also the
# connect timeout, and a remote etcd must not be declared down after 100 ms.
_CHANNEL_OPTIONS: Final = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 1000,
    "grpc.max_reconnect_backoff_ms": 2000,
}


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """How to reach etcd and how this node's lease behaves."""

    # host:port of etcd's client API ([v6]:port for IPv6).
    endpoint: str
    # Deadline of every unary call, seconds: the longest a dead etcd can stall us.
    timeout: float = 1.0
    # Membership lease TTL in whole seconds (etcd's unit).  1 s is granted only
    # when etcd runs with a short election timeout (see cluster.etcd_server).
    lease_ttl: int = 1
    # Seconds between keepalives; None means lease_ttl / 3 (three tries per TTL).
    keepalive_interval: float | None = None
    # How long register() waits for a previous incarnation's record to expire;
    # None means 2 x lease_ttl + 1 s.
    register_wait: float | None = None

    def __post_init__(self) -> None:
        host, sep, port = self.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise BadInput(f"etcd endpoint {self.endpoint!r} is not host:port")
        if not 0 < self.timeout <= 60:
            raise BadInput(f"etcd timeout {self.timeout} s is not in (0, 60]")
        if isinstance(self.lease_ttl, bool) or not 1 <= self.lease_ttl <= 3600:
            raise BadInput(f"lease TTL {self.lease_ttl} is not 1..3600 s")
        interval = self.keepalive_interval
        if interval is not None and not 0 < interval < self.lease_ttl:
            raise BadInput(f"keepalive interval {interval} s must be in (0, lease TTL)")
        if self.register_wait is not None and not self.register_wait >= 0:
            raise BadInput("register_wait must be >= 0")

    @property
    def keepalive_every(self) -> float:
        return self.keepalive_interval or self.lease_ttl / 3

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.endpoint.rpartition(":")
        return host.strip("[]"), int(port)


class Keys:
    """The key layout of one cluster (see the module docstring)."""

    def __init__(self, cluster_id: str) -> None:
        try:
            validate_name("cluster id", cluster_id)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        self.prefix = f"/stockade/{cluster_id}/".encode()
        self.members = self.prefix + b"members/"
        self.epochs = self.prefix + b"epochs/"
        self.vips = self.prefix + b"vips/"
        self.rules = self.prefix + b"rules/"
        self.rules_current = self.rules + b"current"

    def member(self, node_id: str) -> bytes:
        return self.members + node_id.encode()

    def epoch(self, node_id: str) -> bytes:
        return self.epochs + node_id.encode()

    def vip(self, vip: str) -> bytes:
        try:
            canonical = str(ipaddress.ip_address(vip)) == vip
        except ValueError:
            canonical = False
        if not canonical:
            raise Misuse(f"VIP {vip!r} is not canonical IP address text")
        return self.vips + vip.encode()

    def rule(self, revision: int) -> bytes:
        return self.rules + f"{revision:010d}".encode()

    def status(self, node_id: str) -> bytes:
        return self.prefix + b"status/" + node_id.encode()

    def events_of(self, node_id: str) -> bytes:
        return self.prefix + b"events/" + node_id.encode() + b"/"

    def event(self, node_id: str, seq: int) -> bytes:
        """Slot ``seq % 256``: a bounded ring of events per node."""
        return self.events_of(node_id) + f"{seq % EVENT_SLOTS:03d}".encode()


@dataclass(frozen=True, slots=True)
class StoredRuleset:
    revision: int  # ruleset revision, 1, 2, ... (not etcd's revision)
    text: str  # the rules file as applied
    stored_at: float  # Unix time of the put
    comment: str  # operator note ("rollback to 3" for rollbacks)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def to_json(self) -> bytes:
        body = {"text": self.text, "stored_at": self.stored_at, "comment": self.comment}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, revision: int, data: bytes) -> StoredRuleset:
        try:
            body = json.loads(data)
            text, stored_at, comment = body["text"], body["stored_at"], body["comment"]
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise BadRecord("bad-ruleset", f"revision {revision}: {exc!r}") from exc
        if not (isinstance(text, str) and isinstance(comment, str)):
            raise BadRecord("bad-ruleset", f"revision {revision}: text/comment not strings")
        if isinstance(stored_at, bool) or not isinstance(stored_at, int | float):
            raise BadRecord("bad-ruleset", f"revision {revision}: stored_at not a number")
        return cls(revision, text, float(stored_at), comment)


@dataclass(frozen=True, slots=True)
class RulesetInfo:
    """One line of ``stockade rules history``."""

    revision: int
    stored_at: float
    comment: str
    sha256: str
    size: int  # bytes of text
    current: bool  # the revision nodes should run


@dataclass(frozen=True, slots=True)
class EtcdStats:
    endpoint: str
    health: EtcdHealthStats  # last success / failures of every call
    lease_id: int | None  # our membership lease (None: not registered)
    granted_ttl: int | None  # TTL etcd granted for it
    keepalives: int  # successful keepalives
    keepalive_failures: int  # keepalives that could not reach etcd
    lease_lost: bool  # etcd said our lease is gone


class EtcdStore:
    """Lease-free operations on one cluster's keys.  Use as ``async with``."""

    def __init__(self, config: EtcdConfig, cluster_id: str) -> None:
        self.config = config
        self.keys = Keys(cluster_id)
        self.health = EtcdHealth(grace=config.lease_ttl)
        host, port = config.host_port
        self._client = aetcd.Client(
            host, port, timeout=config.timeout, options=_CHANNEL_OPTIONS, connect_wait_timeout=1
        )

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Drop the connection (open watches end)."""
        with contextlib.suppress(Exception):  # closing a broken channel must not mask the cause
            async with asyncio.timeout(self.config.timeout):
                await self._client.close()

    def statistics(self) -> EtcdStats:
        return EtcdStats(self.config.endpoint, self.health.statistics(), None, None, 0, 0, False)

    # --- error translation, the one place ---------------------------------

    async def _call(self, what: str, call: Awaitable[T], timeout: float | None = None) -> T:
        limit = (timeout or self.config.timeout) + _SLACK
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancellation that races with the call finishing (fixed in 3.12),
            # and a keepalive task that ignores cancel() hangs leave().
            async with asyncio.timeout(limit):
                result = await call
        except Exception as exc:  # translated below, never swallowed
            raise self._translate(what, exc) from exc
        self.health.succeeded(time.monotonic())
        return result

    def _translate(self, what: str, exc: Exception) -> EtcdError:
        code = _grpc_code(exc)
        detail = f"{what}: {exc.__class__.__name__}: {exc}"
        if isinstance(
            exc, TimeoutError | aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError
        ):
            error: EtcdError = EtcdUnavailable(self.config.endpoint, detail)
        elif isinstance(exc, aetcd.WatchTimeoutError) or code in _UNAVAILABLE_CODES:
            error = EtcdUnavailable(self.config.endpoint, detail)
        elif code in _TRANSPORT_CODES and not _grpc_details(exc).startswith("etcdserver:"):
            # grpc core's own INTERNAL/UNKNOWN (a stream cut when etcd dies:
            # "Internal error from Core"); etcd's errors all say "etcdserver:".
            error = EtcdUnavailable(self.config.endpoint, detail)
        elif code is grpc.StatusCode.NOT_FOUND and "lease not found" in str(exc):
            error = LeaseLost(self.config.endpoint, detail)
        elif isinstance(exc, aetcd.ClientError | grpc.aio.AioRpcError):
            error = EtcdRejected(self.config.endpoint, detail)
        else:
            raise exc  # not a library error: a bug, let it propagate
        if isinstance(error, EtcdUnavailable):
            self.health.failed(time.monotonic(), detail)
        else:
            self.health.succeeded(time.monotonic())  # etcd answered
        return error

    async def _watch(
        self, what: str, key: bytes, *, prefix: bool, start: int
    ) -> AsyncGenerator[Any, None]:
        """aetcd watch events from revision ``start``, errors translated."""
        make = self._client.watch_prefix if prefix else self._client.watch
        watch = await self._call(what, make(key, start_revision=start))
        events = watch.__aiter__()
        try:
            while True:
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return  # the client was closed
                except Exception as exc:  # translated below
                    raise self._translate(what, exc) from exc
                yield event
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.config.timeout):
                    await watch.cancel()

    async def _txn(
        self, what: str, compare: list[Any], success: list[Any], failure: list[Any]
    ) -> tuple[bool, list[Any]]:
        ok, responses = await self._call(what, self._client.transaction(compare, success, failure))
        return bool(ok), list(responses)

    # --- membership (read side) --------------------------------------------

    async def list_members(self) -> MembersSnapshot:
        listing = await self._call("list members", self._client.get_prefix(self.keys.members))
        puts = tuple(
            self._member_put(kv.key, kv.value, kv.mod_revision, kv.lease) for kv in listing
        )
        return MembersSnapshot(puts, int(listing.header.revision))

    async def watch_members(
        self,
    ) -> AsyncGenerator[MembersSnapshot | MemberPut | MemberDeleted, None]:
        """A :class:`MembersSnapshot`, then every change after it, in order.

        Ends with an :class:`EtcdError` when the watch breaks; call again to
        get a fresh snapshot (``Membership.resync`` diffs it).
        """
        snapshot = await self.list_members()
        yield snapshot
        stream = self._watch(
            "watch members", self.keys.members, prefix=True, start=snapshot.revision + 1
        )
        async with contextlib.aclosing(stream):
            async for event in stream:
                kv = event.kv
                if event.kind == "DELETE":
                    yield MemberDeleted(self._node_of(kv.key), int(kv.mod_revision))
                else:
                    yield self._member_put(kv.key, kv.value, kv.mod_revision, kv.lease)

    def _node_of(self, key: bytes) -> str:
        return bytes(key[len(self.keys.members) :]).decode(errors="replace")

    def _member_put(self, key: bytes, value: bytes, revision: int, lease: int) -> MemberPut:
        return MemberPut(self._node_of(key), bytes(value), int(revision), int(lease))

    async def revoke_member(self, node_id: str, epoch: int | None = None) -> bool:
        """Confirm a suspicion: revoke ``node_id``'s lease, so its record and VIPs go.

        With ``epoch``, only that incarnation is revoked (a node that restarted
        since the suspicion is left alone).  False when there was nothing to do.
        """
        got = await self._call("get member", self._client.get(self.keys.member(node_id)))
        if got is None:
            return False
        if epoch is not None:
            try:
                if MemberRecord.from_json(bytes(got.value)).epoch != epoch:
                    return False
            except BadRecord:
                pass  # a corrupt record of a suspect: revoke it anyway
        if not got.lease:
            await self._call("delete member", self._client.delete(self.keys.member(node_id)))
            return True
        try:
            await self._call("revoke lease", self._client.revoke_lease(int(got.lease)))
        except LeaseLost:
            return False  # expired meanwhile
        return True

    # --- VIP claims --------------------------------------------------------

    async def claim_vip(self, vip: str, node_id: str, lease: int) -> bool:
        """Claim ``vip`` for ``node_id`` under ``lease``; True if it is now held by us.

        One transaction: put only if the key does not exist, so concurrent
        claimers get exactly one winner.  Re-claiming a VIP we already hold
        under the same lease is a success.
        """
        key, t = self.keys.vip(vip), self._client.transactions
        ok, responses = await self._txn(
            "claim vip",
            [t.create(key) == 0],
            [t.put(key, node_id.encode(), lease=lease)],
            [t.get(key)],
        )
        if ok:
            return True
        held = [kv for _value, kv in responses[0]] if responses else []
        return bool(held) and held[0].value == node_id.encode() and held[0].lease == lease

    async def release_vip(self, vip: str, node_id: str) -> bool:
        """Give ``vip`` up if ``node_id`` holds it; True if it was released."""
        key, t = self.keys.vip(vip), self._client.transactions
        ok, _ = await self._txn(
            "release vip", [t.value(key) == node_id.encode()], [t.delete(key)], []
        )
        return ok

    async def vip_holders(self) -> dict[str, str]:
        listing = await self._call("list vips", self._client.get_prefix(self.keys.vips))
        start = len(self.keys.vips)
        return {
            bytes(kv.key[start:]).decode(errors="replace"): bytes(kv.value).decode(errors="replace")
            for kv in listing
        }

    # --- status and events (contract C) --------------------------------------

    async def put_status(self, node_id: str, body: bytes, lease: int) -> None:
        """Write ``status/<node_id>`` bound to ``lease`` (it vanishes with the node)."""
        await self._call(
            "put status", self._client.put(self.keys.status(node_id), body, lease=lease)
        )

    async def put_event(self, node_id: str, seq: int, body: bytes) -> None:
        """Write one event into the node's ring (not leased: it outlives the node)."""
        await self._call("put event", self._client.put(self.keys.event(node_id, seq), body))

    async def last_event_seq(self, node_id: str) -> int:
        """The highest ``seq`` in the node's event ring (0 if none), to continue after it."""
        listing = await self._call(
            "list events", self._client.get_prefix(self.keys.events_of(node_id))
        )
        best = 0
        for kv in listing:
            try:
                seq = json.loads(bytes(kv.value)).get("seq")
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(seq, int) and not isinstance(seq, bool):
                best = max(best, seq)
        return best

    # --- rulesets ----------------------------------------------------------

    async def put_ruleset(self, text: str, comment: str = "") -> int:
        """Store ``text`` as the next revision and make it current, in one transaction.

        The caller has validated the rules.  Raises :class:`BadInput` when the
        text is larger than 1 MiB.
        """
        body = StoredRuleset(0, text, time.time(), comment).to_json()
        if len(body) > MAX_RULESET_BYTES:
            raise BadInput(f"ruleset of {len(body)} bytes exceeds {MAX_RULESET_BYTES}")
        t = self._client.transactions
        for _ in range(_TXN_RETRIES):
            current, mod = await self._current()
            revision = (current or 0) + 1
            new_key = self.keys.rule(revision)
            ok, _ = await self._txn(
                "put ruleset",
                [t.mod(self.keys.rules_current) == mod, t.create(new_key) == 0],
                [t.put(new_key, body), t.put(self.keys.rules_current, str(revision).encode())],
                [],
            )
            if ok:
                return revision
        raise EtcdRejected(self.config.endpoint, "put ruleset: too many concurrent writers")

    async def _current(self) -> tuple[int | None, int]:
        """(current ruleset revision or None, mod_revision of the pointer or 0)."""
        got = await self._call("get current ruleset", self._client.get(self.keys.rules_current))
        if got is None:
            return None, 0
        return _decimal(got.value), int(got.mod_revision)

    async def get_ruleset(self, revision: int | None = None) -> StoredRuleset:
        """The ruleset at ``revision`` (None: current); :class:`UnknownRevision` if absent."""
        if revision is None:
            revision, _ = await self._current()
            if revision is None:
                raise UnknownRevision(None)
        if revision < 1:
            raise UnknownRevision(revision)
        got = await self._call("get ruleset", self._client.get(self.keys.rule(revision)))
        if got is None:
            raise UnknownRevision(revision)
        return StoredRuleset.from_json(revision, bytes(got.value))

    async def history(self) -> list[RulesetInfo]:
        """Every stored revision, oldest first (corrupt ones skipped and logged)."""
        current, _ = await self._current()
        listing = await self._call("list rulesets", self._client.get_prefix(self.keys.rules))
        infos = []
        for kv in listing:
            name = bytes(kv.key[len(self.keys.rules) :])
            if not name.isdigit():
                continue  # the "current" pointer
            try:
                stored = StoredRuleset.from_json(int(name), bytes(kv.value))
            except BadRecord as exc:
                log.warning("skipping corrupt ruleset: %s", exc)
                continue
            size = len(stored.text.encode())
            infos.append(
                RulesetInfo(
                    stored.revision,
                    stored.stored_at,
                    stored.comment,
                    stored.sha256,
                    size,
                    stored.revision == current,
                )
            )
        return sorted(infos, key=lambda info: info.revision)

    async def rollback_ruleset(self, revision: int) -> int:
        """Make an old revision's text current again, as a new revision (history stays linear)."""
        old = await self.get_ruleset(revision)
        return await self.put_ruleset(old.text, comment=f"rollback to {revision}")

    async def watch_ruleset(self) -> AsyncGenerator[StoredRuleset, None]:
        """The current ruleset (if any), then each new current one.  Ends with an EtcdError."""
        # A prefix listing always carries the store revision, even when empty.
        listing = await self._call(
            "get current ruleset", self._client.get_prefix(self.keys.rules_current)
        )
        pointers = [kv for kv in listing if bytes(kv.key) == self.keys.rules_current]
        if pointers:
            yield await self.get_ruleset(_decimal(pointers[0].value))
        start = int(listing.header.revision) + 1
        stream = self._watch("watch ruleset", self.keys.rules_current, prefix=False, start=start)
        async with contextlib.aclosing(stream):
            async for event in stream:
                if event.kind == "PUT":
                    yield await self.get_ruleset(_decimal(event.kv.value))


def _decimal(value: bytes) -> int:
    try:
        return int(bytes(value))
    except ValueError as exc:
        raise BadRecord("bad-ruleset-pointer", repr(bytes(value))) from exc


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    """The grpc error behind ``exc`` (aetcd raises its own class ``from`` it)."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, grpc.aio.AioRpcError):
            return candidate
    return None


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    rpc = _rpc_error(exc)
    code: grpc.StatusCode | None = rpc.code() if rpc is not None else None
    return code


def _grpc_details(exc: BaseException) -> str:
    rpc = _rpc_error(exc)
    return str(rpc.details() or "") if rpc is not None else ""


class EtcdMembership(EtcdStore):
    """This node's membership: a lease, its keepalive, and its leased record.

    ``register()`` grants the lease, bumps the durable epoch and writes the
    record in one transaction, then keeps the lease alive every
    ``keepalive_every`` seconds.  ``leave()`` (also on ``async with`` exit)
    revokes the lease so peers see ``MemberLeft`` at once; ``abandon()`` stops
    keepalives without revoking, which is what a crash looks like to peers.
    """

    def __init__(self, config: EtcdConfig, cluster_id: str) -> None:
        super().__init__(config, cluster_id)
        self._lease_id: int | None = None
        self._granted_ttl: int | None = None
        self._record: MemberRecord | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._lost_error: LeaseLost | None = None
        self._keepalives = 0
        self._keepalive_failures = 0

    @property
    def lease_id(self) -> int:
        if self._lease_id is None:
            raise Misuse("not registered")
        return self._lease_id

    @property
    def granted_ttl(self) -> int | None:
        """The TTL etcd granted (it may exceed the one asked for; see etcd_server)."""
        return self._granted_ttl

    @property
    def record(self) -> MemberRecord | None:
        return self._record

    @property
    def lease_lost(self) -> LeaseLost | None:
        """Set once the keepalive found our lease gone; the node must stop owning."""
        return self._lost_error

    def statistics(self) -> EtcdStats:
        return EtcdStats(
            endpoint=self.config.endpoint,
            health=self.health.statistics(),
            lease_id=self._lease_id,
            granted_ttl=self._granted_ttl,
            keepalives=self._keepalives,
            keepalive_failures=self._keepalive_failures,
            lease_lost=self._lost_error is not None,
        )

    async def wait_lease_lost(self) -> LeaseLost:
        await self._lost.wait()
        assert self._lost_error is not None
        return self._lost_error

    async def __aenter__(self) -> EtcdMembership:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._lease_id is not None:
                await self.leave()
        except EtcdError as error:
            log.warning("leaving without revoking the lease (it expires by itself): %s", error)
        finally:
            await self.close()

    async def register(
        self, node_id: str, address: str, state: NodeState = NodeState.SYNCING
    ) -> MemberRecord:
        """Join: grant a lease, take the next epoch, write the record (one transaction).

        Raises :class:`NodeIdInUse` if another live record holds ``node_id``
        for ``register_wait`` seconds (a previous incarnation's record
        expires within that; a duplicate id does not), and
        :class:`cluster.errors.Misuse` for an invalid id, address or state.
        On any failure no lease is left behind and register() may be retried;
        after :attr:`lease_lost`, register() joins again with a new epoch.
        """
        if self._lease_id is not None and self._lost_error is None:
            raise Misuse("already registered")
        await self._stop_keepalive()
        MemberRecord(node_id, address, state, 1)  # validate before touching etcd
        lease = await self._call("grant lease", self._client.lease(self.config.lease_ttl))
        lease_id, granted = int(lease.id), int(lease.ttl)
        if granted != self.config.lease_ttl:
            log.warning(
                "etcd granted a %d s lease for %d s asked: run etcd with a shorter "
                "--election-timeout (see cluster.etcd_server)",
                granted,
                self.config.lease_ttl,
            )
        try:
            record = await self._register_under(lease_id, node_id, address, state)
        except EtcdError:
            with contextlib.suppress(EtcdError):
                await self._call("revoke lease", self._client.revoke_lease(lease_id))
            raise
        self._lease_id, self._granted_ttl, self._record = lease_id, granted, record
        self._lost.clear()
        self._lost_error = None
        self._keepalive = asyncio.get_running_loop().create_task(self._keepalive_loop(lease_id))
        return record

    async def _register_under(
        self, lease_id: int, node_id: str, address: str, state: NodeState
    ) -> MemberRecord:
        wait = self.config.register_wait
        deadline = time.monotonic() + (2 * self.config.lease_ttl + 1 if wait is None else wait)
        while True:
            record = await self._try_register(lease_id, node_id, address, state)
            if record is not None:
                return record
            if time.monotonic() >= deadline:
                raise NodeIdInUse(
                    self.config.endpoint, f"node id {node_id!r} held by a live record"
                )
            await asyncio.sleep(self.config.keepalive_every)
            await self._refresh(lease_id)  # keep our own fresh lease alive while waiting

    async def _try_register(
        self, lease_id: int, node_id: str, address: str, state: NodeState
    ) -> MemberRecord | None:
        """One attempt; None while another record holds the id."""
        epoch_key, member_key = self.keys.epoch(node_id), self.keys.member(node_id)
        t = self._client.transactions
        for _ in range(_TXN_RETRIES):
            got = await self._call("get epoch", self._client.get(epoch_key))
            seen = _decimal(got.value) if got is not None else 0
            record = MemberRecord(node_id, address, state, seen + 1)
            ok, _ = await self._txn(
                "register",
                [
                    t.mod(epoch_key) == (int(got.mod_revision) if got else 0),
                    t.create(member_key) == 0,
                ],
                [
                    t.put(epoch_key, str(record.epoch).encode()),
                    t.put(member_key, record.to_json(), lease=lease_id),
                ],
                [],
            )
            if ok:
                return record
            if await self._call("get member", self._client.get(member_key)) is not None:
                return None
        raise EtcdRejected(self.config.endpoint, "register: too many concurrent writers")

    async def update(
        self, state: NodeState | None = None, vips: tuple[str, ...] | None = None
    ) -> MemberRecord:
        """Publish a new state and/or VIP list under our lease."""
        if self._record is None or self._lease_id is None:
            raise Misuse("update() before register()")
        old = self._record
        record = MemberRecord(
            old.node_id,
            old.address,
            old.state if state is None else state,
            old.epoch,
            old.vips if vips is None else tuple(sorted(set(vips))),
        )
        key = self.keys.member(old.node_id)
        await self._call(
            "update member", self._client.put(key, record.to_json(), lease=self._lease_id)
        )
        self._record = record
        return record

    async def lease_info(self) -> tuple[int, int]:
        """``(remaining, granted)`` TTL seconds of our lease as etcd sees it now."""
        info = await self._call(
            "lease info", self._client.get_lease_info(self.lease_id, keys=False)
        )
        if int(info.TTL) < 0:
            raise LeaseLost(self.config.endpoint, f"lease {self.lease_id:x} not found")
        return int(info.TTL), int(info.grantedTTL)

    async def _refresh(self, lease_id: int) -> None:
        reply = await self._call(
            "keepalive",
            self._client.refresh_lease(lease_id),
            timeout=self.config.keepalive_every,
        )
        if reply is None or int(reply.TTL) <= 0:
            raise LeaseLost(self.config.endpoint, f"lease {lease_id:x} expired or revoked")

    async def _keepalive_loop(self, lease_id: int) -> None:
        interval = self.config.keepalive_every
        while True:
            started = time.monotonic()
            try:
                await self._refresh(lease_id)
                self._keepalives += 1
            except LeaseLost as exc:
                self._lost_error = exc
                self._lost.set()
                log.error("membership lease lost: %s", exc)
                return
            except EtcdError as exc:
                # The lease may still be alive server-side; keep trying until etcd says otherwise.
                self._keepalive_failures += 1
                log.warning("keepalive failed: %s", exc)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _stop_keepalive(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is None:
            return
        # Repeat the cancel until it lands: library code between us and the
        # task may swallow one, and an unstopped keepalive would hang leave().
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            log.error("keepalive task failed: %r", task.exception())

    async def leave(self) -> None:
        """Clean exit: stop keepalives and revoke the lease (record and VIPs vanish)."""
        await self._stop_keepalive()
        lease, self._lease_id = self._lease_id, None
        self._record = None
        if lease is not None:
            with contextlib.suppress(LeaseLost):
                await self._call("revoke lease", self._client.revoke_lease(lease))

    async def abandon(self) -> None:
        """Stop keepalives without revoking: the record expires after the TTL.

        What a crash looks like to peers; also the fast way out when etcd is
        unreachable and a revoke would only time out.
        """
        await self._stop_keepalive()
        self._lease_id = None
        self._record = None
