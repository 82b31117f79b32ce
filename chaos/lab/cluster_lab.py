"""``stockade lab up|down|status|traffic``: the N-node namespace lab.

``up`` renders the topology (``chaos.lab.topology``), writes certificates,
the rules and one node file per node (``chaos.lab.nodefiles``), builds the
namespaces (``chaos.lab.build``), starts etcd, the traffic server and
``stockade node run`` in each node namespace, and waits until every node is
ready.  Each step is recorded in the state file (``chaos.lab.state``) as it
happens, so ``down`` finds everything even after ``up`` crashed half-way.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from chaos.errors import LabError
from chaos.lab import build
from chaos.lab.build import LabNames, proc_start, same_process
from chaos.lab.nodefiles import MODES, Features, node_file, node_paths, rules_text
from chaos.lab.state import (
    RUN_ROOT,
    read_state,
    recorded_processes,
    state_dir,
    state_path,
    write_state,
)
from chaos.lab.topology import LabTopology, load_template, render

READY_TIMEOUT = 30.0
ETCD_NICE = -10  # the lab etcd's niceness: as syncd's (see _start_etcd)
# Popen objects of detached daemons, kept so they are not collected (and
# warned about) while this process lives; ``down`` stops them by PID.
_DETACHED: list[subprocess.Popen[bytes]] = []


def _spawn(ns: str, argv: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C or hang-up of `lab up` does not reach it.
            start_new_session=True,
        )
    _DETACHED.append(proc)
    return proc.pid


def probe_features(config: Path, candidates: list[Features]) -> Features:
    """The first candidate whose node file this tree's node loader accepts."""
    from node.config import load_node_config
    from node.errors import NodeError

    errors = []
    for features in candidates:
        text = config.read_text()
        doc = yaml.safe_load(text)
        if not features.cluster:
            doc.pop("cluster", None)
        if not features.sync:
            for key in ("sync", "cluster_id", "hold"):
                doc.pop(key, None)
        if not features.hold:
            doc.pop("hold", None)
        probe = config.with_name(config.stem + ".probe.yaml")
        probe.write_text(yaml.safe_dump(doc, sort_keys=False))
        try:
            load_node_config(str(probe))
            return features
        except NodeError as e:
            errors.append(f"{features.mode}: {e}")
        finally:
            probe.unlink()
    raise LabError("the node loader accepts none of the lab's node files: " + "; ".join(errors))


def _candidates(mode: str) -> list[Features]:
    modes = [m for m in reversed(MODES)] if mode == "auto" else [mode]
    out = []
    for m in modes:
        out += (
            [Features(m, True), Features(m, False)] if m != "standalone" else [Features(m, False)]
        )
    return out


