"""Ruleset evaluation: order, shortcuts, every match field, counters, revision."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from pathlib import Path

import pytest

from node.errors import Misuse
from node.packet import Packet
from node.policy import Action, Match, Rule, Ruleset, RulesetStats, load_ruleset, parse_ruleset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


def pkt(src="10.0.1.5", dst="10.0.2.10", proto=TCP, sport=40000, dport=80, icmp_type=-1) -> Packet:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    assert s.version == d.version
    return Packet(
        family=s.version,
        src=int(s),
        dst=int(d),
        proto=proto,
        sport=sport,
        dport=dport,
        length=60,
        icmp_type=icmp_type,
        icmp_code=-1 if icmp_type < 0 else 0,
    )


def rules(text: str) -> Ruleset:
    return parse_ruleset(textwrap.dedent(text), "t.yaml")


def hit(rs: Ruleset, p: Packet, ct: str = "new", i: str | None = None, o: str | None = None):
    return rs.evaluate(p, ct, i, o).rule


# -- order and shortcuts -------------------------------------------------------------


def test_first_matching_rule_wins_then_default():
    rs = rules(
        """
        default: reject
        rules:
          - {name: block-one, from: 10.0.1.66, action: drop}
          - {name: subnet, from: 10.0.1.0/24, action: accept}
          - {name: shadowed, from: 10.0.1.66, action: reject}
        """
    )
    assert rs.evaluate(pkt(src="10.0.1.66"), "new") == Match(Action.DROP, "block-one")
    assert rs.evaluate(pkt(src="10.0.1.67"), "new") == Match(Action.ACCEPT, "subnet")
    assert rs.evaluate(pkt(src="10.0.9.1"), "new") == Match(Action.REJECT, None)


def test_invalid_and_established_shortcuts_skip_rules():
    rs = rules("established: accept\ninvalid: reject\nrules:\n  - {name: all, action: drop}\n")
    assert rs.evaluate(pkt(), "invalid") == Match(Action.REJECT, None)
    assert rs.evaluate(pkt(), "established") == Match(Action.ACCEPT, None)
    assert rs.evaluate(pkt(), "related") == Match(Action.ACCEPT, None)
    assert rs.evaluate(pkt(), "new") == Match(Action.DROP, "all")


def test_established_rules_sends_established_through_the_rules():
    rs = rules(
        """
        established: rules
        rules:
          - {name: est, ct: [established, related], action: accept}
          - {name: web, proto: tcp, dport: 80, ct: new, action: accept}
        """
    )
    assert hit(rs, pkt(dport=22), "established") == "est"
    assert hit(rs, pkt(dport=22), "related") == "est"
    assert hit(rs, pkt(dport=80), "new") == "web"
    assert hit(rs, pkt(dport=22), "new") is None
    assert rs.evaluate(pkt(), "invalid") == Match(Action.DROP, None)  # invalid never reaches rules


def test_rule_without_ct_matches_every_reaching_state():
    rs = rules("established: rules\nrules:\n  - {name: any, proto: tcp, action: accept}\n")
    for state in ("new", "established", "related"):
        assert hit(rs, pkt(), state) == "any"
    assert hit(rs, pkt(), "invalid") is None


def test_unknown_ct_state_is_misuse():
    rs = rules("rules: []\n")
    with pytest.raises(Misuse, match="unknown ct state 'NEW'"):
        rs.evaluate(pkt(), "NEW")


# -- each match field ------------------------------------------------------------------


def test_source_and_destination_cidrs_v4():
    rs = rules(
        """
        rules:
          - name: r
            from: [10.0.1.0/24, 192.168.0.0/16, 172.16.0.1]
            to: 10.0.2.10
            action: accept
        """
    )
    assert hit(rs, pkt(src="10.0.1.255", dst="10.0.2.10")) == "r"
    assert hit(rs, pkt(src="192.168.200.1", dst="10.0.2.10")) == "r"
    assert hit(rs, pkt(src="172.16.0.1", dst="10.0.2.10")) == "r"
    assert hit(rs, pkt(src="172.16.0.2", dst="10.0.2.10")) is None
    assert hit(rs, pkt(src="10.0.2.1", dst="10.0.2.10")) is None
    assert hit(rs, pkt(src="10.0.1.1", dst="10.0.2.11")) is None


def test_v6_rules_match_by_family():
    rs = rules(
        """
        rules:
          - name: mixed
            from: [10.0.1.0/24, "fd00:10:1::/64"]
            to: ["fd00:10:2::1", 10.0.2.0/24]
            action: accept
        """
    )
    assert hit(rs, pkt(src="fd00:10:1::abcd", dst="fd00:10:2::1")) == "mixed"
    assert hit(rs, pkt(src="fd00:10:1::abcd", dst="fd00:10:2::2")) is None
    assert hit(rs, pkt(src="fd00:10:9::1", dst="fd00:10:2::1")) is None
    assert hit(rs, pkt(src="10.0.1.1", dst="10.0.2.99")) == "mixed"


def test_v4_packet_never_matches_a_v6_network_with_the_same_integer():
    # ::a00:1 and 10.0.0.1 are both the integer 0x0a000001.
    rs = rules("rules:\n  - {name: v6, from: '::a00:1', action: accept}\n")
    assert hit(rs, pkt(src="::a00:1", dst="::1")) == "v6"
    assert hit(rs, pkt(src="10.0.0.1", dst="10.0.0.2")) is None


def test_family_only_rule_with_zero_prefix():
    rs = rules("rules:\n  - {name: v6-only, from: '::/0', action: accept}\n")
    assert hit(rs, pkt(src="::1", dst="::2")) == "v6-only"
    assert hit(rs, pkt(src="10.0.0.1", dst="10.0.0.2")) is None


def test_unknown_family_gets_the_default():
    rs = rules("default: reject\nrules:\n  - {name: all, action: accept}\n")
    odd = Packet(family=5, src=1, dst=2, proto=TCP, sport=1, dport=2, length=40)
    assert rs.evaluate(odd, "new") == Match(Action.REJECT, None)


def test_proto_match_and_any():
    rs = rules(
        """
        rules:
          - {name: udp, proto: udp, action: accept}
          - {name: gre, proto: 47, action: accept}
          - {name: rest, proto: any, action: drop}
        """
    )
    assert hit(rs, pkt(proto=UDP)) == "udp"
    assert hit(rs, pkt(proto=47, sport=0, dport=0)) == "gre"
    assert hit(rs, pkt(proto=TCP)) == "rest"
    assert hit(rs, pkt(proto=132)) == "rest"


def test_rules_with_and_without_proto_keep_their_order():
    rs = rules(
        """
        rules:
          - {name: tcp22, proto: tcp, dport: 22, action: accept}
          - {name: all-from-x, from: 10.0.1.5, action: drop}
          - {name: tcp80, proto: tcp, dport: 80, action: accept}
        """
    )
    assert hit(rs, pkt(dport=22)) == "tcp22"
    assert hit(rs, pkt(dport=80)) == "all-from-x"
    assert hit(rs, pkt(src="10.0.1.6", dport=80)) == "tcp80"
    assert hit(rs, pkt(proto=UDP, dport=22)) == "all-from-x"


@pytest.mark.parametrize(
    ("dport_yaml", "inside", "outside"),
    [
        ("80", [80], [79, 81]),
        ("[80, 443]", [80, 443], [81, 442, 444]),
        ("'8000-8100'", [8000, 8050, 8100], [7999, 8101]),
        ("[22, '1000-1999', '3000-3999']", [22, 1000, 1999, 3500], [23, 999, 2000, 4000]),
        ("'0-65535'", [0, 65535], []),
    ],
)
def test_destination_ports(dport_yaml, inside, outside):
    rs = rules(f"rules:\n  - {{name: p, proto: tcp, dport: {dport_yaml}, action: accept}}\n")
    for port in inside:
        assert hit(rs, pkt(dport=port)) == "p", port
    for port in outside:
        assert hit(rs, pkt(dport=port)) is None, port
    assert hit(rs, pkt(proto=UDP, dport=inside[0])) is None


def test_source_ports_and_udp():
    rs = rules("rules:\n  - {name: p, proto: udp, sport: [53, '1024-2047'], action: accept}\n")
    assert hit(rs, pkt(proto=UDP, sport=53)) == "p"
    assert hit(rs, pkt(proto=UDP, sport=2047)) == "p"
    assert hit(rs, pkt(proto=UDP, sport=54)) is None
    assert hit(rs, pkt(proto=UDP, sport=2048)) is None


def test_icmp_types_v4_and_v6():
    rs = rules(
        """
        rules:
          - {name: ping, proto: icmp, icmp-type: echo-request, action: accept}
          - {name: ping6, proto: icmpv6, icmp-type: [echo-request, 1], action: accept}
        """
    )
    assert hit(rs, pkt(proto=ICMP, sport=7, dport=7, icmp_type=8)) == "ping"
    assert hit(rs, pkt(proto=ICMP, sport=7, dport=7, icmp_type=0)) is None
    v6 = {"src": "fd00::1", "dst": "fd00::2", "proto": ICMPV6, "sport": 7, "dport": 7}
    assert hit(rs, pkt(**v6, icmp_type=128)) == "ping6"
    assert hit(rs, pkt(**v6, icmp_type=1)) == "ping6"
    assert hit(rs, pkt(**v6, icmp_type=8)) is None


ZONES = """
zones:
  inside: [veth-in, eth1]
  outside: [veth-out+]
  any-if: ['+']
