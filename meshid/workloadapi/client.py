"""WorkloadApiSource: an identity source fed by a SPIFFE Workload API server.

The server may be a SPIRE agent or ``meshid agent --workload-api``; either streams a new
``X509SVIDResponse`` whenever the workload's SVID or bundles change, and this source follows
the stream, reconnecting with capped exponential backoff when it breaks. The endpoint is a Unix
socket, given as ``unix:///path``, ``unix:/path`` (both forms the SPIFFE Workload Endpoint
standard allows) or a plain path, and defaults to ``$SPIFFE_ENDPOINT_SOCKET``.

The source presents the *default* identity, the first SVID of each response (SPIFFE Workload
API standard, section 5.3), or the one whose SPIFFE ID is ``spiffe_id=``. The local Workload API
is the workload's root of trust, so the SVID is checked against the X509-SVID rules and its key,
not re-verified against the bundle it came with. A response that fails to parse leaves the
previous identity in force and is logged.

JWT-SVIDs (a :class:`~meshid.sources.JwtSource`): :meth:`WorkloadApiSource.fetch_jwt_svid` asks
``FetchJWTSVID`` each time (the agent caches tokens, not this source), :meth:`validate_jwt_svid`
has the agent validate a token (``ValidateJWTSVID``), and a second stream follows
``FetchJWTBundles``: its JWT keys join the X.509 bundles :meth:`get_bundles` hands out, so an
interceptor over this source can validate JWT-SVIDs locally. A server without the JWT profile
(UNIMPLEMENTED) leaves the bundles without JWT keys.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from meshid._background import Notifier, Unsubscribe, Worker
from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.bundle import BundleSet
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import InvalidJwtSvidError, MeshIdError, SourceError
from meshid.spiffeid import SpiffeId
from meshid.svid import X509Svid
from meshid.workloadapi import wire

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = ["WorkloadApiSource"]

log = logging.getLogger("meshid.workload")


class WorkloadApiSource:
    """An identity source whose SVID and bundles come from a SPIFFE Workload API server.

    Args:
        socket: the endpoint (``unix:///path``, ``unix:/path`` or a path); default
            ``$SPIFFE_ENDPOINT_SOCKET``.
        spiffe_id: present this SPIFFE ID's SVID rather than the first (default) one.
        timeout: how long :meth:`start` waits for the first response, in seconds.
        max_backoff: the longest wait between reconnection attempts, in seconds.
        clock: what the waits between reconnection attempts are measured on.

    Nothing happens until :meth:`start`.

    Raises:
        ValueError: no endpoint is given or set, or it is not a Unix socket address.
        InvalidSpiffeIdError, TypeError: ``spiffe_id`` is not a SPIFFE ID.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        spiffe_id: SpiffeId | str | None = None,
        timeout: float = 10.0,
        max_backoff: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        endpoint = socket if socket is not None else os.environ.get(wire.ENDPOINT_SOCKET_ENV)
        if not endpoint:
            raise ValueError(f"Workload API source: no socket given and {wire.ENDPOINT_SOCKET_ENV} is not set")
        if timeout <= 0 or max_backoff <= 0:
            raise ValueError("timeout and max_backoff must be positive")
        self.endpoint = endpoint
        self._path = wire.socket_path(endpoint)
        if spiffe_id is not None and not isinstance(spiffe_id, SpiffeId | str):
            raise TypeError(f"spiffe_id must be a SpiffeId or str, not {type(spiffe_id).__name__}")
        self._want = SpiffeId.parse(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._clock = clock
        self._notifier = Notifier()
        self._lock = threading.Lock()
        self._worker = Worker("meshid-workload-api-source", self._run, wake=lambda: self._cancel("_call"))
        self._jwt_worker = Worker(
            "meshid-workload-api-jwt-bundles", self._run_jwt_bundles, wake=lambda: self._cancel("_jwt_call")
        )
        self._ready = threading.Event()  # the first answer came, or close() was called
        self._closing = threading.Event()
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._jwt_call: Any = None
        self._state: tuple[X509Svid, BundleSet] | None = None
        self._jwt_bundles: Any = None  # the last JWTBundlesResponse
        self._merged: tuple[BundleSet, Any, BundleSet] | None = None  # (X.509 bundles, response, merged)
        #: The last stream or parse error, or None since the last good response. For health checks.
        self.last_error: str | None = None

    # --- the Source protocol -------------------------------------------------------------

    def get_svid(self) -> X509Svid:
        state = self._state
        if state is None:
            raise SourceError("Workload API source: no SVID yet; call start() first")
        return state[0]

    def get_bundles(self) -> BundleSet:
        """The X.509 bundles of the last X509SVIDResponse, with the JWT keys of the last
        JWTBundlesResponse (none until one came)."""
        state = self._state
        if state is None:
            raise SourceError("Workload API source: no bundle yet; call start() first")
        bundles, jwt_response = state[1], self._jwt_bundles
        if jwt_response is None:
            return bundles
        merged = self._merged
        if merged is None or merged[0] is not bundles or merged[1] is not jwt_response:
            try:
                merged = (bundles, jwt_response, wire.parse_jwt_bundles_response(jwt_response, bundles))
            except MeshIdError as err:  # checked when it arrived; a bundle that fails now is logged
                log.error("Workload API source: ignoring the JWT bundles: %s", err)
                return bundles
            self._merged = merged
        return merged[2]

    # --- the JwtSource protocol ----------------------------------------------------------

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: SpiffeId | None = None) -> JwtSvid:
        """A JWT-SVID for ``audience`` from the Workload API: of ``spiffe_id``, else of the
        source's ``spiffe_id=``, else the server's first (default) one.

        Raises:
            ValueError: ``audience`` is empty or a plain string.
            SourceError: the server refused (the message has its status code) or answered none.
            InvalidJwtSvidError: the server answered a token that does not parse or is not for
                ``audience``.
        """
        from meshid.jwtsvid import JwtSvid

        if isinstance(audience, str) or not audience:
            raise ValueError("JWT-SVID: give the audience as a non-empty list of strings")
        want = spiffe_id or self._want
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=str(want) if want else "")
        response = self._unary("FetchJWTSVID", request)
        if not response.svids:
            raise SourceError(f"Workload API: no JWT-SVID from {self.endpoint}")
        chosen = response.svids[0]
        svid = JwtSvid.parse_insecure(chosen.svid, audience)
        if str(svid.spiffe_id) != chosen.spiffe_id or (want is not None and svid.spiffe_id != want):
            raise InvalidJwtSvidError(
                f"JWT-SVID from the Workload API: labelled {chosen.spiffe_id[:200]}, for {svid.spiffe_id}"
            )
        return svid

    def get_jwt_bundles(self) -> BundleSet:
        """The bundles with their JWT keys (the same set :meth:`get_bundles` hands out)."""
        return self.get_bundles()

    def validate_jwt_svid(self, token: str, audience: str) -> JwtSvid:
        """Have the Workload API validate ``token`` for ``audience`` (``ValidateJWTSVID``).

        Raises:
            ValueError: ``token`` or ``audience`` is empty.
            InvalidJwtSvidError: the server found the token invalid (its reason), or it names
                another SPIFFE ID than the token's ``sub``.
            SourceError: the server could not be asked.
        """
        from meshid.jwtsvid import JwtSvid

        if not token or not audience or not isinstance(audience, str):
            raise ValueError("JWT-SVID validation: give the token and one audience (a string)")
        request = workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)
        try:
            response = self._unary("ValidateJWTSVID", request)
        except _Refused as err:
            if err.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidJwtSvidError(err.details) from None
            raise
        svid = JwtSvid.parse_insecure(token, [audience])
        if str(svid.spiffe_id) != response.spiffe_id:
            raise InvalidJwtSvidError(f"JWT-SVID: the Workload API validated it as {response.spiffe_id[:200]!r}")
        return svid

    def _unary(self, method: str, request: Any) -> Any:
        channel = self._channel
        if channel is None:
            raise SourceError("Workload API source: not started; call start() first")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        try:
            return getattr(stub, method)(request, metadata=wire.METADATA, timeout=self._timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
            raise _Refused(f"Workload API: {method}: {code.name}: {details}", code, details) from None

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._notifier.subscribe(callback)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> WorkloadApiSource:
        """Connect, wait for the first X509-SVID, then follow the stream in a daemon thread.

        Raises:
            SourceError: no usable response within ``timeout`` seconds (the message says why), or
                :meth:`close` was called meanwhile (from another thread).
        """
        if self._worker.running:
            return self
        self._closing.clear()
        self._ready.clear()
        channel: grpc.Channel | None = grpc.insecure_channel(
            "unix:" + self._path,
            options=[
                # grpc's own reconnection backoff grows to two minutes; keep it within ours.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", int(self._max_backoff * 1000)),
            ],
        )
        with self._lock:
            if not self._closing.is_set():
                self._channel, channel = channel, None
        if channel is not None:  # closed before it had a channel
            channel.close()
        # Each start finds _closing set (and starts nothing) or is joined by the close that sets it.
        started = self._worker.start(unless=self._closing) and self._jwt_worker.start(unless=self._closing)
        answered = started and self._ready.wait(self._timeout)  # close() from another thread sets it too
        if self._closing.is_set():
            self.close()
            raise SourceError(f"Workload API source: closed while it waited for the first answer from {self.endpoint}")
        if not answered:
            why = self.last_error or "no answer"
            self.close()
            raise SourceError(
                f"Workload API source: no X509-SVID from {self.endpoint} within {self._timeout:g}s: {why}"
            )
        return self

    def close(self) -> None:
        """Stop following the streams and close the connection; also ends a :meth:`start` still
        waiting for the first answer, from another thread."""
        self._closing.set()
        self._ready.set()
        workers = (self._worker, self._jwt_worker)
        if any(worker.current for worker in workers):
            # From a subscriber, on one stream's thread: joining the other stream's thread could
            # wait forever (it may be in a subscriber closing this source too). Both end by
            # themselves once stopped and their channel is closed.
            for worker in workers:
                worker.signal()
        else:
            for worker in workers:
                worker.close()
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> WorkloadApiSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _apply(self, response: Any) -> None:
        try:
            state = wire.parse_x509_svid_response(response, self._want)
        except Exception as err:  # MeshIdError, or worse: either way it must not end the stream thread
            self.last_error = str(err)
            current = self._state
            keeping = f"keeping {current[0].spiffe_id} (serial {current[0].serial:x})" if current else "no SVID yet"
            log.error(
                "Workload API source: ignoring a response: %s; %s",
                err,
                keeping,
                exc_info=not isinstance(err, MeshIdError),
            )
            return
        self.last_error = None
        changed = state != self._state
        self._state = state
        self._ready.set()
        if changed:
            log.info("Workload API source: now presenting %s (serial %x)", state[0].spiffe_id, state[0].serial)
            self._notifier.notify()

    def _apply_jwt_bundles(self, response: Any) -> None:
        state = self._state
        try:
            if state is not None:
                wire.parse_jwt_bundles_response(response, state[1])  # refuse what does not parse
        except MeshIdError as err:
            self.last_error = str(err)
            log.error("Workload API source: ignoring a JWT bundles response: %s", err)
            return
        changed = response != self._jwt_bundles
        self._jwt_bundles = response
        if changed:
            log.info("Workload API source: JWT bundles of %s", ", ".join(sorted(response.bundles)) or "no trust domain")
            self._notifier.notify()

    def _cancel(self, slot: str) -> None:
        with self._lock:
            call = getattr(self, slot)
        if call is not None:
            call.cancel()

    def _run_jwt_bundles(self, stop: threading.Event) -> None:
        self._follow(stop, "FetchJWTBundles", workload_pb2.JWTBundlesRequest(), "_jwt_call", self._apply_jwt_bundles)

    def _run(self, stop: threading.Event) -> None:
        self._follow(stop, "FetchX509SVID", workload_pb2.X509SVIDRequest(), "_call", self._apply)

    def _follow(
        self, stop: threading.Event, method: str, request: Any, slot: str, apply: Callable[[Any], None]
    ) -> None:
        """Follow one stream until ``stop``, reconnecting with backoff (UNIMPLEMENTED: give up).

        The backoff starts again only after a stream that stayed open for ``max_backoff``: one
        that ends right after its answers (a server or proxy that accepts, answers and closes)
        gives nothing lasting, and reconnecting to it every 0.1 s would be a busy loop.
        """
        with self._lock:
            channel = self._channel
        if channel is None:  # closed before this thread began
            return
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
        failures = 0
        while not stop.is_set():
            opened = self._clock.monotonic()
            try:
                call = getattr(stub, method)(request, metadata=wire.METADATA)
            except ValueError:  # the channel is closed: close() from a subscriber on the other stream
                if stop.is_set():
                    return
                raise
            with self._lock:
                if stop.is_set():
                    call.cancel()
                    return
                setattr(self, slot, call)
            try:
                for response in call:
                    apply(response)
                why = "the server ended the stream"
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                if code == grpc.StatusCode.UNIMPLEMENTED and method != "FetchX509SVID":
                    log.info("Workload API source: %s serves no %s (%s)", self.endpoint, method, details)
                    return
                why = f"{method}: {code.name if code else 'error'}: {details}"
            finally:
                with self._lock:
                    setattr(self, slot, None)
            if stop.is_set():
                return
            if self._clock.monotonic() - opened >= self._max_backoff:
                failures = 0  # it served for a while: reconnect soon
            failures += 1
            delay = min(self._max_backoff, 0.1 * 2 ** min(failures - 1, 16)) * (0.5 + random.random() / 2)
            self.last_error = why
            level = logging.WARNING if self._state is not None else logging.DEBUG
            log.log(level, "Workload API source: %s at %s; reconnecting in %.2fs", why, self.endpoint, delay)
            self._clock.wait(stop, delay)


class _Refused(SourceError):
    """A Workload API call the server answered with an error status."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details
