"""SyncdConfig: YAML loading, validation naming the field, the epoch counter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncd.config import (
    BeaconsConfig,
    PeerConfig,
    SyncdConfig,
    TlsConfig,
    bump_epoch,
    load_beacon_key,
    load_syncd_config,
    split_address,
    syncd_config_from_mapping,
)
from syncd.errors import ConfigError
from syncd.session import SessionConfig

BASE: dict[str, Any] = {
    "node_id": "fw1",
    "cluster_id": "prod",
    "state_dir": "state",
    "local_socket": "run/sync.sock",
    "tls": {"ca": "certs/ca.pem", "cert": "certs/fw1.pem", "key": "certs/fw1.key"},
}


def build(**changes: Any) -> SyncdConfig:
    raw = {**BASE, **changes}
    return syncd_config_from_mapping({k: v for k, v in raw.items() if v is not None}, "/etc/stk")


def test_minimal_file_gets_defaults_and_absolute_paths(tmp_path: Path) -> None:
    path = tmp_path / "syncd.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_syncd_config(str(path))
    assert cfg.listen == "127.0.0.1:7400" and cfg.peers == ()
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.local_socket == str(tmp_path / "run" / "sync.sock")
    assert cfg.tls == TlsConfig(
        str(tmp_path / "certs/ca.pem"), str(tmp_path / "certs/fw1.pem"),
        str(tmp_path / "certs/fw1.key"),
    )  # fmt: skip
    assert cfg.session == SessionConfig(cluster_id="prod")
    assert cfg.max_message_bytes == 4 * 1024 * 1024
    assert cfg.control_socket is None


def test_full_file() -> None:
    cfg = build(
        listen="0.0.0.0:7401",
        peers=[{"node_id": "fw2", "address": "10.0.0.2:7400"},
               {"node_id": "fw3", "address": "fw3.example:7400"},
               {"node_id": "fw4", "address": "[fd00::4]:7400"}],
        control_socket="/run/ctl.sock",
        session={"batch_max": 128, "dead_after": 3},
        store={"capacity": 1000, "tombstone_ttl": 10},
        outbox_capacity=100, max_message_bytes=1 << 20, local_queue=10, recovery_timeout=1,
    )  # fmt: skip
    assert cfg.peers[2] == PeerConfig("fw4", "[fd00::4]:7400")
    assert cfg.control_socket == "/run/ctl.sock"
    assert cfg.session.batch_max == 128 and cfg.session.dead_after == 3.0
    assert cfg.session.cluster_id == "prod"
    assert cfg.store.capacity == 1000 and cfg.store.tombstone_ttl == 10.0
    assert (cfg.outbox_capacity, cfg.local_queue, cfg.recovery_timeout) == (100, 10, 1.0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"node_id": "FW1"}, "node_id"),
        ({"node_id": None}, "node_id: required"),
        ({"cluster_id": "a/b"}, "cluster_id"),
        ({"state_dir": None}, "state_dir: required"),
        ({"listen": "fw1:7400"}, "listen"),
        ({"listen": "127.0.0.1"}, "listen"),
        ({"listen": "127.0.0.1:0"}, "listen"),
        ({"listen": "::1:7400"}, "listen"),
        ({"peers": [{"node_id": "fw2"}]}, "peers[0]"),
        ({"peers": ["fw2"]}, "peers[0]"),
        ({"peers": [{"node_id": "fw2", "address": "x:1", "weight": 1}]}, "peers[0]: unknown"),
        ({"peers": [{"node_id": "fw1", "address": "h:1"}]}, "peers: fw1 is this node"),
        ({"peers": [{"node_id": "fw2", "address": "h:1"}] * 2}, "listed twice"),
        ({"peers": [{"node_id": "fw2", "address": "h:99999"}]}, "peers.fw2.address"),
        ({"tls": None}, "tls: required"),
        ({"tls": {"ca": "a", "cert": "b"}}, "tls.key"),
        ({"insecure": True}, "mutually exclusive"),
        ({"session": {"batch_max": 0}}, "session: batch_max"),
        ({"session": {"cluster_id": "x"}}, "session: unknown"),
        ({"session": {"dead_after": "2s"}}, "session.dead_after"),
        ({"store": {"capacity": True}}, "store.capacity"),
        ({"outbox_capacity": 0}, "outbox_capacity"),
        ({"max_message_bytes": 1000}, "max_message_bytes"),
        ({"local_queue": "many"}, "local_queue"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"colour": "blue"}, "unknown key(s) colour"),
        ({"anti_entropy": {"interval": "soon"}}, "anti_entropy.interval"),
        ({"anti_entropy": {"every": 3}}, "anti_entropy: unknown"),
        ({"metrics": {"listen": "nowhere"}}, "metrics.listen"),
        ({"metrics": {"port": 1}}, "metrics must be a mapping"),
    ],
)
def test_bad_values_are_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(**changes)
    message = str(caught.value)
    assert message.startswith(field) if ":" in field else field in message, message


def test_insecure_without_tls_is_allowed() -> None:
    cfg = build(tls=None, insecure=True)
    assert cfg.tls is None and cfg.insecure


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_syncd_config(str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("node_id: [")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_syncd_config(str(broken))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_syncd_config(str(listed))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "listen": "nowhere"}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: listen"):
        load_syncd_config(str(bad))


def test_split_address() -> None:
    assert split_address("x", "10.0.0.1:7400") == ("10.0.0.1", 7400)
    assert split_address("x", "[::1]:1") == ("::1", 1)
    assert split_address("x", "fw2.lab:80") == ("fw2.lab", 80)
    for bad in ("10.0.0.1", "[zz]:1", "a:b", "-x:1", ":80"):
        with pytest.raises(ConfigError, match=r"^x: "):
            split_address("x", bad)
    with pytest.raises(ConfigError, match="not an IP address"):
        split_address("x", "fw2:80", ip_only=True)


def test_epoch_counter_grows_on_every_start_and_survives(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert [bump_epoch(str(state)) for _ in range(3)] == [1, 2, 3]
    assert (state / "epoch").read_text() == "3\n"
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
    assert not (state / "epoch.tmp").exists()


def test_a_damaged_epoch_counter_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "epoch").write_text("banana")
    with pytest.raises(ConfigError, match="not an epoch counter"):
        bump_epoch(str(tmp_path))
    (tmp_path / "epoch").write_text(str((1 << 30) - 1))
    with pytest.raises(ConfigError, match="exhausted"):
        bump_epoch(str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="state_dir"):
        bump_epoch(str(blocker / "sub"))


# --- node files (contract A) -------------------------------------------------------

NODE: dict[str, Any] = {
    "node_id": "fw1",
    "cluster_id": "lab",
    "rules": "rules.yaml",
    "control_socket": "run/fw1.sock",
    "hold": {"timeout": 0.02},
    "sync": {
        "supervise": True,
        "listen": "10.30.0.11:7400",
        "state_dir": "state",
        "local_socket": "run/sync.sock",
        "insecure": True,
    },
    "cluster": {
        "etcd": {"endpoint": "10.30.0.2:2379", "lease_ttl": 1, "timeout": 1.0},
        "vips": [
            {"address": "10.10.0.101/24", "interface": "out0", "home": "fw1"},
            {"address": "10.20.0.101/24", "interface": "in0"},
        ],
        "rules_from_etcd": True,
        "status_interval": 1.0,
    },
}


def node_file(**sections: Any) -> dict[str, Any]:
    raw = {**NODE, **sections}
    return {k: v for k, v in raw.items() if v is not None}


def test_node_file_gives_syncd_and_agent_config() -> None:
    from syncd.config import from_node_mapping

    cfg = from_node_mapping(node_file(), "/etc/stk")
    assert cfg is not None and cfg.node_id == "fw1" and cfg.cluster_id == "lab"
    assert cfg.listen == "10.30.0.11:7400" and cfg.state_dir == "/etc/stk/state"
    assert cfg.filter_control_socket == "/etc/stk/run/fw1.sock"
    assert cfg.cluster is not None and cfg.cluster.etcd.endpoint == "10.30.0.2:2379"
    assert [(v.vip, v.interface, v.home) for v in cfg.cluster.vips] == [
        ("10.10.0.101", "out0", "fw1"), ("10.20.0.101", "in0", None),
    ]  # fmt: skip
    assert cfg.cluster.rules_from_etcd and cfg.cluster.require_filter
    assert cfg.cluster.stall_limit == 0.5


def test_node_file_without_sync_is_a_standalone_node() -> None:
    from syncd.config import from_node_mapping

    assert from_node_mapping(node_file(sync=None, cluster=None)) is None
    with pytest.raises(ConfigError, match="cluster: requires a sync section"):
        from_node_mapping(node_file(sync=None))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cluster_id": None}, "cluster_id: required"),
        ({"sync": {**NODE["sync"], "listen": "nowhere"}}, r"sync\.listen"),
        ({"sync": {**NODE["sync"], "node_id": "fw1"}}, r"sync\.node_id: set node_id"),
        ({"sync": {**NODE["sync"], "supervise": "yes"}}, r"sync\.supervise"),
        ({"sync": {**NODE["sync"], "bogus": 1}}, "bogus"),
        ({"cluster": {**NODE["cluster"], "etcd": {"lease_ttl": 1}}}, r"cluster\.etcd\.endpoint"),
        ({"cluster": {**NODE["cluster"], "vips": [{"address": "224.0.0.1", "interface": "x"}]}},
         r"cluster\.vips\[0\]"),
        ({"cluster": {**NODE["cluster"], "vips": [{"address": "10.0.0.1/24"}]}},
         r"cluster\.vips\[0\]\.interface: required"),
        ({"cluster": {**NODE["cluster"], "vips": [
            {"address": "10.0.0.1/24", "interface": "a"},
            {"address": "10.0.0.1/32", "interface": "b"}]}}, "listed twice"),
        ({"cluster": {**NODE["cluster"], "status_interval": 0}}, r"cluster\.status_interval"),
        ({"cluster": {**NODE["cluster"], "nope": 1}}, r"cluster\.nope: unknown key"),
        ({"sync": {**NODE["sync"], "peers": [{"node_id": "fw2", "address": "h:1"}]}},
         "peers come from etcd"),
    ],
)  # fmt: skip
def test_bad_node_files_name_the_field(change: dict[str, Any], message: str) -> None:
    from syncd.config import from_node_mapping

    with pytest.raises(ConfigError, match=message):
        from_node_mapping(node_file(**change), "/etc/stk")


def test_load_syncd_config_reads_node_files(tmp_path: Path) -> None:
    path = tmp_path / "fw1.yaml"
    path.write_text(yaml.safe_dump(node_file()))
    cfg = load_syncd_config(str(path))
    assert cfg.cluster is not None and cfg.local_socket == str(tmp_path / "run" / "sync.sock")
    broken = tmp_path / "bad.yaml"
    broken.write_text(yaml.safe_dump(node_file(cluster={"etcd": {}})))
    with pytest.raises(ConfigError, match=r"bad\.yaml: cluster\.etcd\.endpoint"):
        load_syncd_config(str(broken))


def test_standalone_file_may_carry_a_cluster_section() -> None:
    cfg = build(insecure=True, tls=None, cluster=NODE["cluster"])
    assert cfg.cluster is not None and cfg.filter_control_socket is None


def test_anti_entropy_and_metrics_sections() -> None:
    config = build(
        anti_entropy={"interval": 10, "buckets": 256, "digest_max_age": None},
        metrics={"listen": "127.0.0.1:9642"},
    )
    assert config.anti_entropy.interval == 10.0 and config.anti_entropy.buckets == 256
    assert config.metrics is not None and config.metrics.port == 9642
    assert build().metrics is None and build().anti_entropy.interval == 30.0


def test_beacons_default_on_with_the_key_beside_the_ca() -> None:
    cfg = build()
    assert cfg.beacons == BeaconsConfig() and cfg.beacons.interval == 0.01
    assert cfg.beacon_key_file == "/etc/stk/certs/beacon.key"
    cfg = build(beacons={"key_file": "keys/b.key", "interval": 0.02, "enabled": False})
    assert cfg.beacon_key_file == "/etc/stk/keys/b.key" and not cfg.beacons.enabled
    assert build(tls=None, insecure=True).beacon_key_file is None  # unsigned, tests only


@pytest.mark.parametrize(
    ("beacons", "message"),
    [
        ({"interval": 0}, "beacons: interval must be 0.001..1 s"),
        ({"interval": "fast"}, "beacons.interval"),
        ({"port": 9}, "beacons: unknown key"),
    ],
)
def test_bad_beacons_section(beacons: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(beacons=beacons)


def test_syncd_runs_at_a_higher_priority_than_the_filter_by_default() -> None:
    assert build().nice == -10 and build(nice=0).nice == 0
    for bad in (-21, 20):
        with pytest.raises(ConfigError, match=r"nice must be -20\.\.19"):
            build(nice=bad)
    with pytest.raises(ConfigError, match="nice"):
        build(nice="high")


def test_beacon_key_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "beacon.key"
    with pytest.raises(ConfigError, match=r"cannot read key .*certs init"):
        load_beacon_key(str(path))
    path.write_text("ab" * 31 + "\n")
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_beacon_key(str(path))
    path.write_text("zz" * 32)
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_beacon_key(str(path))
    path.write_text("0f" * 32 + "\n")
    assert load_beacon_key(str(path)) == bytes([15] * 32)


def test_agent_suspicion_window_follows_the_beacons() -> None:
    from syncd.agent_glue import agent_suspect_after

    cluster = {"etcd": {"endpoint": "127.0.0.1:2379"}}
    assert agent_suspect_after(build(cluster=cluster)) == 0.1  # beacons every 10 ms
    slow = build(cluster=cluster, beacons={"interval": 0.05})
    assert agent_suspect_after(slow) == pytest.approx(0.25)  # still 5 beacons
    off = build(cluster=cluster, beacons={"enabled": False})
    assert agent_suspect_after(off) == 0.15  # the stream's heartbeats only
    told = build(cluster={**cluster, "suspect_after": 0.3})
    assert agent_suspect_after(told) == 0.3
    with pytest.raises(ConfigError, match=r"cluster\.suspect_after"):
        build(cluster={**cluster, "suspect_after": 0.001})
