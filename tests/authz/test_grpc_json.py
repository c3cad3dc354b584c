"""Table-driven tests for gRPC authorization policies (gRFC A43 and A59) read by meshid.

The expected decisions are the ones grpc-go (``authz/rbac_translator.go`` with
``internal/xds/rbac/matchers.go``) and gRPC core (``rbac_translator.cc``) make; peers are
built from real certificates signed by meshid's own CA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshid.authz.grpc_json import collect_headers
from meshid.authz.policy import AuditOptions, AuthorizationPolicy
from meshid.ca import Authority
from meshid.errors import InvalidPolicyError
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId, TrustDomain

ORIGIN = "greeter-authz.json"
LOCAL = TrustDomain.parse("example.org")  # the server's own trust domain, as the interceptor passes it
WEB = "spiffe://example.org/ns/prod/sa/web"
ADMIN = "spiffe://example.org/ns/prod/sa/admin"
SNEAKY = "spiffe://example.org/ns/dev/sa/sneaky"
OTHER_WEB = "spiffe://other.org/sa/web"
DNS_ONLY_SUBJECT = "CN=dns-only,O=Example"
LEGACY_SUBJECT = "CN=legacy-client,O=Example"
GET = "/pkg.Store/Get"


# --- peers from real certificates ---------------------------------------------------------


def _identity(cert: x509.Certificate, authority: Authority) -> PeerIdentity:
    san: Sequence[x509.GeneralName] = ()
    with contextlib.suppress(x509.ExtensionNotFound):
        san = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    uris = tuple(n.value for n in san if isinstance(n, x509.UniformResourceIdentifier))
    dns = tuple(n.value for n in san if isinstance(n, x509.DNSName))
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return PeerIdentity(
        spiffe_id=SpiffeId.parse(uris[0]) if uris else None,
        trust_domain=authority.trust_domain,
        subject=cert.subject.rfc4514_string(),
        common_name=str(cns[0].value) if cns else None,
        thumbprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        certificate=cert,
        not_after=cert.not_valid_after_utc,
        uri_sans=uris,
        dns_sans=dns,
    )


def _non_spiffe_leaf(authority: Authority, common_name: str, dns_names: Sequence[str] = ()) -> x509.Certificate:
    """A client certificate without a URI SAN, signed by ``authority`` (what a non-mesh client carries)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns_names]), critical=False
        )
    return builder.sign(authority.private_key, hashes.SHA256())


@pytest.fixture(scope="module")
def peers(ca: Authority, other_ca: Authority) -> dict[str, PeerIdentity]:
    def svid(authority: Authority, spiffe_id: str, **kw: Any) -> PeerIdentity:
        issued = authority.issue_svid(spiffe_id, **kw)
        peer = _identity(issued.leaf, authority)
        assert peer.thumbprint == issued.thumbprint and peer.not_after == issued.not_after
        return peer

    found = {
        "web": svid(ca, WEB),
        "admin": svid(ca, ADMIN),
        # A SPIFFE peer that also carries the DNS SAN an admin policy names: it must match by URI only.
        "sneaky": svid(ca, SNEAKY, dns_names=["admin.example.org"]),
        "other-web": svid(other_ca, OTHER_WEB),
        "dns-only": _identity(_non_spiffe_leaf(ca, "dns-only", ["admin.example.org", "api.example.org"]), ca),
        "subject-only": _identity(_non_spiffe_leaf(ca, "legacy-client"), ca),
        # The same names, written by a federated partner's CA (which may write any name it likes).
        "partner-dns-only": _identity(
            _non_spiffe_leaf(other_ca, "dns-only", ["admin.example.org", "api.example.org"]), other_ca
        ),
        "partner-subject-only": _identity(_non_spiffe_leaf(other_ca, "legacy-client"), other_ca),
    }
    assert found["sneaky"].uri_sans == (SNEAKY,) and "admin.example.org" in found["sneaky"].dns_sans
    assert found["dns-only"].uri_sans == () and found["dns-only"].subject == DNS_ONLY_SUBJECT
    assert found["subject-only"].dns_sans == () and found["subject-only"].subject == LEGACY_SUBJECT
    return found


