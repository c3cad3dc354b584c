"""The SPIFFE Workload API's wire format, both ways: the endpoint address, the security header,
and ``X509SVIDResponse``/``X509BundlesResponse`` built from an SVID and bundles (server) and read
back into them (client). Certificates travel as concatenated DER, keys as PKCS#8 DER, bundles
keyed by the trust domain's SPIFFE ID (SPIFFE Workload API standard, section 5)."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from meshid import _x509
from meshid._proto import workload_pb2
from meshid.bundle import BundleSet, TrustBundle
from meshid.errors import InvalidBundleError, InvalidSvidError, SourceError
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid

__all__ = [
    "ENDPOINT_SOCKET_ENV",
    "HEADER_KEY",
    "HEADER_VALUE",
    "METADATA",
    "parse_x509_svid_response",
    "socket_path",
    "x509_bundles_response",
    "x509_svid_response",
]

#: The environment variable that names the Workload API endpoint (SPIFFE Workload Endpoint standard).
ENDPOINT_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
#: Every Workload API call carries this metadata header, and servers refuse calls without it.
HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"
METADATA = ((HEADER_KEY, HEADER_VALUE),)


def socket_path(endpoint: str) -> str:
    """The filesystem path of a Workload API endpoint: ``unix:///path``, ``unix:/path`` or a plain path.

    Raises:
        ValueError: not a Unix socket address, or a ``unix:`` URI with an authority, query,
            fragment or relative path.
    """
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError("Workload API endpoint: give a Unix socket, e.g. unix:///run/meshid/agent.sock")
    if endpoint.startswith("unix:"):
        uri = urllib.parse.urlsplit(endpoint)
        if uri.netloc:
            raise ValueError(f"Workload API endpoint {endpoint!r}: a host is not allowed; write unix:///absolute/path")
        if uri.query or uri.fragment:
            raise ValueError(f"Workload API endpoint {endpoint!r}: a query or fragment is not allowed")
        if not uri.path.startswith("/"):
            raise ValueError(f"Workload API endpoint {endpoint!r}: the path must be absolute (unix:///path)")
        return uri.path
    if "://" in endpoint or endpoint.startswith("tcp:"):
        raise ValueError(f"Workload API endpoint {endpoint!r}: only Unix sockets are supported (unix:///path)")
    return os.path.abspath(endpoint)


def _split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER values (certificates, as the Workload API sends them)."""
    out, i = [], 0
    while i < len(data):
        if data[i] != 0x30 or i + 2 > len(data):
            raise ValueError(f"byte {i} does not start a DER SEQUENCE")
        first = data[i + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            size = first & 0x7F
            if not 0 < size <= 4 or i + 2 + size > len(data):
                raise ValueError(f"bad DER length at byte {i}")
            length, head = int.from_bytes(data[i + 2 : i + 2 + size], "big"), 2 + size
        end = i + head + length
        if end > len(data):
            raise ValueError(f"DER value at byte {i} is truncated")
        out.append(data[i:end])
        i = end
    return out


def _certificates(data: bytes) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in _split_der(data)]


def _bundle(td: TrustDomain, data: bytes) -> TrustBundle:
    try:
        roots = _certificates(data)
    except ValueError as err:
        raise InvalidBundleError(f"trust bundle for {td} from the Workload API: not DER certificates: {err}") from err
    if not roots:
        raise InvalidBundleError(f"trust bundle for {td} from the Workload API: empty")
    for index, root in enumerate(roots):
        if not _x509.is_ca(root):
            raise InvalidBundleError(f"trust bundle for {td} from the Workload API: certificate {index} is not a CA")
    return TrustBundle(td, tuple(roots))


def parse_x509_svid_response(response: Any, want: SpiffeId | None) -> tuple[X509Svid, BundleSet]:
    """The chosen SVID of an ``X509SVIDResponse`` and the bundles it carries.

    Raises:
        MeshIdError: the response holds no (such) SVID, or an SVID or bundle that does not parse.
    """
    ids = [s.spiffe_id for s in response.svids]
    if not ids:
        raise SourceError("Workload API: the response holds no X509-SVID; is the workload registered?")
    if want is None:
        chosen = response.svids[0]
    elif str(want) in ids:
        chosen = response.svids[ids.index(str(want))]
    else:
        raise SourceError(f"Workload API: no X509-SVID for {want} in the response (it holds {', '.join(ids)})")
    try:
        chain = _certificates(chosen.x509_svid)
        key = serialization.load_der_private_key(chosen.x509_svid_key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidSvidError(f"X509-SVID {chosen.spiffe_id} from the Workload API: {err}") from err
    svid = X509Svid.from_parts(chain, key)  # type: ignore[arg-type]
    if str(svid.spiffe_id) != chosen.spiffe_id:
        raise InvalidSvidError(
            f"X509-SVID from the Workload API: labelled {chosen.spiffe_id} but the certificate says {svid.spiffe_id}"
        )
    own = svid.spiffe_id.trust_domain
    bundles = []
    for name, der in response.federated_bundles.items():
        td = TrustDomain.parse(name)
        if td != own:  # the SVID's own bundle is authoritative for its trust domain
            bundles.append(_bundle(td, der))
    bundles.append(_bundle(own, chosen.bundle))
    return svid, BundleSet.of(bundles)


def _der(svid: X509Svid) -> tuple[bytes, bytes]:
    chain = b"".join(c.public_bytes(serialization.Encoding.DER) for c in svid.chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key


def _roots_der(bundles: BundleSet) -> dict[str, bytes]:
    """Every trust domain's roots, DER concatenated, keyed by the trust domain's SPIFFE ID."""
    return {
        str(td.id()): b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle.roots)
        for td, bundle in bundles.items()
    }


def x509_svid_response(svid: X509Svid, bundles: BundleSet, additional: Sequence[tuple[str, X509Svid]] = ()) -> Any:
    """The ``X509SVIDResponse`` for one SVID: its own trust domain's bundle inline, others federated.

    ``additional`` SVIDs follow it, each with its ``hint`` (an ML-DSA SVID of the same SPIFFE ID:
    ``("ml-dsa-65", svid)``): a client that takes the first SVID, or the first of an ID, still
    gets ``svid``, as before.

    Raises:
        SourceError: ``bundles`` holds no bundle for an SVID's trust domain.
    """
    roots = _roots_der(bundles)
    entries = []
    for hint, one in (("", svid), *additional):
        own = one.spiffe_id.trust_domain
        if own not in bundles:
            raise SourceError(f"Workload API: the source has no trust bundle for {own}, the SVID's trust domain")
        chain, key = _der(one)
        entries.append(
            workload_pb2.X509SVID(
                spiffe_id=str(one.spiffe_id), x509_svid=chain, x509_svid_key=key, bundle=roots[str(own.id())], hint=hint
            )
        )
    for one in (svid, *(extra for _, extra in additional)):
        roots.pop(str(one.spiffe_id.trust_domain.id()), None)
    return workload_pb2.X509SVIDResponse(svids=entries, federated_bundles=roots)


def x509_bundles_response(svid: X509Svid, bundles: BundleSet) -> Any:
    return workload_pb2.X509BundlesResponse(bundles=_roots_der(bundles))
