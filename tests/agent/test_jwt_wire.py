"""The Workload API's JWT wire format (issue #16), both ways: JWTBundlesResponse built from bundles
(jwt-svid keys only, every trust domain) and read back strictly into them."""

from __future__ import annotations

import json

import jwt
import pytest

import meshid
from meshid._proto import workload_pb2
from meshid.ca import Authority
from meshid.ca.jwt_keys import JwtKeys
from meshid.workloadapi import wire

TD = meshid.TrustDomain.parse("example.org")


@pytest.fixture
def bundles() -> tuple[meshid.BundleSet, JwtKeys]:
    keys = JwtKeys.generate("ec-p384").prepare()
    authority = Authority.create_root(TD)
    return meshid.BundleSet.of(meshid.TrustBundle(TD, authority.roots).with_jwt_authorities(keys.published)), keys


def test_jwt_bundles_round_trip_with_jwt_svid_keys_only(bundles) -> None:
    bundle_set, keys = bundles
    response = wire.jwt_bundles_response(bundle_set)
    document = json.loads(response.bundles["spiffe://example.org"])
    assert {k["use"] for k in document["keys"]} == {"jwt-svid"}  # no x509-svid key, as the standard requires
    assert {k["kid"] for k in document["keys"]} == set(keys.published)
    assert len(jwt.PyJWKSet.from_json(response.bundles["spiffe://example.org"]).keys) == 2
    x509_only = meshid.BundleSet.of(meshid.TrustBundle(TD, bundle_set[TD].roots))
    back = wire.parse_jwt_bundles_response(response, x509_only)
    assert wire.same_trust(back[TD], bundle_set[TD])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda key: {**key, "d": "AAAA"}, "private members"),
        (lambda key: {**key, "use": "x509-svid"}, "not a jwt-svid JWK"),
        (lambda key: {k: v for k, v in key.items() if k != "kid"}, "empty or repeated kid"),
        (lambda key: {**key, "kty": "oct", "k": "c2VjcmV0"}, "private members"),
        (lambda key: {**key, "x": "AAAA"}, r"JWT bundle for example\.org"),
    ],
    ids=["private-key", "other-use", "no-kid", "hmac-secret", "bad-coordinate"],
)
def test_a_jwt_bundle_that_breaks_a_rule_is_refused(bundles, mutate, reason) -> None:
    bundle_set, _ = bundles
    response = wire.jwt_bundles_response(bundle_set)
    document = json.loads(response.bundles["spiffe://example.org"])
    document["keys"][0] = mutate(document["keys"][0])
    broken = workload_pb2.JWTBundlesResponse(bundles={"spiffe://example.org": json.dumps(document).encode()})
    with pytest.raises(meshid.InvalidBundleError, match=reason):
        wire.parse_jwt_bundles_response(broken, bundle_set)


def test_a_repeated_kid_and_a_document_that_is_no_jwk_set_are_refused(bundles) -> None:
    bundle_set, _ = bundles
    document = json.loads(wire.jwt_bundles_response(bundle_set).bundles["spiffe://example.org"])
    twice = {"keys": [document["keys"][0], document["keys"][0]]}
    for raw in (json.dumps(twice).encode(), b"not json", b"[]", b'{"keys": {}}'):
        broken = workload_pb2.JWTBundlesResponse(bundles={"spiffe://example.org": raw})
        with pytest.raises(meshid.InvalidBundleError, match=r"JWT bundle for example\.org"):
            wire.parse_jwt_bundles_response(broken, bundle_set)
