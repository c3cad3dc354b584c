"""grpcio credentials built from an identity source.

What is verified where:

* Server side, by grpcio: the client presents a certificate (required) whose chain verifies
  against the union of every trust domain's roots in the source. Then, per call, meshid's
  interceptor re-verifies the chain against the bundle of the client's *own* trust domain and
  applies the X509-SVID leaf rules (see :mod:`meshid.peer`).
* Client side, by grpcio: the server's chain verifies against the roots given, and the server
  certificate has a DNS SAN matching the target name. grpcio never looks at URI SANs, so with
  ``server_id`` meshid narrows the roots to that ID's trust domain and pins the identity DNS
  name meshid's CA puts in every SVID (:func:`meshid.identity_dns_name`) with
  ``grpc.ssl_target_name_override``. Under a root that several trust domains share, the pin
  still holds because each meshid intermediate carries a DNS name constraint permitting only
  its own trust domain's identity names, which grpcio's BoringSSL enforces in the handshake.
* Per call, with :func:`jwt_call_credentials`: a JWT-SVID from a :class:`~meshid.JwtSource`
  rides as ``authorization: Bearer <token>`` (the JWT-SVID standard §5.3), for a server whose
  policy accepts JWT-SVIDs, also across a hop that terminates the client's TLS.
"""

from __future__ import annotations

import datetime
import functools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from meshid._cache import BoundedCache
from meshid._grpc import ServerConfigs
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import InvalidSpiffeIdError, MeshIdError, SourceError
from meshid.sources import Source, require_source
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid, identity_dns_name

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid
    from meshid.sources import JwtSource

__all__ = ["channel_credentials", "jwt_call_credentials", "server_credentials"]

ServerId = SpiffeId | TrustDomain | str


