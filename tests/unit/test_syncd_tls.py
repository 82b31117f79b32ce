"""`stockade certs init` and the identity checks syncd's mTLS relies on."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from syncd.certs import init_certs, make_ca, make_node_cert, node_uri
from syncd.cli import main as cli_main
from syncd.config import TlsConfig, load_beacon_key
from syncd.errors import ConfigError
from syncd.tls import (
    PeerIdentity,
    channel_options,
    identity_from_auth_context,
    identity_from_cert,
    identity_from_pem,
    load_material,
    server_options,
)

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def certdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    init_certs(str(directory), "prod", ["fw1", "fw2"])
    return directory


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_writes_ca_and_node_files_with_private_keys_0600(certdir: Path) -> None:
    names = sorted(p.name for p in certdir.iterdir())
    assert names == [
        "beacon.key", "ca.key", "ca.pem", "fw1.key", "fw1.pem", "fw2.key", "fw2.pem",
    ]  # fmt: skip
    assert stat.S_IMODE(os.stat(certdir / "beacon.key").st_mode) == 0o600
    assert load_beacon_key(str(certdir / "beacon.key")) != load_beacon_key(
        init_certs(str(certdir / "again"), "prod", ["fw1"])[-1]
    )  # random per cluster
    for key in ("ca.key", "fw1.key", "fw2.key"):
        assert stat.S_IMODE(os.stat(certdir / key).st_mode) == 0o600
        loaded = serialization.load_pem_private_key((certdir / key).read_bytes(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert loaded.curve.name == "secp256r1"


def test_node_certificate_names_the_node_and_is_signed_by_the_ca(certdir: Path) -> None:
    ca, cert = load(certdir / "ca.pem"), load(certdir / "fw1.pem")
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["stockade://prod/fw1"]
    assert san.get_values_for_type(x509.DNSName) == ["fw1"]
    assert identity_from_cert(cert) == PeerIdentity("prod", "fw1")
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365, minutes=10)


def test_init_refuses_to_overwrite_unless_forced(certdir: Path) -> None:
    before = (certdir / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="exists; use --force"):
        init_certs(str(certdir), "prod", ["fw1"])
    assert (certdir / "ca.pem").read_bytes() == before


def test_force_overwrites_and_keeps_keys_private(tmp_path: Path) -> None:
    (tmp_path / "fw1.key").write_text("old")
    os.chmod(tmp_path / "fw1.key", 0o644)
    init_certs(str(tmp_path), "prod", ["fw1"], force=True)
    assert stat.S_IMODE(os.stat(tmp_path / "fw1.key").st_mode) == 0o600
    assert (tmp_path / "fw1.key").read_text().startswith("-----BEGIN PRIVATE KEY")


@pytest.mark.parametrize(
    ("cluster", "nodes", "message"),
    [
        ("Prod", ["fw1"], "cluster id"),
        ("prod", [], "at least one node"),
        ("prod", ["fw1", "fw1"], "each once"),
        ("prod", ["FW1"], "node id"),
        ("prod", ["ca"], "node id"),
    ],
)
def test_init_validates_its_arguments(
    tmp_path: Path, cluster: str, nodes: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        init_certs(str(tmp_path), cluster, nodes)
    assert list(tmp_path.iterdir()) == []


def test_cli_certs_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["certs", "init", "--dir", str(tmp_path), "--cluster", "lab", "--nodes", "a,b"]
    assert cli_main(args) == 0
    assert str(tmp_path / "b.key") in capsys.readouterr().out
    assert cli_main(args) == 2
    assert "exists; use --force" in capsys.readouterr().err
    assert cli_main([*args, "--force"]) == 0


def with_uris(*uris: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(san, critical=False)
    )  # fmt: skip
    return builder.sign(key, hashes.SHA256())


def test_identity_needs_exactly_one_well_formed_stockade_uri() -> None:
    ca = make_ca("prod", NOW)
    good = make_node_cert(ca, "prod", "fw1", NOW)
    assert identity_from_cert(good.cert) == PeerIdentity("prod", "fw1")
    assert identity_from_cert(ca.cert) is None  # no SAN at all
    assert identity_from_cert(with_uris("https://x/y", "stockade://prod/fw3")) == PeerIdentity(
        "prod", "fw3"
    )
    for uris in (
        ("stockade://prod/fw1", "stockade://prod/fw2"),  # ambiguous
        ("stockade://prod",),
        ("stockade://prod/FW1",),
        ("stockade://bad cluster/fw1",),
        ("spiffe://prod/fw1",),
    ):
        assert identity_from_cert(with_uris(*uris)) is None, uris
    assert identity_from_pem(b"not a certificate") is None
    assert node_uri("prod", "fw1") == "stockade://prod/fw1"


def test_identity_from_auth_context() -> None:
    cert = make_node_cert(make_ca("prod", NOW), "prod", "fw2", NOW).cert
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert identity_from_auth_context({"x509_pem_cert": [pem]}) == PeerIdentity("prod", "fw2")
    assert identity_from_auth_context({}) is None  # plaintext or no client certificate
    assert identity_from_auth_context({"x509_pem_cert": [pem, pem]}) is None


def test_load_material_checks_the_certificate_names_this_node(certdir: Path) -> None:
    tls = TlsConfig(str(certdir / "ca.pem"), str(certdir / "fw1.pem"), str(certdir / "fw1.key"))
    material = load_material(tls, "prod", "fw1")
    assert material.cert == (certdir / "fw1.pem").read_bytes()
    with pytest.raises(ConfigError, match="expected stockade://prod/fw2"):
        load_material(tls, "prod", "fw2")
    with pytest.raises(ConfigError, match="expected stockade://lab/fw1"):
        load_material(tls, "lab", "fw1")
    missing = TlsConfig(str(certdir / "nope.pem"), tls.cert, tls.key)
    with pytest.raises(ConfigError, match=r"tls\.ca: .*nope\.pem"):
        load_material(missing, "prod", "fw1")
    not_pem = TlsConfig(str(certdir / "fw1.key"), tls.cert, tls.key)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_material(not_pem, "prod", "fw1")


def test_channel_and_server_options() -> None:
    options = dict(channel_options("fw2", 1 << 20, tls=True))
    assert options["grpc.ssl_target_name_override"] == "fw2"
    assert options["grpc.max_receive_message_length"] == 1 << 20
    assert options["grpc.max_reconnect_backoff_ms"] == 1000
    assert "grpc.ssl_target_name_override" not in dict(channel_options("fw2", 1 << 20, tls=False))
    server = dict(server_options(1 << 20))
    assert server["grpc.so_reuseport"] == 0
    assert server["grpc.max_send_message_length"] == 1 << 20
