"""``stockade flows``: the cluster's flow table, like ``conntrack -L``.

Sources, per node (both optional, merged by flow):

* the filter's control socket, command ``flows`` (``node/daemon.py``): the
  flows in this node's table, with state, seconds left and the rule;
* syncd's control socket, command ``flows`` (``syncd/daemon.py``): every
  flow record syncd holds, each with its ``origin`` (the owner that sent it).

A flow is keyed by protocol and its original-direction tuple.  ``owner`` is
the record's origin as syncd knows it (else the node whose filter table has
it); ``replicas`` are the other nodes whose syncd holds a copy; ``tables``
the nodes whose filter has it in its table.  State and timeout come from the
owner's filter when it answered, else from the record (``timeout`` then is
what the origin reported when it sent the record, marked ``~``).

Merging and filtering are pure (:func:`merge`, :func:`select`); the sockets
are read by :func:`collect`.  A node that cannot be reached is named on
stderr with the reason and the others are still shown.  Exit codes: 0 every
source answered, 1 some source could not be read (partial output),
2 bad input.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TextIO

from cluster.errors import BadInput

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["Flow", "Source", "add_parser", "collect", "merge", "render_flow", "select"]

EXIT_OK: Final = 0
EXIT_PARTIAL: Final = 1
EXIT_BAD_INPUT: Final = 2
PROTOS: Final = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_FETCH_LIMIT: Final = 1_000_000  # per source; the control socket accepts 64 MiB replies


@dataclass(frozen=True, slots=True)
class Source:
    """What one control socket returned (or why it did not)."""

    kind: str  # "filter" or "syncd"
    socket: str
    node_id: str | None  # from its ping reply
    flows: tuple[Mapping[str, Any], ...]
    count: int | None  # flows it holds in total (it may have sent fewer)
    error: str | None  # why it could not be read


@dataclass(frozen=True, slots=True)
class Flow:
    proto: str
    family: int
    src: str
    sport: int
    dst: str
    dport: int
    state: str | None
    timeout: float | None
    timeout_exact: bool  # False: as the origin reported it in its last record
    assured: bool | None
    rule: str | None
    owner: str | None
    replicas: tuple[str, ...]  # nodes other than the owner whose syncd holds it
    tables: tuple[str, ...]  # nodes whose filter table holds it

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        return (self.proto, self.src, self.sport, self.dst, self.dport)


# --- pure: merge and select ---------------------------------------------------------------


def _filter_key(flow: Mapping[str, Any]) -> tuple[str, str, int, str, int]:
    src, dst = ipaddress.ip_address(flow["src"]), ipaddress.ip_address(flow["dst"])
    return (str(flow["proto"]), str(src), int(flow["sport"]), str(dst), int(flow["dport"]))


def _record_key(record: Mapping[str, Any]) -> tuple[str, str, int, str, int]:
    family = int(record["family"])
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    proto = int(record["proto"])
    return (PROTOS.get(proto, str(proto)), str(cls(int(record["orig_src"]))),
            int(record["orig_sport"]), str(cls(int(record["orig_dst"]))),
            int(record["orig_dport"]))  # fmt: skip


def merge(sources: Iterable[Source]) -> tuple[list[Flow], int]:
    """All flows the sources know, one per key, sorted; and how many entries were malformed."""
    tables: dict[tuple[str, str, int, str, int], dict[str, Mapping[str, Any]]] = {}
    records: dict[tuple[str, str, int, str, int], dict[str, Mapping[str, Any]]] = {}
    bad = 0
    for source in sources:
        if source.node_id is None:
            continue
        into, keyer = (tables, _filter_key) if source.kind == "filter" else (records, _record_key)
        for entry in source.flows:
            try:
                key = keyer(entry)
            except (KeyError, TypeError, ValueError):
                bad += 1
                continue
            into.setdefault(key, {})[source.node_id] = entry
    flows = [_flow(k, tables.get(k, {}), records.get(k, {})) for k in set(tables) | set(records)]
    flows.sort(key=lambda f: (f.family, f.proto, _ip_order(f.src), f.sport, _ip_order(f.dst),
                              f.dport))  # fmt: skip
    return flows, bad


def _ip_order(addr: str) -> int:
    return int(ipaddress.ip_address(addr))


def _flow(
    key: tuple[str, str, int, str, int],
    tables: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
) -> Flow:
    origins = sorted({str(r.get("origin")) for r in records.values() if r.get("origin")})
    if not origins:  # a filter that names the origin of its entries (replicas) also tells
        origins = sorted({str(t.get("origin")) for t in tables.values() if t.get("origin")})
    owner = origins[0] if len(origins) == 1 else None
    if owner is None and not origins and len(tables) == 1:
        owner = next(iter(tables))  # no syncd asked: the only table that has it
    if len(origins) > 1:
        # Versions decide between origins (syncd: higher (version, origin) wins).
        best = max(records.values(), key=lambda r: (_int(r.get("version")), str(r.get("origin"))))
        owner = str(best.get("origin"))
    entry = tables.get(owner or "") or (next(iter(tables.values())) if tables else None)
    record = records.get(owner or "") or (next(iter(records.values())) if records else None)
    proto, src, sport, dst, dport = key
    if entry is not None:
        state, timeout, exact = entry.get("state"), entry.get("timeout"), True
        assured, rule = entry.get("assured"), entry.get("rule")
        family = _int(entry.get("family")) or (6 if ":" in src else 4)
    else:
        assert record is not None
        state, timeout, exact = record.get("state"), record.get("timeout"), False
        assured, rule, family = record.get("assured"), None, _int(record.get("family"))
    return Flow(
        proto, family, src, sport, dst, dport,
        state=None if state is None else str(state),
        timeout=float(timeout) if isinstance(timeout, int | float) else None,
        timeout_exact=exact,
        assured=assured if isinstance(assured, bool) else None,
        rule=None if rule is None else str(rule),
        owner=owner,
        replicas=tuple(sorted(n for n in records if n != owner)),
        tables=tuple(sorted(tables)),
    )  # fmt: skip


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Selection:
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None
    proto: str | None = None
    state: str | None = None
    owner: str | None = None


def select(flows: Iterable[Flow], sel: Selection) -> list[Flow]:
    def keep(f: Flow) -> bool:
        if (
            sel.proto is not None
            and f.proto != sel.proto
            and not (sel.proto == "icmp" and f.proto == "icmpv6")
        ):
            return False
        if sel.state is not None and (f.state or "").upper() != sel.state.upper():
            return False
        if sel.port is not None and sel.port not in (f.sport, f.dport):
            return False
        if sel.owner is not None and f.owner != sel.owner:
            return False
        return _within(f.src, sel.src) and _within(f.dst, sel.dst)

    return [f for f in flows if keep(f)]


def _within(addr: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> bool:
    if net is None:
        return True
    ip = ipaddress.ip_address(addr)
    return ip.version == net.version and ip in net


def render_flow(f: Flow) -> str:
    """One conntrack-style line: both tuples, state, seconds left, owner and replicas."""
    timeout = "-" if f.timeout is None else f"{'' if f.timeout_exact else '~'}{f.timeout:.0f}"
    ports = f.proto in ("tcp", "udp")
    orig = f"src={f.src} dst={f.dst}" + (f" sport={f.sport} dport={f.dport}" if ports else
                                          f" id={f.sport}")  # fmt: skip
    reply = f"src={f.dst} dst={f.src}" + (f" sport={f.dport} dport={f.sport}" if ports else
                                           f" id={f.dport}")  # fmt: skip
    flags = " [ASSURED]" if f.assured else ""
    return (f"{f.proto:<6} {f.state or '-':<12} {timeout:>6} {orig} {reply}{flags} "
            f"owner={f.owner or '?'} replicas={','.join(f.replicas) or '-'} "
            f"tables={','.join(f.tables) or '-'}")  # fmt: skip


def flow_to_json(f: Flow) -> dict[str, Any]:
    return {
        "proto": f.proto, "family": f.family,
        "original": {"src": f.src, "sport": f.sport, "dst": f.dst, "dport": f.dport},
        "reply": {"src": f.dst, "sport": f.dport, "dst": f.src, "dport": f.sport},
        "state": f.state, "timeout": f.timeout, "timeout_exact": f.timeout_exact,
        "assured": f.assured, "rule": f.rule, "owner": f.owner,
        "replicas": list(f.replicas), "tables": list(f.tables),
    }  # fmt: skip


# --- adapter -------------------------------------------------------------------------------


def collect(kind: str, socket_path: str, timeout: float = 10.0) -> Source:
    """Ask one control socket for its node id and flows; errors become ``Source.error``."""
    from node.control import request
    from node.errors import NodeError

    try:
        ping = request(socket_path, {"cmd": "ping"}, timeout=timeout)
        reply = request(socket_path, {"cmd": "flows", "limit": _FETCH_LIMIT}, timeout=timeout)
    except NodeError as exc:
        return Source(kind, socket_path, None, (), None, str(exc))
    node = ping.get("node_id")
    if not reply.get("ok", True) or not isinstance(node, str):
        why = reply.get("error") or ping.get("error") or "no node_id in its ping reply"
        return Source(kind, socket_path, None, (), None, f"{socket_path}: {why}")
    flows = reply.get("flows")
    if not isinstance(flows, list):
        return Source(kind, socket_path, node, (), None, f"{socket_path}: reply has no flow list")
    count = reply.get("count")
    entries = tuple(f for f in flows if isinstance(f, dict))
    return Source(kind, socket_path, node, entries, count if isinstance(count, int) else None,
                  None)  # fmt: skip


def add_parser(sub: SubParsers) -> None:
    """Register ``stockade flows`` (called by node.cli's optional-module hook)."""
    p = sub.add_parser(
        "flows",
        help="list flows across nodes (like conntrack -L): tuples, state, owner, replicas",
        description="Exit: 0 all sources read, 1 some node unreachable (partial), 2 bad input.",
    )
    p.add_argument("--node", action="append", default=[], metavar="SOCKET",
                   help="a filter's control socket (repeatable)")  # fmt: skip
    p.add_argument("--syncd", action="append", default=[], metavar="SOCKET",
                   help="a syncd control socket (repeatable): owners and replicas")  # fmt: skip
    p.add_argument("--lab", help="every node of a running namespace lab")
    p.add_argument("--src", type=_network, help="original source address or CIDR")
    p.add_argument("--dst", type=_network, help="original destination address or CIDR")
    p.add_argument("--port", type=_port, help="source or destination port (ICMP: echo id)")
    p.add_argument("--proto", choices=("tcp", "udp", "icmp"))
    p.add_argument("--state", help="protocol state, e.g. ESTABLISHED (case-insensitive)")
    p.add_argument("--owner", help="only flows owned by this node")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--limit", type=_limit, default=1000, help="at most N flows (default 1000)")
    p.set_defaults(handler=main_flows)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or CIDR") from None


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r} is not 0..65535")
    return int(text)


