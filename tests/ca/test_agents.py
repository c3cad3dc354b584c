"""Node agents at the CA (issue #12): attestation by a join token and by x509pop, the agent's own
renewal, eviction and attesting again, and what ListAgents says. A real CA on loopback, real TLS;
the host PKI is a root made by meshid's own CA code and host certificates made with cryptography's
builders (tests/nodeagents.py)."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import meshid

# Private messages: requests the public client never builds (a renewal over the current key).
from meshid._proto import agent_pb2, issuer_pb2
from meshid.ca import Authority, generate_key
from meshid.ca.client import (
    AgentClient,
    attest_agent_with_token,
    attest_agent_with_x509pop,
    fetch_svid,
    renew_agent_with_svid,
    sync_entries_with_svid,
)
from meshid.ca.csr import build_csr
from meshid.clock import ManualClock
from meshid.errors import RemoteError
from nodeagents import AGENT, TD, AgentCa, agent_id, attest_raw, call, challenge, host_certificate, x509pop_request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def hosts() -> Authority:
    """The site's own PKI, whose host certificates the CA trusts for x509pop."""
    return Authority.create_root("hosts.example")


@pytest.fixture
def ca(tmp_path: Path, hosts: Authority) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path / "ca", hosts=hosts)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def clocked_ca(tmp_path: Path, hosts: Authority, clock: ManualClock) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path / "ca", hosts=hosts, clock=clock)
    try:
        yield running
    finally:
        running.stop()


def remote_error(fn: object) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()  # type: ignore[operator]
    return info.value


def agents_by_id(ca: AgentCa) -> dict[str, object]:
    with ca.admin() as admin:
        return {a.spiffe_id: a for a in admin.list_agents()}


# --- attestation by join token ---------------------------------------------------------------------


def test_join_token_attests_a_node_agent_without_an_entry(ca: AgentCa) -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    issued = ca.attest("node-1")
    svid = issued.svid
    assert str(svid.spiffe_id) == agent_id("node-1")
    ca.bundles.verify(svid.leaf, svid.chain[1:])
    assert datetime.timedelta(minutes=59) < issued.lifetime <= datetime.timedelta(hours=1)
    info = agents_by_id(ca)[agent_id("node-1")]
    assert (info.attestation, info.attested_by, info.evicted) == ("join_token", "", False)  # type: ignore[attr-defined]
    assert info.expires_at == int(svid.not_after.timestamp())  # type: ignore[attr-defined]
    assert info.last_seen >= int(before.timestamp())  # type: ignore[attr-defined]
    with ca.admin() as admin:  # no entry was made for the agent: its ID stays reserved
        assert agent_id("node-1") not in {e.spiffe_id for e in admin.list_entries()}


def test_agent_join_token_is_single_use(ca: AgentCa) -> None:
    with ca.admin() as admin:
        token = str(admin.create_agent_token("node-1").token)
    attest_agent_with_token(ca.address, ca.roots_pem, token)
    err = remote_error(lambda: attest_agent_with_token(ca.address, ca.roots_pem, token))
    assert err.code == "UNAUTHENTICATED" and "join token: already used" in str(err)


def test_tokens_attest_only_what_they_were_made_for(ca: AgentCa) -> None:
    workload = f"spiffe://{TD}/ns/prod/sa/web"
    with ca.admin() as admin:
        admin.create_entry(workload)
        workload_token = str(admin.create_token(workload).token)
        agent_token = str(admin.create_agent_token("node-1").token)
    err = remote_error(lambda: attest_agent_with_token(ca.address, ca.roots_pem, workload_token))
    assert err.code == "UNAUTHENTICATED" and "made for a workload's entry, not for node attestation" in str(err)
    err = remote_error(lambda: fetch_svid(ca.address, ca.bundle_file, agent_token))
    assert err.code == "UNAUTHENTICATED" and "made for node attestation" in str(err)
    # Neither refusal spent the token it was given.
    assert str(fetch_svid(ca.address, ca.bundle_file, workload_token)[0].spiffe_id) == workload
    assert str(attest_agent_with_token(ca.address, ca.roots_pem, agent_token).svid.spiffe_id) == agent_id("node-1")


# --- attestation by x509pop ------------------------------------------------------------------------


