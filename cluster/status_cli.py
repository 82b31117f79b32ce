"""``stockade status``: one screen answering "is my cluster healthy?".

The adapter around :mod:`cluster.status`: :class:`StatusReader` reads one
cluster's keys from etcd into a :class:`~cluster.status.Snapshot` (and
watches them for ``--follow``), :func:`render` turns the pure view into at
most 100 columns of text, coloured only on a terminal.

Exit codes (docs/status.md): 0 healthy, 1 etcd unreachable or refusing,
2 bad input (flags, cluster id, lab), 3 degraded (something needs a look),
4 critical (a node down or fenced, a VIP unheld or held twice).  ``--follow``
runs until interrupted; etcd outages meanwhile are reported and retried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TextIO

from cluster.errors import BadInput, EtcdError, EtcdUnavailable
from cluster.status import (
    FAILOVER_TARGET_MS,
    ClusterView,
    EtcdProbe,
    Event,
    Health,
    NodeView,
    Severity,
    Snapshot,
    build_view,
    event_to_json,
    parse_event,
    view_to_json,
)

if TYPE_CHECKING:
    from cluster.etcd import EtcdConfig

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["EXIT_CODES", "add_parser", "main_status", "open_reader", "render", "render_event"]

EXIT_OK: Final = 0
EXIT_ETCD: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_DEGRADED: Final = 3
EXIT_CRITICAL: Final = 4
EXIT_CODES: Final = {
    Health.HEALTHY: EXIT_OK, Health.DEGRADED: EXIT_DEGRADED, Health.CRITICAL: EXIT_CRITICAL,
}  # fmt: skip
_REDRAW_MIN: Final = 0.2  # seconds between two re-reads in --follow, at most 5 per second
_RETRY: Final = 1.0  # seconds between attempts to reach etcd again in --follow
_DETAIL_CHARS: Final = 200


# --- reading etcd ----------------------------------------------------------------------


def _reader_class() -> type[Any]:
    """Built lazily: cluster.etcd loads grpc and aetcd, which ``--help`` must not pay for."""
    from cluster.etcd import EtcdStore

    class _Reader(EtcdStore):
        """Read-only access to one cluster's keys (the error translation is EtcdStore's)."""

        def __init__(self, config: EtcdConfig, cluster_id: str) -> None:
            super().__init__(config, cluster_id)
            self.cluster_id = cluster_id
            self._sha_cache: dict[int, str] = {}  # revisions are immutable once stored

        async def _prefix(self, what: str, folder: str) -> tuple[dict[str, bytes], int]:
            prefix = self.keys.prefix + folder.encode()
            listing = await self._call(what, self._client.get_prefix(prefix))
            values = {
                bytes(kv.key[len(prefix) :]).decode(errors="replace"): bytes(kv.value)
                for kv in listing
            }
            return values, int(listing.header.revision)

        async def snapshot(self) -> Snapshot:
            status = await self._call("etcd status", self._client.status())
            started = time.monotonic()
            statuses, revision = await self._prefix("read status", "status/")
            latency = time.monotonic() - started
            members, _ = await self._prefix("read members", "members/")
            epochs, _ = await self._prefix("read epochs", "epochs/")
            vips, _ = await self._prefix("read vips", "vips/")
            events, _ = await self._prefix("read events", "events/")
            current, sha = await self._rules()
            leader = getattr(status.leader, "name", None) or None
            probe = EtcdProbe(self.config.endpoint, leader, status.version, revision, latency)
            return Snapshot(
                cluster_id=self.cluster_id,
                etcd=probe,
                members=members,
                epochs=epochs,
                statuses=statuses,
                vips={k: v.decode(errors="replace") for k, v in vips.items()},
                events=tuple(events.values()),
                rules_current=current,
                rules_sha256=sha,
            )

        async def _rules(self) -> tuple[int | None, str | None]:
            got = await self._call("read rules/current", self._client.get(self.keys.rules_current))
            if got is None:
                return None, None
            try:
                current = int(bytes(got.value))
            except ValueError:
                return None, None  # shown as "no cluster ruleset"; `rules history` says more
            if current not in self._sha_cache:
                text = await self._call("read ruleset", self._client.get(self.keys.rule(current)))
                if text is None:
                    return current, None
                try:
                    body = json.loads(bytes(text.value))
                    digest = hashlib.sha256(str(body["text"]).encode()).hexdigest()
                except (ValueError, KeyError, TypeError):
                    return current, None
                self._sha_cache[current] = digest
            return current, self._sha_cache[current]

        async def watch_cluster(self, start: int) -> AsyncGenerator[tuple[str, bytes], None]:
            """(relative key, value) of every put under the cluster prefix from ``start``."""
            stream = self._watch("watch cluster", self.keys.prefix, prefix=True, start=start)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    key = bytes(event.kv.key[len(self.keys.prefix) :]).decode(errors="replace")
                    value = bytes(event.kv.value) if event.kind == "PUT" else b""
                    yield key, value

    return _Reader


def open_reader(config: EtcdConfig, cluster_id: str) -> Any:
    """A reader for one cluster; use as ``async with``."""
    return _reader_class()(config, cluster_id)


# --- the command -----------------------------------------------------------------------


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade status`` (called by node.cli's optional-module hook)."""
    p = sub.add_parser(
        "status",
        help="is the cluster healthy? members, VIPs, flows, sync lag, rules drift, events",
        description="Cluster status from etcd.  Exit: 0 healthy, 1 etcd unreachable, "
        "2 bad input, 3 degraded, 4 critical.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--etcd", help="etcd HOST:PORT or http://HOST:PORT (default 127.0.0.1:2379)")
    where.add_argument("--lab", help="a running namespace lab (stockade lab up NAME)")
    p.add_argument("--cluster", help="cluster id (default: stockade, or the lab's)")
    p.add_argument("--follow", "-f", action="store_true", help="redraw on change, tail events")
    p.add_argument("--json", action="store_true", help="machine-readable (JSON lines with -f)")
    p.add_argument("--events", type=_count, default=10, help="recent events shown (default 10)")
    p.add_argument(
        "--interval", type=float, default=1.0,
        help="the nodes' status_interval, s (stale after 3x; default 1)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=1.0, help="seconds per etcd call (default 1)")
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto",
        help="colours (default: only on a terminal)",
    )  # fmt: skip
    p.set_defaults(handler=main_status)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 10000:
        raise argparse.ArgumentTypeError("give 0..10000")
    return value


