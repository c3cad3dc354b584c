"""The CA survives ``kill -9`` under load: real processes, real mTLS renewals, the real SQLite file.

Four client processes fetch an SVID with a join token and then renew as fast as they can,
printing each serial only after the call has returned. The CA is killed with SIGKILL while
they do, restarted on the same data folder (on a new port), and the clients carry on. Then
the database must hold every serial a client received, under the right SPIFFE ID, none
twice, and the revocations made before the crash.

Clients find the CA through an address file that the test rewrites atomically on restart,
so the same client processes (and their in-flight calls) live through the crash: while the
file still names the dead CA they get UNAVAILABLE and retry.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from meshid.ca.client import AdminClient
from meshid.ca.store import SqliteStore
from meshid.spiffeid import SpiffeId

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
CLIENTS = 4
BEFORE_CRASH = 100  # SVIDs the clients must have received, together, before the kill
AFTER_RESTART = 40  # ... and after the restart
DOWN_SECONDS = 1.0

#: A workload: argv = address file, bundle file, join token, deadline (Unix time). Prints
#: ``<serial hex> <SPIFFE ID>`` per SVID received, ``~ <error>`` when the CA cannot be reached
#: (it retries), ``! <error>`` for any other refusal, and stops when stdin closes or at the deadline.
CLIENT = r"""
import pathlib, sys, threading, time
from meshid.bundle import BundleSet
from meshid.ca.client import fetch_svid, renew_svid
from meshid import RemoteError

address_file, bundle_file, token, deadline = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
stop = threading.Event()

def watch_stdin():
    sys.stdin.read()
    stop.set()

threading.Thread(target=watch_stdin, daemon=True).start()

def running():
    return not stop.is_set() and time.time() < deadline

def attempt(call):
    try:
        return call(pathlib.Path(address_file).read_text().strip())
    except RemoteError as err:
        mark = "~" if err.code in TRANSIENT else "!"
        print(f"{mark} {err}".replace("\n", " "), flush=True)
        time.sleep(0.02)
        return None

got = None
while got is None and running():
    got = attempt(lambda server: fetch_svid(server, bundle_file, token, timeout=5))
if got is not None:
    svid, bundle = got
    print(f"{svid.serial:x} {svid.spiffe_id}", flush=True)
    bundles = BundleSet.of(bundle)
    while running():
        got = attempt(lambda server: renew_svid(server, svid, bundles, timeout=5))
        if got is not None:
            svid = got[0]
            print(f"{svid.serial:x} {svid.spiffe_id}", flush=True)
"""


def cli(*args: str, stdout: int | IO[str] | None = None, stderr: int | IO[str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "meshid.cli", *args], stdout=stdout, stderr=stderr, text=True)


class Fleet:
    """Every process the test starts, stopped in the finalizer whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: list[list[str]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def serve_ca(self, data_dir: Path, generation: int) -> tuple[subprocess.Popen[str], str]:
        log = open(self.tmp / f"ca-{generation}.log", "w")  # noqa: SIM115 - the CA logs every issuance
        proc = cli(
            "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", stdout=subprocess.PIPE, stderr=log
        )
        log.close()
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("CA serving on "), f"ca serve printed {line!r}; see {log.name}"
        return proc, line.removeprefix("CA serving on ")

    def start_client(self, *args: str) -> int:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        index = len(self.lines)
        self.lines.append([])
        thread = threading.Thread(target=self._drain, args=(proc, index), daemon=True)
        thread.start()
        self._threads.append(thread)
        return index

    def _drain(self, proc: subprocess.Popen[str], index: int) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.lines[index].append(line.strip())

    def received(self) -> list[list[tuple[int, str]]]:
        """Per client, the (serial, SPIFFE ID) pairs it has printed so far."""
        with self._lock:
            snapshot = [list(lines) for lines in self.lines]
        return [
            [(int(s, 16), sid) for s, sid in (ln.split(" ", 1) for ln in ls if ln[:1] not in "~!")] for ls in snapshot
        ]

    def refusals(self) -> list[str]:
        with self._lock:
            return [ln for ls in self.lines for ln in ls if ln.startswith("!")]

    def last_errors(self) -> list[str]:
        """Per client, the last time it could not reach the CA (for failure messages)."""
        with self._lock:
            return [next((ln for ln in reversed(ls) if ln.startswith("~")), "") for ls in self.lines]

    def total(self) -> int:
        return sum(len(r) for r in self.received())

    def wait_for(self, total: int, timeout: float, *, each: int = 0) -> None:
        """Until the clients have received ``total`` SVIDs together and ``each`` at least each."""
        end = time.monotonic() + timeout
        while self.total() < total or min(len(r) for r in self.received()) < each:
            counts = [len(r) for r in self.received()]
            assert time.monotonic() < end, (
                f"clients received {counts} SVIDs in {timeout}s; expected {total}, {each} each;"
                f" last unreachable errors: {self.last_errors()}"
            )
            assert not self.refusals(), f"the CA refused: {self.refusals()}"
            time.sleep(0.02)

    def stop_clients(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in self.procs:
            if proc.stdin is not None:  # the clients
                proc.wait(timeout=20)
        for thread in self._threads:
            thread.join(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def write_address(path: Path, address: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(address)
    os.replace(tmp, path)  # clients never read a half-written address


def test_issuances_and_revocations_survive_kill_9(fleet: Fleet, tmp_path: Path) -> None:
    data_dir = tmp_path / "ca"
    assert cli("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD, stdout=subprocess.DEVNULL).wait() == 0
    ca, address = fleet.serve_ca(data_dir, 1)
    address_file = tmp_path / "ca-address"
    write_address(address_file, address)

    ids = [f"spiffe://{TD}/ns/crash/sa/w{i}" for i in range(CLIENTS)]
    deadline = str(time.time() + 90)
    with AdminClient(address, data_dir) as admin:
        for sid in ids:
            admin.create_entry(sid)
        tokens = [admin.create_token(sid).token for sid in ids]
        for token in tokens:
            fleet.start_client(str(address_file), str(data_dir / "bundle.pem"), token, deadline)

        fleet.wait_for(BEFORE_CRASH // 3, timeout=30, each=2)
        # Only SVIDs a client has already replaced (its first): its newest one must keep working.
        revoked = [per_client[0][0] for per_client in fleet.received()[:3]]
        for serial in revoked:
            assert admin.revoke(serial=f"{serial:x}") == [f"{serial:x}"]

    fleet.wait_for(BEFORE_CRASH, timeout=30)
    ca.kill()  # SIGKILL, mid-load
    ca.wait()
    time.sleep(DOWN_SECONDS)  # the clients keep trying the dead address meanwhile
    at_crash = [len(r) for r in fleet.received()]  # taken now so that late prints of the old CA's SVIDs count here

    _, address = fleet.serve_ca(data_dir, 2)
    write_address(address_file, address)
    fleet.wait_for(fleet.total() + AFTER_RESTART, timeout=30)
    at_restart_plus = [len(r) for r in fleet.received()]
    time.sleep(0.3)
    fleet.stop_clients()
    fleet.close()  # the restarted CA too: the database is read with no writer left

    received = fleet.received()
    assert not fleet.refusals(), f"the CA refused: {fleet.refusals()}"
    assert all(after > before for after, before in zip(at_restart_plus, at_crash, strict=True)), (
        f"every client must renew after the restart: {at_crash} at the crash, {at_restart_plus} after"
    )
    serials = [serial for per_client in received for serial, _ in per_client]
    now = datetime.datetime.now(datetime.UTC)
    with SqliteStore(data_dir / "meshid.db") as store:
        issued = store.list_issued()
        for sid, per_client in zip(ids, received, strict=True):
            for serial, printed in per_client:
                assert printed == sid, f"client for {sid} received an SVID for {printed}"
                record = store.get_issued(serial)
                assert record is not None, f"serial {serial:x} ({sid}) was received but is not recorded"
                assert record.spiffe_id == SpiffeId.parse(sid), f"serial {serial:x} is recorded for {record.spiffe_id}"
        for serial in revoked:
            record = store.get_issued(serial)
            assert record is not None and record.revoked_at is not None, f"revocation of {serial:x} was lost"
        still_listed = {r.serial for r in store.revoked_unexpired(now)}

    db_serials = [r.serial for r in issued]
    assert len(set(serials)) == len(serials), "a serial was received twice"
    assert len(set(db_serials)) == len(db_serials), "a serial is recorded twice"
    assert set(revoked) <= still_listed, f"revocations missing from the CRL's list: {set(revoked) - still_listed}"
    workload_records = sum(1 for r in issued if str(r.spiffe_id) in ids)
    print(
        f"\n[crash] {len(serials)} SVIDs received by {CLIENTS} clients ({sum(at_crash)} before kill -9),"
        f" {workload_records} recorded for them (recorded but never delivered: {workload_records - len(serials)}),"
        f" duplicates=0, revocations survived {len(revoked)}/{len(revoked)}"
    )
