"""The issuing service's rules, in process over a real SQLite file (the gRPC layer: test_e2e.py)."""

from __future__ import annotations

import datetime
import sqlite3

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

import meshid
from meshid.ca import Authority, generate_key
from meshid.ca.csr import build_csr
from meshid.ca.issuing import IssuingService, token_hash
from meshid.ca.store import SqliteStore

WEB = "spiffe://example.org/ns/prod/sa/web"


@pytest.fixture
def service(tmp_path):
    store = SqliteStore(tmp_path / "meshid.db")
    svc = IssuingService(Authority.create_root("example.org"), store, max_ttl=datetime.timedelta(hours=2))
    yield svc
    store.close()


def _issue(service: IssuingService, key_kind: str = "ec-p256", **entry: object):
    service.create_entry("admin", WEB, **entry)  # type: ignore[arg-type]
    token, _ = service.create_token("admin", WEB)
    key = generate_key(key_kind)
    return service.issue_with_token(token, build_csr(key)), key


@pytest.mark.parametrize("key_kind", ["ec-p256", "ec-p384", "rsa-2048", "ed25519"])
def test_leaf_follows_the_x509_svid_standard(service, key_kind) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    issued, key = _issue(service, key_kind, dns_names=["web.local"])
    leaf = issued.chain[0]
    svid = meshid.X509Svid.from_parts(issued.chain, key)  # applies every X509-SVID rule
    assert svid.spiffe_id == meshid.SpiffeId.parse(WEB)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert san.get_values_for_type(x509.DNSName)[0] == "web.local"
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert usage.value.key_encipherment is (key_kind == "rsa-2048")
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = service.authority.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.serial_number.bit_length() >= 64
    assert leaf.not_valid_before_utc < before  # backdated for clock skew
    assert leaf.not_valid_after_utc - before <= datetime.timedelta(hours=1, seconds=1)  # default TTL 1 h


def test_serials_are_random_and_never_repeat(service) -> None:
    service.create_entry("admin", WEB)
    serials = set()
    for _ in range(50):
        token, _ = service.create_token("admin", WEB)
        serials.add(service.issue_with_token(token, build_csr(generate_key())).chain[0].serial_number)
    assert len(serials) == 50
    assert len({s >> 100 for s in serials}) > 40  # high bits vary: not a counter


def test_ttl_is_capped_by_the_ca_maximum_and_the_ca_lifetime(tmp_path) -> None:
    store = SqliteStore(tmp_path / "db")
    short_ca = Authority.create_root("example.org", ttl=datetime.timedelta(minutes=30))
    service = IssuingService(short_ca, store, max_ttl=datetime.timedelta(hours=2))
    entry = service.create_entry("admin", WEB, ttl=datetime.timedelta(days=3))
    assert entry.ttl == datetime.timedelta(hours=2)
    token, _ = service.create_token("admin", WEB)
    leaf = service.issue_with_token(token, build_csr(generate_key())).chain[0]
    assert leaf.not_valid_after_utc == short_ca.certificate.not_valid_after_utc
    store.close()


def test_what_the_csr_asks_for_is_ignored_in_favour_of_the_entry(service) -> None:
    service.create_entry("admin", WEB)
    token, _ = service.create_token("admin", WEB)
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "root of all")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example"), x509.UniformResourceIdentifier("spiffe://example.org/meshid/admin")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    leaf = service.issue_with_token(token, greedy).chain[0]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert "evil.example" not in san.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize(
    ("make_csr", "message"),
    [
        (lambda: b"", "CSR: is empty"),
        (lambda: b"\x30\x82garbage", "not a DER PKCS#10 request"),
        (lambda: b"\x00" * (17 * 1024), "larger than the limit"),
        (lambda: build_csr(ec.generate_private_key(ec.SECP521R1())), "curve secp521r1 is not allowed"),
        (lambda: build_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "RSA key of 1024 bits"),
        (lambda: _bad_signature_csr(), "signature does not verify"),
    ],
)
def test_bad_csrs_are_refused_and_consume_nothing(service, make_csr, message) -> None:
    service.create_entry("admin", WEB)
    token, _ = service.create_token("admin", WEB)
    with pytest.raises(meshid.errors.InvalidRequestError, match=message):
        service.issue_with_token(token, make_csr())
    assert service.store.list_issued() == []
    assert service.issue_with_token(token, build_csr(generate_key())).spiffe_id == meshid.SpiffeId.parse(WEB)


def _bad_signature_csr() -> bytes:
    der = bytearray(build_csr(generate_key()))
    der[-5] ^= 0x55  # inside the signature value
    return bytes(der)


def test_tokens_are_single_use_and_stored_only_as_a_hash(service, tmp_path) -> None:
    service.create_entry("admin", WEB)
    token, _ = service.create_token("admin", WEB)
    assert token.startswith("example.org:") and len(token.split(":", 1)[1]) >= 43  # 256 bits
    service.issue_with_token(token, build_csr(generate_key()))
    with pytest.raises(meshid.errors.TokenError, match="already used"):
        service.issue_with_token(token, build_csr(generate_key()))
    raw = (tmp_path / "meshid.db").read_bytes() + (tmp_path / "meshid.db-wal").read_bytes()
    assert token.encode() not in raw and token.split(":", 1)[1].encode() not in raw
    rows = sqlite3.connect(tmp_path / "meshid.db").execute("SELECT hash FROM tokens").fetchall()
    assert [bytes(r[0]) for r in rows] == [token_hash(token)]


