"""The CA's data folder: what ``meshid ca init`` writes and ``meshid ca serve`` reads.

::

    DIR/config.json      trust domain, maximum SVID TTL, datastore, DNS suffixes (upstream mode),
                         the x509pop agent ID template (when node agents may attest by x509pop),
                         the OCSP and CRL URLs leaves carry (``ca init --ocsp-url --crl-url``, or
                         ``meshid ca config set`` on a CA that runs: it reloads within a second)
    DIR/agent-ca.pem     the roots of the PKI whose host certificates attest node agents (x509pop)
    DIR/ca.key           the CA's private key (0600)
    DIR/jwt-keys.json    the CA's JWT-SVID signing keys (0600; see :mod:`meshid.ca.jwt_keys`)
    DIR/ca.pem           the CA's certificate, then any intermediates above it
    DIR/bundle.pem       the roots peers trust (the CA itself, or the upstream root)
    DIR/meshid.db        the store (SQLite)
    DIR/admin/           svid.pem, svid.key (0600), bundle.pem: the admin SVID the CLI uses
    DIR/ml-dsa-65/       ca.key, ca.pem (and next/, retired/, rotation.json): the post-quantum CA
                         beside the classical one (``meshid ca key add``); it signs the SVIDs whose
                         CSRs carry ML-DSA-65 keys, and its root is in bundle.pem beside the other

Every file is written atomically; everything is checked before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid import _x509
from meshid._files import write_atomic, write_svid_files
from meshid._json import unique_keys
from meshid.bundle import TrustBundle
from meshid.ca.authority import KEY_KINDS, Authority, check_dns_suffixes, check_revocation_url, generate_key, key_kind
from meshid.ca.issuing import IssuingService, admin_id, ca_id
from meshid.ca.jwt_keys import JWT_KEY_TYPES, JWT_SVID_TTL, JwtKey, JwtKeys
from meshid.ca.store import Entry, Store, open_store
from meshid.ca.x509pop import X509Pop
from meshid.errors import DataDirError
from meshid.spiffeid import TrustDomain

__all__ = [
    "PQ_KEY_TYPE",
    "CaConfig",
    "add_key_type",
    "ensure_jwt_keys",
    "init_data_dir",
    "load_authority",
    "load_jwt_keys",
    "load_pq_authority",
    "load_x509pop",
    "open_service",
    "prepare_jwt_rotation",
    "retire_due_jwt_keys",
    "set_revocation_urls",
]

#: The key type of the post-quantum CA a trust domain may have beside its classical one.
PQ_KEY_TYPE = "ml-dsa-65"

#: The CA's own SVIDs (its server's and the admin's) live this long and are refreshed by `ca serve`.
INTERNAL_TTL = datetime.timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class CaConfig:
    trust_domain: TrustDomain
    max_ttl: datetime.timedelta
    #: ``postgresql://...`` when replicas share a PostgreSQL database; None: DIR/meshid.db.
    datastore: str | None = None
    #: Under an upstream CA: the DNS suffixes the intermediate's name constraint permits besides
    #: the trust domain's identity names (``ca init --dns-suffix``); every rotation reuses them
    #: (to change them, edit the list in config.json, then rotate).
    dns_suffixes: tuple[str, ...] = ()
    #: With x509pop node attestation (``ca init --agent-ca``): the template that names an agent
    #: after its host certificate; the PKI's roots are DIR/agent-ca.pem. None: join tokens only.
    agent_id_template: str | None = None
    #: The OCSP responder's URL every leaf carries (AIA); None: none (the default, smaller SVIDs).
    ocsp_url: str | None = None
    #: The CRL's URL every leaf carries (CRL distribution point); None: none.
    crl_url: str | None = None


def _store(folder: str | os.PathLike[str], config: CaConfig) -> Store:
    return open_store(config.datastore or _paths(folder)["db"])


def _paths(folder: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
    root = pathlib.Path(folder)
    return {
        "config": root / "config.json",
        "key": root / "ca.key",
        "cert": root / "ca.pem",
        "bundle": root / "bundle.pem",
        "db": root / "meshid.db",
        "admin": root / "admin",
        "agent_ca": root / "agent-ca.pem",
        "jwt": root / "jwt-keys.json",
    }


def _pem_of(path: str, what: str, flag: str, expected: str) -> bytes:
    """The bytes of ``path`` once its PEM blocks are all ``expected`` ("CERTIFICATE" or a
    "... PRIVATE KEY"): a key given where the certificate goes is named as such, in one line."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise DataDirError(f"CA init: cannot read the {what} {path!r} ({flag}): {err.strerror}") from err
    try:
        labels = [label for label, _ in _x509.pem_blocks(data)]
    except ValueError as err:
        raise DataDirError(f"CA init: the {what} {path!r} ({flag}) is not PEM: {err}") from err
    if not labels:
        raise DataDirError(f"CA init: the {what} {path!r} ({flag}) holds no PEM block; give the {what}, PEM")
    wrong = next((label for label in labels if not label.endswith(expected)), None)
    if wrong is not None:
        hint = (
            "the certificate goes in --upstream-cert, its key in --upstream-key"
            if "PRIVATE KEY" in wrong or wrong == "CERTIFICATE"
            else f"give the {what}, PEM"
        )
        raise DataDirError(f"CA init: the {what} {path!r} ({flag}) holds a {wrong!r}, not a {expected.lower()}; {hint}")
    return data


