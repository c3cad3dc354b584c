"""The logic shared by the sync and aio rotating channels, with no I/O and no threads.

grpc credentials are fixed when a channel is made, so following an identity source means one
underlying channel (a :class:`Generation`) per SVID/bundle state. :class:`RotatingCore` decides
when to build a new generation and when an old one may close; :class:`MultiCallable` routes
each call to the current generation and counts it in flight there. The front ends,
:mod:`meshid.channel` and :mod:`meshid.aio.channel`, inject the rest through the core's hook
methods: how a channel is made and closed, how a callback runs later (a timer thread or the
event loop), and on which thread a source's change is applied.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, Literal, TypedDict, TypeVar

import grpc

from meshid._grpc import merge_options
from meshid.credentials import ServerId, _parse_server_id, channel_credentials
from meshid.sources import Source
from meshid.spiffeid import SpiffeId

log = logging.getLogger("meshid.channel")

#: Longest a replaced channel waits for its calls in flight before it is closed anyway.
DEFAULT_DRAIN_TIMEOUT = 300.0

C = TypeVar("C")  # the flavour's channel: grpc.Channel or grpc.aio.Channel
T = TypeVar("T")

Kind = Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
#: What a stub passes to a channel's factory: method, request serializer, response deserializer, registered.
MethodArgs = tuple[str, Any, Any, bool]

#: What grpc's details of an UNAVAILABLE call say when the server's certificate did not prove
#: what the channel pins: the identity DNS name is not among its names (BoringSSL's host-name
#: check), or its chain leads to none of the roots trusted for the pinned trust domain.
_NAME_MISMATCH = "Hostname Verification Check failed"
_UNTRUSTED = "CERTIFICATE_VERIFY_FAILED"


class ChannelSettings(TypedDict, total=False):
    """The keyword arguments of ``secure_channel`` (see :class:`RotatingCore`)."""

    server_id: ServerId | None
    options: Sequence[tuple[str, Any]] | None
    drain_timeout: float


class Generation(Generic[C]):
    """One underlying channel and the calls in flight on it.

    Once retired (replaced by a newer one) it is closed when its last call ends, or when the
    drain timer fires, whichever comes first; it is closed once only.
    """

    __slots__ = ("_close", "channel", "closed", "closing", "inflight", "lock", "proven", "retired")

    def __init__(self, channel: C, close: Callable[[C], object]) -> None:
        self.channel = channel
        self._close = close
        #: What the flavour's close returned (aio: the task closing the channel), kept referenced.
        self.closing: object = None
        self.inflight = 0
        self.retired = False
        self.closed = False
        #: A call on this channel succeeded: the server proved its identity, so calls are no longer watched.
        self.proven = False
        self.lock = threading.Lock()

    def begin(self) -> None:
        with self.lock:
            self.inflight += 1

    def end(self, *_: object) -> None:
        """Counts one call as over; usable as a grpc done-callback."""
        with self.lock:
            self.inflight -= 1
            close = self.retired and self.inflight == 0
        if close:
            self.close()

    def retire(self, drain_timeout: float, call_later: Callable[[float, Callable[[], None]], object]) -> None:
        """No new calls come here: close now if idle, else when the calls end or ``drain_timeout`` passes."""
        with self.lock:
            self.retired = True
            idle = self.inflight == 0
        if idle:
            self.close()
        else:
            call_later(drain_timeout, self.close)

    def claim(self) -> bool:
        """Marks the generation closed; True for the one caller that must close its channel."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            return True

    def close(self) -> None:
        if self.claim():
            self.closing = self._close(self.channel)


