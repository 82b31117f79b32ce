"""Failover probe flows: ``python -m chaos.bench.probe --server IP ...`` (client namespace).

Like the lab traffic driver (``chaos.traffic``, whose echo server it talks
to and whose per-connection bookkeeping it reuses), but made to be read
while it runs, by the failover bench on the host:

* ``--tcp-flows K`` long-lived TCP connections, one 16-byte message every
  ``--interval`` (1 ms), echoed: the end-to-end stall, retransmission
  backoff included;
* ``--udp-flows U`` UDP flows, each its own socket (own source port, so
  the routers spread them like TCP flows), one datagram every
  ``--udp-interval``, echoed: no backoff, so their gaps are the time until
  the path is restored.

Each flow keeps a name (``tcp-3``, ``udp-0``) for the whole run; a TCP flow
that is reset opens a new connection under the same name after 100 ms.

Output: JSON lines on stdout, ``CLOCK_MONOTONIC`` times::

    {"ev": "ready", "now": t, "flows": [["tcp-0", "tcp"], ...]}
    {"ev": "gap", "flow": "tcp-3", "kind": "tcp", "start": t0, "end": t1}
    {"ev": "reset", "flow": "tcp-3", "at": t}
    {"ev": "tick", "now": t, "stalled": {"tcp-3": t0}}    # every --tick; t0: last echo
    {"ev": "end", "now": t, "flows": {"tcp-3": {...counters...}}}

A gap is a silence longer than ``--stall-after`` (default 20 ms) between
two echoes of one flow.  ``stalled`` maps the flows silent for longer than
that right now to their last echo (null: none since the connection
opened).  SIGTERM or SIGINT ends the run (with the ``end`` line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from typing import Any

from chaos.traffic import CONNECT_TIMEOUT, MAX_WRITE_BUFFER, MSG, RECONNECT_DELAY
from chaos.traffic_stats import GapEvent, LongLived

READY_TIMEOUT = 10.0


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        now = time.monotonic()
        self.flows: dict[str, tuple[str, LongLived]] = {}
        for i in range(args.tcp_flows):
            self.flows[f"tcp-{i}"] = ("tcp", LongLived(i, now, stall_after=args.stall_after))
        for i in range(args.udp_flows):
            self.flows[f"udp-{i}"] = ("udp", LongLived(i, now, stall_after=args.stall_after))
        self.stop = asyncio.Event()

    def _echo(self, name: str, sent_at: float) -> None:
        kind, c = self.flows[name]
        event: GapEvent | None = c.on_echo(MSG.size, sent_at, time.monotonic())
        if event is not None:
            _emit({"ev": "gap", "flow": name, "kind": kind, "start": event.start, "end": event.end})

    async def _tcp(self, name: str) -> None:
        a = self.args
        c = self.flows[name][1]
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(a.server, a.tcp_port), CONNECT_TIMEOUT
                )
            except (TimeoutError, OSError):
                c.on_lost(time.monotonic(), reset=False)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            c.on_connected(time.monotonic())
            sender = asyncio.ensure_future(self._tcp_send(c, writer))
            try:
                while True:
                    data = await reader.readexactly(MSG.size)
                    self._echo(name, MSG.unpack(data)[1])
            except (OSError, asyncio.IncompleteReadError):
                now = time.monotonic()
                c.on_lost(now, reset=True)
                _emit({"ev": "reset", "flow": name, "at": now})
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender
                writer.close()
            c.reconnects += 1
            await asyncio.sleep(RECONNECT_DELAY)

    async def _tcp_send(self, c: LongLived, writer: asyncio.StreamWriter) -> None:
        seq = 0
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            if writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                c.send_skipped += 1
            else:
                writer.write(MSG.pack(seq, now))
                c.on_sent(MSG.size)
                seq += 1
            next_at = max(next_at + self.args.interval, now)
            await asyncio.sleep(next_at - time.monotonic())

    async def _udp(self, name: str) -> None:
        a = self.args
        c = self.flows[name][1]
        loop = asyncio.get_running_loop()
        probe = self

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if len(data) == MSG.size:
                    probe._echo(name, MSG.unpack(data)[1])

            def error_received(self, exc: Exception) -> None:
                pass  # ICMP unreachable while a path is down: the gap shows it

        transport, _ = await loop.create_datagram_endpoint(
            Proto, remote_addr=(a.server, a.udp_port), family=socket.AF_INET
        )
        c.on_connected(time.monotonic())
        seq = 0
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                with contextlib.suppress(OSError):
                    transport.sendto(MSG.pack(seq, now))
                    c.on_sent(MSG.size)
                seq += 1
                next_at = max(next_at + a.udp_interval, now)
                await asyncio.sleep(next_at - time.monotonic())
        finally:
            transport.close()

    def _stalled(self, now: float) -> dict[str, float | None]:
        """Flows silent for longer than the stall threshold -> their last echo."""
        return {
            name: c.last_echo
            for name, (_kind, c) in self.flows.items()
            if c.last_echo is None or now - c.last_echo > self.args.stall_after
        }

    async def _ticks(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while self._stalled(time.monotonic()):
            if time.monotonic() > deadline:
                _emit({"ev": "failed", "stalled": self._stalled(time.monotonic())})
                self.stop.set()
                return
            await asyncio.sleep(0.05)
        flows = [[name, kind] for name, (kind, _c) in self.flows.items()]
        _emit({"ev": "ready", "now": time.monotonic(), "flows": flows})
        while not self.stop.is_set():
            now = time.monotonic()
            _emit({"ev": "tick", "now": now, "stalled": self._stalled(now)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.tick)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        jobs = [self._tcp(n) if k == "tcp" else self._udp(n) for n, (k, _c) in self.flows.items()]
        tasks = [asyncio.ensure_future(j) for j in [*jobs, self._ticks()]]
        await self.stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        summary = {name: c.summary() for name, (_k, c) in self.flows.items()}
        _emit({"ev": "end", "now": time.monotonic(), "flows": summary})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos.bench.probe", description=__doc__)
    p.add_argument("--server", required=True)
    p.add_argument("--tcp-port", type=int, default=8000)
    p.add_argument("--udp-port", type=int, default=8053)
    p.add_argument("--tcp-flows", type=int, default=8)
    p.add_argument("--udp-flows", type=int, default=8)
    p.add_argument("--interval", type=float, default=0.001, help="TCP message interval (s)")
    p.add_argument("--udp-interval", type=float, default=0.002, help="UDP datagram interval (s)")
    p.add_argument("--stall-after", type=float, default=0.02, help="gap threshold (s)")
    p.add_argument("--tick", type=float, default=0.05, help="seconds between tick lines")
    args = p.parse_args(argv)
    checks = [
        (0 <= args.tcp_flows <= 256 and 0 <= args.udp_flows <= 256, "flows must be 0..256"),
        (args.tcp_flows + args.udp_flows > 0, "at least one flow"),
        (0.0001 <= args.interval <= 1 and 0.0001 <= args.udp_interval <= 1, "bad interval"),
        (0.005 <= args.stall_after <= 10, "--stall-after must be 0.005..10"),
        (0.01 <= args.tick <= 10, "--tick must be 0.01..10"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    asyncio.run(Probe(parse(argv)).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
