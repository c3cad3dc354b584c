"""SqliteStore's own behaviour, beyond the contract every store keeps (test_store_contract.py):
a file only its owner may read, the errors a locked, foreign or unreachable file raises, and
every returned issuance surviving kill -9."""

from __future__ import annotations

import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshid.ca.store import SqliteStore
from meshid.errors import StoreError
from stores import WORKLOAD, entry


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ca.db"


def test_in_memory_database_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a file"):
        SqliteStore(":memory:")


def test_file_is_private(db: Path) -> None:
    SqliteStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


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


# -- processes ---------------------------------------------------------------------------------


CHILD = """
import datetime, secrets, sys
from meshid.ca.store import Entry, SqliteStore
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
