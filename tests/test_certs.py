"""`deploy.certs`: CA, SuperLink certificate and site keys on real files, checked with `cryptography` (and openssl)."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedslide.common.cli_support import EXIT_USAGE
from fedslide.deploy import certs

UTC = dt.timezone.utc


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> certs.Material:
    out = tmp_path_factory.mktemp("certs") / "out"
    return certs.make_all(out, ["site-1", "site_2"], ["fl.example.org", "localhost"], ["10.0.0.5"], days=30)


def test_ca_is_a_ca(material: certs.Material) -> None:
    ca = _cert(material.ca.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"


def test_server_cert_sans_eku_window(material: certs.Material) -> None:
    cert, ca = _cert(material.server.cert), _cert(material.ca.cert)
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    ips = {ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1")}
    assert set(sans.get_values_for_type(x509.IPAddress)) == ips
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = dt.datetime.now(UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    key = serialization.load_pem_private_key(material.server.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_loopback_always_added_and_dns_only(tmp_path: Path) -> None:
    ca = certs.make_ca(tmp_path)
    paths = certs.make_server_cert(tmp_path, ca, ["fl.example.org"], [])
    sans = _cert(paths.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def _handshake(material: certs.Material, host: str) -> dict:
    """TLS handshake over a socket pair, client trusting only ca.crt with strict X.509 checks; the peer cert."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(material.server.cert, material.server.key)
    client_ctx = ssl.create_default_context(cafile=str(material.ca.cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    a, b = socket.socketpair()
    with a, b, ThreadPoolExecutor(1) as pool:
        served = pool.submit(server_ctx.wrap_socket, a, server_side=True)
        try:
            with client_ctx.wrap_socket(b, server_hostname=host) as tls:
                served.result(timeout=10).close()
                return tls.getpeercert()
        finally:
            b.close()  # a failed client handshake must not leave the server side waiting


@pytest.mark.parametrize("host", ["127.0.0.1", "fl.example.org", "localhost"])
def test_tls_handshake_for_each_san(material: certs.Material, host: str) -> None:
    assert _handshake(material, host)["subject"]


def test_tls_handshake_rejects_other_host(material: certs.Material) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(material, "other.example.org")


def test_grpc_channel_on_loopback(tmp_path: Path) -> None:
    """gRPC (Flower's transport) reaches a server on 127.0.0.1 with a certificate asked for by DNS name only."""
    m = certs.make_all(tmp_path, ["s1"], dns_names=["fl.example.org"], ip_addresses=[])
    server = grpc.server(ThreadPoolExecutor(1))
    creds = grpc.ssl_server_credentials([(m.server.key.read_bytes(), m.server.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(m.ca.cert.read_bytes())) as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
    finally:
        server.stop(0)


def test_expired_server_cert(tmp_path: Path) -> None:
    ca = certs.make_ca(tmp_path)
    now = dt.datetime.now(UTC)
    start, end = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
    paths = certs.make_server_cert(tmp_path, ca, ["localhost"], [], not_valid_before=start, not_valid_after=end)
    cert = _cert(paths.cert)
    cert.verify_directly_issued_by(_cert(ca.cert))
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc == start.replace(microsecond=0)


def test_site_keys_p384_openssh_matching(material: certs.Material) -> None:
    assert set(material.sites) == {"site-1", "site_2"}
    for paths in material.sites.values():
        assert paths.key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(paths.key.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(paths.cert.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert private.curve.name == public.curve.name == "secp384r1"
        assert private.public_key() == public
    keys = [p.key.read_bytes() for p in material.sites.values()]
    assert keys[0] != keys[1]


def test_private_keys_0600_public_files_not(material: certs.Material) -> None:
    private = [material.ca.key, material.server.key, *(p.key for p in material.sites.values())]
    public = [material.ca.cert, material.server.cert, *(p.cert for p in material.sites.values())]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    umask = os.umask(0o022)
    os.umask(umask)
    for path in public:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask, path
    assert not [p.name for p in material.out_dir.iterdir() if p.name.endswith(".tmp")]


def test_second_run_refused_then_forced(tmp_path: Path) -> None:
    certs.make_all(tmp_path, ["a", "b"])
    before = _snapshot(tmp_path)
    with pytest.raises(certs.RefusedOverwrite, match="use --force") as info:
        certs.make_all(tmp_path, ["a", "b"])
    assert isinstance(info.value, FileExistsError) and "a.pub" in str(info.value)
    for call in (
        lambda: certs.make_ca(tmp_path),
        lambda: certs.make_server_cert(tmp_path, certs.load_ca(tmp_path), ["localhost"], []),
        lambda: certs.make_site_keys(tmp_path, ["b", "c"]),
    ):
        with pytest.raises(certs.RefusedOverwrite, match="use --force"):
            call()
    assert _snapshot(tmp_path) == before  # refusals wrote nothing, not even "c"

    certs.make_all(tmp_path, ["a", "b"], force=True)
    after = _snapshot(tmp_path)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_adding_a_site_reuses_ca_and_server(tmp_path: Path) -> None:
    first = certs.make_all(tmp_path, ["a"])
    before = _snapshot(tmp_path)
    second = certs.make_all(tmp_path, ["b"])
    assert second.reused_ca and second.reused_server and not first.reused_ca
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before and {"b.key", "b.pub"} <= after.keys()
    with pytest.raises(certs.RefusedOverwrite, match="server.pem"):  # other SANs would need a new server cert
        certs.make_all(tmp_path, ["c"], dns_names=["fl.example.org"])
    assert _snapshot(tmp_path) == after


@pytest.mark.parametrize("bad", ["site 1", "../evil", "", "ca", "site.1", "sité", "x" * 65])
def test_bad_site_name_refused_nothing_written(tmp_path: Path, bad: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(certs.InvalidInput, match="site name") as info:
        certs.make_all(out, ["ok", bad])
    assert repr(bad) in str(info.value) or bad == ""
    assert "letters, digits" in str(info.value) or "reserved" in str(info.value)
    assert not out.exists()


def test_bad_ip_and_duplicates_refused(tmp_path: Path) -> None:
    with pytest.raises(certs.InvalidInput, match="'10.0.0.300'"):
        certs.make_all(tmp_path, ["a"], ip_addresses=["10.0.0.300"])
    with pytest.raises(certs.InvalidInput, match="more than once"):
        certs.make_all(tmp_path, ["a", "a"])
    assert list(tmp_path.iterdir()) == []


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedslide")
    certs.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    args = _cli(["certs", "--out", str(out), "--sites", "hospital-a", "hospital-b", "--dns", "fl.example.org"])
    assert args.handler(args) == 0
    text = capsys.readouterr().out
    for site in ("hospital-a", "hospital-b"):
        assert f"flwr supernode register {site}.pub" in text and f"{site}.key" in text
    assert "ca.crt" in text and "server.pem" in text and "Never copy ca.key" in text
    sites = {f"hospital-{x}.{ext}" for x in "ab" for ext in ("key", "pub")}
    assert {p.name for p in out.iterdir()} == {"ca.crt", "ca.key", "server.pem", "server.key", *sites}

    args = _cli(["certs", "--out", str(out), "--sites", "hospital-a"])
    assert args.handler(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "hospital-a" in err and "use --force" in err and "\n" not in err

    args = _cli(["certs", "--out", str(tmp_path / "other"), "--sites", "bad/name"])
    assert args.handler(args) == EXIT_USAGE
    assert "'bad/name'" in capsys.readouterr().err and not (tmp_path / "other").exists()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not on PATH: cross-check with openssl skipped")
def test_openssl_verifies_server_cert(material: certs.Material) -> None:
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(material.ca.cert), str(material.server.cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and ": OK" in done.stdout, done.stdout + done.stderr


def test_renew_server_reuses_the_ca_and_keeps_site_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = certs.make_ca(tmp_path)
    now = dt.datetime.now(UTC)
    certs.make_server_cert(
        tmp_path, ca, ["localhost"], [], not_valid_before=now - dt.timedelta(days=10), not_valid_after=now
    )  # expired
    certs.make_site_keys(tmp_path, ["a"])
    before = _snapshot(tmp_path)
    args = _cli(["certs", "--out", str(tmp_path), "--renew-server", "--dns", "fl.example.org", "--days", "90"])
    assert args.handler(args) == 0
    assert "renewed" in capsys.readouterr().out
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in ("ca.crt", "ca.key", "a.key", "a.pub")} == {
        k: before[k] for k in ("ca.crt", "ca.key", "a.key", "a.pub")
    }
    assert after["server.pem"] != before["server.pem"] and after["server.key"] != before["server.key"]
    cert = _cert(tmp_path / "server.pem")
    cert.verify_directly_issued_by(_cert(ca.cert))
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=90)
    assert cert.not_valid_after_utc > now
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600


def test_renew_server_without_a_ca_or_with_sites_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli(["certs", "--out", str(tmp_path / "none"), "--renew-server"])
    assert args.handler(args) == EXIT_USAGE
    assert "reuses the CA" in capsys.readouterr().err and not (tmp_path / "none").exists()
    certs.make_all(tmp_path, ["a"])
    args = _cli(["certs", "--out", str(tmp_path), "--renew-server", "--sites", "b"])
    assert args.handler(args) == EXIT_USAGE
    assert "leave out --sites" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --force and --renew-server exclude each other
        _cli(["certs", "--out", str(tmp_path), "--renew-server", "--force"])


@pytest.mark.parametrize("days", [0, certs.SERVER_MAX_DAYS + 1, 3650])
def test_server_days_are_capped(tmp_path: Path, days: int, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(certs.InvalidInput, match=f"1 to {certs.SERVER_MAX_DAYS} days"):
        certs.make_all(tmp_path / "out", ["a"], days=days)
    assert not (tmp_path / "out").exists()
    args = _cli(["certs", "--out", str(tmp_path / "cli"), "--sites", "a", "--days", str(days)])
    assert args.handler(args) == EXIT_USAGE
    assert f"--days {days}" in capsys.readouterr().err


def test_force_says_that_it_replaced_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs.make_all(tmp_path, ["a"])
    args = _cli(["certs", "--out", str(tmp_path), "--sites", "a", "--force"])
    assert args.handler(args) == 0
    captured = capsys.readouterr()
    assert "new CA" in captured.err and "every site needs the new ca.crt" in captured.out
