"""Identities forwarded by a TLS-terminating proxy (nginx, Envoy).

A proxy that terminates the client's mTLS passes the client's certificate on in a header:
nginx as ``$ssl_client_escaped_cert`` (URL-encoded PEM) in a header of your choosing, Envoy
in ``x-forwarded-client-cert`` (``Cert="<url-encoded PEM>";Chain="...";...``, one element per
hop). meshid believes such a header only when the *direct* peer is one of the configured proxy
SPIFFE IDs, and only after the forwarded certificate verifies against the bundle of its own
trust domain; from any other peer the header is ignored. A trusted proxy that forwards no
certificate is refused, not taken as the caller.

Both headers are parsed strictly, since a lenient parser lets a client smuggle a value past
the one the proxy appended: XFCC by Envoy's grammar (:func:`parse_xfcc`), of which only the
last element (the trusted proxy's own) counts; a ``Cert`` and the nginx header must decode to
exactly one PEM certificate and nothing else, and a ``Hash``, where present, must be the
SHA-256 of that certificate's DER.
"""

from __future__ import annotations

import dataclasses
import hashlib
import urllib.parse
from collections.abc import Callable, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid import _x509
from meshid._cache import BoundedCache
from meshid.bundle import BundleSet
from meshid.errors import VerificationError
from meshid.peer import PeerIdentity, entry_size
from meshid.spiffeid import SpiffeId

__all__ = ["XFCC_HEADER", "ForwardedIdentities"]

XFCC_HEADER = "x-forwarded-client-cert"
#: Longest forwarded header meshid reads (a PEM chain of a few certificates, URL-encoded).
MAX_HEADER_BYTES = 32 * 1024


#: The keys Envoy writes in an XFCC element; URI and DNS repeat, one pair per SAN.
_XFCC_KEYS = frozenset({"by", "hash", "cert", "chain", "subject", "uri", "dns"})
_XFCC_REPEATABLE = frozenset({"uri", "dns"})
_UNQUOTED_FORBIDDEN = frozenset('"=')


