"""Chaos scenarios as data: one small YAML file each (``chaos/scenarios/``).

A scenario names the lab it needs, the load to drive through it, the steps
to play at fixed times after the load starts, and the invariants to check
(with their parameters).  Everything is validated here, once, into frozen
dataclasses; a bad file is refused with ``file: field: message``.

Example (see docs/chaos.md for every field)::

    name: node-killed
    description: SIGKILL one node under load, start it again later.
    lab: {nodes: 3, asymmetric: false, mode: auto, table_capacity: null}
    load: {duration: 40, long_lived: 8, rate: 20, udp_rate: 20}
    steps:
      - {at: 10, do: kill, node: fw2}
      - {at: 25, do: start, node: fw2}
    invariants:
      established_flows: {max_resets: 0, max_lost: 0}
      new_connections: {min_success: 0.999, window: 5}
      replicas_converge: {settle: 15}
      single_vip_holder: {}
      memory_bounded: {max_growth_mb: 64}
    quick: {scale: 0.5}

``--quick`` multiplies every time (load duration, step times, ``for``
durations) by ``quick.scale``: the same story, told faster.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import yaml

from chaos.errors import ChaosError

SCENARIO_DIR: Final = Path(__file__).parent / "scenarios"
_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
_NODE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
LAB_MODES: Final = ("auto", "standalone", "sync", "cluster")

# Step actions -> the fields each takes besides `at` and `do` (required, optional).
ACTIONS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "kill": (frozenset({"node"}), frozenset()),  # SIGKILL filter and syncd
    "freeze": (frozenset({"node"}), frozenset()),  # SIGSTOP filter and syncd
    "thaw": (frozenset({"node"}), frozenset()),  # SIGCONT
    "start": (frozenset({"node"}), frozenset()),  # start a killed node again
    "restart": (frozenset({"node"}), frozenset()),  # graceful stop, start, wait ready
    "partition": (frozenset({"node"}), frozenset({"cut_etcd"})),  # cut the sync links
    "heal": (frozenset({"node"}), frozenset()),  # undo partition and loss
    "loss": (frozenset({"node", "percent"}), frozenset()),  # random loss on sync links
    "etcd-stop": (frozenset(), frozenset()),
    "etcd-start": (frozenset(), frozenset()),
    "rules-push": (frozenset(), frozenset({"extra_rule"})),  # a new ruleset revision
    "rolling-restart": (frozenset(), frozenset({"gap"})),  # every node, one at a time
    "flood": (frozenset({"rate", "for"}), frozenset({"sources"})),  # SYN flood
}
# Actions that move traffic ownership: new connections may fail for a while
# after them (the `window` of the new_connections invariant).
DISRUPTIVE: Final = frozenset(
    {"kill", "freeze", "thaw", "start", "restart", "partition", "heal", "rolling-restart"}
)
INVARIANTS: Final = (
    "established_flows",
    "new_connections",
    "replicas_converge",
    "single_vip_holder",
    "memory_bounded",
)


class ScenarioError(ChaosError):
    """A scenario file is missing, unreadable or invalid (``file: field: message``)."""


@dataclass(frozen=True, slots=True)
class LabSpec:
    nodes: int = 3  # firewall nodes (1-9)
    asymmetric: bool = False  # replies cross another node than requests
    mode: str = "auto"  # node file sections (`stockade lab up --mode`)
    table_capacity: int | None = None  # filter flow table size; None = node default


@dataclass(frozen=True, slots=True)
class LoadSpec:
    duration: float = 30.0  # seconds of traffic; steps happen inside it
    long_lived: int = 8  # long-lived TCP connections (1 ms echo each)
    rate: float = 20.0  # new TCP connections per second
    udp_rate: float = 20.0  # UDP requests per second
    interval: float = 0.001  # seconds between messages on a long-lived connection


@dataclass(frozen=True, slots=True)
class Step:
    at: float  # seconds after the load starts
    do: str  # one of ACTIONS
    node: str | None = None  # a node id, or "all" (loss, partition, heal)
    cut_etcd: bool = False  # partition: also cut the node from etcd
    percent: float = 0.0  # loss: percentage of sync packets dropped
    gap: float = 5.0  # rolling-restart: seconds between two nodes
    rate: float = 0.0  # flood: SYNs per second
    duration: float = 0.0  # flood: seconds (`for` in the file)
    sources: int = 150  # flood: spoofed client addresses used (.100 to .249)
    extra_rule: str | None = None  # rules-push: name of a rule added to the lab's rules

    @property
    def disruptive(self) -> bool:
        return self.do in DISRUPTIVE


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    lab: LabSpec
    load: LoadSpec
    steps: tuple[Step, ...]
    invariants: Mapping[str, Mapping[str, Any]]  # invariant name -> parameters
    quick_scale: float = 0.5
    source: str = "<memory>"  # the file it came from
    quick: bool = False  # already scaled by `quick_scale`
    nodes_dead_at_end: frozenset[str] = field(default_factory=frozenset)

    def scaled(self) -> Scenario:
        """The ``--quick`` variant: every time multiplied by ``quick_scale``."""
        if self.quick:
            return self
        k = self.quick_scale
        steps = tuple(
            replace(s, at=s.at * k, gap=s.gap * k, duration=s.duration * k) for s in self.steps
        )
        load = replace(self.load, duration=self.load.duration * k)
        return replace(self, load=load, steps=steps, quick=True)


# --- loading -------------------------------------------------------------------------


class _Fields:
    """Reads one mapping, naming the file and field path in every error."""

    def __init__(self, source: str, path: str, raw: object) -> None:
        self.source, self.path = source, path
        if not isinstance(raw, dict):
            self.fail(f"expected a mapping, got {type(raw).__name__}")
        self.raw: dict[str, Any] = raw  # type: ignore[assignment]
        self.used: set[str] = set()

    def fail(self, message: str, key: str | None = None) -> None:
        where = ".".join(p for p in (self.path, key) if p) or "(top)"
        raise ScenarioError(f"{self.source}: {where}: {message}")

    def get(self, key: str, kind: Callable[[Any], bool], what: str, default: Any) -> Any:
        self.used.add(key)
        if key not in self.raw:
            return default
        value = self.raw[key]
        if not kind(value):
            self.fail(f"{value!r} is not {what}", key)
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = float(self.get(key, _is_number, "a number", default))
        if not lo <= value <= hi:
            self.fail(f"{value:g} not in [{lo:g}, {hi:g}]", key)
        return value

    def integer(self, key: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.get(key, lambda v: v is None or _is_int(v), "an integer", default)
        if value is not None and not lo <= value <= hi:
            self.fail(f"{value} not in {lo}..{hi}", key)
        return value  # type: ignore[no-any-return]

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.get(key, lambda v: isinstance(v, bool), "true or false", default))

    def text(self, key: str, default: str | None) -> str | None:
        return self.get(key, lambda v: v is None or isinstance(v, str), "a string", default)  # type: ignore[no-any-return]

    def required(self, key: str) -> None:
        if key not in self.raw:
            self.fail("is required", key)

    def no_extra(self, allowed: set[str] | None = None) -> None:
        extra = sorted(set(self.raw) - (allowed if allowed is not None else self.used))
        if extra:
            self.fail(f"unknown field(s) {', '.join(map(str, extra))}")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _lab(source: str, raw: object) -> LabSpec:
    f = _Fields(source, "lab", raw if raw is not None else {})
    nodes = f.integer("nodes", 3, 1, 9)
    mode = f.text("mode", "auto")
    if mode not in LAB_MODES:
        f.fail(f"{mode!r} is not one of {', '.join(LAB_MODES)}", "mode")
    spec = LabSpec(
        nodes=int(nodes or 3),
        asymmetric=f.flag("asymmetric", False),
        mode=str(mode),
        table_capacity=f.integer("table_capacity", None, 64, 1 << 22),
    )
    f.no_extra()
    return spec


def _load(source: str, raw: object) -> LoadSpec:
    f = _Fields(source, "load", raw if raw is not None else {})
    spec = LoadSpec(
        duration=f.number("duration", 30.0, 1.0, 3600.0),
        long_lived=int(f.integer("long_lived", 8, 0, 1000) or 0),
        rate=f.number("rate", 20.0, 0.0, 10000.0),
        udp_rate=f.number("udp_rate", 20.0, 0.0, 10000.0),
        interval=f.number("interval", 0.001, 0.0001, 10.0),
    )
    f.no_extra()
    return spec


def _step(source: str, index: int, raw: object, nodes: int) -> Step:
    f = _Fields(source, f"steps[{index}]", raw)
    f.required("at")
    f.required("do")
    do = f.text("do", None)
    if do not in ACTIONS:
        f.fail(f"{do!r} is not one of {', '.join(sorted(ACTIONS))}", "do")
    assert do is not None
    required, optional = ACTIONS[do]
    for key in sorted(required):
        f.required(key)
    f.no_extra({"at", "do", *required, *optional})
    node = f.text("node", None)
    if node is not None and node != "all":
        known = {f"fw{k}" for k in range(1, nodes + 1)}
        if not _NODE.match(node) or node not in known:
            f.fail(f"{node!r} is not a node of this lab ({', '.join(sorted(known))}, all)", "node")
    if node == "all" and do not in ("loss", "heal", "partition"):
        f.fail(f"'all' is only for loss, partition and heal, not {do}", "node")
    return Step(
        at=f.number("at", 0.0, 0.0, 3600.0),
        do=do,
        node=node,
        cut_etcd=f.flag("cut_etcd", False),
        percent=f.number("percent", 0.0, 0.0, 100.0),
        gap=f.number("gap", 5.0, 0.0, 600.0),
        rate=f.number("rate", 0.0, 1.0, 100000.0) if "rate" in f.raw else 0.0,
        duration=f.number("for", 0.0, 0.1, 3600.0) if "for" in f.raw else 0.0,
        sources=int(f.integer("sources", 150, 1, 150) or 150),
        extra_rule=f.text("extra_rule", None),
    )


def _invariants(source: str, raw: object) -> dict[str, dict[str, Any]]:
    f = _Fields(source, "invariants", raw)
    if not f.raw:
        f.fail("at least one invariant is required")
    out: dict[str, dict[str, Any]] = {}
    for name, params in f.raw.items():
        if name not in INVARIANTS:
            f.fail(f"unknown invariant (known: {', '.join(INVARIANTS)})", str(name))
        if params is None:
            params = {}
        if not isinstance(params, dict):
            f.fail("parameters must be a mapping (or {})", name)
        from chaos.invariants import check_params

        problem = check_params(name, params)
        if problem:
            f.fail(problem, name)
        out[name] = dict(params)
    return out


def parse_scenario(doc: object, source: str = "<memory>") -> Scenario:
    f = _Fields(source, "", doc)
    f.required("name")
    f.required("steps")
    f.required("invariants")
    name = f.text("name", None)
    if not name or not _NAME.match(name):
        f.fail(f"{name!r}: 1-48 of a-z, 0-9 and '-'", "name")
    lab = _lab(source, f.get("lab", lambda v: v is None or isinstance(v, dict), "a mapping", {}))
    load = _load(source, f.get("load", lambda v: v is None or isinstance(v, dict), "a mapping", {}))
    raw_steps = f.get("steps", lambda v: isinstance(v, list), "a list", [])
    steps = tuple(_step(source, i, s, lab.nodes) for i, s in enumerate(raw_steps))
    for i, s in enumerate(steps):
        if s.at >= load.duration:
            f.fail(f"at {s.at:g} is not inside the load ({load.duration:g} s)", f"steps[{i}].at")
        if i and s.at < steps[i - 1].at:
            f.fail("steps must be in time order", f"steps[{i}].at")
    invariants = _invariants(source, f.get("invariants", lambda v: True, "", {}))
    quick = _Fields(source, "quick", f.get("quick", lambda v: True, "", {}) or {})
    scale = quick.number("scale", 0.5, 0.05, 1.0)
    quick.no_extra()
    description = f.text("description", "") or ""
    f.no_extra()
    return Scenario(
        name=str(name),
        description=description.strip(),
        lab=lab,
        load=load,
        steps=steps,
        invariants=invariants,
        quick_scale=scale,
        source=source,
        nodes_dead_at_end=dead_at_end(steps),
    )


def dead_at_end(steps: tuple[Step, ...]) -> frozenset[str]:
    """Nodes the steps leave killed or frozen (their replicas are not compared)."""
    down: set[str] = set()
    for s in steps:
        if s.node is None or s.node == "all":
            continue
        if s.do in ("kill", "freeze"):
            down.add(s.node)
        elif s.do in ("start", "thaw", "restart"):
            down.discard(s.node)
    return frozenset(down)


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(f"{p}: cannot read: {e.strerror}") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ScenarioError(f"{p}: not valid YAML: {e}") from e
    scenario = parse_scenario(doc, str(p))
    if p.suffix in (".yaml", ".yml") and scenario.name != p.stem:
        raise ScenarioError(f"{p}: name: {scenario.name!r} must match the file name {p.stem!r}")
    return scenario


def scenario_files(directory: Path = SCENARIO_DIR) -> list[Path]:
    return sorted(directory.glob("*.yaml"))


def find_scenario(name: str, directory: Path = SCENARIO_DIR) -> Scenario:
    """A shipped scenario by name, or a path to a scenario file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return load_scenario(name)
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in scenario_files(directory))
        raise ScenarioError(f"no scenario {name!r} (known: {known})")
    return load_scenario(path)


def all_scenarios(directory: Path = SCENARIO_DIR) -> list[Scenario]:
    return [load_scenario(p) for p in scenario_files(directory)]
