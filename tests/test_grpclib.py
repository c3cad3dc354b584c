"""Another gRPC stack: a grpclib client (pure Python, on Python's ssl module) calls a meshid server."""

from __future__ import annotations

import ssl

import pytest

import meshid
from support import FRONTEND_ID, INTRUDER_ID, SERVER_ID, call, grpclib_context, grpclib_say_hello, sync_server

pytestmark = pytest.mark.timeout(60)


def _policy(**options: object) -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}], **options}
    )


def test_grpclib_client_is_allowed_or_denied_as_the_policy_says(ca, bundles, server_source, tmp_path) -> None:
    interceptor = meshid.AuthorizationInterceptor(_policy(), source=server_source)
    with sync_server(server_source, interceptor) as port:
        allowed = grpclib_say_hello(port, grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path))
        denied = grpclib_say_hello(port, grpclib_context(ca.issue_svid(INTRUDER_ID), bundles, tmp_path))
    assert allowed == ("OK", FRONTEND_ID)
    assert denied[0] == "PERMISSION_DENIED" and INTRUDER_ID in denied[1]


def test_classical_key_exchange_is_denied_when_the_policy_requires_pq(ca, bundles, server_source, tmp_path) -> None:
    interceptor = meshid.AuthorizationInterceptor(_policy(require_pq_key_exchange=True), source=server_source)
    with sync_server(server_source, interceptor) as port:
        status, message = grpclib_say_hello(port, grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path))
        # grpcio itself negotiates a hybrid (X25519MLKEM768), so the same caller over grpcio passes.
        with meshid.secure_channel(
            f"127.0.0.1:{port}", meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles), server_id=SERVER_ID
        ) as channel:
            assert call(channel) == ("OK", FRONTEND_ID)
    assert status == "PERMISSION_DENIED"
    assert "is classical" in message and "post-quantum" in message
    assert "X25519" in message or "secp" in message.lower()  # the group Python's OpenSSL chose


def test_tls12_is_refused_unless_the_policy_allows_it(ca, bundles, server_source, tmp_path) -> None:
    def tls12_only() -> ssl.SSLContext:
        ctx = grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a client that offers only TLS 1.2
        return ctx

    with sync_server(server_source, meshid.AuthorizationInterceptor(_policy(), source=server_source)) as port:
        refused = grpclib_say_hello(port, tls12_only())
        tls13 = grpclib_say_hello(port, grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path))
    with sync_server(
        server_source, meshid.AuthorizationInterceptor(_policy(allow_tls12=True), source=server_source)
    ) as port:
        admitted = grpclib_say_hello(port, tls12_only())
    assert refused[0] == "UNAUTHENTICATED"
    assert "negotiated TLSv1.2" in refused[1] and "requires TLS 1.3" in refused[1]
    assert tls13 == ("OK", FRONTEND_ID)
    assert admitted == ("OK", FRONTEND_ID)