def _check_upstream(certs: list[x509.Certificate], cert_file: str, now: datetime.datetime) -> None:
    """Refuse upstream CAs that cannot sign a working CA at ``now``: each certificate of the file
    must be a CA valid now whose key usage (where it has one) allows signing certificates, and the
    first must have a subjectKeyIdentifier, which the new CA's authorityKeyIdentifier repeats."""
    for index, cert in enumerate(certs):
        name = f"the upstream certificate {cert_file!r}"
        if index:
            name += f" (certificate {index + 1} in it, {cert.subject.rfc4514_string()[:100]!r})"
        try:
            is_ca = _x509.is_ca(cert)
            usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None  # no key usage: every use is allowed (RFC 5280 4.2.1.3)
        except _x509.PARSE_ERRORS as err:
            raise DataDirError(f"CA init: {name} cannot be read: {err}") from err
        if not is_ca:
            raise DataDirError(f"CA init: {name} is not a CA")
        if now >= cert.not_valid_after_utc:
            raise DataDirError(
                f"CA init: {name} expired at {cert.not_valid_after_utc.isoformat()}; "
                "renew it (or check this machine's clock)"
            )
        if now < cert.not_valid_before_utc:
            raise DataDirError(
                f"CA init: {name} is not valid until {cert.not_valid_before_utc.isoformat()}; check the clocks "
                f"(this machine's says {now.isoformat(timespec='seconds')})"
            )
        if usage is not None and not usage.key_cert_sign:
            raise DataDirError(
                f"CA init: {name} has a key usage without keyCertSign, so it may not sign certificates; "
                "give a CA whose key usage has keyCertSign"
            )
    try:
        certs[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound as err:
        # Authority.from_upstream names its issuer by that identifier. A root re-issued with the
        # same name and key plus one is the same trust anchor: chains under it verify to either copy.
        raise DataDirError(
            f"CA init: the upstream certificate {cert_file!r} has no subjectKeyIdentifier extension, which RFC 5280 "
            "4.2.1.2 requires of a CA; re-issue it with one, keeping its name and key (peers may keep the old copy)"
        ) from err


def _read_upstream(cert_file: str, key_file: str) -> tuple[list[x509.Certificate], object]:
    cert_pem = _pem_of(cert_file, "upstream certificate", "--upstream-cert", "CERTIFICATE")
    key_pem = _pem_of(key_file, "upstream key", "--upstream-key", "PRIVATE KEY")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except _x509.READ_ERRORS as err:
        raise DataDirError(f"CA init: the upstream certificate {cert_file!r} is not valid: {err}") from err
    _check_upstream(certs, cert_file, datetime.datetime.now(datetime.UTC))
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as err:  # encrypted
        raise DataDirError(f"CA init: the upstream key {key_file!r} is encrypted; give it unencrypted (0600)") from err
    except _x509.READ_ERRORS as err:
        raise DataDirError(f"CA init: the upstream key {key_file!r} is not a valid private key: {err}") from err
    try:
        matches = _x509.public_key_der(key.public_key()) == _x509.public_key_der(certs[0].public_key())
    except _x509.PARSE_ERRORS as err:
        raise DataDirError(f"CA init: the upstream key or certificate cannot be read: {err}") from err
    if not matches:
        raise DataDirError("CA init: the upstream key does not match the upstream certificate")
    return certs, key


def init_data_dir(
    folder: str | os.PathLike[str],
    trust_domain: str,
    *,
    max_ttl: datetime.timedelta = datetime.timedelta(hours=24),
    upstream_cert: str | None = None,
    upstream_key: str | None = None,
    datastore: str | None = None,
    dns_suffixes: Sequence[str] = (),
    agent_ca: str | None = None,
    agent_id_template: str | None = None,
    ocsp_url: str | None = None,
    crl_url: str | None = None,
    key_type: str = "ec-p256",
    jwt_key_type: str = "ec-p256",
) -> CaConfig:
    """Create a CA: key, certificate, JWT signing key, bundle, database, and the admin SVID.

    ``jwt_key_type`` is the JWT-SVID signing key's: ``ec-p256`` (ES256, the default, as SPIRE),
    ``ec-p384`` (ES384) or ``rsa-2048`` (RS256); rotations keep it.

    ``key_type`` is the CA key's kind (:data:`meshid.ca.authority.KEY_KINDS`); ``ml-dsa-65``
    makes a post-quantum-only CA, which grpcio cannot serve yet (see ``meshid ca key add`` for
    an ML-DSA CA beside a classical one).

    With ``agent_ca`` (a PEM bundle of the roots of a PKI that issues host certificates), node
    agents may attest by x509pop; ``agent_id_template`` (default ``{cn}``, see
    :mod:`meshid.ca.x509pop`) names each agent after its host certificate. The bundle is copied
    to DIR/agent-ca.pem. It may not hold this CA's own roots.

    With ``datastore="postgresql://..."`` this CA is one replica of several sharing that
    database. Each replica is then an intermediate CA of its own under one upstream root kept
    by the operator (``upstream_cert``/``upstream_key``, required): the bundle workloads trust is
    that root, so it does not change when a replica is added or removed, and losing a replica
    loses nothing (its records are in the database; its key signs nothing else).

    Under an upstream CA, the intermediate permits only DNS names under the trust domain's
    identity names and under ``dns_suffixes`` (see :meth:`Authority.from_upstream`), so that a
    root shared with other trust domains does not let their CAs write this one's names; the
    CA then refuses an entry with a DNS name outside them. The suffixes are recorded in
    config.json, which each rotation reads; replicas on one datastore need the same ones.
    A self-signed CA takes no suffix: its root is in no other trust domain's bundle.

    Raises:
        DataDirError: the folder already holds a CA, the upstream files are unusable, a DNS
            suffix is malformed or given without an upstream CA, the agent-CA bundle or the
            template is unusable, or a template is given without a bundle.
        InvalidSpiffeIdError: the trust domain is malformed.
    """
    td = TrustDomain.parse(trust_domain)
    paths = _paths(folder)
    if paths["key"].exists() or paths["db"].exists():
        raise DataDirError(f"CA init: {os.fspath(folder)!r} already holds a CA; choose an empty folder")
    if (upstream_cert is None) != (upstream_key is None):
        raise DataDirError("CA init: give both --upstream-cert and --upstream-key, or neither")
    if datastore is not None and upstream_cert is None:
        raise DataDirError(
            "CA init: with a shared --datastore, each replica is an intermediate under one upstream root; "
            "give --upstream-cert and --upstream-key"
        )
    if max_ttl <= datetime.timedelta(0):
        raise DataDirError("CA init: --ttl must be positive")
    if jwt_key_type not in JWT_KEY_TYPES:
        raise DataDirError(
            f"CA init: --jwt-key-type {jwt_key_type!r} is unknown; use one of {', '.join(JWT_KEY_TYPES)}"
        )
    if isinstance(dns_suffixes, str):
        raise DataDirError("CA init: dns_suffixes is a list of DNS suffixes, not one string")
    if dns_suffixes and upstream_cert is None:
        raise DataDirError(
            "CA init: --dns-suffix constrains an intermediate under --upstream-cert; a self-signed CA needs none, "
            "as no other trust domain's bundle holds its root"
        )
    try:
        suffixes = check_dns_suffixes(dns_suffixes)
    except ValueError as err:
        raise DataDirError(f"CA init: {err}") from err
    _check_urls("CA init", ocsp_url, crl_url)
    if agent_id_template is not None and agent_ca is None:
        raise DataDirError("CA init: --agent-id-template names agents that attest by x509pop; give --agent-ca too")
    if key_type not in KEY_KINDS or key_type == "ed25519":
        raise DataDirError(
            f"CA init: --key-type {str(key_type)[:40]!r} is not a CA key type; use ec-p256, ec-p384, rsa-*, ml-dsa-65"
        )
    if key_type != "ec-p256" and upstream_cert is not None:
        raise DataDirError(
            "CA init: --key-type makes a self-signed CA; under --upstream-cert the key is an ec-p256 one"
        )
    if upstream_cert is not None and upstream_key is not None:
        certs, key = _read_upstream(upstream_cert, upstream_key)
        authority = _from_upstream("CA init", td, certs, key, suffixes)
    else:
        authority = Authority.create_root(td, key=generate_key(key_type))
    lives = authority.certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if max_ttl > lives:  # every SVID would be cut short by the CA's own end: --ttl is a mistake
        raise DataDirError(
            f"CA init: --ttl ({max_ttl.days}d {max_ttl.seconds // 3600}h) is longer than this CA lives (until "
            f"{authority.certificate.not_valid_after_utc.isoformat(timespec='seconds')}, {lives.days} days from "
            "now); give a shorter --ttl (SVIDs are meant to live hours, not the CA's lifetime)"
        )
    agent_roots = None
    if agent_ca is not None:
        agent_id_template = agent_id_template or "{cn}"
        try:
            pem = pathlib.Path(agent_ca).read_bytes()
        except OSError as err:
            raise DataDirError(f"CA init: cannot read the agent CA bundle {agent_ca!r}: {err.strerror}") from err
        agent_roots = _x509pop("CA init", pem, agent_id_template, authority)
    made_folder = not pathlib.Path(folder).exists()
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        ca_chain = (authority.certificate, *authority.chain[1:]) if authority.chain else (authority.certificate,)
        write_atomic(paths["key"], _x509.key_pem(authority.private_key), mode=0o600)
        jwt_keys = JwtKeys.generate(jwt_key_type)
        write_atomic(paths["jwt"], jwt_keys.to_json(), mode=0o600)
        write_atomic(paths["cert"], b"".join(_x509.cert_pem(c) for c in ca_chain))
        write_atomic(paths["bundle"], TrustBundle(td, authority.roots).to_pem())
        if agent_roots is not None:
            write_atomic(paths["agent_ca"], b"".join(_x509.cert_pem(c) for c in agent_roots.roots))
        config = CaConfig(td, max_ttl, datastore, suffixes, agent_id_template, ocsp_url, crl_url)
        document = {
            "version": 1,
            "trust_domain": td.name,
            "max_ttl_seconds": int(max_ttl.total_seconds()),
            "datastore": datastore,
            "dns_suffixes": list(suffixes),
            "agent_id_template": agent_id_template,
            "ocsp_url": ocsp_url,
            "crl_url": crl_url,
        }
        write_atomic(paths["config"], json.dumps(document).encode(), mode=0o600)  # a DSN may hold a password
        store = _store(folder, config)
        try:
            now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
            for sid in (ca_id(authority), admin_id(authority)):
                if store.get_entry(sid) is None:  # another replica may have made them already
                    store.create_entry(Entry(sid, (), INTERNAL_TTL, now))
            if store.bundle_sequence() == 0:
                store.bump_bundle_sequence()
            service = IssuingService(authority, store, max_ttl=max_ttl, jwt_keys=jwt_keys)
            service.publish_jwt_keys()  # for replicas on a shared store: each one's bundle carries every key
            refresh_admin_svid(service, paths["admin"])
        finally:
            store.close()
    except BaseException:
        _undo_init(paths, made_folder)  # no half-made folder: a second try must not find 'a CA'
        raise
    return config


def _undo_init(paths: dict[str, pathlib.Path], made_folder: bool) -> None:
    """Remove what a failed ``ca init`` wrote: the whole folder if it made it, else its own files
    (the CA's key and certificate, JWT keys, bundle, config, SQLite database, admin SVID)."""
    if made_folder:
        shutil.rmtree(paths["config"].parent, ignore_errors=True)
        return
    for name in ("key", "jwt", "cert", "bundle", "agent_ca", "config"):
        paths[name].unlink(missing_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        paths["db"].with_name(paths["db"].name + suffix).unlink(missing_ok=True)
    shutil.rmtree(paths["admin"], ignore_errors=True)


def _check_entries_fit(folder: str | os.PathLike[str], config: CaConfig, new: Authority) -> None:
    """Refuse a next CA that may not sign a DNS name an entry has: its SVIDs would verify nowhere."""
    store = _store(folder, config)
    try:
        misfits = [(e.spiffe_id, n) for e in store.list_entries() for n in e.dns_names if not new.permits_dns_name(n)]
    finally:
        store.close()
    if misfits:
        shown = ", ".join(f"{name} ({sid})" for sid, name in misfits[:5]) + (" ..." if len(misfits) > 5 else "")
        raise DataDirError(
            f"CA rotation: the next CA may sign only DNS names under dns_suffixes {list(config.dns_suffixes)} in "
            f"config.json, and entries carry others: {shown}; add their suffixes there, or re-create those entries"
        )


def _from_upstream(
    what: str, td: TrustDomain, certs: list[x509.Certificate], key: object, suffixes: tuple[str, ...]
) -> Authority:
    try:
        return Authority.from_upstream(td, certs[0], key, upstream_chain=certs[1:], dns_suffixes=suffixes)  # type: ignore[arg-type]
    except ValueError as err:
        raise DataDirError(f"{what}: {err}") from err


def _x509pop(what: str, pem: bytes, template: str, authority: Authority) -> X509Pop:
    try:
        return X509Pop.load(pem, template, refuse=(*authority.roots, *authority.chain, authority.certificate))
    except ValueError as err:
        raise DataDirError(f"{what}: {err}") from err


def load_x509pop(folder: str | os.PathLike[str], authority: Authority) -> X509Pop | None:
    """What the CA trusts for x509pop node attestation, or None when only join tokens attest agents.

    To enable it on an existing CA: copy the PKI's roots to DIR/agent-ca.pem, set
    ``agent_id_template`` in config.json (e.g. ``"{cn}"``), and restart ``ca serve``.

    Raises:
        DataDirError: config.json names a template but DIR/agent-ca.pem is missing or unusable,
            or holds this CA's own roots.
    """
    config = _read_config(folder)
    if config.agent_id_template is None:
        return None
    path = _paths(folder)["agent_ca"]
    try:
        pem = path.read_bytes()
    except OSError as err:
        raise DataDirError(f"CA: {path} cannot be read ({err.strerror}); config.json enables x509pop") from err
    return _x509pop("CA", pem, config.agent_id_template, authority)


def refresh_admin_svid(service: IssuingService, folder: pathlib.Path) -> datetime.datetime:
    """Issue a new admin SVID into ``folder`` (the CA can, since it holds the key); it lives
    no longer than the CA's maximum TTL (``ca init --ttl``). Returns when it is half-way through
    its lifetime: when ``ca serve`` issues the next one."""
    key = generate_key()
    chain = service.issue_internal(admin_id(service.authority), key.public_key(), capped=True)
    write_svid_files(
        folder,
        b"".join(_x509.cert_pem(c) for c in chain),
        _x509.key_pem(key),
        service.bundle().to_pem(),
    )
    leaf = chain[0]
    return leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2


def load_authority(folder: str | os.PathLike[str]) -> tuple[Authority, CaConfig]:
    """Read the CA's key, certificates and configuration.

    Raises:
        DataDirError: a file is missing or does not fit the others.
    """
    paths = _paths(folder)
    reading = paths["config"]
    try:
        config = _read_config(folder)
        reading = paths["cert"]
        certs = x509.load_pem_x509_certificates(paths["cert"].read_bytes())
        reading = paths["key"]
        key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
        reading = paths["bundle"]
        roots = TrustBundle.load(config.trust_domain, paths["bundle"]).roots
    except FileNotFoundError as err:
        raise DataDirError(
            f"CA: {err.filename} is missing; run `meshid ca init --data-dir {os.fspath(folder)}` first"
        ) from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        # cryptography's own words end in a link to its FAQ and a parser's name: the file is what to say
        why = str(err).split(" See https://", 1)[0]
        raise DataDirError(f"CA: {reading} in the data folder is unreadable: {why}") from err
    if _x509.public_key_der(key.public_key()) != _x509.public_key_der(certs[0].public_key()):
        raise DataDirError("CA: ca.key does not match ca.pem")
    self_signed = certs[0].issuer == certs[0].subject
    chain = () if self_signed else tuple(certs)
    urls = {"ocsp_url": config.ocsp_url, "crl_url": config.crl_url}
    authority = Authority(config.trust_domain, certs[0], key, chain, roots, **urls)  # type: ignore[arg-type]
    return authority, config


def open_service(folder: str | os.PathLike[str], datastore: str | None = None, **kwargs: object) -> IssuingService:
    """The issuing service over a data folder (its store stays open until ``service.store.close()``).

    ``datastore`` overrides the one ``ca init`` recorded. A folder made before JWT-SVIDs gets
    its first JWT signing key here (see :func:`ensure_jwt_keys`).
    """
    authority, config = load_authority(folder)
    if datastore is not None:
        config = dataclasses.replace(config, datastore=datastore)
    jwt_keys = ensure_jwt_keys(folder, datastore=datastore)
    store = _store(folder, config)
    pq = load_pq_authority(folder)
    options = {"max_ttl": config.max_ttl, "pq_authority": pq, "jwt_keys": jwt_keys, **kwargs}
    return IssuingService(authority, store, **options)  # type: ignore[arg-type]


# --- JWT signing keys --------------------------------------------------------------------


def load_jwt_keys(folder: str | os.PathLike[str]) -> JwtKeys | None:
    """The CA's JWT keys (DIR/jwt-keys.json), or None in a folder made before JWT-SVIDs.

    Raises:
        DataDirError: the file is unreadable or malformed.
    """
    path = _paths(folder)["jwt"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DataDirError(f"CA: {path} cannot be read: {err.strerror}") from err
    try:
        return JwtKeys.from_json(data)
    except ValueError as err:
        raise DataDirError(f"CA: {path} is unusable: {err}") from err


def _write_jwt_keys(folder: str | os.PathLike[str], keys: JwtKeys, datastore: str | None = None) -> None:
    """Write jwt-keys.json and grow the bundle sequence (the published keys changed)."""
    write_atomic(_paths(folder)["jwt"], keys.to_json(), mode=0o600)
    _bump_sequence(folder, datastore)


def _jwt_keys_locked(folder: str | os.PathLike[str], datastore: str | None = None) -> JwtKeys:
    keys = load_jwt_keys(folder)
    if keys is None:  # a folder made before JWT-SVIDs: its first key signs at once (nothing to overlap)
        keys = JwtKeys.generate("ec-p256")
        _write_jwt_keys(folder, keys, datastore)
    return keys


def ensure_jwt_keys(folder: str | os.PathLike[str], *, datastore: str | None = None) -> JwtKeys:
    """The CA's JWT keys, creating a first ES256 (P-256) signing key in a folder that has none.

    That key signs at once: no JWT-SVID of this trust domain exists before it, so there is no
    old key to overlap with; relying parties learn it with their next bundle refresh.

    Raises:
        DataDirError: jwt-keys.json is unreadable or malformed.
    """
    keys = load_jwt_keys(folder)
    if keys is not None:
        return keys
    with _folder_lock(folder):
        return _jwt_keys_locked(folder, datastore)


def prepare_jwt_rotation(folder: str | os.PathLike[str]) -> JwtKey:
    """Publish the next JWT signing key (of the signing key's type) in the bundle; it signs
    nothing until :func:`activate_rotation`. Returns it (already prepared: the same one).

    Raises:
        DataDirError: jwt-keys.json is unreadable or malformed.
    """
    with _folder_lock(folder):
        return _prepare_jwt_locked(folder)


def _prepare_jwt_locked(folder: str | os.PathLike[str]) -> JwtKey:
    keys = _jwt_keys_locked(folder)
    prepared = keys.prepare()
    if prepared is not keys:
        _write_jwt_keys(folder, prepared)
    assert prepared.prepared is not None
    return prepared.prepared


def _activate_jwt(folder: str | os.PathLike[str], grace: datetime.timedelta) -> JwtKey | None:
    """With the folder locked: the prepared JWT key signs; the old one retires after every
    token it signed has expired (``now + JWT-SVID lifetime + grace``). None: nothing prepared."""
    keys = load_jwt_keys(folder)
    if keys is None or keys.prepared is None:
        return None
    retire_after = datetime.datetime.now(datetime.UTC) + JWT_SVID_TTL + grace
    try:
        activated = keys.activate(retire_after)
    except ValueError as err:  # too many retiring: refused before anything is written
        raise DataDirError(f"CA rotation: {err}") from err
    write_atomic(_paths(folder)["jwt"], activated.to_json(), mode=0o600)  # the published set is unchanged
    return activated.signing


def retire_due_jwt_keys(folder: str | os.PathLike[str], now: datetime.datetime | None = None) -> list[str]:
    """Drop retiring JWT keys whose time has passed from the bundle; returns their kids."""
    now = now or datetime.datetime.now(datetime.UTC)
    keys = load_jwt_keys(folder)
    if keys is None or all(k.retire_after > now for k in keys.retiring):
        return []
    with _folder_lock(folder):
        keys = load_jwt_keys(folder)
        if keys is None:
            return []
        kept, due = keys.retire_due(now)
        if due:
            _write_jwt_keys(folder, kept)
        return due


def _lane(folder: str | os.PathLike[str], key_type: str | None) -> pathlib.Path:
    """The folder of a CA's key and certificate: DIR for the CA ``ca init`` made, DIR/<key type>/
    for the one ``ca key add`` put beside it."""
    if key_type is None:
        return pathlib.Path(folder)
    if key_type != PQ_KEY_TYPE:
        raise DataDirError(f"CA: only a {PQ_KEY_TYPE} CA can be added beside the first, not {str(key_type)[:40]!r}")
    return pathlib.Path(folder) / key_type


def load_pq_authority(folder: str | os.PathLike[str]) -> Authority | None:
    """The ML-DSA-65 CA ``meshid ca key add`` put beside the classical one, or None.

    It trusts what bundle.pem holds (both CAs' roots), so the SVIDs it signs name the same roots.

    Raises:
        DataDirError: DIR/ml-dsa-65/ exists but its files do not load or do not fit.
    """
    lane = _lane(folder, PQ_KEY_TYPE)
    if not (lane / "ca.key").exists() or not (lane / "ca.pem").exists():
        return None  # none, or an add that a crash interrupted (run it again)
    try:
        config = _read_config(folder)
        certs = x509.load_pem_x509_certificates((lane / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((lane / "ca.key").read_bytes(), password=None)
        roots = TrustBundle.load(config.trust_domain, _paths(folder)["bundle"]).roots
    except (OSError, ValueError, TypeError) as err:
        raise DataDirError(f"CA: the {PQ_KEY_TYPE} CA in {lane} is unreadable: {err}") from err
    if _x509.public_key_der(key.public_key()) != _x509.public_key_der(certs[0].public_key()):
        raise DataDirError(f"CA: {lane}/ca.key does not match {lane}/ca.pem")
    urls = {"ocsp_url": config.ocsp_url, "crl_url": config.crl_url}
    return Authority(config.trust_domain, certs[0], key, (), roots, **urls)  # type: ignore[arg-type]


def add_key_type(folder: str | os.PathLike[str], key_type: str = PQ_KEY_TYPE) -> x509.Certificate:
    """Give an existing CA a second, post-quantum CA beside its own (``meshid ca key add``).

    The new ML-DSA-65 root joins bundle.pem (the bundle sequence grows) at once: it signs only
    SVIDs whose CSRs carry ML-DSA-65 keys, which no workload has asked for before, so nothing
    needs the two-step prepare/activate here. Rotate it later with ``ca rotate prepare
    --key-type ml-dsa-65`` and ``activate --key-type ml-dsa-65``. Returns its certificate.
    Safe to run again after a crash: a CA made but not yet published or moved in place is finished.

    Raises:
        DataDirError: the key type is not ml-dsa-65, the CA already signs with it or has one
            already, or its replicas share a datastore (each would publish a root of its own).
    """
    lane = _lane(folder, key_type)
    with _folder_lock(folder):
        authority, config = load_authority(folder)
        if key_kind(authority.private_key) == key_type:
            raise DataDirError(f"CA key add: this CA signs with an {key_type} key already")
        if (lane / "ca.key").exists() and (lane / "ca.pem").exists():
            existing = _first_cert(lane / "ca.pem", f"{key_type} CA certificate")
            if _publish_root(folder, config, existing):
                return existing  # an interrupted add, finished
            raise DataDirError(f"CA key add: this CA has an {key_type} CA already ({lane}); rotate it instead")
        if config.datastore is not None:
            raise DataDirError(
                "CA key add: replicas sharing a --datastore would each publish a root of their own; "
                "add the ML-DSA CA to a CA with its own store"
            )
        # Made in DIR/ml-dsa-65/pending/, its root published, then moved in place: a running CA
        # never signs with it before peers can trust it, and a crash loses no key whose root is out.
        pending = lane / "pending"
        if (pending / "ca.key").exists() and (pending / "ca.pem").exists():
            certificate = _first_cert(pending / "ca.pem", f"pending {key_type} CA certificate")  # finish it
        else:
            new = Authority.create_root(config.trust_domain, key=generate_key(key_type))
            pending.mkdir(parents=True, exist_ok=True)
            write_atomic(pending / "ca.key", _x509.key_pem(new.private_key), mode=0o600)
            write_atomic(pending / "ca.pem", _x509.cert_pem(new.certificate))
            certificate = new.certificate
        _publish_root(folder, config, certificate)
        os.replace(pending / "ca.key", lane / "ca.key")  # the key first: a CA loads only with both
        os.replace(pending / "ca.pem", lane / "ca.pem")
        return certificate


# --- CA key rotation ---------------------------------------------------------------------
#
#   prepare   a new CA key and certificate go to DIR/next/; a new root joins bundle.pem (the
#             bundle sequence grows), so workloads learn to trust it before anything uses it.
#   activate  DIR/next/ becomes the signing CA; the old root is recorded in rotation.json to
#             leave the bundle once every SVID it signed has expired (activation + max TTL).
#   retire    done by `ca serve` when that time has passed (or `retire_due_roots` directly).


def _rotation_file(folder: str | os.PathLike[str], key_type: str | None = None) -> pathlib.Path:
    return _lane(folder, key_type) / "rotation.json"


def _read_rotation(folder: str | os.PathLike[str], key_type: str | None = None) -> dict[str, list[dict[str, object]]]:
    path = _rotation_file(folder, key_type)
    if not path.exists():
        return {"retiring": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataDirError(f"CA rotation: {path} is unreadable: {err}") from err
    return data if isinstance(data, dict) and isinstance(data.get("retiring"), list) else {"retiring": []}


def _fingerprint(cert: x509.Certificate) -> str:
    return _x509.thumbprint(cert)


def _bump_sequence(folder: str | os.PathLike[str], datastore: str | None = None) -> int:
    config = _read_config(folder)
    store = _store(folder, dataclasses.replace(config, datastore=datastore) if datastore else config)
    try:
        return store.bump_bundle_sequence()
    finally:
        store.close()


@contextlib.contextmanager
def _folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """One rotation step at a time: the CLI and a running `ca serve` both edit bundle.pem and
    rotation.json, so each step holds an exclusive lock on DIR/.lock."""
    fd = os.open(pathlib.Path(folder) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


#: What config.json may hold, and what each value must be. The first meshid wrote version (1),
#: trust_domain and max_ttl_seconds; datastore, dns_suffixes, agent_id_template, ocsp_url and
#: crl_url came later, so a folder made before them lacks them and gets their defaults.
_CONFIG_KEYS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "version": ("1", lambda v: type(v) is int and v == 1),
    "trust_domain": ("a string", lambda v: isinstance(v, str)),
    "max_ttl_seconds": ("a positive integer", lambda v: type(v) is int and v > 0),
    "datastore": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "dns_suffixes": (
        "a list of strings or null",
        lambda v: v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
    ),
    "agent_id_template": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "ocsp_url": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "crl_url": ("a string or null", lambda v: v is None or isinstance(v, str)),
}
_CONFIG_REQUIRED = ("trust_domain", "max_ttl_seconds")


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _config_document(path: pathlib.Path) -> dict[str, Any]:
    """config.json parsed strictly: one JSON object, each key known, given once and of its type
    (so its values are what :data:`_CONFIG_KEYS` says)."""
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=unique_keys)
    except ValueError as err:  # also a key given twice
        raise DataDirError(f"CA: {path} is unreadable: {err}") from err
    if not isinstance(raw, dict):
        raise DataDirError(f"CA: {path} is not a JSON object but {_json_kind(raw)}")
    for key, value in raw.items():
        if key not in _CONFIG_KEYS:
            raise DataDirError(
                f"CA: {path} has an unknown key {key[:40]!r}; the keys it may hold are {', '.join(_CONFIG_KEYS)}"
            )
        expected, fits = _CONFIG_KEYS[key]
        if not fits(value):
            raise DataDirError(f"CA: {path}: {key} must be {expected}, not {json.dumps(value)[:40]}")
    missing = [key for key in _CONFIG_REQUIRED if key not in raw]
    if missing:
        raise DataDirError(f"CA: {path} lacks {', '.join(missing)}, which `meshid ca init` writes")
    return raw


def _read_config(folder: str | os.PathLike[str]) -> CaConfig:
    path = _paths(folder)["config"]
    try:
        raw = _config_document(path)
        urls = [raw.get(name) for name in ("ocsp_url", "crl_url")]  # absent before issue #15
        for name, url in zip(("OCSP", "CRL"), urls, strict=True):
            if url is not None:
                check_revocation_url(url, name)
        return CaConfig(
            TrustDomain.parse(raw["trust_domain"]),
            datetime.timedelta(seconds=raw["max_ttl_seconds"]),
            raw.get("datastore") or None,
            check_dns_suffixes(raw.get("dns_suffixes") or []),  # absent in a folder made before --dns-suffix
            raw.get("agent_id_template") or None,  # absent in a folder made before node agents
            urls[0] or None,
            urls[1] or None,
        )
    except FileNotFoundError as err:
        raise DataDirError(f"CA: {path} is missing; run `meshid ca init --data-dir {os.fspath(folder)}` first") from err
    except (OSError, ValueError, OverflowError) as err:
        raise DataDirError(f"CA: {path} is unreadable: {err}") from err


def _check_urls(what: str, ocsp_url: str | None, crl_url: str | None) -> None:
    try:
        for name, url in (("OCSP", ocsp_url), ("CRL", crl_url)):
            if url is not None:
                check_revocation_url(url, name)
    except ValueError as err:
        raise DataDirError(f"{what}: {err}") from err


def set_revocation_urls(
    folder: str | os.PathLike[str], *, ocsp_url: str | None = None, crl_url: str | None = None
) -> CaConfig:
    """Set (a URL) or clear (``""``) the OCSP and CRL URLs leaves carry; None leaves one as it is.

    A ``meshid ca serve`` on this folder sees config.json change and signs with them from then
    on (within its poll interval); SVIDs already issued keep what they carry.

    Raises:
        DataDirError: a URL is malformed, or config.json is unreadable.
    """
    _check_urls("CA config", ocsp_url or None, crl_url or None)
    with _folder_lock(folder):
        path = _paths(folder)["config"]
        _read_config(folder)  # refuse to rewrite a config that does not load
        document = json.loads(path.read_text())
        for name, url in (("ocsp_url", ocsp_url), ("crl_url", crl_url)):
            if url is not None:
                document[name] = url or None
        write_atomic(path, json.dumps(document).encode(), mode=0o600)
        return _read_config(folder)


def _first_cert(path: pathlib.Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError) as err:
        raise DataDirError(f"CA rotation: {what} {path} is unreadable: {err}") from err


def _publish_root(folder: str | os.PathLike[str], config: CaConfig, root: x509.Certificate) -> bool:
    """Add ``root`` to bundle.pem if it is not there yet (and grow the sequence). True if added."""
    bundle = TrustBundle.load(config.trust_domain, _paths(folder)["bundle"])
    if any(_fingerprint(root) == _fingerprint(r) for r in bundle.roots):
        return False
    write_atomic(_paths(folder)["bundle"], TrustBundle(config.trust_domain, (*bundle.roots, root)).to_pem())
    _bump_sequence(folder)
    return True


def prepare_rotation(
    folder: str | os.PathLike[str],
    *,
    upstream_cert: str | None = None,
    upstream_key: str | None = None,
    key_type: str | None = None,
) -> x509.Certificate:
    """Create the next CA and publish its root in the bundle (signing does not change yet);
    likewise the next JWT signing key (see :func:`prepare_jwt_rotation`).

    Safe to run again after a crash: a complete next CA whose root is not yet published is
    published; a half-written one is made anew. With ``key_type="ml-dsa-65"`` it is the
    post-quantum CA beside the classical one that rotates (DIR/ml-dsa-65/).

    Raises:
        DataDirError: a rotation is already prepared, the upstream files are unusable, or there
            is no CA of ``key_type``.
    """
    with _folder_lock(folder):
        authority, config = load_authority(folder)
        lane = _lane(folder, key_type)
        if key_type is not None:
            pq = load_pq_authority(folder)
            if pq is None:
                raise DataDirError(f"CA rotation: this CA has no {key_type} CA; add one with `meshid ca key add`")
            if upstream_cert is not None:
                raise DataDirError(f"CA rotation: the {key_type} CA is self-signed; give no --upstream-*")
            authority = pq
        else:  # the classical CA's rotation takes the JWT key along
            _prepare_jwt_locked(folder)
        next_dir = lane / "next"
        if (next_dir / "ca.key").exists() and (next_dir / "ca.pem").exists():
            prepared = _first_cert(next_dir / "ca.pem", "next CA certificate")
            if prepared.issuer == prepared.subject and _publish_root(folder, config, prepared):
                return prepared  # an interrupted prepare, finished
            raise DataDirError("CA rotation: a next CA is already prepared; run `meshid ca rotate activate`")
        if authority.chain and (upstream_cert is None or upstream_key is None):
            raise DataDirError(
                "CA rotation: this CA is chained under an upstream CA; give --upstream-cert and --upstream-key"
            )
        if upstream_cert is not None and upstream_key is not None:
            certs, key = _read_upstream(upstream_cert, upstream_key)
            new = _from_upstream("CA rotation", config.trust_domain, certs, key, config.dns_suffixes)
            _check_entries_fit(folder, config, new)
        else:
            new = Authority.create_root(config.trust_domain, key=generate_key(key_kind(authority.private_key)))
        next_dir.mkdir(exist_ok=True)
        ca_chain = (new.certificate, *new.chain[1:]) if new.chain else (new.certificate,)
        write_atomic(next_dir / "ca.key", _x509.key_pem(new.private_key), mode=0o600)
        write_atomic(next_dir / "ca.pem", b"".join(_x509.cert_pem(c) for c in ca_chain))
        for root in new.roots:
            _publish_root(folder, config, root)
        return new.certificate


def activate_rotation(
    folder: str | os.PathLike[str],
    *,
    grace: datetime.timedelta = datetime.timedelta(minutes=5),
    key_type: str | None = None,
) -> None:
    """Make the prepared CA the signing CA, and the prepared JWT key the signing JWT key;
    schedule the old root's and the old JWT key's retirement.

    The old root stays in the bundle until ``now + max TTL + grace``: by then every SVID the
    old key signed has expired; the old JWT key until ``now + JWT-SVID lifetime + grace``. Each
    step is idempotent, so after a crash running it again finishes the job. With only a JWT key
    prepared (``ca rotate prepare --jwt-only``), only that rotates. ``key_type="ml-dsa-65"``:
    the post-quantum CA's (see :func:`prepare_rotation`); the JWT key stays as it is.

    Raises:
        DataDirError: nothing (or something incomplete) is prepared, or its root is not published.
    """
    with _folder_lock(folder):
        config = _read_config(folder)
        lane = _lane(folder, key_type)
        paths = {**_paths(folder), "key": lane / "ca.key", "cert": lane / "ca.pem"}
        next_dir = lane / "next"
        flag = "" if key_type is None else f" --key-type {key_type}"
        if not (next_dir / "ca.key").exists():
            if key_type is None and _activate_jwt(folder, grace) is not None:
                return
            raise DataDirError(f"CA rotation: nothing prepared; run `meshid ca rotate prepare{flag}` first")
        if not (next_dir / "ca.pem").exists():
            raise DataDirError(
                f"CA rotation: the prepared CA is incomplete; run `meshid ca rotate prepare{flag}` again"
            )
        new_key, new_cert_pem = (next_dir / "ca.key").read_bytes(), (next_dir / "ca.pem").read_bytes()
        new_cert = _first_cert(next_dir / "ca.pem", "next CA certificate")
        bundle = TrustBundle.load(config.trust_domain, paths["bundle"])
        new_roots = [new_cert] if new_cert.issuer == new_cert.subject else []
        if any(all(_fingerprint(r) != _fingerprint(b) for b in bundle.roots) for r in new_roots):
            raise DataDirError(
                "CA rotation: the next CA's root is not in bundle.pem; run `meshid ca rotate prepare` again"
            )
        if key_type is None:
            _activate_jwt(folder, grace)
        old = _first_cert(paths["cert"], "CA certificate")
        if _fingerprint(old) != _fingerprint(new_cert):
            rotation = _read_rotation(folder, key_type)
            if old.issuer == old.subject and all(r["fingerprint"] != _fingerprint(old) for r in rotation["retiring"]):
                retire_after = datetime.datetime.now(datetime.UTC) + config.max_ttl + grace
                rotation["retiring"].append(
                    {"fingerprint": _fingerprint(old), "retire_after": retire_after.isoformat()}
                )
                write_atomic(_rotation_file(folder, key_type), json.dumps(rotation, indent=2).encode())
            retired = lane / "retired" / _fingerprint(old)[:16]
            if not (retired / "ca.pem").exists():
                retired.mkdir(parents=True, exist_ok=True)
                write_atomic(retired / "ca.key", paths["key"].read_bytes(), mode=0o600)
                write_atomic(retired / "ca.pem", paths["cert"].read_bytes())
            # key first: a reader that sees the new key with the old certificate refuses the
            # pair and retries; a crash here is finished by running activate again
            write_atomic(paths["key"], new_key, mode=0o600)
            write_atomic(paths["cert"], new_cert_pem)
        (next_dir / "ca.key").unlink(missing_ok=True)
        (next_dir / "ca.pem").unlink(missing_ok=True)


def load_retired_authorities(
    folder: str | os.PathLike[str], now: datetime.datetime | None = None
) -> tuple[Authority, ...]:
    """The CAs this folder signed with before its key rotations (DIR/retired/), still unexpired.

    Their SVIDs may still be in use, so the OCSP responder answers for them with their own key.
    A retired folder that does not load, or whose key does not match, is skipped.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    config = _read_config(folder)
    found = []
    for cert_file in sorted((pathlib.Path(folder) / "retired").glob("*/ca.pem")):
        try:
            certs = x509.load_pem_x509_certificates(cert_file.read_bytes())
            key = serialization.load_pem_private_key((cert_file.parent / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            continue
        if certs[0].not_valid_after_utc <= now:
            continue
        if _x509.public_key_der(key.public_key()) != _x509.public_key_der(certs[0].public_key()):
            continue
        chain = () if certs[0].issuer == certs[0].subject else tuple(certs)
        found.append(Authority(config.trust_domain, certs[0], key, chain, (certs[-1],)))  # type: ignore[arg-type]
    return tuple(found)


def retire_due_roots(folder: str | os.PathLike[str], now: datetime.datetime | None = None) -> list[str]:
    """Drop roots whose retirement time has passed from the bundle; returns their fingerprints.

    Both CAs' retirements count: the classical one's and the ML-DSA one's (DIR/ml-dsa-65/).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    removed = _retire_due(folder, now, None)
    if (_lane(folder, PQ_KEY_TYPE) / "ca.pem").exists():
        removed += _retire_due(folder, now, PQ_KEY_TYPE)
    return removed


def _retire_due(folder: str | os.PathLike[str], now: datetime.datetime, key_type: str | None) -> list[str]:
    if not _rotation_file(folder, key_type).exists():
        return []
    with _folder_lock(folder):
        rotation = _read_rotation(folder, key_type)
        due = {
            str(r["fingerprint"])
            for r in rotation["retiring"]
            if datetime.datetime.fromisoformat(str(r["retire_after"])) <= now
        }
        if not due:
            return []
        config = _read_config(folder)
        signing = {_fingerprint(_first_cert(_paths(folder)["cert"], "CA certificate"))}
        if (_lane(folder, PQ_KEY_TYPE) / "ca.pem").exists():  # neither CA's signing root ever leaves
            signing.add(_fingerprint(_first_cert(_lane(folder, PQ_KEY_TYPE) / "ca.pem", "ML-DSA CA certificate")))
        bundle = TrustBundle.load(config.trust_domain, _paths(folder)["bundle"])
        keep = tuple(r for r in bundle.roots if _fingerprint(r) not in due or _fingerprint(r) in signing)
        removed = [r for r in due if r not in signing]
        if len(keep) != len(bundle.roots):
            write_atomic(_paths(folder)["bundle"], TrustBundle(config.trust_domain, keep).to_pem())
            _bump_sequence(folder)
        rotation["retiring"] = [r for r in rotation["retiring"] if str(r["fingerprint"]) not in due]
        write_atomic(_rotation_file(folder, key_type), json.dumps(rotation, indent=2).encode())
        return removed
