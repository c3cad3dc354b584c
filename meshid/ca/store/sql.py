"""The CA's store written once (:class:`SqlStore`), on any SQL database a :class:`Dialect` describes.

Every method is one transaction the dialect runs. What differs between databases is the
dialect's alone: how a transaction is run and its failures named, the placeholder style, the
row locks a read takes for the write that follows, and how a row is inserted only if its key is
absent. What does not differ is here, once: the checks on a token, the serial checks and the
re-signing when a serial is taken, the error messages, the migrations' bookkeeping.

The statements are written with ``?`` placeholders and rendered in the dialect's style. They
rely on READ COMMITTED or stricter: a statement that waited for a row lock reads the row as
the other transaction left it.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from meshid.ca.store import migrations
from meshid.ca.store.records import Entry, IssuedRecord, Signer
from meshid.ca.store.rows import RowCodec, hex_serial, to_unix
from meshid.errors import AlreadyExistsError, NotFoundError, StoreError
from meshid.spiffeid import SpiffeId

__all__ = ["Connection", "Cursor", "Dialect", "SqlStore", "Transaction", "insert_statement"]

_T = TypeVar("_T")

#: How many times ``sign`` is called in all when its serial is already taken.
SIGN_ATTEMPTS = 3
MAX_SERIAL_BITS = 160

_SELECT_ENTRY = "SELECT spiffe_id, dns_names, ttl_seconds, created_at FROM entries"
_SELECT_ISSUED = "SELECT serial, spiffe_id, not_after, issued_at, revoked_at FROM certificates"


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


class SqlStore:
    """The CA's :class:`~meshid.ca.store.Store` on the database ``dialect`` has opened.

    Opening applies pending migrations. Use it as a context manager, or call :meth:`close`.
    Threads may call any method at once. Times are kept to the whole second (rounded down);
    datetimes passed in must be timezone-aware and are returned in UTC.

    Raises:
        StoreError: the database was migrated by a newer meshid, or failed. Every method raises
            it for any database failure; the message starts ``CA store <name>:``.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._name = dialect.name
        self._rows = RowCodec(dialect.name)
        try:
            self._run(self._migrate, write=True)
        except BaseException:
            dialect.close()
            raise

    # -- entries -------------------------------------------------------------------------------

    def create_entry(self, entry: Entry) -> None:
        """Add an entry. Raises AlreadyExistsError if the SPIFFE ID has one."""
        row = {
            "spiffe_id": str(entry.spiffe_id),
            "dns_names": json.dumps(list(entry.dns_names)),
            "ttl_seconds": math.floor(entry.ttl.total_seconds()),
            "created_at": to_unix(entry.created_at, "created_at"),
        }

        def work(tx: Transaction) -> None:
            if not self._dialect.insert_if_absent(tx, "entries", "spiffe_id", row):
                raise AlreadyExistsError(f"registration entry: {entry.spiffe_id} already exists")

        self._run(work, write=True)

    def get_entry(self, spiffe_id: SpiffeId) -> Entry | None:
        """The entry for ``spiffe_id``, or None."""
        return self._run(lambda tx: self._fetch_entry(tx, spiffe_id), write=False)

    def list_entries(self) -> list[Entry]:
        """Every entry, ordered by SPIFFE ID (byte order, whatever the server's locale)."""
        rows = self._run(lambda tx: tx.execute(_SELECT_ENTRY + " ORDER BY spiffe_id").fetchall(), write=False)
        return [self._rows.entry(row) for row in rows]

    def delete_entry(self, spiffe_id: SpiffeId) -> bool:
        """Remove an entry and its unused tokens. Returns False if there was none.

        Its certificates stay (they can still be revoked), and so do its used tokens.
        """

        def work(tx: Transaction) -> bool:
            # The entry first: a concurrent add_token holds it FOR SHARE, so this waits for that
            # token to commit, and the next statement (a new snapshot) deletes it too.
            deleted = tx.execute("DELETE FROM entries WHERE spiffe_id = ?", (str(spiffe_id),)).rowcount > 0
            tx.execute("DELETE FROM tokens WHERE spiffe_id = ? AND used_at IS NULL", (str(spiffe_id),))
            return deleted

        return self._run(work, write=True)

    def count_entries(self) -> int:
        """How many entries there are."""
        return self._run(lambda tx: int(tx.execute("SELECT COUNT(*) FROM entries").fetchone()[0]), write=False)

    # -- tokens and issuance -------------------------------------------------------------------

    def add_token(self, token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store a join token's hash, bound to an existing entry.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            AlreadyExistsError: a token with this hash is already stored.
        """
        row = {
            "hash": bytes(token_hash),
            "spiffe_id": str(spiffe_id),
            "expires_at": to_unix(expires_at, "expires_at"),
            "used_at": None,
        }

        def work(tx: Transaction) -> None:
            # Shared lock: a concurrent delete_entry waits for this token, then deletes it too.
            entry = tx.execute("SELECT 1 FROM entries WHERE spiffe_id = ?" + self._dialect.for_share, (str(spiffe_id),))
            if entry.fetchone() is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found; create it before its join token")
            if not self._dialect.insert_if_absent(tx, "tokens", "hash", row):
                raise AlreadyExistsError("join token: a token with this hash already exists; generate a new token")

        self._run(work, write=True)

    def issue_with_token(self, token_hash: bytes, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: check the token (known, unused, unexpired), call ``sign(entry)``,
        record the certificate, mark the token used. Returns the entry and ``sign``'s result.

        The token's row stays locked until the transaction ends, so of several callers (threads,
        replicas) racing on one token exactly one issues; the others then find it used. If
        ``sign`` raises, nothing is written (the token stays usable) and its error propagates.
        If the serial it returns is already recorded, it is called again, at most 3 times in all.

        Raises:
            TokenError: unknown, already used, or expired (nothing is written).
            NotFoundError: the token's entry was deleted.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        token = bytes(token_hash)

        def work(tx: Transaction) -> tuple[Entry, object]:
            row = tx.execute(
                "SELECT spiffe_id, expires_at, used_at FROM tokens WHERE hash = ?" + self._dialect.for_update, (token,)
            ).fetchone()
            spiffe_id = self._rows.usable_token(row, now_s)
            entry = self._fetch_entry(tx, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} was deleted; its join token cannot be used")
            result = self._sign_and_record(tx, entry, now_s, sign)
            tx.execute("UPDATE tokens SET used_at = ? WHERE hash = ?", (now_s, token))
            return entry, result

        return self._run(work, write=True)

    def record_issuance(self, spiffe_id: SpiffeId, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: look up the entry, call ``sign(entry)``, record the certificate.

        ``sign`` is treated as in :meth:`issue_with_token`.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> tuple[Entry, object]:
            entry = self._fetch_entry(tx, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found")
            return entry, self._sign_and_record(tx, entry, now_s, sign)

        return self._run(work, write=True)

    def _sign_and_record(self, tx: Transaction, entry: Entry, now_s: int, sign: Signer) -> object:
        for _ in range(SIGN_ATTEMPTS):
            serial, not_after, result = sign(entry)
            if isinstance(serial, bool) or not isinstance(serial, int):
                raise TypeError(f"CA store: the signer returned a serial of type {type(serial).__name__}, not int")
            if serial <= 0 or serial.bit_length() > MAX_SERIAL_BITS:
                raise ValueError(f"CA store: the signer returned serial {serial:x}, not a positive 160-bit number")
            row = {
                "serial": hex_serial(serial),
                "spiffe_id": str(entry.spiffe_id),
                "not_after": to_unix(not_after, "not_after"),
                "issued_at": now_s,
                "revoked_at": None,
            }
            # A serial another caller's uncommitted transaction holds makes this wait for it.
            if self._dialect.insert_if_absent(tx, "certificates", "serial", row):
                return result
        raise StoreError(
            f"CA store {self._name}: the signer returned an already recorded serial {SIGN_ATTEMPTS} times;"
            " its serials are not random"
        )

    # -- issued certificates -------------------------------------------------------------------

    def get_issued(self, serial: int) -> IssuedRecord | None:
        """The record of certificate ``serial``, or None."""
        row = self._run(
            lambda tx: tx.execute(_SELECT_ISSUED + " WHERE serial = ?", (hex_serial(serial),)).fetchone(), write=False
        )
        return None if row is None else self._rows.issued(row)

    def list_issued(self) -> list[IssuedRecord]:
        """Every issued certificate, oldest first."""
        rows = self._run(lambda tx: tx.execute(_SELECT_ISSUED + " ORDER BY issued_at, serial").fetchall(), write=False)
        return [self._rows.issued(row) for row in rows]

    def revoke_serial(self, serial: int, now: datetime.datetime) -> bool:
        """Mark one certificate revoked. False if unknown; revoking twice keeps the first time."""
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> bool:
            revoked = tx.execute(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now_s, hex_serial(serial)),
            )
            if revoked.rowcount > 0:
                return True
            known = tx.execute("SELECT 1 FROM certificates WHERE serial = ?", (hex_serial(serial),))
            return known.fetchone() is not None

        return self._run(work, write=True)

    def revoke_spiffe_id(self, spiffe_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """Revoke every unexpired, unrevoked certificate of ``spiffe_id``; returns their serials, sorted.

        A certificate is unexpired while ``now`` is at or before its not_after.
        """
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> list[str]:
            # Locked, then revoked by serial: exactly the certificates returned are revoked, even
            # if another replica issues one for ``spiffe_id`` in between.
            rows = tx.execute(
                "SELECT serial FROM certificates WHERE spiffe_id = ? AND revoked_at IS NULL AND not_after >= ?"
                + self._dialect.for_update,
                (str(spiffe_id), now_s),
            ).fetchall()
            serials = [str(row[0]) for row in rows]
            tx.executemany("UPDATE certificates SET revoked_at = ? WHERE serial = ?", [(now_s, s) for s in serials])
            return serials

        return sorted(int(serial, 16) for serial in self._run(work, write=True))

    def revoked_unexpired(self, now: datetime.datetime) -> list[IssuedRecord]:
        """What the next CRL must list: revoked certificates whose not_after is not before ``now``."""
        now_s = to_unix(now, "now")
        rows = self._run(
            lambda tx: tx.execute(
                _SELECT_ISSUED + " WHERE revoked_at IS NOT NULL AND not_after >= ? ORDER BY issued_at, serial", (now_s,)
            ).fetchall(),
            write=False,
        )
        return [self._rows.issued(row) for row in rows]

    # -- counters ------------------------------------------------------------------------------

    def next_crl_number(self) -> int:
        """Increment and return the CRL number (monotonic across replicas, durable); the first is 1."""
        return self._bump("crl_number")

    def bundle_sequence(self) -> int:
        """The current bundle sequence number; 0 until the first bump."""
        return self._run(lambda tx: self._counter(tx, "bundle_sequence"), write=False)

    def bump_bundle_sequence(self) -> int:
        """Increment and return the bundle sequence number (monotonic across replicas, durable)."""
        return self._bump("bundle_sequence")

    def _bump(self, name: str) -> int:
        def work(tx: Transaction) -> int:
            # The UPDATE locks the row until the transaction ends: the SELECT reads this increment.
            tx.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (name,))
            return self._counter(tx, name)

        return self._run(work, write=True)

    def _counter(self, tx: Transaction, name: str) -> int:
        row = tx.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"CA store {self._name}: counter {name!r} is missing; {self._dialect.restore_hint}")
        return int(row[0])

    # -- lifecycle -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StoreError if the store cannot be used (for health checks)."""
        self._run(lambda tx: tx.execute("SELECT 1 FROM counters LIMIT 1").fetchall(), write=False)

    def close(self) -> None:
        """Close the database. Safe to call twice; every other method then raises StoreError."""
        self._dialect.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _run(self, work: Callable[[Transaction], _T], *, write: bool) -> _T:
        placeholder = self._dialect.placeholder
        return self._dialect.run(lambda conn: work(Transaction(conn, placeholder)), write=write)

    def _migrate(self, tx: Transaction) -> None:
        self._dialect.prepare_migrations(tx)
        current = int(tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        if current > migrations.latest_version():
            raise StoreError(f"CA store {self._name}: {migrations.newer_schema_message(current)}")
        now_s = math.floor(datetime.datetime.now(datetime.UTC).timestamp())
        pending = migrations.statements(self._dialect.schema)[current:]
        for version, statements in enumerate(pending, start=current + 1):
            for statement in statements:
                tx.execute(statement)
            tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now_s))

    def _fetch_entry(self, tx: Transaction, spiffe_id: SpiffeId) -> Entry | None:
        row = tx.execute(_SELECT_ENTRY + " WHERE spiffe_id = ?", (str(spiffe_id),)).fetchone()
        return None if row is None else self._rows.entry(row)
