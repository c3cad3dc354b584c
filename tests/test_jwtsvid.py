"""JWT-SVIDs signed and validated as the SPIFFE JWT-SVID standard says.

Tokens are signed with real keys made by meshid's CA code (``generate_key``) and validated
against bundles whose ``jwt_authorities`` publish the public halves. Each refusal test is named
after the rule the token breaks; the attack tokens that meshid (and PyJWT) would never sign are
assembled here by hand, byte for byte, as an attacker would.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshid
from meshid.ca import Authority, generate_key
from meshid.jwtsvid import JWT_SVID_MAX_BYTES, sign_jwt_svid

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
CALLER = meshid.SpiffeId.parse("spiffe://example.org/ns/prod/sa/frontend")
SERVER = "spiffe://example.org/ns/prod/sa/greeter"
KEY = generate_key("ec-p256")
OTHER_KEY = generate_key("ec-p256")
MINUTES_5 = datetime.timedelta(minutes=5)


@pytest.fixture(scope="module")
def bundles(ca: Authority, other_ca: Authority) -> meshid.BundleSet:
    return meshid.BundleSet.of(
        meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"k1": KEY.public_key()}),
        meshid.TrustBundle(other_ca.trust_domain, other_ca.roots, jwt_authorities={"o1": OTHER_KEY.public_key()}),
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": str(CALLER),
        "aud": SERVER,
        "exp": int((NOW + MINUTES_5).timestamp()),
        "iat": int(NOW.timestamp()),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _signed(claims: dict[str, Any], *, key: Any = KEY, kid: str = "k1", alg: str = "ES256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, **headers})


def _assembled(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


def _refused(token: str, bundles: meshid.BundleSet, fragment: str, *, audience: Any = (SERVER,)) -> str:
    with pytest.raises(meshid.InvalidJwtSvidError) as info:
        meshid.JwtSvid.parse_and_validate(token, bundles, audience, now=NOW)
    message = str(info.value)
    assert message.startswith("JWT-SVID: "), message
    assert fragment in message, message
    assert len(token) < 20 or token not in message  # the bearer token is never echoed back
    return message


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "alg"), [("ec-p256", "ES256"), ("ec-p384", "ES384"), ("rsa-2048", "RS256")])
def test_a_signed_token_validates_and_says_who(ca: Authority, kind: str, alg: str) -> None:
    key = generate_key(kind)
    bundles = meshid.BundleSet.of(
        meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"a": key.public_key()})
    )
    signed = sign_jwt_svid(key, "a", CALLER, [SERVER], lifetime=MINUTES_5, now=NOW)
    assert jwt.get_unverified_header(signed.token) == {"alg": alg, "kid": "a", "typ": "JWT"}
    svid = meshid.JwtSvid.parse_and_validate(signed.token, bundles, [SERVER], now=NOW + datetime.timedelta(minutes=1))
    assert svid == signed
    assert (svid.spiffe_id, svid.audience, svid.key_id) == (CALLER, (SERVER,), "a")
    assert svid.expiry == NOW + MINUTES_5 and svid.issued_at == NOW
    assert svid.claims["sub"] == str(CALLER)
    assert signed.token not in repr(svid)


def test_one_of_several_audiences_is_enough(bundles: meshid.BundleSet) -> None:
    token = sign_jwt_svid(KEY, "k1", CALLER, ["a", "b"], lifetime=MINUTES_5, now=NOW).token
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == ["a", "b"]
    assert meshid.JwtSvid.parse_and_validate(token, bundles, ["x", "b"], now=NOW).audience == ("a", "b")


def test_claims_are_read_only(bundles: meshid.BundleSet) -> None:
    svid = meshid.JwtSvid.parse_and_validate(_signed(_claims()), bundles, [SERVER], now=NOW)
    with pytest.raises(TypeError):
        svid.claims["sub"] = "spiffe://example.org/other"  # type: ignore[index]


def test_parse_insecure_reads_without_bundles_and_checks_the_audience_if_asked() -> None:
    token = _signed(_claims(exp=1))  # long expired: parse_insecure checks no time and no signature
    assert meshid.JwtSvid.parse_insecure(token).spiffe_id == CALLER
    assert meshid.JwtSvid.parse_insecure(token, [SERVER]).audience == (SERVER,)
    with pytest.raises(meshid.InvalidJwtSvidError, match="does not name"):
        meshid.JwtSvid.parse_insecure(token, ["elsewhere"])
    with pytest.raises(meshid.InvalidJwtSvidError, match="alg 'none'"):
        meshid.JwtSvid.parse_insecure(_assembled({"alg": "none", "kid": "k1"}, _claims()))


def test_a_leeway_admits_small_skew(bundles: meshid.BundleSet) -> None:
    token = _signed(_claims())
    late = NOW + MINUTES_5 + datetime.timedelta(seconds=10)
    assert meshid.JwtSvid.parse_and_validate(token, bundles, [SERVER], now=late).spiffe_id == CALLER
    with pytest.raises(meshid.InvalidJwtSvidError, match="expired"):
        meshid.JwtSvid.parse_and_validate(token, bundles, [SERVER], now=late, leeway=0)


def test_validation_needs_an_audience(bundles: meshid.BundleSet) -> None:
    with pytest.raises(ValueError, match="audience"):
        meshid.JwtSvid.parse_and_validate(_signed(_claims()), bundles, [], now=NOW)


def test_signing_refuses_what_would_not_validate() -> None:
    with pytest.raises(ValueError, match="audience"):
        sign_jwt_svid(KEY, "k1", CALLER, [], lifetime=MINUTES_5, now=NOW)
    with pytest.raises(ValueError, match="lifetime"):
        sign_jwt_svid(KEY, "k1", CALLER, [SERVER], lifetime=datetime.timedelta(0), now=NOW)
    with pytest.raises(ValueError, match="Ed25519"):
        sign_jwt_svid(generate_key("ed25519"), "k1", CALLER, [SERVER], lifetime=MINUTES_5, now=NOW)


# --- the "bad tokens", each refused with its reason -----------------------------------------


def test_alg_none_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_assembled({"alg": "none", "kid": "k1", "typ": "JWT"}, _claims()), bundles, "alg 'none' is refused")
    _refused(jwt.encode(_claims(), None, algorithm="none", headers={"kid": "k1"}), bundles, "alg 'none'")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_hmac_with_the_public_key_as_secret_is_refused(
    bundles: meshid.BundleSet, alg: str, encoding: serialization.Encoding
) -> None:
    # Key confusion: the attacker knows the published public key and "signs" with it as an HMAC secret.
    secret = KEY.public_key().public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": alg, "kid": "k1", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    token = f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), digest).digest())}"
    _refused(token, bundles, "is an HMAC algorithm, refused")


def test_an_algorithm_outside_the_standard_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_assembled({"alg": "EdDSA", "kid": "k1"}, _claims()), bundles, "not one the JWT-SVID standard allows")
    _refused(_assembled({"kid": "k1"}, _claims()), bundles, "alg None is not one")


def test_an_alg_that_does_not_fit_the_key_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_assembled({"alg": "RS256", "kid": "k1"}, _claims(), b"x" * 256), bundles, "does not fit key 'k1'")
    _refused(_assembled({"alg": "ES384", "kid": "k1"}, _claims(), b"x" * 96), bundles, "does not fit key 'k1'")


def test_an_unknown_kid_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(), kid="nope"), bundles, "kid 'nope' is not a JWT key of trust domain example.org")


def test_a_missing_kid_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(jwt.encode(_claims(), KEY, algorithm="ES256"), bundles, "header has no kid")


def test_a_key_of_another_trust_domain_is_refused(
    bundles: meshid.BundleSet, ca: Authority, other_ca: Authority
) -> None:
    # other.org's key, named by its own kid, cannot sign for an example.org sub ...
    _refused(
        _signed(_claims(), key=OTHER_KEY, kid="o1"), bundles, "kid 'o1' is not a JWT key of trust domain example.org"
    )
    # ... nor by borrowing a kid that example.org also publishes.
    shared = meshid.BundleSet.of(
        meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"k1": KEY.public_key()}),
        meshid.TrustBundle(other_ca.trust_domain, other_ca.roots, jwt_authorities={"k1": OTHER_KEY.public_key()}),
    )
    _refused(
        _signed(_claims(), key=OTHER_KEY, kid="k1"),
        shared,
        "signature does not verify with key 'k1' of trust domain example.org",
    )
    # The same token names other.org's workload fine.
    partner = _signed(_claims(sub="spiffe://other.org/partner"), key=OTHER_KEY, kid="k1")
    assert (
        meshid.JwtSvid.parse_and_validate(partner, shared, [SERVER], now=NOW).spiffe_id.trust_domain
        == other_ca.trust_domain
    )


def test_a_trust_domain_without_a_bundle_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(sub="spiffe://third.org/x")), bundles, "no trust bundle for trust domain third.org")


def test_a_tampered_token_is_refused(bundles: meshid.BundleSet) -> None:
    header, _, signature = _signed(_claims()).split(".")
    forged = _b64(json.dumps(_claims(sub="spiffe://example.org/ns/prod/sa/admin")).encode())
    _refused(f"{header}.{forged}.{signature}", bundles, "signature does not verify")
    _refused(f"{header}.{forged}.", bundles, "signature")


def test_an_expired_token_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(exp=int((NOW - datetime.timedelta(minutes=1)).timestamp()))), bundles, "token expired at")


def test_a_token_not_yet_valid_is_refused(bundles: meshid.BundleSet) -> None:
    later = int((NOW + datetime.timedelta(minutes=2)).timestamp())
    _refused(_signed(_claims(nbf=later)), bundles, "not yet valid (nbf")
    _refused(_signed(_claims(iat=later)), bundles, "not yet valid (iat")


def test_a_missing_exp_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(exp=None)), bundles, "claim 'exp' is missing")
    _refused(_signed(_claims(exp="soon")), bundles, "claim 'exp' must be a NumericDate")


def test_a_wrong_audience_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(aud="spiffe://example.org/ns/prod/sa/billing")), bundles, "does not name this server")
    _refused(_signed(_claims(aud=["a", "b"])), bundles, "does not name this server")


def test_a_missing_or_empty_audience_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(aud=None)), bundles, "claim 'aud' is missing")
    _refused(_signed(_claims(aud=[])), bundles, "claim 'aud' must be")
    _refused(_signed(_claims(aud=[SERVER, 7])), bundles, "claim 'aud' must be")


@pytest.mark.parametrize(
    "sub",
    ["https://example.org/frontend", "spiffe://EXAMPLE.org/frontend", "spiffe://example.org/a/../b", "frontend"],
)
def test_a_sub_that_is_not_a_spiffe_id_is_refused(bundles: meshid.BundleSet, sub: str) -> None:
    _refused(_signed(_claims(sub=sub)), bundles, "claim 'sub' is not a SPIFFE ID")


def test_a_missing_sub_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(sub=None)), bundles, "claim 'sub' is missing")
    _refused(_signed(_claims(sub=42)), bundles, "claim 'sub' must be a SPIFFE ID string")


def test_a_token_over_8_kib_is_refused_before_parsing(bundles: meshid.BundleSet) -> None:
    big = _signed(_claims(padding="x" * JWT_SVID_MAX_BYTES))  # validly signed, merely too big
    _refused(big, bundles, f"more than the {JWT_SVID_MAX_BYTES} allowed")
    _refused("!" * (JWT_SVID_MAX_BYTES + 1), bundles, "more than the")  # refused by size, not as noise


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "e30.e30.sig with spaces",
        "eyJhbGciOiJFUzI1NiJ9+.e30.AA",  # '+' is base64, not base64url
        "e.e30.AA",  # a base64url part of impossible length
    ],
)
def test_malformed_base64_is_refused(bundles: meshid.BundleSet, token: str) -> None:
    _refused(token, bundles, "malformed token")


def test_malformed_json_is_refused(bundles: meshid.BundleSet) -> None:
    good_header = _b64(json.dumps({"alg": "ES256", "kid": "k1"}).encode())
    _refused(f"{_b64(b'{not json')}.{_b64(b'{}')}.AA", bundles, "malformed token")
    _refused(f"{_b64(b'[1]')}.{_b64(b'{}')}.AA", bundles, "malformed token")
    _refused(f"{good_header}.{_b64(b'{not json')}.AA", bundles, "the claims are not JSON")
    _refused(f"{good_header}.{_b64(b'[1, 2]')}.AA", bundles, "the claims are not a JSON object")
    _refused(f"{good_header}.{_b64(b'[' * 3000)}.AA", bundles, "malformed token")


def test_a_header_outside_the_standard_is_refused(bundles: meshid.BundleSet) -> None:
    _refused(_signed(_claims(), typ="JWS"), bundles, "typ 'JWS' is not 'JWT' or 'JOSE'")
    _refused(_signed(_claims(), jku="https://evil.example/keys"), bundles, "header parameter 'jku' is not allowed")
    assert meshid.JwtSvid.parse_and_validate(_signed(_claims(), typ="JOSE"), bundles, [SERVER], now=NOW)


def test_py_spiffe_validates_a_token_meshid_signed(ca: Authority) -> None:
    import spiffe

    now = datetime.datetime.now(datetime.UTC)  # py-spiffe checks exp against the system clock
    token = sign_jwt_svid(KEY, "k1", CALLER, [SERVER], lifetime=MINUTES_5, now=now).token
    doc = json.loads(
        meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"k1": KEY.public_key()}).to_spiffe_json()
    )
    jwt_keys = json.dumps({"keys": [k for k in doc["keys"] if k["use"] == "jwt-svid"]}).encode()
    theirs = spiffe.JwtSvid.parse_and_validate(
        token, spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), jwt_keys), {SERVER}
    )
    assert str(theirs.spiffe_id) == str(CALLER)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(lambda a, b, c: f"{a}.{b}.{c}", *[st.text("ABCDEFabcdef0123456789-_", max_size=60)] * 3),
        st.builds(
            lambda h, c: f"{_b64(h)}.{_b64(c)}.AA",
            st.binary(max_size=80),
            st.binary(max_size=80),
        ),
    )
)
def test_any_input_is_refused_with_a_jwt_svid_error_and_nothing_else(bundles: meshid.BundleSet, token: str) -> None:
    with pytest.raises(meshid.InvalidJwtSvidError):
        meshid.JwtSvid.parse_and_validate(token, bundles, [SERVER], now=NOW)
