"""The rotating channel, sync and aio: one test body per behaviour, run against both flavours.

Each test runs a real greeter on loopback with real mTLS. The client's source rotates by
``StaticSource.update`` to an SVID with another SPIFFE ID, so the greeter's reply (the caller
it verified) says which SVID a call presented on the wire. When a replaced channel is closed
is read from the loopback connections the server holds (``/proc/net/tcp``), and calls are
kept in flight by a gate on the server (names starting with ``hold``: a unary call before its
handler runs, a server stream after its first reply) that the test opens.

The aio flavour runs its server and channel on an event loop in a background thread; the
test bodies drive both flavours through the same small adapter, :class:`Flavour`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

import meshid
import meshid.aio
from support import FRONTEND_ID, SERVER_ID, aio_server, hello, stub, sync_server

FRONTEND_V2 = "spiffe://example.org/ns/prod/sa/frontend-v2"
STYLES = ("call", "future", "with_call")
T = TypeVar("T")

TCP_TABLES = [table for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")) if table.exists()]
pytestmark = pytest.mark.skipif(not TCP_TABLES, reason="reads the loopback connections from /proc/net")


def _policy() -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "all", "methods": ["*"], "trust_domains": ["example.org"]}]}
    )


def connections(port: int) -> int:
    """How many TCP connections the server on ``port`` has open (its ESTABLISHED sockets).

    grpc listens on an IPv6 socket that also takes IPv4 (as ``::ffff:127.0.0.1``), so both
    tables are read.
    """
    count = 0
    for table in TCP_TABLES:
        for line in table.read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def eventually(check: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.02)


# --- the server's gate ---------------------------------------------------------------------


class Gate:
    """Holds calls named ``hold*`` on the server until the test releases them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, threading.Event] = {}
        self.arrived: set[str] = set()

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            return self._open.setdefault(name, threading.Event())

    def arrive(self, name: str) -> threading.Event | None:
        if not name.startswith("hold"):
            return None
        event = self._event(name)
        with self._lock:
            self.arrived.add(name)
        return event

    def wait_arrived(self, *names: str) -> None:
        eventually(lambda: self.arrived.issuperset(names), f"{names} held on the server")

    def release(self, name: str) -> None:
        self._event(name).set()

    def release_all(self) -> None:
        with self._lock:
            events = list(self._open.values())
        for event in events:
            event.set()


