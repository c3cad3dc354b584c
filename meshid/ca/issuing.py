"""The issuing service's logic: no gRPC here. The servicers adapt it; the store keeps its records.

Rules enforced here:

* Leaves follow the X509-SVID standard (see :meth:`Authority.sign_svid`); NotAfter is
  ``min(now + min(entry TTL, CA maximum), CA NotAfter)``; serials are random and never reused.
* A CSR's signature must verify over an allowed key; what it asks for is ignored in favour of
  the entry, except that a renewal that explicitly asks for another SPIFFE ID is refused.
* Join tokens are 256-bit secrets, single use, expiring, stored only as SHA-256 hashes.
* IDs under ``/meshid/`` (the CA's own, the admin's, node agents') cannot be registered; of
  them only node agents' IDs get tokens, for node attestation (:mod:`meshid.ca.agents`).
* An entry with a parent (a node agent's ID) has at least one selector, and its SVIDs go only
  to that agent: no join token is made for it, and its SVIDs are not renewed by their holders.
* A JWT-SVID goes to the holder of a valid X509-SVID for its own SPIFFE ID only (or to the node
  agent an entry is parented to); it lives ``min(5 minutes, entry TTL, CA maximum)``; its
  audience is 1 to :data:`MAX_AUDIENCES` non-empty strings of at most
  :data:`MAX_AUDIENCE_LENGTH` characters, :data:`MAX_AUDIENCE_BYTES` in all (so the token stays
  well under the 8 KiB validators accept). JWT-SVIDs are not recorded in the store.
* The bundle's JWT keys are this CA's (its data folder's) and those every other CA on the same
  store publishes (replicas on PostgreSQL): :meth:`IssuingService.publish_jwt_keys` puts this
  CA's in the store, a key in use for :data:`JWT_KEY_PUBLISHED_FOR` at a time (renewed while
  the CA runs), a retiring one until its retirement time.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import logging
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid import _x509
from meshid._x509 import public_key_der, spki_sha256
from meshid.bundle import MAX_JWT_KEYS, JwtAuthorities, TrustBundle
from meshid.ca.authority import Authority
from meshid.ca.crl import build_crl
from meshid.ca.csr import MAX_CSR_BYTES, parse_csr
from meshid.ca.jwt_keys import JWT_SVID_TTL, JwtKeys, JwtPublicKey
from meshid.ca.selectors import parse_selectors
from meshid.ca.store import Entry, Signer, Store
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import (
    InvalidBundleError,
    InvalidRequestError,
    InvalidSpiffeIdError,
    IssuanceError,
    NotAuthorizedError,
    NotFoundError,
    RateLimitedError,
    StoreError,
    TokenError,
)
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import IDENTITY_DNS_ZONE

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = [
    "AGENT_PREFIX",
    "DEFAULT_TOKEN_TTL",
    "DEFAULT_TTL",
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_BYTES",
    "MAX_AUDIENCE_LENGTH",
    "Issued",
    "IssuingService",
    "admin_id",
    "agent_id",
    "ca_id",
    "check_audience",
    "is_agent_id",
    "token_hash",
]

DEFAULT_TTL = datetime.timedelta(hours=1)
DEFAULT_TOKEN_TTL = datetime.timedelta(minutes=10)
MAX_TOKEN_TTL = datetime.timedelta(days=7)
MAX_DNS_NAMES = 32
RESERVED_PREFIX = "/meshid/"
#: Node agents' IDs: ``spiffe://<td>/meshid/agent/<name>``, one path segment for the name.
AGENT_PREFIX = "/meshid/agent/"
#: A JWT-SVID's audience: at most this many values, each at most this long, this many bytes in all.
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 2048
MAX_AUDIENCE_BYTES = 4096
#: A JWT key in use is published in the store this long at a time, renewed at a third of it:
#: a replica that is gone stops being trusted this long after (longer than a token lives).
JWT_KEY_PUBLISHED_FOR = datetime.timedelta(minutes=15)
log = logging.getLogger("meshid.ca")
_DNS = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


#: The SVID types an entry may ask for (:meth:`IssuingService.create_entry`), in the order listed.
SVID_TYPES = ("classical", "ml-dsa-65")
PQ_SVID_TYPE = "ml-dsa-65"


def ca_id(authority: Authority) -> SpiffeId:
    """The SPIFFE ID the CA's own server presents."""
    return SpiffeId.from_parts(authority.trust_domain, "meshid", "ca")


