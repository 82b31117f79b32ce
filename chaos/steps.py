"""Play one scenario step on a running lab (the adapter behind ``chaos.runner``).

Node faults go through ``chaos.faults`` (kill, freeze, thaw, partition,
heal, loss, restart after kill); this module adds what is not a fault of one
node: a graceful restart (drain in cluster mode, SIGTERM, start again), a
rolling restart, etcd stop/start, a ruleset push and the SYN flood.

Every step returns an :class:`Executed` with its monotonic start and end
(the invariants use them as fault windows) and what it did, or what went
wrong: a step that fails is recorded, not raised, so the run still checks
its invariants and reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from chaos.errors import ChaosError
from chaos.scenario import Step

STOP_TIMEOUT: Final = 10.0
READY_TIMEOUT: Final = 30.0
RULES_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Executed:
    step: Step
    start: float  # CLOCK_MONOTONIC when it began
    end: float  # when it was done (flood: when the flood ends)
    ok: bool
    detail: str

    def as_dict(self, t0: float) -> dict[str, Any]:
        s = self.step
        return {
            "at": s.at,
            "do": s.do,
            "node": s.node,
            "started": round(self.start - t0, 3),
            "took_ms": round((self.end - self.start) * 1000, 1),
            "ok": self.ok,
            "detail": self.detail,
        }


def _running(pid: int, start: int | None) -> bool:
    """Alive and not a zombie; reaps the child if this process started it (``lab up``)."""
    from chaos.lab.build import same_process
    from chaos.lab.cluster_lab import _DETACHED

    for proc in _DETACHED:
        if proc.pid == pid:
            return proc.poll() is None
    if not same_process(pid, start):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class StepRunner:
    def __init__(self, lab: str, log: Callable[[str], None]) -> None:
        self.lab = lab
        self.log = log
        self.background: list[subprocess.Popen[str]] = []

    def state(self) -> dict[str, Any]:
        from chaos.lab.cluster_lab import ClusterLab

        return ClusterLab(self.lab).state()

    def run(self, step: Step) -> Executed:
        start = time.monotonic()
        try:
            detail, end = self._do(step)
            ok = True
        except ChaosError as e:
            detail, end, ok = f"failed: {e}", time.monotonic(), False
        self.log(f"step {step.do} {step.node or ''}: {detail}")
        return Executed(step, start, end or time.monotonic(), ok, detail)

    def _nodes(self, step: Step) -> list[str]:
        if step.node == "all":
            return sorted(self.state()["nodes"])
        assert step.node is not None
        return [step.node]

    def _do(self, step: Step) -> tuple[str, float | None]:
        from chaos.faults import Fault, inject

        do = step.do
        if do in ("kill", "freeze", "thaw"):
            injected = inject(self.lab, str(step.node), Fault(do))  # type: ignore[arg-type]
            return f"{do}: pids {list(injected.pids)}", None
        if do == "start":
            injected = inject(self.lab, str(step.node), Fault("restart"), wait=READY_TIMEOUT)
            return f"started, pid {list(injected.pids)}, ready", None
        if do in ("partition", "loss", "heal"):
            fault = Fault(do, etcd=not step.cut_etcd, probability=step.percent / 100)  # type: ignore[arg-type]
            nodes = self._nodes(step)
            for node in nodes:
                inject(self.lab, node, fault)
            return f"{fault} on {', '.join(nodes)}", None
        if do == "restart":
            return self.graceful_restart(str(step.node)), None
        if do == "rolling-restart":
            done = []
            for node in sorted(self.state()["nodes"]):
                done.append(f"{node}: {self.graceful_restart(node)}")
                time.sleep(step.gap)
            return "; ".join(done), None
        if do == "etcd-stop":
            return self.etcd_stop(), None
        if do == "etcd-start":
            return self.etcd_start(), None
        if do == "rules-push":
            return self.rules_push(step.extra_rule or "chaos-extra"), None
        if do == "flood":
            return self.flood(step), time.monotonic() + step.duration
        raise ChaosError(f"step {do!r} is not implemented")

    # --- graceful restart -------------------------------------------------------------

    def graceful_restart(self, node: str) -> str:
        from chaos.faults import Fault, inject
        from chaos.lab.build import namespace_pids

        state = self.state()
        entry = state["nodes"][node]
        drained = ""
        if state.get("mode") == "cluster" and entry.get("syncd_control_socket"):
            drained = self._drain(state, node)
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry["pid"]), signal.SIGTERM)
        deadline = t0 + STOP_TIMEOUT
        while namespace_pids(entry["namespace"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = namespace_pids(entry["namespace"])
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stopped = time.monotonic() - t0
        while namespace_pids(entry["namespace"]) and time.monotonic() < deadline + 2:
            time.sleep(0.05)
        inject(self.lab, node, Fault("restart"), wait=READY_TIMEOUT)
        killed = f", {len(left)} process(es) SIGKILLed" if left else ""
        return f"{drained}stopped in {stopped:.1f} s{killed}, ready again"

    def _drain(self, state: dict[str, Any], node: str) -> str:
        from chaos.lab.cluster_lab import vip_holders
        from node.control import request
        from node.errors import NodeError

        entry = state["nodes"][node]
        try:
            reply = request(entry["syncd_control_socket"], {"cmd": "drain"}, timeout=2.0)
        except (OSError, NodeError) as e:
            return f"drain refused ({e}); "
        t0 = time.monotonic()
        while time.monotonic() - t0 < STOP_TIMEOUT:
            if not any(node in h for h in vip_holders(state).values()):
                return f"drained in {time.monotonic() - t0:.1f} s; "
            time.sleep(0.05)
        return f"drain {reply.get('state')}: VIPs still held after {STOP_TIMEOUT:g} s; "

    # --- etcd --------------------------------------------------------------------------

    def etcd_stop(self) -> str:
        from chaos.lab.build import same_process

        etcd = self.state()["etcd"]
        pid = int(etcd["pid"])
        if not same_process(pid, etcd["start"]):
            raise ChaosError(f"etcd (pid {pid}) is not running")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        self._etcd_argv = [a.decode() for a in argv]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while _running(pid, etcd["start"]) and time.monotonic() < t0 + 5:
            time.sleep(0.01)
        return f"etcd pid {pid} killed ({(time.monotonic() - t0) * 1000:.0f} ms to exit)"

    def etcd_start(self) -> str:
        from chaos.lab.build import proc_start
        from chaos.lab.cluster_lab import _DETACHED, etcd_healthy
        from chaos.lab.state import state_path, write_state

        argv = getattr(self, "_etcd_argv", None)
        if not argv:
            raise ChaosError("etcd-start without an earlier etcd-stop")
        state = self.state()
        etcd = state["etcd"]
        log = open(etcd.get("log") or os.devnull, "ab")  # noqa: SIM115 (kept by the child)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", etcd["namespace"], *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _DETACHED.append(proc)
        etcd.update(pid=proc.pid, start=proc_start(proc.pid))
        write_state(state_path(self.lab, Path(state["state_dir"]).parent), state)
        t0 = time.monotonic()
        while not etcd_healthy(etcd["endpoint"]):
            if time.monotonic() - t0 > 10 or proc.poll() is not None:
                raise ChaosError(f"etcd did not come back (exit {proc.poll()})")
            time.sleep(0.05)
        return f"etcd pid {proc.pid} healthy after {time.monotonic() - t0:.2f} s"

    # --- rules -------------------------------------------------------------------------

    def rules_push(self, extra: str) -> str:
        from node.control import request
        from node.errors import NodeError

        state = self.state()
        lab_dir = Path(state["state_dir"])
        pushed = sorted(lab_dir.glob("rules-push-*.yaml"), key=lambda p: int(p.stem[11:]))
        base = (pushed[-1] if pushed else lab_dir / "rules.yaml").read_text()
        port = 9 + len(pushed)  # each push adds one rule: the count tells it was applied
        text = base + (
            f"  - name: {extra}-{port}\n"
            f"    from: {state['base']}.1.0/24\n"
            f"    to: {state['base']}.2.0/24\n"
            f"    proto: tcp\n    dport: {port}\n    action: drop\n"
        )
        path = lab_dir / f"rules-push-{port}.yaml"
        path.write_text(text)
        want = sum(1 for line in text.splitlines() if line.startswith("  - name:"))
        t0 = time.monotonic()
        if state.get("mode") == "cluster":
            argv = [sys.executable, "-m", "node.cli", "rules", "apply", "--etcd"]
            argv += [f"http://{state['etcd']['endpoint']}", "--cluster", state["cluster_id"]]
            done = subprocess.run(
                [*argv, str(path), "--comment", "chaos rules-push"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if done.returncode != 0:
                raise ChaosError(f"rules apply: {done.stderr.strip() or done.stdout.strip()}")
            how = "rules apply (etcd)"
        else:
            (lab_dir / "rules.yaml").write_text(text)
            for entry in state["nodes"].values():
                try:
                    request(entry["control_socket"], {"cmd": "reload"}, timeout=5.0)
                except (OSError, NodeError) as e:
                    raise ChaosError(f"reload: {e}") from e
            how = "reload on every node"
        waiting = set(state["nodes"])
        while waiting and time.monotonic() - t0 < RULES_TIMEOUT:
            for node in sorted(waiting):
                try:
                    stats = request(state["nodes"][node]["control_socket"], {"cmd": "stats"})
                except (OSError, NodeError):
                    continue
                if stats.get("ruleset", {}).get("rule_count") == want:
                    waiting.discard(node)
            time.sleep(0.05)
        if waiting:
            raise ChaosError(f"{how}: not applied on {', '.join(sorted(waiting))}")
        return f"{how}: {want} rules on every node after {time.monotonic() - t0:.2f} s"

    # --- flood -------------------------------------------------------------------------

    def flood(self, step: Step) -> str:
        t = self.state()["traffic"]
        base = self.state()["base"]
        argv = ["ip", "netns", "exec", t["client_ns"], sys.executable, "-m", "chaos.flood"]
        argv += ["--server", t["server_addr"], "--port", str(t["tcp_port"])]
        argv += ["--source-net", f"{base}.1.0/24", "--sources", str(step.sources)]
        argv += ["--rate", str(step.rate), "--seconds", str(step.duration)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.background.append(proc)
        return f"SYN flood {step.rate:g}/s for {step.duration:g} s from {step.sources} sources"

    def finish_background(self) -> list[dict[str, Any]]:
        """Wait for background tools (floods); their JSON results."""
        results = []
        for proc in self.background:
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            try:
                result = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                result = {}
            if proc.returncode != 0:
                result.update(error=(err or out).strip()[-500:], exit=proc.returncode)
            results.append(result)
        self.background.clear()
        return results
