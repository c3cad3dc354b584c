"""The renewal schedule on a clock the test moves (issue #19 item 2): a CA, a server and a client,
all on one :class:`meshid.clock.ManualClock`, renew ten times each while the client keeps
calling, and not one real second is waited out for it. The handshakes, certificates and CA are
real; only the time the schedule reads is the test's.

The clock stays within the CA's 5 minutes of NotBefore back-dating of real time (40 s
lifetimes, renewed at about half), so what it signs also verifies on the real clock that TLS
uses."""

from __future__ import annotations

import datetime
import socket
import ssl
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

import meshid
from meshid._proto import greeter_pb2, greeter_pb2_grpc  # the example service's messages
from meshid.ca.client import AdminClient
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.clock import ManualClock

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/prod/sa/scheduled-server"
CLIENT_ID = f"spiffe://{TD}/ns/prod/sa/scheduled-client"
LIFETIME = datetime.timedelta(seconds=40)


class Reporter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message="", caller=format(meshid.peer_identity(context).serial, "x"))


def presented_serial(port: int, svid: meshid.X509Svid, roots_pem: bytes, folder: Path) -> int:
    """The serial of the certificate the server presents to a new TLS connection (on the wire)."""
    cert, key = folder / "probe.pem", folder / "probe.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the chain is verified; the name is not what this asks
    context.load_verify_locations(cadata=roots_pem.decode())
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, context.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_ten_renewals_each_on_a_manual_clock_with_zero_failed_calls(tmp_path: Path) -> None:
    clock = ManualClock()
    init_data_dir(tmp_path / "ca", TD, max_ttl=datetime.timedelta(hours=1))
    ca = CaServer(tmp_path / "ca", "127.0.0.1:0", clock=clock)
    address = f"127.0.0.1:{ca.start()}"
    try:
        bundle_file = tmp_path / "ca" / "bundle.pem"
        with AdminClient(address, tmp_path / "ca") as admin:
            tokens = {}
            for sid in (SERVER_ID, CLIENT_ID):
                admin.create_entry(sid, [], LIFETIME)
                tokens[sid] = str(admin.create_token(sid).token)
        sources = {
            sid: meshid.IssuerSource(address, bundle_file, join_token=tokens[sid], clock=clock, refresh_interval=3600)
            for sid in (SERVER_ID, CLIENT_ID)
        }
        server_source, client_source = sources[SERVER_ID].start(), sources[CLIENT_ID].start()
        policy = meshid.AuthorizationPolicy.from_dict({"allow": [{"name": "c", "methods": ["*"], "spiffe_ids": [CLIENT_ID]}]})
        interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
        server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[interceptor])
        greeter_pb2_grpc.add_GreeterServicer_to_server(Reporter(), server)
        port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(server_source))
        server.start()
        seen_by_server, presented, failures, steps = set(), set(), [], 0
        try:
            with meshid.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID) as channel:
                stub = greeter_pb2_grpc.GreeterStub(channel)
                while min(s.state.renewals for s in sources.values()) < 10:
                    steps += 1
                    assert steps <= 80, f"no ten renewals in 80 steps: {[s.state for s in sources.values()]}"
                    clock.advance_to_next_wakeup(waiters=2)  # both loops asleep: move to the earlier deadline
                    clock.settle(waiters=2, timeout=30)  # whoever was due has renewed (or refreshed) and sleeps
                    try:
                        seen_by_server.add(stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=10).caller)
                    except grpc.RpcError as err:
                        failures.append(f"{err.code().name}: {err.details()}")
                    roots = client_source.get_bundles()[meshid.TrustDomain.parse(TD)].to_pem()
                    presented.add(presented_serial(port, client_source.get_svid(), roots, tmp_path))
        finally:
            server.stop(None).wait()
            for s in sources.values():
                s.close()
    finally:
        ca.stop(None)
    advanced = clock.monotonic()
    print(f"\n[schedule] {steps} steps, {advanced:.0f} s of clock time, renewals "
          f"{ {sid.rsplit('/', 1)[1]: s.state.renewals for sid, s in sources.items()} }, "
          f"{len(seen_by_server)} client serials seen by the server, {len(presented)} server serials on the wire")  # fmt: skip
    assert not failures, failures
    assert len(seen_by_server) >= 10, "the server did not see the client's renewed certificates"
    assert len(presented) >= 10, "the server did not present its renewed certificates"
    assert advanced < 280, "the clock ran past the CA's back-dating: certificates would not verify in real time"
