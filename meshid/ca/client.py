"""Talking to a meshid CA: first issuance with a join token, renewal, bundle, CRL, admin calls.

Every call pins the CA's identity (``spiffe://<td>/meshid/ca``) and trusts only the roots it
was given, so a join token or CSR never reaches another server. Names say how a call
authenticates: ``*_with_token`` (the anonymous bootstrap certificate and a join token),
``*_with_svid`` (mTLS with the workload's current SVID), ``*_anonymously`` (the anonymous
certificate; only what is public), and :class:`AdminClient` (the admin SVID). ``fetch_svid``
(with a token, from a bundle file, across replicas) and ``renew_svid`` (with the SVID) return
``(svid, bundle)`` for scripts; the others an :class:`Issuance`.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cryptography import x509

from meshid._proto import issuer_pb2, issuer_pb2_grpc, registration_pb2, registration_pb2_grpc
from meshid.bundle import BundleSet, TrustBundle
from meshid.ca.authority import generate_key
from meshid.ca.bootstrap import anonymous_client
from meshid.ca.csr import build_csr
from meshid.ca.issuing import parse_token_trust_domain
from meshid.credentials import merge_options
from meshid.errors import InvalidBundleError, InvalidSvidError, RemoteError, VerificationError
from meshid.sources import FileSource
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid, identity_dns_name

__all__ = [
    "AdminClient",
    "Issuance",
    "fetch_svid",
    "get_bundle_anonymously",
    "get_bundle_with_svid",
    "get_crl_with_svid",
    "issue_with_token",
    "renew_svid",
    "renew_with_svid",
]

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0


def ca_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    return SpiffeId.from_parts(trust_domain, "meshid", "ca")


def _channel(
    server: str, roots_pem: bytes, trust_domain: TrustDomain, key_pem: bytes, chain_pem: bytes
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(roots_pem, key_pem, chain_pem)
    pin = [("grpc.ssl_target_name_override", identity_dns_name(ca_spiffe_id(trust_domain)))]
    return grpc.secure_channel(server, creds, options=merge_options(pin, None))


def _call(what: str, server: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as err:
        code = err.code().name if err.code() is not None else "UNKNOWN"
        details = err.details() or ""
        if code == "UNAVAILABLE" and not details.startswith("CA"):  # not the CA's own answer
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
    if response.issued_at:
        issued_at = datetime.datetime.fromtimestamp(response.issued_at, datetime.UTC)
        lifetime = svid.not_after - issued_at
    else:  # an older CA: fall back on the certificate (NotBefore may be backdated)
        lifetime = svid.not_after - svid.not_before
    return Issuance(svid, bundle, max(lifetime, datetime.timedelta(0)))


def _svid_from(response: Any, key: Any) -> tuple[X509Svid, TrustBundle]:
    try:
        chain = [x509.load_der_x509_certificate(der) for der in response.chain]
        roots = tuple(x509.load_der_x509_certificate(der) for der in response.bundle.roots)
    except ValueError as err:
        raise InvalidSvidError(f"X509-SVID: the CA returned an unreadable certificate: {err}") from err
    svid = X509Svid.from_parts(chain, key)
    bundle = TrustBundle(svid.spiffe_id.trust_domain, roots, response.bundle.sequence or None)
    BundleSet.of(bundle).verify(svid.leaf, svid.chain[1:])
    return svid, bundle


def read_roots(bundle_file: str | os.PathLike[str]) -> bytes:
    """The PEM roots a workload trusts the CA by, before it has a bundle of its own."""
    return TrustBundle.load(TrustDomain("bootstrap"), bundle_file).to_pem()


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
        response = _call("svid fetch", server, lambda: stub.IssueWithToken(request, timeout=timeout))
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
        response = _call("svid renew", server, lambda: stub.Renew(request, timeout=timeout))
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
        response = _call("bundle", server, lambda: stub.GetBundle(issuer_pb2.GetBundleRequest(), timeout=timeout))
    try:
        roots_found = tuple(x509.load_der_x509_certificate(der) for der in response.roots)
        return TrustBundle(td, roots_found, response.sequence or None)
    except ValueError as err:
        raise InvalidBundleError(f"trust bundle: the CA returned an unreadable root: {err}") from err


def get_crl_with_svid(
    server: str, svid: X509Svid, bundles: BundleSet, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[bytes, list[x509.Certificate]]:
    """The CA's current CRL (DER) and the chain of the CA certificate that signed it."""
    td = svid.spiffe_id.trust_domain
    with _channel(server, bundles[td].to_pem(), td, svid.key_pem(), svid.chain_pem()) as channel:
        stub = issuer_pb2_grpc.IssuerStub(channel)  # type: ignore[no-untyped-call]
        response = _call("CRL", server, lambda: stub.GetCrl(issuer_pb2.GetCrlRequest(), timeout=timeout))
    try:
        return response.der, [x509.load_der_x509_certificate(der) for der in response.issuer_chain]
    except ValueError as err:
        raise VerificationError(f"CRL: the CA returned an unreadable issuer certificate: {err}") from err


class AdminClient:
    """Admin calls with the admin SVID that ``meshid ca init`` left in ``DIR/admin``."""

    def __init__(self, server: str, data_dir: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        folder = pathlib.Path(data_dir) / "admin"
        source = FileSource(folder / "svid.pem", folder / "svid.key", folder / "bundle.pem")
        svid = source.get_svid()
        td = svid.spiffe_id.trust_domain
        self._server = server
        self._timeout = timeout
        self._channel = _channel(server, source.get_bundles()[td].to_pem(), td, svid.key_pem(), svid.chain_pem())
        self._stub = registration_pb2_grpc.RegistrationStub(self._channel)  # type: ignore[no-untyped-call]

    def _do(self, what: str, method: str, request: Any) -> Any:
        return _call(what, self._server, lambda: getattr(self._stub, method)(request, timeout=self._timeout))

    def create_entry(
        self, spiffe_id: str, dns_names: list[str] | None = None, ttl: datetime.timedelta | None = None
    ) -> Any:
        request = registration_pb2.CreateEntryRequest(
            spiffe_id=spiffe_id, dns_names=dns_names or [], ttl_seconds=int(ttl.total_seconds()) if ttl else 0
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
