"""The CA's OCSP responder (RFC 6960): one request in, one signed response out, no I/O.

:func:`answer` takes the DER of an ``OCSPRequest`` and gives the DER of an ``OCSPResponse``,
never an exception: a request that does not parse, asks about several certificates, or carries
a nonce outside RFC 8954's 1..32 octets gets ``malformedRequest``; a certificate of another
issuer ``unauthorized``; a store that cannot answer ``tryLater``; a response that cannot be
signed ``internalError``. The rest is a signed
``successful`` response with one ``SingleResponse``:

* ``good``: the CA issued this serial (the store has its record) and it is not revoked;
* ``revoked`` with the revocation time: its record says revoked (no reason is given: the store
  records none, and RFC 5280 asks to leave ``unspecified`` out rather than send it);
* ``unknown``: this CA never issued that serial.

Responses are signed by the issuing CA itself (RFC 6960 section 4.2.2.2, the first case), so a
client needs no delegated responder certificate; the CA's certificate goes along in ``certs``
(verifiers such as nginx's look for the signer there); ``responderID`` is the CA key's hash,
``thisUpdate`` is now and ``nextUpdate`` now plus the validity, and the request's nonce is
echoed. The status comes from ``status_of``, called once per request: in ``meshid ca serve`` it
reads the store's record, so a revocation made by any replica on the same database shows in
the next answer (see :class:`meshid.ca.http.RevocationHttpServer`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp

from meshid.ca.authority import Authority, hash_for
from meshid.ca.store import IssuedRecord

__all__ = ["DEFAULT_VALIDITY", "MAX_REQUEST_BYTES", "OcspAnswer", "OcspResponder", "answer"]

#: How long a response stays valid (nextUpdate - thisUpdate) unless the CA is told otherwise.
DEFAULT_VALIDITY = datetime.timedelta(minutes=5)
#: An OCSP request for one certificate is about 100 bytes; a signed one with its chain a few KiB.
MAX_REQUEST_BYTES = 16 * 1024
#: RFC 8954: a nonce is 1 to 32 octets.
MAX_NONCE_BYTES = 32

_HASHES: tuple[type[hashes.HashAlgorithm], ...] = (
    hashes.SHA1,
    hashes.SHA224,
    hashes.SHA256,
    hashes.SHA384,
    hashes.SHA512,
)

StatusOf = Callable[[int], IssuedRecord | None]


@dataclass(frozen=True, slots=True)
class OcspAnswer:
    """A DER ``OCSPResponse`` and what it said, for metrics and logs.

    ``outcome`` is one of ``good``, ``revoked``, ``unknown`` (successful responses) or
    ``malformed``, ``unauthorized``, ``try_later``, ``internal`` (unsuccessful ones). ``max_age`` is how long
    an HTTP cache may keep it (0 for an unsuccessful or nonced response).
    """

    der: bytes = field(repr=False)
    outcome: str
    max_age: int = 0


def _key_bits(certificate: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING's value, which RFC 6960's issuerKeyHash hashes."""
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise ValueError(f"OCSP: a CA key of type {type(key).__name__} cannot sign")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def _issuer_ids(certificate: x509.Certificate) -> frozenset[tuple[str, bytes, bytes]]:
    name = certificate.subject.public_bytes()
    bits = _key_bits(certificate)
    algorithms = [h() for h in _HASHES]
    return frozenset((a.name, _digest(a, name), _digest(a, bits)) for a in algorithms)


_UNSUCCESSFUL = {
    "malformed": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
    "unauthorized": ocsp.OCSPResponseStatus.UNAUTHORIZED,
    "try_later": ocsp.OCSPResponseStatus.TRY_LATER,
    "internal": ocsp.OCSPResponseStatus.INTERNAL_ERROR,
}


def _unsuccessful(outcome: str) -> OcspAnswer:
    der = ocsp.OCSPResponseBuilder.build_unsuccessful(_UNSUCCESSFUL[outcome]).public_bytes(serialization.Encoding.DER)
    return OcspAnswer(der, outcome)