def main_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        endpoint, cluster_id = _target(args)
        if not 0 < args.interval <= 3600:
            raise BadInput(f"--interval {args.interval} is not in (0, 3600]")
        from cluster.etcd import EtcdConfig

        config = EtcdConfig(endpoint, timeout=args.timeout)
    except BadInput as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    try:
        return asyncio.run(_run(config, cluster_id, args, out, color))
    except EtcdUnavailable as exc:
        return _fail(f"etcd at {endpoint} is unreachable: {_short(exc.detail)}", EXIT_ETCD)
    except EtcdError as exc:
        return _fail(f"etcd at {endpoint} refused: {_short(exc.detail)}", EXIT_ETCD)
    except BadInput as exc:
        return _fail(f"{exc} (cluster {cluster_id}, etcd {endpoint})", EXIT_BAD_INPUT)


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(etcd host:port, cluster id) from the flags or the lab's state file."""
    from cluster.rules import DEFAULT_CLUSTER, etcd_endpoint

    if args.lab:
        lab = find_lab(args.lab)
        return lab.etcd, args.cluster or lab.cluster_id
    return etcd_endpoint(args.etcd or "127.0.0.1:2379"), args.cluster or DEFAULT_CLUSTER


async def _run(
    config: EtcdConfig, cluster_id: str, args: argparse.Namespace, out: TextIO, color: bool
) -> int:
    async with open_reader(config, cluster_id) as reader:
        snap = await reader.snapshot()
        view = _view(snap, args)
        if not args.follow:
            if args.json:
                out.write(json.dumps(view_to_json(view), sort_keys=True) + "\n")
            else:
                out.write(render(view, color=color))
            return EXIT_CODES[view.health]
        await _Follower(reader, args, out, color).run(snap, view)
        return EXIT_CODES[view.health]


def _view(snap: Snapshot, args: argparse.Namespace) -> ClusterView:
    return build_view(snap, time.time(), status_interval=args.interval, events=args.events)


