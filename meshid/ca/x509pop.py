"""Node attestation by x509pop: a node proves possession of the key of a host certificate from a
PKI the CA is told to trust, and its agent's name comes from a template over that certificate
(SPIRE's x509pop server plugin does the same with its ``agent_path_template``).

The proof, as the CA checks it (:meth:`X509Pop.verify`):

1. the agent asks for a challenge (:class:`Challenges`): an id and a 32-byte nonce, valid for
   30 seconds, known to this CA process only;
2. it sends its host certificate chain and a signature by the host key whose message is
   ``SHA-256(b"meshid x509pop v1" || nonce || SHA-256(csr))`` (:func:`signed_message`; ECDSA
   with SHA-256, RSA PKCS#1 v1.5 with SHA-256, or Ed25519, as the key dictates: see
   :func:`sign_proof`), which binds the proof to the CSR of the agent's new key;
3. the chain is verified to the agent-CA bundle by cryptography's RFC 5280 path validation
   (never by hand), at the CA's time; the host certificate must be an end-entity certificate
   usable for signatures and client authentication (when it says what it is for);
4. the signature is verified with the host certificate's key; only then is the challenge
   spent, so it is good for one proof that verifies, and replaying that proof is refused.

Templates are literal SPIFFE ID path characters and fields in braces: ``{cn}`` (the subject's
one common name), ``{san_dns}`` (the one DNS SAN), ``{serial}`` (lowercase hex) and
``{fingerprint}`` (the lowercase hex SHA-256 of the certificate's DER). What they give must
be one SPIFFE ID path segment: the agent is ``spiffe://<td>/meshid/agent/<name>``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
import secrets
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshid import _x509
from meshid.bundle import CA_POLICY, ca_trust_domains, why_unverified
from meshid.errors import AttestationError, InvalidRequestError, RateLimitedError
from meshid.spiffeid import TrustDomain

__all__ = [
    "CHALLENGE_TTL",
    "TEMPLATE_FIELDS",
    "AgentIdTemplate",
    "Challenge",
    "Challenges",
    "HostProof",
    "X509Pop",
    "sign_proof",
    "signed_message",
]

CHALLENGE_TTL = datetime.timedelta(seconds=30)
TEMPLATE_FIELDS = ("cn", "san_dns", "serial", "fingerprint")
DOMAIN_SEPARATOR = b"meshid x509pop v1"
#: At most this many certificates in a host chain (the host certificate and its intermediates).
MAX_CHAIN = 8
#: Spent challenges are remembered until they expire; beyond this many at once, proofs wait.
MAX_SPENT = 100_000
MAX_TEMPLATE = 200
_FIELD = re.compile(r"\{([a-z_]*)\}")
_LITERAL = re.compile(r"[A-Za-z0-9._-]*")


def signed_message(nonce: bytes, csr_der: bytes) -> bytes:
    """What the host key signs: ``SHA-256(b"meshid x509pop v1" || nonce || SHA-256(csr))``."""
    return hashlib.sha256(DOMAIN_SEPARATOR + nonce + hashlib.sha256(csr_der).digest()).digest()


def sign_proof(host_key: object, nonce: bytes, csr_der: bytes) -> bytes:
    """The x509pop signature a node agent sends (its host key over :func:`signed_message`).

    Raises:
        TypeError: a key type x509pop does not take (EC, RSA and Ed25519 keys only).
    """
    message = signed_message(nonce, csr_der)
    if isinstance(host_key, ec.EllipticCurvePrivateKey):
        return host_key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(host_key, rsa.RSAPrivateKey):
        return host_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(host_key, ed25519.Ed25519PrivateKey):
        return host_key.sign(message)
    raise TypeError(f"x509pop: a host key of type {type(host_key).__name__} cannot sign; use EC, RSA or Ed25519")


def _verify_signature(key: object, signature: bytes, message: bytes) -> None:
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise InvalidRequestError(
                f"x509pop: the host certificate's key ({type(key).__name__}) is not EC, RSA or Ed25519"
            )
    except InvalidSignature as err:
        raise AttestationError(
            "x509pop: the signature does not verify with the host certificate's key; sign "
            "SHA-256('meshid x509pop v1' || nonce || SHA-256(csr)) with the host key"
        ) from err


# --- challenges ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """What GetAttestationChallenge answers: an id, a 32-byte nonce and when it expires."""

    id: str
    nonce: bytes
    expires_at: datetime.datetime


class Challenges:
    """Challenges of one CA process, without a table of them: the id carries its expiry and a
    MAC, the nonce is an HMAC of the id under a secret of this process. So anonymous callers
    asking for challenges cost no memory; only spent ones are remembered (until they expire).

    ``clock`` is the CA's clock. Threads may call any method at once.
    """

    def __init__(
        self,
        clock: Callable[[], datetime.datetime],
        *,
        ttl: datetime.timedelta = CHALLENGE_TTL,
        max_spent: int = MAX_SPENT,
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max_spent = max_spent
        self._secret = secrets.token_bytes(32)
        self._spent: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> Challenge:
        """A new challenge, valid for the TTL from now."""
        expires_at = self._clock() + self._ttl
        body = struct.pack(">d", expires_at.timestamp()) + secrets.token_bytes(16)
        raw = body + self._mac(b"id", body)[:16]
        return Challenge(base64.urlsafe_b64encode(raw).decode().rstrip("="), self._mac(b"nonce", body), expires_at)

    def nonce(self, challenge_id: str) -> tuple[bytes, bytes]:
        """The nonce of a challenge this process issued that has not expired, and its key for :meth:`spend`.

        Raises:
            AttestationError: an id this process did not issue (another replica, a restart), or expired.
        """
        body = self._body(challenge_id)
        (expires_s,) = struct.unpack(">d", body[:8])
        if self._clock().timestamp() >= expires_s:
            raise AttestationError("x509pop: the challenge expired; ask for a new one and answer within 30 seconds")
        return self._mac(b"nonce", body), body

    def spend(self, body: bytes) -> None:
        """Mark a challenge used (once its proof verified).

        Raises:
            AttestationError: it was used already.
            RateLimitedError: too many challenges were spent in one TTL.
        """
        now = self._clock().timestamp()
        (expires_s,) = struct.unpack(">d", body[:8])
        with self._lock:
            if body in self._spent:
                raise AttestationError("x509pop: the challenge was used already; a challenge is good for one proof")
            if len(self._spent) >= self._max_spent:
                self._spent = {k: t for k, t in self._spent.items() if t > now}
                if len(self._spent) >= self._max_spent:
                    raise RateLimitedError("x509pop: too many attestations at once; try again later")
            self._spent[body] = expires_s

    def _body(self, challenge_id: str) -> bytes:
        unknown = AttestationError(
            "x509pop: unknown challenge (not issued by this CA process: it restarted, or another replica "
            "answered); ask for a new one on the same connection"
        )
        if not isinstance(challenge_id, str) or len(challenge_id) != 54:
            raise unknown
        try:
            raw = base64.urlsafe_b64decode(challenge_id + "==")
        except (ValueError, TypeError) as err:
            raise unknown from err
        body, tag = raw[:24], raw[24:]
        if len(raw) != 40 or not hmac.compare_digest(tag, self._mac(b"id", body)[:16]):
            raise unknown
        return body

    def _mac(self, label: bytes, body: bytes) -> bytes:
        return hmac.new(self._secret, label + body, hashlib.sha256).digest()


# --- the agent ID template -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentIdTemplate:
    """The name an x509pop agent gets from its host certificate; build it with :meth:`parse`."""

    text: str
    parts: tuple[tuple[str, bool], ...]  # (literal text, False) or (field name, True)

    @classmethod
    def parse(cls, text: str) -> AgentIdTemplate:
        """Parse a template such as ``{cn}`` or ``host-{serial}``.

        Raises:
            ValueError: empty, too long, an unknown field, a stray brace, a literal character
                outside a SPIFFE ID path segment's, or no field at all (every host would get
                the same name).
        """
        if not isinstance(text, str) or not text or len(text) > MAX_TEMPLATE:
            raise ValueError(f"x509pop: the agent ID template must be 1 to {MAX_TEMPLATE} characters")
        parts: list[tuple[str, bool]] = []
        position = 0
        for match in [*_FIELD.finditer(text), None]:
            literal = text[position : match.start() if match else len(text)]
            if not _LITERAL.fullmatch(literal):
                raise ValueError(
                    f"x509pop: agent ID template {text!r}: {literal!r} is neither a field in braces nor letters, "
                    "digits, '.', '-', '_'"
                )
            if literal:
                parts.append((literal, False))
            if match is None:
                break
            if match.group(1) not in TEMPLATE_FIELDS:
                raise ValueError(
                    f"x509pop: agent ID template {text!r}: unknown field {match.group(0)}; "
                    f"use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}"
                )
            parts.append((match.group(1), True))
            position = match.end()
        if not any(is_field for _, is_field in parts):
            raise ValueError(
                f"x509pop: agent ID template {text!r} has no field, so every host would be the same agent; "
                "use e.g. {cn} or {fingerprint}"
            )
        return cls(text, tuple(parts))

    def render(self, cert: x509.Certificate) -> str:
        """The name for ``cert`` (not yet checked as a path segment).

        Raises:
            InvalidRequestError: the certificate lacks what a field needs, or has it more than once.
        """
        return "".join(_field(name, cert, self.text) if is_field else name for name, is_field in self.parts)

    def __str__(self) -> str:
        return self.text


def _field(name: str, cert: x509.Certificate, template: str) -> str:
    if name == "serial":
        return format(cert.serial_number, "x")
    if name == "fingerprint":
        return _x509.thumbprint(cert)
    values = (
        [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if name == "cn"
        else _x509.dns_sans(cert)
    )
    if len(values) != 1:
        what = "subject common names" if name == "cn" else "DNS SANs"
        raise InvalidRequestError(
            f"x509pop: the agent ID template {template} needs exactly one of the host certificate's {what}, "
            f"and it has {len(values)}"
        )
    return values[0]


# --- the proof -------------------------------------------------------------------------------


def _end_entity(policy: object, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is not None and ext.ca:
        raise ValueError("the host certificate is a CA certificate; x509pop takes an end-entity certificate")


def _signs(policy: object, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
    if ext is not None and not ext.digital_signature:
        raise ValueError("the host certificate's key usage does not include digitalSignature")


def _client_auth(policy: object, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
    if ext is not None and not {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(ext):
        raise ValueError("the host certificate's extended key usage does not include clientAuth")


_AGNOSTIC = verification.Criticality.AGNOSTIC
_EE_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .may_be_present(x509.BasicConstraints, _AGNOSTIC, _end_entity)
    .may_be_present(x509.KeyUsage, _AGNOSTIC, _signs)
    .may_be_present(x509.ExtendedKeyUsage, _AGNOSTIC, _client_auth)
)


@dataclass(frozen=True, slots=True)
class HostProof:
    """A verified x509pop proof: the agent's name, the host certificate's subject and key."""

    name: str
    subject: str
    public_key_der: bytes


@dataclass(frozen=True, slots=True)
class X509Pop:
    """What a CA trusts for x509pop: the agent-CA roots and the agent ID template. Build it with :meth:`load`."""

    roots: tuple[x509.Certificate, ...]
    template: AgentIdTemplate

    @classmethod
    def load(cls, pem: bytes, template: str, *, refuse: Sequence[x509.Certificate] = ()) -> X509Pop:
        """Parse the agent-CA bundle strictly (PEM certificates only, each a CA, nothing else)
        and the template. ``refuse`` are the CA's own roots: they may not be in the bundle, or
        every workload SVID would be a host certificate.

        Raises:
            ValueError: the bundle or the template is unusable.
        """
        blocks = _x509.pem_blocks(pem)
        rest = pem
        for _, block in blocks:
            rest = rest.replace(block, b"", 1)
        if not blocks or rest.strip():
            raise ValueError("x509pop: the agent CA bundle must hold PEM certificates and nothing else")
        roots = []
        for label, block in blocks:
            if label != "CERTIFICATE":
                raise ValueError(
                    f"x509pop: the agent CA bundle holds a {label!r} block; only certificates belong there"
                )
            cert = x509.load_pem_x509_certificate(block)
            if not _x509.is_ca(cert):
                raise ValueError(f"x509pop: {cert.subject.rfc4514_string()!r} in the agent CA bundle is not a CA")
            roots.append(cert)
        own = {_x509.thumbprint(c) for c in refuse}
        if any(_x509.thumbprint(c) in own for c in roots):
            raise ValueError(
                "x509pop: the agent CA bundle holds this CA's own root; give the PKI that issues host certificates, "
                "not meshid's bundle (every workload SVID would then attest as a node)"
            )
        return cls(tuple(roots), AgentIdTemplate.parse(template))

    def verify(
        self,
        chain_der: Sequence[bytes],
        signature: bytes,
        nonce: bytes,
        csr_der: bytes,
        *,
        now: datetime.datetime,
        trust_domain: TrustDomain,
    ) -> HostProof:
        """Check a proof over ``nonce`` (the caller has checked the challenge is live) and name
        the agent. ``trust_domain`` is the CA's: a chain through one of its CAs is refused.

        Raises:
            InvalidRequestError: a malformed chain or signature, or a template the certificate
                does not fill.
            AttestationError: the chain does not verify to the agent-CA bundle at ``now``, the host
                certificate is an X509-SVID or was issued under a CA of ``trust_domain``, or the
                signature does not verify with the host certificate's key.
        """
        if not chain_der or len(chain_der) > MAX_CHAIN:
            raise InvalidRequestError(f"x509pop: give the host certificate chain, 1 to {MAX_CHAIN} DER certificates")
        if not signature or len(signature) > 1024:
            raise InvalidRequestError("x509pop: the signature is missing or larger than 1024 bytes")
        try:
            chain = [x509.load_der_x509_certificate(bytes(der)) for der in chain_der]
            key = chain[0].public_key()
        except _x509.PARSE_ERRORS as err:
            raise InvalidRequestError(f"x509pop: a certificate of the host chain cannot be read: {err}") from err
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(list(self.roots)))
            .time(now)
            .extension_policies(ca_policy=CA_POLICY, ee_policy=_EE_POLICY)
        )
        try:
            built = builder.build_client_verifier().verify(chain[0], chain[1:]).chain
        except verification.VerificationError as err:
            raise AttestationError(
                f"x509pop: the host certificate {chain[0].subject.rfc4514_string()[:200]!r} does not verify against "
                f"the agent CA bundle: {why_unverified(str(err), chain, now)}"
            ) from err
        # Should the agent PKI sit above this CA (a corporate root that also signs meshid's
        # intermediate), its X509-SVIDs would verify too: an SVID never attests a node.
        if any(uri[:7].lower() == "spiffe:" for uri in _x509.uri_sans(chain[0])):
            raise AttestationError("x509pop: the host certificate is an X509-SVID; only host certificates attest nodes")
        if any(trust_domain.name in ca_trust_domains(ca) for ca in built[1:]):
            raise AttestationError(
                f"x509pop: the host certificate was issued under a CA of {trust_domain} itself; only host "
                "certificates of the agent PKI attest nodes"
            )
        _verify_signature(key, bytes(signature), signed_message(nonce, csr_der))
        name = self.template.render(chain[0])
        return HostProof(name, chain[0].subject.rfc4514_string()[:1024], _x509.public_key_der(key))
