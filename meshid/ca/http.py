"""The CA's revocation endpoints over plain HTTP: the OCSP responder and the CRL.

``meshid ca serve --ocsp-listen HOST:PORT`` serves, on one listener:

* ``POST /`` (any path) with an ``application/ocsp-request`` body, and
  ``GET /<base64 of the DER request>`` (RFC 6960 appendix A; after any prefix, such as ``/ocsp``):
  an ``application/ocsp-response`` (see :mod:`meshid.ca.ocsp`);
* ``GET /crl.der`` and ``GET /crl.pem``: the CA's current signed CRL, DER or PEM (nginx's
  ``ssl_crl`` reads PEM).

OCSP and CRLs carry their own signatures, so plain HTTP is what clients expect (RFC 6960,
RFC 5280 4.2.1.13). Every input is bounded: the request line and headers by ``http.server``
(64 KiB and 100 headers), the path by :data:`MAX_URL_BYTES`, a body by
:data:`meshid.ca.ocsp.MAX_REQUEST_BYTES` (its one ``Content-Length`` plain ASCII digits), the time
a whole request takes to arrive, or a keep-alive connection stays idle, by :data:`IO_TIMEOUT`
(then the connection is closed), and the connections served at once by ``max_connections`` (one
more is closed unanswered). What does not fit gets an OCSP ``malformedRequest`` answer, never a
traceback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.message
import errno
import http.server
import io
import logging
import socket
import threading
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshid import _x509
from meshid._listen import parse_address
from meshid.ca.ocsp import MAX_REQUEST_BYTES, OcspAnswer, OcspResponder
from meshid.errors import InvalidAddressError, ListenError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["IO_TIMEOUT", "MAX_URL_BYTES", "RevocationHttpServer"]

log = logging.getLogger("meshid.ca.http")

#: The longest path taken: a GET request's base64 is about 4/3 of the DER.
MAX_URL_BYTES = 4 * 1024
#: Seconds a request may take to arrive whole (request line, headers and body together) and a
#: keep-alive connection may wait for the next one; then it is closed. One deadline for the whole
#: request, not one per read: a client trickling a byte at a time would otherwise hold its
#: thread, and one of ``max_connections``, forever.
IO_TIMEOUT = 10.0
OCSP_RESPONSE = "application/ocsp-response"

CrlSource = Callable[[], bytes]
Observer = Callable[[OcspAnswer, float], None]


def _get_request(path: str) -> bytes:
    """The DER request of a GET: the path's last part, after whatever prefix the URL in the
    certificates has (``/ocsp``, ``/some/prefix``). Base64 may hold ``/`` itself (when a client
    does not escape it), so the parts are dropped from the left until what is left decodes to
    a DER SEQUENCE, as every OCSPRequest is; b"" (malformed) if none does."""
    rest = path.lstrip("/")
    for _ in range(8):
        try:
            der = base64.b64decode(urllib.parse.unquote(rest), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if der[:1] == b"\x30":
            return der
        _, slash, rest = rest.partition("/")
        if not slash:
            break
    return b""


def _content_length(headers: email.message.Message) -> int | None:
    """A POST body's length: its one ``Content-Length``, 1 to 5 ASCII digits, at most
    :data:`MAX_REQUEST_BYTES`, with no ``Transfer-Encoding`` beside it; None (malformed) otherwise.
    ``str.isdigit()`` alone takes ``'²'``, which ``int()`` refuses, and ``int()`` refuses more
    than 4300 digits: both raised inside the handler."""
    values = headers.get_all("Content-Length") or []
    if len(values) != 1 or "Transfer-Encoding" in headers:
        return None
    value = values[0]
    if not (0 < len(value) <= len(str(MAX_REQUEST_BYTES)) and value.isascii() and value.isdigit()):
        return None
    length = int(value)
    return length if length <= MAX_REQUEST_BYTES else None


class _DeadlineReader(io.RawIOBase):
    """A connection's bytes, each read allowed only what is left of ``time_left()``; past it,
    ``TimeoutError`` (which ``http.server`` answers by closing the connection)."""

    def __init__(self, connection: socket.socket, time_left: Callable[[], float]) -> None:
        self._connection = connection
        self._time_left = time_left

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        left = self._time_left()
        if left <= 0:  # settimeout(0) would mean non-blocking, not "no time left"
            raise TimeoutError("the request did not arrive whole in time")
        self._connection.settimeout(left)  # the answer's write gets what is left, too
        return self._connection.recv_into(buffer)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: nginx and openssl reuse a connection
    # Headers and body go out in two writes: with Nagle's algorithm the second waits for the
    # client's delayed ACK (40 ms a response on Linux).
    disable_nagle_algorithm = True
    server_version = "meshid-ocsp"
    sys_version = ""
    _deadline = 0.0

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket is really closed only once every file made from it is
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self._time_left))

    def handle_one_request(self) -> None:
        self._deadline = self.server.clock() + self.server.request_timeout
        super().handle_one_request()

    def _time_left(self) -> float:
        return self._deadline - self.server.clock()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("OCSP HTTP: %s " + format, self.address_string(), *args)

    def _send(self, status: int, content_type: str, body: bytes, cache: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if cache > 0:
            self.send_header("Cache-Control", f"max-age={cache}, public, no-transform, must-revalidate")
        else:
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _ocsp(self, der: bytes, *, get: bool) -> None:
        started = self.server.clock()
        result = self.server.responder.respond(der)
        self.server.observe(result, self.server.clock() - started)
        self._send(200, OCSP_RESPONSE, result.der, result.max_age if get else 0)

    def _malformed(self) -> None:
        self.close_connection = True  # what is left of the request cannot be trusted to frame the next
        self._ocsp(b"", get=False)

    def do_GET(self) -> None:
        if len(self.path) > MAX_URL_BYTES:
            self._malformed()
            return
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/crl.der", "/crl.pem", "/crl"):
            try:
                der = self.server.crl()
            except Exception as err:
                log.warning("CA: the CRL cannot be served: %s", err)
                self._send(503, "text/plain", b"the CRL is unavailable; try again later\n")
                return
            if path == "/crl.pem":
                self._send(200, "application/x-pem-file", _x509.crl_pem(der), 60)
            else:
                self._send(200, "application/pkix-crl", der, 60)
            return
        self._ocsp(_get_request(path), get=True)

    def do_POST(self) -> None:
        length = _content_length(self.headers)
        if len(self.path) > MAX_URL_BYTES or length is None:
            self._malformed()  # no length (chunked), a malformed one or too long: not read at all
            return
        self._ocsp(self.rfile.read(length), get=False)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (a request line or header too long, a bad version, an
        # unknown method) come here: answer them as OCSP does, in one well-formed response.
        if code in (408, 414, 431, 400, 501, 505) and self.command != "HEAD":
            self.close_connection = True
            self.requestline = getattr(self, "requestline", "") or "-"
            self.request_version = "HTTP/1.1"
            self._ocsp(b"", get=False)
            return
        super().send_error(code, message, explain)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # SO_REUSEADDR only: a port someone listens on is still refused

    def __init__(
        self,
        address: tuple[str, int],
        responder: OcspResponder,
        crl: CrlSource,
        observe: Observer,
        clock: Callable[[], float],
        max_connections: int,
        request_timeout: float,
    ) -> None:
        self.responder, self.crl, self.observe, self.clock = responder, crl, observe, clock
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the limit: closed at once rather than queued
            return
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open.discard(request)
        self._slots.release()

    def close_connections(self) -> None:
        """End the keep-alive connections still open (their threads then finish)."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("OCSP HTTP: connection from %s ended with an error", client_address, exc_info=True)


