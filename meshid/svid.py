"""X509-SVIDs: a leaf certificate carrying a SPIFFE ID, its chain, and its private key."""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid import _x509
from meshid._x509 import PrivateKey
from meshid.errors import InvalidSpiffeIdError, InvalidSvidError
from meshid.spiffeid import SpiffeId, TrustDomain

__all__ = ["X509Svid", "identity_dns_name", "identity_dns_names", "spiffe_id_from_certificate"]

#: The reserved zone (RFC 2606 ``.invalid`` never resolves) of the names that pin an identity.
IDENTITY_DNS_ZONE = "meshid.invalid"


def identity_dns_name(identity: SpiffeId | TrustDomain) -> str:
    """The DNS name that stands for a SPIFFE ID (or a whole trust domain) in a server's certificate.

    grpcio's client checks a server's DNS SANs against the target name, never its URI SAN, so
    meshid's CA adds both names to every SVID and :func:`meshid.secure_channel` checks one of
    them with ``grpc.ssl_target_name_override`` when given ``server_id``. A trust domain's name
    is ``<td-hash>.td.meshid.invalid``; a SPIFFE ID's lies under its trust domain's,
    ``<id-hash>.<td-hash>.td.meshid.invalid``, so that one DNS name constraint on a CA
    (:meth:`meshid.ca.Authority.from_upstream`) confines it to its own trust domain's names.
    Each hash is the first 160 bits of SHA-256 of the canonical form, in lowercase base32
    (32 characters: 83 in all, within DNS's 63 per label and 253 per name).
    """
    trust_domain = identity if isinstance(identity, TrustDomain) else identity.trust_domain
    zone = f"{_hash_label(trust_domain)}.td.{IDENTITY_DNS_ZONE}"
    return zone if isinstance(identity, TrustDomain) else f"{_hash_label(identity)}.{zone}"


def _hash_label(identity: SpiffeId | TrustDomain) -> str:
    digest = hashlib.sha256(str(identity).encode()).digest()[:20]
    return base64.b32encode(digest).decode().lower()


# The CA asks for these names once per SVID it signs, for the same few IDs again at every
# renewal: a bounded memo (IDs are at most 2 KiB, so a few MB at most) saves the hashing.
@functools.lru_cache(maxsize=4096)
def identity_dns_names(spiffe_id: SpiffeId) -> tuple[str, str]:
    """The identity DNS names of ``spiffe_id`` and of its trust domain."""
    zone = _trust_domain_dns_name(spiffe_id.trust_domain)
    return f"{_hash_label(spiffe_id)}.{zone}", zone


