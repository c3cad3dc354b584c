"""Talking to a meshid CA: first issuance with a join token, renewal, bundle, CRL, admin calls,
and node agents' calls.

Every call pins the CA's identity (``spiffe://<td>/meshid/ca``) and trusts only the roots it
was given, so a join token or CSR never reaches another server. Names say how a call
authenticates: ``*_with_token`` (the anonymous bootstrap certificate and a join token),
``*_with_x509pop`` (the anonymous certificate and a proof by a host key), ``*_with_svid``
(mTLS with the caller's current SVID), ``*_anonymously`` (the anonymous certificate; only what
is public), :class:`AdminClient` (the admin SVID) and :class:`AgentClient` (a node agent's
SVID, one channel for many calls). ``fetch_svid`` (with a token, from a bundle file, across
replicas) and ``renew_svid`` (with the SVID) return ``(svid, bundle)`` for scripts; the others
an :class:`Issuance`.
"""

from __future__ import annotations

import collections
import datetime
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from meshid import _x509
from meshid._grpc import merge_options
from meshid._proto import (
    agent_pb2,
    agent_pb2_grpc,
    issuer_pb2,
    issuer_pb2_grpc,
    registration_pb2,
    registration_pb2_grpc,
)
from meshid.bundle import BundleSet, TrustBundle
from meshid.ca.authority import generate_key
from meshid.ca.bootstrap import anonymous_client
from meshid.ca.csr import build_csr
from meshid.ca.issuing import agent_id, is_agent_id, parse_token_trust_domain
from meshid.ca.request_size import svid_request_size, varint_size
from meshid.ca.x509pop import sign_proof
from meshid.errors import InvalidBundleError, InvalidSvidError, RemoteError, VerificationError
from meshid.sources import FileSource
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid, identity_dns_name

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = [
    "AdminClient",
    "AgentClient",
    "AgentEntry",
    "BatchJwtSvid",
    "BatchSvid",
    "Issuance",
    "IssuerClient",
    "TrustUpdates",
    "attest_agent_with_token",
    "attest_agent_with_x509pop",
    "batch_new_svids_with_svid",
    "fetch_svid",
    "get_bundle_anonymously",
    "get_bundle_with_svid",
    "get_crl_with_svid",
    "issue_with_token",
    "renew_agent_with_svid",
    "renew_svid",
    "renew_with_svid",
    "sync_entries_with_svid",
]

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0
#: A batch request is kept under this many bytes (the CA refuses requests over 64 KiB).
BATCH_REQUEST_BYTES = 60 * 1024
#: ... and under this many SVIDs (the CA's limit, meshid.ca.agents.MAX_BATCH).
BATCH_REQUESTS = 1000
#: A batch's sub-batches in flight at once (the CA signs one at a time: the others wait there,
#: so it never waits for the agent to build the next).
BATCHES_IN_FLIGHT = 3
#: The first sub-batch, and those of the last :data:`SMALL_BATCHES_AT_THE_END` requests, hold at
#: most this many: the CA starts signing sooner, and the agent checks less once the CA is done.
SMALL_BATCH = 64
SMALL_BATCHES_AT_THE_END = 3 * SMALL_BATCH
_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


def ca_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    return SpiffeId.from_parts(trust_domain, "meshid", "ca")


