"""The grpc.aio server interceptor: the same decision path as the sync one, adapted to asyncio."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio

from meshid import peer as _peer
from meshid._authorizer import Authorizer, PolicyInput, Refusal, TrustInput
from meshid.authz.policy import AuthorizationPolicy
from meshid.forwarded import XFCC_HEADER
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId

__all__ = ["AuthorizationInterceptor"]

# grpc-stubs declares the interceptor generic in (request, response); grpc's runtime class is
# not subscriptable, so the parameterized base exists for the type checker only.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


async def _unknown_method(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


class AuthorizationInterceptor(_ServerInterceptor):
    """Authorizes every call of a ``grpc.aio`` server; see :class:`meshid.AuthorizationInterceptor`.

    The caller's identity is available to handlers through :func:`meshid.peer_identity`.
    """

    def __init__(
        self,
        policy: PolicyInput,
        *,
        source: TrustInput,
        poll_interval: float = 2.0,
        unauthenticated_methods: Iterable[str] = (),
        trusted_proxies: Iterable[SpiffeId | str] = (),
        forwarded_header: str = XFCC_HEADER,
    ) -> None:
        self._authorizer = Authorizer(
            policy,
            source=source,
            poll_interval=poll_interval,
            unauthenticated_methods=unauthenticated_methods,
            trusted_proxies=trusted_proxies,
            forwarded_header=forwarded_header,
        )
        self._wrapped: dict[tuple[int, str], tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    @property
    def policy(self) -> AuthorizationPolicy:
        return self._authorizer.policy

    def reload(self, policy: AuthorizationPolicy | str | os.PathLike[str] | None = None) -> bool:
        """Replace the policy atomically (or re-read the file); a broken one keeps the old in force."""
        return self._authorizer.reload(policy)

    def set_revocation_check(self, revoked: Callable[[PeerIdentity], bool] | None) -> None:
        self._authorizer.revoked = revoked

    def start(self) -> AuthorizationInterceptor:
        self._authorizer.start()
        return self

    def close(self) -> None:
        self._authorizer.close()

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> PeerIdentity | None:
        # grpc returns each auth property as a list of bytes; grpc-stubs declares an Iterable.
        auth = cast("Mapping[str, Sequence[bytes]]", context.auth_context())
        result = self._authorizer.authorize(auth, method, context.invocation_metadata, context.peer)
        if isinstance(result, Refusal):
            await context.abort(result.code, result.message)
            raise AssertionError("unreachable: abort raises")
        return result

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details) or _UNKNOWN
        method = handler_call_details.method
        # One wrapped handler per (handler, method), made once: the per-call cost is a lookup.
        key = (id(handler), method)
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, method, self._check)
        if len(self._wrapped) >= _WRAPPED_CACHE:  # unknown method names are the caller's to choose
            self._wrapped.clear()
        self._wrapped[key] = (handler, wrapped)
        return wrapped


_WRAPPED_CACHE = 4096
_UNKNOWN = grpc.stream_stream_rpc_method_handler(_unknown_method)
Check = Callable[[Any, str], Awaitable[PeerIdentity | None]]


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], method: str, check: Check) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with ``check`` run first, for each of the four RPC shapes."""
    ser, deser = handler.response_serializer, handler.request_deserializer
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = _peer.set_current(await check(context, method))
            try:
                # grpc-stubs types handlers' behaviours with the sync ServicerContext only (no aio variant).
                return await inner_uu(request, context)  # type: ignore[arg-type]
            finally:
                _peer.reset_current(token)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deser, ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = _peer.set_current(await check(context, method))
            try:
                # grpc-stubs types handlers' behaviours with the sync ServicerContext only (no aio variant).
                return await inner_su(request_iterator, context)  # type: ignore[arg-type]
            finally:
                _peer.reset_current(token)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deser, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap_streaming(handler.unary_stream, check, method), deser, ser)
    return grpc.stream_stream_rpc_method_handler(_wrap_streaming(handler.stream_stream, check, method), deser, ser)


def _wrap_streaming(inner: Any, check: Check, method: str) -> Any:
    """Wrap a streaming-response behaviour, which is an async generator or a coroutine using context.write."""
    if inspect.isasyncgenfunction(inner):

        async def as_generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            token = _peer.set_current(await check(context, method))
            try:
                async for response in inner(request, context):
                    yield response
            finally:
                _peer.reset_current(token)

        return as_generator

    async def as_coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = _peer.set_current(await check(context, method))
        try:
            return await inner(request, context)
        finally:
            _peer.reset_current(token)

    return as_coroutine
