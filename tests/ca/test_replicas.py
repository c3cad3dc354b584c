"""High availability: three `meshid ca serve` replicas on one real PostgreSQL, workloads failing
over between them while two replicas are killed with kill -9 (issue #7)."""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshid
from meshid._proto import greeter_pb2, greeter_pb2_grpc  # the example service's messages
from meshid.agent import IssuerSource
from meshid.ca import Authority
from meshid.ca.client import AdminClient, issue_with_token, read_roots
from meshid.ca.store import open_store
from pg import create_database, running_postgres
from support import eventually

pytestmark = pytest.mark.timeout(180)
TD = "example.org"
SERVER_ID = "spiffe://example.org/ns/prod/sa/greeter"
CLIENT_ID = "spiffe://example.org/ns/prod/sa/frontend"


class Replicas:
    """N `meshid ca serve` processes, intermediates under one operator root, sharing a database."""

    def __init__(self, folder: Path, dsn: str, count: int) -> None:
        root = Authority.create_root(TD)
        self.root_pem = folder / "root.pem"
        self.root_pem.write_bytes(meshid.TrustBundle(root.trust_domain, root.roots).to_pem())
        key = folder / "root.key"
        key.write_bytes(_key_pem(root))
        key.chmod(0o600)
        self.dsn = dsn
        self.dirs = [folder / f"replica{i}" for i in range(count)]
        self.procs: list[subprocess.Popen[str] | None] = []
        self.addresses: list[str] = []
        for data_dir in self.dirs:
            _cli("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD, "--datastore", dsn,
                 "--upstream-cert", str(self.root_pem), "--upstream-key", str(key))
        for data_dir in self.dirs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("CA serving on"), line
            self.procs.append(proc)
            self.addresses.append(line.split()[-1])

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs[index] = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _key_pem(authority: Authority) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return authority.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cli(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "meshid.cli", *args], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


@pytest.fixture
def replicas(postgres: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Replicas]:
    dsn = create_database(postgres, f"ha_{request.node.name[:40].lower().replace('[', '_').replace(']', '')}")
    group = Replicas(tmp_path, dsn, 3)
    try:
        yield group
    finally:
        group.stop()


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message="hi", caller=str(meshid.peer_identity(context).spiffe_id))


def test_workloads_keep_renewing_through_two_kill_9s(replicas: Replicas) -> None:
    # The replicas are processes signing on the real clock, so the sources run on it too: 20 s
    # SVIDs renewed 0.6-1 s into their lifetime, every renewal with 19 s to spare on a loaded machine.
    ttl = datetime.timedelta(seconds=20)
    tokens = {}
    with AdminClient(replicas.addresses[0], replicas.dirs[0]) as admin:
        for sid in (SERVER_ID, CLIENT_ID, *(f"spiffe://example.org/ns/batch/sa/w{i}" for i in range(4))):
            admin.create_entry(sid, [], ttl)
            tokens[sid] = admin.create_token(sid).token
    sources = {
        sid: IssuerSource(
            replicas.addresses, replicas.root_pem, join_token=token,
            renew_at=0.05, jitter=0.02, refresh_interval=0.5, max_backoff=0.5,
        )
        for sid, token in tokens.items()
    }
    received: dict[str, set[int]] = {sid: set() for sid in sources}
    for sid, source in sources.items():
        source.subscribe(lambda sid=sid, source=source: received[sid].add(source.get_svid().serial))
        source.start()
        received[sid].add(source.get_svid().serial)
    server_source, client_source = sources[SERVER_ID], sources[CLIENT_ID]
    policy = meshid.AuthorizationPolicy.from_dict({"allow": [{"name": "fe", "methods": ["*"], "spiffe_ids": [CLIENT_ID]}]})
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[meshid.AuthorizationInterceptor(policy, source=server_source)])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
    server.start()
    ok, failures = 0, []
    stop = threading.Event()
    try:
        with meshid.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)

            def caller() -> None:
                nonlocal ok
                while not stop.is_set():
                    try:
                        stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=5)
                        ok += 1
                    except grpc.RpcError as err:
                        failures.append(f"{err.code().name}: {err.details()}")
                    time.sleep(0.02)

            threads = [threading.Thread(target=caller) for _ in range(3)]
            for t in threads:
                t.start()

            def renewals() -> dict[str, int]:
                return {sid: s.state.renewals for sid, s in sources.items()}

            def wait_all_renew(after: dict[str, int], what: str, times: int = 2) -> None:
                eventually(
                    lambda: all(renewals()[sid] >= after[sid] + times for sid in sources),
                    30,
                    f"every workload to renew {times}x {what} (renewals {after} before)",
                )

            wait_all_renew(renewals(), "with three replicas")
            replicas.kill(0)
            wait_all_renew(renewals(), "after the first kill -9")
            replicas.kill(1)
            wait_all_renew(renewals(), "at the last replica")
            stop.set()
            for t in threads:
                t.join()
    finally:
        stop.set()
        server.stop(None)
        for source in sources.values():
            source.close()
    store = open_store(replicas.dsn)
    try:
        recorded = store.list_issued()
    finally:
        store.close()
    serials = [r.serial for r in recorded]
    by_serial = {r.serial: str(r.spiffe_id) for r in recorded}
    delivered = sum(len(v) for v in received.values())
    lost = [(sid, s) for sid, got in received.items() for s in got if by_serial.get(s) != sid]
    print(
        f"\n[replicas] {ok} RPCs OK, {len(failures)} failed; {delivered} SVIDs delivered to 6 workloads, "
        f"{len(serials)} recorded, duplicates {len(serials) - len(set(serials))}, delivered but unrecorded {len(lost)}"
    )
    assert failures == []
    assert len(serials) == len(set(serials))
    assert lost == []


def test_one_join_token_at_two_replicas_at_once_issues_exactly_once(replicas: Replicas) -> None:
    roots = read_roots(replicas.root_pem)
    rounds, doubles = 25, 0
    with AdminClient(replicas.addresses[0], replicas.dirs[0]) as admin:
        admin.create_entry("spiffe://example.org/ns/race/sa/w", [], datetime.timedelta(minutes=5))
        for _ in range(rounds):
            token = admin.create_token("spiffe://example.org/ns/race/sa/w").token
            barrier = threading.Barrier(2)
            outcomes: list[str] = []

            def attempt(address: str, barrier: threading.Barrier = barrier, token: str = token, outcomes: list[str] = outcomes) -> None:
                barrier.wait()
                try:
                    issue_with_token(address, roots, token)
                    outcomes.append("OK")
                except meshid.RemoteError as err:
                    outcomes.append(err.code)

            threads = [threading.Thread(target=attempt, args=(a,)) for a in replicas.addresses[1:3]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes) == ["OK", "UNAUTHENTICATED"], outcomes
            doubles += outcomes.count("OK") - 1
    print(f"\n[replicas] one token at two replicas at once: {rounds} rounds, {rounds} issuances, {doubles} doubles")
