"""The grpc.aio channel that follows its identity source (see :mod:`meshid.channel`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from meshid.channel import DEFAULT_DRAIN_TIMEOUT
from meshid.credentials import ServerId, channel_credentials, merge_options
from meshid.sources import Source

__all__ = ["RotatingChannel", "secure_channel"]

log = logging.getLogger("meshid.channel")


class _Generation:
    """One underlying aio channel and its calls in flight; touched only on the event loop."""

    __slots__ = ("channel", "closed", "closing", "inflight", "retired")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.closing: asyncio.Future[None] | None = None
        self.inflight = 0
        self.retired = False
        self.closed = False

    def end(self, *_: object) -> None:
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self.close()

    def retire(self, loop: asyncio.AbstractEventLoop, drain_timeout: float) -> None:
        self.retired = True
        if self.inflight == 0:
            self.close()
        else:
            loop.call_later(drain_timeout, self.close)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.closing = asyncio.ensure_future(self.channel.close(None))


class RotatingChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose credentials follow an identity source.

    Build it inside a running event loop with :func:`secure_channel`; source changes (which
    may come from any thread) are applied on that loop.
    """

    def __init__(
        self,
        target: str,
        source: Source,
        *,
        server_id: ServerId | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._target = target
        self._source = source
        self._server_id = server_id
        self._options = list(options or ())
        self._drain_timeout = drain_timeout
        self._closed = False
        self._state = (source.get_svid(), source.get_bundles())
        self._current = _Generation(self._build())
        self.rotations = 0
        self._unsubscribe = source.subscribe(self._on_change_threadsafe)

    def _build(self) -> grpc.aio.Channel:
        creds, pins = channel_credentials(self._source, server_id=self._server_id)
        return grpc.aio.secure_channel(self._target, creds, options=merge_options(pins, self._options))

    def _on_change_threadsafe(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_change)

    def _on_change(self) -> None:
        state = (self._source.get_svid(), self._source.get_bundles())
        if self._closed or (state[0] is self._state[0] and state[1] is self._state[1]):
            return
        try:
            new = _Generation(self._build())
        except Exception:
            log.exception("channel to %s: cannot use the new identity; keeping the current one", self._target)
            return
        old, self._current, self._state = self._current, new, state
        self.rotations += 1
        old.retire(self._loop, self._drain_timeout)

    def _begin(self) -> _Generation:
        if self._closed:
            raise grpc.aio.UsageError("Cannot invoke RPC: Channel closed!")
        generation = self._current
        generation.inflight += 1
        return generation

    def _multi(self, kind: str, method: str, ser: Any, deser: Any, registered: bool) -> Any:
        return _MultiCallable(self, kind, (method, ser, deser, registered))

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return self._multi("unary_unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return self._multi("unary_stream", method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return self._multi("stream_unary", method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return self._multi("stream_stream", method, request_serializer, response_deserializer, _registered_method)

    async def close(self, grace: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        await self._current.channel.close(grace)

    async def __aenter__(self) -> RotatingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._current.channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._current.channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._current.channel.channel_ready()


class _MultiCallable:
    __slots__ = ("_args", "_cached", "_kind", "_owner")

    def __init__(self, owner: RotatingChannel, kind: str, args: tuple[Any, ...]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._cached: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation = self._owner._begin()
        try:
            cached = self._cached
            if cached is None or cached[0] is not generation.channel:
                method, ser, deser, registered = self._args
                factory = getattr(generation.channel, self._kind)
                cached = (generation.channel, factory(method, ser, deser, _registered_method=registered))
                self._cached = cached
            call = cached[1](*args, **kwargs)
        except BaseException:
            generation.end()
            raise
        call.add_done_callback(generation.end)
        return call


def secure_channel(
    target: str,
    source: Source,
    *,
    server_id: ServerId | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> RotatingChannel:
    """The ``grpc.aio`` twin of :func:`meshid.secure_channel`; call it inside a running event loop."""
    return RotatingChannel(target, source, server_id=server_id, options=options, drain_timeout=drain_timeout)
