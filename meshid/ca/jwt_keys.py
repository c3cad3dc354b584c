"""The CA's JWT-SVID signing keys: separate from its X.509 CA key, rotated the same way.

::

    DIR/jwt-keys.json   (0600, written atomically)
    {"version": 1,
     "signing":  {"kid": "...", "private_key": "<PKCS#8 PEM>"},          signs every JWT-SVID now
     "prepared": {"kid": "...", "private_key": "<PKCS#8 PEM>"} | null,   published, signs nothing yet
     "retiring": [{"kid": "...", "public_key": "<SPKI PEM>",             published until retire_after:
                   "retire_after": "<ISO 8601, UTC>"}]}                  every token it signed has expired

Every key of the file is published in the trust domain's bundle (as a ``use: jwt-svid`` JWK with
its ``kid``); only the signing key signs. A retiring key keeps no private half. Key IDs are 32
random base62 characters, as SPIRE's. The key types are those the JWT-SVID standard's
algorithms cover and meshid signs with: ``ec-p256`` (ES256, the default, as SPIRE),
``ec-p384`` (ES384) and ``rsa-2048`` (RS256; RSA keys of 3072 and 4096 bits load too).
"""

from __future__ import annotations

import datetime
import json
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid import _x509
from meshid.bundle import MAX_JWT_KEYS
from meshid.ca.authority import generate_key
from meshid.spiffeid import SpiffeId

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = [
    "JWT_KEY_TYPES",
    "JWT_SVID_TTL",
    "JwtKey",
    "JwtKeys",
    "RetiringJwtKey",
    "generate_jwt_key",
    "key_type",
    "new_key_id",
]

#: ``ca init --jwt-key-type`` choices.
JWT_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
#: What a rotation may make (the type of the key it replaces; larger RSA keys load too).
_KINDS = (*JWT_KEY_TYPES, "rsa-3072", "rsa-4096")
#: The lifetime of a JWT-SVID (short, as the standard advises), capped by its entry's TTL.
JWT_SVID_TTL = datetime.timedelta(minutes=5)
_KID_ALPHABET = string.ascii_letters + string.digits
_KID_LENGTH = 32
_MAX_FILE_BYTES = 1 << 20
_MAX_RETIRING = 64
#: The most retiring keys an activation leaves: with the signing and a prepared key, what a bundle carries.
_MAX_ACTIVATED_RETIRING = MAX_JWT_KEYS - 2

JwtPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
JwtPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def new_key_id() -> str:
    """A fresh key ID: 32 random base62 characters (about 190 bits)."""
    return "".join(secrets.choice(_KID_ALPHABET) for _ in range(_KID_LENGTH))


def generate_jwt_key(kind: str = "ec-p256") -> JwtPrivateKey:
    """A new JWT signing key of ``kind`` (one of :data:`JWT_KEY_TYPES`, or ``rsa-3072``/``rsa-4096``).

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in _KINDS:
        raise ValueError(f"JWT key type {kind!r} is unknown; use one of {', '.join(JWT_KEY_TYPES)}")
    return generate_key(kind)  # type: ignore[return-value]


def key_type(key: JwtPrivateKey | JwtPublicKey) -> str:
    """``ec-p256``, ``ec-p384`` or ``rsa-<bits>``: what a rotation makes the next key like."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, key.curve.name)
    return f"rsa-{key.key_size}"


def _check_key(key: object, what: str) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise ValueError(f"{what}: curve {key.curve.name} is not P-256 or P-384")
    elif isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"{what}: an RSA key of {key.key_size} bits is too small (2048 at least)")
    else:
        raise ValueError(f"{what}: a {type(key).__name__} cannot sign JWT-SVIDs; use EC P-256/P-384 or RSA")


