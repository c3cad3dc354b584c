"""The decision path shared by the sync and aio interceptors: who is calling, may they, and
which status code a refusal gets. No grpc I/O happens here; the interceptors adapt it.

Who is calling: the TLS client certificate, unless the policy accepts JWT-SVIDs
(``identity_sources`` lists ``jwt``) and the call carries ``authorization: Bearer <token>``:
then the token decides, whether or not the connection also has a certificate (behind a hop
that terminates the client's TLS, the certificate is the hop's). A bad token is refused with
UNAUTHENTICATED and its reason; it never falls back to the certificate. A policy that accepts
only ``jwt`` refuses a call without a token. A token is accepted only over TLS or a Unix
socket (the JWT-SVID standard §7.3: whoever saw it on a plaintext link could replay it). Under
the default policy (``x509`` only) the ``authorization`` header is never read.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc

from meshid._background import FileStamp, Worker, file_stamp
from meshid._cache import BoundedCache
from meshid._candidate import CandidatePolicy
from meshid.authz import audit, dryrun
from meshid.authz.grpc_json import collect_headers
from meshid.authz.model import Decision
from meshid.authz.policy import AuthorizationPolicy
from meshid.bundle import BundleSet, TrustBundle
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import InvalidJwtSvidError, MeshIdError, VerificationError
from meshid.forwarded import XFCC_HEADER, ForwardedIdentities
from meshid.peer import JwtVerifier, PeerIdentity, PeerVerifier
from meshid.sources import Source
from meshid.spiffeid import SpiffeId, TrustDomain

log = logging.getLogger("meshid.authz")

#: Decisions remembered per (peer certificate, implemented method) before the memo starts over.
MEMO_SIZE = 65536
MEMO_BYTES = 16 << 20


PolicyInput = AuthorizationPolicy | str | os.PathLike[str]
#: A call's metadata, or a function that fetches it (only called if a policy or proxy needs it).
Metadata = Iterable[tuple[str, str | bytes]] | Callable[[], Iterable[tuple[str, str | bytes]] | None] | None


def _materialize(metadata: Metadata) -> Iterable[tuple[str, str | bytes]] | None:
    return metadata() if callable(metadata) else metadata


# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive (RFC 9110 §11.1).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S*)\Z")


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's ``authorization: Bearer`` header; None without one (or with
    another scheme, which is not a JWT-SVID).

    Raises:
        InvalidJwtSvidError: more than one ``authorization`` header, or a Bearer one with no token.
    """
    found = None
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if found is not None:
            raise InvalidJwtSvidError("JWT-SVID: more than one 'authorization' header; send one bearer token")
        found = value if isinstance(value, str) else value.decode("latin-1")
    if found is None:
        return None
    match = _BEARER.match(found)
    if match is None:
        return None
    if not match.group(1):
        raise InvalidJwtSvidError("JWT-SVID: 'authorization: Bearer' carries no token")
    return match.group(1)


def _over_unix_socket(peer_address: str | Callable[[], str] | None) -> bool:
    """Whether the call came over a Unix domain socket (grpc names such a peer ``unix:...``)."""
    address = peer_address() if callable(peer_address) else peer_address
    return isinstance(address, str) and address.startswith("unix:")


