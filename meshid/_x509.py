"""Small helpers on top of ``cryptography`` shared by the identity modules."""

from __future__ import annotations

import base64
import hashlib
import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | mldsa.MLDSA65PrivateKey
)

#: ML-DSA (FIPS 204) keys: the post-quantum signature keys a certificate may carry (RFC 9881).
MLDSA_PUBLIC_KEYS = (mldsa.MLDSA44PublicKey, mldsa.MLDSA65PublicKey, mldsa.MLDSA87PublicKey)
MLDSA_PRIVATE_KEYS = (mldsa.MLDSA44PrivateKey, mldsa.MLDSA65PrivateKey, mldsa.MLDSA87PrivateKey)

# Inputs larger than this are refused before parsing: no sane chain or bundle is near it.
MAX_PEM_BYTES = 1 << 20

#: What ``cryptography`` may raise while parsing a certificate, key or CSR, or reading its
#: extensions lazily: loaders turn any of these into meshid's own errors.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)

#: The same, plus the errors of reading a file or decoding a name.
READ_ERRORS: tuple[type[Exception], ...] = (OSError, UnicodeError, *PARSE_ERRORS)

_BEGIN = b"-----BEGIN "
_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Split PEM text into ``(label, whole block)`` pairs, in order; one pass, linear in the input.

    Raises:
        ValueError: a block begins but never ends (a truncated file), or has a malformed label.
    """
    blocks = []
    position = data.find(_BEGIN)
    while position >= 0:
        label = _LABEL.match(data, position)
        if label is None:
            raise ValueError("a PEM block has a malformed BEGIN line")
        end_marker = b"-----END " + label.group(1) + b"-----"
        end = data.find(end_marker, label.end())
        next_begin = data.find(_BEGIN, label.end())
        if end < 0 or 0 <= next_begin < end:
            raise ValueError(f"a PEM {label.group(1).decode()!r} block is truncated (BEGIN without matching END)")
        stop = end + len(end_marker)
        blocks.append((label.group(1).decode(), data[position:stop]))
        position = data.find(_BEGIN, stop)
    return blocks


def as_bytes(data: bytes | str) -> bytes:
    """PEM given as str, as bytes; characters UTF-8 cannot carry (lone surrogates) become '?'."""
    return data.encode("utf-8", "replace") if isinstance(data, str) else data


def thumbprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def uri_sans(cert: x509.Certificate) -> list[str]:
    return _sans(cert, x509.UniformResourceIdentifier)


def dns_sans(cert: x509.Certificate) -> list[str]:
    return _sans(cert, x509.DNSName)


def _sans(cert: x509.Certificate, kind: type[x509.UniformResourceIdentifier | x509.DNSName]) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    # As GeneralNames.get_values_for_type, by exact type: cryptography makes the names it parses
    # of these exact classes, and an isinstance check through their ABC costs more than the rest.
    return [name.value for name in ext.value if type(name) is kind]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(der: bytes) -> bytes:
    """A DER CRL as one PEM ``X509 CRL`` block (what nginx's ``ssl_crl`` and ``openssl crl`` read)."""
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN X509 CRL-----\n" + "\n".join(lines) + "\n-----END X509 CRL-----\n").encode()


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_sha256(key: object) -> bytes:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo: what the CA records of a key (to
    refuse one certified before), and the SKI of the leaves it signs (RFC 7093 method 4)."""
    return spki_sha256(public_key_der(key))


def spki_sha256(spki_der: bytes) -> bytes:
    """:func:`key_sha256` of a key whose DER SubjectPublicKeyInfo the caller holds already."""
    return hashlib.sha256(spki_der).digest()


_MLDSA_NAMES = {
    mldsa.MLDSA44PublicKey: "ML-DSA-44",
    mldsa.MLDSA65PublicKey: "ML-DSA-65",
    mldsa.MLDSA87PublicKey: "ML-DSA-87",
}
_CURVE_NAMES = {"secp256r1": "P256", "secp384r1": "P384", "secp521r1": "P521"}


def key_algorithm(key: object) -> str:
    """The signature algorithm a public key signs with, as meshid names it.

    ``ML-DSA-44``/``ML-DSA-65``/``ML-DSA-87``, ``ECDSA-P256``/``ECDSA-P384``/``ECDSA-P521``,
    ``RSA-<bits>``, ``Ed25519``, ``Ed448``; ``unknown`` for anything else. In TLS 1.3 the peer
    proves its identity with a CertificateVerify signature made by its leaf's key, so this
    names what authenticated it.
    """
    for kind, name in _MLDSA_NAMES.items():
        if isinstance(key, kind):
            return name
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA-" + _CURVE_NAMES.get(key.curve.name, key.curve.name)
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return "unknown"


def is_post_quantum(algorithm: str | None) -> bool:
    """Whether a name from :func:`key_algorithm` is a post-quantum signature algorithm (ML-DSA)."""
    return algorithm is not None and algorithm.startswith("ML-DSA-")


#: By the key's class (a handful, cryptography's own): whether it is an ML-DSA key.
_POST_QUANTUM_CLASSES: dict[type, bool] = {}


def is_post_quantum_key(key: object) -> bool:
    """``is_post_quantum(key_algorithm(key))``, answered once per key class (the CA asks it for
    every CSR of a node agent's batch, where the ABC checks of :func:`key_algorithm` showed)."""
    kind = type(key)
    known = _POST_QUANTUM_CLASSES.get(kind)
    if known is None:
        known = _POST_QUANTUM_CLASSES[kind] = isinstance(key, MLDSA_PUBLIC_KEYS)
    return known


_SIG = x509.oid.SignatureAlgorithmOID
_SIGNATURE_NAMES = {
    _SIG.ML_DSA_44: "ML-DSA-44",
    _SIG.ML_DSA_65: "ML-DSA-65",
    _SIG.ML_DSA_87: "ML-DSA-87",
    _SIG.ECDSA_WITH_SHA256: "ECDSA-SHA256",
    _SIG.ECDSA_WITH_SHA384: "ECDSA-SHA384",
    _SIG.ECDSA_WITH_SHA512: "ECDSA-SHA512",
    _SIG.RSA_WITH_SHA256: "RSA-SHA256",
    _SIG.RSA_WITH_SHA384: "RSA-SHA384",
    _SIG.RSA_WITH_SHA512: "RSA-SHA512",
    _SIG.RSASSA_PSS: "RSA-PSS",
    _SIG.ED25519: "Ed25519",
    _SIG.ED448: "Ed448",
}


def signature_algorithm(cert: x509.Certificate) -> str:
    """The algorithm of the signature on ``cert`` (its issuer's): ``ML-DSA-65``, ``ECDSA-SHA256``...

    The dotted OID for one meshid does not name.
    """
    oid = cert.signature_algorithm_oid
    return _SIGNATURE_NAMES.get(oid, oid.dotted_string)
