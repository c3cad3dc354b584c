"""Selectors of registration entries: what a local process must match for a node agent to give
it an entry's SVID. Parsed strictly, once, by the CA (when an entry is created) and by the
agent (when it matches a process), so both read the same text the same way.

The Unix workload attestor's selectors, ``unix:<kind>:<value>``:

* ``unix:uid:N``, ``unix:gid:N``: the process's user or group ID, a decimal number without
  leading zeros, below 4294967295 (``(uid_t) -1`` means "no ID").
* ``unix:user:NAME``, ``unix:group:NAME``: the name of that user or group, a POSIX portable
  name (letters, digits, ``.``, ``_``, ``-``; not starting with ``-``; at most 32 characters).
* ``unix:path:/abs/path``: the process's executable, an absolute, normalised path (no ``.``,
  ``..`` or empty segment, no trailing slash) without control characters, at most 4096 bytes.
* ``unix:sha256:HEX``: the SHA-256 of that executable, 64 lowercase hex digits.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from meshid.errors import InvalidRequestError

__all__ = ["KINDS", "MAX_SELECTORS", "Selector", "parse_selectors"]

#: The selector kinds meshid knows, in the order messages list them.
KINDS = ("unix:uid", "unix:gid", "unix:user", "unix:group", "unix:path", "unix:sha256")
#: The most selectors one entry may have.
MAX_SELECTORS = 32
MAX_ID = 2**32 - 2
MAX_NAME = 32
MAX_PATH_BYTES = 4096
_NUMBER = re.compile(r"0|[1-9][0-9]{0,9}")
_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 100 else text[:100] + "...")


@dataclass(frozen=True, slots=True)
class Selector:
    """One selector, e.g. ``Selector("unix:uid", "1001")``; build it with :meth:`parse`."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``unix:<kind>:<value>``.

        Raises:
            InvalidRequestError: not a str, an unknown kind, or a value that kind does not allow.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"selector: must be a str, not {type(text).__name__}")
        for kind in KINDS:
            if text.startswith(kind + ":"):
                value = text[len(kind) + 1 :]  # a path may hold ':' itself
                _check(kind, value, text)
                return cls(kind, value)
        raise InvalidRequestError(
            f"selector {_shown(text)}: unknown kind; use one of {', '.join(k + ':...' for k in KINDS)}"
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def _check(kind: str, value: str, text: str) -> None:
    if kind in ("unix:uid", "unix:gid"):
        if not _NUMBER.fullmatch(value) or int(value) > MAX_ID:
            raise InvalidRequestError(
                f"selector {_shown(text)}: {kind.removeprefix('unix:')} must be a decimal number from 0 to {MAX_ID}"
                " without leading zeros"
            )
    elif kind in ("unix:user", "unix:group"):
        if not _NAME.fullmatch(value) or len(value) > MAX_NAME:
            raise InvalidRequestError(
                f"selector {_shown(text)}: a {kind.removeprefix('unix:')} name is 1 to {MAX_NAME} letters, digits,"
                " '.', '_' or '-', not starting with '-'"
            )
    elif kind == "unix:path":
        if _CONTROL.search(value):
            raise InvalidRequestError(f"selector {_shown(text)}: a path cannot hold NUL or control characters")
        if not value.startswith("/") or value.startswith("//"):
            raise InvalidRequestError(f"selector {_shown(text)}: the path must be absolute (one leading '/')")
        if posixpath.normpath(value) != value:
            raise InvalidRequestError(
                f"selector {_shown(text)}: the path must be normalised ({posixpath.normpath(value)!r}):"
                " no '.', '..' or empty segment, no trailing '/'"
            )
        if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise InvalidRequestError(f"selector {_shown(text)}: the path is longer than {MAX_PATH_BYTES} bytes")
    elif not _SHA256.fullmatch(value):  # unix:sha256
        raise InvalidRequestError(f"selector {_shown(text)}: sha256 must be 64 lowercase hex digits")


def parse_selectors(texts: Iterable[str]) -> tuple[Selector, ...]:
    """Parse an entry's selectors: each strictly, at most :data:`MAX_SELECTORS`, duplicates dropped.

    Raises:
        InvalidRequestError: a selector is malformed, or there are too many.
    """
    if isinstance(texts, str):
        raise InvalidRequestError("selectors: a list of selectors, not one string")
    parsed = []
    for count, text in enumerate(texts, start=1):
        if count > MAX_SELECTORS:
            raise InvalidRequestError(f"selectors: at most {MAX_SELECTORS} per entry")
        parsed.append(Selector.parse(text))
    return tuple(dict.fromkeys(parsed))
