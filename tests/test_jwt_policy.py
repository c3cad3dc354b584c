"""The policy knob for JWT-SVIDs: ``identity_sources`` and ``jwt_audiences`` (native YAML, and
loader options for gRPC authz JSON), and how the pure decision core treats a JWT caller."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

import meshid
from meshid.ca import Authority, generate_key
from meshid.jwtsvid import sign_jwt_svid

FRONTEND = "spiffe://example.org/ns/prod/sa/frontend"
METHOD = "/meshid.examples.v1.Greeter/SayHello"
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def _jwt_peer(spiffe_id: str = FRONTEND) -> meshid.PeerIdentity:
    svid = sign_jwt_svid(
        generate_key(), "k1", meshid.SpiffeId.parse(spiffe_id), ["x"], lifetime=datetime.timedelta(minutes=5), now=NOW
    )
    return meshid.PeerIdentity.from_jwt_svid(svid)


def _policy(**top: Any) -> meshid.AuthorizationPolicy:
    rules = top.pop("allow", [{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND]}])
    return meshid.AuthorizationPolicy.from_dict({"allow": rules, **top})


def _refused(fragment: str, **top: Any) -> None:
    with pytest.raises(meshid.InvalidPolicyError) as info:
        _policy(**top)
    assert fragment in str(info.value), str(info.value)


def test_the_default_accepts_certificates_only() -> None:
    policy = _policy()
    assert policy.identity_sources == {"x509"} and not policy.accepts_jwt and policy.jwt_audiences == frozenset()
    decision = policy.decide(_jwt_peer(), METHOD)
    assert not decision.allowed and "does not accept" in decision.reason and decision.explained


def test_identity_sources_and_audiences_are_read() -> None:
    policy = _policy(identity_sources=["x509", "jwt"], jwt_audiences=["greeter", "spiffe://example.org/greeter"])
    assert policy.accepts_jwt and policy.accepts_x509
    assert policy.jwt_audiences == {"greeter", "spiffe://example.org/greeter"}
    assert policy.decide(_jwt_peer(), METHOD).allowed
    only_jwt = _policy(identity_sources=["jwt"])
    assert only_jwt.accepts_jwt and not only_jwt.accepts_x509


@pytest.mark.parametrize("value", [[], ["saml"], "jwt", [1], None])
def test_an_identity_source_outside_x509_and_jwt_is_refused(value: Any) -> None:
    _refused("'identity_sources' must be a non-empty list of x509 and/or jwt", identity_sources=value)


@pytest.mark.parametrize("value", [[], [""], "greeter", [7], ["a" * 3000]])
def test_malformed_jwt_audiences_are_refused(value: Any) -> None:
    _refused("'jwt_audiences' must be a non-empty list", identity_sources=["jwt"], jwt_audiences=value)


def test_jwt_audiences_without_jwt_are_refused() -> None:
    _refused("identity_sources does not list jwt", jwt_audiences=["greeter"])


def test_a_rule_may_not_name_a_source_its_policy_leaves_out() -> None:
    rule = {"name": "r", "methods": ["*"], "spiffe_ids": [FRONTEND], "identity_sources": ["jwt"]}
    _refused("which the policy does not accept", allow=[rule])


def test_a_rule_narrows_its_identity_sources() -> None:
    rule = {"name": "ops", "methods": ["*"], "spiffe_ids": [FRONTEND], "identity_sources": ["x509"]}
    policy = _policy(identity_sources=["x509", "jwt"], allow=[rule])
    assert not policy.decide(_jwt_peer(), METHOD).allowed


def test_a_jwt_caller_never_matches_certificate_conditions(ca: Authority) -> None:
    cert_rules = [
        {"name": "subject", "methods": ["*"], "subject_patterns": [".*"]},
        {"name": "dns", "methods": ["*"], "dns_names": ["frontend.example.org"]},
        {"name": "thumb", "methods": ["*"], "thumbprints": ["ab" * 32]},
    ]
    policy = _policy(identity_sources=["x509", "jwt"], allow_non_spiffe_peers=True, allow=cert_rules)
    local = meshid.TrustDomain.parse("example.org")
    decision = policy.decide(_jwt_peer(), METHOD, local_trust_domain=local)
    assert not decision.allowed and decision.rule is None
    by_td = _policy(
        identity_sources=["jwt"], allow=[{"name": "td", "methods": ["*"], "trust_domains": ["example.org"]}]
    )
    assert by_td.decide(_jwt_peer(), METHOD).allowed


def test_grpc_authz_json_takes_the_knob_from_the_loader(tmp_path: Any) -> None:
    doc = {"name": "g", "allow_rules": [{"name": "f", "source": {"principals": [FRONTEND]}}]}
    assert not meshid.AuthorizationPolicy.from_dict(doc).accepts_jwt
    policy = meshid.AuthorizationPolicy.from_dict(doc, identity_sources=["jwt"], jwt_audiences=["greeter"])
    assert policy.identity_sources == {"jwt"} and policy.jwt_audiences == {"greeter"}
    assert policy.decide(_jwt_peer(), METHOD).allowed  # principals match the token's SPIFFE ID
    path = tmp_path / "policy.json"
    path.write_text(__import__("json").dumps(doc))
    assert meshid.AuthorizationPolicy.load(path, identity_sources=["x509", "jwt"]).accepts_jwt
    with pytest.raises(meshid.InvalidPolicyError, match="identity_sources"):
        meshid.AuthorizationPolicy.from_dict(doc, identity_sources=["oauth"])


def test_a_loader_override_may_not_leave_out_a_rules_source() -> None:
    rule = {"name": "r", "methods": ["*"], "spiffe_ids": [FRONTEND], "identity_sources": ["jwt"]}
    data = {"identity_sources": ["x509", "jwt"], "allow": [rule]}
    with pytest.raises(meshid.InvalidPolicyError, match="rule 'r' names an identity source"):
        meshid.AuthorizationPolicy.from_dict(data, identity_sources=["x509"])


def test_a_certificate_peer_is_what_it_was(ca: Authority) -> None:
    peer = meshid.PeerIdentity.from_certificate(ca.issue_svid(FRONTEND).leaf, spiffe_id=meshid.SpiffeId.parse(FRONTEND))
    assert peer.source == "x509" and peer.jwt_svid is None and peer.certificate is not None
    jwt_peer = _jwt_peer()
    assert jwt_peer.source == "jwt" and jwt_peer.certificate is None and jwt_peer.serial is None
    assert jwt_peer.uri_sans == (FRONTEND,) and jwt_peer.not_after == NOW + datetime.timedelta(minutes=5)
    assert jwt_peer.jwt_svid is not None and jwt_peer.jwt_svid.token not in repr(jwt_peer)
