"""meshid.server: every way a handler reaches a grpc server is guarded, over real mTLS
(pair: test_aio_guard.py).

The shared behaviour (refusals, the four RPC shapes, audit, reload) runs against it in
test_interceptors.py and test_interceptor_flavours.py; these are the ways around it."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

import meshid
from meshid._proto import greeter_pb2
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, Greeter

SERVICE, METHOD = SAY_HELLO.strip("/").split("/")


def _handlers() -> dict[str, grpc.RpcMethodHandler]:
    return {
        METHOD: grpc.unary_unary_rpc_method_handler(
            Greeter().SayHello,
            request_deserializer=greeter_pb2.HelloRequest.FromString,
            response_serializer=greeter_pb2.HelloReply.SerializeToString,
        )
    }


def _outcomes(server: grpc.Server, ca, bundles, server_source, method: str = SAY_HELLO) -> list[str]:
    """What the allowed and then the refused caller get from ``method`` on ``server``."""
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
    server.start()
    out = []
    try:
        for sid in (FRONTEND_ID, INTRUDER_ID):
            source = meshid.StaticSource(ca.issue_svid(sid), bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                call = channel.unary_unary(
                    method,
                    request_serializer=greeter_pb2.HelloRequest.SerializeToString,
                    response_deserializer=greeter_pb2.HelloReply.FromString,
                )
                try:
                    out.append(f"OK {call(greeter_pb2.HelloRequest(name='x'), timeout=10).caller}")
                except grpc.RpcError as err:
                    out.append(err.code().name)
    finally:
        server.stop(None).wait()
    return out


def _server(policy, server_source, **kw) -> grpc.Server:
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    return meshid.server(interceptor, futures.ThreadPoolExecutor(max_workers=4), **kw)


def test_registered_method_handlers_alone_are_guarded(ca, bundles, server_source, policy) -> None:
    # grpc serves a registered handler before asking any generic handler: it must not be a way round.
    server = _server(policy, server_source)
    server.add_registered_method_handlers(SERVICE, _handlers())
    assert _outcomes(server, ca, bundles, server_source) == [f"OK {FRONTEND_ID}", "PERMISSION_DENIED"]


@pytest.mark.parametrize("how", ["handlers argument", "add_generic_rpc_handlers"])
def test_generic_handlers_are_guarded(how: str, ca, bundles, server_source, policy) -> None:
    generic = grpc.method_handlers_generic_handler(SERVICE, _handlers())
    if how == "handlers argument":
        server = _server(policy, server_source, handlers=[generic])
    else:
        server = _server(policy, server_source)
        server.add_generic_rpc_handlers([generic])
    assert _outcomes(server, ca, bundles, server_source) == [f"OK {FRONTEND_ID}", "PERMISSION_DENIED"]


def test_a_method_no_handler_implements_is_authorized_before_unimplemented(ca, bundles, server_source, policy) -> None:
    server = _server(policy, server_source)  # no handler at all
    outcomes = _outcomes(server, ca, bundles, server_source, "/meshid.examples.v1.Greeter/NoSuchMethod")
    assert outcomes == ["UNIMPLEMENTED", "PERMISSION_DENIED"]


def test_the_servers_interceptors_run_before_the_decision(ca, bundles, server_source, policy) -> None:
    seen: list[str] = []

    class Record(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            seen.append(details.method)
            return continuation(details)

    server = _server(policy, server_source, interceptors=[Record()])
    server.add_registered_method_handlers(SERVICE, _handlers())
    assert _outcomes(server, ca, bundles, server_source) == [f"OK {FRONTEND_ID}", "PERMISSION_DENIED"]
    assert seen == [SAY_HELLO, SAY_HELLO]


def test_it_is_a_grpc_server(server_source, policy) -> None:
    server = _server(policy, server_source)
    assert isinstance(server, grpc.Server)
    assert server.add_insecure_port("127.0.0.1:0") > 0
    server.start()
    server.stop(None).wait(timeout=10)
    assert server.wait_for_termination(timeout=5) is False  # False: it did not time out


def test_an_aio_interceptor_is_a_type_error(server_source, policy) -> None:
    aio = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
    with pytest.raises(TypeError, match=r"meshid\.server: authorization must be a meshid\.AuthorizationInterceptor"):
        meshid.server(aio, futures.ThreadPoolExecutor(max_workers=1))  # type: ignore[arg-type]


def test_the_interceptor_listed_again_is_a_value_error(server_source, policy) -> None:
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    with pytest.raises(ValueError, match="do not list it in interceptors too"):
        meshid.server(interceptor, futures.ThreadPoolExecutor(max_workers=1), interceptors=[interceptor])
