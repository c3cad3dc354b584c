"""ML-DSA-65 (FIPS 204, RFC 9881) in meshid's CA (issue #18, must show 1): a post-quantum CA beside
the classical one, its root in the bundle, SVIDs for ML-DSA CSRs through the CA's own gRPC API,
verified with cryptography's verifier; py-spiffe still reads the classical SVID and the bundle."""

from __future__ import annotations

import base64
import datetime
import json
import re
from pathlib import Path

import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import SignatureAlgorithmOID

from meshid import BundleSet, TrustBundle, X509Svid
from meshid.ca import Authority, generate_key
from meshid.ca.client import AdminClient, issue_with_token, renew_with_svid
from meshid.ca.csr import build_csr, parse_csr
from meshid.ca.datadir import (
    DataDirError,
    activate_rotation,
    add_key_type,
    init_data_dir,
    load_authority,
    load_pq_authority,
    open_service,
    prepare_rotation,
    retire_due_roots,
)
from meshid.ca.server import CaServer
from meshid.errors import InvalidRequestError, NotAuthorizedError, RemoteError
from support import run_cli

TD = "example.org"
WEB = f"spiffe://{TD}/ns/prod/sa/web"
ML_DSA_65 = SignatureAlgorithmOID.ML_DSA_65


def _usage(cert: x509.Certificate) -> x509.KeyUsage:
    return cert.extensions.get_extension_for_class(x509.KeyUsage).value


def _flags(usage: x509.KeyUsage) -> set[str]:
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement"]
    names += ["key_cert_sign", "crl_sign"]
    return {name for name in names if getattr(usage, name)}


@pytest.fixture(scope="module")
def pq_ca() -> Authority:
    return Authority.create_root(TD, key=generate_key("ml-dsa-65"))


def test_ml_dsa_root_and_leaf_keep_the_x509_svid_profile_with_rfc_9881_key_usage(pq_ca: Authority) -> None:
    svid = pq_ca.issue_svid(WEB, key_kind="ml-dsa-65")
    for cert in (pq_ca.certificate, svid.leaf):
        assert cert.signature_algorithm_oid == ML_DSA_65
        assert cert.signature_hash_algorithm is None  # pure ML-DSA: no pre-hash
        assert cert.signature_algorithm_parameters is None  # RFC 9881: parameters absent
        assert isinstance(cert.public_key(), mldsa.MLDSA65PublicKey)
    # RFC 9881: only digitalSignature, nonRepudiation, keyCertSign, cRLSign; never encipherment/agreement
    assert _flags(_usage(pq_ca.certificate)) == {"key_cert_sign", "crl_sign"}
    assert _flags(_usage(svid.leaf)) == {"digital_signature"}
    assert svid.leaf.extensions.get_extension_for_class(x509.KeyUsage).critical
    assert [str(u) for u in svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value][:1] == [
        f"<UniformResourceIdentifier(value='{WEB}')>"
    ]


def test_ml_dsa_svid_verifies_against_a_bundle_holding_both_roots(pq_ca: Authority) -> None:
    classical = Authority.create_root(TD)
    bundles = BundleSet.of(TrustBundle(TD, (*classical.roots, *pq_ca.roots)))
    svid = pq_ca.issue_svid(WEB, key_kind="ml-dsa-65")
    assert str(bundles.verify(svid.leaf, svid.chain[1:])) == WEB
    assert str(bundles.verify(*classical.issue_svid(WEB).chain)) == WEB


def test_ml_dsa_svid_signed_by_another_ml_dsa_root_is_refused(pq_ca: Authority) -> None:
    stranger = Authority.create_root(TD, key=generate_key("ml-dsa-65"))
    svid = stranger.issue_svid(WEB, key_kind="ml-dsa-65")
    with pytest.raises(Exception, match="does not verify"):
        BundleSet.of(TrustBundle(TD, pq_ca.roots)).verify(svid.leaf)