def test_x509pop_attests_the_agent_named_after_its_host_certificate(ca: AgentCa, hosts: Authority) -> None:
    cert, key = host_certificate(hosts, "node-7.dc1")
    issued = attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert], key)
    assert str(issued.svid.spiffe_id) == agent_id("node-7.dc1")
    assert issued.svid.leaf.public_key() != cert.public_key()
    info = agents_by_id(ca)[agent_id("node-7.dc1")]
    assert (info.attestation, info.attested_by) == ("x509pop", "CN=node-7.dc1,O=hosts")  # type: ignore[attr-defined]


def test_x509pop_through_an_intermediate_of_the_host_pki(ca: AgentCa, hosts: Authority) -> None:
    intermediate = Authority.from_upstream("hosts.example", hosts.certificate, hosts.private_key)
    cert, key = host_certificate(intermediate, "node-8")
    issued = attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert, intermediate.certificate], key)
    assert str(issued.svid.spiffe_id) == agent_id("node-8")


@pytest.mark.parametrize(
    ("template", "cert_args", "name"),
    [
        ("{cn}", {"cn": "web-01"}, "web-01"),
        ("{san_dns}", {"cn": None, "dns": ["node-3.example.net"]}, "node-3.example.net"),
        ("host-{serial}", {}, "host-{serial}"),
        ("x509pop-{fingerprint}", {}, "x509pop-{fingerprint}"),
        ("{cn}.{san_dns}", {"cn": "a", "dns": ["b.example"]}, "a.b.example"),
    ],
)
def test_agent_id_templates(
    tmp_path: Path, hosts: Authority, template: str, cert_args: dict[str, object], name: str
) -> None:
    ca = AgentCa(tmp_path / "ca", hosts=hosts, template=template)
    try:
        cert, key = host_certificate(hosts, **cert_args)  # type: ignore[arg-type]
        expected = name.format(serial=format(cert.serial_number, "x"), fingerprint=meshid_fingerprint(cert))
        issued = attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert], key)
        assert str(issued.svid.spiffe_id) == agent_id(expected)
    finally:
        ca.stop()


