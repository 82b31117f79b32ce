"""The dialing side: one channel per peer, a :class:`Dialer` per peer we dial.

Of two nodes the lower id dials (:func:`syncd.service.dials`), so there is
exactly one Exchange stream per pair.  A :class:`Dialer` keeps that stream
up: it opens the call, lets the peer's :class:`~syncd.peers.PeerLink` run it,
and when it ends cancels the call and dials again after a bounded
exponential backoff (:class:`Backoff`: 50 ms doubling to 1 s, reset after a
stream that lasted at least the cap).  The dialing end cannot send a status,
so on a protocol error it cancels the call and logs the reason; the server
end sends INVALID_ARGUMENT in the same situation.

:func:`pull_origin` is the restart recovery: a ``Snapshot`` call that pulls
every record of one origin a peer holds, page by page, resuming from the
last cursor after a broken call while time remains.

gRPC errors are translated here into "the stream ended" (:class:`CallTransport`)
or a :class:`PullResult` error string.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd._pb.stockade.sync.v1 import sync_pb2_grpc as rpc
from syncd.errors import BadMessage, Misuse
from syncd.keyindex import MAX_CURSOR_LEN, ORDER_BUCKET, ORDERS, check_order
from syncd.peers import Clock, EndReason, PeerLink
from syncd.records import FlowRecord, records_from_pb
from syncd.service import BULK_PAGE
from syncd.session import MAX_PAGE_RECORDS
from syncd.tls import TlsMaterial, channel_credentials, channel_options

log = logging.getLogger("syncd.client")


@dataclass(frozen=True, slots=True)
class Backoff:
    # First pause after a failed or ended stream, seconds.
    initial: float = 0.05
    # Longest pause; a stream that lasted this long resets the backoff.
    cap: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap <= 60:
            raise Misuse(f"need 0 < initial <= cap <= 60, not {self.initial}, {self.cap}")

    def next(self, previous: float) -> float:
        """The pause after one that lasted ``previous`` (0: none yet)."""
        return self.initial if previous <= 0 else min(self.cap, previous * 2)


def make_channel(
    address: str, peer_id: str, material: TlsMaterial | None, max_bytes: int
) -> grpc.aio.Channel:
    """A channel to one peer; with TLS the server must prove it is ``peer_id``."""
    options = channel_options(peer_id, max_bytes, tls=material is not None)
    if material is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, channel_credentials(material), options=options)


class CallTransport:
    """A client-side Exchange call as a :class:`~syncd.peers.Transport`."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._ended_by = ""

    @property
    def ended_by(self) -> str:
        return self._ended_by

    def _failed(self, error: Exception) -> None:
        if isinstance(error, grpc.aio.AioRpcError):
            self._ended_by = f"{error.code().name}: {error.details()}"
        else:
            self._ended_by = f"{type(error).__name__}: {error}"

    async def read(self) -> pb.Envelope | None:
        try:
            message = await self._call.read()
        except (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError) as e:
            self._failed(e)
            return None
        if message is grpc.aio.EOF:
            self._ended_by = "the peer closed the stream"
            return None
        assert isinstance(message, pb.Envelope)
        return message

    async def write(self, envelope: pb.Envelope) -> bool:
        try:
            await self._call.write(envelope)
        except (grpc.RpcError, grpc.aio.BaseError, asyncio.InvalidStateError) as e:
            self._failed(e)
            return False
        return True


@dataclass(frozen=True, slots=True)
class DialerStats:
    peer: str
    address: str
    dials: int
    ends: Mapping[str, int]  # how dialed streams ended, by EndReason
    backoff: float  # current pause between dials, seconds
    last_failure: str