def test_ml_dsa_csr_is_accepted_and_other_parameter_sets_are_refused() -> None:
    key = generate_key("ml-dsa-65")
    parsed = parse_csr(build_csr(key, uri=WEB))
    assert parsed.public_key == key.public_key() and parsed.requested_uris == (WEB,)
    with pytest.raises(InvalidRequestError, match="ML-DSA-44 key is not allowed; use ML-DSA-65"):
        parse_csr(build_csr(mldsa.MLDSA44PrivateKey.generate()))


def test_ml_dsa_csr_with_a_broken_signature_is_refused() -> None:
    der = bytearray(build_csr(generate_key("ml-dsa-65")))
    der[-10] ^= 0xFF  # inside the ML-DSA signature, the last field of the request
    with pytest.raises(InvalidRequestError, match="CSR: the signature does not verify"):
        parse_csr(bytes(der))


def test_spiffe_json_bundle_gives_the_ml_dsa_root_as_an_akp_jwk_with_x5c(pq_ca: Authority) -> None:
    classical = Authority.create_root(TD)
    bundle = TrustBundle(TD, (*classical.roots, *pq_ca.roots), sequence=3)
    keys = json.loads(bundle.to_spiffe_json())["keys"]
    assert [k["kty"] for k in keys] == ["EC", "AKP"]
    akp = keys[1]
    raw = pq_ca.certificate.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert akp["alg"] == "ML-DSA-65" and akp["use"] == "x509-svid"
    assert base64.urlsafe_b64decode(akp["pub"] + "=" * (-len(akp["pub"]) % 4)) == raw
    assert base64.b64decode(akp["x5c"][0]) == pq_ca.certificate.public_bytes(Encoding.DER)
    assert TrustBundle.from_spiffe_json(TD, bundle.to_spiffe_json()) == bundle


# --- the data folder: a CA beside the classical one, rotated the same way --------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    init_data_dir(tmp_path / "ca", TD, max_ttl=datetime.timedelta(seconds=1))
    return tmp_path / "ca"


def test_key_add_publishes_the_ml_dsa_root_beside_the_classical_one(folder: Path) -> None:
    classical, _ = load_authority(folder)
    added = add_key_type(folder, "ml-dsa-65")
    assert (folder / "ml-dsa-65" / "ca.key").stat().st_mode & 0o777 == 0o600
    pq = load_pq_authority(folder)
    assert pq is not None and pq.certificate == added
    roots = TrustBundle.load(TD, folder / "bundle.pem").roots
    assert roots == (classical.certificate, added)
    assert load_authority(folder)[0].certificate == classical.certificate  # the classical CA still signs


def test_key_add_interrupted_before_publishing_is_finished_by_a_rerun(folder: Path) -> None:
    before = (folder / "bundle.pem").read_bytes()
    added = add_key_type(folder)
    (folder / "bundle.pem").write_bytes(before)  # the crash: the CA's files written, its root not yet published
    assert add_key_type(folder) == added
    assert TrustBundle.load(TD, folder / "bundle.pem").roots[-1] == added


def test_key_add_interrupted_before_moving_the_ca_in_place_is_finished_by_a_rerun(folder: Path) -> None:
    added = add_key_type(folder)
    pending = folder / "ml-dsa-65" / "pending"
    for name in ("ca.key", "ca.pem"):  # the crash: made and published, still pending
        (folder / "ml-dsa-65" / name).rename(pending / name)
    assert load_pq_authority(folder) is None
    assert add_key_type(folder) == added
    pq = load_pq_authority(folder)
    assert pq is not None and pq.certificate == added
    assert TrustBundle.load(TD, folder / "bundle.pem").roots.count(added) == 1


def test_key_add_twice_or_of_another_kind_is_refused(folder: Path) -> None:
    add_key_type(folder)
    with pytest.raises(DataDirError, match="has an ml-dsa-65 CA already"):
        add_key_type(folder)
    with pytest.raises(DataDirError, match="only a ml-dsa-65 CA can be added"):
        add_key_type(folder, "ec-p384")


