"""Rotation under load: SVIDs renewed by IssuerSource while RPCs flow (sync; aio pair below), and
renewal through an outage of the CA.

The CA and the sources run on the test's ManualClock (tests/agent/conftest.py): the renewal
schedule is stepped, not waited out, so a loaded machine cannot make a renewal late. The
handshakes, the certificates and the CA are real. What the server presents is read on the wire,
from a new TLS handshake, not from its source."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest

import meshid
import meshid.aio
from conftest import CLOCKED_LIFETIME, presented_serial, step
from meshid._proto import greeter_pb2, greeter_pb2_grpc  # the example service's messages
from meshid.agent import IssuerSource
from support import eventually

pytestmark = pytest.mark.timeout(120)

SERVER_ID = "spiffe://example.org/ns/prod/sa/greeter"
CLIENT_ID = "spiffe://example.org/ns/prod/sa/frontend"


class Reporter(greeter_pb2_grpc.GreeterServicer):
    """Replies with the serial of the caller's certificate."""

    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message="", caller=format(meshid.peer_identity(context).serial, "x"))


class AioReporter(greeter_pb2_grpc.GreeterServicer):
    async def SayHello(self, request: Any, context: Any) -> Any:
        return Reporter().SayHello(request, context)


def _policy() -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [CLIENT_ID]}]}
    )


def _sources(ca) -> tuple[IssuerSource, IssuerSource]:
    started = []
    for sid in (SERVER_ID, CLIENT_ID):
        token = ca.enroll(sid, CLOCKED_LIFETIME)
        source = IssuerSource(ca.address, ca.bundle_file, join_token=token, refresh_interval=3600, clock=ca.clock)
        started.append(source.start())
    return started[0], started[1]


def _serial(source: IssuerSource) -> str:
    return format(source.get_svid().serial, "x")


def test_sync_client_and_server_rotate_ten_times_with_zero_failed_rpcs(clocked_ca, clock, tmp_path) -> None:
    server_source, client_source = _sources(clocked_ca)
    interceptor = meshid.AuthorizationInterceptor(_policy(), source=server_source)
    interceptor.set_revocation_check(server_source.is_revoked)
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Reporter(), server)
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
    server.start()
    ok, failures = 0, []
    client_serials: set[str] = set()
    server_serials: set[int] = set()
    steps = 0
    stop = threading.Event()
    try:
        with meshid.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID) as channel:
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
                        client_serials.add(reply.caller)
                    time.sleep(0.02)

            callers = [threading.Thread(target=caller) for _ in range(4)]  # calls keep flowing through every step
            for t in callers:
                t.start()

            def look() -> None:
                """Wait until the server has seen the client's current certificate; read its own on the wire."""
                current = _serial(client_source)
                eventually(lambda: current in client_serials, 10, "the server to see the client's current certificate")
                server_serials.add(presented_serial(port, client_source.get_svid(), client_source.get_bundles(), tmp_path))

            try:
                look()
                while server_source.state.renewals < 10 or client_source.state.renewals < 10:
                    steps += 1
                    assert steps <= 80, f"no ten renewals each in 80 steps: {server_source.state}, {client_source.state}"
                    step(clock, waiters=2)
                    look()
            finally:
                stop.set()
                for t in callers:
                    t.join()
            rotations = channel.rotations
    finally:
        stop.set()
        server.stop(None)
        server_source.close()
        client_source.close()
    print(
        f"\nrotation (sync): {ok} RPCs OK, {len(failures)} failed; {steps} steps, {clock.monotonic():.0f} s of clock; "
        f"server renewed {server_source.state.renewals}x, client {client_source.state.renewals}x; "
        f"channel rebuilt {rotations}x; client serials seen by the server {len(client_serials)}, "
        f"server serials on the wire {len(server_serials)}"
    )
    assert failures == []
    assert server_source.state.renewals >= 10 and client_source.state.renewals >= 10
    assert len(client_serials) >= 11  # the server saw the client's new certificates
    assert len(server_serials) >= 11  # and presented its own new ones
    assert rotations >= 10


