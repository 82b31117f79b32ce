"""Differential test: our conntrack core against the Linux kernel's.

The same traffic crosses a namespace where Linux conntrack tracks it (no
Stockade node: a plain ``-m conntrack`` rule switches tracking on).  We
capture it on the firewall's inside interface, replay the capture through
the engine, and compare the final table with ``conntrack -L``: every flow the
kernel has must be in ours with the same TCP state (or, for UDP, the same
replied/assured-ness), and vice versa.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from chaos.lab.netns import NetnsLab, one_node_topology
from node.engine import Engine
from node.flow.table import TableConfig
from node.pcap import read_pcap
from node.policy import parse_ruleset
from node.replay import flow_to_json, replay

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("tcpdump") and shutil.which("conntrack")),
        reason="needs tcpdump and conntrack (./dev.sh setup installs them)",
    ),
]

SERVER = r"""
import socket, struct, sys, threading, time
def listener(port, mode):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(8)
    while True:
        c, _ = s.accept()
        c.recv(100); c.sendall(b"reply")
        if mode == "close":        # graceful close from the server after the client's
            time.sleep(0.2); c.close()
        elif mode == "rst":        # abortive close: RST (SO_LINGER 0)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
        elif mode == "halfclose":  # server sends FIN, client keeps its side open
            c.shutdown(socket.SHUT_WR); threading.Event().wait()
        else:                      # keep the connection open
            threading.Event().wait()
def udp(port, answer):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, peer = s.recvfrom(100)
        if answer: s.sendto(b"answer", peer)
for port, mode in ((7001, "open"), (7002, "close"), (7003, "rst"), (7004, "halfclose")):
    threading.Thread(target=listener, args=(port, mode), daemon=True).start()
threading.Thread(target=udp, args=(7100, True), daemon=True).start()
threading.Thread(target=udp, args=(7101, False), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import socket, sys, time
srv = "10.10.2.2"
held = []
for port, how in ((7001, "hold"), (7002, "close"), (7003, "hold"), (7004, "hold")):
    s = socket.create_connection((srv, port), timeout=2)
    s.sendall(b"hi"); s.recv(100)
    if how == "close":
        s.close()
    else:
        held.append(s)
time.sleep(0.5)
for port in (7100, 7101):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(0.3)
    u.sendto(b"q", (srv, port))
    try: u.recv(100)
    except OSError: pass
try:
    socket.create_connection((srv, 7999), timeout=1)   # closed port: RST
except OSError:
    pass
print("done", flush=True)
time.sleep(30)
"""

ACCEPT_ALL = "default: accept\nestablished: accept\ninvalid: accept\n"


def _kernel_flows(lab: NetnsLab) -> dict[tuple[str, str, int, str, int], str]:
    out = lab.run("fw", ["conntrack", "-L", "-o", "extended"], check=False)
    flows = {}
    for line in out.splitlines():
        parts = line.split()
        if "ipv4" not in parts:
            continue
        proto = parts[2]
        fields: dict[str, str] = {}
        for p in parts:
            if "=" in p:
                fields.setdefault(*p.split("=", 1))  # the first ones: original direction
        # The first src/dst/sport/dport are the original direction.
        key = (
            proto,
            fields["src"],
            int(fields.get("sport", 0)),
            fields["dst"],
            int(fields.get("dport", 0)),
        )
        if proto == "tcp":
            state = parts[5]
        elif proto == "udp":
            state = "UNREPLIED" if "[UNREPLIED]" in parts else "ASSURED"
        else:
            state = "UNREPLIED" if "[UNREPLIED]" in parts else "REPLIED"
        flows[key] = state
    return flows


def _our_flows(pcap: str) -> dict[tuple[str, str, int, str, int], str]:
    engine = Engine(TableConfig(), parse_ruleset(ACCEPT_ALL, "accept-all"))
    last = 0.0
    for record, _ in replay(engine, read_pcap(pcap), None, None):
        last = record.ts
    flows = {}
    for f in engine.table.flows():
        j = flow_to_json(f, last)
        if j["proto"] not in ("tcp", "udp"):
            continue
        state = j["state"]
        if j["proto"] == "udp":
            state = "ASSURED" if f.assured else "UNREPLIED"
        flows[(j["proto"], j["src"], j["sport"], j["dst"], j["dport"])] = state
    return flows


def test_final_states_agree_with_linux_conntrack(tmp_path):
    lab = NetnsLab(one_node_topology(), f"stk{uuid.uuid4().hex[:6]}")
    lab.up()
    pcap = str(tmp_path / "trace.pcap")
    try:
        # Any rule using conntrack switches tracking on in the namespace.
        lab.sh("fw", "iptables -A FORWARD -m conntrack --ctstate INVALID -j ACCEPT")
        lab.sh("fw", "sysctl -q -w net.netfilter.nf_conntrack_tcp_loose=0")
        dump = lab.popen(
            "fw",
            ["tcpdump", "-i", "inside", "--immediate-mode", "-U", "-n", "-w", pcap],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # tcpdump needs a moment to attach
        server = lab.popen("server", [sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
        assert server.stdout is not None and b"listening" in server.stdout.readline()
        client = lab.popen("client", [sys.executable, "-c", CLIENT], stdout=subprocess.PIPE)
        assert client.stdout is not None and b"done" in client.stdout.readline()
        time.sleep(0.5)
        kernel = _kernel_flows(lab)
        dump.send_signal(signal.SIGINT)
        dump.wait(5)
        ours = _our_flows(pcap)
    finally:
        lab.down()
    traffic = {k: v for k, v in kernel.items() if k[1] == "10.10.1.2"}
    assert len(traffic) >= 6, f"kernel saw too little traffic: {kernel}"
    mine = {k: v for k, v in ours.items() if k[1] == "10.10.1.2"}
    assert mine == traffic
