"""Metrics (prometheus-client, scraped over HTTP) and standard gRPC health checking on the CA."""

from __future__ import annotations

import datetime
import time
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import meshid
from meshid.agent import IssuerSource
from meshid.ca.client import AdminClient
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.clock import ManualClock
from meshid.metrics import serve_metrics
from support import FRONTEND_ID, INTRUDER_ID, SERVER_ID, call, sync_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def metrics_url() -> str:
    return f"http://127.0.0.1:{serve_metrics('127.0.0.1:0')}/metrics"


def _scrape(url: str) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_decisions_are_counted_by_method_decision_and_rule(ca, bundles, server_source, policy, metrics_url) -> None:
    method = "/meshid.examples.v1.Greeter/SayHello"
    allow = f'meshid_authz_decisions_total{{decision="allow",method="{method}",rule="frontend"}}'
    deny = f'meshid_authz_decisions_total{{decision="deny",method="{method}",rule=""}}'
    before = _scrape(metrics_url)
    with sync_server(server_source, meshid.AuthorizationInterceptor(policy, source=server_source)) as port:
        for sid, times in ((FRONTEND_ID, 3), (INTRUDER_ID, 2)):
            with meshid.secure_channel(
                f"127.0.0.1:{port}", meshid.StaticSource(ca.issue_svid(sid), bundles), server_id=SERVER_ID
            ) as ch:
                for _ in range(times):
                    call(ch)
    after = _scrape(metrics_url)
    assert after[allow] - before.get(allow, 0) == 3
    assert after[deny] - before.get(deny, 0) == 2


def test_ca_and_renewals_are_counted_and_expiry_is_exported(tmp_path, metrics_url) -> None:
    # The CA and the source on a ManualClock: the renewals are stepped, not waited for. 40 s
    # lifetimes keep what the CA signs on it valid on the real clock that TLS checks.
    clock = ManualClock()
    init_data_dir(tmp_path / "ca", "example.org")
    server = CaServer(tmp_path / "ca", "127.0.0.1:0", clock=clock)
    address = f"127.0.0.1:{server.start()}"
    workload = "spiffe://example.org/ns/prod/sa/metered"
    try:
        with AdminClient(address, tmp_path / "ca") as admin:
            admin.create_entry(workload, [], datetime.timedelta(seconds=40))
            token = admin.create_token(workload).token
        before = _scrape(metrics_url)
        with pytest.raises(meshid.RemoteError):
            meshid.ca.client.fetch_svid(address, tmp_path / "ca" / "bundle.pem", "example.org:guessed")
        with IssuerSource(address, tmp_path / "ca" / "bundle.pem", join_token=token, clock=clock) as source:
            for _ in range(10):
                if source.state.renewals >= 2:
                    break
                clock.advance_to_next_wakeup(timeout=30)
                clock.settle(timeout=30)
            assert source.state.renewals >= 2
            not_after = source.get_svid().not_after
            scrape_began = datetime.datetime.now(datetime.UTC)
            after = _scrape(metrics_url)
            scrape_ended = datetime.datetime.now(datetime.UTC)
        # The gauge reads the real clock, not the source's (the test's clock has run ahead): it is
        # what the real clock left of the source's current SVID while it was scraped.
        expiry = after[f'meshid_svid_expiry_seconds{{spiffe_id="{workload}"}}']
        assert 0 < (not_after - scrape_ended).total_seconds() <= expiry <= (not_after - scrape_began).total_seconds()
        assert after[f'meshid_svid_renewals_total{{result="ok",spiffe_id="{workload}"}}'] >= 2
        grew = {k for k in after if k.startswith("meshid_ca_") and after[k] > before.get(k, 0)}
        assert 'meshid_ca_issuances_total{kind="token"}' in grew
        assert 'meshid_ca_issuances_total{kind="renewal"}' in grew
        assert 'meshid_ca_refusals_total{reason="token"}' in grew
    finally:
        server.stop()


def test_ca_health_turns_not_serving_when_its_store_is_unusable(tmp_path) -> None:
    init_data_dir(tmp_path / "ca", "example.org")
    server = CaServer(tmp_path / "ca", "127.0.0.1:0", poll_interval=0.1)
    port = server.start()
    # Health is open to callers without an SVID; present the admin SVID here for simplicity.
    admin = tmp_path / "ca" / "admin"
    source = meshid.FileSource(admin / "svid.pem", admin / "svid.key", admin / "bundle.pem")
    try:
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id="spiffe://example.org/meshid/ca") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return stub.Check(health_pb2.HealthCheckRequest(service="meshid.v1.Issuer"), timeout=5).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            server.service.store.close()  # the store becomes unusable under the running CA
            deadline = time.monotonic() + 10
            while status() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(meshid.RemoteError) as info:  # and requests say why, with UNAVAILABLE
                AdminClient(f"127.0.0.1:{port}", tmp_path / "ca").list_entries()
    finally:
        server.stop()
    assert info.value.code == "UNAVAILABLE"
    assert "CA store" in str(info.value) and "closed" in str(info.value)


def test_health_watch_streams_do_not_tie_up_the_ca(tmp_path) -> None:
    """Watch answers through grpc's non-blocking callback even behind meshid's interceptor, so
    more open Watch streams than worker threads leave the CA answering."""
    init_data_dir(tmp_path / "ca", "example.org")
    server = CaServer(tmp_path / "ca", "127.0.0.1:0", max_workers=4)
    port = server.start()
    admin = tmp_path / "ca" / "admin"
    source = meshid.FileSource(admin / "svid.pem", admin / "svid.key", admin / "bundle.pem")
    try:
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id="spiffe://example.org/meshid/ca") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(12)]
            first = [next(w).status for w in watches]
            assert first == [health_pb2.HealthCheckResponse.SERVING] * 12
            with AdminClient(f"127.0.0.1:{port}", tmp_path / "ca", timeout=5) as client:
                assert len(client.list_entries()) == 2  # the CA's own entries; it still answers
            for w in watches:
                w.cancel()
    finally:
        server.stop()