def _channel(
    server: str, roots_pem: bytes, trust_domain: TrustDomain, key_pem: bytes, chain_pem: bytes
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(roots_pem, key_pem, chain_pem)
    pin = [("grpc.ssl_target_name_override", identity_dns_name(ca_spiffe_id(trust_domain)))]
    return grpc.secure_channel(server, creds, options=merge_options(pin, None))


def _call(what: str, server: str, fn: Callable[[], T], expected: TrustDomain | None = None) -> T:
    """``fn()``, its grpc error as a RemoteError. ``expected``: the trust domain whose CA the
    call is for; when no answer came, a probe of the server says which ID it failed to prove."""
    try:
        return fn()
    except grpc.RpcError as err:
        code = err.code().name if err.code() is not None else "UNKNOWN"
        details = err.details() or ""
        if code == "UNAVAILABLE" and not details.startswith("CA"):  # not the CA's own answer
            from meshid.ca.probe import unproven_identity

            why = unproven_identity(server, ca_spiffe_id(expected)) if expected is not None else None
            if why is None and expected is not None and "CERTIFICATE_VERIFY_FAILED" in details:
                # it presents the CA's ID (else the probe says which), in a chain the bundle does not hold
                why = (
                    f"the server at {server} presents {ca_spiffe_id(expected)}, but its certificate does not verify "
                    f"against the bundle given: that bundle is another {expected} CA's, or out of date (fetch the "
                    "CA's current bundle)"
                )
            if why is not None:
                details = f"the CA's identity was not proven: {why} (grpc: {details})"
            else:
                details = f"cannot reach the CA at {server} (is it running, and is this its bundle?): {details}"
        raise RemoteError(f"{what}: {code}: {details}", code) from err


@dataclass(frozen=True, slots=True)
class Issuance:
    """An SVID from the CA, its bundle, and its lifetime measured on the CA's clock."""

    svid: X509Svid
    bundle: TrustBundle
    lifetime: datetime.timedelta


def _issuance(response: Any, key: Any) -> Issuance:
    svid, bundle = _svid_from(response, key)
    return _lifetime(response, svid, bundle)


def _lifetime(response: Any, svid: X509Svid, bundle: TrustBundle) -> Issuance:
    if response.issued_at:
        issued_at = datetime.datetime.fromtimestamp(response.issued_at, datetime.UTC)
        lifetime = svid.not_after - issued_at
    else:  # an older CA: fall back on the certificate (NotBefore may be backdated)
        lifetime = svid.not_after - svid.not_before
    return Issuance(svid, bundle, max(lifetime, datetime.timedelta(0)))


def _svid_from(response: Any, key: Any) -> tuple[X509Svid, TrustBundle]:
    try:
        chain = [x509.load_der_x509_certificate(der) for der in response.chain]
    except ValueError as err:
        raise InvalidSvidError(f"X509-SVID: the CA returned an unreadable certificate: {err}") from err
    svid = X509Svid.from_parts(chain, key)
    bundle = _bundle_from(svid.spiffe_id.trust_domain, response.bundle)
    BundleSet.of(bundle).verify(svid.leaf, svid.chain[1:])
    return svid, bundle


def _bundle_from(td: TrustDomain, message: Any) -> TrustBundle:
    """The TrustBundle a ``meshid.v1.Bundle`` carries: its roots and its JWT keys (by kid).

    Raises:
        InvalidBundleError: an unreadable root or JWT key, or a kid given twice.
    """
    try:
        roots = tuple(x509.load_der_x509_certificate(der) for der in message.roots)
    except ValueError as err:
        raise InvalidBundleError(f"trust bundle: the CA returned an unreadable root: {err}") from err
    keys: dict[str, Any] = {}
    for jwk in message.jwt_keys:
        if not jwk.kid or jwk.kid in keys:
            raise InvalidBundleError(
                f"trust bundle: the CA returned a JWT key with an empty or repeated kid {jwk.kid!r}"
            )
        try:
            keys[jwk.kid] = serialization.load_der_public_key(jwk.public_key)
        except _x509.PARSE_ERRORS as err:
            raise InvalidBundleError(f"trust bundle: the CA returned an unreadable JWT key {jwk.kid!r}: {err}") from err
    bundle = TrustBundle(td, roots, message.sequence or None)
    return bundle.with_jwt_authorities(keys) if keys else bundle


def read_roots(bundle_file: str | os.PathLike[str]) -> bytes:
    """The PEM roots a workload trusts the CA by, before it has a bundle of its own.

    Raises:
        InvalidBundleError: the file cannot be read or holds no CA certificates (the message names it).
    """
    return b"".join(_x509.cert_pem(root) for root in TrustBundle.load_roots(bundle_file))


def issue_with_token(
    server: str, roots_pem: bytes, join_token: str, *, key_kind: str = "ec-p256", timeout: float = DEFAULT_TIMEOUT
) -> Issuance:
    """First issuance: a new key, a CSR, a join token; ``roots_pem`` are what the CA is trusted by.

    Raises:
        TokenError: the token is malformed. RemoteError: the CA refused (``.code``) or is unreachable.
    """
    td = TrustDomain.parse(parse_token_trust_domain(join_token))
    key = generate_key(key_kind)
    anon_key, anon_cert = anonymous_client()
    with _channel(server, roots_pem, td, anon_key, anon_cert) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
        request = issuer_pb2.IssueWithTokenRequest(join_token=join_token, csr=build_csr(key))
        response = _call("svid fetch", server, lambda: stub.IssueWithToken(request, timeout=timeout), td)
    return _issuance(response, key)


def renew_with_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, key_kind: str = "ec-p256", timeout: float = DEFAULT_TIMEOUT
) -> Issuance:
    """Renewal over mTLS with the current SVID: a new key, same SPIFFE ID.

    Raises:
        RemoteError: the CA refused (``.code``) or is unreachable.
    """
    td = svid.spiffe_id.trust_domain
    key = generate_key(key_kind)
    with _channel(server, bundles[td].to_pem(), td, svid.key_pem(), svid.chain_pem()) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
        request = issuer_pb2.RenewRequest(csr=build_csr(key), spiffe_id=str(svid.spiffe_id))
        response = _call("svid renew", server, lambda: stub.Renew(request, timeout=timeout), td)
    return _issuance(response, key)


