"""``stockade flows``: merging filter tables and syncd stores, filters, output.

The sources are real: engines fed real packets give the filter side through
``node.replay.flow_to_json`` (what ``node/daemon.py`` answers), and syncd's
side is ``syncd.daemon._record_json`` of ``record_from_snapshot`` records;
both are served over real ``node.control.ControlServer`` unix sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cluster.flows_cli import Selection, Source, add_parser, merge, render_flow, select
from node.control import ControlServer
from node.engine import Engine
from node.flow.table import TableConfig
from node.packet import SYN
from node.policy import parse_ruleset
from node.replay import flow_to_json
from syncd.convert import record_from_snapshot
from syncd.daemon import _record_json
from tests.packets import tcp4, udp4

RULES = "default: drop\nrules:\n  - {name: dns, proto: udp, dport: 53, action: accept}\n" \
        "  - {name: web, proto: tcp, dport: 80, action: accept}\n"  # fmt: skip
NOW = 100.0


def engine(*packets: bytes) -> Engine:
    e = Engine(TableConfig(capacity=100), parse_ruleset(RULES, "rules"))
    for i, p in enumerate(packets):
        e.process(p, NOW - 10 + i)
    return e


@pytest.fixture(scope="module")
def tables() -> dict[str, Engine]:
    fw1 = engine(
        udp4("10.1.0.2", 4000, "10.2.0.2", 53), tcp4("10.1.0.3", 5000, "10.2.0.2", 80, SYN)
    )
    return {"fw1": fw1, "fw2": engine(udp4("10.1.0.9", 4001, "10.2.0.2", 53))}


def filter_flows(e: Engine) -> list[dict[str, Any]]:
    return [{**flow_to_json(s, NOW), "offloaded": s.offloaded} for s in e.table.flows()]


def records(e: Engine, origin: str) -> list[dict[str, Any]]:
    return [_record_json(record_from_snapshot(s, origin, 1, NOW)) for s in e.table.flows()]


def sources(tables: Mapping[str, Engine]) -> list[Source]:
    """Each node's filter has its own flows; both syncds hold everything."""
    every = [r for n, e in tables.items() for r in records(e, n)]
    out = []
    for node, e in tables.items():
        out.append(
            Source("filter", f"/{node}.ctl", node, tuple(filter_flows(e)), len(e.table), None)
        )
        out.append(Source("syncd", f"/{node}-syncd.ctl", node, tuple(every), len(every), None))
    return out


def test_merge_names_owner_replicas_and_tables(tables):
    flows, bad = merge(sources(tables))
    assert bad == 0
    got = {(f.proto, f.src, f.sport, f.dport): (f.owner, f.replicas, f.tables, f.state)
           for f in flows}  # fmt: skip
    assert got == {
        ("udp", "10.1.0.2", 4000, 53): ("fw1", ("fw2",), ("fw1",), "UNREPLIED"),
        ("tcp", "10.1.0.3", 5000, 80): ("fw1", ("fw2",), ("fw1",), "SYN_SENT"),
        ("udp", "10.1.0.9", 4001, 53): ("fw2", ("fw1",), ("fw2",), "UNREPLIED"),
    }
    assert all(f.timeout_exact and f.rule in ("dns", "web") for f in flows)


def test_without_filter_sockets_state_comes_from_the_record(tables):
    only_syncd = [s for s in sources(tables) if s.kind == "syncd"]
    flows, _ = merge(only_syncd)
    assert len(flows) == 3 and not any(f.timeout_exact for f in flows)
    assert all(f.tables == () and f.rule is None and f.owner in ("fw1", "fw2") for f in flows)
    assert "~" in render_flow(flows[0])


def test_the_higher_version_wins_between_two_origins(tables):
    snap = next(iter(tables["fw2"].table.flows()))
    old = _record_json(record_from_snapshot(snap, "fw1", 3, NOW))
    new = _record_json(record_from_snapshot(snap, "fw2", 9, NOW))
    flows, _ = merge([Source("syncd", "/a", "fw1", (old,), 1, None),
                      Source("syncd", "/b", "fw3", (new,), 1, None)])  # fmt: skip
    assert flows[0].owner == "fw2" and flows[0].replicas == ("fw1", "fw3")


def test_malformed_entries_are_counted_and_unread_sources_skipped(tables):
    good = filter_flows(tables["fw1"])
    bad = [{"proto": "tcp"}, {**good[0], "src": "not-an-ip"}, {**good[0], "sport": "x"}]
    flows, count = merge([Source("filter", "/a", "fw1", (*good, *bad), 5, None),
                          Source("filter", "/b", None, tuple(good), None, "refused")])  # fmt: skip
    assert count == 3 and len(flows) == 2


