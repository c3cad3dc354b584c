"""Signing: root and intermediate CAs and X509-SVIDs, built the way the X509-SVID standard asks.

One builder (:func:`_build`) sets what every certificate needs: subject and authority key
identifiers, a random serial with 159 bits of entropy, critical basic constraints, and a
critical key usage with every flag spelled out.

Keys may be classical or ML-DSA-65 (FIPS 204; RFC 9881 in X.509): an ML-DSA CA signs pure ML-DSA
(no pre-hash, AlgorithmIdentifier without parameters, as ``cryptography`` writes it), and its
certificates keep the same profile, whose key usages (digitalSignature on leaves, keyCertSign and
cRLSign on CAs; never keyEncipherment or keyAgreement) are all ones RFC 9881 allows ML-DSA.

An intermediate made under an upstream CA also carries a critical DNS name constraint: the
identity DNS names of its own trust domain (:func:`meshid.identity_dns_name`) and the DNS
suffixes its operator lists. Under a root that several trust domains share, that is what keeps
one trust domain's CA key from writing another's identity names, which is all that a client's
``server_id`` pin checks (grpcio's BoringSSL enforces the constraint during the handshake, and
``cryptography``'s verifier, meshid's, does too).
"""

from __future__ import annotations

import datetime
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, mldsa, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from meshid import _x509
from meshid._cache import BoundedCache
from meshid._x509 import PrivateKey
from meshid.bundle import ca_trust_domains
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import IDENTITY_DNS_ZONE, X509Svid, identity_dns_name, identity_dns_names

__all__ = ["KEY_KINDS", "Authority", "check_dns_suffixes", "check_revocation_url", "generate_key", "key_kind"]

#: NotBefore is set this far in the past so that a peer whose clock is slightly behind accepts it.
CLOCK_SKEW = datetime.timedelta(minutes=5)

_HOST_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

PublicKey = (
    ec.EllipticCurvePublicKey
    | rsa.RSAPublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
    | mldsa.MLDSA65PublicKey
)

_Extensions = tuple[x509.Extension[x509.ExtensionType], ...]
_LeafNames = tuple[x509.Name, x509.Extension[x509.ExtensionType]]  # a leaf's subject, and its SAN extension

#: The key kinds :func:`generate_key` makes, default first.
KEY_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519", "ml-dsa-65")