def _check_kid(kid: object, what: str) -> str:
    if not isinstance(kid, str) or not 1 <= len(kid) <= 64 or any(c not in _KID_ALPHABET for c in kid):
        raise ValueError(f"{what}: the kid must be 1 to 64 letters and digits")
    return kid


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A JWT signing key (the signing one, or the prepared next one) and its key ID."""

    kid: str
    private_key: JwtPrivateKey = field(repr=False, compare=False)

    @classmethod
    def generate(cls, kind: str = "ec-p256") -> JwtKey:
        """A new key of ``kind`` with a new key ID.

        Raises:
            ValueError: an unknown kind.
        """
        return cls(new_key_id(), generate_jwt_key(kind))

    @property
    def public_key(self) -> JwtPublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True, slots=True)
class RetiringJwtKey:
    """A key that signed JWT-SVIDs before a rotation: published until ``retire_after``."""

    kid: str
    public_key: JwtPublicKey = field(compare=False)
    retire_after: datetime.datetime


@dataclass(frozen=True, slots=True)
class JwtKeys:
    """The CA's JWT keys: one signing, perhaps one prepared, and those retiring."""

    signing: JwtKey
    prepared: JwtKey | None = None
    retiring: tuple[RetiringJwtKey, ...] = ()

    def __post_init__(self) -> None:
        kids = [k.kid for k in (self.signing, self.prepared, *self.retiring) if k is not None]
        if len(set(kids)) != len(kids):
            raise ValueError("JWT keys: two keys share a kid")

    @classmethod
    def generate(cls, kind: str = "ec-p256") -> JwtKeys:
        """A first signing key of ``kind``, nothing else.

        Raises:
            ValueError: an unknown kind.
        """
        return cls(JwtKey.generate(kind))

    @property
    def published(self) -> Mapping[str, JwtPublicKey]:
        """Every key the bundle carries, by kid: the signing, prepared and retiring ones."""
        keys: dict[str, JwtPublicKey] = {self.signing.kid: self.signing.public_key}
        if self.prepared is not None:
            keys[self.prepared.kid] = self.prepared.public_key
        for old in self.retiring:
            keys[old.kid] = old.public_key
        return keys

    def prepare(self) -> JwtKeys:
        """With a next key of the signing key's type prepared (unchanged if one is already)."""
        if self.prepared is not None:
            return self
        kind = key_type(self.signing.private_key)
        return replace(self, prepared=JwtKey.generate(kind if kind in _KINDS else "ec-p256"))

    def activate(self, retire_after: datetime.datetime) -> JwtKeys:
        """The prepared key signing; the old signing key retiring at ``retire_after``.

        Raises:
            ValueError: nothing is prepared.
        """
        if self.prepared is None:
            raise ValueError("JWT keys: nothing prepared")
        if len(self.retiring) >= _MAX_ACTIVATED_RETIRING:
            raise ValueError(
                f"JWT keys: {len(self.retiring)} keys are retiring already, as many as the bundle carries beside "
                "a signing and a prepared one; wait until some retire (`meshid ca rotate status`), or rotate with "
                "a shorter --grace"
            )
        old = RetiringJwtKey(self.signing.kid, self.signing.public_key, retire_after)
        return JwtKeys(self.prepared, None, (*self.retiring, old))

    def retire_due(self, now: datetime.datetime) -> tuple[JwtKeys, list[str]]:
        """Without the retiring keys whose time has come; and their kids."""
        due = [k.kid for k in self.retiring if k.retire_after <= now]
        return replace(self, retiring=tuple(k for k in self.retiring if k.retire_after > now)), due

    def sign(
        self,
        spiffe_id: SpiffeId,
        audience: Sequence[str],
        *,
        lifetime: datetime.timedelta,
        now: datetime.datetime,
    ) -> JwtSvid:
        """A JWT-SVID for ``spiffe_id`` and ``audience``, signed by the signing key."""
        from meshid.jwtsvid import sign_jwt_svid

        key = self.signing
        return sign_jwt_svid(key.private_key, key.kid, spiffe_id, audience, lifetime=lifetime, now=now)

    # --- the file ------------------------------------------------------------------------

    def to_json(self) -> bytes:
        def private(key: JwtKey) -> dict[str, str]:
            return {"kid": key.kid, "private_key": _x509.key_pem(key.private_key).decode()}

        document = {
            "version": 1,
            "signing": private(self.signing),
            "prepared": private(self.prepared) if self.prepared is not None else None,
            "retiring": [
                {
                    "kid": k.kid,
                    "public_key": k.public_key.public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    ).decode(),
                    "retire_after": k.retire_after.isoformat(),
                }
                for k in self.retiring
            ],
        }
        return json.dumps(document, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JwtKeys:
        """Parse jwt-keys.json strictly: unknown fields, bad kids or keys are refused.

        Raises:
            ValueError: the document is malformed (the message says where).
        """
        if len(data) > _MAX_FILE_BYTES:
            raise ValueError("JWT keys: the file is larger than 1 MiB")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeError) as err:
            raise ValueError(f"JWT keys: not JSON: {err}") from err
        _fields(raw, {"version", "signing", "prepared", "retiring"}, "JWT keys")
        if raw.get("version") != 1:
            raise ValueError(f"JWT keys: version {raw.get('version')!r} is not 1")
        signing = _private(raw.get("signing"), "JWT keys: signing")
        prepared = None if raw.get("prepared") is None else _private(raw["prepared"], "JWT keys: prepared")
        retiring = raw.get("retiring", [])
        if not isinstance(retiring, list) or len(retiring) > _MAX_RETIRING:
            raise ValueError(f"JWT keys: retiring must be a list of at most {_MAX_RETIRING} keys")
        return cls(
            signing, prepared, tuple(_retiring(item, f"JWT keys: retiring[{i}]") for i, item in enumerate(retiring))
        )


def _fields(raw: Any, allowed: set[str], what: str) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: must be an object")
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {sorted(unknown)}")


def _private(raw: Any, what: str) -> JwtKey:
    _fields(raw, {"kid", "private_key"}, what)
    kid = _check_kid(raw.get("kid"), what)
    pem = raw.get("private_key")
    if not isinstance(pem, str):
        raise ValueError(f"{what}: private_key must be a PEM string")
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except _x509.PARSE_ERRORS as err:
        raise ValueError(f"{what}: private_key is not a usable key: {err}") from err
    _check_key(key, what)
    return JwtKey(kid, key)  # type: ignore[arg-type]


def _retiring(raw: Any, what: str) -> RetiringJwtKey:
    _fields(raw, {"kid", "public_key", "retire_after"}, what)
    kid = _check_kid(raw.get("kid"), what)
    pem, when = raw.get("public_key"), raw.get("retire_after")
    if not isinstance(pem, str) or not isinstance(when, str):
        raise ValueError(f"{what}: public_key and retire_after must be strings")
    try:
        key = serialization.load_pem_public_key(pem.encode())
        retire_after = datetime.datetime.fromisoformat(when)
    except _x509.PARSE_ERRORS as err:
        raise ValueError(f"{what}: {err}") from err
    if retire_after.tzinfo is None:
        raise ValueError(f"{what}: retire_after must carry a time zone")
    _check_key(key, what)
    return RetiringJwtKey(kid, key, retire_after)  # type: ignore[arg-type]
