"""syncd configuration: built once from a YAML file, frozen, passed down.

Only the CLI calls :func:`load_syncd_config`; library code never reads files
or the environment for configuration.  Every field is validated on
construction and a bad file is refused with :class:`ConfigError` naming the
field.  Membership is the static ``peers`` list here; the cluster agent will
later replace it at run time (``SyncNode.set_peers``).

Example (all keys but ``node_id``, ``cluster_id``, ``state_dir`` and
``local_socket`` are optional; relative paths are relative to the file)::

    node_id: fw1
    cluster_id: prod
    listen: 127.0.0.1:7400
    peers:
      - {node_id: fw2, address: 10.0.0.2:7400}
      - {node_id: fw3, address: fw3.example:7400}
    state_dir: /var/lib/stockade/fw1      # holds the epoch counter
    local_socket: /run/stockade/fw1-sync.sock
    control_socket: /run/stockade/fw1-syncd.ctl
    tls: {ca: certs/ca.pem, cert: certs/fw1.pem, key: certs/fw1.key}
    insecure: false                       # true + no tls: plaintext, for tests only
    session: {batch_max: 256, batch_delay: 0.001, heartbeat_interval: 0.05,
              suspect_after: 0.15, dead_after: 2.0, resend_after: 0.2,
              snapshot_page: 512, max_pending_pages: 4, full_resync_holdoff: 1.0}
    store: {capacity: 2097152, tombstone_capacity: 65536, tombstone_ttl: 30,
            orphan_grace: 60}
    outbox_capacity: 65536
    max_message_bytes: 4194304
    local_queue: 65536
    recovery_timeout: 5.0
    cluster: {...}             # optional: the cluster agent (cluster.config)

**Node files.**  ``stockade node run`` reads one file per node; its
``sync:`` section holds the keys above (without ``node_id``/``cluster_id``,
which are top-level, plus ``supervise``, read by the node and ignored here)
and its ``cluster:`` section configures the agent.  :func:`from_node_mapping`
builds a :class:`SyncdConfig` from such a file; :func:`load_syncd_config`
accepts both kinds (a file with a ``sync:`` key is a node file).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Final

import yaml

from cluster.config import AgentConfig, agent_config_from_mapping
from cluster.errors import BadInput
from syncd.antientropy import AntiEntropyConfig
from syncd.errors import ConfigError
from syncd.records import check_node_id
from syncd.replica import ReplicaConfig
from syncd.session import SessionConfig

if TYPE_CHECKING:
    from syncd.metrics import MetricsConfig

DEFAULT_LISTEN: Final = "127.0.0.1:7400"
# Cluster ids appear in certificate URIs (stockade://<cluster>/<node>).
_CLUSTER_ID: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
_HOST: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})\Z")
MIN_MESSAGE_BYTES: Final = 64 * 1024  # a full batch or snapshot page must fit
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
BEACON_KEY_FILE: Final = "beacon.key"  # beside the CA certificate
BEACON_KEY_BYTES: Final = 32
MAX_EPOCH: Final = (1 << 30) - 1  # VersionClock floors at epoch << 32, kept below 2**62
_DEFAULT_SESSION: Final = SessionConfig(cluster_id="default")  # placeholder, see SyncdConfig


def check_cluster_id(cluster_id: str) -> bool:
    return bool(_CLUSTER_ID.match(cluster_id))


def split_address(what: str, address: str, *, ip_only: bool = False) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[addr]:port``) -> (host, port); ConfigError naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT with a port 1..65535, not {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host, 6):
            raise ConfigError(f"{what}: {host!r} is not an IPv6 address")
    elif ":" in host:
        raise ConfigError(f"{what}: write IPv6 as [ADDR]:PORT, not {address!r}")
    elif not (_is_ip(host, 4) if ip_only else _HOST.match(host)):
        kind = "an IP address" if ip_only else "a host name or IP address"
        raise ConfigError(f"{what}: {host!r} is not {kind}")
    return host, int(port)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class PeerConfig:
    # The peer's node id (its certificate must name it).
    node_id: str
    # Where its syncd listens, HOST:PORT (a host name is resolved by gRPC).
    address: str

    def __post_init__(self) -> None:
        if not check_node_id(self.node_id):
            raise ConfigError(f"peers: node_id {self.node_id!r} is not a node id")
        split_address(f"peers.{self.node_id}.address", self.address)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    # PEM file of the cluster CA: the only issuer a peer certificate may have.
    ca: str
    # PEM certificate of this node (from `stockade certs init`).
    cert: str
    # PEM private key of that certificate (keep it 0600).
    key: str

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            if not getattr(self, name):
                raise ConfigError(f"tls.{name}: required, a file path")


@dataclass(frozen=True, slots=True)
class BeaconsConfig:
    """UDP liveness beacons beside the streams (``syncd.beacon``)."""

    # Send and receive them (the cluster agent hears a peer by either).
    enabled: bool = True
    # Seconds between beacons to every peer: 15 lost in a row before a
    # 150 ms suspicion, where one lost TCP segment silences a whole stream.
    interval: float = 0.01
    # 32-byte key (64 hex digits) shared by the cluster's nodes; beacons are
    # signed with it (HMAC-SHA256).  None: ``beacon.key`` beside tls.ca, as
    # `stockade certs init` writes it; without tls (insecure) unsigned.
    key_file: str | None = None

    def __post_init__(self) -> None:
        if not 0.001 <= self.interval <= 1:
            raise ConfigError(f"interval must be 0.001..1 s, not {self.interval}")


@dataclass(frozen=True, slots=True)
class SyncdConfig:
    # This node's id; equal to the filter's node_id and named by its certificate.
    node_id: str
    # Cluster id; every Hello and certificate must carry the same one.
    cluster_id: str
    # Directory for small state files (the epoch counter).
    state_dir: str
    # Unix socket the filter connects to (created 0600).
    local_socket: str
    # Address the gRPC server binds, IP:PORT.
    listen: str = DEFAULT_LISTEN
    # The other members and their addresses (replaceable at run time).
    peers: tuple[PeerConfig, ...] = ()
    # JSON-lines control socket for stats/flows queries; None = off.
    control_socket: str | None = None
    # Mutual TLS material; None only together with insecure=True.
    tls: TlsConfig | None = None
    # Plaintext gRPC without peer authentication: protocol tests only.
    insecure: bool = False
    # Per-stream protocol tunables (see syncd.session.SessionConfig).
    # (Left out, it is SessionConfig's defaults with this cluster_id.)
    session: SessionConfig = field(default_factory=lambda: _DEFAULT_SESSION)
    # Replica store bounds (see syncd.replica.ReplicaConfig).
    store: ReplicaConfig = field(default_factory=ReplicaConfig)
    # Unacked local deltas held per peer; beyond it the peer must resync.
    outbox_capacity: int = 65536
    # Largest gRPC message sent or accepted; larger ones close the stream.
    max_message_bytes: int = 4 * 1024 * 1024
    # Replica updates queued for the filter; overflow makes it reload the table.
    local_queue: int = 65536
    # Seconds spent at start pulling this node's own flows back from peers.
    recovery_timeout: float = 5.0
    # The cluster agent (etcd membership, VIPs); None: static peers, no VIPs.
    cluster: AgentConfig | None = None
    # The filter's control socket (a node file's top-level control_socket):
    # the agent reads the filter's "synced" flag there.  None: no filter known.
    filter_control_socket: str | None = None
    # Periodic digest comparison with each peer (see syncd.antientropy).
    anti_entropy: AntiEntropyConfig = field(default_factory=AntiEntropyConfig)
    # Prometheus endpoint of this process (syncd and agent metrics); None: off.
    metrics: MetricsConfig | None = None
    # Liveness beacons over UDP, on the listen address and port.
    beacons: BeaconsConfig = field(default_factory=BeaconsConfig)
    # Scheduling niceness of the syncd process (-20..19), set at start.  The
    # control plane before the packet path, as routers do: when the filter
    # saturates the CPUs (a SYN flood), a syncd at the same priority sends
    # its beacons late, and its peers revoke a node that is alive.  Lowering
    # it needs root (CAP_SYS_NICE); without, syncd warns and runs as it is.
    nice: int = -10

    @property
    def beacon_key_file(self) -> str | None:
        """Where the beacon key is read from (None: unsigned, insecure mode only)."""
        if self.beacons.key_file is not None:
            return self.beacons.key_file
        if self.tls is not None:
            return os.path.join(os.path.dirname(self.tls.ca), BEACON_KEY_FILE)
        return None

    def __post_init__(self) -> None:
        if not check_node_id(self.node_id):
            raise ConfigError(f"node_id {self.node_id!r} must be 1-31 chars of a-z, 0-9 and '-'")
        if not check_cluster_id(self.cluster_id):
            raise ConfigError(f"cluster_id {self.cluster_id!r} must be 1-64 chars of a-z0-9._-")
        if self.session is _DEFAULT_SESSION:  # frozen: set once, here, before anyone sees it
            object.__setattr__(self, "session", SessionConfig(cluster_id=self.cluster_id))
        if self.session.cluster_id != self.cluster_id:
            raise ConfigError("session.cluster_id must equal cluster_id")
        split_address("listen", self.listen, ip_only=True)
        ids = [p.node_id for p in self.peers]
        if len(set(ids)) != len(ids):
            raise ConfigError("peers: a node id is listed twice")
        if self.node_id in ids:
            raise ConfigError(f"peers: {self.node_id} is this node; list only the others")
        if self.tls is None and not self.insecure:
            raise ConfigError("tls: required (set insecure: true only for protocol tests)")
        if self.tls is not None and self.insecure:
            raise ConfigError("insecure: true and tls are mutually exclusive")
        for name in ("state_dir", "local_socket"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required, a path")
        if not 1 <= self.outbox_capacity <= 1 << 24:
            raise ConfigError(f"outbox_capacity must be 1..16777216, not {self.outbox_capacity}")
        if not MIN_MESSAGE_BYTES <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ConfigError(
                f"max_message_bytes must be {MIN_MESSAGE_BYTES}..{MAX_MESSAGE_BYTES}, "
                f"not {self.max_message_bytes}"
            )
        if not 1 <= self.local_queue <= 1 << 24:
            raise ConfigError(f"local_queue must be 1..16777216, not {self.local_queue}")
        if not 0 <= self.recovery_timeout <= 600:
            raise ConfigError(f"recovery_timeout must be 0..600 s, not {self.recovery_timeout}")
        if not -20 <= self.nice <= 19:
            raise ConfigError(f"nice must be -20..19, not {self.nice}")
        if self.cluster is not None and self.peers:
            raise ConfigError("peers: with a cluster section, peers come from etcd; list none")


# --- loading ---------------------------------------------------------------------

_TOP: Final = {
    "node_id": str, "cluster_id": str, "state_dir": str, "local_socket": str, "listen": str,
    "peers": list, "control_socket": str, "tls": dict, "insecure": bool, "session": dict,
    "store": dict, "outbox_capacity": int, "max_message_bytes": int, "local_queue": int,
    "recovery_timeout": float, "cluster": dict, "anti_entropy": dict, "metrics": dict,
    "beacons": dict, "nice": int,
}  # fmt: skip
_PATHS: Final = ("state_dir", "local_socket", "control_socket")


def load_syncd_config(path: str) -> SyncdConfig:
    """Read and validate a YAML file; :class:`ConfigError` names the file and field."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base_dir = os.path.dirname(os.path.abspath(path))
    try:
        if "sync" in raw:
            config = from_node_mapping(raw, base_dir)
            assert config is not None  # a sync section is present
            return config
        return syncd_config_from_mapping(raw, base_dir)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# Keys of a node file that are not the filter's: checked here.
