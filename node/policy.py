"""The policy engine: a packet, its conntrack state and interfaces in, a :class:`Match` out.

Evaluation order (the usual stateful-firewall shape, as an iptables FORWARD
chain that starts with ``-m conntrack --ctstate INVALID -j DROP`` and
``--ctstate ESTABLISHED,RELATED -j ACCEPT``):

1. ct state ``invalid``: the ``invalid`` action, no rule consulted.
2. ct state ``established``/``related``: the ``established`` action, unless the
   file says ``established: rules``, in which case they go on to step 3.
3. The first rule, in file order, whose every given field matches.
4. Otherwise the ``default`` action.

Every path counts a hit.  The rules are compiled once at load time into
predicates over the packet's integers (``(addr & mask) == net`` per family,
port sets or ranges), and indexed by (family, ct state, protocol) so a packet
only visits rules that could match it, in their original order.  A rule pays
only for the fields it constrains.

Parsing and normalization live in :mod:`node.policy_parse`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node.errors import Misuse, RulesError
from node.packet import Packet
from node.policy_parse import (
    CT_STATES,
    PROTOCOLS,
    Action,
    IPNetwork,
    PortRanges,
    Rule,
    RulesSpec,
    parse_spec,
)

__all__ = [
    "Action",
    "Match",
    "Rule",
    "Ruleset",
    "RulesetStats",
    "load_ruleset",
    "parse_ruleset",
]

# A compiled field test: (packet, in_iface, out_iface) -> matches?
_Check = Callable[[Packet, str | None, str | None], bool]
# (rule index, the Match to return, field tests)
_Compiled = tuple[int, "Match", tuple[_Check, ...]]
_Bucket = tuple[dict[int, tuple[_Compiled, ...]], tuple[_Compiled, ...]]

_FAMILIES: Final = (4, 6)
_SMALL_PORT_SET: Final = 256  # up to this many ports: a frozenset; beyond: ranges
# number -> first (preferred) name: 58 reads "icmpv6", not "ipv6-icmp"
_PROTO_NAMES: Final = {
    number: name for name, number in reversed(PROTOCOLS.items()) if number is not None
}


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of one evaluation."""

    action: Action  # what to do with the packet
    rule: str | None  # matching rule; None = default, established or invalid shortcut


@dataclass(frozen=True, slots=True)
class RulesetStats:
    """Snapshot of a ruleset's counters."""

    rule_hits: tuple[tuple[str, int], ...]  # (rule name, hits) in rule order
    default_hits: int  # packets that matched no rule
    established_hits: int  # established/related packets taken by the shortcut
    invalid_hits: int  # ct state invalid packets
    rule_count: int  # number of rules
    revision: str  # content hash of the normalized ruleset (12 hex digits)


