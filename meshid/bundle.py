"""Trust bundles: the root CAs of a trust domain, and sets of them for federation.

A :class:`TrustBundle` is loaded from PEM or from the SPIFFE bundle JSON format (a JWK set whose
``x509-svid`` keys carry one CA certificate each in ``x5c``, and whose ``jwt-svid`` keys, each
with its ``kid``, are the public keys JWT-SVIDs of the trust domain are signed with). A :class:`BundleSet` holds the
bundles of several trust domains and verifies a peer's chain only against the bundle of the
peer's own trust domain, so a CA trusted for one trust domain never vouches for another's IDs.

That alone does not scope a CA when two trust domains' bundles hold one root (each CA an
intermediate under a corporate root): the path to that root is sound for either. So every CA
between the root and the leaf must also belong to the leaf's trust domain (see
:func:`check_ca_scope`): an intermediate that names another trust domain in a SPIFFE ID URI
SAN never vouches, and the CA that signed a SPIFFE ID must name that ID's trust domain.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification

from meshid import _x509
from meshid.errors import InvalidBundleError, InvalidSpiffeIdError, InvalidSvidError, VerificationError
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import check_leaf

if TYPE_CHECKING:
    from meshid.jwtsvid import PublicKey

__all__ = ["BundleSet", "TrustBundle"]


def _b64url(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    jwk: dict[str, Any] = {"use": "x509-svid"}
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
        jwk.update(
            kty="EC",
            crv=crv,
            x=base64.urlsafe_b64encode(numbers.x.to_bytes(size, "big")).rstrip(b"=").decode(),
            y=base64.urlsafe_b64encode(numbers.y.to_bytes(size, "big")).rstrip(b"=").decode(),
        )
    elif isinstance(key, rsa.RSAPublicKey):
        numbers_rsa = key.public_numbers()
        jwk.update(kty="RSA", n=_b64url(numbers_rsa.n), e=_b64url(numbers_rsa.e))
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw_key = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk.update(kty="OKP", crv="Ed25519", x=base64.urlsafe_b64encode(raw_key).rstrip(b"=").decode())
    elif isinstance(key, _x509.MLDSA_PUBLIC_KEYS):
        # RFC 9964 (ML-DSA for JOSE): key type AKP, the parameter set in "alg", the raw key in "pub".
        raw_key = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk.update(kty="AKP", alg=_x509.key_algorithm(key), pub=base64.urlsafe_b64encode(raw_key).rstrip(b"=").decode())
    else:
        raise InvalidBundleError(f"trust bundle: cannot express a {type(key).__name__} root as a JWK")
    jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    return jwk


#: The most JWT keys one bundle may hold (a few are published at a time: current, next, previous).
MAX_JWT_KEYS = 64
_MAX_KID = 255


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class JwtAuthorities(Mapping[str, "PublicKey"]):
    """A trust domain's JWT-SVID signing keys by key ID: read-only, hashable, equal by key bytes."""

    __slots__ = ("_keys", "_spkis")

    def __init__(
        self, keys: Mapping[str, PublicKey] | Iterable[tuple[str, PublicKey]] = (), *, where: str = "trust bundle"
    ) -> None:
        """``where`` begins each error message (``trust bundle for example.org``)."""
        items = list(keys.items() if isinstance(keys, Mapping) else keys)
        if len(items) > MAX_JWT_KEYS:
            raise InvalidBundleError(f"{where}: more than {MAX_JWT_KEYS} JWT keys")
        found: dict[str, PublicKey] = {}
        for kid, key in items:
            if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID:
                raise InvalidBundleError(f"{where}: a JWT key ID must be a string of 1 to {_MAX_KID} characters")
            _check_jwt_key(kid, key, where)
            if kid in found:
                raise InvalidBundleError(f"{where}: JWT key ID {kid!r} appears twice")
            found[kid] = key
        self._keys = found
        self._spkis = frozenset((kid, _spki(key)) for kid, key in found.items())

    def __getitem__(self, kid: str) -> PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if type(other) is not JwtAuthorities:
            return NotImplemented
        return self._spkis == other._spkis

    def __hash__(self) -> int:
        return hash(self._spkis)

    def __repr__(self) -> str:
        return f"JwtAuthorities({sorted(self._keys)!r})"