def _handler(handler: Any, unary: Any, stream: Any) -> Any:
    if handler.unary_unary is not None:
        make, behaviour = grpc.unary_unary_rpc_method_handler, unary(handler.unary_unary)
    elif handler.unary_stream is not None:
        make, behaviour = grpc.unary_stream_rpc_method_handler, stream(handler.unary_stream)
    else:
        return handler
    return make(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class SyncGate(grpc.ServerInterceptor):
    """The gate in front of meshid's interceptor (which verifies the caller the greeter names)."""

    def __init__(self, gate: Gate, inner: grpc.ServerInterceptor) -> None:
        self._gate, self._inner = gate, inner

    def _pass(self, name: str) -> None:
        event = self._gate.arrive(name)
        if event is not None:
            event.wait(10)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = self._inner.intercept_service(continuation, details)
        if handler is None:
            return None

        def unary(inner: Any) -> Any:
            def behaviour(request: Any, context: Any) -> Any:
                self._pass(request.name)
                return inner(request, context)

            return behaviour

        def stream(inner: Any) -> Any:
            def behaviour(request: Any, context: Any) -> Any:
                replies = inner(request, context)
                yield next(replies)
                self._pass(request.name)
                yield from replies

            return behaviour

        return _handler(handler, unary, stream)


class AioGate(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate, inner: grpc.aio.ServerInterceptor) -> None:
        self._gate, self._inner = gate, inner

    async def _pass(self, name: str) -> None:
        event = self._gate.arrive(name)
        deadline = time.monotonic() + 10
        while event is not None and not event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await self._inner.intercept_service(continuation, details)
        if handler is None:
            return None

        def unary(inner: Any) -> Any:
            async def behaviour(request: Any, context: Any) -> Any:
                await self._pass(request.name)
                return await inner(request, context)

            return behaviour

        def stream(inner: Any) -> Any:
            async def behaviour(request: Any, context: Any) -> Any:
                replies = inner(request, context).__aiter__()
                yield await replies.__anext__()
                await self._pass(request.name)
                async for reply in replies:
                    yield reply

            return behaviour

        return _handler(handler, unary, stream)


# --- the two flavours ----------------------------------------------------------------------


class Pending:
    """A unary call started and not yet awaited: ``result()`` is ``(status name, caller)``."""

    def __init__(self, done: Callable[[], bool], result: Callable[[float], tuple[str, str]]) -> None:
        self.done, self._result = done, result

    def result(self, timeout: float = 10) -> tuple[str, str]:
        return self._result(timeout)


def _outcome(call: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    try:
        return call()
    except grpc.FutureCancelledError:
        return "CANCELLED", ""
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""


class Flavour:
    """What a test body does with a rotating channel, in one flavour's terms."""

    closed_error: type[Exception]

    def __init__(self, gate: Gate, stack: contextlib.ExitStack) -> None:
        self.gate, self._stack = gate, stack
        self._stubs: dict[int, Any] = {}

    def stub(self, channel: Any) -> Any:
        """The one stub made with the channel: stubs made once must follow its rotations."""
        return self._stubs[id(channel)]

    def serve(self, source: meshid.Source) -> int:
        raise NotImplementedError

    def channel(self, port: int, source: meshid.Source, **settings: Any) -> Any:
        raise NotImplementedError

    def settle(self) -> None:
        """Returns once a source change notified before it has been applied to the channels."""

    def close(self, channel: Any) -> None:
        raise NotImplementedError

    def call(self, channel: Any, name: str = "world") -> tuple[str, str]:
        return self.start(channel, name, "call").result()

    def start(self, channel: Any, name: str, style: str) -> Pending:
        raise NotImplementedError

    def server_stream(self, channel: Any, name: str) -> Any:
        """A started SayHelloStream: ``next()`` is one reply's caller, ``rest()`` ``(callers, status)``."""
        raise NotImplementedError

    def chat(self, channel: Any) -> Any:
        """A started Chat: ``say(name)`` is its reply's caller, ``end()`` the status."""
        raise NotImplementedError


class SyncFlavour(Flavour):
    closed_error = ValueError

    def __init__(self, gate: Gate, stack: contextlib.ExitStack) -> None:
        super().__init__(gate, stack)
        self._threads = stack.enter_context(futures.ThreadPoolExecutor(8))

    def serve(self, source: meshid.Source) -> int:
        interceptor = SyncGate(self.gate, meshid.AuthorizationInterceptor(_policy(), source=source))
        return self._stack.enter_context(sync_server(source, interceptor))

    def channel(self, port: int, source: meshid.Source, **settings: Any) -> Any:
        channel = meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID, **settings)
        self._stack.callback(channel.close)
        self._stubs[id(channel)] = stub(channel)
        return channel

    def close(self, channel: Any) -> None:
        channel.close()

    def call(self, channel: Any, name: str = "world") -> tuple[str, str]:
        return _outcome(lambda: ("OK", self.stub(channel).SayHello(hello(name), timeout=10).caller))

    def start(self, channel: Any, name: str, style: str) -> Pending:
        say = self.stub(channel).SayHello
        if style == "future":
            future = say.future(hello(name), timeout=10)
            return Pending(future.done, lambda t: _outcome(lambda: ("OK", future.result(t).caller)))

        def blocking() -> tuple[str, str]:
            if style == "with_call":
                reply, call = say.with_call(hello(name), timeout=10)
                return call.code().name, reply.caller
            return "OK", say(hello(name), timeout=10).caller

        task = self._threads.submit(_outcome, blocking)
        return Pending(task.done, task.result)

    def server_stream(self, channel: Any, name: str) -> Any:
        replies = self.stub(channel).SayHelloStream(hello(name), timeout=10)

        class Stream:
            def next(self) -> str:
                return next(replies).caller

            def rest(self) -> tuple[list[str], str]:
                return [r.caller for r in replies], replies.code().name

        return Stream()

    def chat(self, channel: Any) -> Any:
        requests: queue.Queue[Any] = queue.Queue()
        replies = self.stub(channel).Chat(iter(requests.get, None), timeout=10)

        class Chat:
            def say(self, name: str) -> str:
                requests.put(hello(name))
                return next(replies).caller

            def end(self) -> str:
                requests.put(None)
                assert list(replies) == []
                return replies.code().name

        return Chat()


class AioFlavour(Flavour):
    closed_error = grpc.aio.UsageError

    def __init__(self, gate: Gate, stack: contextlib.ExitStack) -> None:
        super().__init__(gate, stack)
        self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        thread.start()
        self._astack = contextlib.AsyncExitStack()

        def stop() -> None:
            self.run(self._astack.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)
            self._loop.close()

        stack.callback(stop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self.run(call())

    def serve(self, source: meshid.Source) -> int:
        async def serve() -> int:
            interceptor = AioGate(self.gate, meshid.aio.AuthorizationInterceptor(_policy(), source=source))
            return await self._astack.enter_async_context(aio_server(source, interceptor))

        return self.run(serve())

    def channel(self, port: int, source: meshid.Source, **settings: Any) -> Any:
        async def open_channel() -> Any:
            channel = meshid.aio.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID, **settings)
            self._astack.push_async_callback(channel.close)
            self._stubs[id(channel)] = stub(channel)
            return channel

        return self.run(open_channel())

    def settle(self) -> None:
        self.on_loop(lambda: None)  # the loop runs callbacks in order: the change went first

    def close(self, channel: Any) -> None:
        self.run(channel.close())

    def start(self, channel: Any, name: str, style: str) -> Pending:
        async def outcome(call: Any) -> tuple[str, str]:
            try:
                reply = await call
            except grpc.aio.AioRpcError as err:
                return err.code().name, err.details() or ""
            except asyncio.CancelledError:  # what awaiting a call its channel cancelled raises
                return (await call.code()).name, ""
            # with_call's equivalent: the status is read from the call object after the reply
            return ((await call.code()).name if style == "with_call" else "OK"), reply.caller

        if style == "future":  # an aio call object is the future
            calls = [self.on_loop(lambda: self.stub(channel).SayHello(hello(name), timeout=10))]
            # the result drops the call: grpc keeps a closed aio channel's connection while a call holds it
            return Pending(lambda: self.on_loop(calls[0].done), lambda t: self.run(outcome(calls.pop()), t))

        async def started() -> tuple[str, str]:
            return await outcome(self.stub(channel).SayHello(hello(name), timeout=10))

        task = asyncio.run_coroutine_threadsafe(started(), self._loop)
        return Pending(task.done, task.result)

    def server_stream(self, channel: Any, name: str) -> Any:
        calls = [self.on_loop(lambda: self.stub(channel).SayHelloStream(hello(name), timeout=10))]
        run = self.run

        class Stream:
            def next(self) -> str:
                return run(calls[0].read()).caller

            def rest(self) -> tuple[list[str], str]:
                async def rest(call: Any) -> tuple[list[str], str]:
                    callers = []
                    while (reply := await call.read()) is not grpc.aio.EOF:
                        callers.append(reply.caller)
                    return callers, (await call.code()).name

                return run(rest(calls.pop()))

        return Stream()

    def chat(self, channel: Any) -> Any:
        calls = [self.on_loop(lambda: self.stub(channel).Chat(timeout=10))]
        run = self.run

        class Chat:
            def say(self, name: str) -> str:
                async def say(call: Any) -> str:
                    await call.write(hello(name))
                    return (await call.read()).caller

                return run(say(calls[0]))

            def end(self) -> str:
                async def end(call: Any) -> str:
                    await call.done_writing()
                    assert await call.read() is grpc.aio.EOF
                    return (await call.code()).name

                return run(end(calls.pop()))

        return Chat()


@pytest.fixture(params=[SyncFlavour, AioFlavour], ids=["sync", "aio"])
def flavour(request: pytest.FixtureRequest) -> Iterator[Flavour]:
    gate = Gate()
    with contextlib.ExitStack() as stack:
        yield request.param(gate, stack)
        gate.release_all()  # before the stack stops servers: no held call outlives its server


@pytest.fixture
def client(ca, bundles) -> meshid.StaticSource:
    return meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)


