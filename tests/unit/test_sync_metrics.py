"""syncd.metrics and the sync lag: histogram, families, config; the metrics contract.

The contract: docs/metrics.md "Sync" lists exactly the families syncd's
exporter serves (names, types, labels), and every ``stockade_sync_*`` name
the docs, the alert rules and the dashboard use is one of them.  An alert on
a name nobody exports never fires.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from syncd.antientropy import AntiEntropyCounters
from syncd.beacon import BeaconStats, PeerBeaconStats
from syncd.beacon_io import BeaconIoStats
from syncd.config import SyncdConfig
from syncd.daemon import SyncNode
from syncd.errors import ConfigError
from syncd.local import LocalServer
from syncd.metrics import (
    PREFIX,
    MetricsConfig,
    SyncCollector,
    SyncMetricSources,
    build_registry,
    families,
    metrics_config,
    render,
    sources_from_node,
)
from syncd.peers import LAG_BUCKETS, LagHistogram, LocalOrigin, PeerLink, PeerStats
from syncd.records import Op
from syncd.replica import ReplicaStore
from syncd.service import StateSyncService
from syncd.session import Inbox, Outbox, PeerSession, ReplicaChanged, SessionConfig, State
from tests.syncd_link import make_record
from tests.unit.test_ops import (
    CLUSTER_ALERTS,
    DASHBOARD,
    METRICS_DOC,
    REPO,
    alert_rules,
    dashboard_exprs,
    used_names,
)


def test_lag_histogram_buckets_and_skew() -> None:
    h = LagHistogram()
    h.observe_since([99.9997, 99.9985, 99.3, 101.0], now=100.0)
    s = h.statistics()
    assert s.total == 4 and s.skewed == 1
    assert s.counts[0] == 2  # 0 s (skewed) and 0.3 ms: le=0.0005
    assert s.counts[2] == 1  # 1.5 ms: le=0.002
    assert s.counts[LAG_BUCKETS.index(1.0)] == 1  # 0.7 s
    assert s.sum_seconds == pytest.approx(0.0003 + 0.0015 + 0.7)


def test_session_reports_the_origins_stamps() -> None:
    config = SessionConfig(cluster_id="c")
    store_a, store_b = ReplicaStore(), ReplicaStore()
    origin = LocalOrigin("fwa", 1, store_a, wall=lambda: 1234.5)
    out_a, in_b = Outbox("fwa", 1, 64), Inbox("fwa")
    a = PeerSession(config, out_a, Inbox("fwb"), store_a)
    b = PeerSession(config, Outbox("fwb", 1, 64), in_b, store_b)
    a.start(0.0)
    b.start(0.0)
    reported = []

    def exchange(times: tuple[float, ...]) -> None:
        for t in times:
            for env in a.messages_to_send(t):
                reported.extend(b.receive(env, t))
            for env in b.messages_to_send(t):
                a.receive(env, t)

    exchange((0.01, 0.02, 0.03))  # Hello, then the first (empty) snapshot of fwa
    reported.clear()
    delta = origin.change(Op.CREATE, make_record(b"k1", "fwa", 1), 0.05)
    assert delta is not None and delta.created == 1234.5
    out_a.push(delta, 0.05)
    exchange((0.06, 0.07))
    [changed] = [r for r in reported if isinstance(r, ReplicaChanged)]
    assert changed.created == (1234.5,) and len(changed.changes) == 1


def _sources() -> tuple[SyncMetricSources, PeerLink]:
    store = ReplicaStore()
    origin = LocalOrigin("fwa", 3, store)
    link = PeerLink("fwb", origin, SessionConfig(cluster_id="c"), 16, lambda changes: None)
    link.lag.observe_since([9.9985, 9.9], now=10.0)
    local = LocalServer("/nonexistent/x.sock", "fwa", 3, lambda d: None, list, 16)
    service = StateSyncService("fwa", "c", False, 1.0, lambda p: None, lambda: True, None)  # type: ignore[arg-type]
    counters = AntiEntropyCounters()
    counters.repairs["removed"] += 2
    return SyncMetricSources(
        origin=origin.statistics, store=store.statistics,
        peers=lambda: {"fwb": link.statistics()}, local=local.statistics,
        service=service.statistics, anti_entropy=counters.statistics,
    ), link  # fmt: skip


def test_families_have_prometheus_names_and_the_node_label() -> None:
    sources, _ = _sources()
    registry = build_registry("fwa", sources)
    value = registry.get_sample_value
    assert value("stockade_sync_lag_seconds_count", {"node": "fwa", "origin": "fwb"}) == 2
    assert value("stockade_sync_lag_seconds_bucket",
                 {"node": "fwa", "origin": "fwb", "le": "0.002"}) == 1  # fmt: skip
    assert value("stockade_sync_peer_state",
                 {"node": "fwa", "peer": "fwb", "state": "disconnected"}) == 1  # fmt: skip
    assert value("stockade_sync_outbox_capacity_deltas", {"node": "fwa", "peer": "fwb"}) == 16
    assert value("stockade_sync_epoch", {"node": "fwa"}) == 3
    assert value("stockade_sync_antientropy_repairs_total",
                 {"node": "fwa", "side": "local", "kind": "removed"}) == 2  # fmt: skip
    names = {m.name for m in registry.collect()}
    assert all(n.startswith("stockade_sync_") for n in names)
    text = render("fwa", SyncCollector("fwa", sources).snapshot()).decode()
    assert "# TYPE stockade_sync_deltas_sent_total counter" in text


def test_metrics_config() -> None:
    assert metrics_config(None) is None
    config = metrics_config({"listen": "127.0.0.1:9465"})
    assert config == MetricsConfig("127.0.0.1:9465") and config.port == 9465
    assert MetricsConfig("[::1]:0").host == "::1"
    for bad in ({"listen": "nope"}, {"listen": 9465}, {"port": 1}, "127.0.0.1:1",
                {"listen": "h:70000"}):  # fmt: skip
        with pytest.raises(ConfigError):
            metrics_config(bad)
    assert isinstance(CollectorRegistry(), CollectorRegistry)


def test_status_lag_p99_is_the_bucket_bound_of_a_recent_window():
    from syncd.agent_glue import lag_p99_ms

    bounds = (0.001, 0.002, 0.005)
    assert lag_p99_ms(bounds, (0, 0, 0, 0), (0, 0, 0, 0)) is None
    assert lag_p99_ms(bounds, (0, 0, 0, 0), (99, 1, 0, 0)) == 1.0
    assert lag_p99_ms(bounds, (0, 0, 0, 0), (90, 5, 5, 0)) == 5.0
    # only the window counts: 100 old fast deltas, then 10 slow ones
    assert lag_p99_ms(bounds, (100, 0, 0, 0), (100, 0, 0, 10)) == 5.0


def test_peer_up_is_one_exactly_while_the_stream_is_live() -> None:
    _, link = _sources()
    stats = link.statistics()
    for state in (*State, "disconnected"):
        snapshot_peers = {"fwb": dataclasses.replace(stats, state=str(state))}
        [family] = [f for f in _peer_families(snapshot_peers) if f.name == PREFIX + "peer_up"]
        [sample] = family.samples
        assert sample.labels == {"node": "fwa", "peer": "fwb"}
        assert sample.value == (1 if state == State.LIVE else 0), state


def _peer_families(peers: dict[str, PeerStats]) -> list[Metric]:
    sources, _ = _sources()
    snapshot = dataclasses.replace(SyncCollector("fwa", sources).snapshot(), peers=peers)
    return families("fwa", snapshot)


# --- the contract: docs/metrics.md "Sync" == what the exporter serves ---------------------

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Labels Prometheus or the exporter put on every series: not listed per row.
_COMMON_LABELS = frozenset({"node", "job", "instance"})


@dataclasses.dataclass(frozen=True)
class _Family:
    type: str
    labels: frozenset[str]  # besides node (and le)


def _beacon_stats() -> BeaconIoStats:
    heard = PeerBeaconStats(received=500, lost=2, last_heard=10.0, epoch=4, revoked=0)
    return BeaconIoStats(
        beacons=BeaconStats(peers={"fwb": heard}, dropped={"mac": 1, "replay": 0}),
        sent=498, send_errors={"EPERM": 1}, recv_errors={}, suppressed=3, rounds=501,
        thread_errors=0, revoked_heard=1, running=True,
    )  # fmt: skip


def _daemon_families(tmp: Path) -> list[Metric]:
    """Every family a syncd with beacons on serves, from real components.

    The sources are :func:`sources_from_node` of a real (not started, so
    socket-free) ``SyncNode``: exactly what ``start_metrics`` serves, so an
    optional source the daemon does not wire is not counted as exported.  The
    peer link is made as ``SyncNode.set_peers`` makes it (without its gRPC
    channel); the beacon statistics are given directly (the service needs a
    UDP socket and a thread).
    """
    config = SyncdConfig(node_id="fwa", cluster_id="c", state_dir=str(tmp / "state"),
                         local_socket=str(tmp / "fwa.sock"), insecure=True)  # fmt: skip
    node = SyncNode(config, 3, None)
    link = PeerLink("fwb", node.origin, config.session, config.outbox_capacity,
                    node.replica_changes)  # fmt: skip
    link.lag.observe_since([9.9985], now=10.0)
    node.links["fwb"] = link
    sources = dataclasses.replace(sources_from_node(node), beacons=_beacon_stats)
    return families("fwa", SyncCollector("fwa", sources).snapshot())


def _exported(tmp: Path) -> dict[str, _Family]:
    out = {}
    for family in _daemon_families(tmp):
        # prometheus_client strips a counter family's _total; its samples keep it.
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for sample in family.samples for k in sample.labels}
        if not family.samples:  # no series yet (no stream ended...): the declared names
            labels = set(getattr(family, "_labelnames", ()))
        out[name] = _Family(family.type, frozenset(labels - _COMMON_LABELS - {"le"}))
    return out


def _sync_section() -> str:
    with open(METRICS_DOC, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n### Sync")
    return text[start : text.index("\n### ", start + 1)]


def _documented() -> dict[str, _Family]:
    """The rows of the "Sync" table: name -> type and label names (the backquoted ones)."""
    rows = {}
    for line in _sync_section().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(stockade_sync_[a-z0-9_]+)`", cells[0])
        if line.startswith("|") and match:
            assert match[1] not in rows, f"{match[1]} documented twice"
            labels = frozenset(re.findall(r"`([a-z_]+)`", cells[2]))
            rows[match[1]] = _Family(cells[1], labels)
    return rows


def _base(name: str, exported: dict[str, _Family]) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        stem = name.removesuffix(suffix)
        if stem != name and exported.get(stem, _Family("", frozenset())).type == "histogram":
            return stem
    return name


def test_the_sync_table_lists_exactly_the_exported_families(tmp_path: Path) -> None:
    exported, documented = _exported(tmp_path), _documented()
    assert len(exported) >= 40  # the parse found the families, the beacon ones included
    assert {"stockade_sync_peer_up", "stockade_sync_beacon_thread_running"} <= set(exported)
    undocumented = sorted(set(exported) - set(documented))
    assert not undocumented, f"exported but not in docs/metrics.md Sync: {undocumented}"
    not_exported = sorted(set(documented) - set(exported))
    assert not not_exported, f"in docs/metrics.md Sync but not exported: {not_exported}"
    wrong = {n: (documented[n], exported[n]) for n in exported if documented[n] != exported[n]}
    assert not wrong, f"documented vs exported type/labels differ: {wrong}"


def test_every_sync_name_in_the_docs_is_exported(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    pages = glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
    assert os.path.join(REPO, "docs", "runbooks", "failed-node.md") in pages
    for page in pages:
        with open(page, encoding="utf-8") as f:
            names = set(re.findall(r"\b(stockade_sync_[a-z0-9_]+)", f.read()))
        unknown = sorted({_base(n, exported) for n in names} - set(exported))
        assert not unknown, f"{os.path.relpath(page, REPO)} names unexported {unknown}"


def _labels_used(expr: str) -> set[str]:
    """Label names in matchers and in by/on/ignoring/without lists."""
    names = set()
    for inner in re.findall(r"\{([^}]*)\}", re.sub(r'"[^"]*"', '""', expr)):
        names |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", inner))
    for group in re.findall(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)", expr):
        names |= {label.strip() for label in group.split(",") if label.strip()}
    return names


def _check_sync_expr(where: str, expr: str, shown: set[str], exported: dict[str, _Family]) -> int:
    """Names in ``expr`` exported; if it uses only sync names, its labels theirs too."""
    names = {_base(n, exported) for n in used_names(expr)}
    sync = {n for n in names if n.startswith(PREFIX)}
    assert sync <= set(exported), f"{where} uses unexported {sorted(sync - set(exported))}"
    if not sync or sync != names:
        return 0
    allowed = set(_COMMON_LABELS)
    for n in sync:
        allowed |= exported[n].labels | ({"le"} if exported[n].type == "histogram" else set())
    unknown = (_labels_used(expr) | shown) - allowed
    assert not unknown, f"{where}: labels {sorted(unknown)} not on {sorted(sync)}"
    return 1


def test_alerts_and_dashboard_use_only_exported_sync_names_and_labels(tmp_path: Path) -> None:
    exported = _exported(tmp_path)
    checked = 0
    for rule in alert_rules():
        text = " ".join(rule.get("annotations", {}).values())
        shown = set(re.findall(r"\$labels\.(\w+)", text))
        checked += _check_sync_expr(f"{CLUSTER_ALERTS}: {rule['alert']}", rule["expr"], shown,
                                    exported)  # fmt: skip
    for expr, legend in _dashboard_targets():
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        checked += _check_sync_expr(f"{DASHBOARD}: {expr}", expr, shown, exported)
    assert checked >= 10  # the sync panels and alerts were looked at, labels included


def _dashboard_targets() -> list[tuple[str, str]]:
    with open(DASHBOARD, encoding="utf-8") as f:
        panels = json.load(f)["panels"]
    targets = [(t["expr"], t.get("legendFormat", "")) for p in panels for t in p.get("targets", [])]
    assert [e for e, _ in targets] == dashboard_exprs()
    return targets


def test_the_contract_checks_catch_the_old_mistakes(tmp_path: Path) -> None:
    """The checks above can fail: names and labels the old docs and alerts used."""
    exported = _exported(tmp_path)
    for name in ("stockade_sync_resends_total", "stockade_sync_outbox_pending"):
        with pytest.raises(AssertionError, match="unexported"):
            _check_sync_expr("old", f"rate({name}[1m])", set(), exported)
    lag_by_peer = "sum by (node, peer, le) (rate(stockade_sync_lag_seconds_bucket[5m]))"
    with pytest.raises(AssertionError, match="peer"):
        _check_sync_expr("old", lag_by_peer, set(), exported)
    with pytest.raises(AssertionError, match="origin"):
        _check_sync_expr("old", "stockade_sync_store_records", {"origin"}, exported)
    assert _check_sync_expr("new", lag_by_peer.replace("peer", "origin"), set(), exported) == 1