def admin_id(authority: Authority) -> SpiffeId:
    """The SPIFFE ID of the admin SVID ``meshid ca init`` writes for the CLI."""
    return SpiffeId.from_parts(authority.trust_domain, "meshid", "admin")


def agent_id(trust_domain: TrustDomain | str, name: str) -> SpiffeId:
    """The SPIFFE ID of node agent ``name`` (one path segment).

    Raises:
        InvalidSpiffeIdError: ``name`` is not one SPIFFE ID path segment.
    """
    return SpiffeId.from_parts(trust_domain, "meshid", "agent", name)


def is_agent_id(spiffe_id: SpiffeId) -> bool:
    """Whether ``spiffe_id`` names a node agent (``/meshid/agent/<name>``, any trust domain)."""
    name = spiffe_id.path.removeprefix(AGENT_PREFIX)
    return spiffe_id.path.startswith(AGENT_PREFIX) and bool(name) and "/" not in name


def check_audience(audience: object, what: str) -> tuple[str, ...]:
    """The audience of a JWT-SVID request, checked; repeats dropped, order kept.

    Raises:
        InvalidRequestError: not a list of strings, empty, too many, or too long.
    """
    if isinstance(audience, str) or not isinstance(audience, Sequence):
        raise InvalidRequestError(f"{what}: the audience must be a list of strings")
    if not audience:
        raise InvalidRequestError(f"{what}: an audience is required (the JWT-SVID standard requires aud)")
    if len(audience) > MAX_AUDIENCES:
        raise InvalidRequestError(f"{what}: at most {MAX_AUDIENCES} audience values, not {len(audience)}")
    for value in audience:
        if not isinstance(value, str):
            raise InvalidRequestError(f"{what}: each audience value must be a string, not {type(value).__name__}")
        if not value:
            raise InvalidRequestError(f"{what}: an audience value is empty")
        if len(value) > MAX_AUDIENCE_LENGTH:
            raise InvalidRequestError(f"{what}: an audience value is longer than {MAX_AUDIENCE_LENGTH} characters")
        if not value.isprintable():
            raise InvalidRequestError(f"{what}: an audience value holds control characters")
    if sum(len(v.encode()) for v in audience) > MAX_AUDIENCE_BYTES:
        raise InvalidRequestError(f"{what}: the audience is longer than {MAX_AUDIENCE_BYTES} bytes in all")
    return tuple(dict.fromkeys(audience))


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Issued:
    """What an issuance returns: the SVID's chain (leaf first) and the bundle to trust."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    bundle: TrustBundle
    issued_at: datetime.datetime


class _RateLimit:
    """At most ``limit`` events per caller in any 60 s window."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._events: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def take(self, caller: str, what: str) -> None:
        now = self._clock()
        with self._lock:
            events = self._events[caller]
            while events and events[0] <= now - 60:
                events.popleft()
            if len(events) >= self._limit:
                raise RateLimitedError(f"{what}: {caller} created {self._limit} in the last minute; try again later")
            events.append(now)