@pytest.fixture
def port(flavour: Flavour, server_source) -> int:
    return flavour.serve(server_source)


def rotate(flavour: Flavour, source: meshid.StaticSource, ca: Any, to: str = FRONTEND_V2) -> None:
    """A new SVID (for ``to``) in the source, applied to the flavour's channels."""
    source.update(ca.issue_svid(to))
    flavour.settle()


# --- the tests -----------------------------------------------------------------------------


def test_a_call_after_a_rotation_presents_the_new_svid(flavour, port, client, ca) -> None:
    channel = flavour.channel(port, client)
    assert flavour.call(channel) == ("OK", FRONTEND_ID)
    assert connections(port) == 1

    rotate(flavour, client, ca)

    assert channel.rotations == 1
    assert flavour.call(channel) == ("OK", FRONTEND_V2)
    eventually(lambda: connections(port) == 1, "the idle replaced channel closed at once")


def test_a_notification_without_a_change_keeps_the_channel(flavour, port, client, bundles) -> None:
    channel = flavour.channel(port, client)
    assert flavour.call(channel) == ("OK", FRONTEND_ID)

    client.update()  # notifies with the very same SVID and bundles
    flavour.settle()

    assert channel.rotations == 0
    assert flavour.call(channel) == ("OK", FRONTEND_ID)
    assert connections(port) == 1

    client.update(bundles=meshid.BundleSet.of(*(bundles[td] for td in bundles)))  # equal, but new
    flavour.settle()
    assert channel.rotations == 1


