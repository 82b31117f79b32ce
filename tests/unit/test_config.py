"""Node configuration: built once, validated, every failure a ConfigError."""

from __future__ import annotations

import pytest

from node.config import load_node_config, node_config_from_mapping
from node.errors import ConfigError


def test_minimal_config_gets_defaults(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text("node_id: fw1\nrules: rules.yaml\n")
    config = load_node_config(str(path))
    assert config.node_id == "fw1"
    assert config.rules_path == str(tmp_path / "rules.yaml")
    assert config.hooks == ("FORWARD",)
    assert config.queue.num == 0 and not config.queue.bypass
    assert config.fast_path.enabled
    assert config.table.timeouts.tcp_established == 432000


def test_full_config(tmp_path):
    raw = {
        "node_id": "fw-2",
        "rules": "/etc/r.yaml",
        "queue": {"num": 3, "bypass": True, "max_len": 100},
        "hooks": ["forward", "INPUT"],
        "fast_path": {"enabled": False, "sample_per_second": 5},
        "table": {"capacity": 10, "tcp_loose": True, "timeouts": {"udp": 5}},
        "control_socket": "fw.sock",
    }
    config = node_config_from_mapping(raw, str(tmp_path))
    assert config.rules_path == "/etc/r.yaml"
    assert config.queue.num == 3 and config.queue.bypass
    assert config.hooks == ("FORWARD", "INPUT")
    assert not config.fast_path.enabled
    assert config.table.capacity == 10 and config.table.tcp_loose
    assert config.table.timeouts.udp == 5
    assert config.control_socket == str(tmp_path / "fw.sock")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rules": "r"}, "node_id: required"),
        ({"node_id": "fw1"}, "rules: required"),
        ({"node_id": "FW 1", "rules": "r"}, "node_id"),
        ({"node_id": "fw1", "rules": "r", "colour": 1}, "unknown key(s) colour"),
        ({"node_id": "fw1", "rules": "r", "queue": {"num": 70000}}, "queue.num"),
        ({"node_id": "fw1", "rules": "r", "queue": {"num": "0"}}, "queue.num: expected int"),
        ({"node_id": "fw1", "rules": "r", "queue": {"bypass": 1}}, "queue.bypass"),
        ({"node_id": "fw1", "rules": "r", "queue": {"spin": 1}}, "queue: unknown key(s) spin"),
        ({"node_id": "fw1", "rules": "r", "hooks": ["PREROUTING"]}, "PREROUTING"),
        ({"node_id": "fw1", "rules": "r", "hooks": []}, "hooks"),
        ({"node_id": "fw1", "rules": "r", "table": {"capacity": 0}}, "table.capacity"),
        ({"node_id": "fw1", "rules": "r", "table": {"timeouts": {"udpp": 3}}}, "udpp"),
        ({"node_id": "fw1", "rules": "r", "fast_path": {"sample_per_second": 0}}, "sample"),
    ],
)
def test_invalid_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        node_config_from_mapping(raw)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_node_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_id: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_node_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_node_config(str(listy))


SYNC = {
    "insecure": True, "listen": "10.30.0.11:7400", "state_dir": "state",
    "local_socket": "sync.sock", "peers": [{"node_id": "fw2", "address": "10.30.0.12:7400"}],
}  # fmt: skip


def test_sync_hold_and_cluster_id(tmp_path):
    path = tmp_path / "fw1.yaml"
    path.write_text(
        "node_id: fw1\nrules: rules.yaml\ncluster_id: lab\n"
        "hold: {timeout: 0.05, max_packets: 100, max_flows: 10}\n"
        "sync: {insecure: true, listen: '10.30.0.11:7400', state_dir: state,\n"
        "       local_socket: sync.sock, supervise: false,\n"
        "       peers: [{node_id: fw2, address: '10.30.0.12:7400'}]}\n"
    )
    config = load_node_config(str(path))
    assert config.cluster_id == "lab"
    assert (config.hold.timeout, config.hold.max_packets, config.hold.max_flows) == (0.05, 100, 10)
    assert config.sync is not None and not config.sync.supervise and not config.sync.cluster
    assert config.sync.config_file == str(path)
    syncd = config.sync.syncd
    assert (syncd.node_id, syncd.cluster_id) == ("fw1", "lab")
    assert syncd.local_socket == str(tmp_path / "sync.sock")
    assert [p.node_id for p in syncd.peers] == ["fw2"]


def test_a_standalone_node_has_no_sync_and_default_hold():
    config = node_config_from_mapping({"node_id": "fw1", "rules": "r"})
    assert config.sync is None and config.cluster_id is None
    assert (config.hold.timeout, config.hold.max_packets, config.hold.max_flows) == (
        0.1,
        2048,
        512,
    )
    assert config.table.tcp_liberal is False  # strict window tracking when standalone


def test_a_clustered_node_tracks_windows_liberally_unless_told_not_to():
    base = {"node_id": "fw1", "rules": "r", "cluster_id": "c", "sync": {**SYNC, "supervise": False}}
    assert node_config_from_mapping(base).table.tcp_liberal is True
    strict = node_config_from_mapping({**base, "table": {"tcp_liberal": False}})
    assert strict.table.tcp_liberal is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"cluster_id": "lab", "sync": {**SYNC, "listen": "nope"}}, "sync.listen"),
        ({"sync": SYNC}, "cluster_id: required"),
        ({"cluster_id": "lab", "sync": {**SYNC, "supervise": 1}}, "sync.supervise"),
        ({"cluster_id": "lab", "sync": {**SYNC, "node_id": "fw1"}}, "sync.node_id"),
        ({"cluster_id": "lab", "sync": {**SYNC, "colour": 1}}, "colour"),
        ({"cluster_id": "lab", "sync": "yes"}, "sync: expected a mapping"),
        ({"cluster_id": "lab", "cluster": {}}, "cluster: requires a sync section"),
        ({"cluster_id": 7}, "cluster_id: expected a string"),
        ({"hold": {"timeout": "1"}}, "hold.timeout: expected float"),
        ({"hold": {"max_flows": 0}}, "hold.max_flows"),
        ({"hold": {"wait": 1}}, "hold: unknown key"),
    ],
)
def test_invalid_cluster_keys_name_the_field(extra, message):
    with pytest.raises(ConfigError, match=message):
        node_config_from_mapping({"node_id": "fw1", "rules": "r", **extra}, "/tmp", "/tmp/f.yaml")


def test_supervise_needs_the_file_syncd_will_read():
    with pytest.raises(ConfigError, match="supervise"):
        node_config_from_mapping({"node_id": "fw1", "rules": "r", "cluster_id": "lab",
                                  "sync": SYNC})  # fmt: skip