def fetch_svid(
    server: str | Sequence[str],
    bundle_file: str | os.PathLike[str],
    join_token: str,
    *,
    key_kind: str = "ec-p256",
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[X509Svid, TrustBundle]:
    """First issuance, the CA trusted by a bundle file; returns the SVID and the CA's bundle.

    With several CA addresses (replicas), an unreachable one is skipped for the next; a
    refusal (a used token, say) is final, since every replica would answer the same.
    """
    servers = [server] if isinstance(server, str) else list(server)
    roots = read_roots(bundle_file)
    last: RemoteError | None = None
    for address in servers:
        try:
            issued = issue_with_token(address, roots, join_token, key_kind=key_kind, timeout=timeout)
        except RemoteError as err:
            if err.code != "UNAVAILABLE":
                raise
            last = err
            continue
        return issued.svid, issued.bundle
    assert last is not None, "fetch_svid needs at least one server"
    raise last


def renew_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, key_kind: str = "ec-p256", timeout: float = DEFAULT_TIMEOUT
) -> tuple[X509Svid, TrustBundle]:
    """Renewal (see :func:`renew_with_svid`); returns the new SVID and the bundle."""
    issued = renew_with_svid(server, svid, bundles, key_kind=key_kind, timeout=timeout)
    return issued.svid, issued.bundle


def get_bundle_with_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, timeout: float = DEFAULT_TIMEOUT
) -> TrustBundle:
    """The CA's current bundle, asked over mTLS with the caller's SVID."""
    td = svid.spiffe_id.trust_domain
    return _get_bundle(server, bundles[td].to_pem(), td, svid.key_pem(), svid.chain_pem(), timeout)


def get_bundle_anonymously(
    server: str, roots_pem: bytes, trust_domain: TrustDomain, *, timeout: float = DEFAULT_TIMEOUT
) -> TrustBundle:
    """The CA's current bundle for anyone who already trusts one of its roots (no SVID needed)."""
    anon_key, anon_cert = anonymous_client()
    return _get_bundle(server, roots_pem, trust_domain, anon_key, anon_cert, timeout)


def _get_bundle(
    server: str, roots: bytes, td: TrustDomain, key_pem: bytes, chain_pem: bytes, timeout: float
) -> TrustBundle:
    with _channel(server, roots, td, key_pem, chain_pem) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
        response = _call("bundle", server, lambda: stub.GetBundle(issuer_pb2.GetBundleRequest(), timeout=timeout), td)
    return _bundle_from(td, response)


def get_crl_with_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[bytes, list[x509.Certificate]]:
    """The CA's current CRL (DER) and the chain of the CA certificate that signed it."""
    td = svid.spiffe_id.trust_domain
    with _channel(server, bundles[td].to_pem(), td, svid.key_pem(), svid.chain_pem()) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
        response = _call("CRL", server, lambda: stub.GetCrl(issuer_pb2.GetCrlRequest(), timeout=timeout), td)
    try:
        return response.der, [x509.load_der_x509_certificate(der) for der in response.issuer_chain]
    except ValueError as err:
        raise VerificationError(f"CRL: the CA returned an unreadable issuer certificate: {err}") from err


@dataclass(frozen=True, slots=True)
class TrustUpdates:
    """What :meth:`IssuerClient.trust_updates` brought: each part None when the caller's is current."""

    bundle: TrustBundle | None
    crl: tuple[bytes, list[x509.Certificate]] | None


