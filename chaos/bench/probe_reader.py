"""Run the probe (``chaos.bench.probe``) in the client namespace and follow its lines.

A reader thread parses the probe's JSON lines as they come and keeps what
the bench asks for: gap records, resets, and the latest tick (which flows
are silent right now).  Everything is bounded by the run: a few events per
trial.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chaos.errors import ChaosError
from chaos.failover_report import GapRecord, ProbeKind

MAX_EVENTS = 100_000  # gaps + resets kept; more are counted


class BenchError(ChaosError):
    """The failover bench could not run (probe failed, lab did not settle)."""


@dataclass(slots=True)
class Tick:
    now: float
    stalled: dict[str, float | None]


@dataclass(slots=True)
class _Seen:
    flows: list[tuple[str, ProbeKind]] = field(default_factory=list)
    ready: bool = False
    failed: str | None = None
    gaps: list[GapRecord] = field(default_factory=list)
    resets: list[tuple[str, float]] = field(default_factory=list)
    dropped: int = 0
    tick: Tick | None = None
    end: dict[str, Any] | None = None
    bad_lines: int = 0


class ProbeRun:
    def __init__(
        self, ns: str, argv: Sequence[str], log_path: str, record: str | None = None
    ) -> None:
        full = ["ip", "netns", "exec", ns, sys.executable, "-m", "chaos.bench.probe", *argv]
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            full, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True
        )
        self._lock = threading.Lock()
        self._seen = _Seen()
        # Every line but the quiet ticks, for auditing a run afterwards.
        self._record = open(record, "a") if record else None  # noqa: SIM115 - closed in stop()
        self._thread = threading.Thread(target=self._read, name="probe-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._record is not None and '"stalled":{}' not in line:
                self._record.write(line)
            try:
                doc = json.loads(line)
                self._apply(doc)
            except (ValueError, KeyError, TypeError):
                with self._lock:
                    self._seen.bad_lines += 1

    def _apply(self, doc: dict[str, Any]) -> None:
        ev = doc["ev"]
        with self._lock:
            s = self._seen
            if ev == "tick":
                s.tick = Tick(float(doc["now"]), dict(doc["stalled"]))
            elif ev == "gap":
                if len(s.gaps) + len(s.resets) < MAX_EVENTS:
                    s.gaps.append(GapRecord(doc["flow"], doc["kind"], doc["start"], doc["end"]))
                else:
                    s.dropped += 1
            elif ev == "reset":
                if len(s.gaps) + len(s.resets) < MAX_EVENTS:
                    s.resets.append((doc["flow"], float(doc["at"])))
                else:
                    s.dropped += 1
            elif ev == "ready":
                s.flows = [(str(name), kind) for name, kind in doc["flows"]]
                s.ready = True
            elif ev == "failed":
                s.failed = f"flows never delivered: {', '.join(doc['stalled'])}"
            elif ev == "end":
                s.end = doc

    def wait_ready(self, timeout: float) -> list[tuple[str, ProbeKind]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._seen.ready:
                    return list(self._seen.flows)
                if self._seen.failed:
                    raise BenchError(f"probe: {self._seen.failed}")
            if self.proc.poll() is not None:
                raise BenchError(f"probe exited with {self.proc.returncode} before it was ready")
            time.sleep(0.05)
        raise BenchError(f"probe not ready after {timeout:g} s")

    def tick(self) -> Tick | None:
        with self._lock:
            return self._seen.tick

    def gaps(self) -> list[GapRecord]:
        with self._lock:
            return list(self._seen.gaps)

    def resets(self) -> list[tuple[str, float]]:
        with self._lock:
            return list(self._seen.resets)

    def wait_tick_after(self, t: float, timeout: float = 2.0) -> Tick:
        """The first tick taken after monotonic time ``t``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tick = self.tick()
            if tick is not None and tick.now > t:
                return tick
            if self.proc.poll() is not None:
                raise BenchError(f"probe exited with {self.proc.returncode}")
            time.sleep(0.01)
        raise BenchError("probe stopped ticking")

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout)
        self._log.close()
        if self._record is not None:
            self._record.close()
        with self._lock:
            return self._seen.end
