"""Hostile and misconfigured clients against a running 3-node cluster (real gRPC, mTLS).

Each attempt must be refused with nothing applied, and the good peers must
keep converging.  Refusals in the TLS handshake (no certificate, a foreign
CA, garbage bytes) happen inside gRPC's core, before syncd sees a call: for
those the checks are that the client fails and that syncd's store and
counters did not move.  Refusals after the handshake are counted by reason
in ``stats.service.refused`` or ``stats.peers.<peer>.peer_errors``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from syncd._pb.stockade.sync.v1 import sync_pb2 as pb
from syncd._pb.stockade.sync.v1 import sync_pb2_grpc as rpc
from syncd.certs import init_certs
from syncd.records import record_to_pb
from tests.integration.test_syncd_cluster import CLUSTER, Cluster, Daemon, record, wait_for

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def logs_on_failure(cluster: Cluster) -> Iterator[None]:
    """Print the daemons' logs if the block fails (the module shares one cluster)."""
    try:
        yield
    except BaseException:
        print(cluster.logs())
        raise


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(["fw1", "fw2", "fw3"])
    try:
        c.start()
        for name in ("fw1", "fw2", "fw3"):
            c.create(c.filter(name), range(200))
        wait_for(c.converged, 15, "initial convergence")
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def stub(
    target: Daemon, certdir: str, root_dir: str, name: str | None, server_name: str = "fw3"
) -> tuple[grpc.Channel, Any]:
    """A blocking client to ``target``: trusts ``root_dir``'s CA, presents ``name``'s cert."""
    key = read(os.path.join(certdir, f"{name}.key")) if name else None
    cert = read(os.path.join(certdir, f"{name}.pem")) if name else None
    creds = grpc.ssl_channel_credentials(read(os.path.join(root_dir, "ca.pem")), key, cert)
    options = [("grpc.ssl_target_name_override", server_name)]
    channel = grpc.secure_channel(f"127.0.0.1:{target.port}", creds, options=options)
    return channel, rpc.StateSyncStub(channel)  # type: ignore[no-untyped-call]


def hello(node_id: str, epoch: int = 1, **fields: Any) -> pb.Envelope:
    return pb.Envelope(hello=pb.Hello(
        protocol=1, node_id=node_id, cluster_id=CLUSTER, epoch=epoch, **fields))  # fmt: skip


def exchange(stub_: Any, *envelopes: pb.Envelope) -> tuple[grpc.StatusCode, str, list[Any]]:
    """Send ``envelopes``, keep the stream open, collect replies until the server ends it."""
    replies: list[Any] = []
    call = stub_.Exchange(iter(envelopes), timeout=5)
    try:
        for reply in call:
            replies.append(reply)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", replies
    return grpc.StatusCode.OK, "", replies


def snapshot(stub_: Any, origin: str) -> tuple[grpc.StatusCode, list[Any]]:
    chunks: list[Any] = []
    try:
        for chunk in stub_.Snapshot(pb.SnapshotRequest(origin=origin), timeout=5):
            chunks.append(chunk)
    except grpc.RpcError as e:
        return e.code(), chunks
    return grpc.StatusCode.OK, chunks


class Baseline:
    """fw3's store and service counters before an attempt, to compare after it."""

    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.digest = node.digest()
        self.service = node.stats()["service"]

    def refused_more(self) -> dict[str, int]:
        now = self.node.stats()["service"]["refused"]
        return {k: v - self.service["refused"].get(k, 0) for k, v in now.items()
                if v != self.service["refused"].get(k, 0)}  # fmt: skip

    def unchanged_store(self) -> bool:
        return bool(self.node.digest() == self.digest)


def still_converging(cluster: Cluster, start: int) -> None:
    for name in ("fw1", "fw2"):
        cluster.create(cluster.filters[["fw1", "fw2", "fw3"].index(name)], range(start, start + 50))
    wait_for(cluster.converged, 15, "good peers keep converging")


def test_client_without_a_certificate_fails_the_handshake(cluster: Cluster) -> None:
    base = Baseline(cluster["fw3"])
    channel, s = stub(cluster["fw3"], cluster.certdir, cluster.certdir, None)
    with channel:
        code, _, replies = exchange(s, hello("fw1"))
        assert code is grpc.StatusCode.UNAVAILABLE and replies == []
        assert snapshot(s, "fw3") == (grpc.StatusCode.UNAVAILABLE, [])
    assert base.unchanged_store() and base.refused_more() == {}
    assert cluster["fw3"].stats()["service"]["exchanges"] == base.service["exchanges"]


def test_certificate_of_another_ca_fails_the_handshake(cluster: Cluster) -> None:
    with tempfile.TemporaryDirectory() as other:
        init_certs(other, CLUSTER, ["fw1", "fw2", "fw3"])  # same names, foreign CA
        base = Baseline(cluster["fw3"])
        channel, s = stub(cluster["fw3"], other, cluster.certdir, "fw1")
        with channel:
            code, _, replies = exchange(s, hello("fw1"))
            assert code is grpc.StatusCode.UNAVAILABLE and replies == []
            assert snapshot(s, "fw3")[1] == []
    assert base.unchanged_store() and base.refused_more() == {}