# --- policies -------------------------------------------------------------------------------


def _rule(name: str = "r", principals: Any = None, paths: Any = None, **request: Any) -> Any:
    rule: dict[str, Any] = {"name": name}
    if principals is not None:
        rule["source"] = {"principals": principals}
    req = dict(request)
    if paths is not None:
        req["paths"] = paths
    if req:
        rule["request"] = req
    return rule


def _policy(*allow: Any, deny: Sequence[Any] = ()) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "greeter", "allow_rules": list(allow)}
    if deny:
        data["deny_rules"] = list(deny)
    return data


def _headers(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "values": list(values)}


H_ENV = [_headers("x-env", "prod", "staging*")]
H_ENV_AND_TEAM = [_headers("x-env", "prod"), _headers("x-team", "*")]

# (id, policy, peer, method, metadata, allowed, matched rule)
DECISIONS = [
    # principals: exact, prefix, suffix, presence
    ("principal-exact", _policy(_rule("web", [WEB])), "web", GET, [], True, "web"),
    ("principal-exact-other-peer", _policy(_rule("web", [WEB])), "admin", GET, [], False, None),
    ("principal-prefix", _policy(_rule("prod", ["spiffe://example.org/ns/prod/*"])), "web", GET, [], True, "prod"),
    (
        "principal-prefix-miss",
        _policy(_rule("prod", ["spiffe://example.org/ns/prod/*"])),
        "sneaky",
        GET,
        [],
        False,
        None,
    ),
    ("principal-suffix", _policy(_rule("webs", ["*/sa/web"])), "other-web", GET, [], True, "webs"),
    ("principal-suffix-miss", _policy(_rule("webs", ["*/sa/web"])), "admin", GET, [], False, None),
    ("principal-any-spiffe", _policy(_rule("anyone", ["*"])), "admin", GET, [], True, "anyone"),
    ("principal-any-subject-only", _policy(_rule("anyone", ["*"])), "subject-only", GET, [], True, "anyone"),
    ("principals-or", _policy(_rule("two", [ADMIN, WEB])), "web", GET, [], True, "two"),
    # principal sources: URI SANs, else DNS SANs, else subject (the authorization-bypass fix)
    ("dns-principal-no-uri", _policy(_rule("dns", ["admin.example.org"])), "dns-only", GET, [], True, "dns"),
    ("dns-principal-second-san", _policy(_rule("dns", ["api.*"])), "dns-only", GET, [], True, "dns"),
    ("dns-principal-ignored-with-uri", _policy(_rule("dns", ["admin.example.org"])), "sneaky", GET, [], False, None),
    ("dns-suffix-ignored-with-uri", _policy(_rule("dns", ["*.example.org"])), "sneaky", GET, [], False, None),
    ("subject-principal-no-sans", _policy(_rule("legacy", [LEGACY_SUBJECT])), "subject-only", GET, [], True, "legacy"),
    ("subject-ignored-with-dns", _policy(_rule("subj", [DNS_ONLY_SUBJECT])), "dns-only", GET, [], False, None),
    ("subject-ignored-with-uri", _policy(_rule("subj", ["CN=web,O=example.org"])), "web", GET, [], False, None),
    ("uri-principal-not-dns-peer", _policy(_rule("uri", ["spiffe://*"])), "dns-only", GET, [], False, None),
    # DNS SANs and subjects count only when a trust domain in scope vouched for them (by
    # default the server's own): a partner's CA can write the same names
    ("dns-principal-partner", _policy(_rule("dns", ["admin.example.org"])), "partner-dns-only", GET, [], False, None),
    ("dns-prefix-partner", _policy(_rule("dns", ["api.*"])), "partner-dns-only", GET, [], False, None),
    (
        "subject-principal-partner",
        _policy(_rule("legacy", [LEGACY_SUBJECT])),
        "partner-subject-only",
        GET,
        [],
        False,
        None,
    ),
    ("principal-any-partner-subject", _policy(_rule("anyone", ["*"])), "partner-subject-only", GET, [], False, None),
    ("absent-source-partner", _policy(_rule("everyone")), "partner-dns-only", GET, [], True, "everyone"),
    # paths: exact, prefix, suffix, presence
    ("path-exact", _policy(_rule("get", paths=[GET])), "web", GET, [], True, "get"),
    ("path-exact-miss", _policy(_rule("get", paths=[GET])), "web", "/pkg.Store/Put", [], False, None),
    ("path-prefix", _policy(_rule("store", paths=["/pkg.Store/*"])), "web", "/pkg.Store/Put", [], True, "store"),
    ("path-prefix-miss", _policy(_rule("store", paths=["/pkg.Store/*"])), "web", "/pkg.Admin/Put", [], False, None),
    ("path-suffix", _policy(_rule("gets", paths=["*/Get"])), "web", "/other.Svc/Get", [], True, "gets"),
    ("path-suffix-miss", _policy(_rule("gets", paths=["*/Get"])), "web", "/pkg.Store/GetAll", [], False, None),
    ("path-any", _policy(_rule("all", paths=["*"])), "web", "/x.Y/Z", [], True, "all"),
    (
        "path-literal-star-inside",
        _policy(_rule("lit", paths=["/pkg.S*e/Get"])),
        "web",
        "/pkg.Store/Get",
        [],
        False,
        None,
    ),
    ("source-and-request-both", _policy(_rule("both", [WEB], [GET])), "admin", GET, [], False, None),
    # headers
    ("header-match", _policy(_rule("env", headers=H_ENV)), "web", GET, [("x-env", "prod")], True, "env"),
    ("header-mismatch", _policy(_rule("env", headers=H_ENV)), "web", GET, [("x-env", "dev")], False, None),
    ("header-missing", _policy(_rule("env", headers=H_ENV)), "web", GET, [("x-other", "prod")], False, None),
    ("header-values-or", _policy(_rule("env", headers=H_ENV)), "web", GET, [("x-env", "staging-2")], True, "env"),
    (
        "headers-and-all-present",
        _policy(_rule("both", headers=H_ENV_AND_TEAM)),
        "web",
        GET,
        [("x-env", "prod"), ("x-team", "payments")],
        True,
        "both",
    ),
    (
        "headers-and-one-missing",
        _policy(_rule("both", headers=H_ENV_AND_TEAM)),
        "web",
        GET,
        [("x-env", "prod")],
        False,
        None,
    ),
    (
        "header-repeated-not-each-value",
        _policy(_rule("env", headers=[_headers("x-env", "prod")])),
        "web",
        GET,
        [("x-env", "prod"), ("x-env", "dev")],
        False,
        None,
    ),
    (
        "header-repeated-joined-with-comma",
        _policy(_rule("env", headers=[_headers("x-env", "prod,dev")])),
        "web",
        GET,
        [("x-env", "prod"), ("x-env", "dev")],
        True,
        "env",
    ),
    (
        "header-key-lowercased",
        _policy(_rule("env", headers=[_headers("X-Env", "prod")])),
        "web",
        GET,
        [("x-env", "prod")],
        True,
        "env",
    ),
    (
        "header-binary-presence",
        _policy(_rule("trace", headers=[_headers("x-trace-bin", "*")])),
        "web",
        GET,
        [("x-trace-bin", b"\x00\x01\xff")],
        True,
        "trace",
    ),
    (
        "header-with-path-and-principal",
        _policy(_rule("all", [WEB], [GET], headers=H_ENV)),
        "web",
        GET,
        [("x-env", "prod")],
        True,
        "all",
    ),
    # deny before allow, default deny, absent source
    (
        "deny-before-allow",
        _policy(_rule("everyone"), deny=[_rule("no-sneaky", [SNEAKY])]),
        "sneaky",
        GET,
        [],
        False,
        "no-sneaky",
    ),
    (
        "deny-not-matching",
        _policy(_rule("everyone"), deny=[_rule("no-sneaky", [SNEAKY])]),
        "web",
        GET,
        [],
        True,
        "everyone",
    ),
    (
        "deny-path-beats-admin",
        _policy(_rule("admin", [ADMIN]), deny=[_rule("no-secrets", paths=["*/Secret"])]),
        "admin",
        "/pkg.Store/Secret",
        [],
        False,
        "no-secrets",
    ),
    (
        "deny-header",
        _policy(_rule("everyone"), deny=[_rule("no-debug", headers=[_headers("x-debug", "*")])]),
        "web",
        GET,
        [("x-debug", "1")],
        False,
        "no-debug",
    ),
    ("default-deny", _policy(_rule("admin", [ADMIN])), "web", GET, [], False, None),
    ("absent-source-any-peer", _policy(_rule("get", paths=[GET])), "subject-only", GET, [], True, "get"),
    ("absent-source-other-td", _policy(_rule("everyone")), "other-web", "/a.B/C", [], True, "everyone"),
    ("empty-principals-any-peer", _policy(_rule("everyone", [])), "dns-only", GET, [], True, "everyone"),
    (
        "empty-request-any-call",
        _policy({"name": "r", "source": {"principals": [WEB]}, "request": {}}),
        "web",
        "/a.B/C",
        [],
        True,
        "r",
    ),
]


