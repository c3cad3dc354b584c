"""JWT-SVIDs: the SPIFFE identity carried as a signed JWT, exactly as the JWT-SVID standard says.

A :class:`JwtSvid` is a JWS in compact serialization whose ``sub`` is a SPIFFE ID, with an
``aud`` and an ``exp``. :meth:`JwtSvid.parse_and_validate` is what a server does with a
token a caller sent: it refuses, with the reason, a token over 8 KiB (before parsing it), one
that is not three base64url parts of JSON, an ``alg`` the standard does not allow (``none``,
the HMAC ones, which would let a public key be used as a shared secret), a header parameter
other than ``alg``, ``kid`` and ``typ``, a ``kid`` that is not a JWT key of the trust domain
of the token's ``sub``, a signature that does not verify, an ``exp`` in the past or an
``nbf``/``iat`` in the future (with a small leeway), and an ``aud`` that names none of the
audiences the server answers to. The JWS itself is PyJWT's work; PyJWT is imported on first use.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.errors import InvalidJwtSvidError, InvalidSpiffeIdError
from meshid.spiffeid import SpiffeId

if TYPE_CHECKING:
    from meshid._x509 import PrivateKey
    from meshid.bundle import BundleSet

__all__ = ["JWT_SVID_MAX_BYTES", "JwtSvid", "PublicKey", "sign_jwt_svid"]

#: The largest token accepted; a longer one is refused before any parsing.
JWT_SVID_MAX_BYTES = 8192

#: The keys a trust domain signs JWT-SVIDs with.
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

#: The JWT-SVID standard §2.1: RFC 7518 §3.3 (RS*), §3.4 (ES*) and §3.5 (PS*), nothing else.
ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_HEADER_PARAMETERS = frozenset({"alg", "kid", "typ"})
_TYPES = ("JWT", "JOSE")
# Three base64url parts (RFC 7515 §3.1 compact serialization; the signature may be empty, so
# that an unsigned token is refused for its `alg`, not as noise). Nothing else is parsed.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")
_MIN_RSA_BITS = 2048
# What a reason may quote of what the caller sent.
_QUOTE = 80


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE else text[: _QUOTE - 4] + "...'"


def _refuse(reason: str) -> InvalidJwtSvidError:
    return InvalidJwtSvidError(f"JWT-SVID: {reason}")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    try:
        # float() first: an int JSON integer past a float's range (10**400) raises OverflowError
        seconds = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise _refuse(f"claim {name!r} must be a NumericDate (seconds since the epoch), not {_quote(value)}")
    return seconds


def _as_datetime(seconds: float, name: str) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError) as err:
        raise _refuse(f"claim {name!r} is out of range: {seconds!r}") from err


def _key_fits(alg: str, key: object) -> bool:
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS


def _header_and_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split and decode a token, checking its structure and header; no signature check."""
    import jwt

    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    if len(token) > JWT_SVID_MAX_BYTES:
        raise _refuse(f"token is {len(token)} bytes, more than the {JWT_SVID_MAX_BYTES} allowed")
    if not _COMPACT.match(token):
        raise _refuse("malformed token: not a JWS in compact serialization (three base64url parts joined by '.')")
    try:
        unverified = jwt.api_jws.PyJWS().decode_complete(token, options={"verify_signature": False})
    except RecursionError as err:
        raise _refuse("malformed token: JSON nested too deeply") from err
    except jwt.exceptions.InvalidTokenError as err:  # DecodeError, and a header PyJWT refuses (kid, crit)
        raise _refuse(f"malformed token: {str(err)[:200]}") from err
    header, payload = unverified["header"], unverified["payload"]
    if not isinstance(header, dict):
        raise _refuse("malformed token: the header is not a JSON object")
    alg = header.get("alg")
    if alg == "none":
        raise _refuse("alg 'none' is refused: a JWT-SVID must be signed")
    if isinstance(alg, str) and alg.startswith("HS"):
        raise _refuse(
            f"alg {_quote(alg)} is an HMAC algorithm, refused: a JWT-SVID is signed with a trust domain's "
            "private key and verified with its public key, never with a shared secret"
        )
    if alg not in ALGORITHMS:
        raise _refuse(f"alg {_quote(alg)} is not one the JWT-SVID standard allows ({', '.join(ALGORITHMS)})")
    extra = sorted(set(header) - _HEADER_PARAMETERS)
    if extra:
        raise _refuse(f"header parameter {_quote(extra[0])} is not allowed (a JWT-SVID header has only alg, kid, typ)")
    if "typ" in header and header["typ"] not in _TYPES:
        raise _refuse(f"typ {_quote(header['typ'])} is not 'JWT' or 'JOSE'")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _refuse("header has no kid: say which of its trust domain's keys signed it")
    try:
        claims = json.loads(payload)
    except RecursionError as err:
        raise _refuse("malformed token: JSON nested too deeply") from err
    except ValueError as err:  # UnicodeDecodeError is a ValueError
        raise _refuse(f"malformed token: the claims are not JSON: {err}") from err
    if not isinstance(claims, dict):
        raise _refuse("malformed token: the claims are not a JSON object")
    return header, claims


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    sub = claims.get("sub")
    if sub is None:
        raise _refuse("claim 'sub' is missing: it must be the SPIFFE ID of the workload")
    if not isinstance(sub, str):
        raise _refuse(f"claim 'sub' must be a SPIFFE ID string, not {type(sub).__name__}")
    try:
        return SpiffeId.parse(sub)
    except InvalidSpiffeIdError as err:
        raise _refuse(f"claim 'sub' is not a SPIFFE ID: {str(err)[:200]}") from err