_NODE_SYNC_ONLY: Final = {"supervise": bool}


def from_node_mapping(raw: Mapping[str, Any], base_dir: str = ".") -> SyncdConfig | None:
    """The syncd part of a node file (contract A); None when it has no ``sync`` section.

    Reads the top-level ``node_id``, ``cluster_id`` and ``control_socket``
    (the filter's), the ``sync`` section (syncd's keys plus ``supervise``)
    and the ``cluster`` section; every other top-level key is the filter's
    and is left to the node loader.  Raises :class:`ConfigError` naming the
    field (``sync.listen: ...``, ``cluster.vips[0].home: ...``).
    """
    sync, cluster = raw.get("sync"), raw.get("cluster")
    if sync is None:
        if cluster is not None:
            raise ConfigError("cluster: requires a sync section")
        return None
    if not isinstance(sync, dict):
        raise ConfigError("sync: expected a mapping")
    for key in ("node_id", "cluster_id"):
        if key in sync:
            raise ConfigError(f"sync.{key}: set {key} at the top level of a node file")
        if key not in raw:
            raise ConfigError(f"{key}: required when a sync section is present")
    supervise = sync.get("supervise", True)
    if not isinstance(supervise, bool):
        raise ConfigError(f"sync.supervise: expected bool, got {supervise!r}")
    values = {k: v for k, v in sync.items() if k not in _NODE_SYNC_ONLY}
    values["node_id"], values["cluster_id"] = raw["node_id"], raw["cluster_id"]
    if cluster is not None:
        values["cluster"] = cluster
    control = raw.get("control_socket")
    if control is not None and not isinstance(control, str):
        raise ConfigError(f"control_socket: expected str, got {control!r}")
    try:
        config = syncd_config_from_mapping(values, base_dir)
    except ConfigError as e:
        text = str(e)
        top = text.startswith(("node_id", "cluster_id", "cluster"))
        raise ConfigError(text if top else f"sync.{text}") from None
    if control:
        return replace(config, filter_control_socket=_path(base_dir, control))
    return config