class _Follower:
    """``--follow``: tail the events as they are written, redraw the summary on change."""

    def __init__(self, reader: Any, args: argparse.Namespace, out: TextIO, color: bool) -> None:
        self.reader = reader
        self.args = args
        self.out = out
        self.color = color
        self.screen = out.isatty() and not args.json  # full redraws only on a terminal
        self.seen: set[tuple[str, int, float]] = set()
        self.signature: tuple[Any, ...] | None = None

    async def run(self, snap: Snapshot, view: ClusterView) -> None:
        self._remember(snap)
        self._show(view)
        while True:
            try:
                await self._watch(snap.etcd.revision + 1)
            except EtcdError as exc:
                self._say(f"etcd at {self.reader.config.endpoint}: {_short(exc.detail)}; retrying")
            while True:
                await asyncio.sleep(_RETRY)
                try:
                    snap = await self.reader.snapshot()
                    break
                except EtcdError:
                    continue
            self._say("etcd reachable again")
            self._tail(snap.events)
            self._show(_view(snap, self.args))

    async def _watch(self, start: int) -> None:
        changes: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=10000)

        async def pump() -> None:
            async for change in self.reader.watch_cluster(start):
                with contextlib.suppress(asyncio.QueueFull):  # a flood: the re-read catches up
                    changes.put_nowait(change)

        task = asyncio.create_task(pump())
        getter: asyncio.Task[tuple[str, bytes]] | None = None
        try:
            last_read = 0.0
            while True:
                getter = getter or asyncio.create_task(changes.get())
                done, _ = await asyncio.wait(
                    {task, getter}, timeout=self.args.interval, return_when=asyncio.FIRST_COMPLETED
                )
                if task in done:
                    task.result()  # raises the EtcdError that ended the watch
                    raise EtcdUnavailable(self.reader.config.endpoint, "watch ended")
                if getter in done:
                    self._on_change(*getter.result())
                    getter = None
                while not changes.empty():
                    self._on_change(*changes.get_nowait())
                if time.monotonic() - last_read >= _REDRAW_MIN:
                    last_read = time.monotonic()
                    self._show(_view(await self.reader.snapshot(), self.args))
        finally:
            for pending in (task, getter):
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await pending

    def _on_change(self, key: str, value: bytes) -> None:
        if key.startswith("events/") and value:
            self._tail((value,))

    def _remember(self, snap: Snapshot) -> None:
        for raw in snap.events:
            event = parse_event(raw)
            if event is not None:
                self.seen.add((event.node, event.seq, event.ts))

    def _tail(self, raws: tuple[bytes, ...]) -> None:
        fresh: list[Event] = []
        for raw in raws:
            event = parse_event(raw)
            if event is not None and (event.node, event.seq, event.ts) not in self.seen:
                self.seen.add((event.node, event.seq, event.ts))
                fresh.append(event)
        for event in sorted(fresh, key=lambda e: (e.ts, e.node, e.seq)):
            if self.args.json:
                self._line(json.dumps({"type": "event", **event_to_json(event)}, sort_keys=True))
            elif not self.screen:
                self._line(render_event(event, color=self.color))
        if fresh and self.screen:
            self.signature = None  # the event list on screen changed

    def _show(self, view: ClusterView) -> None:
        signature = view.signature()
        if self.screen:
            self.out.write("\x1b[H\x1b[2J" + render(view, color=self.color))
            self.out.flush()
            return
        if signature == self.signature:
            return
        first = self.signature is None
        self.signature = signature
        if self.args.json:
            self._line(json.dumps({"type": "status", **view_to_json(view)}, sort_keys=True))
        else:
            self._line(("" if first else "\n") + render(view, color=self.color).rstrip("\n"))

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        print(f"stockade status: {stamp} {text}", file=sys.stderr, flush=True)


def _fail(message: str, code: int) -> int:
    print(f"stockade status: {message}", file=sys.stderr)
    return code


def _short(detail: str) -> str:
    line = " ".join(detail.split())
    return line if len(line) <= _DETAIL_CHARS else line[: _DETAIL_CHARS - 3] + "..."


# --- labs ------------------------------------------------------------------------------

LAB_ROOT: Final = "/run/stockade-lab"


@dataclass(frozen=True, slots=True)
class LabNode:
    node_id: str
    control_socket: str | None  # the filter's control socket
    syncd_socket: str | None  # syncd's control socket


@dataclass(frozen=True, slots=True)
class LabTarget:
    name: str
    etcd: str  # host:port, reachable from the root namespace
    cluster_id: str
    nodes: tuple[LabNode, ...]


