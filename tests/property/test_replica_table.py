"""Property: replica records applied in any order, any number of times, converge.

Per key, the table ends holding the record with the highest (version, origin)
among all applied to it; when that highest one is a DELETE the key is absent
and stays absent against every lower record (tombstones), within their TTL.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from node.flow.key import flow_key
from node.flow.replica import ApplyOutcome
from node.flow.table import FlowTable, TableConfig
from node.packet import TCP, Packet
from syncd.convert import apply_change
from syncd.records import FlowRecord, Op

A, B = 0x0A000001, 0x0A000002
STATES = ("SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "TIME_WAIT", "CLOSE")
ORIGINS = ("fw2", "fw3", "fw4")


@dataclass(frozen=True)
class Change:
    op: Op
    record: FlowRecord

    @property
    def order(self) -> tuple[int, str]:
        return self.record.order


def make_record(sport: int, version: int, origin: str, state: str, reverse: bool) -> FlowRecord:
    src, dst, s_port, d_port = (B, A, 80, sport) if reverse else (A, B, sport, 80)
    key, _ = flow_key(Packet(4, src, dst, TCP, s_port, d_port, 40))
    return FlowRecord(
        key=key.to_bytes(),
        proto=TCP,
        family=4,
        orig_src=src,
        orig_sport=s_port,
        orig_dst=dst,
        orig_dport=d_port,
        state=state,
        assured=state == "ESTABLISHED",
        timeout=60.0,
        origin=origin,
        version=version,
    )


changes = st.builds(
    lambda op, sport, version, origin, state, reverse: Change(
        op, make_record(sport, version, origin, state, reverse)
    ),
    st.sampled_from([Op.CREATE, Op.UPDATE, Op.DELETE]),
    st.sampled_from([1001, 1002, 1003]),
    st.integers(1, 8),
    st.sampled_from(ORIGINS),
    st.sampled_from(STATES),
    st.booleans(),
)
# One change per (key, version, origin): the cluster never issues two.
change_lists = st.lists(changes, max_size=40, unique_by=lambda c: (c.record.key, c.order))


def apply_all(table: FlowTable, sequence: list[Change], now: float) -> None:
    for change in sequence:
        apply_change(table, change.op, change.record, now)


def expected(sequence: list[Change]) -> dict[bytes, Change]:
    """The winning change per key."""
    best: dict[bytes, Change] = {}
    for change in sequence:
        held = best.get(change.record.key)
        if held is None or change.order > held.order:
            best[change.record.key] = change
    return best


def check_converged(table: FlowTable, sequence: list[Change]) -> None:
    table.verify()
    for key, winner in expected(sequence).items():
        flow = table.get(key)
        if winner.op is Op.DELETE:
            assert flow is None
            continue
        assert flow is not None
        r = winner.record
        assert (flow.state, flow.assured) == (r.state, r.assured)
        assert (flow.orig_src, flow.orig_sport, flow.orig_dst, flow.orig_dport) == (
            r.orig_src, r.orig_sport, r.orig_dst, r.orig_dport,
        )  # fmt: skip
        origin = table.origin_of(key)
        assert origin is not None and (origin.version, origin.origin) == r.order
    assert len(table) == sum(1 for c in expected(sequence).values() if c.op is not Op.DELETE)


@given(change_lists, st.randoms(use_true_random=False), st.lists(st.integers(0, 39)))
def test_any_order_and_duplicates_converge_to_the_highest_version(sequence, rng, repeats):
    shuffled = list(sequence)
    rng.shuffle(shuffled)
    duplicates = [sequence[i] for i in repeats if i < len(sequence)]
    a, b = FlowTable(TableConfig()), FlowTable(TableConfig())
    apply_all(a, sequence, 1.0)
    apply_all(b, shuffled + duplicates, 1.0)
    check_converged(a, sequence)
    check_converged(b, sequence)


@given(change_lists)
def test_removed_keys_stay_removed_against_lower_versions(sequence):
    table = FlowTable(TableConfig())
    apply_all(table, sequence, 1.0)
    for key, winner in expected(sequence).items():
        if winner.op is not Op.DELETE:
            continue
        for change in sequence:
            if change.record.key == key and change.op is not Op.DELETE:
                outcome, events = table.install(change.record, 2.0)
                assert (outcome, events) == (ApplyOutcome.BLOCKED, ())
                assert key not in table
