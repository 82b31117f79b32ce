"""Keep the kernel's fast-path marks in step with the engine's flow table.

When the engine hands a flow to the kernel fast path, the kernel conntrack
entry gets the FAST connmark bit (see :mod:`node.dataplane`) and most of the
flow's packets no longer reach userspace.  When the engine later forgets
that flow (expiry, close, eviction) the kernel entry would keep the bit and
keep accepting the flow's packets behind the engine's back.  So each
``FlowDeleted`` of an offloaded flow is turned into a ctnetlink update that
clears FAST on the kernel entry, leaving the entry itself alone (deleting it
would also drop NAT bindings and other users' state).  The kernel applies
``mark = (mark & ~CTA_MARK_MASK) ^ CTA_MARK`` (``ctnetlink_change_mark``),
so ``CTA_MARK=0, CTA_MARK_MASK=FAST`` clears exactly our bit.

The work happens off the packet path: ``forget()`` only appends to a
bounded queue (overflow counted) and one asyncio task drains it.  Kernel
errors are counted and logged once per kind; they never stop the node.

The tuple the engine saw at the hook is not always the kernel's original
tuple: a DNAT done before FORWARD makes our tuple the kernel's *reply*
tuple reversed, and a flow the kernel picked up from the other side has the
tuples swapped.  Updates try, in order: orig=ours, reply=reversed(ours),
orig=reversed(ours), reply=ours; "no such entry" for all of them is counted
as ``absent`` (the kernel entry already expired), not as an error.

``flush_marks()`` clears FAST on every kernel entry; the daemon calls it at
start and stop so no flow is fast-pathed without the engine knowing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

# How many pending updates may wait; beyond that the oldest is dropped and
# counted (the flow's kernel entry then keeps FAST until it expires there).
DEFAULT_MAX_PENDING = 4096
AF_INET, AF_INET6 = 2, 10


@dataclass(frozen=True, slots=True)
class Tuple5:
    """One direction of a TCP/UDP flow as ctnetlink names it."""

    family: int  # 4 or 6
    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    def reversed(self) -> Tuple5:
        return Tuple5(self.family, self.proto, self.dst, self.dport, self.src, self.sport)


class FlowLike(Protocol):
    """The fields of ``node.flow.events.FlowSnapshot`` this module reads."""

    @property
    def family(self) -> int: ...
    @property
    def proto(self) -> int: ...
    @property
    def orig_src(self) -> int: ...
    @property
    def orig_sport(self) -> int: ...
    @property
    def orig_dst(self) -> int: ...
    @property
    def orig_dport(self) -> int: ...


def tuple_of(flow: FlowLike) -> Tuple5:
    def addr(value: int) -> str:
        return str(
            ipaddress.ip_address(value) if flow.family == 4 else ipaddress.IPv6Address(value)
        )

    return Tuple5(
        flow.family, flow.proto, addr(flow.orig_src), flow.orig_sport,
        addr(flow.orig_dst), flow.orig_dport,
    )  # fmt: skip


class ConntrackBackend(Protocol):
    """What the module needs from ctnetlink (pyroute2 in production)."""

    async def clear_mark(self, which: str, t: Tuple5, mask: int) -> bool:
        """Clear ``mask`` on the entry whose ``which`` ("orig"/"reply") tuple is ``t``.

        True when updated, False when no such entry; other failures raise OSError.
        """
        ...

    async def clear_all(self, mask: int) -> int:
        """Clear ``mask`` on every entry carrying it; returns how many."""
        ...

    def close(self) -> None: ...


class Pyroute2Backend:
    """ctnetlink through pyroute2's asyncio conntrack sockets (one per family)."""

    def __init__(self) -> None:
        self._sockets: dict[int, Any] = {}

    def _socket(self, af: int) -> Any:
        if af not in self._sockets:
            from pyroute2.conntrack import AsyncConntrack

            self._sockets[af] = AsyncConntrack(nfgen_family=af)
        return self._sockets[af]

    async def clear_mark(self, which: str, t: Tuple5, mask: int) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        af = AF_INET if t.family == 4 else AF_INET6
        nl_tuple = NFCTAttrTuple(
            family=af, saddr=t.src, daddr=t.dst, proto=t.proto, sport=t.sport, dport=t.dport
        )
        try:
            await self._socket(af).entry(
                "set", mark=0, mark_mask=mask, **{f"tuple_{which}": nl_tuple}
            )
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return False
            raise OSError(e.code, f"ctnetlink update: {e}") from e
        return True

    async def clear_all(self, mask: int) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        cleared = 0
        for af in (AF_INET, AF_INET6):
            sock = self._socket(af)
            try:
                entries = [e async for e in await sock.dump_entries(mark=mask, mark_mask=mask)]
                for entry in entries:
                    try:
                        await sock.entry("set", mark=0, mark_mask=mask, tuple_orig=entry.tuple_orig)
                        cleared += 1
                    except NetlinkError as e:
                        if e.code != errno.ENOENT:  # gone meanwhile: nothing to clear
                            raise
            except NetlinkError as e:
                raise OSError(e.code, f"ctnetlink flush of marks: {e}") from e
        return cleared

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


