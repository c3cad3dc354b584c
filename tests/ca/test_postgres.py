"""PostgresStore on a real PostgreSQL server: the behaviour SqliteStore has (every Store method,
one-transaction issuance, migrations, errors), and what replicas sharing one database rely on:
a token consumed once, unique serials and gapless counters across replicas, migrations applied
once when replicas start together, and pooled connections that survive the server dropping them."""

from __future__ import annotations

import datetime
import itertools
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from meshid.ca import migrations
from meshid.ca.postgres import PostgresStore
from meshid.ca.store import Entry, IssuedRecord, Signer
from meshid.errors import AlreadyExistsError, NotFoundError, StoreError, TokenError
from meshid.spiffeid import SpiffeId
from pg import create_database, running_postgres

pytestmark = pytest.mark.timeout(120)

NOW = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/payments")
OTHER = SpiffeId.parse("spiffe://example.org/ns/prod/sa/frontend")
TOKEN = bytes.fromhex("11" * 32)
_databases = itertools.count()


def entry(spiffe_id: SpiffeId = WORKLOAD, *dns_names: str) -> Entry:
    return Entry(spiffe_id, dns_names, datetime.timedelta(minutes=30), NOW)


def signer(*serials: int, not_after: datetime.datetime = NOW + HOUR) -> Signer:
    """Signs with the given serials in turn (or random ones once they run out); the result names the serial."""
    queue = list(serials)

    def sign(entry: Entry) -> tuple[int, datetime.datetime, object]:
        serial = queue.pop(0) if queue else secrets.randbits(159) | 1
        return serial, not_after, f"cert {serial:x} for {entry.spiffe_id}"

    return sign


def failing_sign(entry: Entry) -> tuple[int, datetime.datetime, object]:
    raise RuntimeError("HSM unavailable")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL for the whole session; each test gets its own database on it."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


@pytest.fixture
def dsn(server: str) -> str:
    return create_database(server, f"test_{next(_databases)}")


@pytest.fixture
def store(dsn: str) -> Iterator[PostgresStore]:
    with PostgresStore(dsn) as store:
        yield store


@pytest.fixture
def with_token(store: PostgresStore) -> PostgresStore:
    store.create_entry(entry(WORKLOAD, "payments.local"))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    return store


