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
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from typing import Any

import grpc

from meshid._background import Notifier, Unsubscribe, Worker
from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.bundle import BundleSet
from meshid.errors import MeshIdError, SourceError
from meshid.spiffeid import SpiffeId
from meshid.svid import X509Svid
from meshid.workloadapi import wire

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
        self._notifier = Notifier()
        self._lock = threading.Lock()
        self._worker = Worker("meshid-workload-api-source", self._run, wake=self._cancel_call)
        self._ready = threading.Event()
        self._channel: grpc.Channel | None = None
        self._call: Any = None
        self._state: tuple[X509Svid, BundleSet] | None = None
        #: The last stream or parse error, or None since the last good response. For health checks.
        self.last_error: str | None = None

    # --- the Source protocol -------------------------------------------------------------

    def get_svid(self) -> X509Svid:
        state = self._state
        if state is None:
            raise SourceError("Workload API source: no SVID yet; call start() first")
        return state[0]

    def get_bundles(self) -> BundleSet:
        state = self._state
        if state is None:
            raise SourceError("Workload API source: no bundle yet; call start() first")
        return state[1]

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._notifier.subscribe(callback)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> WorkloadApiSource:
        """Connect, wait for the first X509-SVID, then follow the stream in a daemon thread.

        Raises:
            SourceError: no usable response within ``timeout`` seconds (the message says why).
        """
        if self._worker.running:
            return self
        self._ready.clear()
        self._channel = grpc.insecure_channel(
            "unix:" + self._path,
            options=[
                # grpc's own reconnection backoff grows to two minutes; keep it within ours.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", int(self._max_backoff * 1000)),
            ],
        )
        self._worker.start()
        if not self._ready.wait(self._timeout):
            why = self.last_error or "no answer"
            self.close()
            raise SourceError(
                f"Workload API source: no X509-SVID from {self.endpoint} within {self._timeout:g}s: {why}"
            )
        return self

    def close(self) -> None:
        """Stop following the stream and close the connection."""
        self._worker.close()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

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

    def _cancel_call(self) -> None:
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _run(self, stop: threading.Event) -> None:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)  # type: ignore[no-untyped-call]
        failures = 0
        while not stop.is_set():
            call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=wire.METADATA)
            with self._lock:
                if stop.is_set():
                    call.cancel()
                    return
                self._call = call
            try:
                for response in call:
                    self._apply(response)
                    failures = 0
                why = "the server ended the stream"
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                why = f"{code.name if code else 'error'}: {details}"
            finally:
                with self._lock:
                    self._call = None
            if stop.is_set():
                return
            failures += 1
            delay = min(self._max_backoff, 0.1 * 2 ** min(failures - 1, 16)) * (0.5 + random.random() / 2)
            self.last_error = why
            level = logging.WARNING if self._state is not None else logging.DEBUG
            log.log(level, "Workload API source: %s at %s; reconnecting in %.2fs", why, self.endpoint, delay)
            stop.wait(delay)
