"""JWT-SVIDs from the node agent (issue #16): its attested Workload API gives a process JWT-SVIDs
only for the identities attested to it, obtained from the CA's Agent/BatchNewJwtSvid and cached
per audience. A real CA and a real NodeAgent in this process; the caller is this test process
(attested by its uid), speaking py-spiffe and raw gRPC to the socket."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import spiffe
from spiffe.workloadapi.errors import FetchJwtSvidError

import meshid
from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.agent import NodeAgent
from meshid.ca.datadir import load_jwt_keys
from meshid.workloadapi import AttestedWorkloadApiServer
from nodeagents import TD, AgentCa, agent_id

pytestmark = pytest.mark.timeout(120)

WEB = f"spiffe://{TD}/ns/prod/sa/web"
BATCH = f"spiffe://{TD}/ns/prod/sa/batch"
NOT_MINE = f"spiffe://{TD}/ns/prod/sa/not-mine"
AUDIENCE = f"spiffe://{TD}/ns/prod/sa/backend"
HEADER = (("workload.spiffe.io", "true"),)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[AgentCa, str]]:
    ca = AgentCa(tmp_path / "ca")
    agent = server = None
    try:
        me = [f"unix:uid:{os.geteuid()}"]
        with ca.admin() as admin:
            for sid, selectors in ((WEB, me), (BATCH, me), (NOT_MINE, [f"unix:uid:{os.geteuid() + 4242}"])):
                admin.create_entry(
                    sid, [], datetime.timedelta(minutes=10), parent_id=agent_id("node-1"), selectors=selectors
                )
            token = str(admin.create_agent_token("node-1").token)
        agent = NodeAgent(ca.address, ca.bundle_file, tmp_path / "agent", join_token=token).start()
        server = AttestedWorkloadApiServer(agent, str(tmp_path / "agent.sock")).start()
        yield ca, f"unix://{server.path}"
    finally:
        if server is not None:
            server.close()
        if agent is not None:
            agent.close()
        ca.stop()


def test_a_process_gets_jwt_svids_for_its_attested_identities_only(served: tuple[AgentCa, str], request) -> None:
    ca, endpoint = served
    client = spiffe.WorkloadApiClient(socket_path=endpoint)
    request.addfinalizer(client.close)

    svids = client.fetch_jwt_svids({AUDIENCE})
    assert sorted(str(s.spiffe_id) for s in svids) == [BATCH, WEB]  # every identity attested to it
    web = client.fetch_jwt_svid({AUDIENCE}, subject=spiffe.SpiffeId(WEB))
    assert str(web.spiffe_id) == WEB
    assert client.fetch_jwt_svid({AUDIENCE}, subject=spiffe.SpiffeId(WEB)).token == web.token  # cached
    with pytest.raises(FetchJwtSvidError):
        client.fetch_jwt_svid({AUDIENCE}, subject=spiffe.SpiffeId(NOT_MINE))  # the agent serves it, not to us

    keys = load_jwt_keys(ca.folder)
    assert keys is not None and meshid.JwtSvid.parse_insecure(web.token).key_id == keys.signing.kid
    assert str(client.validate_jwt_svid(web.token, AUDIENCE).spiffe_id) == WEB
    bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    assert bundle is not None and set(bundle.jwt_authorities) == {keys.signing.kid}
    assert str(spiffe.JwtSvid.parse_and_validate(web.token, bundle, {AUDIENCE}).spiffe_id) == WEB


def test_refusals_are_the_standards_codes(served: tuple[AgentCa, str], request) -> None:
    _, endpoint = served
    channel = grpc.insecure_channel(endpoint.replace("unix://", "unix:"))
    request.addfinalizer(channel.close)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)

    def refused(method: str, message: object, metadata=HEADER) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as failure:
            getattr(stub, method)(message, metadata=metadata, timeout=10)
        return failure.value.code(), failure.value.details()

    assert refused("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=[AUDIENCE]), None) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "security header missing from request",
    )
    assert refused("FetchJWTSVID", workload_pb2.JWTSVIDRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "audience must be specified",
    )
    assert refused("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=[AUDIENCE], spiffe_id=NOT_MINE)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "no identity issued to this process",
    )
    code, details = refused("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=["x"] * 3 + [""]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "audience value is empty" in details  # the CA's words
    assert refused("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "svid must be specified",
    )
    code, details = refused("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid="e30.e30."))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("JWT-SVID: ")
    first = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10))
    assert list(first.bundles) == [f"spiffe://{TD}"]
