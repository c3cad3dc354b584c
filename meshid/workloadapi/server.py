"""The SPIFFE Workload API, served: any identity source, on a Unix socket, to any SPIFFE client.

:class:`WorkloadApiServer` answers ``FetchX509SVID`` and ``FetchX509Bundles`` from a
:class:`~meshid.Source` (normally the agent's :class:`~meshid.agent.IssuerSource`) and streams a
new response whenever the source changes, so SPIRE-era clients (go-spiffe, py-spiffe,
:class:`meshid.WorkloadApiSource`) follow rotations without reading files.

The JWT-SVID profile: ``FetchJWTSVID`` hands out the source's JWT-SVID for the audience asked
(the source must be a :class:`~meshid.sources.JwtSource`, as :class:`~meshid.IssuerSource` is;
else UNIMPLEMENTED), ``FetchJWTBundles`` streams every trust domain's JWT keys and sends again
when they change, ``ValidateJWTSVID`` validates a token against the source's bundles for the
caller. Status codes as the standard and SPIRE answer: no audience (or token) INVALID_ARGUMENT,
a SPIFFE ID the source does not hold PERMISSION_DENIED, a token that does not validate
INVALID_ARGUMENT with the reason, the CA unreachable UNAVAILABLE.

Access control is the socket's file mode. meshid does no workload attestation: whoever can
connect gets the SVID *and its private key*. The socket is therefore narrowed to ``mode``
(0600 by default: the agent's own user) right after grpc binds it and before the server starts
answering; a connection made in that instant would still need write permission under the
process umask. Put the socket in a directory only the intended workloads can reach.

As SPIRE does, every call must carry the metadata ``workload.spiffe.io: true`` (so that a
browser or an SSRF-able proxy cannot be made to call the socket), else INVALID_ARGUMENT with
SPIRE's message ``security header missing from request``.

Each open stream holds one server thread until it ends, so at most ``max_streams`` streams are
served at once; the next call is refused with RESOURCE_EXHAUSTED instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from meshid._background import Unsubscribe
from meshid._listen import refuse_unix_in_use
from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.bundle import BundleSet
from meshid.errors import InvalidJwtSvidError, InvalidSpiffeIdError, ListenError, MeshIdError, RemoteError
from meshid.sources import JwtSource, Source, require_source
from meshid.spiffeid import SpiffeId
from meshid.workloadapi import wire

__all__ = ["WorkloadApiServer"]

log = logging.getLogger("meshid.agent")

# The status codes this server answers with, in one place (the first is SPIRE's, word for word).
_NO_HEADER = (grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
_NO_JWT = (
    grpc.StatusCode.UNIMPLEMENTED,
    "this Workload API's source issues no JWT-SVIDs (it is not a JwtSource)",
)
_NO_AUDIENCE = (grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")  # SPIRE's words
_NO_TOKEN = (grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
_NOT_HELD = grpc.StatusCode.PERMISSION_DENIED  # a SPIFFE ID the source does not hold
_BAD_TOKEN = grpc.StatusCode.INVALID_ARGUMENT  # ValidateJWTSVID: the token does not validate
#: The CA's refusals of a JWT-SVID that are the caller's doing, passed on; others are UNAVAILABLE.
_RELAYED = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
}
_NOT_READY = grpc.StatusCode.UNAVAILABLE  # the source has nothing to hand out (yet): retry
_SHUTTING_DOWN = (grpc.StatusCode.UNAVAILABLE, "the Workload API server is shutting down; reconnect")


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The five Workload API methods over one source; streams wait on the server's change signal."""

    def __init__(self, server: WorkloadApiServer) -> None:
        self._server = server

    @staticmethod
    def _require_header(context: grpc.ServicerContext) -> None:
        values = [v for k, v in context.invocation_metadata() if k == wire.HEADER_KEY]
        if values != [wire.HEADER_VALUE]:
            context.abort(*_NO_HEADER)

    def _follow(self, context: grpc.ServicerContext, build: Callable[[Source], Any]) -> Iterator[Any]:
        if not context.add_callback(self._server._wake):  # a client that goes away wakes its stream
            return  # it has gone already
        seen, last = -1, None
        while True:
            version = self._server._wait_for_change(seen, context)
            if version is None:
                if context.is_active():
                    context.abort(*_SHUTTING_DOWN)
                return
            seen = version
            try:
                response = build(self._server.source)
            except MeshIdError as err:
                context.abort(_NOT_READY, f"Workload API: no identity to serve: {err}")
            if response != last:  # e.g. a new SVID changes nothing FetchX509Bundles sends
                last = response
                yield response

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._require_header(context)
        # A source with ML-DSA SVIDs beside its own (IssuerSource(pq_key_kind=...)) has them served
        # second; any other source has none (tuple() is the empty tuple).
        additional = getattr(self._server.source, "get_additional_svids", tuple)
        return self._follow(
            context, lambda src: wire.x509_svid_response(src.get_svid(), src.get_bundles(), additional())
        )

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._require_header(context)
        return self._follow(context, lambda source: wire.x509_bundles_response(source.get_svid(), source.get_bundles()))

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_header(context)
        source = self._server.source
        if not isinstance(source, JwtSource):
            context.abort(*_NO_JWT)
        audience = list(request.audience)
        if not audience:
            context.abort(*_NO_AUDIENCE)
        try:
            held = source.get_svid().spiffe_id
        except MeshIdError as err:
            context.abort(_NOT_READY, f"Workload API: no identity to serve: {err}")
        if request.spiffe_id:
            try:
                asked = SpiffeId.parse(request.spiffe_id)
            except InvalidSpiffeIdError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Workload API: spiffe_id: {err}")
            if asked != held:
                context.abort(_NOT_HELD, f"Workload API: no identity {asked} issued to this caller")
        try:
            svid = source.fetch_jwt_svid(audience, held)
        except RemoteError as err:  # the CA's own refusal (a bad audience) is the caller's
            code = _RELAYED.get(err.code or "", _NOT_READY)
            context.abort(code, f"Workload API: JWT-SVID: {err}")
        except (MeshIdError, ValueError) as err:
            context.abort(_NOT_READY, f"Workload API: JWT-SVID: {err}")
        return wire.jwt_svid_response([svid])

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._require_header(context)
        return self._follow(context, lambda source: wire.jwt_bundles_response(_jwt_bundles(source)))

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_header(context)
        if not request.audience:
            context.abort(*_NO_AUDIENCE)
        if not request.svid:
            context.abort(*_NO_TOKEN)
        try:
            bundles = _jwt_bundles(self._server.source)
        except MeshIdError as err:
            context.abort(_NOT_READY, f"Workload API: no bundle to validate with: {err}")
        return _validate(context, request, bundles)


