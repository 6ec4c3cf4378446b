"""The embedded stack's local CA: made once, reused, private, and covering the host."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509

from bmcell import tls
from bmcell.errors import ConfigError
from bmcell.settings import TlsSettings


def sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in ext}


def test_first_start_makes_a_private_ca_and_a_server_certificate(tmp_path: Path) -> None:
    files = tls.ensure_local_ca(tmp_path / "tls", ["bmcell.lab.example"])
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert sans(files.cert) == {"bmcell.lab.example", "127.0.0.1", "localhost"}
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    x509.load_pem_x509_certificate(files.cert.read_bytes()).verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_later_starts_reuse_the_ca_and_reissue_only_for_new_hosts(tmp_path: Path) -> None:
    first = tls.ensure_local_ca(tmp_path, ["127.0.0.1"])
    ca, cert = first.ca.read_bytes(), first.cert.read_bytes()
    again = tls.ensure_local_ca(tmp_path, ["127.0.0.1"])
    assert (again.ca.read_bytes(), again.cert.read_bytes()) == (ca, cert)
    moved = tls.ensure_local_ca(tmp_path, ["10.1.2.3"])
    assert moved.ca.read_bytes() == ca  # clients that trust the CA keep trusting it
    assert moved.cert.read_bytes() != cert
    assert "10.1.2.3" in sans(moved.cert)
    ip = x509.load_pem_x509_certificate(moved.cert.read_bytes())
    ext = ip.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in ext.get_values_for_type(x509.IPAddress)


def test_a_certificate_of_another_ca_is_replaced(tmp_path: Path) -> None:
    ours = tls.ensure_local_ca(tmp_path / "a", ["127.0.0.1"])
    other = tls.ensure_local_ca(tmp_path / "b", ["127.0.0.1"])
    ours.cert.write_bytes(other.cert.read_bytes())  # same issuer name, another key
    ours.key.write_bytes(other.key.read_bytes())
    fixed = tls.ensure_local_ca(tmp_path / "a", ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(fixed.ca.read_bytes())
    x509.load_pem_x509_certificate(fixed.cert.read_bytes()).verify_directly_issued_by(ca)


def test_missing_files_are_named(tmp_path: Path) -> None:
    on = TlsSettings(tls="on", tls_ca=None, tls_cert=None, tls_key=None)
    with pytest.raises(ConfigError, match="BMCELL_TLS_CA is required when BMCELL_TLS=on"):
        tls.ca_file(on)
    with pytest.raises(ConfigError, match="BMCELL_TLS_CERT is required"):
        tls.server_files(on)
    gone = TlsSettings(tls="on", tls_ca=tmp_path / "nope.crt", tls_cert=None, tls_key=None)
    with pytest.raises(ConfigError, match=r"BMCELL_TLS_CA=.*nope.crt: cannot read"):
        tls.grpc_channel_credentials(gone)
    off = TlsSettings(tls="off", tls_ca=None, tls_cert=None, tls_key=None)
    assert tls.uvicorn_options(off) == {} and tls.http_scheme(off) == "http"


def test_grpc_server_serves_a_renewed_certificate_without_restart(tmp_path: Path) -> None:
    """cert-manager replaces the mounted files; new connections get the new pair."""
    import shutil
    import time
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    first = tls.ensure_local_ca(tmp_path / "first", ["127.0.0.1"])
    second = tls.ensure_local_ca(tmp_path / "second", ["127.0.0.1"])
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    shutil.copy(first.cert, mounted / "tls.crt")
    shutil.copy(first.key, mounted / "tls.key")
    serving = TlsSettings(
        tls="on", tls_ca=None, tls_cert=mounted / "tls.crt", tls_key=mounted / "tls.key"
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = tls.add_grpc_port(server, "127.0.0.1:0", serving)
    server.start()

    def check(ca: Path) -> bool:
        client = TlsSettings(tls="on", tls_ca=ca, tls_cert=None, tls_key=None)
        with tls.grpc_channel(f"127.0.0.1:{port}", tls=client) as ch:
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError:
                return False
        return True

    try:
        assert check(first.ca) and not check(second.ca)
        time.sleep(0.01)  # a later modification time than the first pair's
        shutil.copy(second.key, mounted / "tls.key")
        shutil.copy(second.cert, mounted / "tls.crt")
        assert check(second.ca) and not check(first.ca)
    finally:
        server.stop(None)
