"""The matchers a policy is compiled into: SPIFFE ID globs, method patterns, gRPC string matchers."""

from __future__ import annotations

import re
from typing import Protocol

import re2  # type: ignore[import-untyped]

from meshid.errors import InvalidPolicyError, InvalidSpiffeIdError
from meshid.spiffeid import SpiffeId, TrustDomain

__all__ = ["Matcher", "compile_spiffe_id_pattern", "compile_subject_pattern", "method_pattern", "show"]


class Matcher(Protocol):
    """A compiled pattern: RE2, so matching time is linear in the input whatever the pattern."""

    def fullmatch(self, text: str) -> object | None: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors become InvalidPolicyError; nothing goes to stderr


def _re2(pattern: str) -> Matcher:
    return re2.compile(pattern, _RE2_OPTIONS)  # type: ignore[no-any-return]


def show(value: object, limit: int = 80) -> str:
    """A value for an error message, bounded: a str or number, cut at ``limit``; anything else
    by its type (a repr of a YAML alias bomb would be gigabytes)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"a {type(value).__name__}"


#: Subject patterns longer than this are refused; they are regular expressions run on every new peer.
MAX_SUBJECT_PATTERN = 1024

_SEGMENT = r"[A-Za-z0-9._-]+"
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def compile_spiffe_id_pattern(pattern: str) -> Matcher:
    """Compile a SPIFFE ID glob: ``*`` is exactly one path segment, ``**`` one or more; anchored.

    ``spiffe://example.org/ns/*/sa/web`` matches ``.../ns/prod/sa/web`` but not
    ``.../ns/prod/x/sa/web``; ``spiffe://example.org/**`` matches every workload of the
    trust domain (and not the trust domain's own ID).

    Raises:
        InvalidSpiffeIdError: the pattern is not a SPIFFE ID once its globs are replaced.
    """
    if not isinstance(pattern, str):
        raise TypeError("SPIFFE ID pattern must be a str")
    prefix = "spiffe://"
    if not pattern.startswith(prefix):
        raise InvalidSpiffeIdError(f"SPIFFE ID pattern {pattern!r}: must start with 'spiffe://'")
    td_text, sep, path = pattern[len(prefix) :].partition("/")
    if "*" in td_text:
        raise InvalidSpiffeIdError(
            f"SPIFFE ID pattern {pattern!r}: the trust domain cannot be a glob; use trust_domains instead"
        )
    td = TrustDomain.parse(td_text)
    if not sep:
        raise InvalidSpiffeIdError(
            f"SPIFFE ID pattern {pattern!r}: has no path; use trust_domains for a whole trust domain"
        )
    parts = []
    for segment in path.split("/"):
        if segment == "*":
            parts.append(_SEGMENT)
        elif segment == "**":
            parts.append(f"{_SEGMENT}(?:/{_SEGMENT})*")
        elif "*" in segment:
            raise InvalidSpiffeIdError(
                f"SPIFFE ID pattern {pattern!r}: '*' must be a whole segment ('*' or '**'), not part of {segment!r}"
            )
        else:
            try:
                SpiffeId.from_parts(td, segment)  # checks the literal segment's characters
            except InvalidSpiffeIdError as err:
                why = str(err).partition("': ")[2] or str(err)
                raise InvalidSpiffeIdError(
                    f"SPIFFE ID pattern {pattern!r}: segment {segment!r}: {why}; a pattern is a SPIFFE ID "
                    "whose whole segments may be '*' (one segment) or '**' (one or more), not a regular expression"
                ) from err
            parts.append(re.escape(segment))
    return _re2(re.escape(prefix + td.name) + "/" + "/".join(parts))


def compile_subject_pattern(pattern: str) -> Matcher:
    """Compile a regular expression (RE2 syntax, as Envoy's ``safe_regex``) that must fully match
    an RFC 4514 subject. RE2 matches in linear time, so no pattern can stall a server on a
    crafted subject; it has no look-around or back-references.

    Raises:
        InvalidPolicyError: not a valid regular expression, or too long.
    """
    if not isinstance(pattern, str):
        raise InvalidPolicyError("subject pattern must be a string")
    if len(pattern) > MAX_SUBJECT_PATTERN:
        raise InvalidPolicyError(f"subject pattern is longer than {MAX_SUBJECT_PATTERN} characters")
    for match in _REPEAT.finditer(pattern):  # RE2 caps repeats at 1000 but reads 2**32 as 0
        if any(int(n) > 1000 for n in match.groups() if n):
            raise InvalidPolicyError(
                f"subject pattern {show(pattern)} is not a valid regular expression (RE2 syntax): "
                f"repetition {match.group(0)} is larger than 1000"
            )
    try:
        return _re2(pattern)
    except (re2.error, ValueError, TypeError, OverflowError, RecursionError) as err:
        reason = err.args[0].decode(errors="replace") if err.args and isinstance(err.args[0], bytes) else err
        raise InvalidPolicyError(
            f"subject pattern {show(pattern)} is not a valid regular expression (RE2 syntax): {reason}"
        ) from err


def method_pattern(text: str) -> tuple[str, str]:
    """Classify a native method pattern: ``("exact", "/pkg.S/M")``, ``("prefix", "/pkg.S/")`` or ``("any", "")``.

    Raises:
        InvalidPolicyError: not ``*``, ``/pkg.Service/*`` or ``/pkg.Service/Method``.
    """
    if not isinstance(text, str):
        raise InvalidPolicyError(f"method {show(text)} must be a string")
    if text == "*":
        return ("any", "")
    parts = text.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2] or "*" in parts[1]:
        raise InvalidPolicyError(f"method {text!r}: write '/package.Service/Method', '/package.Service/*' or '*'")
    if parts[2] == "*":
        return ("prefix", f"/{parts[1]}/")
    if "*" in parts[2]:
        raise InvalidPolicyError(f"method {text!r}: '*' must stand for the whole method name")
    return ("exact", text)


def string_matches(kind: str, value: str, candidate: str) -> bool:
    """Match ``candidate`` by kind: "any", "present" (non-empty, gRPC authz's ``*``), "exact", "prefix", "suffix"."""
    if kind == "any":
        return True
    if kind == "present":
        return candidate != ""
    if kind == "exact":
        return candidate == value
    if kind == "prefix":
        return candidate.startswith(value)
    return candidate.endswith(value)