@pytest.mark.parametrize(
    ("policy", "peer", "method", "metadata", "allowed", "rule"),
    [pytest.param(*case[1:], id=case[0]) for case in DECISIONS],
)
def test_decision(
    peers: dict[str, PeerIdentity],
    policy: dict[str, Any],
    peer: str,
    method: str,
    metadata: list[tuple[str, str | bytes]],
    allowed: bool,
    rule: str | None,
) -> None:
    authz = AuthorizationPolicy.from_dict(policy, origin=ORIGIN)
    if peers[peer].spiffe_id is None:
        # gRPC matches DNS SANs and subjects of any verified certificate; meshid admits such a
        # peer only when the operator opts in (a gRPC-format policy cannot say so itself).
        authz = dataclasses.replace(authz, allow_non_spiffe_peers=True)
    decision = authz.decide(peers[peer], method, collect_headers(metadata), local_trust_domain=LOCAL)
    assert (decision.allowed, decision.rule) == (allowed, rule), decision.reason


@pytest.mark.parametrize("peer", ["dns-only", "subject-only"])
def test_non_spiffe_peer_refused_unless_admitted(peers: dict[str, PeerIdentity], peer: str) -> None:
    policy = AuthorizationPolicy.from_dict(_policy(_rule("dns", ["admin.example.org", LEGACY_SUBJECT])), origin=ORIGIN)
    assert not policy.allow_non_spiffe_peers
    refused = policy.decide(peers[peer], GET, {}, local_trust_domain=LOCAL)
    assert not refused.allowed and "no SPIFFE ID" in refused.reason
    admitted = dataclasses.replace(policy, allow_non_spiffe_peers=True)
    assert admitted.decide(peers[peer], GET, {}, local_trust_domain=LOCAL).rule == "dns"


