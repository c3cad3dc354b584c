"""The CA's data folder: what ``meshid ca init`` writes and ``meshid ca serve`` reads.

::

    DIR/config.json      trust domain, maximum SVID TTL
    DIR/ca.key           the CA's private key (0600)
    DIR/ca.pem           the CA's certificate, then any intermediates above it
    DIR/bundle.pem       the roots peers trust (the CA itself, or the upstream root)
    DIR/meshid.db        the store (SQLite)
    DIR/admin/           svid.pem, svid.key (0600), bundle.pem: the admin SVID the CLI uses

Every file is written atomically; everything is checked before anything is written.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid import _x509
from meshid._files import write_atomic, write_svid_files
from meshid.bundle import TrustBundle
from meshid.ca.authority import Authority, generate_key
from meshid.ca.service import IssuingService, admin_id, ca_id
from meshid.ca.sqlite import SqliteStore
from meshid.ca.store import Entry
from meshid.errors import MeshIdError
from meshid.spiffeid import TrustDomain

__all__ = ["CaConfig", "init_data_dir", "load_authority", "open_service"]

#: The CA's own SVIDs (its server's and the admin's) live this long and are refreshed by `ca serve`.
INTERNAL_TTL = datetime.timedelta(hours=24)


class DataDirError(MeshIdError):
    """The CA's data folder is missing, incomplete, or already initialised."""


@dataclass(frozen=True, slots=True)
class CaConfig:
    trust_domain: TrustDomain
    max_ttl: datetime.timedelta


def _paths(folder: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
    root = pathlib.Path(folder)
    return {
        "config": root / "config.json",
        "key": root / "ca.key",
        "cert": root / "ca.pem",
        "bundle": root / "bundle.pem",
        "db": root / "meshid.db",
        "admin": root / "admin",
    }


def _read_upstream(cert_file: str, key_file: str) -> tuple[list[x509.Certificate], object]:
    try:
        certs = x509.load_pem_x509_certificates(pathlib.Path(cert_file).read_bytes())
    except (OSError, ValueError) as err:
        raise DataDirError(f"CA init: cannot read the upstream certificate {cert_file!r}: {err}") from err
    if not _x509.is_ca(certs[0]):
        raise DataDirError(f"CA init: the upstream certificate {cert_file!r} is not a CA")
    try:
        key = serialization.load_pem_private_key(pathlib.Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise DataDirError(f"CA init: cannot read the upstream key {key_file!r}: {err}") from err
    if _x509.public_key_der(key.public_key()) != _x509.public_key_der(certs[0].public_key()):
        raise DataDirError("CA init: the upstream key does not match the upstream certificate")
    return certs, key


def init_data_dir(
    folder: str | os.PathLike[str],
    trust_domain: str,
    *,
    max_ttl: datetime.timedelta = datetime.timedelta(hours=24),
    upstream_cert: str | None = None,
    upstream_key: str | None = None,
) -> CaConfig:
    """Create a CA: key, certificate, bundle, database, and the admin SVID.

    Raises:
        DataDirError: the folder already holds a CA, or the upstream files are unusable.
        InvalidSpiffeIdError: the trust domain is malformed.
    """
    td = TrustDomain.parse(trust_domain)
    paths = _paths(folder)
    if paths["key"].exists() or paths["db"].exists():
        raise DataDirError(f"CA init: {os.fspath(folder)!r} already holds a CA; choose an empty folder")
    if (upstream_cert is None) != (upstream_key is None):
        raise DataDirError("CA init: give both --upstream-cert and --upstream-key, or neither")
    if max_ttl <= datetime.timedelta(0):
        raise DataDirError("CA init: --ttl must be positive")
    if upstream_cert is not None and upstream_key is not None:
        certs, key = _read_upstream(upstream_cert, upstream_key)
        authority = Authority.from_upstream(td, certs[0], key, upstream_chain=certs[1:])  # type: ignore[arg-type]
    else:
        authority = Authority.create_root(td, key=generate_key())
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    ca_chain = (authority.certificate, *authority.chain[1:]) if authority.chain else (authority.certificate,)
    write_atomic(paths["key"], _x509.key_pem(authority.private_key), mode=0o600)
    write_atomic(paths["cert"], b"".join(_x509.cert_pem(c) for c in ca_chain))
    write_atomic(paths["bundle"], TrustBundle(td, authority.roots).to_pem())
    config = CaConfig(td, max_ttl)
    write_atomic(
        paths["config"],
        json.dumps({"version": 1, "trust_domain": td.name, "max_ttl_seconds": int(max_ttl.total_seconds())}).encode(),
    )
    store = SqliteStore(paths["db"])
    try:
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        for sid in (ca_id(authority), admin_id(authority)):
            store.create_entry(Entry(sid, (), INTERNAL_TTL, now))
        if store.bundle_sequence() == 0:
            store.bump_bundle_sequence()
        service = IssuingService(authority, store, max_ttl=max_ttl)
        refresh_admin_svid(service, paths["admin"])
    finally:
        store.close()
    return config


def refresh_admin_svid(service: IssuingService, folder: pathlib.Path) -> None:
    """Issue a new admin SVID into ``folder`` (the CA can, since it holds the key)."""
    key = generate_key()
    chain = service.issue_internal(admin_id(service.authority), key.public_key())
    write_svid_files(
        folder,
        b"".join(_x509.cert_pem(c) for c in chain),
        _x509.key_pem(key),
        service.bundle().to_pem(),
    )


def load_authority(folder: str | os.PathLike[str]) -> tuple[Authority, CaConfig]:
    """Read the CA's key, certificates and configuration.

    Raises:
        DataDirError: a file is missing or does not fit the others.
    """
    paths = _paths(folder)
    try:
        raw = json.loads(paths["config"].read_text())
        config = CaConfig(
            TrustDomain.parse(raw["trust_domain"]), datetime.timedelta(seconds=int(raw["max_ttl_seconds"]))
        )
        certs = x509.load_pem_x509_certificates(paths["cert"].read_bytes())
        key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
        roots = TrustBundle.load(config.trust_domain, paths["bundle"]).roots
    except FileNotFoundError as err:
        raise DataDirError(
            f"CA: {err.filename} is missing; run `meshid ca init --data-dir {os.fspath(folder)}` first"
        ) from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataDirError(f"CA: the data folder {os.fspath(folder)!r} is unreadable: {err}") from err
    if _x509.public_key_der(key.public_key()) != _x509.public_key_der(certs[0].public_key()):
        raise DataDirError("CA: ca.key does not match ca.pem")
    self_signed = certs[0].issuer == certs[0].subject
    chain = () if self_signed else tuple(certs)
    return Authority(config.trust_domain, certs[0], key, chain, roots), config  # type: ignore[arg-type]


def open_service(folder: str | os.PathLike[str], **kwargs: object) -> IssuingService:
    """The issuing service over a data folder (its store stays open until ``service.store.close()``)."""
    authority, config = load_authority(folder)
    store = SqliteStore(_paths(folder)["db"])
    return IssuingService(authority, store, max_ttl=config.max_ttl, **kwargs)  # type: ignore[arg-type]
