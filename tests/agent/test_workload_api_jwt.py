"""JWT-SVIDs over the SPIFFE Workload API (issue #16, must-show 1): py-spiffe's
``WorkloadApiClient`` and ``JwtSource`` against a real ``meshid agent --workload-api`` process
and a real CA: fetch, validate (by the agent and by py-spiffe with the fetched JWT bundle), and
the same after a JWT key rotation; meshid's own ``WorkloadApiSource`` too.

SVIDs live 60 s (so each JWT-SVID too: capped by the entry's TTL; long enough for a token fetched
at the start to stay valid through the test on a loaded machine) and the agent renews after 2 to
12 % of that, so it learns a bundle change within seconds of the CA.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import spiffe
from spiffe.workloadapi.errors import FetchJwtSvidError, ValidateJwtSvidError

import meshid
from conftest import Agent
from meshid._proto import workload_pb2, workload_pb2_grpc
from meshid.ca.datadir import activate_rotation, load_jwt_keys, prepare_jwt_rotation
from meshid.workloadapi import WorkloadApiSource
from support import eventually

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
WORKLOAD = f"spiffe://{TD}/ns/prod/sa/batch"
OTHER = f"spiffe://{TD}/ns/prod/sa/other"
AUDIENCE = f"spiffe://{TD}/ns/prod/sa/backend"
TTL = datetime.timedelta(seconds=60)
HEADER = (("workload.spiffe.io", "true"),)


@pytest.fixture
def agent(running_ca, tmp_path: Path) -> Iterator[Agent]:
    started = Agent(running_ca, str(tmp_path / "agent.sock"), "--join-token", running_ca.enroll(WORKLOAD, TTL))
    try:
        yield started
    finally:
        code, err = started.stop()
        assert code == 0 and "Traceback" not in err, err


def _py_spiffe_validates(source: spiffe.JwtSource, token: str) -> str:
    """py-spiffe validates ``token`` itself, with the JWT bundle it fetched (not via the agent)."""
    bundle = source.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    assert bundle is not None
    return str(spiffe.JwtSvid.parse_and_validate(token, bundle, {AUDIENCE}).spiffe_id)


def test_py_spiffe_fetches_and_validates_jwt_svids_and_follows_a_jwt_key_rotation(
    running_ca, agent: Agent, closing
) -> None:
    endpoint = f"unix://{agent.socket}"
    client = closing(spiffe.WorkloadApiClient(socket_path=endpoint))

    # Fetch: a JWT-SVID of the workload's own ID, for the audience asked, signed by the CA's key.
    svid = client.fetch_jwt_svid({AUDIENCE})
    assert str(svid.spiffe_id) == WORKLOAD
    assert svid.audience == {AUDIENCE}
    keys = load_jwt_keys(running_ca.folder)
    assert keys is not None
    old_kid = keys.signing.kid
    assert meshid.JwtSvid.parse_insecure(svid.token).key_id == old_kid
    assert client.fetch_jwt_svid({AUDIENCE}).token == svid.token  # the agent's cache: until half its life

    # Validate: by the agent, and by py-spiffe with the JWT bundle it fetched.
    assert str(client.validate_jwt_svid(svid.token, AUDIENCE).spiffe_id) == WORKLOAD
    with pytest.raises(ValidateJwtSvidError):
        client.validate_jwt_svid(svid.token, f"spiffe://{TD}/somebody-else")
    source = closing(spiffe.JwtSource(socket_path=endpoint, timeout_in_seconds=10))
    assert _py_spiffe_validates(source, svid.token) == WORKLOAD
    assert str(source.fetch_svid({AUDIENCE}).spiffe_id) == WORKLOAD
    bundles = client.fetch_jwt_bundles()
    assert set(bundles.get_bundle_for_trust_domain(spiffe.TrustDomain(TD)).jwt_authorities) == {old_kid}

    # Rotation, step 1: the next key is published; the agent's bundle stream carries it.
    prepared = prepare_jwt_rotation(running_ca.folder)

    def published(kids: set[str]) -> Callable[[], bool]:
        def check() -> bool:
            bundle = source.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
            return bundle is not None and set(bundle.jwt_authorities) == kids

        return check

    eventually(published({old_kid, prepared.kid}), 30, "py-spiffe's JwtSource to get the prepared key")

    # Step 2: the CA signs with it; a new token validates through py-spiffe's fetched bundle and
    # through the agent, and so does the one the old key signed.
    activate_rotation(running_ca.folder, grace=datetime.timedelta(0))

    def signed_by_new_key() -> bool:
        audience = f"{AUDIENCE}?probe={datetime.datetime.now().timestamp()}"  # a new audience: not cached
        return meshid.JwtSvid.parse_insecure(client.fetch_jwt_svid({audience}).token).key_id == prepared.kid

    eventually(signed_by_new_key, 30, "the CA to sign with the new JWT key")
    new = client.fetch_jwt_svid({AUDIENCE, "second-audience"})  # not cached: a new audience set
    assert meshid.JwtSvid.parse_insecure(new.token).key_id == prepared.kid
    bundle = source.get_bundle_for_trust_domain(spiffe.TrustDomain(TD))
    assert str(spiffe.JwtSvid.parse_and_validate(new.token, bundle, {AUDIENCE, "second-audience"}).spiffe_id) == (
        WORKLOAD
    )
    assert str(client.validate_jwt_svid(new.token, AUDIENCE).spiffe_id) == WORKLOAD
    assert _py_spiffe_validates(source, svid.token) == WORKLOAD  # the old key is still published


def test_meshid_workload_api_source_fetches_validates_and_carries_jwt_keys(running_ca, agent: Agent, closing) -> None:
    source = closing(WorkloadApiSource(f"unix://{agent.socket}").start())
    token = source.fetch_jwt_svid([AUDIENCE])
    assert str(token.spiffe_id) == WORKLOAD
    assert str(source.validate_jwt_svid(token.token, AUDIENCE).spiffe_id) == WORKLOAD
    with pytest.raises(meshid.InvalidJwtSvidError, match="audience"):
        source.validate_jwt_svid(token.token, "spiffe://example.org/not-me")
    keys = load_jwt_keys(running_ca.folder)
    assert keys is not None

    def carries_the_jwt_key() -> bool:
        return set(source.get_bundles()[meshid.TrustDomain.parse(TD)].jwt_authorities) == {keys.signing.kid}

    eventually(carries_the_jwt_key, 10, "WorkloadApiSource to follow FetchJWTBundles")
    validated = meshid.JwtSvid.parse_and_validate(token.token, source.get_jwt_bundles(), [AUDIENCE])
    assert validated.spiffe_id == token.spiffe_id
    with pytest.raises(meshid.SourceError, match="PERMISSION_DENIED"):
        source.fetch_jwt_svid([AUDIENCE], meshid.SpiffeId.parse(OTHER))


def test_the_jwt_methods_answer_as_the_standard_says(running_ca, agent: Agent, closing) -> None:
    channel = closing(grpc.insecure_channel(f"unix:{agent.socket}"))
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)

    def code(method: str, request: object, metadata=HEADER) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as refused:
            getattr(stub, method)(request, metadata=metadata, timeout=10)
        return refused.value.code(), refused.value.details()

    fetch = workload_pb2.JWTSVIDRequest(audience=[AUDIENCE])
    assert code("FetchJWTSVID", fetch, None) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "security header missing from request",
    )
    assert code("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid="x"), None)[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    with pytest.raises(grpc.RpcError) as no_header:
        next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), timeout=10))
    assert no_header.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code("FetchJWTSVID", workload_pb2.JWTSVIDRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "audience must be specified",
    )
    assert code("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=[AUDIENCE], spiffe_id=OTHER))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert code("FetchJWTSVID", workload_pb2.JWTSVIDRequest(audience=[AUDIENCE], spiffe_id="not an id"))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    too_many = workload_pb2.JWTSVIDRequest(audience=[f"aud-{i}" for i in range(17)])
    status, details = code("FetchJWTSVID", too_many)  # the CA's refusal, passed on
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "at most 16 audience values" in details
    assert code("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(svid="x")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "audience must be specified",
    )
    assert code("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "svid must be specified",
    )
    status, details = code("ValidateJWTSVID", workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid="a.b.c"))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("JWT-SVID: ")

    # Validation returns the SPIFFE ID and the claims as a Struct.
    token = stub.FetchJWTSVID(fetch, metadata=HEADER, timeout=10).svids[0]
    assert token.spiffe_id == WORKLOAD
    answer = stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid=token.svid), metadata=HEADER, timeout=10
    )
    assert answer.spiffe_id == WORKLOAD
    claims = dict(answer.claims)
    assert claims["sub"] == WORKLOAD and claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == TTL.total_seconds()  # capped by the entry's 60 s

    # FetchJWTBundles: one JWK Set per trust domain, jwt-svid keys only.
    bundles = next(stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10))
    assert list(bundles.bundles) == [f"spiffe://{TD}"]
    import json

    jwks = json.loads(bundles.bundles[f"spiffe://{TD}"])
    assert [k["use"] for k in jwks["keys"]] == ["jwt-svid"]


def test_py_spiffe_sees_a_refusal_as_an_error(running_ca, agent: Agent, closing) -> None:
    client = closing(spiffe.WorkloadApiClient(socket_path=f"unix://{agent.socket}"))
    with pytest.raises(FetchJwtSvidError):
        client.fetch_jwt_svid({AUDIENCE}, subject=spiffe.SpiffeId(OTHER))


def test_jwt_bundles_carry_every_trust_domain_and_validate_a_federated_token(tmp_path: Path, request) -> None:
    """A WorkloadApiServer over a source holding a federated bundle: FetchJWTBundles sends one JWK
    Set per trust domain, and ValidateJWTSVID validates a partner's token with the partner's keys."""
    from meshid.ca import Authority
    from meshid.ca.jwt_keys import JwtKeys
    from meshid.jwtsvid import sign_jwt_svid
    from meshid.workloadapi import WorkloadApiServer

    own, partner = (
        Authority.create_root(meshid.TrustDomain.parse(TD)),
        Authority.create_root(meshid.TrustDomain.parse("partner.org")),
    )
    own_keys, partner_keys = JwtKeys.generate(), JwtKeys.generate("rsa-2048")
    bundles = meshid.BundleSet.of(
        meshid.TrustBundle(own.trust_domain, own.roots).with_jwt_authorities(own_keys.published),
        meshid.TrustBundle(partner.trust_domain, partner.roots).with_jwt_authorities(partner_keys.published),
    )
    server = WorkloadApiServer(meshid.StaticSource(own.issue_svid(WORKLOAD), bundles), str(tmp_path / "api.sock"))
    server.start()
    request.addfinalizer(server.stop)
    client = spiffe.WorkloadApiClient(socket_path=f"unix://{server.path}")
    request.addfinalizer(client.close)

    fetched = client.fetch_jwt_bundles()
    for td, keys in ((TD, own_keys), ("partner.org", partner_keys)):
        bundle = fetched.get_bundle_for_trust_domain(spiffe.TrustDomain(td))
        assert bundle is not None and set(bundle.jwt_authorities) == {keys.signing.kid}
    now = datetime.datetime.now(datetime.UTC)
    billing = meshid.SpiffeId.parse("spiffe://partner.org/ns/prod/sa/billing")
    token = sign_jwt_svid(
        partner_keys.signing.private_key, partner_keys.signing.kid, billing, [AUDIENCE],
        lifetime=datetime.timedelta(minutes=5), now=now,
    )  # fmt: skip
    assert str(client.validate_jwt_svid(token.token, AUDIENCE).spiffe_id) == str(billing)
    # The partner's key under the own trust domain's name is no key of the own trust domain.
    forged = sign_jwt_svid(
        partner_keys.signing.private_key, partner_keys.signing.kid, meshid.SpiffeId.parse(WORKLOAD), [AUDIENCE],
        lifetime=datetime.timedelta(minutes=5), now=now,
    )  # fmt: skip
    with pytest.raises(ValidateJwtSvidError):
        client.validate_jwt_svid(forged.token, AUDIENCE)
    # A source that is no JwtSource hands out no JWT-SVIDs.
    with pytest.raises(FetchJwtSvidError):
        client.fetch_jwt_svid({AUDIENCE})
