"""OCSP with CA replicas on one real PostgreSQL (issue #15): a revocation made through one replica
shows in the next OCSP answer of the replica that issued the certificate."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

import meshid
from meshid.ca import Authority
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from pg import create_database, running_postgres
from support import require_program

pytestmark = pytest.mark.timeout(180)
TD = "example.org"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


def _ocsp(issuer: Path, cert: Path, url: str, ca_file: Path) -> subprocess.CompletedProcess[str]:
    openssl = require_program("openssl", "/usr/bin/openssl")
    command = [openssl, "ocsp", "-issuer", str(issuer), "-cert", str(cert), "-url", url, "-CAfile", str(ca_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_a_revocation_through_one_replica_shows_at_once_in_the_issuing_replicas_answers(
    postgres: str, tmp_path: Path
) -> None:
    dsn = create_database(postgres, "ocsp_replicas")
    root = Authority.create_root(TD)
    root_pem, root_key = tmp_path / "root.pem", tmp_path / "root.key"
    root_pem.write_bytes(meshid.TrustBundle(root.trust_domain, root.roots).to_pem())
    root_key.write_bytes(
        root.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    servers: list[CaServer] = []
    try:
        for name in ("a", "b"):
            init_data_dir(tmp_path / name, TD, upstream_cert=str(root_pem), upstream_key=str(root_key), datastore=dsn)
            server = CaServer(tmp_path / name, "127.0.0.1:0", ocsp_listen="127.0.0.1:0")
            server.start()
            servers.append(server)
        a, b = servers
        address = {name: f"127.0.0.1:{s.port}" for name, s in zip("ab", servers, strict=True)}
        url_b = f"http://127.0.0.1:{b.ocsp_port}"

        spiffe_id = f"spiffe://{TD}/ns/prod/sa/web"
        with AdminClient(address["b"], tmp_path / "b") as admin:
            admin.create_entry(spiffe_id)
            token = str(admin.create_token(spiffe_id).token)
        svid, _ = fetch_svid(address["b"], tmp_path / "b" / "bundle.pem", token)
        (tmp_path / "svid.pem").write_bytes(svid.chain_pem())
        issuer_b = tmp_path / "b" / "ca.pem"
        good = _ocsp(issuer_b, tmp_path / "svid.pem", url_b, root_pem)
        assert f"{tmp_path / 'svid.pem'}: good" in good.stdout, (good.stdout, good.stderr)
        assert "Response verify OK" in good.stderr

        with AdminClient(address["a"], tmp_path / "a") as admin:  # revoked through the other replica
            admin.revoke(serial=format(svid.leaf.serial_number, "x"))
        started = time.monotonic()
        revoked = _ocsp(issuer_b, tmp_path / "svid.pem", url_b, root_pem)  # the first answer, not a retry
        assert time.monotonic() - started < 5
        assert f"{tmp_path / 'svid.pem'}: revoked" in revoked.stdout, (revoked.stdout, revoked.stderr)
        assert "Response verify OK" in revoked.stderr

        # Replica a holds only its own intermediate's key: it cannot sign for b's certificates
        # (RFC 6960 4.2.2.2), so it says so rather than answer for another CA.
        other = _ocsp(issuer_b, tmp_path / "svid.pem", f"http://127.0.0.1:{a.ocsp_port}", root_pem)
        assert "unauthorized" in (other.stdout + other.stderr).lower(), (other.stdout, other.stderr)
    finally:
        for server in servers:
            server.stop()