def test_a_new_identity_that_cannot_be_used_keeps_the_current_channel(
    flavour, port, client, ca, other_ca, caplog
) -> None:
    channel = flavour.channel(port, client)
    assert flavour.call(channel) == ("OK", FRONTEND_ID)

    # no bundle for the server's trust domain: server_id=SERVER_ID cannot be verified
    client.update(ca.issue_svid(FRONTEND_V2), bundles=meshid.TrustBundle(other_ca.trust_domain, other_ca.roots))
    flavour.settle()

    assert channel.rotations == 0
    assert flavour.call(channel) == ("OK", FRONTEND_ID)
    assert [r.getMessage() for r in caplog.records if r.name == "meshid.channel"] == [
        f"channel to 127.0.0.1:{port}: cannot use the new identity; keeping the current one"
    ]


@pytest.mark.parametrize("style", STYLES)
def test_unary_calls_in_flight_across_a_rotation_all_succeed_on_the_old_connection(
    flavour, port, client, ca, style
) -> None:
    channel = flavour.channel(port, client)
    held = ["hold-1", "hold-2", "hold-3"]
    pending = {name: flavour.start(channel, name, style) for name in held}
    flavour.gate.wait_arrived(*held)

    rotate(flavour, client, ca)

    assert flavour.call(channel) == ("OK", FRONTEND_V2)  # new calls take the new channel at once
    assert connections(port) == 2
    for i, name in enumerate(held):
        flavour.gate.release(name)
        assert pending[name].result() == ("OK", FRONTEND_ID)
        assert not any(pending[other].done() for other in held[i + 1 :])
    eventually(lambda: connections(port) == 1, "the replaced channel closed once its last call ended")


def test_drain_timeout_closes_the_old_channel_under_a_call_that_outlives_it(flavour, port, client, ca) -> None:
    channel = flavour.channel(port, client, drain_timeout=1.0)
    pending = flavour.start(channel, "hold-long", "future")
    flavour.gate.wait_arrived("hold-long")

    rotated = time.monotonic()
    rotate(flavour, client, ca)
    time.sleep(0.5)
    assert not pending.done()  # within the drain timeout the call is left alone

    status, _ = pending.result(timeout=5)
    assert status == "CANCELLED"
    assert time.monotonic() - rotated >= 1.0
    assert flavour.call(channel) == ("OK", FRONTEND_V2)
    eventually(lambda: connections(port) == 1, "the replaced channel closed")


def test_a_server_stream_spanning_a_rotation_completes_on_the_old_connection(flavour, port, client, ca) -> None:
    channel = flavour.channel(port, client)
    replies = flavour.server_stream(channel, "hold-stream")
    assert replies.next() == FRONTEND_ID
    flavour.gate.wait_arrived("hold-stream")  # the server holds the rest of the stream

    rotate(flavour, client, ca)
    assert flavour.call(channel) == ("OK", FRONTEND_V2)
    assert connections(port) == 2

    flavour.gate.release("hold-stream")
    assert replies.rest() == ([FRONTEND_ID, FRONTEND_ID], "OK")
    eventually(lambda: connections(port) == 1, "the replaced channel closed once the stream ended")


def test_a_bidi_stream_spanning_a_rotation_completes_on_the_old_connection(flavour, port, client, ca) -> None:
    channel = flavour.channel(port, client)
    chat = flavour.chat(channel)
    assert chat.say("before") == FRONTEND_ID

    rotate(flavour, client, ca)
    assert flavour.call(channel) == ("OK", FRONTEND_V2)
    assert connections(port) == 2

    assert chat.say("after") == FRONTEND_ID
    assert chat.end() == "OK"
    eventually(lambda: connections(port) == 1, "the replaced channel closed once the stream ended")


def test_streams_spanning_rotations_again_and_again_end_and_free_their_connections(flavour, port, client, ca) -> None:
    # The last call on a replaced channel may end in a callback on grpc's own thread for that
    # channel; whether it does is a race, so the case runs many times. (The sync channel used to
    # close the old channel on that thread, which deadlocked it: one bidi stream showed it in
    # about half the runs, this loop in nearly all.)
    before = FRONTEND_ID
    for _ in range(10):
        after = FRONTEND_V2 if before == FRONTEND_ID else FRONTEND_ID
        channel = flavour.channel(port, client)
        assert flavour.call(channel) == ("OK", before)  # a connected channel: the race is lost more often
        chat = flavour.chat(channel)
        assert chat.say("before") == before
        rotate(flavour, client, ca, to=after)
        assert flavour.call(channel) == ("OK", after)
        assert chat.say("after") == before
        assert chat.end() == "OK"
        eventually(lambda: connections(port) == 1, "the replaced channel closed once the stream ended")
        flavour.close(channel)
        eventually(lambda: connections(port) == 0, "the channel closed")
        before = after


