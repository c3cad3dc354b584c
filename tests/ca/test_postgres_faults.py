"""The CA on a real PostgreSQL that fails under it (issue #19, item 5): the server restarted while
workloads renew, and the CA's connection killed in the middle of an issuance.

What a restart must leave: renewals during the outage answered UNAVAILABLE by the CA itself
(never INTERNAL), health NOT_SERVING while the database is down and SERVING after, renewals
working again without restarting the CA, and the records whole: no serial twice, every SVID a
workload received recorded. What a killed connection must leave: the caller told UNAVAILABLE
(a StoreError), nothing half-written (a certificate without its token spent, or the reverse),
the token still usable, the store still working.

The order of events is proved by what the server reports (a backend idle inside its
transaction, a lock it waits for) and by flags the test sets, never by elapsed time.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import shlex
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

import meshid
from meshid.ca import Authority
from meshid.ca.client import AdminClient, issue_with_token, read_roots, renew_with_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.issuing import token_hash
from meshid.ca.server import CaServer
from meshid.ca.store import Entry, PostgresStore, open_store
from meshid.errors import RemoteError, StoreError
from pg import new_database, query, running_postgres
from stores import HOUR, NOW, OTHER, TOKEN, WORKLOAD, entry, signer
from support import eventually, require_program

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
CA_ID = "spiffe://example.org/meshid/ca"
#: The CA's connections carry this name, so the test can find (and kill) exactly them.
CA_APP = "meshid-ca-under-test"
STORE_APP = "meshid-store-under-test"
#: A lifetime far longer than the test: no SVID expires during an outage.
TTL = datetime.timedelta(minutes=10)
KILLED = "terminating connection due to administrator command"


# -- the server, stopped and started again --------------------------------------------------------


class RestartablePostgres:
    """The server :func:`pg.running_postgres` started, stopped with a fast shutdown and started
    again with the same command line: the same port, the same data folder.

    The command is the one PostgreSQL recorded in ``postmaster.opts``; the restarted server runs
    as the data folder's owner (PostgreSQL refuses root) and is stopped by :meth:`close`.
    """

    def __init__(self, dsn: str, log_path: Path) -> None:
        self.dsn = dsn
        self.data = Path(query(dsn, "SHOW data_directory")[0][0])
        command = shlex.split((self.data / "postmaster.opts").read_text())
        if os.geteuid() == 0:
            # Not Popen(user=...): that makes Python fork() instead of vfork(), and in a process
            # with grpc's threads running, grpc's fork handler can abort the child before it runs
            # postgres (seen: "Check failed: next_worker->state == KICKED"). setpriv changes user
            # after the exec.
            owner = self.data.stat()
            setpriv = require_program("setpriv")
            command = [setpriv, f"--reuid={owner.st_uid}", f"--regid={owner.st_gid}", "--clear-groups", *command]
        self._command = command
        self._log_path = log_path
        self._restarted: subprocess.Popen[bytes] | None = None

    def accepts_connections(self) -> bool:
        proc = self._restarted
        if proc is not None and proc.poll() is not None:
            log = self._log_path.read_text(errors="replace").splitlines()[-20:]
            raise AssertionError(f"the restarted PostgreSQL exited ({proc.returncode}):\n" + "\n".join(log))
        try:
            psycopg.connect(self.dsn, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop_fast(self) -> None:
        """SIGINT to the postmaster (``pg_ctl stop -m fast``); returns once it has exited."""
        lock_file = self.data / "postmaster.pid"
        pid = int(lock_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        # The postmaster removes its lock file last, after every backend has gone.
        eventually(lambda: not lock_file.exists(), 30, "PostgreSQL's fast shutdown to finish")

    def start(self) -> None:
        """Start the server again; returns once it accepts connections."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        with open(self._log_path, "ab") as log:
            self._restarted = subprocess.Popen(
                self._command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data.parent, env=env, start_new_session=True,
            )  # fmt: skip
        eventually(self.accepts_connections, 30, "the restarted PostgreSQL to accept connections")

    def close(self) -> None:
        proc, self._restarted = self._restarted, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[RestartablePostgres]:
    """A PostgreSQL of this test's own: the restart must not cut off any other test."""
    with running_postgres(tmp_path) as dsn:
        server = RestartablePostgres(dsn, tmp_path / "postgres.log")
        try:
            yield server
        finally:
            server.close()  # before running_postgres removes the cluster


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One PostgreSQL for the kill tests; each gets its own database on it."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


