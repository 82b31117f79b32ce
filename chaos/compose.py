"""The docker-compose lab: build its images, bring it up and down, run commands in it.

The lab itself is data: ``docker-compose.yml`` at the repository root (etcd,
two routers, three firewall nodes forming one cluster, a client and a
server on four isolated networks) with the node files and rules in
``docker/lab`` (docs/compose-lab.md).  This module is
the thin adapter around the ``docker`` and ``docker-compose`` programs that
the smoke test (and later ``stockade lab``) uses:

- :func:`build_images` makes the project image, reusing it when its inputs
  have not changed: the image tag carries a hash of the sources and of the
  base image.  The base image is either the official Python image (present
  locally, or pulled by ``docker build`` where a registry answers) or one
  built on this machine by ``docker/build-base-image.sh`` (no registry).
  When the host's Python is 3.11, the Python packages are built into a
  wheelhouse on the host and installed from it, so the image build needs no
  access to PyPI (build containers may lack the host's proxy or CA setup).
- :class:`ComposeLab` is one compose project (``-p NAME``): up, down,
  readiness, exec, kill and crash, the cluster's ``stockade status`` (run
  in a node: the host has no address on the lab networks), the traffic
  driver in the client, and the lab probes (TCP/UDP requests).  Everything
  it creates carries the project's compose labels, and :meth:`ComposeLab.down`
  removes exactly those containers and networks, so a test never touches a
  user's own lab.

Errors: every failure of a docker command is a :class:`chaos.errors.LabError`.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.errors import LabError
from chaos.lab import probes
from chaos.lab.probes import ProbeResult

OFFICIAL_BASE_IMAGE = "python:3.11-slim-bookworm"
# Tag docker/build-base-image.sh gives the locally bootstrapped base.
LOCAL_BASE_IMAGE = "stockade/base:bookworm"
IMAGE_REPOSITORY = "stockade/lab"
# The tag docker-compose.yml uses when STOCKADE_IMAGE is not set.
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:dev"
# Every lab network lives here (docker-compose.yml); two labs cannot coexist.
LAB_SUPERNET = ipaddress.ip_network("10.77.0.0/16")
NODES = ("fw1", "fw2", "fw3")
SERVER_ADDR = "10.77.2.10"
# What the server container serves (docker-compose.yml): ports the rules allow.
TCP_PORT, UDP_PORT = 80, 53
# The traffic driver's server (python -m chaos.traffic server) in the server container.
TRAFFIC_TCP_PORT, TRAFFIC_UDP_PORT = 8000, 8053
# The cluster as docker/lab/fw*.yaml describe it.
CLUSTER_ID = "lab"
ETCD_ENDPOINT = "10.77.10.5:2379"
# VIP -> home node (docker/lab/fw*.yaml `cluster.vips`).
VIP_HOMES = {
    **{f"10.77.10.10{k}": f"fw{k}" for k in (1, 2, 3)},
    **{f"10.77.20.10{k}": f"fw{k}" for k in (1, 2, 3)},
}
# Sources that go into the image; everything else (.venv, .git, caches)
# stays out of the build context.
CONTEXT_ITEMS = (
    "pyproject.toml",
    "constraints.txt",
    "README.md",
    "node",
    "syncd",
    "cluster",
    "chaos",
    "docker",
)
_SKIP_NAMES = {"__pycache__", "wheels"}
_PROJECT_LABEL = "com.docker.compose.project"
_SERVICE_LABEL = "com.docker.compose.service"


def _run(
    argv: Sequence[str],
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            cwd=cwd,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv[:4])}: {e}") from e
    if check and done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise LabError(f"{' '.join(argv[:4])}: exit {done.returncode}: {tail}")
    return done


def docker_unavailable_reason() -> str | None:
    """Why this machine cannot run the lab, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker program"
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=20, check=False)
    if info.returncode != 0:
        return f"no Docker engine answers: {info.stderr.strip()[:200]}"
    try:
        compose_command()
    except LabError as e:
        return str(e)
    return None


