"""What one SQL database does its own way (:class:`Dialect`), and the transaction the store's
statements run in (:class:`Transaction`): the seam between :class:`~meshid.ca.store.sql.SqlStore`,
written once, and the SQLite and PostgreSQL dialects.

The store writes its statements with ``?`` placeholders; a :class:`Transaction` renders them in
the driver's style.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from meshid.ca.store import migrations

__all__ = ["Connection", "Cursor", "Dialect", "Transaction", "insert_statement"]

_T = TypeVar("_T")


class Cursor(Protocol):
    """What a statement returns: a DB-API cursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """Where a dialect runs one transaction's statements, in the driver's placeholder style."""

    def execute(self, query: str, params: Sequence[Any], /) -> Cursor: ...

    def executemany(self, query: str, params: Iterable[Sequence[Any]], /) -> object: ...


class Transaction:
    """One transaction's statements as the store writes them, with ``?`` placeholders."""

    __slots__ = ("_conn", "_placeholder")

    def __init__(self, conn: Connection, placeholder: str) -> None:
        self._conn = conn
        self._placeholder = placeholder

    def execute(self, query: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(self._render(query), params)

    def executemany(self, query: str, params: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(self._render(query), params)

    def _render(self, query: str) -> str:
        return query if self._placeholder == "?" else query.replace("?", self._placeholder)


class Dialect(Protocol):
    """What one SQL database does its own way; the store asks nothing else of it."""

    #: How messages name the store (``CA store <name>: ...``): a file's path, a DSN without its password.
    name: str
    #: The column types of the schema (:func:`meshid.ca.store.migrations.statements`).
    schema: migrations.Dialect
    #: The driver's placeholder, which replaces each ``?`` of the store's statements.
    placeholder: str
    #: Ends a SELECT of a row this transaction will then write, so that a concurrent transaction
    #: waits for this one to end (`` FOR UPDATE``); empty where a writing transaction already
    #: holds the whole database's write lock.
    for_update: str
    #: Ends a SELECT of a row that must not be deleted before this transaction ends (`` FOR SHARE``).
    for_share: str
    #: What a message says to do when a row that is always there is missing.
    restore_hint: str

    def run(self, work: Callable[[Connection], _T], *, write: bool) -> _T:
        """``work`` in one transaction: committed if it returns, rolled back if it raises.

        Raises:
            StoreError: the database failed (the driver's error is its cause), or the store is closed.
        """
        ...

    def insert_if_absent(self, tx: Transaction, table: str, key: str, row: Mapping[str, object]) -> bool:
        """Insert ``row`` (column: value) unless ``table`` has a row with its ``key``; whether it did.

        A failed INSERT is never the way: on some databases it aborts the whole transaction.
        """
        ...

    def prepare_migrations(self, tx: Transaction) -> None:
        """Make stores opening at once migrate one after the other, and create ``schema_version``."""
        ...

    def close(self) -> None:
        """Release the database. Safe to call twice; ``run`` then raises StoreError."""
        ...


def insert_statement(table: str, row: Mapping[str, object]) -> str:
    """``INSERT INTO table (columns) VALUES (?, ...)`` for ``row``'s columns, in order."""
    return f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