def syncd_config_from_mapping(raw: Mapping[str, Any], base_dir: str = ".") -> SyncdConfig:
    """Build a :class:`SyncdConfig` from parsed YAML; relative paths use ``base_dir``."""
    values = _typed("", _known("", raw, set(_TOP)), _TOP)
    for required in ("node_id", "cluster_id", "state_dir", "local_socket"):
        if required not in values:
            raise ConfigError(f"{required}: required")
    for name in _PATHS:
        if name in values:
            values[name] = _path(base_dir, values[name])
    cluster_id = values["cluster_id"]
    values["peers"] = tuple(_peer(i, p) for i, p in enumerate(values.get("peers", [])))
    if "tls" in values:
        values["tls"] = _tls(values["tls"], base_dir)
    values["session"] = _sub("session", values.get("session", {}), SessionConfig, cluster_id)
    values["store"] = _sub("store", values.get("store", {}), ReplicaConfig, None)
    values["anti_entropy"] = _anti_entropy(values.get("anti_entropy", {}))
    values["beacons"] = _beacons(values.get("beacons", {}), base_dir)
    if "metrics" in values:
        from syncd.metrics import metrics_config  # late: metrics imports the daemon's parts

        values["metrics"] = metrics_config(values["metrics"])
    if "cluster" in values:
        try:
            values["cluster"] = agent_config_from_mapping(values["cluster"])
        except BadInput as e:
            raise ConfigError(f"cluster.{e}") from None
    return SyncdConfig(**values)


