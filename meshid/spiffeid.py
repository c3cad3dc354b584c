"""SPIFFE IDs and trust domains, exactly as the SPIFFE ID standard defines them.

A SPIFFE ID is ``spiffe://<trust domain><path>``. The trust domain uses only
lowercase letters, digits, ``.``, ``-`` and ``_``; the path is zero or more
``/segment`` parts whose characters are letters, digits, ``.``, ``-`` and
``_``, with no empty, ``.`` or ``..`` segment and no trailing slash. There is
no port, userinfo, query, fragment or percent-encoding. A SPIFFE ID is at most
2048 bytes and a trust domain name at most 255.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshid.errors import InvalidSpiffeIdError

__all__ = ["SpiffeId", "TrustDomain"]

SCHEME_PREFIX = "spiffe://"
MAX_SPIFFE_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
#: The whole grammar above as one pattern (ASCII only; no empty, ``.`` or ``..`` segment). A valid
#: ID, which is nearly every ID parsed (the CA and the agents parse several per SVID), is taken in
#: one match; the checks below exist to name the rule an invalid one breaks.
_VALID_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+)*)\Z")


def _check_trust_domain(name: str, text: str, what: str = "SPIFFE ID") -> None:
    """``what`` starts each message: "SPIFFE ID", or "trust domain" when a bare name was given."""
    if not name:
        raise InvalidSpiffeIdError(f"{what} {text!r}: trust domain is missing")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeIdError(
            f"{what} {text[:80]!r}...: trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} bytes"
        )
    if name.isascii() and all(c in _TD_CHARS for c in name):
        return
    if "@" in name:
        raise InvalidSpiffeIdError(f"{what} {text!r}: userinfo is not allowed in the trust domain")
    if ":" in name:
        raise InvalidSpiffeIdError(f"{what} {text!r}: a port is not allowed in the trust domain")
    if "%" in name:
        raise InvalidSpiffeIdError(f"{what} {text!r}: percent-encoding is not allowed")
    if name.isascii() and name.lower() != name and all(c in _TD_CHARS for c in name.lower()):
        raise InvalidSpiffeIdError(f"{what} {text!r}: trust domain must be lowercase; use {name.lower()!r}")
    raise InvalidSpiffeIdError(
        f"{what} {text!r}: trust domain characters are limited to lowercase letters, "
        "numbers, dots, dashes, and underscores"
    )


def _check_path(path: str, text: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: path must start with '/'")
    if path.endswith("/"):
        raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: path cannot have a trailing slash")
    for segment in path[1:].split("/"):
        _check_segment(segment, text)


def _check_segment(segment: str, text: str) -> None:
    if not segment:
        raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: path cannot contain empty segments")
    if segment in (".", ".."):
        raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: path cannot contain dot segments")
    if not (segment.isascii() and all(c in _PATH_CHARS for c in segment)):
        if "%" in segment:
            raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: percent-encoding is not allowed")
        if "?" in segment:
            raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: a query is not allowed")
        if "#" in segment:
            raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: a fragment is not allowed")
        raise InvalidSpiffeIdError(
            f"SPIFFE ID {text!r}: path segment characters are limited to letters, numbers, "
            "dots, dashes, and underscores"
        )


@dataclass(frozen=True, slots=True, eq=False)
class TrustDomain:
    """A SPIFFE trust domain such as ``example.org``. Build it with :meth:`parse`."""

    name: str

    # Equality and hash as a dataclass's (by name), written out: the CA and the decision memo
    # look trust domains and SPIFFE IDs up in dicts and sets many times per SVID or call, and
    # the generated methods compare and hash a tuple of fields through a nested call.
    def __eq__(self, other: object) -> bool:
        if other.__class__ is not TrustDomain:
            return NotImplemented
        return self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a trust domain name, or the trust domain of a SPIFFE ID.

        Raises:
            TypeError: ``text`` is not a str.
            InvalidSpiffeIdError: the name breaks the SPIFFE ID standard.
        """
        if not isinstance(text, str):
            raise TypeError(f"trust domain must be a str, not {type(text).__name__}")
        if "://" in text or text.startswith("spiffe:"):
            return SpiffeId.parse(text).trust_domain
        if not text:
            raise InvalidSpiffeIdError("trust domain: cannot be empty")
        if "/" in text:
            raise InvalidSpiffeIdError(
                f"trust domain {text!r}: a trust domain name has no path; give a name like 'example.org'"
            )
        _check_trust_domain(text, text, "trust domain")
        return cls(text)

    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself (``spiffe://<name>``)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, eq=False)
class SpiffeId:
    """A SPIFFE ID such as ``spiffe://example.org/ns/prod/sa/payments``.

    Build it with :meth:`parse` or :meth:`from_parts`; ``str()`` gives the canonical form.
    """

    trust_domain: TrustDomain
    path: str

    def __eq__(self, other: object) -> bool:  # as TrustDomain's: by trust domain and path
        if other.__class__ is not SpiffeId:
            return NotImplemented
        return self.path == other.path and self.trust_domain.name == other.trust_domain.name

    def __hash__(self) -> int:
        return hash((self.trust_domain.name, self.path))

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse a SPIFFE ID.

        Raises:
            TypeError: ``text`` is not a str.
            InvalidSpiffeIdError: ``text`` breaks the standard; the message names the rule.
        """
        if not isinstance(text, str):
            raise TypeError(f"SPIFFE ID must be a str, not {type(text).__name__}")
        valid = _VALID_ID.match(text)
        if valid and len(text) <= MAX_SPIFFE_ID_LENGTH and len(valid[1]) <= MAX_TRUST_DOMAIN_LENGTH:
            return cls(TrustDomain(valid[1]), valid[2])
        if not text:
            raise InvalidSpiffeIdError("SPIFFE ID: cannot be empty")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_LENGTH:
            raise InvalidSpiffeIdError(f"SPIFFE ID {text[:80]!r}...: longer than {MAX_SPIFFE_ID_LENGTH} bytes")
        if not text.startswith(SCHEME_PREFIX):
            if text[:9].lower() == SCHEME_PREFIX:
                raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: scheme must be lowercase 'spiffe'")
            raise InvalidSpiffeIdError(
                f"SPIFFE ID {text!r}: scheme is missing or invalid; it must start with 'spiffe://'"
            )
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        for mark, what in (("?", "a query"), ("#", "a fragment")):
            if mark in rest:
                raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: {what} is not allowed")
        _check_trust_domain(name, text)
        _check_path(path, text)
        return cls(TrustDomain(name), path)

    @classmethod
    def from_parts(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build ``spiffe://<trust_domain>/<segment>/...``, checking every part.

        Raises:
            InvalidSpiffeIdError: a part breaks the standard.
        """
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        text = SCHEME_PREFIX + td.name + "".join("/" + s for s in segments)
        for segment in segments:
            _check_segment(segment, text)
        return cls.parse(text)

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        """Whether this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