def compose_command() -> list[str]:
    """``docker compose`` (plugin) when present, else Debian's ``docker-compose``."""
    if _run(["docker", "compose", "version"], timeout=20, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    raise LabError("neither `docker compose` nor `docker-compose` is installed")


def image_exists(tag: str) -> bool:
    return _run(["docker", "image", "inspect", tag], timeout=30, check=False).returncode == 0


def _image_id(tag: str) -> str:
    return _run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], timeout=30).stdout.strip()


def lab_networks_in_use() -> list[str]:
    """Docker networks (any project) with a subnet inside the lab's 10.77.0.0/16."""
    names = _run(["docker", "network", "ls", "-q"], timeout=30).stdout.split()
    if not names:
        return []
    out = _run(["docker", "network", "inspect", *names], timeout=30).stdout
    taken = []
    for net in json.loads(out):
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            subnet = cfg.get("Subnet", "")
            try:
                overlaps = ipaddress.ip_network(subnet).overlaps(LAB_SUPERNET)
            except ValueError:
                continue
            if overlaps:
                taken.append(f"{net['Name']} ({subnet})")
    return taken


# --- images -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildReport:
    # Tag of the project image, e.g. stockade/lab:src-0123456789ab.
    image: str
    # FROM image used for it.
    base_image: str
    # Seconds spent on the base image (0 when reused) and the project image.
    base_seconds: float
    image_seconds: float
    # True when the project image already existed for these exact inputs.
    reused: bool


def build_base_image(repo: Path, tag: str = LOCAL_BASE_IMAGE, timeout: float = 900) -> float:
    """Run docker/build-base-image.sh; returns the seconds it took."""
    start = time.monotonic()
    _run(["bash", str(repo / "docker" / "build-base-image.sh"), tag], timeout=timeout)
    return time.monotonic() - start


def _context_files(repo: Path) -> Iterator[Path]:
    for item in CONTEXT_ITEMS:
        path = repo / item
        if path.is_file():
            yield path
            continue
        for sub in sorted(path.rglob("*")):
            rel = sub.relative_to(repo)
            if sub.is_file() and not _SKIP_NAMES.intersection(rel.parts) and sub.suffix != ".pyc":
                yield sub


def stage_context(repo: Path, dest: Path, base_image_id: str) -> str:
    """Copy the image's sources into ``dest``; returns a hash of them and the base."""
    digest = hashlib.sha256(base_image_id.encode())
    for src in _context_files(repo):
        rel = src.relative_to(repo)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        digest.update(str(rel).encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def host_can_build_wheels(python: str) -> bool:
    """The image's Python is 3.11: wheels built by another version would not fit."""
    probe = "import sys; print(sys.version_info[:2] == (3, 11))"
    done = _run([python, "-c", probe], timeout=30, check=False)
    return done.stdout.strip() == "True"


def wheelhouse_requirements(repo: Path) -> list[str]:
    """The project's dependencies and build requirements (pyproject.toml)."""
    with (repo / "pyproject.toml").open("rb") as f:
        meta = tomllib.load(f)
    deps: list[str] = meta["project"]["dependencies"]
    build: list[str] = meta["build-system"]["requires"]
    return [*deps, *build]


def build_wheelhouse(repo: Path, python: str, timeout: float = 900) -> Path:
    """Wheels of the dependencies, built on the host; cached per pyproject.toml
    and constraints.txt (the exact versions the project is tested with).

    Kept under ``build/`` (ignored by git) so the next image build finds the
    very same files and Docker's layer cache keeps the dependency layer.
    """
    pins = repo / "constraints.txt"
    digest = hashlib.sha256((repo / "pyproject.toml").read_bytes())
    if pins.exists():
        digest.update(pins.read_bytes())
    key = digest.hexdigest()[:12]
    wheels = repo / "build" / f"docker-wheels-{key}"
    if (wheels / ".complete").exists():
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    argv = [python, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels)]
    if pins.exists():
        argv += ["-c", str(pins)]
    _run([*argv, *wheelhouse_requirements(repo)], timeout=timeout)
    (wheels / ".complete").touch()
    return wheels