def _audience(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if aud is None:
        raise _refuse("claim 'aud' is missing: a JWT-SVID names the audience it is for")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise _refuse("claim 'aud' must be a non-empty string or a non-empty list of non-empty strings")
    return tuple(values)


def _expected(audience: Iterable[str]) -> frozenset[str]:
    if isinstance(audience, str):
        audience = (audience,)
    expected = frozenset(audience)
    if not expected or not all(isinstance(a, str) and a for a in expected):
        raise ValueError("audience: give at least one non-empty audience the token must name")
    return expected


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A JWT-SVID: the token as received and what it says.

    ``token`` is a bearer credential: it is left out of ``repr``. ``claims`` holds every claim
    (a read-only mapping) and does not take part in equality.
    """

    token: str = field(repr=False)
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: datetime.datetime
    issued_at: datetime.datetime | None
    key_id: str | None
    claims: Mapping[str, Any] = field(compare=False, repr=False)

    @classmethod
    def _from(cls, token: str, header: Mapping[str, Any], claims: dict[str, Any]) -> JwtSvid:
        spiffe_id = _subject(claims)
        audience = _audience(claims)
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise _refuse("claim 'exp' is missing: a JWT-SVID must expire")
        iat = _numeric_date(claims, "iat")
        _numeric_date(claims, "nbf")
        return cls(
            token=token,
            spiffe_id=spiffe_id,
            audience=audience,
            expiry=_as_datetime(exp, "exp"),
            issued_at=None if iat is None else _as_datetime(iat, "iat"),
            key_id=header.get("kid"),
            claims=types.MappingProxyType(claims),
        )

    @classmethod
    def parse_insecure(cls, token: str, audience: Iterable[str] = ()) -> JwtSvid:
        """Read a token without checking its signature or times: for a workload reading the
        token its own agent handed it, never for a token a peer sent.

        Args:
            token: the compact JWS.
            audience: if given, the token's ``aud`` must name at least one of these.

        Raises:
            InvalidJwtSvidError: the token's structure, header or claims break the standard.
        """
        header, claims = _header_and_claims(token)
        svid = cls._from(token, header, claims)
        expected = frozenset([audience] if isinstance(audience, str) else audience)
        if expected and expected.isdisjoint(svid.audience):
            raise _refuse(f"aud {_quote(list(svid.audience))} does not name {_quote(sorted(expected))}")
        return svid

    @classmethod
    def parse_and_validate(
        cls,
        token: str,
        bundles: BundleSet,
        audience: Iterable[str],
        *,
        now: datetime.datetime | None = None,
        leeway: float = 30.0,
    ) -> JwtSvid:
        """Validate a token a peer sent: structure, header, signature by a JWT key of the
        trust domain of its ``sub``, times, audience.

        Args:
            token: the compact JWS.
            bundles: the trust bundles whose ``jwt_authorities`` may have signed it.
            audience: what this validator answers to; the token's ``aud`` must name one of them.
            now: the time to check ``exp``, ``nbf`` and ``iat`` at (default: the system clock).
            leeway: seconds of clock skew allowed either way.

        Raises:
            InvalidJwtSvidError: the token is refused; the message says why.
            ValueError: ``audience`` is empty (a validator must know what it answers to).
        """
        import jwt

        expected = _expected(audience)
        header, claims = _header_and_claims(token)
        spiffe_id = _subject(claims)
        td = spiffe_id.trust_domain
        bundle = bundles.get(td)
        if bundle is None:
            raise _refuse(f"no trust bundle for trust domain {td} (the trust domain of sub {spiffe_id})")
        kid, alg = header["kid"], header["alg"]
        key = bundle.jwt_authorities.get(kid)
        if key is None:
            raise _refuse(f"kid {_quote(kid)} is not a JWT key of trust domain {td} (the trust domain of its sub)")
        if not _key_fits(alg, key):
            raise _refuse(f"alg {alg} does not fit key {_quote(kid)} of trust domain {td}")
        try:
            jwt.api_jws.PyJWS().decode_complete(token, key, algorithms=[alg])
        except jwt.exceptions.InvalidSignatureError as err:
            raise _refuse(f"signature does not verify with key {_quote(kid)} of trust domain {td}") from err
        except jwt.exceptions.PyJWTError as err:
            raise _refuse(f"signature cannot be checked: {str(err)[:200]}") from err
        svid = cls._from(token, header, claims)
        moment = (now or datetime.datetime.now(datetime.UTC)).timestamp()
        exp = svid.expiry.timestamp()
        if exp <= moment - leeway:
            raise _refuse(f"token expired at {svid.expiry.isoformat()}; fetch a new one (or check the clocks)")
        for name in ("nbf", "iat"):
            when = _numeric_date(claims, name)
            if when is not None and when > moment + leeway:
                at = _as_datetime(when, name).isoformat()
                raise _refuse(f"token is not yet valid ({name} {at}); check the clocks")
        if expected.isdisjoint(svid.audience):
            raise _refuse(
                f"aud {_quote(list(svid.audience))} does not name this server ({_quote(sorted(expected))}): "
                "the token was issued for another audience"
            )
        return svid


def sign_jwt_svid(
    key: PrivateKey,
    key_id: str,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    *,
    lifetime: datetime.timedelta,
    now: datetime.datetime,
) -> JwtSvid:
    """Sign a JWT-SVID: ES256 with a P-256 key, ES384 with P-384, ES512 with P-521, RS256 with RSA.

    Raises:
        ValueError: no audience, a lifetime that is not positive, an empty key ID, or a key
            that cannot sign JWT-SVIDs (Ed25519, RSA under 2048 bits, another curve).
    """
    import jwt

    if isinstance(audience, str):
        audience = (audience,)
    auds = list(audience)
    if not auds or not all(isinstance(a, str) and a for a in auds):
        raise ValueError("JWT-SVID: give at least one non-empty audience")
    if lifetime <= datetime.timedelta(0):
        raise ValueError("JWT-SVID: lifetime must be positive")
    if not isinstance(key_id, str) or not key_id:
        raise ValueError("JWT-SVID: key_id must be a non-empty string")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {curve: alg for alg, curve in _EC_CURVES.items()}
        alg = algs.get(key.curve.name)
        if alg is None:
            raise ValueError(f"JWT-SVID: cannot sign with an EC key on {key.curve.name}; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPrivateKey) and key.key_size >= _MIN_RSA_BITS:
        alg = "RS256"
    else:
        raise ValueError(f"JWT-SVID: cannot sign with a {type(key).__name__}; use EC P-256/P-384 or RSA >= 2048")
    issued = int(now.timestamp())
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": auds[0] if len(auds) == 1 else auds,
        "exp": int((now + lifetime).timestamp()),
        "iat": issued,
    }
    token = jwt.encode(claims, key, algorithm=alg, headers={"kid": key_id, "typ": "JWT"})
    return JwtSvid.parse_insecure(token)