class RevocationHttpServer:
    """The OCSP responder and the CRL on one HTTP listener. ``start()`` binds; ``stop()`` ends it.

    ``observe(answer, seconds)`` is called once for each OCSP answer (metrics). At most
    ``max_connections`` are served at once; each request must arrive whole within
    ``request_timeout`` seconds (default :data:`IO_TIMEOUT`), read on ``clock``.

    Raises:
        ValueError: ``max_connections`` or ``request_timeout`` is not positive.
    """

    def __init__(
        self,
        listen: str,
        responder: OcspResponder,
        crl: CrlSource,
        *,
        observe: Observer = lambda answer, seconds: None,
        clock: Callable[[], float] | None = None,
        max_connections: int = 128,
        request_timeout: float = IO_TIMEOUT,
    ) -> None:
        import time

        if max_connections < 1 or not request_timeout > 0:
            raise ValueError(
                f"OCSP: max_connections ({max_connections}) and request_timeout ({request_timeout}) must be positive"
            )
        self._listen = listen
        self._responder = responder
        self._crl = crl
        self._observe = observe
        self._clock = clock or time.monotonic
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        """Bind ``listen`` (``HOST:PORT``; port 0 picks one) and serve. Returns the bound port.

        Raises:
            ListenError: not ``HOST:PORT``, in use by another process, or cannot be bound.
        """
        try:
            host, _, port = parse_address(self._listen, port_zero=True).rpartition(":")
        except InvalidAddressError as err:
            raise ListenError(f"OCSP: {err}") from err
        address = (host.strip("[]"), int(port))
        try:
            server = _Server(
                address,
                self._responder,
                self._crl,
                self._observe,
                self._clock,
                self._max_connections,
                self._request_timeout,
            )
        except OSError as err:
            why = "the address is in use by another process" if err.errno == errno.EADDRINUSE else err.strerror or err
            raise ListenError(f"OCSP: cannot listen on {self._listen}: {why}; choose another --ocsp-listen") from err
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="meshid-ocsp", daemon=True)
        self._thread.start()
        return self.port

    @property
    def serving(self) -> bool:
        """Whether the listener's thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()  # nginx keeps one open; it must not outlive the CA
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
