"""Node configuration: built once from a YAML file (+ CLI flags), frozen, passed down.

Library code never reads files or the environment for configuration; only
``node.cli`` calls :func:`load_node_config`.  Every field is validated on
construction and an invalid file is refused with :class:`ConfigError` naming
the field.

Example file (all keys but ``node_id`` and ``rules`` are optional)::

    node_id: fw1
    rules: rules.yaml            # relative to this file
    queue: {num: 0, bypass: false}
    hooks: [FORWARD]
    fast_path: {enabled: true, sample_per_second: 1}
    table: {capacity: 262144, tcp_liberal: false, tcp_loose: false,  # liberal: true if sync
            timeouts: {udp: 30, tcp_established: 432000}}
    control_socket: /run/stockade/fw1.sock
    metrics: {listen: "127.0.0.1:9641"}     # Prometheus endpoint; absent = off
    flow_log: {path: /var/log/stockade/flows.jsonl, rate_per_second: 1000,
               burst: 2000, max_bytes: 104857600}   # absent = off

Cluster keys (see docs/syncd.md and docs/asymmetric.md)::

    cluster_id: lab              # required with `sync`
    hold: {timeout: 0.1, max_packets: 2048, max_flows: 512}
    sync:                        # absent = standalone node: no syncd, no hold queue
      supervise: true            # `node run` starts and restarts syncd itself
      listen: 10.30.0.11:7400    # ... and every other key of a syncd file
      state_dir: /var/lib/stockade/fw1
      local_socket: /run/stockade/fw1-sync.sock
    cluster: {...}               # requires `sync`; validated with it by syncd's loader

``sync`` (with ``node_id``, ``cluster_id`` and ``cluster``) is validated by
:func:`syncd.config.from_node_mapping`, so a bad file fails at
``node run`` with the same field errors ``syncd run`` would give.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import yaml

from node.errors import ConfigError
from node.flow.table import TableConfig
from node.flow.timeouts import Timeouts

if TYPE_CHECKING:
    from syncd.config import SyncdConfig

_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_HOOKS = ("FORWARD", "INPUT", "OUTPUT")


@dataclass(frozen=True, slots=True)
class QueueConfig:
    # NFQUEUE number the node binds; iptables sends filtered packets there.
    num: int = 0
    # Fail open: when no process is bound (node down), the kernel accepts
    # packets instead of dropping them (iptables --queue-bypass).
    bypass: bool = False
    # Maximum packets the kernel holds for us before it drops (kernel queue
    # length; overflow shows in /proc/net/netfilter/nfnetlink_queue).
    max_len: int = 4096

    def __post_init__(self) -> None:
        if not 0 <= self.num <= 65535:
            raise ConfigError(f"queue.num must be 0..65535, not {self.num}")
        if not 1 <= self.max_len <= 1 << 20:
            raise ConfigError(f"queue.max_len must be 1..1048576, not {self.max_len}")


@dataclass(frozen=True, slots=True)
class FastPathConfig:
    # Let the kernel accept ordinary data packets of flows the engine has
    # accepted and seen established (connmark), instead of queueing each one.
    enabled: bool = True
    # Packets per second per direction of an offloaded flow still sent to
    # userspace (iptables hashlimit) so the flow table sees the flow alive.
    sample_per_second: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.sample_per_second <= 1000:
            raise ConfigError(
                f"fast_path.sample_per_second must be 1..1000, not {self.sample_per_second}"
            )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Address the Prometheus endpoint binds (an IP literal: no DNS at start).
    # Loopback by default: the metrics describe the traffic, expose them on purpose.
    host: str = "127.0.0.1"
    # TCP port of the endpoint; 0 lets the kernel pick one (tests).
    port: int = 9641

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"metrics.listen: {self.host!r} is not an IP address") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics.listen: port must be 0..65535, not {self.port}")

    @classmethod
    def from_listen(cls, listen: str) -> MetricsConfig:
        """Parse ``host:port`` (IPv6 as ``[addr]:port``)."""
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"metrics.listen: expected HOST:PORT, not {listen!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"metrics.listen: write IPv6 as [ADDR]:PORT, not {listen!r}")
        return cls(host, int(port))


FLOW_LOG_MIN_BYTES = 4096


@dataclass(frozen=True, slots=True)
class FlowLogConfig:
    # JSON-lines file the flow log appends to; rotated to PATH.1 when full.
    path: str
    # Lines per second written on average; beyond it lines are suppressed
    # (counted, and reported in the log as "suppressed" lines).
    rate_per_second: float = 1000.0
    # Lines that may be written at once above the rate (token bucket depth).
    burst: int = 2000
    # The file is rotated before it would grow past this many bytes, so the
    # flow log never holds more than about twice this on disk.
    max_bytes: int = 100 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("flow_log.path: required, a file path")
        if not 0 < self.rate_per_second <= 1_000_000:
            raise ConfigError(
                f"flow_log.rate_per_second must be in (0, 1000000], not {self.rate_per_second}"
            )
        if not 1 <= self.burst <= 1_000_000:
            raise ConfigError(f"flow_log.burst must be 1..1000000, not {self.burst}")
        if self.max_bytes < FLOW_LOG_MIN_BYTES:
            raise ConfigError(
                f"flow_log.max_bytes must be at least {FLOW_LOG_MIN_BYTES}, not {self.max_bytes}"
            )


@dataclass(frozen=True, slots=True)
class HoldConfig:
    # Seconds a packet without local state waits for its flow's replica
    # (asymmetric routing: the other direction went through another node).
    # A packet dropped instead costs its sender a retransmission (1 s for a
    # SYN-ACK, 200 ms at least for data): waiting longer only costs when the
    # replica is slow, and under load it is (3-node lab, every flow
    # asymmetric: 20 ms let 40 % of held packets expire, 100 ms 1 %).
    timeout: float = 0.1
    # Packets held at once, all flows together; beyond it: no hold (counted).
    max_packets: int = 2048
    # Distinct flow keys held at once; beyond it: no hold (counted).
    max_flows: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 1.0:
            raise ConfigError(f"hold.timeout must be in (0, 1] seconds, not {self.timeout}")
        if not 1 <= self.max_packets <= 1 << 20:
            raise ConfigError(f"hold.max_packets must be 1..1048576, not {self.max_packets}")
        if not 1 <= self.max_flows <= self.max_packets:
            raise ConfigError(
                f"hold.max_flows must be 1..max_packets ({self.max_packets}), not {self.max_flows}"
            )


@dataclass(frozen=True, slots=True)
class SyncSection:
    # syncd's configuration, built by syncd's own loader from this file.
    syncd: SyncdConfig
    # The node file it came from: a supervised syncd is started with it.
    config_file: str | None
    # True: `node run` starts syncd as a child and restarts it when it dies;
    # False: someone else runs syncd (the filter only connects to it).
    supervise: bool = True
    # A `cluster` section is present (etcd membership, VIPs: syncd's agent).
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.supervise and not self.config_file:
            raise ConfigError("sync.supervise needs the config file the node was loaded from")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    # Short stable node name: used in chain comments, sync, metrics labels.
    node_id: str
    # Path of the rules file (YAML, see node.policy).
    rules_path: str
    queue: QueueConfig = field(default_factory=QueueConfig)
    # Netfilter hooks whose packets go through the engine.
    hooks: tuple[str, ...] = ("FORWARD",)
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)
    table: TableConfig = field(default_factory=TableConfig)
    # Unix socket for `stockade rules reload` / stats queries; None = off.
    control_socket: str | None = None
    # Prometheus endpoint (node.metrics); None = off.
    metrics: MetricsConfig | None = None
    # JSON-lines flow log (node.flowlog); None = off.
    flow_log: FlowLogConfig | None = None
    # Cluster id (certificates, etcd prefix); required with `sync`.
    cluster_id: str | None = None
    # Asymmetric-routing hold queue; used only with `sync`.
    hold: HoldConfig = field(default_factory=HoldConfig)
    # Sync daemon link (and its supervision); None = standalone node.
    sync: SyncSection | None = None

    def __post_init__(self) -> None:
        if not _NODE_ID.match(self.node_id):
            raise ConfigError(f"node_id {self.node_id!r} must be 1-31 chars of a-z, 0-9 and '-'")
        if self.sync is not None:
            if self.sync.syncd.node_id != self.node_id:
                raise ConfigError("sync: syncd's node_id differs from the node's")
            if self.sync.syncd.cluster_id != self.cluster_id:
                raise ConfigError("sync: syncd's cluster_id differs from the node's")
        if not self.hooks:
            raise ConfigError("hooks must name at least one of FORWARD, INPUT, OUTPUT")
        for hook in self.hooks:
            if hook not in _HOOKS:
                raise ConfigError(f"hooks: {hook!r} is not one of {', '.join(_HOOKS)}")


def _section(raw: Mapping[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    value = raw.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return dict(value)


def _typed(section: str, values: dict[str, Any], types: Mapping[str, type]) -> dict[str, Any]:
    for key, value in values.items():
        want = types[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{section}.{key}: expected {want.__name__}, got {value!r}")
    return values


def node_config_from_mapping(
    raw: Mapping[str, Any], base_dir: str = ".", source: str | None = None
) -> NodeConfig:
    """Build a :class:`NodeConfig` from parsed YAML; relative paths use ``base_dir``.

    ``source`` is the file ``raw`` was read from (a supervised syncd reads it too).
    """
    allowed = {"node_id", "rules", "queue", "hooks", "fast_path", "table", "control_socket"}
    allowed |= {"metrics", "flow_log", "cluster_id", "hold", "sync", "cluster"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    for required in ("node_id", "rules"):
        if not isinstance(raw.get(required), str):
            raise ConfigError(f"{required}: required, a string")
    queue = _typed(
        "queue",
        _section(raw, "queue", {"num", "bypass", "max_len"}),
        {"num": int, "bypass": bool, "max_len": int},
    )
    fast = _typed(
        "fast_path",
        _section(raw, "fast_path", {"enabled", "sample_per_second"}),
        {"enabled": bool, "sample_per_second": int},
    )
    table_raw = _section(raw, "table", {"capacity", "tcp_liberal", "tcp_loose", "timeouts"})
    timeouts_raw = table_raw.pop("timeouts", None) or {}
    if not isinstance(timeouts_raw, dict):
        raise ConfigError("table.timeouts: expected a mapping")
    _typed("table", table_raw, {"capacity": int, "tcp_liberal": bool, "tcp_loose": bool})
    if "sync" in raw:
        # A clustered node may see only one direction of a flow (asymmetric
        # routing, or a flow taken over mid-stream): the unseen side's window
        # is never learned here, so strict tracking would drop its packets as
        # out of window.  The kernel needs nf_conntrack_tcp_be_liberal for the
        # same reason (conntrackd's documentation).  An explicit false stays.
        table_raw.setdefault("tcp_liberal", True)
    if "capacity" in table_raw and table_raw["capacity"] < 1:
        raise ConfigError(f"table.capacity must be positive, not {table_raw['capacity']}")
    hooks = raw.get("hooks", ["FORWARD"])
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        raise ConfigError("hooks: expected a list of chain names")
    control = raw.get("control_socket")
    if control is not None and not isinstance(control, str):
        raise ConfigError("control_socket: expected a path")
    return NodeConfig(
        node_id=raw["node_id"],
        rules_path=os.path.join(base_dir, raw["rules"]),
        queue=QueueConfig(**queue),
        hooks=tuple(h.upper() for h in hooks),
        fast_path=FastPathConfig(**fast),
        table=TableConfig(timeouts=Timeouts.from_mapping(timeouts_raw), **table_raw),
        control_socket=os.path.join(base_dir, control) if control else None,
        metrics=_metrics(raw),
        flow_log=_flow_log(raw, base_dir),
        cluster_id=_cluster_id(raw),
        hold=_hold(raw),
        sync=_sync(raw, base_dir, source),
    )


def _cluster_id(raw: Mapping[str, Any]) -> str | None:
    value = raw.get("cluster_id")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"cluster_id: expected a string, got {value!r}")
    return value


def _hold(raw: Mapping[str, Any]) -> HoldConfig:
    section = _section(raw, "hold", {"timeout", "max_packets", "max_flows"})
    if isinstance(section.get("timeout"), int) and not isinstance(section["timeout"], bool):
        section["timeout"] = float(section["timeout"])
    _typed("hold", section, {"timeout": float, "max_packets": int, "max_flows": int})
    return HoldConfig(**section)


def _sync(raw: Mapping[str, Any], base_dir: str, source: str | None) -> SyncSection | None:
    """Validate ``sync`` and ``cluster`` with syncd's own loader (its node-file entry)."""
    if raw.get("sync") is None and raw.get("cluster") is None:
        return None
    from syncd.config import from_node_mapping
    from syncd.errors import ConfigError as SyncdConfigError

    try:
        syncd = from_node_mapping(raw, base_dir)
    except SyncdConfigError as e:
        raise ConfigError(str(e)) from None
    if syncd is None:  # cannot happen: a sync section is present
        raise ConfigError("sync: expected a mapping")
    sync = raw["sync"]
    supervise = sync.get("supervise", True)  # type-checked by from_node_mapping
    return SyncSection(syncd, source, supervise, raw.get("cluster") is not None)


