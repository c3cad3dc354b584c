"""The native policy format: loading, precise errors, and the decisions it makes."""

from __future__ import annotations

import dataclasses
import datetime
import re

import pytest

import meshid
from meshid.ca import Authority

TD = "example.org"
LOCAL = meshid.TrustDomain.parse(TD)  # the server's own trust domain, as the interceptor passes it
METHOD = "/pkg.Svc/Do"


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority.create_root(TD)


def peer(authority: Authority, spiffe_id: str, group: str = "X25519MLKEM768") -> meshid.PeerIdentity:
    svid = authority.issue_svid(spiffe_id)
    sid = meshid.SpiffeId.parse(spiffe_id)
    return meshid.PeerIdentity(
        spiffe_id=sid,
        trust_domain=sid.trust_domain,
        subject=svid.leaf.subject.rfc4514_string(),
        common_name=spiffe_id.rsplit("/", 1)[-1],
        thumbprint=svid.thumbprint,
        certificate=svid.leaf,
        not_after=svid.not_after,
        uri_sans=(spiffe_id,),
        tls_version="TLSv1.3",
        key_exchange_group=group,
    )


def non_spiffe_peer(authority: Authority, subject_cn: str, dns: tuple[str, ...] = ()) -> meshid.PeerIdentity:
    return meshid.PeerIdentity(
        spiffe_id=None,
        trust_domain=authority.trust_domain,
        subject=f"CN={subject_cn},O=Legacy",
        common_name=subject_cn,
        thumbprint="ab" * 32,
        certificate=None,
        not_after=datetime.datetime.now(datetime.UTC),
        dns_sans=dns,
    )


def policy(*allow: dict, deny: list[dict] | None = None, **top: object) -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict({"name": "t", "allow": list(allow), "deny": deny or [], **top})


DECISIONS = [
    # (rule who, method pattern, caller, method, allowed)
    ({"spiffe_ids": ["spiffe://example.org/a"]}, "*", "spiffe://example.org/a", METHOD, True),
    ({"spiffe_ids": ["spiffe://example.org/a"]}, "*", "spiffe://example.org/a/b", METHOD, False),
    ({"spiffe_ids": ["spiffe://example.org/a"]}, "*", "spiffe://example.org/b", METHOD, False),
    (
        {"spiffe_id_patterns": ["spiffe://example.org/ns/*/sa/web"]},
        "*",
        "spiffe://example.org/ns/prod/sa/web",
        METHOD,
        True,
    ),
    # a one-segment glob must not match a longer path
    (
        {"spiffe_id_patterns": ["spiffe://example.org/ns/*/sa/web"]},
        "*",
        "spiffe://example.org/ns/prod/x/sa/web",
        METHOD,
        False,
    ),
    ({"spiffe_id_patterns": ["spiffe://example.org/ns/*"]}, "*", "spiffe://example.org/ns/prod/sa/web", METHOD, False),
    ({"spiffe_id_patterns": ["spiffe://example.org/ns/**"]}, "*", "spiffe://example.org/ns/prod/sa/web", METHOD, True),
    ({"spiffe_id_patterns": ["spiffe://example.org/ns/**"]}, "*", "spiffe://example.org/nsx/prod", METHOD, False),
    ({"spiffe_id_patterns": ["spiffe://example.org/**/web"]}, "*", "spiffe://example.org/a/b/web", METHOD, True),
    ({"spiffe_id_patterns": ["spiffe://example.org/**/web"]}, "*", "spiffe://example.org/a/b/web2", METHOD, False),
    ({"spiffe_id_patterns": ["spiffe://example.org/a.b"]}, "*", "spiffe://example.org/aXb", METHOD, False),
    ({"trust_domains": ["example.org"]}, "*", "spiffe://example.org/anything", METHOD, True),
    ({"trust_domains": ["example.com"]}, "*", "spiffe://example.org/anything", METHOD, False),
    ({"subject_patterns": ["CN=a,O=example\\.org"]}, "*", "spiffe://example.org/a", METHOD, True),
    # fully matched, not searched
    ({"subject_patterns": ["CN=a"]}, "*", "spiffe://example.org/a", METHOD, False),
    ({"any_peer": True}, "*", "spiffe://example.org/x", METHOD, True),
    ({"any_peer": True}, "/pkg.Svc/*", "spiffe://example.org/x", METHOD, True),
    ({"any_peer": True}, "/pkg.Svc/*", "spiffe://example.org/x", "/pkg.Svc2/Do", False),
    ({"any_peer": True}, "/pkg.Svc/Do", "spiffe://example.org/x", "/pkg.Svc/Do2", False),
    ({"any_peer": True}, "/pkg.Svc/Do", "spiffe://example.org/x", "/pkg.svc/do", False),
    ({"any_peer": True}, "/pkg.Svc/Do", "spiffe://example.org/x", "//pkg.Svc/Do", False),
    ({"any_peer": True}, "/pkg.Svc/*", "spiffe://example.org/x", "/pkg.Svc/", True),
]


