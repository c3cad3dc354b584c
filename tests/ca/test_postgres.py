"""PostgresStore's own behaviour, beyond the contract every store keeps (test_store_contract.py):
64-bit columns, pooled connections that survive the server dropping them, the DSN's password
never shown, and what replicas sharing one database rely on: a token consumed once (a replica
waits for the row lock of an issuance in flight), unique serials and gapless counters across
replicas, and migrations applied once when replicas start together."""

from __future__ import annotations

import datetime
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from meshid.ca.store import Entry, PostgresStore, Signer, migrations
from meshid.errors import StoreError, TokenError
from pg import new_database, query, running_postgres
from stores import HOUR, NOW, OTHER, TOKEN, WORKLOAD, entry, run_threads, signer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL for the whole session; each test gets its own database on it."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


@pytest.fixture
def dsn(server: str) -> str:
    return new_database(server)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_times_and_counters_are_64_bit_columns(dsn: str) -> None:
    PostgresStore(dsn).close()
    rows = query(
        dsn,
        "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND data_type LIKE '%%int%%'",
    )
    columns = {str(name): str(kind) for name, kind in rows}
    assert columns.pop("schema_version.version") == "integer"
    assert columns and set(columns.values()) == {"bigint"}, columns


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
    versions = [row[0] for row in query(dsn, "SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, migrations.latest_version() + 1))


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


def lock_waits(dsn: str) -> list[tuple[str, str]]:
    """(what it runs, the state of the session it waits for) of each session of ``dsn``'s database
    that waits for a lock another session holds."""
    return query(
        dsn,
        "SELECT waiter.query, holder.state FROM pg_stat_activity AS waiter"
        " JOIN pg_stat_activity AS holder ON holder.pid = ANY (pg_blocking_pids(waiter.pid))"
        " WHERE waiter.datname = current_database() AND waiter.wait_event_type = 'Lock'",
    )


def test_replica_waits_for_an_issuance_in_flight_then_finds_the_token_used(
    replicas: tuple[PostgresStore, PostgresStore], dsn: str
) -> None:
    # Proved by the order of events, not by time: the first replica holds the token while it
    # signs; the second is seen waiting for that lock; only then does the first finish.
    one, two = replicas
    one.create_entry(entry(WORKLOAD))
    one.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    events: list[str] = []
    outcomes: dict[str, object] = {}
    signing, release = threading.Event(), threading.Event()

    def held_sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        signing.set()
        assert release.wait(30)
        events.append("the first signs")
        return 0x51, NOW + HOUR, "first"

    def second_sign(e: Entry) -> tuple[int, datetime.datetime, object]:
        events.append("the second signs")
        return 0x52, NOW + HOUR, "second"

    def attempt(name: str, store: PostgresStore, sign: Signer) -> None:
        try:
            outcomes[name] = store.issue_with_token(TOKEN, NOW, sign)[1]
        except TokenError as err:
            outcomes[name] = err

    first = threading.Thread(target=attempt, args=("first", one, held_sign))
    first.start()
    try:
        assert signing.wait(10)
        second = threading.Thread(target=attempt, args=("second", two, second_sign))
        second.start()
        deadline = time.monotonic() + 10  # a bound on a hang, not part of the proof
        while not (waits := lock_waits(dsn)):
            assert second.is_alive(), f"the second replica finished while the first held the token: {outcomes}"
            assert time.monotonic() < deadline, "the second replica never waited for the token's lock"
            time.sleep(0.01)
        events.append("the second waits for the lock")
        [(waiting_query, holder_state)] = waits
        assert "FROM tokens WHERE hash" in waiting_query and "FOR UPDATE" in waiting_query, waiting_query
        assert holder_state == "idle in transaction"  # the first, inside sign
    finally:
        release.set()
        first.join()
    second.join()
    assert events == ["the second waits for the lock", "the first signs"]
    assert outcomes["first"] == "first"
    assert isinstance(outcomes["second"], TokenError) and "already used" in str(outcomes["second"])
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