def build_images(
    repo: Path,
    base_image: str = LOCAL_BASE_IMAGE,
    wheelhouse: bool | None = None,
    python: str = sys.executable,
    timeout: float = 1200,
) -> BuildReport:
    """Build (or reuse) the base image and the project image; tag it also as ``:dev``.

    ``base_image`` LOCAL_BASE_IMAGE is built here when missing; any other
    base is left to ``docker build`` (which pulls it if it can).
    ``wheelhouse`` None means: when the host's ``python`` is 3.11.
    """
    base_seconds = 0.0
    if base_image == LOCAL_BASE_IMAGE and not image_exists(base_image):
        base_seconds = build_base_image(repo, base_image)
    base_id = _image_id(base_image) if image_exists(base_image) else base_image
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stockade-image-") as tmp:
        context = Path(tmp)
        tag = f"{IMAGE_REPOSITORY}:src-{stage_context(repo, context, base_id)}"
        reused = image_exists(tag)
        if not reused:
            if wheelhouse is None:
                wheelhouse = host_can_build_wheels(python)
            if wheelhouse:
                wheels = build_wheelhouse(repo, python)
                shutil.copytree(wheels, context / "docker" / "wheels")
            argv = ["docker", "build", "-q", "--force-rm", "-f", "docker/Dockerfile", "-t", tag]
            argv += ["--build-arg", f"BASE_IMAGE={base_image}", "."]
            _run(argv, timeout=timeout, cwd=context)
            _remove_older_images(keep=tag)
    _run(["docker", "tag", tag, DEFAULT_IMAGE], timeout=30)
    return BuildReport(tag, base_image, base_seconds, time.monotonic() - start, reused)


def _remove_older_images(keep: str) -> None:
    """Untag earlier ``src-`` builds; images still used by a container stay."""
    listing = ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPOSITORY]
    for tag in _run(listing, timeout=30).stdout.split():
        if tag != keep and tag.startswith(f"{IMAGE_REPOSITORY}:src-"):
            _run(["docker", "image", "rm", tag], timeout=60, check=False)


# --- one compose project ------------------------------------------------------


