"""Client channels that follow their identity source.

grpc channel credentials are fixed when the channel is made, so a rotated SVID (or a new
bundle) needs a new channel. :func:`secure_channel` returns a :class:`RotatingChannel`: it
looks like one ``grpc.Channel``; underneath, each change of the source builds a new channel
for new calls, while calls in flight finish on the old one, which is closed once they have
(or after ``drain_timeout`` seconds at most).

Stubs made once keep working: the multi-callables a stub holds pick the current channel on
every call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from meshid.credentials import ServerId, channel_credentials, merge_options
from meshid.sources import Source

__all__ = ["RotatingChannel", "secure_channel"]

log = logging.getLogger("meshid.channel")

#: Longest a replaced channel waits for its calls in flight before it is closed anyway.
DEFAULT_DRAIN_TIMEOUT = 300.0


class _Generation:
    """One underlying channel and the calls in flight on it."""

    __slots__ = ("channel", "closed", "inflight", "lock", "retired")

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.inflight = 0
        self.retired = False
        self.closed = False
        self.lock = threading.Lock()

    def end(self, *_: object) -> None:
        with self.lock:
            self.inflight -= 1
            close = self.retired and self.inflight == 0
        if close:
            self.close()

    def retire(self, drain_timeout: float) -> None:
        with self.lock:
            self.retired = True
            idle = self.inflight == 0
        if idle:
            self.close()
        else:
            timer = threading.Timer(drain_timeout, self.close)
            timer.daemon = True
            timer.start()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.channel.close()


class RotatingChannel(grpc.Channel):
    """A ``grpc.Channel`` whose credentials follow an identity source. Build it with :func:`secure_channel`."""

    def __init__(
        self,
        target: str,
        source: Source,
        *,
        server_id: ServerId | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self._target = target
        self._source = source
        self._server_id = server_id
        self._options = list(options or ())
        self._drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._change_lock = threading.Lock()
        self._closed = False
        self._state = (source.get_svid(), source.get_bundles())
        self._current = _Generation(self._build())
        #: How many times the underlying channel was replaced (for tests and metrics).
        self.rotations = 0
        self._unsubscribe = source.subscribe(self._on_change)

    def _build(self) -> grpc.Channel:
        creds, pins = channel_credentials(self._source, server_id=self._server_id)
        return grpc.secure_channel(self._target, creds, options=merge_options(pins, self._options))

    def _on_change(self) -> None:
        # One change at a time: with two at once, a slower build could replace a newer one.
        with self._change_lock:
            state = (self._source.get_svid(), self._source.get_bundles())
            if state[0] is self._state[0] and state[1] is self._state[1]:
                return
            try:
                new = _Generation(self._build())
            except Exception:
                log.exception("channel to %s: cannot use the new identity; keeping the current one", self._target)
                return
            with self._lock:
                if self._closed:
                    new.close()
                    return
                old, self._current, self._state = self._current, new, state
                self.rotations += 1
            old.retire(self._drain_timeout)

    def _begin(self) -> _Generation:
        with self._lock:
            if self._closed:
                raise ValueError("Cannot invoke RPC: Channel closed!")
            generation = self._current
            with generation.lock:
                generation.inflight += 1
        return generation

    # grpc.Channel -------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self._current.channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._current.channel.unsubscribe(callback)

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return _Blocking(self, "unary_unary", method, request_serializer, response_deserializer, _registered_method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return _Blocking(self, "stream_unary", method, request_serializer, response_deserializer, _registered_method)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return _Streaming(self, "unary_stream", method, request_serializer, response_deserializer, _registered_method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return _Streaming(self, "stream_stream", method, request_serializer, response_deserializer, _registered_method)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            current = self._current
        self._unsubscribe()
        current.close()

    def __enter__(self) -> RotatingChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MultiCallable:
    """Picks the current channel on every call; caches the inner multi-callable per channel."""

    __slots__ = ("_args", "_cached", "_kind", "_owner")

    def __init__(self, owner: RotatingChannel, kind: str, *args: Any) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._cached: tuple[grpc.Channel, Any] | None = None

    def _inner(self, generation: _Generation) -> Any:
        cached = self._cached
        if cached is None or cached[0] is not generation.channel:
            method, ser, deser, registered = self._args
            factory = getattr(generation.channel, self._kind)
            cached = (generation.channel, factory(method, ser, deser, _registered_method=registered))
            self._cached = cached
        return cached[1]

    def future(self, *args: Any, **kwargs: Any) -> Any:
        generation = self._owner._begin()
        try:
            future = self._inner(generation).future(*args, **kwargs)
        except BaseException:
            generation.end()
            raise
        future.add_done_callback(generation.end)
        return future


class _Blocking(_MultiCallable):
    """Unary-response calls: the call is over when ``__call__``/``with_call`` returns."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation = self._owner._begin()
        try:
            return self._inner(generation)(*args, **kwargs)
        finally:
            generation.end()

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        generation = self._owner._begin()
        try:
            return self._inner(generation).with_call(*args, **kwargs)
        finally:
            generation.end()


class _Streaming(_MultiCallable):
    """Streaming-response calls: the call is over when grpc reports it terminated."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        generation = self._owner._begin()
        try:
            call = self._inner(generation)(*args, **kwargs)
        except BaseException:
            generation.end()
            raise
        if not call.add_callback(generation.end):
            generation.end()  # already terminated
        return call


def secure_channel(
    target: str,
    source: Source,
    *,
    server_id: ServerId | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> RotatingChannel:
    """A channel that presents the source's SVID, verifies the server, and follows rotations.

    With ``server_id`` (an exact SPIFFE ID, or a trust domain) the client refuses, at the
    handshake and before any request is sent, a server that cannot prove that identity.

    Raises:
        SourceError: the source has no SVID, or no bundle for ``server_id``'s trust domain.
        InvalidSpiffeIdError, ValueError, TypeError: ``server_id`` or ``source`` is wrong.
    """
    return RotatingChannel(target, source, server_id=server_id, options=options, drain_timeout=drain_timeout)