def test_principals_on_dns_sans_and_subjects_use_the_policys_scope(peers: dict[str, PeerIdentity]) -> None:
    doc = _policy(_rule("dns", ["admin.example.org"]), _rule("legacy", [LEGACY_SUBJECT]), _rule("uri", ["*/sa/web"]))
    # A gRPC authz file has no field for a rule's scope: the loader's allow_non_spiffe_peers gives it.
    partners = AuthorizationPolicy.from_dict(doc, origin=ORIGIN, allow_non_spiffe_peers=["other.org"])
    assert partners.decide(peers["partner-dns-only"], GET, {}, local_trust_domain=LOCAL).rule == "dns"
    assert partners.decide(peers["partner-subject-only"], GET, {}, local_trust_domain=LOCAL).rule == "legacy"
    assert not partners.decide(peers["dns-only"], GET, {}, local_trust_domain=LOCAL).allowed
    # The server's trust domain unknown: names matched against DNS SANs or subjects match nobody;
    # URI SANs (SPIFFE IDs, verified by their own trust domain's bundle) still count.
    ours = AuthorizationPolicy.from_dict(doc, origin=ORIGIN, allow_non_spiffe_peers=True)
    assert not ours.decide(peers["dns-only"], GET, {}, local_trust_domain=None).allowed
    assert not ours.decide(peers["subject-only"], GET, {}, local_trust_domain=None).allowed
    assert ours.decide(peers["other-web"], GET, {}, local_trust_domain=None).rule == "uri"