rules:
"""


def test_zones_with_exact_names_and_wildcards():
    rs = rules(
        ZONES
        + "  - {name: in2out, from-zone: inside, to-zone: outside, action: accept}\n"
        + "  - {name: from-any, from-zone: any-if, action: reject}\n"
    )
    assert hit(rs, pkt(), i="veth-in", o="veth-out") == "in2out"
    assert hit(rs, pkt(), i="eth1", o="veth-out12") == "in2out"
    assert hit(rs, pkt(), i="eth1", o="veth-ou") == "from-any"
    assert hit(rs, pkt(), i="eth10", o="veth-out") == "from-any"  # eth1 is exact, not a prefix
    assert hit(rs, pkt(), i="veth-in", o=None) == "from-any"
    assert hit(rs, pkt(), i=None, o="veth-out") is None  # unknown interface never matches


def test_interface_keys_combine_with_zones():
    rs = rules(
        ZONES
        + "  - {name: r, from-zone: inside, in-interface: eth+, out-interface: [x, 'y+'],"
        + " action: accept}\n"
    )
    assert hit(rs, pkt(), i="eth1", o="x") == "r"
    assert hit(rs, pkt(), i="eth1", o="y0") == "r"
    assert hit(rs, pkt(), i="veth-in", o="x") is None  # in the zone, not eth+
    assert hit(rs, pkt(), i="eth1", o="xx") is None


def test_every_field_must_match():
    rs = rules(
        ZONES
        + """
  - name: all
    from: 10.0.1.0/24
    to: 10.0.2.10
    proto: tcp
    sport: '1024-65535'
    dport: 443
    from-zone: inside
    to-zone: outside
    ct: new
    action: accept
