"""The lab state file: ``/run/stockade-lab/<name>/lab.json``.

Written by ``lab up`` (first with ``"status": "building"``, again after
each process starts, finally ``"up"``), read by ``lab status``, ``lab
down``, ``lab traffic`` and ``stockade status --lab NAME``.  Plain JSON,
schema ``version`` 1 (docs/lab.md lists the fields)::

    {"version": 1, "name": "lab", "status": "up", "mode": "standalone",
     "asymmetric": false, "base": "10.231", "cluster_id": "lab",
     "state_dir": "/run/stockade-lab/lab", "created": 1763800000.1,
     "namespaces": {"etcd": "stkl-lab-etcd", "fw1": "stkl-lab-fw1", ...},
     "root_if": "stkl-lab", "root_addr": "10.231.30.254",
     "etcd": {"endpoint": "10.231.30.2:2379", "namespace": "...", "pid": 1, "start": 2},
     "nodes": {"fw1": {"namespace": "...", "pid": 1, "start": 2, "config": "...",
               "log": "...", "control_socket": "...", "syncd_control_socket": "...",
               "sync_address": "10.231.30.11:7400", "mgmt": "10.231.30.11",
               "outside": "10.231.10.11", "inside": "10.231.20.11"}},
     "vips": [{"address": "10.231.10.101/24", "interface": "out0", "home": "fw1"}],
     "routes": {"rtr-up": {"dest": "10.231.2.0/24", "via": ["10.231.10.101", ...]}},
     "traffic": {"client_ns": "...", "server_ns": "...", "server_addr": "10.231.2.2",
                 "tcp_port": 8000, "udp_port": 8053, "server_pid": 1, "server_start": 2}}

``pid``/``start`` pairs: the start time (clock ticks since boot) guards
against signalling a recycled PID.  ``syncd_control_socket`` is null when
the node files carry no ``sync`` section (interim modes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from chaos.errors import LabError

RUN_ROOT = Path("/run/stockade-lab")
STATE_VERSION = 1


def state_dir(name: str, root: Path = RUN_ROOT) -> Path:
    return root / name


def state_path(name: str, root: Path = RUN_ROOT) -> Path:
    return state_dir(name, root) / "lab.json"


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically replace the state file (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_state(path: Path) -> dict[str, Any] | None:
    """The state, or None if there is no file; a corrupt file is a LabError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LabError(f"{path}: cannot read: {e.strerror}") from e
    try:
        state = json.loads(text)
    except ValueError as e:
        raise LabError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise LabError(f"{path}: not a version {STATE_VERSION} lab state file")
    return state


def recorded_processes(state: dict[str, Any] | None) -> list[tuple[int, int | None]]:
    """Every (pid, start) pair the state file records."""
    if not state:
        return []
    found: list[tuple[int, int | None]] = []
    entries = [state.get("etcd") or {}, *(state.get("nodes") or {}).values()]
    for entry in entries:
        if isinstance(entry.get("pid"), int):
            found.append((entry["pid"], entry.get("start")))
        if isinstance(entry.get("conntrackd_pid"), int):  # baseline labs
            found.append((entry["conntrackd_pid"], entry.get("conntrackd_start")))
    traffic = state.get("traffic") or {}
    if isinstance(traffic.get("server_pid"), int):
        found.append((traffic["server_pid"], traffic.get("server_start")))
    return found
