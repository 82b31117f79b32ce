"""Property tests of the policy engine.

* parse_ruleset on random and mutated text returns a Ruleset or raises exactly
  RulesError (house rule 3: parsers get a fuzz property);
* evaluate never raises for any Packet and agrees with a naive reference
  evaluator written straight from the rules-file documentation;
* the revision does not depend on list order or YAML style.
"""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import RulesError
from node.packet import Packet
from node.policy import Action, Match, Ruleset, parse_ruleset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SEEDS = [
    (EXAMPLES / "rules.yaml").read_text(),
    (EXAMPLES / "rules-bad.yaml").read_text(),
    "zones:\n  inside: [veth-in, eth+]\nestablished: rules\nrules:\n"
    "  - {name: a, from-zone: inside, ct: [new, related], proto: udp, sport: '1-9', action: drop}\n"
    "  - name: b\n    to: ['fd00::/8', 10.0.0.0/8]\n    proto: icmpv6\n"
    "    icmp-type: [echo-request, 1]\n    out-interface: x+\n    action: reject\n",
]
CT_STATES = ("new", "established", "related", "invalid")


def parse_or_refuse(text: str) -> Ruleset | None:
    try:
        return parse_ruleset(text, "fuzz.yaml")
    except RulesError as err:
        assert err.filename == "fuzz.yaml"
        # YAML also breaks lines at \r, \x85, \u2028, \u2029; an error may sit at the end
        assert err.line is None or 1 <= err.line <= len(text.splitlines()) + 1
        return None


# -- fuzz: returns or raises exactly RulesError ---------------------------------------


@given(st.text(max_size=300))
def test_random_text(text):
    parse_or_refuse(text)


@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.text(max_size=4)), max_size=6),
)
def test_mutated_rules_files(seed, edits):
    text = seed
    for position, insert in edits:
        at = position % (len(text) + 1)
        cut = position % 3  # delete 0-2 characters, then insert
        text = text[:at] + insert + text[at + cut :]
    parse_or_refuse(text)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "tcp",
            "icmp",
            "icmpv6",
            "10.0.0.0/8",
            "fd00::/8",
            "10.0.0.1/8",
            "80-90",
            "90-80",
            "echo-request",
            "new",
            "established",
            "invalid",
            "accept",
            "rules",
            "eth+",
            "+",
            "inside",
        ]
    ),
)
RULE_KEYS = [
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
    "bogus",
]
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
FUZZ_RULES = st.lists(st.dictionaries(st.sampled_from(RULE_KEYS), VALUES, max_size=7), max_size=4)
FUZZ_DOCS = st.fixed_dictionaries(
    {"rules": FUZZ_RULES},
    optional={
        "default": SCALARS,
        "established": SCALARS,
        "invalid": SCALARS,
        "zones": st.dictionaries(st.sampled_from(["inside", "x y", "out"]), VALUES, max_size=2),
    },
)


@given(FUZZ_DOCS, st.booleans())
def test_structured_garbage(doc, flow):
    parse_or_refuse(yaml.safe_dump(doc, default_flow_style=flow))


# -- a reference evaluator and valid random rulesets -------------------------------------

V4_NETS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "192.168.0.0/16", "0.0.0.0/0"]
V6_NETS = ["fd00::/8", "fd00:1::/32", "fd00:1::5", "::/0", "::a01:203"]
V4_ADDRS = ["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.9.9.9", "192.168.1.1", "172.16.0.1"]
V6_ADDRS = ["fd00:1::5", "fd00:1::6", "fd00:2::1", "2001:db8::1", "::a01:203"]
PORTS = [0, 22, 53, 80, 443, 8000, 8050, 8100, 65535]
PORT_ITEMS = [22, 53, 80, 443, 0, 65535, "8000-8100", "1-1023", "8050-8050", "60000-65535"]
ICMP4 = ["echo-request", "echo-reply", 3, 11, 8]
ICMP6 = ["echo-request", "echo-reply", 1, 135, "neighbour-solicitation", 128]
IFACES = ["eth0", "eth1", "eth10", "veth-in", "veth-in2", "veth-out3", "x"]
PATTERNS = ["eth0", "eth+", "veth-out+", "+", "veth-in"]
ZONES = {"inside": ["veth-in", "eth1"], "outside": ["veth-out+"], "all": ["+"]}
PROTO_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "any": None, 47: 47}
ICMP_NAMES = {
    1: {"echo-request": 8, "echo-reply": 0},
    58: {"echo-request": 128, "echo-reply": 129, "neighbour-solicitation": 135},
}