# --- invalid policies -------------------------------------------------------------------------

P = f"policy {ORIGIN}"
R = f"{P}: allow rule 'r'"

# (id, policy, message fragment)
INVALID = [
    ("missing-name", {"allow_rules": [_rule()]}, f"{P}: 'name' is required"),
    ("empty-name", {"name": "", "allow_rules": [_rule()]}, f"{P}: 'name' is required"),
    ("name-not-string", {"name": 123, "allow_rules": [_rule()]}, f"{P}: 'name' must be a string, not a number"),
    ("missing-allow-rules", {"name": "p", "deny_rules": [_rule()]}, f"{P}: 'allow_rules' is required"),
    ("null-allow-rules", {"name": "p", "allow_rules": None}, f"{P}: 'allow_rules' is required"),
    ("empty-allow-rules", {"name": "p", "allow_rules": []}, f"{P}: 'allow_rules' is empty"),
    ("allow-rules-not-list", {"name": "p", "allow_rules": {"name": "r"}}, f"{P}: 'allow_rules' must be a list"),
    ("deny-rules-not-list", _policy(_rule()) | {"deny_rules": "r"}, f"{P}: 'deny_rules' must be a list"),
    ("unknown-top-level", _policy(_rule()) | {"allow": []}, f"{P}: unknown field(s) 'allow'"),
    (
        "meshid-extension-refused",
        _policy(_rule()) | {"meshid_allow_non_spiffe_peers": True},
        f"{P}: unknown field(s) 'meshid_allow_non_spiffe_peers'",
    ),
    ("rule-not-object", _policy("r"), f"{P}: allow rule #1: each entry of 'allow_rules' must be an object"),
    ("rule-missing-name", _policy({"source": {}}), f"{P}: allow rule #1: 'name' is required"),
    ("deny-rule-missing-name", _policy(_rule(), deny=[{}]), f"{P}: deny rule #1: 'name' is required"),
    ("rule-name-not-string", _policy({"name": ["r"]}), f"{P}: allow rule #1: 'name' must be a string, not a list"),
    ("rule-duplicate-name", _policy(_rule("a"), _rule("a")), f"{P}: allow rule 'a': the name is used by another rule"),
    ("rule-unknown-field", _policy({"name": "r", "principals": [WEB]}), f"{R}: unknown field(s) 'principals'"),
    ("source-not-object", _policy({"name": "r", "source": [WEB]}), f"{R}: 'source' must be an object"),
    ("source-unknown-field", _policy({"name": "r", "source": {"ids": [WEB]}}), f"{R}: source: unknown field(s) 'ids'"),
    ("principals-not-list", _policy(_rule("r", WEB)), f"{R}: source.principals must be a list of strings"),
    ("principal-not-string", _policy(_rule("r", [WEB, 7])), f"{R}: source.principals[1] must be a string"),
    ("principal-star-both-ends", _policy(_rule("r", ["*admin*"])), f"{R}: principal '*admin*': '*' at both ends"),
    ("path-double-star", _policy(_rule("r", paths=["**"])), f"{R}: path '**': '*' at both ends"),
    ("request-not-object", _policy({"name": "r", "request": "/a.B/C"}), f"{R}: 'request' must be an object"),
    ("request-unknown-field", _policy(_rule("r", methods=["*"])), f"{R}: request: unknown field(s) 'methods'"),
    ("paths-not-list", _policy(_rule("r", paths="/a.B/C")), f"{R}: request.paths must be a list of strings"),
    ("headers-not-list", _policy(_rule("r", headers={"key": "a"})), f"{R}: request.headers must be a list"),
    (
        "header-not-object",
        _policy(_rule("r", headers=["x-env"])),
        f"{R}: request.headers[0]: the header must be an object",
    ),
    (
        "header-missing-key",
        _policy(_rule("r", headers=[{"values": ["a"]}])),
        f"{R}: request.headers[0]: 'key' is required",
    ),
    (
        "header-empty-key",
        _policy(_rule("r", headers=[_headers("", "a")])),
        f"{R}: request.headers[0]: 'key' is required",
    ),
    (
        "header-pseudo",
        _policy(_rule("r", headers=[_headers(":path", "/a.B/C")])),
        "request.headers[0]: header ':path' cannot be matched",
    ),
    (
        "header-host",
        _policy(_rule("r", headers=[_headers("Host", "a")])),
        "request.headers[0]: header 'host' cannot be matched",
    ),
    (
        "header-grpc-prefixed",
        _policy(_rule("r", headers=[_headers("Grpc-Timeout", "1S")])),
        "header 'grpc-timeout' cannot be matched",
    ),
    (
        "header-hop-by-hop",
        _policy(_rule("r", headers=[_headers("connection", "close")])),
        "header 'connection' cannot be matched",
    ),
    (
        "header-te",
        _policy(_rule("r", headers=[_headers("x", "a"), _headers("te", "trailers")])),
        "request.headers[1]: header 'te'",
    ),
    (
        "header-missing-values",
        _policy(_rule("r", headers=[{"key": "x-env"}])),
        f"{R}: request.headers[0]: 'values' is required",
    ),
    ("header-empty-values", _policy(_rule("r", headers=[_headers("x-env")])), "request.headers[0]: 'values' is empty"),
    (
        "header-values-not-list",
        _policy(_rule("r", headers=[{"key": "x", "values": "a"}])),
        "request.headers[0]: 'values' must be a list",
    ),
    (
        "header-unknown-field",
        _policy(_rule("r", headers=[{"key": "x", "values": ["a"], "op": "eq"}])),
        "unknown field(s) 'op'",
    ),
    (
        "audit-not-object",
        _policy(_rule()) | {"audit_logging_options": "ON_DENY"},
        f"{P}: 'audit_logging_options' must be an object",
    ),
    (
        "audit-bad-condition",
        _policy(_rule()) | {"audit_logging_options": {"audit_condition": "ALWAYS"}},
        f"{P}: audit_logging_options: audit_condition 'ALWAYS' is not one of NONE, ON_DENY, ON_ALLOW, ON_DENY_AND_",
    ),
    (
        "audit-condition-case",
        _policy(_rule()) | {"audit_logging_options": {"audit_condition": "on_deny"}},
        "audit_condition 'on_deny' is not one of",
    ),
    (
        "audit-unknown-logger",
        _policy(_rule()) | {"audit_logging_options": {"audit_loggers": [{"name": "splunk"}]}},
        f"{P}: audit_logging_options: audit_loggers[0]: audit logger 'splunk' is not supported",
    ),
    (
        "audit-unknown-logger-not-optional",
        _policy(_rule())
        | {
            "audit_logging_options": {"audit_loggers": [{"name": "stdout_logger"}, {"name": "x", "is_optional": False}]}
        },
        "audit_loggers[1]: audit logger 'x' is not supported",
    ),
    (
        "audit-logger-missing-name",
        _policy(_rule()) | {"audit_logging_options": {"audit_loggers": [{"config": {}}]}},
        "audit_loggers[0]: 'name' is required",
    ),
    (
        "audit-logger-optional-not-bool",
        _policy(_rule())
        | {"audit_logging_options": {"audit_loggers": [{"name": "stdout_logger", "is_optional": "yes"}]}},
        "audit_loggers[0]: 'is_optional' must be true or false",
    ),
    (
        "audit-logger-config-not-object",
        _policy(_rule()) | {"audit_logging_options": {"audit_loggers": [{"name": "stdout_logger", "config": "v"}]}},
        "audit_loggers[0]: 'config' must be an object",
    ),
    (
        "audit-logger-unknown-field",
        _policy(_rule()) | {"audit_logging_options": {"audit_loggers": [{"name": "stdout_logger", "optional": True}]}},
        "audit_loggers[0]: unknown field(s) 'optional'",
    ),
    (
        "audit-unknown-field",
        _policy(_rule()) | {"audit_logging_options": {"audit_logger": [{"name": "stdout_logger"}]}},
        "audit_logging_options: unknown field(s) 'audit_logger'",
    ),
]