def _limit(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"limit {text!r} is not a number >= 0")
    return int(text)


def main_flows(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        targets = _targets(args)
    except BadInput as exc:
        print(f"stockade flows: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sources = [collect(kind, path) for kind, path in targets]
    flows, bad = merge(sources)
    sel = Selection(args.src, args.dst, args.port, args.proto, args.state, args.owner)
    chosen = select(flows, sel)
    shown = chosen[: args.limit]
    failed = [s for s in sources if s.error is not None]
    for s in failed:
        print(f"stockade flows: {s.kind} {s.socket} not read: {s.error}", file=sys.stderr)
    if args.json:
        doc = {
            "flows": [flow_to_json(f) for f in shown],
            "matched": len(chosen),
            "sources": [_source_json(s) for s in sources],
            "malformed": bad,
        }
        out.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        for f in shown:
            out.write(render_flow(f) + "\n")
        print(_summary(shown, chosen, sources), file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


def _targets(args: argparse.Namespace) -> list[tuple[str, str]]:
    targets = [("filter", p) for p in args.node] + [("syncd", p) for p in args.syncd]
    if args.lab:
        from cluster.status_cli import find_lab

        for node in find_lab(args.lab).nodes:
            if node.control_socket:
                targets.append(("filter", node.control_socket))
            if node.syncd_socket:
                targets.append(("syncd", node.syncd_socket))
    if not targets:
        raise BadInput("give --node SOCKET and/or --syncd SOCKET (repeatable), or --lab NAME")
    return targets


def _source_json(s: Source) -> dict[str, Any]:
    return {"kind": s.kind, "socket": s.socket, "node_id": s.node_id, "received": len(s.flows),
            "count": s.count, "error": s.error}  # fmt: skip


def _summary(shown: Sequence[Flow], chosen: Sequence[Flow], sources: Sequence[Source]) -> str:
    parts = [f"{s.kind} {s.node_id}: {s.count}" for s in sources if s.error is None]
    more = f" (of {len(chosen)} matching)" if len(chosen) > len(shown) else ""
    return f"stockade flows: {len(shown)} flows shown{more}; held: {', '.join(parts) or 'none'}"
