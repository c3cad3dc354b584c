"""Who is calling: a :class:`PeerIdentity` built from a call's TLS auth context, or from the
JWT-SVID it sent.

grpcio's ``peer_spiffe_id`` only says what the certificate claims. :class:`PeerVerifier`
re-verifies the chain against the bundle of that SPIFFE ID's own trust domain, applies the
X509-SVID leaf rules, and caches the result per certificate, so a certificate is parsed and
verified once, not on every call. :class:`JwtVerifier` does the same for a bearer JWT-SVID:
validated once (signature by a JWT key of its trust domain, times, audience), then cached by
the token's SHA-256 until it expires.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from meshid import _x509
from meshid._cache import BoundedCache
from meshid.bundle import BundleSet
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import MeshIdError, VerificationError
from meshid.jwtsvid import JwtSvid
from meshid.spiffeid import SpiffeId, TrustDomain

__all__ = ["JwtVerifier", "PeerIdentity", "PeerVerifier", "peer_identity"]

#: Where a caller's identity came from: its TLS client certificate, or a JWT-SVID it sent.
IdentitySource = Literal["x509", "jwt"]
#: Seconds of clock skew a JWT-SVID's exp, nbf and iat are allowed.
JWT_LEEWAY = 30.0

#: Longest refusal reason a cache keeps (a parser's message can quote what it choked on).
_MAX_REASON = 1024


def entry_size(pem_bytes: int) -> int:
    """About what a cached verdict holds: the PEM key, and a PeerIdentity whose parsed
    certificate costs several times its DER (measured with tracemalloc: ~5.5 KB for a 920-byte
    PEM, plus what cryptography allocates outside Python's heap)."""
    return 3 * pem_bytes + 6144


#: Key exchange groups that include a post-quantum KEM (the hybrids OpenSSL and BoringSSL name).
_PQ_MARKERS = ("MLKEM", "KYBER")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The verified identity of the peer of one call.

    ``spiffe_id`` is None only for a non-SPIFFE client certificate admitted by a policy with
    ``allow_non_spiffe_peers``; ``trust_domain`` is then the trust domain whose bundle vouched.

    ``source`` says where the identity came from: ``"x509"``, the TLS client certificate (the
    default, and the only source unless the policy accepts JWT-SVIDs), or ``"jwt"``, a JWT-SVID
    the caller sent as ``authorization: Bearer``. A JWT peer has no certificate: ``jwt_svid``
    is the validated token, ``uri_sans`` its SPIFFE ID, ``not_after`` its expiry, ``subject``
    and ``thumbprint`` empty; ``tls_version`` and ``key_exchange_group`` are the connection's.
    """

    spiffe_id: SpiffeId | None
    trust_domain: TrustDomain
    subject: str
    common_name: str | None
    thumbprint: str
    certificate: x509.Certificate | None = field(repr=False, compare=False)
    not_after: datetime.datetime
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    tls_version: str | None = None
    key_exchange_group: str | None = None
    #: What the peer's leaf key signs with, so what authenticated it in the handshake (TLS 1.3's
    #: CertificateVerify): ``ML-DSA-65``, ``ECDSA-P256``, ``RSA-2048``, ``Ed25519``...
    signature_algorithm: str | None = None
    #: The algorithm of the signature its CA put on the leaf (``ML-DSA-65``, ``ECDSA-P256``...).
    issuer_signature_algorithm: str | None = None
    source: IdentitySource = "x509"
    jwt_svid: JwtSvid | None = field(default=None, repr=False, compare=False)
    #: The algorithms of the signatures of the path :class:`PeerVerifier` verified, the leaf's
    #: first, the root's own (which vouches for nothing) left out: forging any one of them forges
    #: the leaf. For a peer a trusted proxy forwarded, the proxy's key's and chain's follow (its
    #: handshake is what authenticated the call). Empty for an identity described without
    #: verifying (:meth:`from_certificate`).
    chain_signature_algorithms: tuple[str, ...] = ()

    @classmethod
    def from_jwt_svid(
        cls, svid: JwtSvid, *, tls_version: str | None = None, key_exchange_group: str | None = None
    ) -> PeerIdentity:
        """Describe the caller named by a validated JWT-SVID."""
        return cls(
            spiffe_id=svid.spiffe_id,
            trust_domain=svid.spiffe_id.trust_domain,
            subject="",
            common_name=None,
            thumbprint="",
            certificate=None,
            not_after=svid.expiry,
            uri_sans=(str(svid.spiffe_id),),
            tls_version=tls_version,
            key_exchange_group=key_exchange_group,
            source="jwt",
            jwt_svid=svid,
        )

    @property
    def serial(self) -> int | None:
        return None if self.certificate is None else self.certificate.serial_number

    @classmethod
    def from_certificate(
        cls, cert: x509.Certificate, trust_domain: TrustDomain | None = None, *, spiffe_id: SpiffeId | None = None
    ) -> PeerIdentity:
        """Describe a certificate as a peer, without verifying it (for offline tools such as ``policy check``)."""
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        td = trust_domain or (spiffe_id.trust_domain if spiffe_id is not None else TrustDomain("unknown"))
        return cls(
            spiffe_id=spiffe_id,
            trust_domain=td,
            subject=cert.subject.rfc4514_string(),
            common_name=str(cns[0].value) if cns else None,
            thumbprint=_x509.thumbprint(cert),
            certificate=cert,
            not_after=cert.not_valid_after_utc,
            uri_sans=tuple(_x509.uri_sans(cert)),
            dns_sans=tuple(_x509.dns_sans(cert)),
            signature_algorithm=_x509.key_algorithm(cert.public_key()),
            issuer_signature_algorithm=_x509.signature_algorithm(cert),
        )

    @property
    def post_quantum(self) -> bool:
        """Whether the connection negotiated a hybrid post-quantum key exchange."""
        group = (self.key_exchange_group or "").upper()
        return any(marker in group for marker in _PQ_MARKERS)

    @property
    def post_quantum_signature(self) -> bool:
        """Whether a post-quantum signature authenticated the peer: its leaf key is ML-DSA, and so
        is every signature from its trust anchor down to the leaf (an ML-DSA key under an ECDSA CA,
        or under an ML-DSA intermediate an ECDSA root signed, is as forgeable as ECDSA)."""
        return _x509.is_post_quantum(self.signature_algorithm) and self.classical_chain_signature is None

    @property
    def classical_chain_signature(self) -> str | None:
        """The first signature on the peer's path that is not post-quantum (the leaf's CA's when
        no path was verified); None when each one is."""
        signatures = self.chain_signature_algorithms or (self.issuer_signature_algorithm,)
        return next((s or "unknown" for s in signatures if not _x509.is_post_quantum(s)), None)

    def describe(self) -> str:
        """A short name for logs and error messages: the SPIFFE ID, or the subject."""
        return str(self.spiffe_id) if self.spiffe_id is not None else self.subject


def _one(auth: Mapping[str, Sequence[bytes]], key: str) -> str | None:
    values = auth.get(key)
    return values[0].decode("utf-8", "replace") if values else None


class PeerVerifier:
    """Verifies peers' certificates against a bundle set, caching per certificate.

    ``bundles`` is a callable returning the current :class:`BundleSet` (a source's
    ``get_bundles``), so a bundle rotation takes effect at once; the cache is dropped
    whenever the bundle set changes (and when full), and ``on_clear`` is called each time it
    drops entries.
    """

    def __init__(
        self,
        bundles: Callable[[], BundleSet],
        *,
        cache_size: int = 4096,
        cache_bytes: int = 16 << 20,
        clock: Clock = SYSTEM_CLOCK,
        on_clear: Callable[[], None] | None = None,
    ) -> None:
        self._bundles = bundles
        # Verdicts per certificate: a PeerIdentity, or the reason it was refused, for the bundle
        # set they were made against. Reads and writes are single dict operations (atomic under
        # the GIL), so the per-call path takes no lock; the cache is bounded by entries and by
        # bytes (a PeerIdentity with its certificate is several KB) and starts over when full.
        self._cache: BoundedCache[tuple[object, ...], PeerIdentity | str] = BoundedCache(
            max_entries=cache_size, max_bytes=cache_bytes, on_clear=on_clear
        )
        self._cache_for: BundleSet | None = None
        self._clock = clock

    @property
    def generation(self) -> int:
        """Changes whenever the cached verdicts are dropped: what is derived from them must go too."""
        return self._cache.generation

    def identify(
        self, auth: Mapping[str, Sequence[bytes]], *, non_spiffe_from: frozenset[TrustDomain] | None = None
    ) -> PeerIdentity:
        """The verified identity of a call's peer, from its auth context.

        A certificate without a SPIFFE ID is admitted only when ``non_spiffe_from`` names the
        trust domains whose bundles may vouch for it.

        Raises:
            VerificationError: no client certificate, it does not verify, it is expired, or it
                carries no SPIFFE ID and no bundle of ``non_spiffe_from`` vouches for it.
        """
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise VerificationError("peer: no verified client certificate on this connection")
        chain = tuple(auth.get("x509_pem_cert_chain", ()))
        # Keyed by the leaf alone, not the intermediates sent with it: the handshake already
        # verified whatever chain came, and a leaf is signed by one key, so a verdict that it
        # chains to its trust domain's roots holds for any chain it arrives with.
        key = (
            pems[0],
            *auth.get("ssl_tls_version", ()),
            *auth.get("ssl_negotiated_key_exchange_group", ()),
            non_spiffe_from,
        )
        bundles = self._bundles()
        cache = self._cache
        if self._cache_for is not bundles:  # a new bundle set: every verdict is stale
            cache.clear()
            self._cache_for = bundles
        result = cache.get(key)
        if result is None:
            try:
                result = self._verify(auth, pems[0], chain, bundles, non_spiffe_from)
            except VerificationError as err:
                result = str(err)[:_MAX_REASON]  # the verdict, not the exception (its traceback would grow)
            except _x509.PARSE_ERRORS as err:  # a malformed extension, met while reading the certificate
                result = f"peer: certificate cannot be read: {err}"[:_MAX_REASON]
            if self._cache_for is bundles:  # not a verdict made against a set replaced meanwhile
                cache.put(key, result, entry_size(len(pems[0])))
        if isinstance(result, str):
            raise VerificationError(result)
        if result.not_after < self._clock.now():
            raise VerificationError(f"peer {result.describe()}: certificate expired at {result.not_after.isoformat()}")
        return result

    def _verify(
        self,
        auth: Mapping[str, Sequence[bytes]],
        leaf_pem: bytes,
        chain: tuple[bytes, ...],
        bundles: BundleSet,
        non_spiffe_from: frozenset[TrustDomain] | None,
    ) -> PeerIdentity:
        try:
            leaf = x509.load_pem_x509_certificate(leaf_pem)
            intermediates = [c for pem in chain for c in x509.load_pem_x509_certificates(pem)]
        except _x509.PARSE_ERRORS as err:
            raise VerificationError(f"peer: certificate cannot be parsed: {err}") from err
        now = self._clock.now()
        uris = _x509.uri_sans(leaf)
        spiffe_id: SpiffeId | None
        if uris:
            spiffe_id, path = bundles.verify_path(leaf, intermediates, now=now)
            trust_domain = spiffe_id.trust_domain
        elif non_spiffe_from is None:
            raise VerificationError(
                f"peer {leaf.subject.rfc4514_string()!r}: certificate carries no SPIFFE ID; "
                "a policy must set allow_non_spiffe_peers to admit it"
            )
        else:
            spiffe_id = None
            trust_domain, path = bundles.verify_any_path(leaf, intermediates, now=now, trust_domains=non_spiffe_from)
        return dataclasses.replace(
            PeerIdentity.from_certificate(leaf, trust_domain, spiffe_id=spiffe_id),
            tls_version=_one(auth, "ssl_tls_version"),
            key_exchange_group=_one(auth, "ssl_negotiated_key_exchange_group"),
            # the root's self-signature left out: the root is trusted for its key, not its signature
            chain_signature_algorithms=tuple(_x509.signature_algorithm(c) for c in path[:-1]),
        )


class JwtVerifier:
    """Validates callers' JWT-SVIDs against a bundle set, caching each validated token.

    A validated token is kept under its SHA-256 (a fixed-size key, whatever the token's
    size) with the connection's TLS facts, until its ``exp``, never longer; the cache is
    bounded by entries and starts over when the bundle set or the audiences change (and when
    full), calling ``on_clear`` each time it drops entries. Refused tokens are not kept: a refusal can depend on
    the time (not yet valid).
    """

    def __init__(
        self,
        bundles: Callable[[], BundleSet],
        *,
        cache_size: int = 4096,
        clock: Clock = SYSTEM_CLOCK,
        leeway: float = JWT_LEEWAY,
        on_clear: Callable[[], None] | None = None,
    ) -> None:
        self._bundles = bundles
        # A PeerIdentity with its JwtSvid (the token, its claims) is a few KB at most: tokens are <= 8 KiB.
        self._cache: BoundedCache[tuple[bytes, str | None, str | None], PeerIdentity] = BoundedCache(
            max_entries=cache_size, max_bytes=cache_size * 12 * 1024, on_clear=on_clear
        )
        self._cache_for: tuple[BundleSet, frozenset[str]] | None = None
        self._clock = clock
        self._leeway = leeway

    @property
    def generation(self) -> int:
        """Changes whenever the cached identities are dropped."""
        return self._cache.generation

    def identify(
        self, token: str, audiences: frozenset[str], auth: Mapping[str, Sequence[bytes]] | None = None
    ) -> PeerIdentity:
        """The caller named by ``token``, which must name one of ``audiences``.

        Raises:
            InvalidJwtSvidError: the token is refused; the message says why.
        """
        bundles = self._bundles()
        cache = self._cache
        scope = self._cache_for
        if scope is None or scope[0] is not bundles or scope[1] != audiences:
            cache.clear()
            self._cache_for = scope = (bundles, audiences)
        tls_version = _one(auth, "ssl_tls_version") if auth is not None else None
        group = _one(auth, "ssl_negotiated_key_exchange_group") if auth is not None else None
        key = (hashlib.sha256(token.encode()).digest(), tls_version, group)
        now = self._clock.now()
        hit = cache.get(key)
        if hit is not None and now < hit.not_after and hit.jwt_svid is not None and hit.jwt_svid.token == token:
            return hit
        svid = JwtSvid.parse_and_validate(token, bundles, audiences, now=now, leeway=self._leeway)
        identity = PeerIdentity.from_jwt_svid(svid, tls_version=tls_version, key_exchange_group=group)
        if now < identity.not_after and self._cache_for is scope:  # never past exp, never for a replaced set
            cache.put(key, identity, 2 * len(token) + 4096)
        return identity


_CURRENT: contextvars.ContextVar[PeerIdentity | None] = contextvars.ContextVar("meshid_peer", default=None)
_ATTR = "_meshid_peer_identity"


def attach(context: object, identity: PeerIdentity) -> None:
    """Attach ``identity`` to a sync call's context (the sync interceptor's half of :func:`peer_identity`)."""
    setattr(context, _ATTR, identity)


def set_current(identity: PeerIdentity | None) -> contextvars.Token[PeerIdentity | None]:
    """Make ``identity`` the current task's peer (grpc.aio contexts take no attributes)."""
    return _CURRENT.set(identity)


def reset_current(token: contextvars.Token[PeerIdentity | None]) -> None:
    try:
        _CURRENT.reset(token)
    except ValueError:  # reset from another context: clear instead
        _CURRENT.set(None)


def peer_identity(context: object) -> PeerIdentity:
    """The verified identity of the caller, inside a handler behind meshid's interceptor.

    ``source`` says whether it came from the TLS client certificate (``"x509"``) or from a
    JWT-SVID (``"jwt"``, with the validated token in ``jwt_svid``).

    Raises:
        MeshIdError: the call did not pass through :class:`meshid.AuthorizationInterceptor`.
    """
    identity = getattr(context, _ATTR, None) or _CURRENT.get()
    if identity is None:
        raise MeshIdError("peer identity: none for this call; build the server with meshid's AuthorizationInterceptor")
    return identity
