"""SqliteStore on real SQLite files: every Store method, the one-transaction issuance rules, the
schema migrations, the errors a broken database raises, threads, and durability across kill -9."""

from __future__ import annotations

import datetime
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshid.ca.sqlite import SqliteStore
from meshid.ca.store import Entry, IssuedRecord, Signer
from meshid.errors import AlreadyExistsError, NotFoundError, StoreError, TokenError
from meshid.spiffeid import SpiffeId

NOW = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/payments")
OTHER = SpiffeId.parse("spiffe://example.org/ns/prod/sa/frontend")
TOKEN = bytes.fromhex("11" * 32)


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


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ca.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteStore]:
    with SqliteStore(db) as store:
        yield store


@pytest.fixture
def with_token(store: SqliteStore) -> SqliteStore:
    store.create_entry(entry(WORKLOAD, "payments.local"))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    return store


def schema_versions(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    try:
        return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    finally:
        conn.close()


# -- entries -----------------------------------------------------------------------------------


def test_entry_round_trips(store: SqliteStore) -> None:
    e = entry(WORKLOAD, "payments.local", "payments.prod.svc")
    store.create_entry(e)
    assert store.get_entry(WORKLOAD) == e
    assert store.get_entry(OTHER) is None
    got = store.get_entry(WORKLOAD)
    assert got is not None and got.created_at.tzinfo == datetime.UTC


def test_list_and_count_entries(store: SqliteStore) -> None:
    assert store.list_entries() == [] and store.count_entries() == 0
    store.create_entry(entry(WORKLOAD))
    store.create_entry(entry(OTHER, "frontend.local"))
    assert store.list_entries() == [entry(OTHER, "frontend.local"), entry(WORKLOAD)]
    assert store.count_entries() == 2


def test_create_entry_twice_is_already_exists(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(AlreadyExistsError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments already exists"):
        store.create_entry(entry(WORKLOAD, "changed.local"))
    assert store.get_entry(WORKLOAD) == entry(WORKLOAD)


def test_delete_entry_removes_its_unused_tokens(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    assert store.delete_entry(WORKLOAD) is True
    assert store.delete_entry(WORKLOAD) is False
    assert store.get_entry(WORKLOAD) is None
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(TokenError, match=r"^join token: unknown"):
        store.issue_with_token(TOKEN, NOW, signer())


def test_delete_entry_keeps_used_tokens_spent_and_certificates(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.issue_with_token(TOKEN, NOW, signer(0xA1))
    store.delete_entry(WORKLOAD)
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(TokenError, match="already used"):
        store.issue_with_token(TOKEN, NOW, signer())
    assert store.revoke_spiffe_id(WORKLOAD, NOW) == [0xA1]


def test_add_token_without_entry_is_not_found(store: SqliteStore) -> None:
    with pytest.raises(NotFoundError, match=r"^registration entry: spiffe://example.org/ns/prod/sa/payments not found"):
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)


def test_add_token_twice_is_already_exists(with_token: SqliteStore) -> None:
    with pytest.raises(AlreadyExistsError, match=r"^join token:") as info:
        with_token.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    assert TOKEN.hex() not in str(info.value)


def test_naive_datetime_is_refused(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_token(TOKEN, WORKLOAD, datetime.datetime(2030, 1, 1))


def test_in_memory_database_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a file"):
        SqliteStore(":memory:")


# -- issuance ----------------------------------------------------------------------------------


def test_issue_with_token_records_certificate(with_token: SqliteStore) -> None:
    got_entry, result = with_token.issue_with_token(TOKEN, NOW, signer(0xBEEF))
    assert got_entry == entry(WORKLOAD, "payments.local")
    assert result == f"cert beef for {WORKLOAD}"
    assert with_token.get_issued(0xBEEF) == IssuedRecord(0xBEEF, WORKLOAD, NOW + HOUR, NOW)
    assert with_token.get_issued(0xBEEE) is None


def test_token_is_single_use(with_token: SqliteStore) -> None:
    with_token.issue_with_token(TOKEN, NOW, signer())
    with pytest.raises(TokenError, match=r"^join token: already used") as info:
        with_token.issue_with_token(TOKEN, NOW, signer())
    assert TOKEN.hex() not in str(info.value) and str(WORKLOAD) not in str(info.value)
    assert len(with_token.list_issued()) == 1


def test_unknown_token_is_refused(with_token: SqliteStore) -> None:
    with pytest.raises(TokenError, match=r"^join token: unknown") as info:
        with_token.issue_with_token(b"\x22" * 32, NOW, signer())
    assert "22" * 32 not in str(info.value)
    assert with_token.list_issued() == []


def test_expired_token_is_refused_and_nothing_written(with_token: SqliteStore) -> None:
    with pytest.raises(TokenError, match=r"^join token: expired") as info:
        with_token.issue_with_token(TOKEN, NOW + HOUR, signer())
    assert TOKEN.hex() not in str(info.value)
    assert with_token.list_issued() == []
    # Not consumed either: a moment before expiry it is still good.
    with_token.issue_with_token(TOKEN, NOW + HOUR - datetime.timedelta(seconds=1), signer())


def test_signer_failure_leaves_token_usable_and_nothing_recorded(with_token: SqliteStore) -> None:
    with pytest.raises(RuntimeError, match="HSM unavailable"):
        with_token.issue_with_token(TOKEN, NOW, failing_sign)
    assert with_token.list_issued() == []
    with_token.issue_with_token(TOKEN, NOW, signer(0x77))
    assert [r.serial for r in with_token.list_issued()] == [0x77]


def test_serial_collision_signs_again_never_reusing_a_serial(store: SqliteStore) -> None:
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


def test_serial_collision_every_time_is_store_error(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
    store.record_issuance(WORKLOAD, NOW, signer(0x1234))
    with pytest.raises(StoreError, match="already recorded serial 3 times"):
        store.issue_with_token(TOKEN, NOW, signer(0x1234, 0x1234, 0x1234))
    assert len(store.list_issued()) == 1
    store.issue_with_token(TOKEN, NOW, signer())  # the token was not consumed


def test_serials_of_160_bits_round_trip(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    big = (1 << 160) - 1
    store.record_issuance(WORKLOAD, NOW, signer(big))
    record = store.get_issued(big)
    assert record is not None and record.serial == big


def test_signer_serial_that_is_not_positive_is_refused(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    with pytest.raises(ValueError, match="positive 160-bit"):
        store.record_issuance(WORKLOAD, NOW, signer(0))
    with pytest.raises(ValueError, match="positive 160-bit"):
        store.record_issuance(WORKLOAD, NOW, signer(1 << 160))
    assert store.list_issued() == []


def test_record_issuance_without_entry_is_not_found(store: SqliteStore) -> None:
    with pytest.raises(NotFoundError, match=r"^registration entry: .* not found"):
        store.record_issuance(WORKLOAD, NOW, signer())
    assert store.list_issued() == []


def test_list_issued_is_oldest_first(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.create_entry(entry(OTHER))
    store.record_issuance(OTHER, NOW + HOUR, signer(0x2, not_after=NOW + 2 * HOUR))
    store.record_issuance(WORKLOAD, NOW, signer(0x3))
    assert store.list_issued() == [
        IssuedRecord(0x3, WORKLOAD, NOW + HOUR, NOW),
        IssuedRecord(0x2, OTHER, NOW + 2 * HOUR, NOW + HOUR),
    ]


# -- revocation --------------------------------------------------------------------------------


def test_revoke_serial_keeps_the_first_time(store: SqliteStore) -> None:
    store.create_entry(entry(WORKLOAD))
    store.record_issuance(WORKLOAD, NOW, signer(0xA))
    assert store.revoke_serial(0xA, NOW + datetime.timedelta(minutes=1)) is True
    assert store.revoke_serial(0xA, NOW + datetime.timedelta(minutes=2)) is True
    assert store.revoke_serial(0xB, NOW) is False
    record = store.get_issued(0xA)
    assert record is not None and record.revoked_at == NOW + datetime.timedelta(minutes=1)


def test_revoke_spiffe_id_revokes_only_unexpired_unrevoked(store: SqliteStore) -> None:
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


def test_revoked_unexpired_excludes_expired_and_unrevoked(store: SqliteStore) -> None:
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


def test_crl_number_increases_and_survives_reopening(db: Path) -> None:
    with SqliteStore(db) as store:
        assert [store.next_crl_number() for _ in range(3)] == [1, 2, 3]
    with SqliteStore(db) as store:
        assert store.next_crl_number() == 4


def test_bundle_sequence_increases_and_survives_reopening(db: Path) -> None:
    with SqliteStore(db) as store:
        assert store.bundle_sequence() == 0
        assert store.bump_bundle_sequence() == 1
        assert store.bump_bundle_sequence() == 2
        assert store.bundle_sequence() == 2
    with SqliteStore(db) as store:
        assert store.bundle_sequence() == 2
        assert store.bump_bundle_sequence() == 3


def test_data_survives_close_and_reopen(db: Path) -> None:
    with SqliteStore(db) as store:
        store.create_entry(entry(WORKLOAD, "payments.local"))
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
        store.record_issuance(WORKLOAD, NOW, signer(0xC0FFEE))
        store.revoke_serial(0xC0FFEE, NOW)
    with SqliteStore(db) as store:
        assert store.list_entries() == [entry(WORKLOAD, "payments.local")]
        assert store.list_issued() == [IssuedRecord(0xC0FFEE, WORKLOAD, NOW + HOUR, NOW, NOW)]
        store.issue_with_token(TOKEN, NOW, signer())


def test_file_is_private(db: Path) -> None:
    SqliteStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_closed_store_is_store_error(store: SqliteStore) -> None:
    store.check()
    store.close()
    store.close()
    with pytest.raises(StoreError, match=r"^CA store .*ca\.db: closed"):
        store.check()


# -- migrations --------------------------------------------------------------------------------


def test_reopening_does_not_rerun_migrations(db: Path) -> None:
    with SqliteStore(db) as store:
        store.next_crl_number()
    versions = schema_versions(db)
    assert versions and versions == list(range(1, len(versions) + 1))
    with SqliteStore(db) as store:
        assert store.next_crl_number() == 2
    assert schema_versions(db) == versions


def test_database_from_newer_meshid_is_refused(db: Path) -> None:
    SqliteStore(db).close()
    newer = max(schema_versions(db)) + 1
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (newer,))
    conn.close()
    with pytest.raises(StoreError, match=rf"^CA store .*: schema version {newer} is newer than this meshid"):
        SqliteStore(db)


# -- a broken database -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_locked_database_is_store_error_and_recovers(db: Path) -> None:
    with SqliteStore(db, busy_timeout=0.2) as store:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreError, match=r"^CA store .*ca\.db: database is locked") as info:
                store.create_entry(entry(WORKLOAD))
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        finally:
            other.execute("ROLLBACK")
            other.close()
        store.create_entry(entry(WORKLOAD))
        assert store.count_entries() == 1


def test_file_that_is_not_a_database_is_store_error(db: Path) -> None:
    db.write_bytes(b"this is not an SQLite database\n" * 64)
    with pytest.raises(StoreError, match=r"^CA store .*ca\.db: file is not a database"):
        SqliteStore(db)


def test_missing_directory_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"^CA store .*: cannot create the file"):
        SqliteStore(tmp_path / "missing" / "ca.db")


# -- threads and processes ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_issuance_uses_a_shared_token_once(store: SqliteStore) -> None:
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

    threads = [threading.Thread(target=issue, args=(i,)) for i in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert all(isinstance(o, Entry) for o in outcomes[:8])
    shared_outcomes = outcomes[8:]
    assert sum(isinstance(o, Entry) for o in shared_outcomes) == 1
    refusals = [o for o in shared_outcomes if not isinstance(o, Entry)]
    assert len(refusals) == 7 and all("already used" in str(o) for o in refusals)
    issued = store.list_issued()
    assert len(issued) == 9 and len({r.serial for r in issued}) == 9


CHILD = """
import datetime, secrets, sys
from meshid.ca.sqlite import SqliteStore
from meshid.ca.store import Entry
from meshid.spiffeid import SpiffeId

now = datetime.datetime.now(datetime.UTC)
store = SqliteStore(sys.argv[1])
spiffe_id = SpiffeId.parse("spiffe://example.org/durable")
store.create_entry(Entry(spiffe_id, (), datetime.timedelta(hours=1), now))
not_after = now + datetime.timedelta(hours=1)
while True:
    serial = secrets.randbits(159) | 1
    store.record_issuance(spiffe_id, now, lambda entry: (serial, not_after, None))
    print(format(serial, "x"), flush=True)
"""


@pytest.mark.timeout(60)
def test_every_returned_issuance_survives_kill_9(db: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    printed: list[str] = []
    try:
        assert child.stdout is not None
        while len(printed) < 300:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"the child stopped early: {child.communicate()[1]}")
            printed.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
    # Lines printed between the last read and the kill count too; a torn last line does not.
    printed += [line for line in rest.split("\n")[:-1] if line]
    assert child.returncode == -signal.SIGKILL

    with SqliteStore(db) as store:
        recorded = [r.serial for r in store.list_issued()]
    assert len(recorded) == len(set(recorded))
    assert {int(s, 16) for s in printed} <= set(recorded)
