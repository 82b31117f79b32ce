"""pytest fixtures that run a real etcd on loopback (``cluster.etcd_server``).

Load them in a test module with ``pytest_plugins = ["tests.etcd_fixture"]``
(no conftest change needed; importing the names instead trips ruff's F811).

* ``etcd_server`` -- one :class:`LocalEtcd` per test module, stopped and its
  data removed at the end.
* ``etcd`` -- that server's ``host:port`` endpoint.
* ``private_etcd`` -- a fresh etcd for one test, for tests that kill it.
* ``cluster_id`` -- a cluster id unique to the test, so tests sharing one etcd
  never see each other's keys.

All skip with a clear reason when ``/usr/bin/etcd`` is missing.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from cluster.etcd_server import ETCD_BINARY, LocalEtcd

_ids = itertools.count(1)


def _require_etcd() -> None:
    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.skip(f"{ETCD_BINARY} missing: apt-get install etcd-server (./dev.sh setup)")


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[LocalEtcd]:
    _require_etcd()
    server = LocalEtcd(name="stockade-test")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd(etcd_server: LocalEtcd) -> str:
    return etcd_server.endpoint


@pytest.fixture
def private_etcd() -> Iterator[LocalEtcd]:
    _require_etcd()
    server = LocalEtcd(name="stockade-private")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_id() -> str:
    return f"test-{os.getpid()}-{next(_ids)}"
