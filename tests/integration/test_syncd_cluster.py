"""Three real syncd processes on 127.0.0.1 with mTLS from ``stockade certs init``.

A scripted filter (:class:`Filter`, test code) talks ``local.proto`` to each
node's local socket and injects creates, updates and deletes; each node's
control socket (``digest``, ``flows``, ``stats``) shows whether every store
converged to the union.  No root, namespaces or traffic beyond loopback; the
``integration`` marker is there because real daemons run.

The harness (:class:`Daemon`, :class:`Filter`, :class:`Cluster`) is also used
by ``test_syncd_security.py``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from node.control import request
from syncd._pb.stockade.sync.v1 import local_pb2 as lpb
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.certs import init_certs
from syncd.local import FrameDecoder, encode_frame
from syncd.records import FlowRecord, record_from_pb, record_to_pb
from tests.syncd_link import make_record

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = "itest"
READY_TIMEOUT = 20.0
# Fast liveness so a frozen peer is noticed quickly; the rest are defaults.
SESSION = {"heartbeat_interval": 0.05, "suspect_after": 0.15, "dead_after": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


class Daemon:
    """One syncd process, its files under ``workdir/<node_id>``."""

    def __init__(
        self, workdir: str, node_id: str, port: int, peers: dict[str, int], certdir: str,
        extra: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.node_id = node_id
        self.port = port
        self.dir = os.path.join(workdir, node_id)
        os.makedirs(self.dir, exist_ok=True)
        self.control = os.path.join(self.dir, "ctl.sock")
        self.local = os.path.join(self.dir, "local.sock")
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        config = {
            "node_id": node_id, "cluster_id": CLUSTER, "listen": f"127.0.0.1:{port}",
            "peers": [{"node_id": p, "address": f"127.0.0.1:{pp}"} for p, pp in peers.items()],
            "state_dir": "state", "local_socket": "local.sock", "control_socket": "ctl.sock",
            "tls": {"ca": f"{certdir}/ca.pem", "cert": f"{certdir}/{node_id}.pem",
                    "key": f"{certdir}/{node_id}.key"},
            "session": SESSION, "recovery_timeout": 2.0, **(extra or {}),
        }  # fmt: skip
        self.config_path = os.path.join(self.dir, "syncd.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Daemon:
        argv = [sys.executable, "-m", "syncd.cli", "syncd", "run", "--config", self.config_path]
        with open(self.stderr_path, "a", encoding="utf-8") as err:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith(f"stockade syncd {self.node_id} ready"):
                    return self
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"{self.node_id} did not become ready:\n{self.stderr()}")

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8") as f:
            return f.read()

    def query(self, cmd: str, **args: Any) -> dict[str, Any]:
        return request(self.control, {"cmd": cmd, **args}, timeout=10.0)

    def stats(self) -> dict[str, Any]:
        return self.query("stats")

    def digest(self) -> dict[str, Any]:
        origins: dict[str, Any] = self.query("digest")["origins"]
        return origins

    def keys(self, origin: str) -> set[str]:
        reply = self.query("flows", origin=origin, limit=10_000_000)
        return {f["key"] for f in reply["flows"]}

    def flows(self) -> set[tuple[str, str, int, str]]:
        reply = self.query("flows", limit=10_000_000)
        return {(f["key"], f["origin"], f["version"], f["state"]) for f in reply["flows"]}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=10)
        self._release()

    def _release(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9
        self._release()
        return code


class Filter:
    """A scripted filter on one node's local socket (test code, not the product's)."""

    def __init__(self, path: str, node_id: str, epoch: int = 1) -> None:
        self.node_id = node_id
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._decoder = FrameDecoder()
        self._cond = threading.Condition()
        self.frames: list[lpb.LocalFrame] = []
        self.updates: list[tuple[float, lpb.ReplicaUpdate]] = []  # (arrival time, update)
        self.eof = False
        self._send(lpb.LocalFrame(hello=lpb.LocalHello(
            protocol=1, node_id=node_id, role="filter", epoch=epoch)))  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _send(self, frame: lpb.LocalFrame) -> None:
        self.sock.sendall(encode_frame(frame))

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            now = time.monotonic()
            with self._cond:
                if not data:
                    self.eof = True
                    self._cond.notify_all()
                    return
                for frame in self._decoder.feed(data):
                    if frame.WhichOneof("body") == "replicas":
                        self.updates += [(now, u) for u in frame.replicas.updates]
                    else:
                        self.frames.append(frame)
                self._cond.notify_all()

    def send(self, changes: list[tuple[int, FlowRecord]]) -> None:
        """Send (op, record) pairs as one LocalBatch; op is pb.OP_*."""
        deltas = [lpb.LocalDelta(op=op, record=record_to_pb(r)) for op, r in changes]  # type: ignore[arg-type]
        self._send(lpb.LocalFrame(local=lpb.LocalBatch(deltas=deltas)))

    def table(self, request_id: int = 1, timeout: float = 20.0) -> list[FlowRecord]:
        self._send(lpb.LocalFrame(table_request=lpb.TableRequest(request_id=request_id)))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                chunks = [
                    f.table_chunk for f in self.frames
                    if f.WhichOneof("body") == "table_chunk"
                    and f.table_chunk.request_id == request_id
                ]  # fmt: skip
                if chunks and chunks[-1].last:
                    return [record_from_pb(r) for c in chunks for r in c.records]
                if self.eof or not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError("no complete table")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
        self._reader.join(timeout=5)
        self.sock.close()


def record(node: str, i: int, version: int = 1, state: str = "ESTABLISHED") -> FlowRecord:
    return make_record(f"{node}-{i:07d}".encode(), node, version, state)


class Cluster:
    """Nodes fw1..fwN with certificates for them and for a non-member, fw9."""

    def __init__(self, ids: list[str], extra: dict[str, Any] | None = None) -> None:
        self.workdir = tempfile.mkdtemp(prefix="stk-sy-")  # short: unix socket paths
        self.certdir = os.path.join(self.workdir, "certs")
        init_certs(self.certdir, CLUSTER, [*ids, "fw9"])
        ports = {n: free_port() for n in ids}
        self.nodes = {
            n: Daemon(self.workdir, n, ports[n], {p: ports[p] for p in ids if p != n},
                      self.certdir, extra)
            for n in ids
        }  # fmt: skip
        self.filters: list[Filter] = []
        # What each origin's filter holds now: origin -> keys (hex, as `flows` shows them).
        self.expected: dict[str, set[str]] = {n: set() for n in ids}

    def __getitem__(self, node_id: str) -> Daemon:
        return self.nodes[node_id]

    def start(self) -> Cluster:
        for daemon in self.nodes.values():
            daemon.start()
        return self

    def filter(self, node_id: str) -> Filter:
        f = Filter(self.nodes[node_id].local, node_id)
        self.filters.append(f)
        return f

    def create(self, f: Filter, indices: range) -> None:
        f.send([(pb.OP_CREATE, record(f.node_id, i)) for i in indices])
        self.expected[f.node_id] |= {record(f.node_id, i).key.hex() for i in indices}

    def delete(self, f: Filter, indices: range) -> None:
        f.send([(pb.OP_DELETE, record(f.node_id, i, state="CLOSE")) for i in indices])
        self.expected[f.node_id] -= {record(f.node_id, i).key.hex() for i in indices}

    def converged(self, nodes: list[str] | None = None) -> bool:
        """Every (live) node holds exactly the expected flows of every origin."""
        names = nodes or list(self.nodes)
        digests = [self.nodes[n].digest() for n in names]
        counts = {o: len(keys) for o, keys in self.expected.items() if keys}
        return all({o: d["count"] for o, d in dg.items()} == counts for dg in digests) and all(
            dg == digests[0] for dg in digests
        )

    def assert_same_content(self) -> None:
        contents = {n: d.flows() for n, d in self.nodes.items()}
        first = next(iter(contents.values()))
        for name, content in contents.items():
            assert content == first, f"{name} differs"
        for origin, keys in self.expected.items():
            assert {k for k, o, _, _ in first if o == origin} == keys

    def close(self) -> None:
        for f in self.filters:
            f.close()
        for daemon in self.nodes.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{d.stderr()[-4000:]}" for n, d in self.nodes.items())


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(["fw1", "fw2", "fw3"])
    try:
        yield c.start()
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def test_changes_at_every_node_reach_every_other_node(cluster: Cluster) -> None:
    filters = {n: cluster.filter(n) for n in ("fw1", "fw2", "fw3")}
    for f in filters.values():
        cluster.create(f, range(300))
    wait_for(cluster.converged, 15, "creates converge")
    for f in filters.values():
        f.send([(pb.OP_UPDATE, record(f.node_id, i, state="FIN_WAIT")) for i in range(10)])
        cluster.delete(f, range(250, 300))
    wait_for(cluster.converged, 15, "updates and deletes converge")
    cluster.assert_same_content()
    states = {(k, s) for k, o, _, s in cluster["fw3"].flows() if o == "fw1"}
    assert (record("fw1", 0).key.hex(), "FIN_WAIT") in states
    # Each filter was told about the other origins' flows, deletes included.
    ups = filters["fw1"].updates
    assert {u.record.origin for _, u in ups} == {"fw2", "fw3"}
    assert any(u.op == pb.OP_DELETE for _, u in ups)
    stats = cluster["fw2"].stats()
    assert stats["status"] == "ready"
    assert {p: s["state"] for p, s in stats["peers"].items()} == {"fw1": "live", "fw3": "live"}
    assert stats["service"]["refused"] == {}
    assert sum(s["peer_errors"].get("bad-record", 0) for s in stats["peers"].values()) == 0
    # Signed UDP beacons flow beside the streams (every 10 ms, key from certs init).
    beacons = stats["beacons"]
    assert beacons["running"] and beacons["sent"] > 50
    heard = {p: b["received"] for p, b in beacons["beacons"]["peers"].items()}
    assert set(heard) == {"fw1", "fw3"} and min(heard.values()) > 50, heard
    # Nothing refused as forged or malformed.  A beacon that arrives before the
    # receiver's peer set is configured (start-up, a loaded machine) is
    # counted unknown_peer: that is not an attack.
    refused = {k: v for k, v in beacons["beacons"]["dropped"].items() if k != "unknown_peer"}
    assert not any(refused.values()), beacons


def test_kill_and_restart_mid_stream_converges(cluster: Cluster) -> None:
    f1, f2, f3 = (cluster.filter(n) for n in ("fw1", "fw2", "fw3"))
    for f in (f1, f2, f3):
        cluster.create(f, range(500))
    wait_for(cluster.converged, 15, "initial convergence")
    epoch = cluster["fw2"].stats()["origin"]["epoch"]
    stop = threading.Event()

    def inject() -> None:  # fw1's filter keeps creating while fw2 dies and returns
        i = 1000
        while not stop.is_set():
            cluster.create(f1, range(i, i + 20))
            i += 20
            time.sleep(0.01)

    injector = threading.Thread(target=inject)
    injector.start()
    try:
        time.sleep(0.3)
        cluster["fw2"].kill()
        f2.close()
        time.sleep(0.5)
        cluster["fw2"].start()
        time.sleep(0.5)
    finally:
        stop.set()
        injector.join()
    cluster.delete(f3, range(0, 100))
    took = wait_for(cluster.converged, 20, "convergence after kill -9 and restart")
    cluster.assert_same_content()
    stats = cluster["fw2"].stats()
    assert stats["origin"]["epoch"] == epoch + 1
    assert stats["origin"]["recovered"] == 500  # its own flows came back from its peers
    peers_of_fw1 = cluster["fw1"].stats()["peers"]["fw2"]
    assert peers_of_fw1["inbox"]["epoch"] == epoch + 1 and peers_of_fw1["resyncs"] >= 2
    # A filter (re)starting on fw2 gets the whole table, its own flows included.
    table = cluster.filter("fw2").table()
    assert {r.key.hex() for r in table} == set().union(*cluster.expected.values())
    print(f"converged {took:.2f} s after the restart")


def _beacons_from(cluster: Cluster, node: str, peer: str) -> int:
    return int(cluster[node].stats()["beacons"]["beacons"]["peers"][peer]["received"])


def test_frozen_peer_is_suspected_then_catches_up(cluster: Cluster) -> None:
    f1, f2, f3 = (cluster.filter(n) for n in ("fw1", "fw2", "fw3"))
    cluster.create(f3, range(100))
    wait_for(cluster.converged, 15, "initial convergence")
    cluster["fw3"].signal(signal.SIGSTOP)
    try:
        for i in range(10):
            cluster.create(f1, range(i * 100, i * 100 + 100))
            cluster.create(f2, range(i * 100, i * 100 + 100))
            time.sleep(0.1)
        wait_for(
            lambda: cluster["fw1"].stats()["peers"]["fw3"]["state"] != "live",
            5, "fw1 notices fw3 is frozen",
        )  # fmt: skip
        frozen_count = _beacons_from(cluster, "fw1", "fw3")
        wait_for(lambda: cluster.converged(["fw1", "fw2"]), 10, "the others still converge")
        time.sleep(1.2)  # beyond dead_after: the streams to fw3 close and are redialed
        assert _beacons_from(cluster, "fw1", "fw3") == frozen_count  # a frozen node is silent
    finally:
        cluster["fw3"].signal(signal.SIGCONT)
    wait_for(lambda: _beacons_from(cluster, "fw1", "fw3") > frozen_count, 5, "fw3's beacons resume")
    wait_for(cluster.converged, 20, "fw3 catches up after SIGCONT")
    cluster.assert_same_content()
    peer = cluster["fw1"].stats()["peers"]["fw3"]
    assert peer["session"]["suspicions"] >= 1
    assert peer["state"] == "live"
