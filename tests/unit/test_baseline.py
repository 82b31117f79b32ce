import re

import pytest

from chaos.baseline import (
    BaselineNode,
    BaselineVip,
    conntrackd_conf,
    iptables_rules,
    keepalived_conf,
)

NODES = [BaselineNode(f"fw{i}", i, "mgmt0", f"10.231.30.1{i}", f"/run/x/fw{i}") for i in (1, 2, 3)]
VIPS = [BaselineVip(f"10.231.10.10{i}/24", "out0", f"fw{i}") for i in (1, 2, 3)] + [
    BaselineVip(f"10.231.20.10{i}/24", "in0", f"fw{i}") for i in (1, 2, 3)
]


def priorities(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"priority (\d+)", text)]


def test_home_node_has_the_highest_priority_for_each_vip():
    confs = [keepalived_conf(n, NODES, VIPS, 0.1) for n in NODES]
    table = [priorities(c) for c in confs]  # table[node][vip]
    for vip_index, vip in enumerate(VIPS):
        column = [row[vip_index] for row in table]
        home = int(vip.home[2:]) - 1
        assert column[home] == max(column)
        assert len(set(column)) == len(column), "failover order must be deterministic"


def test_vips_of_one_home_move_together_and_advert_int_is_written():
    text = keepalived_conf(NODES[0], NODES, VIPS, 0.1)
    assert "advert_int 0.1" in text and "vrrp_version 3" in text
    group = re.search(r"vrrp_sync_group G_fw1 \{\s+group \{([^}]*)\}", text)
    assert group is not None and group.group(1).split() == ["VIP1", "VIP4"]
    with pytest.raises(ValueError):
        keepalived_conf(NODES[0], NODES, VIPS, 0.001)


def test_conntrackd_has_private_paths_and_no_external_cache():
    text = conntrackd_conf(NODES[1], ["10.231.30.2"])
    assert "DisableExternalCache On" in text
    assert "LockFile /run/x/fw2/conntrackd.lock" in text
    assert "Path /run/x/fw2/conntrackd.ctl" in text
    assert "IPv4_interface 10.231.30.12" in text
    assert "IPv4_address 10.231.30.2" in text


def test_iptables_rules_are_stateful():
    text = iptables_rules("in0", "out0", "10.231.1.0/24")
    assert ":FORWARD DROP" in text and "--ctstate INVALID -j DROP" in text
    assert text.index("INVALID") < text.index("ESTABLISHED")
    with pytest.raises(ValueError):
        iptables_rules("in0", "out0", "not-a-net")


def test_bad_vip_is_refused():
    with pytest.raises(ValueError):
        BaselineVip("10.0.0.300/24", "out0", "fw1")
