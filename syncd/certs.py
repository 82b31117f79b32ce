"""``stockade certs init``: a cluster CA and one certificate per node.

Writes, in one directory::

    ca.pem  ca.key            the cluster CA (EC P-256, self-signed, CA:TRUE pathlen 0)
    <node>.pem  <node>.key    one per node, signed by the CA
    beacon.key                the cluster's shared key for syncd's UDP liveness
                              beacons (64 hex digits, HMAC-SHA256; syncd.beacon)

A node certificate names its node twice: SAN URI ``stockade://<cluster>/<node>``
(what syncd reads to learn who a peer is, see :mod:`syncd.tls`) and SAN DNS
``<node>`` (what TLS hostname verification checks: dialers set the target
name to the peer's node id).  It is valid for both TLS server and client
authentication because every syncd is both.  Private keys are written mode
0600.  Existing files are never overwritten without ``force``.

Everything here is plain `cryptography` (X.509 as in RFC 5280).
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncd.config import BEACON_KEY_BYTES, BEACON_KEY_FILE, check_cluster_id
from syncd.errors import ConfigError
from syncd.records import check_node_id

URI_SCHEME: Final = "stockade://"
DEFAULT_DAYS: Final = 365
# Certificates start a little in the past so a peer whose clock is behind
# ours does not refuse a certificate made a moment ago.
_BACKDATE: Final = dt.timedelta(minutes=5)


def node_uri(cluster_id: str, node_id: str) -> str:
    """The SAN URI naming ``node_id`` of ``cluster_id`` in its certificate."""
    return f"{URI_SCHEME}{cluster_id}/{node_id}"


@dataclass(frozen=True, slots=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(cluster_id: str, now: dt.datetime, days: int = DEFAULT_DAYS) -> Issued:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"stockade {cluster_id} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def make_node_cert(
    ca: Issued, cluster_id: str, node_id: str, now: dt.datetime, days: int = DEFAULT_DAYS
) -> Issued:
    if not check_node_id(node_id) or not check_cluster_id(cluster_id):
        raise ConfigError(f"bad node id {node_id!r} or cluster id {cluster_id!r}")
    key = _key()
    san = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(node_uri(cluster_id, node_id)), x509.DNSName(node_id)]
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(san, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(key, cert)


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def init_certs(
    directory: str,
    cluster_id: str,
    nodes: Sequence[str],
    *,
    force: bool = False,
    days: int = DEFAULT_DAYS,
    now: dt.datetime | None = None,
) -> list[str]:
    """Create the CA, node certificates and the beacon key in ``directory``; the paths written.

    :class:`ConfigError` for a bad cluster id, node id or validity, or when a
    file exists and ``force`` is false (nothing is written then).
    """
    if not check_cluster_id(cluster_id):
        raise ConfigError(f"cluster id {cluster_id!r} must be 1-64 chars of a-z0-9._-")
    if not nodes or len(set(nodes)) != len(nodes):
        raise ConfigError("give at least one node id, each once")
    for node_id in nodes:
        if not check_node_id(node_id) or node_id == "ca":
            raise ConfigError(f"node id {node_id!r} must be 1-31 chars of a-z, 0-9 and '-'")
    if not 1 <= days <= 36500:
        raise ConfigError(f"validity must be 1..36500 days, not {days}")
    names = ["ca", *nodes]
    paths = [os.path.join(directory, f"{n}.{ext}") for n in names for ext in ("pem", "key")]
    beacon_key = os.path.join(directory, BEACON_KEY_FILE)
    paths.append(beacon_key)
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists; use --force to overwrite")
    when = now or dt.datetime.now(dt.UTC)
    ca = make_ca(cluster_id, when, days)
    issued = {"ca": ca} | {n: make_node_cert(ca, cluster_id, n, when, days) for n in nodes}
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in names:
            _write(os.path.join(directory, f"{name}.key"), _key_pem(issued[name].key), 0o600)
            cert_pem = issued[name].cert.public_bytes(serialization.Encoding.PEM)
            _write(os.path.join(directory, f"{name}.pem"), cert_pem, 0o644)
        # The liveness beacons' shared HMAC key (syncd.beacon): like the node
        # keys, copy it only to the cluster's nodes.
        _write(beacon_key, secrets.token_hex(BEACON_KEY_BYTES).encode() + b"\n", 0o600)
    except OSError as e:
        raise ConfigError(f"{directory}: cannot write certificates: {e.strerror or e}") from None
    return paths


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes, mode: int) -> None:
    # Born with its final mode (no window where a key is world-readable).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)
