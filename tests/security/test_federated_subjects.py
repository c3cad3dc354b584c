"""Issue #10 item 2: subject, DNS and non-SPIFFE rules across trust domains, against a real server.

A federated partner's CA can write any subject or DNS SAN it likes. A greeter in example.org,
behind :class:`meshid.AuthorizationInterceptor` with the README's policy shape, federates with
other.org (a partner) and legacy.example (whose certificates without a SPIFFE ID it admits, but
whose every call a deny rule refuses). Each row is one client certificate, signed by one of
those CAs (made with meshid's :class:`~meshid.ca.Authority`), one real mTLS call, and the exact
outcome it must get; for refusals by a rule, the audit record names the rule.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import meshid
from meshid.ca import Authority
from support import FRONTEND_ID, SAY_HELLO, SERVER_ID, SERVICE, hello, stub, sync_server

pytestmark = pytest.mark.timeout(120)

CORP = "CN=batch,O=Example Corp"  # the README's subject rule
BILLING = "billing.example.org"
STREAM = f"/{SERVICE}/SayHelloStream"

README_POLICY: dict[str, Any] = {
    "name": "greeter",
    # the bundles that may vouch for certificates without a SPIFFE ID
    "allow_non_spiffe_peers": ["example.org", "legacy.example"],
    "deny": [{"name": "no-legacy", "methods": ["*"], "trust_domains": ["legacy.example"]}],
    "allow": [
        {"name": "frontend-greets", "methods": [SAY_HELLO], "spiffe_ids": [FRONTEND_ID]},
        {"name": "partners", "methods": [STREAM], "trust_domains": ["other.org"]},
        {
            "name": "batch",
            "methods": ["*"],
            "spiffe_id_patterns": ["spiffe://example.org/ns/*/sa/batch"],
            "subject_patterns": [CORP],
        },
        {"name": "billing", "methods": ["*"], "dns_names": [BILLING]},
    ],
}

# The partner's batch, let in by a rule that says which CA may vouch for that subject.
PARTNER_POLICY: dict[str, Any] = {
    "name": "greeter-partner",
    "allow_non_spiffe_peers": ["example.org", "other.org"],
    "allow": [
        {"name": "partner-batch", "methods": ["*"], "subject_patterns": [CORP], "vouched_by": ["other.org"]},
        {"name": "billing", "methods": ["*"], "dns_names": [BILLING], "vouched_by": ["example.org"]},
    ],
}


@dataclass(frozen=True)
class Client:
    """A client certificate chain and its key, in PEM."""

    chain_pem: bytes
    key_pem: bytes


def client(authority: Authority, subject: str, *, spiffe_id: str | None = None, dns: tuple[str, ...] = ()) -> Client:
    """A client certificate ``authority`` signed with the subject and SANs it chose (a CA may write any)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)] if spiffe_id else []
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.private_key.public_key()), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(authority.private_key, hashes.SHA256())
    if spiffe_id:  # a real X509-SVID: meshid's own rules accept it
        assert meshid.X509Svid.from_parts([cert], key).spiffe_id == meshid.SpiffeId.parse(spiffe_id)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Client(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@pytest.fixture(scope="module")
def legacy_ca() -> Authority:
    return Authority.create_root("legacy.example")


@pytest.fixture(scope="module")
def federation(ca: Authority, other_ca: Authority, legacy_ca: Authority) -> meshid.BundleSet:
    return meshid.BundleSet.of(*(meshid.TrustBundle(a.trust_domain, a.roots) for a in (ca, other_ca, legacy_ca)))


@pytest.fixture(scope="module")
def greeter_source(ca: Authority, federation: meshid.BundleSet) -> meshid.StaticSource:
    return meshid.StaticSource(ca.issue_svid(SERVER_ID, dns_names=["localhost"]), federation)


@pytest.fixture(scope="module")
def clients(ca: Authority, other_ca: Authority, legacy_ca: Authority) -> dict[str, Client]:
    ours = ca.issue_svid("spiffe://example.org/ns/prod/sa/batch")
    return {
        "partner-batch-svid": client(other_ca, CORP, spiffe_id="spiffe://other.org/ns/prod/sa/batch"),
        "our-batch-svid": Client(ours.chain_pem(), ours.key_pem()),
        "our-svid-with-corp-subject": client(ca, CORP, spiffe_id="spiffe://example.org/jobs/nightly"),
        "our-corp-subject": client(ca, CORP),
        "our-billing-dns": client(ca, "CN=billing", dns=(BILLING,)),
        "partner-corp-subject": client(other_ca, CORP),
        "partner-billing-dns": client(other_ca, "CN=billing", dns=(BILLING,)),
        "legacy-corp-subject": client(legacy_ca, CORP),
        "legacy-billing-dns": client(legacy_ca, "CN=billing", dns=(BILLING,)),
        "legacy-svid": client(legacy_ca, CORP, spiffe_id="spiffe://legacy.example/ns/prod/sa/batch"),
    }


def outcome(port: int, who: Client, bundles: meshid.BundleSet, method: str = SAY_HELLO) -> str:
    """One real mTLS call: "OK" or the status code's name."""
    roots = bundles[meshid.TrustDomain.parse("example.org")].to_pem()
    creds = grpc.ssl_channel_credentials(roots, who.key_pem, who.chain_pem)
    pin = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=pin) as channel:
        try:
            if method == STREAM:
                list(stub(channel).SayHelloStream(hello(), timeout=10))
            else:
                stub(channel).SayHello(hello(), timeout=10)
        except grpc.RpcError as err:
            return err.code().name
    return "OK"