def test_service_signs_each_csr_with_the_ca_of_its_key_family(folder: Path) -> None:
    add_key_type(folder)
    service = open_service(folder)
    try:
        service.create_entry("admin", WEB, svid_types=["ml-dsa-65", "classical"])
        token, _ = service.create_token("admin", WEB)
        first = service.issue_with_token(token, build_csr(generate_key()))
        caller = first.chain[0]
        renewed = service.renew(
            first.spiffe_id, build_csr(generate_key("ml-dsa-65")), caller_serial=caller.serial_number
        )
    finally:
        service.store.close()
    pq = load_pq_authority(folder)
    assert pq is not None
    assert isinstance(caller.public_key(), ec.EllipticCurvePublicKey) and caller.issuer != pq.certificate.subject
    assert renewed.chain[0].issuer == pq.certificate.subject
    assert renewed.chain[0].signature_algorithm_oid == ML_DSA_65
    assert len(renewed.bundle.roots) == 2
    BundleSet.of(renewed.bundle).verify(renewed.chain[0], renewed.chain[1:])


def test_ml_dsa_csr_without_an_ml_dsa_ca_is_refused_before_the_token_is_used(folder: Path) -> None:
    service = open_service(folder)
    try:
        service.create_entry("admin", WEB)
        token, _ = service.create_token("admin", WEB)
        with pytest.raises(InvalidRequestError, match="no ML-DSA CA"):
            service.issue_with_token(token, build_csr(generate_key("ml-dsa-65")))
        assert service.issue_with_token(token, build_csr(generate_key())).spiffe_id.path == "/ns/prod/sa/web"
    finally:
        service.store.close()


def test_ml_dsa_ca_rotates_with_prepare_and_activate_and_its_old_root_retires(folder: Path) -> None:
    add_key_type(folder)
    classical = load_authority(folder)[0].certificate
    old = load_pq_authority(folder)
    assert old is not None
    with pytest.raises(DataDirError, match="nothing prepared; run `meshid ca rotate prepare --key-type ml-dsa-65`"):
        activate_rotation(folder, key_type="ml-dsa-65")
    new = prepare_rotation(folder, key_type="ml-dsa-65")
    assert isinstance(new.public_key(), mldsa.MLDSA65PublicKey)
    assert TrustBundle.load(TD, folder / "bundle.pem").roots == (classical, old.certificate, new)
    activate_rotation(folder, key_type="ml-dsa-65", grace=datetime.timedelta(0))
    pq = load_pq_authority(folder)
    assert pq is not None and pq.certificate == new
    assert load_authority(folder)[0].certificate == classical
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    assert retire_due_roots(folder, now=later) == [x509_fingerprint(old.certificate)]
    assert TrustBundle.load(TD, folder / "bundle.pem").roots == (classical, new)


def x509_fingerprint(cert: x509.Certificate) -> str:
    import hashlib

    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def test_rotating_an_ml_dsa_ca_that_does_not_exist_is_refused(folder: Path) -> None:
    with pytest.raises(DataDirError, match="has no ml-dsa-65 CA; add one with `meshid ca key add`"):
        prepare_rotation(folder, key_type="ml-dsa-65")


def test_post_quantum_only_ca_signs_with_ml_dsa_and_refuses_to_serve_on_grpcio(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "pq", TD, key_type="ml-dsa-65")
    authority, _ = load_authority(tmp_path / "pq")
    assert isinstance(authority.private_key, mldsa.MLDSA65PrivateKey)
    assert load_pq_authority(tmp_path / "pq") is None  # the first CA is the ML-DSA one
    service = open_service(tmp_path / "pq")
    try:
        assert service.authority_for(generate_key("ml-dsa-65").public_key()) is service.authority
    finally:
        service.store.close()
    with pytest.raises(DataDirError, match=r"grpcio .* refuses ML-DSA"):
        CaServer(tmp_path / "pq", "127.0.0.1:0")


