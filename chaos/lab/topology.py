"""The cluster lab's topology: a YAML template rendered for N nodes.

The template (``chaos/lab/topologies/cluster.yaml`` by default) names hosts,
veth links, bridged segments, the VIP pool and the routes, with
placeholders ``{base}`` (first two octets), ``{k}`` (node index) and
``{node}`` (node id).  :func:`render` expands it into a frozen
:class:`LabTopology`; it is pure (no namespaces are touched), so the
addressing and the ECMP nexthop order can be unit-tested.  The builder in
``chaos.lab.build`` turns a ``LabTopology`` into commands.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from chaos.errors import LabError

MAX_NODES = 9  # node addresses are .1{k}: two digits at most
DEFAULT_BASE = "10.231"


@dataclass(frozen=True, slots=True)
class Veth:
    # Logical host of each end ("" = the root namespace) and interface names.
    a: str
    a_if: str
    b: str
    b_if: str
    a_addrs: tuple[str, ...] = ()
    b_addrs: tuple[str, ...] = ()
    # Bridge (in host b) the b end is enslaved to; None = a plain link.
    b_bridge: str | None = None


@dataclass(frozen=True, slots=True)
class Bridge:
    host: str
    name: str
    addr: str


@dataclass(frozen=True, slots=True)
class Route:
    host: str
    dest: str
    # One gateway = an ordinary route; several = an ECMP multipath route
    # whose nexthops keep this order (the order decides which flows pick
    # which nexthop, see docs/lab.md).
    via: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Vip:
    address: str  # with prefix, "10.231.10.101/24"
    interface: str
    home: str  # node id
    segment: str

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str
    host: str
    index: int
    # Segment name -> (interface, address with prefix) of this node.
    interfaces: tuple[tuple[str, str, str], ...]
    routes: tuple[Route, ...]

    def address(self, segment: str) -> str:
        """The node's IP (no prefix) on ``segment``."""
        for name, _ifname, addr in self.interfaces:
            if name == segment:
                return addr.split("/")[0]
        raise LabError(f"node {self.node_id} has no interface on segment {segment!r}")


@dataclass(frozen=True, slots=True)
class LabTopology:
    hosts: tuple[str, ...]  # every namespace, nodes included
    routers: tuple[str, ...]  # forwarding on (nodes included)
    nodes: tuple[NodeSpec, ...]
    bridges: tuple[Bridge, ...]
    veths: tuple[Veth, ...]
    routes: tuple[Route, ...]
    vips: tuple[Vip, ...]
    etcd_host: str
    etcd_address: str
    etcd_client_port: int
    etcd_peer_port: int
    sync_port: int
    client_net: str
    server_net: str
    # Root-namespace address on the management segment (None = no root veth).
    root_addr: str | None
    root_segment: str | None
    traffic: Mapping[str, Any]
    asymmetric: bool

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.etcd_address}:{self.etcd_client_port}"

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise LabError(f"no node {node_id!r} in this lab")


def load_template(path: str | None = None) -> dict[str, Any]:
    """Read a topology template; None = the one shipped with the package."""
    try:
        if path is None:
            text = resources.files("chaos.lab").joinpath("topologies/cluster.yaml").read_text()
        else:
            text = Path(path).read_text()
        raw = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise LabError(f"topology {path or 'cluster.yaml'}: {e}") from e
    if not isinstance(raw, dict):
        raise LabError(f"topology {path or 'cluster.yaml'}: expected a mapping")
    return raw


def render(
    template: Mapping[str, Any], nodes: int, base: str = DEFAULT_BASE, asymmetric: bool = False
) -> LabTopology:
    """Expand ``template`` for ``nodes`` nodes; every problem is a :class:`LabError`."""
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"--nodes must be 1..{MAX_NODES}, not {nodes}")
    if asymmetric and nodes < 2:
        raise LabError("--asymmetric needs at least 2 nodes")
    _check_base(base)
    try:
        return _render(template, nodes, base, asymmetric)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise LabError(f"topology template: bad or missing field: {e!r}") from e


def _check_base(base: str) -> None:
    parts = base.split(".")
    if len(parts) != 2 or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise LabError(f"--base must be two octets like 10.231, not {base!r}")


