"""TLS and SuperNode-authentication material for a fedslide federation (`fedslide certs`).

A private CA (`ca.crt`, `ca.key`), the SuperLink's certificate (`server.pem`, `server.key`; its SANs always hold
IP 127.0.0.1 because the SuperLink dials itself on loopback) and one ECDSA P-384 OpenSSH key pair per site
(`<site>.key`, `<site>.pub`) for Flower SuperNode authentication. Private keys are 0600 from creation on, files
are written atomically, and no existing file is replaced without `force=True`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedslide.common.atomic import atomic_write
from fedslide.common.cli_support import EXIT_OK, EXIT_USAGE

EXIT_REFUSED = EXIT_USAGE  # refused input: nothing was done
SITE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62})?)*")
RESERVED_SITE_NAMES = frozenset({"ca", "server"})  # their .key files would collide with the TLS keys
CA_MIN_DAYS = 3650
SERVER_MAX_DAYS = 825  # the longest server-certificate validity browsers and CA/B baseline accept
CLOCK_SKEW = dt.timedelta(minutes=5)
_LOAD_ERRORS = (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound)


class CertsError(Exception):
    """Material could not be made; nothing was written for the step that failed."""


class RefusedOverwrite(CertsError, FileExistsError):
    """A target file exists and `force` was not given."""


class InvalidInput(CertsError, ValueError):
    """A site name, host name, address or validity period is not acceptable."""


@dataclass(frozen=True)
class CertPaths:
    """A certificate (or OpenSSH public key) file and its private key file."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Material:
    """Everything `make_all` wrote or reused."""

    out_dir: Path
    ca: CertPaths
    server: CertPaths
    sites: dict[str, CertPaths]  # site -> (<site>.pub, <site>.key)
    reused_ca: bool = False
    reused_server: bool = False
    replaced_ca: bool = False  # an existing CA was replaced (`force`): every site needs the new ca.crt


