"""In-process parts of the data-plane benchmark: engine decisions/s and bytes per flow.

Both run on packets built here with ``struct`` (product code does not import
the test-suite builders).  Checksums are left zero: the engine does not
verify them (see :mod:`node.packet`), and building them would only slow the
set-up down.

Decisions/s: a trace of complete TCP conversations (handshake, data and
acknowledgements with correct sequence numbers, so the tracker keeps every
packet ESTABLISHED) is built once, then fed to a fresh :class:`Engine` in a
tight loop.  Every ``1 + 2 + 2 * DATA_SEGMENTS`` packets one flow is new, so
both the rule lookup of a new flow and the table lookup of an established
one are in the figure.  The trace is checked afterwards: if the engine
called any packet INVALID or dropped it, the figure would describe the
wrong path, and the benchmark refuses to report it.

Bytes per flow: :mod:`tracemalloc` counts every Python allocation made while
N TCP flows (one SYN each) are admitted into an empty :class:`FlowTable`
with capacity N (the table itself included), divided by N.  The SYNs are
parsed before tracing starts, and afterwards a sample of them is checked to
be referenced by nothing but their list, so the table cannot hide part of a
flow in a packet object the count left out.  An untraced run before it
reports the growth of resident memory per flow as a cross-check (it also
counts the allocator's own overhead; it is not what the target is about).
"""

from __future__ import annotations

import gc
import os
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from node.bench_calc import BenchError
from node.engine import Engine, Verdict
from node.flow.table import FlowTable, TableConfig
from node.packet import ACK, PSH, SYN, TCP, Packet, parse
from node.policy import Ruleset, parse_ruleset

# Data segments (each acknowledged) per flow of the decisions/s trace.
DATA_SEGMENTS: Final = 4
PAYLOAD: Final = b"x" * 100
CLIENT_NET: Final = 0x0A000000  # 10.0.0.0/8: clients
SERVER: Final = 0xC0A80001  # 192.168.0.1: the one server
SERVER_PORT: Final = 80
WINDOW: Final = 65535
# Distinct client ports used per client address before moving to the next one.
PORTS_PER_ADDR: Final = 50000
FIRST_PORT: Final = 10000
START_TIME: Final = 1000.0
PACKET_INTERVAL: Final = 1e-5  # seconds of engine time between two trace packets

_IPV4: Final = struct.Struct("!BBHHHBBHII")
_TCP: Final = struct.Struct("!HHIIBBHHH")

BENCH_RULES: Final = """\
default: drop
rules:
  - name: bench-web
    proto: tcp
    from: 10.0.0.0/8
    to: 192.168.0.0/24
    dport: 80
    action: accept
"""


def tcp_packet(
    src: int, sport: int, dst: int, dport: int, flags: int, seq: int, ack: int, payload: bytes = b""
) -> bytes:
    """An IPv4 TCP segment without options; checksums zero (never verified)."""
    segment = _TCP.pack(sport, dport, seq, ack, 5 << 4, flags, WINDOW, 0, 0) + payload
    header = _IPV4.pack(0x45, 0, 20 + len(segment), 0, 0x4000, 64, TCP, 0, src, dst)
    return header + segment


def client_of(index: int) -> tuple[int, int]:
    """A distinct (address, port) for flow ``index``: ``PORTS_PER_ADDR`` ports per address."""
    return CLIENT_NET + 1 + index // PORTS_PER_ADDR, FIRST_PORT + index % PORTS_PER_ADDR


def conversation(index: int) -> list[bytes]:
    """One flow: handshake, then DATA_SEGMENTS data segments each acknowledged."""
    cli, port = client_of(index)
    c_seq, s_seq = 1000 + index, 5_000_000 + index
    packets = [
        tcp_packet(cli, port, SERVER, SERVER_PORT, SYN, c_seq, 0),
        tcp_packet(SERVER, SERVER_PORT, cli, port, SYN | ACK, s_seq, c_seq + 1),
        tcp_packet(cli, port, SERVER, SERVER_PORT, ACK, c_seq + 1, s_seq + 1),
    ]
    c_seq, s_seq = c_seq + 1, s_seq + 1
    for _ in range(DATA_SEGMENTS):
        packets.append(tcp_packet(cli, port, SERVER, SERVER_PORT, PSH | ACK, c_seq, s_seq, PAYLOAD))
        c_seq += len(PAYLOAD)
        packets.append(tcp_packet(SERVER, SERVER_PORT, cli, port, ACK, s_seq, c_seq))
    return packets