# -- a CA on PostgreSQL ---------------------------------------------------------------------------


def start_ca(folder: Path, dsn: str) -> CaServer:
    """``meshid ca init`` on ``dsn`` (an intermediate under a fresh upstream root, as a shared
    datastore requires), then the CA serving on loopback, its connections named :data:`CA_APP`."""
    folder.mkdir()
    root = Authority.create_root(TD)
    (folder / "upstream.pem").write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "upstream.key").write_bytes(
        root.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    init_data_dir(
        folder / "ca", TD, datastore=f"{dsn}?application_name={CA_APP}",
        upstream_cert=str(folder / "upstream.pem"), upstream_key=str(folder / "upstream.key"),
    )  # fmt: skip
    server = CaServer(folder / "ca", "127.0.0.1:0", poll_interval=0.1)
    server.start()
    return server


def enroll(server: CaServer, folder: Path, spiffe_id: str) -> str:
    with AdminClient(f"127.0.0.1:{server.port}", folder) as admin:
        admin.create_entry(spiffe_id, [], TTL)
        return str(admin.create_token(spiffe_id).token)


@contextlib.contextmanager
def health_of(server: CaServer, folder: Path) -> Iterator[Callable[[], int]]:
    """A function returning the CA's ``grpc.health.v1`` status for the Issuer, asked over mTLS
    with the admin SVID (the CA keeps it in ``DIR/admin``)."""
    admin = folder / "admin"
    source = meshid.FileSource(admin / "svid.pem", admin / "svid.key", admin / "bundle.pem")
    with meshid.secure_channel(f"127.0.0.1:{server.port}", source, server_id=CA_ID) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        yield lambda: stub.Check(health_pb2.HealthCheckRequest(service="meshid.v1.Issuer"), timeout=5).status


# -- PostgreSQL restarted under load --------------------------------------------------------------

UP, STOPPING, DOWN, RESTARTING, UP_AGAIN = range(5)
PHASES = ("up", "stopping", "down", "restarting", "up again")


@dataclass
class Attempt:
    began: int  # the phase when the renewal was sent
    ended: int  # the phase when its answer came
    outcome: str  # "OK", or the status code name
    detail: str

    def within(self, phase: int) -> bool:
        return self.began == self.ended == phase

    def label(self) -> str:
        return PHASES[self.began] if self.began == self.ended else f"{PHASES[self.began]}->{PHASES[self.ended]}"


@dataclass
class Workload:
    """One workload renewing in a loop, as fast as the CA answers, keeping what it was given."""

    spiffe_id: str
    svid: meshid.X509Svid
    bundles: meshid.BundleSet
    delivered: list[int] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)

    def run(self, address: str, phase: list[int], stop: threading.Event) -> None:
        while not stop.is_set():
            began = phase[0]
            try:
                issued = renew_with_svid(address, self.svid, self.bundles, timeout=10)
            except RemoteError as err:
                self.attempts.append(Attempt(began, phase[0], err.code, str(err)))
            except Exception as err:  # anything else is a failure the test must see, not lose in a thread
                self.attempts.append(Attempt(began, phase[0], "CRASH", repr(err)))
            else:
                self.svid = issued.svid
                self.delivered.append(issued.svid.serial)
                self.attempts.append(Attempt(began, phase[0], "OK", ""))
            stop.wait(0.02)

    def count(self, phase: int, *, ok: bool) -> int:
        """Renewals sent and answered in ``phase`` that succeeded (or failed, whatever the code)."""
        return sum(a.within(phase) and (a.outcome == "OK") == ok for a in list(self.attempts))