@pytest.mark.parametrize(("who", "methods", "caller", "method", "allowed"), DECISIONS)
def test_decisions(authority, who, methods, caller, method, allowed) -> None:
    p = policy({"name": "r", "methods": [methods], **who})
    assert p.decide(peer(authority, caller), method, local_trust_domain=LOCAL).allowed is allowed


def test_thumbprint_rule_matches_only_that_certificate(authority) -> None:
    a = peer(authority, "spiffe://example.org/a")
    b = peer(authority, "spiffe://example.org/a")  # same ID, another certificate
    upper_with_colons = ":".join(a.thumbprint[i : i + 2] for i in range(0, 64, 2)).upper()
    p = policy({"name": "pin", "methods": ["*"], "thumbprints": [upper_with_colons]})
    assert p.decide(a, METHOD).allowed
    assert not p.decide(b, METHOD).allowed


def test_deny_takes_precedence_over_allow(authority) -> None:
    p = policy(
        {"name": "all", "methods": ["*"], "trust_domains": [TD]},
        deny=[{"name": "no-dev", "methods": ["*"], "spiffe_id_patterns": ["spiffe://example.org/dev/**"]}],
    )
    decision = p.decide(peer(authority, "spiffe://example.org/dev/x"), METHOD)
    assert (decision.allowed, decision.rule) == (False, "no-dev")
    decision = p.decide(peer(authority, "spiffe://example.org/prod/x"), METHOD)
    assert (decision.allowed, decision.rule) == (True, "all")


def test_default_deny_names_no_rule(authority) -> None:
    p = policy({"name": "a", "methods": ["*"], "spiffe_ids": ["spiffe://example.org/a"]})
    decision = p.decide(peer(authority, "spiffe://example.org/b"), METHOD)
    assert (decision.allowed, decision.rule) == (False, None)
    assert "default deny" in decision.reason


def test_first_matching_rule_in_file_order_decides(authority) -> None:
    p = policy(
        {"name": "first", "methods": ["*"], "spiffe_id_patterns": ["spiffe://example.org/**"]},
        {"name": "second", "methods": ["*"], "spiffe_ids": ["spiffe://example.org/a"]},
    )
    assert p.decide(peer(authority, "spiffe://example.org/a"), METHOD).rule == "first"


def test_non_spiffe_peers_need_explicit_opt_in(authority) -> None:
    legacy = non_spiffe_peer(authority, "billing", dns=("billing.corp",))
    rule = {"name": "legacy", "methods": ["*"], "subject_patterns": ["CN=billing,O=Legacy"]}
    assert not policy(rule).decide(legacy, METHOD, local_trust_domain=LOCAL).allowed
    assert policy(rule, allow_non_spiffe_peers=True).decide(legacy, METHOD, local_trust_domain=LOCAL).allowed
    by_dns = {"name": "legacy", "methods": ["*"], "dns_names": ["billing.corp"]}
    assert policy(by_dns, allow_non_spiffe_peers=True).decide(legacy, METHOD, local_trust_domain=LOCAL).allowed
    # an allow rule's trust_domains never admits a certificate without a SPIFFE ID
    by_td = {"name": "td", "methods": ["*"], "trust_domains": [TD]}
    assert not policy(by_td, allow_non_spiffe_peers=True).decide(legacy, METHOD, local_trust_domain=LOCAL).allowed


def test_require_pq_key_exchange_denies_classical_groups_with_reason(authority) -> None:
    p = policy({"name": "all", "methods": ["*"], "trust_domains": [TD]}, require_pq_key_exchange=True)
    assert p.decide(peer(authority, "spiffe://example.org/a", "X25519MLKEM768"), METHOD).allowed
    decision = p.decide(peer(authority, "spiffe://example.org/a", "X25519"), METHOD)
    assert not decision.allowed
    assert "X25519" in decision.reason and "post-quantum" in decision.reason


