"""The network-namespace side of the data-plane benchmark (an adapter: runs processes).

One lab, ``client -- fw -- server`` (:func:`chaos.lab.netns.one_node_topology`),
holds every system measured, one after another, so they meet the same
kernel, the same veths and the same traffic generator:

* ``none``: plain kernel forwarding, no rule in ``fw``;
* ``bare``: :func:`bare_accept_loop`, the simplest possible NFQUEUE reader
  (accept every packet, no parsing), behind one rule
  ``-I FORWARD 1 -j NFQUEUE --queue-num BARE_QUEUE``;
* ``node``: ``stockade node run`` with a small accept rules file, with or
  without the fast path.

Traffic is iperf3: ``iperf3 -s`` in ``server``, ``iperf3 -c ... -J`` in
``client``.  For UDP the server does not read the datagrams: a counting
DROP rule in ``server``'s INPUT (tagged ``SINK_COMMENT``, matching only the
test's 92-byte data packets, so iperf3's own UDP handshake still passes)
takes them in the kernel.  A userspace receiver would need a third CPU the
machine does not have, and its count misses losses at the end of a step.
Per UDP step we read: the sink's counter (received), the queue's counters
in ``/proc/net/netfilter/nfnetlink_queue`` inside ``fw`` (queued, dropped)
and the firewall process's CPU time (``/proc/PID/task/*/schedstat``).

With ``pin`` (2+ CPUs) the two cores play two machines: CPU 1 is the
firewall box, CPU 0 the hosts around it.  The firewall process is pinned to
CPU 1 and receive packet steering (RPS) puts the kernel's work for packets
arriving on ``fw``'s interfaces (routing, netfilter, the queue) there too;
the iperf3 processes and the client's kernel work stay on CPU 0.  Without
steering the sender's core also runs the firewall's forwarding path up to
the queue, and the generator, not the firewall, sets the loss-free rate.
The server's receive path is left where the forwarded packet lands (CPU 1):
steered to CPU 0 it starves the sender (measured: the ceiling halved, with
loss); for UDP it is only the sink's drop, the same small cost for every
system measured.

Every process is started through the lab and ended by PID; the bare loop's
rule is removed in ``finally``; after a node stops, ``fw``'s FORWARD chain
must be empty again or the benchmark stops (a stale chain would silently
falsify the next measurement).  ``down`` removes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from chaos.errors import LabError
from chaos.lab.netns import NetnsLab, one_node_topology
from node.bench_calc import (
    BenchError,
    QueueCounters,
    TcpRun,
    UdpRun,
    loss_fraction,
    parse_iperf_tcp,
    parse_iperf_udp,
    parse_nfqueue_proc,
    parse_rule_packets,
    parse_schedstat,
    queue_delta,
)

CLIENT: Final = "client"
FW: Final = "fw"
SERVER: Final = "server"
SERVER_ADDR: Final = "10.10.2.2"
BARE_QUEUE: Final = 7
NODE_QUEUE: Final = 8
NODE_ID: Final = "bench"
# Same queue length as the node's default (QueueConfig.max_len), and the
# same socket budget node.nfq gives it, so the baseline is not handicapped.
QUEUE_MAX_LEN: Final = 4096
SOCK_BYTES_PER_PACKET: Final = 4796
UDP_PAYLOAD: Final = 64  # bytes of UDP payload: a 92-byte IPv4 packet
UDP_PACKET: Final = 20 + 8 + UDP_PAYLOAD
IPERF_PORT: Final = 5201
SINK_COMMENT: Final = "stockade-bench-sink"
SOCKET_BUFFER: Final = "4M"  # iperf3 -w: the sender never stalls on its own socket
MIN_STEP_PACKETS: Final = 1000
IPERF_RETRIES: Final = 5  # the server refuses a test while the previous one winds down
START_TIMEOUT: Final = 30.0
# (host, interface, CPU) receive steering with ``pin``: CPU 1 is the firewall.
STEERING: Final = (("fw", "inside", 1), ("fw", "outside", 1), ("client", "eth0", 0))
# iperf3 errors worth another try: the server still winding down the last test.
_RETRY_ON: Final = ("busy", "unable to connect", "unable to receive", "unable to send")
PROC_QUEUES: Final = "/proc/net/netfilter/nfnetlink_queue"
REPO_ROOT: Final = str(Path(__file__).resolve().parents[1])

BENCH_NODE_RULES: Final = """\
default: drop
rules:
  - name: lab-tcp
    proto: tcp
    from: 10.10.1.0/24
    to: 10.10.2.0/24
    action: accept
  - name: lab-udp
    proto: udp
    from: 10.10.1.0/24
    to: 10.10.2.0/24
    action: accept
  - name: lab-ping
    proto: icmp
    from: 10.10.1.0/24
    action: accept
