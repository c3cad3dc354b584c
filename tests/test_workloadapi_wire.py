"""The Workload API's wire format, both ways: what the server builds, the client reads back."""

from __future__ import annotations

import pytest

import meshid
from meshid._proto import workload_pb2  # the wire messages themselves
from meshid.workloadapi import wire
from support import FRONTEND_ID, SERVER_ID


def test_svid_and_bundles_round_trip_through_the_wire(ca, bundles) -> None:
    svid = ca.issue_svid(FRONTEND_ID)
    built = wire.x509_svid_response(svid, bundles)
    received = workload_pb2.X509SVIDResponse.FromString(built.SerializeToString())
    assert list(received.federated_bundles) == ["spiffe://other.org"]  # the SVID's own bundle travels inline
    got, got_bundles = wire.parse_x509_svid_response(received, None)
    assert got == svid and got.key_pem() == svid.key_pem()
    assert got_bundles == bundles
    chosen, _ = wire.parse_x509_svid_response(received, meshid.SpiffeId.parse(FRONTEND_ID))
    assert chosen == svid


def test_bundles_response_carries_every_trust_domain(ca, bundles) -> None:
    response = wire.x509_bundles_response(ca.issue_svid(FRONTEND_ID), bundles)
    assert sorted(response.bundles) == ["spiffe://example.org", "spiffe://other.org"]


def test_what_the_client_refuses(ca, bundles) -> None:
    svid = ca.issue_svid(FRONTEND_ID)
    good = wire.x509_svid_response(svid, bundles)
    with pytest.raises(meshid.SourceError, match=f"no X509-SVID for {SERVER_ID}"):
        wire.parse_x509_svid_response(good, meshid.SpiffeId.parse(SERVER_ID))
    with pytest.raises(meshid.SourceError, match="holds no X509-SVID"):
        wire.parse_x509_svid_response(workload_pb2.X509SVIDResponse(), None)
    mislabelled = workload_pb2.X509SVIDResponse.FromString(good.SerializeToString())
    mislabelled.svids[0].spiffe_id = SERVER_ID
    with pytest.raises(meshid.InvalidSvidError, match="labelled"):
        wire.parse_x509_svid_response(mislabelled, None)
    truncated = workload_pb2.X509SVIDResponse.FromString(good.SerializeToString())
    truncated.svids[0].x509_svid = truncated.svids[0].x509_svid[:-5]
    with pytest.raises(meshid.InvalidSvidError, match="truncated"):
        wire.parse_x509_svid_response(truncated, None)


def test_socket_path_forms() -> None:
    assert wire.socket_path("unix:///run/a.sock") == "/run/a.sock"
    assert wire.socket_path("unix:/run/a.sock") == "/run/a.sock"
    for bad in ("unix://host/run/a.sock", "tcp://127.0.0.1:1", "unix:run/a.sock", "unix:///a?x=1", ""):
        with pytest.raises(ValueError, match="Workload API endpoint"):
            wire.socket_path(bad)
