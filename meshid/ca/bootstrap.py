"""The anonymous client certificate that lets a workload reach the CA before it has an SVID.

grpcio's Python servers either require a client certificate or never ask for one; they cannot
ask without requiring. The CA serves first issuance (join token) and renewal (mTLS) on one
port, so it adds one extra root to the roots it accepts *at the TLS layer*: a fixed
"anonymous" Ed25519 CA whose key is derived from a public constant, so anyone can compute it.
A workload without an SVID presents the matching anonymous leaf. (ECDSA P-256, since grpc's
TLS stack offers no Ed25519 signature algorithm for client certificates.) This grants nothing:
meshid's interceptor never trusts grpc's TLS verdict, it re-verifies every peer against the
trust domain's bundle, where the anonymous root never is. Such a peer is treated exactly as
one with no certificate, and reaches only the methods open without authentication
(IssueWithToken, GetBundle, GetCrl, health).

The keys are derived from the constant, and signatures use RFC 6979 deterministic ECDSA, so
client and server compute the same certificates without storing or shipping a key.
"""

from __future__ import annotations

import datetime
import functools
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["anonymous_client", "anonymous_root_pem"]

_SEED = b"meshid anonymous bootstrap client, public by design, v1"
_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(2124, 1, 1, tzinfo=datetime.UTC)


def _key(label: bytes) -> ec.EllipticCurvePrivateKey:
    # SHA-256 output reduced below the P-256 group order: a valid, reproducible private scalar.
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    scalar = int.from_bytes(hashlib.sha256(_SEED + label).digest(), "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


@functools.cache
def _certificates() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_key, leaf_key = _key(b"/root"), _key(b"/leaf")
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshid anonymous bootstrap CA (not trusted)")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshid anonymous bootstrap client")]))
        .issuer_name(root_name)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return root, leaf, leaf_key


def anonymous_root_pem() -> bytes:
    """The anonymous root, PEM: added by the CA to the roots its TLS layer accepts."""
    return _certificates()[0].public_bytes(serialization.Encoding.PEM)


def anonymous_client() -> tuple[bytes, bytes]:
    """The anonymous client's (key PEM, certificate PEM)."""
    _, leaf, key = _certificates()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, leaf.public_bytes(serialization.Encoding.PEM)