def find_lab(name: str, root: str = LAB_ROOT) -> LabTarget:
    """A running namespace lab's endpoints, from ``<root>/<name>/lab.json``.

    The file is written by ``stockade lab up`` (``chaos/lab/state.py``, schema
    version 1; its root-namespace veth makes etcd reachable from here).
    Raises :class:`BadInput` naming the file and the problem.
    """
    path = os.path.join(root, name, "lab.json")
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"no lab {name!r} is running ({path} missing)") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"lab state {path}: {exc}") from None
    try:
        if body["version"] != 1:
            raise BadInput(f"lab state {path}: schema version {body['version']!r}, want 1")
        nodes = tuple(
            LabNode(str(node_id), n.get("control_socket"), n.get("syncd_control_socket"))
            for node_id, n in sorted(body["nodes"].items())
        )
        return LabTarget(name, str(body["etcd"]["endpoint"]), str(body["cluster_id"]), nodes)
    except (KeyError, TypeError, AttributeError) as exc:
        raise BadInput(f"lab state {path}: missing or bad field {exc}") from None


# --- rendering (pure: view in, text out) -----------------------------------------------

WIDTH: Final = 100
_RESET: Final = "\x1b[0m"
_COLORS: Final = {"green": "\x1b[32m", "yellow": "\x1b[33m", "red": "\x1b[31;1m", "dim": "\x1b[2m"}
_STATE_COLOR: Final = {
    "up": "green", "left": "dim", "syncing": "yellow", "joining": "yellow",
    "draining": "yellow", "stale": "yellow", "unknown": "yellow",
    "suspect": "red", "down": "red", "fenced": "red",
}  # fmt: skip
_HEALTH_COLOR: Final = {Health.HEALTHY: "green", Health.DEGRADED: "yellow", Health.CRITICAL: "red"}
_SEVERITY_COLOR: Final = {Severity.CRIT: "red", Severity.WARN: "yellow", Severity.INFO: "dim"}
_NODE_COLUMNS: Final = (
    ("NODE", 12, "<"), ("STATE", 12, "<"), ("EPOCH", 5, ">"), ("SINCE", 7, ">"),
    ("VIPS", 4, ">"), ("OWN", 8, ">"), ("REPLICA", 8, ">"), ("TABLE", 9, ">"),
    ("RULES", 6, ">"), ("FILTER", 7, "<"), ("LAG p99", 12, "<"),
)  # fmt: skip


def render(view: ClusterView, *, color: bool = False) -> str:
    """The ``stockade status`` screen: every line at most :data:`WIDTH` columns."""
    paint = _painter(color)
    lines = _header(view, paint)
    lines += ["", _row([name for name, _, _ in _NODE_COLUMNS])]
    for node in view.nodes:
        cells = _node_cells(node, view)
        lines.append(_row(cells, {1: _STATE_COLOR.get(node.state, "yellow")}, paint))
    if not view.nodes:
        lines.append("  (no node has registered in this cluster)")
    lines += _vip_lines(view, paint)
    lines += _sync_lines(view)
    lines += ["", "PROBLEMS" if view.problems else "PROBLEMS: none"]
    for p in view.problems:
        tag = paint(_SEVERITY_COLOR[p.severity], f"{p.severity.value.upper():<4}")
        lines.append(f"  {tag} " + _fit(f"{p.subject:<15} {p.text}", WIDTH - 7))
    if view.failovers:
        lines += ["", f"FAILOVERS (last {len(view.failovers)})"]
        lines += ["  " + _fit(_failover(e), WIDTH - 2) for e in view.failovers]
    if view.events:
        lines += ["", f"EVENTS (last {len(view.events)})"]
        lines += ["  " + render_event(e, color=color, width=WIDTH - 2) for e in view.events]
    if view.bad_fields:
        lines += ["", f"({view.bad_fields} malformed values in etcd ignored)"]
    return "\n".join(lines) + "\n"


def render_event(event: Event, *, color: bool = False, width: int = WIDTH) -> str:
    """One event as a ``tail -f`` line: UTC time to the millisecond, node, kind, detail."""
    took = "" if event.duration_ms is None else f" ({event.duration_ms:.1f} ms)"
    text = _fit(f"{_stamp(event.ts)} {event.node:<12} {event.kind:<14} "
                f"{event.detail or ''}{took}".rstrip(), width)  # fmt: skip
    bad = event.kind in ("suspect", "revoked", "fenced", "etcd-degraded")
    slow = event.kind == "failover" and (event.duration_ms or 0) > FAILOVER_TARGET_MS
    return _painter(color)("red" if bad or slow else "", text)