def _path(base_dir: str, value: str) -> str:
    return os.path.normpath(os.path.join(base_dir, value)) if value else value


def _known(section: str, raw: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    unknown = set(raw) - allowed
    if unknown:
        where = f"{section}: " if section else ""
        raise ConfigError(f"{where}unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    return dict(raw)


def _typed(section: str, values: dict[str, Any], types: Mapping[str, type]) -> dict[str, Any]:
    prefix = f"{section}." if section else ""
    for key, value in values.items():
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)
        ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{prefix}{key}: expected {want.__name__}, got {value!r}")
    return values


def _peer(index: int, raw: object) -> PeerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"peers[{index}]: expected a mapping with node_id and address")
    values = _typed(f"peers[{index}]", _known(f"peers[{index}]", raw, {"node_id", "address"}),
                    {"node_id": str, "address": str})  # fmt: skip
    if set(values) != {"node_id", "address"}:
        raise ConfigError(f"peers[{index}]: node_id and address are both required")
    return PeerConfig(**values)


def _tls(raw: dict[str, Any], base_dir: str) -> TlsConfig:
    values = _typed("tls", _known("tls", raw, {"ca", "cert", "key"}),
                    dict.fromkeys(("ca", "cert", "key"), str))  # fmt: skip
    missing = {"ca", "cert", "key"} - set(values)
    if missing:
        raise ConfigError(f"tls.{sorted(missing)[0]}: required, a file path")
    return TlsConfig(**{k: _path(base_dir, v) for k, v in values.items()})


