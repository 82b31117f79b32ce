"""Rules file parsing: every key, every refusal with its exact line, normalization."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from node.errors import Misuse, RulesError
from node.policy import Action, Rule, load_ruleset, parse_ruleset

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def parse(text: str):
    return parse_ruleset(textwrap.dedent(text), "t.yaml")


def refused(text: str) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse(text)
    return info.value


def one_rule(body: str) -> Rule:
    """Parse a single rule given as its indented keys (after '- name: r')."""
    text = "rules:\n  - name: r\n" + textwrap.indent(textwrap.dedent(body), "    ")
    (rule,) = parse_ruleset(text, "t.yaml").rules
    return rule


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# -- top level -------------------------------------------------------------------


def test_defaults_when_keys_are_missing():
    rs = parse("rules: []\n")
    assert rs.default_action is Action.DROP
    assert rs.established_action is Action.ACCEPT
    assert rs.invalid_action is Action.DROP
    assert rs.rules == ()
    assert rs.source == "t.yaml"


def test_top_level_actions_are_read():
    rs = parse("default: reject\nestablished: rules\ninvalid: accept\n")
    assert rs.default_action is Action.REJECT
    assert rs.established_action is None
    assert rs.invalid_action is Action.ACCEPT


@pytest.mark.parametrize("text", ["rules:\n", "default: drop\n", "rules: # all off\n#  - x\n"])
def test_missing_or_null_rules_is_an_empty_ruleset(text):
    assert parse(text).rules == ()


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", None, "empty file"),
        ("# only a comment\n", None, "empty file"),
        ("- a\n- b\n", 1, "the rules file must be a mapping"),
        ("just text\n", 1, "the rules file must be a mapping"),
        ("default: drop\nfoo: 1\n", 2, "unknown key 'foo' in the rules file"),
        ("default: drop\n\ndefault: accept\n", 3, "duplicate key 'default' (first at line 1)"),
        ("default: maybe\n", 1, "bad 'default' 'maybe': expected accept | drop | reject"),
        ("default: rules\n", 1, "bad 'default' 'rules'"),
        ("invalid: rules\n", 1, "bad 'invalid' 'rules'"),
        ("established: ACCEPT\n", 1, "expected accept | drop | reject | rules"),
        ("\n\nrules: {a: 1}\n", 3, "'rules' must be a list"),
        ("rules:\n  - just-a-string\n", 2, "a rule must be a mapping"),
        ("? [a]\n: 1\n", 1, "keys of the rules file must be plain words"),
        ("1: drop\n", 1, "keys of the rules file must be plain words"),
    ],
)
def test_top_level_refusals(text, line, fragment):
    err = refused(text)
    assert err.line == line
    assert fragment in err.message
    assert str(err).startswith(f"t.yaml:{line}: " if line else "t.yaml: ")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("rules:\n  - name: a\n    action: [accept\n", 4, "YAML: "),
        ("default: drop\n  bad indent: x\n", 2, "YAML: "),
        ("a: 1\n---\nb: 2\n", 2, "expected a single document"),
        ("rules: *nothing\n", 1, "found undefined alias"),
        ("default: drop\nx: '\x07'\n", 2, "unacceptable character #x0007"),
        ("default: !!int drop\n", 1, "bad value 'drop': invalid literal for int()"),
        ("default: !custom drop\n", 1, "could not determine a constructor"),
        ("rules:\n  - &r {name: a, action: accept}\n  - <<: *r\n", 3, "merge keys ('<<')"),
        ("default: !!binary xx\n", 1, "failed to decode base64"),
        ("default: 2001-13-45\n", 1, "bad value '2001-13-45': month must be in 1..12"),
        ("default: 2001-12-14\n", 1, "expected accept | drop | reject"),
        ("a: \u0085\u0085b: [\n", 4, "expected the node content"),
    ],
)
def test_yaml_errors_are_translated_with_their_line(text, line, fragment):
    err = refused(text)
    assert err.line == line
    assert fragment in err.message


def test_deep_nesting_is_refused_not_crashed():
    err = refused("rules: " + "[" * 5000 + "]" * 5000 + "\n")
    assert (err.line, err.message) == (None, "YAML nesting too deep")


# -- zones -----------------------------------------------------------------------


def test_zones_are_sorted_and_deduplicated():
    rs = parse(
        """
        zones:
          outside: [veth-out+, eth0]
          inside: [eth1, veth-in, eth1]
        """
    )
    assert rs.zones == {"inside": ("eth1", "veth-in"), "outside": ("eth0", "veth-out+")}


def test_zone_given_as_a_single_name():
    assert parse("zones:\n  dmz: eth2\n").zones == {"dmz": ("eth2",)}


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("zones: [a]\n", 1, "'zones' must be a mapping"),
        ("zones:\n  in side: [eth0]\n", 2, "bad zone name 'in side'"),
        ("zones:\n  a: []\n", 2, "empty list"),
        ("zones:\n  a:\n", 2, "found nothing"),
        ("zones:\n  a:\n    - eth0\n    - eth0/1\n", 4, "bad interface name 'eth0/1'"),
        ("zones:\n  a: [a:b]\n", 2, "bad interface name"),
        ("zones:\n  a: [abcdefghijklmnop]\n", 2, "bad interface name 'abcdefghijklmnop'"),
        ("zones:\n  a: [e+th]\n", 2, "bad interface name 'e+th'"),
        ("zones:\n  a: [eth++]\n", 2, "bad interface name 'eth++'"),
        ("zones:\n  a: ['..']\n", 2, "bad interface name '..'"),
        ("zones:\n  a: [[eth0]]\n", 2, "nested collection"),
        ("zones:\n  a: {x: y}\n", 2, "found a mapping"),
        ("zones:\n  a: [1]\n", 2, "expected an interface name, found 1 (quote it"),
    ],
)
def test_zone_refusals(text, line, fragment):
    err = refused(text)
    assert (err.line, fragment in err.message) == (line, True), err.message


def test_interface_name_of_fifteen_chars_with_wildcard_is_fine():
    assert parse("zones:\n  a: [abcdefghijklmno+, '+']\n").zones == {"a": ("+", "abcdefghijklmno+")}


# -- every rule key -----------------------------------------------------------------


def test_minimal_rule_matches_everything():
    rule = one_rule("action: accept\n")
    assert rule == Rule(name="r", action=Action.ACCEPT)
    assert rule.line == 2


def test_addresses_single_list_and_v6():
    rule = one_rule(
        """
        from: 10.0.1.0/24
        to: [10.0.2.10, "fd00::/64", "fd00::1"]
        action: drop
        """
    )
    assert rule.src == (net("10.0.1.0/24"),)
    assert rule.dst == (net("10.0.2.10/32"), net("fd00::/64"))  # fd00::1 inside fd00::/64
    assert rule.action is Action.DROP


def test_addresses_are_collapsed_and_sorted():
    rule = one_rule("from: [10.0.0.128/25, 10.0.0.0/25, 10.0.0.7, '::1']\naction: accept\n")
    assert rule.src == (net("10.0.0.0/24"), net("::1/128"))


@pytest.mark.parametrize(
    ("name", "number"), [("tcp", 6), ("udp", 17), ("icmp", 1), ("icmpv6", 58), ("ipv6-icmp", 58)]
)
def test_proto_names(name, number):
    assert one_rule(f"proto: {name}\naction: accept\n").proto == number


def test_proto_any_and_numbers():
    assert one_rule("proto: any\naction: accept\n").proto is None
    assert one_rule("proto: 47\naction: accept\n").proto == 47
    assert one_rule("proto: 0\naction: accept\n").proto == 0


def test_ports_merge_into_ranges():
    rule = one_rule(
        """
        proto: tcp
        dport: [443, 80, "8000-8100", 8050, "8101", 81]
        sport: "1024-65535"
        action: accept
        """
    )
    assert rule.dport == ((80, 81), (443, 443), (8000, 8101))
    assert rule.sport == ((1024, 65535),)


def test_ports_with_proto_number_and_udp():
    assert one_rule("proto: 17\ndport: 53\naction: accept\n").dport == ((53, 53),)
    assert one_rule("proto: udp\nsport: [0, 65535]\naction: accept\n").sport == (
        (0, 0),
        (65535, 65535),
    )


def test_icmp_types_by_name_and_number():
    rule = one_rule("proto: icmp\nicmp-type: [echo-request, 0, time-exceeded]\naction: accept\n")
    assert rule.icmp_types == (0, 8, 11)
    rule6 = one_rule(
        "proto: icmpv6\nicmp-type: [echo-request, neighbour-solicitation]\naction: accept\n"
    )
    assert rule6.icmp_types == (128, 135)
    assert one_rule("proto: 58\nicmp-type: packet-too-big\naction: accept\n").icmp_types == (2,)


def test_zone_and_interface_keys():
    text = """
    zones:
      inside: [veth-in]
      outside: [veth-out+]
      dmz: [eth2]
    rules:
      - name: r
        from-zone: [inside, dmz]
        to-zone: outside
        in-interface: [veth-in, eth+]
        out-interface: veth-out0
        action: accept
    """
    (rule,) = parse(text).rules
    assert rule.from_zones == ("dmz", "inside")
    assert rule.to_zones == ("outside",)
    assert rule.in_interfaces == ("eth+", "veth-in")
    assert rule.out_interfaces == ("veth-out0",)


def test_ct_states_are_kept_in_canonical_order():
    assert one_rule("ct: new\naction: accept\n").ct == ("new",)
    rule = "  - {name: r, ct: [related, new, established], action: accept}\n"
    text = "established: rules\nrules:\n" + rule
    assert parse(text).rules[0].ct == ("new", "established", "related")


def test_rule_lines_are_recorded():
    rs = parse(
        """
        rules:
          - name: a
            action: accept

          - {name: b, action: drop}
        """
    )
    assert [r.line for r in rs.rules] == [3, 6]


# -- every rule refusal, with its line --------------------------------------------

RULE_ERRORS = [
    # (rule body lines after '  - name: r' on line 2, error line, message fragment)
    ("    action: accept\n    colour: red\n", 4, "unknown key 'colour' in a rule"),
    ("    action: accept\n    action: drop\n", 4, "duplicate key 'action' (first at line 3)"),
    ("    proto: tcp\n", 2, "rule has no 'action'"),
    ("    action: allow\n", 3, "bad 'action' 'allow': expected accept | drop | reject"),
    (
        "    action: accept\n    from: 10.0.1.5/24\n",
        4,
        "'10.0.1.5/24' has host bits set: the network is 10.0.1.0/24",
    ),
    ("    action: accept\n    to: '2001:db8::1/32'\n", 4, "the network is 2001:db8::/32"),
    (
        "    action: accept\n    from: 10.0.0.0/33\n",
        4,
        "is not an IPv4/IPv6 address or CIDR network",
    ),
    (
        "    action: accept\n    from: [10.0.0.1,\n      300.0.0.1]\n",
        5,
        "'300.0.0.1' is not an IPv4/IPv6",
    ),
    ("    action: accept\n    from: 10\n", 4, "expected an address or CIDR network, found 10"),
    ("    action: accept\n    from: []\n", 4, "empty list"),
    ("    action: accept\n    from:\n", 4, "found nothing"),
    (
        "    action: accept\n    from: 10.0.0.0/8\n    to: 'fd00::/8'\n",
        5,
        "share no address family",
    ),
    ("    action: accept\n    proto: icmp\n    to: 'fd00::/8'\n", 5, "proto icmp is IPv4-only"),
    ("    action: accept\n    proto: icmpv6\n    from: 10.0.0.1\n", 5, "proto icmpv6 is IPv6-only"),
    ("    action: accept\n    proto: gre\n", 4, "bad proto 'gre': expected any | icmp"),
    ("    action: accept\n    proto: 256\n", 4, "bad proto 256"),
    ("    action: accept\n    proto: TCP\n", 4, "bad proto 'TCP'"),
    ("    action: accept\n    proto: true\n", 4, "bad proto True"),
    ("    action: accept\n    dport: 80\n", 4, "'dport' needs 'proto: tcp' or 'proto: udp'"),
    ("    action: accept\n    proto: icmp\n    sport: 80\n", 5, "'sport' needs 'proto: tcp'"),
    ("    action: accept\n    proto: any\n    dport: 80\n", 5, "'dport' needs"),
    (
        "    action: accept\n    proto: tcp\n    dport: 65536\n",
        5,
        "port 65536 out of range 0-65535",
    ),
    ("    action: accept\n    proto: tcp\n    dport: -1\n", 5, "port -1 out of range"),
    ("    action: accept\n    proto: tcp\n    dport: '100-99999'\n", 5, "port 99999 out of range"),
    (
        "    action: accept\n    proto: tcp\n    dport:\n      - 80\n      - '90-85'\n",
        7,
        "port range 90-85 is reversed (write 85-90)",
    ),
    ("    action: accept\n    proto: tcp\n    dport: http\n", 5, "bad port 'http'"),
    ("    action: accept\n    proto: tcp\n    dport: 80.5\n", 5, "bad port 80.5"),
    ("    action: accept\n    proto: tcp\n    dport: yes\n", 5, "bad port True"),
    ("    action: accept\n    proto: tcp\n    dport: [[80]]\n", 5, "nested collection"),
    ("    action: accept\n    icmp-type: echo-request\n", 4, "'icmp-type' needs 'proto: icmp'"),
    ("    action: accept\n    proto: tcp\n    icmp-type: 8\n", 5, "'icmp-type' needs"),
    (
        "    action: accept\n    proto: icmp\n    icmp-type: packet-too-big\n",
        5,
        "bad icmp type 'packet-too-big'",
    ),
    (
        "    action: accept\n    proto: icmpv6\n    icmp-type: [echo-request, 300]\n",
        5,
        "bad icmpv6 type 300",
    ),
    (
        "    action: accept\n    from-zone: inside\n",
        4,
        "unknown zone 'inside' (zones: none defined)",
    ),
    ("    action: accept\n    in-interface: 'eth 0'\n", 4, "bad interface name 'eth 0'"),
    ("    action: accept\n    out-interface: {a: b}\n", 4, "found a mapping"),
    ("    action: accept\n    ct: new-ish\n", 4, "bad ct state 'new-ish'"),
    (
        "    action: accept\n    ct: [new, invalid]\n",
        4,
        "ct state 'invalid' never reaches the rules",
    ),
    (
        "    action: accept\n    ct:\n      - new\n      - established\n",
        6,
        "set 'established: rules'",
    ),
    ("    action: accept\n    ct: related\n", 4, "ct state 'related' never reaches"),
]


@pytest.mark.parametrize(("body", "line", "fragment"), RULE_ERRORS)
def test_rule_refusals(body, line, fragment):
    err = refused("rules:\n  - name: r\n" + body)
    assert err.line == line, err
    assert fragment in err.message, err.message
    assert str(err) == f"t.yaml:{line}: {err.message}"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("rules:\n  - action: accept\n", 2, "rule has no 'name'"),
        ("rules:\n  - name: 42\n    action: accept\n", 2, "expected a rule name, found 42"),
        ("rules:\n  - name: 'a b'\n    action: accept\n", 2, "bad rule name 'a b'"),
        ("rules:\n  - name: ''\n    action: accept\n", 2, "bad rule name ''"),
        (
            "rules:\n  - name: a\n    action: accept\n  - name: b\n    action: drop\n"
            "  - name: a\n    action: drop\n",
            6,
            "duplicate rule name 'a' (first at line 2)",
        ),
        (
            "zones:\n  inside: [eth0]\nrules:\n  - name: a\n    to-zone: [inside, outside]\n"
            "    action: accept\n",
            5,
            "unknown zone 'outside' (zones: inside)",
        ),
        (
            "established: drop\nrules:\n  - name: a\n    ct: established\n    action: accept\n",
            4,
            "(drop)",
        ),
    ],
)
def test_more_rule_refusals(text, line, fragment):
    err = refused(text)
    assert (err.line, fragment in err.message) == (line, True), err.message


def test_zones_may_come_after_rules_in_the_file():
    text = "rules:\n  - name: a\n    from-zone: z\n    action: accept\nzones:\n  z: [eth0]\n"
    assert parse(text).rules[0].from_zones == ("z",)


def test_established_rules_allows_ct_established():
    text = "established: rules\nrules:\n  - {name: a, ct: established, action: accept}\n"
    assert parse(text).rules[0].ct == ("established",)


# -- files -------------------------------------------------------------------------


def test_example_ruleset_loads():
    rs = load_ruleset(EXAMPLES / "rules.yaml")
    assert [r.name for r in rs.rules] == ["no-smtp", "web", "dns", "ping", "ping6"]
    assert rs.default_action is Action.DROP
    assert rs.source == str(EXAMPLES / "rules.yaml")


def test_bad_example_reports_file_and_line():
    path = EXAMPLES / "rules-bad.yaml"
    with pytest.raises(RulesError) as info:
        load_ruleset(path)
    assert str(info.value) == (
        f"{path}:8: '10.10.1.5/24' has host bits set: the network is 10.10.1.0/24"
    )


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RulesError) as info:
        load_ruleset(missing)
    assert info.value.line is None
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def test_directory_is_unreadable(tmp_path):
    with pytest.raises(RulesError, match="cannot read"):
        load_ruleset(tmp_path)


def test_non_utf8_file_reports_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"default: drop\n# caf\xe9\n")
    with pytest.raises(RulesError) as info:
        load_ruleset(path)
    assert (info.value.line, info.value.message) == (2, "not valid UTF-8")


# -- Rule invariants when built in code -------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad name"},
        {"proto": 300},
        {"dport": ((80, 80),)},
        {"proto": 6, "dport": ((90, 100), (80, 95))},
        {"proto": 6, "icmp_types": (8,)},
        {"ct": ()},
        {"ct": ("new", "old")},
    ],
)
def test_rule_invariants_raise_misuse(kwargs):
    with pytest.raises(Misuse):
        Rule(**{"name": "r", "action": Action.ACCEPT, **kwargs})