def test_aio_client_and_server_rotate_ten_times_with_zero_failed_rpcs(clocked_ca, clock, tmp_path) -> None:
    server_source, client_source = _sources(clocked_ca)

    async def run() -> tuple[int, list[str], set[str], set[int], int, int]:
        interceptor = meshid.aio.AuthorizationInterceptor(_policy(), source=server_source)
        server = grpc.aio.server(interceptors=[interceptor])
        greeter_pb2_grpc.add_GreeterServicer_to_server(AioReporter(), server)
        port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
        await server.start()
        ok, failures, client_serials, server_serials, steps = 0, [], set(), set(), 0
        try:
            async with meshid.aio.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID) as channel:
                stub = greeter_pb2_grpc.GreeterStub(channel)

                async def four_calls() -> None:
                    nonlocal ok
                    replies = await asyncio.gather(
                        *(stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=5) for _ in range(4)),
                        return_exceptions=True,
                    )
                    for reply in replies:
                        if isinstance(reply, BaseException):
                            failures.append(repr(reply))
                        else:
                            ok += 1
                            client_serials.add(reply.caller)

                async def look() -> None:
                    """Call until the server has seen the client's current certificate (the channel
                    follows a rotation on its loop); read the server's own on the wire."""
                    current, deadline = _serial(client_source), time.monotonic() + 10
                    await four_calls()
                    while current not in client_serials:
                        assert time.monotonic() < deadline, "the server never saw the client's current certificate"
                        await asyncio.sleep(0.02)
                        await four_calls()
                    svid, bundles = client_source.get_svid(), client_source.get_bundles()
                    server_serials.add(await asyncio.to_thread(presented_serial, port, svid, bundles, tmp_path))

                await look()
                while server_source.state.renewals < 10 or client_source.state.renewals < 10:
                    steps += 1
                    assert steps <= 80, f"no ten renewals each in 80 steps: {server_source.state}, {client_source.state}"
                    await asyncio.to_thread(step, clock, 2)
                    await look()
                rotations = channel.rotations
        finally:
            await server.stop(None)
        return ok, failures, client_serials, server_serials, rotations, steps

    try:
        ok, failures, client_serials, server_serials, rotations, steps = asyncio.run(run())
    finally:
        server_source.close()
        client_source.close()
    print(
        f"\nrotation (aio): {ok} RPCs OK, {len(failures)} failed; {steps} steps; channel rebuilt {rotations}x; "
        f"client serials {len(client_serials)}, server serials on the wire {len(server_serials)}"
    )
    assert failures == []
    assert len(client_serials) >= 11
    assert len(server_serials) >= 11
    assert rotations >= 10


def test_issuer_outage_shorter_than_the_lifetime_costs_nothing(clocked_ca, clock) -> None:
    token = clocked_ca.enroll(CLIENT_ID, CLOCKED_LIFETIME)
    source = IssuerSource(clocked_ca.address, clocked_ca.bundle_file, join_token=token, clock=clock).start()
    try:
        first = source.get_svid()
        clocked_ca.stop()
        # Down past the renewal time (at most half the lifetime) and through two retries after
        # it: about two thirds of the lifetime, and the next retry still comes before expiry.
        while source.state.failures < 3:
            step(clock)
            assert source.get_svid().not_after > clock.now()  # still presentable
        assert source.state.last_error is not None
        assert source.get_svid() is first
        down_for = clock.monotonic()
        clocked_ca.restart()
        while source.get_svid() is first:
            assert clock.now() < first.not_after, "did not renew before the SVID expired, after the CA came back"
            step(clock)
        print(
            f"\noutage: CA down {down_for:.1f} s of a {CLOCKED_LIFETIME.total_seconds():.0f} s lifetime, "
            f"{source.state.failures} failed attempts; renewed {clock.monotonic() - down_for:.1f} s after it came back"
        )
        assert source.get_svid().not_after > first.not_after
        assert source.state.last_error is None
    finally:
        source.close()


def test_issuer_gone_past_expiry_is_reported(clocked_ca, clock, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="meshid.agent")
    token = clocked_ca.enroll(CLIENT_ID, CLOCKED_LIFETIME)
    source = IssuerSource(clocked_ca.address, clocked_ca.bundle_file, join_token=token, clock=clock).start()
    try:
        clocked_ca.stop()
        steps = 0
        while not any("EXPIRED" in r.getMessage() for r in caplog.records):
            steps += 1
            assert steps <= 40, f"no EXPIRED report in 40 steps: {source.state}"
            step(clock)
        state = source.state
        print(f"\nexpiry: EXPIRED reported after {steps} steps, {clock.monotonic():.1f} s of clock")
        # measured on the source's clock (the test's), not the machine's: there it has not expired
        assert state.read_at == clock.now() and state.expires_at is not None and state.expires_at <= clock.now()
        assert state.expired and state.expires_at > datetime.datetime.now(datetime.UTC)
        assert state.last_error and "UNAVAILABLE" in state.last_error
        assert any("EXPIRED" in r.getMessage() and CLIENT_ID in r.getMessage() for r in caplog.records)
    finally:
        source.close()
