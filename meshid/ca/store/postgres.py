"""The CA's store on PostgreSQL (:class:`PostgresStore`), so that several CA replicas act as one CA:
the PostgreSQL dialect of :mod:`meshid.ca.store.sql`.

Every guarantee a replica relies on is the database's, not a lock in one process:

* a join token is consumed once: ``issue_with_token`` locks the token's row (``FOR UPDATE``)
  for the whole transaction, so a replica racing on the same token waits, then sees it used;
* serials are unique: the certificate's primary key, inserted with ``ON CONFLICT DO NOTHING``
  so that a taken serial makes the store sign again instead of aborting the transaction;
* the CRL number and bundle sequence are one row each, locked by the ``UPDATE`` that bumps them;
* migrations (shared with SQLite, :mod:`meshid.ca.store.migrations`) run under a
  transaction-scoped advisory lock, so replicas starting together apply each one once.

Each transaction is READ COMMITTED, on a connection of a small thread-safe pool. A transaction
that fails before its COMMIT was sent (a deadlock, a serialization failure, a pooled
connection the server has since closed) is run again from the start, at most 3 times; ``sign``
may then be called again and its earlier result is discarded, exactly as when its serial was
taken. A failed COMMIT is never retried: its outcome is unknown.
"""

from __future__ import annotations

import contextlib
import math
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import psycopg
from psycopg import conninfo, errors, pq
from psycopg.rows import TupleRow

from meshid.ca.store import migrations
from meshid.ca.store.sql import Connection, SqlStore, Transaction, insert_statement
from meshid.errors import StoreError

__all__ = ["PostgresDialect", "PostgresStore"]

_T = TypeVar("_T")
_Connection = psycopg.Connection[TupleRow]

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


class PostgresStore(SqlStore):
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
        super().__init__(PostgresDialect(dsn, connect_timeout=connect_timeout, pool_size=pool_size))


class PostgresDialect:
    """A pool of connections to one PostgreSQL database, opened as transactions need them (see the module)."""

    schema: migrations.Dialect = "postgres"
    placeholder = "%s"
    for_update = " FOR UPDATE"
    for_share = " FOR SHARE"
    restore_hint = "restore the database from a backup"

    def __init__(self, dsn: str, *, connect_timeout: float, pool_size: int) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            raise ValueError("CA store: needs a PostgreSQL DSN, e.g. postgresql://meshid@db.example:5432/meshid")
        if not connect_timeout > 0:
            raise ValueError(f"CA store: connect_timeout must be positive, not {connect_timeout!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"CA store: pool_size must be a positive int, not {pool_size!r}")
        self._dsn = dsn
        self.name, self._secrets = _redact(dsn)
        self._connect_timeout = max(1, math.ceil(connect_timeout))
        self._pool = _Pool(self._connect, pool_size)

    def run(self, work: Callable[[Connection], _T], *, write: bool) -> _T:
        """``work`` in one transaction, committed if it returns, rolled back if it raises; run
        again from the start (at most 3 times in all) when it failed in a way that is safe to retry.

        ``write`` changes nothing: row locks, not the transaction's mode, keep writers apart.
        """
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
                raise StoreError(f"CA store {self.name}: closed") from err
            except psycopg.Error as err:
                raise self._error(err) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def insert_if_absent(self, tx: Transaction, table: str, key: str, row: Mapping[str, object]) -> bool:
        # ON CONFLICT, not a failing INSERT: a failed statement would abort the transaction. A key
        # that another replica's uncommitted transaction inserted makes this wait for it.
        statement = insert_statement(table, row) + f" ON CONFLICT ({key}) DO NOTHING"
        return tx.execute(statement, tuple(row.values())).rowcount == 1

    def prepare_migrations(self, tx: Transaction) -> None:
        # Replicas starting together queue here; each then sees what the one before applied.
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        # Checked before CREATE ... IF NOT EXISTS, which needs the CREATE privilege even when the
        # table exists: a user that may only read and write meshid's tables can still open the store.
        if tx.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            tx.execute(migrations.schema_version_table("postgres"))

    def close(self) -> None:
        """Close every connection: the idle ones now, the busy ones when they come back."""
        self._pool.close()

    def _connect(self) -> _Connection:
        conn = psycopg.connect(self._dsn, autocommit=False, connect_timeout=self._connect_timeout)
        # Whatever the server's default: the store's locking is designed for READ COMMITTED, where a
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
        message = f"CA store {self.name}: {detail}"
        return StoreError(f"{message}; {hint}" if hint else message)


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