class ClusterLab:
    def __init__(self, name: str, root: Path = RUN_ROOT) -> None:
        self.names = LabNames(name)
        self.name = name
        self.dir = state_dir(name, root)
        self.state_file = state_path(name, root)

    # --- up ----------------------------------------------------------------

    def up(
        self,
        nodes: int = 3,
        asymmetric: bool = False,
        topology: str | None = None,
        base: str = "10.231",
        mode: str = "auto",
        ready_timeout: float = READY_TIMEOUT,
        log: Any = print,
        system: str = "stockade",
        advert_int: float = 1.0,
        prometheus: bool = False,
    ) -> dict[str, Any]:
        from chaos.lab.baseline_lab import SYSTEMS

        if mode != "auto" and mode not in MODES:
            raise LabError(f"--mode must be auto or one of {', '.join(MODES)}")
        if system not in SYSTEMS:
            raise LabError(f"--system must be one of {', '.join(SYSTEMS)}")
        topo = render(load_template(topology), nodes, base, asymmetric)
        old = read_state(self.state_file)
        if old and old.get("status") == "up" and build.lab_namespaces(self.names):
            raise LabError(
                f"lab {self.name} is already up (`stockade lab down --name {self.name}`)"
            )
        if old or build.lab_namespaces(self.names) or self.dir.exists():
            log(f"removing leftovers of an earlier lab {self.name}")
            self.down()
        self._check_free(topo)
        state = self._initial_state(topo)
        state["topology"] = str(Path(topology).resolve()) if topology else None
        state["system"] = system
        try:
            if system == "stockade":
                self._up(topo, state, mode, ready_timeout, log)
                if prometheus:
                    self._start_prometheus(topo, state, log)
            else:
                self._up_baseline(topo, state, advert_int, ready_timeout, log)
        except BaseException:
            self._save_logs_hint(state, log)
            self.down(keep_logs=True)
            raise
        return state

    def _start_prometheus(self, topo: LabTopology, state: dict[str, Any], log: Any) -> None:
        from chaos.lab import prometheus

        mgmt = topo.root_segment or "mgmt"
        addresses = [node.address(mgmt) for node in topo.nodes]
        syncd = state.get("mode") in ("sync", "cluster")
        proc = prometheus.start(
            self.dir, state["etcd"]["namespace"], topo.etcd_address, addresses, syncd
        )
        _DETACHED.append(proc)
        url = f"http://{topo.etcd_address}:{prometheus.PROMETHEUS_PORT}"
        state["prometheus"] = {"pid": proc.pid, "start": proc_start(proc.pid), "url": url}
        write_state(self.state_file, state)
        prometheus.wait_targets(url, len(addresses) * (2 if syncd else 1))
        log(f"prometheus {url} scraping {len(addresses)} nodes, alert rules loaded")

    def _check_free(self, topo: LabTopology) -> None:
        if topo.root_addr is None:
            raise LabError("topology: the management segment needs root_addr (host-side CLIs)")
        net = str(ipaddress.ip_interface(topo.root_addr).network)
        if build.run(["ip", "-4", "route", "show", net], check=False).strip():
            raise LabError(f"{net} is already routed on this host (another lab?); try --base")

    def _initial_state(self, topo: LabTopology) -> dict[str, Any]:
        n = self.names
        mgmt = topo.root_segment or "mgmt"
        nodes = {}
        for node in topo.nodes:
            paths = node_paths(self.dir, node.node_id)
            nodes[node.node_id] = {
                "namespace": n.ns(node.host),
                "pid": None,
                "start": None,
                "config": str(paths.config),
                "log": str(paths.log),
                "control_socket": str(paths.control_socket),
                "syncd_control_socket": None,
                "sync_address": f"{node.address(mgmt)}:{topo.sync_port}",
                **{seg: addr.split("/")[0] for seg, _if, addr in node.interfaces},
            }
        return {
            "version": 1,
            "name": self.name,
            "status": "building",
            "mode": None,
            "asymmetric": topo.asymmetric,
            "base": topo.client_net.rsplit(".", 2)[0],
            "cluster_id": self.name,
            "state_dir": str(self.dir),
            "created": time.time(),
            "namespaces": {h: n.ns(h) for h in topo.hosts},
            "root_if": n.root_if,
            "root_addr": (topo.root_addr or "").split("/")[0],
            "etcd": {
                "endpoint": topo.etcd_endpoint,
                "namespace": n.ns(topo.etcd_host),
                "pid": None,
                "start": None,
            },
            "nodes": nodes,
            "vips": [
                {"address": v.address, "interface": v.interface, "home": v.home} for v in topo.vips
            ],
            "routes": {
                r.host: {"dest": r.dest, "via": list(r.via)} for r in topo.routes if len(r.via) > 1
            },
            "traffic": {
                "client_ns": n.ns(str(topo.traffic["client"])),
                "server_ns": n.ns(str(topo.traffic["server"])),
                "server_addr": topo.traffic["server_addr"],
                "tcp_port": topo.traffic["tcp_port"],
                "udp_port": topo.traffic["udp_port"],
                "server_pid": None,
                "server_start": None,
            },
        }

    def _up(
        self, topo: LabTopology, state: dict[str, Any], mode: str, timeout: float, log: Any
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_state(self.state_file, state)
        features = self._write_files(topo, state, mode)
        log(
            f"mode {features.mode}"
            + (" (interim: VIPs placed by the lab)" if features.static_vips else "")
        )
        t0 = time.monotonic()
        build.run_commands(build.build_commands(topo, self.names))
        if features.static_vips:
            build.run_commands(build.vip_commands(topo, self.names))
        log(f"network built in {time.monotonic() - t0:.1f} s ({len(topo.hosts)} namespaces)")
        self._start_etcd(topo, state)
        if features.cluster:
            self._apply_rules(state)
        self._start_traffic_server(state)
        for node in topo.nodes:
            entry = state["nodes"][node.node_id]
            argv = [sys.executable, "-m", "node.cli", "node", "run", "--config", entry["config"]]
            entry["pid"] = _spawn(entry["namespace"], argv, Path(entry["log"]))
            entry["start"] = proc_start(entry["pid"])
        write_state(self.state_file, state)
        self._wait_ready(topo, state, features, timeout)
        state["status"] = "up"
        write_state(self.state_file, state)
        log(f"lab {self.name} up: {len(topo.nodes)} nodes ready in {time.monotonic() - t0:.1f} s")

    def _up_baseline(
        self, topo: LabTopology, state: dict[str, Any], advert_int: float, timeout: float, log: Any
    ) -> None:
        """keepalived + conntrackd instead of Stockade (chaos.lab.baseline_lab)."""
        from chaos.lab import baseline_lab

        self.dir.mkdir(parents=True, exist_ok=True)
        state["mode"] = None
        state["advert_int"] = advert_int
        write_state(self.state_file, state)
        baseline_lab.write_files(topo, self.dir, advert_int)
        log(f"system {state['system']}, advert_int {advert_int:g} s")
        t0 = time.monotonic()
        build.run_commands(build.build_commands(topo, self.names))
        build.run_commands(baseline_lab.mcast_commands(topo, state["namespaces"]))
        self._start_traffic_server(state)
        for node_id in state["nodes"]:
            baseline_lab.start_node(state, node_id)
            write_state(self.state_file, state)
        deadline = time.monotonic() + timeout
        while True:
            ready = all(baseline_lab.node_ready(state, n) for n in state["nodes"])
            holders = vip_holders(state)
            home = all(
                holders.get(v["address"].split("/")[0]) == [v["home"]] for v in state["vips"]
            )
            if ready and home:
                break
            if time.monotonic() > deadline:
                raise LabError(f"baseline not ready after {timeout:g} s: VIP holders {holders}")
            time.sleep(0.1)
        state["status"] = "up"
        write_state(self.state_file, state)
        log(
            f"lab {self.name} up: {len(topo.nodes)} baseline nodes in {time.monotonic() - t0:.1f} s"
        )

    def _write_files(self, topo: LabTopology, state: dict[str, Any], mode: str) -> Features:
        from syncd.certs import init_certs
        from syncd.errors import SyncError

        try:
            init_certs(str(self.dir / "certs"), self.name, [n.node_id for n in topo.nodes])
        except SyncError as e:
            raise LabError(f"certs: {e}") from e
        (self.dir / "rules.yaml").write_text(rules_text(topo))
        full = Features("cluster", True)
        first = topo.nodes[0]
        config = node_paths(self.dir, first.node_id).config
        config.write_text(
            yaml.safe_dump(node_file(topo, first, self.name, self.dir, full), sort_keys=False)
        )
        features = probe_features(config, _candidates(mode))
        state["mode"] = features.mode
        for node in topo.nodes:
            paths = node_paths(self.dir, node.node_id)
            paths.state_dir.mkdir(parents=True, exist_ok=True)
            doc = node_file(topo, node, self.name, self.dir, features)
            paths.config.write_text(yaml.safe_dump(doc, sort_keys=False))
            if features.sync:
                state["nodes"][node.node_id]["syncd_control_socket"] = str(
                    paths.syncd_control_socket
                )
        write_state(self.state_file, state)
        return features

    def _start_etcd(self, topo: LabTopology, state: dict[str, Any]) -> None:
        from cluster.errors import ClusterError
        from cluster.etcd_server import ETCD_BINARY, LocalEtcd

        # LocalEtcd runs its binary directly; this wrapper runs etcd in the
        # lab's etcd namespace (same PID: setsid, ip netns exec and nice all
        # exec).  In production etcd has machines of its own; here it shares
        # two cores with three filters and the traffic, and every revocation
        # and VIP claim of a failover is an etcd round trip: it gets the
        # CPU share syncd has (nice -10, every thread), so a busy data plane
        # cannot stretch the failover through etcd.
        wrapper = self.dir / "etcd-in-netns"
        ns = state["etcd"]["namespace"]
        wrapper.write_text(
            f'#!/bin/sh\nexec setsid ip netns exec {ns} nice -n {ETCD_NICE} {ETCD_BINARY} "$@"\n'
        )
        wrapper.chmod(0o755)
        etcd = LocalEtcd(
            self.dir / "etcd",
            topo.etcd_client_port,
            topo.etcd_peer_port,
            "etcd",
            host=topo.etcd_address,
            binary=str(wrapper),
        )
        try:
            etcd.start()
        except ClusterError as e:
            raise LabError(f"etcd: {e}") from e
        assert etcd.pid is not None
        if etcd._proc is not None:  # detached: `down` stops it by PID
            _DETACHED.append(etcd._proc)
        state["etcd"].update(pid=etcd.pid, start=proc_start(etcd.pid), log=str(etcd.log_path))
        write_state(self.state_file, state)

    def _apply_rules(self, state: dict[str, Any]) -> None:
        argv = [sys.executable, "-m", "node.cli", "rules", "apply", "--etcd"]
        argv += [f"http://{state['etcd']['endpoint']}", "--cluster", self.name]
        build.run([*argv, str(self.dir / "rules.yaml"), "--comment", "lab up"], timeout=30)

    def _start_traffic_server(self, state: dict[str, Any]) -> None:
        t = state["traffic"]
        argv = [sys.executable, "-m", "chaos.traffic", "server"]
        argv += ["--tcp-port", str(t["tcp_port"]), "--udp-port", str(t["udp_port"])]
        log = self.dir / "traffic-server.log"
        t["server_pid"] = _spawn(t["server_ns"], argv, log)
        t["server_start"] = proc_start(t["server_pid"])
        write_state(self.state_file, state)

    def _wait_ready(
        self, topo: LabTopology, state: dict[str, Any], features: Features, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        waiting = dict(state["nodes"])
        while time.monotonic() < deadline:
            for node_id, entry in list(waiting.items()):
                if not same_process(entry["pid"], entry["start"]):
                    raise LabError(f"node {node_id} exited at start:\n{_tail(entry['log'])}")
                if _node_ready(node_id, entry, features):
                    del waiting[node_id]
            server = self.dir / "traffic-server.log"
            ok_server = b"traffic server ready" in server.read_bytes() if server.exists() else False
            placed = not features.cluster or (
                all(_status_up(state, node_id) for node_id in state["nodes"])
                and all(
                    v["home"] in vip_holders(state).get(v["address"].split("/")[0], [])
                    for v in state["vips"]
                )
            )
            if not waiting and ok_server and placed:
                return
            time.sleep(0.1)
        detail = "; ".join(f"{n}: {_tail(e['log'], 3)}" for n, e in waiting.items())
        raise LabError(
            f"not ready after {timeout:g} s: waiting for {sorted(waiting) or 'VIPs'} {detail}"
        )

    def _save_logs_hint(self, state: dict[str, Any], log: Any) -> None:
        logs = [e["log"] for e in state.get("nodes", {}).values() if Path(e["log"]).exists()]
        if logs:
            log("up failed; node logs: " + ", ".join(logs))

    # --- down ----------------------------------------------------------------

    def down(self, keep_logs: bool = False) -> list[str]:
        try:
            state = read_state(self.state_file)
        except LabError:
            state = None  # a corrupt file: clean up by names alone
        removed = build.teardown(self.names, recorded_processes(state))
        if self.dir.exists():
            if keep_logs:
                for child in self.dir.iterdir():
                    if child.suffix != ".log":
                        _remove(child)
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(f"state dir {self.dir}" + (" (logs kept)" if keep_logs else ""))
        return removed

    # --- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = read_state(self.state_file)
        present = build.lab_namespaces(self.names)
        if state is None:
            return {
                "name": self.name,
                "status": "absent" if not present else "leftovers",
                "leftover_namespaces": present,
            }
        from chaos.lab.restart import node_ready

        holders = vip_holders(state)
        etcd = state["etcd"]
        out: dict[str, Any] = {
            "name": self.name,
            "status": state["status"],
            "system": state.get("system", "stockade"),
            "mode": state["mode"],
            "asymmetric": state["asymmetric"],
            "namespaces": {h: ns in present for h, ns in state["namespaces"].items()},
            "etcd": {
                "endpoint": etcd["endpoint"],
                "alive": same_process(etcd["pid"], etcd["start"]) if etcd["pid"] else False,
                "healthy": etcd_healthy(etcd["endpoint"]),
            },
            "traffic_server": same_process(
                state["traffic"]["server_pid"] or 0, state["traffic"]["server_start"]
            ),
            "nodes": {},
            "vips": {},
        }
        for node_id, entry in state["nodes"].items():
            alive = bool(entry["pid"]) and same_process(entry["pid"], entry["start"])
            out["nodes"][node_id] = {
                "alive": alive,
                "ready": alive and node_ready(state, node_id),
                "vips": sorted(ip for ip, nodes in holders.items() if node_id in nodes),
            }
        for v in state["vips"]:
            ip = v["address"].split("/")[0]
            out["vips"][ip] = {"home": v["home"], "held_by": holders.get(ip, [])}
        return out

    def state(self) -> dict[str, Any]:
        state = read_state(self.state_file)
        if state is None:
            raise LabError(f"lab {self.name} is not up (no {self.state_file})")
        return state


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _node_ready(node_id: str, entry: dict[str, Any], features: Features) -> bool:
    from node.control import request
    from node.errors import NodeError

    try:
        if f"stockade node {node_id} ready".encode() not in Path(entry["log"]).read_bytes():
            return False
        request(entry["control_socket"], {"cmd": "stats"}, timeout=1.0)
        if features.sync and entry.get("syncd_control_socket"):
            reply = request(entry["syncd_control_socket"], {"cmd": "ping"}, timeout=1.0)
            return reply.get("status") == "ready"
    except (OSError, NodeError):
        return False
    return True


def _status_up(state: dict[str, Any], node_id: str) -> bool:
    """The cluster agent published ``status/<node>`` with state ``up`` (contract C)."""
    key = f"/stockade/{state['cluster_id']}/status/{node_id}"
    try:
        raw = etcd_get(state["etcd"]["endpoint"], key)
        return raw is not None and json.loads(raw).get("state") == "up"
    except (LabError, ValueError, AttributeError):
        return False


def vip_holders(state: dict[str, Any]) -> dict[str, list[str]]:
    """VIP address (no prefix) -> the nodes that carry it on an interface now."""
    vip_ips = {v["address"].split("/")[0] for v in state["vips"]}
    held: dict[str, list[str]] = {}
    for node_id, entry in state["nodes"].items():
        out = build.run(["ip", "-n", entry["namespace"], "-j", "-4", "addr", "show"], check=False)
        try:
            links = json.loads(out or "[]")
        except ValueError:
            continue
        for link in links:
            for a in link.get("addr_info", []):
                if a.get("local") in vip_ips:
                    held.setdefault(a["local"], []).append(node_id)
    return held


def etcd_healthy(endpoint: str) -> bool:
    from cluster.etcd_server import etcd_health

    host, port = endpoint.rsplit(":", 1)
    return etcd_health(host, int(port))


def etcd_get(endpoint: str, key: str, timeout: float = 1.0) -> bytes | None:
    """One key through etcd's JSON gateway (no etcd client library needed)."""
    host, port = endpoint.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()})
    try:
        conn.request("POST", "/v3/kv/range", body, {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise LabError(f"etcd {endpoint}: {e}") from e
    finally:
        conn.close()
    kvs = reply.get("kvs") or []
    return base64.b64decode(kvs[0]["value"]) if kvs else None