def _check_free(paths: Sequence[Path], force: bool) -> None:
    """Refuse, before anything is written, when a target exists and `force` is off."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise RefusedOverwrite(f"{', '.join(existing)} already exist(s); use --force to replace")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write `data` to `path` atomically; a private file is 0600 from creation on."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_write(path, "wb", perms=0o600 if private else 0o644) as f:
        f.write(data)


def _window(days: int, start: dt.datetime | None, end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """Validity period: from `start` (default: now minus clock skew) for `days`, unless `end` is given."""
    if days < 1:
        raise InvalidInput(f"days must be at least 1, got {days}")
    start = start or dt.datetime.now(dt.timezone.utc) - CLOCK_SKEW
    end = end or start + dt.timedelta(days=days)
    if end <= start:
        raise InvalidInput(f"not_valid_after ({end}) must be later than not_valid_before ({start})")
    return start, end


def _server_days(days: int) -> None:
    """Refuse a server-certificate validity outside 1..SERVER_MAX_DAYS days."""
    if not 1 <= days <= SERVER_MAX_DAYS:
        raise InvalidInput(
            f"--days {days}: a server certificate is valid for 1 to {SERVER_MAX_DAYS} days; renew it with "
            "`fedslide certs --renew-server` before it expires"
        )


def _issue(
    paths: CertPaths,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    window: tuple[dt.datetime, dt.datetime],
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> None:
    """Sign a certificate for `key` (self-signed when `issuer` is None) and write key and certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(window[0])
        .not_valid_after(window[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(signer, hashes.SHA384())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(paths.key, pem, private=True)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_ca(
    out_dir: Path | str, common_name: str = "fedslide CA", days: int = CA_MIN_DAYS, force: bool = False
) -> CertPaths:
    """Create a self-signed ECDSA P-384 CA as `ca.crt` + `ca.key` in `out_dir`."""
    paths = CertPaths(Path(out_dir) / "ca.crt", Path(out_dir) / "ca.key")
    window = _window(days, None, None)
    _check_free([paths.cert, paths.key], force)
    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # keyCertSign, cRLSign
    exts = [(x509.BasicConstraints(ca=True, path_length=0), True), (usage, True)]
    _issue(paths, common_name, ec.generate_private_key(ec.SECP384R1()), None, window, exts)
    return paths


def load_ca(ca_dir: Path | str) -> CertPaths:
    """Check that `ca_dir` holds a usable CA (`ca.crt` + matching `ca.key`, CA=true, unexpired); return its paths."""
    paths = CertPaths(Path(ca_dir) / "ca.crt", Path(ca_dir) / "ca.key")
    _load_ca_objects(paths)
    return paths


def _load_ca_objects(ca: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
        key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except _LOAD_ERRORS as exc:
        raise CertsError(f"cannot load the CA from {ca.cert} and {ca.key}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertsError(f"{ca.key} is not the EC private key of {ca.cert}")
    if not is_ca:
        raise CertsError(f"{ca.cert} is not a CA certificate")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise CertsError(f"the CA certificate {ca.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def _sans(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names: the DNS names, the IPs and always 127.0.0.1, without duplicates."""
    for name in dns_names:
        if len(name) > 253 or not DNS_NAME.fullmatch(name):
            raise InvalidInput(f"invalid DNS name {name!r}: use letters, digits, '-' and '.' (e.g. fl.hospital.org)")
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in [*ip_addresses, "127.0.0.1"]:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise InvalidInput(f"invalid IP address {text!r}: use e.g. 10.0.0.5 or ::1") from None
        ips += [] if ip in ips else [ip]
    return [x509.DNSName(n) for n in dict.fromkeys(dns_names)] + [x509.IPAddress(ip) for ip in ips]


def make_server_cert(
    out_dir: Path | str,
    ca: CertPaths,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    days: int = 365,
    force: bool = False,
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
) -> CertPaths:
    """Create the SuperLink's `server.pem` + `server.key` signed by `ca` (valid at most SERVER_MAX_DAYS days); SANs
    always include IP 127.0.0.1."""
    paths = CertPaths(Path(out_dir) / "server.pem", Path(out_dir) / "server.key")
    sans = _sans(dns_names, ip_addresses)
    _server_days(days)
    window = _window(days, not_valid_before, not_valid_after)
    _check_free([paths.cert, paths.key], force)
    issuer = _load_ca_objects(ca)
    exts = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(True, False, False, False, False, False, False, False, False), True),  # digitalSignature
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(sans), False),
    ]
    subject = dns_names[0] if dns_names else str(sans[0].value)
    _issue(paths, subject, ec.generate_private_key(ec.SECP384R1()), issuer, window, exts)
    return paths


def validate_site_names(site_names: Sequence[str]) -> None:
    """Raise `InvalidInput` unless every name is 1-64 letters, digits, '-' or '_', unique and not reserved."""
    if not site_names:
        raise InvalidInput("at least one site name is needed")
    for name in site_names:
        if not SITE_NAME.fullmatch(name):
            raise InvalidInput(f"invalid site name {name!r}: use 1-64 letters, digits, '-' or '_' (e.g. site-1)")
        if name.lower() in RESERVED_SITE_NAMES:
            raise InvalidInput(f"invalid site name {name!r}: 'ca' and 'server' are reserved for the TLS files")
    if dupes := sorted({n for n in site_names if list(site_names).count(n) > 1}):
        raise InvalidInput(f"site names given more than once: {', '.join(dupes)}")


def make_site_keys(out_dir: Path | str, site_names: Sequence[str], force: bool = False) -> dict[str, CertPaths]:
    """Create one ECDSA P-384 OpenSSH key pair per site: `<site>.key` (0600) and `<site>.pub`."""
    validate_site_names(site_names)
    sites = {s: CertPaths(Path(out_dir) / f"{s}.pub", Path(out_dir) / f"{s}.key") for s in site_names}
    _check_free([p for cp in sites.values() for p in (cp.cert, cp.key)], force)
    pem, ssh = serialization.Encoding.PEM, serialization.Encoding.OpenSSH
    for paths in sites.values():
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        _write(paths.key, private, private=True)
        _write(paths.cert, key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + b"\n", False)
    return sites


def _server_matches(server: CertPaths, ca: CertPaths, sans: list[x509.GeneralName]) -> bool:
    """Whether an existing server pair was issued by `ca`, is unexpired and has exactly `sans`."""
    try:
        cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
        key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert.read_bytes()))
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except _LOAD_ERRORS:
        return False
    fresh = cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc)
    return fresh and key.public_key() == cert.public_key() and have == set(sans)


def make_all(
    out_dir: Path | str,
    sites: Sequence[str],
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    days: int = 365,
    force: bool = False,
) -> Material:
    """Make the CA (valid >= 10 years), the server certificate (`days`) and the site key pairs.

    Without `force`, an existing valid CA in `out_dir` is reused, and so is an existing server certificate issued
    by it with exactly the requested SANs: that is how a site is added later. Any other existing target is refused
    before anything is written. With `force`, everything is made anew (every hospital then needs the new ca.crt).
    """
    out = Path(out_dir)
    validate_site_names(sites)
    sans = _sans(dns_names, ip_addresses)
    _server_days(days)
    ca = CertPaths(out / "ca.crt", out / "ca.key")
    replaced_ca = force and (ca.cert.exists() or ca.key.exists())
    server = CertPaths(out / "server.pem", out / "server.key")
    reuse_ca = not force and ca.cert.exists() and ca.key.exists()
    if reuse_ca:
        try:
            load_ca(out)
        except CertsError as exc:
            raise CertsError(f"{exc}; use --force to make a new CA (every site then needs the new ca.crt)") from exc
    reuse_server = reuse_ca and _server_matches(server, ca, sans)
    targets = ([] if reuse_ca else [ca.cert, ca.key]) + ([] if reuse_server else [server.cert, server.key])
    _check_free(targets + [p for s in sites for p in (out / f"{s}.pub", out / f"{s}.key")], force)
    if not reuse_ca:
        make_ca(out, days=max(days, CA_MIN_DAYS), force=force)
    if not reuse_server:
        make_server_cert(out, ca, dns_names, ip_addresses, days=days, force=force)
    return Material(out, ca, server, make_site_keys(out, sites, force=force), reuse_ca, reuse_server, replaced_ca)


