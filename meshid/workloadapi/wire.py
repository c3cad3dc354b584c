"""The SPIFFE Workload API's wire format, both ways: the endpoint address, the security header,
and ``X509SVIDResponse``/``X509BundlesResponse`` built from an SVID and bundles (server) and read
back into them (client). Certificates travel as concatenated DER, keys as PKCS#8 DER, bundles
keyed by the trust domain's SPIFFE ID (SPIFFE Workload API standard, section 5).

The JWT-SVID profile (section 6): ``JWTSVIDResponse`` carries tokens as they were issued;
``JWTBundlesResponse`` one JWK Set (RFC 7517) per trust domain holding only its ``jwt-svid``
keys (the standard forbids keys of other uses there), the server's own trust domain always,
empty if it has none; ``ValidateJWTSVIDResponse`` the claims as a ``google.protobuf.Struct``.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid import _x509
from meshid._proto import workload_pb2
from meshid.bundle import BundleSet, TrustBundle
from meshid.errors import InvalidBundleError, InvalidSvidError, SourceError
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = [
    "ENDPOINT_SOCKET_ENV",
    "HEADER_KEY",
    "HEADER_VALUE",
    "METADATA",
    "claims_struct",
    "jwks",
    "jwks_keys",
    "jwt_bundles_response",
    "jwt_svid_response",
    "parse_jwt_bundles_response",
    "parse_x509_svid_response",
    "same_trust",
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


# --- JWT-SVID profile --------------------------------------------------------------------


def _jwt_keys_der(bundle: TrustBundle) -> dict[str, bytes]:
    return {kid: _x509.public_key_der(key) for kid, key in bundle.jwt_authorities.items()}


def same_trust(a: TrustBundle, b: TrustBundle) -> bool:
    """Whether two bundles of a trust domain trust the same roots and the same JWT keys (by kid)."""
    return a.roots == b.roots and _jwt_keys_der(a) == _jwt_keys_der(b)


def jwks(bundle: TrustBundle) -> bytes:
    """The bundle's JWT keys as a JWK Set: its SPIFFE bundle's ``use: jwt-svid`` keys only."""
    document = json.loads(bundle.to_spiffe_json())
    keys = [key for key in document.get("keys", []) if key.get("use") == "jwt-svid"]
    return json.dumps({"keys": keys}, separators=(",", ":")).encode()


def jwt_bundles_response(bundles: BundleSet) -> Any:
    """The ``JWTBundlesResponse`` for ``bundles``: every trust domain's JWK Set, keyed by its SPIFFE ID."""
    return workload_pb2.JWTBundlesResponse(bundles={str(td.id()): jwks(bundle) for td, bundle in bundles.items()})


def jwt_svid_response(svids: Sequence[JwtSvid]) -> Any:
    return workload_pb2.JWTSVIDResponse(
        svids=[workload_pb2.JWTSVID(spiffe_id=str(s.spiffe_id), svid=s.token) for s in svids]
    )


def claims_struct(claims: Mapping[str, Any]) -> Any:
    """The claims of a validated JWT-SVID as a ``google.protobuf.Struct`` (numbers become doubles)."""
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(dict(claims))
    return struct


def parse_jwt_bundles_response(response: Any, bundles: BundleSet) -> BundleSet:
    """``bundles`` (the X.509 ones) with the JWT keys of a ``JWTBundlesResponse``.

    A trust domain of the response with no X.509 bundle in ``bundles`` is left out: meshid's
    bundles always hold a root. A trust domain with no entry in the response keeps no JWT keys.

    Raises:
        InvalidBundleError: a trust domain's JWK Set does not parse.
    """
    keyed: dict[TrustDomain, Mapping[str, Any]] = {}
    for name, document in response.bundles.items():
        try:
            td = TrustDomain.parse(name)
        except ValueError as err:
            raise InvalidBundleError(f"JWT bundle from the Workload API: {name[:100]!r} is not a trust domain") from err
        keyed[td] = jwks_keys(td, document)
    out = []
    for td, bundle in bundles.items():
        out.append(bundle.with_jwt_authorities(keyed.get(td, {})))
    return BundleSet.of(out)


_MAX_JWT_KEYS = 64
#: JWK members that only a private key has (RFC 7518 §6.2.2, §6.3.2, §6.4): refused in a bundle.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def jwks_keys(td: TrustDomain, document: bytes) -> Mapping[str, Any]:
    """The kid -> public key map of one JWK Set of ``td``'s JWT-SVID keys, read strictly by PyJWT.

    Raises:
        InvalidBundleError: not a JWK Set, or a key without a kid, of another use, private, or unreadable.
    """
    import jwt

    try:
        if len(document) > _x509.MAX_PEM_BYTES:
            raise ValueError(f"larger than {_x509.MAX_PEM_BYTES} bytes")
        raw = json.loads(document)
        if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
            raise ValueError("not a JWK Set (no keys list)")
        if len(raw["keys"]) > _MAX_JWT_KEYS:
            raise ValueError(f"more than {_MAX_JWT_KEYS} keys")
        keys: dict[str, Any] = {}
        for item in raw["keys"]:
            if not isinstance(item, dict) or item.get("use", "jwt-svid") != "jwt-svid":
                raise ValueError("a key is not a jwt-svid JWK")
            if _PRIVATE_MEMBERS & set(item):
                raise ValueError(f"the key {str(item.get('kid'))[:64]!r} holds private members")
            jwk = jwt.PyJWK.from_dict(item)
            if not isinstance(jwk.key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
                raise ValueError(f"the key {jwk.key_id!r} is not an EC or RSA public key")
            if not jwk.key_id or jwk.key_id in keys:
                raise ValueError(f"a key has an empty or repeated kid {jwk.key_id!r}")
            keys[jwk.key_id] = jwk.key
        return keys
    except KeyError as err:  # PyJWT reads some members without checking they are there ({"kty": "oct"})
        raise InvalidBundleError(f"JWT bundle for {td}: a key has no {err} member") from err
    except (ValueError, TypeError, jwt.exceptions.PyJWTError) as err:
        raise InvalidBundleError(f"JWT bundle for {td}: {err}") from err