"""

NODE_CONFIG: Final = f"""\
node_id: {NODE_ID}
rules: rules.yaml
queue: {{num: {NODE_QUEUE}, max_len: {QUEUE_MAX_LEN}}}
control_socket: control.sock
"""


def _accept(packet: Any) -> None:
    packet.accept()


def bare_accept_loop(queue_num: int, max_len: int = QUEUE_MAX_LEN) -> None:
    """Accept every packet of ``queue_num`` until killed: the baseline reader.

    Blocking ``run()``: one recv and one verdict per packet, no parsing --
    the least any Python NFQUEUE filter can do.
    """
    from netfilterqueue import NetfilterQueue

    nfq = NetfilterQueue()
    nfq.bind(queue_num, _accept, max_len=max_len, sock_len=max_len * SOCK_BYTES_PER_PACKET // 2)
    print("ready", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()


@dataclass(frozen=True, slots=True)
class UdpStep:
    run: UdpRun  # what the client sent
    received: int  # packets that reached the server's sink
    queued: int | None  # packets the kernel queued to userspace (None: no firewall)
    queue_drops: int  # packets the kernel dropped at the queue
    cpu_ns: int | None  # CPU time of the firewall process during the step

    @property
    def loss(self) -> float:
        return loss_fraction(self.run.sent_packets, self.received, self.queue_drops)


@dataclass(frozen=True, slots=True)
class Firewall:
    """A running firewall process in ``fw`` (bare loop or node)."""

    name: str
    proc: subprocess.Popen[bytes]
    queue: int  # the NFQUEUE number it reads
    log_path: Path
    control_socket: str | None = None  # nodes only


class BenchLab:
    """The benchmark's lab: up, systems one at a time, down."""

    def __init__(self, prefix: str, workdir: Path, *, pin: bool) -> None:
        self.lab = NetnsLab(one_node_topology(), prefix)
        self.workdir = workdir
        self.pin = pin and (os.cpu_count() or 1) >= 2
        self._iperf_server: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------

    def up(self) -> None:
        with _lab_errors():
            self.lab.up()
            self.lab.run(SERVER, ["iptables", "-w", "-A", "INPUT", *self._sink_match()])
            if self.pin:
                for host, ifname, cpu in STEERING:
                    self._steer(host, ifname, cpu)
        self._start_iperf_server()

    def _steer(self, host: str, ifname: str, cpu: int) -> None:
        """Process packets received on ``ifname`` on ``cpu`` (RPS, one rx queue on veth)."""
        path = f"/sys/class/net/{ifname}/queues/rx-0/rps_cpus"
        self.lab.run(host, ["sh", "-c", f"echo {1 << cpu:x} > {path}"])

    @staticmethod
    def _sink_match() -> list[str]:
        return [
            "-p",
            "udp",
            "--dport",
            str(IPERF_PORT),
            "-m",
            "length",
            "--length",
            str(UDP_PACKET),
            "-m",
            "comment",
            "--comment",
            SINK_COMMENT,
            "-j",
            "DROP",
        ]

    def down(self) -> None:
        with _lab_errors():
            self.lab.down()

    def _cpu(self, n: int) -> list[str]:
        return ["taskset", "-c", str(n)] if self.pin else []

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
        return env

    def _start_iperf_server(self) -> None:
        if self._iperf_server is not None:
            self.lab.stop(self._iperf_server)
        argv = [*self._cpu(0), "iperf3", "-s", "-B", SERVER_ADDR]
        with _lab_errors():
            self._iperf_server = self.lab.popen(
                SERVER, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with _lab_errors():
                listening = self.lab.run(SERVER, ["ss", "-Hltn", "sport", "=", f":{IPERF_PORT}"])
            if listening.strip():
                return
            if self._iperf_server.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError("iperf3 server did not start in the server namespace")

    # -- traffic -------------------------------------------------------------

    def _iperf(self, args: Sequence[str], timeout: float) -> str:
        argv = [*self._cpu(0), "iperf3", "-c", SERVER_ADDR, "-J", "--connect-timeout", "3000"]
        last = ""
        for attempt in range(IPERF_RETRIES):
            with _lab_errors():
                out = self.lab.run(CLIENT, [*argv, *args], check=False, timeout=timeout)
            error = _iperf_error(out)
            if error is None or not any(word in error for word in _RETRY_ON):
                return out
            last = out
            time.sleep(0.5 * (attempt + 1))
            if attempt == IPERF_RETRIES // 2:
                self._start_iperf_server()
        return last  # the parser turns iperf3's own error message into a BenchError

    def _queues(self) -> dict[int, QueueCounters]:
        with _lab_errors():
            return parse_nfqueue_proc(self.lab.run(FW, ["cat", PROC_QUEUES]))

    def _sink_packets(self) -> int:
        with _lab_errors():
            listing = self.lab.run(SERVER, ["iptables", "-w", "-x", "-v", "-n", "-L", "INPUT"])
        return parse_rule_packets(listing, SINK_COMMENT)

    def udp_step(
        self, target_pps: float, seconds: float, fw: Firewall | None, *, timed: bool = False
    ) -> UdpStep:
        """Send 64-byte datagrams at ``target_pps`` for about ``seconds``.

        ``timed``: a duration (whole seconds) instead of a packet count --
        for the ceiling probe, whose target the generator never reaches.
        """
        bits = max(1, round(target_pps * UDP_PAYLOAD * 8))
        args = ["-u", "-l", str(UDP_PAYLOAD), "-w", SOCKET_BUFFER, "-b", str(bits)]
        if timed:
            args += ["-t", str(max(1, round(seconds)))]
        else:
            args += ["-k", str(max(MIN_STEP_PACKETS, round(target_pps * seconds)))]
        sink0 = self._sink_packets()
        queues0 = self._queues() if fw else {}
        cpu0 = cpu_time_ns(fw.proc.pid) if fw else 0
        out = self._iperf(args, timeout=4 * seconds + 20)
        cpu1 = cpu_time_ns(fw.proc.pid) if fw else 0
        queues1 = self._queues() if fw else {}
        sink1 = self._sink_packets()
        run = parse_iperf_udp(out)
        queued, drops = queue_delta(queues0, queues1, fw.queue) if fw else (None, 0)
        time.sleep(0.2)  # let the queue drain before the next step
        return UdpStep(run, sink1 - sink0, queued, drops, cpu1 - cpu0 if fw else None)

    def tcp_run(self, seconds: int, omit: int) -> TcpRun:
        """One bulk TCP transfer client -> server; goodput as the server saw it."""
        args = ["-t", str(seconds), "-O", str(omit)]
        return parse_iperf_tcp(self._iperf(args, timeout=3 * (seconds + omit) + 20))

    # -- systems -------------------------------------------------------------

    @contextlib.contextmanager
    def bare_loop(self) -> Iterator[Firewall]:
        """Run :func:`bare_accept_loop` behind its FORWARD rule."""
        log_path = self.workdir / "bare.log"
        code = f"from node.bench_lab import bare_accept_loop; bare_accept_loop({BARE_QUEUE})"
        rule = ["FORWARD", "-j", "NFQUEUE", "--queue-num", str(BARE_QUEUE)]
        with open(log_path, "wb") as log, _lab_errors():
            proc = self.lab.popen(
                FW,
                [*self._cpu(1), sys.executable, "-c", code],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
            )
        inserted = False
        try:
            self._wait_ready(proc, log_path, b"ready", "bare NFQUEUE loop")
            with _lab_errors():
                self.lab.run(FW, ["iptables", "-w", "-I", *rule[:1], "1", *rule[1:]])
            inserted = True
            yield Firewall("bare loop", proc, BARE_QUEUE, log_path)
        finally:
            try:
                if inserted:
                    with _lab_errors():
                        self.lab.run(FW, ["iptables", "-w", "-D", *rule])
            finally:
                self.lab.stop(proc)
        self._check_clean("bare loop")

    @contextlib.contextmanager
    def node(self, fast_path: bool) -> Iterator[Firewall]:
        """Run ``stockade node run`` in ``fw``; yields when it printed ready."""
        run_dir = self.workdir / ("node-fast" if fast_path else "node-slow")
        run_dir.mkdir(exist_ok=True)
        (run_dir / "rules.yaml").write_text(BENCH_NODE_RULES)
        (run_dir / "node.yaml").write_text(NODE_CONFIG)
        log_path = run_dir / "node.log"
        argv = [*self._cpu(1), sys.executable, "-m", "node.cli", "node", "run"]
        argv += ["--config", str(run_dir / "node.yaml")]
        argv += [] if fast_path else ["--no-fast-path"]
        with open(log_path, "wb") as log, _lab_errors():
            proc = self.lab.popen(FW, argv, stdout=log, stderr=subprocess.STDOUT, env=self._env())
        try:
            self._wait_ready(proc, log_path, f"stockade node {NODE_ID} ready".encode(), "node")
            control = str(run_dir / "control.sock")
            yield Firewall("node", proc, NODE_QUEUE, log_path, control)
        finally:
            code = self.lab.stop(proc, timeout=10.0)
        if code not in (0, None):
            raise BenchError(f"node exited with {code}; log {log_path}:\n{_tail(log_path)}")
        self._check_clean("node")

    def node_stats(self, node: Firewall) -> dict[str, Any]:
        from node.control import request

        if node.control_socket is None:
            raise BenchError(f"{node.name} has no control socket")
        return request(node.control_socket, {"cmd": "stats"}, timeout=5.0)

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], log_path: Path, marker: bytes, what: str
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if marker in log_path.read_bytes():
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(f"{what} did not start; log {log_path}:\n{_tail(log_path)}")

    def _check_clean(self, after: str) -> None:
        """No rule left in fw's filter table: the next system starts from scratch."""
        with _lab_errors():
            rules = self.lab.run(FW, ["iptables", "-w", "-S"]).splitlines()
        left = [r for r in rules if not r.startswith("-P ")]
        if left:
            raise BenchError(f"iptables rules left in fw after the {after} stopped: {left}")


def cpu_time_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds (scheduler clock)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError as e:
        raise BenchError(f"firewall process {pid} is gone: {e.strerror}") from e
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += parse_schedstat(f.read())
        except FileNotFoundError:
            continue  # a thread that ended between listdir and open
    return total


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as e:
        return f"(cannot read: {e})"


@contextlib.contextmanager
def _lab_errors() -> Iterator[None]:
    """The lab's errors, translated once into the node package's."""
    try:
        yield
    except LabError as e:
        raise BenchError(str(e)) from e


def _iperf_error(text: str) -> str | None:
    """iperf3's own error message from its JSON output, if any."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return str(error) if error else None
