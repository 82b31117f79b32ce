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
