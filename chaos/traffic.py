"""The lab's traffic driver: ``python -m chaos.traffic server|client ...``.

``server`` (in the server namespace): TCP echo and UDP echo.
``client`` (in the client namespace), for ``--seconds``:

* ``--long-lived K`` TCP connections, each sending a 16-byte message (a
  sequence number and its send time) every ``--interval`` (1 ms); the
  server echoes it.  Resets and stalls (no echo for more than 100 ms) are
  counted, with the longest gap and a gap event per stall (monotonic times).
  A reset connection is opened again after 100 ms (a new flow).
* ``--rate R`` new TCP connections per second (connect, one message, echo,
  close): success, failure by reason, latency.
* ``--udp-rate`` UDP requests per second with a 1 s timeout.
* ``ping`` (iputils) every 0.2 s.

A progress line goes to stderr once a second; the summary goes to stdout at
the end (``--json``: one JSON object, see ``chaos.traffic_stats``).  Exit
status: 0 clean, 1 something failed or stalled, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from chaos.traffic_stats import LongLived, RequestStats, human_summary, progress_line, run_summary

MSG = struct.Struct("!Qd")  # sequence number, send time (monotonic)
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 1.0
MAX_WRITE_BUFFER = 64 * 1024  # bounded: beyond it a tick is skipped (counted)
RECONNECT_DELAY = 0.1


# --- server -------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(host: str, tcp_port: int, udp_port: int) -> None:
    server = await asyncio.start_server(_echo, host, tcp_port, backlog=1024, reuse_address=True)
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(host, udp_port))
    print(f"traffic server ready tcp={tcp_port} udp={udp_port}", flush=True)
    try:
        await server.serve_forever()
    finally:
        udp.close()


# --- client -------------------------------------------------------------------


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.deadline = self.started + args.seconds
        self.conns = [LongLived(i, self.started) for i in range(args.long_lived)]
        self.churn = RequestStats("churn")
        self.udp = RequestStats("udp")
        self.ping = RequestStats("ping")
        self.requests = [self.churn, self.udp] + ([self.ping] if args.ping else [])
        self._churn_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> dict[str, Any]:
        jobs: list[Awaitable[None]] = [self._long_lived(c) for c in self.conns]
        jobs += [self._churn_loop(), self._udp_loop(), self._progress()]
        if self.args.ping:
            jobs.append(self._ping())
        tasks = [asyncio.ensure_future(j) for j in jobs]
        await asyncio.sleep(max(0.0, self.deadline - time.monotonic()))
        ended = time.monotonic()
        for c in self.conns:
            c.finish(ended)
        # Requests in flight at the deadline get their reply timeout to finish.
        if self._churn_tasks:
            await asyncio.wait(self._churn_tasks, timeout=CONNECT_TIMEOUT + REPLY_TIMEOUT)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        settings = {k: v for k, v in vars(self.args).items() if k not in ("func", "json")}
        return run_summary(self.started, ended, self.conns, self.requests, settings)

    async def _long_lived(self, c: LongLived) -> None:
        a = self.args
        while time.monotonic() < self.deadline:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(a.server, a.tcp_port), CONNECT_TIMEOUT
                )
            except (TimeoutError, OSError):
                c.on_lost(time.monotonic(), reset=False)
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            c.on_connected(time.monotonic())
            sender = asyncio.ensure_future(self._send(c, writer))
            try:
                while True:
                    data = await reader.readexactly(MSG.size)
                    _seq, sent_at = MSG.unpack(data)
                    c.on_echo(len(data), sent_at, time.monotonic())
            except (OSError, asyncio.IncompleteReadError):
                c.on_lost(time.monotonic(), reset=True)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await sender
                writer.close()
            if time.monotonic() < self.deadline:
                c.reconnects += 1
                await asyncio.sleep(RECONNECT_DELAY)

    async def _send(self, c: LongLived, writer: asyncio.StreamWriter) -> None:
        interval = self.args.interval
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
            next_at = max(next_at + interval, now)  # never a burst to catch up
            await asyncio.sleep(next_at - time.monotonic())

    async def _every(self, rate: float, action: Callable[[], Awaitable[None]]) -> None:
        if rate <= 0:
            return
        next_at = time.monotonic()
        while time.monotonic() < self.deadline:
            task = asyncio.ensure_future(action())
            self._churn_tasks.add(task)
            task.add_done_callback(self._churn_tasks.discard)
            next_at = max(next_at + 1 / rate, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    async def _churn_loop(self) -> None:
        await self._every(self.args.rate, self._one_connection)

    async def _one_connection(self) -> None:
        a = self.args
        t0 = time.monotonic()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(a.server, a.tcp_port), CONNECT_TIMEOUT
            )
            writer.write(MSG.pack(0, t0))
            await asyncio.wait_for(reader.readexactly(MSG.size), REPLY_TIMEOUT)
            self.churn.on_ok(time.monotonic() - t0)
        except TimeoutError:
            self.churn.on_failed("timeout")
        except ConnectionRefusedError:
            self.churn.on_failed("refused")
        except ConnectionResetError:
            self.churn.on_failed("reset")
        except (OSError, asyncio.IncompleteReadError) as e:
            self.churn.on_failed(type(e).__name__)
        finally:
            if writer is not None:
                writer.close()

    async def _udp_loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: dict[int, tuple[float, asyncio.Future[float]]] = {}

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if len(data) == MSG.size:
                    seq, _ = MSG.unpack(data)
                    entry = pending.get(seq)
                    if entry and not entry[1].done():
                        entry[1].set_result(time.monotonic())

        transport, _ = await loop.create_datagram_endpoint(
            Proto, remote_addr=(self.args.server, self.args.udp_port)
        )
        seq = 0

        async def one() -> None:
            nonlocal seq
            seq += 1
            my, t0 = seq, time.monotonic()
            fut: asyncio.Future[float] = loop.create_future()
            pending[my] = (t0, fut)
            try:
                transport.sendto(MSG.pack(my, t0))
                got = await asyncio.wait_for(fut, REPLY_TIMEOUT)
                self.udp.on_ok(got - t0)
            except TimeoutError:
                self.udp.on_failed("timeout")
            except OSError as e:
                self.udp.on_failed(type(e).__name__)
            finally:
                pending.pop(my, None)

        try:
            await self._every(self.args.udp_rate, one)
            await asyncio.sleep(REPLY_TIMEOUT)
        finally:
            transport.close()

    async def _ping(self) -> None:
        seconds = max(1, int(self.args.seconds))
        proc = await asyncio.create_subprocess_exec(
            *["ping", "-n", "-i", "0.2", "-W", "1", "-w", str(seconds), self.args.server],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            # Line by line, so the progress line counts replies as they come.
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                if m := re.search(r"time=([\d.]+) ms", line):
                    self.ping.on_ok(float(m.group(1)) / 1000)
                elif m := re.search(r"(\d+) packets transmitted, (\d+) received", line):
                    for _ in range(int(m.group(1)) - int(m.group(2))):
                        self.ping.on_failed("lost")
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            line = progress_line(now - self.started, self.conns, self.requests, now)
            print(line, file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chaos.traffic", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server", help="TCP and UDP echo")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--tcp-port", type=int, default=8000)
    s.add_argument("--udp-port", type=int, default=8053)
    c = sub.add_parser("client", help="drive traffic to a server")
    c.add_argument("--server", required=True, help="server IP address")
    c.add_argument("--tcp-port", type=int, default=8000)
    c.add_argument("--udp-port", type=int, default=8053)
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--long-lived", type=int, default=8, help="long-lived connections (K)")
    c.add_argument("--interval", type=float, default=0.001, help="seconds between messages")
    c.add_argument("--rate", type=float, default=20.0, help="new TCP connections per second")
    c.add_argument("--udp-rate", type=float, default=20.0, help="UDP requests per second")
    c.add_argument("--no-ping", dest="ping", action="store_false")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if args.role == "client":
        checks = [
            (0 < args.seconds <= 86400, "--seconds must be in (0, 86400]"),
            (0 <= args.long_lived <= 1000, "--long-lived must be 0..1000"),
            (0.0001 <= args.interval <= 10, "--interval must be 0.0001..10"),
            (0 <= args.rate <= 10000, "--rate must be 0..10000"),
            (0 <= args.udp_rate <= 10000, "--udp-rate must be 0..10000"),
        ]
        for ok, message in checks:
            if not ok:
                p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.role == "server":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.bind, args.tcp_port, args.udp_port))
        return 0
    summary = asyncio.run(Client(args).run())
    print(json.dumps(summary) if args.json else human_summary(summary), flush=True)
    return 0 if summary["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