def parse_xfcc(value: str) -> list[dict[str, list[str]]]:
    """Parse an XFCC header strictly, by Envoy's grammar: elements split by ``,``, pairs by
    ``;``, ``key=value`` with case-insensitive keys, and values that hold ``,``, ``;`` or ``=``
    double-quoted with ``\\"`` for a quote inside.

    Returns each element as a dict from lower-case key to its values (URI and DNS may repeat).

    Raises:
        VerificationError: an unbalanced quote, text after a closing quote, an empty element,
            pair or key, a key Envoy does not write, a key that repeats, or a value that
            needed quotes.
    """
    elements: list[dict[str, list[str]]] = []
    pairs: dict[str, list[str]] = {}
    i, n = 0, len(value)
    while True:
        eq = value.find("=", i)
        stop = min((p for p in (value.find(";", i), value.find(",", i)) if p >= 0), default=n)
        if eq < 0 or eq > stop:
            raise VerificationError(f"forwarded certificate: XFCC pair {i}: not key=value")
        key = value[i:eq].strip().lower()
        if not key:
            raise VerificationError(f"forwarded certificate: XFCC pair {i}: empty key")
        if key not in _XFCC_KEYS:
            raise VerificationError(f"forwarded certificate: XFCC key {key[:32]!r} is not one Envoy writes")
        if key in pairs and key not in _XFCC_REPEATABLE:
            raise VerificationError(f"forwarded certificate: XFCC key {key!r} appears twice in one element")
        i = eq + 1
        if i < n and value[i] == '"':
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise VerificationError("forwarded certificate: XFCC value has an unbalanced quote")
                ch = value[i]
                if ch == "\\" and i + 1 < n and value[i + 1] in '"\\':
                    chars.append(value[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    chars.append(ch)
                    i += 1
            text = "".join(chars)
            if i < n and value[i] not in ";,":
                raise VerificationError(f"forwarded certificate: XFCC text after a closing quote at offset {i}")
        else:
            end = min((p for p in (value.find(";", i), value.find(",", i)) if p >= 0), default=n)
            text = value[i:end]
            if any(ch in _UNQUOTED_FORBIDDEN for ch in text):
                raise VerificationError(f"forwarded certificate: XFCC value of {key!r} holds '\"' or '=' unquoted")
            i = end
        pairs.setdefault(key, []).append(text)
        if i >= n:
            elements.append(pairs)
            return elements
        sep = value[i]
        i += 1
        if sep == ",":
            elements.append(pairs)
            pairs = {}
        if i >= n or value[i] in ";,":
            raise VerificationError(f"forwarded certificate: XFCC has an empty {'element' if sep == ',' else 'pair'}")


def _one_pem_certificate(text: str, header: str) -> x509.Certificate:
    """Exactly one PEM certificate and nothing else (but white space) in ``text``."""
    certs = _pem_certificates(text, header, "Cert")
    if len(certs) != 1:
        raise VerificationError(
            f"forwarded certificate: {header} must carry exactly one PEM certificate, found {len(certs)}"
        )
    return certs[0]


def _pem_certificates(text: str, header: str, field: str) -> list[x509.Certificate]:
    data = _x509.as_bytes(text)
    try:
        blocks = _x509.pem_blocks(data)
    except ValueError as err:
        raise VerificationError(f"forwarded certificate: not a PEM certificate in {header} {field}: {err}") from err
    if not blocks:
        raise VerificationError(f"forwarded certificate: not a PEM certificate in {header} {field}")
    rest = data
    certs = []
    for label, block in blocks:
        if label != "CERTIFICATE":
            raise VerificationError(f"forwarded certificate: {header} {field} holds a PEM {label!r} block")
        before, _, rest = rest.partition(block)
        if before.strip():
            raise VerificationError(f"forwarded certificate: {header} {field} holds text outside its PEM blocks")
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except _x509.PARSE_ERRORS as err:
            raise VerificationError(f"forwarded certificate: not a PEM certificate in {header} {field}: {err}") from err
    if rest.strip():
        raise VerificationError(f"forwarded certificate: {header} {field} holds text outside its PEM blocks")
    return certs


#: A verdict's key: the header's digest, and the proxy hop's TLS version, group and signatures.
_Key = tuple[bytes, str | None, str | None, tuple[str, ...]]


class ForwardedIdentities:
    """Reads and verifies forwarded client certificates from trusted proxies; caches per header value.

    A trusted proxy must forward exactly one certificate: a call from it without the header
    (Envoy omits it when the client presented none) or with the header twice is refused, never
    decided as the proxy itself. The forwarded identity carries the TLS version and key
    exchange group of the proxy's connection to this server: that is the hop meshid sees, so
    ``require_pq_key_exchange`` and the TLS 1.3 floor apply to it. The cache starts over when
    the bundle set changes (and when full), calling ``on_clear`` each time it drops entries.
    """

    def __init__(
        self,
        proxies: Iterable[SpiffeId | str],
        bundles: Callable[[], BundleSet],
        *,
        header: str = XFCC_HEADER,
        cache_size: int = 4096,
        cache_bytes: int = 16 << 20,
        on_clear: Callable[[], None] | None = None,
    ) -> None:
        self.proxies = frozenset(p if isinstance(p, SpiffeId) else SpiffeId.parse(p) for p in proxies)
        self.header = header.lower()
        self._bundles = bundles
        # Verdicts keyed by a digest of the header (never the caller's text itself), bounded by
        # entries and bytes, for the bundle set they were made against.
        self._cache: BoundedCache[_Key, PeerIdentity | str] = BoundedCache(
            max_entries=cache_size, max_bytes=cache_bytes, on_clear=on_clear
        )
        self._cache_for: BundleSet | None = None

    @property
    def generation(self) -> int:
        """Changes whenever the cached verdicts are dropped (see :class:`meshid.peer.PeerVerifier`)."""
        return self._cache.generation

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
        cache = self._cache
        if self._cache_for is not bundles:
            cache.clear()
            self._cache_for = bundles
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
        # A forwarded certificate is public: the proxy's handshake is what authenticated the call,
        # so its signatures (its key's, its chain's) join the forwarded chain's for a PQ claim.
        hop = (
            proxy.signature_algorithm or "unknown",
            *(proxy.chain_signature_algorithms or (proxy.issuer_signature_algorithm or "unknown",)),
        )
        key = (digest, proxy.tls_version, proxy.key_exchange_group, hop)
        result = cache.get(key)
        if result is None:
            try:
                verified = self._verify(value, bundles)
                result = dataclasses.replace(
                    verified,
                    tls_version=proxy.tls_version,
                    key_exchange_group=proxy.key_exchange_group,
                    chain_signature_algorithms=(*verified.chain_signature_algorithms, *hop),
                )
            except VerificationError as err:
                result = str(err)[:1024]
            if self._cache_for is bundles:
                cache.put(key, result, entry_size(len(value)))
        if isinstance(result, str):
            raise VerificationError(result)
        if result.not_after.timestamp() < now:
            raise VerificationError(
                f"forwarded certificate of {result.describe()}: expired at {result.not_after.isoformat()}"
            )
        return result

    def _verify(self, value: str, bundles: BundleSet) -> PeerIdentity:
        if not value.strip():
            raise VerificationError(f"forwarded certificate: not a PEM certificate in {self.header}: it is empty")
        chain: Sequence[x509.Certificate] = ()
        if self.header == XFCC_HEADER:
            last = parse_xfcc(value)[-1]  # only the element the trusted proxy appended counts
            if "cert" not in last:
                raise VerificationError(
                    f"forwarded certificate: not a PEM certificate in {self.header}: the proxy's element has no Cert"
                )
            leaf = _one_pem_certificate(urllib.parse.unquote(last["cert"][0]), self.header)
            if "chain" in last:
                chain = _pem_certificates(urllib.parse.unquote(last["chain"][0]), self.header, "Chain")
            if "hash" in last:
                digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
                if last["hash"][0].lower() != digest:
                    raise VerificationError(
                        f"forwarded certificate: {self.header} Hash is not the SHA-256 of the forwarded Cert"
                    )
        else:
            leaf = _one_pem_certificate(urllib.parse.unquote(value), self.header)
        try:
            spiffe_id, path = bundles.verify_path(leaf, [c for c in chain if c != leaf])
            return dataclasses.replace(
                PeerIdentity.from_certificate(leaf, spiffe_id=spiffe_id),
                chain_signature_algorithms=tuple(_x509.signature_algorithm(c) for c in path[:-1]),
            )
        except _x509.PARSE_ERRORS as err:  # a malformed extension, found while reading SANs
            raise VerificationError(f"forwarded certificate: unreadable: {err}") from err
