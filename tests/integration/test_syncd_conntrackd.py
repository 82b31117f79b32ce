"""The baseline of issue #3: conntrackd (FTFW over UDP) create -> visible on the peer.

Two network namespaces joined by a veth pair, conntrackd in each (FTFW,
unicast UDP over the veth, ``DisableExternalCache On``: received entries go
straight into the kernel table, as Stockade's replicas go into the filter's).
A paced sender in namespace A opens one UDP flow per datagram (a new
destination port each time, towards an address whose static neighbour entry
leads nowhere: the peer's kernel drops the frame before conntrack, so only
conntrackd can make the entry appear there).  ``conntrack -E -e NEW -o
timestamp`` runs in both namespaces (A's shows every flow was created); a
flow's latency is the time its NEW event was read in B minus the time just
before the datagram that created it was sent (both the host's clock), as
syncd's figure runs from the filter's send to the peer filter's receipt.

Run beside syncd's figure at the same rate::

    .venv/bin/python -m tests.integration.test_syncd_bench --baseline conntrackd \\
        --rate 1000 --seconds 5

or alone: ``.venv/bin/python -m tests.integration.test_syncd_conntrackd --rate 1000``.
Needs root, ``conntrackd`` and ``conntrack`` (Debian conntrackd and conntrack).
Namespaces are named ``h2ct-<6 hex>-a/b`` and removed, and every process
started killed by PID, in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SYNC_A, SYNC_B = "10.77.0.1", "10.77.0.2"  # the veth, carries conntrackd's sync
FLOW_SRC = "10.88.0.1"  # flows come from here (the sync addresses are ignored)
SINK = "10.77.0.99"  # static neighbour: frames leave A and are dropped by B's NIC
SINK_MAC = "02:00:00:00:00:99"
PORT = 3780
_EVENT = re.compile(r"^\[(\d+\.\d+)\]\s+\[NEW\] udp .*?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")

SENDER = """
import socket, sys, time
rate, count, sport = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({src!r}, sport))
sent = []
start = time.monotonic()
for i in range(count):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    sent.append(time.time())
    s.sendto(b"x", ({sink!r}, 20000 + i))
