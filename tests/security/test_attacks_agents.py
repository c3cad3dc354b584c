"""Attacks on the CA's node-agent surface (issue #12): the Agent service, node attestation by join
token and x509pop, entries served by an agent, eviction.

One module-scoped world serves every row: a meshid CA in process on loopback that trusts a host
PKI for x509pop, two attested agents (node-1 by a join token, node-2 by x509pop) with entries of
their own, a workload with an SVID from a join token, and the admin SVID. Each row is one attack
and the exact outcome it must get: the status code of the refusal (for a batch, the code of the
attacked request's result). The last test checks that legitimate calls still work and prints the
tally.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshid

# The generated messages are private: the attacks speak the wire protocol directly.
from meshid._proto import agent_pb2, issuer_pb2
from meshid.ca import Authority, generate_key
from meshid.ca.client import attest_agent_with_x509pop
from meshid.ca.csr import build_csr
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.sources import FileSource
from nodeagents import (
    AGENT,
    TD,
    AgentCa,
    agent_id,
    attest_raw,
    call,
    challenge,
    host_certificate,
    pem_file,
    x509pop_request,
)

pytestmark = pytest.mark.timeout(120)

NODE_1, NODE_2, EVICTED = agent_id("node-1"), agent_id("node-2"), agent_id("evicted")
WEB = f"spiffe://{TD}/ns/prod/sa/web"  # node-1's
CACHE = f"spiffe://{TD}/ns/prod/sa/cache"  # node-2's
API = f"spiffe://{TD}/ns/prod/sa/api"  # no parent: a join token's
CA_ID, ADMIN_ID = f"spiffe://{TD}/meshid/ca", f"spiffe://{TD}/meshid/admin"


@dataclass
class World:
    ca: AgentCa
    hosts: Authority
    tmp: Path
    svids: dict[str, meshid.X509Svid]  # agents' and the workload's, by SPIFFE ID
    host: tuple[x509.Certificate, Any]  # node-2's host certificate and key
    extra: list[Any] = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("agent-attacks")
    hosts = Authority.create_root("hosts.example")
    ca = AgentCa(tmp / "ca", hosts=hosts)
    try:
        svids = {NODE_1: ca.attest("node-1").svid, EVICTED: ca.attest("evicted").svid}
        host = host_certificate(hosts, "node-2")
        svids[NODE_2] = attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [host[0]], host[1]).svid
        with ca.admin() as admin:
            admin.create_entry(WEB, parent_id=NODE_1, selectors=["unix:uid:1001"])
            admin.create_entry(CACHE, parent_id=NODE_2, selectors=["unix:uid:1002"])
            admin.evict_agent(EVICTED)
        svids[API] = ca.workload("ns/prod/sa/api")
        yield World(ca, hosts, tmp, svids, host)
    finally:
        ca.stop()


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable[[World], tuple[str, str]]
    expected: str
    detail: str = ""


def admin_svid(w: World) -> meshid.X509Svid:
    folder = w.ca.folder / "admin"
    return FileSource(folder / "svid.pem", folder / "svid.key", folder / "bundle.pem").get_svid()


def caller(w: World, who: str) -> meshid.X509Svid | str:
    return "anonymous" if who == "anonymous" else admin_svid(w) if who == "admin" else w.svids[who]


def agent_call(w: World, who: str, method: str, request: Any = None) -> tuple[str, str]:
    requests = {
        "RenewAgent": (agent_pb2.RenewAgentRequest(csr=build_csr(generate_key())), issuer_pb2.SvidResponse),
        "SyncEntries": (agent_pb2.SyncEntriesRequest(), agent_pb2.SyncEntriesResponse),
        "BatchNewX509Svid": (batch_request((WEB, build_csr(generate_key()))), agent_pb2.BatchNewX509SvidResponse),
    }
    default, response_type = requests[method]
    with w.ca.channel(caller(w, who)) as channel:
        code, details, _ = call(channel, f"{AGENT}/{method}", request or default, response_type)
    return code, details


def batch_request(*asked: tuple[str, bytes]) -> Any:
    return agent_pb2.BatchNewX509SvidRequest(requests=[agent_pb2.SvidRequest(spiffe_id=s, csr=c) for s, c in asked])


def batch_as(w: World, who: str, spiffe_id: str, csr: bytes | None = None) -> tuple[str, str]:
    """One request in a batch; the attacked request's own result code (or the whole call's refusal)."""
    request = batch_request((spiffe_id, csr if csr is not None else build_csr(generate_key())))
    with w.ca.channel(caller(w, who)) as channel:
        code, details, response = call(
            channel, f"{AGENT}/BatchNewX509Svid", request, agent_pb2.BatchNewX509SvidResponse
        )
    if code != "OK":
        return code, details
    (result,) = response.results
    if result.certificate:
        return "OK", f"issued {x509.load_der_x509_certificate(result.certificate).serial_number:x}"
    return _code(result.code), result.message


def _code(number: int) -> str:
    import grpc

    return next(c.name for c in grpc.StatusCode if c.value[0] == number)


def x509pop_as(w: World, chain: list[x509.Certificate], key: Any, **tweaks: Any) -> tuple[str, str]:
    with w.ca.channel() as channel:
        fresh = challenge(channel)
        request = x509pop_request(chain, key, fresh.nonce, tweaks.pop("challenge_id", fresh.id))
        if tweaks.pop("swap_csr", False):
            request.csr = build_csr(generate_key())
        code, details, _ = attest_raw(channel, request)
    return code, details


def replayed_x509pop(w: World) -> tuple[str, str]:
    cert, key = w.host
    with w.ca.channel() as channel:
        fresh = challenge(channel)
        request = x509pop_request([cert], key, fresh.nonce, fresh.id)
        assert attest_raw(channel, request)[0] == "OK"  # the host's own, legitimate attestation
    with w.ca.channel() as channel:  # an eavesdropper sends the same proof again
        code, details, _ = attest_raw(channel, request)
    return code, details


def workload_svid_as_host_certificate(w: World) -> tuple[str, str]:
    svid = w.svids[API]  # issued by the CA itself: the CA's bundle, not the agent PKI
    return x509pop_as(w, list(svid.chain), svid.private_key)


def admin_svid_as_host_certificate(w: World) -> tuple[str, str]:
    svid = admin_svid(w)
    return x509pop_as(w, list(svid.chain), svid.private_key)


def host_pki_mints_an_svid(w: World) -> tuple[str, str]:
    cert, key = host_certificate(w.hosts, "admin", uris=[ADMIN_ID])
    return x509pop_as(w, [cert], key)


def svid_under_a_corporate_root_that_is_also_the_agent_pki(w: World) -> tuple[str, str]:
    """The CA is an intermediate under the corporate PKI's intermediate, and that PKI's root is
    also the agent-CA bundle: every X509-SVID of the CA chains to a trusted host root."""
    corp = Authority.create_root("corp.example")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuing = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp issuing CA")]))
        .issuer_name(corp.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(corp.private_key.public_key()), critical=False
        )
        .sign(corp.private_key, hashes.SHA256())
    )
    upstream_cert = pem_file(w.tmp / "corp-issuing.pem", issuing)
    upstream_key = w.tmp / "corp-issuing.key"
    upstream_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    folder = w.tmp / "corp-ca"
    init_data_dir(
        folder, TD, upstream_cert=str(upstream_cert), upstream_key=str(upstream_key),
        agent_ca=str(pem_file(w.tmp / "corp-root.pem", corp.certificate)),
    )  # fmt: skip
    server = CaServer(folder, "127.0.0.1:0")
    port = server.start()
    try:
        admin = FileSource(
            folder / "admin" / "svid.pem", folder / "admin" / "svid.key", folder / "admin" / "bundle.pem"
        )
        svid = admin.get_svid()  # an X509-SVID of this CA: leaf, meshid's intermediate, corp issuing CA
        assert len(svid.chain) == 3
        roots = (folder / "bundle.pem").read_bytes()
        try:
            attest_agent_with_x509pop(f"127.0.0.1:{port}", roots, TD, list(svid.chain), svid.private_key)
        except meshid.RemoteError as err:
            return err.code, str(err)
        return "OK", ""
    finally:
        server.stop(grace=None)


def host_named(w: World, cn: str) -> tuple[str, str]:
    cert, key = host_certificate(w.hosts, cn)
    return x509pop_as(w, [cert], key)


def token_for(w: World, spiffe_id: str | None = None, agent: str | None = None) -> str:
    with w.ca.admin() as admin:
        if agent is not None:
            return str(admin.create_agent_token(agent).token)
        admin.create_entry(spiffe_id)  # type: ignore[arg-type]
        return str(admin.create_token(spiffe_id).token)  # type: ignore[arg-type]


def attest_with_token(w: World, token: str) -> tuple[str, str]:
    request = agent_pb2.AttestAgentRequest(join_token=token, csr=build_csr(generate_key()))
    with w.ca.channel() as channel:
        code, details, _ = attest_raw(channel, request)
    return code, details


def issue_with_token(w: World, token: str) -> tuple[str, str]:
    request = issuer_pb2.IssueWithTokenRequest(join_token=token, csr=build_csr(generate_key()))
    with w.ca.channel() as channel:
        code, details, _ = call(channel, "/meshid.v1.Issuer/IssueWithToken", request, issuer_pb2.SvidResponse)
    return code, details


def issuer_renew_as(w: World, svid: meshid.X509Svid, csr: bytes | None = None) -> tuple[str, str]:
    request = issuer_pb2.RenewRequest(csr=csr or build_csr(generate_key()))
    with w.ca.channel(svid) as channel:
        code, details, _ = call(channel, "/meshid.v1.Issuer/Renew", request, issuer_pb2.SvidResponse)
    return code, details


def batch_svid_renewed_by_its_holder(w: World) -> tuple[str, str]:
    key = generate_key()
    request = batch_request((WEB, build_csr(key)))
    with w.ca.channel(w.svids[NODE_1]) as channel:
        _, _, response = call(channel, f"{AGENT}/BatchNewX509Svid", request, agent_pb2.BatchNewX509SvidResponse)
    ders = [response.results[0].certificate, *response.intermediates]
    chain = [x509.load_der_x509_certificate(der) for der in ders]
    return issuer_renew_as(w, meshid.X509Svid.from_parts(chain, key))


def admin_does(w: World, action: Callable[[Any], object]) -> tuple[str, str]:
    with w.ca.admin() as admin:
        try:
            action(admin)
        except meshid.RemoteError as err:
            return err.code, str(err)
    return "OK", ""


def oversized_batch(w: World) -> tuple[str, str]:
    csr = build_csr(generate_key())
    request = batch_request(*[(f"{WEB}{i}", csr) for i in range(400)])
    return agent_call(w, NODE_1, "BatchNewX509Svid", request)


ATTACKS = [
    # --- who may call the Agent service ---
    *(
        Attack(
            f"workload-svid-calls-{m}",
            lambda w, m=m: agent_call(w, API, m),
            "PERMISSION_DENIED",
            f"{API} may not call {AGENT}/{m}",
        )
        for m in ("RenewAgent", "SyncEntries", "BatchNewX509Svid")
    ),
    *(
        Attack(
            f"admin-svid-calls-{m}",
            lambda w, m=m: agent_call(w, "admin", m),
            "PERMISSION_DENIED",
            f"{ADMIN_ID} may not call",
        )
        for m in ("RenewAgent", "SyncEntries", "BatchNewX509Svid")
    ),
    *(
        Attack(
            f"anonymous-caller-calls-{m}",
            lambda w, m=m: agent_call(w, "anonymous", m),
            "UNAUTHENTICATED",
            "carries no SPIFFE ID",
        )
        for m in ("RenewAgent", "SyncEntries", "BatchNewX509Svid")
    ),
    Attack(
        "agent-calls-the-registration-api",
        lambda w: admin_as_agent(w),
        "PERMISSION_DENIED",
        f"{NODE_1} may not call /meshid.v1.Registration/ListAgents",
    ),
    # --- batches: only the caller's own entries ---
    Attack(
        "agent-asks-for-another-agents-entry",
        lambda w: batch_as(w, NODE_1, CACHE),
        "PERMISSION_DENIED",
        f"{CACHE} has no entry parented to {NODE_1}",
    ),
    Attack(
        "agent-asks-for-an-entry-without-a-parent",
        lambda w: batch_as(w, NODE_1, API),
        "PERMISSION_DENIED",
        f"{API} has no entry parented to {NODE_1}",
    ),
    Attack(
        "agent-asks-for-another-agents-own-id",
        lambda w: batch_as(w, NODE_1, NODE_2),
        "PERMISSION_DENIED",
        "has no entry parented to",
    ),
    Attack(
        "agent-asks-for-the-cas-own-id",
        lambda w: batch_as(w, NODE_1, CA_ID),
        "PERMISSION_DENIED",
        "has no entry parented to",
    ),
    Attack(
        "agent-asks-for-the-admin-id",
        lambda w: batch_as(w, NODE_1, ADMIN_ID),
        "PERMISSION_DENIED",
        "has no entry parented to",
    ),
    Attack(
        "agent-asks-for-another-trust-domains-id",
        lambda w: batch_as(w, NODE_1, "spiffe://other.org/ns/prod/sa/web"),
        "PERMISSION_DENIED",
        "has no entry parented to",
    ),
    Attack(
        "agent-csr-asks-for-another-id-than-its-request",
        lambda w: batch_as(w, NODE_1, WEB, build_csr(generate_key(), uri=ADMIN_ID)),
        "PERMISSION_DENIED",
        "asks for another SPIFFE ID",
    ),
    Attack(
        "agent-gives-a-workload-its-own-key",
        lambda w: batch_as(w, NODE_1, WEB, build_csr(w.svids[NODE_1].private_key)),
        "INVALID_ARGUMENT",
        "over the agent's own key",
    ),
    Attack(
        "agent-gives-a-workload-another-agents-key",
        lambda w: batch_as(w, NODE_1, WEB, build_csr(w.svids[NODE_2].private_key)),
        "INVALID_ARGUMENT",
        "certified before",
    ),
    Attack("batch-larger-than-the-request-limit", oversized_batch, "RESOURCE_EXHAUSTED", "larger than max"),
    # --- an agent's identity: only node attestation gives it ---
    Attack(
        "entry-for-an-agent-id",
        lambda w: admin_does(w, lambda a: a.create_entry(agent_id("rogue"))),
        "PERMISSION_DENIED",
        "reserved",
    ),
    Attack(
        "agent-token-at-issue-with-token",
        lambda w: issue_with_token(w, token_for(w, agent="rogue")),
        "UNAUTHENTICATED",
        "made for node attestation",
    ),
    Attack(
        "workload-token-at-attest-agent",
        lambda w: attest_with_token(w, token_for(w, f"spiffe://{TD}/ns/prod/sa/tok")),
        "UNAUTHENTICATED",
        "made for a workload's entry",
    ),
    Attack(
        "join-token-for-an-entry-with-a-parent",
        lambda w: admin_does(w, lambda a: a.create_token(WEB)),
        "PERMISSION_DENIED",
        f"served by node agent {NODE_1}",
    ),
    Attack(
        "agent-renews-through-the-workload-renewal",
        lambda w: issuer_renew_as(w, w.svids[NODE_1]),
        "PERMISSION_DENIED",
        "renews with meshid.v1.Agent/RenewAgent",
    ),
    Attack(
        "agent-renewal-csr-asks-for-the-admin-id",
        lambda w: agent_call(
            w, NODE_1, "RenewAgent", agent_pb2.RenewAgentRequest(csr=build_csr(generate_key(), uri=ADMIN_ID))
        ),
        "PERMISSION_DENIED",
        "may renew only its own SPIFFE ID",
    ),
    Attack(
        "holder-of-an-agent-issued-svid-renews-it-directly",
        batch_svid_renewed_by_its_holder,
        "PERMISSION_DENIED",
        f"{WEB} is served by node agent {NODE_1}",
    ),
    # --- x509pop ---
    Attack("replayed-x509pop-proof", replayed_x509pop, "UNAUTHENTICATED", "the challenge was used already"),
    Attack(
        "x509pop-proof-with-a-forged-challenge-id",
        lambda w: x509pop_as(w, [w.host[0]], w.host[1], challenge_id="B" * 54),
        "UNAUTHENTICATED",
        "unknown challenge",
    ),
    Attack(
        "x509pop-proof-moved-to-the-attackers-csr",
        lambda w: x509pop_as(w, [w.host[0]], w.host[1], swap_csr=True),
        "UNAUTHENTICATED",
        "the signature does not verify",
    ),
    Attack(
        "x509pop-with-the-host-certificate-but-not-its-key",
        lambda w: x509pop_as(w, [w.host[0]], ec.generate_private_key(ec.SECP256R1())),
        "UNAUTHENTICATED",
        "the signature does not verify",
    ),
    Attack(
        "x509pop-with-a-workload-svid-of-the-ca-instead-of-a-host-certificate",
        workload_svid_as_host_certificate,
        "UNAUTHENTICATED",
        "does not verify against the agent CA bundle",
    ),
    Attack(
        "x509pop-with-the-admin-svid",
        admin_svid_as_host_certificate,
        "UNAUTHENTICATED",
        "does not verify against the agent CA bundle",
    ),
    Attack(
        "x509pop-host-certificate-carrying-a-spiffe-id",
        host_pki_mints_an_svid,
        "UNAUTHENTICATED",
        "the host certificate is an X509-SVID",
    ),
    Attack(
        "x509pop-with-an-svid-when-the-agent-pki-root-is-above-the-ca",
        svid_under_a_corporate_root_that_is_also_the_agent_pki,
        "UNAUTHENTICATED",
        "the host certificate is an X509-SVID",
    ),
    Attack(
        "x509pop-template-fed-a-dot-dot-common-name",
        lambda w: host_named(w, ".."),
        "INVALID_ARGUMENT",
        "not a SPIFFE ID path segment",
    ),
    Attack(
        "x509pop-template-fed-a-path-in-the-common-name",
        lambda w: host_named(w, "x/../../admin"),
        "INVALID_ARGUMENT",
        "not a SPIFFE ID path segment",
    ),
    # --- eviction ---
    *(
        Attack(f"evicted-agent-calls-{m}", lambda w, m=m: agent_call(w, EVICTED, m), "UNAUTHENTICATED", "is revoked")
        for m in ("RenewAgent", "SyncEntries", "BatchNewX509Svid")
    ),
]
#: name -> (expected, observed), filled as the rows run.
TALLY: dict[str, tuple[str, str]] = {}


def admin_as_agent(w: World) -> tuple[str, str]:
    from meshid._proto import registration_pb2

    with w.ca.channel(w.svids[NODE_1]) as channel:
        code, details, _ = call(
            channel,
            "/meshid.v1.Registration/ListAgents",
            registration_pb2.ListAgentsRequest(),
            registration_pb2.ListAgentsResponse,
        )
    return code, details


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.name) for a in ATTACKS])
def test_attack(world: World, attack: Attack) -> None:
    try:
        observed, details = attack.run(world)
    except Exception as err:  # an exception type no attack should raise: a crash
        observed, details = "CRASH", f"{type(err).__name__}: {err}"
    TALLY[attack.name] = (attack.expected, observed)
    assert observed == attack.expected, f"{attack.name}: expected {attack.expected}, got {observed}: {details}"
    assert attack.detail in details, details


def test_legitimate_calls_still_work_and_summary(world: World) -> None:
    w = world
    legitimate = {
        "node-1 batch for its own entry": batch_as(w, NODE_1, WEB)[0],
        "node-2 batch for its own entry": batch_as(w, NODE_2, CACHE)[0],
        "node-1 sync": agent_call(w, NODE_1, "SyncEntries")[0],
        "node-2 renewal": agent_call(w, NODE_2, "RenewAgent")[0],
        "x509pop by the real host": x509pop_as(w, [w.host[0]], w.host[1])[0],
    }
    stopped = {name: code for name, code in legitimate.items() if code != "OK"}
    tried = len(TALLY)
    as_expected = sum(1 for expected, observed in TALLY.values() if observed == expected)
    allowed = sum(1 for expected, observed in TALLY.values() if observed == "OK" and expected != "OK")
    crashes = sum(1 for _, observed in TALLY.values() if observed == "CRASH")
    print(f"\n[agent attacks] {tried} tried, {as_expected} refused as expected, {allowed} allowed, {crashes} crashes")
    assert not stopped, f"a legitimate call failed after the matrix: {stopped}"
    assert crashes == 0
