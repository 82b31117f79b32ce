from prometheus_client import CollectorRegistry, generate_latest

from cluster.agent import AgentStats
from cluster.membership import NodeState
from cluster.metrics import ClusterCollector, ClusterSources, FailoverDurations


def stats(**kw) -> AgentStats:
    base = dict(
        state=NodeState.UP, epoch=3, members=3, suspects=(), holders_known=True,
        revocations=1, claims=4, releases=2, fences=0, failovers=1, registering=False,
        suspicions=2, etcd_degraded=False, resync_progress=1.0,
        vips_held=("10.0.0.1", "10.0.0.2"),
    )  # fmt: skip
    base.update(kw)
    return AgentStats(**base)


def scrape(agent_stats: AgentStats, durations: FailoverDurations) -> str:
    registry = CollectorRegistry()
    sources = ClusterSources(lambda: agent_stats, vips_configured=6, failovers=durations)
    registry.register(ClusterCollector("fw1", sources))
    return generate_latest(registry).decode()


def test_metric_names_follow_the_documented_contract():
    durations = FailoverDurations()
    durations.observe(0.21)
    durations.observe(0.45)
    text = scrape(stats(), durations)
    assert 'stockade_cluster_state{node="fw1",state="up"} 1.0' in text
    assert 'stockade_cluster_state{node="fw1",state="fenced"} 0.0' in text
    assert 'stockade_cluster_vips_held{node="fw1"} 2.0' in text
    assert 'stockade_cluster_vip_holder{node="fw1",vip="10.0.0.2"} 1.0' in text
    assert 'stockade_cluster_vip_moves_total{direction="acquired",node="fw1"} 4.0' in text
    assert 'stockade_cluster_failover_duration_seconds_bucket{le="0.3",node="fw1"} 1.0' in text
    assert 'stockade_cluster_failover_duration_seconds_bucket{le="0.5",node="fw1"} 2.0' in text
    assert 'stockade_cluster_failover_duration_seconds_count{node="fw1"} 2.0' in text
    assert 'stockade_cluster_suspicions_total{node="fw1"} 2.0' in text
    assert 'stockade_cluster_etcd_degraded{node="fw1"} 0.0' in text


def test_every_documented_cluster_metric_is_exported():
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    documented = set(re.findall(r"`(stockade_cluster_[a-z_]+)`", doc.read_text()))
    text = scrape(stats(etcd_degraded=True), FailoverDurations())
    exported = set(re.findall(r"^# TYPE (stockade_cluster_[a-z_]+) ", text, re.M))
    counters = {name + "_total" for name in exported}
    missing = {name for name in documented if name not in exported | counters}
    assert not missing, f"documented but not exported: {sorted(missing)}"
