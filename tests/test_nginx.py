"""Behind a TLS-terminating proxy: real nginx forwards gRPC and the client's certificate."""

from __future__ import annotations

import os
import string
import urllib.parse
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import meshid
from meshid.ca import Authority
from support import FRONTEND_ID, INTRUDER_ID, SERVER_ID, call, free_port, hello, nginx_process, stub, sync_server

pytestmark = pytest.mark.timeout(60)
NGINX_ID = "spiffe://example.org/ns/edge/sa/nginx"
TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "nginx" / "nginx.conf"


def _write(folder: Path, svid: meshid.X509Svid, bundle: meshid.TrustBundle) -> None:
    folder.mkdir(parents=True)
    (folder / "svid.pem").write_bytes(svid.chain_pem())
    (folder / "svid.key").write_bytes(svid.key_pem())
    (folder / "svid.key").chmod(0o600)
    (folder / "bundle.pem").write_bytes(bundle.to_pem())


@pytest.fixture
def nginx_front(tmp_path, ca: Authority, server_source):
    """nginx on a free loopback port in front of a meshid greeter that trusts nginx's forwarded header."""
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(
        policy, source=server_source, trusted_proxies=[NGINX_ID], forwarded_header="x-client-cert"
    )
    bundle = meshid.TrustBundle(ca.trust_domain, ca.roots)
    _write(tmp_path / "nginx-svid", ca.issue_svid(NGINX_ID), bundle)
    run = tmp_path / "nginx-run"
    run.mkdir()
    with sync_server(server_source, interceptor) as upstream_port:
        listen_port = free_port()
        config = string.Template(TEMPLATE.read_text()).safe_substitute(  # keeps nginx's own $variables
            USER_LINE="user root;" if os.geteuid() == 0 else "",
            RUN=run,
            LISTEN=f"127.0.0.1:{listen_port}",
            SVID_DIR=tmp_path / "nginx-svid",
            UPSTREAM=f"127.0.0.1:{upstream_port}",
            UPSTREAM_NAME=meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)),
            SSL_OCSP="off",  # this CA names no OCSP responder (tests/test_nginx_ocsp.py: one that does)
        )
        (run / "nginx.conf").write_text(config)
        assert "${" not in config, "a placeholder of the example config was left unfilled"
        with nginx_process(run, listen_port):
            yield listen_port, upstream_port


def _through(port: int, svid: meshid.X509Svid, bundles: meshid.BundleSet, server_id: str) -> tuple[str, str]:
    with meshid.secure_channel(f"127.0.0.1:{port}", meshid.StaticSource(svid, bundles), server_id=server_id) as channel:
        return call(channel)


def test_nginx_forwards_the_callers_identity(nginx_front, ca, bundles) -> None:
    listen_port, _ = nginx_front
    assert _through(listen_port, ca.issue_svid(FRONTEND_ID), bundles, NGINX_ID) == ("OK", FRONTEND_ID)
    code, details = _through(listen_port, ca.issue_svid(INTRUDER_ID), bundles, NGINX_ID)
    assert code == "PERMISSION_DENIED" and INTRUDER_ID in details


def test_nginx_requires_a_client_certificate(nginx_front, ca, bundles) -> None:
    listen_port, _ = nginx_front
    roots = bundles[ca.trust_domain].to_pem()
    options = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(NGINX_ID)))]
    with grpc.secure_channel(
        f"127.0.0.1:{listen_port}", grpc.ssl_channel_credentials(roots), options=options
    ) as channel:
        code, _ = call(channel)
    assert code != "OK"  # nginx answers 400 "no required SSL certificate", which grpc reports as an error


def test_forged_header_from_a_non_proxy_peer_is_ignored(nginx_front, ca, bundles) -> None:
    _, upstream_port = nginx_front
    frontend = ca.issue_svid(FRONTEND_ID)
    forged = urllib.parse.quote(frontend.leaf.public_bytes(Encoding.PEM).decode())
    source = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with (
        meshid.secure_channel(f"127.0.0.1:{upstream_port}", source, server_id=SERVER_ID) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        stub(channel).SayHello(hello(), metadata=[("x-client-cert", forged)], timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert INTRUDER_ID in info.value.details()  # decided as the direct peer, not the forged one


def test_unverifiable_forwarded_certificate_from_the_proxy_is_unauthenticated(nginx_front, ca, bundles) -> None:
    # A proxy that forwards a certificate no bundle vouches for: the call is refused, not
    # treated as coming from the proxy itself.
    _, upstream_port = nginx_front
    stranger = Authority.create_root("example.org").issue_svid(FRONTEND_ID)
    header = urllib.parse.quote(stranger.leaf.public_bytes(Encoding.PEM).decode())
    source = meshid.StaticSource(ca.issue_svid(NGINX_ID), bundles)
    with (
        meshid.secure_channel(f"127.0.0.1:{upstream_port}", source, server_id=SERVER_ID) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        stub(channel).SayHello(hello(), metadata=[("x-client-cert", header)], timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "does not verify" in info.value.details()
