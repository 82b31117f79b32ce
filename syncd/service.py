"""The gRPC server side of ``stockade.sync.v1.StateSync`` (grpc.aio).

``Exchange``: before any state is touched, a stream must pass, in order:

1. with TLS, a client certificate naming a node of our cluster that is a
   configured peer (gRPC already refused any certificate not signed by the
   cluster CA, or none at all, during the handshake);
2. the node must be ready (its own table recovered), else UNAVAILABLE;
3. a first message that is a Hello, within ``dead_after``;
4. the Hello's node id equal to the certificate's, and a configured peer;
5. the direction rule: of two nodes, the one with the lower id dials
   (:func:`dials`), so each pair has exactly one stream.

A failure is counted by reason and answered PERMISSION_DENIED (identity and
membership), UNAVAILABLE, INVALID_ARGUMENT or FAILED_PRECONDITION; nothing is
applied.  A passing stream is handed to the peer's :class:`PeerLink`; when
it ends the status says why (INVALID_ARGUMENT with the protocol error,
UNAVAILABLE for silence, ABORTED when replaced by a newer stream).

``Snapshot`` streams pages of any origin's records held here (restart
recovery of a peer's own flows), to members only.

Library errors are translated here, once: a broken stream reads as end of
stream (:class:`ServerTransport`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import grpc

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd._pb.stockade.sync.v1 import sync_pb2_grpc as rpc
from syncd.aerun import AntiEntropy
from syncd.errors import BadMessage
from syncd.keyindex import MAX_CURSOR_LEN, ORDERS
from syncd.peers import EndReason, PeerLink
from syncd.records import check_node_id
from syncd.session import MAX_PAGE_RECORDS
from syncd.tls import PeerIdentity, identity_from_auth_context

log = logging.getLogger("syncd.service")

BULK_PAGE: Final = 4096  # records per Snapshot RPC page when the caller leaves it to us
_LOG_FIRST: Final = 10  # refusals logged per reason before only every 1000th is

_END_STATUS: Final = {
    EndReason.PEER_ERROR: grpc.StatusCode.INVALID_ARGUMENT,
    EndReason.DEAD: grpc.StatusCode.UNAVAILABLE,
    EndReason.WRITE_STALLED: grpc.StatusCode.UNAVAILABLE,
    EndReason.REPLACED: grpc.StatusCode.ABORTED,
    EndReason.STOPPED: grpc.StatusCode.UNAVAILABLE,
}


def dials(a: str, b: str) -> bool:
    """Whether node ``a`` opens the stream to node ``b`` (the lower id dials)."""
    return a < b


class ServerTransport:
    """A server-side Exchange stream (``context.read``/``write``) as a Transport."""

    def __init__(self, context: grpc.aio.ServicerContext[pb.Envelope, pb.Envelope]) -> None:
        self._context = context
        self._ended_by = ""

    @property
    def ended_by(self) -> str:
        return self._ended_by

    async def read(self) -> pb.Envelope | None:
        try:
            message = await self._context.read()
        except (grpc.RpcError, grpc.aio.BaseError) as e:
            self._ended_by = f"read failed: {e}"
            return None
        if message is grpc.aio.EOF:
            self._ended_by = "the peer closed the stream"
            return None
        assert isinstance(message, pb.Envelope)
        return message

    async def write(self, envelope: pb.Envelope) -> bool:
        try:
            await self._context.write(envelope)
        except (grpc.RpcError, grpc.aio.BaseError) as e:
            self._ended_by = f"write failed: {e}"
            return False
        return True


@dataclass(frozen=True, slots=True)
class ServiceStats:
    exchanges: int  # streams that passed every check and ran
    refused: Mapping[str, int]  # streams and snapshot calls refused, by reason
    snapshots_served: int  # Snapshot calls answered to the last page
    snapshot_pages: int


# (origin, cursor, limit, order) -> one page, built by the node from its store.
ChunkSource = Callable[[str, bytes, int, int], pb.SnapshotChunk]


class StateSyncService(rpc.StateSyncServicer):
    """See the module docstring.  ``link(peer)`` is None for a non-member."""

    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        tls: bool,
        hello_timeout: float,
        link: Callable[[str], PeerLink | None],
        ready: Callable[[], bool],
        chunk: ChunkSource,
    ) -> None:
        self._node_id = node_id
        self._cluster_id = cluster_id
        self._tls = tls
        self._hello_timeout = hello_timeout
        self._link = link
        self._ready = ready
        self._chunk = chunk
        # Answers Digest/Repair (anti-entropy); None: those calls are UNIMPLEMENTED.
        self.anti_entropy: AntiEntropy | None = None
        self._refused = Counter[str]()
        self._exchanges = 0
        self._snapshots = 0
        self._pages = 0

    async def Exchange(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[pb.Envelope, pb.Envelope]
    ) -> None:
        identity = await self._authenticate(context)
        if not self._ready():
            await self._refuse(context, "not-ready", grpc.StatusCode.UNAVAILABLE, "recovering")
        transport = ServerTransport(context)
        try:
            async with asyncio.timeout(self._hello_timeout):
                first = await transport.read()
        except TimeoutError:
            await self._refuse(context, "no-hello", grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello")
        if first is None:
            self._refused["closed-before-hello"] += 1
            return
        if first.WhichOneof("body") != "hello":
            await self._refuse(
                context, "no-hello", grpc.StatusCode.INVALID_ARGUMENT, "first message not a Hello"
            )
        claimed = first.hello.node_id
        if identity is not None and claimed != identity.node_id:
            detail = f"certificate names {identity.node_id}, Hello claims {claimed[:40]!r}"
            await self._refuse(
                context, "identity-mismatch", grpc.StatusCode.PERMISSION_DENIED, detail
            )
        link = self._link(claimed) if check_node_id(claimed) else None
        if link is None:
            await self._refuse(
                context, "not-member", grpc.StatusCode.PERMISSION_DENIED, f"{claimed[:40]!r}"
            )
        if not dials(claimed, self._node_id):
            detail = f"{self._node_id} dials {claimed}, not the other way round"
            await self._refuse(
                context, "wrong-direction", grpc.StatusCode.FAILED_PRECONDITION, detail
            )
        self._exchanges += 1
        end = await link.run(transport, first)
        if end.reason is not EndReason.PEER_CLOSED:
            await context.abort(_END_STATUS[end.reason], f"{end.reason.value}: {end.detail}")

    async def Snapshot(
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self._authenticate(context)
        if (
            not check_node_id(request.origin)
            or len(request.cursor) > MAX_CURSOR_LEN
            or request.max_records > MAX_PAGE_RECORDS
            or request.order not in ORDERS
        ):
            await self._refuse(
                context, "bad-snapshot-request", grpc.StatusCode.INVALID_ARGUMENT,
                f"origin must be a node id, cursor <= {MAX_CURSOR_LEN} bytes, "
                f"max_records <= {MAX_PAGE_RECORDS}, order 0 or 1",
            )  # fmt: skip
        cursor = bytes(request.cursor)
        limit = request.max_records or BULK_PAGE
        while True:
            chunk = self._chunk(request.origin, cursor, limit, request.order)
            chunk.request_id = request.request_id
            await context.write(chunk)
            self._pages += 1
            if chunk.last:
                break
            cursor = bytes(chunk.next_cursor)
        self._snapshots += 1

    async def Digest(
        self, request: pb.DigestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DigestReply:
        await self._authenticate(context)
        anti_entropy = await self._anti_entropy(context)
        try:
            reply = await anti_entropy.serve_digest(request)
        except BadMessage as e:
            await self._refuse(context, e.reason, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if reply is None:
            await self._refuse(context, "syncing", grpc.StatusCode.UNAVAILABLE, "syncing")
        return reply

    async def Repair(
        self, request: pb.RepairRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepairReply:
        identity = await self._authenticate(context)
        anti_entropy = await self._anti_entropy(context)
        peer = request.node_id
        if identity is not None and peer != identity.node_id:
            detail = f"certificate names {identity.node_id}, request claims {peer[:40]!r}"
            await self._refuse(
                context, "identity-mismatch", grpc.StatusCode.PERMISSION_DENIED, detail
            )
        if not check_node_id(peer) or self._link(peer) is None:
            await self._refuse(
                context, "not-member", grpc.StatusCode.PERMISSION_DENIED, f"{peer[:40]!r}"
            )
        try:
            reply = await anti_entropy.serve_repair(request, peer)
        except BadMessage as e:
            await self._refuse(context, e.reason, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if reply is None:
            await self._refuse(context, "syncing", grpc.StatusCode.UNAVAILABLE, "syncing")
        return reply

    async def _anti_entropy(self, context: grpc.aio.ServicerContext[Any, Any]) -> AntiEntropy:
        if self.anti_entropy is None:
            await self._refuse(
                context, "no-anti-entropy", grpc.StatusCode.UNIMPLEMENTED, "not enabled here"
            )
        return self.anti_entropy

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> PeerIdentity | None:
        """With TLS, the verified member the call comes from (else the call is aborted)."""
        if not self._tls:
            return None
        identity = identity_from_auth_context(context.auth_context())
        if identity is None:
            await self._refuse(
                context, "no-identity", grpc.StatusCode.PERMISSION_DENIED,
                "certificate names no stockade node",
            )  # fmt: skip
        if identity.cluster_id != self._cluster_id:
            await self._refuse(
                context, "wrong-cluster", grpc.StatusCode.PERMISSION_DENIED,
                f"certificate of cluster {identity.cluster_id}",
            )  # fmt: skip
        if self._link(identity.node_id) is None:
            await self._refuse(
                context, "not-member", grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.node_id} is not a member",
            )  # fmt: skip
        return identity

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        reason: str,
        code: grpc.StatusCode,
        detail: str,
    ) -> NoReturn:
        """Count and abort the call (``context.abort`` raises)."""
        self._refused[reason] += 1
        n = self._refused[reason]
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning("refused %s (%s, #%d): %s", context.peer(), reason, n, detail)
        await context.abort(code, f"{reason}: {detail}")
        raise AssertionError("context.abort returned")

    def statistics(self) -> ServiceStats:
        return ServiceStats(
            exchanges=self._exchanges,
            refused=dict(self._refused),
            snapshots_served=self._snapshots,
            snapshot_pages=self._pages,
        )


def make_server(service: StateSyncService, options: list[tuple[str, Any]]) -> grpc.aio.Server:
    server = grpc.aio.server(options=options)
    rpc.add_StateSyncServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    return server