"""
    )
    good = {"i": "veth-in", "o": "veth-out0"}
    assert hit(rs, pkt(dport=443), **good) == "all"
    assert hit(rs, pkt(dport=443, sport=80), **good) is None
    assert hit(rs, pkt(dport=443, src="10.0.3.1"), **good) is None
    assert hit(rs, pkt(dport=443, dst="10.0.2.11"), **good) is None
    assert hit(rs, pkt(dport=443, proto=UDP), **good) is None
    assert hit(rs, pkt(dport=443), i="eth9", o="veth-out0") is None
    assert hit(rs, pkt(dport=443), i="veth-in", o="eth1") is None


# -- counters, statistics, describe -------------------------------------------------------


def test_counters_for_every_path():
    rs = rules(
        """
        rules:
          - {name: a, proto: tcp, dport: 22, action: accept}
          - {name: b, proto: udp, action: drop}
        """
    )
    for _ in range(3):
        rs.evaluate(pkt(dport=22), "new")
    rs.evaluate(pkt(proto=UDP), "new")
    rs.evaluate(pkt(dport=23), "new")
    rs.evaluate(pkt(dport=23), "new")
    rs.evaluate(pkt(), "established")
    rs.evaluate(pkt(), "related")
    rs.evaluate(pkt(), "invalid")
    stats = rs.statistics()
    assert stats == RulesetStats(
        rule_hits=(("a", 3), ("b", 1)),
        default_hits=2,
        established_hits=2,
        invalid_hits=1,
        rule_count=2,
        revision=rs.revision,
    )
    assert rs.hits_snapshot() == (("a", 3), ("b", 1))
    rs.evaluate(pkt(dport=22), "new")
    assert stats.rule_hits[0] == ("a", 3)  # a snapshot, not a view
    with pytest.raises(AttributeError):
        stats.default_hits = 0  # type: ignore[misc]


def test_describe_is_json_and_has_hits():
    rs = load_ruleset(EXAMPLES / "rules.yaml")
    rs.evaluate(pkt(src="10.10.1.2", dst="10.10.2.2", dport=443), "new")
    described = rs.describe()
    assert json.loads(json.dumps(described)) == described
    web = described[1]
    assert web == {
        "name": "web",
        "action": "accept",
        "from": ["10.10.1.0/24", "fd00:10:1::/64"],
        "to": ["10.10.2.0/24", "fd00:10:2::/64"],
        "proto": "tcp",
        "dport": ["80", "443", "8000-8100"],
        "line": 17,
        "hits": 1,
    }
    assert described[4]["proto"] == "icmpv6"
    assert described[4]["icmp-type"] == [128]


def test_example_ruleset_behaviour():
    rs = load_ruleset(EXAMPLES / "rules.yaml")
    client, server = "10.10.1.20", "10.10.2.10"
    assert rs.evaluate(pkt(client, server, dport=25), "new") == Match(Action.REJECT, "no-smtp")
    assert hit(rs, pkt(client, server, dport=8080)) == "web"
    assert hit(rs, pkt(client, server, proto=UDP, dport=53)) == "dns"
    assert hit(rs, pkt(client, server, proto=ICMP, icmp_type=8)) == "ping"
    assert hit(rs, pkt("fd00:10:1::5", "fd00:10:2::10", dport=443)) == "web"
    assert hit(rs, pkt("fd00:10:1::5", "fd00:10:2::10", proto=ICMPV6, icmp_type=128)) == "ping6"
    assert rs.evaluate(pkt(server, client, dport=80), "new") == Match(Action.DROP, None)
    assert rs.evaluate(pkt(server, client, dport=80), "established") == Match(Action.ACCEPT, None)


def test_ruleset_built_in_code():
    rule = Rule(name="r", action=Action.ACCEPT, proto=TCP, dport=((22, 22),), from_zones=("z",))
    rs = Ruleset([rule], zones={"z": ["eth0", "eth0"]}, default_action=Action.REJECT)
    assert rs.zones == {"z": ("eth0",)}
    assert hit(rs, pkt(dport=22), i="eth0") == "r"
    assert rs.evaluate(pkt(dport=22), "new") == Match(Action.REJECT, None)
    with pytest.raises(Misuse, match="duplicate rule name"):
        Ruleset([rule, rule], zones={"z": ["eth0"]})
    with pytest.raises(Misuse, match="unknown zone"):
        Ruleset([rule])


# -- revision --------------------------------------------------------------------------

BASE = """
default: drop
zones:
  inside: [eth1, veth-in]