class Ruleset:
    """An ordered, compiled ruleset with hit counters.  Single-threaded."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        default_action: Action = Action.DROP,
        established_action: Action | None = Action.ACCEPT,
        invalid_action: Action = Action.DROP,
        zones: Mapping[str, Iterable[str]] | None = None,
        source: str = "<rules>",
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.default_action = default_action
        self.established_action = established_action
        self.invalid_action = invalid_action
        self.zones: dict[str, tuple[str, ...]] = {
            name: tuple(sorted(set(ifaces))) for name, ifaces in sorted((zones or {}).items())
        }
        self.source = source
        self._check_references()
        self.revision = _revision(self)
        self._hits = [0] * len(self.rules)
        self._default_hits = 0
        self._established_hits = 0
        self._invalid_hits = 0
        self._default_match = Match(default_action, None)
        self._invalid_match = Match(invalid_action, None)
        self._established_match = (
            None if established_action is None else Match(established_action, None)
        )
        self._index = self._build_index()

    @classmethod
    def from_spec(cls, spec: RulesSpec, source: str) -> Ruleset:
        return cls(
            spec.rules,
            default_action=spec.default,
            established_action=spec.established,
            invalid_action=spec.invalid,
            zones=dict(spec.zones),
            source=source,
        )

    # -- evaluation (hot path) ---------------------------------------------

    def evaluate(
        self,
        p: Packet,
        ct_state: str,
        in_iface: str | None = None,
        out_iface: str | None = None,
    ) -> Match:
        """Decide one packet.  Raises :class:`Misuse` only for an unknown ``ct_state``."""
        if ct_state == "invalid":
            self._invalid_hits += 1
            return self._invalid_match
        if self._established_match is not None and (
            ct_state == "established" or ct_state == "related"
        ):
            self._established_hits += 1
            return self._established_match
        bucket = self._index.get((p.family, ct_state))
        if bucket is None:
            if ct_state not in CT_STATES:
                raise Misuse(f"unknown ct state {ct_state!r}")
            candidates: tuple[_Compiled, ...] = ()  # a family we hold no rules for
        else:
            by_proto, any_proto = bucket
            candidates = by_proto.get(p.proto, any_proto)
        for index, match, checks in candidates:
            for check in checks:
                if not check(p, in_iface, out_iface):
                    break
            else:
                self._hits[index] += 1
                return match
        self._default_hits += 1
        return self._default_match

    # -- observation ---------------------------------------------------------

    def statistics(self) -> RulesetStats:
        return RulesetStats(
            rule_hits=self.hits_snapshot(),
            default_hits=self._default_hits,
            established_hits=self._established_hits,
            invalid_hits=self._invalid_hits,
            rule_count=len(self.rules),
            revision=self.revision,
        )

    def hits_snapshot(self) -> tuple[tuple[str, int], ...]:
        """(rule name, hits) in rule order."""
        return tuple(zip((r.name for r in self.rules), self._hits, strict=True))

    def describe(self) -> list[dict[str, object]]:
        """One JSON-able dict per rule (only the fields it constrains) with its hits."""
        return [
            {**_describe_rule(rule), "line": rule.line, "hits": hits}
            for rule, hits in zip(self.rules, self._hits, strict=True)
        ]

    def normalized(self) -> dict[str, object]:
        """The JSON-able normalized content the revision hash is taken over."""
        return {
            "default": self.default_action.value,
            "established": "rules"
            if self.established_action is None
            else self.established_action.value,
            "invalid": self.invalid_action.value,
            "zones": {name: list(ifaces) for name, ifaces in self.zones.items()},
            "rules": [_describe_rule(rule) for rule in self.rules],
        }

    def __repr__(self) -> str:
        return f"<Ruleset {self.source} rules={len(self.rules)} revision={self.revision}>"

    # -- compilation -----------------------------------------------------------

    def _check_references(self) -> None:
        names: set[str] = set()
        for rule in self.rules:
            if rule.name in names:
                raise Misuse(f"duplicate rule name {rule.name!r}")
            names.add(rule.name)
            for zone in (*(rule.from_zones or ()), *(rule.to_zones or ())):
                if zone not in self.zones:
                    raise Misuse(f"rule {rule.name}: unknown zone {zone!r}")

    def _reaching_states(self) -> tuple[str, ...]:
        """ct states that get past the shortcuts to the rules."""
        if self.established_action is None:
            return ("new", "established", "related")
        return ("new",)

    def _build_index(self) -> dict[tuple[int, str], _Bucket]:
        index: dict[tuple[int, str], _Bucket] = {}
        for family in _FAMILIES:
            compiled = [self._compile(i, rule, family) for i, rule in enumerate(self.rules)]
            for state in self._reaching_states():
                usable = [
                    (rule.proto, c)
                    for rule, c in zip(self.rules, compiled, strict=True)
                    if c is not None and (rule.ct is None or state in rule.ct)
                ]
                protos = {proto for proto, _ in usable if proto is not None}
                by_proto = {
                    proto: tuple(c for p, c in usable if p is None or p == proto)
                    for proto in protos
                }
                index[(family, state)] = (by_proto, tuple(c for p, c in usable if p is None))
        return index

    def _compile(self, index: int, rule: Rule, family: int) -> _Compiled | None:
        """Field tests of ``rule`` for packets of ``family``; None if it never matches them."""
        # Cheap, selective tests first: rules in one file mostly differ by
        # port and destination, so most non-matching rules fail on the first.
        checks: list[_Check] = []
        if rule.dport is not None:
            checks.append(_port_check(rule.dport, is_src=False))
        if rule.sport is not None:
            checks.append(_port_check(rule.sport, is_src=True))
        if rule.icmp_types is not None:
            types = frozenset(rule.icmp_types)
            checks.append(lambda p, i, o: p.icmp_type in types)
        for nets, is_src in ((rule.dst, False), (rule.src, True)):
            if nets is not None:
                same_family = [n for n in nets if n.version == family]
                if not same_family:
                    return None
                checks.extend(_address_checks(same_family, is_src))
        for patterns, is_in in (
            (self._zone_patterns(rule.from_zones), True),
            (self._zone_patterns(rule.to_zones), False),
            (rule.in_interfaces, True),
            (rule.out_interfaces, False),
        ):
            if patterns is not None:
                checks.append(_interface_check(patterns, is_in))
        return index, Match(rule.action, rule.name), tuple(checks)

    def _zone_patterns(self, zones: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if zones is None:
            return None
        return tuple(pattern for zone in zones for pattern in self.zones[zone])


def parse_ruleset(text: str, filename: str = "<rules>") -> Ruleset:
    """Parse and compile a rules file's text; raises exactly :class:`RulesError`."""
    return Ruleset.from_spec(parse_spec(text, filename), filename)