def server_credentials(source: Source, *, require_client_certificate: bool = True) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate and present the source's current SVID.

    The source is consulted on every new TLS handshake, so a rotated SVID or bundle is used
    from the next connection on without a restart.

    Args:
        source: the identity source.
        require_client_certificate: True (the default) requires and verifies a client
            certificate in the handshake. False is for a listener whose callers authenticate
            by JWT-SVID only (the policy's ``identity_sources: [jwt]``), such as one behind a
            hop that terminates the client's TLS: no client certificate is asked for, so none
            can identify a caller there.

    Raises:
        TypeError: ``source`` is not a source.
        SourceError: the source has no SVID yet.
    """
    if not isinstance(require_client_certificate, bool):
        raise TypeError("require_client_certificate must be True or False")
    configs = ServerConfigs(require_source(source))
    return grpc.dynamic_ssl_server_credentials(
        configs.current(), configs.fetch, require_client_authentication=require_client_certificate
    )


#: Types already checked to be sources: a runtime Protocol ``isinstance`` costs tens of
#: microseconds, once per type is enough (the check is of the type's methods).
_SOURCE_TYPES: set[type] = set()
#: PEM encodings of the SVIDs and bundles channels were made with, per object (which a source
#: hands out unchanged until it rotates): serialised once, not for every channel.
_PEMS: BoundedCache[int, tuple[object, bytes, bytes]] = BoundedCache(max_entries=32, max_bytes=1 << 20)


def _checked(source: Source) -> Source:
    kind = type(source)
    if kind in _SOURCE_TYPES:
        try:
            source.get_svid()
        except MeshIdError as err:
            raise SourceError(f"identity source: no SVID available: {err}") from err
        return source
    checked = require_source(source)
    _SOURCE_TYPES.add(kind)
    return checked


def _svid_pems(svid: X509Svid) -> tuple[bytes, bytes]:
    hit = _PEMS.get(id(svid))
    if hit is not None and hit[0] is svid:  # the entry holds the object: its id() is not reused
        return hit[1], hit[2]
    key, chain = svid.key_pem(), svid.chain_pem()
    _PEMS.put(id(svid), (svid, key, chain), 256 + len(key) + len(chain))
    return key, chain


def _roots_pem(bundle: object, pem: functools.partial[bytes]) -> bytes:
    hit = _PEMS.get(id(bundle))
    if hit is not None and hit[0] is bundle:
        return hit[1]
    roots = pem()
    _PEMS.put(id(bundle), (bundle, roots, b""), 256 + len(roots))
    return roots


@functools.lru_cache(maxsize=256)
def _pin(server_id: ServerId) -> tuple[SpiffeId | TrustDomain, TrustDomain, str]:
    """``server_id`` parsed: the pinned ID, its trust domain, and the DNS name pinned."""
    pinned = _parse_server_id(server_id)
    td = pinned if isinstance(pinned, TrustDomain) else pinned.trust_domain
    return pinned, td, identity_dns_name(pinned)


def _parse_server_id(server_id: ServerId) -> SpiffeId | TrustDomain:
    if isinstance(server_id, SpiffeId | TrustDomain):
        return server_id
    if not isinstance(server_id, str):
        raise TypeError(f"server_id must be a SpiffeId, TrustDomain or str, not {type(server_id).__name__}")
    if "*" in server_id:
        raise ValueError(
            f"server_id {server_id!r}: grpcio cannot check a server's URI SAN against a pattern; "
            "give an exact SPIFFE ID, or a trust domain to accept any of its workloads"
        )
    try:
        sid = SpiffeId.parse(server_id)
    except InvalidSpiffeIdError:
        return TrustDomain.parse(server_id)
    return sid if sid.path else sid.trust_domain


def channel_credentials(
    source: Source, *, server_id: ServerId | None = None
) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    """Channel credentials from the source's current SVID, and the channel options they need.

    Raises:
        SourceError: the source has no SVID, or no bundle for ``server_id``'s trust domain.
        InvalidSpiffeIdError, ValueError: ``server_id`` is malformed or a pattern.
    """
    svid = _checked(source).get_svid()
    bundles = source.get_bundles()
    options: list[tuple[str, Any]] = []
    if server_id is None:
        # grpc checks the server's DNS names against the target, and any CA can write any DNS
        # name: only the client's own trust domain's CAs may prove one (a federated server is
        # reached with its server_id, whose trust domain's bundle then proves it).
        own = svid.spiffe_id.trust_domain
        if own not in bundles:
            raise SourceError(
                f"the source has no trust bundle for its own trust domain {own}; give server_id "
                "to name the server's trust domain"
            )
        bundle = bundles[own]
        roots = _roots_pem(bundle, functools.partial(bundle.to_pem))
    else:
        if not isinstance(server_id, SpiffeId | TrustDomain | str):
            raise TypeError(f"server_id must be a SpiffeId, TrustDomain or str, not {type(server_id).__name__}")
        pinned, td, dns_name = _pin(server_id)
        if td not in bundles:
            raise SourceError(f"server_id {pinned}: the source has no trust bundle for trust domain {td}")
        bundle = bundles[td]
        roots = _roots_pem(bundle, functools.partial(bundle.to_pem))
        options.append(("grpc.ssl_target_name_override", dns_name))
    return _credentials(svid, roots), options


#: The credentials made last, per (SVID, roots): grpc credentials may serve many channels.
_LAST: list[tuple[X509Svid, bytes, grpc.ChannelCredentials]] = []


def _credentials(svid: X509Svid, roots: bytes) -> grpc.ChannelCredentials:
    for made_for, made_roots, creds in _LAST:
        if made_for is svid and made_roots is roots:
            return creds
    key, chain = _svid_pems(svid)
    creds = grpc.ssl_channel_credentials(roots, key, chain)
    _LAST[:] = [(svid, roots, creds), *_LAST[:3]]  # a few SVIDs (sources) at once, the newest first
    return creds


class _JwtPlugin(grpc.AuthMetadataPlugin):
    """Attaches a JWT-SVID for one audience to each call, fetched again after half its lifetime."""

    def __init__(self, source: JwtSource, audience: tuple[str, ...], spiffe_id: SpiffeId | None, clock: Clock) -> None:
        self._source, self._audience, self._spiffe_id, self._clock = source, audience, spiffe_id, clock
        self._lock = threading.Lock()
        self._current: tuple[JwtSvid, datetime.datetime, tuple[tuple[str, str], ...]] | None = None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        now = self._clock.now()
        current = self._current
        if current is not None and now < current[1]:
            return current[2]
        with self._lock:  # one fetch at a time; the others then take its token
            current = self._current
            if current is not None and now < current[1]:
                return current[2]
            svid = self._source.fetch_jwt_svid(self._audience, self._spiffe_id)
            issued = svid.issued_at if svid.issued_at is not None and svid.issued_at <= now else now
            refresh = issued + (svid.expiry - issued) / 2
            self._current = (svid, refresh, (("authorization", f"Bearer {svid.token}"),))
            return self._current[2]

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            metadata = self._metadata()
        except Exception as err:  # grpc fails the call with the error; the token never appears in it
            callback((), SourceError(f"JWT-SVID: cannot fetch one for audience {list(self._audience)}: {err}"))
            return
        callback(metadata, None)


def jwt_call_credentials(
    source: JwtSource,
    *,
    audience: str | Sequence[str],
    spiffe_id: SpiffeId | str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> grpc.CallCredentials:
    """Per-call credentials that send a JWT-SVID from ``source`` as ``authorization: Bearer``.

    The token for ``audience`` is fetched on the first call and again once half its lifetime
    has passed; calls in between reuse it. Combine it with TLS channel credentials
    (``grpc.composite_channel_credentials``): grpc sends call credentials over secure channels only.

    Args:
        source: any :class:`~meshid.JwtSource` (the Workload API, the issuing service).
        audience: the audience (or audiences) the token is for: the server's SPIFFE ID, or an
            audience its policy lists in ``jwt_audiences``.
        spiffe_id: which of the workload's identities to fetch a token for (default: its own).
        clock: when a token is due for renewal is judged on this clock.

    Raises:
        TypeError: ``source`` has no ``fetch_jwt_svid``.
        ValueError: no audience.
    """
    if not callable(getattr(source, "fetch_jwt_svid", None)):
        raise TypeError(f"source must be a JwtSource (with fetch_jwt_svid), not {type(source).__name__}")
    audiences = (audience,) if isinstance(audience, str) else tuple(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise ValueError("audience: give the audience (or audiences) the token is for, such as the server's SPIFFE ID")
    sid = SpiffeId.parse(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id
    return grpc.metadata_call_credentials(_JwtPlugin(source, audiences, sid, clock), name="meshid-jwt-svid")
