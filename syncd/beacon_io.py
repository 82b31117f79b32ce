"""The beacon adapter: a UDP socket served by one daemon thread (not asyncio).

Why a thread.  Beacons exist to say "this node is alive" when the gRPC stream
cannot: under a lossy link and while syncd's asyncio loop is busy for 100 ms
or more (a big batch, a resync).  A sender on that loop would fall silent
exactly then.  A thread keeps sending, and syncd's short GIL switch interval
(``syncd.peers.SWITCH_INTERVAL``, 0.5 ms) gives it the GIL quickly.

Why it still listens to the loop.  A loop that is truly stuck is a useless
node: peers must stop hearing it, or they would keep it in the ring forever.
So the owner calls :meth:`BeaconService.loop_alive` from its event loop every
~20 ms, and the thread sends only while the last call is at most
``alive_within`` seconds old (the owner passes its own self-fencing stall
limit, 0.5 s by default).  Beyond that each round is counted ``suppressed``;
sending resumes with the next ``loop_alive``.  Receiving never stops: what we
heard from peers stays true whatever our loop does.

Revocation notices (``syncd.beacon``, field ``revoked``).  The owner says
which peers' cluster epochs it revoked (:meth:`BeaconService.set_notices`)
and what its own cluster epoch is (:meth:`BeaconService.set_own_epoch`).
When a peer's beacon says it revoked our current epoch, the thread calls the
:meth:`BeaconService.on_revoked` hook itself, once per epoch, without waiting for the
owner's loop: that is the point (the agent closes its ARP guard there).

The thread never dies of an error: a failed ``sendto`` (EPERM from an
iptables DROP on OUTPUT, ENETUNREACH, EAGAIN) is counted by errno name, and
any unexpected exception is logged, counted (``thread_errors``) and followed
by a short pause.  A dead liveness thread would be a sync that dies silently.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from syncd.beacon import MAX_SEQ, BeaconSender, BeaconStats, BeaconTracker, next_round
from syncd.errors import ConfigError, Misuse

log = logging.getLogger("syncd.beacon")

RECV_BATCH: Final = 64  # datagrams read per wake: bounds the time one wake can take
RECV_SIZE: Final = 2048  # > beacon.MAX_SIZE: a longer datagram arrives cut, and is malformed
ERROR_PAUSE: Final = 0.05  # seconds to wait after an unexpected exception in the thread
ERROR_LOG_EVERY: Final = 10.0  # seconds between logged tracebacks of repeated thread errors
JOIN_TIMEOUT: Final = 2.0  # stop() waits this long for the thread (it wakes in microseconds)


@dataclass(frozen=True, slots=True)
class BeaconIoStats:
    beacons: BeaconStats  # per peer heard/lost, and datagrams dropped by reason
    sent: int  # datagrams handed to the kernel
    send_errors: Mapping[str, int]  # sendto failures by errno name ("EPERM": 3)
    recv_errors: Mapping[str, int]  # recvfrom failures by errno name (rare on UDP)
    suppressed: int  # rounds not sent: the owner's loop had not called loop_alive in time
    rounds: int  # send rounds due so far (sent or suppressed)
    thread_errors: int  # unexpected exceptions caught in the thread (each is a bug)
    revoked_heard: int  # peers' notices that they revoked our current epoch (hook calls)
    running: bool  # the thread is alive (False before start, after stop, or if it died)


def _ip_family(what: str, host: str) -> socket.AddressFamily:
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise ConfigError(f"beacons: {what} {host!r} is not an IP address") from None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno, f"errno{e.errno}") if e.errno else type(e).__name__


class BeaconService:
    """Sends this node's beacons to every peer and records when each peer's arrived."""

    def __init__(
        self,
        *,
        cluster_id: str,
        node_id: str,
        epoch: int,
        bind: tuple[str, int],
        key: bytes | None,
        interval: float = 0.01,
        alive_within: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        host, port = bind
        self._family = _ip_family("bind address", host)
        if not 0 <= port <= 65535:
            raise ConfigError(f"beacons: bind port {port} outside 0..65535")
        if not (math.isfinite(interval) and interval > 0):
            raise ConfigError(f"beacons: interval must be > 0 seconds, not {interval}")
        if not (math.isfinite(alive_within) and alive_within > 0):
            raise ConfigError(f"beacons: alive_within must be > 0 seconds, not {alive_within}")
        self._sender = BeaconSender(cluster_id, node_id, epoch, key)  # checks ids, epoch, key
        self._tracker = BeaconTracker(cluster_id, node_id)
        self._bind = (host, port)
        self._key = key
        self._interval = interval
        self._alive_within = alive_within
        self._clock = clock
        self._lock = threading.Lock()  # guards the tracker and the counters below
        # node_id -> sockaddr, or None when its family is not the socket's.
        # Replaced whole by set_peers; the thread reads one snapshot per round.
        self._peers: dict[str, tuple[str, int] | None] = {}
        self._last_alive = -math.inf
        self._on_revoked: Callable[[str, int], None] | None = None
        self._on_round: Callable[[], None] | None = None
        self._own_epoch = 0  # our cluster epoch (membership incarnation); 0: none yet
        # peer -> (its cluster epoch we revoked, its address when we learnt it)
        self._notices: dict[str, tuple[int, tuple[str, int] | None]] = {}
        self._revoked_fired = 0  # the own epoch whose revocation was reported
        self._revoked_heard = 0
        self._sent = 0
        self._send_errors = Counter[str]()
        self._recv_errors = Counter[str]()
        self._suppressed = 0
        self._rounds = 0
        self._thread_errors = 0
        self._last_error_log = -math.inf
        self._stopping = threading.Event()
        self._round_now = threading.Event()  # a fresh notice: send a round at once
        self._sock: socket.socket | None = None
        self._address: tuple[str, int] | None = None  # kept: readable after stop()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None

    # --- owner's API ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and start the thread; counts as a first ``loop_alive``."""
        if self._sock is not None or self._stopping.is_set():
            raise Misuse("BeaconService.start: already started (a service starts once)")
        host, port = self._bind
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"beacons: cannot bind udp {host}:{port}: {e.strerror}") from None
        sock.setblocking(False)
        self._sock = sock
        bound_host, bound_port = sock.getsockname()[:2]
        self._address = (bound_host, bound_port)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._last_alive = self._clock()
        self._thread = threading.Thread(target=self._run, name="syncd-beacon", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the kernel's choice when bound to 0."""
        if self._address is None:
            raise Misuse("BeaconService.address: not started")
        return self._address

    def stop(self) -> None:
        """Stop and join the thread, close the socket.  Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.error("beacon thread did not stop within %.1f s", JOIN_TIMEOUT)
                return  # leave its sockets open: it may still be using them
        for s in (self._sock, self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    def set_peers(self, peers: Mapping[str, tuple[str, int]]) -> None:
        """Send to and listen for exactly ``peers`` (node_id -> (IP literal, UDP port)).

        Our own id, if present, is ignored.  A peer whose address family is not
        the socket's is kept: each send to it is counted as EAFNOSUPPORT.
        """
        table: dict[str, tuple[str, int] | None] = {}
        for node_id, (host, port) in peers.items():
            try:
                family = _ip_family(f"peer {node_id}", host)
            except ConfigError as e:
                raise Misuse(f"{e} (set_peers takes IP literals)") from None
            if not 1 <= port <= 65535:
                raise Misuse(f"beacons: peer {node_id} port {port} outside 1..65535")
            if node_id != self._sender.node_id:
                table[node_id] = (host, port) if family == self._family else None
        with self._lock:
            self._tracker.set_peers(table)
            self._peers = table

    def loop_alive(self, now: float) -> None:
        """The owner's event loop is running at ``now`` (same clock as ``clock``)."""
        self._last_alive = now  # one float store: atomic under the GIL

    def on_revoked(self, hook: Callable[[str, int], None] | None) -> None:
        """Call ``hook(peer, epoch)`` from the beacon thread when a peer's beacon
        says it revoked our current cluster epoch (once per epoch).  The hook
        must be quick and thread-safe; an exception from it is a thread error."""
        self._on_revoked = hook

    def on_round(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook()`` from the beacon thread after every round that sent our
        beacons (the owner's loop ran within ``alive_within``).  Whatever the
        hook keeps alive lives exactly as long as our peers keep hearing us: the
        agent refreshes its ARP guard here (``cluster.arpguard``).  The hook must
        be quick and thread-safe; an exception from it is a thread error."""
        self._on_round = hook

    def set_own_epoch(self, epoch: int) -> None:
        """Our current cluster epoch: notices naming it fire ``on_revoked`` (0: none)."""
        if not 0 <= epoch <= MAX_SEQ:
            raise Misuse(f"beacons: own epoch {epoch} outside 0..2**64-1")
        self._own_epoch = epoch  # one int store: atomic under the GIL

    def set_notices(self, notices: Mapping[str, int]) -> None:
        """Tell each of these peers, in every beacon, that we revoked this epoch of it.

        A noticed peer keeps getting its notice after ``set_peers`` drops it
        (its revocation removes it from the membership within a tick or two,
        sooner than a lossy link may deliver one beacon), at the address it
        had when it was first noticed.
        """
        for peer, epoch in notices.items():
            if not 1 <= epoch <= MAX_SEQ:
                raise Misuse(f"beacons: notice for {peer}: epoch {epoch} outside 1..2**64-1")
        with self._lock:
            old, peers = self._notices, self._peers
            self._notices = {  # replaced whole: the thread reads one snapshot
                p: (e, peers[p] if p in peers else old[p][1] if p in old else None)
                for p, e in notices.items()
            }
            fresh = any(old.get(p, (0, None))[0] != e for p, e in notices.items())
        if fresh:
            # A new revocation: tell the peer now, not at the next round (up to
            # an interval away).  The takers claim its VIPs takeover_guard
            # after its record goes; until the notice lands it answers ARP.
            self._round_now.set()
            self._wake()

    def _wake(self) -> None:
        if self._wake_w is not None:
            # If this fails the thread still wakes: it polls with a timeout of one interval.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def heard(self) -> dict[str, float]:
        """Peer -> clock time of its last accepted beacon (peers heard at least once)."""
        with self._lock:
            return self._tracker.heard()

    def loss(self) -> dict[str, float]:
        """Peer -> recent beacon loss estimate (``BeaconTracker.loss``)."""
        with self._lock:
            return self._tracker.loss()

    def statistics(self) -> BeaconIoStats:
        with self._lock:
            return BeaconIoStats(
                beacons=self._tracker.statistics(),
                sent=self._sent,
                send_errors=dict(self._send_errors),
                recv_errors=dict(self._recv_errors),
                suppressed=self._suppressed,
                rounds=self._rounds,
                thread_errors=self._thread_errors,
                revoked_heard=self._revoked_heard,
                running=self._thread is not None and self._thread.is_alive(),
            )

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        poller = select.poll()  # not select.select: syncd's fds may be above FD_SETSIZE
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r.fileno(), select.POLLIN)
        due: float | None = None  # None: a round is due now
        while not self._stopping.is_set():
            try:
                due = self._step(poller, due)
            except Exception:
                self._thread_error()
                due = None  # not self._clock(): it may be what raised

    def _step(self, poller: select.poll, due: float | None) -> float:
        """Wait for a datagram or the round due at ``due``; return when the next round is due."""
        if due is None:
            due = self._clock()
        wait_ms = max(0.0, due - self._clock()) * 1000.0
        for fd, _ in poller.poll(wait_ms):
            if self._sock is not None and fd == self._sock.fileno():
                self._drain()
            elif self._wake_r is not None and fd == self._wake_r.fileno():
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
        now = self._clock()
        if self._round_now.is_set():
            self._round_now.clear()
            self._round(now)  # an extra round; the grid stays as it was
            return due
        if now < due:
            return due
        self._round(now)
        return next_round(due, now, self._interval)

    def _drain(self) -> None:
        assert self._sock is not None
        datagrams: list[bytes] = []
        for _ in range(RECV_BATCH):
            try:
                data, _addr = self._sock.recvfrom(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                with self._lock:
                    self._recv_errors[_errno_name(e)] += 1
                break
            datagrams.append(data)
        if not datagrams:
            return
        own = self._own_epoch
        revoked_by: str | None = None
        with self._lock:
            now = self._clock()
            for data in datagrams:
                peer = self._tracker.receive(data, self._key, now)
                if peer is not None and own and self._tracker.revoked_by(peer) == own:
                    revoked_by = peer
            if revoked_by is not None and self._revoked_fired != own:
                self._revoked_fired = own
                self._revoked_heard += 1
            else:
                revoked_by = None
        if revoked_by is not None and self._on_revoked is not None:
            self._on_revoked(revoked_by, own)  # outside the lock: it may call back in

    def _round(self, now: float) -> None:
        if now - self._last_alive > self._alive_within:
            with self._lock:
                self._rounds += 1
                self._suppressed += 1
            return
        assert self._sock is not None
        payload = self._sender.next()
        notices, peers = self._notices, self._peers  # snapshots: the setters replace them
        targets = [(addr, notices[p][0] if p in notices else 0) for p, addr in peers.items()]
        # A noticed peer we never had an address for cannot be told: skipped, not an error.
        targets += [(a, e) for p, (e, a) in notices.items() if p not in peers and a is not None]
        sent = 0
        errors = Counter[str]()
        for addr, revoked in targets:
            if addr is None:
                errors["EAFNOSUPPORT"] += 1
                continue
            try:
                self._sock.sendto(self._sender.notice(revoked) if revoked else payload, addr)
                sent += 1
            except OSError as e:
                errors[_errno_name(e)] += 1
        with self._lock:
            self._rounds += 1
            self._sent += sent
            self._send_errors.update(errors)
        hook = self._on_round
        if hook is not None:
            hook()

    def _thread_error(self) -> None:
        with self._lock:
            self._thread_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY:
            self._last_error_log = now
            log.exception("beacon thread: unexpected error (%d so far)", self._thread_errors)
        self._stopping.wait(ERROR_PAUSE)
