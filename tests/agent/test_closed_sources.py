"""A source that has been closed opens nothing more: a JWT-SVID asked of a closed IssuerSource or
NodeAgent (a workload's request still in flight while the agent stops) is refused with
SourceError, rather than served over a new channel to the CA that nothing will ever close."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import meshid
from conftest import CLOCKED_LIFETIME
from meshid.agent import IssuerSource, NodeAgent
from meshid.clock import ManualClock
from meshid.workloadapi import AttestedWorkloadApiServer, WorkloadApiServer, WorkloadApiSource
from nodeagents import AgentCa, agent_id
from support import eventually

pytestmark = pytest.mark.timeout(60)
WEB = "spiffe://example.org/ns/prod/sa/web"


def _connections_to(port: int) -> int:
    """Established TCP connections to ``port``, by the kernel's tables (grpc's sockets are
    dual-stack: IPv4 loopback shows in tcp6, mapped)."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            for line in list(table)[1:]:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def test_a_closed_issuer_source_opens_no_channel_for_a_jwt_svid(running_ca) -> None:
    token = running_ca.enroll(WEB, datetime.timedelta(minutes=10))
    source = IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token).start()
    source.fetch_jwt_svid(["before"])
    assert _connections_to(running_ca.port) > 0  # the renewal channel and the JWT one
    source.close()
    # grpc's core tears a closed channel's socket down on its own thread, just after close()
    eventually(lambda: _connections_to(running_ca.port) == 0, 10, "the source's channels to the CA to close")
    with pytest.raises(meshid.SourceError, match="closed"):
        source.fetch_jwt_svid(["after"])
    assert _connections_to(running_ca.port) == 0, "a channel to the CA was opened after close()"
    assert source.fetch_jwt_svid(["before"]).audience == ("before",)  # the cached one, no I/O


def test_a_closed_node_agent_opens_no_channel_for_a_jwt_svid(tmp_path: Path) -> None:
    ca = AgentCa(tmp_path / "ca")
    try:
        with ca.admin() as admin:
            admin.create_entry(WEB, [], datetime.timedelta(minutes=10), parent_id=agent_id("node-1"), selectors=["unix:uid:1"])  # fmt: skip
            token = str(admin.create_agent_token("node-1").token)
        agent = NodeAgent(ca.address, ca.bundle_file, tmp_path / "agent", join_token=token).start()
        web = meshid.SpiffeId.parse(WEB)
        agent.jwt_svid_for(web, ["before"])
        agent.close()
        port = int(ca.address.rsplit(":", 1)[1])
        eventually(lambda: _connections_to(port) == 0, 10, "the agent's channels to the CA to close")
        with pytest.raises(meshid.SourceError, match="closed"):
            agent.jwt_svid_for(web, ["after"])
        assert _connections_to(port) == 0, "a channel to the CA was opened after close()"
    finally:
        ca.stop()


def test_close_from_a_subscriber_leaves_no_channel_open(clocked_ca, clock: ManualClock) -> None:
    """A subscriber that closes the source when it hears of a renewal (a program that stops once
    it has its new files) is called from the renewal loop, which goes on with the rest of its
    pass: the bundle refresh due at the same moment must not connect to the CA again."""
    token = clocked_ca.enroll(WEB, CLOCKED_LIFETIME)
    source = IssuerSource(
        clocked_ca.address, clocked_ca.bundle_file, join_token=token, clock=clock, renew_at=0.5, jitter=0.0
    ).start()
    closed = threading.Event()

    def close_on_renewal() -> None:
        source.close()  # from the renewal loop's own thread
        closed.set()

    try:
        source.subscribe(close_on_renewal)
        clock.advance_to_next_wakeup(timeout=30)  # the renewal and the bundle refresh, both due
        assert closed.wait(30)
        eventually(lambda: not any(t.name == "meshid-issuer-source" for t in threading.enumerate()), 10, "the loop to end")  # fmt: skip
        assert source.state.renewals == 1
        assert _connections_to(clocked_ca.port) == 0, "a channel to the CA was opened after close()"
    finally:
        source.close()


def test_subscribers_on_both_streams_closing_at_once_do_not_deadlock(ca, tmp_path: Path) -> None:
    """A WorkloadApiSource follows two streams, each on a thread of its own that calls the
    subscribers. A subscriber that closes the source on a change, called from both threads at
    once (an SVID and a JWT key that change together), must not leave each thread waiting for
    the other to end: both return, and both threads end."""

    def bundles(kid: str) -> meshid.BundleSet:
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        return meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, ca.roots).with_jwt_authorities({kid: key}))

    served = meshid.StaticSource(ca.issue_svid(WEB), bundles("one"))
    server = WorkloadApiServer(served, f"unix:{tmp_path}/api.sock").start()
    source = WorkloadApiSource(f"unix:{tmp_path}/api.sock").start()
    both_in = threading.Barrier(2, timeout=10)
    returned: list[str] = []

    def close_on_change() -> None:
        both_in.wait()  # the two stream threads are in here at the same time
        source.close()
        returned.append(threading.current_thread().name)

    try:
        td = meshid.TrustDomain.parse("example.org")
        eventually(lambda: "one" in source.get_bundles()[td].jwt_authorities, 10, "the first JWT bundles")
        source.subscribe(close_on_change)
        served.update(svid=ca.issue_svid(WEB), bundles=bundles("two"))
        eventually(lambda: len(returned) == 2, 10, "both subscribers to return from close()")
        eventually(lambda: not _stream_threads(), 10, "both stream threads to end")
    finally:
        both_in.abort()
        source.close()
        server.stop()


def _stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("meshid-workload-api-")]


class _NoIdentities:
    """An identity provider that issues nothing (enough for a server to start and stop)."""

    def identities_for(self, process: object) -> list[object]:
        return []

    def subscribe(self, callback: object) -> object:
        return lambda: None


def test_an_attested_workload_api_closed_by_two_threads_at_once_closes_once(tmp_path: Path) -> None:
    """A signal's thread and the main thread both close the node agent's Workload API as it
    stops. Each close() returns once the server is stopped, neither raises: before, the second
    one could post to the event loop the first had closed (RuntimeError: Event loop is closed),
    a few times in a hundred, so this closes 100 servers that way."""
    errors: list[str] = []
    for i in range(100):
        server = AttestedWorkloadApiServer(_NoIdentities(), str(tmp_path / f"api-{i}.sock")).start()  # type: ignore[arg-type]
        together = threading.Barrier(2, timeout=10)

        def close(server: AttestedWorkloadApiServer = server, together: threading.Barrier = together) -> None:
            together.wait()
            try:
                server.close()
            except Exception as err:  # the test counts them
                errors.append(repr(err))

        closers = [threading.Thread(target=close) for _ in range(2)]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()
        assert not (tmp_path / f"api-{i}.sock").exists()
    assert errors == []