def load_ruleset(path: str | Path) -> Ruleset:
    """Read, parse and compile a rules file; raises exactly :class:`RulesError`."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RulesError(name, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RulesError(name, line, "not valid UTF-8") from None
    return parse_ruleset(text, name)


# -- predicate builders ---------------------------------------------------------
# Each returns a closure specialised for the common cases, because a Python
# function call per field is the main cost of evaluate().


def _address_checks(nets: list[IPNetwork], is_src: bool) -> list[_Check]:
    """Test ``(addr & mask) == net``; one set lookup per distinct prefix length."""
    by_mask: dict[int, set[int]] = {}
    for net in nets:
        by_mask.setdefault(int(net.netmask), set()).add(int(net.network_address))
    if 0 in by_mask:
        return []  # 0.0.0.0/0 or ::/0: the family test (in the index) is the whole test
    if len(by_mask) == 1:
        ((mask, bases),) = by_mask.items()
        if len(bases) == 1:
            (base,) = bases
            if is_src:
                return [lambda p, i, o: p.src & mask == base]
            return [lambda p, i, o: p.dst & mask == base]
    table = tuple((mask, frozenset(bases)) for mask, bases in by_mask.items())
    if is_src:
        return [lambda p, i, o: any(p.src & m in b for m, b in table)]
    return [lambda p, i, o: any(p.dst & m in b for m, b in table)]


def _port_check(ranges: PortRanges, is_src: bool) -> _Check:
    if len(ranges) == 1:
        ((lo, hi),) = ranges
        if is_src:
            return lambda p, i, o: lo <= p.sport <= hi
        return lambda p, i, o: lo <= p.dport <= hi
    if sum(hi - lo + 1 for lo, hi in ranges) <= _SMALL_PORT_SET:
        ports = frozenset(port for lo, hi in ranges for port in range(lo, hi + 1))
        if is_src:
            return lambda p, i, o: p.sport in ports
        return lambda p, i, o: p.dport in ports
    if is_src:
        return lambda p, i, o: any(lo <= p.sport <= hi for lo, hi in ranges)
    return lambda p, i, o: any(lo <= p.dport <= hi for lo, hi in ranges)


def _interface_check(patterns: tuple[str, ...], is_in: bool) -> _Check:
    """iptables semantics: ``eth+`` matches every name starting with ``eth``."""
    exact = frozenset(p for p in patterns if not p.endswith("+"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("+"))

    def matches(name: str | None) -> bool:
        return name is not None and (name in exact or name.startswith(prefixes))

    if is_in:
        return lambda p, i, o: matches(i)
    return lambda p, i, o: matches(o)


# -- normalized description and revision ------------------------------------------


def _ports_text(ranges: PortRanges) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]


def _describe_rule(rule: Rule) -> dict[str, object]:
    fields: dict[str, object] = {"name": rule.name, "action": rule.action.value}
    optional: list[tuple[str, object]] = [
        ("from", None if rule.src is None else [str(n) for n in rule.src]),
        ("to", None if rule.dst is None else [str(n) for n in rule.dst]),
        ("proto", None if rule.proto is None else _PROTO_NAMES.get(rule.proto, rule.proto)),
        ("sport", None if rule.sport is None else _ports_text(rule.sport)),
        ("dport", None if rule.dport is None else _ports_text(rule.dport)),
        ("icmp-type", None if rule.icmp_types is None else list(rule.icmp_types)),
        ("from-zone", None if rule.from_zones is None else list(rule.from_zones)),
        ("to-zone", None if rule.to_zones is None else list(rule.to_zones)),
        ("in-interface", None if rule.in_interfaces is None else list(rule.in_interfaces)),
        ("out-interface", None if rule.out_interfaces is None else list(rule.out_interfaces)),
        ("ct", None if rule.ct is None else list(rule.ct)),
    ]
    fields.update((key, value) for key, value in optional if value is not None)
    return fields


def _revision(ruleset: Ruleset) -> str:
    """sha256 over canonical JSON of the normalized content; first 12 hex digits.

    Formatting, comments, key order, list order and duplicates, spellings
    (``tcp`` or ``6``, icmp names or numbers, a port list or a range) and
    defaults written out or left implicit do not change it.
    """
    canonical = json.dumps(ruleset.normalized(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
