"""A ``grpc.aio`` server whose handlers are guarded by meshid's authorization, with no interceptor.

grpc.aio runs each server interceptor as coroutines around the handler lookup on every call;
measured in ``bench/hotpath.py`` that costs more than meshid's decision does. The guarded server
wraps each method handler once, as it is registered (:mod:`meshid._guard`), so a call goes
straight to the wrapped handler: the decisions, audit records and refusals of
:class:`meshid.aio.AuthorizationInterceptor`, whose wrapping it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshid._guard import GenericHandler, GuardedRegistration, GuardingHandler, check_authorization
from meshid.aio.interceptors import AuthorizationInterceptor

__all__ = ["server"]

if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class _GuardedServer(GuardedRegistration, grpc.aio.Server):
    """A ``grpc.aio.Server`` that guards every handler added to it; the rest is grpc's server."""

    _server: grpc.aio.Server  # grpc's own server, which serves the calls

    def __init__(self, authorization: AuthorizationInterceptor, inner: dict[str, Any]) -> None:
        guard = GuardingHandler(authorization._guarded)
        super().__init__(guard, authorization._guarded, grpc.aio.server(handlers=(guard,), **inner))

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
    handlers: Sequence[GenericHandler] = (),
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
    check_authorization("meshid.aio.server", authorization, AuthorizationInterceptor, interceptors)
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