class ComposeLab:
    """One project of docker-compose.yml, named ``project`` (``-p``)."""

    def __init__(self, repo: Path, project: str, image: str = DEFAULT_IMAGE) -> None:
        if not project or not all(c.isalnum() or c in "-_" for c in project):
            raise LabError(f"compose project name {project!r}: letters, digits, '-', '_' only")
        self.repo = repo
        self.project = project.lower()
        self.image = image
        self._compose = compose_command()

    def compose(self, *args: str, timeout: float = 120) -> str:
        argv = [*self._compose, "-p", self.project, "-f", str(self.repo / "docker-compose.yml")]
        env = {"STOCKADE_IMAGE": self.image}
        return _run([*argv, *args], timeout=timeout, env=env, cwd=self.repo).stdout

    def up(self, timeout: float = 120) -> None:
        """Start from scratch (``down`` first: compose 1.29 cannot always recreate)."""
        self.down()
        taken = lab_networks_in_use()
        if taken:
            raise LabError(f"the lab's 10.77.0.0/16 is in use by {', '.join(taken)}")
        self.compose("up", "-d", "--no-build", timeout=timeout)

    def down(self) -> None:
        """Remove the project's containers and networks (by compose label)."""
        self.compose("down", "-v", "-t", "2", "--remove-orphans", timeout=120)
        label = f"label={_PROJECT_LABEL}={self.project}"
        left = _run(["docker", "ps", "-aq", "--filter", label], timeout=30).stdout.split()
        if left:
            _run(["docker", "rm", "-f", "-v", *left], timeout=60)
        nets = _run(["docker", "network", "ls", "-q", "--filter", label], timeout=30).stdout
        if nets.split():
            _run(["docker", "network", "rm", *nets.split()], timeout=60)

    def container(self, service: str) -> str:
        """ID of the service's container (running or not)."""
        filters = ["--filter", f"label={_PROJECT_LABEL}={self.project}"]
        filters += ["--filter", f"label={_SERVICE_LABEL}={service}"]
        ids = _run(["docker", "ps", "-aq", *filters], timeout=30).stdout.split()
        if len(ids) != 1:
            raise LabError(f"{self.project}: expected one {service} container, found {len(ids)}")
        return ids[0]

    def state(self, service: str) -> dict[str, object]:
        out = _run(["docker", "inspect", "-f", "{{json .State}}", self.container(service)], 30)
        state: dict[str, object] = json.loads(out.stdout)
        return state

    def logs(self, service: str) -> str:
        done = _run(["docker", "logs", self.container(service)], timeout=30)
        return done.stdout + done.stderr

    def exec(
        self, service: str, argv: Sequence[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(["docker", "exec", self.container(service), *argv], timeout, check=check)

    def kill(self, service: str) -> None:
        """SIGKILL the service's container (its network goes a while later: see :meth:`crash`)."""
        _run(["docker", "kill", self.container(service)], timeout=30)

    def crash(self, service: str, interfaces: Sequence[str] = ("up0", "down0")) -> float:
        """A node crash as the network sees it: links down, then SIGKILL.

        ``docker kill`` alone is a gentler fault than a crash: Docker removes
        a killed container's interfaces only a while after its processes
        died, and until then its kernel keeps forwarding the flows the
        filter had offloaded to conntrack, and keeps answering for its VIPs.
        Taking the links down first makes the node vanish from both segments
        at once, as a dead machine would.  Returns the CLOCK_MONOTONIC time
        at which the links were down (containers share the host's clock).
        """
        program = (
            "import subprocess, sys, time\n"
            "for name in sys.argv[1:]:\n"
            "    subprocess.run(['ip', 'link', 'set', name, 'down'], check=True)\n"
            "print(time.monotonic())"
        )
        done = self.exec(service, ["python3", "-c", program, *interfaces], timeout=30)
        try:
            cut = float(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise LabError(f"crash {service}: no time printed: {done.stdout!r}") from e
        self.kill(service)
        return cut

    def forwarded_packets(self, node: str) -> int:
        """Packets the node's FORWARD chain has seen (its jump to the Stockade chain)."""
        done = self.exec(node, ["iptables", "-w", "-L", "FORWARD", "-v", "-n", "-x"])
        for line in done.stdout.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "STK-FORWARD" and fields[0].isdigit():
                return int(fields[0])
        raise LabError(f"{node}: no STK-FORWARD jump in FORWARD: {done.stdout[-500:]!r}")

    def start(self, service: str) -> None:
        """Start a stopped container again (same addresses, fresh processes)."""
        _run(["docker", "start", self.container(service)], timeout=60)

    def running(self) -> dict[str, bool]:
        """Service -> whether its container runs (one ``docker ps`` call)."""
        fmt = f'{{{{.Label "{_SERVICE_LABEL}"}}}} {{{{.State}}}}'
        label = f"label={_PROJECT_LABEL}={self.project}"
        out = _run(["docker", "ps", "-a", "--filter", label, "--format", fmt], timeout=30).stdout
        return {
            svc: state == "running"
            for svc, _, state in (line.partition(" ") for line in out.splitlines())
        }

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every node printed its ready line, etcd is healthy, the servers listen."""
        wanted = {f"stockade node {n} ready": n for n in NODES}
        wanted["listening"] = "server"
        wanted["traffic server ready"] = "server"
        deadline = time.monotonic() + timeout
        while True:
            missing = [line for line, svc in wanted.items() if line not in self.logs(svc)]
            health = self.state("etcd").get("Health")
            etcd_ok = isinstance(health, dict) and health.get("Status") == "healthy"
            if not missing and etcd_ok:
                return
            stopped = [svc for svc, up in self.running().items() if not up]
            if stopped:
                raise LabError(f"{stopped[0]} exited: {self.logs(stopped[0])[-1500:]}")
            if time.monotonic() > deadline:
                waiting = [wanted[line] for line in missing] + ([] if etcd_ok else ["etcd"])
                raise LabError(f"lab not ready after {timeout:.0f} s: {', '.join(waiting)}")
            time.sleep(0.5)

    # --- the cluster, as etcd sees it (``stockade status`` in a node) ---

    def status(self, via: Sequence[str] = NODES, events: int = 10) -> dict[str, Any]:
        """``stockade status --json`` run in the first running node of ``via``.

        The lab networks have no address on the host, so the host cannot
        reach etcd: the command runs inside a node container.
        """
        up = self.running()
        where = next((n for n in via if up.get(n)), None)
        if where is None:
            raise LabError(f"no running node among {', '.join(via)} to ask etcd")
        argv = ["stockade", "status", "--etcd", ETCD_ENDPOINT, "--cluster", CLUSTER_ID, "--json"]
        argv += ["--events", str(events)]
        # Exit 3/4 mean degraded/critical: still a status document.
        done = self.exec(where, argv, timeout=30, check=False)
        try:
            doc: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            detail = (done.stderr or done.stdout).strip()[-500:]
            raise LabError(f"stockade status in {where}: exit {done.returncode}: {detail}") from e
        return doc

    def wait_cluster(
        self,
        up: Sequence[str] = NODES,
        down: Sequence[str] = (),
        timeout: float = 60,
        interval: float = 0.3,
    ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Until ``up`` are up, ``down`` are down, every VIP has one live holder.

        A VIP must be held by its home node when that node is up, else by
        some node of ``up``.  Returns the last status document and the node
        states seen on the way (one ``{node: state}`` per poll that changed).
        """
        deadline = time.monotonic() + timeout
        seen: list[dict[str, str]] = []
        while True:
            doc = self.status(via=up or NODES)
            states = {str(n["node_id"]): str(n["state"]) for n in doc["nodes"]}
            if not seen or seen[-1] != states:
                seen.append(states)
            problem = cluster_problem(doc, up, down)
            if problem is None:
                return doc, seen
            if time.monotonic() > deadline:
                raise LabError(f"cluster not settled after {timeout:.0f} s: {problem}")
            time.sleep(interval)

    # --- traffic driver (python -m chaos.traffic client in the client) ---

    def start_traffic(
        self,
        seconds: float,
        long_lived: int = 16,
        interval: float = 0.01,
        rate: float = 5.0,
        udp_rate: float = 5.0,
    ) -> subprocess.Popen[str]:
        """Start the traffic driver in the client; :func:`traffic_summary` reads its end.

        The driver's gap events carry CLOCK_MONOTONIC times; containers share
        the host's clock, so they compare with ``time.monotonic()`` here.
        """
        argv = ["docker", "exec", self.container("client"), "python3", "-m", "chaos.traffic"]
        argv += ["client", "--server", SERVER_ADDR, "--tcp-port", str(TRAFFIC_TCP_PORT)]
        argv += ["--udp-port", str(TRAFFIC_UDP_PORT), "--seconds", str(seconds)]
        argv += ["--long-lived", str(long_lived), "--interval", str(interval)]
        argv += ["--rate", str(rate), "--udp-rate", str(udp_rate), "--no-ping", "--json"]
        try:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise LabError(f"traffic driver: {e}") from e

    # --- probes (the programs of chaos.lab.probes, run with docker exec) ---

    def _probe(self, service: str, program: str, args: list[str], timeout: float) -> ProbeResult:
        done = self.exec(service, ["python3", "-c", program, *args], timeout=timeout + 10)
        try:
            data = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise LabError(f"probe in {service} printed no result: {done.stdout!r}") from e
        detail = str(data.get("reply") or data.get("error") or "")
        return ProbeResult(str(data["result"]), float(data["ms"]), detail)

    def tcp_request(
        self, addr: str = SERVER_ADDR, port: int = TCP_PORT, timeout: float = 2.0
    ) -> ProbeResult:
        """From the client: connect, send a line, read the echo."""
        args = [addr, str(port), str(timeout)]
        return self._probe("client", probes._TCP_CLIENT, args, timeout)

    def udp_request(
        self, addr: str = SERVER_ADDR, port: int = UDP_PORT, timeout: float = 2.0
    ) -> ProbeResult:
        """From the client: one datagram, one answer."""
        args = [addr, str(port), str(timeout)]
        return self._probe("client", probes._UDP_CLIENT, args, timeout)


def traffic_summary(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Wait for a :meth:`ComposeLab.start_traffic` driver; its JSON summary.

    The driver exits 1 when anything failed or stalled: that is in the
    summary, not an error here.  No summary at all is.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise LabError(f"traffic driver still running after {timeout:.0f} s") from e
    try:
        summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise LabError(f"traffic driver: exit {proc.returncode}, no summary: {err[-1500:]}") from e
    return summary


def cluster_problem(doc: Mapping[str, Any], up: Sequence[str], down: Sequence[str]) -> str | None:
    """What keeps ``stockade status --json`` from the wanted picture (pure); None when none."""
    states = {str(n["node_id"]): n["state"] for n in doc.get("nodes", [])}
    for node in up:
        if states.get(node) != "up":
            return f"{node} is {states.get(node, 'unknown')}, not up"
    for node in down:
        if states.get(node, "down") not in ("down", "left"):
            return f"{node} is {states[node]}, not down"
    holders = {str(v["address"]).split("/")[0]: v for v in doc.get("vips", [])}
    for vip, home in VIP_HOMES.items():
        entry = holders.get(vip)
        if entry is None or entry.get("holder") is None:
            return f"VIP {vip} has no holder"
        holder = entry["holder"]
        wanted = [home] if home in up else list(up)
        if holder not in wanted or not entry.get("ok", False):
            return f"VIP {vip} held by {holder} (ok={entry.get('ok')}), want {' or '.join(wanted)}"
    return None


# --- command line (image build for people; `serve` runs inside the server) ---


def serve(specs: Sequence[str], traffic: str | None = None) -> None:
    """Replace this process by the lab probes' echo servers (``tcp/80 udp/53``).

    ``traffic`` ``TCP/UDP`` (ports) first starts the traffic driver's server
    as a child; it stays this process's child after the exec (container
    PID 1 is tini, which reaps whatever is left when the container stops).
    """
    if traffic is not None:
        tcp, _, udp = traffic.partition("/")
        if not (tcp.isdigit() and udp.isdigit()):
            raise SystemExit(f"--traffic {traffic!r}: want TCP_PORT/UDP_PORT")
        argv = [sys.executable, "-m", "chaos.traffic", "server", "--tcp-port", tcp]
        subprocess.Popen([*argv, "--udp-port", udp])
    os.execv(sys.executable, [sys.executable, "-c", probes._SERVER, *specs])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.compose", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the base (if needed) and the project image")
    build.add_argument("--base-image", default=LOCAL_BASE_IMAGE, help="FROM image")
    build.add_argument("--no-wheelhouse", action="store_true", help="pip install from PyPI")
    serve_p = sub.add_parser("serve", help="(in the server container) TCP/UDP echo servers")
    serve_p.add_argument("specs", nargs="+", help="tcp/PORT or udp/PORT")
    serve_p.add_argument("--traffic", metavar="TCP/UDP", help="also the traffic driver's server")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.specs, args.traffic)
    repo = Path(__file__).resolve().parent.parent
    try:
        report = build_images(repo, args.base_image, False if args.no_wheelhouse else None)
    except LabError as e:
        print(f"stockade: {e}", file=sys.stderr)
        return 1
    how = "reused" if report.reused else f"built in {report.image_seconds:.0f} s"
    print(f"{report.image} (also {DEFAULT_IMAGE}) from {report.base_image}: {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