class OcspResponder:
    """Answers OCSP requests for the certificates one CA signs.

    ``authority`` returns the CA signing now (it changes on a key rotation); ``previous`` the CAs
    it signed with before (their SVIDs may still be in use: each is answered for, and signed
    for, by its own key); ``status_of`` returns the store's record of a serial, or None if this
    CA never issued it, and raises for a store that cannot answer. The issuer hashes of each CA
    are worked out once.
    """

    def __init__(
        self,
        authority: Callable[[], Authority],
        status_of: StatusOf,
        *,
        previous: Callable[[], Sequence[Authority]] = tuple,
        validity: datetime.timedelta = DEFAULT_VALIDITY,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        if validity <= datetime.timedelta(0):
            raise ValueError("OCSP: the response validity must be positive")
        self._authority = authority
        self._previous = previous
        self._status_of = status_of
        self._validity = validity
        self._now = now
        self._ids: dict[bytes, frozenset[tuple[str, bytes, bytes]]] = {}

    def _issuer_ids(self, authority: Authority) -> frozenset[tuple[str, bytes, bytes]]:
        key = authority.certificate.fingerprint(hashes.SHA256())
        ids = self._ids.get(key)
        if ids is None:
            if len(self._ids) > 64:  # CAs come and go with rotations: never more than a few
                self._ids.clear()
            ids = self._ids[key] = _issuer_ids(authority.certificate)
        return ids

    def respond(self, request_der: bytes) -> OcspAnswer:
        """The answer to one DER ``OCSPRequest``; never raises."""
        authorities = (self._authority(), *self._previous())
        return answer(request_der, authorities, self._status_of, self._issuer_ids, self._now(), self._validity)


def _parse(request_der: bytes) -> tuple[ocsp.OCSPRequest, bytes | None] | None:
    if not isinstance(request_der, bytes) or not request_der or len(request_der) > MAX_REQUEST_BYTES:
        return None
    try:
        request = ocsp.load_der_ocsp_request(request_der)  # one Request only: more is a ValueError
        serial = request.serial_number
        request.hash_algorithm  # noqa: B018  an algorithm cryptography does not know is a ValueError
        nonce: bytes | None = None
        for extension in request.extensions:
            if isinstance(extension.value, x509.OCSPNonce):
                nonce = extension.value.nonce
            elif extension.critical:
                return None  # RFC 5280: a critical extension one does not know refuses the whole
    except Exception:  # cryptography's parser raises ValueError, and other kinds for odd DER
        return None
    if serial < 0 or (nonce is not None and not 1 <= len(nonce) <= MAX_NONCE_BYTES):
        return None
    return request, nonce


def answer(
    request_der: bytes,
    authorities: Sequence[Authority],
    status_of: StatusOf,
    issuer_ids: Callable[[Authority], frozenset[tuple[str, bytes, bytes]]],
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> OcspAnswer:
    """The OCSP response to ``request_der`` at ``now``, signed by the one of ``authorities`` that
    issued the certificate asked about; never raises."""
    parsed = _parse(request_der)
    if parsed is None:
        return _unsuccessful("malformed")
    request, nonce = parsed
    algorithm = request.hash_algorithm
    asked = (algorithm.name, request.issuer_name_hash, request.issuer_key_hash)
    authority = next((a for a in authorities if asked in issuer_ids(a)), None)
    if authority is None:
        return _unsuccessful("unauthorized")  # RFC 6960 2.3: not a certificate this responder serves
    try:
        record = status_of(request.serial_number)
    except Exception:
        return _unsuccessful("try_later")
    this_update = now.replace(microsecond=0)
    revoked_at = None
    if record is None:
        status, outcome = ocsp.OCSPCertStatus.UNKNOWN, "unknown"
    elif record.revoked_at is not None:
        status, outcome, revoked_at = ocsp.OCSPCertStatus.REVOKED, "revoked", record.revoked_at
    else:
        status, outcome = ocsp.OCSPCertStatus.GOOD, "good"
    try:
        der = _signed(request, authority, status, this_update, this_update + validity, revoked_at, nonce)
    except Exception:  # a key or a value cryptography refuses: say so in OCSP, never a traceback
        return _unsuccessful("internal")
    return OcspAnswer(der, outcome, 0 if nonce is not None else int(validity.total_seconds()))


def _signed(
    request: ocsp.OCSPRequest,
    authority: Authority,
    status: ocsp.OCSPCertStatus,
    this_update: datetime.datetime,
    next_update: datetime.datetime,
    revoked_at: datetime.datetime | None,
    nonce: bytes | None,
) -> bytes:
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number,
            algorithm=request.hash_algorithm,
            cert_status=status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=revoked_at,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, authority.certificate)
    )
    # The signer's certificate goes along: nginx's stapling looks for the signer only in the
    # response and in the chain of its own certificate file (which, under a root CA, is empty).
    builder = builder.certificates([authority.certificate])
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    response = builder.sign(authority.private_key, hash_for(authority.private_key))
    return response.public_bytes(serialization.Encoding.DER)