def test_renewals_survive_a_postgres_restart_without_restarting_the_ca(
    restartable: RestartablePostgres, tmp_path: Path
) -> None:
    dsn = new_database(restartable.dsn)
    ca = start_ca(tmp_path / "ca", dsn)
    phase, stop = [UP], threading.Event()
    threads: list[threading.Thread] = []
    health_seen: dict[str, int] = {}
    try:
        address = f"127.0.0.1:{ca.port}"
        roots = read_roots(tmp_path / "ca" / "ca" / "bundle.pem")
        workloads = []
        for i in range(4):
            sid = f"spiffe://example.org/ns/batch/sa/w{i}"
            first = issue_with_token(address, roots, enroll(ca, tmp_path / "ca" / "ca", sid))
            workloads.append(Workload(sid, first.svid, meshid.BundleSet.of(first.bundle), [first.svid.serial]))
        with health_of(ca, tmp_path / "ca" / "ca") as health:
            assert health() == health_pb2.HealthCheckResponse.SERVING
            for w in workloads:
                threads.append(threading.Thread(target=w.run, args=(address, phase, stop)))
                threads[-1].start()

            def every_workload(phase_: int, times: int, *, ok: bool) -> bool:
                return all(w.count(phase_, ok=ok) >= times for w in workloads)

            eventually(lambda: every_workload(UP, 3, ok=True), 30, "three renewals of each workload before the restart")

            phase[0] = STOPPING
            restartable.stop_fast()
            phase[0] = DOWN
            eventually(lambda: every_workload(DOWN, 3, ok=False), 30, "three failed renewals of each workload")
            eventually(
                lambda: health() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "health NOT_SERVING while down"
            )
            health_seen["down"] = health()

            phase[0] = RESTARTING
            restartable.start()
            phase[0] = UP_AGAIN
            eventually(
                lambda: health() == health_pb2.HealthCheckResponse.SERVING, 30, "health SERVING after the restart"
            )
            health_seen["up again"] = health()
            eventually(lambda: every_workload(UP_AGAIN, 3, ok=True), 30, "three renewals of each workload after it")
    finally:
        stop.set()
        for t in threads:
            t.join()
        ca.stop()

    attempts = [a for w in workloads for a in w.attempts]
    tally = Counter(f"{a.label()} {a.outcome}" for a in attempts)
    with contextlib.closing(open_store(dsn)) as store:
        recorded = [r for r in store.list_issued() if str(r.spiffe_id).startswith("spiffe://example.org/ns/batch/")]
    serials = [r.serial for r in recorded]
    by_serial = {r.serial: str(r.spiffe_id) for r in recorded}
    delivered = [(w.spiffe_id, s) for w in workloads for s in w.delivered]
    unrecorded = [(sid, f"{s:x}") for sid, s in delivered if by_serial.get(s) != sid]
    print(
        f"\n[postgres restart] renewals by phase and outcome: {dict(sorted(tally.items()))}; "
        f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(health_seen['down'])} while down, "
        f"{health_pb2.HealthCheckResponse.ServingStatus.Name(health_seen['up again'])} after; "
        f"{len(delivered)} SVIDs delivered, {len(serials)} recorded, {len(serials) - len(set(serials))} serials twice, "
        f"{len(unrecorded)} delivered but unrecorded, {len(set(serials) - {s for _, s in delivered})} recorded "
        "but never delivered (the answer lost after the commit)"
    )
    # Never INTERNAL, never a client-side crash: the CA itself answered UNAVAILABLE, saying why.
    failures = [a for a in attempts if a.outcome != "OK"]
    assert {a.outcome for a in failures} == {"UNAVAILABLE"}, [a for a in failures if a.outcome != "UNAVAILABLE"][:3]
    assert all(": UNAVAILABLE: CA store " in a.detail for a in failures), [a.detail for a in failures][:3]
    # While the server was down from the request to the answer, nothing was issued; while it was
    # up, nothing failed, before the restart or after it (the CA opened new connections by itself).
    assert not [a for a in attempts if a.within(DOWN) and a.outcome == "OK"]
    assert not [a for a in attempts if (a.within(UP) or a.within(UP_AGAIN)) and a.outcome != "OK"], tally
    assert len(serials) == len(set(serials))
    assert len({s for _, s in delivered}) == len(delivered)
    assert unrecorded == []