def meshid_fingerprint(cert: x509.Certificate) -> str:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _expired_host(hosts: Authority) -> tuple[x509.Certificate, object]:
    now = datetime.datetime.now(datetime.UTC)
    return host_certificate(
        hosts, "old", not_before=now - 2 * datetime.timedelta(days=2), not_after=now - datetime.timedelta(days=1)
    )


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        (
            "signed-by-another-key",
            "UNAUTHENTICATED",
            "x509pop: the signature does not verify with the host certificate's key",
        ),
        ("chain-to-an-untrusted-pki", "UNAUTHENTICATED", "does not verify against the agent CA bundle"),
        ("expired-host-certificate", "UNAUTHENTICATED", "does not verify against the agent CA bundle"),
        ("host-certificate-that-is-a-ca", "UNAUTHENTICATED", "x509pop takes an end-entity certificate"),
        ("host-certificate-without-digital-signature", "UNAUTHENTICATED", "does not include digitalSignature"),
        ("host-certificate-for-servers-only", "UNAUTHENTICATED", "does not include clientAuth"),
        (
            "template-gives-an-invalid-segment",
            "INVALID_ARGUMENT",
            "gives 'node 1' for this host certificate, which is not a SPIFFE ID path segment",
        ),
        (
            "template-gives-a-slash",
            "INVALID_ARGUMENT",
            "gives 'a/b' for this host certificate, which is not a SPIFFE ID path segment",
        ),
        (
            "certificate-with-two-common-names",
            "INVALID_ARGUMENT",
            "needs exactly one of the host certificate's subject common names, and it has 2",
        ),
        ("certificate-without-a-common-name", "INVALID_ARGUMENT", "and it has 0"),
        ("csr-over-the-host-key", "INVALID_ARGUMENT", "the CSR is over the host key"),
        ("unknown-challenge", "UNAUTHENTICATED", "x509pop: unknown challenge"),
        ("signature-over-another-csr", "UNAUTHENTICATED", "the signature does not verify"),
        ("no-certificate", "INVALID_ARGUMENT", "x509pop: give the host certificate chain"),
        ("garbage-certificate", "INVALID_ARGUMENT", "x509pop: a certificate of the host chain cannot be read"),
    ],
)
def test_x509pop_refusals(ca: AgentCa, hosts: Authority, case: str, code: str, message: str) -> None:
    cert, key = host_certificate(hosts, "node-1")
    chain: list[x509.Certificate] = [cert]
    signing_key = key
    csr = None
    if case == "signed-by-another-key":
        signing_key = ec.generate_private_key(ec.SECP256R1())
    elif case == "chain-to-an-untrusted-pki":
        cert, signing_key = host_certificate(Authority.create_root("hosts.example"), "node-1")
        chain = [cert]
    elif case == "expired-host-certificate":
        cert, signing_key = _expired_host(hosts)
        chain = [cert]
    elif case == "host-certificate-that-is-a-ca":
        cert, signing_key = host_certificate(hosts, "node-1", ca=True)
        chain = [cert]
    elif case == "host-certificate-without-digital-signature":
        cert, signing_key = host_certificate(hosts, "node-1", digital_signature=False)
        chain = [cert]
    elif case == "host-certificate-for-servers-only":
        cert, signing_key = host_certificate(hosts, "node-1", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        chain = [cert]
    elif case == "template-gives-an-invalid-segment":
        cert, signing_key = host_certificate(hosts, "node 1")
        chain = [cert]
    elif case == "template-gives-a-slash":
        cert, signing_key = host_certificate(hosts, "a/b")
        chain = [cert]
    elif case == "certificate-with-two-common-names":
        cert, signing_key = host_certificate(hosts, "node-1", extra_cns=["node-2"])
        chain = [cert]
    elif case == "certificate-without-a-common-name":
        cert, signing_key = host_certificate(hosts, None, dns=["node-1.example"])
        chain = [cert]
    elif case == "csr-over-the-host-key":
        csr = build_csr(key)
    with ca.channel() as channel:
        fresh = challenge(channel)
        challenge_id = "A" * 54 if case == "unknown-challenge" else fresh.id
        request = x509pop_request(chain, signing_key, fresh.nonce, challenge_id, csr=csr)
        if case == "signature-over-another-csr":
            request.csr = build_csr(generate_key())
        elif case == "no-certificate":
            del request.x509pop.certificate_chain[:]
        elif case == "garbage-certificate":
            request.x509pop.certificate_chain[0] = b"\x30\x03\x02\x01\x01"
        got, details, _ = attest_raw(channel, request)
    assert (got, message in details) == (code, True), details
    assert agents_by_id(ca) == {}


def test_replayed_x509pop_proof_is_refused(ca: AgentCa, hosts: Authority) -> None:
    cert, key = host_certificate(hosts, "node-1")
    with ca.channel() as channel:
        fresh = challenge(channel)
        request = x509pop_request([cert], key, fresh.nonce, fresh.id)
        assert attest_raw(channel, request)[0] == "OK"
        code, details, _ = attest_raw(channel, request)  # the very same bytes, again
    assert code == "UNAUTHENTICATED" and "x509pop: the challenge was used already" in details
    with ca.channel() as channel:  # and from another connection
        code, details, _ = attest_raw(channel, request)
    assert code == "UNAUTHENTICATED" and "used already" in details


def test_a_failed_proof_leaves_its_challenge_usable_for_the_host(ca: AgentCa, hosts: Authority) -> None:
    # Only a proof that verifies spends a challenge: garbage sent with someone's challenge id
    # cannot burn it (and costs the CA no memory).
    cert, key = host_certificate(hosts, "node-1")
    with ca.channel() as channel:
        fresh = challenge(channel)
        forged = x509pop_request([cert], ec.generate_private_key(ec.SECP256R1()), fresh.nonce, fresh.id)
        assert attest_raw(channel, forged)[0] == "UNAUTHENTICATED"
        assert attest_raw(channel, x509pop_request([cert], key, fresh.nonce, fresh.id))[0] == "OK"


def test_expired_challenge_is_refused(clocked_ca: AgentCa, clock: ManualClock, hosts: Authority) -> None:
    cert, key = host_certificate(hosts, "node-1")
    with clocked_ca.channel() as channel:
        fresh = challenge(channel)
        assert fresh.expires_at == pytest.approx(clock.now().timestamp() + 30)
        clock.advance(30)
        code, details, _ = attest_raw(channel, x509pop_request([cert], key, fresh.nonce, fresh.id))
        assert code == "UNAUTHENTICATED" and "x509pop: the challenge expired" in details
        fresh = challenge(channel)
        clock.advance(29)
        assert attest_raw(channel, x509pop_request([cert], key, fresh.nonce, fresh.id))[0] == "OK"


def test_challenge_of_another_ca_process_is_unknown(ca: AgentCa, hosts: Authority, tmp_path: Path) -> None:
    other = AgentCa(tmp_path / "other", hosts=hosts)
    try:
        cert, key = host_certificate(hosts, "node-1")
        with other.channel() as channel:
            foreign = challenge(channel)
        with ca.channel() as channel:
            code, details, _ = attest_raw(channel, x509pop_request([cert], key, foreign.nonce, foreign.id))
    finally:
        other.stop()
    assert code == "UNAUTHENTICATED" and "x509pop: unknown challenge (not issued by this CA process" in details


def test_x509pop_on_a_ca_that_trusts_no_host_pki(tmp_path: Path, hosts: Authority) -> None:
    ca = AgentCa(tmp_path / "ca")
    try:
        with ca.channel() as channel:
            code, details, _ = call(
                channel,
                f"{AGENT}/GetAttestationChallenge",
                agent_pb2.AttestationChallengeRequest(),
                agent_pb2.AttestationChallenge,
            )
        cert, key = host_certificate(hosts, "node-1")
        err = remote_error(lambda: attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert], key))
    finally:
        ca.stop()
    assert code == "UNAUTHENTICATED" and "x509pop: this CA trusts no PKI for node attestation" in details
    assert err.code == "UNAUTHENTICATED" and "trusts no PKI" in str(err)


