"""Flow and VIP ownership: a Maglev consistent-hash table over live members.

Every process of the cluster must agree on who owns a flow without talking,
so the table is a pure function of (member set, table size, salt):

* Members are sorted by name, never taken in arrival order.
* Hashing is keyed BLAKE2b (``hashlib.blake2b(key=salt)``), identical in every
  process and every Python run.  Python's ``hash()`` is salted per process
  (``PYTHONHASHSEED``) and must never be used here.
* The key hashed is the direction-independent flow key
  (``node.flow.key.FlowKey``, whose bytes order the two endpoints), so both
  directions of a connection have the same owner.

Maglev (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
Balancer", NSDI 2016, section 3.4): each member ``m`` has a preference
permutation of the ``M`` slots, ``(offset(m) + j * skip(m)) mod M``, which
visits every slot because ``M`` is prime and ``1 <= skip < M``.  Members take
turns claiming their next preferred free slot until the table is full.

Two properties follow and are tested:

* Balance.  Turns are round-robin, so slot counts differ by at most one:
  each member holds ``floor(M/N)`` or ``ceil(M/N)`` slots, and the largest
  share is at most ``(1 + N/M)`` times the ideal ``1/N``.  With
  ``M > 100 N`` that is at most 1 % above ideal.
* Near-minimal disruption.  When a member leaves, all of its slots move
  (they must) and only a small fraction of the others do: the paper trades
  strict minimal disruption for balance.  Measured at the default size
  (16411) the extra movement is about 1 % of the table (worst seen 1.1 %
  over random member sets up to 32); it grows as slots per member shrink.
  No table can have both exact balance and strictly minimal disruption for
  every member set, so this is the documented trade, not a bug.

The table size is a cluster-wide constant, not derived from the member
count: a key's slot is ``hash(key) mod M``, so changing ``M`` would remap
nearly every key at once.  The default, 16411 (the first prime above
2**14), keeps the 1 % bound up to 164 members and builds in about 10 ms.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cluster.errors import EmptyRing, Misuse

__all__ = ["DEFAULT_SALT", "DEFAULT_TABLE_SIZE", "HashRing", "RingStats", "is_prime", "moved"]

DEFAULT_TABLE_SIZE: Final = 16411
DEFAULT_SALT: Final = b"stockade"
BALANCE_FACTOR: Final = 100  # table slots per member needed for the 1 % bound
_SUBRING_CACHE: Final = 32  # failover rings kept per ring by owners()
_OWNERS_MEMO: Final = 4096  # owners() answers kept per ring
_MAX_SALT: Final = 64  # BLAKE2b's largest key


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (trial division; table sizes are small)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    divisor = 3
    while divisor * divisor <= n:
        if n % divisor == 0:
            return False
        divisor += 2
    return True


@dataclass(frozen=True, slots=True)
class RingStats:
    members: int
    table_size: int
    imbalance: float  # largest share / ideal share (1.0 is perfect; <= 1.01 by construction)
    cached_failover_rings: int  # rings kept by owners(), at most 32


class HashRing:
    """Which member owns a key: a Maglev lookup table over a set of members.

    ``members`` is a set: order and duplicates do not matter.  Raises
    :class:`cluster.errors.EmptyRing` when it is empty and
    :class:`cluster.errors.Misuse` for an empty member name, a table size
    that is not a prime above ``100 * len(members)``, or a salt that is not
    1..64 bytes.
    """

    __slots__ = ("_members", "_owners", "_salt", "_subrings", "_table", "_table_size")

    def __init__(
        self,
        members: Iterable[str],
        *,
        table_size: int | None = None,
        salt: bytes = DEFAULT_SALT,
    ) -> None:
        names = tuple(sorted(set(members)))
        size = DEFAULT_TABLE_SIZE if table_size is None else table_size
        _validate(names, size, salt)
        self._members = names
        self._table_size = size
        self._salt = salt
        self._table = _populate(names, size, salt)
        self._subrings: dict[frozenset[str], HashRing] = {}
        # owners() answers, memoized (the ring is immutable): the agent asks
        # for every VIP's failover order on every tick.  Bounded: emptied
        # when full, so keys asked once (flows) cannot grow it.
        self._owners: dict[tuple[bytes, int], tuple[str, ...]] = {}

    @property
    def members(self) -> tuple[str, ...]:
        """The members, sorted."""
        return self._members

    @property
    def table_size(self) -> int:
        return self._table_size

    def slot(self, key: bytes) -> int:
        """The table slot of ``key``."""
        digest = hashlib.blake2b(
            key, digest_size=8, key=self._salt, person=b"stockade-key"
        ).digest()
        return int.from_bytes(digest, "big") % self._table_size

    def owner(self, key: bytes) -> str:
        """The member that owns ``key`` (a flow key, or a VIP's bytes)."""
        return self._table[self.slot(key)]

    def owners(self, key: bytes, n: int) -> tuple[str, ...]:
        """The first ``n`` distinct members for ``key`` in failover order.

        ``owners(key, n)[0]`` is :meth:`owner`; entry ``i`` is the owner in
        the ring without entries ``0..i-1``: the member that takes ``key``
        over if all before it leave.  That is the order for VIP failover and
        for placing replicas where the next owner will look.  Fewer than
        ``n`` entries when the ring has fewer members.
        """
        if n < 1:
            raise Misuse(f"owners() needs n >= 1, got {n}")
        known = self._owners.get((key, n))
        if known is not None:
            return known
        chosen: list[str] = []
        for _ in range(min(n, len(self._members))):
            ring = self._without(frozenset(chosen)) if chosen else self
            chosen.append(ring.owner(key))
        if len(self._owners) >= _OWNERS_MEMO:
            self._owners.clear()
        found = self._owners[(key, n)] = tuple(chosen)
        return found

    def shares(self) -> dict[str, float]:
        """Each member's fraction of the table (the expected fraction of flows)."""
        counts = Counter(self._table)
        return {name: counts[name] / self._table_size for name in self._members}

    def statistics(self) -> RingStats:
        return RingStats(
            members=len(self._members),
            table_size=self._table_size,
            imbalance=max(self.shares().values()) * len(self._members),
            cached_failover_rings=len(self._subrings),
        )

    def without(self, member: str) -> HashRing:
        """This ring minus ``member`` (what every node builds when it leaves)."""
        return self._without(frozenset((member,)))

    def _without(self, gone: frozenset[str]) -> HashRing:
        ring = self._subrings.get(gone)
        if ring is None:
            ring = HashRing(
                (m for m in self._members if m not in gone),
                table_size=self._table_size,
                salt=self._salt,
            )
            if len(self._subrings) >= _SUBRING_CACHE:
                del self._subrings[next(iter(self._subrings))]  # oldest first
            self._subrings[gone] = ring
        return ring

    @staticmethod
    def moved(old: HashRing, new: HashRing) -> float:
        """The fraction of table slots whose owner differs between two rings.

        Both rings must share table size and salt (a cluster constant);
        otherwise their slots mean different things and :class:`Misuse` is
        raised.
        """
        if old._table_size != new._table_size or old._salt != new._salt:
            raise Misuse("moved() compares rings with the same table size and salt only")
        changed = sum(1 for a, b in zip(old._table, new._table, strict=True) if a != b)
        return changed / old._table_size

    def __repr__(self) -> str:
        return f"HashRing({list(self._members)!r}, table_size={self._table_size})"


moved = HashRing.moved


def _validate(names: tuple[str, ...], size: int, salt: bytes) -> None:
    if not names:
        raise EmptyRing("a hash ring needs at least one member")
    if any(not isinstance(name, str) or not name for name in names):
        raise Misuse("member names must be non-empty strings")
    try:
        for name in names:
            name.encode()
    except UnicodeEncodeError as exc:
        raise Misuse(f"member name not encodable as UTF-8: {exc}") from exc
    if not 1 <= len(salt) <= _MAX_SALT:
        raise Misuse(f"salt must be 1..{_MAX_SALT} bytes, got {len(salt)}")
    if not is_prime(size):
        raise Misuse(f"table size {size} is not prime (Maglev permutations need a prime)")
    if size <= BALANCE_FACTOR * len(names):
        raise Misuse(
            f"table size {size} is not above {BALANCE_FACTOR} x {len(names)} members "
            "(the 1 % balance bound); configure a larger prime"
        )


def _member_hash(name: str, salt: bytes, person: bytes) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8, key=salt, person=person).digest()
    return int.from_bytes(digest, "big")


def _populate(names: tuple[str, ...], size: int, salt: bytes) -> list[str]:
    """Fill the table by Maglev's round-robin over preference permutations."""
    # Next candidate slot of each member; advancing by its skip walks its permutation.
    cursor = [_member_hash(name, salt, b"maglev-offset") % size for name in names]
    skip = [_member_hash(name, salt, b"maglev-skip") % (size - 1) + 1 for name in names]
    table: list[str | None] = [None] * size
    free = size
    while True:
        for i, name in enumerate(names):
            slot, step = cursor[i], skip[i]
            while table[slot] is not None:
                slot += step
                if slot >= size:
                    slot -= size
            table[slot] = name
            slot += step
            cursor[i] = slot - size if slot >= size else slot
            free -= 1
            if not free:
                return [name for name in table if name is not None]
