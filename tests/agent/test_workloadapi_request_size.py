"""The attested Workload API reads no request message over MAX_REQUEST_BYTES: its socket is
world-connectable and a request is read before its caller is attested, so a message whose 5-byte
gRPC prefix declares more is refused RESOURCE_EXHAUSTED from that prefix, before its body is
buffered. A real CA and node agent in this process (test_node_agent_jwt's ``served``); the lying
prefixes go over raw HTTP/2 (h2, what grpclib speaks), as no gRPC library would send one."""

from __future__ import annotations

import contextlib
import socket
import urllib.parse
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import test_node_agent_jwt
from test_node_agent_jwt import AUDIENCE, HEADER, WEB

from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.workloadapi._bounded import MAX_REQUEST_BYTES

pytestmark = pytest.mark.timeout(120)

#: The fixture: a real CA, and a node agent serving this process's uid WEB and another identity.
served = test_node_agent_jwt.served

GIB = 1 << 30
BODY = 16 << 20  # what the caller sends of a message it declares to be 1 GiB
GROWTH_LIMIT = 4 << 20  # what the agent's memory may grow by meanwhile: a few windows' worth
CHUNK = bytes(1 << 16)
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
METHODS = ("FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles", "FetchJWTSVID", "ValidateJWTSVID")


def _rss() -> int:
    """This process's resident memory in bytes (the server runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _prefix(length: int) -> bytes:
    return b"\0" + length.to_bytes(4, "big")  # not compressed; the length the message claims


class RawConnection:
    """One HTTP/2 connection to the Workload API socket, spoken with h2 directly: it sends whatever
    bytes it is given, within the flow-control window the server grants, and no more."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.status: dict[int, tuple[int, str]] = {}
        self.data: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self._flush()

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def _receive(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                headers = dict(event.headers)
                if "grpc-status" in headers:
                    details = urllib.parse.unquote(headers.get("grpc-message", ""))
                    self.status[event.stream_id] = (int(headers["grpc-status"]), details)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended.add(event.stream_id)
        self._flush()

    def start(self, method: str) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(
            stream_id,
            [
                (":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                (":path", f"/SpiffeWorkloadAPI/{method}"), ("content-type", "application/grpc"), ("te", "trailers"),
                *HEADER,
            ],
        )  # fmt: skip
        self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes) -> int:
        """Send ``data`` as far as the server lets it: the bytes sent before the stream ended."""
        sent = 0
        while sent < len(data) and stream_id not in self.ended:
            room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if room <= 0:
                self._receive()  # until the server grants more, or ends the stream
                continue
            self.h2.send_data(stream_id, data[sent : sent + room])
            self._flush()
            sent += min(room, len(data) - sent)
        return sent

    def wait(self, stream_id: int) -> None:
        """Read until the stream has a status; TimeoutError if none comes."""
        while stream_id not in self.status:
            self._receive()

    def message(self, stream_id: int) -> bytes:
        """Read until the stream's first message has come whole; that message."""
        while len(data := self.data.get(stream_id, b"")) < 5 or len(data) < 5 + int.from_bytes(data[1:5], "big"):
            self._receive()
        return data[5 : 5 + int.from_bytes(data[1:5], "big")]


@pytest.fixture
def raw(served, request) -> RawConnection:
    _, endpoint = served
    connection = RawConnection(endpoint.removeprefix("unix://"))
    request.addfinalizer(connection.close)
    return connection


@pytest.fixture
def stub(served, request) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
    _, endpoint = served
    channel = grpc.insecure_channel(endpoint.replace("unix://", "unix:"))
    request.addfinalizer(channel.close)
    return workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def _validated(stub: workload_pb2_grpc.SpiffeWorkloadAPIStub) -> str:
    """A normal pair of calls: a JWT-SVID fetched, then validated; the SPIFFE ID it names."""
    token = stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=[AUDIENCE], spiffe_id=WEB), metadata=HEADER, timeout=10
    )
    request = workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid=token.svids[0].svid)
    return str(stub.ValidateJWTSVID(request, metadata=HEADER, timeout=10).spiffe_id)


def test_a_message_declared_1_gib_is_refused_without_buffering_it(raw, stub) -> None:
    assert _validated(stub) == WEB
    before = _rss()
    stream_id = raw.start("ValidateJWTSVID")
    sent = raw.send(stream_id, _prefix(GIB))
    for _ in range(BODY // len(CHUNK)):
        sent += raw.send(stream_id, CHUNK)
    with_body = _rss()
    with contextlib.suppress(TimeoutError):  # no answer at all is a failure too, told below
        raw.wait(stream_id)
    figures = f"RSS {before >> 10} KiB before, {with_body >> 10} KiB after {sent} bytes sent"
    print(figures)
    assert raw.status.get(stream_id) == (
        RESOURCE_EXHAUSTED,
        f"Workload API: the request message is {GIB} bytes, more than the {MAX_REQUEST_BYTES} this server reads",
    ), figures
    assert with_body - before < GROWTH_LIMIT, figures

    # The connection is still good for a normal request, and so is the server.
    stream_id = raw.start("FetchX509SVID")
    raw.send(stream_id, _prefix(0))
    response = workload_pb2.X509SVIDResponse.FromString(raw.message(stream_id))
    assert WEB in [svid.spiffe_id for svid in response.svids]
    assert _validated(stub) == WEB


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_a_message_over_the_limit_from_its_prefix(raw, method) -> None:
    stream_id = raw.start(method)
    raw.send(stream_id, _prefix(MAX_REQUEST_BYTES + 1))  # and not a byte of the body
    raw.wait(stream_id)
    assert raw.status[stream_id][0] == RESOURCE_EXHAUSTED


def _validate_request_of(size: int) -> workload_pb2.ValidateJWTSVIDRequest:
    """A ValidateJWTSVID request of exactly ``size`` bytes, its token far over what a JWT-SVID may be."""
    request = workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid="x" * (size - len(AUDIENCE) - 8))
    while request.ByteSize() != size:  # the length prefixes' varints take a byte more or less
        request.svid = "x" * (len(request.svid) + (1 if request.ByteSize() < size else -1))
    return request


def test_a_message_of_the_limit_is_read_and_one_byte_more_is_not(stub) -> None:
    with pytest.raises(grpc.RpcError) as read:
        stub.ValidateJWTSVID(_validate_request_of(MAX_REQUEST_BYTES), metadata=HEADER, timeout=10)
    assert read.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the token is judged, and refused
    assert "more than the 8192 allowed" in read.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        stub.ValidateJWTSVID(_validate_request_of(MAX_REQUEST_BYTES + 1), metadata=HEADER, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _validated(stub) == WEB
