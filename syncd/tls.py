"""Mutual TLS between syncd peers: credentials, channel options, peer identity.

Both ends present a certificate from ``stockade certs init`` and accept only
certificates signed by the cluster CA (gRPC's ``require_client_auth`` on the
server, the CA as root on the client).  Who a peer *is* comes from its
certificate alone:

* server side: after the handshake the servicer reads the client's
  certificate from ``context.auth_context()`` (``x509_pem_cert``) and takes
  the node id from its single ``stockade://<cluster>/<node>`` SAN URI
  (:func:`identity_from_auth_context`).  The caller then checks that the
  cluster is ours, that the node is a configured peer and that its Hello
  claims the same node id;
* client side: the channel's ``grpc.ssl_target_name_override`` is the peer's
  node id, so TLS hostname verification (RFC 6125, against the SAN DNS name)
  refuses a server whose certificate names another node.

Library errors (unreadable files, bad PEM) become :class:`ConfigError` here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
from cryptography import x509

from syncd.certs import URI_SCHEME
from syncd.config import TlsConfig, check_cluster_id
from syncd.errors import ConfigError
from syncd.records import check_node_id

# gRPC's own reconnect backoff (default: 1 s initial, 120 s max) would
# dominate ours (50 ms doubling to 1 s): align it.
RECONNECT_OPTIONS: Final = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    cluster_id: str
    node_id: str


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    ca: bytes  # PEM of the cluster CA
    cert: bytes  # PEM of this node's certificate
    key: bytes  # PEM of its private key


def identity_from_cert(cert: x509.Certificate) -> PeerIdentity | None:
    """The (cluster, node) named by the certificate's one stockade:// SAN URI."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    ours = [u[len(URI_SCHEME) :] for u in uris if u.startswith(URI_SCHEME)]
    if len(ours) != 1:
        return None  # none, or ambiguous: trust neither
    cluster_id, sep, node_id = ours[0].partition("/")
    if not sep or not check_cluster_id(cluster_id) or not check_node_id(node_id):
        return None
    return PeerIdentity(cluster_id, node_id)


def identity_from_pem(pem: bytes) -> PeerIdentity | None:
    try:
        return identity_from_cert(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def identity_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> PeerIdentity | None:
    """The peer's identity from a verified gRPC TLS handshake; None without one."""
    pems = list(auth.get("x509_pem_cert", ()))
    if len(pems) != 1:
        return None
    return identity_from_pem(pems[0])


def load_material(tls: TlsConfig, cluster_id: str, node_id: str) -> TlsMaterial:
    """Read the PEM files and check the certificate names this node of this cluster."""
    data = {}
    for name in ("ca", "cert", "key"):
        path = getattr(tls, name)
        try:
            with open(path, "rb") as f:
                data[name] = f.read()
        except OSError as e:
            raise ConfigError(f"tls.{name}: {path}: {e.strerror}") from None
    try:
        x509.load_pem_x509_certificate(data["ca"])
    except ValueError:
        raise ConfigError(f"tls.ca: {tls.ca}: not a PEM certificate") from None
    identity = identity_from_pem(data["cert"])
    if identity != PeerIdentity(cluster_id, node_id):
        raise ConfigError(
            f"tls.cert: {tls.cert} names {identity}, expected stockade://{cluster_id}/{node_id}"
        )
    return TlsMaterial(data["ca"], data["cert"], data["key"])


def server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(material.key, material.cert)],
        root_certificates=material.ca,
        require_client_auth=True,
    )


def channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert,
    )


def message_options(max_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


def server_options(max_bytes: int) -> list[tuple[str, Any]]:
    # No SO_REUSEPORT: a second syncd on the same port must fail, not share it.
    return [*message_options(max_bytes), ("grpc.so_reuseport", 0)]


def channel_options(peer_id: str, max_bytes: int, tls: bool) -> list[tuple[str, Any]]:
    options = [*message_options(max_bytes), *RECONNECT_OPTIONS]
    if tls:
        options.append(("grpc.ssl_target_name_override", peer_id))
    return options
