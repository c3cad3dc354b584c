"""IssuerSource: an identity source fed by a meshid CA, renewing before expiry.

The loop: obtain an SVID (a still-valid one from ``svid_dir``, else with the join token);
renew when ``renew_at`` of its lifetime has passed, minus a random jitter so a fleet does not
renew at once; retry with capped exponential backoff while the CA is unreachable, presenting
the current SVID until it expires; refresh the bundle and the CRL; notify subscribers. The
first issuance retries the same way while no CA answers (a sidecar may start before its CA),
until ``wait`` runs out; a refusal (a used, unknown or expired token) ends it at once.

A renewal no retry can mend (the CA refuses the SVID: revoked, its entry gone; or the SVID has
expired, which the CA's TLS layer refuses) is logged as an ERROR saying to re-attest with a new
join token, and :attr:`SourceState.refused`; it is asked again after minutes, not seconds
(:func:`~meshid.agent._renewal.refused_wait`). A join token given with a saved SVID is kept for
that: the saved SVID is tried first, and the token used once the CA refuses it.

One mTLS channel to the CA serves every renewal and refresh; it is rebuilt only for a new SVID
or on failover to another CA address. A refresh is one ``GetTrustUpdates`` call carrying the
bundle sequence and CRL number the source has: the CA sends only what changed. The
lifetime is measured on the CA's clock (``issued_at`` to NotAfter), capped by what the local
clock says is left, and waited out on the local monotonic clock: a few minutes of skew between
workload and CA moves renewals neither past expiry nor needlessly early.

It is also a JWT source (:class:`meshid.sources.JwtSource`): :meth:`IssuerSource.fetch_jwt_svid`
asks the CA (``meshid.v1.Issuer/NewJwtSvid``, over mTLS with the current X509-SVID) for a
JWT-SVID of the SVID's own SPIFFE ID and keeps it per audience until half its lifetime
(:class:`~meshid.agent.jwt_cache.JwtSvidCache`); the JWT keys come with the bundle.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshid import metrics
from meshid._background import Notifier, Unsubscribe, Worker
from meshid._files import write_svid_files
from meshid.agent._renewal import MIN_WAIT, explaining, refusal, refused_wait, renewal_wait
from meshid.agent.jwt_cache import JwtSvidCache
from meshid.agent.saved_svid import load_saved_svid, write_jwt_bundle
from meshid.bundle import BundleSet, TrustBundle
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import MeshIdError, RemoteError, SourceError
from meshid.peer import PeerIdentity
from meshid.revocation import CrlKeeper, _warn_if_stale
from meshid.spiffeid import SpiffeId
from meshid.svid import X509Svid
from meshid.workloadapi.wire import same_trust

if TYPE_CHECKING:
    from cryptography import x509

    from meshid.ca.client import IssuerClient
    from meshid.jwtsvid import JwtSvid

__all__ = ["IssuerSource", "SourceState"]

log = logging.getLogger("meshid.agent")


@dataclass(frozen=True, slots=True)
class SourceState:
    """What an :class:`IssuerSource` is doing, for health checks and metrics.

    ``read_at`` is when the state was read (``IssuerSource.state``), on the source's clock:
    ``expired`` is measured then, on that clock (on the machine's for a state made by hand).
    """

    spiffe_id: str | None
    serial: str | None
    expires_at: datetime.datetime | None
    last_renewal: datetime.datetime | None
    next_attempt: datetime.datetime | None
    last_error: str | None
    renewals: int
    failures: int
    bundle_sequence: int | None
    server: str | None
    read_at: datetime.datetime | None = None
    refused: bool = False  # the CA refuses this SVID (revoked, no entry) or it expired: re-attest

    @property
    def expired(self) -> bool:
        """Whether the SVID had expired when the state was read."""
        now = self.read_at if self.read_at is not None else datetime.datetime.now(datetime.UTC)
        return self.expires_at is not None and self.expires_at <= now


class IssuerSource:
    """An identity source whose SVID comes from, and is renewed by, a meshid CA.

    Args:
        server: the CA's ``HOST:PORT``, or several to fail over between.
        bundle_file: the CA's bundle (PEM), trusted for the first contact.
        join_token: for the first issuance when ``svid_dir`` holds no valid SVID.
        svid_dir: where the SVID is written (``svid.pem``, ``svid.key`` 0600, ``bundle.pem``)
            and reused from after a restart.
        renew_at: the fraction of the lifetime after which to renew (0 < renew_at < 1).
        jitter: renewals come up to this fraction of the lifetime earlier, at random.
        refresh_interval: seconds between bundle and CRL refreshes.
        wait: how long :meth:`start` keeps trying the first issuance while no CA answers
            (seconds; None: until one does, or :meth:`close` is called).
        clock: where the time comes from and how the loop waits (:class:`meshid.clock.ManualClock`
            steps a renewal schedule in tests without waiting out real seconds).
        pq_key_kind: ``"ml-dsa-65"`` to hold a post-quantum SVID of the same SPIFFE ID as well
            (the trust domain needs an ML-DSA CA: ``meshid ca key add``). It is renewed right
            after each classical one, over the channel the classical SVID authenticates (grpcio
            cannot present ML-DSA), written to ``svid_dir/ml-dsa-65/`` (``svid.pem``,
            ``svid.key``, ``bundle.pem``, switched atomically as the classical files are), and
            served second by the Workload API (:meth:`get_additional_svids`). ``get_svid`` stays
            the classical one, for grpcio; the ML-DSA one is for :mod:`meshid.pqtls`.

    Nothing happens until :meth:`start`.
    """

    def __init__(
        self,
        server: str | Sequence[str],
        bundle_file: str | os.PathLike[str],
        *,
        join_token: str | None = None,
        svid_dir: str | os.PathLike[str] | None = None,
        renew_at: float = 0.5,
        jitter: float = 0.1,
        refresh_interval: float = 60.0,
        key_kind: str = "ec-p256",
        max_backoff: float = 30.0,
        timeout: float = 10.0,
        wait: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        pq_key_kind: str | None = None,
    ) -> None:
        if pq_key_kind not in (None, "ml-dsa-65"):
            raise ValueError(f"pq_key_kind must be None or 'ml-dsa-65', not {str(pq_key_kind)[:40]!r}")
        if wait is not None and wait < 0:
            raise ValueError("wait must be None (keep trying) or at least 0 seconds")
        servers = [server] if isinstance(server, str) else list(server)
        if not servers or not all(isinstance(s, str) and s for s in servers):
            raise ValueError("server must be a HOST:PORT or a non-empty list of them")
        if not 0 < renew_at < 1:
            raise ValueError("renew_at must be between 0 and 1")
        if not 0 <= jitter < renew_at:
            raise ValueError("jitter must be at least 0 and less than renew_at")
        if not refresh_interval > 0:  # 0: a loop asking the CA for its bundle without pause
            raise ValueError("refresh_interval must be more than 0 seconds")
        if join_token is None and svid_dir is None:
            raise ValueError("give a join_token, or an svid_dir holding a still-valid SVID")
        self._servers = servers
        self._bundle_file = os.fspath(bundle_file)
        self._join_token = join_token
        self._spare_token: str | None = None  # given with a saved SVID: kept for when the CA refuses that
        self._svid_dir = pathlib.Path(svid_dir) if svid_dir is not None else None
        self._renew_at = renew_at
        self._jitter = jitter
        self._refresh_interval = refresh_interval
        self._key_kind = key_kind
        self._max_backoff = max_backoff
        self._timeout = timeout
        self._wait = wait
        self._clock = clock
        self._closing = threading.Event()
        # The one channel to the CA (built on first use), for the SVID and server it was made with.
        self._client: IssuerClient | None = None
        self._legacy_refresh = False  # the CA predates GetTrustUpdates: two calls per refresh
        self._bundle_sequence: int | None = None  # what the CA last said (sent back on refresh)
        self._notifier = Notifier()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._worker = Worker("meshid-issuer-source", self._run, wake=self._wake.set)
        self._svid: X509Svid | None = None
        self._bundles: BundleSet | None = None
        self._pq_key_kind = pq_key_kind
        self._pq_svid: X509Svid | None = None
        self._crl = CrlKeeper("issuer source")
        self._server_index = 0
        self._next_renewal = 0.0  # monotonic
        self._next_refresh = 0.0
        self._failures_in_row = 0
        self._refused_refreshes = 0  # in a row: the CA refuses the SVID they present
        self._lifetime = 0.0
        self._state = SourceState(None, None, None, None, None, None, 0, 0, None, None)
        self._jwt_cache = JwtSvidCache(clock=clock)
        self._jwt_lock = threading.Lock()
        self._jwt_client: IssuerClient | None = None  # JWT calls come from other threads: a channel of their own

    # --- the Source protocol -------------------------------------------------------------

    def get_svid(self) -> X509Svid:
        svid = self._svid
        if svid is None:
            raise SourceError("issuer source: no SVID yet; call start() first")
        return svid

    def get_bundles(self) -> BundleSet:
        bundles = self._bundles
        if bundles is None:
            raise SourceError("issuer source: no bundle yet; call start() first")
        return bundles

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._notifier.subscribe(callback)

    def get_pq_svid(self) -> X509Svid | None:
        """The ML-DSA SVID of the same SPIFFE ID (with ``pq_key_kind``), or None while there is none."""
        pq = self._pq_svid
        svid = self._svid
        if pq is None or svid is None or pq.spiffe_id != svid.spiffe_id or pq.not_after <= self._clock.now():
            return None
        return pq

    def get_additional_svids(self) -> tuple[tuple[str, X509Svid], ...]:
        """What the Workload API serves after :meth:`get_svid`: ``("ml-dsa-65", svid)`` when there
        is an ML-DSA SVID (its ``hint`` names the algorithm), else nothing."""
        pq = self.get_pq_svid()
        return () if pq is None or self._pq_key_kind is None else ((self._pq_key_kind, pq),)

    # --- the JwtSource protocol ----------------------------------------------------------

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: SpiffeId | None = None) -> JwtSvid:
        """A JWT-SVID of this source's SPIFFE ID for ``audience``: the cached one until half its
        lifetime has passed, else a new one from the CA.

        Raises:
            SourceError: no SVID yet, ``spiffe_id`` is not this source's, or the source is closed
                (and holds no cached one).
            ValueError: ``audience`` is empty or a plain string.
            RemoteError: the CA refused (``.code``: INVALID_ARGUMENT for a bad audience) or is
                unreachable.
        """
        if isinstance(audience, str) or not audience:
            raise ValueError("JWT-SVID: give the audience as a non-empty list of strings")
        svid = self.get_svid()
        if spiffe_id is not None and spiffe_id != svid.spiffe_id:
            raise SourceError(f"issuer source: it holds {svid.spiffe_id}, not {spiffe_id}")
        cached = self._jwt_cache.get(svid.spiffe_id, audience)
        if cached is not None:
            return cached
        from meshid.ca.client import IssuerClient

        with self._jwt_lock:
            if self._closing.is_set():  # close() has closed the channel: open none it would leave open
                raise SourceError("issuer source: closed; no new JWT-SVID is fetched")
            svid, server = self.get_svid(), self._servers[self._server_index]
            client = self._jwt_client
            if client is None or client.svid is not svid or client.server != server:
                if client is not None:
                    client.close()
                client = self._jwt_client = IssuerClient(server, svid, self.get_bundles(), timeout=self._timeout)
            try:
                with explaining("JWT-SVID", svid, self._clock.now):
                    token = client.new_jwt_svid(audience)
            except RemoteError as err:
                if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):  # connect afresh next time
                    self._jwt_client = None
                    client.close()
                raise
        self._jwt_cache.put(token)
        return token

    def get_jwt_bundles(self) -> BundleSet:
        """The bundles, whose JWT keys validate JWT-SVIDs (the same set :meth:`get_bundles` hands out)."""
        return self.get_bundles()

    @property
    def state(self) -> SourceState:
        return dataclasses.replace(self._state, read_at=self._clock.now())

    def is_revoked(self, peer: PeerIdentity) -> bool:
        """Whether the CA's latest CRL lists ``peer`` (for ``interceptor.set_revocation_check``)."""
        return self._crl.is_revoked(peer)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> IssuerSource:
        """Obtain the first SVID (blocking, retrying while no CA answers), then renew in a
        background thread.

        Raises:
            SourceError: no reusable SVID, and the CA refused the join token (or there is none),
                or :meth:`close` was called meanwhile.
            RemoteError: ``code`` ``UNAVAILABLE``: no CA answered within ``wait`` seconds.
        """
        if self._worker.running:
            return self
        self._closing.clear()
        if not self._load_saved():
            self._first_issuance()
        if not self._worker.start(unless=self._closing) and self._closing.is_set():
            self.close()  # again: a channel opened after the other thread's close() is closed too
            raise SourceError("issuer source: closed while it started")
        metrics.watch_source(self)
        metrics.watch_revocation(self, lambda source: source._crl.current, lambda source: source._clock.now())
        return self

    def close(self) -> None:
        """Stop renewing (and end a :meth:`start` still waiting for a CA, from another thread)."""
        self._closing.set()
        self._wake.set()
        self._worker.close()
        client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._jwt_lock:
            jwt_client, self._jwt_client = self._jwt_client, None
        if jwt_client is not None:
            jwt_client.close()

    def __enter__(self) -> IssuerSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _load_saved(self) -> bool:
        if self._svid_dir is None:
            return False
        saved = load_saved_svid(
            self._svid_dir, self._bundle_file, clock=self._clock, who="issuer source", otherwise="using the join token"
        )
        if saved is None:
            return False
        if self._pq_key_kind is not None:  # its ML-DSA SVID too, if still good: no CA call at restart
            pq = load_saved_svid(
                self._svid_dir / self._pq_key_kind,
                self._bundle_file,
                clock=self._clock,
                who="issuer source",
                otherwise="asking the CA for a new one",
            )
            if pq is not None and pq.svid.spiffe_id == saved.svid.spiffe_id:
                self._pq_svid = pq.svid
        self._lifetime = saved.remaining
        self._spare_token = self._join_token
        self._install(saved.svid, saved.bundle, saved.remaining, renewed=False)
        log.info("issuer source: reusing the saved SVID of %s (serial %x)", saved.svid.spiffe_id, saved.svid.serial)
        return True

    def _first_issuance(self) -> None:
        from meshid.ca.client import issue_with_token, read_roots

        if self._join_token is None:
            raise SourceError("issuer source: no reusable SVID and no join token")
        roots = read_roots(self._bundle_file)
        deadline = None if self._wait is None else self._clock.monotonic() + self._wait
        while True:
            errors = []
            for index, server in enumerate(self._servers):
                try:
                    issued = issue_with_token(
                        server, roots, self._join_token, key_kind=self._key_kind, timeout=self._timeout
                    )
                except RemoteError as err:
                    if err.code != "UNAVAILABLE":  # the CA answered: another replica would answer the same
                        raise SourceError(f"issuer source: first issuance refused: {err}") from err
                    errors.append(str(err))
                    continue
                except MeshIdError as err:
                    raise SourceError(f"issuer source: first issuance failed: {err}") from err
                self._server_index = index
                self._failures_in_row = 0
                self._install(issued.svid, issued.bundle, issued.lifetime.total_seconds(), renewed=False)
                return
            self._failures_in_row += 1
            delay = self._backoff()
            left = None if deadline is None else deadline - self._clock.monotonic()
            if left is not None and left <= 0:
                raise RemoteError(
                    f"issuer source: first issuance: no CA answered within {self._wait:g}s: " + "; ".join(errors),
                    "UNAVAILABLE",
                )
            delay = delay if left is None else min(delay, left)
            log.warning("issuer source: first issuance failed: %s; retrying in %.2fs", "; ".join(errors), delay)
            self._state = dataclasses.replace(
                self._state,
                next_attempt=self._clock.now() + datetime.timedelta(seconds=delay),
                last_error="; ".join(errors),
                failures=self._state.failures + 1,
            )
            self._clock.wait(self._closing, delay)
            if self._closing.is_set():
                raise SourceError("issuer source: closed while waiting for the CA for the first issuance")

    def _connected(self) -> IssuerClient:
        """The channel to the current server with the current SVID: the one kept, or a new one.

        Raises:
            SourceError: the source is closed (by a subscriber, from this thread, say): a channel
                opened now would stay open, as close() has already run.
        """
        from meshid.ca.client import IssuerClient

        if self._closing.is_set():
            raise SourceError("issuer source: closed")
        svid, server = self.get_svid(), self._servers[self._server_index]
        client = self._client
        if client is not None and client.svid is svid and client.server == server:
            return client
        if client is not None:
            client.close()
        client = self._client = IssuerClient(server, svid, self.get_bundles(), timeout=self._timeout)
        return client

    def _install(self, svid: X509Svid, bundle: TrustBundle, lifetime: float, *, renewed: bool) -> None:
        self._bundle_sequence = bundle.sequence
        with self._lock:
            old = self._bundles
            bundles = (old or BundleSet.of()).with_bundle(bundle)
            if old is not None and dict(old) == dict(bundles):
                bundles = old  # unchanged: keep the object, so nobody rebuilds for nothing
            self._svid, self._bundles = svid, bundles
            # The lifetime on the CA's clock, or what the local clock says is left, whichever is
            # shorter: a CA whose clock runs ahead cannot make us wait too long, nor one behind.
            local_remaining = (svid.not_after - self._clock.now()).total_seconds()
            lifetime = max(0.0, min(lifetime, local_remaining))
            self._lifetime = lifetime
            wait = renewal_wait(lifetime, self._renew_at, self._jitter)
            self._next_renewal = self._clock.monotonic() + wait
            self._failures_in_row = self._refused_refreshes = 0
        file_error = None
        if self._svid_dir is not None:
            try:
                own = bundles[svid.spiffe_id.trust_domain]
                write_svid_files(self._svid_dir, svid.chain_pem(), svid.key_pem(), own.to_pem())
                write_jwt_bundle(self._svid_dir, own)
            except OSError as err:  # present the new SVID anyway; say the files are stale
                file_error = f"cannot write {self._svid_dir}: {err}"
                log.error("issuer source: %s", file_error)
        if self._pq_key_kind is not None and (renewed or self.get_pq_svid() is None):
            file_error = self._renew_pq(bundles) or file_error
        previous = self._state
        self._state = SourceState(
            spiffe_id=str(svid.spiffe_id),
            serial=format(svid.serial, "x"),
            expires_at=svid.not_after,
            last_renewal=self._clock.now() if renewed else previous.last_renewal,
            next_attempt=self._clock.now() + datetime.timedelta(seconds=wait),
            last_error=file_error,
            renewals=previous.renewals + (1 if renewed else 0),
            failures=previous.failures,
            bundle_sequence=bundle.sequence,
            server=self._servers[self._server_index],
        )
        self._notifier.notify()

    def _renew_pq(self, bundles: BundleSet) -> str | None:
        """Get a new ML-DSA SVID beside the classical one just installed; returns what went wrong, if anything.

        A failure leaves the classical path as it is: the next classical renewal tries again.
        """
        kind = self._pq_key_kind
        assert kind is not None
        try:
            issued = self._connected().renew(key_kind=kind)
        except (MeshIdError, ValueError) as err:
            log.warning("issuer source: no new %s SVID: %s; the next renewal tries again", kind, err)
            return f"{kind} SVID: {err}"
        self._pq_svid = issued.svid
        if self._svid_dir is not None:
            try:
                write_svid_files(
                    self._svid_dir / kind,
                    issued.svid.chain_pem(),
                    issued.svid.key_pem(),
                    bundles[issued.svid.spiffe_id.trust_domain].to_pem(),
                )
            except OSError as err:
                log.error("issuer source: cannot write %s: %s", self._svid_dir / kind, err)
                return f"cannot write {self._svid_dir / kind}: {err}"
        log.info("issuer source: %s SVID of %s (serial %x)", kind, issued.svid.spiffe_id, issued.svid.serial)
        return None

    def _backoff(self) -> float:
        base = min(1.0, max(self._lifetime / 20, 0.05))
        cap = max(base, min(self._max_backoff, self._lifetime / 4 if self._lifetime else self._max_backoff))
        delay = min(cap, base * 2 ** min(self._failures_in_row, 16))
        return float(delay * (0.5 + random.random() / 2))

    def _renew(self) -> None:
        svid = self.get_svid()
        server = self._servers[self._server_index]
        try:
            issued = self._connected().renew(key_kind=self._key_kind)
        except (MeshIdError, ValueError) as err:
            metrics.SVID_RENEWALS.labels(str(svid.spiffe_id), "error").inc()
            self._failures_in_row += 1
            self._server_index = (self._server_index + 1) % len(self._servers)  # fail over
            self._drop_channel(err)
            why = refusal("renewal", err, svid, self._clock.now())
            if why is not None and self._reattest(why):
                return
            # Unreachable: soon again, on the next replica. Refused or expired: the same SVID
            # would be refused every time, so minutes apart, each an ERROR that says what to do.
            delay = self._backoff() if why is None else refused_wait(self._failures_in_row)
            self._next_renewal = self._clock.monotonic() + delay
            if why is None:
                log.warning("issuer source: renewal failed: %s; retrying in %.2fs", err, delay)
            else:
                log.error("issuer source: %s; asking again in %.2fs", why, delay)
            previous = self._state
            self._state = SourceState(
                previous.spiffe_id,
                previous.serial,
                previous.expires_at,
                previous.last_renewal,
                self._clock.now() + datetime.timedelta(seconds=delay),
                why or str(err),
                previous.renewals,
                previous.failures + 1,
                previous.bundle_sequence,
                server,
                refused=why is not None,
            )
            return
        log.info(
            "issuer source: renewed %s (serial %x, until %s)",
            issued.svid.spiffe_id,
            issued.svid.serial,
            issued.svid.not_after.isoformat(),
        )
        metrics.SVID_RENEWALS.labels(str(svid.spiffe_id), "ok").inc()
        self._install(issued.svid, issued.bundle, issued.lifetime.total_seconds(), renewed=True)

    def _reattest(self, why: str) -> bool:
        """After the CA refused the SVID (``why``), attest again with the join token given with a
        saved SVID, once. Returns whether a new SVID is in place."""
        from meshid.ca.client import issue_with_token, read_roots

        token = self._spare_token
        if token is None:
            return False
        log.error("issuer source: %s; attesting again with the join token given", why)
        errors = []
        for index, server in enumerate(self._servers):
            try:
                issued = issue_with_token(
                    server, read_roots(self._bundle_file), token, key_kind=self._key_kind, timeout=self._timeout
                )
            except MeshIdError as err:
                errors.append(str(err))
                if isinstance(err, RemoteError) and err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    continue  # kept for the next attempt, should no CA answer now
                self._spare_token = None  # refused (used, expired): it never will be accepted
                break
            self._spare_token = None
            self._server_index = index
            log.info(
                "issuer source: attested again with the join token: %s (serial %x)",
                issued.svid.spiffe_id,
                issued.svid.serial,
            )
            self._install(issued.svid, issued.bundle, issued.lifetime.total_seconds(), renewed=True)
            return True
        log.error("issuer source: attesting again with the join token given failed: %s", "; ".join(errors))
        return False

    def _refresh(self) -> None:
        if self._legacy_refresh:
            self._refresh_in_two_calls()
            return
        current = self._crl.current
        try:
            updates = self._connected().trust_updates(self._bundle_sequence, current.number if current else None)
        except RemoteError as err:
            if err.code == "UNIMPLEMENTED":  # a CA older than GetTrustUpdates
                log.info("issuer source: the CA has no GetTrustUpdates; refreshing with GetBundle and GetCrl")
                self._legacy_refresh = True
                self._refresh_in_two_calls()
                return
            self._refresh_failed(err)
            return
        except MeshIdError as err:
            self._refresh_failed(err)
            return
        if updates.bundle is not None:
            self._take_bundle(self.get_svid(), self.get_bundles(), updates.bundle)
        if updates.crl is not None:
            # After the bundle (a CRL signed by a new root verifies against it).
            crl = updates.crl
            self._crl.refresh(lambda: crl, self.get_bundles(), self._clock.now())
        else:
            _warn_if_stale(self._crl.current, self._clock.now(), "issuer source")

    def _drop_channel(self, err: Exception) -> None:
        """After a failed call, the next one connects afresh: a channel left in grpc's own
        reconnect backoff (up to two minutes) would not notice a CA that is back."""
        if isinstance(err, RemoteError) and err.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return  # the CA answered: the connection is fine
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _refresh_failed(self, err: MeshIdError) -> None:
        self._drop_channel(err)
        svid = self.get_svid()
        why = refusal("bundle and CRL refresh", err, svid, self._clock.now())
        if why is None:
            log.warning("issuer source: bundle and CRL refresh failed: %s", err)
        elif not self._reattest(why):
            self._refused_refreshes += 1
            # Refused every time too: minutes apart, never sooner than the usual refresh.
            now = self._clock.monotonic()
            self._next_refresh = max(self._next_refresh, now + refused_wait(self._refused_refreshes))
            delay = self._next_refresh - now
            log.error("issuer source: %s; refreshing again in %.2fs", why, delay)
            self._state = dataclasses.replace(self._state, last_error=why, refused=True)
        _warn_if_stale(self._crl.current, self._clock.now(), "issuer source")

    def _refresh_in_two_calls(self) -> None:
        from meshid.ca.client import get_bundle_with_svid

        svid, bundles = self.get_svid(), self.get_bundles()
        server = self._servers[self._server_index]
        try:
            bundle = get_bundle_with_svid(server, svid, bundles, timeout=self._timeout)
        except MeshIdError as err:  # the CA is unreachable: do not wait for it a second time
            self._refresh_failed(err)
            return
        self._take_bundle(svid, bundles, bundle)
        # After the bundle (a CRL signed by a new root verifies against it), and on its own: a
        # refused CRL must not hold back a bundle change.
        self._refresh_crl(server)

    def _refresh_crl(self, server: str) -> None:
        """Fetch the CRL; the same acceptance rules as :class:`~meshid.CrlWatcher` (a CrlKeeper)."""
        from meshid.ca.client import get_crl_with_svid

        svid, bundles = self.get_svid(), self.get_bundles()

        def fetch() -> tuple[bytes, list[x509.Certificate]]:
            with explaining("CRL", svid, self._clock.now):
                return get_crl_with_svid(server, svid, bundles, timeout=self._timeout)

        self._crl.refresh(fetch, bundles, self._clock.now())

    def _take_bundle(self, svid: X509Svid, bundles: BundleSet, bundle: TrustBundle) -> None:
        td = svid.spiffe_id.trust_domain
        self._bundle_sequence = bundle.sequence
        if not same_trust(bundles[td], bundle):
            with self._lock:
                self._bundles = bundles.with_bundle(bundle)
            log.info(
                "issuer source: trust bundle of %s changed (sequence %s: %d root(s), %d JWT key(s))",
                td, bundle.sequence, len(bundle.roots), len(bundle.jwt_authorities),
            )  # fmt: skip
            if self._svid_dir is not None:
                write_svid_files(self._svid_dir, svid.chain_pem(), svid.key_pem(), bundle.to_pem())
                write_jwt_bundle(self._svid_dir, bundle)
            self._notifier.notify()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self._clock.monotonic() >= self._next_renewal:
                    self._renew()
                if not stop.is_set() and self._clock.monotonic() >= self._next_refresh:
                    every = min(self._refresh_interval, max(self._lifetime / 2, MIN_WAIT))
                    self._next_refresh = self._clock.monotonic() + every
                    self._refresh()
            except Exception as err:  # the loop must outlive any one failure: the SVID depends on it
                log.exception("issuer source: unexpected failure; retrying")
                self._failures_in_row += 1
                self._next_renewal = self._clock.monotonic() + self._backoff()
                self._state = dataclasses.replace(
                    self._state, last_error=f"unexpected: {err}", failures=self._state.failures + 1
                )
            timeout = max(0.0, min(self._next_renewal, self._next_refresh) - self._clock.monotonic())
            self._clock.wait(self._wake, timeout)
            self._wake.clear()
