"""CA key rotation (prepare, activate, old root retired) under continuous load: zero failed RPCs.

The CA and the workloads' sources run on the test's ManualClock (tests/agent/conftest.py): the
renewals and bundle refreshes that carry the rotation are stepped, while the calls flow in real
time over real handshakes."""

from __future__ import annotations

import datetime
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import pytest

import meshid
from conftest import CLOCKED_LIFETIME, RunningCa, step
from meshid._proto import greeter_pb2, greeter_pb2_grpc  # the example service's messages
from meshid.agent import IssuerSource
from meshid.ca.datadir import activate_rotation, prepare_rotation, retire_due_roots
from meshid.clock import ManualClock
from support import eventually

pytestmark = pytest.mark.timeout(120)

TD = meshid.TrustDomain.parse("example.org")
SERVER_ID = "spiffe://example.org/ns/prod/sa/greeter"
CLIENT_ID = "spiffe://example.org/ns/prod/sa/frontend"


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        peer = meshid.peer_identity(context)
        return greeter_pb2.HelloReply(message="hi", caller=peer.certificate.issuer.rfc4514_string())


def _roots(source: IssuerSource) -> set[str]:
    return {r.subject.rfc4514_string() for r in source.get_bundles()[TD].roots}


def _step_until(clock: ManualClock, done: Callable[[], bool], what: str, limit: int = 40) -> None:
    """Step both sources' schedule until ``done()``."""
    for _ in range(limit):
        if done():
            return
        step(clock, waiters=2)
    raise AssertionError(f"not within {limit} steps ({clock.monotonic():.0f} s of clock): {what}")


def test_ca_key_rotation_under_load_has_zero_failed_rpcs(tmp_path, clock) -> None:
    ca = RunningCa(tmp_path / "ca", max_ttl=CLOCKED_LIFETIME, clock=clock)
    sources: list[IssuerSource] = []
    server = None
    stop = threading.Event()
    ok, failures, issuers_seen = 0, [], set()
    try:
        for sid in (SERVER_ID, CLIENT_ID):
            token = ca.enroll(sid, CLOCKED_LIFETIME)
            source = IssuerSource(ca.address, ca.bundle_file, join_token=token, refresh_interval=5, clock=clock)
            sources.append(source.start())
        server_source, client_source = sources
        old_root = next(iter(_roots(client_source)))
        policy = meshid.AuthorizationPolicy.from_dict(
            {"allow": [{"name": "fe", "methods": ["*"], "spiffe_ids": [CLIENT_ID]}]}
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(8), interceptors=[meshid.AuthorizationInterceptor(policy, source=server_source)]
        )
        greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
        port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
        server.start()
        channel = meshid.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID)
        stub = greeter_pb2_grpc.GreeterStub(channel)

        def caller() -> None:
            nonlocal ok
            while not stop.is_set():
                try:
                    reply = stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=5)
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                else:
                    ok += 1
                    issuers_seen.add(reply.caller)
                time.sleep(0.02)

        callers = [threading.Thread(target=caller) for _ in range(4)]
        for t in callers:
            t.start()
        eventually(lambda: ok >= 20, 30, "calls on the old root before the rotation")

        # The CA follows its data folder on the real clock (a 0.5 s poll): wait for it before
        # stepping, or the steps would run the clock on while it still serves the old state.
        new_ca = prepare_rotation(ca.folder).subject.rfc4514_string()
        eventually(lambda: len(ca.server.service.bundle().roots) == 2, 10, "the CA to serve the two-root bundle")
        _step_until(clock, lambda: all(len(_roots(s)) == 2 for s in sources), "workloads to fetch the two-root bundle")
        activate_rotation(ca.folder, grace=datetime.timedelta(seconds=1))
        eventually(
            lambda: ca.server.service.authority.certificate.subject.rfc4514_string() == new_ca,
            10,
            "the CA to sign with the new CA",
        )
        _step_until(
            clock,
            lambda: all(s.get_svid().leaf.issuer.rfc4514_string() == new_ca for s in sources),
            "workloads to hold SVIDs from the new CA",
        )
        # The old root retires once the max TTL and the grace have passed. `ca serve` checks
        # that on the real clock, so the test does what its refresh loop does, on the CA's clock.
        _step_until(
            clock,
            lambda: bool(retire_due_roots(ca.folder, clock.now()))
            or len(meshid.TrustBundle.load(TD, ca.bundle_file).roots) == 1,
            "the old root's retirement to come due",
        )
        eventually(lambda: len(ca.server.service.bundle().roots) == 1, 10, "the CA to serve the new root alone")
        _step_until(clock, lambda: all(_roots(s) == {new_ca} for s in sources), "the old root to leave every bundle")
        on_new_root_alone = ok
        eventually(lambda: ok >= on_new_root_alone + 40, 30, "calls on the new root alone")
        stop.set()
        for t in callers:
            t.join()
        channel.close()
    finally:
        stop.set()
        if server is not None:
            server.stop(None)
        for s in sources:
            s.close()
        ca.stop()
    print(
        f"\nCA rotation: {ok} RPCs OK, {len(failures)} failed; {clock.monotonic():.0f} s of clock; "
        f"caller certificates from {sorted(issuers_seen)}"
    )
    assert failures == []
    assert old_root in issuers_seen and new_ca in issuers_seen  # traffic ran before and after the switch


def test_rotate_commands_refuse_out_of_order_steps(tmp_path) -> None:
    def meshid_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshid.cli", *args], capture_output=True, text=True, timeout=60, check=False
        )

    folder = str(tmp_path / "ca")
    assert meshid_cli("ca", "init", "--data-dir", folder, "--trust-domain", "example.org").returncode == 0
    out = meshid_cli("ca", "rotate", "activate", "--data-dir", folder)
    assert out.returncode == 2 and "nothing prepared" in out.stderr
    assert meshid_cli("ca", "rotate", "prepare", "--data-dir", folder).returncode == 0
    out = meshid_cli("ca", "rotate", "prepare", "--data-dir", folder)
    assert out.returncode == 2 and "already prepared" in out.stderr
    assert meshid_cli("ca", "rotate", "activate", "--data-dir", folder).returncode == 0
    status = meshid_cli("ca", "rotate", "status", "--data-dir", folder).stdout
    lines = status.splitlines()
    assert len([line for line in lines if line.startswith("root ")]) == 2
    assert any(line.startswith("retiring ") for line in lines)
