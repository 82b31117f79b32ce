"""Fault injection on lab nodes: kill, freeze, thaw, partition, heal, loss, restart.

API (used by ``stockade lab fault``, the failover bench and the chaos
scenarios)::

    injected = inject(lab, "fw2", Fault("kill"))     # lab: name or lab.json dict
    injected.at                                      # CLOCK_MONOTONIC, fault begins
    recover(lab, "fw2", injected.fault)              # kill->restart, freeze->thaw,
                                                     # partition/loss->heal

What each fault does to the node's network namespace (every process in it
is the node's: the filter and its syncd for Stockade, keepalived and
conntrackd for the baseline):

* ``kill``: SIGSTOP every process, then SIGKILL them, then take every link
  of the namespace down: a machine that died.  Stopping first means no
  process sees another die: Stockade's supervisor does not respawn syncd,
  keepalived's parent does not respawn its VRRP child, and an orphaned
  VRRP child never sends its priority-0 "I am leaving" advert (which would
  be a graceful handover, not a failure; DESIGN.md section 4).  Links go
  down last: a link-down alone makes keepalived hand over by itself.
* ``freeze`` / ``thaw``: SIGSTOP / SIGCONT every process.  The kernel keeps
  forwarding: for the baseline (kernel conntrack) a freeze stops only the
  control plane; for Stockade (userspace NFQUEUE filter) it stops the data
  plane too.
* ``partition``: DROP on the management interface (sync links, conntrackd
  multicast), both ways, in a chain of its own (``STKL-FAULT``, jumped to
  from INPUT and OUTPUT).  ``etcd=True`` (default) exempts traffic to and
  from etcd, so only the peers are cut; ``etcd=False`` cuts etcd too.
* ``loss P``: drop a fraction P (iptables ``statistic``) on the management
  interface, both ways, with the same ``etcd`` exemption.
* ``heal``: remove the chain (ends ``partition`` and ``loss``).
* ``restart``: start the node again the way the lab does, after what a
  reboot would do: VIPs that software placed are gone, links come up.
  Refused while the node still has processes.

:func:`plan` is pure (a :class:`NodeView` and a :class:`Fault` in, the steps
out); :func:`inject` reads the node's processes and links, runs the steps
and returns when they ran.  ``Injected.at`` is the monotonic time just
before the first step (the fault begins; ``done`` is after the last, a few
milliseconds later), on the same clock as the traffic driver's gap events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from chaos.errors import LabError

__all__ = [
    "FAULT_KINDS",
    "Command",
    "Fault",
    "Injected",
    "NodeView",
    "Signal",
    "inject",
    "node_view",
    "parse_fault",
    "plan",
    "recover",
]

FaultKind = Literal["kill", "freeze", "thaw", "partition", "heal", "loss", "restart"]
FAULT_KINDS: Final = ("kill", "freeze", "thaw", "partition", "heal", "loss", "restart")
CHAIN: Final = "STKL-FAULT"
DEFAULT_MGMT_IF: Final = "mgmt0"
# What undoes what (``recover``); thaw, heal and restart are recoveries themselves.
RECOVERY: Final[Mapping[str, str]] = {
    "kill": "restart",
    "freeze": "thaw",
    "partition": "heal",
    "loss": "heal",
}


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    # partition / loss: leave traffic to and from etcd alone (only peers are cut).
    etcd: bool = True
    # loss: fraction of packets dropped on the management interface, (0, 1].
    probability: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise LabError(f"fault must be one of {', '.join(FAULT_KINDS)}, not {self.kind!r}")
        if self.kind == "loss" and not 0 < self.probability <= 1:
            raise LabError(f"loss probability {self.probability} is not in (0, 1]")
        if self.kind != "loss" and self.probability:
            raise LabError(f"only loss takes a probability, not {self.kind}")

    def __str__(self) -> str:
        text: str = self.kind
        if self.kind == "loss":
            text += f" {self.probability:g}"
        if self.kind in ("partition", "loss") and not self.etcd:
            text += " (etcd too)"
        return text


def parse_fault(words: Sequence[str], etcd: bool = True) -> Fault:
    """``["kill"]``, ``["loss", "0.2"]``, ``["loss", "5%"]`` -> a Fault (LabError if bad)."""
    if not words:
        raise LabError("no fault given")
    kind, *rest = words
    if kind not in FAULT_KINDS:
        raise LabError(f"fault must be one of {', '.join(FAULT_KINDS)}, not {kind!r}")
    if kind == "loss":
        if len(rest) != 1:
            raise LabError("loss takes one argument: a probability (0.1 or 10%)")
        text = rest[0]
        try:
            p = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise LabError(f"loss probability {text!r} is not a number") from None
        return Fault("loss", etcd=etcd, probability=p)
    if rest:
        raise LabError(f"{kind} takes no argument (got {' '.join(rest)})")
    return Fault(kind, etcd=etcd)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the planner needs to know about one node, read from the host."""

    node_id: str
    namespace: str
    pids: tuple[int, ...]  # every process in the node's namespace
    links: tuple[str, ...]  # its interfaces except lo
    mgmt_if: str  # sync / conntrackd interface
    etcd_address: str  # exempted by partition/loss with etcd=True
    chain_installed: bool  # STKL-FAULT exists and is jumped to


