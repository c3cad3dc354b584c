"""The grpc.aio server interceptor: the same decision path as the sync one, adapted to asyncio."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshid import peer as _peer
from meshid._authorizer import STR_KEY_NAMES, InterceptorBase, Refusal
from meshid.peer import PeerIdentity

__all__ = ["AuthorizationInterceptor"]

# grpc-stubs declares the interceptor generic in (request, response); grpc's runtime class is
# not subscriptable, so the parameterized base exists for the type checker only.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


async def _unknown_method(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


class AuthorizationInterceptor(InterceptorBase, _ServerInterceptor):
    """Authorizes every call of a ``grpc.aio`` server; see :class:`meshid.AuthorizationInterceptor`.

    The caller's identity is available to handlers through :func:`meshid.peer_identity`.
    """

    def _check(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, known: bool = True
    ) -> PeerIdentity | Refusal | None:
        # Not a coroutine: an allowed call (nearly every one) awaits nothing here; the wrapper
        # awaits only a refusal's abort.
        # grpc returns each auth property as a list of bytes; grpc-stubs declares an Iterable.
        auth: Mapping[str, Sequence[bytes]] = context.auth_context()  # type: ignore[assignment]
        if known:  # a repeat call found in the memo needs nothing more (an unknown method is never filed)
            result = self._authorizer.repeat_call(auth.get, STR_KEY_NAMES, method, context.peer)
            if result is not None:
                return result
        return self._authorizer.authorize(auth, method, context.invocation_metadata, context.peer, known=known)

    async def _recheck(self, context: grpc.aio.ServicerContext[Any, Any], identity: PeerIdentity) -> None:
        refusal = self._authorizer.recheck(identity)
        if refusal is not None:
            await context.abort(refusal.code, refusal.message)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is not None:  # a repeat call: one lookup, inline (no frame more per call)
            kept = self._wrapped.get((id(handler), method))
            if kept is not None and kept[0] is handler:
                return kept[1]
        return self._guarded(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        return _wrap(handler, method, self._check, self._recheck)

    def _wrap_unknown(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        return _wrap(_UNKNOWN, method, lambda context, m: self._check(context, m, False), self._recheck)


_UNKNOWN = grpc.stream_stream_rpc_method_handler(_unknown_method)
Check = Callable[[Any, str], "PeerIdentity | Refusal | None"]
Recheck = Callable[[Any, PeerIdentity], Awaitable[None]]


async def _checked(context: Any, result: PeerIdentity | Refusal | None) -> PeerIdentity | None:
    """The peer a check admitted; a refusal aborts the call (and so raises)."""
    if isinstance(result, Refusal):
        await context.abort(result.code, result.message)
        raise AssertionError("unreachable: abort raises")
    return result


async def _rechecked(items: Any, context: Any, identity: PeerIdentity | None, recheck: Recheck) -> AsyncIterator[Any]:
    """``items`` (a request or response stream), with the peer re-checked before each message:
    a stream outlives neither the peer's certificate nor its revocation."""
    async for item in items:
        if identity is not None:
            await recheck(context, identity)
        yield item


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, check: Check, recheck: Recheck
) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with ``check`` run first, for each of the four RPC shapes. Streams given as
    iterators (a request iterator, an async-generator response) re-check the peer at every
    message; a handler that uses ``context.read()``/``context.write()`` is checked at the start."""
    ser, deser = handler.response_serializer, handler.request_deserializer
    # Every coroutine behaviour sets and resets the peer's ContextVar itself, not through
    # peer.py's helpers: two frames in another module cost microseconds on every call, and a
    # coroutine runs in its task's one context, so the reset cannot come from another (the
    # helpers' fallback, kept for the async generator, which may be closed from elsewhere).
    current = _peer._CURRENT
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            result = check(context, method)  # an allowed call awaits nothing before the handler
            identity = await _checked(context, result) if isinstance(result, Refusal) else result
            token = current.set(identity)
            try:
                # grpc-stubs types handlers' behaviours with the sync ServicerContext only (no aio variant).
                return await inner_uu(request, context)  # type: ignore[arg-type]
            finally:
                current.reset(token)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deser, ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            identity = await _checked(context, check(context, method))
            token = current.set(identity)
            try:
                requests = _rechecked(request_iterator, context, identity, recheck)
                # grpc-stubs types handlers' behaviours with the sync ServicerContext only (no aio variant).
                return await inner_su(requests, context)  # type: ignore[arg-type]
            finally:
                current.reset(token)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deser, ser)
    if handler.unary_stream is not None:
        behaviour = _wrap_streaming(handler.unary_stream, check, recheck, method, streaming_requests=False)
        return grpc.unary_stream_rpc_method_handler(behaviour, deser, ser)
    behaviour = _wrap_streaming(handler.stream_stream, check, recheck, method, streaming_requests=True)
    return grpc.stream_stream_rpc_method_handler(behaviour, deser, ser)


def _wrap_streaming(inner: Any, check: Check, recheck: Recheck, method: str, *, streaming_requests: bool) -> Any:
    """Wrap a streaming-response behaviour, which is an async generator or a coroutine using context.write."""
    if inspect.isasyncgenfunction(inner):

        async def as_generator(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            identity = await _checked(context, check(context, method))
            token = _peer.set_current(identity)
            try:
                if streaming_requests:
                    request = _rechecked(request, context, identity, recheck)
                async for response in _rechecked(inner(request, context), context, identity, recheck):
                    yield response
            finally:
                _peer.reset_current(token)

        return as_generator

    current = _peer._CURRENT  # set and reset as in _wrap's coroutines (see there)

    async def as_coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        identity = await _checked(context, check(context, method))
        token = current.set(identity)
        try:
            if streaming_requests and request is not None:
                request = _rechecked(request, context, identity, recheck)
            return await inner(request, context)
        finally:
            current.reset(token)

    return as_coroutine