@pytest.mark.parametrize(("policy", "message"), [pytest.param(*case[1:], id=case[0]) for case in INVALID])
def test_invalid_policy_rejected(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPolicyError) as caught:
        AuthorizationPolicy.from_dict(policy, origin=ORIGIN)
    assert message in str(caught.value)
    assert str(caught.value).startswith(P)


# --- what a valid policy carries ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(None, AuditOptions(None, ()), id="absent-every-decision-to-meshid-audit"),
        pytest.param({}, AuditOptions("NONE", ()), id="empty"),
        pytest.param({"audit_condition": ""}, AuditOptions("NONE", ()), id="empty-condition-is-none"),
        pytest.param(
            {"audit_condition": "ON_DENY", "audit_loggers": [{"name": "stdout_logger"}]},
            AuditOptions("ON_DENY", ("stdout_logger",)),
            id="on-deny-stdout",
        ),
        pytest.param({"audit_condition": "ON_ALLOW"}, AuditOptions("ON_ALLOW", ()), id="on-allow"),
        pytest.param(
            {
                "audit_condition": "ON_DENY_AND_ALLOW",
                "audit_loggers": [
                    {"name": "splunk", "config": {"url": "x"}, "is_optional": True},
                    {"name": "stdout_logger", "config": {"ignored": 1}, "is_optional": False},
                ],
            },
            AuditOptions("ON_DENY_AND_ALLOW", ("stdout_logger",)),
            id="optional-unknown-skipped",
        ),
    ],
)
def test_audit_options(options: dict[str, Any] | None, expected: AuditOptions) -> None:
    data = _policy(_rule())
    if options is not None:
        data["audit_logging_options"] = options
    assert AuthorizationPolicy.from_dict(data, origin=ORIGIN).audit == expected


