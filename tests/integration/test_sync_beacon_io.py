"""Beacon services over real UDP on 127.0.0.1 (syncd.beacon_io); no root, no namespaces.

Three services hear each other; a stopped one, and one whose owner's loop
stops calling ``loop_alive``, go stale at the others; hostile datagrams are
counted and never accepted; a peer the socket cannot reach is a counted send
error that does not disturb the rest.  Timing assertions are generous: the
machine running this may be loaded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from syncd.beacon import Beacon, decode_beacon, encode_beacon
from syncd.beacon_io import BeaconService
from syncd.errors import ConfigError, Misuse

pytestmark = pytest.mark.integration

KEY = b"integration-secret"
NODES = ("fw1", "fw2", "fw3")
ALIVE_WITHIN = 0.3
TICK = 0.02  # how often the simulated owner loops call loop_alive
SOON = 1.0  # generous bound for anything that should take ~10-50 ms


def wait_for(what: str, condition: Callable[[], bool], timeout: float = SOON) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def loopback_service(
    node: str, interval: float = 0.01, alive_within: float = ALIVE_WITHIN
) -> BeaconService:
    """A keyed service of cluster "prod" on 127.0.0.1, port chosen by the kernel."""
    return BeaconService(cluster_id="prod", node_id=node, epoch=1, bind=("127.0.0.1", 0),
                         key=KEY, interval=interval, alive_within=alive_within)  # fmt: skip


class Trio:
    """Three started services, each peering with the other two, and their owners' loops."""

    def __init__(self) -> None:
        self.services = {n: loopback_service(n) for n in NODES}
        self.alive = set(NODES)  # whose owner loop is running
        self._stop = threading.Event()
        self._owners = threading.Thread(target=self._owner_loops, daemon=True)

    def start(self) -> None:
        for s in self.services.values():
            s.start()
        for s in self.services.values():
            s.set_peers(self.addresses())
        self._owners.start()

    def addresses(self) -> dict[str, tuple[str, int]]:
        return {n: s.address for n, s in self.services.items()}

    def _owner_loops(self) -> None:
        while not self._stop.wait(TICK):
            for n in list(self.alive):
                self.services[n].loop_alive(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        if self._owners.is_alive():
            self._owners.join()
        for s in self.services.values():
            s.stop()

    def heard(self, listener: str, speaker: str) -> float:
        return self.services[listener].heard().get(speaker, -1.0)

    def is_fresh(self, listener: str, speaker: str, within: float = 0.2) -> bool:
        return time.monotonic() - self.heard(listener, speaker) < within


@pytest.fixture
def trio() -> Iterator[Trio]:
    t = Trio()
    try:
        t.start()
        yield t
    finally:
        t.close()


def test_everyone_hears_everyone(trio: Trio) -> None:
    def everyone_heard() -> bool:
        return all(set(s.heard()) == set(NODES) - {n} for n, s in trio.services.items())

    wait_for("each service hears the other two", everyone_heard, timeout=0.5 + SOON)
    time.sleep(0.3)
    for n, s in trio.services.items():
        stats = s.statistics()
        assert stats.thread_errors == 0
        assert stats.send_errors == {}
        assert stats.suppressed == 0
        assert stats.sent >= 2 * 10  # 2 peers, 100 rounds/s: at least a few rounds each
        # Only unknown_peer, and only at start-up: fw1 beacons to fw2 before fw2 has peers.
        assert drops(s).keys() <= {"unknown_peer"}, (n, drops(s))
        for peer in set(NODES) - {n}:
            assert trio.is_fresh(n, peer)
            assert stats.beacons.peers[peer].epoch == 1


def test_a_stopped_service_goes_stale_and_the_rest_keep_going(trio: Trio) -> None:
    wait_for("fw1 hears fw3", lambda: trio.heard("fw1", "fw3") > 0)
    trio.services["fw3"].stop()
    trio.services["fw3"].stop()  # idempotent
    stopped_at = time.monotonic()
    time.sleep(0.3)
    last_fw3 = trio.heard("fw1", "fw3")
    assert last_fw3 <= stopped_at + 0.05  # nothing from fw3 since (a datagram in flight at most)
    assert trio.heard("fw2", "fw3") <= stopped_at + 0.05
    assert trio.is_fresh("fw1", "fw2") and trio.is_fresh("fw2", "fw1")
    time.sleep(0.1)
    assert trio.heard("fw1", "fw3") == last_fw3


def test_a_stuck_owner_loop_suppresses_sending_until_it_runs_again(trio: Trio) -> None:
    wait_for("fw1 hears fw3", lambda: trio.is_fresh("fw1", "fw3"))
    trio.alive.discard("fw3")
    stuck_at = time.monotonic()
    wait_for(
        "fw1 and fw2 stop hearing fw3",
        lambda: not trio.is_fresh("fw1", "fw3") and not trio.is_fresh("fw2", "fw3"),
        timeout=ALIVE_WITHIN + SOON,
    )
    # It kept sending for about alive_within after the last loop_alive, not much longer.
    assert trio.heard("fw1", "fw3") - stuck_at < ALIVE_WITHIN + 0.2
    suppressed = trio.services["fw3"].statistics().suppressed
    assert suppressed > 0
    # Still listening while it does not send.
    assert trio.is_fresh("fw3", "fw1") and trio.is_fresh("fw3", "fw2")
    # The others kept hearing each other throughout.
    assert trio.is_fresh("fw1", "fw2") and trio.is_fresh("fw2", "fw1")
    trio.alive.add("fw3")
    wait_for("fw1 hears fw3 again", lambda: trio.is_fresh("fw1", "fw3", within=0.1))
    wait_for("fw2 hears fw3 again", lambda: trio.is_fresh("fw2", "fw3", within=0.1))
    time.sleep(0.1)
    assert trio.services["fw3"].statistics().suppressed - suppressed < ALIVE_WITHIN / 0.01 + 10


def test_the_round_hook_runs_while_beacons_go_out_and_stops_with_them(trio: Trio) -> None:
    # The agent keeps its ARP guard open from this hook: it must live exactly
    # as long as the peers hear us.
    rounds: list[float] = []
    trio.services["fw3"].on_round(lambda: rounds.append(time.monotonic()))
    wait_for("rounds", lambda: len(rounds) > 10)
    trio.alive.discard("fw3")
    stuck_at = time.monotonic()
    wait_for("fw1 stops hearing fw3", lambda: not trio.is_fresh("fw1", "fw3"), ALIVE_WITHIN + SOON)
    assert rounds[-1] - stuck_at < ALIVE_WITHIN + 0.2  # stopped with the beacons
    quiet = len(rounds)
    time.sleep(0.1)
    assert len(rounds) == quiet
    trio.alive.add("fw3")
    wait_for("rounds again", lambda: len(rounds) > quiet)
    trio.services["fw3"].on_round(None)


def test_a_revocation_notice_reaches_only_its_peer_and_fires_once_per_epoch(trio: Trio) -> None:
    fired: list[tuple[str, str, int]] = []
    for name, service in trio.services.items():
        service.on_revoked(lambda peer, epoch, me=name: fired.append((me, peer, epoch)))
    trio.services["fw3"].set_own_epoch(4)
    trio.services["fw2"].set_own_epoch(4)  # same number, but fw1 revokes only fw3
    trio.services["fw1"].set_notices({"fw3": 3})  # an older incarnation of fw3: no effect
    time.sleep(0.1)
    assert fired == []
    trio.services["fw1"].set_notices({"fw3": 4})
    # The revocation drops fw3 from fw1's peers at once: the notice still goes.
    trio.services["fw1"].set_peers({"fw2": trio.addresses()["fw2"]})
    wait_for("fw3 hears that fw1 revoked it", lambda: bool(fired))
    time.sleep(0.1)  # ten more notices arrive: still one call
    assert fired == [("fw3", "fw1", 4)]
    assert trio.services["fw3"].statistics().revoked_heard == 1
    assert trio.services["fw2"].statistics().revoked_heard == 0
    trio.services["fw3"].set_own_epoch(5)  # it registered again
    time.sleep(0.1)
    assert len(fired) == 1
    trio.services["fw1"].set_notices({"fw3": 5})
    wait_for("the new incarnation's revocation is heard too", lambda: len(fired) == 2)
    with pytest.raises(Misuse):
        trio.services["fw1"].set_notices({"fw3": 0})


def test_hostile_datagrams_are_counted_and_never_accepted(trio: Trio) -> None:
    fw1, fw2 = trio.services["fw1"], trio.services["fw2"]
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as spy:
        spy.bind(("127.0.0.1", 0))
        spy.settimeout(SOON)
        # fw2 also beacons to the spy, which captures one of its (genuine) beacons.
        fw2.set_peers(trio.addresses() | {"spy": spy.getsockname()})
        captured = spy.recv(2048)
        assert decode_beacon(captured, KEY).node_id == "fw2"
        # fw1 gets the same beacon as the spy; two more accepted ones are certainly later.
        received = fw1.statistics().beacons.peers["fw2"].received
        wait_for(
            "fw1 accepted a later fw2 beacon",
            lambda: fw1.statistics().beacons.peers["fw2"].received >= received + 2,
        )
        baseline = drops(fw1)

        forged = Beacon("prod", "fw2", 1, 2**63)  # accepted, it would mute fw2 for good
        other_cluster = Beacon("staging", "fw2", 1, 2**63)
        for data in (
            b"garbage",
            captured[:-1],
            encode_beacon(forged, b"wrong-key"),
            encode_beacon(forged, None),
            encode_beacon(other_cluster, KEY),  # signed with our key, wrong cluster
            captured,  # replayed
        ):
            spy.sendto(data, fw1.address)

        want = {"malformed": 2, "mac": 2, "cluster": 1, "replay": 1}
        wait_for("fw1 counted every drop", lambda: new_drops(fw1, baseline) == want)
        before = trio.heard("fw1", "fw2")
        # Had the forged or replayed beacon been accepted, fw2's real ones would be replays now.
        wait_for("fw1 still hears fw2", lambda: trio.heard("fw1", "fw2") > before)
        assert new_drops(fw1, baseline) == want


def drops(service: BeaconService) -> dict[str, int]:
    return {r: n for r, n in service.statistics().beacons.dropped.items() if n}


def new_drops(service: BeaconService, baseline: dict[str, int]) -> dict[str, int]:
    now = drops(service)
    return {r: n - baseline.get(r, 0) for r, n in now.items() if n != baseline.get(r, 0)}


def test_a_peer_of_the_wrong_family_is_a_counted_send_error(trio: Trio) -> None:
    fw1 = trio.services["fw1"]
    fw1.set_peers(trio.addresses() | {"fw9": ("::1", 7400)})
    wait_for(
        "EAFNOSUPPORT counted",
        lambda: fw1.statistics().send_errors.get("EAFNOSUPPORT", 0) >= 5,
    )
    wait_for("fw2 still hears fw1", lambda: trio.is_fresh("fw2", "fw1", within=0.1))
    wait_for("fw3 still hears fw1", lambda: trio.is_fresh("fw3", "fw1", within=0.1))
    stats = fw1.statistics()
    assert set(stats.send_errors) == {"EAFNOSUPPORT"}
    assert stats.thread_errors == 0
    assert stats.beacons.peers["fw9"].received == 0


def test_bind_failure_is_a_config_error() -> None:
    first = BeaconService(cluster_id="prod", node_id="fw1", epoch=1, bind=("127.0.0.1", 0), key=KEY)
    first.start()
    try:
        host, port = first.address
        second = BeaconService(
            cluster_id="prod", node_id="fw2", epoch=1, bind=(host, port), key=KEY
        )
        with pytest.raises(ConfigError, match=f"cannot bind udp 127.0.0.1:{port}"):
            second.start()
        second.stop()  # stopping a service that never started is harmless
        with pytest.raises(Misuse):
            first.start()  # a service starts once
    finally:
        first.stop()
    assert first.address == (host, port)  # still readable after stop


def test_ipv6_loopback_pair() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    a, b = (
        BeaconService(cluster_id="prod", node_id=n, epoch=3, bind=("::1", 0), key=None)
        for n in ("fw1", "fw2")
    )
    try:
        try:
            a.start()
        except ConfigError as e:
            pytest.skip(f"no IPv6 loopback: {e}")
        b.start()
        a.set_peers({"fw2": b.address})
        b.set_peers({"fw1": a.address})
        wait_for(
            "fw1 and fw2 hear each other over ::1",
            lambda: "fw2" in a.heard() and "fw1" in b.heard(),
        )
    finally:
        a.stop()
        b.stop()


def test_the_thread_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def flaky_clock() -> float:
        # Fails for a stretch of calls once the service runs, then recovers.
        nonlocal calls
        calls += 1
        if 20 <= calls < 25:
            raise RuntimeError("clock broke")
        return time.monotonic()

    flaky = BeaconService(
        cluster_id="prod",
        node_id="fw1",
        epoch=1,
        bind=("127.0.0.1", 0),
        key=KEY,
        clock=flaky_clock,
    )
    listener = BeaconService(
        cluster_id="prod", node_id="fw2", epoch=1, bind=("127.0.0.1", 0), key=KEY
    )
    try:
        flaky.start()
        listener.start()
        flaky.set_peers({"fw2": listener.address})
        listener.set_peers({"fw1": flaky.address})
        wait_for("the clock broke", lambda: calls >= 25)
        flaky.loop_alive(time.monotonic())
        after = time.monotonic()
        wait_for("fw2 hears fw1 after the errors", lambda: listener.heard().get("fw1", 0) > after)
        stats = flaky.statistics()
        assert stats.thread_errors == 5
        assert stats.running
        assert "clock broke" in caplog.text  # the first one is logged with its traceback
    finally:
        flaky.stop()
        listener.stop()
    assert not flaky.statistics().running


def test_a_fresh_notice_goes_at_once_not_at_the_next_round() -> None:
    """Rounds every 2 s here: a new revocation must still arrive within ms."""
    pair = {n: loopback_service(n, interval=2.0, alive_within=60.0) for n in ("fw1", "fw2")}
    fired = threading.Event()
    try:
        for s in pair.values():
            s.start()
        addresses = {n: s.address for n, s in pair.items()}
        for s in pair.values():
            s.set_peers(addresses)
        pair["fw2"].set_own_epoch(7)
        pair["fw2"].on_revoked(lambda peer, epoch: fired.set())
        time.sleep(0.2)  # the first rounds went; the next is ~1.8 s away
        started = time.monotonic()
        pair["fw1"].set_notices({"fw2": 7})
        assert fired.wait(SOON), "the notice waited for the next round"
        assert time.monotonic() - started < SOON
        time.sleep(0.1)  # fw1 counts its round after the sends: fw2 may have fired first
        rounds = pair["fw1"].statistics().rounds
        pair["fw1"].set_notices({"fw2": 7})  # the same notice again: no extra round
        time.sleep(0.2)
        assert pair["fw1"].statistics().rounds == rounds
    finally:
        for s in pair.values():
            s.stop()
