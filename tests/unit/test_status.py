"""The pure cluster status view (cluster.status) and its rendering (cluster.status_cli)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.status import (
    ClusterView,
    EtcdProbe,
    Health,
    Severity,
    Snapshot,
    build_view,
    parse_event,
    view_to_json,
)
from cluster.status_cli import EXIT_CODES, WIDTH, render, render_event

NOW = 1_763_800_100.0
PROBE = EtcdProbe("10.30.0.2:2379", "etcd-1", "3.4.23", 1234, 0.0021)
SHA = "a" * 64


def member(node: str, state: str = "up", epoch: int = 3, vips: tuple[str, ...] = ()) -> bytes:
    body = {"address": f"10.30.0.1{node[-1]}:7400", "epoch": epoch, "node_id": node,
            "state": state, "vips": sorted(vips)}  # fmt: skip
    return json.dumps(body).encode()


def status(node: str, **over: Any) -> bytes:
    body: dict[str, Any] = {
        "node_id": node, "epoch": 3, "state": "up", "since": NOW - 300, "updated": NOW - 0.5,
        "address": f"10.30.0.1{node[-1]}:7400", "vips": [],
        "flows": {"own": 120, "replica": 240, "entries": 360, "capacity": 262144},
        "peers": {}, "resync": {"active": False, "progress": 1.0, "done_at": NOW - 299},
        "rules": {"revision": 4, "sha256": SHA, "policy": "p"},
        "etcd": {"degraded": False, "failures": 0},
        "filter": {"connected": True, "synced": True},
    }  # fmt: skip
    body.update(over)
    return json.dumps(body).encode()


def event(seq: int, node: str, kind: str, ts: float, detail: str | None = None,
          duration_ms: float | None = None) -> bytes:  # fmt: skip
    body = {"seq": seq, "ts": ts, "node": node, "kind": kind, "detail": detail,
            "duration_ms": duration_ms}  # fmt: skip
    return json.dumps(body).encode()


def healthy(**over: Any) -> dict[str, Any]:
    """Two healthy nodes, one VIP each, ruleset 4 everywhere."""
    peers = {"fw1": {"fw2": {"state": "up", "lag_p99_ms": 1.8, "outbox": 0}},
             "fw2": {"fw1": {"state": "up", "lag_p99_ms": 2.5, "outbox": 3}}}  # fmt: skip
    snap: dict[str, Any] = {
        "cluster_id": "lab",
        "etcd": PROBE,
        "members": {
            "fw1": member("fw1", vips=("10.10.0.101",)),
            "fw2": member("fw2", vips=("10.10.0.102",)),
        },
        "epochs": {"fw1": b"3", "fw2": b"3"},
        "statuses": {
            n: status(n, vips=[f"10.10.0.10{n[-1]}"], peers=peers[n]) for n in ("fw1", "fw2")
        },
        "vips": {"10.10.0.101": "fw1", "10.10.0.102": "fw2"},
        "events": (),
        "rules_current": 4,
        "rules_sha256": SHA,
    }
    snap.update(over)
    return snap


def view(**over: Any) -> ClusterView:
    return build_view(Snapshot(**healthy(**over)), NOW)


def node(v: ClusterView, node_id: str) -> Any:
    return next(n for n in v.nodes if n.node_id == node_id)


def codes(v: ClusterView) -> set[tuple[str, str]]:
    return {(p.subject, p.code) for p in v.problems}


# --- states ------------------------------------------------------------------------------


def test_a_healthy_cluster_has_no_problems_and_exits_0():
    v = view()
    assert v.health is Health.HEALTHY and EXIT_CODES[v.health] == 0
    assert [n.state for n in v.nodes] == ["up", "up"]
    assert v.problems == () and v.bad_fields == 0
    fw1 = node(v, "fw1")
    assert (fw1.flows_own, fw1.flows_replica, fw1.table_entries) == (120, 240, 360)
    assert fw1.table_usage == pytest.approx(360 / 262144)
    assert fw1.lag_p99_max_ms == 1.8 and fw1.peers[0].peer == "fw2"
    assert [(x.address, x.holder, x.reported_by, x.ok) for x in v.vips] == [
        ("10.10.0.101", "fw1", ("fw1",), True), ("10.10.0.102", "fw2", ("fw2",), True)]  # fmt: skip


@pytest.mark.parametrize("state", ["syncing", "joining", "draining", "fenced"])
def test_the_member_record_state_is_shown(state):
    v = view(members={"fw1": member("fw1", vips=("10.10.0.101",)), "fw2": member("fw2", state)})
    assert node(v, "fw2").state == state
    assert ("fw2", state) in codes(v)
    expected = Health.CRITICAL if state == "fenced" else Health.DEGRADED
    assert v.health is expected


def test_syncing_shows_progress():
    statuses = healthy()["statuses"] | {
        "fw2": status("fw2", resync={"active": True, "progress": 0.45, "done_at": None})
    }
    v = view(members={"fw1": member("fw1"), "fw2": member("fw2", "syncing")}, statuses=statuses)
    fw2 = node(v, "fw2")
    assert fw2.resync_active is True and fw2.resync_progress == 0.45
    assert any("45%" in p.text for p in v.problems if p.subject == "fw2")
    assert "syncing 45%" in render(v)


def test_a_node_reported_suspect_by_a_live_peer_is_suspect():
    s = healthy()
    suspect = {"fw2": {"state": "suspect", "lag_p99_ms": None}}
    s["statuses"]["fw1"] = status("fw1", vips=["10.10.0.101"], peers=suspect)
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").state == "suspect" and node(v, "fw2").suspected_by == ("fw1",)
    assert v.health is Health.CRITICAL


def test_a_stale_reporter_or_a_dead_one_does_not_make_suspects():
    s = healthy()
    s["statuses"]["fw1"] = status("fw1", updated=NOW - 10, peers={"fw2": {"state": "suspect"}})
    assert node(build_view(Snapshot(**s), NOW), "fw2").state == "up"
    s = healthy()
    s["statuses"]["fw1"] = status("fw1", peers={"fw2": {"state": "down"}})
    del s["members"]["fw1"]  # fw1's lease is gone, its leftover status does not count
    assert node(build_view(Snapshot(**s), NOW), "fw2").state == "up"


def test_a_node_without_member_record_is_down_and_found_through_its_epoch():
    s = healthy()
    del s["members"]["fw2"], s["statuses"]["fw2"]
    v = build_view(Snapshot(**s), NOW)
    fw2 = node(v, "fw2")
    assert (fw2.state, fw2.member, fw2.epoch) == ("down", False, 3)
    assert ("fw2", "down") in codes(v) and v.health is Health.CRITICAL
    assert EXIT_CODES[v.health] == 4


def test_status_without_member_is_down():
    s = healthy()
    del s["members"]["fw2"], s["epochs"]["fw2"]
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").state == "down"
    # Its VIP is still claimed by a non-member and its status is ignored for VIPs.
    assert ("10.10.0.102", "vip-holder-gone") in codes(v)


def test_a_node_whose_last_event_is_left_left_on_purpose():
    s = healthy(
        events=(event(1, "fw2", "drain-started", NOW - 20), event(2, "fw2", "left", NOW - 19))
    )
    del s["members"]["fw2"], s["statuses"]["fw2"]
    s["vips"] = {"10.10.0.101": "fw1", "10.10.0.102": "fw1"}
    s["statuses"]["fw1"] = status("fw1", vips=["10.10.0.101", "10.10.0.102"])
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").state == "left"
    assert v.health is Health.HEALTHY  # a clean leave is news, not a problem
    assert [p.severity for p in v.problems] == [Severity.INFO]


def test_a_status_older_than_three_intervals_is_stale():
    s = healthy()
    s["statuses"]["fw2"] = status("fw2", vips=["10.10.0.102"], updated=NOW - 3.01)
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").state == "stale"
    assert node(v, "fw2").status_age == pytest.approx(3.01)
    assert ("fw2", "stale") in codes(v) and v.health is Health.DEGRADED
    # At exactly 3 intervals it is still fresh; a longer interval moves the line.
    s["statuses"]["fw2"] = status("fw2", vips=["10.10.0.102"], updated=NOW - 3.0)
    assert node(build_view(Snapshot(**s), NOW), "fw2").state == "up"
    s["statuses"]["fw2"] = status("fw2", vips=["10.10.0.102"], updated=NOW - 5)
    assert node(build_view(Snapshot(**s), NOW, status_interval=2.0), "fw2").state == "up"


def test_a_member_without_status_is_flagged_but_keeps_its_record_state():
    s = healthy()
    del s["statuses"]["fw2"]
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").state == "up" and node(v, "fw2").updated is None
    assert ("fw2", "no-status") in codes(v)
    assert ("10.10.0.102", "vip-not-reported") in codes(v)


def test_an_unknown_state_word_is_unknown():
    s = healthy()
    s["members"]["fw2"] = b'{"state": "dancing"}'
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").state == "unknown" and ("fw2", "unknown") in codes(v)


def test_no_member_at_all_is_critical():
    v = build_view(Snapshot("lab", PROBE), NOW)
    assert v.nodes == () and ("cluster", "no-members") in codes(v)
    assert v.health is Health.CRITICAL


# --- drift, table, lag, filter, etcd --------------------------------------------------------


def test_ruleset_drift_by_revision_and_by_content():
    s = healthy()
    s["statuses"]["fw2"] = status("fw2", vips=["10.10.0.102"],
                                  rules={"revision": 3, "sha256": "b" * 64})  # fmt: skip
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").rules_drift and not node(v, "fw1").rules_drift
    assert ("fw2", "drift") in codes(v) and ("rules", "drift") in codes(v)
    assert "3!" in render(v)
    s["statuses"]["fw2"] = status("fw2", vips=["10.10.0.102"],
                                  rules={"revision": 4, "sha256": "b" * 64})  # fmt: skip
    v = build_view(Snapshot(**s), NOW)
    assert node(v, "fw2").rules_drift
    assert any("sha256 differs" in p.text for p in v.problems)


def test_no_drift_without_a_cluster_ruleset():
    v = view(rules_current=None, rules_sha256=None)
    assert not any(n.rules_drift for n in v.nodes)
    assert codes(v) == {("rules", "no-cluster-ruleset")} and v.health is Health.HEALTHY


@pytest.mark.parametrize(("entries", "severity"), [(183_500, None), (183_501, Severity.WARN),
                                                   (235_930, Severity.CRIT)])  # fmt: skip
def test_table_usage_thresholds(entries, severity):
    s = healthy()
    flows = {"own": 1, "replica": 2, "entries": entries, "capacity": 262144}
    s["statuses"]["fw1"] = status("fw1", vips=["10.10.0.101"], flows=flows)
    v = build_view(Snapshot(**s), NOW)
    found = [p.severity for p in v.problems if p.code == "table-full"]
    assert found == ([] if severity is None else [severity])


def test_sync_lag_filter_and_etcd_problems():
    s = healthy()
    s["statuses"]["fw1"] = status(
        "fw1", vips=["10.10.0.101"],
        peers={"fw2": {"state": "up", "lag_p99_ms": 250.0, "outbox": 900}},
        filter={"connected": False, "synced": False}, etcd={"degraded": True, "failures": 7},
    )  # fmt: skip
    v = build_view(Snapshot(**s), NOW)
    assert {("fw1", "sync-lag"), ("fw1", "filter-disconnected"), ("fw1", "etcd-degraded")} <= codes(
        v
    )
    assert v.health is Health.DEGRADED


def test_beacon_loss_from_a_live_peer_is_a_problem_and_shown():
    s = healthy()
    s["statuses"]["fw1"] = status(
        "fw1", vips=["10.10.0.101"],
        peers={"fw2": {"state": "up", "lag_p99_ms": 1.0, "outbox": 0, "beacon_loss": 0.48},
               "fw3": {"state": "up", "lag_p99_ms": 1.0, "outbox": 0, "beacon_loss": 0.01}},
    )  # fmt: skip
    v = build_view(Snapshot(**s), NOW)
    losses = [p for p in v.problems if p.code == "link-loss"]
    assert [(p.subject, "fw2" in p.text, "48%" in p.text) for p in losses] == [("fw1", True, True)]
    fw1 = next(n for n in v.nodes if n.node_id == "fw1")
    assert {p.peer: p.beacon_loss for p in fw1.peers} == {"fw2": 0.48, "fw3": 0.01}
    assert "fw2 up 1.0ms/0 loss 48%" in render(v)


# --- VIPs --------------------------------------------------------------------------------


def test_vip_held_by_two_nodes_is_a_split_brain_risk():
    s = healthy()
    s["statuses"]["fw2"] = status("fw2", vips=["10.10.0.101", "10.10.0.102"])
    v = build_view(Snapshot(**s), NOW)
    vip = next(x for x in v.vips if x.address == "10.10.0.101")
    assert vip.reported_by == ("fw1", "fw2") and not vip.ok
    assert ("10.10.0.101", "vip-split-brain") in codes(v) and v.health is Health.CRITICAL


def test_vip_claims_without_holder_or_on_the_wrong_node():
    s = healthy()
    s["vips"] = {"10.10.0.101": "fw2", "10.10.0.102": "fw2"}  # fw1 still has .101 up
    v = build_view(Snapshot(**s), NOW)
    assert ("10.10.0.101", "vip-wrong-node") in codes(v)
    s = healthy()
    s["vips"] = {"10.10.0.101": "fw1"}  # .102 reported by fw2 but nobody claims it
    v = build_view(Snapshot(**s), NOW)
    assert ("10.10.0.102", "vip-unclaimed") in codes(v)


def test_ipv6_vips_sort_after_ipv4():
    s = healthy()
    s["vips"] = s["vips"] | {"fd00::1": "fw1"}
    s["statuses"]["fw1"] = status("fw1", vips=["10.10.0.101", "fd00::1"])
    v = build_view(Snapshot(**s), NOW)
    assert [x.address for x in v.vips] == ["10.10.0.101", "10.10.0.102", "fd00::1"]


# --- malformed values ---------------------------------------------------------------------


def test_missing_fields_are_none_never_invented():
    s = healthy()
    s["statuses"]["fw2"] = json.dumps({"node_id": "fw2", "updated": NOW - 0.1}).encode()
    v = build_view(Snapshot(**s), NOW)
    fw2 = node(v, "fw2")
    assert (fw2.flows_own, fw2.table_usage, fw2.rules_revision, fw2.since) == (None,) * 4
    assert (fw2.filter_connected, fw2.etcd_degraded, fw2.resync_progress) == (None,) * 3
    assert fw2.state == "up" and v.bad_fields == 0
    assert node(v, "fw2").rules_drift  # it does not say it runs revision 4
    json.dumps(view_to_json(v))  # serialisable with the gaps


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"updated": "soon"}',
                                 b'{"updated": 1e999}', b'{"flows": {"own": true}}'])  # fmt: skip
def test_bad_status_values_are_counted_not_raised(raw):
    s = healthy()
    s["statuses"]["fw2"] = raw
    v = build_view(Snapshot(**s), NOW)
    assert v.bad_fields >= 1
    assert node(v, "fw2").flows_own is None


def test_events_are_parsed_ordered_trimmed_and_bad_ones_counted():
    raws = tuple(event(i, "fw1", "rules-applied", NOW - 100 + i) for i in range(1, 16))
    bad = (b"{", event(99, "fw1", "x", NOW)[:-1] + b',"seq2":1}', b'{"seq": "1"}', b"x" * 5000)
    v = view(events=(*reversed(raws), *bad))
    # The last 10, oldest first; an unknown kind or an extra field is shown (newer agents).
    assert [e.seq for e in v.events] == [*range(7, 16), 99]
    assert v.events[-1].kind == "x"
    assert v.bad_fields == 3
    assert parse_event(b'{"seq":1,"ts":2,"node":"a","kind":"joined"}') is not None
    assert parse_event(b'{"seq":true,"ts":2,"node":"a","kind":"joined"}') is None


def test_failovers_keep_the_last_five_with_durations():
    raws = tuple(event(i, "fw1", "failover", NOW - 50 + i, f"fw2 #{i}", 100.0 + i)
                 for i in range(1, 8))  # fmt: skip
    v = build_view(Snapshot(**healthy(events=raws)), NOW, events=3)
    assert [e.seq for e in v.failovers] == [3, 4, 5, 6, 7]
    assert [e.seq for e in v.events] == [5, 6, 7]
    assert v.failovers[-1].duration_ms == 107.0


def test_signature_ignores_time_but_sees_state_changes():
    s = healthy()
    a = build_view(Snapshot(**s), NOW)
    assert build_view(Snapshot(**s), NOW + 1).signature() == a.signature()
    s["members"]["fw2"] = member("fw2", "draining")
    assert build_view(Snapshot(**s), NOW).signature() != a.signature()


# --- rendering ----------------------------------------------------------------------------

GOLDEN = """\
cluster lab: HEALTHY  2/2 up   rules revision 4 (aaaaaaaaaaaa)               2025-11-22 08:28:20 UTC
etcd 10.30.0.2:2379 ok  leader etcd-1  v3.4.23  read 2.1 ms  rev 1234

