"""A cache bounded by entries and bytes, for the per-call path.

Reads are one dict lookup (atomic under the GIL, no lock): ``get`` is the dict's own method, with
no Python frame around it. When a write would pass either bound, the cache starts over (the dict
is emptied), its ``generation`` moves on and, if it held
entries, its ``on_clear`` callback runs, so whatever is derived from its entries (the decision
memo) can tell that they are gone and drop its own. Starting over, rather than evicting one
entry, keeps writes O(1) and lock-free; the callers' keys are verified certificates and known
method names, so a full cache is rare in practice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_generations = itertools.count(1)


class BoundedCache(Generic[K, V]):
    """``get``/``put`` with at most ``max_entries`` entries and about ``max_bytes`` bytes."""

    __slots__ = ("_bytes", "_entries", "generation", "get", "max_bytes", "max_entries", "on_clear")

    def __init__(self, *, max_entries: int, max_bytes: int, on_clear: Callable[[], None] | None = None) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a cache needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: dict[K, V] = {}
        #: The value filed under a key, or None. The dict's own ``get``: the per-call paths
        #: read caches in a server's call, where each Python frame costs microseconds.
        self.get: Callable[[K], V | None] = self._entries.get
        self._bytes = 0
        self.generation = next(_generations)
        #: Called after a start-over that dropped entries: what was derived from them must go.
        self.on_clear = on_clear

    def put(self, key: K, value: V, size: int) -> None:
        """Store ``value``; ``size`` is the caller's estimate of what the entry holds, in bytes."""
        if len(self._entries) >= self.max_entries or self._bytes + size > self.max_bytes:
            self.clear()
        self._entries[key] = value
        self._bytes += size

    def clear(self) -> None:
        dropped = bool(self._entries)
        self._entries.clear()  # in place: ``get`` is this dict's
        self._bytes = 0
        self.generation = next(_generations)
        if dropped and self.on_clear is not None:  # nothing can be derived from an empty cache
            self.on_clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes
