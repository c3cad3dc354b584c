"""The SPIFFE Workload API: `meshid agent --workload-api` serves it, py-spiffe and WorkloadApiSource consume it.

Every agent is a real `meshid agent` process against a real CA, on the real clock: its SVIDs
live 20 s and are renewed after 2 to 12 % of that (0.4 to 2.4 s), so rotations happen during
the test and each renewal has more than 17 s to spare on a loaded machine.
"""

from __future__ import annotations

import datetime
import queue
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
import pytest
import spiffe

import meshid
from conftest import Agent, presented_serial
from meshid.workloadapi import WorkloadApiServer, WorkloadApiSource
from support import FRONTEND_ID, SERVER_ID, call, eventually, sync_server

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
WORKLOAD = "spiffe://example.org/ns/prod/sa/batch"
TTL = datetime.timedelta(seconds=20)
HEADER = (("workload.spiffe.io", "true"),)
FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"


def _raw_fetch(channel: grpc.Channel) -> Callable[..., object]:
    """FetchX509SVID with the messages as raw bytes (an empty X509SVIDRequest encodes to b"")."""
    return channel.unary_stream(FETCH_X509_SVID, lambda _: b"", lambda raw: raw)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    size, length = len(payload), b""
    while True:
        length += bytes([(size & 0x7F) | (0x80 if size > 0x7F else 0)])
        size >>= 7
        if not size:
            return bytes([number << 3 | 2]) + length + payload


@pytest.fixture
def start_agent(running_ca, request) -> Callable[..., Agent]:
    def start(socket, *extra: str) -> Agent:
        agent = Agent(running_ca, str(socket), *extra)
        request.addfinalizer(agent.stop)
        return agent

    return start


def test_py_spiffe_fetches_the_svid_and_bundle_and_follows_rotations(
    running_ca, start_agent, closing, tmp_path
) -> None:
    socket = tmp_path / "agent.sock"
    agent = start_agent(socket, "--join-token", running_ca.enroll(WORKLOAD, TTL))
    assert f"on unix://{socket}" in agent.ready
    assert stat.S_ISSOCK(socket.stat().st_mode)
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600

    client = closing(spiffe.WorkloadApiClient(socket_path=f"unix://{socket}"))
    svid = client.fetch_x509_svid(timeout=10)
    assert str(svid.spiffe_id) == WORKLOAD
    roots = client.fetch_x509_bundles(timeout=10).get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    assert roots is not None
    bundles = meshid.BundleSet.of(meshid.TrustBundle(meshid.TrustDomain.parse(TD), tuple(roots.x509_authorities)))
    assert str(bundles.verify(svid.leaf, svid.cert_chain[1:])) == WORKLOAD
    assert set(roots.x509_authorities) == set(meshid.TrustBundle.load(TD, running_ca.bundle_file).roots)

    source = closing(spiffe.X509Source(socket_path=f"unix://{socket}", timeout_in_seconds=10))
    serials = set()

    def rotated_twice() -> bool:
        context = source.get_x509_context()
        assert str(context.default_svid.spiffe_id) == WORKLOAD
        serials.add(context.default_svid.leaf.serial_number)
        return len(serials) >= 3

    eventually(rotated_twice, 30, "py-spiffe's X509Source to see two rotations")

    code, err = agent.stop()
    assert code == 0, err
    assert "Traceback" not in err
    assert not socket.exists(), "the agent left its socket behind"


