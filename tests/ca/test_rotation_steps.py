"""CA key rotation steps survive a crash in the middle: running the step again finishes it."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from meshid import TrustDomain, identity_dns_name
from meshid.ca import Authority
from meshid.ca.datadir import (
    DataDirError,
    activate_rotation,
    init_data_dir,
    load_authority,
    open_service,
    prepare_rotation,
    retire_due_roots,
)


@pytest.fixture
def folder(tmp_path):
    init_data_dir(tmp_path / "ca", "example.org", max_ttl=datetime.timedelta(seconds=1))
    return tmp_path / "ca"


def _roots(folder) -> list[str]:
    return [r.subject.rfc4514_string() for r in load_authority(folder)[0].roots]


def test_activate_interrupted_after_the_new_key_is_finished_by_a_rerun(folder) -> None:
    old = load_authority(folder)[0].certificate
    new = prepare_rotation(folder)
    shutil.copy(folder / "next" / "ca.key", folder / "ca.key")  # the crash: new key, old certificate
    with pytest.raises(DataDirError, match="does not match"):
        load_authority(folder)
    activate_rotation(folder, grace=datetime.timedelta(0))
    authority, _ = load_authority(folder)
    assert authority.certificate == new
    rotation = json.loads((folder / "rotation.json").read_text())
    retiring = [r["fingerprint"] for r in rotation["retiring"]]
    assert retiring == [hashlib.sha256(old.public_bytes(Encoding.DER)).hexdigest()]  # the old root, once
    assert (folder / "retired").exists()


def test_activate_run_twice_never_retires_the_new_root(folder) -> None:
    prepare_rotation(folder)
    activate_rotation(folder, grace=datetime.timedelta(0))
    with pytest.raises(DataDirError, match="nothing prepared"):
        activate_rotation(folder)
    new_subject = load_authority(folder)[0].certificate.subject.rfc4514_string()
    removed = retire_due_roots(folder, now=datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1))
    assert len(removed) == 1
    assert _roots(folder) == [new_subject]


def test_prepare_interrupted_before_publishing_is_finished_by_a_rerun(folder) -> None:
    before = (folder / "bundle.pem").read_bytes()
    new = prepare_rotation(folder)
    (folder / "bundle.pem").write_bytes(before)  # the crash: next CA written, its root not published
    with pytest.raises(DataDirError, match=r"not in bundle\.pem"):
        activate_rotation(folder)
    assert prepare_rotation(folder) == new  # finishes publishing instead of refusing
    assert new.subject.rfc4514_string() in _roots(folder)
    activate_rotation(folder)
    assert load_authority(folder)[0].certificate == new


# --- under an upstream CA: the DNS name constraint and its suffixes ----------------------------------


@pytest.fixture
def upstream(tmp_path):
    corp = Authority.create_root("corp.example")
    cert, key = tmp_path / "corp.pem", tmp_path / "corp.key"
    cert.write_bytes(corp.certificate.public_bytes(Encoding.PEM))
    key.write_bytes(corp.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return {"upstream_cert": str(cert), "upstream_key": str(key)}


def _permitted(cert) -> list[str]:
    constraint = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraint.critical
    return [name.value for name in constraint.value.permitted_subtrees]


def test_rotation_under_an_upstream_ca_keeps_the_dns_suffixes(tmp_path, upstream) -> None:
    folder = tmp_path / "ca"
    config = init_data_dir(folder, "example.org", dns_suffixes=["svc.example.com", "SVC.example.com"], **upstream)
    assert config.dns_suffixes == ("svc.example.com",)
    zone = identity_dns_name(TrustDomain.parse("example.org"))
    assert _permitted(load_authority(folder)[0].certificate) == [zone, "svc.example.com"]
    new = prepare_rotation(folder, **upstream)
    assert _permitted(new) == [zone, "svc.example.com"]
    activate_rotation(folder)
    authority, config = load_authority(folder)
    assert authority.certificate == new and config.dns_suffixes == ("svc.example.com",)


def test_a_folder_from_before_dns_suffixes_reads_as_none(tmp_path, upstream) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, "example.org", **upstream)
    document = json.loads((folder / "config.json").read_text())
    assert document.pop("dns_suffixes") == []
    (folder / "config.json").write_text(json.dumps(document))
    assert load_authority(folder)[1].dns_suffixes == ()
    # Its next CA gets the constraint (the trust domain's identity names only).
    assert _permitted(prepare_rotation(folder, **upstream)) == [identity_dns_name(TrustDomain.parse("example.org"))]


def test_rotation_refuses_a_next_ca_that_may_not_sign_an_entrys_dns_names(tmp_path, upstream) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, "example.org", dns_suffixes=["svc.example.com"], **upstream)
    service = open_service(folder)
    try:
        service.create_entry("admin", "spiffe://example.org/web", dns_names=["web.svc.example.com"])
    finally:
        service.store.close()
    document = json.loads((folder / "config.json").read_text())
    document["dns_suffixes"] = []  # the operator drops the suffix an entry still uses
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(
        DataDirError, match=r"entries carry others: web\.svc\.example\.com \(spiffe://example\.org/web\)"
    ):
        prepare_rotation(folder, **upstream)
    assert not (folder / "next" / "ca.key").exists()


def test_config_with_a_malformed_dns_suffix_is_refused(tmp_path, upstream) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, "example.org", **upstream)
    document = json.loads((folder / "config.json").read_text())
    document["dns_suffixes"] = ["meshid.invalid"]
    (folder / "config.json").write_text(json.dumps(document))
    with pytest.raises(DataDirError, match="covers meshid's identity names"):
        load_authority(folder)
