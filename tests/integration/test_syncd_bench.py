"""Measurements between two real syncd processes on loopback (mTLS).

* throughput: the filter of node fwa sends N creates as fast as it can
  (LocalBatch frames of 500); the clock runs from the first send until
  node fwb's filter has received all N as ReplicaBatch updates;
* latency: creates at a paced rate (one per frame); each one's latency is
  its arrival at fwb's filter minus its send time at fwa's filter (both in
  this process, one monotonic clock);
* resync: fwa holds R flows; fwb is killed (-9) and restarted empty and
  pulls a snapshot of fwa in-band; the time is from fwb's ready line until
  its store holds all R and its pull is done (also its own measure,
  ``peers.fwa.last_resync_seconds``).  fwa is filled up to R first (fwb
  follows, through a snapshot when its outbox overflows) and fwb is only
  killed once it has caught up.

The test runs small sizes and checks completeness; full size (the numbers in
docs/syncd.md) is a command::

    .venv/bin/python -m tests.integration.test_syncd_bench \
        --deltas 100000 --rate 1000 --seconds 5 --resync 1000000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

from syncd._pb.stockade.sync.v1 import local_pb2 as lpb
from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd.local import encode_frame
from syncd.records import record_to_pb
from tests.integration.test_syncd_cluster import Cluster, Daemon, Filter, record, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = 500


def cpu_seconds(d: Daemon) -> float:
    """User + system CPU seconds the syncd process has used so far (Linux /proc).

    Less noisy than the wall clock on a shared machine: reported beside it.
    """
    assert d.proc is not None
    with open(f"/proc/{d.proc.pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(d: Daemon) -> dict[str, float]:
    """CPU seconds per thread name of a syncd process (main loop vs gRPC's, beacon)."""
    assert d.proc is not None
    out: dict[str, float] = {}
    task = f"/proc/{d.proc.pid}/task"
    for tid in os.listdir(task):
        with open(f"{task}/{tid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
        name = "main" if tid == str(d.proc.pid) else text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        out[name] = round(out.get(name, 0.0) + used, 2)
    return out


def sched_seconds(d: Daemon) -> tuple[float, float]:
    """(on a CPU, runnable but waiting for one) seconds, all threads of a syncd so far.

    From /proc/<pid>/task/<tid>/schedstat (ns).  The wait is what a busy
    shared machine adds to every stage of a delta's way, whatever syncd does.
    """
    assert d.proc is not None
    ran = waited = 0
    task = f"/proc/{d.proc.pid}/task"
    for tid in os.listdir(task):
        with open(f"{task}/{tid}/schedstat", encoding="ascii") as f:
            fields = f.read().split()
        ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


def cpu_used(c: Cluster, before: dict[str, float]) -> dict[str, float]:
    return {n: round(cpu_seconds(c[n]) - t, 2) for n, t in before.items()}


# Seconds between the harness's `stats` queries of a syncd being measured:
# each costs the syncd a few ms of its loop (the test cluster's wait_for
# polls every 20 ms, a tenth of a core).
STATS_POLL = 0.1


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(STATS_POLL)


def arrivals(f: Filter, origin: str) -> int:
    return sum(1 for _, u in f.updates if u.record.origin == origin)


def create_frames(node: str, first: int, n: int) -> list[bytes]:
    """LocalBatch frames of BATCH creates each, encoded ahead of the clock.

    The scripted filter is Python too; encoding while the clock runs put its
    cost (about 5 us per record, in a third process on the same two cores)
    into a figure that is about syncd.
    """
    frames = []
    for i in range(first, first + n, BATCH):
        deltas = [
            lpb.LocalDelta(op=pb.OP_CREATE, record=record_to_pb(record(node, j)))
            for j in range(i, min(i + BATCH, first + n))
        ]
        frames.append(encode_frame(lpb.LocalFrame(local=lpb.LocalBatch(deltas=deltas))))
    return frames


def throughput(
    c: Cluster, fa: Filter, fb: Filter, n: int, first: int, spy: str = ""
) -> tuple[float, dict[str, float]]:
    frames = create_frames(fa.node_id, first, n)
    cpu = {name: cpu_seconds(c[name]) for name in ("fwa", "fwb")}
    spies = [_spy(c[name], f"{spy}-{name}.txt") for name in ("fwa", "fwb")] if spy else []
    start = time.monotonic()
    for frame in frames:
        fa.sock.sendall(frame)
    sent = time.monotonic() - start
    wait_for(lambda: arrivals(fb, "fwa") >= n, 120 + n / 1000, "all deltas at fwb's filter")
    took = time.monotonic() - start
    used = cpu_used(c, cpu)
    for proc in spies:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    print(f"throughput: {n} deltas sent in {sent:.2f} s, all applied at fwb in {took:.2f} s"
          f" (syncd CPU s: {used})")  # fmt: skip
    return n / took, used


def latency(fa: Filter, fb: Filter, rate: int, seconds: float, first: int) -> list[float]:
    return latency_at(fa, [fb], rate, seconds, first)[0]


def latency_at(
    fa: Filter, receivers: list[Filter], rate: int, seconds: float, first: int
) -> list[list[float]]:
    """Paced creates at fwa's filter; per receiving filter, each one's latency (sorted)."""
    sent_at: dict[bytes, float] = {}
    before = [len(f.updates) for f in receivers]
    interval = 1.0 / rate
    # The receiving threads stamp arrivals only once they hold the GIL: a
    # short switch interval keeps the sender thread from delaying them.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            rec = record("fwa", first + i)
            sent_at[rec.key] = time.monotonic()
            fa.send([(pb.OP_CREATE, rec)])
        for f, b in zip(receivers, before, strict=True):
            wait_for(lambda f=f, b=b: len(f.updates) - b >= len(sent_at), 60, "paced deltas")
    finally:
        sys.setswitchinterval(switch)
    return [
        sorted(at - sent_at[u.record.key] for at, u in f.updates[b:])
        for f, b in zip(receivers, before, strict=True)
    ]


def summary(lat: list[float]) -> dict[str, float]:
    return {
        "samples": len(lat),
        "p50_ms": round(1000 * statistics.median(lat), 3),
        "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 3),
        "max_ms": round(1000 * lat[-1], 3),
    }


def _receive(path: str, node_id: str, conn: Connection) -> None:
    """A receiving filter in its own process: reports (key, arrival) pairs when told to.

    Own process, so its arrivals are stamped as they happen, not when a
    thread of the sending process gets the GIL (CLOCK_MONOTONIC is shared).
    """
    f = Filter(path, node_id)
    conn.send("ready")
    conn.recv()  # stop
    with f._cond:  # the harness's own lock
        arrivals = [(u.record.key, at) for at, u in f.updates]
    f.close()
    conn.send(arrivals)


def latency_run(nodes: int, rate: int, seconds: float, per_frame: int = 1) -> dict[str, Any]:
    """Latency only: fwa's filter sends at ``rate``; measured at every other node's filter.

    The sender pre-encodes frames of ``per_frame`` deltas (sent every
    ``per_frame / rate`` seconds, as a filter that batches what arrived
    meanwhile) and stamps each just before its send; each receiving filter
    runs in its own process.
    """
    ids = ["fwa", "fwb", "fwc", "fwd", "fwe"][:nodes]
    c = Cluster(ids, {"local_queue": 1 << 20})
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[Any, Connection]] = []
    try:
        c.start()
        fa = c.filter("fwa")
        for n in ids[1:]:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_receive, args=(c[n].local, n, theirs), daemon=True)
            proc.start()
            procs.append((proc, mine))
            assert mine.poll(20) and mine.recv() == "ready"
        for n in ids[1:]:
            wait_for(lambda n=n: c["fwa"].stats()["peers"][n]["state"] == "live", 10, "link up")
        count = int(rate * seconds)
        recs = [record("fwa", i) for i in range(count)]
        frames = [
            encode_frame(lpb.LocalFrame(local=lpb.LocalBatch(deltas=[
                lpb.LocalDelta(op=pb.OP_CREATE, record=record_to_pb(r))
                for r in recs[i : i + per_frame]])))
            for i in range(0, count, per_frame)
        ]  # fmt: skip
        sent_at = [0.0] * count
        sched = {n: sched_seconds(c[n]) for n in ids}
        start = time.monotonic()
        for n, frame in enumerate(frames):
            first = n * per_frame
            delay = start + (first + per_frame - 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            sent_at[first : first + per_frame] = [now] * min(per_frame, count - first)
            fa.sock.sendall(frame)
        wanted = {r.key: i for i, r in enumerate(recs)}
        for n in ids[1:]:
            poll(lambda n=n: c[n].stats()["local"]["replica_updates"] >= count, 60, "all")
        results: dict[str, Any] = {
            "syncd cpu / cpu-wait s": {
                n: [round(b - a, 2) for a, b in zip(sched[n], sched_seconds(c[n]), strict=True)]
                for n in ids
            },
            "load": round(os.getloadavg()[0], 2),
        }
        for n, (_, conn) in zip(ids[1:], procs, strict=True):
            conn.send("stop")
            arrivals = conn.recv()
            lat = sorted(at - sent_at[wanted[k]] for k, at in arrivals if k in wanted)
            assert len(lat) == count, f"{n}: {len(lat)} of {count} arrived"
            results[f"syncd {n} (of {nodes})"] = summary(lat)
        return results
    except BaseException:
        print(c.logs())
        raise
    finally:
        for proc, _ in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        c.close()


def resync(c: Cluster, total: int, spy: str = "") -> dict[str, float]:
    c["fwb"].kill()
    c["fwb"].start()
    ready = time.monotonic()
    cpu = {"fwa": cpu_seconds(c["fwa"]), "fwb": cpu_seconds(c["fwb"])}
    spies = [_spy(c[n], f"{spy}-{n}.txt") for n in ("fwa", "fwb")] if spy else []

    def done() -> bool:
        stats = c["fwb"].stats()
        peer = stats["peers"]["fwa"]
        return bool(stats["store"]["live"] >= total and peer["resyncs"] and not peer["resyncing"])

    poll(done, 600, "fwb pulls fwa's snapshot")
    wall = time.monotonic() - ready
    used = cpu_used(c, cpu)
    for proc in spies:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    inner = c["fwb"].stats()["peers"]["fwa"]["last_resync_seconds"]
    print(f"resync of {total} flows: {wall:.2f} s after ready ({inner:.2f} s in the session;"
          f" syncd CPU s from ready: {used})")  # fmt: skip
    diag = {n: _pull_counters(c[n].stats(), p) for n, p in (("fwa", "fwb"), ("fwb", "fwa"))}
    diag["fwb"]["threads"] = thread_cpu(c["fwb"])
    print(f"  counters: {diag}")
    return {
        "flows": total, "wall_seconds": wall, "session_seconds": inner, "cpu_seconds": used,
        "counters": diag,
    }  # fmt: skip


def _pull_counters(stats: dict[str, Any], peer: str) -> dict[str, Any]:
    """What explains a slow pull: pages served twice, stale replies, streams that ended."""
    link = stats["peers"][peer]
    wanted = ("pages_served", "pages_refused", "stale_dropped", "retransmits", "suspicions")
    return {
        **{k: link["session"].get(k) for k in wanted},
        "stream_ends": link.get("stream_ends"),
        "pages": link["inbox"].get("pages"),
        "loop": stats.get("loop"),
        "anti_entropy": {
            k: (stats.get("anti_entropy") or {}).get(k)
            for k in ("rounds", "rounds_skipped", "rounds_failed", "peer_repairs")
        },
    }


def _spy(d: Daemon, path: str) -> subprocess.Popen[bytes]:
    """py-spy (if installed in the venv) sampling a syncd until SIGINT: a profile."""
    assert d.proc is not None
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    argv = [exe, "record", "-p", str(d.proc.pid), "-f", "raw", "-o", path, "-r", "200"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(
    deltas: int, rate: int, seconds: float, resync_total: int, repeat: int = 1, spy: str = ""
) -> dict[str, Any]:
    capacity = max(262144, 2 * resync_total)
    c = Cluster(["fwa", "fwb"], {"store": {"capacity": capacity}, "local_queue": 1 << 20})
    try:
        c.start()
        fa, fb = c.filter("fwa"), c.filter("fwb")
        wait_for(lambda: c["fwa"].stats()["peers"]["fwb"]["state"] == "live", 10, "link up")
        rate_seen, throughput_cpu = throughput(c, fa, fb, deltas, 0, f"{spy}tp" if spy else "")
        lat = latency(fa, fb, rate, seconds, 10_000_000)
        results: dict[str, Any] = {
            "deltas": deltas, "deltas_per_second": round(rate_seen),
            "throughput_cpu_seconds": throughput_cpu,
            "latency_rate": rate, "latency_samples": len(lat),
            "latency_p50_ms": round(1000 * statistics.median(lat), 2),
            "latency_p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 2),
            "latency_max_ms": round(1000 * lat[-1], 2),
        }  # fmt: skip
        print(f"latency at {rate}/s: p50 {results['latency_p50_ms']} ms, "
              f"p99 {results['latency_p99_ms']} ms")  # fmt: skip
        held = deltas + len(lat)
        if resync_total > held:
            fb.close()  # fwb's filter is not needed for the resync
            start = time.monotonic()
            first, last = 20_000_000, 20_000_000 + resync_total - held
            for i in range(first, last, BATCH):
                c.create(fa, range(i, min(i + BATCH, last)))
            # fwb catches up first (its outbox overflowed: it pulls a snapshot),
            # so the restart below measures a resync from a settled peer.
            poll(lambda: c["fwb"].stats()["store"]["live"] >= resync_total, 900, "top up")
            results["top_up_seconds"] = round(time.monotonic() - start, 1)
        results["resync"] = [
            resync(c, max(resync_total, held), f"{spy}{n}" if spy else "") for n in range(repeat)
        ]
        walls = [r["wall_seconds"] for r in results["resync"]]
        print(f"resync wall seconds: {[round(w, 2) for w in walls]},"
              f" median {statistics.median(walls):.2f}")  # fmt: skip
        return results
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def test_small_bench_completes() -> None:
    results = run(deltas=20_000, rate=500, seconds=1.0, resync_total=50_000)
    assert results["latency_samples"] == 500
    assert results["deltas_per_second"] > 0 and results["latency_p99_ms"] > 0
    assert [r["flows"] for r in results["resync"]] == [50_000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deltas", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--resync", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1,
                        help="restart fwb and time its resync this many times")  # fmt: skip
    parser.add_argument("--spy", default="",
                        help="py-spy profiles of each resync: PREFIX<n>-<node>.txt")  # fmt: skip
    parser.add_argument("--nodes", type=int, default=0, choices=range(2, 6),
                        help="latency only, with this many nodes (fwa sends)")  # fmt: skip
    parser.add_argument("--per-frame", type=int, default=1,
                        help="with --nodes: deltas per local frame")  # fmt: skip
    parser.add_argument("--baseline", choices=["conntrackd"],
                        help="latency only: syncd (2 nodes), then conntrackd")  # fmt: skip
    args = parser.parse_args()
    if args.baseline == "conntrackd":
        from tests.integration import test_syncd_conntrackd as ct

        reason = ct.available()
        if reason is not None:
            raise SystemExit(reason)
        results = latency_run(2, args.rate, args.seconds)
        with ct.conntrackd_pair() as pair:
            results["conntrackd (FTFW, UDP)"] = ct.summary(pair.measure(args.rate, args.seconds))
        results["rate"] = args.rate
    elif args.nodes:
        results = latency_run(args.nodes, args.rate, args.seconds, args.per_frame)
        results["deltas_per_frame"] = args.per_frame
        results["rate"] = args.rate
    else:
        results = run(args.deltas, args.rate, args.seconds, args.resync, args.repeat, args.spy)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
