"""``stockade demo``: a three-node cluster, live traffic, one node killed.

What a new user should see in one command, on a machine with nothing but
this repository:

1. the namespace lab (``stockade lab up``): etcd, three firewall nodes
   (filter + syncd + cluster agent each), ECMP routers, a client, a server;
2. the traffic driver on the client: long-lived TCP connections echoing
   every millisecond, a churn of new connections, UDP request/reply, ping;
3. a node killed mid-run (every process SIGKILLed, links down: a dead
   machine), its VIPs taken over by the others;
4. the failover report, measured on the end hosts (which connections
   crossed the dead node, how long each stalled, whether any was reset),
   then ``stockade status`` of the surviving cluster.

The lab is left running to explore, with the commands to do so.  The exit
status is 0 only when no connection was reset or lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chaos.errors import LabError
from chaos.failover_report import GapRecord, ProbeKind, evaluate_gaps, percentile
from chaos.faults import Fault, inject
from chaos.lab.cluster_lab import ClusterLab

__all__ = ["DemoOutcome", "demo_outcome", "run_cluster_demo"]


@dataclass(frozen=True, slots=True)
class DemoOutcome:
    """What the end hosts saw around the fault (all times in seconds)."""

    connections: int  # long-lived connections in the run
    affected: int  # those whose stall spans the fault: they crossed the dead node
    resumed: int  # affected ones that delivered again before the run ended
    resets: int  # connections reset (any time)
    stalls: tuple[float, ...]  # fault -> delivering again, per resumed affected connection
    unrelated_stalls: int  # stalls not spanning the fault (should be 0)

    @property
    def clean(self) -> bool:
        return self.resets == 0 and self.resumed == self.affected


# Echoes already in flight when the node died still arrive for a few ms:
# a stall that starts this soon after the fault began is the fault's.
IN_FLIGHT = 0.050


def demo_outcome(summary: Mapping[str, Any], fault_at: float) -> DemoOutcome:
    """Read the traffic driver's JSON summary against the fault time (pure).

    The per-flow judgement is the failover bench's
    (:func:`chaos.failover_report.evaluate_gaps`); this only adapts the
    traffic driver's gap events to it.
    """
    long_lived = summary["long_lived"]
    events: Sequence[Mapping[str, Any]] = summary.get("gap_events", [])
    gaps = [GapRecord(f"tcp-{g['conn']}", "tcp", g["start"], g["end"]) for g in events]
    conns = set(range(long_lived["connections"])) | {g["conn"] for g in events}
    flows: list[tuple[str, ProbeKind]] = [(f"tcp-{c}", "tcp") for c in sorted(conns)]
    window_end = summary.get("ended", fault_at + 3600.0)
    trial = evaluate_gaps("stockade", "kill", 1, "", flows, gaps, (), fault_at, window_end,
                          slack=IN_FLIGHT)  # fmt: skip
    affected = [o for o in trial.outcomes if o.affected]
    resumed = [o for o in affected if not o.lost and o.latency is not None]
    return DemoOutcome(
        connections=long_lived["connections"],
        affected=len(affected),
        resumed=len(resumed),
        resets=long_lived["resets"],
        stalls=tuple(sorted(o.latency for o in resumed if o.latency is not None)),
        unrelated_stalls=len({g.flow for g in gaps} - {o.flow for o in affected}),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def report_text(outcome: DemoOutcome, summary: Mapping[str, Any], victim: str) -> str:
    stalls = list(outcome.stalls)
    churn, udp, ping = (summary.get(k, {}) for k in ("churn", "udp", "ping"))
    lines = [
        f"FAILOVER REPORT ({victim} killed; measured on the client)",
        f"  long-lived TCP connections: {outcome.connections}, "
        f"through {victim}: {outcome.affected}, resumed: {outcome.resumed}, "
        f"reset: {outcome.resets}",
        f"  {victim}'s connections, fault -> delivering again: "
        f"p50 {_ms(percentile(stalls, 50))}, max {_ms(max(stalls, default=None))} "
        "(includes TCP's retransmission timer, RFC 6298)",
        f"  other stalls over 100 ms: {outcome.unrelated_stalls}",
        f"  new TCP connections: {churn.get('ok', 0)} ok, {churn.get('failed', 0)} failed; "
        f"UDP: {udp.get('ok', 0)} ok, {udp.get('failed', 0)} failed; "
        f"ping: {ping.get('ok', 0)} ok, {ping.get('failed', 0)} failed",
        "  verdict: " + ("no connection lost" if outcome.clean else "CONNECTIONS LOST (see above)"),
    ]
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _traffic(state: Mapping[str, Any], seconds: float, long_lived: int) -> subprocess.Popen[str]:
    t = state["traffic"]
    argv = ["ip", "netns", "exec", t["client_ns"], sys.executable, "-m", "chaos.traffic"]
    argv += ["client", "--server", t["server_addr"], "--tcp-port", str(t["tcp_port"])]
    argv += ["--udp-port", str(t["udp_port"]), "--seconds", str(seconds)]
    argv += ["--long-lived", str(long_lived), "--rate", "20", "--udp-rate", "20", "--json"]
    # Progress lines go to stderr (inherited: the user watches them live).
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def run_cluster_demo(
    name: str = "demo",
    nodes: int = 3,
    victim: str = "fw2",
    seconds: float = 12.0,
    kill_after: float = 4.0,
    long_lived: int = 16,
    base: str = "10.231",
) -> int:
    if not 0 < kill_after < seconds:
        raise LabError("the kill must happen during the traffic run")
    lab = ClusterLab(name)
    _say(f"building the {nodes}-node lab {name!r} (etcd, nodes, routers, client, server)")
    state = lab.up(nodes=nodes, base=base, log=lambda m: print(f"    {m}", flush=True))
    if victim not in state.get("nodes", {}):
        raise LabError(f"no node {victim} in lab {name}")
    _say(f"traffic for {seconds:g} s: {long_lived} long-lived TCP connections + churn + UDP")
    traffic = _traffic(state, seconds, long_lived)
    time.sleep(kill_after)
    injected = inject(state, victim, Fault("kill"))
    _say(f"killed {victim}: every process SIGKILLed and its links down")
    try:
        out, _ = traffic.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        traffic.kill()
        raise LabError("the traffic driver did not finish") from None
    try:
        summary = json.loads(out)
    except json.JSONDecodeError:
        raise LabError(
            f"the traffic driver printed no summary (exit {traffic.returncode})"
        ) from None
    outcome = demo_outcome(summary, injected.at)
    saved = lab.dir / "demo-traffic.json"
    saved.write_text(json.dumps({"fault": injected.as_dict(), "traffic": summary}, indent=1))
    print()
    print(report_text(outcome, summary, victim), flush=True)
    print()
    _say(f"stockade status --lab {name}")
    subprocess.run([sys.executable, "-m", "node.cli", "status", "--lab", name], check=False)
    print()
    print(
        f"The lab is still running.  Try:\n"
        f"  stockade status --lab {name} --follow      # live view and event stream\n"
        f"  stockade lab fault --name {name} {victim} restart   # bring {victim} back\n"
        f"  stockade lab traffic --name {name} --seconds 10\n"
        f"  stockade flows --lab {name} --limit 20\n"
        f"and remove it with:  stockade lab down --name {name}",
        flush=True,
    )
    return 0 if outcome.clean else 1
