"""Run a private single-member etcd for labs and tests.

:class:`LocalEtcd` starts Debian's ``/usr/bin/etcd`` (package ``etcd-server``,
3.4) on loopback with a fresh port pair and a private data directory, waits
until ``/health`` says so (bounded), and stops it by PID, removing the data.

``--heartbeat-interval 50 --election-timeout 500`` matter: etcd refuses
lease TTLs shorter than its minimum (about 1.5 x the election timeout,
rounded up to whole seconds), so with the default 1000 ms election timeout a
1 s lease is silently granted as 2 s.  With 500 ms, 1 s is granted and a
crashed node's record vanishes about 1.5 s after its last keepalive.

Run by hand: ``python -m cluster.etcd_server`` prints the endpoint and runs
until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

from cluster.errors import EtcdUnavailable, Misuse

__all__ = ["ETCD_BINARY", "LocalEtcd", "free_port", "main"]

ETCD_BINARY: Final = "/usr/bin/etcd"
_POLL: Final = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def etcd_health(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether etcd at ``host:port`` says ``{"health": "true"}`` on /health (never raises)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        body = json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return isinstance(body, dict) and body.get("health") == "true"


class LocalEtcd:
    """One etcd member on ``host`` (loopback by default), as a context manager.

    ``client_port``/``peer_port`` 0 pick free ports.  ``data_dir`` None makes
    a temporary directory, removed at :meth:`stop`; a given ``data_dir`` is
    the parent of etcd's own ``<name>.etcd`` directory, and only that is
    removed.  :meth:`kill` (SIGKILL) keeps the data, so :meth:`start` brings
    the same store back.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "stockade-etcd",
        *,
        host: str = "127.0.0.1",
        binary: str = ETCD_BINARY,
        start_timeout: float = 10.0,
    ) -> None:
        if not start_timeout > 0:
            raise Misuse("start_timeout must be > 0")
        self.name = name
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port
        while self.peer_port in (0, self.client_port):
            self.peer_port = free_port(host)
        self._binary = binary
        self._start_timeout = start_timeout
        self._own_parent = data_dir is None
        parent = Path(tempfile.mkdtemp(prefix="stockade-etcd-")) if data_dir is None else data_dir
        self._parent = Path(parent)
        self.data_dir = self._parent / f"{name}.etcd"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client API (what :class:`cluster.etcd.EtcdConfig` takes)."""
        return f"{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        return self._parent / f"{self.name}.log"

    def start(self) -> LocalEtcd:
        """Start etcd and wait until healthy; raise :class:`EtcdUnavailable` if it is not."""
        if self.pid is not None:
            raise Misuse(f"etcd {self.name} already running as pid {self.pid}")
        self._parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise
        return self

    def _command(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            self._binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--initial-cluster-state=new",
            # Short raft timers so that 1 s lease TTLs are granted (see module doc).
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
        ]

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise EtcdUnavailable(self.endpoint, f"etcd exited at start: {self._log_tail()}")
            if self._healthy():
                return
            time.sleep(_POLL)
        raise EtcdUnavailable(self.endpoint, f"not healthy after {self._start_timeout} s")

    def _healthy(self) -> bool:
        return etcd_health(self.host, self.client_port)

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL etcd (a crash); the data stays for a later :meth:`start`."""
        self._signal_and_reap(signal.SIGKILL, timeout=5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; remove the data directory."""
        self._signal_and_reap(signal.SIGTERM, timeout)
        if self._own_parent:
            shutil.rmtree(self._parent, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def _signal_and_reap(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run one etcd until SIGINT/SIGTERM, printing its endpoint."""
    parser = argparse.ArgumentParser(prog="python -m cluster.etcd_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--client-port", type=int, default=0)
    parser.add_argument("--peer-port", type=int, default=0)
    parser.add_argument("--name", default="stockade-etcd")
    parser.add_argument("--data-dir", default=None, help="parent directory (default: temporary)")
    args = parser.parse_args(argv)
    if not os.path.exists(ETCD_BINARY):
        print(f"{ETCD_BINARY} missing: apt-get install etcd-server", file=sys.stderr)
        return 2
    etcd = LocalEtcd(args.data_dir, args.client_port, args.peer_port, args.name, host=args.host)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with etcd:
        print(f"etcd {etcd.name} pid {etcd.pid} at {etcd.endpoint}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