def _check_jwt_key(kid: str, key: object, where: str) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise InvalidBundleError(f"{where}: JWT key {kid!r} is on curve {key.curve.name}; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidBundleError(f"{where}: JWT key {kid!r} is RSA-{key.key_size}; use at least 2048 bits")
    else:
        raise InvalidBundleError(
            f"{where}: JWT key {kid!r} is a {type(key).__name__}; a JWT key is an EC or RSA public key"
        )


def _jwt_jwk(kid: str, key: PublicKey) -> dict[str, Any]:
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    jwk = (
        ECAlgorithm.to_jwk(key, as_dict=True)
        if isinstance(key, ec.EllipticCurvePublicKey)
        else (RSAAlgorithm.to_jwk(key, as_dict=True))
    )
    return {"use": "jwt-svid", "kid": kid, **{k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}}


def _read_jwt_jwk(td: TrustDomain, index: int, jwk: Mapping[str, Any]) -> tuple[str, PublicKey]:
    import jwt

    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidBundleError(
            f"trust bundle for {td}: key {index} ('jwt-svid') has no 'kid'; the standard requires one"
        )
    if len(kid) > _MAX_KID:
        raise InvalidBundleError(f"trust bundle for {td}: key {index} has a 'kid' longer than {_MAX_KID} characters")
    if jwk.get("kty") not in ("EC", "RSA"):
        raise InvalidBundleError(
            f"trust bundle for {td}: JWT key {kid!r} has kty {jwk.get('kty')!r}, not 'EC' or 'RSA'"
        )
    private = sorted({"d", "p", "q", "dp", "dq", "qi", "oth"} & set(jwk))
    if private:
        raise InvalidBundleError(
            f"trust bundle for {td}: JWT key {kid!r} holds private key members ({', '.join(private)}); "
            "publish only the public key"
        )
    errors: tuple[type[Exception], ...] = (jwt.exceptions.PyJWTError, *_x509.PARSE_ERRORS)
    try:
        key = jwt.PyJWK(dict(jwk), algorithm="ES256" if jwk["kty"] == "EC" else "RS256").key
    except errors as err:
        raise InvalidBundleError(f"trust bundle for {td}: JWT key {kid!r} cannot be read: {err}") from err
    _check_jwt_key(kid, key, f"trust bundle for {td}")
    return kid, key


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The X.509 root CAs of one trust domain, and the keys its JWT-SVIDs are signed with.

    ``sequence`` and ``refresh_hint`` carry the SPIFFE bundle fields of the same names.
    ``jwt_authorities`` maps each JWT key ID (``kid``) to its public key; any mapping given is
    kept as a read-only :class:`JwtAuthorities`.
    """

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int | None = None
    refresh_hint: int | None = field(default=None, compare=False)
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=JwtAuthorities)

    def __post_init__(self) -> None:
        if isinstance(self.trust_domain, str):  # a name given as str: parse it rather than never match
            object.__setattr__(self, "trust_domain", TrustDomain.parse(self.trust_domain))
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, not {type(self.trust_domain).__name__}")
        if not self.roots:
            raise InvalidBundleError(f"trust bundle for {self.trust_domain}: holds no root certificate")
        if not isinstance(self.jwt_authorities, JwtAuthorities):
            keys = JwtAuthorities(self.jwt_authorities, where=f"trust bundle for {self.trust_domain}")
            object.__setattr__(self, "jwt_authorities", keys)

    def with_jwt_authorities(self, keys: Mapping[str, PublicKey]) -> TrustBundle:
        """A copy whose JWT keys are ``keys`` (kid -> public key), replacing the ones it had.

        Raises:
            InvalidBundleError: a key ID is empty or a key is not an EC (P-256/P-384/P-521)
                or RSA (>= 2048 bits) public key.
        """
        return dataclasses.replace(self, jwt_authorities=keys)

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain | str, data: bytes | str) -> TrustBundle:
        """Read the roots of ``trust_domain`` from PEM text.

        Raises:
            InvalidBundleError: no certificate, a block that is not a certificate, or a non-CA.
        """
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        raw = _x509.as_bytes(data)
        if len(raw) > _x509.MAX_PEM_BYTES:
            raise InvalidBundleError(f"trust bundle for {td}: larger than {_x509.MAX_PEM_BYTES} bytes")
        roots = []
        try:
            blocks = _x509.pem_blocks(raw)
        except ValueError as err:
            raise InvalidBundleError(f"trust bundle for {td}: {err}") from err
        for index, (label, block) in enumerate(blocks):
            if label != "CERTIFICATE":
                raise InvalidBundleError(f"trust bundle for {td}: block {index} is a {label!r}, expected 'CERTIFICATE'")
            try:
                cert = x509.load_pem_x509_certificate(block)
                is_ca = _x509.is_ca(cert)
            except _x509.PARSE_ERRORS as err:
                raise InvalidBundleError(
                    f"trust bundle for {td}: block {index} is not a valid certificate: {err}"
                ) from err
            if not is_ca:
                raise InvalidBundleError(f"trust bundle for {td}: certificate {index} is not a CA")
            roots.append(cert)
        if not roots:
            raise InvalidBundleError(f"trust bundle for {td}: no PEM certificate found")
        return cls(td, tuple(roots))

    @classmethod
    def from_spiffe_json(cls, trust_domain: TrustDomain | str, data: bytes | str) -> TrustBundle:
        """Read a SPIFFE bundle (JWK set): ``x509-svid`` keys are roots, ``jwt-svid`` keys JWT
        authorities (``kid`` required); keys of any other ``use`` are skipped.

        Raises:
            InvalidBundleError: the JSON is malformed, holds no X.509 root, or a JWT key has no
                ``kid``, a duplicate one, private members, or is not EC P-256/P-384/P-521 or RSA >= 2048.
        """
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        if len(data) > _x509.MAX_PEM_BYTES:
            raise InvalidBundleError(f"trust bundle for {td}: larger than {_x509.MAX_PEM_BYTES} bytes")
        try:
            doc = json.loads(data)
        except RecursionError as err:
            raise InvalidBundleError(f"trust bundle for {td}: JSON nested too deeply") from err
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidBundleError(f"trust bundle for {td}: not valid JSON: {err}") from err
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise InvalidBundleError(f"trust bundle for {td}: a SPIFFE bundle is a JSON object with a 'keys' list")
        roots = []
        jwt_keys: list[tuple[str, PublicKey]] = []
        jwt_error: InvalidBundleError | None = None
        for index, key in enumerate(doc["keys"]):
            if not isinstance(key, dict):
                raise InvalidBundleError(f"trust bundle for {td}: key {index} is not an object")
            if key.get("use") == "jwt-svid":
                try:
                    jwt_keys.append(_read_jwt_jwk(td, index, key))
                except InvalidBundleError as err:
                    # Reported after the roots are checked: a bundle with no root is refused for that first.
                    jwt_error = jwt_error or err
                continue
            if key.get("use") != "x509-svid":
                continue
            x5c = key.get("x5c")
            if not isinstance(x5c, list) or not x5c:
                continue  # the standard says such an entry MUST be ignored
            try:
                cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
                is_ca = _x509.is_ca(cert)
            except _x509.PARSE_ERRORS as err:
                raise InvalidBundleError(
                    f"trust bundle for {td}: key {index} x5c[0] is not a DER certificate: {err}"
                ) from err
            if not is_ca:
                raise InvalidBundleError(f"trust bundle for {td}: key {index} holds a certificate that is not a CA")
            roots.append(cert)
        if not roots:
            raise InvalidBundleError(f"trust bundle for {td}: no 'x509-svid' key with a certificate")
        if jwt_error is not None:
            raise jwt_error
        sequence = doc.get("spiffe_sequence")
        hint = doc.get("spiffe_refresh_hint")
        authorities = JwtAuthorities(jwt_keys, where=f"trust bundle for {td}")
        return cls(
            td,
            tuple(roots),
            sequence if isinstance(sequence, int) else None,
            hint if isinstance(hint, int) else None,
            authorities,
        )

    @classmethod
    def load(cls, trust_domain: TrustDomain | str, path: str | os.PathLike[str]) -> TrustBundle:
        """Load a bundle file, PEM or SPIFFE JSON (told apart by its first non-blank byte).

        Raises:
            InvalidBundleError: the file cannot be read or parsed.
        """
        try:
            with open(path, "rb") as f:
                data = f.read(_x509.MAX_PEM_BYTES + 1)
        except OSError as err:
            raise InvalidBundleError(f"trust bundle: cannot read {os.fspath(path)!r}: {err.strerror}") from err
        try:
            if data.lstrip().startswith(b"{"):
                return cls.from_spiffe_json(trust_domain, data)
            return cls.from_pem(trust_domain, data)
        except InvalidBundleError as err:
            raise InvalidBundleError(f"{err} (in {os.fspath(path)!r})") from err

    @classmethod
    def load_roots(cls, path: str | os.PathLike[str]) -> tuple[x509.Certificate, ...]:
        """The roots in a bundle file (PEM or SPIFFE JSON) that a client trusts a server by
        before it knows the trust domain they belong to: the ``--bundle`` of a join-token fetch.

        Raises:
            InvalidBundleError: the file cannot be read or holds something other than CA
                certificates; the message names the file and says what to give instead.
        """
        name = os.fspath(path)
        unnamed = TrustDomain("unnamed.invalid")  # the trust domain is not known yet; never shown
        try:
            return cls.load(unnamed, path).roots
        except InvalidBundleError as err:
            why = str(err).removesuffix(f" (in {name!r})").removeprefix(f"trust bundle for {unnamed}: ")
            if why.startswith("trust bundle: cannot read "):
                why = "cannot be read: " + why.rpartition(": ")[2]
            raise InvalidBundleError(
                f"CA bundle {name!r}: {why}; give the CA's bundle.pem (its root certificates, PEM)"
            ) from err

    def to_pem(self) -> bytes:
        return b"".join(_x509.cert_pem(c) for c in self.roots)

    def to_spiffe_json(self) -> str:
        doc: dict[str, Any] = {
            "keys": [_jwk(c) for c in self.roots] + [_jwt_jwk(kid, k) for kid, k in self.jwt_authorities.items()]
        }
        if self.sequence is not None:
            doc["spiffe_sequence"] = self.sequence
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return json.dumps(doc, indent=2)


# RFC 5280 path validation without the Web PKI's extra demands (SPIFFE leaves have no DNS
# name to match, and an organisation's own root need not follow CA/Browser Forum rules).
# The X509-SVID leaf rules are checked separately, by check_leaf.
_EE_POLICY = verification.ExtensionPolicy.permit_all()


def _require_ca(policy: object, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is None or not ext.ca:
        raise ValueError("an issuing certificate is not a CA (basicConstraints CA:true missing)")


def _require_cert_sign(policy: object, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    # RFC 5280 6.1.4 (n): a CA's key usage, where it has one, must allow signing certificates
    # (X509-SVID 4.3: SVID signing certificates MUST set keyCertSign).
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("an issuing certificate's key usage does not allow signing certificates (keyCertSign)")


#: What every CA of a chain must have (also for x509pop's host PKI): basicConstraints CA:true,
#: and keyCertSign in its key usage where it has one (permit_all drops cryptography's own check).
CA_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _require_ca)
    .may_be_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _require_cert_sign)
)


def _spiffe_sans(cert: x509.Certificate) -> Iterator[tuple[str, SpiffeId | None]]:
    """Each URI SAN of ``cert`` with a spiffe scheme, and the SPIFFE ID it parses as (None: it does not)."""
    for uri in _x509.uri_sans(cert):
        if uri[:7].lower() == "spiffe:":
            try:
                yield uri, SpiffeId.parse(uri)
            except InvalidSpiffeIdError:
                yield uri, None


def ca_trust_domains(cert: x509.Certificate) -> frozenset[str]:
    """The trust domains a CA certificate names in SPIFFE ID URI SANs (a URI that does not parse as itself)."""
    return frozenset(uri if sid is None else sid.trust_domain.name for uri, sid in _spiffe_sans(cert))


def ca_ids_with_a_path(cert: x509.Certificate) -> list[str]:
    """The SPIFFE IDs with a path a CA certificate names: X509-SVID 3.2, a signing certificate's
    SPIFFE ID MUST NOT have a path component (it names a trust domain, not a workload). One that
    does not parse is left to :func:`ca_trust_domains`, which names it as itself (another trust domain)."""
    return [uri for uri, sid in _spiffe_sans(cert) if sid is not None and sid.path]


def why_unverified(reason: str, chain: Sequence[x509.Certificate], now: datetime.datetime | None) -> str:
    """cryptography's reason ("candidates exhausted: ...", "cert is not valid at validation time
    (encountered processing <Certificate(...)>)") in meshid's words: which certificate, and what to do."""
    moment = now or datetime.datetime.now(datetime.UTC)
    for index, cert in enumerate(chain):
        name = "the certificate" if index == 0 else f"CA {cert.subject.rfc4514_string()!r} in its chain"
        try:
            not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        except _x509.PARSE_ERRORS:
            continue
        if moment > not_after:
            return f"{name} expired at {not_after.isoformat()}; renew it (or check this machine's clock)"
        if moment < not_before:
            return f"{name} is not valid until {not_before.isoformat()}; check the clocks"
    validator = "extension validator failed: ValueError: "  # one of CA_POLICY's checks refused a CA
    if validator in reason:
        return reason.split(validator, 1)[1].split(" (encountered processing")[0]
    if "no interior errors" in reason:  # no path at all; other "candidates exhausted" say why
        return (
            "no root of the bundle signed it (or a CA between them is missing from the chain); "
            "check that the bundle is this trust domain's, from the CA that issued the certificate"
        )
    return reason.split(" (encountered processing")[0]


def check_ca_scope(chain: Sequence[x509.Certificate], trust_domain: TrustDomain, *, what: str, spiffe: bool) -> None:
    """Refuse a built chain (leaf first, trust anchor last) whose CAs do not all belong to ``trust_domain``.

    The anchor is exempt: being in the trust domain's bundle is what binds it. Between anchor
    and leaf, a CA that names a trust domain (a SPIFFE ID URI SAN, as meshid's CAs and SPIRE's
    carry) must name ``trust_domain`` only. With ``spiffe`` (the leaf carries a SPIFFE ID), the
    CA that signed the leaf must name it too: under a root shared with other trust domains, a
    CA that names none could be any of theirs. Above that CA, CAs that name nothing (an
    organisation's own intermediates under its root) are allowed.

    Raises:
        VerificationError: a CA belongs to another trust domain, or the leaf's CA to none.
    """
    for depth, cert in enumerate(chain[1:-1]):
        try:
            named = ca_trust_domains(cert)
        except _x509.PARSE_ERRORS as err:
            raise VerificationError(f"peer certificate {what}: a CA in its chain cannot be read: {err}") from err
        ca = cert.subject.rfc4514_string()
        pathed = ca_ids_with_a_path(cert)
        if pathed:
            raise VerificationError(
                f"peer certificate {what}: CA {ca!r} in its chain names the SPIFFE ID {pathed[0]}, which has a path; "
                "a signing certificate's SPIFFE ID names its trust domain only (X509-SVID 3.2)"
            )
        if named and named != {trust_domain.name}:
            others = ", ".join(sorted(named - {trust_domain.name}))
            raise VerificationError(
                f"peer certificate {what}: CA {ca!r} in its chain belongs to trust domain {others}, "
                f"not {trust_domain}; a CA vouches only for its own trust domain, even under a root "
                "that several trust domains' bundles share"
            )
        if spiffe and depth == 0 and not named:
            raise VerificationError(
                f"peer certificate {what}: its issuing CA {ca!r} names no trust domain (no SPIFFE ID URI SAN), "
                f"so nothing binds it to {trust_domain}: under a root shared with other trust domains it could "
                f"be any of theirs; give that CA the URI SAN {trust_domain.id()} (as meshid's CAs have), "
                f"or put it in {trust_domain}'s bundle"
            )


@dataclass(frozen=True, slots=True, eq=False)
class BundleSet(Mapping[TrustDomain, TrustBundle]):
    """The trust bundles of one or more trust domains, keyed by trust domain."""

    _bundles: Mapping[TrustDomain, TrustBundle]
    _stores: Mapping[TrustDomain, verification.Store] = field(repr=False)

    @classmethod
    def of(cls, *bundles: TrustBundle | Iterable[TrustBundle]) -> BundleSet:
        """Build a set; a later bundle for the same trust domain replaces an earlier one."""
        flat: list[TrustBundle] = []
        for item in bundles:
            flat.extend([item] if isinstance(item, TrustBundle) else item)
        by_td = {b.trust_domain: b for b in flat}
        return cls(by_td, {td: verification.Store(list(b.roots)) for td, b in by_td.items()})

    def __getitem__(self, td: TrustDomain) -> TrustBundle:
        return self._bundles[td]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def __eq__(self, other: object) -> bool:
        if type(other) is not BundleSet:
            return NotImplemented
        return dict(self._bundles) == dict(other._bundles)

    def __hash__(self) -> int:
        return hash(frozenset(self._bundles.items()))

    def with_bundle(self, bundle: TrustBundle) -> BundleSet:
        """A copy with ``bundle`` added or replacing the one of its trust domain."""
        return BundleSet.of(*self._bundles.values(), bundle)

    def all_roots_pem(self) -> bytes:
        """Every root of every trust domain, PEM: what a TLS stack is told to trust before meshid narrows it."""
        return b"".join(b.to_pem() for b in self._bundles.values())

    def verify(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        now: datetime.datetime | None = None,
    ) -> SpiffeId:
        """Verify an X509-SVID chain against the bundle of its own trust domain; return its SPIFFE ID.

        Raises:
            VerificationError: the leaf breaks an X509-SVID rule, its trust domain has no
                bundle here, the chain does not verify to one of that bundle's roots, or a CA
                between that root and the leaf does not belong to the leaf's trust domain.
        """
        return self.verify_path(leaf, intermediates, now=now)[0]

    def verify_path(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        now: datetime.datetime | None = None,
    ) -> tuple[SpiffeId, list[x509.Certificate]]:
        """As :meth:`verify`, and the path it verified: the leaf first, the root last.

        Raises:
            VerificationError: as :meth:`verify`.
        """
        try:
            spiffe_id = check_leaf(leaf)
        except (InvalidSvidError, InvalidSpiffeIdError) as err:
            raise VerificationError(f"peer certificate: {err}") from err
        except _x509.PARSE_ERRORS as err:
            raise VerificationError(f"peer certificate: cannot be read: {err}") from err
        store = self._stores.get(spiffe_id.trust_domain)
        if store is None:
            raise VerificationError(
                f"peer certificate: no trust bundle for trust domain {spiffe_id.trust_domain} ({spiffe_id})"
            )
        chain = self.verify_chain(store, leaf, intermediates, now=now, what=str(spiffe_id))
        check_ca_scope(chain, spiffe_id.trust_domain, what=str(spiffe_id), spiffe=True)
        return spiffe_id, chain

    def verify_any(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        now: datetime.datetime | None = None,
        trust_domains: Collection[TrustDomain] | None = None,
    ) -> TrustDomain:
        """Verify a chain that carries no SPIFFE ID against each bundle (or only those of
        ``trust_domains``); return the trust domain that vouches.

        A bundle vouches only if no CA between its root and the leaf names another trust
        domain; CAs that name none (an ordinary corporate CA) are allowed, as such a
        certificate rarely comes from a SPIFFE CA.

        Raises:
            VerificationError: no bundle verifies the chain.
        """
        return self.verify_any_path(leaf, intermediates, now=now, trust_domains=trust_domains)[0]

    def verify_any_path(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        *,
        now: datetime.datetime | None = None,
        trust_domains: Collection[TrustDomain] | None = None,
    ) -> tuple[TrustDomain, list[x509.Certificate]]:
        """As :meth:`verify_any`, and the path it verified: the leaf first, the root last.

        Raises:
            VerificationError: no bundle verifies the chain.
        """
        what = leaf.subject.rfc4514_string()
        for td, store in self._stores.items():
            if trust_domains is not None and td not in trust_domains:
                continue
            try:
                chain = self.verify_chain(store, leaf, intermediates, now=now, what=what)
                check_ca_scope(chain, td, what=what, spiffe=False)
            except VerificationError:
                continue
            return td, chain
        raise VerificationError(
            f"peer certificate {leaf.subject.rfc4514_string()!r}: no trust bundle verifies its chain"
        )

    @staticmethod
    def verify_chain(
        store: verification.Store,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        *,
        now: datetime.datetime | None,
        what: str,
    ) -> list[x509.Certificate]:
        """RFC 5280 path validation of ``leaf`` to a root in ``store``; returns the path built, leaf first.

        Raises:
            VerificationError: no valid path.
        """
        return BundleSet.verify_with(BundleSet.client_verifier(store, now), leaf, intermediates, now=now, what=what)

    @staticmethod
    def client_verifier(store: verification.Store, now: datetime.datetime | None) -> verification.ClientVerifier:
        """The verifier :meth:`verify_chain` uses, for :meth:`verify_with` to use for many leaves
        (``now`` None: the time it is built at)."""
        builder = (
            verification.PolicyBuilder().store(store).extension_policies(ca_policy=CA_POLICY, ee_policy=_EE_POLICY)
        )
        if now is not None:
            builder = builder.time(now)
        return builder.build_client_verifier()

    @staticmethod
    def verify_with(
        verifier: verification.ClientVerifier,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        *,
        now: datetime.datetime | None,
        what: str,
    ) -> list[x509.Certificate]:
        """:meth:`verify_chain` with a verifier from :meth:`client_verifier` (``now`` as it was given there)."""
        try:
            verified = verifier.verify(leaf, list(intermediates))
        except verification.VerificationError as err:
            raise VerificationError(
                f"peer certificate {what}: chain does not verify against its trust domain's bundle: "
                f"{why_unverified(str(err), [leaf, *intermediates], now)}"
            ) from err
        return list(verified.chain)
