"""The CA's store on one SQLite file (:class:`SqliteStore`), the stdlib ``sqlite3`` only.

Durability: WAL journal with ``synchronous=FULL``, so a transaction that has committed survives
``kill -9`` and power loss. Every public method is one transaction (``BEGIN IMMEDIATE`` when it
writes) on one connection guarded by a lock, so grpc may call it from any thread.

The schema is versioned: ``schema_version`` holds one row per applied migration, and
:mod:`meshid.ca.migrations` (shared with the PostgreSQL store) lists them in order; opening a file
applies the missing ones in one transaction. Times are integer Unix seconds (UTC); serials are
lowercase hex.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from types import TracebackType

from meshid.ca import migrations
from meshid.ca.rows import RowCodec, hex_serial, to_unix
from meshid.ca.store import Entry, IssuedRecord, Signer
from meshid.errors import AlreadyExistsError, NotFoundError, StoreError
from meshid.spiffeid import SpiffeId

__all__ = ["SqliteStore"]

#: How many times ``sign`` is called in all when its serial is already taken.
_SIGN_ATTEMPTS = 3
_MAX_SERIAL_BITS = 160

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


class SqliteStore:
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
        self._rows = RowCodec(self._path)
        if self._path in ("", ":memory:"):
            raise ValueError("CA store: needs a file; an in-memory database would lose every record on exit")
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._create_file()
        try:
            conn = sqlite3.connect(self._path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise self._error(err) from err
        try:
            self._configure(conn)
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    # -- entries -------------------------------------------------------------------------------

    def create_entry(self, entry: Entry) -> None:
        """Add an entry. Raises AlreadyExistsError if the SPIFFE ID has one."""
        created_at = to_unix(entry.created_at, "created_at")
        with self._transaction(write=True) as conn:
            if self._fetch_entry(conn, entry.spiffe_id) is not None:
                raise AlreadyExistsError(f"registration entry: {entry.spiffe_id} already exists")
            conn.execute(
                "INSERT INTO entries (spiffe_id, dns_names, ttl_seconds, created_at) VALUES (?, ?, ?, ?)",
                (
                    str(entry.spiffe_id),
                    json.dumps(list(entry.dns_names)),
                    math.floor(entry.ttl.total_seconds()),
                    created_at,
                ),
            )

    def get_entry(self, spiffe_id: SpiffeId) -> Entry | None:
        """The entry for ``spiffe_id``, or None."""
        with self._transaction(write=False) as conn:
            return self._fetch_entry(conn, spiffe_id)

    def list_entries(self) -> list[Entry]:
        """Every entry, ordered by SPIFFE ID."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT spiffe_id, dns_names, ttl_seconds, created_at FROM entries ORDER BY spiffe_id"
            ).fetchall()
        return [self._rows.entry(row) for row in rows]

    def delete_entry(self, spiffe_id: SpiffeId) -> bool:
        """Remove an entry and its unused tokens. Returns False if there was none.

        Its certificates stay (they can still be revoked), and so do its used tokens.
        """
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM tokens WHERE spiffe_id = ? AND used_at IS NULL", (str(spiffe_id),))
            return conn.execute("DELETE FROM entries WHERE spiffe_id = ?", (str(spiffe_id),)).rowcount > 0

    def count_entries(self) -> int:
        """How many entries there are."""
        with self._transaction(write=False) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    # -- tokens and issuance -------------------------------------------------------------------

    def add_token(self, token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store a join token's hash, bound to an existing entry.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            AlreadyExistsError: a token with this hash is already stored.
        """
        expires = to_unix(expires_at, "expires_at")
        with self._transaction(write=True) as conn:
            if self._fetch_entry(conn, spiffe_id) is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found; create it before its join token")
            if conn.execute("SELECT 1 FROM tokens WHERE hash = ?", (bytes(token_hash),)).fetchone():
                raise AlreadyExistsError("join token: a token with this hash already exists; generate a new token")
            conn.execute(
                "INSERT INTO tokens (hash, spiffe_id, expires_at, used_at) VALUES (?, ?, ?, NULL)",
                (bytes(token_hash), str(spiffe_id), expires),
            )

    def issue_with_token(self, token_hash: bytes, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: check the token (known, unused, unexpired), call ``sign(entry)``,
        record the certificate, mark the token used. Returns the entry and ``sign``'s result.

        If ``sign`` raises, nothing is written (the token stays usable) and its error propagates.
        If the serial it returns is already recorded, it is called again, at most 3 times in all.

        Raises:
            TokenError: unknown, already used, or expired (nothing is written).
            NotFoundError: the token's entry was deleted.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "SELECT spiffe_id, expires_at, used_at FROM tokens WHERE hash = ?", (bytes(token_hash),)
            ).fetchone()
            spiffe_id = self._rows.usable_token(row, now_s)
            entry = self._fetch_entry(conn, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} was deleted; its join token cannot be used")
            result = self._sign_and_record(conn, entry, now_s, sign)
            conn.execute("UPDATE tokens SET used_at = ? WHERE hash = ?", (now_s, bytes(token_hash)))
        return entry, result

    def record_issuance(self, spiffe_id: SpiffeId, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: look up the entry, call ``sign(entry)``, record the certificate.

        ``sign`` is treated as in :meth:`issue_with_token`.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        with self._transaction(write=True) as conn:
            entry = self._fetch_entry(conn, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found")
            result = self._sign_and_record(conn, entry, now_s, sign)
        return entry, result

    def _sign_and_record(self, conn: sqlite3.Connection, entry: Entry, now_s: int, sign: Signer) -> object:
        for _ in range(_SIGN_ATTEMPTS):
            serial, not_after, result = sign(entry)
            if isinstance(serial, bool) or not isinstance(serial, int):
                raise TypeError(f"CA store: the signer returned a serial of type {type(serial).__name__}, not int")
            if serial <= 0 or serial.bit_length() > _MAX_SERIAL_BITS:
                raise ValueError(f"CA store: the signer returned serial {serial:x}, not a positive 160-bit number")
            # Checked before inserting, not by catching the constraint error, because a failed
            # statement aborts the whole transaction on other databases.
            if conn.execute("SELECT 1 FROM certificates WHERE serial = ?", (hex_serial(serial),)).fetchone():
                continue
            conn.execute(
                "INSERT INTO certificates (serial, spiffe_id, not_after, issued_at, revoked_at)"
                " VALUES (?, ?, ?, ?, NULL)",
                (hex_serial(serial), str(entry.spiffe_id), to_unix(not_after, "not_after"), now_s),
            )
            return result
        raise StoreError(
            f"CA store {self._path}: the signer returned an already recorded serial {_SIGN_ATTEMPTS} times;"
            " its serials are not random"
        )

    # -- issued certificates -------------------------------------------------------------------

    def get_issued(self, serial: int) -> IssuedRecord | None:
        """The record of certificate ``serial``, or None."""
        with self._transaction(write=False) as conn:
            row = conn.execute(_SELECT_ISSUED + " WHERE serial = ?", (hex_serial(serial),)).fetchone()
        return None if row is None else self._rows.issued(row)

    def list_issued(self) -> list[IssuedRecord]:
        """Every issued certificate, oldest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(_SELECT_ISSUED + " ORDER BY issued_at, serial").fetchall()
        return [self._rows.issued(row) for row in rows]

    def revoke_serial(self, serial: int, now: datetime.datetime) -> bool:
        """Mark one certificate revoked. False if unknown; revoking twice keeps the first time."""
        now_s = to_unix(now, "now")
        with self._transaction(write=True) as conn:
            conn.execute(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now_s, hex_serial(serial)),
            )
            return (
                conn.execute("SELECT 1 FROM certificates WHERE serial = ?", (hex_serial(serial),)).fetchone()
                is not None
            )

    def revoke_spiffe_id(self, spiffe_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """Revoke every unexpired, unrevoked certificate of ``spiffe_id``; returns their serials, sorted.

        A certificate is unexpired while ``now`` is at or before its not_after.
        """
        now_s = to_unix(now, "now")
        where = " WHERE spiffe_id = ? AND revoked_at IS NULL AND not_after >= ?"
        with self._transaction(write=True) as conn:
            rows = conn.execute("SELECT serial FROM certificates" + where, (str(spiffe_id), now_s)).fetchall()
            conn.execute("UPDATE certificates SET revoked_at = ?" + where, (now_s, str(spiffe_id), now_s))
        return sorted(int(row[0], 16) for row in rows)

    def revoked_unexpired(self, now: datetime.datetime) -> list[IssuedRecord]:
        """What the next CRL must list: revoked certificates whose not_after is not before ``now``."""
        now_s = to_unix(now, "now")
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                _SELECT_ISSUED + " WHERE revoked_at IS NOT NULL AND not_after >= ? ORDER BY issued_at, serial",
                (now_s,),
            ).fetchall()
        return [self._rows.issued(row) for row in rows]

    # -- counters ------------------------------------------------------------------------------

    def next_crl_number(self) -> int:
        """Increment and return the CRL number (monotonic, durable); the first is 1."""
        return self._bump("crl_number")

    def bundle_sequence(self) -> int:
        """The current bundle sequence number; 0 until the first bump."""
        with self._transaction(write=False) as conn:
            return self._counter(conn, "bundle_sequence")

    def bump_bundle_sequence(self) -> int:
        """Increment and return the bundle sequence number (monotonic, durable)."""
        return self._bump("bundle_sequence")

    def _bump(self, name: str) -> int:
        with self._transaction(write=True) as conn:
            conn.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (name,))
            return self._counter(conn, name)

    def _counter(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"CA store {self._path}: counter {name!r} is missing; restore the file from a backup")
        return int(row[0])

    # -- lifecycle -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StoreError if the store cannot be used (for health checks)."""
        with self._transaction(write=False) as conn:
            conn.execute("SELECT 1 FROM counters LIMIT 1").fetchall()

    def close(self) -> None:
        """Close the database. Safe to call twice; every other method then raises StoreError."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self._path!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _create_file(self) -> None:
        # Created here, not by sqlite, so that it is never readable by others; sqlite gives the
        # -wal and -shm files the same mode.
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as err:
            raise StoreError(f"CA store {self._path}: cannot create the file: {err.strerror}") from err
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
                f"CA store {self._path}: cannot use the WAL journal (got {mode!r}); put the file on a local filesystem"
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with self._transaction(write=True, conn=conn):
            conn.execute(migrations.schema_version_table("sqlite"))
            current = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
            if current > migrations.latest_version():
                raise StoreError(f"CA store {self._path}: {migrations.newer_schema_message(current)}")
            now_s = math.floor(datetime.datetime.now(datetime.UTC).timestamp())
            pending = migrations.statements("sqlite")[current:]
            for version, statements in enumerate(pending, start=current + 1):
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now_s))

    @contextlib.contextmanager
    def _transaction(self, *, write: bool, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: committed if the block returns, rolled back otherwise."""
        with self._lock:
            if conn is None:
                conn = self._conn
            if conn is None:
                raise StoreError(f"CA store {self._path}: closed")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                # Some failures (disk full, I/O errors) have already rolled back; others have not.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc) from exc
                raise

    def _error(self, err: sqlite3.Error) -> StoreError:
        message = f"CA store {self._path}: {err}"
        code = getattr(err, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None  # extended codes carry it in the low byte
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            message += f" (waited {self._busy_timeout:g}s)"
        hint = _HINTS.get(primary) if primary is not None else None
        return StoreError(f"{message}; {hint}" if hint else message)

    def _fetch_entry(self, conn: sqlite3.Connection, spiffe_id: SpiffeId) -> Entry | None:
        row = conn.execute(
            "SELECT spiffe_id, dns_names, ttl_seconds, created_at FROM entries WHERE spiffe_id = ?", (str(spiffe_id),)
        ).fetchone()
        return None if row is None else self._rows.entry(row)


_SELECT_ISSUED = "SELECT serial, spiffe_id, not_after, issued_at, revoked_at FROM certificates"