# -- a connection killed mid-transaction ----------------------------------------------------------


def backends(dsn: str, application: str) -> list[tuple[int, str]]:
    """(pid, state) of each session of ``application`` on ``dsn``'s database."""
    return query(
        dsn,
        "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
        application,
    )


def kill(dsn: str, pid: int) -> None:
    """``pg_terminate_backend``; returns once the backend has gone."""
    assert query(dsn, "SELECT pg_terminate_backend(%s)", pid) == [(True,)]
    eventually(
        lambda: not query(dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid), 10, f"backend {pid} to end"
    )


def certificates_and_token(dsn: str, spiffe_id: str, token: bytes) -> tuple[list[str], bool]:
    """What the database holds, read past the store: the serials recorded for ``spiffe_id``, and
    whether ``token`` is spent."""
    serials = [str(row[0]) for row in query(dsn, "SELECT serial FROM certificates WHERE spiffe_id = %s", spiffe_id)]
    [(used_at,)] = query(dsn, "SELECT used_at FROM tokens WHERE hash = %s", token)
    return sorted(serials), used_at is not None


@pytest.mark.parametrize("kills", ["every attempt", "the first attempt"])
def test_an_issuance_whose_connection_is_killed_while_signing_writes_nothing(shared_server: str, kills: str) -> None:
    # A transaction that fails on a pooled connection the server has closed is run again, from
    # the start, on a new connection; one that fails on a new connection is final
    # (meshid.ca.store.postgres). So killing every attempt reaches the caller as a StoreError,
    # and killing only the first is not seen by the caller at all.
    dsn = new_database(shared_server)
    with PostgresStore(f"{dsn}?application_name={STORE_APP}", pool_size=1) as store:
        store.create_entry(entry(WORKLOAD))
        store.add_token(TOKEN, WORKLOAD, NOW + HOUR)
        events: queue.Queue[tuple[str, object]] = queue.Queue()
        releases: queue.Queue[None] = queue.Queue()
        serials = iter(range(0x101, 0x110))

        def held_sign(e: Entry) -> tuple[int, datetime.datetime, object]:
            serial = next(serials)
            events.put(("signing", serial))
            releases.get(timeout=30)
            return serial, NOW + HOUR, f"cert {serial:x}"

        def issue() -> None:
            try:
                events.put(("returned", store.issue_with_token(TOKEN, NOW, held_sign)[1]))
            except BaseException as err:
                events.put(("raised", err))

        caller = threading.Thread(target=issue)
        caller.start()
        signed, killed = [], []
        try:
            while (event := events.get(timeout=30))[0] == "signing":
                signed.append(event[1])
                [(pid, state)] = backends(dsn, STORE_APP)
                assert state == "idle in transaction"  # inside the issuance: the token's row locked, sign running
                if kills == "every attempt" or not killed:
                    kill(shared_server, pid)
                    killed.append(pid)
                releases.put(None)  # sign returns; the transaction's next statement meets the dead connection
        finally:
            for _ in range(4):
                releases.put(None)
            caller.join()
        outcome = event[1]
        print(
            f"\n[killed while signing, {kills}] signed {[f'{s:x}' for s in signed]}, killed {len(killed)}: {outcome!r}"
        )

        if kills == "every attempt":
            assert isinstance(outcome, StoreError), outcome
            assert str(outcome).startswith(f"CA store {dsn}?application_name={STORE_APP}: {KILLED}")
            assert isinstance(outcome.__cause__, psycopg.errors.AdminShutdown)
            assert 1 <= len(killed) == len(signed) <= 3
            assert certificates_and_token(dsn, str(WORKLOAD), TOKEN) == ([], False)  # nothing written
            # The token was never spent: the same token issues now.
            assert store.issue_with_token(TOKEN, NOW, signer(0x1FF))[1] == "cert 1ff for " + str(WORKLOAD)
            assert certificates_and_token(dsn, str(WORKLOAD), TOKEN) == (["1ff"], True)
        else:
            assert killed and signed == [0x101, 0x102]  # run again once, from the start, on a new connection
            assert outcome == "cert 102"
            assert certificates_and_token(dsn, str(WORKLOAD), TOKEN) == (["102"], True)  # the killed 101 left nothing
        # The store goes on working.
        store.create_entry(entry(OTHER))
        assert store.count_entries() == 2
        store.check()
        [(_, state)] = backends(dsn, STORE_APP)
        assert state == "idle"