def _factory(kind: Kind) -> Callable[..., Any]:
    # grpc's four channel factories differ only in their kind: one definition serves them all.
    def factory(
        self: RotatingCore[Any],
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Any:
        return self._multi_callable(kind, (method, request_serializer, response_deserializer, _registered_method))

    factory.__name__, factory.__qualname__ = kind, f"RotatingCore.{kind}"
    factory.__doc__ = f"A ``{kind}`` multi-callable that uses the current channel on every call."
    return factory


class RotatingCore(abc.ABC, Generic[C]):
    """A channel whose credentials follow an identity source; the base of both flavours.

    Each change of the source's SVID or bundles builds a new underlying channel for new calls;
    calls in flight finish on the old one, which is closed once they have (or after
    ``drain_timeout`` seconds at most). A new identity that cannot be used is logged and the
    current channel kept.

    Raises:
        SourceError: the source has no SVID, or no bundle for ``server_id``'s trust domain.
        InvalidSpiffeIdError, ValueError, TypeError: ``server_id`` or ``source`` is wrong.
    """

    #: What a call on a closed channel raises (grpc's own choice for the flavour).
    _closed_error: Callable[[str], Exception] = ValueError

    def __init__(
        self,
        target: str,
        source: Source,
        *,
        server_id: ServerId | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self._bind_runtime()
        self._target = target
        self._source = source
        self._server_id = server_id
        self._options = list(options or ())
        self._drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._change_lock = threading.Lock()
        self._closed = False
        self._warned = False  # the server's failure to prove its identity is logged once per channel
        self._state = (source.get_svid(), source.get_bundles())
        self._current: Generation[C] = Generation(self._build(), self._close_channel)
        #: How many times the underlying channel was replaced (for tests and metrics).
        self.rotations = 0
        self._unsubscribe = source.subscribe(lambda: self._dispatch(self._apply_change))

    # Hooks: what the flavour injects ------------------------------------------------------

    def _bind_runtime(self) -> None:
        """Called first by the constructor, before any channel is made or the source subscribed.

        The aio flavour captures its running event loop here (and so raises ``RuntimeError``
        outside one); the sync flavour needs nothing.
        """

    @abc.abstractmethod
    def _connect(self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]) -> C:
        """A new underlying channel with these credentials."""

    @abc.abstractmethod
    def _close_channel(self, channel: C) -> object:
        """Starts closing an underlying channel whose calls are over (or timed out)."""

    @abc.abstractmethod
    def _call_later(self, delay: float, callback: Callable[[], None]) -> object:
        """Runs ``callback`` after ``delay`` seconds, without blocking the caller."""

    @abc.abstractmethod
    def _dispatch(self, apply_change: Callable[[], None]) -> None:
        """Runs ``apply_change`` where the flavour applies changes; called on the source's thread."""

    @abc.abstractmethod
    def _multi_callable(self, kind: Kind, args: MethodArgs) -> Any:
        """The flavour's multi-callable of this kind."""

    # The logic ----------------------------------------------------------------------------

    def _build(self) -> C:
        creds, pins = channel_credentials(self._source, server_id=self._server_id)
        return self._connect(self._target, creds, merge_options(pins, self._options))

    def _apply_change(self) -> None:
        # One change at a time: with two at once, a slower build could replace a newer one.
        with self._change_lock:
            state = (self._source.get_svid(), self._source.get_bundles())
            if self._closed or (state[0] is self._state[0] and state[1] is self._state[1]):
                return
            try:
                new = Generation(self._build(), self._close_channel)
            except Exception:
                log.exception("channel to %s: cannot use the new identity; keeping the current one", self._target)
                return
            with self._lock:
                if self._closed:
                    new.close()
                    return
                old, self._current, self._state = self._current, new, state
                self.rotations += 1
            old.retire(self._drain_timeout, self._call_later)

    # A server that fails to prove its identity -----------------------------------------------

    def _watching(self, generation: Generation[C]) -> bool:
        """Whether a call that ends on ``generation`` must be looked at: until one call there
        succeeds, and until the channel has warned once. Blocking calls are looked at only when
        they raise, so they cost nothing."""
        return not (self._warned or generation.proven)

    def _outcome(self, generation: Generation[C], code: grpc.StatusCode | None, details: str | None) -> None:
        """Sees how a watched call ended: a success proves the server; the first handshake that
        failed on the server's certificate is logged at WARNING, with what the channel expected."""
        if code is grpc.StatusCode.OK:
            generation.proven = True
            return
        if code is not grpc.StatusCode.UNAVAILABLE or not details:
            return
        why: Literal["name", "chain"]
        if _NAME_MISMATCH in details:
            why = "name"
        elif _UNTRUSTED in details:
            why = "chain"
        else:
            return
        with self._lock:
            if self._warned:
                return
            self._warned = True
        log.warning("%s (grpc: %s)", self._unproven(why), details)

    def _unproven(self, why: Literal["name", "chain"]) -> str:
        head = f"channel to {self._target}: the server failed the TLS handshake"
        if self._server_id is None:
            if why == "name":
                return (
                    f"{head}: its certificate has no DNS name matching the target's host name (grpc checks it "
                    "when no server_id is given); pass server_id=SPIFFE ID or trust domain to accept a server "
                    "by its SPIFFE identity"
                )
            return (
                f"{head}: its certificate does not chain to a root of this workload's own trust domain (without "
                "server_id only its CAs may prove a server: any CA can write any DNS name); pass server_id to "
                "reach a server of another trust domain"
            )
        expected = _parse_server_id(self._server_id)
        td = expected.trust_domain if isinstance(expected, SpiffeId) else expected
        if why == "name":
            proves = (
                f"{expected}: it presents an SVID of another SPIFFE ID"
                if isinstance(expected, SpiffeId)
                else f"a workload of trust domain {td}: its certificate carries no identity of that trust domain"
            )
            return f"{head}: it did not prove it is {proves}; check server_id and the server's SVID"
        return (
            f"{head}: it did not prove it belongs to trust domain {td} (expected "
            f"{expected}): its certificate does not chain to the roots of {td} in the source's bundles, "
            "so it is another trust domain's server, or the bundle is not that of its CA"
        )

    def _begin(self) -> Generation[C]:
        """The generation a new call goes to, with the call counted in flight there."""
        with self._lock:
            if self._closed:
                raise self._closed_error("Cannot invoke RPC: Channel closed!")
            generation = self._current
            generation.begin()
        return generation

    def _shutdown(self) -> Generation[C] | None:
        """Stops following the source; the generation in use, for the flavour to close (None if closed)."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            current = self._current
        self._unsubscribe()
        return current

    unary_unary = _factory("unary_unary")
    unary_stream = _factory("unary_stream")
    stream_unary = _factory("stream_unary")
    stream_stream = _factory("stream_stream")


class MultiCallable(Generic[C]):
    """Picks the current channel on every call; caches the inner multi-callable per channel."""

    __slots__ = ("_args", "_cached", "_kind", "_owner")

    def __init__(self, owner: RotatingCore[C], kind: Kind, args: MethodArgs) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._cached: tuple[C, Any] | None = None

    def _inner(self, generation: Generation[C]) -> Any:
        cached = self._cached
        if cached is None or cached[0] is not generation.channel:
            method, ser, deser, registered = self._args
            factory = getattr(generation.channel, self._kind)
            cached = (generation.channel, factory(method, ser, deser, _registered_method=registered))
            self._cached = cached
        return cached[1]

    def _run(self, invoke: Callable[[Any], T]) -> T:
        """A call that is over when ``invoke`` (given the inner multi-callable) returns."""
        generation = self._owner._begin()
        try:
            return invoke(self._inner(generation))
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call):
                self._owner._outcome(generation, err.code(), err.details())
            raise
        finally:
            generation.end()

    def _start(self, invoke: Callable[[Any], T]) -> tuple[Generation[C], T]:
        """A call that outlives ``invoke``: the caller must ``end()`` the generation when it is over."""
        generation = self._owner._begin()
        try:
            return generation, invoke(self._inner(generation))
        except BaseException:
            generation.end()
            raise
