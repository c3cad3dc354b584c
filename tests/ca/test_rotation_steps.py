"""CA key rotation steps survive a crash in the middle: running the step again finishes it."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from meshid.ca.datadir import (
    DataDirError,
    activate_rotation,
    init_data_dir,
    load_authority,
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