def test_select_by_address_port_proto_state_owner(tables):
    flows, _ = merge(sources(tables))

    def keys(**kw: Any) -> set[tuple[str, int]]:
        return {(f.src, f.sport) for f in select(flows, Selection(**kw))}

    net = ipaddress.ip_network
    assert keys(src=net("10.1.0.2/32")) == {("10.1.0.2", 4000)}
    assert keys(src=net("10.1.0.0/24"), proto="udp") == {("10.1.0.2", 4000), ("10.1.0.9", 4001)}
    assert keys(dst=net("10.2.0.0/16"), port=80) == {("10.1.0.3", 5000)}
    assert keys(port=4001) == {("10.1.0.9", 4001)}
    assert keys(state="syn_sent") == {("10.1.0.3", 5000)}
    assert keys(owner="fw2") == {("10.1.0.9", 4001)}
    assert keys(src=net("fd00::/8")) == set()
    assert keys(proto="icmp") == set()


def test_render_is_conntrack_like(tables):
    flows, _ = merge(sources(tables))
    line = render_flow(next(f for f in flows if f.proto == "tcp"))
    assert line.startswith("tcp    SYN_SENT     ")
    assert ("src=10.1.0.3 dst=10.2.0.2 sport=5000 dport=80 "
            "src=10.2.0.2 dst=10.1.0.3 sport=80 dport=5000") in line  # fmt: skip
    assert line.endswith("owner=fw1 replicas=fw2 tables=fw1")


# --- over real control sockets ------------------------------------------------------------


class Served:
    """ControlServers on an event loop in a thread, answering like node and syncd do."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[ControlServer] = []

    def serve(self, path: str, node_id: str, flows: list[dict[str, Any]]) -> None:
        async def handle(command: Mapping[str, Any]) -> dict[str, Any]:
            if command["cmd"] == "ping":
                return {"node_id": node_id}
            if command["cmd"] == "flows":
                return {"count": len(flows), "flows": flows[: command["limit"]]}
            return {"ok": False, "error": "unknown"}

        server = ControlServer(path, handle)
        asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(5)
        self.servers.append(server)

    def close(self) -> None:
        for server in self.servers:
            asyncio.run_coroutine_threadsafe(server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served(tmp_path: Path, tables: dict[str, Engine]) -> Iterator[Path]:
    s = Served()
    try:
        every = [r for n, e in tables.items() for r in records(e, n)]
        for node, e in tables.items():
            s.serve(str(tmp_path / f"{node}.ctl"), node, filter_flows(e))
            s.serve(str(tmp_path / f"{node}-syncd.ctl"), node, every)
        yield tmp_path
    finally:
        s.close()


def run_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["flows", *argv])
    out = io.StringIO()
    code: int = args.handler(args, out)
    return code, out.getvalue()


def test_cli_over_sockets_text_and_json(served, capsys):
    d = served
    argv = ["--node", str(d / "fw1.ctl"), "--node", str(d / "fw2.ctl"),
            "--syncd", str(d / "fw1-syncd.ctl"), "--syncd", str(d / "fw2-syncd.ctl")]  # fmt: skip
    code, text = run_cli(*argv)
    assert code == 0
    lines = text.splitlines()
    assert len(lines) == 3 and all("owner=" in line for line in lines)
    assert "3 flows shown" in capsys.readouterr().err
    code, text = run_cli(*argv, "--json", "--proto", "udp", "--limit", "1")
    doc = json.loads(text)
    assert code == 0 and doc["matched"] == 2 and len(doc["flows"]) == 1
    flow = doc["flows"][0]
    assert flow["original"] == {"src": "10.1.0.2", "sport": 4000, "dst": "10.2.0.2", "dport": 53}
    assert flow["reply"] == {"src": "10.2.0.2", "sport": 53, "dst": "10.1.0.2", "dport": 4000}
    assert (flow["owner"], flow["replicas"], flow["tables"]) == ("fw1", ["fw2"], ["fw1"])
    assert {s["node_id"] for s in doc["sources"]} == {"fw1", "fw2"}


def test_an_unreachable_node_is_named_and_the_rest_shown(served, capsys):
    missing = served / "fw3.ctl"
    code, text = run_cli("--node", str(served / "fw1.ctl"), "--node", str(missing))
    err = capsys.readouterr().err
    assert code == 1 and len(text.splitlines()) == 2
    assert f"filter {missing} not read: no control socket at {missing}" in err
    assert "Traceback" not in err


def test_no_source_is_bad_input(capsys):
    assert run_cli()[0] == 2
    assert "--node SOCKET" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--node", "/x", "--src", "not-an-address")