def test_policy_fields() -> None:
    policy = AuthorizationPolicy.from_dict(
        {"name": "greeter", "deny_rules": [], "allow_rules": [_rule("a"), _rule("b", [WEB])]}, origin=ORIGIN
    )
    assert policy.name == "greeter"
    assert [r.name for r in policy.rules] == ["a", "b"]
    assert not policy.allow_non_spiffe_peers and not policy.require_pq_key_exchange
    assert not policy.uses_headers


def test_nulls_count_as_absent(peers: dict[str, PeerIdentity]) -> None:
    policy = AuthorizationPolicy.from_dict(
        {
            "name": "greeter",
            "deny_rules": None,
            "audit_logging_options": None,
            "allow_rules": [{"name": "r", "source": None, "request": {"paths": None, "headers": None}}],
        },
        origin=ORIGIN,
    )
    assert policy.decide(peers["web"], "/a.B/C", {}).allowed


def test_same_name_in_deny_and_allow_is_fine() -> None:
    policy = AuthorizationPolicy.from_dict(_policy(_rule("x"), deny=[_rule("x", [SNEAKY])]), origin=ORIGIN)
    assert [r.action for r in policy.rules] == ["deny", "allow"]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        pytest.param([], {}, id="empty"),
        pytest.param([("x-env", "prod")], {"x-env": "prod"}, id="one"),
        pytest.param(
            [("x-env", "a"), ("x-team", "t"), ("x-env", "b")], {"x-env": "a,b", "x-team": "t"}, id="repeated-joined"
        ),
        pytest.param([("X-Env", "a")], {"x-env": "a"}, id="key-lowercased"),
        pytest.param([("x-id-bin", b"caf\xc3\xa9")], {"x-id-bin": "café"}, id="binary-decoded"),
        pytest.param([("x-empty", "")], {"x-empty": ""}, id="empty-value-present"),
    ],
)
def test_collect_headers(metadata: list[tuple[str, str | bytes]], expected: dict[str, str]) -> None:
    assert collect_headers(metadata) == expected