class IssuerClient:
    """A workload's calls to the CA over one mTLS channel with its SVID: renewal and trust updates.

    The channel (and its TLS connection) lasts as long as the client; a new SVID needs a new
    client (the CA sees the SVID of the handshake). Use it from one thread.
    """

    def __init__(self, server: str, svid: X509Svid, bundles: BundleSet, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        td = svid.spiffe_id.trust_domain
        self.server = server
        self.svid = svid
        self._td = td
        self._timeout = timeout
        self._channel = _channel(server, bundles[td].to_pem(), td, svid.key_pem(), svid.chain_pem())
        self._stub = issuer_pb2_grpc.IssuerStub(self._channel)  # type: ignore[no-untyped-call]

    def renew(self, *, key_kind: str = "ec-p256") -> Issuance:
        """A new SVID for the same SPIFFE ID over a new key (see :func:`renew_with_svid`).

        Raises:
            RemoteError: the CA refused (``.code``) or is unreachable.
        """
        key = generate_key(key_kind)
        request = issuer_pb2.RenewRequest(csr=build_csr(key), spiffe_id=str(self.svid.spiffe_id))
        response = _call("svid renew", self.server, lambda: self._stub.Renew(request, timeout=self._timeout), self._td)
        return _issuance(response, key)

    def trust_updates(self, bundle_sequence: int | None, crl_number: int | None) -> TrustUpdates:
        """The CA's bundle and CRL, each only if it is not the one the caller has (one small call).

        Raises:
            RemoteError: the CA refused or is unreachable; ``UNIMPLEMENTED`` from a CA older than
                this call (then ask with :func:`get_bundle_with_svid` and :func:`get_crl_with_svid`).
            InvalidBundleError, VerificationError: an unreadable root or CRL issuer.
        """
        request = issuer_pb2.GetTrustUpdatesRequest(bundle_sequence=bundle_sequence or 0, crl_number=crl_number or 0)
        response = _call(
            "trust updates", self.server, lambda: self._stub.GetTrustUpdates(request, timeout=self._timeout), self._td
        )
        bundle = _bundle_from(self._td, response.bundle) if response.HasField("bundle") else None
        crl = None
        try:
            if response.HasField("crl"):
                crl = (response.crl.der, [x509.load_der_x509_certificate(der) for der in response.crl.issuer_chain])
        except ValueError as err:
            raise VerificationError(f"CRL: the CA returned an unreadable issuer certificate: {err}") from err
        return TrustUpdates(bundle, crl)

    def new_jwt_svid(self, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID for this client's SPIFFE ID and ``audience``, signed by the CA now.

        Raises:
            RemoteError: the CA refused (``.code``: INVALID_ARGUMENT for a bad audience,
                PERMISSION_DENIED for an ID that is not the caller's) or is unreachable.
            InvalidJwtSvidError: the CA answered a token that does not parse, or is for another
                SPIFFE ID or audience.
        """
        request = issuer_pb2.NewJwtSvidRequest(audience=list(audience), spiffe_id=str(self.svid.spiffe_id))
        call = lambda: self._stub.NewJwtSvid(request, timeout=self._timeout)  # noqa: E731
        response = _call("JWT-SVID", self.server, call, self._td)
        return _jwt_answer(response.token, self.svid.spiffe_id, audience)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> IssuerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- node agents -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """An entry parented to the calling agent, as SyncEntries gives it."""

    spiffe_id: SpiffeId
    selectors: tuple[str, ...]
    dns_names: tuple[str, ...]
    ttl: datetime.timedelta


@dataclass(frozen=True, slots=True)
class BatchSvid:
    """One result of a batch: the SPIFFE ID asked for, and its SVID (``code`` "OK") or the
    status code name and message of why not (e.g. "PERMISSION_DENIED")."""

    spiffe_id: str
    issuance: Issuance | None
    code: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class BatchJwtSvid:
    """One result of a JWT batch: the SPIFFE ID asked for, and its JWT-SVID (``code`` "OK") or
    the status code name and message of why not."""

    spiffe_id: str
    svid: JwtSvid | None
    code: str
    message: str = ""


def _jwt_answer(token: str, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
    """The CA's token, parsed (its signature is the CA's; the holder does not verify it) and
    checked to be for what was asked."""
    from meshid.errors import InvalidJwtSvidError
    from meshid.jwtsvid import JwtSvid

    svid = JwtSvid.parse_insecure(token, audience)
    if svid.spiffe_id != spiffe_id:
        raise InvalidJwtSvidError(f"JWT-SVID: the CA answered a token for {svid.spiffe_id}, not {spiffe_id}")
    return svid


class _BatchChecker:
    """Checks the SVIDs of one batch call as :func:`_issuance` does, the work they share done once.

    The SVIDs of a batch share one chain above the leaf and one bundle. The first SVID with a
    given chain, bundle and trust domain gets all of :func:`_issuance`: the X509-SVID rules,
    the key, RFC 5280 path validation to the bundle's roots, and the trust-domain scope of
    every CA in the path. The issuing CA of that validated path is then the only trust anchor
    for the next leaves under the same chain: each still gets the X509-SVID rules and the key
    (:meth:`X509Svid.from_parts`), and cryptography's verifier checks its signature by that CA,
    its validity now, that CA's name constraints and the end-entity policy. Name constraints
    of the CAs above the issuing one also bind the leaf, so with any there every leaf gets
    the whole path validation. The memo lives for one call (a few seconds).
    """

    def __init__(self) -> None:
        self._known: dict[tuple[object, ...], tuple[TrustDomain, TrustBundle, tuple[x509.Certificate, ...], Any]] = {}
        self._verifiers: dict[tuple[object, ...], tuple[Any, Any]] = {}
        self._last_above: tuple[Any, tuple[object, ...]] | None = None

    def issuance(self, response: Any, certificate: bytes, key: Any) -> Issuance:
        """The checked SVID of one result of ``response`` (a BatchNewX509SvidResponse): its leaf
        ``certificate`` under the answer's intermediates and bundle."""
        above = self._above(response)
        known = self._known.get(above)
        if known is None:
            whole = issuer_pb2.SvidResponse(
                chain=[certificate, *response.intermediates], bundle=response.bundle, issued_at=response.issued_at
            )
            issued = _issuance(whole, key)
            self._remember(above, issued)
            return issued
        td, bundle, intermediates, anchor = known
        try:
            leaf = x509.load_der_x509_certificate(certificate)
        except ValueError as err:
            raise InvalidSvidError(f"X509-SVID: the CA returned an unreadable certificate: {err}") from err
        svid = X509Svid.from_parts([leaf, *intermediates], key)
        if anchor is None or svid.spiffe_id.trust_domain != td:
            whole = issuer_pb2.SvidResponse(
                chain=[certificate, *response.intermediates], bundle=response.bundle, issued_at=response.issued_at
            )
            return _issuance(whole, key)
        BundleSet.verify_with(self._verifier(above, anchor, response), leaf, (), now=None, what=str(svid.spiffe_id))
        return _lifetime(response, svid, bundle)

    def _above(self, response: Any) -> tuple[object, ...]:
        """What the answer's SVIDs share above their leaves, read from it once per answer
        (protobuf makes new bytes objects each time a repeated field is read)."""
        last = self._last_above
        if last is not None and last[0] is response:
            return last[1]
        above = (tuple(response.intermediates), tuple(response.bundle.roots), response.bundle.sequence)
        self._last_above = (response, above)
        return above

    def _verifier(self, above: tuple[object, ...], anchor: Any, response: Any) -> Any:
        """One verifier per answer (its time is the time it is built at: when the answer came)."""
        made = self._verifiers.get(above)
        if made is None or made[0] is not response:
            made = self._verifiers[above] = (response, BundleSet.client_verifier(anchor, None))
        return made[1]

    def _remember(self, above: tuple[object, ...], issued: Issuance) -> None:
        svid, bundle = issued.svid, issued.bundle
        store = verification.Store(list(bundle.roots))
        path = BundleSet.verify_chain(store, svid.leaf, svid.chain[1:], now=None, what=str(svid.spiffe_id))
        constrained = any(_has_name_constraints(ca) for ca in path[2:])
        anchor = None if constrained else verification.Store([path[1]])
        self._known[above] = (svid.spiffe_id.trust_domain, bundle, svid.chain[1:], anchor)


def _has_name_constraints(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return False
    return True


def _agent_issuance(what: str, response: Any, key: Any) -> Issuance:
    issued = _issuance(response, key)
    if not is_agent_id(issued.svid.spiffe_id):
        raise InvalidSvidError(f"{what}: the CA answered with {issued.svid.spiffe_id}, which is not a node agent's ID")
    return issued


def attest_agent_with_token(
    server: str, roots_pem: bytes, join_token: str, *, key_kind: str = "ec-p256", timeout: float = DEFAULT_TIMEOUT
) -> Issuance:
    """Node attestation with a join token made for an agent (``meshid token create --agent NAME``):
    a new key, and the agent's own SVID for it.

    Raises:
        TokenError: the token is malformed. RemoteError: the CA refused (``.code``) or is unreachable.
    """
    td = TrustDomain.parse(parse_token_trust_domain(join_token))
    key = generate_key(key_kind)
    anon_key, anon_cert = anonymous_client()
    with _channel(server, roots_pem, td, anon_key, anon_cert) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        request = agent_pb2.AttestAgentRequest(join_token=join_token, csr=build_csr(key))
        response = _call("node attestation", server, lambda: stub.AttestAgent(request, timeout=timeout), td)
    return _agent_issuance("node attestation", response, key)


def attest_agent_with_x509pop(
    server: str,
    roots_pem: bytes,
    trust_domain: TrustDomain | str,
    host_chain: Sequence[x509.Certificate],
    host_key: Any,
    *,
    key_kind: str = "ec-p256",
    timeout: float = DEFAULT_TIMEOUT,
) -> Issuance:
    """Node attestation by x509pop: ask for a challenge, prove possession of ``host_key`` (the
    key of ``host_chain[0]``, a certificate of the PKI the CA trusts for agents), and get the
    agent's own SVID for a new key. Both calls go over one connection, so they reach the same
    CA replica (a challenge is known only to the process that made it).

    Raises:
        RemoteError: the CA refused (``.code``) or is unreachable.
        TypeError: ``host_key`` is not an EC, RSA or Ed25519 key.
    """
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
    key = generate_key(key_kind)
    csr = build_csr(key)
    anon_key, anon_cert = anonymous_client()
    with _channel(server, roots_pem, td, anon_key, anon_cert) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]
        challenge = _call(
            "x509pop challenge",
            server,
            lambda: stub.GetAttestationChallenge(agent_pb2.AttestationChallengeRequest(), timeout=timeout),
            td,
        )
        proof = agent_pb2.X509PopProof(
            certificate_chain=[c.public_bytes(serialization.Encoding.DER) for c in host_chain],
            challenge_id=challenge.id,
            signature=sign_proof(host_key, challenge.nonce, csr),
        )
        request = agent_pb2.AttestAgentRequest(x509pop=proof, csr=csr)
        response = _call("node attestation", server, lambda: stub.AttestAgent(request, timeout=timeout), td)
    return _agent_issuance("node attestation", response, key)


class AgentClient:
    """A node agent's calls over one mTLS channel with its own SVID: renew it, sync the entries
    parented to it, and obtain their SVIDs in batches.

    :meth:`renew` moves the channel to the new SVID (the old channel is closed, so calls of
    other threads still on it fail); use it from one thread, or renew between other calls.
    """

    def __init__(self, server: str, svid: X509Svid, bundles: BundleSet, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._server = server
        self._bundles = bundles
        self._timeout = timeout
        self._connect(svid)

    def _connect(self, svid: X509Svid) -> None:
        td = svid.spiffe_id.trust_domain
        self.svid = svid
        self._channel = _channel(self._server, self._bundles[td].to_pem(), td, svid.key_pem(), svid.chain_pem())
        self._stub = agent_pb2_grpc.AgentStub(self._channel)  # type: ignore[no-untyped-call]

    def renew(self, *, key_kind: str = "ec-p256") -> Issuance:
        """A new SVID for the agent over a new key; later calls use it.

        Raises:
            RemoteError: the CA refused (``.code``: UNAUTHENTICATED once the agent is evicted) or is unreachable.
        """
        key = generate_key(key_kind)
        request = agent_pb2.RenewAgentRequest(csr=build_csr(key))
        call = lambda: self._stub.RenewAgent(request, timeout=self._timeout)  # noqa: E731
        response = _call("agent renew", self._server, call, self.svid.spiffe_id.trust_domain)
        issued = _agent_issuance("agent renew", response, key)
        old = self._channel
        self._bundles = self._bundles.with_bundle(issued.bundle)
        self._connect(issued.svid)
        old.close()
        return issued

    def sync_entries(self) -> list[AgentEntry]:
        """The entries parented to this agent, as of now."""
        response = _call(
            "entry sync",
            self._server,
            lambda: self._stub.SyncEntries(agent_pb2.SyncEntriesRequest(), timeout=self._timeout),
            self.svid.spiffe_id.trust_domain,
        )
        return [
            AgentEntry(
                SpiffeId.parse(e.spiffe_id),
                tuple(e.selectors),
                tuple(e.dns_names),
                datetime.timedelta(seconds=e.ttl_seconds),
            )
            for e in response.entries
        ]

    def batch_new_svids(self, requests: Sequence[tuple[str, Any]]) -> list[BatchSvid]:
        """SVIDs for ``(spiffe_id, private_key)`` pairs (one new key each), in order. A key may
        also be given as a function that makes it, called right before its CSR is built (the
        first request then leaves without waiting for all the keys).

        Sent in as few batches as the CA's request limit allows (one durable commit each at
        the CA), up to :data:`BATCHES_IN_FLIGHT` at once: the agent builds the next CSRs and
        checks the last answer while the CA signs. A refusal of one SVID is its result's
        ``code``; a refusal of a whole batch (the agent evicted, the CA's store down) raises,
        and the batches still in flight are cancelled (any the CA already committed stay
        issued, unused, as when the agent fails before it reads an answer).

        Raises:
            RemoteError: the CA refused a whole batch (``.code``) or is unreachable.
            InvalidSvidError: the CA answered with an SVID for another ID, or an unreadable one.
        """
        results: list[BatchSvid] = []
        in_flight: collections.deque[tuple[Any, Any, list[Any]]] = collections.deque()
        checker = _BatchChecker()

        def send(batch: Any, keys: list[Any]) -> None:
            if len(in_flight) >= BATCHES_IN_FLIGHT:
                results.extend(self._answer(*in_flight.popleft(), checker))
            future = self._stub.BatchNewX509Svid.future(batch, timeout=self._timeout)
            in_flight.append((future, batch, keys))

        try:
            batch = agent_pb2.BatchNewX509SvidRequest()
            keys: list[Any] = []
            size = 0  # batch.ByteSize(), kept as items are added (asking it each time is quadratic)
            placed = 0  # requests in the batches sent so far
            limit = SMALL_BATCH  # of the batch being filled
            for spiffe_id, key in requests:
                if callable(key):
                    key = key()
                csr = build_csr(key)
                item_size = svid_request_size(spiffe_id, csr)
                item_size += 1 + varint_size(item_size)  # the field's tag and length
                if batch.requests and (len(batch.requests) >= limit or size + item_size + 8 > BATCH_REQUEST_BYTES):
                    send(batch, keys)
                    placed += len(batch.requests)
                    left = len(requests) - placed
                    # a full batch ends where the last requests begin; those go in small ones
                    tail = SMALL_BATCHES_AT_THE_END
                    limit = SMALL_BATCH if left <= tail else min(BATCH_REQUESTS, left - tail)
                    batch, keys, size = agent_pb2.BatchNewX509SvidRequest(), [], 0
                batch.requests.add(spiffe_id=spiffe_id, csr=csr)
                keys.append(key)
                size += item_size
            if batch.requests:
                send(batch, keys)
            while in_flight:
                results.extend(self._answer(*in_flight.popleft(), checker))
        finally:
            for future, _, _ in in_flight:
                future.cancel()
        return results

    def _answer(self, future: Any, batch: Any, keys: list[Any], checker: _BatchChecker) -> list[BatchSvid]:
        response = _call("batch", self._server, future.result, self.svid.spiffe_id.trust_domain)
        if len(response.results) != len(keys):
            raise InvalidSvidError(f"batch: the CA answered {len(response.results)} results for {len(keys)} requests")
        out = []
        for asked, result, key in zip(batch.requests, response.results, keys, strict=True):
            if result.code != 0 or not result.certificate:
                code = _CODES.get(result.code, "UNKNOWN") if result.code else "UNKNOWN"
                out.append(BatchSvid(asked.spiffe_id, None, code, result.message))
                continue
            issued = checker.issuance(response, result.certificate, key)
            if str(issued.svid.spiffe_id) != asked.spiffe_id:
                raise InvalidSvidError(
                    f"batch: the CA answered an SVID for {issued.svid.spiffe_id} to a request for {asked.spiffe_id}"
                )
            out.append(BatchSvid(asked.spiffe_id, issued, "OK"))
        return out

    def batch_new_jwt_svids(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[BatchJwtSvid]:
        """JWT-SVIDs for ``(spiffe_id, audience)`` pairs of entries parented to this agent, in order
        (at most :data:`meshid.ca.agents.MAX_JWT_BATCH` in one call).

        Raises:
            RemoteError: the CA refused the whole batch (``.code``) or is unreachable.
            InvalidJwtSvidError: the CA answered a token that does not parse, or for another ID.
        """
        batch = agent_pb2.BatchNewJwtSvidRequest(
            requests=[agent_pb2.JwtSvidRequest(spiffe_id=sid, audience=list(aud)) for sid, aud in requests]
        )
        call = lambda: self._stub.BatchNewJwtSvid(batch, timeout=self._timeout)  # noqa: E731
        response = _call("JWT batch", self._server, call, self.svid.spiffe_id.trust_domain)
        if len(response.results) != len(requests):
            raise InvalidSvidError(f"JWT batch: the CA answered {len(response.results)} results for {len(requests)}")
        out = []
        for (asked, audience), result in zip(requests, response.results, strict=True):
            if result.code != 0 or not result.token:
                code = _CODES.get(result.code, "UNKNOWN") if result.code else "UNKNOWN"
                out.append(BatchJwtSvid(asked, None, code, result.message))
                continue
            out.append(BatchJwtSvid(asked, _jwt_answer(result.token, SpiffeId.parse(asked), audience), "OK"))
        return out

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def renew_agent_with_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, key_kind: str = "ec-p256", timeout: float = DEFAULT_TIMEOUT
) -> Issuance:
    """A node agent's renewal over mTLS with its SVID (see :meth:`AgentClient.renew`)."""
    with AgentClient(server, svid, bundles, timeout=timeout) as client:
        return client.renew(key_kind=key_kind)


def sync_entries_with_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, timeout: float = DEFAULT_TIMEOUT
) -> list[AgentEntry]:
    """The entries parented to the agent whose SVID this is (see :meth:`AgentClient.sync_entries`)."""
    with AgentClient(server, svid, bundles, timeout=timeout) as client:
        return client.sync_entries()


def batch_new_svids_with_svid(
    server: str,
    svid: X509Svid,
    bundles: BundleSet,
    requests: Sequence[tuple[str, Any]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[BatchSvid]:
    """SVIDs for entries parented to the agent (see :meth:`AgentClient.batch_new_svids`)."""
    with AgentClient(server, svid, bundles, timeout=timeout) as client:
        return client.batch_new_svids(requests)


# --- admins --------------------------------------------------------------------------------


class AdminClient:
    """Admin calls with the admin SVID that ``meshid ca init`` left in ``DIR/admin``."""

    def __init__(self, server: str, data_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        folder = pathlib.Path(data_dir) / "admin"
        source = FileSource(folder / "svid.pem", folder / "svid.key", folder / "bundle.pem")
        svid = source.get_svid()
        td = svid.spiffe_id.trust_domain
        self.trust_domain = td
        self._server = server
        self._timeout = timeout
        self._channel = _channel(server, source.get_bundles()[td].to_pem(), td, svid.key_pem(), svid.chain_pem())
        self._stub = registration_pb2_grpc.RegistrationStub(self._channel)  # type: ignore[no-untyped-call]

    def _do(self, what: str, method: str, request: Any) -> Any:
        call = lambda: getattr(self._stub, method)(request, timeout=self._timeout)  # noqa: E731
        return _call(what, self._server, call, self.trust_domain)

    def create_entry(
        self,
        spiffe_id: str,
        dns_names: list[str] | None = None,
        ttl: datetime.timedelta | None = None,
        *,
        parent_id: str = "",
        selectors: Sequence[str] = (),
        svid_types: Sequence[str] = (),
    ) -> Any:
        """Register ``spiffe_id``; with ``parent_id`` (a node agent's ID) and ``selectors``, for that agent only.

        ``svid_types``: ``classical`` and/or ``ml-dsa-65`` (none given: classical only).
        """
        request = registration_pb2.CreateEntryRequest(
            spiffe_id=spiffe_id,
            dns_names=dns_names or [],
            ttl_seconds=int(ttl.total_seconds()) if ttl else 0,
            parent_id=parent_id,
            selectors=list(selectors),
            svid_types=list(svid_types),
        )
        return self._do("entry create", "CreateEntry", request)

    def list_entries(self) -> list[Any]:
        return list(self._do("entry list", "ListEntries", registration_pb2.ListEntriesRequest()).entries)

    def delete_entry(self, spiffe_id: str) -> None:
        self._do("entry delete", "DeleteEntry", registration_pb2.DeleteEntryRequest(spiffe_id=spiffe_id))

    def create_token(self, spiffe_id: str, ttl: datetime.timedelta | None = None) -> Any:
        request = registration_pb2.CreateJoinTokenRequest(
            spiffe_id=spiffe_id, ttl_seconds=int(ttl.total_seconds()) if ttl else 0
        )
        return self._do("token create", "CreateJoinToken", request)

    def create_agent_token(self, name: str, ttl: datetime.timedelta | None = None) -> Any:
        """A join token for node agent ``name`` (``spiffe://<td>/meshid/agent/<name>``) to attest with.

        Raises:
            InvalidSpiffeIdError: ``name`` is not one SPIFFE ID path segment.
        """
        return self.create_token(str(agent_id(self.trust_domain, name)), ttl)

    def list_agents(self) -> list[Any]:
        """The node agents the CA knows (``AgentInfo`` messages), evicted ones too."""
        return list(self._do("agent list", "ListAgents", registration_pb2.ListAgentsRequest()).agents)

    def evict_agent(self, spiffe_id: str) -> list[str]:
        """Evict a node agent; returns the serials (hex) of its SVIDs revoked now."""
        request = registration_pb2.EvictAgentRequest(spiffe_id=spiffe_id)
        return list(self._do("agent evict", "EvictAgent", request).serials)

    def revoke(self, *, serial: str = "", spiffe_id: str = "") -> list[str]:
        request = (
            registration_pb2.RevokeSvidsRequest(serial=serial)
            if serial
            else registration_pb2.RevokeSvidsRequest(spiffe_id=spiffe_id)
        )
        return list(self._do("svid revoke", "RevokeSvids", request).serials)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_fetched(out: str | os.PathLike[str], svid: X509Svid, bundle: TrustBundle) -> None:
    """Write ``svid.pem``, ``svid.key`` (0600) and ``bundle.pem`` atomically into ``out``."""
    from meshid._files import write_svid_files

    write_svid_files(out, svid.chain_pem(), svid.key_pem(), bundle.to_pem())