def _jwt_bundles(source: Source) -> BundleSet:
    return source.get_jwt_bundles() if isinstance(source, JwtSource) else source.get_bundles()


def _validate(context: grpc.ServicerContext, request: Any, bundles: BundleSet) -> Any:
    from meshid.jwtsvid import JwtSvid

    try:
        svid = JwtSvid.parse_and_validate(request.svid, bundles, [request.audience])
    except InvalidJwtSvidError as err:
        context.abort(_BAD_TOKEN, str(err))
    return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=wire.claims_struct(svid.claims))


class WorkloadApiServer:
    """Serves ``source`` over the SPIFFE Workload API on a Unix socket.

    Args:
        source: any identity source; every change it notifies is streamed to every client.
        socket: ``unix:///path``, ``unix:/path`` or a plain path.
        mode: the socket's file mode, set right after binding (default 0600: this user only).
        max_streams: how many calls are served at once (each stream holds a thread).

    Nothing happens until :meth:`start`; :meth:`stop` ends every stream and removes the socket.

    Raises:
        ValueError: ``socket`` is not a Unix socket address.
        TypeError: ``source`` is not a source.
    """

    def __init__(self, source: Source, socket: str, *, mode: int = 0o600, max_streams: int = 64) -> None:
        if not isinstance(source, Source):
            raise TypeError(
                f"source must provide get_svid(), get_bundles() and subscribe(), not {type(source).__name__}"
            )
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be a file mode such as 0o600, not {mode:#o}")
        self.source = source
        self.path = wire.socket_path(socket)
        self._mode = mode
        self._max_streams = max_streams
        self._changed = threading.Condition()
        self._version = 0
        self._closing = False
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._unsubscribe: Unsubscribe | None = None
        self._inode: int | None = None
        self._lifecycle = threading.Lock()  # start() and stop() run in one thread at a time

    # --- the change signal every stream waits on -----------------------------------------

    def _on_change(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _wait_for_change(self, seen: int, context: grpc.ServicerContext) -> int | None:
        """The new version once it differs from ``seen``; None when the stream should end."""
        with self._changed:
            self._changed.wait_for(lambda: self._closing or not context.is_active() or self._version != seen)
            if self._closing or not context.is_active():
                return None
            return self._version

    # --- lifecycle -----------------------------------------------------------------------

    def check_free(self) -> None:
        """Refuse the socket path now if a live server holds it or it is not a socket.

        :meth:`start` checks again; calling this first lets a caller fail before it does
        anything that cannot be undone (the agent: before it spends a one-time join token).
        A stale socket file (nobody listening) is free: :meth:`start` replaces it.

        Raises:
            ListenError, MeshIdError: another server is listening on the path (ListenError), or the
                path is not a socket.
        """
        refuse_unix_in_use(self.path, who="Workload API")

    def start(self) -> WorkloadApiServer:
        """Bind the socket, narrow its mode, and begin serving. Returns self.

        Raises:
            SourceError: the source has no SVID to serve.
            ListenError, MeshIdError: the path is held by a live server or is not a socket, or the socket
                cannot be bound or its mode set.
            OSError: the socket's directory cannot be created.
        """
        with self._lifecycle:
            return self._start()

    def _start(self) -> WorkloadApiServer:
        if self._server is not None:
            return self
        require_source(self.source)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        refuse_unix_in_use(self.path, who="Workload API")
        self._closing = False
        executor = futures.ThreadPoolExecutor(max_workers=self._max_streams, thread_name_prefix="meshid-workload-api")
        server = grpc.server(executor, maximum_concurrent_rpcs=self._max_streams)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self), server)  # type: ignore[no-untyped-call]
        try:
            if not server.add_insecure_port("unix:" + self.path):
                raise OSError("grpc bound no address")
            os.chmod(self.path, self._mode)  # before start(): nothing is served with a wider mode
            self._inode = os.stat(self.path).st_ino
        except (RuntimeError, OSError) as err:
            server.stop(None)
            executor.shutdown(wait=False)
            raise ListenError(f"Workload API: cannot serve on {self.path}: {err}") from err
        self._unsubscribe = self.source.subscribe(self._on_change)
        server.start()
        self._server, self._executor = server, executor
        log.info("Workload API: serving on unix:%s (mode %o)", self.path, self._mode)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """End every stream (UNAVAILABLE: clients reconnect), stop serving, remove the socket.
        Safe from several threads at once: each returns once the server has stopped."""
        with self._lifecycle:
            self._stop_serving(grace)

    def _stop_serving(self, grace: float | None) -> None:
        server, executor = self._server, self._executor
        if server is None:
            return
        self._server = self._executor = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        server.stop(grace).wait()
        if executor is not None:
            executor.shutdown(wait=True)
        try:  # grpc removes it; a path some other server took over since is not ours to remove
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        log.info("Workload API: stopped serving on unix:%s", self.path)

    def __enter__(self) -> WorkloadApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