def renew_server_cert(
    out_dir: Path | str,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    days: int = 365,
) -> CertPaths:
    """Replace `server.pem` + `server.key` in `out_dir` with a new pair signed by the CA already there (which must be
    usable): the sites keep their ca.crt and keys."""
    _server_days(days)
    _sans(dns_names, ip_addresses)
    try:
        ca = load_ca(out_dir)
    except CertsError as exc:
        raise CertsError(f"--renew-server reuses the CA in {out_dir}: {exc}") from exc
    return make_server_cert(out_dir, ca, dns_names, ip_addresses, days=days, force=True)


def instructions(material: Material) -> str:
    """Human-readable text: which file goes where."""
    m = material
    reused = " (existing CA reused)" if m.reused_ca else ""
    warning = (
        ["WARNING: the existing CA was replaced (--force): every site needs the new ca.crt", ""]
        if m.replaced_ca
        else []
    )
    return "\n".join(
        [
            *warning,
            f"TLS and SuperNode-authentication material in {m.out_dir.resolve()}{reused}",
            "",
            "Coordinating site (SuperLink host): copy ca.crt, server.pem, server.key, then run",
            "  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key "
            "--enable-supernode-auth ...",
            "  and register each site's public key (the flwr connection needs root-certificates = ca.crt):",
            *(f"  flwr supernode register {p.cert.name} <connection>" for p in m.sites.values()),
            "",
            "Each hospital: copy ca.crt and its own private key only, then run",
            *(
                f"  {s}: fedslide-supernode --root-certificates ca.crt --auth-supernode-private-key {p.key.name} ..."
                for s, p in m.sites.items()
            ),
            "",
            "Never copy ca.key anywhere: keep it offline; it can mint certificates the whole federation trusts.",
            "Move private keys (*.key) over a secure channel only and delete stray copies once installed.",
            "Keep the SuperLink's control port off the hospitals' network: open-source Flower does not authenticate it.",
        ]
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `certs` subcommand."""
    p = subparsers.add_parser(
        "certs",
        help="make the TLS certificates and per-site authentication keys of a federation",
        description="Write a private CA, the SuperLink's server certificate (SANs: --dns, --ip and always "
        "127.0.0.1) and one ECDSA P-384 OpenSSH key pair per site, then print what to copy where. Existing files "
        "are never replaced without --force; an existing CA (and matching server certificate) in --out is reused, "
        "so a site can be added later. --renew-server replaces only the server certificate, signed by that CA.",
    )
    p.add_argument("--out", type=Path, default=Path("certs"), help="output folder (default: certs)")
    p.add_argument("--sites", nargs="+", default=[], metavar="NAME", help="site names (letters, digits, -, _)")
    p.add_argument(
        "--dns", nargs="+", default=["localhost"], metavar="NAME", help="server DNS names (default: localhost)"
    )
    p.add_argument("--ip", nargs="+", default=["127.0.0.1"], metavar="ADDR", help="server IPs (127.0.0.1 always added)")
    p.add_argument(
        "--days",
        type=int,
        default=365,
        help=f"server certificate validity in days (default 365, at most {SERVER_MAX_DAYS})",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--force",
        action="store_true",
        help="replace existing files, CA included (every site then needs the new ca.crt)",
    )
    mode.add_argument(
        "--renew-server",
        action="store_true",
        help="replace only server.pem/server.key, signed by the existing CA in --out (no --sites needed)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Make the material and print the instructions; returns an exit code."""
    try:
        if args.renew_server:
            if args.sites:
                raise InvalidInput("--renew-server renews the server certificate only: leave out --sites")
            server = renew_server_cert(args.out, args.dns, args.ip, days=args.days)
            print(f"renewed {server.cert} and {server.key} (signed by the existing {Path(args.out) / 'ca.crt'});")
            print("copy both to the SuperLink host and restart it: the sites need nothing new")
            return EXIT_OK
        if not args.sites:
            raise InvalidInput("--sites is needed (the site names), unless --renew-server")
        material = make_all(args.out, args.sites, args.dns, args.ip, days=args.days, force=args.force)
    except CertsError as exc:
        print(f"fedslide certs: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if material.replaced_ca:
        print("fedslide certs: WARNING: made a new CA (--force); every site needs the new ca.crt", file=sys.stderr)
    print(instructions(material))
    return EXIT_OK
