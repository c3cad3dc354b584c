"""The OCSP listener's HTTP input, over raw sockets: a POST's Content-Length is parsed strictly
(whatever else it says gets one OCSP malformedRequest answer, never a traceback), and a request
must arrive whole within one deadline, so clients trickling bytes cannot hold the connections."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from meshid import SpiffeId
from meshid.ca import Authority
from meshid.ca.http import RevocationHttpServer
from meshid.ca.ocsp import MAX_REQUEST_BYTES, OcspResponder
from meshid.ca.store import IssuedRecord
from support import eventually

pytestmark = pytest.mark.timeout(60)

TD = "example.org"
DEADLINE = 1.0  # the listener's request_timeout here; the default is 10 s
MARGIN = 4.0  # generous: a cut-off later than DEADLINE + MARGIN is a failure, not noise


@dataclass(frozen=True)
class Listener:
    port: int
    request: bytes  # a well-formed OCSP request for a certificate the store knows


@contextlib.contextmanager
def listening(max_connections: int = 128) -> Iterator[Listener]:
    ca = Authority.create_root(TD)
    leaf = ca.issue_svid(f"spiffe://{TD}/x").leaf
    now = datetime.datetime.now(datetime.UTC)
    record = IssuedRecord(leaf.serial_number, SpiffeId.parse(f"spiffe://{TD}/x"), leaf.not_valid_after_utc, now)
    responder = OcspResponder(lambda: ca, lambda serial: record if serial == leaf.serial_number else None)
    server = RevocationHttpServer(
        "127.0.0.1:0", responder, lambda: b"", max_connections=max_connections, request_timeout=DEADLINE
    )
    port = server.start()
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca.certificate, hashes.SHA256())
    try:
        yield Listener(port, builder.build().public_bytes(serialization.Encoding.DER))
    finally:
        server.stop()


def _exchange(port: int, data: bytes) -> tuple[bytes, ocsp.OCSPResponse]:
    """Send ``data``, read until the listener closes: the status line and the OCSP answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    assert received, "the listener closed the connection unanswered"
    head, _, body = received.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], ocsp.load_der_ocsp_response(body)


def _post_headers(content_length: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\nContent-Length:" + content_length


def _answered_good(port: int, request: bytes) -> bool:
    data = _post_headers(b" %d" % len(request)) + b"\r\nConnection: close\r\n\r\n" + request
    status, answer = _exchange(port, data)
    return (
        status == b"HTTP/1.1 200 OK"
        and answer.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        and answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    )


# What follows "Content-Length:" on the wire. ' 12' reaches the handler only as a folded line
# (obs-fold, RFC 9112 5.2): the parser strips the space of "Content-Length:  12", a valid 12.
MALFORMED_LENGTHS = {
    "a superscript two, which str.isdigit() takes and int() refuses": b" \xb2",
    "an exponent": b" 1e3",
    "a sign": b" -1",
    "a space at the start of a folded line": b"\r\n 12",
    "5000 digits, past int()'s 4300": b" " + b"1" * 5000,
    "leading zeros past five digits": b" 000000000012",
    "two lengths": b" 1\r\nContent-Length: 2",
    "one byte over the bound": b" %d" % (MAX_REQUEST_BYTES + 1),
}


def test_a_malformed_or_oversized_content_length_gets_malformed_request_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshid.ca.http")
    with listening() as listener:
        for what, content_length in MALFORMED_LENGTHS.items():
            try:
                status, answer = _exchange(listener.port, _post_headers(content_length) + b"\r\n\r\n")
            except (AssertionError, OSError) as err:
                raise AssertionError(f"Content-Length with {what}: {err}") from err
            assert status == b"HTTP/1.1 200 OK", what
            assert answer.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST, what
        assert _answered_good(listener.port, listener.request)
    tracebacks = [record.getMessage() for record in caplog.records if record.exc_info]
    assert not tracebacks, tracebacks


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _trickle(conn: socket.socket, start: bytes, give_up: float) -> float | None:
    """Send ``start``, then one more byte every 0.2 s: the seconds until the listener closes the
    connection, or None if it is still open after ``give_up`` seconds."""
    started = time.monotonic()
    with conn:
        conn.sendall(start)
        conn.settimeout(0.2)
        while time.monotonic() - started < give_up:
            try:
                conn.sendall(b"0")
                if not conn.recv(1):
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except OSError:  # reset: closed as well
                return time.monotonic() - started
    return None


TRICKLES = {
    "request line": b"GET /",
    "headers": b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    "body": _post_headers(b" %d" % MAX_REQUEST_BYTES) + b"\r\n\r\n",
}


@pytest.mark.parametrize("start", list(TRICKLES.values()), ids=list(TRICKLES))
def test_a_request_trickling_in_is_closed_at_the_deadline_not_per_read(start: bytes) -> None:
    with listening() as listener:
        closed_after = _trickle(_connect(listener.port), start, give_up=DEADLINE + 2 * MARGIN)
        assert closed_after is not None, "a client sending a byte every 0.2 s was never cut off"
        assert closed_after < DEADLINE + MARGIN, closed_after


def test_tricklers_holding_every_connection_are_cut_off_and_a_good_request_is_answered() -> None:
    with listening(max_connections=len(TRICKLES)) as listener:
        held = [_connect(listener.port) for _ in TRICKLES]  # before the good client: they get every slot
        with concurrent.futures.ThreadPoolExecutor(len(TRICKLES)) as pool:
            give_up = DEADLINE + 2 * MARGIN
            tricklers = [
                pool.submit(_trickle, conn, start, give_up) for conn, start in zip(held, TRICKLES.values(), strict=True)
            ]

            def answered() -> bool:
                try:
                    return _answered_good(listener.port, listener.request)
                except (AssertionError, OSError, ValueError):
                    return False  # closed unanswered: every connection is still held

            # while the three keep trickling, each into a connection the listener has cut
            eventually(answered, DEADLINE + MARGIN, "an answer while tricklers hold every connection")
            assert all(trickler.result() is not None for trickler in tricklers)
