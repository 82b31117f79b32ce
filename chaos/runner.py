"""Run a chaos scenario on a namespace lab and judge it (``stockade chaos run``).

In order: bring up the lab the scenario asks for (or reuse one with
``--lab``), start the samplers (VIP holders on interfaces every 10 ms, etcd
claims every 20 ms, RSS every second), start the load in the client
namespace (``chaos.load``), play the steps at their times, wait for the load
to end, poll every live node's syncd ``digest`` until they agree or
``settle`` seconds pass, stop the samplers, check the invariants
(``chaos.invariants``), write ``<report dir>/<scenario>.json`` and return
the report.  The lab is removed at the end unless it was reused or
``keep`` is set.  Times in the report are seconds since the load started.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from chaos import invariants as inv
from chaos.errors import ChaosError
from chaos.lab.cluster_lab import ClusterLab
from chaos.scenario import Scenario
from chaos.steps import Executed, StepRunner

LOAD_GRACE: Final = 30.0  # seconds past the load's duration before it is killed
Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RunOptions:
    lab: str = "chaos"  # lab name
    base: str = "10.232"  # first two octets of the lab's addresses
    reuse: bool = False  # run on an existing lab named `lab` instead of building one
    keep: bool = False  # leave the lab up afterwards
    report_dir: Path | None = None  # where <scenario>.json goes (None: nowhere)
    mode: str | None = None  # override the scenario's lab mode
    vip_interval: float = 0.01  # seconds between interface samples
    claim_interval: float = 0.02  # seconds between etcd samples
    rss_interval: float = 1.0  # seconds between RSS samples
    ready_timeout: float = 40.0  # lab up


class ScenarioLab(ClusterLab):
    """The lab, with the scenario's filter table capacity written into each node file."""

    def __init__(self, name: str, table_capacity: int | None) -> None:
        super().__init__(name)
        self.table_capacity = table_capacity

    def _write_files(self, topo: Any, state: dict[str, Any], mode: str) -> Any:
        features = super()._write_files(topo, state, mode)
        if self.table_capacity is not None:
            for entry in state["nodes"].values():
                path = Path(entry["config"])
                doc = yaml.safe_load(path.read_text())
                doc.setdefault("table", {})["capacity"] = self.table_capacity
                path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return features


def _lab_up(s: Scenario, o: RunOptions, log: Log) -> dict[str, Any]:
    if o.reuse:
        state = ClusterLab(o.lab).state()
        if state.get("status") != "up":
            raise ChaosError(f"lab {o.lab} is not up")
        if len(state["nodes"]) != s.lab.nodes or state["asymmetric"] != s.lab.asymmetric:
            raise ChaosError(
                f"lab {o.lab} has {len(state['nodes'])} nodes, asymmetric "
                f"{state['asymmetric']}; {s.name} needs {s.lab.nodes}, {s.lab.asymmetric}"
            )
        if s.lab.table_capacity is not None:
            raise ChaosError(f"{s.name} needs its own lab (table capacity {s.lab.table_capacity})")
        return state
    lab = ScenarioLab(o.lab, s.lab.table_capacity)
    return lab.up(
        nodes=s.lab.nodes,
        asymmetric=s.lab.asymmetric,
        base=o.base,
        mode=o.mode or s.lab.mode,
        ready_timeout=o.ready_timeout,
        log=lambda m: log(f"lab: {m}"),
    )


def _start_load(s: Scenario, state: dict[str, Any], log_path: Path) -> subprocess.Popen[str]:
    t, ld = state["traffic"], s.load
    argv = ["ip", "netns", "exec", t["client_ns"], sys.executable, "-m", "chaos.load"]
    argv += ["--server", t["server_addr"], "--tcp-port", str(t["tcp_port"])]
    argv += ["--udp-port", str(t["udp_port"]), "--seconds", f"{ld.duration:g}"]
    argv += ["--long-lived", str(ld.long_lived), "--rate", f"{ld.rate:g}"]
    argv += ["--udp-rate", f"{ld.udp_rate:g}", "--interval", f"{ld.interval:g}"]
    with open(log_path, "w") as err:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)


def _digests(state: dict[str, Any], nodes: list[str]) -> dict[str, inv.Digest | str]:
    from node.control import request
    from node.errors import NodeError

    out: dict[str, inv.Digest | str] = {}
    for node in nodes:
        sock = state["nodes"][node].get("syncd_control_socket")
        if not sock:
            out[node] = "no syncd (standalone lab)"
            continue
        try:
            out[node] = request(sock, {"cmd": "digest"}, timeout=2.0)["origins"]
        except (OSError, NodeError, KeyError) as e:
            out[node] = f"digest failed: {e}"
    return out


