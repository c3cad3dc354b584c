"""TrustBundle (PEM and SPIFFE bundle JSON) and BundleSet verification.

The JSON rules are those of the SPIFFE X509-SVID standard §6 (publishing and consuming bundle
elements) and the Trust Domain and Bundle standard. BundleSet is checked for the rule that
matters most: a chain is verified only against the bundle of its own SPIFFE ID's trust domain.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import meshid
from meshid.ca import Authority, generate_key
from support import forge

WORKLOAD = "spiffe://example.org/ns/prod/sa/greeter"
PARTNER = "spiffe://other.org/ns/prod/sa/partner"
EXAMPLE = meshid.TrustDomain.parse("example.org")
OTHER = meshid.TrustDomain.parse("other.org")


def _pem(certs: Any) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _der_b64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _write(path: Path, data: bytes | str) -> Path:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def _bundle(authority: Authority, **kw: Any) -> meshid.TrustBundle:
    return meshid.TrustBundle(authority.trust_domain, authority.roots, **kw)


def _refused_json(doc: Any, fragment: str) -> str:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(meshid.InvalidBundleError) as info:
        meshid.TrustBundle.from_spiffe_json("example.org", text)
    message = str(info.value)
    assert message.startswith("trust bundle for example.org:"), message
    assert fragment in message, message
    return message


def _refused_pem(data: bytes, fragment: str) -> str:
    with pytest.raises(meshid.InvalidBundleError) as info:
        meshid.TrustBundle.from_pem("example.org", data)
    message = str(info.value)
    assert message.startswith("trust bundle for example.org:"), message
    assert fragment in message, message
    return message


# --- PEM -----------------------------------------------------------------------------------


def test_pem_bundle_reads_every_root(ca: Authority, other_ca: Authority) -> None:
    bundle = meshid.TrustBundle.from_pem("example.org", _pem([*ca.roots, *other_ca.roots]))
    assert bundle.trust_domain == EXAMPLE
    assert bundle.roots == (*ca.roots, *other_ca.roots)
    assert bundle.to_pem() == _pem([*ca.roots, *other_ca.roots])


def test_pem_bundle_accepts_text_and_a_trust_domain_object(ca: Authority) -> None:
    by_text = meshid.TrustBundle.from_pem("example.org", _pem(ca.roots).decode())
    by_object = meshid.TrustBundle.from_pem(EXAMPLE, _pem(ca.roots))
    assert by_text == by_object == _bundle(ca)


def test_non_ca_certificate_in_a_pem_bundle_is_refused(ca: Authority) -> None:
    leaf = ca.issue_svid(WORKLOAD).leaf
    _refused_pem(_pem([*ca.roots, leaf]), "certificate 1 is not a CA")


def test_private_key_block_in_a_bundle_is_refused(ca: Authority) -> None:
    key_pem = ca.issue_svid(WORKLOAD).key_pem()
    _refused_pem(_pem(ca.roots) + key_pem, "block 1 is a 'PRIVATE KEY', expected 'CERTIFICATE'")


def test_garbage_der_in_a_pem_bundle_is_refused() -> None:
    garbage = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    _refused_pem(garbage, "block 0 is not a valid certificate")


def test_pem_bundle_with_no_certificate_is_refused() -> None:
    _refused_pem(b"just some text\n", "no PEM certificate found")


def test_oversized_pem_bundle_is_refused(ca: Authority) -> None:
    _refused_pem(_pem(ca.roots) + b"\n" * (1 << 20), "larger than")


def test_bundle_with_no_roots_is_refused() -> None:
    with pytest.raises(meshid.InvalidBundleError, match="holds no root certificate"):
        meshid.TrustBundle(EXAMPLE, ())


def test_invalid_bundle_error_is_a_value_error_and_a_meshid_error() -> None:
    assert issubclass(meshid.InvalidBundleError, ValueError)
    assert issubclass(meshid.InvalidBundleError, meshid.MeshIdError)


# --- load: PEM or JSON, told apart by content ----------------------------------------------


@pytest.mark.parametrize("form", ["pem", "json", "json-indented"])
def test_load_tells_pem_and_json_apart_by_content(form: str, ca: Authority, tmp_path: Path) -> None:
    bundle = _bundle(ca, sequence=4)
    data = {
        "pem": bundle.to_pem(),
        "json": bundle.to_spiffe_json().encode(),
        "json-indented": b"\n  \t" + bundle.to_spiffe_json().encode(),
    }[form]
    path = _write(tmp_path / "bundle", data)  # no file extension to go by
    loaded = meshid.TrustBundle.load("example.org", path)
    assert loaded.roots == ca.roots
    assert loaded.sequence == (None if form == "pem" else 4)


def test_load_of_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(meshid.InvalidBundleError) as info:
        meshid.TrustBundle.load("example.org", missing)
    assert "cannot read" in str(info.value)
    assert str(missing) in str(info.value)


def test_load_of_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bundle.json", '{"keys": [')
    with pytest.raises(meshid.InvalidBundleError) as info:
        meshid.TrustBundle.load("example.org", path)
    assert "not valid JSON" in str(info.value)
    assert str(path) in str(info.value)


# --- SPIFFE bundle JSON: publishing (X509-SVID §6.1) ---------------------------------------


def test_spiffe_json_round_trip_keeps_sequence_and_refresh_hint(ca: Authority, other_ca: Authority) -> None:
    bundle = meshid.TrustBundle(EXAMPLE, (*ca.roots, *other_ca.roots), sequence=42, refresh_hint=300)
    again = meshid.TrustBundle.from_spiffe_json("example.org", bundle.to_spiffe_json())
    assert again == bundle
    assert again.roots == bundle.roots
    assert again.sequence == 42
    assert again.refresh_hint == 300
    doc = json.loads(bundle.to_spiffe_json())
    assert doc["spiffe_sequence"] == 42
    assert doc["spiffe_refresh_hint"] == 300


def test_spiffe_json_without_sequence_has_no_sequence_field(ca: Authority) -> None:
    doc = json.loads(_bundle(ca).to_spiffe_json())
    assert "spiffe_sequence" not in doc
    assert meshid.TrustBundle.from_spiffe_json("example.org", json.dumps(doc)).sequence is None


@pytest.mark.parametrize(("kind", "crv"), [("ec-p256", "P-256"), ("ec-p384", "P-384")])
def test_spiffe_json_publishes_an_ec_root_as_an_x509_svid_jwk(kind: str, crv: str) -> None:
    authority = Authority.create_root("example.org", key=generate_key(kind))
    (key,) = json.loads(_bundle(authority).to_spiffe_json())["keys"]

    assert key["use"] == "x509-svid"
    assert "kid" not in key  # §6.1: kid MUST NOT be set
    assert key["x5c"] == [_der_b64(authority.certificate)]  # exactly one CA certificate
    assert key["kty"] == "EC"
    assert key["crv"] == crv
    public = authority.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    assert _b64url_int(key["x"]) == numbers.x
    assert _b64url_int(key["y"]) == numbers.y
    size = (public.curve.key_size + 7) // 8
    assert len(base64.urlsafe_b64decode(key["x"] + "==")) == size  # RFC 7518 §6.2.1.2: full length
    assert "=" not in key["x"] + key["y"]  # base64url without padding


def test_spiffe_json_publishes_an_rsa_root_as_an_x509_svid_jwk() -> None:
    authority = Authority.create_root("example.org", key=generate_key("rsa-2048"))
    (key,) = json.loads(_bundle(authority).to_spiffe_json())["keys"]
    assert key["use"] == "x509-svid"
    assert "kid" not in key
    assert key["kty"] == "RSA"
    public = authority.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert _b64url_int(key["n"]) == public.public_numbers().n
    assert _b64url_int(key["e"]) == 65537
    assert key["x5c"] == [_der_b64(authority.certificate)]


def test_spiffe_json_publishes_an_ed25519_root_as_a_complete_okp_jwk() -> None:
    # meshid's CA refuses EdDSA CA keys, but a bundle may carry another authority's Ed25519 root.
    root = _self_signed_ca(generate_key("ed25519"))
    (key,) = json.loads(meshid.TrustBundle(meshid.TrustDomain.parse("example.org"), (root,)).to_spiffe_json())["keys"]
    assert key["kty"] == "OKP"
    assert key["crv"] == "Ed25519"
    raw = root.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.urlsafe_b64decode(key["x"] + "=") == raw


# --- SPIFFE bundle JSON: consuming (X509-SVID §6.2) ----------------------------------------


def test_keys_with_another_use_are_skipped(ca: Authority) -> None:
    x509_key = json.loads(_bundle(ca).to_spiffe_json())["keys"][0]
    jwt_key = {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": x509_key["x"], "y": x509_key["y"]}
    with_x5c = {**x509_key, "use": "jwt-svid", "kid": "k2"}  # an x5c alone does not make it an X.509 root
    bundle = meshid.TrustBundle.from_spiffe_json("example.org", json.dumps({"keys": [jwt_key, with_x5c, x509_key]}))
    assert bundle.roots == ca.roots


def test_x509_svid_key_without_x5c_is_ignored(ca: Authority) -> None:
    good = json.loads(_bundle(ca).to_spiffe_json())["keys"][0]
    no_x5c = {k: v for k, v in good.items() if k != "x5c"}
    empty_x5c = {**good, "x5c": []}
    bundle = meshid.TrustBundle.from_spiffe_json("example.org", json.dumps({"keys": [no_x5c, empty_x5c, good]}))
    assert bundle.roots == ca.roots


def test_x5c_values_after_the_first_are_ignored(ca: Authority, other_ca: Authority) -> None:
    key = {"use": "x509-svid", "kty": "EC", "x5c": [_der_b64(ca.certificate), _der_b64(other_ca.certificate)]}
    bundle = meshid.TrustBundle.from_spiffe_json("example.org", json.dumps({"keys": [key]}))
    assert bundle.roots == (ca.certificate,)


def test_bundle_with_no_x509_svid_key_is_refused(ca: Authority) -> None:
    # A jwt-svid key is a JWT authority, never a root, even if it carries a certificate.
    jwt_only = {"keys": [_ec_jwk(kid="k1", x5c=[_der_b64(ca.certificate)])]}
    _refused_json(jwt_only, "no 'x509-svid' key with a certificate")


def test_bundle_whose_only_x509_svid_key_has_no_x5c_is_refused() -> None:
    _refused_json({"keys": [{"use": "x509-svid", "kty": "EC"}]}, "no 'x509-svid' key with a certificate")


def test_malformed_json_is_refused() -> None:
    _refused_json('{"keys": [', "not valid JSON")


@pytest.mark.parametrize("text", ["[]", '"keys"', "3", "null", '{"keys": {}}', '{"no_keys": []}'])
def test_json_that_is_not_an_object_with_a_keys_list_is_refused(text: str) -> None:
    _refused_json(text, "a SPIFFE bundle is a JSON object with a 'keys' list")


def test_key_that_is_not_an_object_is_refused(ca: Authority) -> None:
    _refused_json({"keys": ["x509-svid"]}, "key 0 is not an object")


def test_x5c_that_is_not_base64_is_refused() -> None:
    _refused_json(
        {"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["not base64!"]}]}, "x5c[0] is not a DER certificate"
    )


def test_x5c_that_is_not_a_der_certificate_is_refused() -> None:
    key = {"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(b"not a certificate").decode()]}
    _refused_json({"keys": [key]}, "key 0 x5c[0] is not a DER certificate")


def test_x5c_that_is_not_a_string_is_refused() -> None:
    _refused_json({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [42]}]}, "x5c[0] is not a DER certificate")


def test_non_ca_certificate_in_a_json_bundle_is_refused(ca: Authority) -> None:
    leaf = ca.issue_svid(WORKLOAD).leaf
    _refused_json({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [_der_b64(leaf)]}]}, "not a CA")


def test_oversized_json_bundle_is_refused(ca: Authority) -> None:
    _refused_json(_bundle(ca).to_spiffe_json() + " " * (1 << 20), "larger than")


# --- the JSON format checked against py-spiffe ---------------------------------------------


def test_py_spiffe_reads_the_same_roots_from_the_published_bundle(ca: Authority, other_ca: Authority) -> None:
    """py-spiffe 0.3.x has no SPIFFE-bundle-JSON parser for X.509 (X509Bundle parses PEM or DER
    only, and JwtBundle.parse insists on a 'kid' that §6.1 forbids on x509-svid keys). So the
    x5c values are fed to X509Bundle.parse_raw, and the JWK set to PyJWT, which is the JWKS
    parser JwtBundle.parse uses, to check that each JWK's key is its certificate's key."""
    import jwt  # PyJWT: the key-set parser py-spiffe itself uses
    import spiffe
    roots = (*ca.roots, *other_ca.roots)
    published = meshid.TrustBundle(EXAMPLE, roots, sequence=1).to_spiffe_json()
    keys = json.loads(published)["keys"]

    ders = b"".join(base64.b64decode(k["x5c"][0]) for k in keys)
    theirs = spiffe.X509Bundle.parse_raw(spiffe.TrustDomain("example.org"), ders)
    assert theirs.x509_authorities == set(roots)

    jwks = jwt.PyJWKSet.from_json(published)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert [k.key.public_bytes(serialization.Encoding.DER, spki) for k in jwks.keys] == [
        r.public_key().public_bytes(serialization.Encoding.DER, spki) for r in roots
    ]


def test_py_spiffe_pem_bundle_matches(ca: Authority) -> None:
    import spiffe
    theirs = spiffe.X509Bundle.parse(spiffe.TrustDomain("example.org"), _bundle(ca).to_pem())
    assert theirs.x509_authorities == set(ca.roots)


# --- TrustBundle as a value ----------------------------------------------------------------


def test_trust_bundles_are_equal_by_value_and_hashable(ca: Authority, other_ca: Authority) -> None:
    a = _bundle(ca, sequence=1)
    b = meshid.TrustBundle.from_spiffe_json("example.org", a.to_spiffe_json())
    assert a == b
    assert hash(a) == hash(b)
    assert a != _bundle(ca, sequence=2)
    assert a != _bundle(other_ca, sequence=1)
    assert _bundle(ca, refresh_hint=10) == _bundle(ca, refresh_hint=20)  # a hint is not content
    assert a != a.roots  # type: ignore[comparison-overlap]


# --- BundleSet -----------------------------------------------------------------------------


def test_verify_returns_the_spiffe_id_of_a_good_chain(ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = ca.issue_svid(WORKLOAD)
    assert bundles.verify(svid.leaf, svid.chain[1:]) == meshid.SpiffeId.parse(WORKLOAD)


def test_verify_accepts_a_federated_trust_domains_chain(other_ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = other_ca.issue_svid(PARTNER)
    assert bundles.verify(svid.leaf) == meshid.SpiffeId.parse(PARTNER)


def test_chain_signed_by_another_trust_domains_ca_is_refused(other_ca: Authority, bundles: meshid.BundleSet) -> None:
    forged = forge(other_ca, uris=[WORKLOAD])  # an example.org ID signed by other.org's CA
    assert isinstance(forged, meshid.X509Svid)
    assert OTHER in bundles  # other.org's CA is trusted, but only for other.org's IDs
    assert bundles.verify_any(forged.leaf) == OTHER  # the chain itself is sound
    with pytest.raises(meshid.VerificationError) as info:
        bundles.verify(forged.leaf)
    assert WORKLOAD in str(info.value)
    assert "does not verify against its trust domain's bundle" in str(info.value)


def test_chain_for_a_trust_domain_with_no_bundle_is_refused(other_ca: Authority) -> None:
    stranger = Authority.create_root("stranger.org")
    svid = stranger.issue_svid("spiffe://stranger.org/w")
    assert meshid.BundleSet.of(_bundle(other_ca), _bundle(stranger)).verify(svid.leaf) == svid.spiffe_id
    without = meshid.BundleSet.of(_bundle(other_ca))
    with pytest.raises(meshid.VerificationError) as info:
        without.verify(svid.leaf)
    assert "no trust bundle for trust domain stranger.org" in str(info.value)


def test_chain_to_an_untrusted_root_of_the_same_trust_domain_is_refused(bundles: meshid.BundleSet) -> None:
    impostor = Authority.create_root("example.org")
    svid = impostor.issue_svid(WORKLOAD)
    with pytest.raises(meshid.VerificationError, match=r"does not verify.*no root of the bundle signed it") as info:
        bundles.verify(svid.leaf)
    assert "candidates exhausted" not in str(info.value)  # cryptography's words, translated


def test_expired_certificate_is_refused(ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = ca.issue_svid(WORKLOAD, ttl=datetime.timedelta(hours=1))
    assert bundles.verify(svid.leaf, now=svid.not_after - datetime.timedelta(seconds=1)) == svid.spiffe_id
    # in meshid's words, not cryptography's "cert is not valid at validation time (...)"
    with pytest.raises(meshid.VerificationError, match=r"the certificate expired at .*; renew it") as info:
        bundles.verify(svid.leaf, now=svid.not_after + datetime.timedelta(seconds=1))
    assert "validation time" not in str(info.value)


def test_not_yet_valid_certificate_is_refused(ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = ca.issue_svid(WORKLOAD)
    assert bundles.verify(svid.leaf, now=svid.not_before + datetime.timedelta(seconds=1)) == svid.spiffe_id
    with pytest.raises(meshid.VerificationError, match=r"the certificate is not valid until .*; check the clocks"):
        bundles.verify(svid.leaf, now=svid.not_before - datetime.timedelta(seconds=1))


def test_leaf_that_is_a_ca_is_refused_by_verify(ca: Authority, bundles: meshid.BundleSet) -> None:
    chain, _ = forge(ca, uris=[WORKLOAD], ca=True, key_cert_sign=True)  # type: ignore[misc]
    with pytest.raises(meshid.VerificationError, match="the leaf certificate is a CA"):
        bundles.verify(chain[0])


def test_svid_from_an_intermediate_ca_verifies_against_the_upstream_root(
    ca: Authority, bundles: meshid.BundleSet
) -> None:
    intermediate = Authority.from_upstream("example.org", ca.certificate, ca.private_key)
    assert intermediate.roots == ca.roots
    svid = intermediate.issue_svid(WORKLOAD)
    assert bundles.verify(svid.leaf, svid.chain[1:]) == svid.spiffe_id
    with pytest.raises(meshid.VerificationError):
        bundles.verify(svid.leaf)  # without the intermediate there is no path to the root


def test_intermediate_of_another_trust_domain_does_not_vouch(other_ca: Authority, bundles: meshid.BundleSet) -> None:
    # other.org's CA signs an intermediate that claims example.org, which then signs an example.org ID.
    intermediate = Authority.from_upstream("example.org", other_ca.certificate, other_ca.private_key)
    svid = intermediate.issue_svid(WORKLOAD)
    with pytest.raises(meshid.VerificationError, match="does not verify"):
        bundles.verify(svid.leaf, svid.chain[1:])


@pytest.fixture(scope="module")
def shared_root() -> tuple[Authority, Authority, Authority, meshid.BundleSet]:
    """A corporate root, example.org's and other.org's CAs as intermediates under it, and both bundles = the root."""
    corp = Authority.create_root("corp.example")
    example = Authority.from_upstream(EXAMPLE, corp.certificate, corp.private_key)
    other = Authority.from_upstream(OTHER, corp.certificate, corp.private_key)
    both = meshid.BundleSet.of(meshid.TrustBundle(EXAMPLE, corp.roots), meshid.TrustBundle(OTHER, corp.roots))
    return corp, example, other, both


def test_intermediates_under_a_shared_root_vouch_for_their_own_trust_domain(shared_root: Any) -> None:
    _, example, other, both = shared_root
    mine, theirs = example.issue_svid(WORKLOAD), other.issue_svid(PARTNER)
    assert both.verify(mine.leaf, mine.chain[1:]) == mine.spiffe_id
    assert both.verify(theirs.leaf, theirs.chain[1:]) == theirs.spiffe_id


def test_intermediate_of_another_trust_domain_under_a_shared_root_does_not_vouch(shared_root: Any) -> None:
    corp, _, other, both = shared_root
    minted = dataclasses.replace(other, trust_domain=EXAMPLE).issue_svid(WORKLOAD)  # other.org's key, example.org's ID
    # other.org's DNS name constraint does not permit example.org's identity names.
    with pytest.raises(meshid.VerificationError, match="no permitted name constraints matched"):
        both.verify(minted.leaf, minted.chain[1:])
    # An other.org intermediate without that constraint (made before meshid wrote one) names
    # other.org, and a CA of another trust domain does not vouch.
    chain, key = forge(corp, uris=["spiffe://other.org"], ca=True, key_cert_sign=True, subject_cn="other.org CA")  # type: ignore[misc]
    unconstrained = Authority(EXAMPLE, chain[0], key, (chain[0],), corp.roots)
    minted = unconstrained.issue_svid(WORKLOAD)
    with pytest.raises(meshid.VerificationError) as info:
        both.verify(minted.leaf, minted.chain[1:])
    message = str(info.value)
    assert message.startswith(f"peer certificate {WORKLOAD}: CA "), message
    assert "belongs to trust domain other.org, not example.org" in message, message


def test_issuing_ca_that_names_no_trust_domain_does_not_vouch_for_a_spiffe_id(shared_root: Any) -> None:
    corp, _, _, both = shared_root
    chain, key = forge(corp, uris=[], ca=True, key_cert_sign=True, subject_cn="corp web CA")  # type: ignore[misc]
    outsider = Authority(EXAMPLE, chain[0], key, (chain[0],), corp.roots)
    minted = outsider.issue_svid(WORKLOAD)
    with pytest.raises(meshid.VerificationError, match="its issuing CA 'CN=corp web CA' names no trust domain"):
        both.verify(minted.leaf, minted.chain[1:])
    # The same CA as a trust anchor of example.org's bundle is bound by being there.
    anchored = meshid.BundleSet.of(meshid.TrustBundle(EXAMPLE, (chain[0],)))
    assert anchored.verify(minted.leaf) == minted.spiffe_id


def test_ca_that_names_no_trust_domain_above_the_issuing_ca_is_allowed(shared_root: Any) -> None:
    corp, _, _, both = shared_root
    chain, key = forge(corp, uris=[], ca=True, key_cert_sign=True, subject_cn="corp issuing CA")  # type: ignore[misc]
    under = Authority.from_upstream(EXAMPLE, chain[0], key, upstream_chain=corp.roots)
    svid = under.issue_svid(WORKLOAD)
    assert len(svid.chain) == 3
    assert both.verify(svid.leaf, svid.chain[1:]) == svid.spiffe_id


def test_verify_any_does_not_let_another_trust_domains_ca_vouch_under_a_shared_root(shared_root: Any) -> None:
    corp, _, other, both = shared_root
    chain, _ = forge(other, uris=[], subject_cn="legacy-client")  # type: ignore[misc]
    assert both.verify_any(chain[0], [other.certificate]) == OTHER  # not EXAMPLE, whose bundle comes first
    with pytest.raises(meshid.VerificationError, match="no trust bundle verifies its chain"):
        both.verify_any(chain[0], [other.certificate], trust_domains={EXAMPLE})
    # An intermediate that names no trust domain (an ordinary corporate CA) still vouches for
    # a certificate without a SPIFFE ID, as before.
    ca_chain, ca_key = forge(corp, uris=[], ca=True, key_cert_sign=True, subject_cn="corp CA")  # type: ignore[misc]
    plain_ca = Authority(EXAMPLE, ca_chain[0], ca_key, (ca_chain[0],), corp.roots)
    plain, _ = forge(plain_ca, uris=[], subject_cn="legacy-client")  # type: ignore[misc]
    assert both.verify_any(plain[0], [plain_ca.certificate], trust_domains={EXAMPLE}) == EXAMPLE


def test_upstream_intermediate_of_another_trust_domain_is_refused_up_front(shared_root: Any) -> None:
    _, _, other, _ = shared_root
    with pytest.raises(ValueError, match=r"upstream CA .* belongs to trust domain other\.org; peers refuse"):
        Authority.from_upstream(EXAMPLE, other.certificate, other.private_key)


def test_ca_with_an_eddsa_key_is_refused_up_front() -> None:
    # RFC 5280 validators (cryptography's among them) refuse EdDSA in CA signatures, so an
    # Ed25519 CA would issue SVIDs nobody can verify: meshid refuses to create one.
    with pytest.raises(ValueError, match="EdDSA CA key"):
        Authority.create_root("example.org", key=generate_key("ed25519"))
    upstream = Authority.create_root("corp.example")
    with pytest.raises(ValueError, match="EdDSA CA key"):
        Authority.from_upstream("example.org", upstream.certificate, upstream.private_key, key=generate_key("ed25519"))


def _self_signed_ca(key):
    import datetime

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed25519 root")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )


def test_verify_any_vouches_for_a_certificate_without_a_spiffe_id(ca: Authority, bundles: meshid.BundleSet) -> None:
    chain, _ = forge(ca, uris=[], subject_cn="legacy-client")  # type: ignore[misc]
    with pytest.raises(meshid.VerificationError, match="no URI SAN"):
        bundles.verify(chain[0])
    assert bundles.verify_any(chain[0]) == EXAMPLE


def test_verify_any_refuses_a_chain_no_bundle_verifies(bundles: meshid.BundleSet) -> None:
    stranger = Authority.create_root("stranger.org")
    chain, _ = forge(stranger, uris=[], subject_cn="legacy-client")  # type: ignore[misc]
    with pytest.raises(meshid.VerificationError, match="no trust bundle verifies its chain"):
        bundles.verify_any(chain[0])


def test_verification_error_is_a_meshid_error_and_not_a_value_error() -> None:
    assert issubclass(meshid.VerificationError, meshid.MeshIdError)
    assert not issubclass(meshid.VerificationError, ValueError)


def test_bundle_set_is_a_mapping_by_trust_domain(ca: Authority, other_ca: Authority, bundles: meshid.BundleSet) -> None:
    assert len(bundles) == 2
    assert set(bundles) == {EXAMPLE, OTHER}
    assert bundles[EXAMPLE] == _bundle(ca)
    assert meshid.TrustDomain.parse("stranger.org") not in bundles
    assert bundles.all_roots_pem() == _pem(ca.roots) + _pem(other_ca.roots)


def test_with_bundle_replaces_the_bundle_of_its_trust_domain(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    new_root = Authority.create_root("other.org")
    replaced = bundles.with_bundle(_bundle(new_root))

    assert replaced[OTHER].roots == new_root.roots
    assert replaced[EXAMPLE] == bundles[EXAMPLE]
    assert len(replaced) == 2
    assert bundles[OTHER].roots == other_ca.roots  # the original is untouched
    new_svid = new_root.issue_svid(PARTNER)
    old_svid = other_ca.issue_svid(PARTNER)
    assert replaced.verify(new_svid.leaf) == new_svid.spiffe_id
    with pytest.raises(meshid.VerificationError):
        replaced.verify(old_svid.leaf)


def test_later_bundle_wins_in_of(ca: Authority) -> None:
    newer = Authority.create_root("example.org")
    both = meshid.BundleSet.of(_bundle(ca), [_bundle(newer)])
    assert len(both) == 1
    assert both[EXAMPLE].roots == newer.roots


def test_bundle_sets_are_equal_by_content_and_hashable(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    same = meshid.BundleSet.of(_bundle(other_ca), _bundle(ca))  # order does not matter
    assert same == bundles
    assert hash(same) == hash(bundles)
    assert len({same, bundles}) == 1
    assert bundles != meshid.BundleSet.of(_bundle(ca))
    assert bundles != bundles.with_bundle(_bundle(ca, sequence=9))
    assert bundles != dict(bundles)  # equal only to its own type


# --- JWT authorities (the JWT-SVID standard §6, the bundle's "jwt-svid" keys) ---------------


def _jwt_bundle(authority: Authority, **keys: Any) -> meshid.TrustBundle:
    return meshid.TrustBundle(authority.trust_domain, authority.roots, jwt_authorities=keys)


def test_jwt_authorities_round_trip_through_spiffe_json(ca: Authority) -> None:
    ec_key, rsa_key = generate_key("ec-p384").public_key(), generate_key("rsa-2048").public_key()
    bundle = _jwt_bundle(ca, a=ec_key, b=rsa_key)
    doc = json.loads(bundle.to_spiffe_json())
    jwt_keys = [k for k in doc["keys"] if k["use"] == "jwt-svid"]
    assert [(k["kid"], k["kty"]) for k in jwt_keys] == [("a", "EC"), ("b", "RSA")]
    assert jwt_keys[0]["crv"] == "P-384" and "x5c" not in jwt_keys[0]
    assert [k["use"] for k in doc["keys"]].count("x509-svid") == len(ca.roots)
    back = meshid.TrustBundle.from_spiffe_json("example.org", json.dumps(doc))
    assert back == bundle and hash(back) == hash(bundle)
    assert back.roots == bundle.roots
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert back.jwt_authorities["b"].public_bytes(serialization.Encoding.DER, spki) == rsa_key.public_bytes(
        serialization.Encoding.DER, spki
    )


def test_a_bundle_without_jwt_keys_is_read_and_written_as_before(ca: Authority) -> None:
    bundle = _bundle(ca)
    assert bundle.jwt_authorities == {} or len(bundle.jwt_authorities) == 0
    assert all(k["use"] == "x509-svid" for k in json.loads(bundle.to_spiffe_json())["keys"])


def test_jwt_keys_take_part_in_equality(ca: Authority) -> None:
    key, other = generate_key().public_key(), generate_key().public_key()
    assert _jwt_bundle(ca, a=key) == _jwt_bundle(ca, a=key)
    assert _jwt_bundle(ca, a=key) != _jwt_bundle(ca, a=other)
    assert _jwt_bundle(ca, a=key) != _jwt_bundle(ca, b=key)
    assert _jwt_bundle(ca, a=key) != _bundle(ca)


def test_with_jwt_authorities_replaces_the_keys(ca: Authority) -> None:
    key = generate_key().public_key()
    bundle = _bundle(ca, sequence=3).with_jwt_authorities({"k": key})
    assert list(bundle.jwt_authorities) == ["k"] and bundle.sequence == 3
    assert len(bundle.with_jwt_authorities({}).jwt_authorities) == 0
    with pytest.raises(TypeError):
        bundle.jwt_authorities["x"] = key  # type: ignore[index]


def test_a_jwt_key_that_cannot_sign_jwt_svids_is_refused(ca: Authority) -> None:
    with pytest.raises(meshid.InvalidBundleError, match="a JWT key is an EC or RSA public key"):
        _jwt_bundle(ca, e=generate_key("ed25519").public_key())
    with pytest.raises(meshid.InvalidBundleError, match="RSA-1024"):
        _jwt_bundle(ca, r=rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())
    with pytest.raises(meshid.InvalidBundleError, match="key ID"):
        meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"": generate_key().public_key()})


def _jwk_doc(ca: Authority, *jwks: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [*json.loads(_bundle(ca).to_spiffe_json())["keys"], *jwks]}


def _ec_jwk(**changes: Any) -> dict[str, Any]:
    from jwt.algorithms import ECAlgorithm

    jwk = {**ECAlgorithm.to_jwk(generate_key().public_key(), as_dict=True), "use": "jwt-svid", "kid": "k"}
    jwk.update(changes)
    return {k: v for k, v in jwk.items() if v is not None}


def test_jwt_svid_key_without_kid_is_refused(ca: Authority) -> None:
    _refused_json(_jwk_doc(ca, _ec_jwk(kid=None)), "has no 'kid'")


def test_jwt_svid_keys_with_one_kid_are_refused(ca: Authority) -> None:
    _refused_json(_jwk_doc(ca, _ec_jwk(), _ec_jwk()), "JWT key ID 'k' appears twice")


def test_jwt_svid_key_with_private_members_is_refused(ca: Authority) -> None:
    _refused_json(_jwk_doc(ca, _ec_jwk(d="AAAA")), "holds private key members (d)")


def test_jwt_svid_key_of_another_kind_is_refused(ca: Authority) -> None:
    _refused_json(_jwk_doc(ca, _ec_jwk(kty="oct", k="c2VjcmV0")), "has kty 'oct'")
    _refused_json(_jwk_doc(ca, _ec_jwk(x="AAAA")), "JWT key 'k' cannot be read")
    _refused_json(_jwk_doc(ca, _ec_jwk(crv="P-192")), "JWT key 'k' cannot be read")


def test_a_jwt_only_bundle_is_still_refused() -> None:
    # meshid's trust domains always publish an X.509 root; a bundle without one cannot verify a peer.
    _refused_json({"keys": [_ec_jwk()]}, "no 'x509-svid' key")


def test_py_spiffe_reads_the_published_jwt_keys(ca: Authority) -> None:
    """py-spiffe's JwtBundle.parse needs a 'kid' on every key (x509-svid ones have none), so it is
    given the jwt-svid keys of meshid's published bundle."""
    import spiffe

    key = generate_key("ec-p256").public_key()
    doc = json.loads(_jwt_bundle(ca, k1=key).to_spiffe_json())
    jwt_only = json.dumps({"keys": [k for k in doc["keys"] if k["use"] == "jwt-svid"]}).encode()
    theirs = spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), jwt_only)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    found = theirs.get_jwt_authority("k1")
    assert found is not None
    assert found.public_bytes(serialization.Encoding.DER, spki) == key.public_bytes(serialization.Encoding.DER, spki)
