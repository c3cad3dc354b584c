"""``require_pq_signature``: a policy may require that the peer authenticated with ML-DSA, as it
may require a post-quantum key exchange (issue #18). The peer's algorithms come from its leaf."""

from __future__ import annotations

import grpc
import pytest

import meshid
from meshid.ca import Authority, generate_key
from support import FRONTEND_ID, SAY_HELLO, hello, stub, sync_server

TD = "example.org"
LOCAL = meshid.TrustDomain.parse(TD)
RULE = {"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}


def policy(**options: object) -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict({"name": "p", "allow": [RULE], **options})


@pytest.fixture(scope="module")
def pq_ca() -> Authority:
    return Authority.create_root(TD, key=generate_key("ml-dsa-65"))


def as_peer(svid: meshid.X509Svid) -> meshid.PeerIdentity:
    return meshid.PeerIdentity.from_certificate(svid.leaf, spiffe_id=svid.spiffe_id)


def test_an_ml_dsa_peer_under_an_ml_dsa_ca_is_allowed(pq_ca: Authority) -> None:
    peer = as_peer(pq_ca.issue_svid(FRONTEND_ID, key_kind="ml-dsa-65"))
    assert (peer.signature_algorithm, peer.issuer_signature_algorithm) == ("ML-DSA-65", "ML-DSA-65")
    assert peer.post_quantum_signature
    assert policy(require_pq_signature=True).decide(peer, SAY_HELLO, local_trust_domain=LOCAL).allowed


def test_an_ecdsa_peer_is_denied_naming_its_algorithm(ca: Authority) -> None:
    peer = as_peer(ca.issue_svid(FRONTEND_ID))
    decision = policy(require_pq_signature=True).decide(peer, SAY_HELLO, local_trust_domain=LOCAL)
    assert not decision.allowed and decision.rule is None
    assert "the peer authenticated with ECDSA-P256, a classical signature" in decision.reason
    assert policy().decide(peer, SAY_HELLO, local_trust_domain=LOCAL).allowed  # off by default


def test_an_ml_dsa_key_under_a_classical_ca_is_not_a_post_quantum_signature(ca: Authority) -> None:
    """Forging the CA's ECDSA signature forges the leaf: the chain, not the key alone, must be PQ."""
    key = generate_key("ml-dsa-65")
    chain = ca.sign_svid(meshid.SpiffeId.parse(FRONTEND_ID), key.public_key())
    peer = as_peer(meshid.X509Svid.from_parts(chain, key))
    assert (peer.signature_algorithm, peer.issuer_signature_algorithm) == ("ML-DSA-65", "ECDSA-SHA256")
    assert not peer.post_quantum_signature
    assert not policy(require_pq_signature=True).decide(peer, SAY_HELLO, local_trust_domain=LOCAL).allowed


def test_require_pq_signature_must_be_a_boolean() -> None:
    with pytest.raises(meshid.InvalidPolicyError, match="'require_pq_signature' must be true or false"):
        policy(require_pq_signature="yes")


def test_load_override_sets_it_for_a_policy_file(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nallow:\n  - name: f\n    methods: ['*']\n    spiffe_ids: ['{FRONTEND_ID}']\n")
    assert not meshid.AuthorizationPolicy.load(path).require_pq_signature
    assert meshid.AuthorizationPolicy.load(path, require_pq_signature=True).require_pq_signature


def test_on_grpcio_today_require_pq_signature_denies_every_peer_with_permission_denied(
    ca: Authority, bundles: meshid.BundleSet, server_source: meshid.StaticSource
) -> None:
    """grpcio cannot carry an ML-DSA SVID yet, so such a policy there denies (as it should) every caller."""
    interceptor = meshid.AuthorizationInterceptor(policy(require_pq_signature=True), source=server_source)
    client = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(
            f"127.0.0.1:{port}", client, server_id=server_source.get_svid().spiffe_id
        ) as channel:
            with pytest.raises(grpc.RpcError) as info:
                stub(channel).SayHello(hello(), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
