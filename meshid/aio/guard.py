"""A ``grpc.aio`` server whose handlers are guarded by meshid's authorization, with no interceptor.

grpc.aio runs each server interceptor as a coroutine around the handler lookup on every call;
measured in ``bench/hotpath.py`` that costs several times what meshid's decision does. The
guarded server wraps each method handler once, as it is registered, so a call goes straight to
the wrapped handler: the same decision, the same audit records, the same refusals as
:class:`meshid.aio.AuthorizationInterceptor`, whose wrapping it reuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshid.aio.interceptors import AuthorizationInterceptor

__all__ = ["server"]

if TYPE_CHECKING:
    _MethodHandler = grpc.RpcMethodHandler[Any, Any]
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc's runtime classes are not subscriptable: the parameterized ones are for the type checker
    _MethodHandler = grpc.RpcMethodHandler
    _GenericHandler = grpc.GenericRpcHandler
    _Interceptor = grpc.aio.ServerInterceptor


class _Guard(_GenericHandler):
    """The server's one generic handler: asks the application's generic handlers in the order
    they were added and guards what they answer; a method none implements is guarded too (the
    peer is authorized before it learns the method does not exist)."""

    def __init__(self, authorization: AuthorizationInterceptor) -> None:
        self._authorization = authorization
        self.handlers: list[_GenericHandler] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _MethodHandler:
        for generic in self.handlers:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return self._authorization._guarded(handler, handler_call_details.method)
        return self._authorization._guarded(None, handler_call_details.method)


class _GuardedServer(grpc.aio.Server):
    """A ``grpc.aio.Server`` that guards every handler added to it; the rest is grpc's server."""

    def __init__(self, authorization: AuthorizationInterceptor, inner_kwargs: dict[str, Any]) -> None:
        self._authorization = authorization
        self._guard = _Guard(authorization)
        self._server = grpc.aio.server(handlers=(self._guard,), **inner_kwargs)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[_GenericHandler]) -> None:
        self._guard.handlers.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, _MethodHandler]) -> None:
        # grpc prefers a registered handler to a generic one: each is guarded here, once.
        guarded = {
            name: self._authorization._guarded(handler, f"/{service_name}/{name}")
            for name, handler in method_handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, guarded)  # type: ignore[attr-defined]  # not in grpc-stubs

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


def server(
    authorization: AuthorizationInterceptor,
    *,
    migration_thread_pool: Executor | None = None,
    handlers: Sequence[_GenericHandler] = (),
    interceptors: Sequence[_Interceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
) -> grpc.aio.Server:
    """A ``grpc.aio`` server (as :func:`grpc.aio.server` makes, with the same keyword arguments)
    whose every call is authorized by ``authorization``, cheaper than passing it as an interceptor.

    Every handler the server gets, through ``handlers``, ``add_generic_rpc_handlers`` or
    ``add_registered_method_handlers`` (generated ``add_*Servicer_to_server`` calls both), is
    guarded; so is a method none implements. ``interceptors`` run before the decision (as
    interceptors listed before meshid's would). Starting and closing ``authorization`` stays
    the caller's (``start()``/``close()`` or ``with``).

    Raises:
        TypeError: ``authorization`` is not a :class:`meshid.aio.AuthorizationInterceptor`.
        ValueError: ``authorization`` is also among ``interceptors`` (it would decide twice).
    """
    if not isinstance(authorization, AuthorizationInterceptor):
        raise TypeError(
            f"meshid.aio.server: authorization must be a meshid.aio.AuthorizationInterceptor, "
            f"not {type(authorization).__name__}"
        )
    if any(i is authorization for i in interceptors):
        raise ValueError(
            "meshid.aio.server: the authorization interceptor guards the server; do not list it in interceptors too"
        )
    guarded = _GuardedServer(
        authorization,
        {
            "migration_thread_pool": migration_thread_pool,
            "interceptors": tuple(interceptors),
            "options": tuple(options),
            "maximum_concurrent_rpcs": maximum_concurrent_rpcs,
            "compression": compression,
        },
    )
    guarded.add_generic_rpc_handlers(handlers)
    return guarded
