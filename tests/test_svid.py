"""X509Svid: loading, its accessors, and every X509-SVID rule (SPIFFE X509-SVID standard §2-§5).

Good SVIDs come from meshid's own CA; bad ones are built with ``support.forge`` or with
``cryptography`` directly, since meshid's CA would never issue them. Every refusal is checked
for its type and for a message fragment naming the rule broken.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

import meshid
from meshid.ca import Authority
from support import forge

WORKLOAD = "spiffe://example.org/ns/prod/sa/greeter"
OTHER_WORKLOAD = "spiffe://example.org/ns/prod/sa/frontend"
ONE_MIB = 1 << 20


def _pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes) -> Path:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _forged(authority: Authority, **kw: object) -> tuple[bytes, bytes]:
    """PEM chain and key of a certificate that must break an SVID rule."""
    result = forge(authority, **kw)  # type: ignore[arg-type]
    assert not isinstance(result, meshid.X509Svid), "the forged certificate was expected to break a rule"
    chain, key = result
    return _pem(chain), _key_pem(key)


def _leaf_with_key_usage(authority: Authority, usage: x509.KeyUsage | None) -> tuple[bytes, bytes]:
    """A leaf for WORKLOAD signed by ``authority`` with exactly ``usage`` (or no key usage at all)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "greeter")]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WORKLOAD)]), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    cert = builder.sign(authority.private_key, hashes.SHA256())
    return _pem([cert]), _key_pem(key)


