"""What the sync and aio guarded servers share: the generic handler that guards what the
application's generic handlers answer, and the guarding of registered method handlers.

A server interceptor runs on every call around the handler lookup (in grpc.aio as coroutines,
which is what costs); a guarded server wraps each handler once, where it is registered, and a
call goes straight to the wrapped handler. ``guarded(handler, method)`` is the interceptor's
own wrapping (``None``: a method no handler implements), so both ways decide alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    MethodHandler = grpc.RpcMethodHandler[Any, Any]
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:  # grpc's runtime classes are not subscriptable: the parameterized ones are for the type checker
    MethodHandler = grpc.RpcMethodHandler
    GenericHandler = grpc.GenericRpcHandler

Guarded = Callable[["MethodHandler | None", str], "MethodHandler"]


class GuardingHandler(GenericHandler):
    """A server's one generic handler: asks the application's generic handlers in the order
    they were added and guards what they answer; a method none implements is guarded too (the
    peer is authorized before it learns that the method does not exist)."""

    def __init__(self, guarded: Guarded) -> None:
        self._guarded = guarded
        self._handlers: list[GenericHandler] = []

    def add(self, handlers: Iterable[GenericHandler]) -> None:
        self._handlers.extend(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> MethodHandler:
        for generic in self._handlers:
            handler = generic.service(handler_call_details)
            if handler is not None:
                return self._guarded(handler, handler_call_details.method)
        return self._guarded(None, handler_call_details.method)


class GuardedRegistration:
    """What the sync and aio guarded servers do alike: take handlers and ports for ``_server``,
    grpc's own server of either kind, made with ``guard`` as its one generic handler. Listed
    before grpc's ``Server`` base, whose abstract methods these are."""

    def __init__(self, guard: GuardingHandler, guarded: Guarded, server: Any) -> None:
        self._guard, self._guarded, self._server = guard, guarded, server

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[GenericHandler]) -> None:
        self._guard.add(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Mapping[str, MethodHandler]) -> None:
        # grpc serves a registered handler before it asks any generic handler: each is guarded, once.
        guarded = {name: self._guarded(h, f"/{service_name}/{name}") for name, h in method_handlers.items()}
        self._server.add_registered_method_handlers(service_name, guarded)

    def add_insecure_port(self, address: str) -> int:
        port: int = self._server.add_insecure_port(address)
        return port

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        port: int = self._server.add_secure_port(address, server_credentials)
        return port


def check_authorization(where: str, authorization: object, expected: type, interceptors: Iterable[object]) -> None:
    """Raises TypeError unless ``authorization`` is an ``expected`` (named as ``where``'s
    package spells it), ValueError if it is also among ``interceptors`` (it would decide every
    call twice)."""
    if not isinstance(authorization, expected):
        package = where.rsplit(".", 1)[0]
        raise TypeError(
            f"{where}: authorization must be a {package}.{expected.__name__}, not {type(authorization).__name__}"
        )
    if any(i is authorization for i in interceptors):
        raise ValueError(
            f"{where}: the authorization interceptor guards the server; do not list it in interceptors too"
        )