def test_decision_is_constant_in_exact_rules(authority) -> None:
    # 10,000 exact-ID rules: the lookup is a dict hit, and the right rule decides.
    rules = [{"name": f"r{i}", "methods": ["*"], "spiffe_ids": [f"spiffe://example.org/w{i}"]} for i in range(10_000)]
    p = policy(*rules)
    assert p.decide(peer(authority, "spiffe://example.org/w9999"), METHOD).rule == "r9999"
    assert not p.decide(peer(authority, "spiffe://example.org/w10000"), METHOD).allowed


INVALID = [
    ({"allow": "nope"}, "'allow' must be a list of rules"),
    ({"allow": [{"methods": ["*"], "any_peer": True}]}, "allow rule #1: needs a non-empty 'name'"),
    ({"allow": [{"name": "r", "any_peer": True}]}, "allow rule 'r': needs 'methods'"),
    ({"allow": [{"name": "r", "methods": [], "any_peer": True}]}, "'methods' is empty"),
    ({"allow": [{"name": "r", "methods": ["*"]}]}, "allow rule 'r': names nobody"),
    (
        {"allow": [{"name": "r", "methods": ["*"], "spiffe_id": ["spiffe://example.org/a"]}]},
        "unknown key(s) 'spiffe_id'",
    ),
    ({"allow": [{"name": "r", "methods": ["pkg.Svc/Do"], "any_peer": True}]}, "method 'pkg.Svc/Do'"),
    (
        {"allow": [{"name": "r", "methods": ["/pkg.Svc/Do*"], "any_peer": True}]},
        "'*' must stand for the whole method name",
    ),
    ({"allow": [{"name": "r", "methods": ["/pkg.*/Do"], "any_peer": True}]}, "method '/pkg.*/Do'"),
    (
        {"allow": [{"name": "r", "methods": ["*"], "spiffe_ids": ["spiffe://Example.org/a"]}]},
        "trust domain must be lowercase",
    ),
    (
        {"allow": [{"name": "r", "methods": ["*"], "spiffe_ids": ["spiffe://example.org/*"]}]},
        "put globs under 'spiffe_id_patterns'",
    ),
    (
        {"allow": [{"name": "r", "methods": ["*"], "spiffe_id_patterns": ["spiffe://*.org/a"]}]},
        "trust domain cannot be a glob",
    ),
    (
        {"allow": [{"name": "r", "methods": ["*"], "spiffe_id_patterns": ["spiffe://example.org/a*"]}]},
        "must be a whole segment",
    ),
    ({"allow": [{"name": "r", "methods": ["*"], "subject_patterns": ["CN=(a"]}]}, "not a valid regular expression"),
    ({"allow": [{"name": "r", "methods": ["*"], "subject_patterns": ["a" * 2000]}]}, "longer than 1024"),
    ({"allow": [{"name": "r", "methods": ["*"], "thumbprints": ["abc"]}]}, "not a SHA-256 hex digest"),
    ({"allow": [{"name": "r", "methods": ["*"], "trust_domains": ["Example.org"]}]}, "lowercase"),
    ({"allow": [{"name": "r", "methods": ["*"], "dns_names": ["bad name"]}]}, "not a valid host name"),
    ({"allow": [{"name": "r", "methods": ["*"], "any_peer": "yes"}]}, "'any_peer' must be true or false"),
    ({"allow": [{"name": "r", "methods": "*", "any_peer": True}]}, "'methods' must be a list of strings"),
    (
        {
            "allow": [
                {"name": "r", "methods": ["*"], "any_peer": True},
                {"name": "r", "methods": ["*"], "any_peer": True},
            ]
        },
        "the name is used by another rule",
    ),
    ({"deny": [{"name": "d", "methods": ["*"], "any_peer": True}]}, "has no allow rule"),
    (
        {"allow": [{"name": "r", "methods": ["*"], "subject_patterns": ["CN=a"], "vouched_by": "other.org"}]},
        "'vouched_by' must be a list of strings",
    ),
    (
        {"allow": [{"name": "r", "methods": ["*"], "subject_patterns": ["CN=a"], "vouched_by": []}]},
        "'vouched_by' is empty; omit it for the default scope",
    ),
    (
        {"allow": [{"name": "r", "methods": ["*"], "spiffe_ids": ["spiffe://example.org/a"], "vouched_by": [TD]}]},
        "'vouched_by' scopes subject_patterns and dns_names, and this rule has neither",
    ),
    (
        {
            "allow": [
                {"name": "r", "methods": ["*"], "subject_patterns": ["CN=a"], "vouched_by": ["spiffe://other.org"]}
            ]
        },
        "must be a bare name",
    ),
    ({"allow": [{"name": "r", "methods": ["*"], "vouched_by": [TD]}]}, "allow rule 'r': names nobody"),
    ({"allow": [], "extra": 1}, "unknown top-level key(s) 'extra'"),
    (
        {"allow": [{"name": "r", "methods": ["*"], "any_peer": True}], "require_pq_key_exchange": "yes"},
        "must be true or false",
    ),
]