def engine_trace(flows: int) -> list[bytes]:
    """``flows`` conversations one after another."""
    trace: list[bytes] = []
    for i in range(flows):
        trace.extend(conversation(i))
    return trace


def bench_ruleset() -> Ruleset:
    return parse_ruleset(BENCH_RULES, "<bench rules>")


@dataclass(frozen=True, slots=True)
class EngineRun:
    packets: int
    new_flows: int
    seconds: float

    @property
    def decisions_per_second(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0


def run_engine_trace(
    trace: list[bytes], flows: int, clock: Callable[[], float] = time.perf_counter
) -> EngineRun:
    """Feed ``trace`` to a fresh engine once and time it."""
    engine = Engine(TableConfig(capacity=max(flows, 1)), bench_ruleset())
    process = engine.process
    now = START_TIME
    start = clock()
    for data in trace:
        process(data, now, "inside", "outside")
        now += PACKET_INTERVAL
    seconds = clock() - start
    _check_all_accepted(engine, len(trace), flows)
    return EngineRun(len(trace), flows, seconds)


def _check_all_accepted(engine: Engine, packets: int, flows: int) -> None:
    stats = engine.statistics()
    accepted = dict(stats.verdicts).get(Verdict.ACCEPT.value, 0)
    new = dict(stats.ct_states).get("new", 0)
    if accepted != packets or new != flows:
        raise BenchError(
            f"engine trace not judged as built: {accepted}/{packets} accepted, "
            f"{new}/{flows} new (verdicts {stats.verdicts}, states {stats.ct_states}, "
            f"reasons {stats.drop_reasons})"
        )


@dataclass(frozen=True, slots=True)
class MemoryRun:
    flows: int
    bytes_total: int  # traced bytes still allocated after admitting the flows
    peak_bytes: int  # traced peak while admitting
    rss_bytes_per_flow: float | None  # resident-memory growth per flow, untraced run

    @property
    def bytes_per_flow(self) -> float:
        return self.bytes_total / self.flows if self.flows else 0.0


def measure_bytes_per_flow(flows: int) -> MemoryRun:
    """Admit ``flows`` TCP flows (one SYN each) into an empty table under tracemalloc."""
    if flows < 1:
        raise BenchError(f"need at least one flow, not {flows}")
    if tracemalloc.is_tracing():
        raise BenchError("tracemalloc is already tracing; cannot measure on top of it")
    # Parsed before tracing starts: tracing makes every allocation several
    # times slower, and a million parses would dominate the run.  Whether the
    # table kept a reference to any of them is checked below.
    packets = [
        parse(tcp_packet(cli, port, SERVER, SERVER_PORT, SYN, 1000 + i, 0))
        for i, (cli, port) in enumerate(map(client_of, range(flows)))
    ]
    rss = _rss_per_flow(packets)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        table = _admit_all(packets)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if len(table) != flows:
        raise BenchError(f"table holds {len(table)} flows, expected {flows}")
    _check_packets_released(packets)
    return MemoryRun(flows, current - base, peak - base, rss)


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _rss_per_flow(packets: list[Packet]) -> float | None:
    """Resident-memory growth per flow of an untraced table (None off Linux).

    Runs first, on a heap that has not yet held a table, so the growth is not
    hidden by memory freed earlier; it includes the allocator's overhead,
    which tracemalloc does not see.
    """
    gc.collect()
    try:
        before = _rss_bytes()
        table = _admit_all(packets)
        after = _rss_bytes()
    except OSError:
        return None
    flows = len(table)
    del table
    gc.collect()
    return (after - before) / flows


def _admit_all(packets: list[Packet]) -> FlowTable:
    table = FlowTable(TableConfig(capacity=len(packets)))
    track, admit = table.track, table.admit
    now = START_TIME
    for packet in packets:
        track(packet, now)
        if admit(packet, now, "bench-web")[0] is None:
            raise BenchError(f"table refused a flow at {len(table)} of {len(packets)}")
    return table


def _check_packets_released(packets: list[Packet]) -> None:
    """The packets were allocated untraced: if the table kept any, the figure is short."""
    for i in range(0, len(packets), max(1, len(packets) // 100)):
        # One reference from the list, one from getrefcount's argument.
        if sys.getrefcount(packets[i]) > 2:
            raise BenchError(
                "the flow table keeps references to packets; bytes/flow would miss them"
            )
