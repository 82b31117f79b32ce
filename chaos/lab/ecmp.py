"""Measure which node each direction of a flow crosses (``stockade lab ecmp``).

For ``flows`` UDP flows (client source ports ``sport0 .. sport0+flows-1``
to the server's UDP port) the check installs one counting rule per flow and
direction in every node's ``mangle FORWARD`` chain (before the filter's own
rules, so a packet the filter drops is still counted), sends one datagram
client -> server and then one server -> client per flow, reads the counters
and removes the rules.  The two directions are sent independently (no
server process needed), with the reply's ports mirrored.

:func:`classify` is the pure part: counters in, per-flow verdict and the
symmetric / asymmetric fractions out.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from chaos.errors import LabError
from chaos.lab.build import LabNames, run
from chaos.lab.topology import LabTopology

CHAIN = "STKL-ECMP"
_COUNTER = re.compile(r"^\[(\d+):\d+\] -A " + CHAIN + r' .*--comment "?([qr])(\d+)"?')

_SENDER = r"""
import socket, sys, time
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[6]
port0, n, dport = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "tcp":
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src, port0 + i)); s.setblocking(False)
        s.connect_ex((dst, dport)); socks.append(s)
        time.sleep(0.0005)
    time.sleep(0.5)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    sys.exit(0)
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mode == "request":
        s.bind((src, port0 + i)); s.sendto(b"ecmp-probe", (dst, dport))
    else:
        s.bind((src, dport)); s.sendto(b"ecmp-probe", (dst, port0 + i))
    s.close()
    time.sleep(0.0005)
"""


@dataclass(frozen=True, slots=True)
class EcmpResult:
    flows: int
    symmetric: int  # both directions crossed the same node
    asymmetric: int  # they crossed different nodes
    unseen: int  # a direction was counted nowhere, or more than once
    per_node_requests: Mapping[str, int]
    per_node_replies: Mapping[str, int]

    def as_dict(self) -> dict[str, object]:
        seen = max(1, self.symmetric + self.asymmetric)
        return {
            "flows": self.flows,
            "symmetric": self.symmetric,
            "asymmetric": self.asymmetric,
            "unseen": self.unseen,
            "symmetric_fraction": round(self.symmetric / seen, 4),
            "asymmetric_fraction": round(self.asymmetric / seen, 4),
            "per_node_requests": dict(self.per_node_requests),
            "per_node_replies": dict(self.per_node_replies),
        }


def classify(counts: Mapping[str, Mapping[tuple[str, int], int]], flows: int) -> EcmpResult:
    """``counts[node][("q"|"r", flow)] = packets`` -> the per-flow verdicts."""
    sym = asym = unseen = 0
    req_per: dict[str, int] = {n: 0 for n in counts}
    rep_per: dict[str, int] = {n: 0 for n in counts}
    for i in range(flows):
        q = [n for n, c in counts.items() if c.get(("q", i), 0) > 0]
        r = [n for n, c in counts.items() if c.get(("r", i), 0) > 0]
        for n in q:
            req_per[n] += 1
        for n in r:
            rep_per[n] += 1
        if len(q) != 1 or len(r) != 1:
            unseen += 1
        elif q == r:
            sym += 1
        else:
            asym += 1
    return EcmpResult(flows, sym, asym, unseen, req_per, rep_per)


def _rules(client: str, server: str, port0: int, flows: int, dport: int, proto: str) -> str:
    lines = ["*mangle", f":{CHAIN} - [0:0]", f"-I FORWARD 1 -j {CHAIN}"]
    match = f"-p {proto} -m {proto}"
    for i in range(flows):
        sport = port0 + i
        lines.append(
            f"-A {CHAIN} -s {client} -d {server} {match} --sport {sport} --dport {dport}"
            f' -m comment --comment "q{i}"'
        )
        lines.append(
            f"-A {CHAIN} -s {server} -d {client} {match} --sport {dport} --dport {sport}"
            f' -m comment --comment "r{i}"'
        )
    return "\n".join(lines) + "\nCOMMIT\n"


def _remove(names: LabNames, host: str) -> None:
    ns = names.ns(host)
    run(
        ["ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-D", "FORWARD", "-j", CHAIN],
        check=False,
    )
    run(["ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-F", CHAIN], check=False)
    run(["ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-X", CHAIN], check=False)


def _read(names: LabNames, host: str) -> dict[tuple[str, int], int]:
    out = run(["ip", "netns", "exec", names.ns(host), "iptables-save", "-c", "-t", "mangle"])
    counts: dict[tuple[str, int], int] = {}
    for line in out.splitlines():
        m = _COUNTER.match(line)
        if m:
            counts[(m.group(2), int(m.group(3)))] = int(m.group(1))
    return counts


def measure(
    topo: LabTopology, names: LabNames, flows: int = 256, proto: str = "udp", port0: int = 20000
) -> EcmpResult:
    """UDP: both directions sent by us (port 8059); TCP: SYNs to the traffic
    server, whose SYN-ACKs are the replies (it must be running)."""
    if not 1 <= flows <= 4096:
        raise LabError(f"--flows must be 1..4096, not {flows}")
    if proto not in ("udp", "tcp"):
        raise LabError(f"--proto must be udp or tcp, not {proto!r}")
    dport = int(topo.traffic["tcp_port"]) if proto == "tcp" else 8059
    client_host, server_host = str(topo.traffic["client"]), str(topo.traffic["server"])
    client_ip = topo.client_net.rsplit(".", 1)[0] + ".2"
    server_ip = str(topo.traffic["server_addr"])
    rules = _rules(client_ip, server_ip, port0, flows, dport, proto)
    nodes = [n.host for n in topo.nodes]
    try:
        for host in nodes:
            _remove(names, host)
            argv = ["ip", "netns", "exec", names.ns(host), "iptables-restore", "--noflush"]
            _restore(argv, rules)
        sends = [("request", client_host, client_ip, server_ip)]
        sends += [("reply", server_host, server_ip, client_ip)] if proto == "udp" else []
        for mode, host, src, dst in sends:
            mode = "tcp" if proto == "tcp" else mode
            argv = ["ip", "netns", "exec", names.ns(host), sys.executable, "-c", _SENDER]
            run([*argv, src, dst, str(port0), str(flows), str(dport), mode], timeout=60)
            time.sleep(0.3)
        counts = {n.node_id: _read(names, n.host) for n in topo.nodes}
    finally:
        for host in nodes:
            _remove(names, host)
    return classify(counts, flows)


def _restore(argv: list[str], text: str) -> None:
    import subprocess

    done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip()}")