#: Makes an UPDATE of a token wait, inside the issuance's transaction, for an advisory lock
#: (HOLD_KEY, n), where n is the number of the workload's certificates that transaction sees:
#: 1 once it has recorded its own (uncommitted) certificate and nothing else is recorded. While
#: the test holds (HOLD_KEY, 1), an issuance that got there is held between its two writes.
HOLD_KEY = 4242
HOLD_TRIGGER = f"""
CREATE FUNCTION hold_token_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({HOLD_KEY}, (SELECT count(*) FROM certificates WHERE spiffe_id = NEW.spiffe_id)::int);
    RETURN NEW;
END $$;
CREATE TRIGGER hold_token_update BEFORE UPDATE ON tokens FOR EACH ROW EXECUTE FUNCTION hold_token_update();
"""


def held_between_writes(dsn: str) -> list[int]:
    """The CA's sessions waiting in the trigger with one certificate recorded and the token unspent."""
    rows = query(
        dsn,
        "SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory'"
        " AND NOT l.granted AND l.classid = %s AND l.objid = 1 AND a.application_name = %s",
        HOLD_KEY,
        CA_APP,
    )
    return [int(row[0]) for row in rows]


def test_a_ca_connection_killed_between_the_certificate_and_the_token_writes_nothing(
    shared_server: str, tmp_path: Path
) -> None:
    dsn = new_database(shared_server)
    ca = start_ca(tmp_path / "ca", dsn)
    address = f"127.0.0.1:{ca.port}"
    folder = tmp_path / "ca" / "ca"
    workload = "spiffe://example.org/ns/batch/sa/held"
    token = enroll(ca, folder, workload)
    query(dsn, HOLD_TRIGGER)
    roots = read_roots(folder / "bundle.pem")
    outcome: list[object] = []
    killed: list[int] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s, 1)", (HOLD_KEY,))

            def first_issuance() -> None:
                try:
                    outcome.append(issue_with_token(address, roots, token, timeout=60))
                except BaseException as err:
                    outcome.append(err)

            caller = threading.Thread(target=first_issuance)
            caller.start()
            try:
                # Each attempt of the CA's transaction is held between its writes, then killed
                # there; the CA runs it again (a pooled connection) or answers (a new one).
                while True:
                    held = eventually(
                        lambda: held_between_writes(dsn) or outcome, 30, "the issuance held, or its answer"
                    )
                    if held is outcome:
                        break
                    assert len(killed) < 3, "the CA ran the transaction more often than its 3 attempts"
                    kill(shared_server, held[0])
                    killed.append(held[0])
            finally:
                caller.join()
            assert certificates_and_token(dsn, workload, token_hash(token)) == ([], False)
            holder.execute("SELECT pg_advisory_unlock(%s, 1)", (HOLD_KEY,))
        [error] = outcome
        print(f"\n[CA connection killed between the writes] killed {len(killed)} backend(s): {error}")
        assert isinstance(error, RemoteError) and error.code == "UNAVAILABLE", error
        assert f"svid fetch: UNAVAILABLE: CA store {dsn}?application_name={CA_APP}: {KILLED}" in str(error)
        assert 1 <= len(killed) <= 3

        # The token is still good: the same one issues now (the trigger no longer waits).
        issued = issue_with_token(address, roots, token)
        assert certificates_and_token(dsn, workload, token_hash(token)) == ([f"{issued.svid.serial:x}"], True)
        # And the CA goes on working on the same store: it renews, answers the admin, is SERVING.
        renewed = renew_with_svid(address, issued.svid, meshid.BundleSet.of(issued.bundle))
        assert str(renewed.svid.spiffe_id) == workload
        with AdminClient(address, folder) as admin:
            assert workload in [e.spiffe_id for e in admin.list_entries()]
        with health_of(ca, folder) as health:
            assert health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        ca.stop()
