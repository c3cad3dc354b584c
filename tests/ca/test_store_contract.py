"""What every CA store promises, run once per dialect (SQLite file, PostgreSQL database): every
Store method, the one-transaction issuance rules, the token locked while it is signed for,
counters and records that outlive the store object, and the schema's migrations.

Every store is built by one fixture, ``store``, through :func:`meshid.ca.store.open_store`, the
way the CA opens it. What only one dialect does is in test_sqlite.py and test_postgres.py.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from meshid.ca.store import Entry, IssuedRecord, Store, migrations, open_store
from meshid.errors import AlreadyExistsError, NotFoundError, StoreError, TokenError
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
    with pytest.raises(AlreadyExistsError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments already exists"):
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
