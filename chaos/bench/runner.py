"""One system's failover trials in the namespace lab.

For a system (Stockade, or keepalived+conntrackd at one ``advert_int``):
lab up, probe flows up, then per trial: pick the victim (round robin over
the nodes that carry probe traffic now), inject the fault (its
``CLOCK_MONOTONIC`` time is the probes' clock), wait until every stalled
flow delivered again or the deadline, evaluate the trial from the probes'
gap records (:func:`chaos.failover_report.evaluate_gaps`), recover the
victim (restart after kill, thaw after freeze, heal after partition), and
wait until the cluster
settled (nodes ready, every VIP on its home node only, no probe flow
silent for a while) before the next trial.

The decisions are pure functions (:func:`next_victim`, :func:`restored`,
:func:`open_gaps`); :func:`run_system` does the I/O.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chaos.bench.probe_reader import BenchError, ProbeRun, Tick
from chaos.errors import ChaosError
from chaos.failover_phases import Phases, failover_phases
from chaos.failover_report import GapRecord, ProbeKind, TrialResult, evaluate_gaps

if TYPE_CHECKING:
    from chaos.faults import Fault

BENCH_FAULTS = ("kill", "freeze", "partition")
CARRIER_PACKETS = 50  # packets per CARRIER_WINDOW that mean "carries probe flows"
CARRIER_WINDOW = 0.2
QUIET = 1.0  # seconds without a silent probe flow before a fault
STUCK_AFTER = 8.0  # a flow silent this long while the cluster looks settled is dead


class FlowsStuck(BenchError):
    """The cluster settled but some probe flows never delivered again (recovery lost them)."""

    def __init__(self, flows: list[str]) -> None:
        super().__init__(f"flows silent for more than {STUCK_AFTER:g} s after recovery: {flows}")
        self.flows = flows


@dataclass(frozen=True, slots=True)
class SystemSpec:
    system: str  # "stockade" or "keepalived-conntrackd"
    advert_int: float | None = None  # baseline only

    @property
    def label(self) -> str:
        if self.advert_int is None:
            return self.system
        return f"{self.system} advert_int {self.advert_int:g}s"


@dataclass(frozen=True, slots=True)
class BenchSettings:
    trials: int
    fault: str  # kill | freeze | partition
    nodes: int = 3
    tcp_flows: int = 8
    udp_flows: int = 8
    stall_after: float = 0.02
    deadline: float = 15.0  # seconds after the fault to wait for the flows
    settle_timeout: float = 60.0
    lab_name: str = "fbench"
    base: str = "10.238"


def next_victim(nodes: Sequence[str], carriers: Sequence[str], last: str | None) -> str | None:
    """The next carrier after ``last`` in node order (round robin); None: no carrier."""
    if not carriers:
        return None
    start = nodes.index(last) + 1 if last in nodes else 0
    for i in range(len(nodes)):
        node = nodes[(start + i) % len(nodes)]
        if node in carriers:
            return node
    return None


def restored(tick: Tick, fault_at: float, min_wait: float) -> bool:
    """Every probe flow delivers again (and the tick is late enough to have seen stalls)."""
    return tick.now >= fault_at + min_wait and not tick.stalled


def open_gaps(tick: Tick, flows: Mapping[str, ProbeKind], fault_at: float) -> list[GapRecord]:
    """Flows still silent at the end of the window, as gaps without an end."""
    return [
        GapRecord(name, flows[name], last if last is not None else fault_at, None)
        for name, last in tick.stalled.items()
        if name in flows
    ]


def forwarded_packets(link_json: str, skip: Sequence[str]) -> int:
    """Packets the node sent on its data links (``ip -j -s link`` output), except ``skip``.

    Transmit counters, not receive: a bridge floods frames for unknown MACs
    (after a restart, say) to every port, so a node receives traffic it does
    not carry; it only sends what it forwards, plus a few VRRP adverts and
    ARP replies a second."""
    total = 0
    for link in json.loads(link_json or "[]"):
        if link.get("ifname") in ("lo", *skip):
            continue
        total += int(link.get("stats64", {}).get("tx", {}).get("packets", 0))
    return total


def _forwarded(ns: str, mgmt_if: str) -> int:
    from chaos.lab.build import run

    out = run(["ip", "-n", ns, "-j", "-s", "link", "show"], check=False)
    try:
        return forwarded_packets(out, [mgmt_if])
    except (ValueError, TypeError, AttributeError):
        return 0


def carriers(state: Mapping[str, Any]) -> list[str]:
    """Nodes that forward probe traffic now (hundreds of packets in the window;
    VRRP and ARP are a few)."""
    from chaos.faults import node_mgmt_if

    nss = {n: (e["namespace"], node_mgmt_if(state, n)) for n, e in state["nodes"].items()}
    before = {n: _forwarded(ns, m) for n, (ns, m) in nss.items()}
    time.sleep(CARRIER_WINDOW)
    return [n for n, (ns, m) in nss.items() if _forwarded(ns, m) - before[n] >= CARRIER_PACKETS]


def vips_home(state: Mapping[str, Any]) -> bool:
    from chaos.lab.cluster_lab import vip_holders

    holders = vip_holders(dict(state))
    return all(holders.get(v["address"].split("/")[0]) == [v["home"]] for v in state["vips"])


def wait_settled(lab: str, probe: ProbeRun, timeout: float, log: Callable[[str], None]) -> float:
    """Until every node is ready, every VIP is home only and the probes are quiet."""
    from chaos.lab.cluster_lab import ClusterLab
    from chaos.lab.restart import node_ready

    t0 = time.monotonic()
    deadline = t0 + timeout
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        state = ClusterLab(lab).state()
        tick = probe.tick()
        ok = all(node_ready(state, n) for n in state["nodes"]) and vips_home(state)
        if ok and tick is not None and not tick.stalled:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET:
                return time.monotonic() - t0
        else:
            quiet_since = None
        if ok and tick is not None and tick.stalled:
            stuck = [
                name
                for name, last in tick.stalled.items()
                if last is not None and tick.now - last > STUCK_AFTER
            ]
            if stuck:
                raise FlowsStuck(sorted(stuck))
        time.sleep(0.1)
    tick = probe.tick()
    stalled = sorted(tick.stalled) if tick else "?"
    raise BenchError(f"lab {lab} did not settle in {timeout:g} s (silent flows: {stalled})")


def bench_fault(kind: str) -> Fault:
    """The bench's fault of that name.  ``partition`` cuts the node's management
    link with etcd included: a node isolated from its peers and etcd (a dead
    switch port), which must fence itself while the others take over; its
    data links stay up."""
    from chaos.faults import Fault  # late, as the other lab imports here

    if kind not in BENCH_FAULTS:
        raise BenchError(f"fault {kind!r}: not one of {', '.join(BENCH_FAULTS)}")
    return Fault(kind, etcd=kind != "partition")  # type: ignore[arg-type]


def taken_over(
    holders: Mapping[str, Sequence[str]], vips: Sequence[Mapping[str, Any]], victim: str
) -> bool:
    """Every VIP whose home is ``victim`` is held by another node too (or instead)."""
    return all(
        any(n != victim for n in holders.get(v["address"].split("/")[0], []))
        for v in vips
        if v["home"] == victim
    )


def _wait_restored(
    lab: str, victim: str, probe: ProbeRun, fault_at: float, s: BenchSettings
) -> tuple[Tick, float | None]:
    """Until the victim's VIPs are taken over and every probe flow delivers again, or
    the deadline.  Returns the last tick and when the takeover was first seen.

    Waiting for the takeover matters for ``freeze``: with the kernel still
    forwarding (the baseline; Stockade's fast path) established flows may
    not stall at all, but the fault is only over once another node holds
    the VIPs: recovering earlier would test nothing."""
    from chaos.lab.cluster_lab import ClusterLab, vip_holders

    state = ClusterLab(lab).state()
    min_wait = 3 * s.stall_after + 0.1
    moved_at: float | None = None
    while True:
        if moved_at is None and taken_over(vip_holders(state), state["vips"], victim):
            moved_at = time.monotonic()
        tick = probe.wait_tick_after(fault_at)
        if moved_at is not None and restored(tick, fault_at, min_wait):
            return tick, moved_at
        if tick.now >= fault_at + s.deadline:
            return tick, moved_at
        time.sleep(0.05)


class _Probe:
    """The running probe, started again when a recovery killed some of its flows."""

    def __init__(
        self, state: Mapping[str, Any], s: BenchSettings, log_path: str, record: str | None
    ):
        t = state["traffic"]
        self.ns = t["client_ns"]
        self.argv = ["--server", t["server_addr"], "--tcp-port", str(t["tcp_port"])]
        self.argv += ["--udp-port", str(t["udp_port"]), "--tcp-flows", str(s.tcp_flows)]
        self.argv += ["--udp-flows", str(s.udp_flows), "--stall-after", str(s.stall_after)]
        self.log_path, self.record = log_path, record
        self.run: ProbeRun | None = None
        self.flows: list[tuple[str, ProbeKind]] = []
        self.restarts = 0
        # Flows a recovery killed: (trial after which, flow names).
        self.lost_in_recovery: list[tuple[int, list[str]]] = []
        self.trial = 0  # the trial whose recovery is running (0: lab up)

    def start(self) -> ProbeRun:
        self.stop()
        self.run = ProbeRun(self.ns, self.argv, self.log_path, self.record)
        self.flows = self.run.wait_ready(15.0)
        return self.run

    def stop(self) -> None:
        if self.run is not None:
            self.run.stop()
            self.run = None


def settle(lab: str, probe: _Probe, s: BenchSettings, log: Callable[[str], None]) -> float:
    """wait_settled; flows a recovery killed are counted and the probe starts again."""
    assert probe.run is not None
    try:
        return wait_settled(lab, probe.run, s.settle_timeout, log)
    except FlowsStuck as e:
        probe.restarts += 1
        probe.lost_in_recovery.append((probe.trial, e.flows))
        log(f"  {e}; starting the probe flows again (not part of any trial's figures)")
        probe.start()
        return wait_settled(lab, probe.run, s.settle_timeout, log)


def run_trials(
    lab: str,
    spec: SystemSpec,
    s: BenchSettings,
    probes: _Probe,
    log: Callable[[str], None],
) -> list[TrialResult]:
    from chaos.faults import inject, recover
    from chaos.lab.cluster_lab import ClusterLab

    results: list[TrialResult] = []
    last: str | None = None
    for trial in range(1, s.trials + 1):
        state = ClusterLab(lab).state()
        nodes = sorted(state["nodes"])
        victim = next_victim(nodes, carriers(state), last)
        if victim is None:
            raise BenchError("no node carries probe traffic (is the probe running?)")
        last = victim
        fault = bench_fault(s.fault)
        probe, flows = probes.run, probes.flows
        assert probe is not None
        kinds = dict(flows)
        probes.trial = trial
        injected = inject(lab, victim, fault)
        # The agents stamp their events with the wall clock: the fault's wall time.
        fault_wall = time.time() - (time.monotonic() - injected.at)
        tick, moved_at = _wait_restored(lab, victim, probe, injected.at, s)
        gaps = probe.gaps() + open_gaps(tick, kinds, injected.at)
        result = evaluate_gaps(
            spec.label,
            s.fault,
            trial,
            victim,
            flows,
            gaps,
            probe.resets(),
            injected.at,
            tick.now,
            takeover=None if moved_at is None else moved_at - injected.at,
        )
        lat = "-" if result.latency is None else f"{result.latency * 1000:.0f} ms"
        path = "-" if result.path_restore is None else f"{result.path_restore * 1000:.0f} ms"
        took = "never" if moved_at is None else f"{(moved_at - injected.at) * 1000:.0f} ms"
        recovered = recover(lab, victim, fault, wait=s.settle_timeout)
        settled_in = settle(lab, probes, s, log)
        # Read after settling: the agents write their events asynchronously.
        phases = trial_phases(state, spec, victim, fault_wall, tick.now - injected.at)
        if phases is not None:
            result = dataclasses.replace(result, phases=phases)
        results.append(result)
        log(
            f"{spec.label} {s.fault} trial {trial}/{s.trials}: {victim} at {injected.at:.3f}, "
            f"{result.affected} flows affected, {result.lost} lost, TCP {lat}, path {path}, "
            f"VIPs taken over {took}{describe_phases(phases)}; "
            f"recovered by {recovered.fault.kind}, settled in {settled_in:.1f} s"
        )
    return results


def trial_phases(
    state: Mapping[str, Any], spec: SystemSpec, victim: str, fault_wall: float, observed: float
) -> Phases | None:
    """The survivors' own account of the trial (Stockade's agents write events to
    etcd), over the ``observed`` seconds after the fault."""
    from chaos.runner import agent_events

    if spec.system != "stockade":
        return None
    return failover_phases(agent_events(state, fault_wall), victim, fault_wall, observed)


def describe_phases(phases: Phases | None) -> str:
    """`` (agents: suspected +102, revoked +121, claimed +158 ms)`` or nothing."""
    if phases is None:
        return ""
    steps = {"suspected": phases.suspected, "revoked": phases.revoked, "claimed": phases.claimed}
    text = ", ".join(f"{name} +{v * 1000:.0f}" for name, v in steps.items() if v is not None)
    return f" (agents: {text} ms)" if text else " (agents: no events)"


@dataclass(frozen=True, slots=True)
class SystemRun:
    results: list[TrialResult]
    # Probe flows that went silent for good while a victim was recovered
    # (failback) and the cluster otherwise looked settled: (after trial, flows).
    lost_in_recovery: list[tuple[int, list[str]]]


def run_system(
    spec: SystemSpec,
    s: BenchSettings,
    log: Callable[[str], None],
    record: str | None = None,
) -> SystemRun:
    """Lab up for ``spec``, trials, lab down (also on failure).  ``record``: file for
    the probe's event lines (all but the quiet ticks)."""
    from chaos.lab.cluster_lab import ClusterLab

    lab = ClusterLab(s.lab_name)
    log(f"{spec.label}: lab up ({s.nodes} nodes)")
    try:
        state = lab.up(
            nodes=s.nodes,
            base=s.base,
            mode="cluster",
            system=spec.system,
            advert_int=spec.advert_int or 1.0,
            ready_timeout=60.0,
            log=lambda m: log(f"  {m}"),
        )
    except ChaosError as e:
        raise BenchError(f"{spec.label}: lab up failed: {e}") from e
    probe = _Probe(state, s, str(lab.dir / "probe.log"), record)
    try:
        probe.start()
        settle(s.lab_name, probe, s, log)
        results = run_trials(s.lab_name, spec, s, probe, log)
        return SystemRun(results, list(probe.lost_in_recovery))
    finally:
        probe.stop()
        if probe.restarts:
            log(f"{spec.label}: probe flows started again {probe.restarts} time(s) after recovery")
        lab.down()