@dataclass(frozen=True, slots=True)
class Signal:
    pids: tuple[int, ...]
    signum: int


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    input: str | None = None  # stdin (ip -batch, iptables-restore)


Step = Signal | Command


def _links(ns: str, links: Sequence[str], state: str) -> Command:
    # One `ip -batch` call: every link changes within a millisecond or so.
    script = "".join(f"link set {name} {state}\n" for name in links)
    return Command(("ip", "-n", ns, "-batch", "-"), script)


def _chain_rules(view: NodeView, fault: Fault) -> list[str]:
    match = ["-m", "statistic", "--mode", "random", "--probability", f"{fault.probability:.6f}"]
    extra = " ".join(match) + " " if fault.kind == "loss" else ""
    keep_in = f"! -s {view.etcd_address} " if fault.etcd else ""
    keep_out = f"! -d {view.etcd_address} " if fault.etcd else ""
    return [
        f"-A {CHAIN} -i {view.mgmt_if} {keep_in}{extra}-j DROP",
        f"-A {CHAIN} -o {view.mgmt_if} {keep_out}{extra}-j DROP",
    ]


def _restore(view: NodeView, lines: Sequence[str]) -> Command:
    script = "\n".join(["*filter", *lines, "COMMIT", ""])
    return Command(
        ("ip", "netns", "exec", view.namespace, "iptables-restore", "-w", "5", "--noflush"),
        script,
    )


def plan(view: NodeView, fault: Fault) -> list[Step]:
    """The steps that inject ``fault`` on the node (pure).  ``restart`` is not planned
    here (it depends on the system the lab runs; see :func:`inject`)."""
    if fault.kind == "kill":
        steps: list[Step] = []
        if view.pids:
            steps += [Signal(view.pids, signal.SIGSTOP), Signal(view.pids, signal.SIGKILL)]
        if view.links:
            steps.append(_links(view.namespace, view.links, "down"))
        return steps
    if fault.kind == "freeze":
        return [Signal(view.pids, signal.SIGSTOP)] if view.pids else []
    if fault.kind == "thaw":
        return [Signal(view.pids, signal.SIGCONT)] if view.pids else []
    if fault.kind in ("partition", "loss"):
        # Declaring the chain in --noflush mode flushes it if it exists: a
        # partition over a loss replaces it instead of stacking.
        lines = [f":{CHAIN} - [0:0]"]
        if not view.chain_installed:
            lines += [f"-I INPUT 1 -j {CHAIN}", f"-I OUTPUT 1 -j {CHAIN}"]
        return [_restore(view, lines + _chain_rules(view, fault))]
    if fault.kind == "heal":
        if not view.chain_installed:
            return []
        lines = [f":{CHAIN} - [0:0]", f"-D INPUT -j {CHAIN}", f"-D OUTPUT -j {CHAIN}"]
        return [_restore(view, [*lines, f"-X {CHAIN}"])]
    raise LabError(f"{fault.kind}: not a planned fault")


# --- adapter -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Injected:
    node: str
    fault: Fault
    at: float  # CLOCK_MONOTONIC just before the first step: the fault begins
    done: float  # after the last step
    pids: tuple[int, ...] = ()  # processes signalled (restart: the new ones)
    steps: tuple[str, ...] = field(default=())  # what ran, for logs

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "fault": str(self.fault),
            "at": self.at,
            "done": self.done,
            "pids": list(self.pids),
            "steps": list(self.steps),
        }


def _state(lab: str | Mapping[str, Any]) -> dict[str, Any]:
    from chaos.lab.cluster_lab import ClusterLab

    name = lab if isinstance(lab, str) else str(lab["name"])
    return ClusterLab(name).state()


def _describe(step: Step) -> str:
    if isinstance(step, Signal):
        return f"{signal.Signals(step.signum).name} {' '.join(map(str, step.pids))}"
    body = f" <<< {step.input.strip()!r}" if step.input else ""
    return " ".join(step.argv) + body