def _converge(
    state: dict[str, Any], nodes: list[str], params: dict[str, Any]
) -> tuple[inv.Result, float]:
    settle = inv.params_for("replicas_converge", params)["settle"]
    t0 = time.monotonic()
    while True:
        result = inv.replicas_converge(_digests(state, nodes), params)
        waited = time.monotonic() - t0
        if result.passed or waited >= settle:
            return result, waited
        time.sleep(0.25)


def agent_events(state: Mapping[str, Any], since_wall: float) -> list[dict[str, Any]]:
    """The agents' events (contract C) written since the run began, oldest first."""
    prefix = f"/stockade/{state['cluster_id']}/events/".encode()
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    host, port = state["etcd"]["endpoint"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=2.0)
    body = {"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()}
    try:
        conn.request("POST", "/v3/kv/range", json.dumps(body))
        kvs = json.loads(conn.getresponse().read()).get("kvs") or []
    except (OSError, ValueError, http.client.HTTPException):
        return []
    finally:
        conn.close()
    events = []
    for kv in kvs:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            e = json.loads(base64.b64decode(kv["value"]))
            if float(e["ts"]) >= since_wall:
                events.append(e)
    return sorted(events, key=lambda e: float(e["ts"]))


def _tables(state: dict[str, Any], nodes: list[str]) -> dict[str, Any]:
    """Each live filter's flow table statistics (size, evictions, refusals) at the end."""
    from node.control import request
    from node.errors import NodeError

    out: dict[str, Any] = {}
    for node in nodes:
        try:
            out[node] = request(state["nodes"][node]["control_socket"], {"cmd": "stats"})["table"]
        except (OSError, NodeError, KeyError) as e:
            out[node] = {"error": str(e)}
    return out


def _attempts(traffic: dict[str, Any]) -> list[inv.Attempt]:
    return [inv.Attempt(a[0], a[1], bool(a[2]), a[3]) for a in traffic.get("churn_attempts", [])]


def run_scenario(s: Scenario, o: RunOptions, log: Log) -> dict[str, Any]:
    """Run ``s`` (lab up, load, steps, checks); the lab goes down after unless reused/kept."""
    wall0 = time.time()
    state = _lab_up(s, o, log)
    try:
        return _run(s, o, log, state, wall0)
    finally:
        if not o.reuse and not o.keep:
            ClusterLab(o.lab).down()


def _run(
    s: Scenario, o: RunOptions, log: Log, state: dict[str, Any], wall0: float
) -> dict[str, Any]:
    from chaos.samplers import ClaimSampler, RssSampler, VipSampler

    samplers: list[Any] = []
    load: subprocess.Popen[str] | None = None
    steps = StepRunner(o.lab, log)
    executed: list[Executed] = []
    try:
        ns = {n: e["namespace"] for n, e in state["nodes"].items()}
        vips = [v["address"].split("/")[0] for v in state["vips"]]
        vip_s = VipSampler(ns, vips, o.vip_interval)
        claim_s = ClaimSampler(
            state["etcd"]["endpoint"], f"/stockade/{state['cluster_id']}/vips/", o.claim_interval
        )
        rss_s = RssSampler(ns, o.rss_interval)
        samplers = [vip_s, claim_s, rss_s]
        for sampler in samplers:
            sampler.start()
        report_dir = o.report_dir or Path(state["state_dir"])
        report_dir.mkdir(parents=True, exist_ok=True)
        load = _start_load(s, state, report_dir / f"{s.name}.load.log")
        t0 = time.monotonic()
        log(f"load started: {s.load.duration:g} s; {len(s.steps)} steps")
        for step in s.steps:
            time.sleep(max(0.0, t0 + step.at - time.monotonic()))
            executed.append(steps.run(step))
        try:
            out, _ = load.communicate(timeout=max(0.0, t0 + s.load.duration - time.monotonic())
                                      + LOAD_GRACE)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise ChaosError(f"the load did not end {LOAD_GRACE:g} s after its duration") from e
        try:
            traffic = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise ChaosError(f"the load printed no summary (exit {load.returncode})") from e
        floods = steps.finish_background()
        live = sorted(set(state["nodes"]) - s.nodes_dead_at_end)
        results: dict[str, inv.Result] = {}
        converge_s = 0.0
        if "replicas_converge" in s.invariants:
            log("load done; waiting for the replicas to agree")
            results["replicas_converge"], converge_s = _converge(
                state, live, dict(s.invariants["replicas_converge"])
            )
        tables = _tables(state, live)
        time.sleep(0.2)  # a few samples of the settled state
    finally:
        for sampler in samplers:
            sampler.stop()
        if load is not None and load.poll() is None:
            load.kill()
            load.communicate()
        with contextlib.suppress(ChaosError):
            steps.finish_background()

    params = {k: dict(v) for k, v in s.invariants.items()}
    window = inv.params_for("new_connections", params.get("new_connections", {}))["window"]
    windows = inv.fault_windows([(e.start, e.end) for e in executed if e.step.disruptive], window)
    for name, p in params.items():
        if name == "established_flows":
            results[name] = inv.established_flows(traffic, p)
        elif name == "new_connections":
            results[name] = inv.new_connections(_attempts(traffic), windows, p)
        elif name == "single_vip_holder":
            results[name] = inv.single_vip_holder(vips, vip_s.samples, claim_s.samples, p)
        elif name == "memory_bounded":
            results[name] = inv.memory_bounded(rss_s.samples, p)
    failed = [f"{e.step.do} {e.step.node or ''}: {e.detail}" for e in executed if not e.ok]
    failed += [f"flood: {f['error']}" for f in floods if "error" in f]
    if failed:
        results["steps"] = inv.Result(
            "steps", False, f"{len(failed)} step(s) failed: " + "; ".join(failed)
        )
    events = agent_events(state, wall0)
    traffic.pop("churn_attempts", None)
    report = {
        "scenario": s.name,
        "description": s.description,
        "source": s.source,
        "quick": s.quick,
        "passed": all(r.passed for r in results.values()),
        "started_wall": wall0,
        "lab": {
            "name": o.lab,
            "mode": state["mode"],
            "nodes": len(state["nodes"]),
            "asymmetric": state["asymmetric"],
            "reused": o.reuse,
            "table_capacity": s.lab.table_capacity,
        },
        "load": asdict(s.load),
        "steps": [e.as_dict(t0) for e in executed],
        "fault_windows": [[round(a - t0, 3), round(b - t0, 3)] for a, b in windows],
        "converge_seconds": round(converge_s, 3),
        "invariants": {n: r.as_dict() for n, r in results.items()},
        "samplers": {type(x).__name__: _sampler_stats(x) for x in samplers},
        "floods": floods,
        "tables": tables,
        "failovers": [e for e in events if e.get("kind") == "failover"],
        "events": events[-200:],
        "traffic": _trim(traffic),
    }
    if o.report_dir is not None:
        path = o.report_dir / f"{s.name}.json"
        path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        report["report_file"] = str(path)
    return report


def _sampler_stats(x: Any) -> dict[str, Any]:
    return {
        "samples": len(x.samples),
        "errors": x.errors,
        "dropped": x.dropped,
        "last_error": x.last_error,
        # VipSampler: node-samples where an address was up but the node's ARP
        # guard had closed (a frozen agent): not counted as holding.
        **({"arp_held": x.arp_held} if hasattr(x, "arp_held") else {}),
    }


def _trim(traffic: dict[str, Any]) -> dict[str, Any]:
    out = dict(traffic)
    out["gap_events"] = traffic.get("gap_events", [])[:50]
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    lab = report["lab"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"{report['scenario']}{' (quick)' if report['quick'] else ''}: {verdict}  "
        f"[lab {lab['mode']}, {lab['nodes']} nodes"
        + (", asymmetric" if lab["asymmetric"] else "")
        + "]"
    ]
    for st in report["steps"]:
        mark = "ok" if st["ok"] else "FAILED"
        lines.append(
            f"  step t={st['started']:6.2f}s {st['do']} {st['node'] or ''} "
            f"({st['took_ms']:.0f} ms) {mark}: {st['detail']}"
        )
    for f in report["failovers"]:
        ms = f.get("duration_ms")
        took = f"{ms:.0f} ms" if isinstance(ms, int | float) else "duration unknown"
        lines.append(f"  failover on {f.get('node')}: {f.get('detail')}: {took}")
    for f in report["floods"]:
        lines.append(f"  flood: {f.get('sent')} SYNs in {f.get('seconds')} s {f.get('error', '')}")
        for node, t in report["tables"].items():
            lines.append(
                f"    {node} table: {t.get('entries')}/{t.get('capacity')} flows, "
                f"evicted {t.get('evicted_total')}, refused {t.get('refused_full_total')}"
            )
    for name, r in report["invariants"].items():
        lines.append(f"  {'PASS' if r['passed'] else 'FAIL'} {name}: {r['summary']}")
    return lines
