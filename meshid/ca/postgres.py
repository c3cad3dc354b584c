"""The CA's store on PostgreSQL (:class:`PostgresStore`), so that several CA replicas act as one CA.

Every guarantee a replica relies on is the database's, not a lock in one process:

* a join token is consumed once: ``issue_with_token`` locks the token's row (``FOR UPDATE``)
  for the whole transaction, so a replica racing on the same token waits, then sees it used;
* serials are unique: the certificate's primary key, inserted with ``ON CONFLICT DO NOTHING``
  so that a taken serial makes the store sign again instead of aborting the transaction;
* the CRL number and bundle sequence are ``UPDATE ... RETURNING`` on one row;
* migrations (shared with SQLite, :mod:`meshid.ca.migrations`) run under a transaction-scoped
  advisory lock, so replicas starting together apply each one once.

Each public method is one READ COMMITTED transaction on a connection of a small thread-safe
pool. A transaction that fails before its COMMIT was sent (a deadlock, a serialization
failure, a pooled connection the server has since closed) is run again from the start, at most
3 times; ``sign`` may then be called again and its earlier result is discarded, exactly as when
its serial was taken. A failed COMMIT is never retried: its outcome is unknown.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TypeVar

import psycopg
from psycopg import conninfo, errors, pq
from psycopg.rows import TupleRow

from meshid.ca import migrations
from meshid.ca.rows import RowCodec, hex_serial, to_unix
from meshid.ca.store import Entry, IssuedRecord, Signer
from meshid.errors import AlreadyExistsError, NotFoundError, StoreError
from meshid.spiffeid import SpiffeId

__all__ = ["PostgresStore"]

_T = TypeVar("_T")
_Connection = psycopg.Connection[TupleRow]
_Cursor = psycopg.Cursor[TupleRow]

#: How many times ``sign`` is called in all when its serial is already taken.
_SIGN_ATTEMPTS = 3
_MAX_SERIAL_BITS = 160
#: How many times a transaction runs in all when it fails in a way that is safe to retry.
_TRANSACTION_ATTEMPTS = 3
#: The advisory lock migrations hold: "meshidCA" in ASCII, a constant every replica shares.
_MIGRATION_LOCK = 0x6D65736869644341
#: The server ends a session left inside a transaction this long (a replica cut off mid-issuance),
#: so that the token and serial rows it locked do not block the other replicas for hours.
_IDLE_IN_TRANSACTION_TIMEOUT = "60s"

_HINTS = {
    "53100": "free some disk space on the database server",
    "53200": "the database server is out of memory",
    "53300": "the database server has too many connections; lower pool_size or raise max_connections",
    "57P01": "the database server is shutting down; retry once it is back",
    "57P02": "the database server crashed; retry once it is back",
    "57P03": "the database server is starting or shutting down; retry",
    "3D000": "create the database, or fix its name in the DSN",
    "28P01": "check the user and the password",
    "28000": "check the user in the DSN and the server's pg_hba.conf",
    "42501": "grant the DSN's user the privileges on meshid's tables (and CREATE for migrations)",
    "25006": "the DSN points at a read-only standby; point it at the primary",
    "40001": "too many replicas wrote the same rows at once; retry",
    "40P01": "too many replicas wrote the same rows at once; retry",
    "42P01": "a table is missing; restore the database from a backup",
    "42703": "a column is missing; restore the database from a backup",
}
_CONNECTION_HINT = "check that the server is running and that the DSN's host, port and database are right"


class PostgresStore:
    """The CA's :class:`~meshid.ca.store.Store` on a PostgreSQL database several replicas share.

    Opening connects, creates the schema if missing and applies pending migrations. Use it as a
    context manager, or call :meth:`close`. Threads may call any method at once; at most
    ``pool_size`` of them use the database at a time, the others wait for a connection.

    Times are kept to the whole second (rounded down); datetimes passed in must be
    timezone-aware and are returned in UTC.

    Args:
        dsn: a libpq connection string, ``postgresql://user@host:port/dbname`` or ``key=value``.
            Its password is never shown: messages and ``repr`` name the DSN without it.
        connect_timeout: seconds to wait for a new connection (whole seconds, at least 1).
        pool_size: the most connections kept open.

    Raises:
        ValueError: ``dsn`` cannot be parsed, or a bad ``connect_timeout`` or ``pool_size``.
        StoreError: the database cannot be reached or used, or was migrated by a newer meshid.
            Every method raises it for any database failure; the message starts ``CA store <dsn>:``.
    """

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, pool_size: int = 4) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ValueError("CA store: needs a PostgreSQL DSN, e.g. postgresql://meshid@db.example:5432/meshid")
        if not connect_timeout > 0:
            raise ValueError(f"CA store: connect_timeout must be positive, not {connect_timeout!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"CA store: pool_size must be a positive int, not {pool_size!r}")
        self._dsn = dsn
        self._name, self._secrets = _redact(dsn)
        self._rows = RowCodec(self._name)
        self._connect_timeout = max(1, math.ceil(connect_timeout))
        self._pool = _Pool(self._connect, pool_size)
        try:
            self._run(self._migrate)
        except BaseException:
            self._pool.close()
            raise

    # -- entries -------------------------------------------------------------------------------

    def create_entry(self, entry: Entry) -> None:
        """Add an entry. Raises AlreadyExistsError if the SPIFFE ID has one."""
        created_at = to_unix(entry.created_at, "created_at")

        def work(cur: _Cursor) -> None:
            cur.execute(
                "INSERT INTO entries (spiffe_id, dns_names, ttl_seconds, created_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (spiffe_id) DO NOTHING",
                (
                    str(entry.spiffe_id),
                    json.dumps(list(entry.dns_names)),
                    math.floor(entry.ttl.total_seconds()),
                    created_at,
                ),
            )
            if cur.rowcount == 0:
                raise AlreadyExistsError(f"registration entry: {entry.spiffe_id} already exists")

        self._run(work)

    def get_entry(self, spiffe_id: SpiffeId) -> Entry | None:
        """The entry for ``spiffe_id``, or None."""
        return self._run(lambda cur: self._fetch_entry(cur, spiffe_id))

    def list_entries(self) -> list[Entry]:
        """Every entry, ordered by SPIFFE ID (byte order, whatever the server's locale)."""
        rows = self._run(lambda cur: cur.execute(_SELECT_ENTRY + " ORDER BY spiffe_id").fetchall())
        return [self._rows.entry(row) for row in rows]

    def delete_entry(self, spiffe_id: SpiffeId) -> bool:
        """Remove an entry and its unused tokens. Returns False if there was none.

        Its certificates stay (they can still be revoked), and so do its used tokens.
        """

        def work(cur: _Cursor) -> bool:
            # The entry first: a concurrent add_token holds it FOR SHARE, so this waits for that
            # token to commit, and the next statement (a new snapshot) deletes it too.
            deleted = cur.execute("DELETE FROM entries WHERE spiffe_id = %s", (str(spiffe_id),)).rowcount > 0
            cur.execute("DELETE FROM tokens WHERE spiffe_id = %s AND used_at IS NULL", (str(spiffe_id),))
            return deleted

        return self._run(work)

    def count_entries(self) -> int:
        """How many entries there are."""
        return self._run(lambda cur: int(_one(cur.execute("SELECT COUNT(*) FROM entries"))[0]))

    # -- tokens and issuance -------------------------------------------------------------------

    def add_token(self, token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store a join token's hash, bound to an existing entry.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            AlreadyExistsError: a token with this hash is already stored.
        """
        expires = to_unix(expires_at, "expires_at")

        def work(cur: _Cursor) -> None:
            # FOR SHARE: a replica deleting the entry meanwhile waits, then deletes this token too.
            if (
                cur.execute("SELECT 1 FROM entries WHERE spiffe_id = %s FOR SHARE", (str(spiffe_id),)).fetchone()
                is None
            ):
                raise NotFoundError(f"registration entry: {spiffe_id} not found; create it before its join token")
            cur.execute(
                "INSERT INTO tokens (hash, spiffe_id, expires_at, used_at) VALUES (%s, %s, %s, NULL)"
                " ON CONFLICT (hash) DO NOTHING",
                (bytes(token_hash), str(spiffe_id), expires),
            )
            if cur.rowcount == 0:
                raise AlreadyExistsError("join token: a token with this hash already exists; generate a new token")

        self._run(work)

    def issue_with_token(self, token_hash: bytes, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: check the token (known, unused, unexpired), call ``sign(entry)``,
        record the certificate, mark the token used. Returns the entry and ``sign``'s result.

        The token's row stays locked until the transaction ends, so of several replicas racing
        on one token exactly one issues; the others then find it used. If ``sign`` raises,
        nothing is written (the token stays usable) and its error propagates. If the serial it
        returns is already recorded, it is called again, at most 3 times in all.

        Raises:
            TokenError: unknown, already used, or expired (nothing is written).
            NotFoundError: the token's entry was deleted.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        token = bytes(token_hash)

        def work(cur: _Cursor) -> tuple[Entry, object]:
            row = cur.execute(
                "SELECT spiffe_id, expires_at, used_at FROM tokens WHERE hash = %s FOR UPDATE", (token,)
            ).fetchone()
            spiffe_id = self._rows.usable_token(row, now_s)
            entry = self._fetch_entry(cur, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} was deleted; its join token cannot be used")
            result = self._sign_and_record(cur, entry, now_s, sign)
            cur.execute("UPDATE tokens SET used_at = %s WHERE hash = %s", (now_s, token))
            return entry, result

        return self._run(work)

    def record_issuance(self, spiffe_id: SpiffeId, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: look up the entry, call ``sign(entry)``, record the certificate.

        ``sign`` is treated as in :meth:`issue_with_token`.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")

        def work(cur: _Cursor) -> tuple[Entry, object]:
            entry = self._fetch_entry(cur, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found")
            return entry, self._sign_and_record(cur, entry, now_s, sign)

        return self._run(work)

    def _sign_and_record(self, cur: _Cursor, entry: Entry, now_s: int, sign: Signer) -> object:
        for _ in range(_SIGN_ATTEMPTS):
            serial, not_after, result = sign(entry)
            if isinstance(serial, bool) or not isinstance(serial, int):
                raise TypeError(f"CA store: the signer returned a serial of type {type(serial).__name__}, not int")
            if serial <= 0 or serial.bit_length() > _MAX_SERIAL_BITS:
                raise ValueError(f"CA store: the signer returned serial {serial:x}, not a positive 160-bit number")
            # ON CONFLICT, not a failing INSERT: a failed statement would abort the transaction.
            # If another replica's uncommitted transaction holds the serial, this waits for it.
            cur.execute(
                "INSERT INTO certificates (serial, spiffe_id, not_after, issued_at, revoked_at)"
                " VALUES (%s, %s, %s, %s, NULL) ON CONFLICT (serial) DO NOTHING",
                (hex_serial(serial), str(entry.spiffe_id), to_unix(not_after, "not_after"), now_s),
            )
            if cur.rowcount == 1:
                return result
        raise StoreError(
            f"CA store {self._name}: the signer returned an already recorded serial {_SIGN_ATTEMPTS} times;"
            " its serials are not random"
        )

    # -- issued certificates -------------------------------------------------------------------

    def get_issued(self, serial: int) -> IssuedRecord | None:
        """The record of certificate ``serial``, or None."""
        row = self._run(
            lambda cur: cur.execute(_SELECT_ISSUED + " WHERE serial = %s", (hex_serial(serial),)).fetchone()
        )
        return None if row is None else self._rows.issued(row)

    def list_issued(self) -> list[IssuedRecord]:
        """Every issued certificate, oldest first."""
        rows = self._run(lambda cur: cur.execute(_SELECT_ISSUED + " ORDER BY issued_at, serial").fetchall())
        return [self._rows.issued(row) for row in rows]

    def revoke_serial(self, serial: int, now: datetime.datetime) -> bool:
        """Mark one certificate revoked. False if unknown; revoking twice keeps the first time."""
        now_s = to_unix(now, "now")

        def work(cur: _Cursor) -> bool:
            cur.execute(
                "UPDATE certificates SET revoked_at = %s WHERE serial = %s AND revoked_at IS NULL",
                (now_s, hex_serial(serial)),
            )
            if cur.rowcount > 0:
                return True
            return (
                cur.execute("SELECT 1 FROM certificates WHERE serial = %s", (hex_serial(serial),)).fetchone()
                is not None
            )

        return self._run(work)

    def revoke_spiffe_id(self, spiffe_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """Revoke every unexpired, unrevoked certificate of ``spiffe_id``; returns their serials, sorted.

        A certificate is unexpired while ``now`` is at or before its not_after.
        """
        now_s = to_unix(now, "now")
        rows = self._run(
            lambda cur: cur.execute(
                "UPDATE certificates SET revoked_at = %s"
                " WHERE spiffe_id = %s AND revoked_at IS NULL AND not_after >= %s RETURNING serial",
                (now_s, str(spiffe_id), now_s),
            ).fetchall()
        )
        return sorted(int(row[0], 16) for row in rows)

    def revoked_unexpired(self, now: datetime.datetime) -> list[IssuedRecord]:
        """What the next CRL must list: revoked certificates whose not_after is not before ``now``."""
        now_s = to_unix(now, "now")
        rows = self._run(
            lambda cur: cur.execute(
                _SELECT_ISSUED + " WHERE revoked_at IS NOT NULL AND not_after >= %s ORDER BY issued_at, serial",
                (now_s,),
            ).fetchall()
        )
        return [self._rows.issued(row) for row in rows]

    # -- counters ------------------------------------------------------------------------------

    def next_crl_number(self) -> int:
        """Increment and return the CRL number (monotonic across replicas, durable); the first is 1."""
        return self._counter("UPDATE counters SET value = value + 1 WHERE name = %s RETURNING value", "crl_number")

    def bundle_sequence(self) -> int:
        """The current bundle sequence number; 0 until the first bump."""
        return self._counter("SELECT value FROM counters WHERE name = %s", "bundle_sequence")

    def bump_bundle_sequence(self) -> int:
        """Increment and return the bundle sequence number (monotonic across replicas, durable)."""
        return self._counter("UPDATE counters SET value = value + 1 WHERE name = %s RETURNING value", "bundle_sequence")

    def _counter(self, query: str, name: str) -> int:
        row = self._run(lambda cur: cur.execute(query, (name,)).fetchone())
        if row is None:
            raise StoreError(f"CA store {self._name}: counter {name!r} is missing; restore the database from a backup")
        return int(row[0])

    # -- lifecycle -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StoreError if the store cannot be used (for health checks)."""
        self._run(lambda cur: cur.execute("SELECT 1 FROM counters LIMIT 1").fetchall())

    def close(self) -> None:
        """Close every connection. Safe to call twice; every other method then raises StoreError."""
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self._name!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _connect(self) -> _Connection:
        conn = psycopg.connect(self._dsn, autocommit=False, connect_timeout=self._connect_timeout)
        # Whatever the server's default: the locking above is designed for READ COMMITTED, where a
        # statement that waited for a row lock reads the row as the other transaction left it.
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        try:
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (_IDLE_IN_TRANSACTION_TIMEOUT,)
            )
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, cur: _Cursor) -> None:
        # Replicas starting together queue here; each then sees what the one before applied.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        # Checked before CREATE ... IF NOT EXISTS, which needs the CREATE privilege even when the
        # table exists: a user that may only read and write meshid's tables can still open the store.
        if _one(cur.execute("SELECT to_regclass('schema_version')"))[0] is None:
            cur.execute(migrations.schema_version_table("postgres"))
        current = int(_one(cur.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version"))[0])
        if current > migrations.latest_version():
            raise StoreError(f"CA store {self._name}: {migrations.newer_schema_message(current)}")
        now_s = math.floor(datetime.datetime.now(datetime.UTC).timestamp())
        pending = migrations.statements("postgres")[current:]
        for version, statements in enumerate(pending, start=current + 1):
            for statement in statements:
                cur.execute(statement)
            cur.execute("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (version, now_s))

    def _run(self, work: Callable[[_Cursor], _T]) -> _T:
        """``work`` in one transaction, committed if it returns, rolled back if it raises; run
        again from the start (at most 3 times in all) when it failed in a way that is safe to retry."""
        for attempt in range(1, _TRANSACTION_ATTEMPTS + 1):
            try:
                with self._pool.connection() as (conn, reused):
                    try:
                        with conn.cursor() as cur:
                            result = work(cur)
                    except BaseException as exc:
                        with contextlib.suppress(psycopg.Error):
                            conn.rollback()
                        if attempt < _TRANSACTION_ATTEMPTS and self._retryable(exc, conn, reused):
                            continue
                        raise
                    # Never retried: whether a COMMIT that failed took effect is unknown.
                    conn.commit()
                    return result
            except _PoolClosedError as err:
                raise StoreError(f"CA store {self._name}: closed") from err
            except psycopg.Error as err:
                raise self._error(err) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _retryable(self, exc: BaseException, conn: _Connection, reused: bool) -> bool:
        # Nothing was committed: no COMMIT had been sent when ``work`` failed.
        if isinstance(exc, errors.SerializationFailure | errors.DeadlockDetected):
            return True
        if isinstance(exc, psycopg.OperationalError) and reused and (conn.closed or conn.broken):
            # A pooled connection the server closed (a restart, a failover): the idle ones are
            # likely dead too. Only reused connections: a fresh one failing means the server is down.
            self._pool.discard_idle()
            return True
        return False

    def _error(self, err: psycopg.Error) -> StoreError:
        primary = err.diag.message_primary if err.sqlstate else None
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # Only the primary message: DETAIL may quote row values, e.g. a token's hash.
        detail = primary or (lines[0] if lines else type(err).__name__)
        for secret in self._secrets:
            detail = detail.replace(secret, "***")
        state = err.sqlstate or ""
        hint = _HINTS.get(state)
        if hint is None and (state.startswith("08") or (not state and isinstance(err, psycopg.OperationalError))):
            hint = _CONNECTION_HINT
        message = f"CA store {self._name}: {detail}"
        return StoreError(f"{message}; {hint}" if hint else message)

    def _fetch_entry(self, cur: _Cursor, spiffe_id: SpiffeId) -> Entry | None:
        row = cur.execute(_SELECT_ENTRY + " WHERE spiffe_id = %s", (str(spiffe_id),)).fetchone()
        return None if row is None else self._rows.entry(row)


class _PoolClosedError(Exception):
    pass


class _Pool:
    """At most ``size`` open connections, each used by one thread at a time; the rest wait.

    A connection goes back to the pool only if it is open and outside any transaction.
    """

    def __init__(self, connect: Callable[[], _Connection], size: int) -> None:
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[tuple[_Connection, bool]]:
        """A connection and whether it was reused from the pool (rather than just opened)."""
        with self._slots:
            with self._lock:
                if self._closed:
                    raise _PoolClosedError
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            try:
                yield conn, reused
            finally:
                self._put_back(conn)

    def _put_back(self, conn: _Connection) -> None:
        usable = not conn.closed and not conn.broken and conn.info.transaction_status == pq.TransactionStatus.IDLE
        with self._lock:
            if usable and not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Close the idle connections now and the busy ones when they come back."""
        with self._lock:
            self._closed = True
        self.discard_idle()


_SELECT_ENTRY = "SELECT spiffe_id, dns_names, ttl_seconds, created_at FROM entries"
_SELECT_ISSUED = "SELECT serial, spiffe_id, not_after, issued_at, revoked_at FROM certificates"


def _one(cur: _Cursor) -> TupleRow:
    row = cur.fetchone()
    if row is None:  # pragma: no cover - aggregates always return a row
        raise AssertionError("a query that always returns a row returned none")
    return row


def _redact(dsn: str) -> tuple[str, list[str]]:
    """The DSN to show (without its password) and the passwords never to show.

    Raises:
        ValueError: libpq cannot parse it (the message does not quote it: it may hold a password).
    """
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        # Not chained: libpq's message quotes the DSN around the fault, password included.
        raise ValueError(
            "CA store: the PostgreSQL DSN cannot be parsed; expected postgresql://user@host:port/dbname"
            " or key=value pairs"
        ) from None
    secrets = [str(params["password"])] if params.get("password") else []
    if "://" not in dsn:
        shown = conninfo.make_conninfo("", **{k: v for k, v in params.items() if k != "password"})
        return shown, secrets
    scheme, _, rest = dsn.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            secrets += [password, urllib.parse.unquote(password)]
        netloc = f"{user}@{hosts}"
    path, question, query = tail.partition("?")
    if question:
        kept = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k != "password"]
        tail = path + ("?" + urllib.parse.urlencode(kept) if kept else "")
    return f"{scheme}://{netloc}{tail}", [s for s in secrets if s]