rules:
  - name: web
    from: 10.0.1.0/24
    to: [10.0.2.10, 10.0.2.11]
    proto: tcp
    dport: [80, 443, "8000-8100"]
    action: accept
  - name: ping
    proto: icmp
    icmp-type: echo-request
    from-zone: inside
    action: accept
"""

SAME_MEANING = """
# the same policy, written differently
zones: {inside: [veth-in, eth1, eth1]}
rules:
- {action: accept, name: web, proto: 6, dport: ["8000-8050", "8051-8100", 443, 80, 80],
   to: [10.0.2.11, 10.0.2.10/32], from: [10.0.1.0/25, 10.0.1.128/25]}
- name: ping
  action: accept
  from-zone: [inside]
  proto: icmp
  icmp-type: 8
established: accept
invalid: drop
"""


def test_revision_ignores_formatting_and_spelling():
    base, same = rules(BASE), rules(SAME_MEANING)
    assert base.revision == same.revision
    assert len(base.revision) == 12
    assert int(base.revision, 16) >= 0
    assert base.rules == same.rules


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("default: drop", "default: reject"),
        ("default: drop", "established: rules"),
        ("default: drop", "invalid: accept"),
        ("[eth1, veth-in]", "[eth1, veth-in, eth2]"),
        ("name: web", "name: www"),
        ("10.0.1.0/24", "10.0.0.0/23"),
        ("10.0.2.11]", "10.0.2.12]"),
        ("proto: tcp", "proto: udp"),
        ('"8000-8100"', '"8000-8101"'),
        ("    action: accept\n  - name: ping", "    action: drop\n  - name: ping"),
        ("icmp-type: echo-request", "icmp-type: echo-reply"),
        ("from-zone: inside", "to-zone: inside"),
    ],
)
def test_revision_changes_with_content(old, new):
    assert old in BASE
    assert rules(BASE.replace(old, new, 1)).revision != rules(BASE).revision


def test_revision_depends_on_rule_order():
    swapped = "rules:\n  - {name: b, action: drop}\n  - {name: a, action: accept}\n"
    ordered = "rules:\n  - {name: a, action: accept}\n  - {name: b, action: drop}\n"
    assert rules(swapped).revision != rules(ordered).revision
