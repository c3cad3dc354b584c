"""Rotation under load: short-lived SVIDs renewed by IssuerSource while RPCs flow (sync; aio pair below)."""

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
from meshid._proto import greeter_pb2, greeter_pb2_grpc  # the example service's messages
from meshid.agent import IssuerSource

pytestmark = pytest.mark.timeout(120)

SERVER_ID = "spiffe://example.org/ns/prod/sa/greeter"
CLIENT_ID = "spiffe://example.org/ns/prod/sa/frontend"
LIFETIME = datetime.timedelta(seconds=3)  # short, with room for a loaded CI machine


class Reporter(greeter_pb2_grpc.GreeterServicer):
    """Replies with the serial of the caller's certificate and of the server's current one."""

    def __init__(self, source: IssuerSource) -> None:
        self._source = source

    def SayHello(self, request: Any, context: Any) -> Any:
        caller = meshid.peer_identity(context)
        return greeter_pb2.HelloReply(
            message=format(self._source.get_svid().serial, "x"), caller=format(caller.serial, "x")
        )

    async def _aio(self, request: Any, context: Any) -> Any:
        return self.SayHello(request, context)


def _policy() -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [CLIENT_ID]}]}
    )


def _sources(running_ca) -> tuple[IssuerSource, IssuerSource]:
    server_token = running_ca.enroll(SERVER_ID, LIFETIME)
    client_token = running_ca.enroll(CLIENT_ID, LIFETIME)
    server_source = IssuerSource(
        running_ca.address, running_ca.bundle_file, join_token=server_token, refresh_interval=1.0
    )
    client_source = IssuerSource(
        running_ca.address, running_ca.bundle_file, join_token=client_token, refresh_interval=1.0
    )
    return server_source.start(), client_source.start()


def test_sync_client_and_server_rotate_ten_times_with_zero_failed_rpcs(running_ca) -> None:
    server_source, client_source = _sources(running_ca)
    interceptor = meshid.AuthorizationInterceptor(_policy(), source=server_source)
    interceptor.set_revocation_check(server_source.is_revoked)
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Reporter(server_source), server)
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
    server.start()
    ok, failures = 0, []
    server_serials, client_serials = [], []
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
                        if not server_serials or server_serials[-1] != reply.message:
                            server_serials.append(reply.message)
                        if not client_serials or client_serials[-1] != reply.caller:
                            client_serials.append(reply.caller)
                    time.sleep(0.02)

            callers = [threading.Thread(target=caller) for _ in range(4)]  # ~ several RPCs every 100 ms
            for t in callers:
                t.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                server_source.state.renewals < 10 or client_source.state.renewals < 10 or len(client_serials) < 11
            ):
                time.sleep(0.2)
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
        f"\nrotation (sync): {ok} RPCs OK, {len(failures)} failed; server renewed {server_source.state.renewals}x, "
        f"client {client_source.state.renewals}x; channel rebuilt {rotations}x; "
        f"distinct client serials seen by server {len(set(client_serials))}, server serials reported {len(set(server_serials))}"
    )
    assert failures == []
    assert server_source.state.renewals >= 10 and client_source.state.renewals >= 10
    assert len(set(client_serials)) >= 11  # the server saw the client's new certificates
    assert len(set(server_serials)) >= 11
    assert rotations >= 10


def test_aio_client_and_server_rotate_ten_times_with_zero_failed_rpcs(running_ca) -> None:
    server_source, client_source = _sources(running_ca)

    class AioReporter(greeter_pb2_grpc.GreeterServicer):
        async def SayHello(self, request: Any, context: Any) -> Any:
            return Reporter(server_source).SayHello(request, context)

    async def run() -> tuple[int, list[str], list[str], int]:
        interceptor = meshid.aio.AuthorizationInterceptor(_policy(), source=server_source)
        server = grpc.aio.server(interceptors=[interceptor])
        greeter_pb2_grpc.add_GreeterServicer_to_server(AioReporter(), server)
        port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
        await server.start()
        ok, failures, client_serials = 0, [], []
        try:
            async with meshid.aio.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID) as channel:
                stub = greeter_pb2_grpc.GreeterStub(channel)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and (
                    server_source.state.renewals < 10 or client_source.state.renewals < 10 or len(client_serials) < 11
                ):
                    replies = await asyncio.gather(
                        *(stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=5) for _ in range(4)),
                        return_exceptions=True,
                    )
                    for reply in replies:
                        if isinstance(reply, BaseException):
                            failures.append(repr(reply))
                        else:
                            ok += 1
                            if not client_serials or client_serials[-1] != reply.caller:
                                client_serials.append(reply.caller)
                    await asyncio.sleep(0.05)
                rotations = channel.rotations
        finally:
            await server.stop(None)
        return ok, failures, client_serials, rotations

    try:
        ok, failures, client_serials, rotations = asyncio.run(run())
    finally:
        server_source.close()
        client_source.close()
    print(
        f"\nrotation (aio): {ok} RPCs OK, {len(failures)} failed; channel rebuilt {rotations}x; client serials {len(set(client_serials))}"
    )
    assert failures == []
    assert len(set(client_serials)) >= 11
    assert rotations >= 10


def test_issuer_outage_shorter_than_the_lifetime_costs_nothing(running_ca, caplog) -> None:
    lifetime = datetime.timedelta(seconds=12)
    token = running_ca.enroll(CLIENT_ID, lifetime)
    source = IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token, refresh_interval=1.0).start()
    try:
        first = source.get_svid()
        running_ca.stop()
        # Down for longer than one renewal interval (~6 s) but shorter than the lifetime (12 s).
        outage_end = time.monotonic() + 8
        while time.monotonic() < outage_end:
            assert source.get_svid().not_after > datetime.datetime.now(datetime.UTC)  # still presentable
            time.sleep(0.2)
        assert source.state.failures >= 1 and source.state.last_error is not None
        assert source.get_svid() is first
        running_ca.restart()
        deadline = time.monotonic() + 10
        while source.get_svid() is first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert source.get_svid() is not first, "did not renew after the CA came back"
        assert source.get_svid().not_after > first.not_after
        assert source.state.last_error is None
    finally:
        source.close()


def test_issuer_gone_past_expiry_is_reported(running_ca, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="meshid.agent")
    token = running_ca.enroll(CLIENT_ID, datetime.timedelta(seconds=3))
    source = IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token).start()
    try:
        running_ca.stop()
        deadline = time.monotonic() + 15
        while not source.state.expired and time.monotonic() < deadline:
            time.sleep(0.1)
        while not any("EXPIRED" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.1)
        state = source.state
        assert state.expired
        assert state.last_error and "UNAVAILABLE" in state.last_error
        assert any("EXPIRED" in r.getMessage() and CLIENT_ID in r.getMessage() for r in caplog.records)
    finally:
        source.close()
