"""The SPIFFE Workload API for many workloads: each caller gets the identities issued to *it*.

:class:`AttestedWorkloadApiServer` serves ``FetchX509SVID`` and ``FetchX509Bundles`` on a Unix
socket any local process may open, and identifies each caller by the kernel's word about the
connection (:mod:`meshid.workloadapi.attestation`), never by what it sends. An
:class:`IdentityProvider` (the node agent's cache) says which identities a process gets; none:
PERMISSION_DENIED ``no identity issued to this process``, as SPIRE answers; several: all in one
response, the first the default (SPIFFE Workload API, section 5.3). Every stream re-attests the
caller and checks it is still the process that connected before each response it sends, and
ends when that process exits.

Why grpclib: grpcio's Python server does not expose the accepted connection, so it cannot
read a Unix peer's credentials; grpclib serves gRPC on asyncio, where the connection's
transport hands out its socket. grpclib exposes the transport to a handler only through
``stream.peer``, whose ``_transport`` is private: :func:`_connection_of` is the one place meshid
reads it (the test suite checks grpclib still works that way). Nor can grpclib bound a request:
``Stream.recv_message`` buffers as long a message as its prefix declares (grpclib issue #195), so
:func:`meshid.workloadapi._bounded.recv_request` reads it from grpclib's stream itself, the
second and last private name.

Every stream is let in before a byte of its request is read: the header checked, counted against
``max_streams``, its caller identified by the kernel; then a request message over
:data:`MAX_REQUEST_BYTES` is refused from its 5-byte prefix, before any of its body arrives.

The JWT-SVID profile, for a provider that is also a :class:`JwtIdentityProvider` (the node
agent; else UNIMPLEMENTED): ``FetchJWTSVID`` gives a caller JWT-SVIDs only for the SPIFFE IDs
attested to it (all of them, or the one it names: another is PERMISSION_DENIED),
``FetchJWTBundles`` streams the JWT keys of the bundles of its identities, ``ValidateJWTSVID``
validates a token against those bundles (a caller with no identity gets PERMISSION_DENIED, as
for every method; no audience or token INVALID_ARGUMENT, as SPIRE answers; a token that does not
validate INVALID_ARGUMENT with the reason).

Status codes, in one place below: no or wrong ``workload.spiffe.io`` header INVALID_ARGUMENT
(SPIRE's message); a caller that cannot be identified (it exited, its pid names another process,
its credentials changed) UNAUTHENTICATED, as SPIRE's peer tracker answers: the connection no
longer speaks for a process, and a live workload that reconnects is attested afresh; a request
message over MAX_REQUEST_BYTES RESOURCE_EXHAUSTED, as grpcio answers one over its limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import platform
import socket
import struct
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import grpclib.const
import grpclib.server
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from meshid._background import Unsubscribe
from meshid._listen import refuse_unix_in_use
from meshid._proto import workload_pb2
from meshid.bundle import BundleSet, TrustBundle
from meshid.errors import InvalidJwtSvidError, InvalidSpiffeIdError, ListenError, MeshIdError, RemoteError
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid
from meshid.workloadapi import wire
from meshid.workloadapi._bounded import grpclib_version, recv_request
from meshid.workloadapi.attestation import ProcessInfo, WorkloadAttestationError, attest, check_alive

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = ["AttestedWorkloadApiServer", "IdentityProvider", "JwtIdentityProvider"]

T = TypeVar("T")

log = logging.getLogger("meshid.agent")

Identity = tuple[X509Svid, BundleSet]

# The status codes this server answers with, in one place (the first is SPIRE's, word for word).
_NO_HEADER = (Status.INVALID_ARGUMENT, "security header missing from request")
_NO_IDENTITY = (Status.PERMISSION_DENIED, "no identity issued to this process")
_NOT_IDENTIFIED = Status.UNAUTHENTICATED  # the caller cannot be identified (exited, pid reused)
_NO_JWT = (Status.UNIMPLEMENTED, "this Workload API's identity provider issues no JWT-SVIDs")
_NO_AUDIENCE = (Status.INVALID_ARGUMENT, "audience must be specified")  # SPIRE's words
_NO_TOKEN = (Status.INVALID_ARGUMENT, "svid must be specified")
_BAD_TOKEN = Status.INVALID_ARGUMENT  # ValidateJWTSVID: the token does not validate
#: The CA's refusals of a JWT-SVID that are the caller's doing, passed on; others are UNAVAILABLE.
_RELAYED = {"INVALID_ARGUMENT": Status.INVALID_ARGUMENT, "PERMISSION_DENIED": Status.PERMISSION_DENIED}
_NOT_READY = Status.UNAVAILABLE  # the provider's identity cannot be served (yet): retry
_SHUTTING_DOWN = (Status.UNAVAILABLE, "the Workload API server is shutting down; reconnect")
_BUSY = (Status.RESOURCE_EXHAUSTED, "the Workload API server serves as many streams as it may; retry later")
_BROKEN = Status.INTERNAL  # meshid cannot read the connection's credentials (see _connection_of)
_NO_REQUEST = (Status.INVALID_ARGUMENT, "Workload API: the call ended without its request message")

#: The HTTP/2 receive windows, per stream and per connection: bytes a caller sends beyond what a
#: handler reads (trailing its request, on a refused stream) wait in memory up to this much a
#: connection. The HTTP/2 default, the smallest grpclib allows (its own default is 4 MiB).
_WINDOW = 65535

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# SO_PEERPIDFD (Linux 6.5) where Python does not name it yet: 77 in asm-generic/socket.h, which
# these architectures use; others number socket options their own way.
_SO_PEERPIDFD: int | None = getattr(socket, "SO_PEERPIDFD", None) or (
    77 if platform.machine() in ("x86_64", "aarch64", "i686", "riscv64", "arm64") else None
)


@runtime_checkable
class IdentityProvider(Protocol):
    """Which identities a process gets, and when that may have changed (the node agent's cache).

    ``identities_for`` runs on a worker thread, possibly several at once: it must be thread-safe
    and should not block for long. ``subscribe`` callbacks may come from any thread.
    """

    def identities_for(self, process: ProcessInfo) -> Sequence[Identity]:
        """The (SVID, bundles) pairs issued to ``process``, the default first; empty for none."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        """Call ``callback()`` after any change of any identity; returns a function that unsubscribes."""
        ...


@runtime_checkable
class JwtIdentityProvider(Protocol):
    """An :class:`IdentityProvider` that also hands out JWT-SVIDs (the node agent)."""

    def jwt_svid_for(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID of ``spiffe_id`` (an identity this provider issues) for ``audience``.

        Runs on a worker thread and may call the CA. Raises :class:`MeshIdError` when it cannot.
        """
        ...


def _connection_of(stream: grpclib.server.Stream[Any, Any]) -> asyncio.Transport:
    """The transport of the connection ``stream`` arrived on.

    grpclib has no public way to it: ``stream.peer`` (a ``grpclib.protocol.Peer``) keeps it as
    ``_transport`` and offers only the address and TLS certificate. This is meshid's only use of
    a private grpclib name; pyproject.toml pins grpclib below 0.5 for it.
    """
    transport = getattr(stream.peer, "_transport", None)
    if not isinstance(transport, asyncio.Transport):
        raise MeshIdError(
            f"Workload API: grpclib {grpclib_version()} no longer keeps the connection at stream.peer._transport; "
            "meshid cannot tell who is calling (fix meshid.workloadapi.attested_server._connection_of)"
        )
    return transport


class _Caller:
    """The process at the other end of one stream's connection, by the kernel's word."""

    def __init__(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            raise MeshIdError("Workload API: the connection is not a Unix socket; it has no peer credentials")
        self.pid, self.uid, self.gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        self.pidfd = self._pidfd(sock)
        self.transport = transport

    def _pidfd(self, sock: Any) -> int | None:
        """A pidfd of the process that connected: SO_PEERPIDFD names exactly it (even if its pid
        has been reused since); where the kernel has none, pidfd_open(pid), which may already name
        a process that took the pid (then the start-time and credential checks are the guard)."""
        if _SO_PEERPIDFD is not None:
            try:
                fd: int = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
                return fd
            except OSError as err:
                if err.errno != errno.ENOPROTOOPT:
                    raise WorkloadAttestationError(
                        f"attestation: no pidfd for the process that connected as pid {self.pid}: {err.strerror}"
                    ) from err
        if self.pid <= 0:
            return None
        try:
            return os.pidfd_open(self.pid)
        except ProcessLookupError as err:
            raise WorkloadAttestationError(f"attestation: process {self.pid} has exited") from err
        except OSError:
            return None  # no pidfds (Linux < 5.3): the start time alone guards

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _svid_response(identities: Sequence[Identity]) -> Any:
    """One X509SVIDResponse for all identities, in order; federated bundles merged (first wins)."""
    merged = workload_pb2.X509SVIDResponse()
    for svid, bundles in identities:
        one = wire.x509_svid_response(svid, bundles)
        merged.svids.extend(one.svids)
        for name, der in one.federated_bundles.items():
            if name not in merged.federated_bundles:
                merged.federated_bundles[name] = der
    return merged


def _merged_bundles(identities: Sequence[Identity]) -> BundleSet:
    """The bundles of every identity (first wins for a trust domain)."""
    bundles: dict[TrustDomain, TrustBundle] = {}
    for _, of_one in identities:
        for td, bundle in of_one.items():
            bundles.setdefault(td, bundle)
    return BundleSet.of(bundles.values())


def _bundles_response(identities: Sequence[Identity]) -> Any:
    return wire.x509_bundles_response(identities[0][0], _merged_bundles(identities))


def _jwt_bundles_response(identities: Sequence[Identity]) -> Any:
    return wire.jwt_bundles_response(_merged_bundles(identities))


class _Servicer:
    """The five Workload API methods, for grpclib (``__mapping__`` is its servicer protocol)."""

    def __init__(self, server: AttestedWorkloadApiServer) -> None:
        self._server = server

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        service = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
        handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "FetchX509SVID": self._fetch_x509_svid,
            "FetchX509Bundles": self._fetch_x509_bundles,
        }
        if isinstance(self._server.provider, JwtIdentityProvider):
            handlers.update(
                FetchJWTSVID=self._fetch_jwt_svid,
                FetchJWTBundles=self._fetch_jwt_bundles,
                ValidateJWTSVID=self._validate_jwt_svid,
            )
        mapping = {}
        for method in service.methods:
            cardinality = Cardinality.UNARY_STREAM if method.server_streaming else Cardinality.UNARY_UNARY
            mapping[f"/{service.full_name}/{method.name}"] = grpclib.const.Handler(
                handlers.get(method.name, self._no_jwt),
                cardinality,
                getattr(workload_pb2, method.input_type.name),
                getattr(workload_pb2, method.output_type.name),
            )
        return mapping

    @staticmethod
    def _require_header(stream: grpclib.server.Stream[Any, Any]) -> None:
        values = stream.metadata.getall(wire.HEADER_KEY, []) if stream.metadata is not None else []
        if values != [wire.HEADER_VALUE]:
            raise GRPCError(*_NO_HEADER)

    async def _no_jwt(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        self._require_header(stream)
        raise GRPCError(*_NO_JWT)

    async def _fetch_x509_svid(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await self._server._follow(stream, workload_pb2.X509SVIDRequest, _svid_response)

    async def _fetch_x509_bundles(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await self._server._follow(stream, workload_pb2.X509BundlesRequest, _bundles_response)

    async def _fetch_jwt_bundles(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await self._server._follow(stream, workload_pb2.JWTBundlesRequest, _jwt_bundles_response)

    async def _fetch_jwt_svid(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        async with self._server._admitted(stream) as caller:
            request = await recv_request(stream, workload_pb2.JWTSVIDRequest)
            if request is None:
                raise GRPCError(*_NO_REQUEST)
            audience = list(request.audience)
            if not audience:
                raise GRPCError(*_NO_AUDIENCE)
            asked = None
            if request.spiffe_id:
                try:
                    asked = SpiffeId.parse(request.spiffe_id)
                except InvalidSpiffeIdError as err:
                    raise GRPCError(Status.INVALID_ARGUMENT, f"Workload API: spiffe_id: {err}") from err
            provider = self._server.provider
            assert isinstance(provider, JwtIdentityProvider)

            def issue(identities: Sequence[Identity]) -> list[JwtSvid]:
                """On a worker thread: the JWT-SVIDs of the attested identities (or the one asked)."""
                held = [svid.spiffe_id for svid, _ in identities]
                if asked is not None and asked not in held:
                    raise GRPCError(*_NO_IDENTITY)
                try:
                    return [provider.jwt_svid_for(sid, audience) for sid in ([asked] if asked else held)]
                except RemoteError as err:
                    code = _RELAYED.get(err.code or "", _NOT_READY)
                    raise GRPCError(code, f"Workload API: JWT-SVID: {err}") from err

            svids = await self._server._once(caller, issue)
            await stream.send_message(wire.jwt_svid_response(svids))

    async def _validate_jwt_svid(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        async with self._server._admitted(stream) as caller:
            request = await recv_request(stream, workload_pb2.ValidateJWTSVIDRequest)
            if request is None:
                raise GRPCError(*_NO_REQUEST)
            if not request.audience:
                raise GRPCError(*_NO_AUDIENCE)
            if not request.svid:
                raise GRPCError(*_NO_TOKEN)

            def validate(identities: Sequence[Identity]) -> Any:
                from meshid.jwtsvid import JwtSvid

                try:
                    svid = JwtSvid.parse_and_validate(request.svid, _merged_bundles(identities), [request.audience])
                except InvalidJwtSvidError as err:
                    raise GRPCError(_BAD_TOKEN, str(err)) from err
                return workload_pb2.ValidateJWTSVIDResponse(
                    spiffe_id=str(svid.spiffe_id), claims=wire.claims_struct(svid.claims)
                )

            await stream.send_message(await self._server._once(caller, validate))


class AttestedWorkloadApiServer:
    """Serves each local caller the identities ``provider`` issues to its process, on a Unix socket.

    Args:
        provider: says which identities a process gets and notifies changes.
        socket: ``unix:///path``, ``unix:/path`` or a plain path.
        mode: the socket's file mode, set before it accepts connections. Default 0666: any local
            process may connect, as with SPIRE's agent, because the kernel tells who it is and
            a caller with no identity gets nothing (execute bits mean nothing on a socket).
        max_streams: how many streams are served at once; the next is refused RESOURCE_EXHAUSTED.
        workers: threads that attest callers and ask the provider (reading ``/proc``, hashing an
            executable) so the event loop never waits on them.

    Nothing happens until :meth:`start`, which starts one thread running an asyncio loop;
    :meth:`close` ends every stream (UNAVAILABLE: reconnect), stops it and removes the socket.

    Raises:
        ValueError: ``socket`` is not a Unix socket address, or a bad ``mode``, ``max_streams``
            or ``workers``.
        TypeError: ``provider`` is not an :class:`IdentityProvider`.
    """

    def __init__(
        self, provider: IdentityProvider, socket: str, *, mode: int = 0o666, max_streams: int = 1024, workers: int = 4
    ) -> None:
        if not isinstance(provider, IdentityProvider):
            raise TypeError(
                f"provider must provide identities_for(process) and subscribe(), not {type(provider).__name__}"
            )
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be a file mode such as 0o666, not {mode:#o}")
        if max_streams < 1 or workers < 1:
            raise ValueError("max_streams and workers must be at least 1")
        self.provider = provider
        self.path = wire.socket_path(socket)
        self._mode = mode
        self._max_streams = max_streams
        self._workers = workers
        self._thread: threading.Thread | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self._transports: weakref.WeakSet[asyncio.Transport] = weakref.WeakSet()
        self._unsubscribe: Unsubscribe | None = None
        self._inode: int | None = None
        self._grace = 1.0
        self._lifecycle = threading.Lock()  # start() and close() one at a time

    # --- lifecycle ---------------------------------------------------------------------------

    def check_free(self) -> None:
        """Refuse the socket path now if a live server holds it or it is not a socket.

        Raises:
            ListenError, MeshIdError: another server listens on the path (ListenError), or the path
                is not a socket.
        """
        refuse_unix_in_use(self.path, who="Workload API")

    def start(self) -> AttestedWorkloadApiServer:
        """Bind the socket with its mode, and serve on a thread of its own. Returns self.

        Raises:
            ListenError, MeshIdError: the path is held by a live server or is not a socket, or it
                cannot be bound.
            OSError: the socket's directory cannot be created.
        """
        with self._lifecycle:  # a close() from another thread waits until this has started
            if self._thread is not None:
                return self
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            refuse_unix_in_use(self.path, who="Workload API")
            ready: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._executor = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="meshid-attest")
            self._unsubscribe = self.provider.subscribe(self._on_change)  # before the first stream can start
            self._thread = threading.Thread(
                target=asyncio.run, args=(self._serve(ready),), name="meshid-attested-workload-api", daemon=True
            )
            self._thread.start()
            try:
                ready.result()
            except BaseException:
                self._thread.join()
                self._thread = None
                self._unsubscribe()
                self._unsubscribe = None
                self._executor.shutdown(wait=True)
                self._executor = None
                raise
        log.info("Workload API: serving attested callers on unix:%s (mode %o)", self.path, self._mode)
        return self

    def close(self, grace: float = 1.0) -> None:
        """End every stream (UNAVAILABLE: clients reconnect), stop serving, remove the socket.
        From several threads at once: each returns once the server is closed."""
        with self._lifecycle:  # a second close() (a signal's thread and the main one) waits for the first
            thread, loop, stop = self._thread, self._loop, self._stop
            if thread is None:
                return
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            self._grace = grace
            if loop is not None and stop is not None:
                loop.call_soon_threadsafe(stop.set)
            thread.join()
            self._thread = self._loop = self._stop = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            try:  # a path some other server took over since is not ours to remove
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            log.info("Workload API: stopped serving on unix:%s", self.path)

    def __enter__(self) -> AttestedWorkloadApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _listen(self) -> socket.socket:
        """The listening socket, its mode set before listen(): no connection is accepted before."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.lexists(self.path):
                os.unlink(self.path)  # stale: refuse_unix_in_use found nobody listening
            listener.bind(self.path)
            os.chmod(self.path, self._mode)
            self._inode = os.stat(self.path).st_ino
            listener.listen(128)
        except OSError as err:
            listener.close()
            raise ListenError(f"Workload API: cannot serve on {self.path}: {err.strerror}") from err
        return listener

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._stop, self._changed = asyncio.Event(), asyncio.Event()
            config = Configuration(http2_connection_window_size=_WINDOW, http2_stream_window_size=_WINDOW)
            server = grpclib.server.Server([_Servicer(self)], config=config)
            listener = self._listen()
            try:
                await server.start(sock=listener)
            except BaseException:
                listener.close()
                raise
        except BaseException as err:
            ready.set_exception(err)
            return
        ready.set_result(None)
        await self._stop.wait()
        if self._streams:  # each sees the stop and ends with UNAVAILABLE
            await asyncio.wait(list(self._streams), timeout=self._grace)
        server.close()
        await server.wait_closed()
        for transport in list(self._transports):
            transport.close()
        await asyncio.sleep(0)  # let the closes run before the loop goes away

    # --- changes -----------------------------------------------------------------------------

    def _on_change(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop has closed, nobody to notify
            loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    # --- one stream --------------------------------------------------------------------------

    def _answer(
        self, caller: _Caller, first: ProcessInfo | None, build: Callable[[Sequence[Identity]], Any]
    ) -> tuple[ProcessInfo, Any]:
        """On a worker thread: attest the caller afresh and build what it gets now."""
        info = attest(caller.pid, caller.uid, caller.gid, pidfd=caller.pidfd)
        if first is not None and info.start_time != first.start_time:
            raise WorkloadAttestationError(f"attestation: pid {info.pid} now names another process")
        identities = list(self.provider.identities_for(info))
        if not identities:
            raise _NoIdentity()
        return info, build(identities)

    @staticmethod
    def _identify(stream: grpclib.server.Stream[Any, Any]) -> _Caller:
        try:
            return _Caller(_connection_of(stream))
        except WorkloadAttestationError as err:
            raise GRPCError(_NOT_IDENTIFIED, str(err)) from err
        except (MeshIdError, OSError) as err:
            log.error("Workload API: cannot identify a caller: %s", err)
            raise GRPCError(_BROKEN, str(err)) from err

    async def _attested(
        self, caller: _Caller, first: ProcessInfo | None, build: Callable[[Sequence[Identity]], Any]
    ) -> tuple[ProcessInfo, Any]:
        """What the caller gets now, attested afresh and checked again right before it is sent."""
        try:
            info, response = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._answer, caller, first, build
            )
            check_alive(info, pidfd=caller.pidfd)
        except WorkloadAttestationError as err:
            log.warning("Workload API: refusing pid %d (uid %d): %s", caller.pid, caller.uid, err)
            raise GRPCError(_NOT_IDENTIFIED, str(err)) from err
        except _NoIdentity:
            log.info("Workload API: no identity for pid %d (uid %d)", caller.pid, caller.uid)
            raise GRPCError(*_NO_IDENTITY) from None
        except MeshIdError as err:  # the provider's identity cannot be served, e.g. no bundle
            raise GRPCError(_NOT_READY, f"Workload API: no identity to serve: {err}") from err
        return info, response

    @staticmethod
    def _watch_exit(caller: _Caller) -> asyncio.Future[None]:
        """Done once the caller's process has exited (its pidfd turns readable, and stays so)."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        pidfd = caller.pidfd
        if pidfd is None:
            return exited  # no pidfd: the checks before each send are the guard

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        return exited

    async def _wait(self, changed: asyncio.Event, exited: asyncio.Future[None], caller: _Caller) -> None:
        """Until the provider changes; GRPCError when the server stops or the caller exits first."""
        assert self._stop is not None
        events: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(changed.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            await asyncio.wait([*events, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for event in events:
                event.cancel()
        if self._stop.is_set():
            raise GRPCError(*_SHUTTING_DOWN)
        if exited.done():
            log.info("Workload API: pid %d has exited; ending its stream", caller.pid)
            why = f"attestation: the process that connected as pid {caller.pid} has exited"
            raise GRPCError(_NOT_IDENTIFIED, why)

    @contextlib.asynccontextmanager
    async def _admitted(self, stream: grpclib.server.Stream[Any, Any]) -> AsyncIterator[_Caller]:
        """The stream let in, before a byte of its request is read: its security header checked,
        counted against max_streams until it ends (RESOURCE_EXHAUSTED beyond: a caller slow to
        send its request holds a place too), and its caller identified by the kernel's word."""
        _Servicer._require_header(stream)
        if len(self._streams) >= self._max_streams:
            raise GRPCError(*_BUSY)
        caller = self._identify(stream)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            yield caller
        finally:
            caller.close()
            self._streams.discard(task)

    async def _once(self, caller: _Caller, build: Callable[[Sequence[Identity]], T]) -> T:
        """One answer (a unary call): the caller attested, ``build`` run on its identities on a
        worker thread, and the caller checked again to be who connected before it is sent."""
        _, answer = await self._attested(caller, None, build)
        return answer  # type: ignore[no-any-return]

    async def _follow(
        self, stream: grpclib.server.Stream[Any, Any], request_type: Any, build: Callable[[Sequence[Identity]], Any]
    ) -> None:
        """One stream: a response now and after every change, while the caller is who connected."""
        async with self._admitted(stream) as caller:
            await recv_request(stream, request_type)  # read within bounds; these requests have no fields
            self._transports.add(caller.transport)
            exited = self._watch_exit(caller)
            try:
                first: ProcessInfo | None = None
                last = None
                while True:
                    changed = self._changed  # taken before reading: a change while answering is not lost
                    assert changed is not None
                    info, response = await self._attested(caller, first, build)
                    if first is None:
                        first = info
                    if response != last:  # e.g. a new SVID changes nothing FetchX509Bundles sends
                        await stream.send_message(response)
                        last = response
                    await self._wait(changed, exited, caller)
            finally:
                if caller.pidfd is not None:  # now, not later: a closed fd's number is soon another's
                    asyncio.get_running_loop().remove_reader(caller.pidfd)


class _NoIdentity(Exception):
    """The provider issues nothing to the caller."""