@functools.lru_cache(maxsize=64)
def _trust_domain_dns_name(trust_domain: TrustDomain) -> str:
    return identity_dns_name(trust_domain)


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """Return the SPIFFE ID in a leaf certificate's single URI SAN.

    Raises:
        InvalidSvidError: there is not exactly one URI SAN, or it is not a valid SPIFFE ID.
    """
    uris = _x509.uri_sans(cert)
    if not uris:
        raise InvalidSvidError("X509-SVID: the certificate has no URI SAN; it must carry exactly one SPIFFE ID")
    if len(uris) > 1:
        raise InvalidSvidError(f"X509-SVID: the certificate has {len(uris)} URI SANs; it must carry exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as err:
        raise InvalidSvidError(f"X509-SVID: the URI SAN is not a valid SPIFFE ID: {err}") from err


def check_leaf(cert: x509.Certificate) -> SpiffeId:
    """Apply the X509-SVID leaf rules to ``cert`` and return its SPIFFE ID.

    Raises:
        InvalidSvidError: naming the rule the certificate breaks.
    """
    spiffe_id = spiffe_id_from_certificate(cert)
    if not spiffe_id.path:
        raise InvalidSvidError(f"X509-SVID: leaf SPIFFE ID {spiffe_id} has no path; a leaf must identify a workload")
    if _x509.is_ca(cert):
        raise InvalidSvidError("X509-SVID: the leaf certificate is a CA (basicConstraints CA:true)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound as err:
        raise InvalidSvidError("X509-SVID: the leaf certificate has no key usage extension") from err
    if not usage.digital_signature:
        raise InvalidSvidError("X509-SVID: the leaf certificate lacks the digitalSignature key usage")
    if usage.key_cert_sign:
        raise InvalidSvidError("X509-SVID: the leaf certificate has the keyCertSign key usage")
    if usage.crl_sign:
        raise InvalidSvidError("X509-SVID: the leaf certificate has the cRLSign key usage")
    return spiffe_id


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_x509.MAX_PEM_BYTES + 1)
    except OSError as err:
        raise InvalidSvidError(f"X509-SVID: cannot read {what} {os.fspath(path)!r}: {err.strerror}") from err
    if len(data) > _x509.MAX_PEM_BYTES:
        raise InvalidSvidError(f"X509-SVID: {what} {os.fspath(path)!r} is larger than {_x509.MAX_PEM_BYTES} bytes")
    return data


@dataclass(frozen=True, slots=True, eq=False)
class X509Svid:
    """A verified-shape X509-SVID: leaf first, then intermediates, with the leaf's private key.

    Build it with :meth:`load` or :meth:`from_pem`. Two SVIDs are equal when their chains
    are byte-identical.
    """

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def thumbprint(self) -> str:
        """Lowercase hex SHA-256 of the leaf's DER encoding."""
        return _x509.thumbprint(self.leaf)

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def chain_pem(self) -> bytes:
        return b"".join(_x509.cert_pem(c) for c in self.chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM. Handle with care."""
        return _x509.key_pem(self.private_key)

    @classmethod
    def from_pem(cls, chain_pem: bytes | str, key_pem: bytes | str) -> X509Svid:
        """Build an SVID from PEM text.

        Raises:
            InvalidSvidError: the chain or key is malformed or breaks an X509-SVID rule.
        """
        chain_bytes, key_bytes = _x509.as_bytes(chain_pem), _x509.as_bytes(key_pem)
        if len(chain_bytes) > _x509.MAX_PEM_BYTES or len(key_bytes) > _x509.MAX_PEM_BYTES:
            raise InvalidSvidError(f"X509-SVID: input larger than {_x509.MAX_PEM_BYTES} bytes")
        try:
            blocks = _x509.pem_blocks(chain_bytes)
            key_blocks = _x509.pem_blocks(key_bytes)
        except ValueError as err:
            raise InvalidSvidError(f"X509-SVID: {err}") from err
        if not blocks:
            raise InvalidSvidError("X509-SVID: no PEM certificate found in the chain")
        certs = []
        for index, (label, block) in enumerate(blocks):
            if label != "CERTIFICATE":
                raise InvalidSvidError(f"X509-SVID: chain block {index} is a {label!r}, expected 'CERTIFICATE'")
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except _x509.PARSE_ERRORS as err:
                raise InvalidSvidError(f"X509-SVID: chain block {index} is not a valid certificate: {err}") from err
        if len(key_blocks) != 1 or "PRIVATE KEY" not in key_blocks[0][0]:
            raise InvalidSvidError("X509-SVID: the key must hold exactly one PEM 'PRIVATE KEY' block")
        try:
            key = serialization.load_pem_private_key(key_blocks[0][1], password=None)
        except _x509.PARSE_ERRORS as err:
            raise InvalidSvidError(f"X509-SVID: the private key cannot be read: {err}") from err
        return cls.from_parts(certs, key)  # type: ignore[arg-type]

    @classmethod
    def from_parts(
        cls, chain: list[x509.Certificate] | tuple[x509.Certificate, ...], private_key: PrivateKey
    ) -> X509Svid:
        """Build an SVID from parsed objects, applying every X509-SVID rule.

        Raises:
            InvalidSvidError: naming the rule broken.
        """
        if not chain:
            raise InvalidSvidError("X509-SVID: the chain is empty")
        try:  # cryptography reads extensions and keys lazily: any of them may be malformed
            spiffe_id = check_leaf(chain[0])
            for index, cert in enumerate(chain[1:], start=1):
                if not _x509.is_ca(cert):
                    raise InvalidSvidError(f"X509-SVID: chain certificate {index} is not a CA")
            if private_key.public_key() != chain[0].public_key():  # the keys compare by value, across types too
                raise InvalidSvidError("X509-SVID: the private key does not match the leaf certificate")
        except InvalidSvidError:
            raise  # meshid's own verdict (also a ValueError): as it is
        except _x509.PARSE_ERRORS as err:
            raise InvalidSvidError(f"X509-SVID: a certificate cannot be read: {err}") from err
        return cls(spiffe_id, tuple(chain), private_key)

    @classmethod
    def load(cls, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> X509Svid:
        """Load an SVID from a PEM chain file and a PEM key file.

        Raises:
            InvalidSvidError: a file cannot be read or breaks an X509-SVID rule.
        """
        chain = _read(cert_file, "certificate file")
        key = _read(key_file, "key file")
        try:
            return cls.from_pem(chain, key)
        except InvalidSvidError as err:
            raise InvalidSvidError(f"{err} (in {os.fspath(cert_file)!r})") from err

    def __eq__(self, other: object) -> bool:
        if type(other) is not X509Svid:
            return NotImplemented
        return self.chain == other.chain

    def __hash__(self) -> int:
        return hash(self.chain)
