"""Revocation: an issuer's signed CRL, checked by meshid's interceptor.

A :class:`RevocationList` is accepted only if the certificate that signed it chains to a root
of its trust domain's bundle and its signature verifies. :class:`CrlWatcher` fetches the CRL
from a meshid CA periodically and keeps the last good one when a fetch fails; hand its
``is_revoked`` to ``interceptor.set_revocation_check`` and a revoked peer gets
``UNAUTHENTICATED``.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshid.bundle import BundleSet
from meshid.errors import MeshIdError, VerificationError
from meshid.peer import PeerIdentity
from meshid.sources import Source
from meshid.spiffeid import TrustDomain
from meshid.svid import spiffe_id_from_certificate

__all__ = ["CrlWatcher", "RevocationList"]

log = logging.getLogger("meshid.revocation")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chains_to(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> bool:
    """Whether ``chain[0]`` is a root, or each certificate is signed by the next up to a root."""
    for index, cert in enumerate(chain):
        if cert in roots or any(_issued_by(cert, root) for root in roots):
            return True
        if index + 1 >= len(chain) or not _issued_by(cert, chain[index + 1]):
            return False
    return False


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The serials a trust domain's CA has revoked, from a CRL whose signature was verified.

    A meshid CA lists every revoked, unexpired serial of its store, whichever of its keys
    signed it (after a key rotation, the old key's SVIDs too); serials are random and unique
    per CA, so a peer is matched by trust domain and serial, not by issuer name.
    """

    trust_domain: TrustDomain
    issuer: x509.Name
    serials: frozenset[int]
    number: int | None
    next_update: datetime.datetime | None

    @classmethod
    def from_der(cls, der: bytes, issuer_chain: Sequence[x509.Certificate], bundles: BundleSet) -> RevocationList:
        """Verify and read a CRL. ``issuer_chain`` starts with the CA certificate that signed it.

        Raises:
            VerificationError: the CRL is malformed, its signer does not chain to its trust
                domain's bundle, or its signature does not verify.
        """
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as err:
            raise VerificationError(f"CRL: not a DER CRL: {err}") from err
        if not issuer_chain:
            raise VerificationError("CRL: no issuer certificate given")
        signer = issuer_chain[0]
        try:
            td: TrustDomain = spiffe_id_from_certificate(signer).trust_domain
        except MeshIdError as err:
            raise VerificationError(f"CRL: its signer carries no trust domain: {err}") from err
        if td not in bundles or not _chains_to(issuer_chain, bundles[td].roots):
            raise VerificationError(f"CRL: its signer does not chain to the bundle of {td}")
        if crl.issuer != signer.subject or not crl.is_signature_valid(signer.public_key()):  # type: ignore[arg-type]
            raise VerificationError("CRL: the signature does not verify with its issuer's key")
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = None
        return cls(td, crl.issuer, frozenset(r.serial_number for r in crl), number, crl.next_update_utc)

    def supersedes(self, other: RevocationList | None) -> bool:
        """Whether this list may replace ``other``: CRL numbers never go backwards."""
        return other is None or other.number is None or self.number is None or self.number >= other.number

    def is_revoked(self, peer: PeerIdentity) -> bool:
        cert = peer.certificate
        return cert is not None and peer.trust_domain == self.trust_domain and cert.serial_number in self.serials


class CrlWatcher:
    """Keeps a meshid CA's CRL current for an interceptor.

    ``start()`` fetches now and every ``interval`` seconds; ``refresh()`` fetches once. A failed
    fetch keeps the last good list (and is logged); until the first success nothing is revoked.
    """

    def __init__(self, server: str, source: Source, *, interval: float = 60.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._server = server
        self._source = source
        self._interval = interval
        self._current: RevocationList | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    @property
    def current(self) -> RevocationList | None:
        return self._current

    def refresh(self) -> bool:
        """Fetch and verify the CRL now. Returns True if it took effect."""
        from meshid.ca.client import get_crl

        try:
            der, chain = get_crl(self._server, self._source.get_svid(), self._source.get_bundles())
            fetched = RevocationList.from_der(der, chain, self._source.get_bundles())
        except MeshIdError as err:
            self.last_error = str(err)
            log.warning("CRL: keeping the previous list: %s", err)
            return False
        if fetched.supersedes(self._current):
            self._current = fetched
        self.last_error = None
        return True

    def is_revoked(self, peer: PeerIdentity) -> bool:
        current = self._current
        return current is not None and current.is_revoked(peer)

    def start(self) -> CrlWatcher:
        if self._thread is None:
            self.refresh()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="meshid-crl", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
            except Exception as err:  # keep the last good list and keep trying
                self.last_error = f"unexpected: {err}"
                log.exception("CRL: refresh failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> CrlWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
