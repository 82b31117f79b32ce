"""Chaos scenario files: the schema, its errors, and every shipped scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from chaos.scenario import (
    ACTIONS,
    INVARIANTS,
    ScenarioError,
    all_scenarios,
    dead_at_end,
    find_scenario,
    load_scenario,
    parse_scenario,
    scenario_files,
)

ISSUE_5 = {
    "node-killed": {"kill", "start"},
    "node-frozen": {"freeze", "thaw"},
    "sync-partition": {"partition", "heal"},
    "sync-partition-no-etcd": {"partition", "heal"},
    "sync-loss-10": {"loss", "heal"},
    "sync-loss-30": {"loss", "heal"},
    "etcd-down": {"etcd-stop", "etcd-start"},
    "rolling-restart": {"rolling-restart"},
    "asymmetric": {"kill", "start"},
    "syn-flood": {"flood"},
    "rules-push": {"rules-push"},
}


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t",
        "description": "a test",
        "lab": {"nodes": 3},
        "load": {"duration": 20},
        "steps": [{"at": 5, "do": "kill", "node": "fw2"}, {"at": 10, "do": "start", "node": "fw2"}],
        "invariants": {"established_flows": {}, "new_connections": {"window": 3}},
    }
    doc.update(over)
    return doc


def test_every_issue_5_scenario_ships_and_loads() -> None:
    shipped = {s.name: s for s in all_scenarios()}
    assert set(ISSUE_5) <= set(shipped)
    for name, actions in ISSUE_5.items():
        s = shipped[name]
        assert {st.do for st in s.steps} == actions, name
        assert set(s.invariants) == set(INVARIANTS), name
        assert s.description
    assert shipped["asymmetric"].lab.asymmetric
    assert shipped["syn-flood"].lab.table_capacity == 1024
    flood = shipped["syn-flood"].steps[0]
    # Twice the total capacity of the three tables over the flood.
    assert flood.rate * flood.duration >= 2 * 1024 * 3
    assert shipped["sync-partition-no-etcd"].steps[0].cut_etcd
    assert not shipped["sync-partition"].steps[0].cut_etcd
    assert shipped["sync-loss-30"].steps[0].percent == 30
    etcd = shipped["etcd-down"].steps
    assert etcd[1].at - etcd[0].at == 30


def test_parse_a_valid_scenario() -> None:
    s = parse_scenario(_doc(), "x.yaml")
    assert s.name == "t" and s.lab.nodes == 3 and s.lab.mode == "auto"
    assert s.load.duration == 20 and s.load.long_lived == 8
    assert [(st.at, st.do, st.node) for st in s.steps] == [(5, "kill", "fw2"), (10, "start", "fw2")]
    assert s.steps[0].disruptive
    assert s.invariants["new_connections"] == {"window": 3}
    assert s.nodes_dead_at_end == frozenset()


def test_quick_scales_every_time() -> None:
    doc = _doc(
        steps=[
            {"at": 4, "do": "flood", "rate": 100, "for": 4},
            {"at": 10, "do": "rolling-restart", "gap": 2},
        ],
        quick={"scale": 0.5},
    )
    q = parse_scenario(doc).scaled()
    assert q.quick and q.load.duration == 10
    assert [st.at for st in q.steps] == [2, 5]
    assert q.steps[0].duration == 2 and q.steps[1].gap == 1
    assert q.scaled() is q


def test_dead_at_end_follows_the_steps() -> None:
    doc = _doc(
        steps=[{"at": 1, "do": "kill", "node": "fw1"}, {"at": 2, "do": "freeze", "node": "fw3"}]
    )
    s = parse_scenario(doc)
    assert s.nodes_dead_at_end == {"fw1", "fw3"}
    assert dead_at_end(parse_scenario(_doc()).steps) == frozenset()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad Name"}, "x.yaml: name: 'Bad Name'"),
        ({"lab": {"nodes": 12}}, "x.yaml: lab.nodes: 12 not in 1..9"),
        ({"lab": {"mode": "magic"}}, "x.yaml: lab.mode: 'magic' is not one of"),
        ({"lab": {"nodez": 3}}, "x.yaml: lab: unknown field(s) nodez"),
        ({"load": {"duration": "long"}}, "x.yaml: load.duration: 'long' is not a number"),
        ({"steps": [{"at": 1, "do": "explode"}]}, "x.yaml: steps[0].do: 'explode' is not one of"),
        ({"steps": [{"at": 1, "do": "kill"}]}, "x.yaml: steps[0].node: is required"),
        ({"steps": [{"do": "kill", "node": "fw1"}]}, "x.yaml: steps[0].at: is required"),
        ({"steps": [{"at": 1, "do": "kill", "node": "fw9"}]}, "steps[0].node: 'fw9' is not a node"),
        ({"steps": [{"at": 1, "do": "kill", "node": "all"}]}, "'all' is only for loss"),
        (
            {"steps": [{"at": 1, "do": "kill", "node": "fw1", "percent": 3}]},
            "unknown field(s) percent",
        ),
        (
            {"steps": [{"at": 1, "do": "loss", "node": "all", "percent": 130}]},
            "percent: 130 not in",
        ),
        ({"steps": [{"at": 1, "do": "flood", "rate": 10}]}, "steps[0].for: is required"),
        ({"steps": [{"at": 30, "do": "etcd-stop"}]}, "steps[0].at: at 30 is not inside the load"),
        (
            {"steps": [{"at": 5, "do": "etcd-stop"}, {"at": 2, "do": "etcd-start"}]},
            "steps[1].at: steps must be in time order",
        ),
        ({"steps": "kill"}, "x.yaml: steps: 'kill' is not a list"),
        ({"invariants": {}}, "invariants: at least one invariant is required"),
        ({"invariants": {"happy": {}}}, "invariants.happy: unknown invariant"),
        (
            {"invariants": {"new_connections": {"min_success": 2}}},
            "invariants.new_connections: min_success: 2 not in [0, 1]",
        ),
        (
            {"invariants": {"established_flows": {"max_resets": 0.5}}},
            "established_flows: max_resets: 0.5 is not int",
        ),
        ({"invariants": {"memory_bounded": {"grow": 1}}}, "unknown parameter 'grow'"),
        ({"quick": {"scale": 3}}, "quick.scale: 3 not in"),
        ({"extra": 1}, "x.yaml: (top): unknown field(s) extra"),
    ],
)
def test_invalid_scenarios_name_file_and_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(_doc(**change), "x.yaml")
    assert message in str(e.value)


def test_missing_top_level_fields() -> None:
    for key in ("name", "steps", "invariants"):
        doc = _doc()
        del doc[key]
        with pytest.raises(ScenarioError, match=f"x.yaml: {key}: is required"):
            parse_scenario(doc, "x.yaml")
    with pytest.raises(ScenarioError, match="expected a mapping"):
        parse_scenario([1, 2], "x.yaml")


def test_files_name_must_match_and_errors_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "t.yaml"
    good.write_text(yaml.safe_dump(_doc()))
    assert load_scenario(good).source == str(good)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(_doc()))
    with pytest.raises(ScenarioError, match="must match the file name 'other'"):
        load_scenario(other)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match=f"{broken}: not valid YAML"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


def test_find_scenario_by_name_or_path(tmp_path: Path) -> None:
    assert find_scenario("node-killed").name == "node-killed"
    with pytest.raises(ScenarioError, match=r"no scenario 'nope' \(known: .*node-killed"):
        find_scenario("nope")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_doc()))
    assert find_scenario(str(path)).name == "t"
    assert len(scenario_files()) >= len(ISSUE_5)


def test_every_action_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "chaos.md").read_text()
    for action in ACTIONS:
        assert f"`{action}`" in doc, action
    for name in INVARIANTS:
        assert f"`{name}`" in doc, name
