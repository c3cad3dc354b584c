"""Selectors of registration entries, as the CA takes them: what a local process must match for
a node agent to give it an entry's SVID.

The grammar has one home, :class:`meshid.workloadapi.attestation.Selector` (the Unix workload
attestor: ``unix:uid``, ``unix:gid``, ``unix:user``, ``unix:group``, ``unix:supplementary_gid``,
``unix:supplementary_group``, ``unix:path``, ``unix:sha256``), so the CA that accepts an entry
and the agent that matches a process read the same text the same way. Here: an entry's list,
at most :data:`MAX_SELECTORS`, duplicates dropped, a bad one refused as a bad request.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshid.errors import InvalidRequestError
from meshid.workloadapi.attestation import KINDS, Selector

__all__ = ["KINDS", "MAX_SELECTORS", "Selector", "parse_selectors"]

#: The most selectors one entry may have.
MAX_SELECTORS = 32


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
        try:
            parsed.append(Selector.parse(text))
        except (ValueError, TypeError) as err:
            raise InvalidRequestError(str(err)) from err
    return tuple(dict.fromkeys(parsed))
