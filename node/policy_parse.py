"""Rules file parsing: YAML text in, validated and normalized rule values out.

Every refusal is a :class:`node.errors.RulesError` carrying the 1-based line of
the offending YAML node, so an operator reads ``rules.yaml:12: message`` and
goes straight there.  We walk PyYAML's *composed node graph* (SafeLoader)
rather than constructed Python objects, because only nodes keep their
position; each scalar is then constructed on its own so YAML's usual typing
(``80`` is an int, ``"80"`` a string, ``yes`` a bool) still applies.

Values are normalized here (CIDRs collapsed, ports merged into ranges, names
turned into numbers, lists sorted and deduplicated) so that two files that
mean the same thing produce equal :class:`Rule` values and the same revision
hash, whatever their formatting.

Strictness, on purpose: unknown or duplicate keys, host bits set in a CIDR,
ports on a rule that is not TCP/UDP, a ``ct`` state that can never reach the
rules, a rule whose ``from`` and ``to`` share no address family: all refused.
A firewall rule that silently never matches is worse than a loud reload error.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from node.errors import Misuse, RulesError

__all__ = [
    "CT_STATES",
    "Action",
    "IPNetwork",
    "Rule",
    "RulesSpec",
    "parse_spec",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(StrEnum):
    """What the filter does with a packet."""

    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"  # TCP RST or ICMP unreachable, sent by the adapter


CT_STATES: Final = ("new", "established", "related", "invalid")

PROTOCOLS: Final[dict[str, int | None]] = {
    "any": None,
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "icmpv6": 58,
    "ipv6-icmp": 58,  # the IANA keyword, as iptables spells it
}
PORT_PROTOCOLS: Final = frozenset({6, 17})  # Packet carries ports only for these
ICMP_V4: Final = 1
ICMP_V6: Final = 58

# Type names from the IANA ICMP registries (RFC 792, RFC 4443, RFC 4861,
# RFC 2710/3810), spelled as iptables spells them.
ICMP_TYPES: Final[dict[int, dict[str, int]]] = {
    ICMP_V4: {
        "echo-reply": 0,
        "destination-unreachable": 3,
        "source-quench": 4,
        "redirect": 5,
        "echo-request": 8,
        "router-advertisement": 9,
        "router-solicitation": 10,
        "time-exceeded": 11,
        "parameter-problem": 12,
        "timestamp-request": 13,
        "timestamp-reply": 14,
        "address-mask-request": 17,
        "address-mask-reply": 18,
    },
    ICMP_V6: {
        "destination-unreachable": 1,
        "packet-too-big": 2,
        "time-exceeded": 3,
        "parameter-problem": 4,
        "echo-request": 128,
        "echo-reply": 129,
        "mld-listener-query": 130,
        "mld-listener-report": 131,
        "mld-listener-done": 132,
        "router-solicitation": 133,
        "router-advertisement": 134,
        "neighbor-solicitation": 135,
        "neighbour-solicitation": 135,
        "neighbor-advertisement": 136,
        "neighbour-advertisement": 136,
        "redirect": 137,
        "mld2-listener-report": 143,
    },
}

TOP_KEYS: Final = ("default", "established", "invalid", "zones", "rules")
RULE_KEYS: Final = (
    "name",
    "from",
    "to",
    "proto",
    "sport",
    "dport",
    "icmp-type",
    "from-zone",
    "to-zone",
    "in-interface",
    "out-interface",
    "ct",
    "action",
)

# Rule and zone names end up in logs, metric labels and CLI tables.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Linux dev_valid_name(): < IFNAMSIZ (16) bytes, no '/', ':' or whitespace.
# A trailing '+' is the iptables prefix wildcard, so '+' is refused elsewhere.
_IFACE_RE: Final = re.compile(r"[!-~]{1,15}")
_PORT_RANGE_RE: Final = re.compile(r"\s*(\d{1,6})\s*(?:-\s*(\d{1,6})\s*)?")
_MAX_PORT: Final = 65535

# Ports as merged, ascending, inclusive (low, high) ranges.
PortRanges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """One normalized rule.  ``None`` in a match field means "any"."""

    name: str  # unique in its ruleset; reported as Match.rule and in statistics
    action: Action  # what a packet matching every field gets
    src: tuple[IPNetwork, ...] | None = None  # collapsed, IPv4 first, ascending
    dst: tuple[IPNetwork, ...] | None = None  # same form as src
    proto: int | None = None  # IP protocol number 0-255
    sport: PortRanges | None = None  # only with proto 6 (tcp) or 17 (udp)
    dport: PortRanges | None = None  # only with proto 6 (tcp) or 17 (udp)
    icmp_types: tuple[int, ...] | None = None  # ascending; only with proto 1 or 58
    from_zones: tuple[str, ...] | None = None  # zone names; input interface in one
    to_zones: tuple[str, ...] | None = None  # zone names; output interface in one
    in_interfaces: tuple[str, ...] | None = None  # sorted patterns, trailing '+' = prefix
    out_interfaces: tuple[str, ...] | None = None  # same form as in_interfaces
    ct: tuple[str, ...] | None = None  # ct states, in CT_STATES order
    line: int = field(default=0, compare=False)  # 1-based source line; 0 = built in code

    def __post_init__(self) -> None:
        # The parser only builds valid rules; these guard code that builds
        # Rule values directly (tests, other tools).
        if not _NAME_RE.fullmatch(self.name):
            raise Misuse(f"bad rule name {self.name!r}")
        if self.proto is not None and not 0 <= self.proto <= 255:
            raise Misuse(f"rule {self.name}: proto {self.proto} out of range")
        if (self.sport or self.dport) and self.proto not in PORT_PROTOCOLS:
            raise Misuse(f"rule {self.name}: ports need proto tcp or udp")
        for ports in (self.sport, self.dport):
            if ports is not None and ports != merge_ranges(ports):
                raise Misuse(f"rule {self.name}: port ranges not normalized: {ports}")
        if self.icmp_types is not None and self.proto not in (ICMP_V4, ICMP_V6):
            raise Misuse(f"rule {self.name}: icmp_types need proto icmp or icmpv6")
        if self.ct is not None and (not self.ct or not set(self.ct) <= set(CT_STATES)):
            raise Misuse(f"rule {self.name}: bad ct states {self.ct}")


@dataclass(frozen=True, slots=True)
class RulesSpec:
    """A whole parsed file, before compilation."""

    default: Action  # action for packets no rule matches
    established: Action | None  # shortcut for established/related; None = run the rules
    invalid: Action  # action for ct state invalid (never reaches the rules)
    zones: tuple[tuple[str, tuple[str, ...]], ...]  # (zone, interface patterns), sorted
    rules: tuple[Rule, ...]  # in file order: the first match wins


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> PortRanges:
    """Sort inclusive ranges and merge the overlapping or adjacent ones."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def collapse_networks(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Collapse per family (``10.0.0.0/25`` + ``10.0.0.128/25`` = ``/24``)."""
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def parse_spec(text: str, filename: str = "<rules>") -> RulesSpec:
    """Parse rules YAML; raise exactly :class:`RulesError` on any problem."""
    return _Parser(text, filename).parse()


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Parser:
    """One parse of one text; holds the loader (for scalar construction)."""

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.text = text
        self.loader: yaml.SafeLoader  # made in parse(): its reader already checks the text
        self.zones: dict[str, tuple[str, ...]] = {}
        self.established: Action | None = Action.ACCEPT
        self.invalid = Action.DROP

    # -- errors ----------------------------------------------------------

    def fail(self, node: Node, message: str) -> NoReturn:
        raise RulesError(self.filename, _line(node), message)

    def yaml_error(self, exc: yaml.YAMLError) -> RulesError:
        """Translate a PyYAML error once, keeping its line."""
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            parts = [p for p in (exc.context, exc.problem) if p]
            line = None if mark is None else int(mark.line) + 1
            return RulesError(self.filename, line, "YAML: " + ", ".join(parts))
        if isinstance(exc, yaml.reader.ReaderError):
            line = self.text.count("\n", 0, exc.position) + 1
            return RulesError(
                self.filename, line, f"YAML: unacceptable character #x{exc.character:04x}"
            )
        return RulesError(self.filename, None, f"YAML: {exc}")

    # -- document ----------------------------------------------------------

    def parse(self) -> RulesSpec:
        try:
            self.loader = yaml.SafeLoader(self.text)
            try:
                root = self.loader.get_single_node()
                return self.document(root)
            finally:
                self.loader.dispose()
        except yaml.YAMLError as exc:
            raise self.yaml_error(exc) from None
        except RecursionError:
            # PyYAML composes nested collections recursively.
            raise RulesError(self.filename, None, "YAML nesting too deep") from None

    def document(self, root: Node | None) -> RulesSpec:
        if root is None:
            raise RulesError(self.filename, None, "empty file: expected a mapping with 'rules'")
        top = self.mapping(root, "the rules file", TOP_KEYS)
        actions = [a.value for a in Action]
        default = Action(self.top_word(top, "default", Action.DROP, actions))
        established_word = self.top_word(top, "established", Action.ACCEPT, [*actions, "rules"])
        established = None if established_word == "rules" else Action(established_word)
        invalid = Action(self.top_word(top, "invalid", Action.DROP, actions))
        # Remembered for the 'ct' checks: which states ever reach the rules.
        self.established = established
        self.invalid = invalid
        if "zones" in top:
            self.zones = self.zone_map(top["zones"][1])
        rules = self.rule_list(top["rules"][1]) if "rules" in top else ()
        return RulesSpec(
            default=default,
            established=established,
            invalid=invalid,
            zones=tuple(sorted(self.zones.items())),
            rules=rules,
        )

    def top_word(
        self, top: dict[str, tuple[Node, Node]], key: str, default: str, choices: list[str]
    ) -> str:
        return default if key not in top else self.choice(top[key][1], f"'{key}'", choices)

    def zone_map(self, node: Node) -> dict[str, tuple[str, ...]]:
        if self.is_null(node):
            return {}
        zones: dict[str, tuple[str, ...]] = {}
        for name, (key_node, value) in self.mapping(node, "'zones'", None).items():
            if not _NAME_RE.fullmatch(name):
                self.fail(key_node, f"bad zone name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
            zones[name] = tuple(sorted({self.interface(n) for n in self.items(value)}))
        return zones

    def rule_list(self, node: Node) -> tuple[Rule, ...]:
        if self.is_null(node):
            return ()  # every rule commented out: an empty ruleset, not an error
        if not isinstance(node, SequenceNode):
            self.fail(node, "'rules' must be a list of rules")
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for item in node.value:
            rule, name_node = self.rule(item)
            if rule.name in seen:
                self.fail(
                    name_node,
                    f"duplicate rule name {rule.name!r} (first at line {seen[rule.name]})",
                )
            seen[rule.name] = _line(item)
            rules.append(rule)
        return tuple(rules)

    # -- one rule ----------------------------------------------------------

    def rule(self, node: Node) -> tuple[Rule, Node]:
        keys = self.mapping(node, "a rule", RULE_KEYS)
        for required in ("name", "action"):
            if required not in keys:
                self.fail(node, f"rule has no '{required}'")
        name_node = keys["name"][1]
        name = self.string(name_node, "a rule name")
        if not _NAME_RE.fullmatch(name):
            self.fail(name_node, f"bad rule name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        proto = self.proto(keys["proto"][1]) if "proto" in keys else None
        src = self.networks(keys["from"][1]) if "from" in keys else None
        dst = self.networks(keys["to"][1]) if "to" in keys else None
        self.check_families(keys, src, dst, proto)
        rule = Rule(
            name=name,
            action=Action(self.choice(keys["action"][1], "'action'", [a.value for a in Action])),
            src=src,
            dst=dst,
            proto=proto,
            sport=self.ports(keys, "sport", proto),
            dport=self.ports(keys, "dport", proto),
            icmp_types=self.icmp_types(keys, proto),
            from_zones=self.zone_refs(keys, "from-zone"),
            to_zones=self.zone_refs(keys, "to-zone"),
            in_interfaces=self.interfaces(keys, "in-interface"),
            out_interfaces=self.interfaces(keys, "out-interface"),
            ct=self.ct_states(keys["ct"][1]) if "ct" in keys else None,
            line=_line(node),
        )
        return rule, name_node

    def proto(self, node: Node) -> int | None:
        value = self.scalar(node)
        if isinstance(value, str) and value in PROTOCOLS:
            return PROTOCOLS[value]
        if type(value) is int and 0 <= value <= 255:
            return value
        names = " | ".join(PROTOCOLS)
        self.fail(node, f"bad proto {value!r}: expected {names} or a number 0-255")

    def networks(self, node: Node) -> tuple[IPNetwork, ...]:
        return collapse_networks(self.network(item) for item in self.items(node))

    def network(self, node: Node) -> IPNetwork:
        text = self.string(node, "an address or CIDR network")
        try:
            return ipaddress.ip_network(text)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.fail(node, f"{text!r} is not an IPv4/IPv6 address or CIDR network")
        self.fail(node, f"{text!r} has host bits set: the network is {loose}")

    def check_families(
        self,
        keys: dict[str, tuple[Node, Node]],
        src: tuple[IPNetwork, ...] | None,
        dst: tuple[IPNetwork, ...] | None,
        proto: int | None,
    ) -> None:
        """Refuse rules that can never match because of address families."""
        families = {4, 6}
        for key, nets in (("from", src), ("to", dst)):
            if nets is None:
                continue
            families &= {n.version for n in nets}
            if not families:
                self.fail(keys[key][0], "'from' and 'to' share no address family: never matches")
            if proto == ICMP_V4 and families == {6}:
                self.fail(keys[key][0], "proto icmp is IPv4-only (use icmpv6): never matches")
            if proto == ICMP_V6 and families == {4}:
                self.fail(keys[key][0], "proto icmpv6 is IPv6-only (use icmp): never matches")

    def ports(
        self, keys: dict[str, tuple[Node, Node]], key: str, proto: int | None
    ) -> PortRanges | None:
        if key not in keys:
            return None
        key_node, value = keys[key]
        if proto not in PORT_PROTOCOLS:
            self.fail(key_node, f"'{key}' needs 'proto: tcp' or 'proto: udp'")
        return merge_ranges(self.port_range(item) for item in self.items(value))

    def port_range(self, node: Node) -> tuple[int, int]:
        value = self.scalar(node)
        if type(value) is int:
            lo = hi = value
        elif isinstance(value, str) and (m := _PORT_RANGE_RE.fullmatch(value)):
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else int(m.group(2))
        else:
            self.fail(node, f"bad port {value!r}: expected a port 0-65535 or a range 'LOW-HIGH'")
        for port in (lo, hi):
            if not 0 <= port <= _MAX_PORT:
                self.fail(node, f"port {port} out of range 0-65535")
        if lo > hi:
            self.fail(node, f"port range {lo}-{hi} is reversed (write {hi}-{lo})")
        return lo, hi

    def icmp_types(
        self, keys: dict[str, tuple[Node, Node]], proto: int | None
    ) -> tuple[int, ...] | None:
        if "icmp-type" not in keys:
            return None
        key_node, value = keys["icmp-type"]
        if proto not in ICMP_TYPES:
            self.fail(key_node, "'icmp-type' needs 'proto: icmp' or 'proto: icmpv6'")
        names = ICMP_TYPES[proto]
        types: set[int] = set()
        for item in self.items(value):
            word = self.scalar(item)
            if type(word) is int and 0 <= word <= 255:
                types.add(word)
            elif isinstance(word, str) and word in names:
                types.add(names[word])
            else:
                family = "icmp" if proto == ICMP_V4 else "icmpv6"
                known = ", ".join(names)
                self.fail(item, f"bad {family} type {word!r}: expected 0-255 or one of {known}")
        return tuple(sorted(types))

    def zone_refs(self, keys: dict[str, tuple[Node, Node]], key: str) -> tuple[str, ...] | None:
        if key not in keys:
            return None
        names: set[str] = set()
        for item in self.items(keys[key][1]):
            name = self.string(item, "a zone name")
            if name not in self.zones:
                known = ", ".join(sorted(self.zones)) or "none defined"
                self.fail(item, f"unknown zone {name!r} (zones: {known})")
            names.add(name)
        return tuple(sorted(names))

    def interfaces(self, keys: dict[str, tuple[Node, Node]], key: str) -> tuple[str, ...] | None:
        if key not in keys:
            return None
        return tuple(sorted({self.interface(item) for item in self.items(keys[key][1])}))

    def interface(self, node: Node) -> str:
        name = self.string(node, "an interface name")
        stem = name.removesuffix("+")
        bad = "/:+"
        if name != "+" and (
            not _IFACE_RE.fullmatch(stem) or any(c in bad for c in stem) or stem in (".", "..")
        ):
            self.fail(
                node,
                f"bad interface name {name!r}: 1-15 printable characters without "
                "space / : (a trailing '+' matches any name starting so)",
            )
        return name

    def ct_states(self, node: Node) -> tuple[str, ...]:
        states: set[str] = set()
        for item in self.items(node):
            state = self.choice(item, "ct state", list(CT_STATES))
            if state == "invalid":
                self.fail(
                    item,
                    f"ct state 'invalid' never reaches the rules: such packets get the "
                    f"'invalid' action ({self.invalid})",
                )
            if state in ("established", "related") and self.established is not None:
                self.fail(
                    item,
                    f"ct state {state!r} never reaches the rules: such packets get the "
                    f"'established' action ({self.established}); set 'established: rules'",
                )
            states.add(state)
        return tuple(s for s in CT_STATES if s in states)

    # -- YAML node helpers -------------------------------------------------

    def mapping(
        self, node: Node, what: str, allowed: tuple[str, ...] | None
    ) -> dict[str, tuple[Node, Node]]:
        """Keys to (key node, value node); refuse non-string, duplicate, unknown keys."""
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.fail(key_node, "merge keys ('<<') are not supported: write the keys out")
            key = self.scalar(key_node) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.fail(key_node, f"keys of {what} must be plain words")
            if key in out:
                self.fail(key_node, f"duplicate key {key!r} (first at line {_line(out[key][0])})")
            if allowed is not None and key not in allowed:
                self.fail(
                    key_node, f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})"
                )
            out[key] = (key_node, value_node)
        return out

    def items(self, node: Node) -> list[Node]:
        """A scalar or a non-empty flat list of scalars, as a list of nodes."""
        if isinstance(node, ScalarNode):
            if self.is_null(node):
                self.fail(node, "expected a value or a list, found nothing")
            return [node]
        if not isinstance(node, SequenceNode):
            self.fail(node, "expected a value or a list of values, found a mapping")
        if not node.value:
            self.fail(node, "empty list: remove the key to match anything")
        for item in node.value:
            if not isinstance(item, ScalarNode):
                self.fail(item, "expected a plain value here, found a nested collection")
        return list(node.value)

    def scalar(self, node: Node) -> object:
        if not isinstance(node, ScalarNode):
            self.fail(node, "expected a plain value, found a collection")
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as exc:
            # e.g. an impossible timestamp or an int too long to convert
            self.fail(node, f"bad value {node.value!r}: {exc}")

    def is_null(self, node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def string(self, node: Node, what: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str):
            self.fail(node, f"expected {what}, found {value!r} (quote it if it is text)")
        return value

    def choice(self, node: Node, what: str, choices: list[str]) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or value not in choices:
            self.fail(node, f"bad {what} {value!r}: expected {' | '.join(choices)}")
        return value