def execute(steps: Sequence[Step]) -> tuple[float, float]:
    """Run the steps; return (monotonic before the first, after the last).

    Every command is started before the first step and only then fed its
    input (``ip -batch``, ``iptables-restore`` act on what they read), so
    the steps follow each other within a millisecond or two: a kill cuts
    the links right after the processes stop, not a process start later.
    """
    procs: dict[int, subprocess.Popen[str]] = {}
    try:
        for i, step in enumerate(steps):
            if isinstance(step, Command):
                procs[i] = subprocess.Popen(
                    list(step.argv),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
    except OSError as e:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        raise LabError(f"cannot start a fault command: {e}") from e
    at = time.monotonic()
    for i, step in enumerate(steps):
        if isinstance(step, Signal):
            for pid in step.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, step.signum)
            continue
        proc = procs[i]
        try:
            _out, err = proc.communicate(step.input or "", timeout=20)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise LabError(f"{' '.join(step.argv)}: timed out") from e
        if proc.returncode != 0:
            raise LabError(f"{' '.join(step.argv)}: exit {proc.returncode}: {err.strip()}")
    return at, time.monotonic()


def node_mgmt_if(state: Mapping[str, Any], node: str) -> str:
    """The node's management (sync) interface, from the lab's topology."""
    from chaos.lab.restart import lab_topology

    try:
        topo = lab_topology(state)
        segment = topo.root_segment or "mgmt"
        for seg, ifname, _addr in topo.node(node).interfaces:
            if seg == segment:
                return ifname
    except (LabError, KeyError, OSError):
        pass
    return DEFAULT_MGMT_IF


def node_view(state: Mapping[str, Any], node: str) -> NodeView:
    """Read the node's processes, links and fault chain from the host."""
    from chaos.lab.build import namespace_pids, run

    entry = (state.get("nodes") or {}).get(node)
    if entry is None:
        known = ", ".join(sorted(state.get("nodes") or {}))
        raise LabError(f"lab {state.get('name')} has no node {node!r} (nodes: {known})")
    ns = entry["namespace"]
    links_json = run(["ip", "-n", ns, "-j", "link", "show"], check=False) or "[]"
    try:
        links = tuple(
            str(link["ifname"]) for link in json.loads(links_json) if link["ifname"] != "lo"
        )
    except (ValueError, KeyError, TypeError) as e:
        raise LabError(f"cannot read the links of {ns}: {e}") from e
    own = os.getpid()
    pids = tuple(sorted(p for p in namespace_pids(ns) if p != own))
    check = ["ip", "netns", "exec", ns, "iptables", "-w", "5", "-C", "INPUT", "-j", CHAIN]
    installed = subprocess.run(check, capture_output=True).returncode == 0
    return NodeView(
        node_id=node,
        namespace=ns,
        pids=pids,
        links=links,
        mgmt_if=node_mgmt_if(state, node),
        etcd_address=str(state["etcd"]["endpoint"]).rsplit(":", 1)[0],
        chain_installed=installed,
    )


def inject(
    lab: str | Mapping[str, Any], node: str, fault: Fault, wait: float | None = 30.0
) -> Injected:
    """Inject ``fault`` on ``node`` of the lab (a name, or its lab.json dict).

    ``wait``: for ``restart``, seconds to wait until the node is ready (None: do not)."""
    state = _state(lab)
    view = node_view(state, node)
    if fault.kind == "restart":
        return _restart(state, view, fault, wait)
    steps = plan(view, fault)
    at, done = execute(steps)
    signalled = view.pids if fault.kind in ("kill", "freeze", "thaw") else ()
    return Injected(node, fault, at, done, signalled, tuple(_describe(s) for s in steps))


def recover(
    lab: str | Mapping[str, Any], node: str, fault: Fault, wait: float | None = 30.0
) -> Injected:
    """Undo ``fault`` on ``node``: restart after kill, thaw after freeze, heal after
    partition/loss.  ``wait``: seconds to wait for a restarted node to be ready."""
    undo = RECOVERY.get(fault.kind)
    if undo is None:
        raise LabError(f"{fault.kind} is a recovery itself; nothing undoes it")
    state = _state(lab)
    view = node_view(state, node)
    if undo == "restart":
        return _restart(state, view, Fault("restart"), wait)
    back = Fault(undo)  # type: ignore[arg-type]
    steps = plan(view, back)
    at, done = execute(steps)
    return Injected(node, back, at, done, view.pids if undo == "thaw" else (), ())


def _restart(
    state: dict[str, Any], view: NodeView, fault: Fault, wait: float | None = 30.0
) -> Injected:
    from chaos.lab.restart import restart_node

    if view.pids:
        raise LabError(
            f"{view.node_id} still runs processes {', '.join(map(str, view.pids))}: "
            "kill it before restarting it"
        )
    at = time.monotonic()
    pids, steps = restart_node(state, view.node_id, view.links, wait)
    return Injected(view.node_id, fault, at, time.monotonic(), pids, steps)