def _render(t: Mapping[str, Any], n: int, base: str, asymmetric: bool) -> LabTopology:
    def fmt(text: str, k: int = 0) -> str:
        return str(text).format(base=base, k=k, node=fmt_id(k))

    def fmt_id(k: int) -> str:
        return str(t["node"]["id"]).format(base=base, k=k) if k else ""

    node_hosts = [fmt(t["node"]["host"], k) for k in range(1, n + 1)]
    hosts = tuple(t["hosts"]) + tuple(node_hosts)
    if len(set(hosts)) != len(hosts):
        raise LabError("topology: host names repeat")
    segments = {s["name"]: s for s in t["segments"]}
    node_specs = []
    for k in range(1, n + 1):
        ifaces = tuple((name, s["node_if"], fmt(s["node_addr"], k)) for name, s in segments.items())
        routes = tuple(
            Route(node_hosts[k - 1], fmt(r["dest"], k), (fmt(r["via"], k),))
            for r in t["node"].get("routes", ())
        )
        node_specs.append(NodeSpec(fmt_id(k), node_hosts[k - 1], k, ifaces, routes))
    bridges = tuple(Bridge(s["host"], s["bridge"], fmt(s["addr"])) for s in segments.values())
    veths = [
        Veth(x["a"], x["a_if"], x["b"], x["b_if"], (fmt(x["a_addr"]),), (fmt(x["b_addr"]),))
        for x in t.get("links", ())
    ]
    root_addr = root_segment = None
    for s in segments.values():
        for node in node_specs:
            addr = fmt(s["node_addr"], node.index)
            veths.append(
                Veth(node.host, s["node_if"], s["host"], node.node_id, (addr,), (), s["bridge"])
            )
        if s.get("root_addr"):
            if root_addr is not None:
                raise LabError("topology: only one segment may have root_addr")
            root_addr, root_segment = fmt(s["root_addr"]), s["name"]
            # The root end's name depends on the lab name: the builder fills it in.
            veths.append(Veth("", "", s["host"], "root0", (root_addr,), (), s["bridge"]))
    vips = tuple(
        Vip(fmt(v["address"], k), segments[v["segment"]]["node_if"], fmt_id(k), v["segment"])
        for k in range(1, n + 1)
        for v in t["vips"]
    )
    routes = tuple(_route(r, vips, fmt, asymmetric) for r in t["routes"])
    all_routes = routes + tuple(r for node in node_specs for r in node.routes)
    topo = LabTopology(
        hosts=hosts,
        routers=tuple(t.get("routers", ())) + tuple(node_hosts),
        nodes=tuple(node_specs),
        bridges=bridges,
        veths=tuple(veths),
        routes=all_routes,
        vips=vips,
        etcd_host=t["etcd"]["host"],
        etcd_address=fmt(t["etcd"]["address"]),
        etcd_client_port=int(t["etcd"]["client_port"]),
        etcd_peer_port=int(t["etcd"]["peer_port"]),
        sync_port=int(t["sync_port"]),
        client_net=fmt(t["client_net"]),
        server_net=fmt(t["server_net"]),
        root_addr=root_addr,
        root_segment=root_segment,
        traffic={key: fmt(v) if isinstance(v, str) else v for key, v in t["traffic"].items()},
        asymmetric=asymmetric,
    )
    _validate(topo)
    return topo


def _route(r: Mapping[str, Any], vips: tuple[Vip, ...], fmt: Any, asymmetric: bool) -> Route:
    if "ecmp" in r:
        via = [v.ip for v in vips if v.segment == r["ecmp"]]
        if not via:
            raise LabError(f"topology: route on {r['host']} names segment {r['ecmp']!r} w/o VIPs")
        if asymmetric:
            shift = int(r.get("asymmetric_rotate", 0)) % len(via)
            via = via[shift:] + via[:shift]
        return Route(r["host"], fmt(r["dest"]), tuple(via))
    return Route(r["host"], fmt(r["dest"]), (fmt(r["via"]),))


def _validate(topo: LabTopology) -> None:
    addrs: dict[str, str] = {}
    every = [(v.a, a) for v in topo.veths for a in v.a_addrs]
    every += [(v.b, a) for v in topo.veths for a in v.b_addrs]
    every += [(b.host, b.addr) for b in topo.bridges] + [(v.home, v.address) for v in topo.vips]
    for owner, addr in every:
        try:
            ip = str(ipaddress.ip_interface(addr).ip)
        except ValueError as e:
            raise LabError(f"topology: {addr!r} is not an address with prefix") from e
        if ip in addrs:
            raise LabError(f"topology: {ip} used twice ({addrs[ip]} and {owner or 'root'})")
        addrs[ip] = owner or "root"
    for veth in topo.veths:
        for name in (veth.a_if, veth.b_if):
            if len(name) > 15:
                raise LabError(f"topology: interface name {name!r} longer than 15 characters")
    for host in (topo.etcd_host, str(topo.traffic["client"]), str(topo.traffic["server"])):
        if host not in topo.hosts:
            raise LabError(f"topology: unknown host {host!r}")
