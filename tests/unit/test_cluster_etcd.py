"""The etcd adapter's pure parts: config validation, key layout, error translation."""

from __future__ import annotations

import json
import sys

import aetcd
import grpc
import pytest

from cluster.errors import (
    BadInput,
    BadRecord,
    EtcdRejected,
    EtcdUnavailable,
    LeaseLost,
    Misuse,
)
from cluster.etcd import EtcdConfig, EtcdStore, Keys, StoredRuleset
from cluster.etcd_server import LocalEtcd, free_port


@pytest.mark.parametrize(
    "kwargs",
    [
        {"endpoint": "localhost"},
        {"endpoint": ":2379"},
        {"endpoint": "h:0"},
        {"endpoint": "h:x"},
        {"endpoint": "h:1", "timeout": 0},
        {"endpoint": "h:1", "lease_ttl": 0},
        {"endpoint": "h:1", "lease_ttl": True},
        {"endpoint": "h:1", "lease_ttl": 2, "keepalive_interval": 2.0},
        {"endpoint": "h:1", "register_wait": -1.0},
    ],
)
def test_invalid_config_is_bad_input(kwargs: dict[str, object]) -> None:
    with pytest.raises(BadInput):
        EtcdConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = EtcdConfig("[::1]:2379")
    assert config.host_port == ("::1", 2379)
    assert config.keepalive_every == pytest.approx(1 / 3)
    assert EtcdConfig("h:1", lease_ttl=3, keepalive_interval=0.5).keepalive_every == 0.5


def test_key_layout() -> None:
    keys = Keys("lab")
    assert keys.member("fw-1") == b"/stockade/lab/members/fw-1"
    assert keys.epoch("fw-1") == b"/stockade/lab/epochs/fw-1"
    assert keys.vip("2001:db8::1") == b"/stockade/lab/vips/2001:db8::1"
    assert keys.rule(12) == b"/stockade/lab/rules/0000000012"
    assert keys.rules_current == b"/stockade/lab/rules/current"
    # Zero padding makes etcd's key order the revision order.
    assert keys.rule(9) < keys.rule(10) < keys.rules_current
    with pytest.raises(Misuse):
        keys.vip("10.0.0.01")
    with pytest.raises(BadInput):
        Keys("a/b")


def test_stored_ruleset_round_trip_and_validation() -> None:
    stored = StoredRuleset(3, "default: drop\n", 1700000000.5, "first")
    assert StoredRuleset.from_json(3, stored.to_json()) == stored
    assert len(stored.sha256) == 64
    for bad in (b"{", b"[]", json.dumps({"text": 1, "stored_at": 0, "comment": ""}).encode()):
        with pytest.raises(BadRecord):
            StoredRuleset.from_json(1, bad)
    body = {"text": "", "stored_at": True, "comment": ""}
    with pytest.raises(BadRecord):
        StoredRuleset.from_json(1, json.dumps(body).encode())


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, empty, empty, details)


def wrapped(error: grpc.aio.AioRpcError, kind: type[Exception]) -> Exception:
    """What aetcd raises: its own class, caused by the grpc error."""
    exc = kind(error.details())
    exc.__cause__ = error
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TimeoutError(), EtcdUnavailable),
        (aetcd.ConnectionFailedError("refused"), EtcdUnavailable),
        (aetcd.ConnectionTimeoutError("deadline"), EtcdUnavailable),
        (aetcd.WatchTimeoutError(), EtcdUnavailable),
        (rpc_error(grpc.StatusCode.UNAVAILABLE, "down"), EtcdUnavailable),
        (rpc_error(grpc.StatusCode.CANCELLED, "closed"), EtcdUnavailable),
        (
            wrapped(
                rpc_error(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"),
                aetcd.ClientError,
            ),
            LeaseLost,
        ),
        (
            wrapped(
                rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core"),
                aetcd.InternalError,
            ),
            EtcdUnavailable,
        ),
        (
            wrapped(
                rpc_error(grpc.StatusCode.INTERNAL, "etcdserver: corrupt cluster"),
                aetcd.InternalError,
            ),
            EtcdRejected,
        ),
        (aetcd.InvalidArgumentError("too large"), EtcdRejected),
        (aetcd.RevisionCompactedError(5), EtcdRejected),
        (rpc_error(grpc.StatusCode.PERMISSION_DENIED, "no"), EtcdRejected),
    ],
)
def test_library_errors_translate_once(exc: Exception, expected: type[Exception]) -> None:
    store = EtcdStore(EtcdConfig("127.0.0.1:1"), "lab")
    error = store._translate("op", exc)
    assert type(error) is expected
    assert error.endpoint == "127.0.0.1:1" and "op" in str(error)
    stats = store.statistics().health
    assert (stats.failures, stats.successes) == ((1, 0) if expected is EtcdUnavailable else (0, 1))


def test_other_exceptions_are_bugs_and_propagate() -> None:
    store = EtcdStore(EtcdConfig("127.0.0.1:1"), "lab")
    with pytest.raises(KeyError):
        store._translate("op", KeyError("x"))


def test_local_etcd_reports_a_binary_that_exits_at_start(tmp_path) -> None:
    server = LocalEtcd(tmp_path, binary=sys.executable, start_timeout=5.0)  # rejects etcd flags
    with pytest.raises(EtcdUnavailable, match="exited at start"):
        server.start()
    assert server.pid is None
    server.stop()
    assert not server.data_dir.exists()
    assert tmp_path.exists()  # a given parent directory is not ours to remove


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