def test_server_with_another_nodes_certificate_is_refused_by_the_client(cluster: Cluster) -> None:
    # fw3 listens with fw3's certificate; a client expecting fw2 there refuses it.
    channel, s = stub(cluster["fw3"], cluster.certdir, cluster.certdir, "fw1", server_name="fw2")
    with channel:
        code, _, replies = exchange(s, hello("fw1"))
    assert code is grpc.StatusCode.UNAVAILABLE and replies == []


def test_another_nodes_certificate_cannot_claim_a_node_id(cluster: Cluster) -> None:
    base = Baseline(cluster["fw3"])
    channel, s = stub(cluster["fw3"], cluster.certdir, cluster.certdir, "fw1")
    with channel:
        code, details, replies = exchange(s, hello("fw2"))
    assert code is grpc.StatusCode.PERMISSION_DENIED, details
    assert "certificate names fw1, Hello claims 'fw2'" in details and replies == []
    assert base.refused_more() == {"identity-mismatch": 1}
    assert base.unchanged_store()


def test_a_non_member_gets_nothing_and_can_inject_nothing(cluster: Cluster) -> None:
    base = Baseline(cluster["fw3"])
    channel, s = stub(cluster["fw3"], cluster.certdir, cluster.certdir, "fw9")  # valid cert
    batch = pb.Batch(origin="fw9", epoch=1, deltas=[pb.Delta(
        op=pb.OP_CREATE, origin="fw9", seq=1, record=record_to_pb(record("fw9", 1)))])  # fmt: skip
    with channel:
        code, details, replies = exchange(s, hello("fw9"), pb.Envelope(batch=batch))
        assert code is grpc.StatusCode.PERMISSION_DENIED and replies == [], details
        assert snapshot(s, "fw3") == (grpc.StatusCode.PERMISSION_DENIED, [])
        assert snapshot(s, "fw9") == (grpc.StatusCode.PERMISSION_DENIED, [])
    assert base.refused_more() == {"not-member": 3}  # one Exchange, two Snapshot calls
    assert base.unchanged_store()


def test_garbage_bytes_on_the_port_are_dropped(cluster: Cluster) -> None:
    base = Baseline(cluster["fw3"])
    for junk in (
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: fw3\r\n\r\n",
        b"\x16\x03\x01" + b"\0" * 600,
    ):
        with socket.create_connection(("127.0.0.1", cluster["fw3"].port), timeout=5) as sock:
            sock.sendall(junk)
            sock.settimeout(5)
            try:
                while sock.recv(65536):
                    pass  # whatever the server answers, it then closes
            except ConnectionResetError:
                pass
    assert base.unchanged_store() and base.refused_more() == {}
    assert cluster["fw3"].stats()["service"]["exchanges"] == base.service["exchanges"]


def test_oversized_message_is_refused(cluster: Cluster) -> None:
    base = Baseline(cluster["fw3"])
    channel, s = stub(cluster["fw3"], cluster.certdir, cluster.certdir, "fw1")
    huge = hello("fw1", seen=[pb.OriginCursor(origin="x" * (5 << 20))])  # over 4 MiB
    with channel:
        code, details, replies = exchange(s, huge)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert replies == []
        request = pb.SnapshotRequest(origin="fw3", cursor=b"c" * (5 << 20))
        with pytest.raises(grpc.RpcError) as caught:
            list(s.Snapshot(request, timeout=5))
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert base.unchanged_store()
    assert cluster["fw3"].stats()["service"]["exchanges"] == base.service["exchanges"]


def test_hostile_delta_closes_the_stream_and_applies_nothing(cluster: Cluster) -> None:
    fw3 = cluster["fw3"]
    base = Baseline(fw3)
    peer = fw3.stats()["peers"]["fw1"]
    epoch, applied = peer["inbox"]["epoch"], peer["inbox"]["applied"]
    errors_before = peer["peer_errors"].get("bad-record", 0)
    good = pb.Delta(op=pb.OP_CREATE, origin="fw1", seq=applied + 1,
                    record=record_to_pb(record("fw1", 999_001)))  # fmt: skip
    bad = pb.Delta(op=pb.OP_CREATE, origin="fw1", seq=applied + 2,
                   record=record_to_pb(record("fw1", 999_002)))  # fmt: skip
    bad.record.orig_src = b"\x01\x02"  # an IPv4 address of two bytes
    batch = pb.Batch(origin="fw1", epoch=epoch, deltas=[good, bad])
    # fw1's own certificate (as if fw1 were compromised): admitted, then caught.
    channel, s = stub(fw3, cluster.certdir, cluster.certdir, "fw1")
    with channel, logs_on_failure(cluster):
        code, details, _ = exchange(s, hello("fw1", epoch=epoch), pb.Envelope(batch=batch))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("peer-error: bad-record")
    assert fw3.stats()["peers"]["fw1"]["peer_errors"]["bad-record"] == errors_before + 1
    keys = fw3.keys("fw1")
    assert record("fw1", 999_001).key.hex() not in keys  # not even the good half
    assert base.unchanged_store()
    # The real fw1 was displaced by that stream; it redials and sync goes on.
    still_converging(cluster, 10_000)
    assert fw3.stats()["peers"]["fw1"]["state"] == "live"


def test_good_peers_kept_converging_throughout(cluster: Cluster) -> None:
    still_converging(cluster, 20_000)
    cluster.assert_same_content()
    for name in ("fw1", "fw2", "fw3"):
        stats = cluster[name].stats()
        assert {p: s["state"] for p, s in stats["peers"].items()} == {
            p: "live" for p in ("fw1", "fw2", "fw3") if p != name
        }
