"""SPIFFE bundle format and federation: `meshid bundle show`, read back and by py-spiffe, then a
partner trust domain's workload allowed by a policy, verified only against its own bundle."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import jwt  # PyJWT: the JWK-set parser py-spiffe itself uses
import pytest
import spiffe

import meshid
from meshid.agent import IssuerSource
from meshid.ca.client import AdminClient
from meshid.ca.datadir import init_data_dir, load_jwt_keys
from meshid.ca.server import CaServer
from support import SERVER_ID, call, handshake_failed, sync_server

pytestmark = pytest.mark.timeout(60)
PARTNER_ID = "spiffe://partner.org/ns/prod/sa/billing"


@pytest.fixture
def partner_ca(tmp_path):
    init_data_dir(tmp_path / "partner", "partner.org")
    server = CaServer(tmp_path / "partner", "127.0.0.1:0")
    port = server.start()
    try:
        yield f"127.0.0.1:{port}", tmp_path / "partner"
    finally:
        server.stop()


def _show(address: str, folder, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshid.cli",
            "bundle",
            "show",
            "--server",
            address,
            "--bundle",
            str(folder / "bundle.pem"),
            "--trust-domain",
            "partner.org",
            "--format",
            fmt,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bundle_show_prints_spiffe_json_that_py_spiffe_and_meshid_read(partner_ca) -> None:
    address, folder = partner_ca
    out = _show(address, folder, "spiffe")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["spiffe_sequence"] >= 1 and doc["spiffe_refresh_hint"] == 300
    key, jwt_key = doc["keys"]  # the X.509 root, then the JWT-SVID signing key (issue #16)
    assert key["use"] == "x509-svid" and "kid" not in key and key["kty"] == "EC"
    assert jwt_key["use"] == "jwt-svid" and jwt_key["kid"] == load_jwt_keys(folder).signing.kid  # type: ignore[union-attr]
    bundle = meshid.TrustBundle.from_spiffe_json("partner.org", out.stdout)
    assert bundle.to_pem() == (folder / "bundle.pem").read_bytes()
    assert set(bundle.jwt_authorities) == {jwt_key["kid"]}
    theirs = spiffe.X509Bundle.parse_raw(spiffe.TrustDomain("partner.org"), base64.b64decode(key["x5c"][0]))
    assert theirs.x509_authorities == set(bundle.roots)
    assert len(jwt.PyJWKSet.from_json(out.stdout).keys) == 2
    jwt_bundle = spiffe.JwtBundle.parse(spiffe.TrustDomain("partner.org"), json.dumps({"keys": [jwt_key]}).encode())
    assert set(jwt_bundle.jwt_authorities) == {jwt_key["kid"]}
    pem = _show(address, folder, "pem")
    assert pem.stdout.encode() == (folder / "bundle.pem").read_bytes()


def test_federated_workload_is_allowed_by_its_trust_domain_rule(partner_ca, ca, server_source, tmp_path) -> None:
    address, folder = partner_ca
    partner_bundle = meshid.TrustBundle.from_spiffe_json("partner.org", _show(address, folder, "spiffe").stdout)
    own = meshid.TrustBundle(ca.trust_domain, ca.roots)
    federated = meshid.BundleSet.of(own, partner_bundle)
    with AdminClient(address, folder) as admin:
        admin.create_entry(PARTNER_ID)
        token = admin.create_token(PARTNER_ID).token
    with IssuerSource(address, folder / "bundle.pem", join_token=token) as partner:
        client = meshid.StaticSource(partner.get_svid(), federated)
        server = meshid.StaticSource(server_source.get_svid(), federated)
        policy = meshid.AuthorizationPolicy.from_dict(
            {
                "allow": [
                    {
                        "name": "partners",
                        "methods": ["/meshid.examples.v1.Greeter/SayHello"],
                        "trust_domains": ["partner.org"],
                    }
                ]
            }
        )
        with sync_server(server, meshid.AuthorizationInterceptor(policy, source=server)) as port:
            with meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=SERVER_ID) as channel:
                assert call(channel) == ("OK", PARTNER_ID)
            # Without partner.org's bundle the same workload is a stranger.
            alone = meshid.StaticSource(server_source.get_svid(), meshid.BundleSet.of(own))
        with sync_server(alone, meshid.AuthorizationInterceptor(policy, source=alone)) as port:
            with meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=SERVER_ID) as channel:
                assert handshake_failed(*call(channel))  # the TLS layer refuses an unknown root
