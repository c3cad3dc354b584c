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
import urllib.parse
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from meshid import _x509
from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.bundle import BundleSet, TrustBundle
from meshid.errors import InvalidBundleError, InvalidSvidError, MeshIdError, SourceError
from meshid.sources import Unsubscribe, _Notifier
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid

__all__ = ["ENDPOINT_SOCKET_ENV", "HEADER_KEY", "HEADER_VALUE", "WorkloadApiSource", "socket_path"]

log = logging.getLogger("meshid.workload")

#: The environment variable that names the Workload API endpoint (SPIFFE Workload Endpoint standard).
ENDPOINT_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
#: Every Workload API call carries this metadata header, and servers refuse calls without it.
HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"
_METADATA = ((HEADER_KEY, HEADER_VALUE),)


def socket_path(endpoint: str) -> str:
    """The filesystem path of a Workload API endpoint: ``unix:///path``, ``unix:/path`` or a plain path.

    Raises:
        ValueError: not a Unix socket address, or a ``unix:`` URI with an authority, query,
            fragment or relative path.
    """
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError("Workload API endpoint: give a Unix socket, e.g. unix:///run/meshid/agent.sock")
    if endpoint.startswith("unix:"):
        uri = urllib.parse.urlsplit(endpoint)
        if uri.netloc:
            raise ValueError(f"Workload API endpoint {endpoint!r}: a host is not allowed; write unix:///absolute/path")
        if uri.query or uri.fragment:
            raise ValueError(f"Workload API endpoint {endpoint!r}: a query or fragment is not allowed")
        if not uri.path.startswith("/"):
            raise ValueError(f"Workload API endpoint {endpoint!r}: the path must be absolute (unix:///path)")
        return uri.path
    if "://" in endpoint or endpoint.startswith("tcp:"):
        raise ValueError(f"Workload API endpoint {endpoint!r}: only Unix sockets are supported (unix:///path)")
    return os.path.abspath(endpoint)


def _split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER values (certificates, as the Workload API sends them)."""
    out, i = [], 0
    while i < len(data):
        if data[i] != 0x30 or i + 2 > len(data):
            raise ValueError(f"byte {i} does not start a DER SEQUENCE")
        first = data[i + 1]
        if first < 0x80:
            length, head = first, 2
        else:
            size = first & 0x7F
            if not 0 < size <= 4 or i + 2 + size > len(data):
                raise ValueError(f"bad DER length at byte {i}")
            length, head = int.from_bytes(data[i + 2 : i + 2 + size], "big"), 2 + size
        end = i + head + length
        if end > len(data):
            raise ValueError(f"DER value at byte {i} is truncated")
        out.append(data[i:end])
        i = end
    return out


def _certificates(data: bytes) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in _split_der(data)]


def _bundle(td: TrustDomain, data: bytes) -> TrustBundle:
    try:
        roots = _certificates(data)
    except ValueError as err:
        raise InvalidBundleError(f"trust bundle for {td} from the Workload API: not DER certificates: {err}") from err
    if not roots:
        raise InvalidBundleError(f"trust bundle for {td} from the Workload API: empty")
    for index, root in enumerate(roots):
        if not _x509.is_ca(root):
            raise InvalidBundleError(f"trust bundle for {td} from the Workload API: certificate {index} is not a CA")
    return TrustBundle(td, tuple(roots))


def _parse(response: Any, want: SpiffeId | None) -> tuple[X509Svid, BundleSet]:
    """The chosen SVID of an ``X509SVIDResponse`` and the bundles it carries.

    Raises:
        MeshIdError: the response holds no (such) SVID, or an SVID or bundle that does not parse.
    """
    ids = [s.spiffe_id for s in response.svids]
    if not ids:
        raise SourceError("Workload API: the response holds no X509-SVID; is the workload registered?")
    if want is None:
        chosen = response.svids[0]
    elif str(want) in ids:
        chosen = response.svids[ids.index(str(want))]
    else:
        raise SourceError(f"Workload API: no X509-SVID for {want} in the response (it holds {', '.join(ids)})")
    try:
        chain = _certificates(chosen.x509_svid)
        key = serialization.load_der_private_key(chosen.x509_svid_key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise InvalidSvidError(f"X509-SVID {chosen.spiffe_id} from the Workload API: {err}") from err
    svid = X509Svid.from_parts(chain, key)  # type: ignore[arg-type]
    if str(svid.spiffe_id) != chosen.spiffe_id:
        raise InvalidSvidError(
            f"X509-SVID from the Workload API: labelled {chosen.spiffe_id} but the certificate says {svid.spiffe_id}"
        )
    own = svid.spiffe_id.trust_domain
    bundles = []
    for name, der in response.federated_bundles.items():
        td = TrustDomain.parse(name)
        if td != own:  # the SVID's own bundle is authoritative for its trust domain
            bundles.append(_bundle(td, der))
    bundles.append(_bundle(own, chosen.bundle))
    return svid, BundleSet.of(bundles)


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
        endpoint = socket if socket is not None else os.environ.get(ENDPOINT_SOCKET_ENV)
        if not endpoint:
            raise ValueError(f"Workload API source: no socket given and {ENDPOINT_SOCKET_ENV} is not set")
        if timeout <= 0 or max_backoff <= 0:
            raise ValueError("timeout and max_backoff must be positive")
        self.endpoint = endpoint
        self._path = socket_path(endpoint)
        if spiffe_id is not None and not isinstance(spiffe_id, SpiffeId | str):
            raise TypeError(f"spiffe_id must be a SpiffeId or str, not {type(spiffe_id).__name__}")
        self._want = SpiffeId.parse(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._notifier = _Notifier()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
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
        if self._thread is not None:
            return self
        self._stop.clear()
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
        self._thread = threading.Thread(target=self._run, name="meshid-workload-api-source", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout):
            why = self.last_error or "no answer"
            self.close()
            raise SourceError(
                f"Workload API source: no X509-SVID from {self.endpoint} within {self._timeout:g}s: {why}"
            )
        return self

    def close(self) -> None:
        """Stop following the stream and close the connection."""
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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
            state = _parse(response, self._want)
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

    def _run(self) -> None:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)  # type: ignore[no-untyped-call]
        failures = 0
        while not self._stop.is_set():
            call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=_METADATA)
            with self._lock:
                if self._stop.is_set():
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
            if self._stop.is_set():
                return
            failures += 1
            delay = min(self._max_backoff, 0.1 * 2 ** min(failures - 1, 16)) * (0.5 + random.random() / 2)
            self.last_error = why
            level = logging.WARNING if self._state is not None else logging.DEBUG
            log.log(level, "Workload API source: %s at %s; reconnecting in %.2fs", why, self.endpoint, delay)
            self._stop.wait(delay)