@dataclass(frozen=True, slots=True)
class KernelCtStats:
    queued_total: int  # updates asked for (offloaded flows the engine forgot)
    cleared_total: int  # kernel entries whose FAST bit was cleared
    absent_total: int  # no kernel entry any more (already expired there)
    overflow_total: int  # updates dropped because the queue was full
    errors_total: int  # updates or flushes that failed
    flushed_total: int  # entries cleared by flush_marks()
    pending: int  # updates waiting now


_ATTEMPTS = (("orig", False), ("reply", True), ("orig", True), ("reply", False))


class KernelConntrack:
    """Bounded queue of "clear FAST on this flow" updates, drained by one task."""

    def __init__(
        self,
        fast_mark: int,
        backend: ConntrackBackend | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self._mask = fast_mark
        self._backend: ConntrackBackend = backend if backend is not None else Pyroute2Backend()
        self._pending: deque[Tuple5] = deque(maxlen=max_pending)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._logged: set[str] = set()
        self._queued = self._cleared = self._absent = 0
        self._overflow = self._errors = self._flushed = 0

    def forget(self, flow: FlowLike) -> None:
        """Ask for FAST to be cleared on ``flow``'s kernel entry; never blocks."""
        if len(self._pending) == self._pending.maxlen:
            self._overflow += 1
        self._pending.append(tuple_of(flow))
        self._queued += 1
        self._wakeup.set()

    def start(self) -> None:
        """Start the drain task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain_forever())

    async def stop(self) -> None:
        """Finish pending updates (bounded by the queue) and stop the task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.drain()

    async def drain(self) -> None:
        """Apply every pending update now."""
        while self._pending:
            await self._apply(self._pending.popleft())

    async def _drain_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.drain()

    async def _apply(self, t: Tuple5) -> None:
        try:
            for which, reverse in _ATTEMPTS:
                if await self._backend.clear_mark(
                    which, t.reversed() if reverse else t, self._mask
                ):
                    self._cleared += 1
                    return
            self._absent += 1
        except Exception as e:  # OSError is documented; anything else is a bug, kept alive
            self._error("update", e)

    async def flush_marks(self) -> int:
        """Clear FAST on every kernel entry; returns how many (0 on error, counted)."""
        try:
            n = await self._backend.clear_all(self._mask)
        except Exception as e:
            self._error("flush", e)
            return 0
        self._flushed += n
        return n

    def _error(self, what: str, e: Exception) -> None:
        self._errors += 1
        kind = f"{what}:{e.errno if isinstance(e, OSError) else type(e).__name__}"
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(
                "kernel conntrack %s failed (further ones only counted): %s",
                what,
                e,
                exc_info=not isinstance(e, OSError),
            )

    def close(self) -> None:
        self._backend.close()

    def statistics(self) -> KernelCtStats:
        return KernelCtStats(
            self._queued, self._cleared, self._absent, self._overflow,
            self._errors, self._flushed, len(self._pending),
        )  # fmt: skip