def test_a_call_without_the_security_header_is_refused_as_spire_does(
    running_ca, start_agent, closing, tmp_path
) -> None:
    socket = tmp_path / "agent.sock"
    start_agent(socket, "--join-token", running_ca.enroll(WORKLOAD, TTL))
    channel = closing(grpc.insecure_channel(f"unix:{socket}"))
    fetch = _raw_fetch(channel)
    for metadata in (None, (("workload.spiffe.io", "false"),)):
        with pytest.raises(grpc.RpcError) as refused:
            next(fetch(b"", metadata=metadata, timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "security header missing from request"
    assert next(fetch(b"", metadata=HEADER, timeout=10))  # the same call with the header is answered

    # The agent serves 64 streams at once: a stream its client cancels must give its thread back.
    for _ in range(80):
        stream = fetch(b"", metadata=HEADER, timeout=10)
        next(stream)
        stream.cancel()
    assert next(fetch(b"", metadata=HEADER, timeout=10))

    jwt = channel.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID", lambda _: b"", lambda raw: raw)
    with pytest.raises(grpc.RpcError) as no_audience:  # the JWT profile is served (issue #16): an audience is required
        jwt(b"", metadata=HEADER, timeout=10)
    assert no_audience.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert no_audience.value.details() == "audience must be specified"


def test_workload_api_sources_serve_a_greeter_across_rotations_with_zero_failures(
    running_ca, start_agent, closing, tmp_path
) -> None:
    server_socket, client_socket = tmp_path / "server.sock", tmp_path / "client.sock"
    start_agent(server_socket, "--join-token", running_ca.enroll(SERVER_ID, TTL))
    start_agent(client_socket, "--join-token", running_ca.enroll(FRONTEND_ID, TTL))
    server_source = closing(WorkloadApiSource(f"unix://{server_socket}").start())
    client_source = closing(WorkloadApiSource(f"unix:{client_socket}").start())
    assert str(server_source.get_svid().spiffe_id) == SERVER_ID
    assert str(client_source.get_svid().spiffe_id) == FRONTEND_ID

    policy = meshid.AuthorizationPolicy.from_dict({"allow": [{"name": "td", "methods": ["*"], "trust_domains": [TD]}]})
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    server_serials, client_serials, failures, ok = set(), set(), [], 0
    with sync_server(server_source, interceptor) as port:
        channel = closing(meshid.secure_channel(f"127.0.0.1:{port}", client_source, server_id=SERVER_ID))

        def rotated_twice_on_both_sides() -> bool:
            nonlocal ok
            svid, bundles = client_source.get_svid(), client_source.get_bundles()
            client_serials.add(svid.serial)
            server_serials.add(presented_serial(port, svid, bundles, tmp_path))  # on the wire
            status, detail = call(channel)
            if status == "OK":
                assert detail == FRONTEND_ID
                ok += 1
            else:
                failures.append((status, detail))
            return len(server_serials) >= 3 and len(client_serials) >= 3 and ok > 20

        eventually(rotated_twice_on_both_sides, 30, "two rotations on each side and 20 calls")
    assert not failures, failures[:5]


def test_spiffe_endpoint_socket_is_the_default(running_ca, start_agent, closing, tmp_path, monkeypatch) -> None:
    socket = tmp_path / "agent.sock"
    start_agent(socket, "--join-token", running_ca.enroll(WORKLOAD, TTL))
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{socket}")
    source = closing(WorkloadApiSource().start())
    assert str(source.get_svid().spiffe_id) == WORKLOAD
    assert source.get_bundles()[meshid.TrustDomain.parse(TD)].roots
    source.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("meshid-workload")], "close() left a thread"


def test_no_server_fails_start_with_a_clear_error(tmp_path) -> None:
    source = WorkloadApiSource(f"unix://{tmp_path}/nobody.sock", timeout=1)
    with pytest.raises(meshid.SourceError, match=r"no X509-SVID from .*nobody\.sock within 1s"):
        source.start()


def test_a_source_keeps_its_identity_while_the_server_is_gone_and_reconnects(
    running_ca, start_agent, closing, tmp_path
) -> None:
    socket, out = tmp_path / "agent.sock", tmp_path / "svid"
    first = start_agent(socket, "--join-token", running_ca.enroll(WORKLOAD, TTL), "--out", str(out))
    source = closing(WorkloadApiSource(f"unix://{socket}", max_backoff=0.5).start())
    changes = []
    source.subscribe(lambda: changes.append(source.get_svid().serial))

    code, err = first.stop()
    assert code == 0, err
    held = source.get_svid()
    eventually(lambda: source.last_error is not None, 10, "the broken stream to be noticed")
    assert source.get_svid() is held  # reconnection attempts fail meanwhile; the SVID is kept

    start_agent(socket, "--out", str(out))  # reuses the saved SVID, then renews it
    eventually(lambda: source.get_svid().serial != held.serial, 10, "the source to follow the restarted agent")
    assert source.last_error is None
    assert changes and changes[-1] == source.get_svid().serial


def test_a_response_that_does_not_parse_leaves_the_previous_identity(
    running_ca, start_agent, closing, request, tmp_path
) -> None:
    agent_socket = tmp_path / "agent.sock"
    start_agent(agent_socket, "--join-token", running_ca.enroll(WORKLOAD, TTL))
    # Two responses of the real agent, as bytes: before and after a rotation.
    stream = _raw_fetch(closing(grpc.insecure_channel(f"unix:{agent_socket}")))(b"", metadata=HEADER, timeout=15)
    before, after = next(stream), next(stream)
    stream.cancel()
    # svids[0] = {spiffe_id: WORKLOAD, x509_svid: b"not DER"}
    broken = _field(1, _field(1, WORKLOAD.encode()) + _field(2, b"not DER"))

    # A Workload API server of our own replays them, with the broken one in between.
    replies: queue.Queue[bytes] = queue.Queue()

    def replay(_request: bytes, context: grpc.ServicerContext):
        while context.is_active():
            try:
                yield replies.get(timeout=0.05)
            except queue.Empty:
                continue

    handler = grpc.unary_stream_rpc_method_handler(replay, lambda raw: raw, lambda raw: raw)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", {"FetchX509SVID": handler})]
    )
    server.add_insecure_port(f"unix:{tmp_path}/replay.sock")
    server.start()
    request.addfinalizer(lambda: server.stop(None).wait())

    replies.put(before)
    source = closing(WorkloadApiSource(f"unix://{tmp_path}/replay.sock").start())
    held = source.get_svid()
    replies.put(broken)
    eventually(lambda: source.last_error is not None, 5, "the broken response to be rejected")
    assert "X509-SVID" in source.last_error
    assert source.get_svid() is held
    replies.put(after)
    eventually(lambda: source.get_svid().serial != held.serial, 5, "the next good response to take effect")
    assert source.last_error is None