def _sub(section: str, raw: dict[str, Any], cls: type[Any], cluster_id: str | None) -> Any:
    types = {f.name: _field_type(f.type) for f in fields(cls) if f.name != "cluster_id"}
    values = _typed(section, _known(section, raw, set(types)), types)
    if cluster_id is not None:
        values["cluster_id"] = cluster_id
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{section}: {e}") from None


def _anti_entropy(raw: dict[str, Any]) -> AntiEntropyConfig:
    types = {f.name: _field_type(f.type) for f in fields(AntiEntropyConfig)}
    values = _known("anti_entropy", raw, set(types))
    if values.get("digest_max_age") is None:
        values.pop("digest_max_age", None)  # null: interval / 2
    values = _typed("anti_entropy", values, types)
    try:
        return AntiEntropyConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"anti_entropy: {e}") from None


def _beacons(raw: dict[str, Any], base_dir: str) -> BeaconsConfig:
    types = {"enabled": bool, "interval": float, "key_file": str}
    values = _typed("beacons", _known("beacons", raw, set(types)), types)
    if "key_file" in values:
        values["key_file"] = _path(base_dir, values["key_file"])
    try:
        return BeaconsConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"beacons: {e}") from None


def load_beacon_key(path: str) -> bytes:
    """The cluster's beacon key from ``path`` (64 hex digits); ConfigError naming it."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"beacons: cannot read key {path}: {getattr(e, 'strerror', None) or e} "
            "(`stockade certs init` writes beacon.key beside ca.pem)"
        ) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != BEACON_KEY_BYTES:
        raise ConfigError(f"beacons: key {path} must hold {BEACON_KEY_BYTES * 2} hex digits")
    return key


def _field_type(annotation: object) -> type:
    # The dataclasses use `from __future__ import annotations`: types are strings.
    text = str(annotation).removesuffix(" | None")
    return {"int": int, "float": float, "str": str, "bool": bool}[text]


# --- state files ---------------------------------------------------------------------


def bump_epoch(state_dir: str) -> int:
    """Increment and return the epoch counter kept in ``state_dir/epoch``.

    Every start gets a strictly higher epoch than the last one that got this
    far, without etcd: the new value is on disk (fsync + rename) before it is
    used, so a crash right after cannot make the next start reuse it.
    """
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(state_dir, "epoch")
        previous = 0
        if os.path.exists(path):
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
            if not text.isdigit():
                raise ConfigError(f"{path}: not an epoch counter: {text[:40]!r}")
            previous = int(text)
        epoch = previous + 1
        if epoch > MAX_EPOCH:
            raise ConfigError(f"{path}: epoch counter exhausted ({previous})")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{epoch}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"state_dir {state_dir}: {e.strerror or e}") from None
    return epoch