TrustInput = Source | BundleSet | TrustBundle


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call refused: the status code and the message the caller sees."""

    code: grpc.StatusCode
    message: str


def _bundles_getter(trust: TrustInput) -> Callable[[], BundleSet]:
    if isinstance(trust, BundleSet):
        return lambda: trust
    if isinstance(trust, TrustBundle):
        fixed = BundleSet.of(trust)
        return lambda: fixed
    if isinstance(trust, Source):
        return trust.get_bundles
    raise TypeError(f"source must be an identity source, BundleSet or TrustBundle, not {type(trust).__name__}")


def _load(policy: PolicyInput) -> tuple[AuthorizationPolicy, str | None]:
    if isinstance(policy, AuthorizationPolicy):
        return policy, None
    if isinstance(policy, str | os.PathLike):
        return AuthorizationPolicy.load(policy), os.fspath(policy)
    raise TypeError(f"policy must be an AuthorizationPolicy or a path, not {type(policy).__name__}")


#: A memoised decision: the peer, the enforced decision, its audit record, the dry-run record
#: when a candidate policy decides the call otherwise (else None), and the peer certificate's
#: expiry as a POSIX timestamp (compared with a float on the per-call path).
MemoEntry = tuple[PeerIdentity, Decision, audit.Prepared, audit.Prepared | None, float]

#: The auth context properties a verdict depends on besides the certificate (see PeerVerifier.identify).
_TLS_VERSION, _KEX_GROUP = "ssl_tls_version", "ssl_negotiated_key_exchange_group"
#: The names of what a connection key holds (certificate, TLS version, key exchange group) in
#: grpc's auth context mapping, and as its C accessor gives them (the sync interceptor's).
STR_KEY_NAMES = ("x509_pem_cert", _TLS_VERSION, _KEX_GROUP)
RAW_KEY_NAMES = (b"x509_pem_cert", _TLS_VERSION.encode(), _KEX_GROUP.encode())


def _connection_key(
    pem: bytes, tls_version: Sequence[bytes], kex_group: Sequence[bytes], method: str
) -> tuple[object, ...]:
    """What a direct peer's decision is filed under: what its connection presents (its
    certificate, TLS version and key exchange group, as grpc's auth context lists them), and
    the method."""
    return (pem, *tls_version, *kex_group, method)


def _str_connection_key(pem: bytes, auth_context: Mapping[str, Sequence[bytes]], method: str) -> tuple[object, ...]:
    return _connection_key(pem, auth_context.get(_TLS_VERSION, ()), auth_context.get(_KEX_GROUP, ()), method)


class _Memo:
    """Decisions memoised for one policy (and candidate), local trust domain, bundle set and
    epoch of the authorizer (see :meth:`Authorizer._stale`).

    A peer that called directly is filed under what its connection presents (certificate, TLS
    version, key exchange group) and the method, so a repeat call is decided by one lookup,
    without verifying or even reading the certificate again; a peer forwarded by a proxy, or
    any peer under a policy that accepts JWT-SVIDs (where a token may decide instead), under
    its identity object (the identity caches hand out one per certificate or token).
    """

    __slots__ = ("bundles", "cache", "candidate", "epoch", "local", "policy")

    def __init__(
        self,
        policy: AuthorizationPolicy | None,
        local: TrustDomain | None,
        epoch: int,
        candidate: AuthorizationPolicy | None = None,
        bundles: BundleSet | None = None,
    ):
        self.policy, self.local, self.epoch = policy, local, epoch
        self.candidate, self.bundles = candidate, bundles
        self.cache: BoundedCache[tuple[object, ...], MemoEntry] = BoundedCache(
            max_entries=MEMO_SIZE, max_bytes=MEMO_BYTES
        )


def _forget_own_td(authorizer: Authorizer) -> Callable[[], None]:
    """A source subscriber that does not keep ``authorizer`` alive (a source may outlive many)."""
    ref = weakref.ref(authorizer)

    def changed() -> None:
        target = ref()
        if target is not None:
            target.source_changed()

    return changed


class Authorizer:
    """Holds the current policy and decides calls; the one place status codes are chosen."""

    def __init__(
        self,
        policy: PolicyInput,
        *,
        source: TrustInput,
        poll_interval: float = 2.0,
        unauthenticated_methods: Iterable[str] = (),
        trusted_proxies: Iterable[SpiffeId | str] = (),
        forwarded_header: str = XFCC_HEADER,
        clock: Clock = SYSTEM_CLOCK,
        candidate: PolicyInput | None = None,
    ) -> None:
        self._policy, self._path = _load(policy)
        # What the memo depends on besides the bundle set, each call compares as one number: it
        # moves on (_stale) when the policy or the candidate is replaced, when the source changes
        # (the own trust domain) and when an identity cache starts over (the memo's entries hold
        # its identities).
        self._epochs = itertools.count(1)
        self._epoch = 0
        self.candidate = CandidatePolicy(candidate, on_change=self._stale)
        self._started = False
        self._clock = clock
        # The memo's expiry check compares floats: the system clock's time.time(), or an
        # injected clock's now() (tests move it), converted.
        self._now_ts: Callable[[], float] = time.time if clock is SYSTEM_CLOCK else lambda: clock.now().timestamp()
        self._open_methods = frozenset(unauthenticated_methods)
        if any(not isinstance(m, str) or not m.startswith("/") for m in self._open_methods):
            raise ValueError("unauthenticated_methods must be full method names such as '/pkg.Service/Method'")
        bundles = _bundles_getter(source)
        self._bundles = bundles
        # Decided once: a runtime Protocol isinstance costs microseconds, too much per call.
        self._source: Source | None = source if isinstance(source, Source) else None
        self._verifier = PeerVerifier(bundles, clock=clock, on_clear=self._stale)
        proxies = list(trusted_proxies)
        self._forwarded = (
            ForwardedIdentities(proxies, bundles, header=forwarded_header, on_clear=self._stale) if proxies else None
        )
        self._poll_interval = poll_interval
        self._stamp = self._file_stamp()
        self._reload_lock = threading.Lock()
        self._worker = Worker("meshid-policy-watch", self._watch)
        self.revoked: Callable[[PeerIdentity], bool] | None = None
        self.audit_writer = audit.AuditWriter()
        self._jwt = JwtVerifier(bundles, clock=clock, on_clear=self._stale)
        self._memo = _Memo(None, None, -1)  # no call's epoch: never current
        self._own_td_set: tuple[TrustDomain | None, frozenset[TrustDomain]] | None = None
        # The server's own trust domain and SPIFFE ID as _own() read them from the source; None
        # until read, and again after each change of the source (read then, not per call).
        self._own_kept: tuple[TrustDomain | None, frozenset[str] | None] | None = None
        # Moved on by every change of the source, under the lock that also keeps a read: a read
        # the change overtook answers its own call but is not kept (see _own).
        self._own_generation = 0
        self._own_lock = threading.Lock()
        if self._source is None:
            fixed = bundles()
            self._own_kept = (next(iter(fixed)) if len(fixed) == 1 else None), None
            self._unsubscribe: Callable[[], None] | None = None
        else:
            # for the interceptor's lifetime (it decides calls after close() too); held weakly
            self._unsubscribe = self._source.subscribe(_forget_own_td(self))

    @property
    def policy(self) -> AuthorizationPolicy:
        return self._policy

    def _file_stamp(self) -> FileStamp | None:
        return file_stamp(self._path) if self._path is not None else None

    def reload(self, policy: PolicyInput | None = None) -> bool:
        """Swap in a new policy atomically; with no argument, re-read the policy file.

        A policy that fails to load leaves the current one in force; the error is logged and
        re-raised for a direct call with an argument. Returns True when a new policy took effect.
        """
        # One reload at a time: a slow load of an older file must never finish after (and so
        # replace) the load of a newer one, leaving the older policy in force under the newer
        # file's stamp, where the watcher would never look again.
        with self._reload_lock:
            if policy is None:
                if self._path is None:
                    raise ValueError("reload() without a policy needs an interceptor built from a policy file")
                # The stamp is taken before the read: a change made during the load is seen
                # by the next poll, never lost.
                stamp = self._file_stamp()
                try:
                    new, _ = _load(self._path)
                except MeshIdError as err:
                    self._stamp = stamp  # a broken file is reported once, not at every poll
                    log.error("policy: keeping policy %r in force: %s", self._policy.name, err)
                    return False
                self._stamp = stamp
            else:
                stamp = file_stamp(policy) if isinstance(policy, str | os.PathLike) else None
                try:
                    new, path = _load(policy)
                except MeshIdError as err:
                    log.error("policy: keeping policy %r in force: %s", self._policy.name, err)
                    raise
                if path is not None:
                    self._path, self._stamp = path, stamp
            self._policy = new
            self._stale()  # after the swap: a call that reads the new epoch reads the new policy
        log.info("policy: now enforcing %r (%d rules) from %s", new.name, len(new.rules), new.origin)
        return True

    def start(self) -> None:
        """Start the audit writer, and the policy file's watcher for a policy read from a file."""
        self.audit_writer.start()
        self._started = True
        if self._path is not None or self.candidate.path is not None:
            self._worker.start()

    def reload_candidate(self, candidate: PolicyInput | None = None) -> bool:
        """Swap in a new candidate policy (or re-read its file); see :class:`CandidatePolicy`."""
        took = self.candidate.reload(candidate)
        if self._started and self.candidate.path is not None:
            self._worker.start()  # a candidate file given after start() is watched too
        return took

    def close(self) -> None:
        self._started = False
        self._worker.close()
        self.audit_writer.close()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self._poll_interval):
            if self._file_stamp() != self._stamp:
                try:
                    self.reload()
                except Exception:  # the watch must survive anything a bad file can do
                    log.exception("policy: keeping policy %r in force", self._policy.name)
            if self.candidate.changed():
                try:
                    self.candidate.reload()
                except Exception:  # nor can a bad candidate stop it
                    log.exception("policy: dry run: keeping the previous candidate")

    def _stale(self) -> None:
        """Make the memo stale: what it was built on (the policy, the candidate, the own trust
        domain, an identity cache) changed. Called after the change, so a call that reads the new
        epoch sees what changed; a call that read the epoch before files nothing (see
        :meth:`_memo_decide`)."""
        self._epoch = next(self._epochs)

    def _memo_decide(
        self,
        policy: AuthorizationPolicy,
        identity: PeerIdentity,
        method: str,
        local: TrustDomain | None,
        candidate: AuthorizationPolicy | None,
        bundles: BundleSet,
        key: tuple[object, ...],
        epoch: int,
    ) -> MemoEntry:
        # The memo belongs to one policy, one local trust domain (the scope of subject and DNS
        # rules), one bundle set and one epoch, so no call files a decision under another
        # policy, trust domain or set of roots, and no entry keeps an identity an identity
        # cache has already dropped. ``epoch`` and ``bundles`` were read before the peer was
        # verified: a change meanwhile (a new epoch, a bundle set replaced) makes this call
        # decide without filing, never files a verdict under the new state. Each entry keeps
        # its audit record, built once, and the candidate policy's decision (a dry run), as a
        # record only where it differs.
        current = self._memo
        memo: _Memo | None = current
        if (
            current.epoch != epoch
            or current.policy is not policy
            or current.candidate is not candidate
            or current.local is not local
            or current.bundles is not bundles
        ):
            memo = None  # a change during this call: decided, not filed
            if epoch == self._epoch:
                memo = self._memo = _Memo(policy, local, epoch, candidate, bundles)
        hit = memo.cache.get(key) if memo is not None else None
        if hit is not None and hit[0] is identity:
            return hit
        decision = policy.decide(identity, method, local_trust_domain=local)
        dry = None
        if candidate is not None:
            decided = candidate.decide(identity, method, local_trust_domain=local)
            dry = dryrun.prepare(policy, candidate, decision, decided, method, identity)
        prepared = audit.prepare(policy, decision, method, identity)
        entry = (identity, decision, prepared, dry, identity.not_after.timestamp())
        if memo is not None:
            memo.cache.put(key, entry, 1024 + len(method))
        return entry

    def repeat_call(
        self,
        auth_get: Callable[[Any, Any], Any],
        names: tuple[Any, Any, Any],
        method: str,
        peer_address: str | Callable[[], str | bytes] | None,
    ) -> PeerIdentity | Refusal | None:
        """A known method's repeat call of a direct peer decided from the memo, or None to take
        the full path, :meth:`authorize`. The interceptors' fast path: it needs neither the
        call's metadata nor :meth:`authorize`'s checks, which no call found here could fail.

        ``auth_get`` is the ``get`` of the call's auth context as the interceptor has it, and
        ``names`` its names of the certificate, TLS version and key exchange group:
        :data:`STR_KEY_NAMES` for grpc's mapping, :data:`RAW_KEY_NAMES` for its C accessor's
        (keys still bytes; the sync interceptor skips building the mapping).

        Only what can change between two calls on one connection is looked at again: whether
        the memo is still current (the bundle set is compared, as the source gives it now; the
        rest is the epoch, which a new policy or candidate moves on), the certificate's expiry
        and its revocation. Anything else (an expired or revoked peer, a new policy or bundle
        set) falls through to the full path, which refuses and records it. Only direct peers
        under a policy that takes no JWT-SVIDs are filed under a connection key, and never for
        an unauthenticated method, so a key found here needs no more checks of its own.
        """
        pem, tls_version, kex_group = names
        pems = auth_get(pem, None)
        if not pems:
            return None
        memo = self._memo
        if memo.epoch != self._epoch or memo.bundles is not self._bundles():
            return None
        # the key as _connection_key makes it, written out: a frame fewer on every call
        hit = memo.cache.get((pems[0], *auth_get(tls_version, ()), *auth_get(kex_group, ()), method))
        if hit is None or self._now_ts() > hit[4]:
            return None
        identity, decision, prepared, dry, _ = hit
        if self.revoked is not None and self.revoked(identity):
            return None
        # audit.emit written out: a call whose decision no logger wants (an allow with the audit
        # log at WARNING) is counted without a frame in another module, which costs microseconds
        next(prepared.counter)
        logged = prepared.fields is not None and prepared.logger.isEnabledFor(prepared.level)
        if logged or prepared.grpc_entry is not None:
            audit.hand_off(prepared, peer_address, self.audit_writer, logged)
        if dry is not None:
            audit.emit(dry, peer_address, self.audit_writer)
        return identity if decision.allowed else _denied(identity, decision, method, True)

    def _non_spiffe_from(self, policy: AuthorizationPolicy) -> frozenset[TrustDomain] | None:
        """Whose bundles may vouch for a certificate without a SPIFFE ID under ``policy``."""
        if not policy.allow_non_spiffe_peers:
            return None
        if policy.non_spiffe_trust_domains:
            return policy.non_spiffe_trust_domains
        own = self._own()[0]
        cached = self._own_td_set
        if cached is None or cached[0] != own:
            cached = self._own_td_set = (own, frozenset() if own is None else frozenset({own}))
        return cached[1]

    def _own(self) -> tuple[TrustDomain | None, frozenset[str] | None]:
        """The server's own trust domain and, as a JWT-SVID audience, SPIFFE ID; (None, None)
        while the source has no SVID. Read from the source after each change, not per call."""
        kept = self._own_kept
        if kept is not None:
            return kept
        assert self._source is not None, "a fixed bundle set's trust domain is known from the start"
        generation = self._own_generation
        try:
            own_id = self._source.get_svid().spiffe_id
        except MeshIdError:  # no SVID yet: asked again at the next call, until the source has one
            return None, None
        read = own_id.trust_domain, frozenset({str(own_id)})
        with self._own_lock:
            # A change since ``generation`` was read may have come after get_svid(): then what it
            # gave answers this call but is not kept (the next call reads again); kept, it would
            # undo the change's reset and stand until the source changed once more.
            if generation == self._own_generation:
                self._own_kept = read
        return read

    def _audiences(self, policy: AuthorizationPolicy) -> frozenset[str] | None:
        """What a JWT-SVID's aud must name: the policy's jwt_audiences, else this server's SPIFFE ID."""
        if policy.jwt_audiences:
            return policy.jwt_audiences
        return self._own()[1]

    def _jwt_identity(
        self,
        policy: AuthorizationPolicy,
        token: str,
        auth_context: Mapping[str, Sequence[bytes]],
        peer_address: str | Callable[[], str] | None,
    ) -> PeerIdentity:
        """The caller named by a bearer token.

        Raises:
            InvalidJwtSvidError: the token is refused, came over neither TLS nor a Unix socket,
                or this server knows no audience to accept.
        """
        if not auth_context.get(_TLS_VERSION) and not _over_unix_socket(peer_address):
            # The JWT-SVID standard §7.3: every link a bearer token crosses keeps it confidential
            # (a Unix socket between two processes of one host is its exception).
            raise InvalidJwtSvidError(
                "JWT-SVID: sent over a connection without TLS; whoever saw it could replay it, so a token is "
                "accepted only over TLS (or a Unix socket)"
            )
        audiences = self._audiences(policy)
        if audiences is None:
            raise InvalidJwtSvidError(
                "JWT-SVID: this server has no SPIFFE ID of its own to be the token's audience; "
                "list the audiences it accepts in the policy's jwt_audiences"
            )
        return self._jwt.identify(token, audiences, auth_context)

    def source_changed(self) -> None:
        """The source's SVID may have changed: read its trust domain again at the next call."""
        with self._own_lock:
            self._own_generation += 1
            self._own_kept = None  # before the epoch moves: a memo of the new epoch reads it again
        self._stale()

    def _open_call(
        self,
        policy: AuthorizationPolicy,
        auth_context: Mapping[str, Sequence[bytes]],
        metadata: Metadata,
        method: str,
        peer_address: str | Callable[[], str] | None,
        known: bool,
    ) -> PeerIdentity | None:
        # Open to every caller; a peer that does verify (by a token the policy accepts, else
        # by its certificate) is still named to the handler.
        identity: PeerIdentity | None = None
        if policy.accepts_jwt:
            try:
                token = bearer_token(_materialize(metadata))
                if token is not None:
                    identity = self._jwt_identity(policy, token, auth_context, peer_address)
            except InvalidJwtSvidError:
                identity = None
        if identity is None:
            try:
                identity = self._verifier.identify(auth_context, non_spiffe_from=self._non_spiffe_from(policy))
            except VerificationError:
                identity = None
            if identity is not None and self.revoked is not None and self.revoked(identity):
                identity = None
            if identity is not None and self._forwarded is not None and self._forwarded.from_proxy(identity):
                # as on every other method: the caller is the client the proxy forwards, never the proxy
                try:
                    now = self._clock.now().timestamp()
                    identity = self._forwarded.identify(_materialize(metadata), identity, now)
                except VerificationError:
                    identity = None
                if identity is not None and self.revoked is not None and self.revoked(identity):
                    identity = None
        opened = Decision(True, None, audit.OPEN)
        self._record(policy, opened, method, identity, peer_address=peer_address, known=known)
        return identity

    def _record(
        self,
        policy: AuthorizationPolicy,
        decision: Decision,
        method: str,
        peer: PeerIdentity | None,
        *,
        peer_address: str | Callable[[], str] | None = None,
        error: str | None = None,
        known: bool,
    ) -> None:
        audit.record(
            policy,
            decision,
            method,
            peer,
            peer_address=peer_address,
            error=error,
            known=known,
            writer=self.audit_writer,
        )

    def recheck(self, identity: PeerIdentity) -> Refusal | None:
        """Re-check a streaming call's peer at a later message: its certificate may have
        expired, or been revoked, since the call was authorized."""
        if identity.not_after < self._clock.now():
            expired = identity.not_after.isoformat()
            what = "JWT-SVID" if identity.source == "jwt" else "certificate"
            message = f"peer {identity.describe()}: {what} expired at {expired}, during the call"
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {message}")
        if identity.source == "jwt":  # a token has no serial to revoke; its short exp is the bound
            return None
        if self.revoked is not None and self.revoked(identity):
            message = f"peer {identity.describe()}: certificate serial {identity.serial:x} was revoked during the call"
            log.warning("authz: ending a stream: %s", message)
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {message}")
        return None

    def _x509_identity(
        self,
        policy: AuthorizationPolicy,
        auth_context: Mapping[str, Sequence[bytes]],
        method: str,
        metadata: Metadata,
        peer_address: str | Callable[[], str] | None,
        known: bool,
    ) -> tuple[PeerIdentity, bool] | Refusal:
        """The caller named by the connection's client certificate (or the one a trusted proxy
        forwarded) and whether it called directly (not forwarded), or the refusal: unverified or revoked."""
        try:
            identity = self._verifier.identify(auth_context, non_spiffe_from=self._non_spiffe_from(policy))
        except VerificationError as err:
            denied = Decision(False, None, "unauthenticated")
            self._record(policy, denied, method, None, peer_address=peer_address, error=str(err), known=known)
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {err}")
        if self.revoked is not None and self.revoked(identity):
            message = f"peer {identity.describe()}: certificate serial {identity.serial:x} is revoked"
            denied = Decision(False, None, "revoked")
            self._record(policy, denied, method, identity, peer_address=peer_address, error=message, known=known)
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {message}")
        direct = True
        if self._forwarded is not None and self._forwarded.from_proxy(identity):
            direct = False
            proxy = identity
            try:
                identity = self._forwarded.identify(_materialize(metadata), proxy, self._clock.now().timestamp())
            except VerificationError as err:
                denied = Decision(False, None, "unauthenticated")
                error = f"via {proxy.describe()}: {err}"
                self._record(policy, denied, method, None, peer_address=peer_address, error=error, known=known)
                return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {err}")
            if self.revoked is not None and self.revoked(identity):
                message = f"forwarded peer {identity.describe()}: certificate serial {identity.serial:x} is revoked"
                self._record(policy, Decision(False, None, "revoked"), method, identity, error=message, known=known)
                return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {message}")
        return identity, direct

    def authorize(
        self,
        auth_context: Mapping[str, Sequence[bytes]],
        method: str,
        metadata: Metadata,
        peer_address: str | Callable[[], str] | None = None,
        *,
        known: bool = True,
    ) -> PeerIdentity | Refusal | None:
        """Decide one call: the verified peer when allowed, else the refusal to send.

        ``known`` says whether the server implements ``method``: an unknown method's name is
        the caller's to choose, so it is decided without the memo and counted as ``(unknown)``.
        None means an unauthenticated method called by a peer that could not be verified.
        """
        epoch = self._epoch  # before anything the memo depends on is read (see _memo_decide)
        policy = self._policy  # one read: the whole call sees one policy
        if method in self._open_methods:
            return self._open_call(policy, auth_context, metadata, method, peer_address, known)
        accepts_jwt = policy.accepts_jwt  # one read for the whole call, as for the policy
        if known and not accepts_jwt:  # under a policy that takes tokens, a token may decide
            memoised = self.repeat_call(auth_context.get, STR_KEY_NAMES, method, peer_address)
            if memoised is not None:
                return memoised
        bundles = self._bundles()  # before the peer is verified (see _memo_decide)
        identity: PeerIdentity | None = None
        direct = True  # a direct certificate peer, filed in the memo under its connection
        if accepts_jwt:
            metadata = tuple(_materialize(metadata) or ())  # read once: for the token, then for headers
            try:
                token = bearer_token(metadata)
                if token is not None:
                    identity, direct = self._jwt_identity(policy, token, auth_context, peer_address), False
                elif not policy.accepts_x509:
                    raise InvalidJwtSvidError(
                        "JWT-SVID: none sent; this server accepts callers by JWT-SVID only "
                        "(send 'authorization: Bearer <JWT-SVID>')"
                    )
            except InvalidJwtSvidError as err:
                denied = Decision(False, None, "unauthenticated")
                self._record(policy, denied, method, None, peer_address=peer_address, error=str(err), known=known)
                return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {err}")
        if identity is None:
            verified = self._x509_identity(policy, auth_context, method, metadata, peer_address, known)
            if isinstance(verified, Refusal):
                return verified
            identity, direct = verified
        if identity.tls_version not in (None, "TLSv1.3") and not policy.allow_tls12:
            message = (
                f"peer {identity.describe()}: the connection negotiated {identity.tls_version}; this server "
                "requires TLS 1.3 (a policy may set allow_tls12 to admit TLS 1.2)"
            )
            denied = Decision(False, None, "unauthenticated")
            self._record(policy, denied, method, None, peer_address=peer_address, error=message, known=known)
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {message}")
        local = self._own()[0]  # one read: the whole call sees one local trust domain
        candidate = self.candidate.policy  # one read, as for the policy
        if known and not policy.uses_headers and (candidate is None or not candidate.uses_headers):
            key: tuple[object, ...]
            if direct and not accepts_jwt:  # filed as repeat_call looks it up
                key = _str_connection_key(auth_context["x509_pem_cert"][0], auth_context, method)
            else:  # a JWT or forwarded peer, or any under a policy a token may decide: its identity object
                key = (id(identity), method)  # the entry holds identity: its id() is not reused meanwhile
            _, decision, prepared, dry, _ = self._memo_decide(
                policy, identity, method, local, candidate, bundles, key, epoch
            )
            audit.emit(prepared, peer_address, self.audit_writer)
            if dry is not None:
                audit.emit(dry, peer_address, self.audit_writer)
        else:
            uses_headers = policy.uses_headers or (candidate is not None and candidate.uses_headers)
            headers = collect_headers(_materialize(metadata) or ()) if uses_headers else None
            decision = policy.decide(identity, method, headers, local_trust_domain=local)
            self._record(policy, decision, method, identity, peer_address=peer_address, known=known)
            if candidate is not None:
                decided = candidate.decide(identity, method, headers, local_trust_domain=local)
                dry = dryrun.prepare(policy, candidate, decision, decided, method, identity, known=known)
                if dry is not None:
                    audit.emit(dry, peer_address, self.audit_writer)
        return identity if decision.allowed else _denied(identity, decision, method, known)