def query(dsn: str, statement: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


def schema_versions(dsn: str) -> list[int]:
    return [int(str(row[0])) for row in query(dsn, "SELECT version FROM schema_version ORDER BY version")]


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- entries -----------------------------------------------------------------------------------


def test_entry_round_trips(store: PostgresStore) -> None:
    e = entry(WORKLOAD, "payments.local", "payments.prod.svc")
    store.create_entry(e)
    assert store.get_entry(WORKLOAD) == e
    assert store.get_entry(OTHER) is None
    got = store.get_entry(WORKLOAD)
    assert got is not None and got.created_at.tzinfo == datetime.UTC


def test_list_entries_is_in_byte_order_and_counted(store: PostgresStore) -> None:
    assert store.list_entries() == [] and store.count_entries() == 0
    upper = SpiffeId.parse("spiffe://example.org/ns/prod/sa/Zeta")
    for spiffe_id in (WORKLOAD, upper, OTHER):
        store.create_entry(entry(spiffe_id))
    # Byte order, as SQLite sorts: "Z" before "f", whatever the server's locale would say.
    assert [e.spiffe_id for e in store.list_entries()] == [upper, OTHER, WORKLOAD]
    assert store.count_entries() == 3


def test_create_entry_twice_is_already_exists(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(AlreadyExistsError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments already exists"):
        store.create_entry(entry(WORKLOAD, "changed.local"))
    assert store.get_entry(WORKLOAD) == entry(WORKLOAD)


def test_delete_entry_removes_its_unused_tokens(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    assert store.delete_entry(WORKLOAD) is True
    assert store.delete_entry(WORKLOAD) is False
    assert store.get_entry(WORKLOAD) is None
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(TokenError, match=r"^join token: unknown"):
        store.issue_with_token(TOKEN, NOW, signer())


def test_delete_entry_keeps_used_tokens_spent_and_certificates(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.issue_with_token(TOKEN, NOW, signer(0xA1))
    store.delete_entry(WORKLOAD)
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(TokenError, match="already used"):
        store.issue_with_token(TOKEN, NOW, signer())
    assert store.revoke_spiffe_id(WORKLOAD, NOW) == [0xA1]


def test_add_token_without_entry_is_not_found(store: PostgresStore) -> None:
    with pytest.raises(NotFoundError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments not found"):
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)


def test_add_token_twice_is_already_exists(with_token: PostgresStore) -> None:
    with pytest.raises(AlreadyExistsError, match=r"^join token:") as info:
        with_token.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    assert TOKEN.hex() not in str(info.value)


def test_naive_datetime_is_refused(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_token(TOKEN, WORKLOAD, datetime.datetime(2030, 1, 1))


# -- issuance ----------------------------------------------------------------------------------


def test_issue_with_token_records_certificate(with_token: PostgresStore) -> None:
    got_entry, result = with_token.issue_with_token(TOKEN, NOW, signer(0xBEEF))
    assert got_entry == entry(WORKLOAD, "payments.local")
    assert result == f"cert beef for {WORKLOAD}"
    assert with_token.get_issued(0xBEEF) == IssuedRecord(0xBEEF, WORKLOAD, NOW + HOUR, NOW)
    assert with_token.get_issued(0xBEEE) is None


def test_token_is_single_use(with_token: PostgresStore) -> None:
    with_token.issue_with_token(TOKEN, NOW, signer())
    with pytest.raises(TokenError, match=r"^join token: already used") as info:
        with_token.issue_with_token(TOKEN, NOW, signer())
    assert TOKEN.hex() not in str(info.value) and str(WORKLOAD) not in str(info.value)
    assert len(with_token.list_issued()) == 1


def test_unknown_token_is_refused(with_token: PostgresStore) -> None:
    with pytest.raises(TokenError, match=r"^join token: unknown") as info:
        with_token.issue_with_token(b"\x22" * 32, NOW, signer())
    assert "22" * 32 not in str(info.value)
    assert with_token.list_issued() == []


def test_expired_token_is_refused_and_nothing_written(with_token: PostgresStore) -> None:
    with pytest.raises(TokenError, match=r"^join token: expired") as info:
        with_token.issue_with_token(TOKEN, NOW + HOUR, signer())
    assert TOKEN.hex() not in str(info.value)
    assert with_token.list_issued() == []
    with_token.issue_with_token(TOKEN, NOW + HOUR - datetime.timedelta(seconds=1), signer())


def test_signer_failure_leaves_token_usable_and_nothing_recorded(with_token: PostgresStore) -> None:
    with pytest.raises(RuntimeError, match="HSM unavailable"):
        with_token.issue_with_token(TOKEN, NOW, failing_sign)
    assert with_token.list_issued() == []
    with_token.issue_with_token(TOKEN, NOW, signer(0x77))
    assert [r.serial for r in with_token.list_issued()] == [0x77]


def test_serial_collision_signs_again_never_reusing_a_serial(store: PostgresStore) -> None:
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


def test_serial_collision_every_time_is_store_error(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.record_issuance(WORKLOAD, NOW, signer(0x1234))
    with pytest.raises(StoreError, match=r"^CA store postgresql://.*already recorded serial 3 times"):
        store.issue_with_token(TOKEN, NOW, signer(0x1234, 0x1234, 0x1234))
    assert len(store.list_issued()) == 1
    store.issue_with_token(TOKEN, NOW, signer())  # the token was not consumed


def test_serials_of_160_bits_round_trip(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    big = (1 << 160) - 1
    store.record_issuance(WORKLOAD, NOW, signer(big))
    record = store.get_issued(big)
    assert record is not None and record.serial == big


def test_times_past_2038_round_trip(store: PostgresStore) -> None:
    # Unix seconds beyond 2**31: a 32-bit column would overflow.
    far = datetime.datetime(2200, 1, 1, tzinfo=datetime.UTC)
    store.create_entry(Entry(WORKLOAD, (), datetime.timedelta(days=36500), far))
    store.add_token(TOKEN, WORKLOAD, far + HOUR)
    store.issue_with_token(TOKEN, far, signer(0x9, not_after=far + HOUR))
    assert store.get_issued(0x9) == IssuedRecord(0x9, WORKLOAD, far + HOUR, far)
    assert store.get_entry(WORKLOAD) == Entry(WORKLOAD, (), datetime.timedelta(days=36500), far)


def test_signer_serial_that_is_not_positive_is_refused(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(ValueError, match="positive 160-bit"):
        store.record_issuance(WORKLOAD, NOW, signer(0))
    with pytest.raises(ValueError, match="positive 160-bit"):
        store.record_issuance(WORKLOAD, NOW, signer(1 << 160))
    assert store.list_issued() == []


def test_record_issuance_without_entry_is_not_found(store: PostgresStore) -> None:
    with pytest.raises(NotFoundError, match=r"^registration entry: .* not found"):
        store.record_issuance(WORKLOAD, NOW, signer())
    assert store.list_issued() == []


def test_list_issued_is_oldest_first(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.create_entry(entry(OTHER))
    store.record_issuance(OTHER, NOW + HOUR, signer(0x2, not_after=NOW + 2 * HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x3))
    assert store.list_issued() == [
        IssuedRecord(0x3, WORKLOAD, NOW + HOUR, NOW),
        IssuedRecord(0x2, OTHER, NOW + 2 * HOUR, NOW + HOUR),
    ]


# -- revocation --------------------------------------------------------------------------------


def test_revoke_serial_keeps_the_first_time(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.record_issuance(WORKLOAD, NOW, signer(0xA))
    assert store.revoke_serial(0xA, NOW + datetime.timedelta(minutes=1)) is True
    assert store.revoke_serial(0xA, NOW + datetime.timedelta(minutes=2)) is True
    assert store.revoke_serial(0xB, NOW) is False
    record = store.get_issued(0xA)
    assert record is not None and record.revoked_at == NOW + datetime.timedelta(minutes=1)


def test_revoke_spiffe_id_revokes_only_unexpired_unrevoked(store: PostgresStore) -> None:
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


def test_revoked_unexpired_excludes_expired_and_unrevoked(store: PostgresStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.record_issuance(WORKLOAD, NOW, signer(0x1, not_after=NOW + HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x2, not_after=NOW + 3 * HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x3, not_after=NOW + 3 * HOUR))
    store.revoke_serial(0x1, NOW)
    store.revoke_serial(0x2, NOW)
    assert [r.serial for r in store.revoked_unexpired(NOW)] == [0x1, 0x2]
    assert [r.serial for r in store.revoked_unexpired(NOW + 2 * HOUR)] == [0x2]
    assert store.revoked_unexpired(NOW + 4 * HOUR) == []


# -- counters and reconnecting -----------------------------------------------------------------


def test_crl_number_increases_and_survives_reconnecting(dsn: str) -> None:
    with PostgresStore(dsn) as store:
        assert [store.next_crl_number() for _ in range(3)] == [1, 2, 3]
    with PostgresStore(dsn) as store:
        assert store.next_crl_number() == 4


def test_bundle_sequence_increases_and_survives_reconnecting(dsn: str) -> None:
    with PostgresStore(dsn) as store:
        assert store.bundle_sequence() == 0
        assert store.bump_bundle_sequence() == 1
        assert store.bump_bundle_sequence() == 2
        assert store.bundle_sequence() == 2
    with PostgresStore(dsn) as store:
        assert store.bundle_sequence() == 2
        assert store.bump_bundle_sequence() == 3


def test_data_survives_close_and_reconnect(dsn: str) -> None:
    with PostgresStore(dsn) as store:
        store.create_entry(entry(WORKLOAD, "payments.local"))
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
        store.record_issuance(WORKLOAD, NOW, signer(0xC0FFEE))
        store.revoke_serial(0xC0FFEE, NOW)
    with PostgresStore(dsn) as store:
        assert store.list_entries() == [entry(WORKLOAD, "payments.local")]
        assert store.list_issued() == [IssuedRecord(0xC0FFEE, WORKLOAD, NOW + HOUR, NOW, NOW)]
        store.issue_with_token(TOKEN, NOW, signer())


def test_closed_store_is_store_error(store: PostgresStore) -> None:
    store.check()
    store.close()
    store.close()
    with pytest.raises(StoreError, match=r"^CA store postgresql://meshid@127\.0\.0\.1:\d+/test_\d+: closed"):
        store.check()


def test_connections_the_server_dropped_are_replaced(dsn: str, server: str) -> None:
    with PostgresStore(dsn, pool_size=2) as store:
        store.create_entry(entry(OTHER))
        # Two pooled connections: one held by an issuance that waits while the other is used.
        release = threading.Event()

        def held_sign(e: Entry) -> tuple[int, datetime.datetime, object]:
            assert release.wait(10)
            return 0x1, NOW + HOUR, None

        holder = threading.Thread(target=store.record_issuance, args=(OTHER, NOW, held_sign))
        holder.start()
        store.check()
        release.set()
        holder.join()
        killed = query(
            server,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            dsn.rsplit("/", 1)[1],
        )
        assert len(killed) == 2
        store.create_entry(entry(WORKLOAD))
        assert store.count_entries() == 2


# -- migrations --------------------------------------------------------------------------------


def test_both_dialects_have_the_same_migrations() -> None:
    sqlite, postgres = migrations.statements("sqlite"), migrations.statements("postgres")
    assert [len(m) for m in sqlite] == [len(m) for m in postgres] and len(sqlite) == migrations.latest_version()
    assert "BIGINT" in postgres[0][0] and "BYTEA" in postgres[0][1] and "BLOB" in sqlite[0][1]
    with pytest.raises(ValueError, match="unknown SQL dialect"):
        migrations.statements("oracle")  # type: ignore[arg-type]


def test_times_and_counters_are_64_bit_columns(store: PostgresStore, dsn: str) -> None:
    rows = query(
        dsn,
        "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND data_type LIKE '%%int%%'",
    )
    columns = {str(name): str(kind) for name, kind in rows}
    assert columns.pop("schema_version.version") == "integer"
    assert columns and set(columns.values()) == {"bigint"}, columns


def test_reconnecting_does_not_rerun_migrations(dsn: str) -> None:
    with PostgresStore(dsn) as store:
        store.next_crl_number()
    versions = schema_versions(dsn)
    assert versions == list(range(1, migrations.latest_version() + 1))
    with PostgresStore(dsn) as store:
        assert store.next_crl_number() == 2
    assert schema_versions(dsn) == versions


def test_replicas_starting_together_migrate_once(dsn: str) -> None:
    stores: list[PostgresStore] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def start(i: int) -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore(dsn, pool_size=1))
        except BaseException as err:
            failures.append(err)

    run_threads(8, start)
    for store in stores:
        store.close()
    assert failures == []
    assert schema_versions(dsn) == list(range(1, migrations.latest_version() + 1))


def test_database_from_newer_meshid_is_refused(dsn: str) -> None:
    PostgresStore(dsn).close()
    newer = max(schema_versions(dsn)) + 1
    query(dsn, "INSERT INTO schema_version (version) VALUES (%s)", newer)
    with pytest.raises(StoreError, match=rf"^CA store postgresql://.*: schema version {newer} is newer than this meshid"):
        PostgresStore(dsn)


# -- errors ------------------------------------------------------------------------------------


def test_unreachable_server_is_store_error() -> None:
    dsn = f"postgresql://meshid@127.0.0.1:{closed_port()}/meshid"
    started = time.monotonic()
    with pytest.raises(StoreError, match=rf"^CA store {dsn}: .*; check that the server is running") as info:
        PostgresStore(dsn, connect_timeout=2)
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert time.monotonic() - started < 10


def test_missing_database_is_store_error_without_the_password(server: str) -> None:
    dsn = server.replace("meshid@", "meshid:hunter2-secret@").rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(StoreError, match=r"^CA store postgresql://meshid@127\.0\.0\.1:\d+/no_such_db: .*does not exist; check that the server is running") as info:
        PostgresStore(dsn)
    assert "hunter2" not in str(info.value)


def test_password_is_never_shown(dsn: str) -> None:
    url = dsn.replace("meshid@", "meshid:hunter2%2Fsecret@") + "?application_name=ca&password=other-secret"
    with PostgresStore(url) as store:
        assert "secret" not in repr(store) and "hunter2" not in repr(store)
        assert "application_name=ca" in repr(store)
    host, port = dsn.split("@", 1)[1].split("/", 1)[0].split(":")
    keywords = f"host={host} port={port} dbname={dsn.rsplit('/', 1)[1]} user=meshid password=hunter2"
    with PostgresStore(keywords) as store:
        assert "hunter2" not in repr(store) and f"port={port}" in repr(store)
    with pytest.raises(ValueError, match="cannot be parsed") as info:
        PostgresStore("host=x password=hunter2 broken")
    assert "hunter2" not in str(info.value) and info.value.__cause__ is None


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="needs a PostgreSQL DSN"):
        PostgresStore("")
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore("postgresql://meshid@127.0.0.1/meshid", pool_size=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        PostgresStore("postgresql://meshid@127.0.0.1/meshid", connect_timeout=0)


# -- replicas on one database ------------------------------------------------------------------


@pytest.fixture
def replicas(dsn: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    with PostgresStore(dsn, pool_size=8) as one, PostgresStore(dsn, pool_size=8) as two:
        yield one, two


@pytest.mark.timeout(60)
def test_replicas_racing_on_one_token_issue_once(replicas: tuple[PostgresStore, PostgresStore]) -> None:
    one, two = replicas
    one.create_entry(entry(WORKLOAD))
    rounds, racers = 50, 16
    for round_ in range(rounds):
        token = round_.to_bytes(32, "big")
        one.add_token(token, WORKLOAD, NOW + HOUR)
        barrier = threading.Barrier(racers)
        outcomes: list[object] = [None] * racers

        def issue(i: int, token: bytes = token, barrier: threading.Barrier = barrier, outcomes: list[object] = outcomes) -> None:
            store = replicas[i % 2]
            barrier.wait()
            try:
                outcomes[i] = store.issue_with_token(token, NOW, signer())[1]
            except TokenError as err:
                outcomes[i] = err

        run_threads(racers, issue)
        wins = [o for o in outcomes if isinstance(o, str)]
        refusals = [o for o in outcomes if isinstance(o, TokenError)]
        assert len(wins) == 1, f"round {round_}: {outcomes}"
        assert len(refusals) == racers - 1 and all("already used" in str(o) for o in refusals)
    issued = two.list_issued()
    assert len(issued) == rounds and len({r.serial for r in issued}) == rounds


def test_replica_waits_for_an_issuance_in_flight_then_finds_the_token_used(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    one, two = replicas
    one.create_entry(entry(WORKLOAD))
    one.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    signing = threading.Event()

    def slow_sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        signing.set()
        time.sleep(0.5)
        return 0x51, NOW + HOUR, "first"

    first = threading.Thread(target=one.issue_with_token, args=(TOKEN, NOW, slow_sign))
    first.start()
    assert signing.wait(10)
    started = time.monotonic()
    with pytest.raises(TokenError, match="already used"):
        two.issue_with_token(TOKEN, NOW, signer())
    first.join()
    assert time.monotonic() - started > 0.2  # it waited for the row lock
    assert [r.serial for r in two.list_issued()] == [0x51]


def test_replicas_signing_the_same_serial_record_it_once(replicas: tuple[PostgresStore, PostgresStore]) -> None:
    replicas[0].create_entry(entry(WORKLOAD))
    barrier = threading.Barrier(8)
    results: list[object] = [None] * 8

    def issue(i: int) -> None:
        barrier.wait()
        results[i] = replicas[i % 2].record_issuance(WORKLOAD, NOW, signer(0x42))[1]

    run_threads(8, issue)
    issued = replicas[1].list_issued()
    assert len(issued) == 8 and len({r.serial for r in issued}) == 8
    assert sum(r.serial == 0x42 for r in issued) == 1
    assert sorted(str(r) for r in results) == sorted(f"cert {r.serial:x} for {WORKLOAD}" for r in issued)


def test_replicas_share_gapless_counters(replicas: tuple[PostgresStore, PostgresStore]) -> None:
    seen: list[list[int]] = [[] for _ in range(16)]

    def bump(i: int) -> None:
        seen[i] = [replicas[i % 2].next_crl_number() for _ in range(25)]

    run_threads(16, bump)
    assert all(got == sorted(got) for got in seen)  # monotonic as each caller sees it
    assert sorted(n for got in seen for n in got) == list(range(1, 16 * 25 + 1))
    assert replicas[0].bump_bundle_sequence() == 1 and replicas[1].bump_bundle_sequence() == 2