def test_attestation_without_a_method_is_invalid(ca: AgentCa) -> None:
    with ca.channel() as channel:
        code, details, _ = attest_raw(channel, agent_pb2.AttestAgentRequest(csr=build_csr(generate_key())))
    assert code == "INVALID_ARGUMENT" and "give a join_token or an x509pop proof" in details


# --- the agent's own renewal -----------------------------------------------------------------------


def test_agent_renews_its_svid_with_a_new_key(ca: AgentCa) -> None:
    first = ca.attest("node-1").svid
    with AgentClient(ca.address, first, ca.bundles) as client:
        second = client.renew().svid
        third = client.renew().svid  # the client moved to the second SVID for this call
        assert client.sync_entries() == []
    assert {str(s.spiffe_id) for s in (first, second, third)} == {agent_id("node-1")}
    assert len({first.serial, second.serial, third.serial}) == 3
    keys = {s.leaf.public_key().public_numbers() for s in (first, second, third)}  # type: ignore[union-attr]
    assert len(keys) == 3
    info = agents_by_id(ca)[agent_id("node-1")]
    assert info.expires_at == int(third.not_after.timestamp())  # type: ignore[attr-defined]


def test_agent_renewal_over_the_current_key_is_refused(ca: AgentCa) -> None:
    svid = ca.attest("node-1").svid
    with ca.channel(svid) as channel:
        code, details, _ = call(
            channel,
            f"{AGENT}/RenewAgent",
            agent_pb2.RenewAgentRequest(csr=build_csr(svid.private_key)),
            issuer_pb2.SvidResponse,
        )
    assert code == "INVALID_ARGUMENT" and "agent renewal: the CSR reuses the key of the current SVID" in details


def test_agent_renews_only_with_renew_agent(ca: AgentCa) -> None:
    svid = ca.attest("node-1").svid
    with ca.channel(svid) as channel:
        request = issuer_pb2.RenewRequest(csr=build_csr(generate_key()))
        code, details, _ = call(channel, "/meshid.v1.Issuer/Renew", request, issuer_pb2.SvidResponse)
    assert code == "PERMISSION_DENIED" and "is a node agent; it renews with meshid.v1.Agent/RenewAgent" in details


# --- eviction --------------------------------------------------------------------------------------


