"""One repeat of the benchmark's network figures: every system, one after another.

A repeat measures, in this order:

* the generator's ceiling: UDP at a rate it cannot reach, no firewall;
* ``none``: TCP bulk with no firewall -- first *and* last in the repeat,
  the ratios dividing by the mean of the two, so a neighbour's burst of work
  during the repeat weighs on both sides of the ratio;
* in between (reversed on odd repeats, so slow drift does not always favour
  the same system):
  ``bare``, the bare accept-all loop: the CPU-per-packet step, the rate
  search, TCP bulk; ``node`` without fast path: the same three; ``node``
  with fast path: TCP bulk only (UDP one-way flows are never offloaded, so
  their figures would repeat the ones above).

The CPU-per-packet step runs at a fixed rate well below both capacities and
reads the firewall process's own CPU time: unlike the loss-free rate it does
not depend on how fast the generator can send.  It does depend on the rate
(below capacity each packet may cost a whole wake-up of the loop), so it is
a second estimate, not the primary one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from node.bench_calc import BenchError, RateSearch, SearchConfig

if TYPE_CHECKING:
    from node.bench import BenchOptions, Progress
    from node.bench_lab import BenchLab, Firewall, UdpStep

CEILING_TARGET_PPS: Final = 5_000_000.0  # asked of the generator: more than it can send
# A step where less than this share of the packets sent went through the
# queue measured something else (a missing rule, traffic bypassing us).
MIN_QUEUED_SHARE: Final = 0.9


def _step_record(udp: UdpStep) -> dict[str, Any]:
    return {
        "sent": udp.run.sent_packets,
        "seconds": udp.run.seconds,
        "received": udp.received,
        "queued": udp.queued,
        "queue_drops": udp.queue_drops,
        "cpu_ns": udp.cpu_ns,
    }


def _udp(lab: BenchLab, rate: float, fw: Firewall, opts: BenchOptions) -> UdpStep:
    udp = lab.udp_step(rate, opts.step_seconds, fw)
    reached = (udp.queued or 0) + udp.queue_drops
    if reached < MIN_QUEUED_SHARE * udp.run.sent_packets:
        raise BenchError(
            f"{fw.name}: only {reached} of {udp.run.sent_packets} packets reached NFQUEUE "
            f"{fw.queue}; the traffic is not going through the system measured"
        )
    return udp


def search_rate(
    lab: BenchLab, fw: Firewall, ceiling: float, opts: BenchOptions, progress: Progress
) -> dict[str, Any]:
    """The highest UDP rate ``fw`` forwards with loss below the threshold."""
    config = SearchConfig(
        opts.low_pps, ceiling, opts.max_steps, opts.precision, opts.loss_threshold
    )
    search = RateSearch(config)
    details = []
    while (rate := search.next_rate()) is not None:
        udp = _udp(lab, rate, fw, opts)
        step = search.record(rate, udp.run.achieved_pps, udp.loss)
        details.append({**dataclasses.asdict(step), **_step_record(udp)})
        progress(
            f"  {fw.name}: target {rate:,.0f} pps, sent {step.achieved_pps:,.0f} pps, "
            f"loss {step.loss * 100:.3f}% -> {'pass' if step.passed else 'fail'}"
        )
    result = search.result()
    return {"best_pps": result.best_pps, "capped": result.capped, "steps": details}


def cpu_per_packet(
    lab: BenchLab, fw: Firewall, opts: BenchOptions, progress: Progress
) -> dict[str, Any]:
    """The firewall process's CPU time per queued packet at ``opts.cpu_pps``."""
    udp = _udp(lab, opts.cpu_pps, fw, opts)
    queued = udp.queued or 0
    ns = (udp.cpu_ns or 0) / queued if queued else None
    progress(
        f"  {fw.name}: {ns or 0:,.0f} ns CPU per packet at {udp.run.achieved_pps:,.0f} pps "
        f"(loss {udp.loss * 100:.3f}%)"
    )
    return {
        "target_pps": opts.cpu_pps,
        "achieved_pps": udp.run.achieved_pps,
        "loss": udp.loss,
        "ns_per_packet": ns,
        **_step_record(udp),
    }