print("\\n".join(f"{{20000 + i}} {{t:.6f}}" for i, t in enumerate(sent)))
"""


def _conf(workdir: Path, side: str, me: str, peer: str, ifname: str) -> str:
    return f"""Sync {{
    Mode FTFW {{
        DisableExternalCache On
    }}
    UDP {{
        IPv4_address {me}
        IPv4_Destination_Address {peer}
        Port {PORT}
        Interface {ifname}
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }}
}}
General {{
    HashSize 32768
    HashLimit 131072
    Syslog off
    LogFile {workdir}/{side}.log
    LockFile {workdir}/{side}.lock
    UNIX {{
        Path {workdir}/{side}.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    Filter From Userspace {{
        Protocol Accept {{
            UDP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address {SYNC_A}
            IPv4_address {SYNC_B}
        }}
    }}
}}
"""


def available() -> str | None:
    """None when the baseline can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (namespaces)"
    for tool in ("conntrackd", "conntrack", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install conntrackd conntrack)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


class ConntrackdPair:
    """Two namespaces with conntrackd each; see the module docstring."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = (f"h2ct-{tag}-a", f"h2ct-{tag}-b")
        self.ifs = (f"h2c{tag}a", f"h2c{tag}b")
        self.workdir = Path(tempfile.mkdtemp(prefix="h2ct-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._sport = 40000

    def exec(self, side: int, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def start(self) -> None:
        a = self.ns[0]
        for ns in self.ns:
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", self.ifs[0], "type", "veth", "peer", "name", self.ifs[1])
        for side, (ns, ifname, addr) in enumerate(
            zip(self.ns, self.ifs, (SYNC_A, SYNC_B), strict=True)
        ):
            _run("ip", "link", "set", ifname, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _run("ip", "-n", ns, "link", "set", ifname, "up")
            # Conntrack stays off in a namespace until a rule uses it.
            for chain in ("OUTPUT", "INPUT"):
                _run(*self.exec(side, "iptables", "-A", chain, "-m", "conntrack",
                                "--ctstate", "NEW", "-j", "ACCEPT"))  # fmt: skip
        _run("ip", "-n", a, "addr", "add", f"{FLOW_SRC}/32", "dev", self.ifs[0])
        _run("ip", "-n", a, "neigh", "add", SINK, "lladdr", SINK_MAC, "dev", self.ifs[0],
             "nud", "permanent")  # fmt: skip
        for side, name in enumerate("ab"):
            me, peer = (SYNC_A, SYNC_B) if side == 0 else (SYNC_B, SYNC_A)
            conf = self.workdir / f"{name}.conf"
            conf.write_text(_conf(self.workdir, name, me, peer, self.ifs[side]))
            with open(self.workdir / f"{name}.out", "wb") as out:  # the child keeps its copy
                self.procs.append(subprocess.Popen(
                    self.exec(side, "conntrackd", "-C", str(conf)),
                    stdout=out, stderr=subprocess.STDOUT,
                ))  # fmt: skip
        deadline = time.monotonic() + 10
        for name in "ab":
            while not (self.workdir / f"{name}.ctl").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"conntrackd {name} did not start: "
                                       f"{(self.workdir / f'{name}.log').read_text()}")  # fmt: skip
                time.sleep(0.05)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in self.ns:
            with contextlib.suppress(subprocess.SubprocessError):
                _run("ip", "netns", "del", ns)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def measure(self, rate: float, seconds: float) -> list[float]:
        """Create ``rate * seconds`` flows in A; each one's NEW in B minus its NEW in A, s."""
        count = int(rate * seconds)
        if not 1 <= count <= 40000:
            raise ValueError("1..40000 flows per measurement (one destination port each)")
        self._sport += 1
        # To files, not pipes: a listener blocked on a full pipe loses events.
        files = [self.workdir / f"events-{self._sport}-{side}.txt" for side in (0, 1)]
        events = []
        for side, path in enumerate(files):
            with open(path, "wb") as out:
                events.append(subprocess.Popen(
                    self.exec(side, "conntrack", "-E", "-e", "NEW", "-p", "udp",
                              "-o", "timestamp", "-b", "8388608"),
                    stdout=out, stderr=subprocess.DEVNULL,
                ))  # fmt: skip
        try:
            time.sleep(0.3)  # the listeners subscribe
            code = SENDER.format(src=FLOW_SRC, sink=SINK)
            sender = subprocess.run(
                self.exec(0, sys.executable, "-c", code, str(rate), str(count), str(self._sport)),
                check=True, timeout=seconds + 30, capture_output=True, text=True,
            )  # fmt: skip
            time.sleep(1.0)  # the last ones travel
        finally:
            for proc in events:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
        outputs = [path.read_text(errors="replace") for path in files]
        sent = {
            int(p): float(t)
            for p, t in (line.split() for line in sender.stdout.split("\n") if line)
        }
        created = self._parse(outputs[0])
        seen = self._parse(outputs[1])
        missing = set(sent) - set(seen)
        if len(created) != count or missing:
            raise AssertionError(f"{count} flows sent, {len(created)} created in A, "
                                 f"{len(missing)} never seen in B")  # fmt: skip
        # From just before the sendto (the flow's creation) to the listener in
        # B reading the NEW event of the entry conntrackd wrote there.
        return sorted(seen[k] - sent[k] for k in sent)

    def _parse(self, text: str) -> dict[int, float]:
        out = {}
        for line in text.splitlines():
            m = _EVENT.match(line)
            if m and m.group(2) == FLOW_SRC and int(m.group(4)) == self._sport:
                out[int(m.group(5))] = float(m.group(1))
        return out


@contextlib.contextmanager
def conntrackd_pair() -> Iterator[ConntrackdPair]:
    pair = ConntrackdPair()
    try:
        pair.start()
        yield pair
    finally:
        pair.close()


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "samples": len(latencies),
        "p50_ms": round(1000 * statistics.median(latencies), 3),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3),
        "max_ms": round(1000 * latencies[-1], 3),
    }


def test_conntrackd_entries_reach_the_peer() -> None:
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with conntrackd_pair() as pair:
        lat = pair.measure(rate=500, seconds=0.4)
    assert len(lat) == 200
    assert lat[0] > 0 and lat[-1] < 1.0  # each seen in B, within a second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    reason = available()
    if reason is not None:
        raise SystemExit(reason)
    with conntrackd_pair() as pair:
        print(json.dumps({"conntrackd": summary(pair.measure(args.rate, args.seconds))}))


if __name__ == "__main__":
    main()
