"""Compatibility name: the SQLite store is ``meshid.ca.store.SqliteStore`` now (import it from there)."""

from __future__ import annotations

from meshid.ca.store.sqlite import SqliteStore

__all__ = ["SqliteStore"]