@pytest.fixture
def audit_rules(caplog: pytest.LogCaptureFixture) -> Iterator[list[str | None]]:
    """The rule of every audited decision, in order."""
    caplog.set_level(logging.INFO, logger="meshid.audit")
    rules: list[str | None] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            rules.append(record.meshid_audit["rule"])  # type: ignore[attr-defined]

    handler = Collect()
    logging.getLogger("meshid.audit").addHandler(handler)
    try:
        yield rules
    finally:
        logging.getLogger("meshid.audit").removeHandler(handler)


# (client, method, outcome, deciding rule)
README_ROWS = [
    # the attack: a partner's SVID whose subject its CA wrote to be the README's batch subject
    ("partner-batch-svid", SAY_HELLO, "PERMISSION_DENIED", None),
    # trust_domains rules are not subject rules: the partner keeps what it was given
    ("partner-batch-svid", STREAM, "OK", "partners"),
    # positive controls: this trust domain's batch, by SPIFFE ID pattern and by subject
    ("our-batch-svid", SAY_HELLO, "OK", "batch"),
    ("our-svid-with-corp-subject", SAY_HELLO, "OK", "batch"),
    ("our-corp-subject", SAY_HELLO, "OK", "batch"),
    ("our-billing-dns", SAY_HELLO, "OK", "billing"),
    # certificates without a SPIFFE ID from a partner whose bundle may not vouch for them
    ("partner-corp-subject", SAY_HELLO, "UNAUTHENTICATED", None),
    ("partner-billing-dns", SAY_HELLO, "UNAUTHENTICATED", None),
    # a deny on trust_domains covers the certificates without a SPIFFE ID that domain vouched
    # for, though an allow rule names their subject or DNS SAN
    ("legacy-corp-subject", SAY_HELLO, "PERMISSION_DENIED", "no-legacy"),
    ("legacy-billing-dns", SAY_HELLO, "PERMISSION_DENIED", "no-legacy"),
    ("legacy-svid", SAY_HELLO, "PERMISSION_DENIED", "no-legacy"),
]


@pytest.fixture(scope="module")
def readme_server(greeter_source: meshid.StaticSource) -> Iterator[int]:
    interceptor = meshid.AuthorizationInterceptor(
        meshid.AuthorizationPolicy.from_dict(README_POLICY), source=greeter_source
    )
    with sync_server(greeter_source, interceptor) as port:
        yield port


@pytest.mark.parametrize(
    ("who", "method", "expected", "rule"), README_ROWS, ids=[f"{r[0]}-{r[1]}" for r in README_ROWS]
)
def test_readme_policy_scopes_subject_dns_and_deny_rules_to_trust_domains(
    readme_server, clients, federation, audit_rules, who, method, expected, rule
) -> None:
    assert outcome(readme_server, clients[who], federation, method) == expected
    assert audit_rules[-1:] == [rule]


PARTNER_ROWS = [
    # vouched_by names the partner: its batch is let in by subject, and this domain's is not
    ("partner-batch-svid", "OK", "partner-batch"),
    ("partner-corp-subject", "OK", "partner-batch"),
    ("our-svid-with-corp-subject", "PERMISSION_DENIED", None),
    ("our-corp-subject", "PERMISSION_DENIED", None),
    # vouched_by names this domain: the partner may vouch for certificates without a SPIFFE ID,
    # but not for this DNS name
    ("our-billing-dns", "OK", "billing"),
    ("partner-billing-dns", "PERMISSION_DENIED", None),
]


@pytest.fixture(scope="module")
def partner_server(greeter_source: meshid.StaticSource) -> Iterator[int]:
    interceptor = meshid.AuthorizationInterceptor(
        meshid.AuthorizationPolicy.from_dict(PARTNER_POLICY), source=greeter_source
    )
    with sync_server(greeter_source, interceptor) as port:
        yield port


@pytest.mark.parametrize(("who", "expected", "rule"), PARTNER_ROWS, ids=[r[0] for r in PARTNER_ROWS])
def test_vouched_by_names_who_may_vouch_for_a_rules_subjects_and_dns_names(
    partner_server, clients, federation, audit_rules, who, expected, rule
) -> None:
    assert outcome(partner_server, clients[who], federation) == expected
    assert audit_rules[-1:] == [rule]