def test_eviction_revokes_the_agent_and_bars_it_until_it_attests_again(ca: AgentCa) -> None:
    first = ca.attest("node-1").svid
    second = renew_agent_with_svid(ca.address, first, ca.bundles).svid
    other = ca.attest("node-2").svid
    with ca.admin() as admin:
        revoked = admin.evict_agent(agent_id("node-1"))
    assert sorted(revoked) == sorted([format(first.serial, "x"), format(second.serial, "x")])

    # Both SVIDs are in the CRL; the other agent's is not.
    with ca.channel(other) as channel:
        code, _, crl = call(channel, "/meshid.v1.Issuer/GetCrl", issuer_pb2.GetCrlRequest(), issuer_pb2.Crl)
    listed = {r.serial_number for r in x509.load_der_x509_crl(crl.der)}
    assert code == "OK" and {first.serial, second.serial} <= listed and other.serial not in listed

    # It can neither renew nor sync nor ask for SVIDs.
    err = remote_error(lambda: renew_agent_with_svid(ca.address, second, ca.bundles))
    assert err.code == "UNAUTHENTICATED" and f"certificate serial {second.serial:x} is revoked" in str(err)
    err = remote_error(lambda: sync_entries_with_svid(ca.address, second, ca.bundles))
    assert err.code == "UNAUTHENTICATED"
    info = agents_by_id(ca)
    assert info[agent_id("node-1")].evicted and not info[agent_id("node-2")].evicted  # type: ignore[attr-defined]

    # A new token attests it again, and that ends the eviction.
    again = ca.attest("node-1").svid
    assert str(again.spiffe_id) == agent_id("node-1")
    assert sync_entries_with_svid(ca.address, again, ca.bundles) == []
    assert not agents_by_id(ca)[agent_id("node-1")].evicted  # type: ignore[attr-defined]


def test_x509pop_attests_an_evicted_agent_again(ca: AgentCa, hosts: Authority) -> None:
    cert, key = host_certificate(hosts, "node-9")
    attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert], key)
    with ca.admin() as admin:
        assert len(admin.evict_agent(agent_id("node-9"))) == 1
    again = attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert], key).svid
    assert sync_entries_with_svid(ca.address, again, ca.bundles) == []
    assert not agents_by_id(ca)[agent_id("node-9")].evicted  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [
        (agent_id("never-seen"), "NOT_FOUND", f"node agent: {agent_id('never-seen')} never attested to this CA"),
        (f"spiffe://{TD}/ns/prod/sa/web", "INVALID_ARGUMENT", "is not a node agent of this CA"),
        ("spiffe://other.org/meshid/agent/node-1", "INVALID_ARGUMENT", "is not a node agent of this CA"),
        (f"spiffe://{TD}/meshid/agent/a/b", "INVALID_ARGUMENT", "is not a node agent of this CA"),
        ("not a spiffe id", "INVALID_ARGUMENT", "agent eviction: SPIFFE ID"),
    ],
)
def test_eviction_refusals(ca: AgentCa, target: str, code: str, message: str) -> None:
    with ca.admin() as admin:
        err = remote_error(lambda: admin.evict_agent(target))
    assert err.code == code and message in str(err), str(err)


def test_list_agents_fields(ca: AgentCa, hosts: Authority) -> None:
    token_agent = ca.attest("tok").svid
    cert, key = host_certificate(hosts, "pop")
    pop_agent = attest_agent_with_x509pop(ca.address, ca.roots_pem, TD, [cert], key).svid
    with ca.admin() as admin:
        admin.evict_agent(agent_id("tok"))
        listed = admin.list_agents()
    rows = [(a.spiffe_id, a.attestation, a.attested_by, a.evicted, a.expires_at) for a in listed]
    assert rows == [
        (agent_id("pop"), "x509pop", "CN=pop,O=hosts", False, int(pop_agent.not_after.timestamp())),
        (agent_id("tok"), "join_token", "", True, int(token_agent.not_after.timestamp())),
    ]
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert all(now - 60 < a.last_seen <= now + 1 for a in listed)


def test_an_agent_token_needs_a_valid_name(ca: AgentCa) -> None:
    with ca.admin() as admin, pytest.raises(meshid.InvalidSpiffeIdError):
        admin.create_agent_token("bad name")
    with ca.admin() as admin:
        err = remote_error(lambda: admin.create_token(f"spiffe://{TD}/meshid/agent/a/b"))
    assert err.code == "PERMISSION_DENIED" and "reserved for the CA itself" in str(err)


def test_nothing_is_attested_with_a_random_token(ca: AgentCa) -> None:
    guessed = f"{TD}:{secrets.token_urlsafe(32)}"
    err = remote_error(lambda: attest_agent_with_token(ca.address, ca.roots_pem, guessed))
    assert err.code == "UNAUTHENTICATED" and "join token: unknown" in str(err)
