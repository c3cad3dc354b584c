"""The CA's store on one SQLite file (:class:`SqliteStore`), the stdlib ``sqlite3`` only: the
SQLite dialect of :mod:`meshid.ca.store.sql`.

Durability: WAL journal with ``synchronous=FULL``, so a transaction that has committed survives
``kill -9`` and power loss. Every transaction (``BEGIN IMMEDIATE`` when it writes) runs on one
connection guarded by a lock, so grpc may call the store from any thread. A writing
transaction holds the database's write lock from its first statement: no other connection, in
this process or another, writes meanwhile, so reads need no row lock and a key checked absent
stays absent until the insert.

Times are integer Unix seconds (UTC); serials are lowercase hex.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from meshid.ca.store import migrations
from meshid.ca.store.sql import Connection, SqlStore, Transaction, insert_statement
from meshid.errors import StoreError

__all__ = ["SqliteDialect", "SqliteStore"]

_T = TypeVar("_T")

_HINTS = {
    sqlite3.SQLITE_BUSY: "another process holds the write lock; retry, or stop the other writer",
    sqlite3.SQLITE_LOCKED: "another process holds the write lock; retry, or stop the other writer",
    sqlite3.SQLITE_FULL: "free some disk space",
    sqlite3.SQLITE_READONLY: "check the permissions of the file and of its directory",
    sqlite3.SQLITE_CANTOPEN: "check that the directory exists and is writable",
    sqlite3.SQLITE_NOTADB: "restore the CA store from a backup, or point meshid at the right file",
    sqlite3.SQLITE_CORRUPT: "the file is corrupt; restore the CA store from a backup",
    sqlite3.SQLITE_IOERR: "check the disk and the filesystem",
}


class SqliteStore(SqlStore):
    """The CA's :class:`~meshid.ca.store.Store` on one SQLite file.

    Opening creates the file (mode 0600) and the schema if missing, and applies pending
    migrations. Use it as a context manager, or call :meth:`close`.

    Times are kept to the whole second (rounded down); datetimes passed in must be
    timezone-aware and are returned in UTC.

    Raises:
        ValueError: ``path`` names an in-memory database.
        StoreError: the file cannot be created or opened, is not a database, is locked beyond
            ``busy_timeout`` seconds, or was written by a newer meshid. Every method raises it
            for any database failure; the message starts ``CA store <path>:``.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self._path = os.fspath(path)
        super().__init__(SqliteDialect(self._path, busy_timeout=busy_timeout))

    @property
    def path(self) -> str:
        """The database file."""
        return self._path


class SqliteDialect:
    """One SQLite file, opened (and created, mode 0600) at once. See the module's docstring."""

    schema: migrations.Dialect = "sqlite"
    placeholder = "?"
    # BEGIN IMMEDIATE already holds the write lock of the whole file.
    for_update = ""
    for_share = ""
    restore_hint = "restore the file from a backup"

    def __init__(self, path: str, *, busy_timeout: float) -> None:
        if path in ("", ":memory:"):
            raise ValueError("CA store: needs a file; an in-memory database would lose every record on exit")
        self.name = path
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._create_file()
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise self._error(err) from err
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def run(self, work: Callable[[Connection], _T], *, write: bool) -> _T:
        """``work`` in one transaction under the lock: committed if it returns, rolled back otherwise."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"CA store {self.name}: closed")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                result = work(conn)
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                # Some failures (disk full, I/O errors) have already rolled back; others have not.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc) from exc
                raise

    def insert_if_absent(self, tx: Transaction, table: str, key: str, row: Mapping[str, object]) -> bool:
        # Checked, then inserted: under the write lock nobody can insert the key in between.
        if tx.execute(f"SELECT 1 FROM {table} WHERE {key} = ?", (row[key],)).fetchone():
            return False
        tx.execute(insert_statement(table, row), tuple(row.values()))
        return True

    def prepare_migrations(self, tx: Transaction) -> None:
        # The write lock of the transaction makes stores opening at once migrate in turn.
        tx.execute(migrations.schema_version_table("sqlite"))

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _create_file(self) -> None:
        # Created here, not by sqlite, so that it is never readable by others; sqlite gives the
        # -wal and -shm files the same mode.
        try:
            fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as err:
            raise StoreError(f"CA store {self.name}: cannot create the file: {err.strerror}") from err
        os.close(fd)

    def _configure(self, conn: sqlite3.Connection) -> None:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as err:
            raise self._error(err) from err
        if str(mode).lower() != "wal":
            raise StoreError(
                f"CA store {self.name}: cannot use the WAL journal (got {mode!r}); put the file on a local filesystem"
            )

    def _error(self, err: sqlite3.Error) -> StoreError:
        message = f"CA store {self.name}: {err}"
        code = getattr(err, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None  # extended codes carry it in the low byte
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            message += f" (waited {self._busy_timeout:g}s)"
        hint = _HINTS.get(primary) if primary is not None else None
        return StoreError(f"{message}; {hint}" if hint else message)