@pytest.mark.parametrize(("doc", "message"), INVALID)
def test_invalid_policies_are_rejected_with_origin_rule_and_reason(doc, message) -> None:
    with pytest.raises(meshid.InvalidPolicyError) as info:
        meshid.AuthorizationPolicy.from_dict(doc, origin="p.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("policy p.yaml")


def test_load_reads_yaml_and_json_and_reports_syntax_errors(tmp_path) -> None:
    good = tmp_path / "p.yaml"
    good.write_text("name: x\nallow:\n  - name: r\n    methods: ['*']\n    trust_domains: [example.org]\n")
    assert meshid.AuthorizationPolicy.load(good).name == "x"
    as_json = tmp_path / "p.json"
    as_json.write_text('{"allow": [{"name": "r", "methods": ["*"], "trust_domains": ["example.org"]}]}')
    assert meshid.AuthorizationPolicy.load(as_json).rules[0].name == "r"
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("allow: [\n")
    with pytest.raises(meshid.InvalidPolicyError, match=r"broken.yaml: invalid YAML"):
        meshid.AuthorizationPolicy.load(broken_yaml)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('{"allow": ')
    with pytest.raises(meshid.InvalidPolicyError, match=r"broken.json: invalid JSON at line 1"):
        meshid.AuthorizationPolicy.load(broken_json)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n")
    with pytest.raises(meshid.InvalidPolicyError, match="top level must be a mapping"):
        meshid.AuthorizationPolicy.load(not_mapping)
    with pytest.raises(meshid.InvalidPolicyError, match="cannot read"):
        meshid.AuthorizationPolicy.load(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(meshid.InvalidPolicyError, match="not UTF-8"):
        meshid.AuthorizationPolicy.load(binary)


def test_a_spiffe_id_under_trust_domains_is_refused_not_widened() -> None:
    with pytest.raises(meshid.InvalidPolicyError, match="must be a bare name"):
        policy({"name": "r", "methods": ["*"], "trust_domains": ["spiffe://example.org/ns/prod/sa/payments"]})


@pytest.mark.parametrize("method", ["/pkg.Admin/Drop/x", "/pkg.Admin//Drop", "/pkg.Admin/Drop/"])
def test_odd_method_names_still_meet_service_wide_deny_rules(authority, method) -> None:
    p = policy(
        {"name": "all", "methods": ["*"], "trust_domains": [TD]},
        deny=[{"name": "no-admin", "methods": ["/pkg.Admin/*"], "spiffe_id_patterns": ["spiffe://example.org/**"]}],
    )
    assert p.decide(peer(authority, "spiffe://example.org/x"), method).rule == "no-admin"


def test_dns_rules_do_not_match_spiffe_peers(authority) -> None:
    svid = authority.issue_svid("spiffe://example.org/a", dns_names=["billing.corp"])
    spiffe_peer = meshid.PeerIdentity.from_certificate(svid.leaf, spiffe_id=svid.spiffe_id)
    p = policy({"name": "legacy", "methods": ["*"], "dns_names": ["billing.corp"]}, allow_non_spiffe_peers=True)
    assert not p.decide(spiffe_peer, METHOD, local_trust_domain=LOCAL).allowed


def test_allow_non_spiffe_peers_takes_a_list_of_trust_domains() -> None:
    p = policy(
        {"name": "legacy", "methods": ["*"], "subject_patterns": ["CN=x"]}, allow_non_spiffe_peers=["example.org"]
    )
    assert p.allow_non_spiffe_peers and p.non_spiffe_trust_domains == {meshid.TrustDomain.parse("example.org")}
    with pytest.raises(meshid.InvalidPolicyError, match="true, false, or a list of trust domains"):
        policy({"name": "legacy", "methods": ["*"], "subject_patterns": ["CN=x"]}, allow_non_spiffe_peers="yes")


def test_yaml_keys_of_other_types_are_reported_not_crashed(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("allow:\n  - name: r\n    methods: ['*']\n    any_peer: true\n    1: x\n    null: y\n")
    with pytest.raises(meshid.InvalidPolicyError, match="unknown key"):
        meshid.AuthorizationPolicy.load(path)
    with pytest.raises(meshid.InvalidPolicyError, match="not a valid regular expression"):
        policy({"name": "r", "methods": ["*"], "subject_patterns": ["a{4294967296}"]})


# --- trust is scoped to a trust domain ----------------------------------------------------------

PARTNER = meshid.TrustDomain.parse("other.org")
CORP_SUBJECT = "CN=batch,O=Example Corp"


def crafted_peer(trust_domain: str, *, spiffe: bool, subject: str = CORP_SUBJECT, dns: tuple[str, ...] = ()):
    """A peer whose CA wrote the subject and DNS names it liked (any CA can)."""
    td = meshid.TrustDomain.parse(trust_domain)
    sid = meshid.SpiffeId.parse(f"spiffe://{trust_domain}/ns/prod/sa/batch") if spiffe else None
    return meshid.PeerIdentity(
        spiffe_id=sid,
        trust_domain=td,
        subject=subject,
        common_name="batch",
        thumbprint=("cd" if spiffe else "ef") * 32,
        certificate=None,
        not_after=datetime.datetime.now(datetime.UTC),
        uri_sans=(str(sid),) if sid is not None else (),
        dns_sans=dns,
    )


BATCH = {"name": "batch", "methods": ["*"], "subject_patterns": [CORP_SUBJECT]}
BILLING = {"name": "billing", "methods": ["*"], "dns_names": ["billing.example.org"]}

# (policy keywords, rule, peer (trust domain, SPIFFE?), local trust domain, allowed rule or None)
SCOPED = [
    # the README's subject rule: this trust domain's batch, not a partner's that says the same
    ({}, BATCH, (TD, True), LOCAL, "batch"),
    ({}, BATCH, ("other.org", True), LOCAL, None),
    ({"allow_non_spiffe_peers": True}, BATCH, (TD, False), LOCAL, "batch"),
    ({"allow_non_spiffe_peers": True}, BATCH, ("other.org", False), LOCAL, None),
    # the rule's own scope
    ({}, {**BATCH, "vouched_by": ["other.org"]}, ("other.org", True), LOCAL, "batch"),
    ({}, {**BATCH, "vouched_by": ["other.org"]}, (TD, True), LOCAL, None),
    ({}, {**BATCH, "vouched_by": ["other.org", TD]}, (TD, True), LOCAL, "batch"),
    # the policy's scope: the trust domains allow_non_spiffe_peers lists
    ({"allow_non_spiffe_peers": ["other.org"]}, BATCH, ("other.org", False), LOCAL, "batch"),
    ({"allow_non_spiffe_peers": ["other.org"]}, BATCH, (TD, True), LOCAL, None),
    ({"allow_non_spiffe_peers": ["other.org"]}, {**BATCH, "vouched_by": [TD]}, ("other.org", False), LOCAL, None),
    # DNS names, for certificates without a SPIFFE ID
    ({"allow_non_spiffe_peers": True}, BILLING, (TD, False), LOCAL, "billing"),
    ({"allow_non_spiffe_peers": True}, BILLING, ("other.org", False), LOCAL, None),
    ({"allow_non_spiffe_peers": [TD, "other.org"]}, {**BILLING, "vouched_by": [TD]}, ("other.org", False), LOCAL, None),
    ({"allow_non_spiffe_peers": [TD, "other.org"]}, BILLING, ("other.org", False), LOCAL, "billing"),
    # the server's trust domain unknown: subject and DNS rules match nobody (fail closed)
    ({}, BATCH, (TD, True), None, None),
    ({"allow_non_spiffe_peers": True}, BILLING, (TD, False), None, None),
    ({}, {**BATCH, "vouched_by": [TD]}, (TD, True), None, "batch"),
]


@pytest.mark.parametrize(("top", "rule", "who", "local", "expected"), SCOPED)
def test_subject_and_dns_rules_match_only_peers_vouched_for_by_a_trust_domain_in_scope(
    top, rule, who, local, expected
) -> None:
    td, spiffe = who
    p = policy(rule, **top)
    decision = p.decide(crafted_peer(td, spiffe=spiffe, dns=("billing.example.org",)), METHOD, local_trust_domain=local)
    assert (decision.allowed, decision.rule) == (expected is not None, expected), decision.reason


def test_a_rule_is_scoped_per_condition_not_as_a_whole() -> None:
    # The partner matches by its SPIFFE ID (verified by its own bundle), never by the subject.
    both = {**BATCH, "spiffe_ids": ["spiffe://other.org/ns/prod/sa/web"]}
    p = policy(both, {"name": "pin", "methods": ["*"], "thumbprints": ["cd" * 32]})
    assert p.decide(crafted_peer("other.org", spiffe=True), METHOD, local_trust_domain=LOCAL).rule == "pin"
    p = policy(both)
    assert not p.decide(crafted_peer("other.org", spiffe=True), METHOD, local_trust_domain=LOCAL).allowed
    web = dataclasses.replace(
        crafted_peer("other.org", spiffe=True),
        spiffe_id=meshid.SpiffeId.parse("spiffe://other.org/ns/prod/sa/web"),
        uri_sans=("spiffe://other.org/ns/prod/sa/web",),
    )
    assert p.decide(web, METHOD, local_trust_domain=LOCAL).rule == "batch"


def test_a_deny_on_trust_domains_covers_certificates_without_a_spiffe_id_it_vouched_for() -> None:
    p = policy(
        BATCH,
        deny=[{"name": "no-partner", "methods": ["*"], "trust_domains": ["other.org"]}],
        allow_non_spiffe_peers=[TD, "other.org"],
    )
    partner = p.decide(crafted_peer("other.org", spiffe=False), METHOD, local_trust_domain=LOCAL)
    assert (partner.allowed, partner.rule) == (False, "no-partner")
    ours = p.decide(crafted_peer(TD, spiffe=False), METHOD, local_trust_domain=LOCAL)
    assert (ours.allowed, ours.rule) == (True, "batch")
    # an allow rule on trust_domains still matches SPIFFE peers only
    p = policy(
        {"name": "partners", "methods": ["*"], "trust_domains": ["other.org"]}, allow_non_spiffe_peers=["other.org"]
    )
    assert not p.decide(crafted_peer("other.org", spiffe=False), METHOD, local_trust_domain=LOCAL).allowed
    assert p.decide(crafted_peer("other.org", spiffe=True), METHOD, local_trust_domain=LOCAL).rule == "partners"


def test_vouched_by_is_read_from_the_file(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "allow:\n  - name: partner-batch\n    methods: ['*']\n    subject_patterns: ['CN=batch,O=Example Corp']\n"
        "    vouched_by: [other.org]\n"
    )
    assert meshid.AuthorizationPolicy.load(path).rules[0].vouched_by == {PARTNER}


DUPLICATES = [
    # a second deny: would drop the first one's rules, and the dev namespace would be let in
    (
        "p.yaml",
        "deny:\n  - {name: no-dev, methods: ['*'], spiffe_id_patterns: ['spiffe://example.org/ns/dev/**']}\n"
        "allow:\n  - {name: all, methods: ['*'], trust_domains: [example.org]}\n"
        "deny:\n  - {name: no-legacy, methods: ['*'], trust_domains: [legacy.org]}\n",
        "invalid YAML at line 5 column 1: while reading a mapping; the key 'deny' is given twice",
    ),
    (
        "p.yaml",
        "allow:\n  - name: r\n    methods: ['*']\n    spiffe_ids: [spiffe://example.org/a]\n"
        "    spiffe_ids: [spiffe://example.org/b]\n",
        "line 5 column 5: while reading a mapping; the key 'spiffe_ids' is given twice",
    ),
    (
        "p.json",
        '{"name": "g", "deny_rules": [{"name": "d", "source": {"principals": ["*"]}}], '
        '"allow_rules": [{"name": "a"}], "deny_rules": []}',
        "the key 'deny_rules' is given twice in one object",
    ),
]


@pytest.mark.parametrize(("name", "text", "message"), DUPLICATES)
def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path, name, text, message) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(meshid.InvalidPolicyError, match=re.escape(message)):
        meshid.AuthorizationPolicy.load(path)


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path, authority) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "allow:\n  - &base\n    name: one\n    methods: ['/a.S/N']\n    trust_domains: [example.org]\n"
        "  - <<: *base\n    name: two\n    methods: ['/a.S/M']\n"
    )
    p = meshid.AuthorizationPolicy.load(path)
    assert p.decide(peer(authority, "spiffe://example.org/x"), "/a.S/M", local_trust_domain=LOCAL).rule == "two"
