"""Network-namespace labs built from data.

A :class:`TopologySpec` lists hosts (one namespace each), point-to-point
links (a veth pair with addresses on both ends) and routes.  :class:`NetnsLab`
turns it into namespaces on this machine and tears them down again.  All
names carry a per-lab prefix, so two labs (or a lab and a crashed earlier
run) never collide, and ``down`` removes exactly what the lab created:
namespaces by name and processes by PID, never with a broad kill.

Only addresses inside the lab's own namespaces are used; nothing leaves the
machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from chaos.errors import LabError


@dataclass(frozen=True, slots=True)
class Link:
    # Host names at the two ends and the interface names inside them.
    a: str
    a_if: str
    b: str
    b_if: str
    # Addresses with prefix length ("10.10.1.1/24", "fd00:10:1::1/64").
    a_addrs: tuple[str, ...] = ()
    b_addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    host: str
    dest: str  # "default", "-6 default" is spelled family=6 below
    via: str
    family: int = 4


@dataclass(frozen=True, slots=True)
class TopologySpec:
    # Host names; each becomes one namespace.
    hosts: tuple[str, ...]
    links: tuple[Link, ...]
    routes: tuple[Route, ...] = ()
    # Hosts that forward packets between their interfaces (routers, firewalls).
    routers: tuple[str, ...] = ()
    # Extra sysctls per host: ((host, key, value), ...).
    sysctls: tuple[tuple[str, str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        for link in self.links:
            for host in (link.a, link.b):
                if host not in self.hosts:
                    raise LabError(f"link names unknown host {host!r}")
            for ifname in (link.a_if, link.b_if):
                if len(ifname) > 15:
                    raise LabError(f"interface name {ifname!r} longer than 15 characters")
        for route in self.routes:
            if route.host not in self.hosts:
                raise LabError(f"route names unknown host {route.host!r}")


def one_node_topology() -> TopologySpec:
    """client -- fw -- server, IPv4 and IPv6 on both sides."""
    return TopologySpec(
        hosts=("client", "fw", "server"),
        links=(
            Link(
                "client",
                "eth0",
                "fw",
                "inside",
                ("10.10.1.2/24", "fd00:10:1::2/64"),
                ("10.10.1.1/24", "fd00:10:1::1/64"),
            ),
            Link(
                "fw",
                "outside",
                "server",
                "eth0",
                ("10.10.2.1/24", "fd00:10:2::1/64"),
                ("10.10.2.2/24", "fd00:10:2::2/64"),
            ),
        ),
        routes=(
            Route("client", "default", "10.10.1.1"),
            Route("client", "default", "fd00:10:1::1", family=6),
            Route("server", "default", "10.10.2.1"),
            Route("server", "default", "fd00:10:2::1", family=6),
        ),
        routers=("fw",),
    )


def run(argv: Sequence[str], check: bool = True, timeout: float = 20) -> str:
    """Run a command; its stdout, or :class:`LabError` (start failure, timeout, exit status)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv)}: {e}") from e
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class NetnsLab:
    """Namespaces for one :class:`TopologySpec`, named ``<prefix>-<host>``."""

    def __init__(self, spec: TopologySpec, prefix: str) -> None:
        if not prefix or len(prefix) > 12 or not prefix.replace("-", "").isalnum():
            raise LabError(f"lab prefix {prefix!r} must be 1-12 letters, digits or '-'")
        self.spec = spec
        self.prefix = prefix
        self._procs: list[subprocess.Popen[bytes]] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def up(self) -> None:
        """Create everything; on failure remove what was made and raise."""
        self.down()
        try:
            self._create()
        except BaseException:
            self.down()
            raise

    def _create(self) -> None:
        for host in self.spec.hosts:
            run(["ip", "netns", "add", self.ns(host)])
            self.sh(host, "ip link set lo up")
            # Fast DAD-free IPv6 so addresses work at once (RFC 4862 DAD
            # would hold them "tentative" for a second or more).
            self._sysctl(host, "net.ipv6.conf.all.accept_dad", "0")
            self._sysctl(host, "net.ipv6.conf.default.accept_dad", "0")
            if host in self.spec.routers:
                # Before any interface exists: toggling IPv6 forwarding later
                # re-initialises the interfaces and loses the first neighbour
                # solicitations (a one-second stall on the first packet).
                self._sysctl(host, "net.ipv4.ip_forward", "1")
                self._sysctl(host, "net.ipv6.conf.all.forwarding", "1")
        for i, link in enumerate(self.spec.links):
            tmp_a, tmp_b = f"{self.prefix[:8]}a{i}", f"{self.prefix[:8]}b{i}"
            run(
                [
                    "ip",
                    "link",
                    "add",
                    tmp_a,
                    "netns",
                    self.ns(link.a),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    tmp_b,
                    "netns",
                    self.ns(link.b),
                ]
            )
            self.sh(link.a, f"ip link set {tmp_a} name {link.a_if}")
            self.sh(link.b, f"ip link set {tmp_b} name {link.b_if}")
            for host, ifname, addrs in (
                (link.a, link.a_if, link.a_addrs),
                (link.b, link.b_if, link.b_addrs),
            ):
                # The veth was born in the root namespace with its defaults;
                # turn DAD off on the interface itself before it comes up.
                self._sysctl(host, f"net.ipv6.conf.{ifname}.accept_dad", "0")
                for addr in addrs:
                    self.sh(host, f"ip addr add {addr} dev {ifname} nodad")
                self.sh(host, f"ip link set {ifname} up")
        for host, key, value in self.spec.sysctls:
            self._sysctl(host, key, value)
        for r in self.spec.routes:
            fam = "-6" if r.family == 6 else "-4"
            self.sh(r.host, f"ip {fam} route replace {r.dest} via {r.via}")
        self._wait_links_ready()

    def _wait_links_ready(self, timeout: float = 5.0) -> None:
        """Ping across every link once, so the lab is usable when ``up`` returns.

        A fresh veth needs about a second before its first IPv6 neighbour
        solicitation is answered; without this the first connection of a
        test or a measurement would carry that stall.
        """
        for link in self.spec.links:
            for addr in link.b_addrs:
                target = addr.split("/")[0]
                argv = ["ping", "-c", "1", "-W", "1", "-w", str(int(timeout)), target]
                self.run(link.a, argv, timeout=timeout + 2)

    def _sysctl(self, host: str, key: str, value: str) -> None:
        self.run(host, ["sysctl", "-q", "-w", f"{key}={value}"])

    def sh(self, host: str, command: str, check: bool = True, timeout: float = 20) -> str:
        return self.run(host, command.split(), check=check, timeout=timeout)

    def run(self, host: str, argv: Sequence[str], check: bool = True, timeout: float = 20) -> str:
        return run(["ip", "netns", "exec", self.ns(host), *argv], check=check, timeout=timeout)

    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in ``host``; ``down`` (or :meth:`stop`) ends it by PID."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.ns(host), *argv], **kwargs
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def down(self) -> None:
        """Remove the lab: our processes by PID, then our namespaces by name."""
        for proc in list(self._procs):
            self.stop(proc, timeout=2.0)
        for name in list_namespaces():
            if name.startswith(self.prefix + "-"):
                self._kill_namespace_pids(name)
                run(["ip", "netns", "del", name], check=False)

    def _kill_namespace_pids(self, name: str) -> None:
        # Processes left in our own namespace by a crashed earlier run: found
        # by namespace, killed by PID (never a broad pattern kill).
        pids = run(["ip", "netns", "pids", name], check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        if pids:
            time.sleep(0.05)
