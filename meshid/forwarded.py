"""Identities forwarded by a TLS-terminating proxy (nginx, Envoy).

A proxy that terminates the client's mTLS passes the client's certificate on in a header:
nginx as ``$ssl_client_escaped_cert`` (URL-encoded PEM) in a header of your choosing, Envoy
in ``x-forwarded-client-cert`` (``Cert="<url-encoded PEM>";Chain="...";...``, one element per
hop). meshid believes such a header only when the *direct* peer is one of the configured proxy
SPIFFE IDs, and only after the forwarded certificate verifies against the bundle of its own
trust domain; from any other peer the header is ignored. A trusted proxy that forwards no
certificate is refused, not taken as the caller.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

from cryptography import x509

from meshid import _x509
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
    """Reads and verifies forwarded client certificates from trusted proxies; caches per header value.

    A trusted proxy must forward exactly one certificate: a call from it without the header
    (Envoy omits it when the client presented none) or with the header twice is refused, never
    decided as the proxy itself. The forwarded identity carries the TLS version and key
    exchange group of the proxy's connection to this server: that is the hop meshid sees, so
    ``require_pq_key_exchange`` and the TLS 1.3 floor apply to it.
    """

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
        # (the bundle set the verdicts were made against, the verdicts): swapped as one object
        self._cache: tuple[BundleSet | None, dict[tuple[str, str | None, str | None], PeerIdentity | str]] = (None, {})
        self._cache_size = cache_size

    def from_proxy(self, peer: PeerIdentity) -> bool:
        return peer.spiffe_id is not None and peer.spiffe_id in self.proxies

    def identify(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, proxy: PeerIdentity, now: float
    ) -> PeerIdentity:
        """The verified identity ``proxy`` forwarded.

        Raises:
            VerificationError: no forwarded certificate, more than one, or one that is
                malformed, expired or does not verify against its trust domain's bundle.
        """
        values = [
            item.decode("latin-1") if isinstance(item, bytes) else item
            for key, item in metadata or ()
            if key.lower() == self.header
        ]
        if not values:
            raise VerificationError(
                f"forwarded certificate: proxy {proxy.describe()} forwarded no client certificate in {self.header}"
            )
        if len(values) > 1:
            raise VerificationError(f"forwarded certificate: header {self.header} appears {len(values)} times")
        value = values[0]
        if len(value) > MAX_HEADER_BYTES:
            raise VerificationError(
                f"forwarded certificate: header {self.header} is larger than {MAX_HEADER_BYTES} bytes"
            )
        bundles = self._bundles()
        cached_for, cache = self._cache
        if cached_for is not bundles:
            cache = {}
            self._cache = (bundles, cache)
        key = (value, proxy.tls_version, proxy.key_exchange_group)
        result = cache.get(key)
        if result is None:
            try:
                result = dataclasses.replace(
                    self._verify(value, bundles),
                    tls_version=proxy.tls_version,
                    key_exchange_group=proxy.key_exchange_group,
                )
            except VerificationError as err:
                result = str(err)
            if len(cache) >= self._cache_size:
                cache.clear()
            cache[key] = result
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
        except _x509.PARSE_ERRORS as err:
            raise VerificationError(f"forwarded certificate: not a PEM certificate in {self.header}: {err}") from err
        try:
            spiffe_id = bundles.verify(leaf, [c for c in chain if c != leaf])
            return PeerIdentity.from_certificate(leaf, spiffe_id=spiffe_id)
        except _x509.PARSE_ERRORS as err:  # a malformed extension, found while reading SANs
            raise VerificationError(f"forwarded certificate: unreadable: {err}") from err
