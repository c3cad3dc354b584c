"""An SVID a previous run left in a folder, and whether this run may use it again.

:class:`~meshid.agent.IssuerSource` (a workload's SVID) and :class:`~meshid.agent.NodeAgent` (the
node agent's own) write theirs with :func:`meshid._files.write_svid_files` and take it back after a
restart only if it still has more than a second to live on the local clock, its chain verifies
against the bundle saved with it, and that bundle shares a root with the configured bundle file.
The configured bundle stays the anchor: an operator who replaced the CA's root (after a compromise,
say) is not overruled by what is on disk.

Beside ``bundle.pem`` (roots only: PEM has no room for them), both write the trust domain's
JWT-SVID keys to ``jwt-bundle.json``, a JWK Set of its ``use: jwt-svid`` keys with their ``kid``
(as spiffe-helper's ``jwt_bundle_file_name``), for JWT validators that read files.
"""

from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass

from meshid import _x509
from meshid._files import write_atomic
from meshid.bundle import BundleSet, TrustBundle
from meshid.clock import Clock
from meshid.errors import MeshIdError
from meshid.sources import FileSource
from meshid.svid import X509Svid

__all__ = ["JWT_BUNDLE_FILE", "SavedSvid", "load_saved_svid", "write_jwt_bundle"]

#: The JWK Set of the trust domain's JWT-SVID keys, beside bundle.pem.
JWT_BUNDLE_FILE = "jwt-bundle.json"


def write_jwt_bundle(folder: str | os.PathLike[str], bundle: TrustBundle) -> None:
    """Replace ``folder``/jwt-bundle.json with ``bundle``'s JWT keys (a JWK Set), atomically."""
    from meshid.workloadapi.wire import jwks

    write_atomic(pathlib.Path(folder) / JWT_BUNDLE_FILE, jwks(bundle))


log = logging.getLogger("meshid.agent")


@dataclass(frozen=True, slots=True)
class SavedSvid:
    """A reusable saved SVID, its saved bundle, and the seconds it has left on the local clock."""

    svid: X509Svid
    bundle: TrustBundle
    remaining: float


def load_saved_svid(
    folder: str | os.PathLike[str], bundle_file: str | os.PathLike[str], *, clock: Clock, who: str, otherwise: str
) -> SavedSvid | None:
    """The SVID saved in ``folder`` if it may be used again, else None (and a log line saying why,
    prefixed by ``who`` and followed by ``otherwise``: what the caller does instead)."""
    folder = pathlib.Path(folder)
    if not (folder / "svid.pem").exists():
        return None
    try:
        saved = FileSource(folder / "svid.pem", folder / "svid.key", folder / "bundle.pem")
    except MeshIdError as err:
        log.warning("%s: cannot reuse the SVID in %s: %s", who, folder, err)
        return None
    svid = saved.get_svid()
    saved_bundle = saved.get_bundles()[svid.spiffe_id.trust_domain]
    remaining = (svid.not_after - clock.now()).total_seconds()
    if remaining <= 1:
        state = "has expired" if remaining <= 0 else f"expires in {remaining:.1f}s, too soon to renew it"
        log.info("%s: the saved SVID of %s %s; %s", who, svid.spiffe_id, state, otherwise)
        return None
    try:
        anchor = TrustBundle.load(svid.spiffe_id.trust_domain, bundle_file)
        BundleSet.of(saved_bundle).verify(svid.leaf, svid.chain[1:])
    except MeshIdError as err:
        log.warning("%s: not reusing the saved SVID: %s", who, err)
        return None
    if not set(anchor.roots) & set(saved_bundle.roots):
        log.warning("%s: the saved bundle shares no root with %s; not reusing it", who, os.fspath(bundle_file))
        return None
    return SavedSvid(svid, _with_saved_jwt_keys(folder, saved_bundle, who), remaining)


def _with_saved_jwt_keys(folder: pathlib.Path, bundle: TrustBundle, who: str) -> TrustBundle:
    """``bundle`` with the JWT keys saved beside it, so JWT-SVIDs validate before the first
    refresh; without them (none saved, or unreadable: logged) until the CA sends its bundle."""
    from meshid.workloadapi.wire import jwks_keys

    path = folder / JWT_BUNDLE_FILE
    try:
        with path.open("rb") as f:
            document = f.read(_x509.MAX_PEM_BYTES + 1)  # more than that: refused by jwks_keys
    except FileNotFoundError:
        return bundle
    except OSError as err:
        log.warning("%s: cannot read %s: %s; JWT keys come with the next bundle", who, path, err.strerror)
        return bundle
    try:
        return bundle.with_jwt_authorities(jwks_keys(bundle.trust_domain, document))
    except MeshIdError as err:
        log.warning("%s: ignoring %s: %s; JWT keys come with the next bundle", who, path, err)
        return bundle
