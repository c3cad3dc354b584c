"""CSRs as the CA accepts them: a verified signature over an allowed key type, and nothing else.

What a CSR asks for (SANs, the CA bit, extensions) is never copied into a certificate; the
registration entry decides. :func:`parse_csr` still reports the URI SANs it asks for, so that
a renewal that explicitly asks for another SPIFFE ID can be refused rather than silently
rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa

from meshid import _x509
from meshid.ca.authority import PublicKey
from meshid.errors import InvalidRequestError

__all__ = ["MAX_CSR_BYTES", "ParsedCsr", "build_csr", "parse_csr"]

#: A CSR larger than this is refused before parsing (a P-384 or RSA-4096 CSR is well under 2 KiB,
#: an ML-DSA-65 one, with its 1952-byte key and 3309-byte signature, about 5.3 KiB).
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
#: Builders are immutable: each CSR starts from this one (a node agent makes thousands at a time).
_EMPTY_SUBJECT = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))


@dataclass(frozen=True, slots=True)
class ParsedCsr:
    public_key: PublicKey
    requested_uris: tuple[str, ...]


def _check_key(key: object) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise InvalidRequestError(f"CSR: EC curve {key.curve.name} is not allowed; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise InvalidRequestError(
                f"CSR: an RSA key of {key.key_size} bits is not allowed; use {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey):
        return key
    if isinstance(key, _x509.MLDSA_PUBLIC_KEYS):
        raise InvalidRequestError(f"CSR: an {_x509.key_algorithm(key)} key is not allowed; use ML-DSA-65")
    raise InvalidRequestError(
        f"CSR: key type {type(key).__name__} is not allowed; use EC P-256/P-384, RSA, Ed25519 or ML-DSA-65"
    )


#: ECDSA's signature algorithms by OID, each as the ``ec.ECDSA`` that verifies it (what
#: ``signature_algorithm_parameters`` gives, made once: its ABC checks cost more than the lookup).
_ECDSA_SIGNATURES = {
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}


def _signature_valid(csr: x509.CertificateSigningRequest, key: object) -> bool:
    """Whether the CSR's signature verifies with its own public key.

    For an EC key signed with ECDSA this is the check ``csr.is_signature_valid`` makes, over the
    key already read (``is_signature_valid`` reads and checks the key a second time, about a
    fifth of a node agent's batch of CSRs); every other key and algorithm goes to it.
    """
    ecdsa = _ECDSA_SIGNATURES.get(csr.signature_algorithm_oid)
    if ecdsa is not None and isinstance(key, ec.EllipticCurvePublicKey):
        try:
            key.verify(csr.signature, csr.tbs_certrequest_bytes, ecdsa)
        except InvalidSignature:
            return False
        return True
    return csr.is_signature_valid


def parse_csr(der: bytes, *, max_bytes: int = MAX_CSR_BYTES) -> ParsedCsr:
    """Parse and check a DER PKCS#10 request.

    Raises:
        InvalidRequestError: empty, oversized, malformed, a bad signature, or a refused key type.
    """
    if not isinstance(der, bytes | bytearray):
        raise InvalidRequestError("CSR: must be DER bytes")
    if not der:
        raise InvalidRequestError("CSR: is empty")
    if len(der) > max_bytes:
        raise InvalidRequestError(f"CSR: {len(der)} bytes is larger than the limit of {max_bytes}")
    try:
        return _parse(bytes(der))
    except InvalidRequestError:
        raise  # meshid's own verdict (also a ValueError): as it is
    except _x509.PARSE_ERRORS as err:  # cryptography reads a CSR's parts lazily; any may be malformed
        raise InvalidRequestError(f"CSR: not a well-formed PKCS#10 request: {err}") from err


def _parse(der: bytes) -> ParsedCsr:
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as err:
        raise InvalidRequestError(f"CSR: not a DER PKCS#10 request: {err}") from err
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as err:
        raise InvalidRequestError(f"CSR: its public key cannot be read: {err}") from err
    checked = _check_key(key)
    try:
        valid = _signature_valid(csr, key)
    except (ValueError, TypeError) as err:
        raise InvalidRequestError(f"CSR: its signature cannot be checked: {err}") from err
    if not valid:
        raise InvalidRequestError("CSR: the signature does not verify; it was not made with the key it carries")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    except ValueError as err:
        raise InvalidRequestError(f"CSR: its extensions cannot be read: {err}") from err
    return ParsedCsr(checked, uris)


_SHA256 = hashes.SHA256()
_UNKNOWN = object()
#: The digest a CSR over a key of each class is signed with (None: the algorithm signs the message).
_DIGEST_FOR: dict[type, object] = {}


def build_csr(private_key: object, *, uri: str | None = None) -> bytes:
    """A minimal DER CSR over ``private_key`` (what workloads send). ``uri`` adds a URI SAN."""
    builder = _EMPTY_SUBJECT
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    kind = type(private_key)  # a node agent builds thousands at a time: the ABC checks once per key class
    algorithm = _DIGEST_FOR.get(kind, _UNKNOWN)
    if algorithm is _UNKNOWN:
        # EdDSA and ML-DSA sign the message itself (RFC 9881: pure ML-DSA, no pre-hash)
        pure = isinstance(private_key, (ed25519.Ed25519PrivateKey, *_x509.MLDSA_PRIVATE_KEYS))
        algorithm = _DIGEST_FOR[kind] = None if pure else _SHA256
    csr = builder.sign(private_key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)
