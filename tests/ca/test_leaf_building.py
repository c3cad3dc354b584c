"""Authority.sign_svid builds each leaf in one CertificateBuilder, from parts made once (the
shared extensions, each entry's names). These tests build the same leaf with cryptography's own
setters, from the X509-SVID profile written out here, and compare the signed parts to the byte.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import tracemalloc

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from meshid import SpiffeId
from meshid.ca import authority as authority_module
from meshid.ca.authority import CLOCK_SKEW, Authority, generate_key, key_kind
from meshid.svid import identity_dns_names

TD = "example.org"
NOW = datetime.datetime(2026, 12, 1, 20, 0, tzinfo=datetime.UTC)


def _expected_tbs(ca: Authority, leaf: x509.Certificate, spiffe_id: SpiffeId, dns_names: list[str]) -> bytes:
    """The leaf as the setters build it, with the leaf's own serial and validity (random and clock-made)."""
    key = leaf.public_key()
    is_rsa = isinstance(key, rsa.RSAPublicKey)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names += [x509.DNSName(d) for d in dict.fromkeys([*dns_names, *identity_dns_names(spiffe_id)])]
    builder = (
        x509.CertificateBuilder()
        .issuer_name(ca.certificate.subject)
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD),
                    x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.path.rsplit("/", 1)[-1]),
                ]
            )
        )
        .public_key(key)  # type: ignore[arg-type]
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if ca.ocsp_url is not None:
        access = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ca.ocsp_url))
        builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
    if ca.crl_url is not None:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(ca.crl_url)], relative_name=None, reasons=None, crl_issuer=None
        )
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    builder = builder.add_extension(x509.SubjectKeyIdentifier(hashlib.sha256(spki).digest()), critical=False)
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    digest = DIGESTS[key_kind(ca.private_key)]
    return builder.sign(ca.private_key, digest).tbs_certificate_bytes  # type: ignore[arg-type]


#: What each kind of CA key signs with (ECDSA P-384 with SHA-384; ML-DSA signs the message itself).
DIGESTS: dict[str, hashes.HashAlgorithm | None] = {
    "ec-p256": hashes.SHA256(),
    "ec-p384": hashes.SHA384(),
    "rsa-2048": hashes.SHA256(),
    "ml-dsa-65": None,
}


def _cas() -> dict[str, Authority]:
    cas = {f"{kind} root": Authority.create_root(TD, key=generate_key(kind), now=NOW) for kind in DIGESTS}
    upstream = Authority.create_root("upstream.example", now=NOW)
    intermediate = Authority.from_upstream(TD, upstream.certificate, upstream.private_key, now=NOW)
    cas["intermediate"] = intermediate
    cas["revocation urls"] = dataclasses.replace(
        intermediate, ocsp_url="http://127.0.0.1:8080/ocsp", crl_url="http://127.0.0.1:8080/crl"
    )
    return cas


CAS = _cas()


@pytest.mark.parametrize("ca_name", sorted(CAS))
@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048", "ed25519", "ml-dsa-65"])
@pytest.mark.parametrize("dns_names", [[], ["web.internal"], ["b.internal", "a.internal", "b.internal"]])
def test_a_leaf_is_the_certificate_the_setters_build(ca_name: str, kind: str, dns_names: list[str]) -> None:
    ca = CAS[ca_name]
    sid = SpiffeId.parse(f"spiffe://{TD}/ns/prod/sa/web")
    key = generate_key(kind).public_key()
    chain = ca.sign_svid(sid, key, ttl=datetime.timedelta(minutes=30), dns_names=dns_names, now=NOW)
    leaf = chain[0]
    assert leaf.tbs_certificate_bytes == _expected_tbs(ca, leaf, sid, dns_names)
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(minutes=30)
    assert chain[1:] == ca.chain


def test_a_time_in_another_zone_is_converted_to_utc() -> None:
    ca = CAS["ec-p256 root"]
    zone = datetime.timezone(datetime.timedelta(hours=-5))
    leaf = ca.sign_svid(SpiffeId.parse(f"spiffe://{TD}/w"), generate_key().public_key(), now=NOW.astimezone(zone))[0]
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(hours=1)