def test_a_closed_channel_refuses_calls_and_ignores_rotations(flavour, port, client, ca) -> None:
    channel = flavour.channel(port, client)
    assert flavour.call(channel) == ("OK", FRONTEND_ID)
    flavour.close(channel)
    flavour.close(channel)  # closing twice is harmless

    with pytest.raises(flavour.closed_error, match="Channel closed"):
        flavour.call(channel)
    rotate(flavour, client, ca)
    assert channel.rotations == 0
    eventually(lambda: connections(port) == 0, "the closed channel's connection gone")


# --- a server that cannot prove the identity the channel pins ------------------------------

IMPOSTOR = "spiffe://example.org/ns/prod/sa/impostor"


def _unproven_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meshid.channel" and r.levelname == "WARNING"]


def _fail(flavour: Flavour, channel: Any, shape: str) -> None:
    """One call of this shape, refused at the handshake."""
    if shape == "stream":
        with pytest.raises((grpc.RpcError, grpc.aio.AioRpcError)) as failed:
            flavour.server_stream(channel, "world").next()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        return
    code, details = flavour.start(channel, "world", shape).result(30)
    assert code == "UNAVAILABLE", (shape, code, details)


@pytest.mark.parametrize("shape", [*STYLES, "stream"])
def test_a_server_with_another_spiffe_id_is_logged_once_with_the_id_expected(
    flavour, client, ca, bundles, caplog, shape
) -> None:
    caplog.set_level(logging.WARNING, "meshid.channel")
    port = flavour.serve(meshid.StaticSource(ca.issue_svid(IMPOSTOR), bundles))
    channel = flavour.channel(port, client)

    _fail(flavour, channel, shape)
    eventually(lambda: _unproven_warnings(caplog), "the channel's warning")
    _fail(flavour, channel, shape)
    _fail(flavour, channel, "call")
    flavour.settle()

    (warning,) = _unproven_warnings(caplog)  # once per channel
    assert (
        f"channel to 127.0.0.1:{port}: the server failed the TLS handshake: it did not prove it is {SERVER_ID}"
        in warning
    )
    assert "another SPIFFE ID" in warning and "check server_id" in warning
    assert "Hostname Verification Check failed" in warning  # grpc's own words, explained


def test_a_server_of_another_trust_domain_is_logged_with_the_trust_domain_expected(
    flavour, client, other_ca, bundles, caplog
) -> None:
    caplog.set_level(logging.WARNING, "meshid.channel")
    port = flavour.serve(meshid.StaticSource(other_ca.issue_svid("spiffe://other.org/ns/prod/sa/greeter"), bundles))
    channel = flavour.channel(port, client)

    assert flavour.call(channel)[0] == "UNAVAILABLE"
    assert flavour.call(channel)[0] == "UNAVAILABLE"

    eventually(lambda: _unproven_warnings(caplog), "the channel's warning")
    (warning,) = _unproven_warnings(caplog)
    assert f"it did not prove it belongs to trust domain example.org (expected {SERVER_ID})" in warning
    assert "CERTIFICATE_VERIFY_FAILED" in warning


def test_a_server_that_proves_its_id_or_is_down_gives_no_such_warning(flavour, port, client, caplog) -> None:
    caplog.set_level(logging.WARNING, "meshid.channel")
    channel = flavour.channel(port, client)
    for style in STYLES:
        assert flavour.start(channel, "world", style).result(30) == ("OK", FRONTEND_ID)
    assert flavour.server_stream(channel, "world").rest() == ([FRONTEND_ID] * 3, "OK")

    down = flavour.channel(_free_port(), client)
    assert flavour.call(down)[0] == "UNAVAILABLE"  # connection refused: nothing to say about identity
    flavour.settle()
    assert _unproven_warnings(caplog) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_aio_secure_channel_outside_an_event_loop_says_to_call_it_inside_one(client) -> None:
    with pytest.raises(
        RuntimeError, match=r"^meshid.aio.secure_channel: no running event loop; call it inside a coroutine"
    ):
        meshid.aio.secure_channel("127.0.0.1:1", client, server_id=SERVER_ID)
