"""`meshid ca init` refuses an upstream CA it could not work under, and a CA folder refuses a
config.json it does not fully understand: one line (exit 2), never a traceback, and a refused
init leaves no data folder behind. Real ``meshid`` processes; the odd upstream roots are made
with ``cryptography``, the ordinary ones with meshid's own CA code."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from meshid import BundleSet, TrustBundle
from meshid.ca import Authority
from meshid.ca.datadir import load_authority
from meshid.errors import DataDirError
from support import assert_refused, run_cli

TD = "example.org"
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))


def _root(
    name: str,
    *,
    ski: bool = True,
    ca: bool = True,
    key_cert_sign: bool = True,
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + 365 * DAY,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A root (or, with ``issuer``, a CA under it) as other PKIs make them: only what the
    arguments leave out is missing."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
    )
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return builder.sign(signing_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upstreams")
    _write(folder, "root", *_root("a root as other PKIs make them"))
    _write(folder, "root-without-ski", *_root("root without SKI", ski=False))
    _write(folder, "root-expired", *_root("expired root", not_before=NOW - 60 * DAY, not_after=NOW - 30 * DAY))
    _write(folder, "root-not-yet-valid", *_root("future root", not_before=NOW + 30 * DAY, not_after=NOW + 400 * DAY))
    _write(folder, "root-ca-false", *_root("not a CA", ca=False))
    _write(folder, "root-without-key-cert-sign", *_root("no keyCertSign", key_cert_sign=False))
    meshid_root = Authority.create_root("upstream.test")
    _write(folder, "meshid-root", meshid_root.certificate, meshid_root.private_key)  # type: ignore[arg-type]
    other = Authority.create_root("upstream.test")
    _write(folder, "key-of-another-root", meshid_root.certificate, other.private_key)  # type: ignore[arg-type]
    # an intermediate that is valid, under a root (second in the file) that has expired
    old_root = _root("expired root above", not_before=NOW - 60 * DAY, not_after=NOW - DAY)
    under, under_key = _root("intermediate under it", issuer=old_root)
    _write(folder, "chain-to-expired-root", under, under_key)
    with (folder / "chain-to-expired-root.pem").open("ab") as chain:
        chain.write(old_root[0].public_bytes(Encoding.PEM))
    return folder


def _init(upstreams: Path, data_dir: Path, name: str) -> subprocess.CompletedProcess[str]:
    cert, key = str(upstreams / f"{name}.pem"), str(upstreams / f"{name}.key")
    return run_cli(
        "ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD, "--upstream-cert", cert, "--upstream-key", key
    )


def _not_after(upstreams: Path, name: str, index: int = 0) -> str:
    return x509.load_pem_x509_certificates((upstreams / f"{name}.pem").read_bytes())[
        index
    ].not_valid_after_utc.isoformat()


@pytest.mark.parametrize("name", ["root", "meshid-root"])
def test_usable_upstream_root_makes_a_ca_whose_svids_verify(upstreams: Path, tmp_path: Path, name: str) -> None:
    result = _init(upstreams, tmp_path / "ca", name)
    assert result.returncode == 0, result.stderr
    authority, _ = load_authority(tmp_path / "ca")
    svid = authority.issue_svid(f"spiffe://{TD}/web")
    bundles = BundleSet.of(TrustBundle.load(TD, tmp_path / "ca" / "bundle.pem"))
    assert str(bundles.verify(svid.leaf, svid.chain[1:])) == f"spiffe://{TD}/web"


def test_upstream_root_without_subject_key_identifier_is_refused(upstreams: Path, tmp_path: Path) -> None:
    result = _init(upstreams, tmp_path / "ca", "root-without-ski")
    assert_refused(result, "root-without-ski.pem", "has no subjectKeyIdentifier extension")
    assert not (tmp_path / "ca").exists()


def test_expired_upstream_root_is_refused(upstreams: Path, tmp_path: Path) -> None:
    result = _init(upstreams, tmp_path / "ca", "root-expired")
    when = _not_after(upstreams, "root-expired")
    assert_refused(result, "the upstream certificate", "root-expired.pem", f"expired at {when}")
    assert not (tmp_path / "ca").exists()


def test_upstream_chain_to_an_expired_root_is_refused(upstreams: Path, tmp_path: Path) -> None:
    result = _init(upstreams, tmp_path / "ca", "chain-to-expired-root")
    when = _not_after(upstreams, "chain-to-expired-root", 1)
    assert_refused(result, "chain-to-expired-root.pem", "CN=expired root above", f"expired at {when}")
    assert not (tmp_path / "ca").exists()


def test_upstream_root_not_yet_valid_is_refused(upstreams: Path, tmp_path: Path) -> None:
    result = _init(upstreams, tmp_path / "ca", "root-not-yet-valid")
    cert = x509.load_pem_x509_certificate((upstreams / "root-not-yet-valid.pem").read_bytes())
    when = cert.not_valid_before_utc.isoformat()
    assert_refused(result, "root-not-yet-valid.pem", f"is not valid until {when}", "check the clocks")
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("root-ca-false", "is not a CA"),
        ("root-without-key-cert-sign", "has a key usage without keyCertSign"),
        ("key-of-another-root", "the upstream key does not match the upstream certificate"),
    ],
)
def test_upstream_that_cannot_sign_is_refused(upstreams: Path, tmp_path: Path, name: str, reason: str) -> None:
    result = _init(upstreams, tmp_path / "ca", name)
    assert_refused(result, reason)
    assert not (tmp_path / "ca").exists()


# --- config.json ---------------------------------------------------------------------------

ALLOWED = "version, trust_domain, max_ttl_seconds, datastore, dns_suffixes, agent_id_template, ocsp_url, crl_url"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("made") / "ca"
    result = run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD)
    assert result.returncode == 0, result.stderr
    return folder


def _edited(made: Path, tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "ca"
    shutil.copytree(made, folder)
    (folder / "config.json").write_text(text)
    return folder


def _with(made: Path, **changes: object) -> str:
    return json.dumps({**json.loads((made / "config.json").read_text()), **changes})


def test_config_with_an_unknown_key_is_refused(made: Path, tmp_path: Path) -> None:
    folder = _edited(made, tmp_path, _with(made, dns_sufixes=["internal.example.com"]))  # a typo
    result = run_cli("ca", "rotate", "status", "--data-dir", str(folder))
    assert_refused(result, f"{folder / 'config.json'}", "unknown key 'dns_sufixes'", ALLOWED)
    with pytest.raises(DataDirError, match="unknown key 'dns_sufixes'"):
        load_authority(folder)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"max_ttl_seconds": "3600"}, 'max_ttl_seconds must be a positive integer, not "3600"'),
        ({"datastore": 5}, "datastore must be a string or null, not 5"),
        ({"version": 2}, "version must be 1, not 2"),
    ],
)
def test_config_with_a_value_of_the_wrong_type_is_refused(
    made: Path, tmp_path: Path, changes: dict[str, object], reason: str
) -> None:
    folder = _edited(made, tmp_path, _with(made, **changes))
    assert_refused(run_cli("ca", "rotate", "status", "--data-dir", str(folder)), "config.json", reason)


def test_config_with_a_key_twice_is_refused(made: Path, tmp_path: Path) -> None:
    text = _with(made)[:-1] + ', "max_ttl_seconds": 60}'  # json would keep the last one
    folder = _edited(made, tmp_path, text)
    assert_refused(run_cli("ca", "rotate", "status", "--data-dir", str(folder)), "'max_ttl_seconds' is given twice")


def test_config_written_by_the_first_meshid_still_opens(made: Path, tmp_path: Path) -> None:
    first = {key: json.loads((made / "config.json").read_text())[key] for key in ("version", "trust_domain")}
    folder = _edited(made, tmp_path, json.dumps({**first, "max_ttl_seconds": 3600}))
    result = run_cli("ca", "rotate", "status", "--data-dir", str(folder))
    assert result.returncode == 0, result.stderr
    _, config = load_authority(folder)
    assert (config.max_ttl, config.dns_suffixes, config.agent_id_template) == (datetime.timedelta(hours=1), (), None)


@pytest.mark.parametrize("folder_exists", [False, True], ids=["new-folder", "empty-folder"])
def test_init_that_cannot_reach_its_datastore_leaves_nothing_behind(
    upstreams: Path, tmp_path: Path, folder_exists: bool
) -> None:
    # Nothing listens on port 1: the CA's files are written, then the store cannot be opened.
    pytest.importorskip("psycopg")
    data_dir = tmp_path / "ca"
    if folder_exists:
        data_dir.mkdir()
    cert, key = str(upstreams / "meshid-root.pem"), str(upstreams / "meshid-root.key")
    args = ["ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD, "--upstream-cert", cert]
    result = run_cli(*args, "--upstream-key", key, "--datastore", "postgresql://ca@127.0.0.1:1/meshid")
    assert_refused(result, "connection failed")
    assert (list(data_dir.iterdir()) == []) if folder_exists else not data_dir.exists()
    # and a second try finds no half-made CA ("already holds a CA") but the same refusal
    assert_refused(run_cli(*args, "--upstream-key", key, "--datastore", "postgresql://ca@127.0.0.1:1/m"), "connection")


def test_a_ttl_longer_than_the_ca_lives_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "ca"
    result = run_cli("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD, "--ttl", "100000d")
    assert_refused(result, "--ttl (100000d 0h) is longer than this CA lives", "give a shorter --ttl")
    assert not data_dir.exists()


@pytest.mark.parametrize("name", ["ca.pem", "ca.key", "bundle.pem"])
def test_a_corrupt_file_of_the_folder_is_named(tmp_path: Path, name: str) -> None:
    data_dir = tmp_path / "ca"
    assert run_cli("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD).returncode == 0
    (data_dir / name).write_text("garbage\n")
    result = run_cli("ca", "rotate", "status", "--data-dir", str(data_dir))
    assert_refused(result, f"CA: {data_dir / name} in the data folder is unreadable")
    assert "https://" not in result.stderr  # cryptography's FAQ link is not the operator's next step