def test_renewal_keeps_the_id_and_refuses_another(service) -> None:
    issued, _ = _issue(service)
    renewed = service.renew(issued.spiffe_id, build_csr(generate_key()))
    assert renewed.spiffe_id == issued.spiffe_id
    assert renewed.chain[0].serial_number != issued.chain[0].serial_number
    with pytest.raises(meshid.errors.NotAuthorizedError, match="only its own SPIFFE ID"):
        service.renew(issued.spiffe_id, build_csr(generate_key()), "spiffe://example.org/ns/prod/sa/db")
    with pytest.raises(meshid.errors.NotAuthorizedError, match="only its own SPIFFE ID"):
        service.renew(issued.spiffe_id, build_csr(generate_key(), uri="spiffe://example.org/ns/prod/sa/db"))
    service.delete_entry(WEB)
    with pytest.raises(meshid.errors.NotAuthorizedError, match="no registration entry"):
        service.renew(issued.spiffe_id, build_csr(generate_key()))


def test_reserved_and_foreign_ids_cannot_be_registered(service) -> None:
    with pytest.raises(meshid.errors.NotAuthorizedError, match="reserved"):
        service.create_entry("admin", "spiffe://example.org/meshid/admin")
    with pytest.raises(meshid.errors.InvalidRequestError, match="not in this CA's trust domain"):
        service.create_entry("admin", "spiffe://other.org/x")
    with pytest.raises(meshid.errors.InvalidRequestError, match="are reserved"):
        service.create_entry("admin", WEB, dns_names=["abc.id.meshid.invalid"])


@pytest.mark.parametrize("name", ["127.0.0.1", "999.1.1", "10.0.0.300"])
def test_an_ip_address_is_not_a_dns_name(service, name) -> None:
    with pytest.raises(meshid.errors.InvalidRequestError, match="looks like an IP address"):
        service.create_entry("admin", WEB, dns_names=[name])
    assert service.create_entry("admin", WEB, dns_names=["web.svc.10x"]).dns_names == ("web.svc.10x",)


def test_creations_per_minute_are_bounded_per_admin(tmp_path) -> None:
    store = SqliteStore(tmp_path / "db")
    service = IssuingService(Authority.create_root("example.org"), store, creations_per_minute=3)
    for i in range(3):
        service.create_entry("alice", f"{WEB}{i}")
    with pytest.raises(meshid.errors.RateLimitedError, match="alice created 3"):
        service.create_entry("alice", f"{WEB}9")
    service.create_entry("bob", f"{WEB}9")  # another admin has its own budget
    store.close()


def test_revocation_reaches_the_next_crl(service) -> None:
    issued, _ = _issue(service)
    serial = issued.chain[0].serial_number
    der, number = service.crl()
    assert serial not in {r.serial_number for r in x509.load_der_x509_crl(der)}
    assert service.revoke(serial=format(serial, "x")) == [serial]
    der2, number2 = service.crl()
    crl = x509.load_der_x509_crl(der2)
    assert serial in {r.serial_number for r in crl}
    assert number2 > number
    assert crl.is_signature_valid(service.authority.certificate.public_key())  # type: ignore[arg-type]
    listed = meshid.RevocationList.from_der(der2, [service.authority.certificate], meshid.BundleSet.of(service.bundle()))
    assert serial in listed.serials
    with pytest.raises(meshid.errors.NotFoundError):
        service.revoke(serial="abcdef")
    # an ID no SVID of this CA carries is refused, not answered "nothing to revoke"
    for sid, why in (("spiffe://example.org", "has no path"), ("spiffe://other.org/x", "not in this CA's trust domain")):
        with pytest.raises(meshid.errors.InvalidRequestError, match=why):
            service.revoke(spiffe_id=sid)
    assert service.revoke(spiffe_id="spiffe://example.org/never/issued") == []


def test_revocation_of_an_old_key_svid_survives_a_ca_key_rotation(service) -> None:
    issued, _ = _issue(service)
    old_root = service.authority
    new = Authority.create_root("example.org")
    service.set_authority(new)
    serial = issued.chain[0].serial_number
    service.revoke(serial=format(serial, "x"))
    der, _ = service.crl()
    both = meshid.BundleSet.of(meshid.TrustBundle(old_root.trust_domain, (*old_root.roots, *new.roots)))
    listed = meshid.RevocationList.from_der(der, [new.certificate], both)  # signed by the new key
    peer = meshid.PeerIdentity.from_certificate(issued.chain[0], spiffe_id=issued.spiffe_id)
    assert listed.is_revoked(peer)  # matched by trust domain and serial, not by the old issuer's name


def test_a_revoked_caller_cannot_renew_even_past_the_interceptor(service) -> None:
    issued, _ = _issue(service)
    serial = issued.chain[0].serial_number
    service.revoke(serial=format(serial, "x"))
    with pytest.raises(meshid.errors.NotAuthorizedError, match="is revoked"):
        service.renew(issued.spiffe_id, build_csr(generate_key()), caller_serial=serial)
    # a revocation made by another CA process on the same store is seen too
    renewed = _issue_again(service)
    assert not service.is_revoked(renewed)
    service.store.revoke_serial(renewed, datetime.datetime.now(datetime.UTC))  # not through this service
    assert service.is_revoked(renewed)


def _issue_again(service: IssuingService) -> int:
    token, _ = service.create_token("admin", WEB)
    return service.issue_with_token(token, build_csr(generate_key())).chain[0].serial_number