def _usage(*, digital_signature: bool = True, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _refused(chain_pem: bytes, key_pem: bytes, fragment: str) -> str:
    with pytest.raises(meshid.InvalidSvidError) as info:
        meshid.X509Svid.from_pem(chain_pem, key_pem)
    message = str(info.value)
    assert message.startswith("X509-SVID:"), message
    assert fragment in message, message
    return message


# --- the way in: load and from_pem ---------------------------------------------------------


KEY_KINDS = {
    "ec-p256": lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp256r1",
    "ec-p384": lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1",
    "rsa-2048": lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 2048,
    "ed25519": lambda k: isinstance(k, ed25519.Ed25519PrivateKey),
}


@pytest.mark.parametrize("key_kind", sorted(KEY_KINDS))
def test_svid_loads_from_files_for_each_key_kind(key_kind: str, ca: Authority, tmp_path: Path) -> None:
    issued = ca.issue_svid(WORKLOAD, key_kind=key_kind)
    cert_file = _write(tmp_path / "svid.pem", issued.chain_pem())
    key_file = _write(tmp_path / "svid.key", issued.key_pem())

    loaded = meshid.X509Svid.load(cert_file, key_file)

    assert loaded.spiffe_id == meshid.SpiffeId.parse(WORKLOAD)
    assert loaded.chain == issued.chain
    assert KEY_KINDS[key_kind](loaded.private_key)
    assert loaded.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == loaded.leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("key_kind", sorted(KEY_KINDS))
def test_svid_from_pem_accepts_text_and_bytes(key_kind: str, ca: Authority) -> None:
    issued = ca.issue_svid(WORKLOAD, key_kind=key_kind)
    from_bytes = meshid.X509Svid.from_pem(issued.chain_pem(), issued.key_pem())
    from_text = meshid.X509Svid.from_pem(issued.chain_pem().decode(), issued.key_pem().decode())
    assert from_bytes == from_text == issued
    assert str(from_text.spiffe_id) == WORKLOAD


def test_svid_load_accepts_path_strings(ca: Authority, tmp_path: Path) -> None:
    issued = ca.issue_svid(WORKLOAD)
    cert_file = _write(tmp_path / "svid.pem", issued.chain_pem())
    key_file = _write(tmp_path / "svid.key", issued.key_pem())
    assert meshid.X509Svid.load(str(cert_file), str(key_file)) == issued


def test_svid_from_an_intermediate_ca_carries_the_intermediate(ca: Authority) -> None:
    intermediate = Authority.from_upstream("example.org", ca.certificate, ca.private_key)
    svid = intermediate.issue_svid(WORKLOAD)
    loaded = meshid.X509Svid.from_pem(svid.chain_pem(), svid.key_pem())
    assert loaded.chain == (svid.leaf, intermediate.certificate)
    assert loaded.leaf.issuer == intermediate.certificate.subject


# --- accessors -----------------------------------------------------------------------------


def test_svid_accessors(ca: Authority) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ttl = datetime.timedelta(minutes=30)
    svid = ca.issue_svid(WORKLOAD, now=now, ttl=ttl)

    assert svid.spiffe_id == meshid.SpiffeId.parse(WORKLOAD)
    assert svid.leaf is svid.chain[0]
    assert svid.chain == (svid.leaf,)  # a root CA adds nothing after the leaf
    assert svid.leaf.issuer == ca.certificate.subject
    assert svid.not_after == now + ttl
    assert svid.not_before < now  # backdated for clock skew
    assert svid.not_before.tzinfo is not None and svid.not_after.tzinfo is not None
    assert svid.serial == svid.leaf.serial_number


def test_thumbprint_is_lowercase_hex_sha256_of_leaf_der(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    expected = hashlib.sha256(svid.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert svid.thumbprint == expected
    assert svid.thumbprint == svid.thumbprint.lower()
    assert len(svid.thumbprint) == 64
    assert ca.issue_svid(WORKLOAD).thumbprint != svid.thumbprint


def test_key_pem_and_chain_pem_round_trip(ca: Authority) -> None:
    intermediate = Authority.from_upstream("example.org", ca.certificate, ca.private_key)
    svid = intermediate.issue_svid(WORKLOAD)
    assert svid.chain_pem() == _pem(svid.chain)
    assert svid.chain_pem().count(b"-----BEGIN CERTIFICATE-----") == 2
    assert b"-----BEGIN PRIVATE KEY-----" in svid.key_pem()  # PKCS#8, unencrypted
    again = meshid.X509Svid.from_pem(svid.chain_pem(), svid.key_pem())
    assert again == svid
    assert again.key_pem() == svid.key_pem()
    assert again.chain_pem() == svid.chain_pem()


def test_repr_does_not_show_the_private_key(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    text = repr(svid)
    assert "private_key" not in text
    assert "/ns/prod/sa/greeter" in text


def test_svid_is_frozen(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        svid.spiffe_id = meshid.SpiffeId.parse(OTHER_WORKLOAD)  # type: ignore[misc]


# --- equality and hashing ------------------------------------------------------------------


def test_svids_are_equal_by_chain_and_hashable(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    same = meshid.X509Svid.from_pem(svid.chain_pem(), svid.key_pem())
    reissued = ca.issue_svid(WORKLOAD)  # same ID, new certificate

    assert svid == same
    assert hash(svid) == hash(same)
    assert svid != reissued
    assert len({svid, same, reissued}) == 2


def test_svid_is_equal_only_to_svids(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    assert svid != svid.chain
    assert svid != WORKLOAD
    assert svid != svid.spiffe_id


# --- the identity DNS names the CA pins an ID with -----------------------------------------


def _b32(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:20]).decode().lower()


def test_identity_dns_name_is_stable() -> None:
    sid = meshid.SpiffeId.parse(WORKLOAD)
    assert meshid.identity_dns_name(sid.trust_domain) == f"{_b32('example.org')}.td.meshid.invalid"
    assert meshid.identity_dns_name(sid) == f"{_b32(WORKLOAD)}.{_b32('example.org')}.td.meshid.invalid"
    assert meshid.identity_dns_name(meshid.SpiffeId.parse(WORKLOAD)) == meshid.identity_dns_name(sid)


def test_identity_dns_name_of_an_id_lies_under_its_trust_domains_name() -> None:
    # What lets one DNS name constraint on a CA (its trust domain's name) cover every ID it signs.
    sid = meshid.SpiffeId.parse(WORKLOAD)
    zone = meshid.identity_dns_name(sid.trust_domain)
    assert meshid.identity_dns_name(sid).endswith("." + zone)
    other = meshid.SpiffeId.parse("spiffe://other.org/ns/prod/sa/greeter")
    assert not meshid.identity_dns_name(other).endswith("." + zone)


@pytest.mark.parametrize(
    "spiffe_id",
    ["spiffe://example.org/a", "spiffe://" + "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + ".org/" + "p" * 1800],
    ids=["short", "longest-trust-domain-and-path"],
)
def test_identity_dns_name_fits_dns_limits(spiffe_id: str) -> None:
    name = meshid.identity_dns_name(meshid.SpiffeId.parse(spiffe_id))
    assert len(name) == 83 <= 253  # fixed length, whatever the ID
    assert all(1 <= len(label) <= 63 for label in name.split("."))


def test_identity_dns_name_differs_between_ids() -> None:
    a = meshid.identity_dns_name(meshid.SpiffeId.parse(WORKLOAD))
    b = meshid.identity_dns_name(meshid.SpiffeId.parse(OTHER_WORKLOAD))
    assert a != b


def test_identity_dns_name_differs_between_an_id_and_its_trust_domain() -> None:
    sid = meshid.SpiffeId.parse(WORKLOAD)
    by_id = meshid.identity_dns_name(sid)
    by_td = meshid.identity_dns_name(sid.trust_domain)
    assert by_id != by_td
    assert by_td.endswith(".td.meshid.invalid")
    # The trust domain's name is not the name of its own SPIFFE ID either.
    assert by_td != meshid.identity_dns_name(sid.trust_domain.id())


def test_issued_svid_carries_the_identity_dns_names(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD, dns_names=["greeter.example.org"])
    names = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert "greeter.example.org" in dns
    assert meshid.identity_dns_name(svid.spiffe_id) in dns
    assert meshid.identity_dns_name(svid.spiffe_id.trust_domain) in dns


# --- the error type ------------------------------------------------------------------------


def test_invalid_svid_error_is_a_value_error_and_a_meshid_error() -> None:
    assert issubclass(meshid.InvalidSvidError, ValueError)
    assert issubclass(meshid.InvalidSvidError, meshid.MeshIdError)
    with pytest.raises(ValueError):
        meshid.X509Svid.from_pem(b"", b"")


# --- X509-SVID rules: the URI SAN (standard §2) --------------------------------------------


def test_certificate_with_no_uri_san_is_refused(ca: Authority) -> None:
    _refused(*_forged(ca, uris=[], subject_cn=WORKLOAD), "has no URI SAN")


def test_certificate_with_two_uri_sans_is_refused(ca: Authority) -> None:
    _refused(*_forged(ca, uris=[WORKLOAD, OTHER_WORKLOAD]), "has 2 URI SANs")


def test_uri_san_with_a_non_spiffe_scheme_is_refused(ca: Authority) -> None:
    message = _refused(*_forged(ca, uris=["https://example.org/ns/prod/sa/greeter"]), "not a valid SPIFFE ID")
    assert "spiffe://" in message


def test_uri_san_with_an_uppercase_trust_domain_is_refused(ca: Authority) -> None:
    message = _refused(*_forged(ca, uris=["spiffe://Example.org/ns/prod"]), "not a valid SPIFFE ID")
    assert "lowercase" in message


def test_uri_san_with_percent_encoding_is_refused(ca: Authority) -> None:
    message = _refused(*_forged(ca, uris=["spiffe://example.org/ns/a%20b"]), "not a valid SPIFFE ID")
    assert "percent-encoding" in message


def test_leaf_spiffe_id_without_a_path_is_refused(ca: Authority) -> None:
    _refused(*_forged(ca, uris=["spiffe://example.org"]), "has no path")


# --- X509-SVID rules: constraints and key usage (standard §4) ------------------------------


def test_leaf_that_is_a_ca_is_refused(ca: Authority) -> None:
    _refused(*_forged(ca, uris=[WORKLOAD], ca=True, key_cert_sign=True), "is a CA")


def test_leaf_without_key_usage_is_refused(ca: Authority) -> None:
    _refused(*_leaf_with_key_usage(ca, None), "no key usage extension")


def test_leaf_without_digital_signature_is_refused(ca: Authority) -> None:
    _refused(*_forged(ca, uris=[WORKLOAD], digital_signature=False), "lacks the digitalSignature key usage")


def test_leaf_with_key_cert_sign_is_refused(ca: Authority) -> None:
    _refused(*_leaf_with_key_usage(ca, _usage(key_cert_sign=True)), "keyCertSign")


def test_leaf_with_crl_sign_is_refused(ca: Authority) -> None:
    _refused(*_leaf_with_key_usage(ca, _usage(crl_sign=True)), "cRLSign")


def test_intermediate_that_is_not_a_ca_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    not_a_ca = ca.issue_svid(OTHER_WORKLOAD).leaf
    _refused(_pem([svid.leaf, not_a_ca]), svid.key_pem(), "chain certificate 1 is not a CA")


def test_key_that_does_not_match_the_leaf_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    stranger = ca.issue_svid(WORKLOAD)
    _refused(svid.chain_pem(), stranger.key_pem(), "private key does not match the leaf")


# --- malformed input -----------------------------------------------------------------------


def test_truncated_pem_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    pem = svid.chain_pem()
    _refused(pem[: len(pem) // 2], svid.key_pem(), "truncated")


def test_truncated_intermediate_in_a_chain_is_refused(ca: Authority) -> None:
    intermediate = Authority.from_upstream("example.org", ca.certificate, ca.private_key)
    svid = intermediate.issue_svid(WORKLOAD)
    pem = svid.chain_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    with pytest.raises(meshid.InvalidSvidError):
        meshid.X509Svid.from_pem(pem[: len(pem) - 200], svid.key_pem())


def test_garbage_der_in_a_certificate_block_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    garbage = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    _refused(garbage, svid.key_pem(), "chain block 0 is not a valid certificate")


def test_key_in_the_certificate_file_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    _refused(svid.key_pem(), svid.key_pem(), "chain block 0 is a 'PRIVATE KEY', expected 'CERTIFICATE'")


def test_certificate_in_the_key_file_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    _refused(svid.chain_pem(), svid.chain_pem(), "exactly one PEM 'PRIVATE KEY' block")


def test_garbage_der_in_the_key_block_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    garbage = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    _refused(svid.chain_pem(), garbage, "private key cannot be read")


def test_oversized_input_is_refused(ca: Authority) -> None:
    svid = ca.issue_svid(WORKLOAD)
    padded = svid.chain_pem() + b"\n" * ONE_MIB
    _refused(padded, svid.key_pem(), "larger than")


def test_empty_certificate_file_is_refused(ca: Authority, tmp_path: Path) -> None:
    svid = ca.issue_svid(WORKLOAD)
    cert_file = _write(tmp_path / "svid.pem", b"")
    key_file = _write(tmp_path / "svid.key", svid.key_pem())
    with pytest.raises(meshid.InvalidSvidError) as info:
        meshid.X509Svid.load(cert_file, key_file)
    assert "no PEM certificate found" in str(info.value)
    assert str(cert_file) in str(info.value)


def test_missing_certificate_file_is_refused(ca: Authority, tmp_path: Path) -> None:
    svid = ca.issue_svid(WORKLOAD)
    key_file = _write(tmp_path / "svid.key", svid.key_pem())
    missing = tmp_path / "nope.pem"
    with pytest.raises(meshid.InvalidSvidError) as info:
        meshid.X509Svid.load(missing, key_file)
    assert "cannot read certificate file" in str(info.value)
    assert str(missing) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_missing_key_file_is_refused(ca: Authority, tmp_path: Path) -> None:
    svid = ca.issue_svid(WORKLOAD)
    cert_file = _write(tmp_path / "svid.pem", svid.chain_pem())
    with pytest.raises(meshid.InvalidSvidError) as info:
        meshid.X509Svid.load(cert_file, tmp_path / "nope.key")
    assert "cannot read key file" in str(info.value)


def test_oversized_certificate_file_is_refused(ca: Authority, tmp_path: Path) -> None:
    svid = ca.issue_svid(WORKLOAD)
    cert_file = _write(tmp_path / "svid.pem", svid.chain_pem() + b"\n" * ONE_MIB)
    key_file = _write(tmp_path / "svid.key", svid.key_pem())
    with pytest.raises(meshid.InvalidSvidError) as info:
        meshid.X509Svid.load(cert_file, key_file)
    assert "larger than" in str(info.value)
    assert str(cert_file) in str(info.value)


def test_load_names_the_file_that_breaks_a_rule(ca: Authority, tmp_path: Path) -> None:
    chain_pem, key_pem = _forged(ca, uris=[WORKLOAD], ca=True, key_cert_sign=True)
    cert_file = _write(tmp_path / "svid.pem", chain_pem)
    key_file = _write(tmp_path / "svid.key", key_pem)
    with pytest.raises(meshid.InvalidSvidError) as info:
        meshid.X509Svid.load(cert_file, key_file)
    assert "is a CA" in str(info.value)
    assert str(cert_file) in str(info.value)