def _metrics(raw: Mapping[str, Any]) -> MetricsConfig | None:
    if raw.get("metrics") is None:
        return None
    section = _typed("metrics", _section(raw, "metrics", {"listen"}), {"listen": str})
    return MetricsConfig.from_listen(section["listen"]) if "listen" in section else MetricsConfig()


def _flow_log(raw: Mapping[str, Any], base_dir: str) -> FlowLogConfig | None:
    if raw.get("flow_log") is None:
        return None
    section = _section(raw, "flow_log", {"path", "rate_per_second", "burst", "max_bytes"})
    rate = section.get("rate_per_second")
    if isinstance(rate, int) and not isinstance(rate, bool):
        section["rate_per_second"] = float(rate)
    types = {"path": str, "rate_per_second": float, "burst": int, "max_bytes": int}
    _typed("flow_log", section, types)
    if "path" not in section:
        raise ConfigError("flow_log.path: required, a file path")
    section["path"] = os.path.join(base_dir, section["path"])
    return FlowLogConfig(**section)


def load_node_config(path: str) -> NodeConfig:
    """Read and validate a node config file; every failure is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return node_config_from_mapping(
            raw, os.path.dirname(os.path.abspath(path)), os.path.abspath(path)
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def with_overrides(config: NodeConfig, **changes: Any) -> NodeConfig:
    """Return a copy with CLI flag overrides applied (validated again)."""
    return replace(config, **changes)
