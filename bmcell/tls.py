"""TLS on every hop: the embedded stack's local CA, and the credentials every server
and client builds from :class:`~bmcell.settings.TlsSettings`.

``bmcell stack up`` calls :func:`ensure_local_ca` once per start: the CA is made on the
first start and reused after (its key stays ``0600`` in the run folder and never
leaves it); the server certificate is reissued when it no longer covers the stack's
host, nears its end, or was signed by another CA. ``deploy/`` mounts the same three
files from Secrets that cert-manager keeps (``BMCELL_TLS_CA``, ``BMCELL_TLS_CERT``,
``BMCELL_TLS_KEY``).

Servers present ``tls_cert``; clients verify it against ``tls_ca`` and the host name
they dial. Callers are authenticated by their bearer token, not by a client
certificate: the hospital's browsers and lab clients carry no bmcell certificate.
``BMCELL_TLS=off`` turns all of it into plaintext for debugging and every process
says so in its log at start.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bmcell import log
from bmcell.errors import ConfigError
from bmcell.settings import TlsSettings, load

_LOG = log.get(__name__)

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class Material:
    """Where a stack's CA certificate, server certificate and server key live."""

    ca: Path
    cert: Path
    key: Path

    def env(self) -> dict[str, str]:
        return {
            "BMCELL_TLS_CA": str(self.ca),
            "BMCELL_TLS_CERT": str(self.cert),
            "BMCELL_TLS_KEY": str(self.key),
        }


def material_paths(directory: Path) -> Material:
    return Material(directory / "ca.crt", directory / "server.crt", directory / "server.key")


# --- the local CA of the embedded stack ---------------------------------------------


def ensure_local_ca(directory: Path, hosts: Sequence[str]) -> Material:
    """Make (first start) or reuse the CA under ``directory``, and a server certificate
    for ``hosts`` plus 127.0.0.1 and localhost signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    paths = material_paths(directory)
    ca_key_path = directory / "ca.key"
    names = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost"]))
    if ca_key_path.exists() and paths.ca.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    else:
        ca_key, ca_cert = _new_ca()
        _write_private(ca_key_path, _pem_key(ca_key))
        paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    if not _server_cert_current(paths, ca_cert, names):
        key, cert = _new_server_cert(ca_key, ca_cert, names)
        _write_private(paths.key, _pem_key(key))
        paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bmcell local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _new_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _server_cert_current(paths: Material, ca_cert: x509.Certificate, names: Sequence[str]) -> bool:
    if not (paths.cert.exists() and paths.key.exists()):
        return False
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):  # another CA of the same name
        return False
    covered = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(_san(names)) <= set(covered)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only, from its first byte on disk."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


# --- what processes build from their settings ----------------------------------------


def settings() -> TlsSettings:
    """The TLS settings of this process's environment (for code without a Settings)."""
    return load(TlsSettings)


def enabled(tls: TlsSettings | None = None) -> bool:
    return (tls or settings()).tls == "on"


_warned_off = False


def warn_if_off(tls: TlsSettings, process: str = "") -> None:
    """Once per process: services at start (runtime.boot), CLI commands at their first
    plaintext channel."""
    global _warned_off
    if tls.tls == "off" and not _warned_off:
        _warned_off = True
        message = "BMCELL_TLS=off: tokens and images cross the network in clear; for debugging only"
        if process:  # a service: its structured log
            _LOG.warning(message, process=process)
        else:  # a command: stderr, which leaves its --json output on stdout intact
            print(f"warning: {message}", file=sys.stderr)


def _read(tls: TlsSettings, field: str, role: str) -> bytes:
    path = getattr(tls, field)
    variable = f"BMCELL_{field.upper()}"
    if path is None:
        raise ConfigError(f"{variable} is required when BMCELL_TLS=on ({role})")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: cannot read ({exc.strerror or exc})") from exc


def ca_file(tls: TlsSettings | None = None) -> Path:
    """The CA file clients verify servers against; ConfigError naming the variable."""
    tls = tls or settings()
    _read(tls, "tls_ca", "clients verify servers with it")
    return Path(tls.tls_ca)  # type: ignore[arg-type]


def server_files(tls: TlsSettings) -> tuple[Path, Path]:
    """(certificate, key) a server presents; ConfigError naming a missing variable."""
    _read(tls, "tls_cert", "the certificate this server presents")
    _read(tls, "tls_key", "the key of BMCELL_TLS_CERT")
    return Path(tls.tls_cert), Path(tls.tls_key)  # type: ignore[arg-type]


# gRPC ---------------------------------------------------------------------------------


def add_grpc_port(server: grpc.Server, address: str, tls: TlsSettings) -> int:
    """Bind ``address`` with TLS (plaintext when BMCELL_TLS=off); returns the port, 0 if
    it could not bind. The key pair is read again when its files change, so a renewed
    certificate (cert-manager) is served to new connections without a restart."""
    if tls.tls == "off":
        warn_if_off(tls)
        return server.add_insecure_port(address)
    cert, key = server_files(tls)
    return server.add_secure_port(address, _reloading_server_credentials(cert, key))


def _reloading_server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    def stamp() -> tuple[float, float]:
        return cert.stat().st_mtime, key.stat().st_mtime

    loaded = {"stamp": stamp()}

    def config() -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key.read_bytes(), cert.read_bytes())])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            now = stamp()
            if now == loaded["stamp"]:
                return None  # keep serving the pair already loaded
            fresh = config()
        except OSError:
            return None  # mid-rotation: a file is briefly missing
        loaded["stamp"] = now
        _LOG.info("server certificate reloaded", cert=str(cert))
        return fresh

    return grpc.dynamic_ssl_server_credentials(config(), fetch)


def grpc_channel_credentials(tls: TlsSettings | None = None) -> grpc.ChannelCredentials:
    tls = tls or settings()
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls, "tls_ca", "clients verify servers with it")
    )


def grpc_channel(
    address: str,
    *,
    options: Sequence[tuple[str, object]] = (),
    tls: TlsSettings | None = None,
) -> grpc.Channel:
    """A channel to ``address`` that verifies the server against BMCELL_TLS_CA."""
    tls = tls or settings()
    if tls.tls == "off":
        warn_if_off(tls)
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, grpc_channel_credentials(tls), options=list(options))


# HTTP ---------------------------------------------------------------------------------


def http_scheme(tls: TlsSettings | None = None) -> str:
    return "https" if enabled(tls) else "http"


def client_ssl_context(tls: TlsSettings | None = None) -> ssl.SSLContext:
    """For httpx (``verify=``) and urllib3 (``ssl_context=``): trusts BMCELL_TLS_CA only."""
    return ssl.create_default_context(cafile=str(ca_file(tls)))


def httpx_verify(tls: TlsSettings | None = None) -> ssl.SSLContext | bool:
    tls = tls or settings()
    return client_ssl_context(tls) if tls.tls == "on" else True


def uvicorn_options(tls: TlsSettings) -> dict[str, str]:
    if tls.tls == "off":
        return {}
    cert, key = server_files(tls)
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def main(argv: Sequence[str]) -> int:
    """``python -m bmcell.tls DIR HOST...``: the CA and a server certificate for HOSTs in
    DIR, made once and reused (deploy/compose.yaml's tls-init runs it)."""
    if len(argv) < 2:
        print("usage: python -m bmcell.tls DIR HOST [HOST...]", file=sys.stderr)
        return 2
    files = ensure_local_ca(Path(argv[0]), argv[1:])
    print(f"CA {files.ca}; certificate {files.cert} for {', '.join(argv[1:])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
