"""Small traffic probes run inside lab namespaces.

Each probe is a short Python program executed with the same interpreter in
the chosen namespace; it prints one JSON object describing what happened.
Probes are bounded in time and count, and only address lab hosts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chaos.errors import LabError

if TYPE_CHECKING:
    import subprocess

    from chaos.lab.netns import NetnsLab

# A TCP client: connect, send a request line, read the reply.
_TCP_CLIENT = r"""
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic()
try:
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(b"hello stockade\n")
    data = s.recv(4096)
    s.close()
    out = {"result": "ok", "reply": data.decode(errors="replace").strip()}
except ConnectionRefusedError:
    out = {"result": "refused"}
except (socket.timeout, TimeoutError):
    out = {"result": "timeout"}
except OSError as e:
    out = {"result": "error", "error": str(e)}
out["ms"] = round((time.monotonic() - t0) * 1000, 1)
print(json.dumps(out))
"""

_UDP_CLIENT = r"""
import json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(timeout)
t0 = time.monotonic()
try:
    s.sendto(b"query", (host, port))
    data, _ = s.recvfrom(4096)
    out = {"result": "ok", "reply": data.decode(errors="replace")}
except (socket.timeout, TimeoutError):
    out = {"result": "timeout"}
except OSError as e:
    out = {"result": "error", "error": str(e)}
out["ms"] = round((time.monotonic() - t0) * 1000, 1)
print(json.dumps(out))
"""

# Echo servers for TCP and UDP on the given ports, all addresses, v4 and v6.
_SERVER = r"""
import socket, sys, threading
def tcp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(5); data = c.recv(4096); c.sendall(b"echo " + data)
        except OSError:
            pass
        finally:
            c.close()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(4096); s.sendto(b"answer " + data, peer)
for spec in sys.argv[1:]:
    proto, port = spec.split("/")
    threading.Thread(target=tcp if proto == "tcp" else udp, args=(int(port),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    result: str  # ok | refused | timeout | error
    ms: float
    detail: str = ""


def _probe(lab: NetnsLab, host: str, program: str, args: list[str], timeout: float) -> ProbeResult:
    out = lab.run(host, [sys.executable, "-c", program, *args], timeout=timeout + 5)
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise LabError(f"probe in {host} printed no result: {out!r}") from e
    detail = str(data.get("reply") or data.get("error") or "")
    return ProbeResult(str(data["result"]), float(data["ms"]), detail)


def tcp_request(
    lab: NetnsLab, host: str, addr: str, port: int, timeout: float = 1.0
) -> ProbeResult:
    return _probe(lab, host, _TCP_CLIENT, [addr, str(port), str(timeout)], timeout)


def udp_request(
    lab: NetnsLab, host: str, addr: str, port: int, timeout: float = 1.0
) -> ProbeResult:
    return _probe(lab, host, _UDP_CLIENT, [addr, str(port), str(timeout)], timeout)


def ping(lab: NetnsLab, host: str, addr: str, timeout: float = 1.0) -> ProbeResult:
    argv = ["ping", "-c", "1", "-W", str(max(1, int(timeout))), addr]
    out = lab.run(host, argv, check=False, timeout=timeout + 5)
    for line in out.splitlines():
        if "time=" in line:
            ms = float(line.split("time=")[1].split()[0])
            return ProbeResult("ok", ms)
    return ProbeResult("timeout", timeout * 1000)


def start_servers(lab: NetnsLab, host: str, specs: list[str]) -> subprocess.Popen[bytes]:
    """Start echo servers (``["tcp/80", "udp/53"]``) in ``host``; wait until they listen."""
    import subprocess

    proc = lab.popen(host, [sys.executable, "-c", _SERVER, *specs], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"listening" not in line:
        lab.stop(proc)
        raise LabError(f"echo servers in {host} did not start")
    return proc