@st.composite
def rule_specs(draw: Any, name: str, established_rules: bool) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": name,
        "action": draw(st.sampled_from(["accept", "drop", "reject"])),
    }
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp", "icmpv6", "any", 47]))
    if proto is not None:
        rule["proto"] = proto
    number = PROTO_NUMBERS.get(proto)
    nets = {1: V4_NETS, 58: V6_NETS}.get(number, V4_NETS + V6_NETS)  # type: ignore[arg-type]
    for key in ("from", "to"):
        if draw(st.booleans()):
            rule[key] = draw(st.lists(st.sampled_from(nets), min_size=1, max_size=3))
    if "from" in rule and "to" in rule:
        families = {ipaddress.ip_network(n).version for n in rule["from"]}
        if not families & {ipaddress.ip_network(n).version for n in rule["to"]}:
            del rule["to"]
    if number in (6, 17):
        for key in ("sport", "dport"):
            if draw(st.booleans()):
                rule[key] = draw(st.lists(st.sampled_from(PORT_ITEMS), min_size=1, max_size=3))
    if number in (1, 58) and draw(st.booleans()):
        rule["icmp-type"] = draw(
            st.lists(st.sampled_from(ICMP4 if number == 1 else ICMP6), min_size=1)
        )
    for key, pool in (
        ("from-zone", list(ZONES)),
        ("to-zone", list(ZONES)),
        ("in-interface", PATTERNS),
        ("out-interface", PATTERNS),
    ):
        if draw(st.integers(0, 3)) == 0:
            rule[key] = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
    states = ["new", "established", "related"] if established_rules else ["new"]
    if draw(st.booleans()):
        rule["ct"] = draw(st.lists(st.sampled_from(states), min_size=1, max_size=2))
    return rule


@st.composite
def ruleset_docs(draw: Any) -> dict[str, Any]:
    established = draw(st.sampled_from(["accept", "drop", "reject", "rules"]))
    count = draw(st.integers(0, 8))
    return {
        "default": draw(st.sampled_from(["accept", "drop", "reject"])),
        "established": established,
        "invalid": draw(st.sampled_from(["accept", "drop", "reject"])),
        "zones": ZONES,
        "rules": [draw(rule_specs(f"r{i}", established == "rules")) for i in range(count)],
    }


@st.composite
def packets(draw: Any) -> Packet:
    family = draw(st.sampled_from([4, 6]))
    addrs = V4_ADDRS if family == 4 else V6_ADDRS
    src, dst = (int(ipaddress.ip_address(draw(st.sampled_from(addrs)))) for _ in range(2))
    proto = draw(st.sampled_from([6, 17, 1, 58, 47]))
    ported = proto in (6, 17)
    icmp_type = draw(st.sampled_from([0, 1, 3, 8, 11, 128, 129, 135])) if proto in (1, 58) else -1
    return Packet(
        family=family,
        src=src,
        dst=dst,
        proto=proto,
        sport=draw(st.sampled_from(PORTS)) if ported else 0,
        dport=draw(st.sampled_from(PORTS)) if ported else 0,
        length=60,
        icmp_type=icmp_type,
        icmp_code=0 if icmp_type >= 0 else -1,
    )


def iface_matches(name: str | None, patterns: list[str]) -> bool:
    if name is None:
        return False
    return any(name.startswith(p[:-1]) if p.endswith("+") else name == p for p in patterns)