class Dialer:
    """Keeps the Exchange stream to one peer open (see the module docstring)."""

    def __init__(
        self,
        link: PeerLink,
        address: str,
        channel: grpc.aio.Channel,
        backoff: Backoff | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._link = link
        self._address = address
        self._stub = rpc.StateSyncStub(channel)  # type: ignore[no-untyped-call]
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._dials = 0
        self._ends = Counter[str]()
        self._delay = 0.0
        self._last_failure = ""
        self._failing = False

    async def run(self) -> None:
        """Dial, run, pause, redial: until cancelled."""
        while True:
            self._dials += 1
            started = self._clock()
            call = self._stub.Exchange()
            try:
                end = await self._link.run(CallTransport(call))
            finally:
                call.cancel()
            self._ends[end.reason.value] += 1
            lasted = self._clock() - started
            self._note(end.reason, end.detail, lasted)
            self._delay = 0.0 if lasted >= self._backoff.cap else self._backoff.next(self._delay)
            await asyncio.sleep(self._delay or self._backoff.initial)

    def _note(self, reason: EndReason, detail: str, lasted: float) -> None:
        """Log the first failure of a run of failures, and the stream ends that matter."""
        self._last_failure = f"{reason.value}: {detail}"
        if reason is EndReason.PEER_ERROR:
            log.warning("%s: closed the stream: %s", self._link.peer, detail)
        elif lasted >= self._backoff.cap:
            log.info("%s: stream ended after %.1f s (%s)", self._link.peer, lasted, detail)
            self._failing = False
        elif not self._failing:
            log.info("%s: cannot keep a stream to %s (%s)", self._link.peer, self._address, detail)
            self._failing = True

    def statistics(self) -> DialerStats:
        return DialerStats(
            peer=self._link.peer,
            address=self._address,
            dials=self._dials,
            ends=dict(self._ends),
            backoff=self._delay,
            last_failure=self._last_failure,
        )


# --- restart recovery ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullResult:
    peer: str
    records: int  # records received and handed on
    complete: bool  # the last page arrived
    error: str  # why not, when not


async def pull_origin(
    channel: grpc.aio.Channel,
    peer: str,
    origin: str,
    on_records: Callable[[list[FlowRecord]], None],
    timeout: float,
    page: int = BULK_PAGE,
) -> PullResult:
    """Every record of ``origin`` that ``peer`` holds, via ``Snapshot`` pages."""
    stub = rpc.StateSyncStub(channel)  # type: ignore[no-untyped-call]
    cursor = b""
    order = ORDER_BUCKET  # an older peer answers in ORDER_KEY: kept for the pull
    count = 0
    error = "timed out"
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:  # each pass resumes from the last page received
                request = pb.SnapshotRequest(
                    origin=origin, cursor=cursor, max_records=page, order=order
                )
                try:
                    async for chunk in stub.Snapshot(request):
                        if cursor and chunk.order != order:
                            raise BadMessage("bad-snapshot-page", "page order changed mid-pull")
                        records = page_records(chunk, origin, cursor)
                        order = chunk.order
                        on_records(records)
                        count += len(records)
                        if chunk.last:
                            return PullResult(peer, count, True, "")
                        cursor = bytes(chunk.next_cursor)
                    error = "the peer ended the snapshot before its last page"
                except grpc.aio.AioRpcError as e:
                    error = f"{e.code().name}: {e.details()}"
                    if _not_member_yet(e):
                        # We registered in etcd a moment ago; the peer admits
                        # us once its agent has seen that (tens of ms).
                        # Giving up here would restore a table without our
                        # own flows, and drop them when we take VIPs back.
                        await asyncio.sleep(NOT_MEMBER_RETRY)
                        continue
                    if e.code() is not grpc.StatusCode.UNAVAILABLE or count == 0:
                        break  # refused, or nobody there: do not insist
                    await asyncio.sleep(Backoff().initial)  # broken mid-way: resume
                except BadMessage as e:
                    error = str(e)
                    break
    return PullResult(peer, count, False, error)


NOT_MEMBER_RETRY = 0.05  # seconds between Snapshot attempts while a peer does not admit us yet


def _not_member_yet(error: grpc.aio.AioRpcError) -> bool:
    details = error.details() or ""
    return error.code() is grpc.StatusCode.PERMISSION_DENIED and details.startswith("not-member")


def page_records(chunk: pb.SnapshotChunk, origin: str, cursor: bytes) -> list[FlowRecord]:
    """Validate one bulk snapshot page; :class:`BadMessage` and nothing applied if bad."""
    if len(chunk.records) > MAX_PAGE_RECORDS or len(chunk.next_cursor) > MAX_CURSOR_LEN:
        raise BadMessage("bad-snapshot-page", "too many records or cursor too long")
    if chunk.order not in ORDERS:
        raise BadMessage("bad-snapshot-page", f"order {chunk.order}")
    chunk.DiscardUnknownFields()  # records keep their encoding (FlowRecord.wire)
    records = records_from_pb(chunk.records)
    for record in records:
        if record.origin != origin:
            raise BadMessage("bad-snapshot-page", f"record of {record.origin!r}, asked {origin}")
    previous = check_order([r.key for r in records], cursor, chunk.order)
    if not chunk.last and (chunk.next_cursor < previous or chunk.next_cursor <= cursor):
        raise BadMessage("bad-snapshot-page", "next_cursor does not advance")
    return records
