"""Client channels that follow their identity source.

grpc channel credentials are fixed when the channel is made, so a rotated SVID (or a new
bundle) needs a new channel. :func:`secure_channel` returns a :class:`RotatingChannel`: it
looks like one ``grpc.Channel``; underneath, each change of the source builds a new channel
for new calls, while calls in flight finish on the old one, which is closed once they have
(or after ``drain_timeout`` seconds at most).

Stubs made once keep working: the multi-callables a stub holds pick the current channel on
every call. The logic is :mod:`meshid._channel`'s; this module adapts it to blocking grpc:
a change is applied on the source's own thread, and a drain timeout is a timer thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Unpack

import grpc

from meshid._channel import DEFAULT_DRAIN_TIMEOUT as DEFAULT_DRAIN_TIMEOUT
from meshid._channel import ChannelSettings, Generation, Kind, MethodArgs, MultiCallable, RotatingCore
from meshid.sources import Source

__all__ = ["RotatingChannel", "secure_channel"]


class RotatingChannel(RotatingCore[grpc.Channel], grpc.Channel):
    """A ``grpc.Channel`` whose credentials follow an identity source. Build it with :func:`secure_channel`."""

    _closed_error = ValueError

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        return grpc.secure_channel(target, credentials, options=options)

    def _close_channel(self, channel: grpc.Channel) -> threading.Thread:
        # A replaced channel's last call may end in a done-callback on grpc's own thread for that
        # channel, and grpc.Channel.close() waits for that very thread: close it from another one.
        closer = threading.Thread(target=channel.close, name="meshid-channel-close", daemon=True)
        closer.start()
        return closer

    def _call_later(self, delay: float, callback: Callable[[], None]) -> threading.Timer:
        timer = threading.Timer(delay, callback)
        timer.daemon = True
        timer.start()
        return timer

    def _dispatch(self, apply_change: Callable[[], None]) -> None:
        apply_change()

    def _multi_callable(self, kind: Kind, args: MethodArgs) -> MultiCallable[grpc.Channel]:
        return (_Blocking if kind.endswith("_unary") else _Streaming)(self, kind, args)

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self._current.channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._current.channel.unsubscribe(callback)

    def close(self) -> None:
        """Closes the channel in use now; calls on a replaced one finish (or time out) as before."""
        current = self._shutdown()
        if current is not None and current.claim():
            current.channel.close()

    def __enter__(self) -> RotatingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Blocking(MultiCallable[grpc.Channel]):
    """Unary-response calls: the call is over when ``__call__``/``with_call`` returns, or the future is done."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(lambda inner: inner(*args, **kwargs))

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(lambda inner: inner.with_call(*args, **kwargs))

    def future(self, *args: Any, **kwargs: Any) -> Any:
        generation, future = self._start(lambda inner: inner.future(*args, **kwargs))
        if self._owner._watching(generation):
            future.add_done_callback(lambda done: _ended(self._owner, generation, done))
        else:
            future.add_done_callback(generation.end)
        return future


class _Streaming(MultiCallable[grpc.Channel]):
    """Streaming-response calls: the call is over when grpc reports it terminated."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation, call = self._start(lambda inner: inner(*args, **kwargs))
        done: Callable[[], None] = generation.end
        if self._owner._watching(generation):
            done = lambda: _ended(self._owner, generation, call)  # noqa: E731
        if not call.add_callback(done):
            done()  # already terminated
        return call


def _ended(owner: RotatingCore[grpc.Channel], generation: Generation[grpc.Channel], call: grpc.Call) -> None:
    """A watched call is over: counted out of its generation, and its outcome seen."""
    generation.end()
    owner._outcome(generation, call.code(), call.details())


def secure_channel(target: str, source: Source, **settings: Unpack[ChannelSettings]) -> RotatingChannel:
    """A channel that presents the source's SVID, verifies the server, and follows rotations.

    Args:
        target: the server's address, as for ``grpc.secure_channel``.
        source: where the SVID and bundles come from; the channel follows its changes.
        server_id: an exact SPIFFE ID, or a trust domain: the client refuses, at the handshake
            and before any request is sent, a server that cannot prove that identity.
        options: grpc channel options, added to meshid's own.
        drain_timeout: seconds a replaced channel waits for its calls in flight before it
            is closed anyway (default 300).

    Raises:
        SourceError: the source has no SVID, or no bundle for ``server_id``'s trust domain.
        InvalidSpiffeIdError, ValueError, TypeError: ``server_id`` or ``source`` is wrong.
    """
    return RotatingChannel(target, source, **settings)
