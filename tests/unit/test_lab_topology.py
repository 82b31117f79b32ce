"""The cluster lab's topology, commands, node files and ECMP classification (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chaos.errors import LabError
from chaos.lab.build import LabNames, build_commands, vip_commands
from chaos.lab.ecmp import classify
from chaos.lab.nodefiles import Features, node_file, rules_text
from chaos.lab.topology import load_template, render


def _route(cmds: list[list[str]], ns: str) -> list[str]:
    found = [c for c in cmds if c[:4] == ["ip", "-n", ns, "route"] and "nexthop" in c]
    assert len(found) == 1
    return [c for i, c in enumerate(found[0]) if i and found[0][i - 1] == "via"]


def test_render_addresses_and_vips() -> None:
    topo = render(load_template(), 3)
    assert [n.node_id for n in topo.nodes] == ["fw1", "fw2", "fw3"]
    assert topo.node("fw2").address("outside") == "10.231.10.12"
    assert topo.node("fw3").address("mgmt") == "10.231.30.13"
    assert topo.etcd_endpoint == "10.231.30.2:2379"
    assert [(v.address, v.interface, v.home) for v in topo.vips if v.home == "fw1"] == [
        ("10.231.10.101/24", "out0", "fw1"),
        ("10.231.20.101/24", "in0", "fw1"),
    ]
    assert len(topo.hosts) == 8 and topo.root_addr == "10.231.30.254/24"


def test_symmetric_and_asymmetric_nexthop_order() -> None:
    names = LabNames("x")
    sym = build_commands(render(load_template(), 3), names, hash_seed=False)
    assert _route(sym, "stkl-x-rtr-up") == ["10.231.10.101", "10.231.10.102", "10.231.10.103"]
    assert _route(sym, "stkl-x-rtr-down") == ["10.231.20.101", "10.231.20.102", "10.231.20.103"]
    asym = build_commands(render(load_template(), 3, asymmetric=True), names, hash_seed=False)
    assert _route(asym, "stkl-x-rtr-up") == ["10.231.10.101", "10.231.10.102", "10.231.10.103"]
    assert _route(asym, "stkl-x-rtr-down") == ["10.231.20.102", "10.231.20.103", "10.231.20.101"]


def test_router_sysctls_use_the_dissecting_l4_hash() -> None:
    cmds = build_commands(render(load_template(), 2), LabNames("x"), hash_seed=True)
    rtr, locktime = [c for c in cmds if c[:5] == ["ip", "netns", "exec", "stkl-x-rtr-up", "sysctl"]]
    assert locktime[-1] == "net.ipv4.neigh.br-out.locktime=0"
    assert "net.ipv4.fib_multipath_hash_policy=3" in rtr
    assert "net.ipv4.fib_multipath_hash_fields=0x0037" in rtr
    assert any(s.startswith("net.ipv4.fib_multipath_hash_seed=") for s in rtr)
    (fw,) = [c for c in cmds if c[:5] == ["ip", "netns", "exec", "stkl-x-fw1", "sysctl"]]
    assert "net.ipv4.ip_forward=1" in fw and "net.ipv4.conf.all.rp_filter=0" in fw


def test_static_vips_go_to_their_home() -> None:
    cmds = vip_commands(render(load_template(), 2), LabNames("x"))
    assert ["ip", "-n", "stkl-x-fw2", "addr", "add", "10.231.20.102/24", "dev", "in0"] in cmds
    assert len(cmds) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"nodes": 10}, "--nodes"),
        ({"nodes": 1, "asymmetric": True}, "at least 2"),
        ({"nodes": 2, "base": "10.300"}, "--base"),
    ],
)
def test_render_refuses_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LabError, match=message):
        render(load_template(), **kwargs)  # type: ignore[arg-type]


def test_lab_name_is_checked() -> None:
    with pytest.raises(LabError, match="lab name"):
        LabNames("Bad-Name")
    assert LabNames("lab").ns("fw1") == "stkl-lab-fw1"


def test_template_errors_are_lab_errors(tmp_path: Path) -> None:
    raw = load_template()
    del raw["etcd"]
    with pytest.raises(LabError, match="missing field"):
        render(raw, 2)
    raw = load_template()
    raw["vips"].append({"segment": "outside", "address": "{base}.10.1{k}/24"})  # a node address
    with pytest.raises(LabError, match="used twice"):
        render(raw, 2)
    bad = tmp_path / "t.yaml"
    bad.write_text("- not a mapping\n")
    with pytest.raises(LabError, match="expected a mapping"):
        load_template(str(bad))


def test_node_file_shapes(tmp_path: Path) -> None:
    topo = render(load_template(), 3)
    full = node_file(topo, topo.node("fw1"), "lab", tmp_path, Features("cluster"))
    assert full["sync"]["listen"] == "10.231.30.11:7400"
    assert "peers" not in full["sync"]  # peers come from etcd membership
    assert full["cluster"]["etcd"]["endpoint"] == "10.231.30.2:2379"
    assert len(full["cluster"]["vips"]) == 6
    sync = node_file(topo, topo.node("fw2"), "lab", tmp_path, Features("sync", hold=False))
    assert "cluster" not in sync and "hold" not in sync
    assert [p["node_id"] for p in sync["sync"]["peers"]] == ["fw1", "fw3"]
    alone = node_file(topo, topo.node("fw1"), "lab", tmp_path, Features("standalone"))
    assert set(alone) == {"node_id", "rules", "queue", "hooks", "control_socket", "metrics"}
    assert alone["metrics"] == {"listen": "10.231.30.11:9641"}
    assert full["sync"]["metrics"] == {"listen": "10.231.30.11:9642"}


def test_rules_text_is_a_valid_ruleset(tmp_path: Path) -> None:
    from node.policy import load_ruleset

    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(render(load_template(), 2)))
    assert load_ruleset(str(path)).statistics().rule_count == 3
    assert yaml.safe_load(path.read_text())["default"] == "drop"


def test_classify_counts_flows() -> None:
    counts = {
        "fw1": {("q", 0): 1, ("r", 0): 1, ("q", 1): 1},
        "fw2": {("r", 1): 1, ("q", 2): 1, ("q", 3): 1},
        "fw3": {("r", 3): 2},
    }
    r = classify(counts, 4)
    assert (r.symmetric, r.asymmetric, r.unseen) == (1, 2, 1)  # flow 2 has no reply
    assert r.per_node_requests == {"fw1": 2, "fw2": 2, "fw3": 0}
    assert r.as_dict()["symmetric_fraction"] == pytest.approx(1 / 3, abs=1e-3)


def test_sync_routes_get_a_short_rto_min():
    from chaos.lab.build import LabNames, sync_route_commands
    from chaos.lab.topology import load_template, render

    topo = render(load_template(None), 3, "10.231", False)
    cmds = sync_route_commands(topo, LabNames("lab"))
    assert len(cmds) == 3
    assert cmds[0] == ["ip", "-n", "stkl-lab-fw1", "route", "replace", "10.231.30.0/24",
                       "dev", "mgmt0", "src", "10.231.30.11", "rto_min", "10ms"]  # fmt: skip