class IssuingService:
    """Issues, renews and revokes X509-SVIDs for one trust domain."""

    def __init__(
        self,
        authority: Authority,
        store: Store,
        *,
        max_ttl: datetime.timedelta = datetime.timedelta(hours=24),
        creations_per_minute: int = 60,
        max_csr_bytes: int = MAX_CSR_BYTES,
        clock: Clock = SYSTEM_CLOCK,
        pq_authority: Authority | None = None,
        jwt_keys: JwtKeys | None = None,
    ) -> None:
        self.authority = authority
        #: The ML-DSA-65 CA beside ``authority`` (``meshid ca key add``): it signs ML-DSA keys.
        self.pq_authority = pq_authority
        #: The JWT-SVID signing keys; None: this CA issues no JWT-SVIDs (FAILED_PRECONDITION).
        self.jwt_keys = jwt_keys
        self.store = store
        self.max_ttl = max_ttl
        self._max_csr_bytes = max_csr_bytes
        self._clock = clock
        self._limits = _RateLimit(creations_per_minute, clock.monotonic)
        self._crl_lock = threading.Lock()
        self._crl: tuple[bytes, int, datetime.datetime, frozenset[int]] | None = None
        self._revoked = {r.serial for r in store.revoked_unexpired(clock.now())}
        # The JWT keys other CAs on the store publish, read once per bundle sequence.
        self._shared_jwt: tuple[int | None, dict[str, JwtPublicKey]] = (None, {})
        self._jwt_published_at: float | None = None
        self._jwt_published: frozenset[str] = frozenset()  # the kids this CA put in the store
        self._jwt_overflow_warned: int | None = None  # the bundle sequence whose excess keys were logged

    def set_authority(self, authority: Authority) -> None:
        """Sign with ``authority`` from now on (after a key rotation); the next CRL is signed by it."""
        if authority.trust_domain != self.authority.trust_domain:
            raise ValueError("CA: a rotation cannot change the trust domain")
        with self._crl_lock:
            self.authority = authority
            self._crl = None

    def set_pq_authority(self, authority: Authority | None) -> None:
        """Sign ML-DSA keys with ``authority`` from now on (after the ML-DSA CA rotated, or was added)."""
        if authority is not None and authority.trust_domain != self.authority.trust_domain:
            raise ValueError("CA: the ML-DSA CA must be of the same trust domain")
        self.pq_authority = authority

    def authority_for(self, public_key: object) -> Authority:
        """The CA that signs an SVID over ``public_key``: the ML-DSA CA for an ML-DSA key (so the
        whole chain is post-quantum), the classical one for any other key.

        Raises:
            InvalidRequestError: an ML-DSA key, and this trust domain has no ML-DSA CA.
        """
        post_quantum = _x509.is_post_quantum_key(public_key)
        for candidate in (self.authority, self.pq_authority):
            if candidate is not None and candidate.post_quantum == post_quantum:
                return candidate
        if post_quantum:
            raise InvalidRequestError(
                "CSR: its key is ML-DSA-65, and this trust domain has no ML-DSA CA to sign it with a post-quantum "
                "chain; add one with `meshid ca key add --key-type ml-dsa-65`, or send a classical CSR"
            )
        return self.authority  # a post-quantum-only CA signs every key

    def set_jwt_keys(self, keys: JwtKeys) -> None:
        """Sign JWT-SVIDs with ``keys.signing`` from now on and publish all of ``keys`` (a store
        that fails is logged; the next ``publish_jwt_keys(if_due=True)`` tries again)."""
        self.jwt_keys = keys
        self._jwt_published_at = None
        try:
            self.publish_jwt_keys()
        except StoreError as err:
            log.warning("CA: cannot publish the JWT keys in the store yet: %s", err)

    def publish_jwt_keys(self, *, if_due: bool = False) -> bool:
        """Publish this CA's JWT keys in the store for every CA on it to carry in its bundle;
        with ``if_due``, only once a third of :data:`JWT_KEY_PUBLISHED_FOR` has passed since
        the last time. Returns whether the published set changed (the sequence then grew).

        Raises:
            StoreError: the store failed.
        """
        keys = self.jwt_keys
        now_m = self._clock.monotonic()
        last = self._jwt_published_at
        if keys is None or (if_due and last is not None and now_m - last < JWT_KEY_PUBLISHED_FOR.total_seconds() / 3):
            return False
        now = self._clock.now()
        rows = [
            (key.kid, public_key_der(key.public_key), now + JWT_KEY_PUBLISHED_FOR)
            for key in (keys.signing, keys.prepared)
            if key is not None
        ]
        rows += [(old.kid, public_key_der(old.public_key), old.retire_after) for old in keys.retiring]
        # A key this CA published and no longer holds (retired, or removed from jwt-keys.json by
        # hand after a compromise) leaves the store at once, not when its row would have expired.
        kids = frozenset(row[0] for row in rows)
        changed = self.store.publish_jwt_keys(rows, now, withdraw=sorted(self._jwt_published - kids))
        self._jwt_published, self._jwt_published_at = kids, now_m
        return changed

    def now(self) -> datetime.datetime:
        """The time on the CA's clock."""
        return self._clock.now()

    # --- workloads -------------------------------------------------------------------------

    def signer(
        self,
        public_key: object,
        now: datetime.datetime,
        *,
        capped: bool = True,
        authority: Authority | None = None,
        key_sha256: bytes | None = None,
    ) -> Signer:
        """Signs an entry's SVID over ``public_key`` at ``now`` (its TTL capped by the CA's
        maximum unless ``capped`` is False) with ``authority`` (default: the one signing when
        it is called); the result the store passes on is the chain. ``key_sha256``: the key's
        digest, when the caller has made it (see :meth:`Authority.sign_svid`)."""

        kind = PQ_SVID_TYPE if _x509.is_post_quantum_key(public_key) else "classical"

        def sign(entry: Entry) -> tuple[int, datetime.datetime, object]:
            if kind not in entry.svid_types:
                raise NotAuthorizedError(
                    f"issuance: the entry of {entry.spiffe_id} allows {' and '.join(entry.svid_types)} SVIDs, not "
                    f"{kind} ones; re-create it with `meshid entry create --svid-types` to ask for both"
                )
            ttl = min(entry.ttl, self.max_ttl) if capped else entry.ttl
            chain = (authority or self.authority_for(public_key)).sign_svid(
                entry.spiffe_id,
                public_key,  # type: ignore[arg-type]
                ttl=ttl,
                dns_names=entry.dns_names,
                now=now,
                key_sha256=key_sha256,
            )
            return chain[0].serial_number, chain[0].not_valid_after_utc, chain

        return sign

    def issue_with_token(self, token: str, csr_der: bytes) -> Issued:
        """First issuance: the token's entry gets an SVID for the CSR's key.

        Raises:
            InvalidRequestError: a bad CSR (checked first: nothing is consumed for it).
            TokenError: unknown, used or expired token.
        """
        if not isinstance(token, str) or not token or len(token) > 512:
            raise TokenError("join token: missing or malformed")
        csr = parse_csr(csr_der, max_bytes=self._max_csr_bytes)
        self.authority_for(csr.public_key)  # an ML-DSA CSR without an ML-DSA CA: refused before the token is used
        now = self._clock.now()
        entry, chain = self.store.issue_with_token(token_hash(token), now, self.signer(csr.public_key, now))
        return Issued(entry.spiffe_id, chain, self.bundle(), now)  # type: ignore[arg-type]

    def renew(
        self,
        caller: SpiffeId,
        csr_der: bytes,
        requested: str = "",
        caller_serial: int | None = None,
        caller_key: bytes | None = None,
    ) -> Issued:
        """Renewal for an authenticated caller: same SPIFFE ID, new key.

        ``caller_serial`` is the serial of the SVID the caller authenticated with. It is
        checked against the store before and after signing: a revocation that lands while
        the renewal runs (or on another CA replica) revokes the new SVID too. ``caller_key`` is
        that SVID's public key (DER SubjectPublicKeyInfo): a renewal must bring a new key, so
        a key that might have leaked is not carried into the next certificate.

        Raises:
            InvalidRequestError: a bad CSR.
            NotAuthorizedError: asks for another SPIFFE ID, the caller has no entry any more, its
                entry is served by a node agent (only that agent obtains its SVIDs), the caller
                is a node agent (it renews with ``Agent/RenewAgent``), or its SVID was revoked.
        """
        if is_agent_id(caller):
            raise NotAuthorizedError(f"renewal: {caller} is a node agent; it renews with meshid.v1.Agent/RenewAgent")
        csr = parse_csr(csr_der, max_bytes=self._max_csr_bytes)
        key_der = public_key_der(csr.public_key)  # compared here, hashed for the leaf's SKI
        if caller_key is not None and key_der == caller_key:
            raise InvalidRequestError(
                "renewal: the CSR reuses the key of the current SVID; make a new key for each renewal"
            )
        for asked in (requested, *csr.requested_uris):
            if asked and asked != str(caller):
                raise NotAuthorizedError(f"renewal: {caller} may renew only its own SPIFFE ID, not {asked[:200]}")
        if caller_serial is not None and caller_serial in self._revoked:
            raise NotAuthorizedError(f"renewal: the SVID {caller_serial:x} of {caller} is revoked")
        now = self._clock.now()
        authority = self.authority_for(csr.public_key)  # the chain and the bundle below are this key's
        try:
            # One read and one write; the revocation of the caller's SVID is checked in both
            # (one that lands while the CA signs is seen by the write: nothing is recorded).
            entry, chain, sequence = self.store.renew(
                caller,
                caller_serial,
                now,
                self.signer(csr.public_key, now, authority=authority, key_sha256=spki_sha256(key_der)),
            )
        except NotFoundError as err:
            raise NotAuthorizedError(f"renewal: {caller} has no registration entry any more") from err
        return Issued(entry.spiffe_id, chain, self._bundle(authority, sequence), now)  # type: ignore[arg-type]

    def issue_internal(
        self, spiffe_id: SpiffeId, public_key: object, *, capped: bool = False
    ) -> tuple[x509.Certificate, ...]:
        """Sign for one of the CA's own entries (its server, the admin) and record it; with
        ``capped``, no longer than the CA's maximum TTL (the admin SVID obeys ``ca init --ttl``)."""
        now = self._clock.now()
        _, chain = self.store.record_issuance(spiffe_id, now, self.signer(public_key, now, capped=capped))
        return chain  # type: ignore[return-value]

    def bundle(self) -> TrustBundle:
        """The trust domain's bundle: the roots in force and the JWT keys published, with its sequence."""
        return self._bundle(self.authority, self.store.bundle_sequence())

    def _bundle(self, authority: Authority, sequence: int | None) -> TrustBundle:
        bundle = TrustBundle(authority.trust_domain, authority.roots, sequence)
        # This CA's own keys first (they sign what it issues), then the other replicas', as many
        # as a bundle holds: what the store publishes never makes the bundle itself fail.
        published: dict[str, JwtPublicKey] = dict(self.jwt_keys.published) if self.jwt_keys is not None else {}
        shared = self._shared_jwt_keys(sequence)
        for kid in shared:
            if len(published) >= MAX_JWT_KEYS:
                if self._jwt_overflow_warned != sequence:  # once per bundle sequence, not per issuance
                    self._jwt_overflow_warned = sequence
                    log.warning(
                        "CA: the store publishes more JWT keys than a bundle holds (%d); %d left out of the bundle",
                        MAX_JWT_KEYS,
                        len(set(shared) - set(published)),
                    )
                break
            published.setdefault(kid, shared[kid])
        return bundle.with_jwt_authorities(published) if published else bundle

    def _shared_jwt_keys(self, sequence: int | None) -> dict[str, JwtPublicKey]:
        """The JWT keys the store publishes (other replicas' too), read again when the bundle
        sequence moves (every change of them grows it). A key that does not load, or that a
        bundle may not carry (its kid or type), is left out, with a warning."""
        cached_sequence, cached = self._shared_jwt
        if sequence is not None and cached_sequence == sequence:
            return cached
        keys: dict[str, JwtPublicKey] = {}
        for kid, der in self.store.jwt_keys(self._clock.now()):
            try:
                key = serialization.load_der_public_key(der)
                if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                    raise TypeError(f"a {type(key).__name__} is not an EC or RSA key")
                JwtAuthorities([(kid, key)])  # the bundle's own checks: kid, curve, RSA size
            except (ValueError, TypeError, UnsupportedAlgorithm, InvalidBundleError) as err:
                log.warning("CA: leaving JWT key %r the store publishes out of the bundle: %s", kid[:64], err)
                continue
            keys[kid] = key
        self._shared_jwt = (sequence, keys)
        return keys

    def new_jwt_svid(
        self, caller: SpiffeId, audience: Sequence[str], requested: str = "", caller_serial: int | None = None
    ) -> JwtSvid:
        """A JWT-SVID for the caller's own SPIFFE ID (authenticated by its X509-SVID).

        Raises:
            InvalidRequestError: a bad audience.
            NotAuthorizedError: asks for another SPIFFE ID, the caller is a node agent or the
                CA's own, has no entry any more, its entry is served by a node agent, or its
                SVID was revoked.
            IssuanceError: this CA has no JWT signing key (FAILED_PRECONDITION).
        """
        what = "JWT-SVID"
        if requested and requested != str(caller):
            raise NotAuthorizedError(f"{what}: {caller} may ask only for its own SPIFFE ID, not {requested[:200]}")
        chosen = check_audience(audience, what)
        if is_agent_id(caller) or (caller.path + "/").startswith(RESERVED_PREFIX):
            raise NotAuthorizedError(
                f"{what}: {caller} is reserved for meshid itself; node agents ask with meshid.v1.Agent/BatchNewJwtSvid"
            )
        if caller_serial is not None and self.is_revoked(caller_serial):
            raise NotAuthorizedError(f"{what}: the SVID {caller_serial:x} of {caller} is revoked")
        entry = self.store.get_entry(caller)
        if entry is None:
            raise NotAuthorizedError(f"{what}: {caller} has no registration entry any more")
        if entry.parent_id is not None:
            raise NotAuthorizedError(f"{what}: {caller} is served by node agent {entry.parent_id}; ask it instead")
        return self.sign_jwt_svid(entry, chosen)

    def sign_jwt_svid(self, entry: Entry, audience: Sequence[str]) -> JwtSvid:
        """Sign a JWT-SVID for ``entry`` (its audience already checked): no authorization here.

        Raises:
            IssuanceError: this CA has no JWT signing key (FAILED_PRECONDITION).
        """
        keys = self.jwt_keys
        if keys is None:
            raise IssuanceError("JWT-SVID: this CA has no JWT signing key; restart `meshid ca serve`")
        lifetime = min(JWT_SVID_TTL, entry.ttl, self.max_ttl)
        now = self._clock.now().replace(microsecond=0)
        return keys.sign(entry.spiffe_id, audience, lifetime=lifetime, now=now)

    def crl(self) -> tuple[bytes, int]:
        """The current signed CRL (DER) and its number; rebuilt after a revocation or half-way to next update."""
        now = self._clock.now()
        with self._crl_lock:
            # Read from the store each time: another replica on the same database may have
            # revoked something; the CRL is rebuilt (with the next number) when the list differs.
            revoked = self.store.revoked_unexpired(now)
            listed = frozenset(r.serial for r in revoked)
            cached = self._crl
            if cached is None or cached[3] != listed or now - cached[2] > datetime.timedelta(minutes=30):
                number = self.store.next_crl_number()
                der = build_crl(self.authority, revoked, number=number, now=now)
                cached = self._crl = (der, number, now, listed)
            return cached[0], cached[1]

    def is_revoked(self, serial: int | None) -> bool:
        """Whether ``serial`` is revoked, by this process or any other on the same store."""
        if serial is None:
            return False
        if serial in self._revoked:
            return True
        try:
            record = self.store.get_issued(serial)
        except StoreError:
            # The store is down: what this process knows still holds, and every call that
            # issues anything fails on the store anyway (UNAVAILABLE).
            return False
        if record is not None and record.revoked_at is not None:
            self._revoked.add(serial)
            return True
        return False

    # --- admins ----------------------------------------------------------------------------

    def _own(self, text: str, what: str, *, reserved: bool = False) -> SpiffeId:
        """``text`` as a SPIFFE ID an SVID of this CA may carry: of its trust domain, with a path,
        and (unless ``reserved``: the CA's own, the admin's, node agents') not reserved for the CA."""
        try:
            sid = SpiffeId.parse(text)
        except (InvalidSpiffeIdError, TypeError) as err:
            raise InvalidRequestError(f"{what}: {err}") from err
        if not sid.is_member_of(self.authority.trust_domain):
            raise InvalidRequestError(f"{what}: {sid} is not in this CA's trust domain {self.authority.trust_domain}")
        if not sid.path:
            raise InvalidRequestError(f"{what}: {sid} has no path; an SVID must name a workload")
        if not reserved and (sid.path + "/").startswith(RESERVED_PREFIX):
            raise NotAuthorizedError(f"{what}: {sid} is reserved for the CA itself")
        return sid

    def agent(self, text: str, what: str) -> SpiffeId:
        """A node agent's ID of this trust domain, from ``text``.

        Raises:
            InvalidRequestError: not a SPIFFE ID, of another trust domain, or not a node agent's.
        """
        try:
            sid = SpiffeId.parse(text)
        except (InvalidSpiffeIdError, TypeError) as err:
            raise InvalidRequestError(f"{what}: {err}") from err
        if not sid.is_member_of(self.authority.trust_domain) or not is_agent_id(sid):
            raise InvalidRequestError(
                f"{what}: {sid} is not a node agent of this CA; a node agent's ID is "
                f"spiffe://{self.authority.trust_domain}{AGENT_PREFIX}<name>"
            )
        return sid

    def create_entry(
        self,
        admin: str,
        spiffe_id: str,
        dns_names: Sequence[str] = (),
        ttl: datetime.timedelta | None = None,
        *,
        parent_id: str = "",
        selectors: Sequence[str] = (),
        svid_types: Sequence[str] = (),
    ) -> Entry:
        """Register a SPIFFE ID. The TTL defaults to 1 hour and is capped by the CA's maximum.

        ``svid_types`` says which SVIDs its workload may hold: ``classical`` and/or ``ml-dsa-65``
        (none given: classical only, as before). An ``ml-dsa-65`` entry needs the trust domain's
        ML-DSA CA (``meshid ca key add``). An ML-DSA-only entry can be issued with a join token
        but not renewed (the renewal's mTLS runs on grpcio, which cannot present ML-DSA).

        With ``parent_id`` (a node agent of this trust domain, which need not have attested
        yet) the entry is served only by that agent, to local processes matching every one of
        ``selectors`` (at least one; see :mod:`meshid.ca.selectors`).

        Raises:
            InvalidRequestError: a malformed ID, DNS name, parent or selector; selectors
                without a parent, or a parent without selectors.
            NotAuthorizedError: the ID is reserved for the CA.
        """
        sid = self._own(spiffe_id, "registration entry")
        if len(dns_names) > MAX_DNS_NAMES:
            raise InvalidRequestError(f"registration entry: at most {MAX_DNS_NAMES} DNS names")
        names = [self._dns_name(name) for name in dns_names]
        parent = self.agent(parent_id, "registration entry: parent_id") if parent_id else None
        chosen = tuple(str(s) for s in parse_selectors(selectors))
        if chosen and parent is None:
            raise InvalidRequestError(
                "registration entry: selectors need a parent_id (the node agent that matches them); "
                "an entry without a parent is obtained with a join token"
            )
        if parent is not None and not chosen:
            raise InvalidRequestError(
                "registration entry: an entry with a parent_id needs at least one selector, or every process on "
                f"{parent}'s node would match it"
            )
        types = self._svid_types(svid_types)
        if parent is not None and types != ("classical",):
            raise InvalidRequestError(
                "registration entry: an entry with a parent_id is served by its node agent, which serves classical "
                "SVIDs only; give it no --svid-types"
            )
        ttl = DEFAULT_TTL if ttl is None or ttl <= datetime.timedelta(0) else ttl
        self._limits.take(admin, "registration entries")
        created = self._clock.now().replace(microsecond=0)
        entry = Entry(sid, tuple(dict.fromkeys(names)), min(ttl, self.max_ttl), created, parent, chosen, types)
        self.store.create_entry(entry)
        return entry

    def _svid_types(self, given: Sequence[str]) -> tuple[str, ...]:
        if isinstance(given, str) or len(given) > len(SVID_TYPES):
            raise InvalidRequestError(f"registration entry: svid_types is a list of at most {len(SVID_TYPES)} names")
        unknown = [t for t in given if t not in SVID_TYPES]
        if unknown:
            raise InvalidRequestError(
                f"registration entry: SVID type {str(unknown[0])[:40]!r} is unknown; use {' and/or '.join(SVID_TYPES)}"
            )
        types = tuple(t for t in SVID_TYPES if t in given) or ("classical",)  # in one order, without repeats
        if PQ_SVID_TYPE in types and self.pq_authority is None and not self.authority.post_quantum:
            raise InvalidRequestError(
                "registration entry: SVID type ml-dsa-65 needs the trust domain's ML-DSA CA; add one with "
                "`meshid ca key add --key-type ml-dsa-65`"
            )
        return types

    def _dns_name(self, name: str) -> str:
        lowered = name.lower()
        if not _DNS.fullmatch(lowered):
            raise InvalidRequestError(f"registration entry: DNS name {name[:100]!r} is not a valid host name")
        if lowered.rsplit(".", 1)[-1].isdigit():  # RFC 3696 2: no top-level domain is all digits
            raise InvalidRequestError(
                f"registration entry: DNS name {lowered!r} looks like an IP address, not a host name; "
                "a DNS SAN holds host names only"
            )
        if lowered == IDENTITY_DNS_ZONE or lowered.endswith("." + IDENTITY_DNS_ZONE):
            raise InvalidRequestError(f"registration entry: DNS names under {IDENTITY_DNS_ZONE} are reserved")
        if not self.authority.permits_dns_name(lowered):  # its SVIDs would verify nowhere
            permitted = ", ".join(self.authority.dns_suffixes or ()) or "none"
            raise InvalidRequestError(
                f"registration entry: DNS name {lowered!r} is outside the DNS suffixes this CA's certificate "
                f"permits ({permitted}); list its suffix with `meshid ca init --dns-suffix` (an existing CA: "
                "add it to dns_suffixes in config.json, then rotate the CA)"
            )
        return lowered

    def delete_entry(self, spiffe_id: str) -> None:
        sid = self._own(spiffe_id, "registration entry")
        if not self.store.delete_entry(sid):
            raise NotFoundError(f"registration entry: none for {sid}")

    def list_entries(self) -> list[Entry]:
        return self.store.list_entries()

    def create_token(
        self, admin: str, spiffe_id: str, ttl: datetime.timedelta | None = None
    ) -> tuple[str, datetime.datetime]:
        """A one-time join token: ``<trust domain>:<secret>``. Only its hash is stored.

        For an entry without a parent, a workload's first issuance; for a node agent's ID
        (``/meshid/agent/<name>``, no entry needed), that agent's node attestation.

        Raises:
            InvalidRequestError: a malformed ID.
            NotAuthorizedError: another ID reserved for the CA, or an entry with a parent.
            NotFoundError: no entry for the ID.
        """
        try:
            asked = SpiffeId.parse(spiffe_id)
        except (InvalidSpiffeIdError, TypeError) as err:
            raise InvalidRequestError(f"join token: {err}") from err
        agent = asked.is_member_of(self.authority.trust_domain) and is_agent_id(asked)
        sid = asked if agent else self._own(spiffe_id, "join token")
        if not agent:
            entry = self.store.get_entry(sid)
            if entry is not None and entry.parent_id is not None:
                raise NotAuthorizedError(
                    f"join token: {sid} is served by node agent {entry.parent_id}; its SVIDs go only to that agent, "
                    "never for a join token"
                )
        ttl = DEFAULT_TOKEN_TTL if ttl is None or ttl <= datetime.timedelta(0) else min(ttl, MAX_TOKEN_TTL)
        self._limits.take(admin, "join tokens")
        token = f"{self.authority.trust_domain.name}:{secrets.token_urlsafe(32)}"
        expires_at = self._clock.now().replace(microsecond=0) + ttl
        if agent:
            self.store.add_agent_token(token_hash(token), sid, expires_at)
        else:
            self.store.add_token(token_hash(token), sid, expires_at)
        return token, expires_at

    def revoke(self, *, serial: str = "", spiffe_id: str = "") -> list[int]:
        """Revoke one serial (hex) or every unexpired SVID of a SPIFFE ID; the next CRL lists them."""
        now = self._clock.now()
        if serial:
            try:
                number = int(serial, 16)
            except ValueError as err:
                raise InvalidRequestError(f"revocation: serial {serial[:80]!r} is not hexadecimal") from err
            if not self.store.revoke_serial(number, now):
                raise NotFoundError(f"revocation: no certificate with serial {serial[:80]} was issued here")
            revoked = [number]
        elif spiffe_id:
            # an ID no SVID of this CA can carry is a mistake to say so, not "nothing to revoke";
            # a node agent's and the admin's may be revoked too
            sid = self._own(spiffe_id, "revocation", reserved=True)
            revoked = self.store.revoke_spiffe_id(sid, now)
        else:
            raise InvalidRequestError("revocation: give a serial or a SPIFFE ID")
        self.note_revoked(revoked)
        return revoked

    def note_revoked(self, serials: Sequence[int]) -> None:
        """Serials this process has just revoked in the store: refused at once, listed by the next CRL."""
        self._revoked.update(serials)
        with self._crl_lock:
            self._crl = None


def parse_token_trust_domain(token: str) -> str:
    """The trust domain a join token belongs to (the part before the last ':')."""
    td, sep, secret = token.rpartition(":")
    if not sep or not td or not secret:
        raise TokenError("join token: malformed; expected '<trust domain>:<secret>' as `meshid token create` prints it")
    return td