def port_in(port: int, items: list[int | str]) -> bool:
    for item in items:
        lo, _, hi = str(item).partition("-")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def rule_matches(rule: dict[str, Any], p: Packet, ct: str, i: str | None, o: str | None) -> bool:
    version = 4 if p.family == 4 else 6
    addr = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    for key, value in (("from", p.src), ("to", p.dst)):
        nets = [ipaddress.ip_network(n) for n in rule.get(key, [])]
        if key in rule and not any(n.version == version and addr(value) in n for n in nets):
            return False
    number = PROTO_NUMBERS.get(rule.get("proto", "any"))
    if number is not None and number != p.proto:
        return False
    if "sport" in rule and not port_in(p.sport, rule["sport"]):
        return False
    if "dport" in rule and not port_in(p.dport, rule["dport"]):
        return False
    if "icmp-type" in rule:
        names = ICMP_NAMES[p.proto]
        if p.icmp_type not in [names.get(t, t) for t in rule["icmp-type"]]:
            return False
    zone_in = [pat for z in rule.get("from-zone", []) for pat in ZONES[z]]
    zone_out = [pat for z in rule.get("to-zone", []) for pat in ZONES[z]]
    return (
        ("from-zone" not in rule or iface_matches(i, zone_in))
        and ("to-zone" not in rule or iface_matches(o, zone_out))
        and ("in-interface" not in rule or iface_matches(i, rule["in-interface"]))
        and ("out-interface" not in rule or iface_matches(o, rule["out-interface"]))
        and ("ct" not in rule or ct in rule["ct"])
    )


def reference(doc: dict[str, Any], p: Packet, ct: str, i: str | None, o: str | None) -> Match:
    if ct == "invalid":
        return Match(Action(doc["invalid"]), None)
    if ct != "new" and doc["established"] != "rules":
        return Match(Action(doc["established"]), None)
    for rule in doc["rules"]:
        if rule_matches(rule, p, ct, i, o):
            return Match(Action(rule["action"]), rule["name"])
    return Match(Action(doc["default"]), None)


EVAL_INPUTS = st.lists(
    st.tuples(
        packets(),
        st.sampled_from(CT_STATES),
        st.sampled_from([None, *IFACES]),
        st.sampled_from([None, *IFACES]),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=200)
@given(ruleset_docs(), EVAL_INPUTS)
def test_evaluate_agrees_with_reference(doc, inputs):
    rs = parse_ruleset(yaml.safe_dump(doc, sort_keys=False), "gen.yaml")
    for p, ct, i, o in inputs:
        assert rs.evaluate(p, ct, i, o) == reference(doc, p, ct, i, o)
    stats = rs.statistics()
    total = stats.default_hits + stats.established_hits + stats.invalid_hits
    assert total + sum(h for _, h in stats.rule_hits) == len(inputs)


ANY_PACKET = st.builds(
    Packet,
    family=st.integers(-1, 10),
    src=st.integers(0, 2**129),
    dst=st.integers(0, 2**129),
    proto=st.integers(-1, 300),
    sport=st.integers(-1, 70000),
    dport=st.integers(-1, 70000),
    length=st.integers(0, 70000),
    icmp_type=st.integers(-1, 300),
)


@given(
    ruleset_docs(),
    ANY_PACKET,
    st.sampled_from(CT_STATES),
    st.one_of(st.none(), st.text(max_size=16)),
    st.one_of(st.none(), st.text(max_size=16)),
)
def test_evaluate_never_raises(doc, p, ct, i, o):
    rs = parse_ruleset(yaml.safe_dump(doc), "gen.yaml")
    match = rs.evaluate(p, ct, i, o)
    assert match.rule is None or match.rule in {r.name for r in rs.rules}


# -- revision stability -------------------------------------------------------------------


@given(ruleset_docs(), st.randoms(use_true_random=False), st.booleans())
def test_revision_ignores_list_order_and_style(doc, rnd: random.Random, flow):
    original = parse_ruleset(yaml.safe_dump(doc, sort_keys=False), "a.yaml")
    for rule in doc["rules"]:
        for value in rule.values():
            if isinstance(value, list):
                rnd.shuffle(value)
                value.append(value[0])  # a duplicate means nothing either
    restyled = yaml.safe_dump(doc, sort_keys=True, default_flow_style=flow, indent=4)
    again = parse_ruleset(restyled, "b.yaml")
    assert again.revision == original.revision
    assert again.rules == original.rules
