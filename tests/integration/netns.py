"""Three network namespaces, client -- fw -- server, and small traffic tools.

    client  eth0 10.10.1.2/24 fd00:10:1::2/64
      |
    fw      cl0  10.10.1.1/24 fd00:10:1::1/64   (forwarding on)
            sv0  10.10.2.1/24 fd00:10:2::1/64
      |
    server  eth0 10.10.2.2/24 fd00:10:2::2/64

Names are unique per topology (``stk-<6 hex>-client`` ...), so parallel runs
and leftovers never collide.  :class:`Topology` kills every process it
started (by PID) and deletes its namespaces in ``finally``, even when the
build or the test fails.

Run as a module, this file is also the traffic tool the tests start inside
the namespaces (``python -m tests.integration.netns tcp-echo 10.10.2.2 8080``):
one short, bounded program per job, printing one result line.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIENT4, FW_CLIENT4, FW_SERVER4, SERVER4 = "10.10.1.2", "10.10.1.1", "10.10.2.1", "10.10.2.2"
CLIENT6, FW_CLIENT6 = "fd00:10:1::2", "fd00:10:1::1"
FW_SERVER6, SERVER6 = "fd00:10:2::1", "fd00:10:2::2"
COMMAND_TIMEOUT = 20.0


def _run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=timeout)


def netns_available() -> str | None:
    """None when namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    probe = f"stk-probe-{uuid.uuid4().hex[:6]}"
    try:
        _run(["ip", "netns", "add", probe])
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns add` failed: {e}"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _run(["ip", "netns", "del", probe])
    return None


class Topology:
    """client -- fw -- server namespaces; a context manager that always cleans up."""

    def __init__(self) -> None:
        prefix = f"stk-{uuid.uuid4().hex[:6]}-"
        self.client, self.fw, self.server = (prefix + n for n in ("client", "fw", "server"))
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.client, self.fw, self.server):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            self.ip(ns, "link", "set", "lo", "up")
        # Forwarding before any interface exists: toggling it later
        # re-initialises IPv6 on the interfaces and the first neighbour
        # solicitations are lost (a one-second stall on the first packet).
        self.exec(self.fw, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.exec(self.fw, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        _run(["ip", "link", "add", "eth0", "netns", self.client, "type", "veth",
              "peer", "name", "cl0", "netns", self.fw])  # fmt: skip
        _run(["ip", "link", "add", "eth0", "netns", self.server, "type", "veth",
              "peer", "name", "sv0", "netns", self.fw])  # fmt: skip
        self._address(self.client, "eth0", f"{CLIENT4}/24", f"{CLIENT6}/64")
        self._address(self.fw, "cl0", f"{FW_CLIENT4}/24", f"{FW_CLIENT6}/64")
        self._address(self.fw, "sv0", f"{FW_SERVER4}/24", f"{FW_SERVER6}/64")
        self._address(self.server, "eth0", f"{SERVER4}/24", f"{SERVER6}/64")
        self.ip(self.client, "route", "add", "default", "via", FW_CLIENT4)
        self.ip(self.client, "-6", "route", "add", "default", "via", FW_CLIENT6)
        self.ip(self.server, "route", "add", "default", "via", FW_SERVER4)
        self.ip(self.server, "-6", "route", "add", "default", "via", FW_SERVER6)
        # Usable when the fixture returns: one ping over each link and family
        # (a fresh veth answers its first IPv6 solicitation only after ~1 s).
        for ns, addrs in ((self.client, (FW_CLIENT4, FW_CLIENT6)),
                          (self.server, (FW_SERVER4, FW_SERVER6))):  # fmt: skip
            for addr in addrs:
                self.exec(ns, ["ping", "-c", "1", "-W", "1", "-w", "5", addr])

    def _address(self, ns: str, dev: str, v4: str, v6: str) -> None:
        # The veth was born in the root namespace with its defaults.
        self.exec(ns, ["sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0"])
        self.ip(ns, "addr", "add", v4, "dev", dev)
        self.ip(ns, "-6", "addr", "add", v6, "dev", dev, "nodad")
        self.ip(ns, "link", "set", dev, "up")

    def ip(self, ns: str, *args: str) -> None:
        _run(["ip", "-n", ns, *args])

    def exec(
        self, ns: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``ns`` to completion (output captured as text)."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
            timeout=timeout, check=check, cwd=REPO,
        )  # fmt: skip

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``ns``; it is killed at cleanup if still running."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], text=True, cwd=REPO, **kwargs)
        self._procs.append(proc)
        return proc

    def tool(self, ns: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run one traffic tool job (this module) in ``ns``; return its result line."""
        done = self.exec(ns, [sys.executable, "-m", "tests.integration.netns", *args],
                         timeout=timeout, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"tool {args} failed in {ns}: {done.stderr.strip()}")
        return done.stdout.strip()

    def tool_popen(self, ns: str, *args: str) -> subprocess.Popen[str]:
        """Start one traffic tool job in ``ns`` without waiting for it."""
        return self.popen(ns, [sys.executable, "-m", "tests.integration.netns", *args])

    def server_tool(self, ns: str, *args: str, timeout: float = 10.0) -> subprocess.Popen[str]:
        """Start a listening tool in ``ns`` and wait until it says it listens."""
        proc = self.tool_popen(ns, *args)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if line != "listening":
            proc.kill()
            raise RuntimeError(f"tool {args} did not start in {ns}: {line!r}")
        return proc

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        for ns in reversed(self._created):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run(["ip", "netns", "del", ns])
        self._created.clear()


# Asymmetric pair: client -> server through fw1, server -> client through fw2.
FW1_SYNC4, FW2_SYNC4 = "10.30.0.11", "10.30.0.12"


class AsymTopology(Topology):
    """client, fw1, fw2, server: every flow crosses fw1 one way and fw2 the other.

        client eth1 10.10.1.2 --- cl0 10.10.1.1  fw1  sv0 10.10.2.1 --- eth1 10.10.2.2 server
               eth2 10.10.3.2 --- cl0 10.10.3.1  fw2  sv0 10.10.4.1 --- eth2 10.10.4.2
        fw1 sy0 10.30.0.11 --- fw2 sy0 10.30.0.12   (the syncd network)

    The client routes 10.10.2.0/24 via fw1; the server routes 10.10.1.0/24
    via fw2, which reaches the client's 10.10.1.2 through its eth2 (reverse
    path filtering off everywhere: the client answers from the address on
    its other interface).
    """

    def __init__(self) -> None:
        super().__init__()
        prefix = self.client[: -len("client")]
        self.fw1, self.fw2 = prefix + "fw1", prefix + "fw2"
        self.fw = self.fw1

    def _build(self) -> None:
        for ns in (self.client, self.fw1, self.fw2, self.server):
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            self.ip(ns, "link", "set", "lo", "up")
            for conf in ("all", "default"):
                self.exec(ns, ["sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0"])
        for fw in (self.fw1, self.fw2):
            self.exec(fw, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            # A firewall that sees one direction meets mid-stream TCP; with
            # loose pickup the kernel creates a conntrack entry for it, and two
            # such packets queued to the filter at once clash when the second
            # is confirmed (insert_failed: the kernel drops it).  See
            # docs/asymmetric.md.
            self.exec(fw, ["modprobe", "nf_conntrack"], check=False)
            self.exec(fw, ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"])
        links = (
            (self.client, "eth1", CLIENT4, self.fw1, "cl0", FW_CLIENT4),
            (self.client, "eth2", "10.10.3.2", self.fw2, "cl0", "10.10.3.1"),
            (self.server, "eth1", SERVER4, self.fw1, "sv0", FW_SERVER4),
            (self.server, "eth2", "10.10.4.2", self.fw2, "sv0", "10.10.4.1"),
            (self.fw1, "sy0", FW1_SYNC4, self.fw2, "sy0", FW2_SYNC4),
        )
        for ns_a, dev_a, addr_a, ns_b, dev_b, addr_b in links:
            _run(["ip", "link", "add", dev_a, "netns", ns_a, "type", "veth",
                  "peer", "name", dev_b, "netns", ns_b])  # fmt: skip
            for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
                self.exec(ns, ["sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=0"])
                self.ip(ns, "addr", "add", f"{addr}/24", "dev", dev)
                self.ip(ns, "link", "set", dev, "up")
        self.ip(self.client, "route", "add", "10.10.2.0/24", "via", FW_CLIENT4)
        self.ip(self.server, "route", "add", "10.10.1.0/24", "via", "10.10.4.1")
        self.ip(self.fw2, "route", "add", "10.10.1.0/24", "via", "10.10.3.2")
        self.ip(self.fw2, "route", "add", "10.10.2.0/24", "via", "10.10.4.2")
        for ns, addr in ((self.client, FW_CLIENT4), (self.client, "10.10.3.1"),
                         (self.server, FW_SERVER4), (self.server, "10.10.4.1"),
                         (self.fw1, FW2_SYNC4)):  # fmt: skip
            self.exec(ns, ["ping", "-c", "1", "-W", "1", "-w", "5", addr])


# -- traffic tools (run inside a namespace: python -m tests.integration.netns JOB ...) --


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listening() -> None:
    print("listening", flush=True)


def tcp_echo_server(host: str, port: int) -> None:
    """Echo every connection's bytes back, for ever (killed by the test)."""
    srv = socket.socket(_family(host), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(64)
    _listening()
    conns: list[socket.socket] = []
    while True:
        ready, _, _ = select.select([srv, *conns], [], [])
        for s in ready:
            if s is srv:
                conns.append(srv.accept()[0])
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data:
                s.sendall(data)
            else:
                conns.remove(s)
                s.close()


def tcp_send_server(host: str, port: int, nbytes: int) -> None:
    """Send ``nbytes`` to each connection, then close it."""
    srv = socket.socket(_family(host), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(8)
    _listening()
    chunk = b"x" * 65536
    while True:
        conn, _ = srv.accept()
        left = nbytes
        while left > 0:
            left -= conn.send(chunk[: min(left, len(chunk))])
        conn.close()


def tcp_connect(host: str, port: int, timeout: float) -> str:
    """``ok <echo>`` / ``refused`` / ``timeout`` for one connect + echo of b"ping"."""
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    start = time.monotonic()
    try:
        s.connect((host, port))
        s.sendall(b"ping")
        reply = s.recv(64)
    except ConnectionRefusedError:
        return f"refused {time.monotonic() - start:.3f}"
    except TimeoutError:
        return "timeout"
    finally:
        s.close()
    return f"ok {reply.decode()}"


def tcp_receive(host: str, port: int, timeout: float) -> str:
    """Connect and count bytes until the server closes: ``bytes <n> <seconds>``."""
    s = socket.create_connection((host, port), timeout=timeout)
    start, total = time.monotonic(), 0
    while chunk := s.recv(1 << 20):
        total += len(chunk)
    s.close()
    return f"bytes {total} {time.monotonic() - start:.3f}"


def tcp_hold(
    host: str, port: int, count: int, rounds: int, pause: float, timeout: float = 3.0
) -> str:
    """Open ``count`` echo connections, then echo on each ``rounds`` times.

    Prints ``open <n>`` after connecting; a test may act meanwhile (it reads
    that line).  The final line is ``echoed <successful echoes>``.  ``timeout``
    bounds each echo after the first (a test that stops a node lets TCP
    retransmit through the gap).
    """
    conns = [socket.create_connection((host, port), timeout=3) for _ in range(count)]
    for c in conns:
        c.sendall(b"a")
        c.recv(16)
        c.settimeout(timeout)
    print(f"open {len(conns)}", flush=True)
    ok = 0
    for _ in range(rounds):
        time.sleep(pause)
        for c in conns:
            try:
                c.sendall(b"b")
                if c.recv(16):
                    ok += 1
            except OSError:
                pass
    return f"echoed {ok}"


def tcp_many(host: str, port: int, count: int, timeout: float) -> str:
    """``count`` connections one after another: connect, echo 1000 bytes, close.

    ``ok <n> failed <m> <seconds>``.
    """
    ok = failed = 0
    payload = b"x" * 1000
    start = time.monotonic()
    for _ in range(count):
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                s.shutdown(socket.SHUT_WR)
                s.recv(16)  # the server's FIN
            ok += got == payload
            failed += got != payload
        except OSError:
            failed += 1
    return f"ok {ok} failed {failed} {time.monotonic() - start:.3f}"


def udp_echo_server(host: str, port: int) -> None:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, port))
    _listening()
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)


def udp_sink(host: str, port: int, timeout: float) -> str:
    """Wait for one datagram: ``got <data>`` or ``nothing``."""
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, port))
    s.settimeout(timeout)
    _listening()
    try:
        data, _ = s.recvfrom(2048)
    except TimeoutError:
        return "nothing"
    return f"got {data.decode()}"


def udp_request(host: str, port: int, timeout: float, sport: int = 0, size: int = 4) -> str:
    """Send b"ping" (padded to ``size`` bytes) and wait for the answer.

    ``ok ping`` (``ok ping <n>`` when padded: n bytes came back) or ``timeout``.
    A ``size`` beyond the MTU is sent as IP fragments.
    """
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind(("::" if ":" in host else "0.0.0.0", sport))
    s.settimeout(timeout)
    s.sendto(b"ping".ljust(size, b"."), (host, port))
    try:
        data, _ = s.recvfrom(65536)
    except TimeoutError:
        return "timeout"
    return f"ok {data[:4].decode()}" + (f" {len(data)}" if size > 4 else "")


def udp_send(host: str, port: int, sport: int) -> str:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind(("::" if ":" in host else "0.0.0.0", sport))
    s.sendto(b"unsolicited", (host, port))
    return "sent"


def _main(argv: list[str]) -> int:
    job, args = argv[0], argv[1:]
    host, port = args[0], int(args[1])
    rest = [float(a) for a in args[2:]]
    jobs: dict[str, Any] = {
        "tcp-echo": lambda: tcp_echo_server(host, port),
        "tcp-send": lambda: tcp_send_server(host, port, int(rest[0])),
        "tcp-connect": lambda: tcp_connect(host, port, rest[0]),
        "tcp-receive": lambda: tcp_receive(host, port, rest[0]),
        "tcp-hold": lambda: tcp_hold(host, port, int(rest[0]), int(rest[1]), *rest[2:]),
        "tcp-many": lambda: tcp_many(host, port, int(rest[0]), rest[1]),
        "udp-echo": lambda: udp_echo_server(host, port),
        "udp-sink": lambda: udp_sink(host, port, rest[0]),
        "udp-request": lambda: udp_request(host, port, rest[0], *(int(r) for r in rest[1:])),
        "udp-send": lambda: udp_send(host, port, int(rest[0])),
    }
    print(jobs[job](), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