def generate_key(kind: str = "ec-p256") -> PrivateKey:
    """Generate a private key: ``ec-p256`` (default), ``ec-p384``, ``rsa-2048``, ``rsa-3072``,
    ``rsa-4096``, ``ed25519`` or ``ml-dsa-65`` (FIPS 204, post-quantum; RFC 9881 in X.509).

    Raises:
        ValueError: unknown kind.
    """
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind in ("rsa-2048", "rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ml-dsa-65":
        return mldsa.MLDSA65PrivateKey.generate()
    raise ValueError(f"key kind {str(kind)[:40]!r} is unknown; use one of {', '.join(KEY_KINDS)}")


def key_kind(key: object) -> str:
    """The :data:`KEY_KINDS` name of a private or public key (``ml-dsa-65``, ``ec-p256``, ...).

    Raises:
        ValueError: a key of a kind meshid does not make.
    """
    public = key.public_key() if hasattr(key, "public_key") else key
    algorithm = _x509.key_algorithm(public)
    kind = algorithm.lower().replace("ecdsa-p", "ec-p")
    if kind not in KEY_KINDS:
        raise ValueError(f"CA: a {algorithm} key is not one of the kinds meshid makes ({', '.join(KEY_KINDS)})")
    return kind


def _check_ca_key(key: PrivateKey) -> None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise ValueError(
            "CA: an EdDSA CA key cannot sign X509-SVIDs that peers can verify (RFC 5280 validators such as "
            "cryptography's and the Web PKI's refuse it); use an ec-p256, ec-p384, RSA or ml-dsa-65 key"
        )


def _under(name: str, subtree: str) -> bool:
    """RFC 5280 DNS name matching: ``name`` is ``subtree`` or a host below it (whole labels)."""
    name, subtree = name.lower(), subtree.lower()
    return name == subtree or name.endswith("." + subtree)


def check_dns_suffixes(suffixes: Iterable[str]) -> tuple[str, ...]:
    """Check the DNS suffixes an intermediate may sign for; returns them lowercased, without repeats.

    A suffix permits itself and every host below it (``example.com``: ``example.com`` and
    ``api.example.com``), as in RFC 5280; it is written without a leading dot, which
    ``cryptography``'s verifier refuses as a malformed constraint.

    Raises:
        ValueError: a suffix is not a host name, or overlaps meshid's identity names.
    """
    checked = []
    for suffix in suffixes:
        if not isinstance(suffix, str):
            raise ValueError(f"CA: a DNS suffix must be a string, not {type(suffix).__name__}")
        lowered = suffix.lower()
        if lowered.startswith("."):
            raise ValueError(f"CA: DNS suffix {suffix[:100]!r}: write it without the leading dot; it covers subdomains")
        if not _HOST_NAME.fullmatch(lowered):
            raise ValueError(f"CA: DNS suffix {suffix[:100]!r} is not a host name, such as internal.example.com")
        if _under(lowered, IDENTITY_DNS_ZONE) or _under(IDENTITY_DNS_ZONE, lowered):
            raise ValueError(
                f"CA: DNS suffix {suffix[:100]!r} covers meshid's identity names ({IDENTITY_DNS_ZONE}), which would "
                "let this CA write other trust domains' names; each CA gets its own trust domain's names already"
            )
        checked.append(lowered)
    return tuple(dict.fromkeys(checked))


def check_revocation_url(url: str, what: str) -> str:
    """Check the URL of an OCSP responder or a CRL that leaves carry (AIA, CDP); returns it.

    Raises:
        ValueError: not an absolute ``http://`` or ``https://`` URL with a host, or too long.
    """
    import urllib.parse

    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or " " in url or len(url) > 512:
        raise ValueError(f"CA: the {what} URL must be at most 512 printable ASCII characters without spaces")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"CA: the {what} URL {url[:100]!r} is not an http:// URL, such as http://ca.example.org:8080/")
    return url


def hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    """The digest a CA key signs with; None for EdDSA and ML-DSA, which sign the message itself
    (RFC 9881: pure ML-DSA, its AlgorithmIdentifier without parameters)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey | mldsa.MLDSA65PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


class _RandomSerials:
    """Serials drawn from ``os.urandom`` a few thousand at a time.

    One ``os.urandom`` call per serial released and took back the GIL for every SVID, and
    in a CA signing three batches at once each of those hand-offs was a context switch. The
    bytes are the same kernel CSPRNG's, each used for one serial only; a forked child starts
    with an empty buffer (it never reuses its parent's bytes).
    """

    _SERIAL_BYTES = 20
    _CHUNK = 4096 * _SERIAL_BYTES

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()  # held by another thread at the fork, perhaps
        self._buffer, self._offset = b"", 0

    def next(self) -> int:
        with self._lock:
            if self._offset >= len(self._buffer):
                self._buffer, self._offset = os.urandom(self._CHUNK), 0
            start = self._offset
            self._offset = start + self._SERIAL_BYTES
            raw = self._buffer[start : self._offset]
        return int.from_bytes(raw, "big") >> 1 | 1 << 158  # 159 bits: the top one set, 158 random


_SERIALS = _RandomSerials()


def random_serial() -> int:
    """A positive 159-bit serial, its top bit set and 158 random bits below: always 20 octets
    in DER, the most RFC 5280 allows."""
    return _SERIALS.next()


#: How many entries' leaf names an Authority keeps (see Authority._names_of), and how many
#: bytes of them (a SAN holds at most a 2,048-byte SPIFFE ID and 32 DNS names).
LEAF_NAMES_KEPT = 4096
LEAF_NAMES_BYTES = 4 * 1024 * 1024
_EARLIEST = datetime.datetime(1950, 1, 1)  # as cryptography's builder: UTCTime cannot say earlier


def _naive_utc(when: datetime.datetime) -> datetime.datetime:
    """``when`` as the naive UTC time a CertificateBuilder holds (a naive ``when`` is UTC already)."""
    offset = when.utcoffset()
    return when if offset is None else when.replace(tzinfo=None) - offset


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _build(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer: x509.Certificate | None,
    signing_key: PrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ca: bool,
    path_length: int | None = None,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    permitted_dns: Sequence[str] | None = None,
    rsa_leaf: bool = False,
) -> x509.Certificate:
    issuer_name = subject if issuer is None else issuer.subject
    authority_key_id = (
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key())
        if issuer is None
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    )
    builder = (
        x509.CertificateBuilder()
        .issuer_name(issuer_name)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(_key_usage(ca=ca, rsa_leaf=rsa_leaf), critical=True)
    )
    return _finish(
        builder,
        subject=subject,
        public_key=public_key,
        not_before=not_before,
        not_after=not_after,
        authority_key_id=authority_key_id,
        uris=uris,
        dns_names=dns_names,
        permitted_dns=permitted_dns,
        leaf=not ca,
    ).sign(signing_key, hash_for(signing_key))  # type: ignore[arg-type]


def _key_usage(*, ca: bool, rsa_leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=rsa_leaf,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def _finish(
    builder: x509.CertificateBuilder,
    *,
    subject: x509.Name,
    public_key: PublicKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    authority_key_id: x509.AuthorityKeyIdentifier,
    uris: Sequence[str],
    dns_names: Sequence[str],
    permitted_dns: Sequence[str] | None,
    leaf: bool,
) -> x509.CertificateBuilder:
    """The part of :func:`_build` after the issuer, basic constraints and key usage (set on ``builder``)."""
    builder = (
        builder.subject_name(subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id, critical=False)
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if permitted_dns is not None:
        # DNS names only: cryptography's verifier refuses every chain with a URI name constraint.
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in permitted_dns]
        builder = builder.add_extension(x509.NameConstraints(permitted, None), critical=True)
    if leaf:
        builder = builder.add_extension(_LEAF_EKU, critical=False)
    return builder


def _key_id(key: PrivateKey) -> str:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _dns_constraints(cert: x509.Certificate) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """A CA certificate's permitted DNS subtrees (None: it permits any DNS name) and its excluded ones."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None, ()
    permitted = tuple(str(g.value) for g in constraints.permitted_subtrees or () if isinstance(g, x509.DNSName))
    excluded = tuple(str(g.value) for g in constraints.excluded_subtrees or () if isinstance(g, x509.DNSName))
    return permitted or None, excluded


@dataclass(frozen=True, slots=True)
class Authority:
    """A signing CA for one trust domain: its certificate, its key, and what sits above it.

    ``chain`` is what an SVID it signs carries after the leaf: this CA's certificate and the
    intermediates above it, never a self-signed root (empty for a root CA). ``roots`` are
    what peers put in their trust bundle.
    """

    trust_domain: TrustDomain
    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    #: When set, every leaf carries it as its OCSP responder (Authority Information Access).
    ocsp_url: str | None = None
    #: When set, every leaf carries it as its CRL distribution point.
    crl_url: str | None = None
    # What every leaf this CA signs shares (the extensions ahead of the SKI, for EC and other
    # keys and for RSA keys), made once: sign_svid then builds only what differs per leaf.
    _leaf_shared: tuple[_Extensions, _Extensions] = field(init=False, repr=False, compare=False)
    _leaf_tail: tuple[datetime.datetime, x509.NameAttribute[str], hashes.HashAlgorithm | None] = field(
        init=False, repr=False, compare=False
    )
    # An entry's subject name and SAN extension, by (SPIFFE ID, DNS names): the same for each of
    # its renewals. Bounded (LEAF_NAMES_KEPT, LEAF_NAMES_BYTES); only what the CA signs, after
    # authorization, gets in.
    _leaf_names: BoundedCache[tuple[SpiffeId, tuple[str, ...]], _LeafNames] = field(
        init=False, repr=False, compare=False
    )
    #: Whether this CA signs with ML-DSA (its certificate's key, read once).
    post_quantum: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        organization = x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain.name[:64])

        def base(rsa_leaf: bool) -> _Extensions:
            # The extensions every leaf shares, DER-encoded once by cryptography itself (an
            # UnrecognizedExtension carries it as it is): the certificate is the same bytes as with
            # the typed objects, and signing it no longer encodes them again for each leaf.
            shared: list[tuple[x509.ExtensionType, bool]] = [
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_key_usage(ca=False, rsa_leaf=rsa_leaf), True),
                (aki, False),
                (_LEAF_EKU, False),
            ]
            # In the shared base: a leaf costs nothing more for them, and nothing when they are off.
            if self.ocsp_url is not None:
                responder = x509.UniformResourceIdentifier(check_revocation_url(self.ocsp_url, "OCSP"))
                access = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, responder)
                shared.append((x509.AuthorityInformationAccess([access]), False))
            if self.crl_url is not None:
                where = x509.UniformResourceIdentifier(check_revocation_url(self.crl_url, "CRL"))
                point = x509.DistributionPoint(full_name=[where], relative_name=None, reasons=None, crl_issuer=None)
                shared.append((x509.CRLDistributionPoints([point]), False))
            return tuple(
                x509.Extension(ext.oid, critical, x509.UnrecognizedExtension(ext.oid, ext.public_bytes()))
                for ext, critical in shared
            )

        object.__setattr__(self, "_leaf_shared", (base(False), base(True)))
        object.__setattr__(self, "_leaf_names", BoundedCache(max_entries=LEAF_NAMES_KEPT, max_bytes=LEAF_NAMES_BYTES))
        # (cryptography makes a new datetime each time not_valid_after_utc is read)
        not_after = self.certificate.not_valid_after_utc
        object.__setattr__(self, "_leaf_tail", (not_after, organization, hash_for(self.private_key)))
        object.__setattr__(self, "post_quantum", _x509.is_post_quantum_key(self.certificate.public_key()))

    @classmethod
    def create_root(
        cls,
        trust_domain: TrustDomain | str,
        *,
        ttl: datetime.timedelta = datetime.timedelta(days=365),
        key: PrivateKey | None = None,
        now: datetime.datetime | None = None,
    ) -> Authority:
        """Create a self-signed root CA for ``trust_domain``; its SPIFFE ID is the trust domain's ID."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        key = key or generate_key()
        _check_ca_key(key)
        now = now or _now()
        cert = _build(
            # A key id in the name: after a key rotation, old and new roots have distinct
            # subjects, so CRLs and chains name exactly one of them.
            subject=_name(f"meshid root CA {td.name} {_key_id(key)}", td.name),
            public_key=key.public_key(),
            issuer=None,
            signing_key=key,
            not_before=now - CLOCK_SKEW,
            not_after=now + ttl,
            ca=True,
            uris=[str(td.id())],
        )
        return cls(td, cert, key, (), (cert,))

    @classmethod
    def from_upstream(
        cls,
        trust_domain: TrustDomain | str,
        upstream_certificate: x509.Certificate,
        upstream_key: PrivateKey,
        *,
        upstream_chain: Iterable[x509.Certificate] = (),
        dns_suffixes: Iterable[str] = (),
        ttl: datetime.timedelta = datetime.timedelta(days=90),
        key: PrivateKey | None = None,
        now: datetime.datetime | None = None,
    ) -> Authority:
        """Create an intermediate CA for ``trust_domain`` signed by an existing (upstream) CA.

        The upstream certificate's NotAfter caps the intermediate's. Peers trust the upstream root.
        When that root is shared with other trust domains, two things bind the intermediate to
        its own. Its URI SAN is the trust domain's SPIFFE ID, and meshid's verifier refuses an
        SVID whose CAs belong to another trust domain (see :meth:`meshid.BundleSet.verify`).
        And it carries a critical name constraint permitting only the DNS names under the trust
        domain's identity name (:func:`meshid.identity_dns_name`) and under ``dns_suffixes``, so
        that BoringSSL, which checks a client's ``server_id`` pin, refuses another trust domain's
        identity names under it. Its SVIDs may carry DNS names only below these; its path
        length is 0. There is no URI name constraint: cryptography's verifier refuses one.
        (The identity names and suffixes must be permitted by the upstream CAs' own constraints.)

        Raises:
            ValueError: a key is an EdDSA key, an upstream intermediate belongs to another
                trust domain (peers would refuse every SVID under it), a DNS suffix is not a host
                name or covers meshid's identity names (see :func:`check_dns_suffixes`), or an
                upstream CA's name constraint does not permit the identity names or a suffix.
        """
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        key = key or generate_key()
        _check_ca_key(key)
        _check_ca_key(upstream_key)
        suffixes = check_dns_suffixes(dns_suffixes)
        for upstream in (upstream_certificate, *upstream_chain):
            named = ca_trust_domains(upstream) if upstream.issuer != upstream.subject else frozenset()
            if named and named != {td.name}:
                raise ValueError(
                    f"CA: the upstream CA {upstream.subject.rfc4514_string()!r} belongs to trust domain "
                    f"{', '.join(sorted(named - {td.name}))}; peers refuse {td} SVIDs under it, as a CA vouches "
                    f"only for its own trust domain; sign {td}'s CA with a root or with an intermediate of {td}"
                )
        now = now or _now()
        not_after = min(now + ttl, upstream_certificate.not_valid_after_utc)
        cert = _build(
            subject=_name(f"meshid intermediate CA {td.name} {_key_id(key)}", td.name),
            public_key=key.public_key(),
            issuer=upstream_certificate,
            signing_key=upstream_key,
            not_before=now - CLOCK_SKEW,
            not_after=not_after,
            ca=True,
            path_length=0,
            uris=[str(td.id())],
            permitted_dns=[identity_dns_name(td), *suffixes],
        )
        above = (upstream_certificate, *upstream_chain)
        intermediates = tuple(c for c in above if c.issuer != c.subject)
        roots = tuple(c for c in above if c.issuer == c.subject) or (upstream_certificate,)
        authority = cls(td, cert, key, (cert, *intermediates), roots)
        for name in (identity_dns_name(td), *suffixes):
            if not authority.permits_dns_name(name):
                raise ValueError(
                    f"CA: a name constraint of the upstream CA does not permit DNS name {name}; peers would refuse "
                    f"{td} SVIDs that carry it; sign {td}'s CA with an upstream CA that permits it"
                )
        return authority

    @property
    def dns_suffixes(self) -> tuple[str, ...] | None:
        """The DNS suffixes this CA's certificate permits besides its identity names; None: any name."""
        permitted, _ = _dns_constraints(self.certificate)
        return None if permitted is None else tuple(d for d in permitted if not _under(d, IDENTITY_DNS_ZONE))

    def permits_dns_name(self, name: str) -> bool:
        """Whether the DNS name constraints of this CA's chain let an SVID it signs carry ``name``.

        Every CA from the root that issued the chain down to this CA counts, as it does for a
        verifier: an SVID with a name outside any of them verifies nowhere.
        """
        top = self.chain[-1] if self.chain else self.certificate
        anchors = [r for r in self.roots if r.subject == top.issuer]
        for cert in (*self.chain, *anchors):
            permitted, excluded = _dns_constraints(cert)
            if permitted is not None and not any(_under(name, subtree) for subtree in permitted):
                return False
            if any(_under(name, subtree) for subtree in excluded):
                return False
        return True

    def sign_svid(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        *,
        ttl: datetime.timedelta = datetime.timedelta(hours=1),
        dns_names: Sequence[str] = (),
        now: datetime.datetime | None = None,
        key_sha256: bytes | None = None,
    ) -> tuple[x509.Certificate, ...]:
        """Sign an X509-SVID leaf for ``spiffe_id`` over ``public_key``; returns the chain, leaf first.

        The leaf carries the SPIFFE ID as its one URI SAN, then ``dns_names``, then the
        identity DNS names that let a client pin this ID (see :func:`meshid.identity_dns_names`).
        NotAfter is ``min(now + ttl, this CA's NotAfter)``. Its subject key identifier is the
        SHA-256 of the key's DER SubjectPublicKeyInfo (RFC 7093, section 2, method 4), which is
        also what the CA store records of the key: ``key_sha256`` is that digest, when the
        caller has made it already (it is not checked against the key).

        Raises:
            ValueError: ``spiffe_id`` is not in this CA's trust domain, or has no path; the
                validity would start before 1950 or end before it starts; ``key_sha256`` is
                not 32 bytes.
            TypeError: ``public_key`` is not an EC, RSA, Ed25519, Ed448 or ML-DSA-65 public key.
        """
        if not spiffe_id.is_member_of(self.trust_domain):
            raise ValueError(f"CA: {spiffe_id} is not in trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise ValueError(f"CA: {spiffe_id} has no path; a leaf SVID must identify a workload")
        now = now or _now()
        # As _build(issuer=self.certificate, ca=False, ...), from the parts made once in
        # __post_init__, and in one CertificateBuilder: each of its setters copies the builder
        # and checks again what is checked here once (test_leaf_building.py compares the result
        # with what the setters build, to the byte).
        ca_not_after, organization, algorithm = self._leaf_tail
        if not isinstance(public_key, PublicKey):
            raise TypeError(
                f"CA: cannot certify a key of type {type(public_key).__name__}; "
                "an SVID's key is an EC, RSA, Ed25519, Ed448 or ML-DSA-65 public key"
            )
        if key_sha256 is not None and len(key_sha256) != 32:
            raise ValueError(f"CA: key_sha256 must be a SHA-256 digest (32 bytes), not {len(key_sha256)} bytes")
        subject, san = self._names_of(spiffe_id, tuple(dns_names), organization)
        not_before, not_after = _naive_utc(now - CLOCK_SKEW), _naive_utc(min(now + ttl, ca_not_after))
        if not_before < _EARLIEST or not_after < not_before:
            raise ValueError(f"CA: an SVID cannot be valid from {not_before} until {not_after} (UTC)")
        ski = x509.SubjectKeyIdentifier(_x509.key_sha256(public_key) if key_sha256 is None else key_sha256)
        builder = x509.CertificateBuilder(
            issuer_name=self.certificate.subject,
            subject_name=subject,
            public_key=public_key,
            serial_number=random_serial(),
            not_valid_before=not_before,
            not_valid_after=not_after,
            extensions=[
                *self._leaf_shared[isinstance(public_key, rsa.RSAPublicKey)],
                x509.Extension(ski.oid, False, ski),
                san,
            ],
        )
        leaf = builder.sign(self.private_key, algorithm)  # type: ignore[arg-type]
        return (leaf, *self.chain)

    def _names_of(
        self, spiffe_id: SpiffeId, dns_names: tuple[str, ...], organization: x509.NameAttribute[str]
    ) -> _LeafNames:
        """A leaf's subject name and SAN extension (its DER made once by cryptography), kept by entry."""
        key = (spiffe_id, dns_names)
        kept = self._leaf_names.get(key)
        if kept is None:
            common_name = x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.path.rsplit("/", 1)[-1][:64])
            names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
            names += [x509.DNSName(d) for d in dict.fromkeys([*dns_names, *identity_dns_names(spiffe_id)])]
            san = x509.SubjectAlternativeName(names)
            encoded = x509.UnrecognizedExtension(san.oid, san.public_bytes())
            kept = (x509.Name([organization, common_name]), x509.Extension(san.oid, False, encoded))
            # what the kept parts hold, about; a full cache starts over (rare: more entries renewing)
            self._leaf_names.put(key, kept, len(encoded.value) + len(common_name.value))
        return kept

    def issue_svid(
        self,
        spiffe_id: SpiffeId | str,
        *,
        ttl: datetime.timedelta = datetime.timedelta(hours=1),
        dns_names: Sequence[str] = (),
        key_kind: str = "ec-p256",
        now: datetime.datetime | None = None,
    ) -> X509Svid:
        """Generate a key and sign an SVID for it in one step (for tests, demos and the CLI's own admin SVID)."""
        sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        key = generate_key(key_kind)
        chain = self.sign_svid(sid, key.public_key(), ttl=ttl, dns_names=dns_names, now=now)
        return X509Svid.from_parts(chain, key)