class _SwitchingSource:
    """The interceptor's source: the server's SVID (and so its trust domain) can be swapped."""

    def __init__(self, svid: meshid.X509Svid, bundles: meshid.BundleSet) -> None:
        self.svid, self._bundles = svid, bundles
        self._callbacks: list[Any] = []

    def get_svid(self) -> meshid.X509Svid:
        return self.svid

    def get_bundles(self) -> meshid.BundleSet:
        return self._bundles

    def subscribe(self, callback: Any) -> Any:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def switch(self, svid: meshid.X509Svid) -> None:
        """A new SVID, announced to subscribers as every source does."""
        self.svid = svid
        for callback in list(self._callbacks):
            callback()


def test_a_decision_is_not_remembered_across_a_change_of_the_servers_trust_domain(
    ca, other_ca, greeter_source, federation, clients
) -> None:
    # Default scope (no vouched_by, no list): the server's own trust domain, read again whenever
    # the source announces a change.
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "batch", "methods": ["*"], "subject_patterns": [CORP]}]}
    )
    own = _SwitchingSource(ca.issue_svid(SERVER_ID), federation)
    interceptor = meshid.AuthorizationInterceptor(policy, source=own)
    with sync_server(greeter_source, interceptor) as port:
        before = [outcome(port, clients[w], federation) for w in ("partner-batch-svid", "our-svid-with-corp-subject")]
        own.switch(other_ca.issue_svid("spiffe://other.org/ns/prod/sa/greeter"))
        after = [outcome(port, clients[w], federation) for w in ("partner-batch-svid", "our-svid-with-corp-subject")]
    assert before == ["PERMISSION_DENIED", "OK"]
    assert after == ["OK", "PERMISSION_DENIED"]


def test_policy_check_scopes_subject_rules_as_the_server_does(tmp_path, clients) -> None:
    ours_only = {"allow": [{"name": "batch", "methods": ["*"], "subject_patterns": [CORP]}]}
    (tmp_path / "ours.json").write_text(json.dumps(ours_only))
    (tmp_path / "readme.json").write_text(json.dumps(README_POLICY))
    (tmp_path / "partner.pem").write_bytes(clients["partner-batch-svid"].chain_pem)

    def check(policy: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "meshid.cli", "policy", "check", str(tmp_path / policy), *args]
        command += ["--cert", str(tmp_path / "partner.pem"), "--method", SAY_HELLO]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    out = check("ours.json", "--trust-domain", "example.org")
    assert (out.returncode, out.stdout.splitlines()) == (
        1,
        [
            f"DENY spiffe://other.org/ns/prod/sa/batch {SAY_HELLO}: no rule allows it (default deny)",
            "subject and DNS rules scoped to: example.org (--trust-domain)",
        ],
    ), out.stderr
    out = check("readme.json")
    assert out.returncode == 1, out.stderr
    assert "scoped to: example.org, legacy.example (the policy's allow_non_spiffe_peers)" in out.stdout
    # Without --trust-domain the caller's own scopes it, and the output says so.
    out = check("ours.json")
    assert out.returncode == 0, out.stderr
    assert "scoped to: other.org (the caller's trust domain; pass --trust-domain to give the server's)" in out.stdout


# DNS names are compared without case (RFC 4343): a CA may write a SAN in any case it likes, and
# a deny rule must still meet it. The policy keeps its names in lowercase.
CASE_POLICY: dict[str, Any] = {
    "name": "greeter-dns-case",
    "allow_non_spiffe_peers": ["example.org"],
    "deny": [{"name": "block-host", "methods": ["*"], "dns_names": ["blocked.example.org"]}],
    "allow": [
        {"name": "corp", "methods": ["*"], "subject_patterns": ["CN=host-.*"]},
        {"name": "billing", "methods": ["*"], "dns_names": [BILLING]},
    ],
}
CASE_ROWS = [
    ("blocked.example.org", "CN=host-a", "PERMISSION_DENIED", "block-host"),
    ("Blocked.Example.ORG", "CN=host-b", "PERMISSION_DENIED", "block-host"),
    ("BILLING.example.org", "CN=billing", "OK", "billing"),
]


@pytest.mark.parametrize(("san", "subject", "expected", "rule"), CASE_ROWS, ids=[r[0] for r in CASE_ROWS])
def test_dns_rules_meet_a_dns_name_written_in_any_case(
    ca, greeter_source, federation, audit_rules, san, subject, expected, rule
) -> None:
    interceptor = meshid.AuthorizationInterceptor(
        meshid.AuthorizationPolicy.from_dict(CASE_POLICY), source=greeter_source
    )
    with sync_server(greeter_source, interceptor) as port:
        assert outcome(port, client(ca, subject, dns=(san,)), federation) == expected
    assert audit_rules[-1:] == [rule]
