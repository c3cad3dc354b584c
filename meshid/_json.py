"""JSON read strictly: a key given twice in one object is an error, not the last one kept."""

from __future__ import annotations

from typing import Any

__all__ = ["DuplicateKeyError", "unique_keys"]


class DuplicateKeyError(ValueError):
    """A JSON object gives one key twice (``json`` would keep the last without a word)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` that refuses a key given twice in one object: a
    second ``deny_rules`` or ``dns_suffixes`` would otherwise silently replace the first."""
    made: dict[str, Any] = {}
    for key, value in pairs:
        if key in made:
            raise DuplicateKeyError(
                f"the key {key[:40]!r} is given twice in one object (the second would replace the first)"
            )
        made[key] = value
    return made
