"""meshid.aio.server: every way a handler reaches a grpc.aio server is guarded, over real mTLS.

The shared behaviour (refusals, the four RPC shapes, audit, reload) runs against it in
test_aio_interceptors.py and test_interceptor_flavours.py; these are the ways around it."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

import meshid
import meshid.aio
from meshid._proto import greeter_pb2
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, AioGreeter

SERVICE, METHOD = SAY_HELLO.strip("/").split("/")


def _handlers() -> dict[str, grpc.RpcMethodHandler]:
    return {
        METHOD: grpc.unary_unary_rpc_method_handler(
            AioGreeter().SayHello,
            request_deserializer=greeter_pb2.HelloRequest.FromString,
            response_serializer=greeter_pb2.HelloReply.SerializeToString,
        )
    }


async def _outcomes(server: grpc.aio.Server, ca, bundles, server_source, method: str = SAY_HELLO) -> list[str]:
    """What the allowed and then the refused caller get from ``method`` on ``server``."""
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
    await server.start()
    out = []
    try:
        for sid in (FRONTEND_ID, INTRUDER_ID):
            source = meshid.StaticSource(ca.issue_svid(sid), bundles)
            async with meshid.aio.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                call = channel.unary_unary(
                    method,
                    request_serializer=greeter_pb2.HelloRequest.SerializeToString,
                    response_deserializer=greeter_pb2.HelloReply.FromString,
                )
                try:
                    reply = await call(greeter_pb2.HelloRequest(name="x"), timeout=10)
                    out.append(f"OK {reply.caller}")
                except grpc.RpcError as err:
                    out.append(err.code().name)
    finally:
        await server.stop(None)
    return out


def test_registered_method_handlers_alone_are_guarded(ca, bundles, server_source, policy) -> None:
    # grpc serves a registered handler before asking any generic handler: it must not be a way round.
    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        server = meshid.aio.server(interceptor)
        server.add_registered_method_handlers(SERVICE, _handlers())
        return await _outcomes(server, ca, bundles, server_source)

    assert asyncio.run(run()) == [f"OK {FRONTEND_ID}", "PERMISSION_DENIED"]


@pytest.mark.parametrize("how", ["handlers argument", "add_generic_rpc_handlers"])
def test_generic_handlers_are_guarded(how: str, ca, bundles, server_source, policy) -> None:
    generic = grpc.method_handlers_generic_handler(SERVICE, _handlers())

    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        if how == "handlers argument":
            server = meshid.aio.server(interceptor, handlers=[generic])
        else:
            server = meshid.aio.server(interceptor)
            server.add_generic_rpc_handlers([generic])
        return await _outcomes(server, ca, bundles, server_source)

    assert asyncio.run(run()) == [f"OK {FRONTEND_ID}", "PERMISSION_DENIED"]


def test_a_method_no_handler_implements_is_authorized_before_unimplemented(ca, bundles, server_source, policy) -> None:
    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        server = meshid.aio.server(interceptor)  # no handler at all
        return await _outcomes(server, ca, bundles, server_source, "/meshid.examples.v1.Greeter/NoSuchMethod")

    assert asyncio.run(run()) == ["UNIMPLEMENTED", "PERMISSION_DENIED"]


def test_the_servers_interceptors_run_before_the_decision(ca, bundles, server_source, policy) -> None:
    seen: list[str] = []

    class Record(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            seen.append(details.method)
            return await continuation(details)

    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        server = meshid.aio.server(interceptor, interceptors=[Record()])
        server.add_registered_method_handlers(SERVICE, _handlers())
        return await _outcomes(server, ca, bundles, server_source)

    assert asyncio.run(run()) == [f"OK {FRONTEND_ID}", "PERMISSION_DENIED"]
    assert seen == [SAY_HELLO, SAY_HELLO]


def test_it_is_a_grpc_aio_server(server_source, policy) -> None:
    async def run():
        server = meshid.aio.server(meshid.aio.AuthorizationInterceptor(policy, source=server_source))
        assert isinstance(server, grpc.aio.Server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        await server.start()
        await server.stop(None)
        assert await server.wait_for_termination(timeout=5) is False  # False: it did not time out

    asyncio.run(run())


def test_a_sync_interceptor_is_a_type_error(server_source, policy) -> None:
    sync = meshid.AuthorizationInterceptor(policy, source=server_source)
    with pytest.raises(TypeError, match=r"meshid\.aio\.server: authorization must be a meshid\.aio\.AuthorizationInterceptor"):
        meshid.aio.server(sync)  # type: ignore[arg-type]


def test_the_interceptor_listed_again_is_a_value_error(server_source, policy) -> None:
    interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)

    async def run():
        with pytest.raises(ValueError, match="do not list it in interceptors too"):
            meshid.aio.server(interceptor, interceptors=[interceptor])

    asyncio.run(run())