def test_ca_init_refuses_a_key_type_that_cannot_sign_svids(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="is not a CA key type"):
        init_data_dir(tmp_path / "ed", TD, key_type="ed25519")


# --- through the CA's gRPC API, and the CLI ------------------------------------------------------------


def test_a_workload_gets_both_svids_for_one_spiffe_id_through_the_ca_api(tmp_path: Path) -> None:
    """Must show 1: the ML-DSA-65 SVID verifies with cryptography's verifier against the bundle, and
    py-spiffe parses the classical SVID of the same workload, and the two-root bundle, unchanged."""
    folder = tmp_path / "ca"
    assert run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD).returncode == 0
    added = run_cli("ca", "key", "add", "--data-dir", str(folder), "--key-type", "ml-dsa-65")
    assert added.returncode == 0, added.stderr
    assert "its root is in" in added.stdout
    server = CaServer(folder, "127.0.0.1:0")
    address = f"127.0.0.1:{server.start()}"
    try:
        created = run_cli(
            "entry", "create", "--server", address, "--data-dir", str(folder), "--spiffe-id", WEB,
            "--svid-types", "classical,ml-dsa-65",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        assert created.stdout.strip() == f"created {WEB} (ttl 3600s, svids classical,ml-dsa-65)"
        with AdminClient(address, folder) as admin:
            token = admin.create_token(WEB).token
            (listed,) = [e for e in admin.list_entries() if e.spiffe_id == WEB]
            assert list(listed.svid_types) == ["classical", "ml-dsa-65"]
        roots = (folder / "bundle.pem").read_bytes()
        classical = issue_with_token(address, roots, token)
        bundles = BundleSet.of(classical.bundle)
        # The classical SVID authenticates the call (grpcio's handshake); the CSR carries the ML-DSA key.
        post_quantum = renew_with_svid(address, classical.svid, bundles, key_kind="ml-dsa-65")
        with AdminClient(address, folder) as admin:  # an entry that did not ask for ML-DSA
            admin.create_entry(f"{WEB}-classic")
            other = issue_with_token(address, roots, admin.create_token(f"{WEB}-classic").token)
        with pytest.raises(RemoteError, match=r"PERMISSION_DENIED: .* allows classical SVIDs, not ml-dsa-65 ones"):
            renew_with_svid(address, other.svid, bundles, key_kind="ml-dsa-65")
    finally:
        server.stop(grace=None)
    assert post_quantum.svid.spiffe_id == classical.svid.spiffe_id
    leaf = post_quantum.svid.leaf
    assert leaf.signature_algorithm_oid == ML_DSA_65 and isinstance(leaf.public_key(), mldsa.MLDSA65PublicKey)
    assert str(BundleSet.of(post_quantum.bundle).verify(leaf, post_quantum.svid.chain[1:])) == WEB
    status = run_cli("ca", "rotate", "status", "--data-dir", str(folder)).stdout
    assert "signing (ECDSA-P256)" in status and "signing (ML-DSA-65)" in status
    # py-spiffe reads the classical SVID, and the bundle that now holds the ML-DSA root too, unchanged
    (tmp_path / "svid.pem").write_bytes(classical.svid.chain_pem())
    (tmp_path / "svid.key").write_bytes(classical.svid.key_pem())
    theirs = spiffe.X509Svid.load(str(tmp_path / "svid.pem"), str(tmp_path / "svid.key"), Encoding.PEM)
    assert str(theirs.spiffe_id) == WEB
    their_bundle = spiffe.X509Bundle.load(spiffe.TrustDomain(TD), str(folder / "bundle.pem"), Encoding.PEM)
    assert len(their_bundle.x509_authorities) == 2
    assert classical.svid.leaf.issuer in {root.subject for root in their_bundle.x509_authorities}
    assert X509Svid.from_pem(classical.svid.chain_pem(), classical.svid.key_pem()) == classical.svid


# --- the entry says which SVIDs its workload may hold -------------------------------------------------


def test_an_entry_is_classical_only_unless_it_asks_and_an_ml_dsa_renewal_is_then_refused(folder: Path) -> None:
    add_key_type(folder)
    service = open_service(folder)
    try:
        assert service.create_entry("admin", WEB).svid_types == ("classical",)
        token, _ = service.create_token("admin", WEB)
        first = service.issue_with_token(token, build_csr(generate_key()))
        with pytest.raises(NotAuthorizedError, match="allows classical SVIDs, not ml-dsa-65 ones"):
            service.renew(first.spiffe_id, build_csr(generate_key("ml-dsa-65")))
    finally:
        service.store.close()


def test_an_ml_dsa_only_entry_refuses_a_classical_csr(folder: Path) -> None:
    add_key_type(folder)
    service = open_service(folder)
    try:
        assert service.create_entry("admin", WEB, svid_types=["ml-dsa-65"]).svid_types == ("ml-dsa-65",)
        token, _ = service.create_token("admin", WEB)
        with pytest.raises(NotAuthorizedError, match="allows ml-dsa-65 SVIDs, not classical ones"):
            service.issue_with_token(token, build_csr(generate_key()))
        issued = service.issue_with_token(token, build_csr(generate_key("ml-dsa-65")))  # the token was not spent
        assert issued.chain[0].signature_algorithm_oid == ML_DSA_65
    finally:
        service.store.close()


@pytest.mark.parametrize(
    ("svid_types", "parent", "message"),
    [
        (["ml-dsa-87"], "", "SVID type 'ml-dsa-87' is unknown; use classical and/or ml-dsa-65"),
        (["classical", "ml-dsa-65", "classical"], "", "a list of at most 2 names"),
        (
            ["ml-dsa-65"],
            f"spiffe://{TD}/meshid/agent/n1",
            "served by its node agent, which serves classical SVIDs only",
        ),
    ],
)
def test_entry_svid_types_refusals(folder: Path, svid_types: list[str], parent: str, message: str) -> None:
    add_key_type(folder)
    service = open_service(folder)
    try:
        selectors = ["unix:uid:1"] if parent else []
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            service.create_entry("admin", WEB, svid_types=svid_types, parent_id=parent, selectors=selectors)
    finally:
        service.store.close()


def test_an_ml_dsa_entry_needs_the_trust_domains_ml_dsa_ca(folder: Path) -> None:
    service = open_service(folder)
    try:
        with pytest.raises(InvalidRequestError, match="SVID type ml-dsa-65 needs the trust domain's ML-DSA CA"):
            service.create_entry("admin", WEB, svid_types=["ml-dsa-65"])
    finally:
        service.store.close()


def test_a_running_ca_takes_up_an_ml_dsa_ca_added_to_its_folder(tmp_path: Path) -> None:
    from support import eventually

    folder = tmp_path / "ca"
    init_data_dir(folder, TD)
    server = CaServer(folder, "127.0.0.1:0", poll_interval=0.02)
    address = f"127.0.0.1:{server.start()}"
    try:
        with AdminClient(address, folder) as admin:
            admin.create_entry(WEB)
            token = admin.create_token(WEB).token
        classical = issue_with_token(address, (folder / "bundle.pem").read_bytes(), token)
        add_key_type(folder)
        pq = load_pq_authority(folder)
        assert pq is not None

        def loaded() -> bool:
            signing = server.service.pq_authority
            return signing is not None and signing.certificate == pq.certificate

        eventually(loaded, 10, "the running CA to load the ML-DSA CA")
        # the root was published before the CA's files were in place: loaded means trusted
        assert pq.certificate in server.service.pq_authority.roots
    finally:
        server.stop(grace=None)
    assert classical.svid.spiffe_id.path == "/ns/prod/sa/web"