def tcp_bulk(lab: BenchLab, opts: BenchOptions, label: str, progress: Progress) -> float:
    run = lab.tcp_run(opts.tcp_seconds, opts.tcp_omit)
    gbit = run.bits_per_second / 1e9
    progress(f"  TCP {label}: {gbit:.2f} Gbit/s ({run.retransmits} retransmits)")
    return run.bits_per_second


class _Repeat:
    """The systems of one repeat, each a method filling the shared record."""

    def __init__(self, lab: BenchLab, opts: BenchOptions, progress: Progress) -> None:
        self.lab, self.opts, self.progress = lab, opts, progress
        self.want_pps = "pps" in opts.parts
        self.want_tcp = "tcp" in opts.parts
        self.ceiling = 0.0
        self.pps: dict[str, Any] = {}
        self.cpu: dict[str, Any] = {}
        self.tcp: dict[str, float] = {}
        self.tcp_none: list[float] = []
        self.stats: dict[str, Any] = {}

    def measure_ceiling(self) -> dict[str, Any]:
        probe = self.lab.udp_step(CEILING_TARGET_PPS, self.opts.step_seconds, None, timed=True)
        self.ceiling = probe.run.achieved_pps
        self.progress(f"  generator ceiling: {self.ceiling:,.0f} pps (loss {probe.loss:.3%})")
        if self.ceiling <= self.opts.low_pps * (1 + self.opts.precision):
            raise BenchError(f"the generator reached only {self.ceiling:,.0f} pps")
        return {"pps": self.ceiling, "loss": probe.loss, **_step_record(probe)}

    def none(self) -> None:
        self.tcp_none.append(tcp_bulk(self.lab, self.opts, "no firewall", self.progress))

    def _udp_figures(self, fw: Firewall, key: str) -> None:
        if self.want_pps:
            self.cpu[key] = cpu_per_packet(self.lab, fw, self.opts, self.progress)
            self.pps[key] = search_rate(self.lab, fw, self.ceiling, self.opts, self.progress)

    def bare(self) -> None:
        with self.lab.bare_loop() as fw:
            self._udp_figures(fw, "bare")
            if self.want_tcp:
                self.tcp["bare"] = tcp_bulk(self.lab, self.opts, "bare loop", self.progress)

    def node_slow(self) -> None:
        with self.lab.node(fast_path=False) as fw:
            self._udp_figures(fw, "node")
            if self.want_tcp:
                label = "node, no fast path"
                self.tcp["node_slow"] = tcp_bulk(self.lab, self.opts, label, self.progress)
            self.stats["node_slow"] = self.lab.node_stats(fw)

    def node_fast(self) -> None:
        with self.lab.node(fast_path=True) as fw:
            label = "node, fast path"
            self.tcp["node_fast"] = tcp_bulk(self.lab, self.opts, label, self.progress)
            self.stats["node_fast"] = self.lab.node_stats(fw)

    def run(self, index: int) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.want_pps:
            record["ceiling"] = self.measure_ceiling()
        systems: list[Callable[[], None]] = [self.bare, self.node_slow]
        if self.want_tcp:
            systems.append(self.node_fast)
        if index % 2:
            systems.reverse()
        if self.want_tcp:
            systems = [self.none, *systems, self.none]
        for system in systems:
            system()
        if self.want_pps:
            record["pps"], record["cpu"] = self.pps, self.cpu
        if self.want_tcp:
            record["tcp"] = {**self.tcp, "none": sum(self.tcp_none) / len(self.tcp_none)}
            record["tcp_none_runs"] = self.tcp_none
        record["node_stats"] = self.stats
        return record


def measure_lab(opts: BenchOptions, progress: Progress) -> list[dict[str, Any]]:
    """Build the lab, run ``opts.repeats`` repeats, always remove the lab."""
    from node.bench_lab import BenchLab

    if os.geteuid() != 0:
        raise BenchError(
            "the pps and tcp parts need root (namespaces, iptables, NFQUEUE); "
            "run as root or pass --only engine --only memory"
        )
    repeats = []
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as workdir:
        lab = BenchLab(f"stkb{os.getpid() % 100000}", Path(workdir), pin=opts.pin)
        try:
            progress("building the client -- fw -- server lab ...")
            lab.up()
            for i in range(opts.repeats):
                progress(f"repeat {i + 1}/{opts.repeats}")
                repeats.append(_Repeat(lab, opts, progress).run(i))
        finally:
            lab.down()
    return repeats