def test_federated_bundles_are_served_and_a_live_socket_is_never_taken_over(
    ca, bundles, closing, request, tmp_path
) -> None:
    source = meshid.StaticSource(ca.issue_svid(WORKLOAD), bundles)  # example.org and other.org
    socket = tmp_path / "api.sock"
    server = WorkloadApiServer(source, f"unix://{socket}").start()
    request.addfinalizer(server.stop)

    consumer = closing(WorkloadApiSource(f"unix:{socket}").start())
    assert consumer.get_bundles() == bundles
    py_spiffe = closing(spiffe.WorkloadApiClient(socket_path=f"unix://{socket}"))
    served = {str(b.trust_domain) for b in py_spiffe.fetch_x509_bundles(timeout=10).bundles}
    assert served == {"example.org", "other.org"}

    rotated = ca.issue_svid(WORKLOAD)
    source.update(svid=rotated)
    eventually(lambda: consumer.get_svid() == rotated, 5, "the update to be streamed")

    with pytest.raises(meshid.MeshIdError, match="another server is listening on"):
        WorkloadApiServer(source, str(socket)).start()
    (tmp_path / "notes.txt").write_text("not a socket")
    with pytest.raises(meshid.MeshIdError, match="is not a socket"):
        WorkloadApiServer(source, str(tmp_path / "notes.txt")).start()
    assert consumer.get_svid() == rotated  # the live server was left alone


def test_the_agent_needs_an_output(running_ca, tmp_path) -> None:
    bundle = running_ca.bundle_file  # a real one: --bundle is read (and checked) first
    proc = subprocess.run(
        [sys.executable, "-m", "meshid.cli", "agent", "--server", running_ca.address, "--bundle", str(bundle)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "give --out DIR, --workload-api unix:///PATH, or both" in proc.stderr
