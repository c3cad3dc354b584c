"""Identities forwarded by a TLS-terminating proxy (nginx, Envoy).

A proxy that terminates the client's mTLS passes the client's certificate on in a header:
nginx as ``$ssl_client_escaped_cert`` (URL-encoded PEM) in a header of your choosing, Envoy
in ``x-forwarded-client-cert`` (``Cert="<url-encoded PEM>";Chain="...";...``, one element per
hop). meshid believes such a header only when the *direct* peer is one of the configured proxy
SPIFFE IDs, and only after the forwarded certificate verifies against the bundle of its own
trust domain; from any other peer the header is ignored.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable, Sequence

from cryptography import x509

from meshid.bundle import BundleSet
from meshid.errors import VerificationError
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId

__all__ = ["XFCC_HEADER", "ForwardedIdentities"]

XFCC_HEADER = "x-forwarded-client-cert"
#: Longest forwarded header meshid reads (a PEM chain of a few certificates, URL-encoded).
MAX_HEADER_BYTES = 32 * 1024


def _xfcc_certificate(value: str) -> tuple[str, str]:
    """The last element's ``Cert`` and ``Chain`` fields (quoted values may hold ; and ,)."""
    elements: list[dict[str, str]] = [{}]
    key, buf, quoted, i = "", "", False, 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == '"':
                quoted = False
            elif ch == "\\" and i + 1 < len(value):
                i += 1
                buf += value[i]
            else:
                buf += ch
        elif ch == '"':
            quoted = True
        elif ch == "=" and not key:
            key, buf = buf.strip(), ""
        elif ch in ";,":
            if key:
                elements[-1][key.lower()] = buf
            key, buf = "", ""
            if ch == ",":
                elements.append({})
        else:
            buf += ch
        i += 1
    if key:
        elements[-1][key.lower()] = buf
    last = elements[-1]
    return last.get("cert", ""), last.get("chain", "")


class ForwardedIdentities:
    """Reads and verifies forwarded client certificates from trusted proxies; caches per header value."""

    def __init__(
        self,
        proxies: Iterable[SpiffeId | str],
        bundles: Callable[[], BundleSet],
        *,
        header: str = XFCC_HEADER,
        cache_size: int = 4096,
    ) -> None:
        self.proxies = frozenset(p if isinstance(p, SpiffeId) else SpiffeId.parse(p) for p in proxies)
        self.header = header.lower()
        self._bundles = bundles
        self._cache: dict[str, PeerIdentity | str] = {}
        self._cache_bundles: BundleSet | None = None
        self._cache_size = cache_size

    def from_proxy(self, peer: PeerIdentity) -> bool:
        return peer.spiffe_id is not None and peer.spiffe_id in self.proxies

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None, now: float) -> PeerIdentity | None:
        """The verified forwarded identity, or None if the proxy forwarded none.

        Raises:
            VerificationError: a forwarded certificate that is malformed, expired or unverified.
        """
        value = None
        for key, item in metadata or ():
            if key.lower() == self.header:
                value = item.decode("latin-1") if isinstance(item, bytes) else item
        if value is None:
            return None
        if len(value) > MAX_HEADER_BYTES:
            raise VerificationError(
                f"forwarded certificate: header {self.header} is larger than {MAX_HEADER_BYTES} bytes"
            )
        bundles = self._bundles()
        if self._cache_bundles is not bundles:
            self._cache, self._cache_bundles = {}, bundles
        result = self._cache.get(value)
        if result is None:
            try:
                result = self._verify(value, bundles)
            except VerificationError as err:
                result = str(err)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[value] = result
        if isinstance(result, str):
            raise VerificationError(result)
        if result.not_after.timestamp() < now:
            raise VerificationError(
                f"forwarded certificate of {result.describe()}: expired at {result.not_after.isoformat()}"
            )
        return result

    def _verify(self, value: str, bundles: BundleSet) -> PeerIdentity:
        if self.header == XFCC_HEADER:
            cert_text, chain_text = _xfcc_certificate(value)
        else:
            cert_text, chain_text = value, ""
        try:
            leaf = x509.load_pem_x509_certificate(urllib.parse.unquote(cert_text).encode())
            chain: Sequence[x509.Certificate] = (
                x509.load_pem_x509_certificates(urllib.parse.unquote(chain_text).encode()) if chain_text else ()
            )
        except ValueError as err:
            raise VerificationError(f"forwarded certificate: not a PEM certificate in {self.header}: {err}") from err
        intermediates = [c for c in chain if c != leaf]
        spiffe_id = bundles.verify(leaf, intermediates)
        return PeerIdentity.from_certificate(leaf, spiffe_id=spiffe_id)