NODE         STATE        EPOCH   SINCE VIPS      OWN  REPLICA     TABLE  RULES FILTER  LAG p99
fw1          up               3   5m00s    1      120      240   0%/262k      4 ok      1.8ms fw2
fw2          up               3   5m00s    1      120      240   0%/262k      4 ok      2.5ms fw1

VIPS
  ADDRESS                                  CLAIM        HELD BY (status)               OK
  10.10.0.101                              fw1          fw1                            ok
  10.10.0.102                              fw2          fw2                            ok

SYNC (peer, state, lag p99 / outbox, beacon loss)
  fw1          -> fw2 up 1.8ms/0
  fw2          -> fw1 up 2.5ms/3

PROBLEMS: none

FAILOVERS (last 1)
  2025-11-22 08:27:20.000 fw1          took over 10.10.0.102 (from fw2) in 212.4 ms

EVENTS (last 2)
  2025-11-22 08:27:19.500 fw1          revoked        fw2 epoch 2
  2025-11-22 08:27:20.000 fw1          failover       10.10.0.102 (from fw2) (212.4 ms)
"""


def test_rendering_snapshot():
    events = (event(7, "fw1", "failover", NOW - 60, "10.10.0.102 (from fw2)", 212.4),
              event(6, "fw1", "revoked", NOW - 60.5, "fw2 epoch 2"))  # fmt: skip
    assert render(view(events=events)) == GOLDEN


def test_every_line_fits_100_columns_even_with_long_values():
    long = "n" * 63
    s = healthy()
    s["members"][long] = member("fw9").replace(b'"fw9"', f'"{long}"'.encode())
    s["statuses"][long] = status(
        long, vips=["fd00:1234:5678:9abc:def0:1234:5678:9abc"],
        peers={f"{long[:-1]}{i}": {"state": "up", "lag_p99_ms": 12345.6, "outbox": 99999}
               for i in range(9)},
        flows={"own": 10**12, "replica": 10**12, "entries": 10**12, "capacity": 10**12},
    )  # fmt: skip
    s["vips"] = s["vips"] | {"fd00:1234:5678:9abc:def0:1234:5678:9abc": long * 2}
    events = tuple(event(i, long, "failover", NOW - i, "x" * 300, 1e9) for i in range(3))
    s["cluster_id"] = "c" * 63
    v = build_view(Snapshot(**(s | {"events": events})), NOW)
    text = render(v)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "\x1b[" not in text


def test_colours_only_when_asked():
    v = view(members={"fw1": member("fw1", vips=("10.10.0.101",)), "fw2": member("fw2", "fenced")})
    coloured = render(v, color=True)
    assert "\x1b[31;1mCRITICAL\x1b[0m" in coloured and "\x1b[" not in render(v)
    plain = [line for line in coloured.replace("\x1b[0m", "").split("\n")]
    assert max(len(line.split("\x1b[")[0]) for line in plain) <= WIDTH


def test_render_event_line():
    e = parse_event(event(3, "fw1", "failover", NOW, "fw2: 10.10.0.102", 412.0))
    assert e is not None
    assert render_event(e) == (
        "2025-11-22 08:28:20.000 fw1          failover       fw2: 10.10.0.102 (412.0 ms)"
    )
    assert render_event(e, color=True).startswith("\x1b[31;1m")  # slower than the 300 ms target


def test_find_lab_reads_the_lab_state_file(tmp_path):
    from cluster.errors import BadInput
    from cluster.status_cli import find_lab

    (tmp_path / "lab").mkdir()
    state = {
        "version": 1, "name": "lab", "status": "up", "cluster_id": "lab",
        "etcd": {"endpoint": "10.231.30.2:2379", "namespace": "stkl-lab-etcd"},
        "nodes": {"fw2": {"control_socket": "/r/fw2.ctl", "syncd_control_socket": None},
                  "fw1": {"control_socket": "/r/fw1.ctl", "syncd_control_socket": "/r/s1.ctl"}},
    }  # fmt: skip
    (tmp_path / "lab" / "lab.json").write_text(json.dumps(state))
    lab = find_lab("lab", str(tmp_path))
    assert (lab.etcd, lab.cluster_id) == ("10.231.30.2:2379", "lab")
    assert [(n.node_id, n.control_socket, n.syncd_socket) for n in lab.nodes] == [
        ("fw1", "/r/fw1.ctl", "/r/s1.ctl"), ("fw2", "/r/fw2.ctl", None)]  # fmt: skip
    with pytest.raises(BadInput, match="no lab 'other' is running"):
        find_lab("other", str(tmp_path))
    (tmp_path / "lab" / "lab.json").write_text(json.dumps({**state, "etcd": {}}))
    with pytest.raises(BadInput, match="missing or bad field 'endpoint'"):
        find_lab("lab", str(tmp_path))
    (tmp_path / "lab" / "lab.json").write_text("{")
    with pytest.raises(BadInput, match="lab state"):
        find_lab("lab", str(tmp_path))
