"""The grpcio canary (issue #18): an ML-DSA-65 mutual TLS handshake through grpcio and meshid's
credentials. grpcio 1.85 refuses ML-DSA certificates, so today the call fails and the test is an
expected failure; strict, so the day a grpcio release accepts them the suite fails loudly."""

from __future__ import annotations

import grpc
import pytest

import meshid
from meshid.ca import Authority, generate_key
from support import FRONTEND_ID, SERVER_ID, TD, hello, stub, sync_server

SWITCH = (
    "grpcio now completes an ML-DSA-65 mTLS handshake: make meshid's grpc path (credentials, channel, agent "
    "source) prefer the ML-DSA SVID when a workload has both, then drop this canary"
)


@pytest.mark.xfail(
    strict=True,
    raises=grpc.RpcError,
    reason=f"grpcio {grpc.__version__} refuses ML-DSA certificates in its TLS handshake. If this XPASSes: {SWITCH}",
)
def test_grpcio_completes_a_mutual_handshake_with_ml_dsa_svids() -> None:
    pq = Authority.create_root(TD, key=generate_key("ml-dsa-65"))
    bundles = meshid.BundleSet.of(meshid.TrustBundle(TD, pq.roots))
    server = meshid.StaticSource(pq.issue_svid(SERVER_ID, key_kind="ml-dsa-65"), bundles)
    client = meshid.StaticSource(pq.issue_svid(FRONTEND_ID, key_kind="ml-dsa-65"), bundles)
    policy = meshid.AuthorizationPolicy.from_dict(
        {"name": "canary", "allow": [{"name": "all", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]},
        require_pq_signature=True,
    )
    with sync_server(server, meshid.AuthorizationInterceptor(policy, source=server)) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=SERVER_ID) as channel:
            reply = stub(channel).SayHello(hello(), timeout=10)
    assert reply.caller == FRONTEND_ID


def test_grpcio_classical_handshake_is_unchanged_by_an_ml_dsa_root_in_the_bundle() -> None:
    """The other half: a trust domain with both CAs publishes both roots, and grpcio (BoringSSL)
    still verifies classical SVIDs against that bundle, both ways."""
    classical = Authority.create_root(TD)
    pq = Authority.create_root(TD, key=generate_key("ml-dsa-65"))
    bundles = meshid.BundleSet.of(meshid.TrustBundle(TD, (*classical.roots, *pq.roots)))
    server = meshid.StaticSource(classical.issue_svid(SERVER_ID), bundles)
    client = meshid.StaticSource(classical.issue_svid(FRONTEND_ID), bundles)
    policy = meshid.AuthorizationPolicy.from_dict(
        {"name": "classical", "allow": [{"name": "all", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]}
    )
    with sync_server(server, meshid.AuthorizationInterceptor(policy, source=server)) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=SERVER_ID) as channel:
            reply = stub(channel).SayHello(hello(), timeout=10)
    assert reply.caller == FRONTEND_ID
