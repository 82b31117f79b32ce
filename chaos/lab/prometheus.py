"""A real Prometheus for the namespace lab (``stockade lab up --prometheus``).

Debian's ``prometheus`` runs in the lab's etcd namespace, on the management
segment, so the host reaches its web UI and API at
``http://<etcd address>:9090`` through the lab's root-namespace interface.
It scrapes every node's filter (job ``stockade-node``) and syncd + agent
(job ``stockade-syncd``) every second and evaluates the shipped alert rules
(``ops/prometheus/alerts.yml`` and ``cluster-alerts.yml``, copied into the
lab's state directory), so an operator can watch the alerts fire during a
chaos run.  The config writer is pure; :func:`start` spawns the process
(``lab down`` kills everything in the lab's namespaces, Prometheus too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from chaos.errors import LabError
from chaos.lab.nodefiles import NODE_METRICS_PORT, SYNCD_METRICS_PORT

__all__ = ["PROMETHEUS_PORT", "config_text", "start", "wait_targets"]

PROMETHEUS_PORT: Final = 9090
RULE_FILES: Final = ("alerts.yml", "cluster-alerts.yml")
OPS_DIR: Final = Path(__file__).resolve().parents[2] / "ops" / "prometheus"


def config_text(node_addresses: Sequence[str], syncd: bool, rule_files: Sequence[str]) -> str:
    """prometheus.yml: both jobs over the nodes' management addresses, 1 s scrapes."""
    jobs: list[dict[str, Any]] = [
        {
            "job_name": "stockade-node",
            "static_configs": [{"targets": [f"{a}:{NODE_METRICS_PORT}" for a in node_addresses]}],
        }
    ]
    if syncd:
        jobs.append(
            {
                "job_name": "stockade-syncd",
                "static_configs": [
                    {"targets": [f"{a}:{SYNCD_METRICS_PORT}" for a in node_addresses]}
                ],
            }
        )
    doc = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": list(rule_files),
        "scrape_configs": jobs,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def start(
    state_dir: Path, namespace: str, listen_address: str, node_addresses: Sequence[str], syncd: bool
) -> subprocess.Popen[bytes]:
    """Write the config and rules into ``state_dir/prometheus`` and start Prometheus."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise LabError("prometheus not found (Debian package `prometheus`; ./dev.sh setup)")
    home = state_dir / "prometheus"
    (home / "data").mkdir(parents=True, exist_ok=True)
    for name in RULE_FILES:
        shutil.copy(OPS_DIR / name, home / name)
    config = home / "prometheus.yml"
    config.write_text(config_text(node_addresses, syncd, RULE_FILES))
    argv = ["ip", "netns", "exec", namespace, binary, f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address={listen_address}:{PROMETHEUS_PORT}",
            "--storage.tsdb.retention.time=1d"]  # fmt: skip
    log = (state_dir / "prometheus.log").open("ab")
    try:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def api(base: str, path: str) -> Any:
    """``GET {base}/api/v1/{path}``'s data (raises OSError / ValueError when it is not there)."""
    with urllib.request.urlopen(f"{base}/api/v1/{path}", timeout=2) as answer:
        body = json.loads(answer.read())
    if body.get("status") != "success":
        raise ValueError(f"prometheus: {body.get('error', body)}")
    return body["data"]


def wait_targets(base: str, expected: int, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until ``expected`` targets are up and the rules are loaded; return the targets."""
    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while time.monotonic() < deadline:
        try:
            targets = api(base, "targets")
            up = [t for t in targets["activeTargets"] if t["health"] == "up"]
            groups = api(base, "rules")["groups"]
            if len(up) >= expected and groups:
                return dict(targets)
            last = f"{len(up)}/{expected} targets up, {len(groups)} rule groups"
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.5)
    raise LabError(f"prometheus at {base}: not ready after {timeout:g} s ({last})")
