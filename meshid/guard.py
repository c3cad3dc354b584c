"""A grpc server whose handlers are guarded by meshid's authorization, with no interceptor.

The sync twin of :func:`meshid.aio.server`: each method handler is wrapped once, as it is
registered (:mod:`meshid._guard`), so a call goes straight to the wrapped handler, with the
decisions, audit records and refusals of :class:`meshid.AuthorizationInterceptor`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from meshid._guard import GenericHandler, GuardedRegistration, GuardingHandler, check_authorization
from meshid.interceptors import AuthorizationInterceptor

__all__ = ["server"]

if TYPE_CHECKING:
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


class _GuardedServer(GuardedRegistration, grpc.Server):
    """A ``grpc.Server`` that guards every handler added to it; the rest is grpc's server."""

    _server: grpc.Server  # grpc's own server, which serves the calls

    def __init__(
        self, authorization: AuthorizationInterceptor, thread_pool: ThreadPoolExecutor, inner: dict[str, Any]
    ) -> None:
        guard = GuardingHandler(authorization._guarded)
        super().__init__(guard, authorization._guarded, grpc.server(thread_pool, handlers=[guard], **inner))

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None = None) -> threading.Event:
        return self._server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def server(
    authorization: AuthorizationInterceptor,
    thread_pool: ThreadPoolExecutor,
    *,
    handlers: Sequence[GenericHandler] = (),
    interceptors: Sequence[_Interceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
    xds: bool = False,
) -> grpc.Server:
    """A grpc server (as :func:`grpc.server` makes, with the same arguments) whose every call
    is authorized by ``authorization``, without an interceptor.

    Every handler the server gets, through ``handlers``, ``add_generic_rpc_handlers`` or
    ``add_registered_method_handlers`` (generated ``add_*Servicer_to_server`` calls both), is
    guarded; so is a method none implements. ``interceptors`` run before the decision (as
    interceptors listed before meshid's would). Starting and closing ``authorization`` stays
    the caller's (``start()``/``close()`` or ``with``).

    Raises:
        TypeError: ``authorization`` is not a :class:`meshid.AuthorizationInterceptor`.
        ValueError: ``authorization`` is also among ``interceptors`` (it would decide twice).
    """
    check_authorization("meshid.server", authorization, AuthorizationInterceptor, interceptors)
    guarded = _GuardedServer(
        authorization,
        thread_pool,
        {
            "interceptors": tuple(interceptors),
            "options": tuple(options),
            "maximum_concurrent_rpcs": maximum_concurrent_rpcs,
            "compression": compression,
            "xds": xds,
        },
    )
    guarded.add_generic_rpc_handlers(handlers)
    return guarded