def _header(view: ClusterView, paint: Callable[[str, str], str]) -> list[str]:
    members = sum(1 for n in view.nodes if n.state != "left")
    health = paint(_HEALTH_COLOR[view.health], view.health.value.upper())
    rules = "no cluster ruleset"
    if view.rules_current is not None:
        rules = f"rules revision {view.rules_current} ({(view.rules_sha256 or '?')[:12]})"
    first = _fit(f"cluster {view.cluster_id}", 40) + ": "
    rest = f"  {view.up}/{members} up   {rules}"
    room = WIDTH - len(first) - len(view.health.value) - 25
    e = view.etcd
    second = (
        f"etcd {e.endpoint} ok  leader {e.leader or 'none'}  v{e.version or '?'}  "
        f"read {e.latency * 1000:.1f} ms  rev {e.revision}"
    )
    return [
        first + health + f"{_fit(rest, room):<{room}}" + "  " + _stamp(view.now)[:19] + " UTC",
        _fit(second, WIDTH),
    ]


def _node_cells(n: NodeView, view: ClusterView) -> list[str]:
    state = n.state
    if state in ("syncing", "joining") and n.resync_progress is not None:
        state = f"{state} {n.resync_progress:.0%}"
    table = "-"
    if n.table_usage is not None:
        table = f"{n.table_usage:.0%}/{_si(n.table_capacity)}"
    rules = _dash(n.rules_revision) + ("!" if n.rules_drift else "")
    filt = "-"
    if n.filter_connected is not None:
        filt = "no" if not n.filter_connected else "ok" if n.filter_synced is not False else "sync"
    lag = "-"
    worst = max(
        (p for p in n.peers if p.lag_p99_ms is not None),
        key=lambda p: p.lag_p99_ms or 0.0, default=None,
    )  # fmt: skip
    if worst is not None:
        lag = f"{worst.lag_p99_ms:.1f}ms {worst.peer}"
    since = "-" if n.since is None else _ago(view.now - n.since)
    return [
        n.node_id, state, _dash(n.epoch), since, str(len(n.vips)) if n.member else "-",
        _dash(n.flows_own), _dash(n.flows_replica), table, rules, filt, lag,
    ]  # fmt: skip


def _vip_lines(view: ClusterView, paint: Callable[[str, str], str]) -> list[str]:
    if not view.vips:
        return ["", "VIPS: none claimed"]
    lines = ["", "VIPS", f"  {'ADDRESS':<40} {'CLAIM':<12} {'HELD BY (status)':<30} OK"]
    for v in view.vips:
        held = ", ".join(v.reported_by) or "-"
        ok = paint("green", "ok") if v.ok else paint("red", "NO")
        lines.append(f"  {_fit(v.address, 40):<40} {_fit(v.holder or '-', 12):<12} "
                     f"{_fit(held, 30):<30} {ok}")  # fmt: skip
    return lines


def _sync_lines(view: ClusterView) -> list[str]:
    lines: list[str] = []
    for n in view.nodes:
        if not n.member or not n.peers:
            continue
        parts = [
            f"{p.peer} {p.state or '?'} "
            + ("-" if p.lag_p99_ms is None else f"{p.lag_p99_ms:.1f}ms")
            + ("" if p.outbox is None else f"/{p.outbox}")
            + ("" if not p.beacon_loss else f" loss {p.beacon_loss:.0%}")
            for p in n.peers
        ]
        lines.append("  " + _fit(f"{n.node_id:<12} -> " + ", ".join(parts), WIDTH - 2))
    if lines:
        lines = ["", "SYNC (peer, state, lag p99 / outbox, beacon loss)", *lines]
    return lines


def _failover(e: Event) -> str:
    took = "?" if e.duration_ms is None else f"{e.duration_ms:.1f} ms"
    slow = " SLOW" if (e.duration_ms or 0) > FAILOVER_TARGET_MS else ""
    return f"{_stamp(e.ts)} {e.node:<12} took over {e.detail or '?'} in {took}{slow}"


def _row(
    cells: list[str],
    colors: dict[int, str] | None = None,
    paint: Callable[[str, str], str] | None = None,
) -> str:
    out = []
    for i, (text, (_, width, align)) in enumerate(zip(cells, _NODE_COLUMNS, strict=True)):
        cell = _fit(text, width)
        cell = f"{cell:<{width}}" if align == "<" else f"{cell:>{width}}"
        if colors and paint and i in colors:
            cell = paint(colors[i], cell)
        out.append(cell)
    return " ".join(out).rstrip()


def _painter(color: bool) -> Callable[[str, str], str]:
    def paint(name: str, text: str) -> str:
        if not color or not name:
            return text
        return _COLORS[name] + text + _RESET

    return paint


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _stamp(ts: float) -> str:
    seconds, millis = divmod(int(ts * 1000), 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _si(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("M", 1_000_000), ("k", 1000)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)
