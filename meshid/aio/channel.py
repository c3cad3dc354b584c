"""The grpc.aio channel that follows its identity source (see :mod:`meshid.channel`).

The logic is :mod:`meshid._channel`'s; this module adapts it to ``grpc.aio``: the channel
belongs to the event loop it was made in, a source's change (from any thread) is applied on
that loop, and a drain timeout is a ``call_later`` there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Unpack

import grpc
import grpc.aio

from meshid._channel import ChannelSettings, Generation, Kind, MethodArgs, MultiCallable, RotatingCore
from meshid.sources import Source

__all__ = ["RotatingChannel", "secure_channel"]


class RotatingChannel(RotatingCore[grpc.aio.Channel], grpc.aio.Channel):
    """A ``grpc.aio.Channel`` whose credentials follow an identity source.

    Build it inside a running event loop with :func:`secure_channel`; source changes (which
    may come from any thread) are applied on that loop.
    """

    _closed_error = grpc.aio.UsageError

    def _bind_runtime(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError as err:
            raise RuntimeError(
                "meshid.aio.secure_channel: no running event loop; call it inside a coroutine "
                "(an async def run by asyncio.run), or use meshid.secure_channel for blocking code"
            ) from err
        # Tasks that look at how a watched call ended (see RotatingCore._watching), kept referenced.
        self._checks: set[asyncio.Task[None]] = set()

    def _watch(self, generation: Generation[grpc.aio.Channel], call: grpc.aio.Call) -> None:
        task = self._loop.create_task(self._check(generation, call))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, generation: Generation[grpc.aio.Channel], call: grpc.aio.Call) -> None:
        try:
            code, details = await call.code(), await call.details()
        except grpc.RpcError:  # no status to read: nothing to say about the server
            return
        self._outcome(generation, code, details)

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _close_channel(self, channel: grpc.aio.Channel) -> asyncio.Future[None]:
        return asyncio.ensure_future(channel.close(None))

    def _call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, callback)

    def _dispatch(self, apply_change: Callable[[], None]) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(apply_change)

    def _multi_callable(self, kind: Kind, args: MethodArgs) -> _MultiCallable:
        return _MultiCallable(self, kind, args)

    async def close(self, grace: float | None = None) -> None:
        current = self._shutdown()
        if current is not None and current.claim():
            await current.channel.close(grace)

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


class _MultiCallable(MultiCallable[grpc.aio.Channel]):
    """Any kind of aio call: it is over when its done-callbacks run."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation, call = self._start(lambda inner: inner(*args, **kwargs))
        call.add_done_callback(generation.end)
        if self._owner._watching(generation):
            owner: RotatingChannel = self._owner  # type: ignore[assignment]
            call.add_done_callback(lambda done: owner._watch(generation, done))
        return call


def secure_channel(target: str, source: Source, **settings: Unpack[ChannelSettings]) -> RotatingChannel:
    """The ``grpc.aio`` twin of :func:`meshid.secure_channel`; call it inside a running event loop.

    Raises:
        RuntimeError: no event loop is running (the message says to call it inside a coroutine).
        SourceError, InvalidSpiffeIdError, ValueError, TypeError: as :func:`meshid.secure_channel`.
    """
    return RotatingChannel(target, source, **settings)
