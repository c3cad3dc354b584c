"""The CA's CSR check over each key and digest it accepts: a good signature passes, a changed
byte anywhere in what is signed, or in the signature, is refused (the EC path verifies with the
key it already read; the others with cryptography's ``is_signature_valid``)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshid.ca.authority import generate_key
from meshid.ca.csr import parse_csr
from meshid.errors import InvalidRequestError

URI = "spiffe://example.org/web"

KINDS = [
    ("ec-p256", hashes.SHA256()),
    ("ec-p256", hashes.SHA384()),
    ("ec-p256", hashes.SHA512()),
    ("ec-p384", hashes.SHA384()),
    ("ec-p384", hashes.SHA256()),
    ("rsa-2048", hashes.SHA256()),
    ("ed25519", None),
]


def _csr(kind: str, digest: hashes.HashAlgorithm | None) -> tuple[bytes, object]:
    key = generate_key(kind)
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URI)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).add_extension(san, False)
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER), key  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "digest"), KINDS, ids=[f"{k}-{d.name if d else 'pure'}" for k, d in KINDS])
def test_a_good_signature_passes_and_a_changed_byte_is_refused(kind, digest) -> None:
    der, key = _csr(kind, digest)
    parsed = parse_csr(der)
    assert parsed.requested_uris == (URI,)
    assert parsed.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    in_signature = bytearray(der)
    in_signature[-3] ^= 0x01
    at = der.index(URI.encode()) + len("spiffe://")  # in the signed part: the SAN asks for another ID
    in_request = bytearray(der)
    in_request[at] ^= 0x01
    for changed in (in_signature, in_request):
        with pytest.raises(InvalidRequestError, match=r"^CSR: ") as refused:
            parse_csr(bytes(changed))
        # A flipped bit of an ECDSA or RSA signature can also break its DER (a parse error):
        # either way, a precise refusal and never a parsed CSR.
        assert "signature" in str(refused.value) or "well-formed" in str(refused.value)
