"""Revocation: an issuer's signed CRL, checked by meshid's interceptor.

What is accepted. A CRL (:meth:`RevocationList.from_der`) is read only if the certificate that
signed it is a CA certificate (``basicConstraints`` cA and ``keyUsage`` cRLSign) carrying its
trust domain's SPIFFE ID, chains to that trust domain's own bundle (RFC 5280 path validation by
``cryptography``'s verifier), is the CRL's issuer, and the signature verifies; and only if the
CRL carries a CRL number and a nextUpdate, as every meshid CA writes them (a workload's SVID,
a CA key without cRLSign or a number-less CRL is refused, so none of them can replace a list).
A list replaces the one in force only with a greater CRL number (:meth:`~RevocationList.supersedes`):
the same number again is a refetch and changes nothing; a smaller one (a replayed CRL, a replica
restored from an old backup) is refused and the newer list stays in force.

A stale list (past its nextUpdate: the CA has not been reachable, or has stopped refreshing it)
is fail-static: it keeps being enforced, so what it revokes stays revoked; the interceptor
neither forgets it (which would let revoked peers back in) nor refuses every peer (which would
turn a CA outage into an outage of every service). It is reported: :attr:`CrlWatcher.stale`
says so, each refresh logs a warning while it lasts, and the metrics ``meshid_crl_stale`` (1
when stale) and ``meshid_crl_next_update_seconds`` (negative once past) show it per trust domain.
The watcher has no health service of its own: ``stale``, ``last_error`` and ``current`` are its
health, for the application's own health check.

:class:`CrlWatcher` fetches the CRL periodically (from a meshid CA, or through any fetch
function it is given) and keeps the last good one when a fetch fails or is refused; hand its
``is_revoked`` to ``interceptor.set_revocation_check`` and a revoked peer gets
``UNAUTHENTICATED``. Both it and :class:`~meshid.IssuerSource` hold their list in a
:class:`CrlKeeper`: the acceptance rules above are applied in that one place.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import verification

from meshid import _x509, metrics
from meshid._background import Worker
from meshid.bundle import BundleSet, check_ca_scope
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import MeshIdError, VerificationError
from meshid.peer import PeerIdentity
from meshid.sources import Source
from meshid.spiffeid import TrustDomain
from meshid.svid import spiffe_id_from_certificate

__all__ = ["CrlFetch", "CrlKeeper", "CrlWatcher", "RevocationList"]

log = logging.getLogger("meshid.revocation")


def _check_crl_signer(signer: x509.Certificate, what: str) -> None:
    """A CRL signer must be a CA certificate allowed to sign CRLs (RFC 5280 4.2.1.3, 4.2.1.9)."""
    try:
        constraints = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise VerificationError(
            f"CRL: its signer {what} is not a CA certificate (basicConstraints cA is not set); "
            "only a CA of the trust domain may sign its CRL"
        )
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.crl_sign:
        raise VerificationError(f"CRL: its signer {what} is a CA whose key usage does not include cRLSign")


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
    number: int
    next_update: datetime.datetime

    @classmethod
    def from_der(
        cls,
        der: bytes,
        issuer_chain: Sequence[x509.Certificate],
        bundles: BundleSet,
        *,
        now: datetime.datetime | None = None,
    ) -> RevocationList:
        """Verify and read a CRL. ``issuer_chain`` starts with the CA certificate that signed it.

        ``now`` is when the signer's chain must be valid (default: the current time).

        Raises:
            VerificationError: the CRL is malformed; its signer is not a CA certificate with
                cRLSign, carries no trust domain, or does not chain to its trust domain's
                bundle; the signature does not verify; or it has no CRL number or nextUpdate.
        """
        if not issuer_chain:
            raise VerificationError("CRL: no issuer certificate given")
        try:
            crl = x509.load_der_x509_crl(der)
            signer = issuer_chain[0]
            td: TrustDomain = spiffe_id_from_certificate(signer).trust_domain
            what = f"{signer.subject.rfc4514_string()!r} ({td})"
            _check_crl_signer(signer, what)
            if td not in bundles:
                raise VerificationError(f"CRL: its signer {what} belongs to a trust domain with no bundle here")
            store = verification.Store(list(bundles[td].roots))
            try:
                built = BundleSet.verify_chain(store, signer, issuer_chain[1:], now=now, what=what)
                # Under a root several trust domains share, every CA up to it must be td's too:
                # another trust domain's CA must not mint a signer that names td.
                check_ca_scope(built, td, what=f"CRL signer {what}", spiffe=True)
            except VerificationError as err:
                raise VerificationError(f"CRL: its signer does not chain to the bundle of {td}: {err}") from err
            if crl.issuer != signer.subject or not crl.is_signature_valid(signer.public_key()):  # type: ignore[arg-type]
                raise VerificationError("CRL: the signature does not verify with its issuer's key")
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            except x509.ExtensionNotFound:
                raise VerificationError(
                    "CRL: it has no CRL number, so it cannot be ordered against the list in force; "
                    "a meshid CA numbers every CRL"
                ) from None
            next_update = crl.next_update_utc
            if next_update is None:
                raise VerificationError("CRL: it has no nextUpdate, so nobody can tell when it is stale")
            serials = frozenset(r.serial_number for r in crl)
        except VerificationError:
            raise
        except MeshIdError as err:
            raise VerificationError(f"CRL: its signer carries no trust domain: {err}") from err
        except _x509.PARSE_ERRORS as err:
            raise VerificationError(f"CRL: cannot be read: {err}") from err
        return cls(td, crl.issuer, serials, number, next_update)

    def supersedes(self, other: RevocationList | None) -> bool:
        """Whether this list replaces ``other``, the list in force (None: none yet).

        True for a greater CRL number; False for the same CRL again (a refetch changes nothing).

        Raises:
            VerificationError: a smaller CRL number (the newer list must stay in force), the
                same number with other contents, or another trust domain's list.
        """
        if other is None:
            return True
        if self.trust_domain != other.trust_domain:
            raise VerificationError(
                f"CRL: a list of {self.trust_domain} cannot replace the one of {other.trust_domain}"
            )
        if self.number > other.number:
            return True
        if self.number == other.number:
            if self != other:
                raise VerificationError(
                    f"CRL: number {self.number} again, but with other contents; keeping the list in force"
                )
            return False
        raise VerificationError(
            f"CRL: number {self.number} is older than number {other.number} in force; keeping the newer list"
        )

    def is_stale(self, now: datetime.datetime) -> bool:
        """Whether ``now`` is past the nextUpdate: a newer CRL should have replaced this one."""
        return now >= self.next_update

    def is_revoked(self, peer: PeerIdentity) -> bool:
        cert = peer.certificate
        return cert is not None and peer.trust_domain == self.trust_domain and cert.serial_number in self.serials


def _warn_if_stale(crl: RevocationList | None, now: datetime.datetime, who: str) -> bool:
    """Log a warning if ``crl`` is past its nextUpdate (once per refresh); return whether it is."""
    if crl is None or not crl.is_stale(now):
        return False
    log.warning(
        "%s: the CRL of %s (number %d) is past its nextUpdate %s; still enforcing it "
        "(its revoked serials stay revoked) until a newer one arrives",
        who,
        crl.trust_domain,
        crl.number,
        crl.next_update.isoformat(),
    )
    return True


#: Fetches a CRL: its DER and the chain of the certificate that signed it, signer first.
CrlFetch = Callable[[], tuple[bytes, Sequence[x509.Certificate]]]


class CrlKeeper:
    """The list in force, and the one way a fetched CRL gets there (for :class:`CrlWatcher` and
    :class:`~meshid.IssuerSource` alike): fetched through the function it is given, verified by
    :meth:`RevocationList.from_der`, taken only if it :meth:`~RevocationList.supersedes` the
    list in force; otherwise the list in force stays, and ``last_error`` says why."""

    def __init__(self, who: str) -> None:
        self._who = who
        self.current: RevocationList | None = None
        self.last_error: str | None = None

    def refresh(self, fetch: CrlFetch, bundles: BundleSet, now: datetime.datetime) -> bool:
        """Fetch and offer a CRL. Returns True if it is in force: newer, or the same again."""
        try:
            der, chain = fetch()
            fetched = RevocationList.from_der(der, chain, bundles, now=now)
            if fetched.supersedes(self.current):
                self.current = fetched
        except MeshIdError as err:
            self.last_error = str(err)
            log.warning("%s: CRL refused or unavailable; keeping the list in force: %s", self._who, err)
            ok = False
        else:
            self.last_error = None
            ok = True
        _warn_if_stale(self.current, now, self._who)
        return ok

    def is_revoked(self, peer: PeerIdentity) -> bool:
        current = self.current
        return current is not None and current.is_revoked(peer)


class CrlWatcher:
    """Keeps a meshid CA's CRL current for an interceptor.

    ``start()`` fetches now and every ``interval`` seconds; ``refresh()`` fetches once. A failed
    or refused fetch keeps the last good list (and is logged, and kept in ``last_error``); until
    the first success nothing is revoked. A list past its nextUpdate stays in force and is
    reported (:attr:`stale`, a warning per refresh, ``meshid_crl_stale``). ``clock`` gives the
    time for staleness and for the signer's validity, and paces the refreshes.
    """

    def __init__(
        self,
        server: str | None,
        source: Source,
        *,
        interval: float = 60.0,
        clock: Clock = SYSTEM_CLOCK,
        fetch: CrlFetch | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if (server is None) == (fetch is None):
            raise ValueError("CRL watcher: give a meshid CA's address, or a fetch function, not both")
        self._source = source
        self._fetch = fetch if fetch is not None else self._from_ca(server or "")
        self._interval = interval
        self._clock = clock
        self._keeper = CrlKeeper("CRL watcher")
        self._worker = Worker("meshid-crl", self._run)
        self._closing = threading.Event()  # close() was called (a start() under way starts no thread)
        metrics.watch_revocation(self, lambda watcher: watcher.current, lambda watcher: watcher._clock.now())

    def _from_ca(self, server: str) -> CrlFetch:
        def fetch() -> tuple[bytes, Sequence[x509.Certificate]]:
            from meshid.ca.client import get_crl_with_svid

            return get_crl_with_svid(server, self._source.get_svid(), self._source.get_bundles())

        return fetch

    @property
    def current(self) -> RevocationList | None:
        """The list in force, or None before the first successful fetch."""
        return self._keeper.current

    @property
    def last_error(self) -> str | None:
        """Why the last refresh did not take a list, or None after one that did."""
        return self._keeper.last_error

    @property
    def stale(self) -> bool:
        """Whether the list in force is past its nextUpdate (it is still enforced)."""
        current = self._keeper.current
        return current is not None and current.is_stale(self._clock.now())

    def refresh(self) -> bool:
        """Fetch and verify the CRL now. Returns True if it is in force: newer, or the same again.

        False when the fetch failed or the CRL was refused (older, unsigned by a CA, ...): the
        previous list stays in force and ``last_error`` says why.
        """
        return self._keeper.refresh(self._fetch, self._source.get_bundles(), self._clock.now())

    def is_revoked(self, peer: PeerIdentity) -> bool:
        return self._keeper.is_revoked(peer)

    def start(self) -> CrlWatcher:
        """Fetch now, then every ``interval`` in a daemon thread. A :meth:`close` from another
        thread while this first fetch waits for the CA wins: no thread is started then."""
        if not self._worker.running:
            self._closing.clear()
            self.refresh()
            self._worker.start(unless=self._closing)
        return self

    def _run(self, stop: threading.Event) -> None:
        while not self._clock.wait(stop, self._interval):
            try:
                self.refresh()
            except Exception as err:  # keep the last good list and keep trying
                self._keeper.last_error = f"unexpected: {err}"
                log.exception("CRL: refresh failed")

    def close(self) -> None:
        self._closing.set()
        self._worker.close()

    def __enter__(self) -> CrlWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