def test_names_kept_for_one_entry_never_reach_another() -> None:
    """The kept names are by SPIFFE ID and DNS names: an entry whose DNS names change gets the new ones."""
    ca = Authority.create_root(TD, now=NOW)
    key = generate_key().public_key()
    a, b = SpiffeId.parse(f"spiffe://{TD}/a"), SpiffeId.parse(f"spiffe://{TD}/b")

    def sans(sid: SpiffeId, dns: list[str]) -> list[str]:
        leaf = ca.sign_svid(sid, key, dns_names=dns, now=NOW)[0]
        return [str(n.value) for n in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]

    assert sans(a, ["one.internal"])[:2] == [str(a), "one.internal"]
    assert sans(b, ["one.internal"])[:2] == [str(b), "one.internal"]
    assert sans(a, ["two.internal"])[:2] == [str(a), "two.internal"]
    assert sans(a, [])[0] == str(a) and "one.internal" not in sans(a, [])


@pytest.mark.parametrize("bound", ["LEAF_NAMES_KEPT", "LEAF_NAMES_BYTES"])
def test_the_kept_names_are_bounded_by_entries_and_by_bytes(monkeypatch: pytest.MonkeyPatch, bound: str) -> None:
    """2,000 entries with 32 long DNS names each (some 16 MB of names) renew once: what stays
    in memory is what the bound keeps, and each leaf still carries its own names."""
    monkeypatch.setattr(authority_module, bound, 8 if bound == "LEAF_NAMES_KEPT" else 64 * 1024)
    ca = Authority.create_root(TD, now=NOW)
    key = generate_key().public_key()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            sid = SpiffeId.parse(f"spiffe://{TD}/w/{i}")
            dns = [f"{'a' * 200}.{j}.{i}.internal" for j in range(32)]
            leaf = ca.sign_svid(sid, key, dns_names=dns, now=NOW)[0]
            assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == str(i)
            del leaf
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2_000_000, f"{grown} bytes kept after 2,000 entries"


@pytest.mark.parametrize("bad", [object(), b"not a key", ec.generate_private_key(ec.SECP256R1())])
def test_what_is_not_a_public_key_is_refused_with_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="cannot certify a key of type"):
        CAS["ec-p256 root"].sign_svid(SpiffeId.parse(f"spiffe://{TD}/w"), bad, now=NOW)  # type: ignore[arg-type]


def test_a_time_before_1950_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be valid from"):
        CAS["ec-p256 root"].sign_svid(
            SpiffeId.parse(f"spiffe://{TD}/w"),
            generate_key().public_key(),
            now=datetime.datetime(1949, 12, 31, tzinfo=datetime.UTC),
        )


def test_the_subject_key_identifier_is_the_sha256_of_the_key() -> None:
    """RFC 7093 (section 2, method 4): SHA-256 of the DER SubjectPublicKeyInfo (what the store
    records of the key: test_batch_issues_svids_for_the_callers_entries)."""
    key = generate_key().public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf = CAS["intermediate"].sign_svid(SpiffeId.parse(f"spiffe://{TD}/w"), key, now=NOW)[0]
    assert (
        leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == hashlib.sha256(spki).digest()
    )


def test_a_digest_the_caller_gives_is_the_subject_key_identifier() -> None:
    """The batch path passes the digest it made already; the CA uses it as given."""
    given = hashlib.sha256(b"the digest the caller made").digest()
    key = generate_key().public_key()
    leaf = CAS["intermediate"].sign_svid(SpiffeId.parse(f"spiffe://{TD}/w"), key, now=NOW, key_sha256=given)[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == given


@pytest.mark.parametrize("digest", [b"", b"x", bytes(20), bytes(33)])
def test_a_digest_that_is_not_32_bytes_is_refused(digest: bytes) -> None:
    with pytest.raises(ValueError, match="must be a SHA-256 digest"):
        CAS["intermediate"].sign_svid(
            SpiffeId.parse(f"spiffe://{TD}/w"), generate_key().public_key(), now=NOW, key_sha256=digest
        )