def _denied(identity: PeerIdentity, decision: Decision, method: str, known: bool) -> Refusal:
    detail = f": {decision.reason}" if decision.explained else ""  # never the policy's contents
    return Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        f"meshid: {identity.describe()} may not call {audit.shown(method, known)}{detail}",
    )


class InterceptorBase:
    """What the sync and aio interceptors share: the decision path, policy management, and the
    cache of wrapped handlers (one per handler and method, made once)."""

    #: Wrapped handlers kept, one per implemented (handler, method); unknown methods are never kept.
    WRAPPED_CACHE = 4096
    WRAPPED_BYTES = 8 << 20

    def __init__(
        self,
        policy: PolicyInput,
        *,
        source: TrustInput,
        poll_interval: float = 2.0,
        unauthenticated_methods: Iterable[str] = (),
        trusted_proxies: Iterable[SpiffeId | str] = (),
        forwarded_header: str = XFCC_HEADER,
        clock: Clock = SYSTEM_CLOCK,
        candidate: PolicyInput | None = None,
    ) -> None:
        self._authorizer = Authorizer(
            policy,
            source=source,
            poll_interval=poll_interval,
            unauthenticated_methods=unauthenticated_methods,
            trusted_proxies=trusted_proxies,
            forwarded_header=forwarded_header,
            clock=clock,
            candidate=candidate,
        )
        self._wrapped: BoundedCache[tuple[int, str], tuple[object, grpc.RpcMethodHandler[Any, Any]]] = BoundedCache(
            max_entries=self.WRAPPED_CACHE, max_bytes=self.WRAPPED_BYTES
        )

    @property
    def policy(self) -> AuthorizationPolicy:
        """The policy in force now."""
        return self._authorizer.policy

    def reload(self, policy: PolicyInput | None = None) -> bool:
        """Replace the policy atomically (or re-read the file); a broken one keeps the old in force."""
        return self._authorizer.reload(policy)

    @property
    def candidate(self) -> AuthorizationPolicy | None:
        """The candidate policy of a dry run (None: no dry run, or its file never loaded)."""
        return self._authorizer.candidate.policy

    def reload_candidate(self, candidate: PolicyInput | None = None) -> bool:
        """Start or change the dry run with a candidate policy, or re-read the candidate's file.

        A candidate that fails to load never affects enforcement: the previous candidate (or
        none) stays, and the error is logged (and re-raised when ``candidate`` was given).
        """
        return self._authorizer.reload_candidate(candidate)

    def end_dry_run(self) -> None:
        """Drop the candidate policy: calls are decided by the enforced policy alone again."""
        self._authorizer.candidate.clear()

    def set_revocation_check(self, revoked: Callable[[PeerIdentity], bool] | None) -> None:
        """Refuse peers for which ``revoked(peer)`` is true with ``UNAUTHENTICATED``."""
        self._authorizer.revoked = revoked

    def start(self) -> Self:
        """Start writing audit records off the call path (on a thread of their own), and for a
        policy read from a file, watch the file and reload it when it changes."""
        self._authorizer.start()
        return self

    def close(self) -> None:
        """Write the audit records still queued, then stop the threads :meth:`start` started."""
        self._authorizer.close()

    def flush_audit(self, timeout: float = 10.0) -> bool:
        """Wait until the audit records of the calls decided so far are written (False on timeout)."""
        return self._authorizer.audit_writer.flush(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError  # each flavour wraps for its own runtime

    def _wrap_unknown(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError

    def _guarded(self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` for ``method`` with the decision run first; ``None``, a method the server
        does not implement, is answered UNIMPLEMENTED only to a peer allowed to call it. The
        interceptors and the guarded servers (:mod:`meshid._guard`) wrap through this."""
        if handler is None:  # the caller chose this name: wrapped for this call only, never cached
            return self._wrap_unknown(method)
        # One wrapped handler per (handler, method), made once: the per-call cost is this lookup.
        kept = self._wrapped.get((id(handler), method))  # the entry holds the handler: its id() is not reused
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self._wrap(handler, method)
        self._wrapped.put((id(handler), method), (handler, wrapped), 1024 + len(method))
        return wrapped
