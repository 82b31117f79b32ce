"""The Maglev ring: determinism, balance, disruption, flow direction, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import EmptyRing, Misuse
from cluster.ring import _OWNERS_MEMO, DEFAULT_TABLE_SIZE, HashRing, is_prime, moved
from node.flow.key import flow_key
from node.packet import ACK, SYN, parse
from tests.packets import tcp4, tcp6, udp4

REPO = Path(__file__).resolve().parents[2]


def nodes(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


def keys(count: int) -> list[bytes]:
    # IPv4 TCP flow keys 10.0.i.j:port <-> 192.0.2.1:443, in canonical order.
    out = []
    for i in range(count):
        a = bytes([10, 0, i >> 8 & 0xFF, i & 0xFF])
        out.append(
            bytes([4, 6])
            + a
            + (40000 + i % 1000).to_bytes(2, "big")
            + bytes([192, 0, 2, 1])
            + (443).to_bytes(2, "big")
        )
    return out


# Builds a ring in a fresh interpreter and prints the owners of the keys on stdin.
_CHILD = """
import json, sys
from cluster.ring import HashRing
ring = HashRing(json.loads(sys.argv[1]))
print(json.dumps([ring.owner(bytes.fromhex(k)) for k in json.load(sys.stdin)]))
"""


def owners_in_subprocess(members: list[str], sample: list[bytes], hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(members)],
        input=json.dumps([k.hex() for k in sample]).encode(),
        env=env,
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    )
    result: list[str] = json.loads(out.stdout)
    return result


def test_owners_identical_across_processes_and_hash_seeds() -> None:
    sample = keys(1000)
    here = HashRing(reversed(nodes(7)))  # insertion order must not matter either
    expected = [here.owner(k) for k in sample]
    assert owners_in_subprocess(nodes(7), sample, "1") == expected
    assert owners_in_subprocess(nodes(7)[::-1], sample, "4242") == expected
    assert len(set(expected)) == 7  # the keys really spread over the members


@pytest.mark.parametrize("n", range(3, 17))
def test_balance_within_one_percent(n: int) -> None:
    ring = HashRing(nodes(n))
    shares = ring.shares()
    assert set(shares) == set(nodes(n))
    assert sum(shares.values()) == pytest.approx(1.0)
    # Maglev's round-robin fill: slot counts differ by at most one ...
    counts = [round(s * ring.table_size) for s in shares.values()]
    assert max(counts) - min(counts) <= 1
    # ... so the largest share is within (1 + n/M) of ideal, M > 100 n.
    assert max(shares.values()) * n <= 1.01
    stats = ring.statistics()
    assert (stats.members, stats.table_size) == (n, DEFAULT_TABLE_SIZE)
    assert stats.imbalance == pytest.approx(max(shares.values()) * n)


@pytest.mark.parametrize("n", [3, 8, 16])
def test_removing_a_member_moves_its_share_and_little_else(n: int) -> None:
    ring = HashRing(nodes(n))
    sample = keys(5000)
    before = [ring.owner(k) for k in sample]
    for gone in (nodes(n)[0], nodes(n)[-1]):
        smaller = ring.without(gone)
        share = ring.shares()[gone]
        fraction = moved(ring, smaller)
        assert share <= fraction <= share + 0.01
        assert abs(fraction - 1 / n) < 0.01
        after = [smaller.owner(k) for k in sample]
        # Every key the member owned moves; of the others, under 1 % do.
        assert all(a != gone for b, a in zip(before, after, strict=True) if b == gone)
        others = [(b, a) for b, a in zip(before, after, strict=True) if b != gone]
        strays = sum(b != a for b, a in others)
        assert strays / len(others) < 0.01


@pytest.mark.parametrize("n", [3, 8, 16])
def test_adding_a_member_moves_about_one_share_to_it(n: int) -> None:
    ring = HashRing(nodes(n))
    bigger = HashRing([*nodes(n), "newcomer"])
    fraction = moved(ring, bigger)
    assert bigger.shares()["newcomer"] <= fraction <= bigger.shares()["newcomer"] + 0.01
    assert abs(fraction - 1 / (n + 1)) < 0.01
    sample = keys(5000)
    changed = [k for k in sample if ring.owner(k) != bigger.owner(k)]
    to_newcomer = sum(bigger.owner(k) == "newcomer" for k in changed)
    assert to_newcomer / len(changed) > 0.9


def test_ring_without_is_a_fresh_ring_of_the_rest() -> None:
    ring = HashRing(nodes(5))
    assert moved(ring.without("node-2"), HashRing(n for n in nodes(5) if n != "node-2")) == 0.0


@pytest.mark.parametrize(
    ("forward", "backward"),
    [
        (
            tcp4("10.1.1.1", 40000, "10.2.2.2", 443, SYN),
            tcp4("10.2.2.2", 443, "10.1.1.1", 40000, SYN | ACK),
        ),
        (
            tcp6("fd00::1", 5555, "fd00::2", 80, SYN),
            tcp6("fd00::2", 80, "fd00::1", 5555, SYN | ACK),
        ),
        (udp4("10.1.1.1", 5353, "10.2.2.2", 53), udp4("10.2.2.2", 53, "10.1.1.1", 5353)),
    ],
)
def test_both_directions_of_a_flow_have_one_owner(forward: bytes, backward: bytes) -> None:
    ring = HashRing(nodes(8))
    key_fwd, a_to_b = flow_key(parse(forward))
    key_back, b_to_a = flow_key(parse(backward))
    assert a_to_b != b_to_a  # really opposite directions
    assert ring.owner(key_fwd) == ring.owner(key_back)
    assert ring.owners(key_fwd, 3) == ring.owners(key_back, 3)


def test_owners_are_the_failover_order() -> None:
    ring = HashRing(nodes(6), table_size=1009)
    for key in keys(200):
        first, second, third = ring.owners(key, 3)
        assert first == ring.owner(key)
        assert len({first, second, third}) == 3
        assert second == ring.without(first).owner(key)
        assert third == ring.without(first).without(second).owner(key)


def test_owners_with_more_than_the_members_returns_all() -> None:
    ring = HashRing(nodes(3))
    assert sorted(ring.owners(b"k", 10)) == nodes(3)
    with pytest.raises(Misuse):
        ring.owners(b"k", 0)


def test_members_are_a_set() -> None:
    assert HashRing(["b", "a", "b"]).members == ("a", "b")
    assert moved(HashRing(["a", "b"]), HashRing(["b", "a", "a"])) == 0.0


def test_salt_changes_the_placement() -> None:
    plain, salted = HashRing(nodes(4)), HashRing(nodes(4), salt=b"other-cluster")
    assert [plain.owner(k) for k in keys(100)] != [salted.owner(k) for k in keys(100)]
    with pytest.raises(Misuse):
        moved(plain, salted)


def test_empty_ring_raises_documented_error() -> None:
    with pytest.raises(EmptyRing):
        HashRing([])
    assert issubclass(EmptyRing, Misuse)


@pytest.mark.parametrize(
    ("members", "kwargs"),
    [
        (["a", ""], {}),
        (["a"], {"table_size": 1000}),  # not prime
        (nodes(11), {"table_size": 1009}),  # prime but not > 100 x 11
        (["a"], {"salt": b""}),
        (["a"], {"salt": bytes(65)}),
    ],
)
def test_invalid_rings_are_misuse(members: list[str], kwargs: dict[str, object]) -> None:
    with pytest.raises(Misuse):
        HashRing(members, **kwargs)  # type: ignore[arg-type]


def test_moved_needs_equal_table_sizes() -> None:
    with pytest.raises(Misuse):
        moved(HashRing(["a"], table_size=1009), HashRing(["a"]))


def test_default_table_size_is_a_prime() -> None:
    assert is_prime(DEFAULT_TABLE_SIZE)
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


def test_member_names_must_encode_as_utf8() -> None:
    with pytest.raises(Misuse):
        HashRing(["ok", "bad\udc80"])


def test_owners_memo_is_bounded_and_answers_the_same() -> None:
    ring = HashRing(["fw1", "fw2", "fw3"])
    fresh = HashRing(["fw1", "fw2", "fw3"])
    keys = [i.to_bytes(4, "big") for i in range(_OWNERS_MEMO + 100)]
    for key in keys:
        ring.owners(key, 2)
    assert len(ring._owners) <= _OWNERS_MEMO
    assert all(ring.owners(k, 2) == fresh.owners(k, 2) for k in keys[:50] + keys[-50:])
