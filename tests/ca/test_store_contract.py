"""What every CA store promises, run once per dialect (SQLite file, PostgreSQL database): every
Store method, the one-transaction issuance rules, the token locked while it is signed for,
counters and records that outlive the store object, the schema's migrations, and node agents:
entries with a parent and selectors, agent tokens, attestation, renewal and eviction, and batch
issuance (one transaction per batch, per-item refusals, nothing recorded when it fails).

Every store is built by one fixture, ``store``, through :func:`meshid.ca.store.open_store`, the
way the CA opens it. What only one dialect does is in test_sqlite.py and test_postgres.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from meshid.ca.store import AgentRecord, BatchItem, Entry, IssuedRecord, Store, migrations, open_store
from meshid.ca.store.postgres import PostgresDialect
from meshid.ca.store.sql import Connection, Dialect, SqlStore, Transaction
from meshid.ca.store.sqlite import SqliteDialect
from meshid.errors import (
    AlreadyExistsError,
    AttestationError,
    InvalidRequestError,
    IssuanceError,
    NotAuthorizedError,
    NotFoundError,
    StoreError,
    TokenError,
)
from meshid.spiffeid import SpiffeId
from pg import new_database, query, running_postgres
from stores import HOUR, NOW, OTHER, TOKEN, WORKLOAD, entry, failing_sign, run_threads, signer

pytestmark = pytest.mark.timeout(120)


class SqliteFile:
    """An SQLite file a store is opened on, and a side door to it that bypasses the store."""

    def __init__(self, path: Path) -> None:
        self.datastore = self.name = str(path)

    def schema_versions(self) -> list[int]:
        with contextlib.closing(sqlite3.connect(self.datastore)) as conn:
            return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]

    def add_schema_version(self, version: int) -> None:
        with contextlib.closing(sqlite3.connect(self.datastore)) as conn, conn:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def token_is_locked(self, token: bytes) -> bool:
        """Whether another connection would have to wait to write (and so to take ``token``)."""
        with contextlib.closing(sqlite3.connect(self.datastore, timeout=0, isolation_level=None)) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                if "locked" in str(err):
                    return True
                raise
            conn.execute("ROLLBACK")
            return False

    def agent_is_locked(self, agent: str) -> bool:
        """Whether another connection would have to wait to evict ``agent`` (SQLite: to write at all)."""
        return self.token_is_locked(b"")

    def dialect(self) -> Dialect:
        return SqliteDialect(self.datastore, busy_timeout=5.0)

    def run_script(self, statements: list[str]) -> None:
        with contextlib.closing(sqlite3.connect(self.datastore)) as conn, conn:
            for statement in statements:
                conn.execute(statement)


class PostgresDatabase:
    """A PostgreSQL database a store is opened on, and a side door to it that bypasses the store."""

    def __init__(self, dsn: str) -> None:
        self.datastore = self.name = dsn

    def schema_versions(self) -> list[int]:
        return [int(row[0]) for row in query(self.datastore, "SELECT version FROM schema_version ORDER BY version")]

    def add_schema_version(self, version: int) -> None:
        query(self.datastore, "INSERT INTO schema_version (version) VALUES (%s)", version)

    def token_is_locked(self, token: bytes) -> bool:
        """Whether another connection would have to wait to lock ``token``'s row."""
        with psycopg.connect(self.datastore) as conn:
            try:
                conn.execute("SELECT 1 FROM tokens WHERE hash = %s FOR UPDATE NOWAIT", (token,))
            except psycopg.errors.LockNotAvailable:
                return True
            finally:
                conn.rollback()
            return False

    def agent_is_locked(self, agent: str) -> bool:
        """Whether another connection would have to wait to lock ``agent``'s row (as an eviction does)."""
        with psycopg.connect(self.datastore) as conn:
            try:
                conn.execute("SELECT 1 FROM agents WHERE spiffe_id = %s FOR UPDATE NOWAIT", (agent,))
            except psycopg.errors.LockNotAvailable:
                return True
            finally:
                conn.rollback()
            return False

    def dialect(self) -> Dialect:
        return PostgresDialect(self.datastore, connect_timeout=5.0, pool_size=2)

    def run_script(self, statements: list[str]) -> None:
        with psycopg.connect(self.datastore, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[call-overload]


Backend = SqliteFile | PostgresDatabase


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """The dialect of a test: None for SQLite (a file, no server), else the DSN of one PostgreSQL
    for the whole session, on which each test gets its own database."""
    if request.param == "sqlite":
        yield None
        return
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


@pytest.fixture
def backend(database_server: str | None, tmp_path: Path) -> Backend:
    if database_server is None:
        return SqliteFile(tmp_path / "ca.db")
    return PostgresDatabase(new_database(database_server))


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    with contextlib.closing(open_store(backend.datastore)) as store:
        yield store


@pytest.fixture
def with_token(store: Store) -> Store:
    store.create_entry(entry(WORKLOAD, "payments.local"))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    return store


def message_of(backend: Backend, rest: str) -> str:
    """A pattern for a whole StoreError message: ``CA store <this store's name>: `` then ``rest``."""
    return f"^CA store {re.escape(backend.name)}: {rest}"


# -- entries -----------------------------------------------------------------------------------


def test_entry_round_trips(store: Store) -> None:
    e = entry(WORKLOAD, "payments.local", "payments.prod.svc")
    store.create_entry(e)
    assert store.get_entry(WORKLOAD) == e
    assert store.get_entry(OTHER) is None
    got = store.get_entry(WORKLOAD)
    assert got is not None and got.created_at.tzinfo == datetime.UTC


def test_list_and_count_entries(store: Store) -> None:
    assert store.list_entries() == [] and store.count_entries() == 0
    store.create_entry(entry(WORKLOAD))
    store.create_entry(entry(OTHER, "frontend.local"))
    assert store.list_entries() == [entry(OTHER, "frontend.local"), entry(WORKLOAD)]
    assert store.count_entries() == 2


def test_list_entries_is_in_byte_order_and_counted(store: Store) -> None:
    assert store.list_entries() == [] and store.count_entries() == 0
    upper = SpiffeId.parse("spiffe://example.org/ns/prod/sa/Zeta")
    for spiffe_id in (WORKLOAD, upper, OTHER):
        store.create_entry(entry(spiffe_id))
    # Byte order, as SQLite sorts: "Z" before "f", whatever the server's locale would say.
    assert [e.spiffe_id for e in store.list_entries()] == [upper, OTHER, WORKLOAD]
    assert store.count_entries() == 3


def test_create_entry_twice_is_already_exists(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(
        AlreadyExistsError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments already exists"
    ):
        store.create_entry(entry(WORKLOAD, "changed.local"))
    assert store.get_entry(WORKLOAD) == entry(WORKLOAD)


def test_delete_entry_removes_its_unused_tokens(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    assert store.delete_entry(WORKLOAD) is True
    assert store.delete_entry(WORKLOAD) is False
    assert store.get_entry(WORKLOAD) is None
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(TokenError, match=r"^join token: unknown"):
        store.issue_with_token(TOKEN, NOW, signer())


def test_delete_entry_keeps_used_tokens_spent_and_certificates(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.issue_with_token(TOKEN, NOW, signer(0xA1))
    store.delete_entry(WORKLOAD)
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(TokenError, match="already used"):
        store.issue_with_token(TOKEN, NOW, signer())
    assert store.revoke_spiffe_id(WORKLOAD, NOW) == [0xA1]


def test_add_token_without_entry_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments not found"):
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)


def test_add_token_twice_is_already_exists(with_token: Store) -> None:
    with pytest.raises(AlreadyExistsError, match=r"^join token:") as info:
        with_token.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    assert TOKEN.hex() not in str(info.value)


def test_naive_datetime_is_refused(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_token(TOKEN, WORKLOAD, datetime.datetime(2030, 1, 1))


# -- issuance ----------------------------------------------------------------------------------


def test_issue_with_token_records_certificate(with_token: Store) -> None:
    got_entry, result = with_token.issue_with_token(TOKEN, NOW, signer(0xBEEF))
    assert got_entry == entry(WORKLOAD, "payments.local")
    assert result == f"cert beef for {WORKLOAD}"
    assert with_token.get_issued(0xBEEF) == IssuedRecord(0xBEEF, WORKLOAD, NOW + HOUR, NOW)
    assert with_token.get_issued(0xBEEE) is None


def test_token_is_single_use(with_token: Store) -> None:
    with_token.issue_with_token(TOKEN, NOW, signer())
    with pytest.raises(TokenError, match=r"^join token: already used") as info:
        with_token.issue_with_token(TOKEN, NOW, signer())
    assert TOKEN.hex() not in str(info.value) and str(WORKLOAD) not in str(info.value)
    assert len(with_token.list_issued()) == 1


def test_token_is_locked_from_other_connections_while_it_is_signed_for(backend: Backend, with_token: Store) -> None:
    # The order of events, not time: the lock is taken before sign runs and held until the commit.
    assert backend.token_is_locked(TOKEN) is False
    seen_while_signing: list[bool] = []

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        seen_while_signing.append(backend.token_is_locked(TOKEN))
        return 0x61, NOW + HOUR, "signed"

    assert with_token.issue_with_token(TOKEN, NOW, sign)[1] == "signed"
    assert seen_while_signing == [True]
    assert backend.token_is_locked(TOKEN) is False


def test_unknown_token_is_refused(with_token: Store) -> None:
    with pytest.raises(TokenError, match=r"^join token: unknown") as info:
        with_token.issue_with_token(b"\x22" * 32, NOW, signer())
    assert "22" * 32 not in str(info.value)
    assert with_token.list_issued() == []


def test_expired_token_is_refused_and_nothing_written(with_token: Store) -> None:
    with pytest.raises(TokenError, match=r"^join token: expired") as info:
        with_token.issue_with_token(TOKEN, NOW + HOUR, signer())
    assert TOKEN.hex() not in str(info.value)
    assert with_token.list_issued() == []
    # Not consumed either: a moment before expiry it is still good.
    with_token.issue_with_token(TOKEN, NOW + HOUR - datetime.timedelta(seconds=1), signer())


def test_signer_failure_leaves_token_usable_and_nothing_recorded(with_token: Store) -> None:
    with pytest.raises(RuntimeError, match="HSM unavailable"):
        with_token.issue_with_token(TOKEN, NOW, failing_sign)
    assert with_token.list_issued() == []
    with_token.issue_with_token(TOKEN, NOW, signer(0x77))
    assert [r.serial for r in with_token.list_issued()] == [0x77]


def test_serial_collision_signs_again_never_reusing_a_serial(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.record_issuance(WORKLOAD, NOW, signer(0x1234))
    calls: list[int] = []
    serials = [0x1234, 0x1234, 0x5678]

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        calls.append(serials[len(calls)])
        return calls[-1], NOW + HOUR, calls[-1]

    assert store.record_issuance(WORKLOAD, NOW, sign)[1] == 0x5678
    assert calls == [0x1234, 0x1234, 0x5678]
    assert sorted(r.serial for r in store.list_issued()) == [0x1234, 0x5678]


def test_serial_collision_every_time_is_store_error(backend: Backend, store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.record_issuance(WORKLOAD, NOW, signer(0x1234))
    with pytest.raises(StoreError, match=message_of(backend, "the signer returned an already recorded serial 3 times")):
        store.issue_with_token(TOKEN, NOW, signer(0x1234, 0x1234, 0x1234))
    assert len(store.list_issued()) == 1
    store.issue_with_token(TOKEN, NOW, signer())  # the token was not consumed


def test_serials_of_160_bits_round_trip(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    big = (1 << 160) - 1
    store.record_issuance(WORKLOAD, NOW, signer(big))
    record = store.get_issued(big)
    assert record is not None and record.serial == big


def test_times_past_2038_round_trip(store: Store) -> None:
    # Unix seconds beyond 2**31: a 32-bit column would overflow.
    far = datetime.datetime(2200, 1, 1, tzinfo=datetime.UTC)
    store.create_entry(Entry(WORKLOAD, (), datetime.timedelta(days=36500), far))
    store.add_token(TOKEN, WORKLOAD, far + HOUR)
    store.issue_with_token(TOKEN, far, signer(0x9, not_after=far + HOUR))
    assert store.get_issued(0x9) == IssuedRecord(0x9, WORKLOAD, far + HOUR, far)
    assert store.get_entry(WORKLOAD) == Entry(WORKLOAD, (), datetime.timedelta(days=36500), far)


def test_signer_serial_that_is_not_positive_is_refused(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(ValueError, match="positive 160-bit"):
        store.record_issuance(WORKLOAD, NOW, signer(0))
    with pytest.raises(ValueError, match="positive 160-bit"):
        store.record_issuance(WORKLOAD, NOW, signer(1 << 160))
    assert store.list_issued() == []


def test_record_issuance_without_entry_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match=r"^registration entry: .* not found"):
        store.record_issuance(WORKLOAD, NOW, signer())
    assert store.list_issued() == []


def test_list_issued_is_oldest_first(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.create_entry(entry(OTHER))
    store.record_issuance(OTHER, NOW + HOUR, signer(0x2, not_after=NOW + 2 * HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x3))
    assert store.list_issued() == [
        IssuedRecord(0x3, WORKLOAD, NOW + HOUR, NOW),
        IssuedRecord(0x2, OTHER, NOW + 2 * HOUR, NOW + HOUR),
    ]


@pytest.mark.timeout(60)
def test_concurrent_issuance_uses_a_shared_token_once(store: Store) -> None:
    own_tokens = [bytes([i]) * 32 for i in range(1, 9)]
    shared = b"\xff" * 32
    for i, token in enumerate(own_tokens):
        spiffe_id = SpiffeId.parse(f"spiffe://example.org/worker/{i}")
        store.create_entry(entry(spiffe_id))
        store.add_token(token, spiffe_id, NOW + HOUR)
    store.create_entry(entry(OTHER))
    store.add_token(shared, OTHER, NOW + HOUR)

    tokens = own_tokens + [shared] * 8
    barrier = threading.Barrier(len(tokens))
    outcomes: list[object] = [None] * len(tokens)

    def issue(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = store.issue_with_token(tokens[i], NOW, signer())[0]
        except TokenError as err:
            outcomes[i] = err

    run_threads(len(tokens), issue)

    assert all(isinstance(o, Entry) for o in outcomes[:8])
    shared_outcomes = outcomes[8:]
    assert sum(isinstance(o, Entry) for o in shared_outcomes) == 1
    refusals = [o for o in shared_outcomes if not isinstance(o, Entry)]
    assert len(refusals) == 7 and all("already used" in str(o) for o in refusals)
    issued = store.list_issued()
    assert len(issued) == 9 and len({r.serial for r in issued}) == 9


# -- revocation --------------------------------------------------------------------------------


def test_revoke_serial_keeps_the_first_time(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.record_issuance(WORKLOAD, NOW, signer(0xA))
    assert store.revoke_serial(0xA, NOW + datetime.timedelta(minutes=1)) is True
    assert store.revoke_serial(0xA, NOW + datetime.timedelta(minutes=2)) is True
    assert store.revoke_serial(0xB, NOW) is False
    record = store.get_issued(0xA)
    assert record is not None and record.revoked_at == NOW + datetime.timedelta(minutes=1)


def test_revoke_spiffe_id_revokes_only_unexpired_unrevoked(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.create_entry(entry(OTHER))
    store.record_issuance(WORKLOAD, NOW - 2 * HOUR, signer(0x1, not_after=NOW - HOUR))  # expired
    store.record_issuance(WORKLOAD, NOW, signer(0x2))
    store.record_issuance(WORKLOAD, NOW, signer(0x3))
    store.record_issuance(WORKLOAD, NOW, signer(0x4))
    store.record_issuance(OTHER, NOW, signer(0x5))
    store.revoke_serial(0x4, NOW - HOUR)  # already revoked
    later = NOW + datetime.timedelta(minutes=5)
    assert store.revoke_spiffe_id(WORKLOAD, later) == [0x2, 0x3]
    assert store.revoke_spiffe_id(WORKLOAD, later) == []
    revoked = {r.serial: r.revoked_at for r in store.list_issued()}
    assert revoked == {0x1: None, 0x2: later, 0x3: later, 0x4: NOW - HOUR, 0x5: None}


def test_revoked_unexpired_excludes_expired_and_unrevoked(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.record_issuance(WORKLOAD, NOW, signer(0x1, not_after=NOW + HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x2, not_after=NOW + 3 * HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x3, not_after=NOW + 3 * HOUR))
    store.revoke_serial(0x1, NOW)
    store.revoke_serial(0x2, NOW)
    assert [r.serial for r in store.revoked_unexpired(NOW)] == [0x1, 0x2]
    assert [r.serial for r in store.revoked_unexpired(NOW + 2 * HOUR)] == [0x2]
    assert store.revoked_unexpired(NOW + 4 * HOUR) == []


# -- counters and reopening --------------------------------------------------------------------


def test_crl_number_increases_and_survives_reopening(backend: Backend) -> None:
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert [store.next_crl_number() for _ in range(3)] == [1, 2, 3]
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert store.next_crl_number() == 4


def test_bundle_sequence_increases_and_survives_reopening(backend: Backend) -> None:
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert store.bundle_sequence() == 0
        assert store.bump_bundle_sequence() == 1
        assert store.bump_bundle_sequence() == 2
        assert store.bundle_sequence() == 2
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert store.bundle_sequence() == 2
        assert store.bump_bundle_sequence() == 3


def test_data_survives_close_and_reopen(backend: Backend) -> None:
    with contextlib.closing(open_store(backend.datastore)) as store:
        store.create_entry(entry(WORKLOAD, "payments.local"))
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
        store.record_issuance(WORKLOAD, NOW, signer(0xC0FFEE))
        store.revoke_serial(0xC0FFEE, NOW)
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert store.list_entries() == [entry(WORKLOAD, "payments.local")]
        assert store.list_issued() == [IssuedRecord(0xC0FFEE, WORKLOAD, NOW + HOUR, NOW, NOW)]
        store.issue_with_token(TOKEN, NOW, signer())


def test_closed_store_is_store_error(backend: Backend, store: Store) -> None:
    store.check()
    store.close()
    store.close()
    with pytest.raises(StoreError, match=message_of(backend, "closed$")):
        store.check()


# -- migrations --------------------------------------------------------------------------------


def test_both_dialects_have_the_same_migrations() -> None:
    sqlite, postgres = migrations.statements("sqlite"), migrations.statements("postgres")
    assert [len(m) for m in sqlite] == [len(m) for m in postgres] and len(sqlite) == migrations.latest_version()
    assert "BIGINT" in postgres[0][0] and "BYTEA" in postgres[0][1] and "BLOB" in sqlite[0][1]
    with pytest.raises(ValueError, match="unknown SQL dialect"):
        migrations.statements("oracle")  # type: ignore[arg-type]


def test_reopening_does_not_rerun_migrations(backend: Backend) -> None:
    with contextlib.closing(open_store(backend.datastore)) as store:
        store.next_crl_number()
    versions = backend.schema_versions()
    assert versions and versions == list(range(1, len(versions) + 1))
    assert versions == list(range(1, migrations.latest_version() + 1))
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert store.next_crl_number() == 2
    assert backend.schema_versions() == versions


def test_database_from_newer_meshid_is_refused(backend: Backend) -> None:
    open_store(backend.datastore).close()
    newer = max(backend.schema_versions()) + 1
    backend.add_schema_version(newer)
    with pytest.raises(StoreError, match=message_of(backend, f"schema version {newer} is newer than this meshid")):
        open_store(backend.datastore)


def test_database_of_version_1_migrates_and_keeps_its_records(backend: Backend) -> None:
    # A database made by the meshid before node agents: its entries have no parent, its tokens
    # are for entries, its certificates are still revocable.
    dialect = "sqlite" if isinstance(backend, SqliteFile) else "postgres"
    backend.run_script(
        [
            migrations.schema_version_table(dialect),
            *migrations.statements(dialect)[0],
            "INSERT INTO schema_version (version, applied_at) VALUES (1, 0)",
            f"INSERT INTO entries VALUES ('{WORKLOAD}', '[\"payments.local\"]', 1800, {int(NOW.timestamp())})",
            f"INSERT INTO certificates VALUES ('a1', '{WORKLOAD}', {int((NOW + HOUR).timestamp())}, {int(NOW.timestamp())}, NULL)",
        ]
    )
    with contextlib.closing(open_store(backend.datastore)) as store:
        assert store.list_entries() == [entry(WORKLOAD, "payments.local")]
        assert store.get_entry(WORKLOAD) == Entry(WORKLOAD, ("payments.local",), datetime.timedelta(minutes=30), NOW)
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
        store.issue_with_token(TOKEN, NOW, signer(0xA2))
        assert store.revoke_spiffe_id(WORKLOAD, NOW) == [0xA1, 0xA2]
        assert store.list_agents() == []
    assert backend.schema_versions() == list(range(1, migrations.latest_version() + 1))


# -- node agents: entries, tokens, attestation, eviction -----------------------------------------

AGENT = SpiffeId.parse("spiffe://example.org/meshid/agent/node-1")
OTHER_AGENT = SpiffeId.parse("spiffe://example.org/meshid/agent/node-2")
WEB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/db")
AGENT_TOKEN = bytes.fromhex("33" * 32)


def child(spiffe_id: SpiffeId, parent: SpiffeId = AGENT, *selectors: str) -> Entry:
    return Entry(spiffe_id, (), datetime.timedelta(minutes=30), NOW, parent, selectors or ("unix:uid:1001",))


def key(n: int) -> bytes:
    """A stand-in for the SHA-256 of a public key."""
    return n.to_bytes(32, "big")


def agent_signer(
    *serials: int, not_after: datetime.datetime = NOW + HOUR
) -> Callable[[SpiffeId], tuple[int, datetime.datetime, object]]:
    queue = list(serials)

    def sign(agent_id: SpiffeId) -> tuple[int, datetime.datetime, object]:
        serial = queue.pop(0) if queue else secrets.randbits(159) | 1
        return serial, not_after, f"agent cert {serial:x} for {agent_id}"

    return sign


def attested(store: Store, agent_id: SpiffeId = AGENT, *, key_n: int = 1000) -> Store:
    store.attest_agent(agent_id, "x509pop", "CN=node-1", NOW, agent_signer(), key_sha256=key(key_n))
    return store


def test_entry_with_parent_and_selectors_round_trips(store: Store) -> None:
    e = child(WEB, AGENT, "unix:uid:1001", "unix:path:/usr/bin/web")
    store.create_entry(e)
    store.create_entry(entry(WORKLOAD))
    assert store.get_entry(WEB) == e
    assert store.get_entry(WORKLOAD) == entry(WORKLOAD)  # no parent, no selectors
    assert store.list_entries() == [entry(WORKLOAD), e]  # by SPIFFE ID


def test_agent_token_attests_once_and_records_the_agent(store: Store) -> None:
    store.add_agent_token(AGENT_TOKEN, AGENT, NOW + HOUR)
    record, result = store.attest_agent_with_token(AGENT_TOKEN, NOW, agent_signer(0xA9), key_sha256=key(1))
    assert result == f"agent cert a9 for {AGENT}"
    assert record == AgentRecord(AGENT, "join_token", "", NOW, NOW + HOUR, None)
    assert store.get_agent(AGENT) == record and store.list_agents() == [record]
    assert store.get_issued(0xA9) == IssuedRecord(0xA9, AGENT, NOW + HOUR, NOW)
    with pytest.raises(TokenError, match=r"^join token: already used"):
        store.attest_agent_with_token(AGENT_TOKEN, NOW, agent_signer(), key_sha256=key(2))


def test_tokens_serve_only_their_purpose_and_are_not_spent_by_the_wrong_one(store: Store) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.add_agent_token(AGENT_TOKEN, AGENT, NOW + HOUR)
    with pytest.raises(TokenError, match=r"^join token: made for a workload's entry, not for node attestation") as info:
        store.attest_agent_with_token(TOKEN, NOW, agent_signer(), key_sha256=key(1))
    assert str(WORKLOAD) not in str(info.value)
    with pytest.raises(TokenError, match=r"^join token: made for node attestation") as info:
        store.issue_with_token(AGENT_TOKEN, NOW, signer())
    assert str(AGENT) not in str(info.value)
    assert store.list_issued() == [] and store.list_agents() == []
    store.issue_with_token(TOKEN, NOW, signer())  # neither was spent
    store.attest_agent_with_token(AGENT_TOKEN, NOW, agent_signer(), key_sha256=key(1))


def test_entry_with_a_parent_is_issued_neither_for_a_token_nor_by_record_issuance(store: Store) -> None:
    store.create_entry(child(WEB))
    store.add_token(TOKEN, WEB, NOW + HOUR)  # e.g. made before the entry was re-created with a parent
    with pytest.raises(TokenError, match=r"^join token: its entry is served by a node agent now") as info:
        store.issue_with_token(TOKEN, NOW, signer())
    assert str(WEB) not in str(info.value)
    with pytest.raises(NotAuthorizedError, match=rf"^registration entry: {WEB} is served by node agent {AGENT}"):
        store.record_issuance(WEB, NOW, signer())
    assert store.list_issued() == []


def test_attesting_again_updates_the_agent_and_ends_its_eviction(store: Store) -> None:
    attested(store)
    later = NOW + datetime.timedelta(minutes=10)
    assert store.evict_agent(AGENT, later) == sorted(r.serial for r in store.list_issued())
    agent = store.get_agent(AGENT)
    assert agent is not None and agent.evicted and agent.evicted_at == later
    store.add_agent_token(AGENT_TOKEN, AGENT, later + HOUR)
    record, _ = store.attest_agent_with_token(
        AGENT_TOKEN, later, agent_signer(not_after=later + HOUR), key_sha256=key(2)
    )
    assert record == AgentRecord(AGENT, "join_token", "", later, later + HOUR, None)
    assert not record.evicted


def test_evicting_revokes_the_agents_unexpired_certificates_only(store: Store) -> None:
    store.attest_agent(
        AGENT, "x509pop", "CN=node-1", NOW - 2 * HOUR, agent_signer(0x1, not_after=NOW - HOUR), key_sha256=key(1)
    )
    store.renew_agent(AGENT, NOW, agent_signer(0x2), key_sha256=key(2))
    store.renew_agent(AGENT, NOW, agent_signer(0x3), key_sha256=key(3))
    attested(store, OTHER_AGENT, key_n=4)
    store.create_entry(child(WEB))
    store.issue_batch(AGENT, [BatchItem(WEB, key(5), signer(0x5))], NOW)
    assert store.evict_agent(AGENT, NOW) == [0x2, 0x3]
    assert store.evict_agent(AGENT, NOW + HOUR) == []  # twice: nothing left, the first time kept
    agent = store.get_agent(AGENT)
    assert agent is not None and agent.evicted_at == NOW
    revoked = {r.serial for r in store.revoked_unexpired(NOW)}
    assert revoked == {0x2, 0x3}  # not the expired one, not the other agent's, not the workload's
    other = store.get_agent(OTHER_AGENT)
    assert other is not None and not other.evicted


def test_evicting_an_unknown_agent_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match=rf"^node agent: {AGENT} never attested to this CA"):
        store.evict_agent(AGENT, NOW)


def test_renew_agent_needs_a_known_unevicted_agent_and_a_new_key(store: Store) -> None:
    with pytest.raises(AttestationError, match=rf"^node agent: {AGENT} is not known to this CA"):
        store.renew_agent(AGENT, NOW, agent_signer(), key_sha256=key(1))
    attested(store, key_n=1)
    with pytest.raises(InvalidRequestError, match=r"^CSR: its key was certified before"):
        store.renew_agent(AGENT, NOW, agent_signer(), key_sha256=key(1))
    later = NOW + datetime.timedelta(minutes=5)
    record, _ = store.renew_agent(AGENT, later, agent_signer(0x7, not_after=later + HOUR), key_sha256=key(2))
    assert (record.last_seen, record.expires_at, record.attestation) == (later, later + HOUR, "x509pop")
    store.evict_agent(AGENT, later)
    with pytest.raises(AttestationError, match=rf"^node agent: {AGENT} was evicted; it must attest again"):
        store.renew_agent(AGENT, later, agent_signer(), key_sha256=key(3))
    assert len(store.list_issued()) == 2


def test_attestation_refuses_a_key_certified_before(store: Store) -> None:
    attested(store, key_n=1)
    with pytest.raises(InvalidRequestError, match=r"^CSR: its key was certified before"):
        store.attest_agent(OTHER_AGENT, "x509pop", "CN=node-2", NOW, agent_signer(), key_sha256=key(1))
    store.add_agent_token(AGENT_TOKEN, OTHER_AGENT, NOW + HOUR)
    with pytest.raises(InvalidRequestError, match=r"^CSR: its key was certified before"):
        store.attest_agent_with_token(AGENT_TOKEN, NOW, agent_signer(), key_sha256=key(1))
    store.attest_agent_with_token(AGENT_TOKEN, NOW, agent_signer(), key_sha256=key(2))  # the token was not spent


def test_list_entries_for_agent_gives_its_own_only_and_notes_it_was_seen(store: Store) -> None:
    attested(store)
    attested(store, OTHER_AGENT, key_n=2)
    for e in (child(WEB), child(DB), child(WORKLOAD, OTHER_AGENT), entry(OTHER)):
        store.create_entry(e)
    later = NOW + datetime.timedelta(minutes=3)
    assert store.list_entries_for_agent(AGENT, later) == [child(DB), child(WEB)]
    agent = store.get_agent(AGENT)
    assert agent is not None and agent.last_seen == later
    store.evict_agent(AGENT, later)
    with pytest.raises(AttestationError, match="was evicted"):
        store.list_entries_for_agent(AGENT, later)


# -- batch issuance ------------------------------------------------------------------------------


class CountingDialect:
    """A dialect that counts the write transactions of the one it wraps (and whether they committed)."""

    def __init__(self, inner: Dialect) -> None:
        self.inner = inner
        self.name, self.schema, self.placeholder = inner.name, inner.schema, inner.placeholder
        self.for_update, self.for_share, self.restore_hint = inner.for_update, inner.for_share, inner.restore_hint
        self.writes = self.committed = self.reads = 0

    def run(self, work: Callable[[Connection], object], *, write: bool) -> object:
        self.writes += write
        self.reads += not write
        result = self.inner.run(work, write=write)
        self.committed += write
        return result

    def insert_if_absent(self, tx: Transaction, table: str, key: str, row: dict[str, object]) -> bool:
        return self.inner.insert_if_absent(tx, table, key, row)

    def prepare_migrations(self, tx: Transaction) -> None:
        self.inner.prepare_migrations(tx)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def counted(backend: Backend) -> Iterator[tuple[Store, CountingDialect]]:
    dialect = CountingDialect(backend.dialect())
    with contextlib.closing(SqlStore(dialect)) as store:  # type: ignore[arg-type]
        yield store, dialect


@pytest.mark.timeout(120)
def test_a_batch_of_200_is_one_write_transaction(counted: tuple[Store, CountingDialect]) -> None:
    store, dialect = counted
    attested(store)
    ids = [SpiffeId.parse(f"spiffe://example.org/ns/batch/sa/w{i}") for i in range(200)]
    for sid in ids:
        store.create_entry(child(sid))
    before = (dialect.writes, dialect.committed)
    outcomes = store.issue_batch(AGENT, [BatchItem(sid, key(i), signer()) for i, sid in enumerate(ids)], NOW)
    assert (dialect.writes - before[0], dialect.committed - before[1]) == (1, 1)
    assert [o[0].spiffe_id for o in outcomes if not isinstance(o, IssuanceError)] == ids
    assert sorted(str(r.spiffe_id) for r in store.list_issued() if r.spiffe_id != AGENT) == sorted(map(str, ids))


def test_batch_refuses_per_item_and_issues_the_rest(store: Store) -> None:
    attested(store, key_n=900)
    attested(store, OTHER_AGENT, key_n=901)
    store.create_entry(child(WEB))
    store.create_entry(child(DB))
    store.create_entry(child(WORKLOAD, OTHER_AGENT))
    store.create_entry(entry(OTHER))
    missing = SpiffeId.parse("spiffe://example.org/ns/prod/sa/nobody")
    items = [
        BatchItem(WEB, key(1), signer(0x1)),
        BatchItem(WORKLOAD, key(2), signer(0x2)),  # another agent's entry
        BatchItem(OTHER, key(3), signer(0x3)),  # an entry with no parent
        BatchItem(missing, key(4), signer(0x4)),  # no entry at all: the same answer
        BatchItem(WEB, key(5), signer(0x5)),  # asked twice
        BatchItem(DB, key(1), signer(0x6)),  # the key WEB got in this batch
        BatchItem(DB, key(900), signer(0x7)),  # the agent's own key
        BatchItem(DB, key(8), signer(0x8)),
    ]
    outcomes = store.issue_batch(AGENT, items, NOW)
    shown = [(type(o).__name__, str(o)) if isinstance(o, IssuanceError) else ("issued", o[1]) for o in outcomes]
    assert shown == [
        ("issued", f"cert 1 for {WEB}"),
        ("NotAuthorizedError", f"batch: {WORKLOAD} has no entry parented to {AGENT}"),
        ("NotAuthorizedError", f"batch: {OTHER} has no entry parented to {AGENT}"),
        ("NotAuthorizedError", f"batch: {missing} has no entry parented to {AGENT}"),
        ("InvalidRequestError", f"batch: {WEB} is asked for twice in one batch"),
        ("InvalidRequestError", "CSR: its key was certified before by this CA; make a new key for each SVID"),
        ("InvalidRequestError", "CSR: its key was certified before by this CA; make a new key for each SVID"),
        ("issued", f"cert 8 for {DB}"),
    ]
    workloads = {r.serial: r.spiffe_id for r in store.list_issued() if r.spiffe_id not in (AGENT, OTHER_AGENT)}
    assert workloads == {0x1: WEB, 0x8: DB}
    again = store.issue_batch(AGENT, [BatchItem(WEB, key(1), signer())], NOW)  # a key from an earlier batch
    assert isinstance(again[0], InvalidRequestError)


def test_batch_for_an_unknown_or_evicted_agent_writes_nothing(store: Store) -> None:
    store.create_entry(child(WEB))
    with pytest.raises(AttestationError, match="is not known to this CA"):
        store.issue_batch(AGENT, [BatchItem(WEB, key(1), signer())], NOW)
    attested(store)
    store.evict_agent(AGENT, NOW)
    with pytest.raises(AttestationError, match="was evicted"):
        store.issue_batch(AGENT, [BatchItem(WEB, key(1), signer())], NOW)
    assert [r.spiffe_id for r in store.list_issued()] == [AGENT]


def test_batch_that_fails_midway_records_nothing(store: Store) -> None:
    attested(store)
    ids = [SpiffeId.parse(f"spiffe://example.org/ns/batch/sa/w{i}") for i in range(5)]
    for sid in ids:
        store.create_entry(child(sid))
    items = [BatchItem(sid, key(i), signer()) for i, sid in enumerate(ids)]
    items[3] = BatchItem(ids[3], key(3), failing_sign)
    before = store.get_agent(AGENT)
    with pytest.raises(RuntimeError, match="HSM unavailable"):
        store.issue_batch(AGENT, items, NOW + HOUR)
    assert [r.spiffe_id for r in store.list_issued()] == [AGENT]
    assert store.get_agent(AGENT) == before  # not even last_seen
    # The keys were not recorded either: the same batch, signed, goes through.
    items[3] = BatchItem(ids[3], key(3), signer())
    assert not any(isinstance(o, IssuanceError) for o in store.issue_batch(AGENT, items, NOW))


def test_batch_signs_with_no_lock_held_and_an_eviction_meanwhile_wins(backend: Backend, store: Store) -> None:
    attested(store)
    store.create_entry(child(WEB))
    seen_while_signing: list[bool] = []

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        seen_while_signing.append(backend.agent_is_locked(str(AGENT)))
        return 0x51, NOW + HOUR, "signed"

    store.issue_batch(AGENT, [BatchItem(WEB, key(1), sign)], NOW)
    assert seen_while_signing == [False]  # the CA signs while others may write
    assert backend.agent_is_locked(str(AGENT)) is False

    def sign_and_be_evicted(e: Entry) -> tuple[int, datetime.datetime, object]:
        store.evict_agent(AGENT, NOW)  # an admin, while the CA signs: the batch's write sees it
        return 0x52, NOW + HOUR, "signed"

    issued = {r.serial for r in store.list_issued()}
    with pytest.raises(AttestationError, match="was evicted"):
        store.issue_batch(AGENT, [BatchItem(WEB, key(2), sign_and_be_evicted)], NOW)
    assert {r.serial for r in store.list_issued()} == issued  # 0x52 was never recorded


def test_batch_signs_again_for_an_entry_changed_while_it_signed(store: Store) -> None:
    attested(store)
    store.create_entry(child(WEB))
    seen: list[tuple[int, ...]] = []

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        seen.append(tuple(e.dns_names))
        if len(seen) == 1:  # the first time: the entry is re-created with a DNS name meanwhile
            store.delete_entry(WEB)
            store.create_entry(dataclasses.replace(child(WEB), dns_names=("web.example.org",)))
        return 0x60 + len(seen), NOW + HOUR, e

    (outcome,) = store.issue_batch(AGENT, [BatchItem(WEB, key(1), sign)], NOW)
    assert not isinstance(outcome, IssuanceError)
    assert seen == [(), ("web.example.org",)]
    assert outcome[0].dns_names == ("web.example.org",) and outcome[1] == outcome[0]
    assert 0x61 not in {r.serial for r in store.list_issued()} and 0x62 in {r.serial for r in store.list_issued()}


def test_batch_refuses_an_entry_reparented_while_it_signed(store: Store) -> None:
    attested(store)
    attested(store, OTHER_AGENT, key_n=2)
    store.create_entry(child(WEB))

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        store.delete_entry(WEB)
        store.create_entry(child(WEB, OTHER_AGENT))
        return 0x70, NOW + HOUR, "signed"

    (outcome,) = store.issue_batch(AGENT, [BatchItem(WEB, key(3), sign)], NOW)
    assert isinstance(outcome, NotAuthorizedError) and "has no entry parented to" in str(outcome)
    assert 0x70 not in {r.serial for r in store.list_issued()}


def test_batch_signs_again_when_a_serial_is_taken(store: Store) -> None:
    attested(store)
    ids = [SpiffeId.parse(f"spiffe://example.org/ns/batch/sa/w{i}") for i in range(3)]
    for sid in ids:
        store.create_entry(child(sid))
    serials = iter([0x80, 0x80, 0x81, 0x80, 0x82])  # w1 collides with w0 in the same statement, then is signed again

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        return next(serials), NOW + HOUR, "signed"

    outcomes = store.issue_batch(AGENT, [BatchItem(sid, key(i + 1), sign) for i, sid in enumerate(ids)], NOW)
    assert not any(isinstance(o, IssuanceError) for o in outcomes)
    by_id = {str(r.spiffe_id): r.serial for r in store.list_issued() if r.spiffe_id != AGENT}
    assert by_id == {str(ids[0]): 0x80, str(ids[1]): 0x82, str(ids[2]): 0x81}


def test_store_failure_in_a_batch_is_store_error_and_records_nothing(backend: Backend, store: Store) -> None:
    attested(store)
    store.create_entry(child(WEB))
    store.close()
    with pytest.raises(StoreError, match=message_of(backend, "closed$")):
        store.issue_batch(AGENT, [BatchItem(WEB, key(1), signer())], NOW)
    with contextlib.closing(open_store(backend.datastore)) as reopened:
        assert [r.spiffe_id for r in reopened.list_issued()] == [AGENT]


# -- renewal ---------------------------------------------------------------------------------------


def issued_serials(store: Store) -> set[int]:
    return {r.serial for r in store.list_issued()}


def test_a_renewal_is_one_read_and_one_write(counted: tuple[Store, CountingDialect]) -> None:
    store, dialect = counted
    store.create_entry(entry())
    store.record_issuance(WORKLOAD, NOW, signer(0x10))
    before = (dialect.reads, dialect.writes, dialect.committed)
    got, result, sequence = store.renew(WORKLOAD, 0x10, NOW, signer(0x11))
    assert (dialect.reads - before[0], dialect.writes - before[1], dialect.committed - before[2]) == (1, 1, 1)
    assert (got, result, sequence) == (entry(), f"cert 11 for {WORKLOAD}", store.bundle_sequence())
    assert issued_serials(store) == {0x10, 0x11}


def test_a_renewal_signs_with_no_lock_held(store: Store) -> None:
    store.create_entry(entry())

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        store.create_entry(entry(OTHER))  # another caller writes while the CA signs (a held lock would hang here)
        return 0x20, NOW + HOUR, "signed"

    assert store.renew(WORKLOAD, None, NOW, sign)[1] == "signed"
    assert store.get_entry(OTHER) == entry(OTHER) and issued_serials(store) == {0x20}


def test_a_renewal_by_a_revoked_svid_is_refused_and_records_nothing(store: Store) -> None:
    store.create_entry(entry())
    store.record_issuance(WORKLOAD, NOW, signer(0x30))
    store.revoke_serial(0x30, NOW)
    with pytest.raises(NotAuthorizedError, match=rf"^renewal: the SVID 30 of {WORKLOAD} is revoked$"):
        store.renew(WORKLOAD, 0x30, NOW, signer(0x31))
    assert issued_serials(store) == {0x30}


def test_a_revocation_while_the_ca_signs_refuses_the_renewal(store: Store) -> None:
    store.create_entry(entry())
    store.record_issuance(WORKLOAD, NOW, signer(0x40))

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        store.revoke_serial(0x40, NOW)  # an admin, while the CA signs: the write sees it
        return 0x41, NOW + HOUR, "signed"

    with pytest.raises(NotAuthorizedError, match=rf"^renewal: the SVID 40 of {WORKLOAD} is revoked$"):
        store.renew(WORKLOAD, 0x40, NOW, sign)
    assert issued_serials(store) == {0x40}  # 0x41 was never recorded


def test_a_renewal_signs_again_for_an_entry_changed_while_it_signed(store: Store) -> None:
    store.create_entry(entry())
    seen: list[tuple[str, ...]] = []

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        seen.append(tuple(e.dns_names))
        if len(seen) == 1:
            store.delete_entry(WORKLOAD)
            store.create_entry(entry(WORKLOAD, "payments.example.org"))
        return 0x50 + len(seen), NOW + HOUR, e

    got, result, _ = store.renew(WORKLOAD, None, NOW, sign)
    assert seen == [(), ("payments.example.org",)] and got == result == entry(WORKLOAD, "payments.example.org")
    assert issued_serials(store) == {0x52}


def test_a_renewal_whose_entry_went_while_it_signed_is_not_found(store: Store) -> None:
    store.create_entry(entry())

    def sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        store.delete_entry(WORKLOAD)
        return 0x60, NOW + HOUR, "signed"

    with pytest.raises(NotFoundError, match=rf"^registration entry: {WORKLOAD} not found$"):
        store.renew(WORKLOAD, None, NOW, sign)
    assert issued_serials(store) == set()


def test_a_renewal_of_an_entry_with_a_parent_is_refused(store: Store) -> None:
    attested(store)
    store.create_entry(child(WEB))
    with pytest.raises(NotAuthorizedError, match=rf"^registration entry: {WEB} is served by node agent {AGENT}"):
        store.renew(WEB, None, NOW, signer())
    assert [r.spiffe_id for r in store.list_issued()] == [AGENT]


def test_a_renewal_signs_again_when_its_serial_is_taken(store: Store) -> None:
    store.create_entry(entry())
    store.record_issuance(WORKLOAD, NOW, signer(0x70))
    assert store.renew(WORKLOAD, 0x70, NOW, signer(0x70, 0x71))[1] == f"cert 71 for {WORKLOAD}"
    assert issued_serials(store) == {0x70, 0x71}


def test_jwt_keys_published_by_every_ca_on_the_store(backend: Backend) -> None:
    """Issue #16: each replica publishes its JWT keys; the bundle sequence grows when the set changes."""
    later = NOW + datetime.timedelta(minutes=15)
    with (
        contextlib.closing(open_store(backend.datastore)) as one,
        contextlib.closing(open_store(backend.datastore)) as two,
    ):
        assert one.jwt_keys(NOW) == []
        assert one.publish_jwt_keys([("kidA", b"der-a", later)], NOW)
        assert one.bundle_sequence() == 1
        assert not one.publish_jwt_keys([("kidA", b"der-a", later + HOUR)], NOW)  # renewed: same set, same sequence
        assert two.publish_jwt_keys([("kidB", b"der-b", later)], NOW)
        assert one.jwt_keys(NOW) == [("kidA", b"der-a"), ("kidB", b"der-b")]
        assert two.bundle_sequence() == 2
        assert not two.publish_jwt_keys([("kidA", b"another key", later)], NOW)  # a kid keeps its key
        assert dict(one.jwt_keys(NOW))["kidA"] == b"der-a"
        # kidB was published until `later`: past it, it is gone, and dropping it grows the sequence.
        assert one.jwt_keys(later) == [("kidA", b"der-a")]
        assert one.publish_jwt_keys([], later)
        assert one.bundle_sequence() == 3
        assert two.jwt_keys(NOW) == [("kidA", b"der-a")]
