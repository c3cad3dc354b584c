"""``policy check --explain`` walks the rules one by one; the decision core finds the deciding rule
through its indexes. Over a grid of callers, methods and headers the two name the same rule."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

import pytest

import meshid
from meshid.authz.explain import explain
from meshid.spiffeid import TrustDomain

POLICY_REPO = Path(__file__).parent.parent / "policy_repo"
FOREVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)

SCOPED = meshid.AuthorizationPolicy.from_dict(
    {
        "name": "scoped",
        "allow_non_spiffe_peers": True,
        "deny": [{"name": "no-legacy", "methods": ["*"], "trust_domains": ["legacy.org"]}],
        "allow": [
            {"name": "dns", "methods": ["/a.S/*"], "dns_names": ["batch.example.org"]},
            {"name": "partner", "methods": ["/a.S/Get"], "subject_patterns": ["CN=p.*"], "vouched_by": ["other.org"]},
            {"name": "thumb", "methods": ["*"], "thumbprints": ["ab" * 32]},
            {"name": "any-get", "methods": ["/a.S/Get"], "any_peer": True},
        ],
    }
)


def _peer(
    sid: str | None, td: str, *, subject: str = "", dns: tuple[str, ...] = (), thumb: str = ""
) -> meshid.PeerIdentity:
    spiffe_id = meshid.SpiffeId.parse(sid) if sid else None
    return meshid.PeerIdentity(
        spiffe_id=spiffe_id,
        trust_domain=TrustDomain.parse(td),
        subject=subject,
        common_name=None,
        thumbprint=thumb,
        certificate=None,
        not_after=FOREVER,
        uri_sans=(sid,) if sid else (),
        dns_sans=dns,
    )


PEERS = [
    _peer("spiffe://example.org/ns/prod/sa/frontend", "example.org"),
    _peer("spiffe://example.org/ns/prod/sa/batch", "example.org"),
    _peer("spiffe://example.org/ns/dev/sa/intruder", "example.org"),
    _peer("spiffe://other.org/ns/prod/sa/client", "other.org"),
    _peer("spiffe://legacy.org/x", "legacy.org"),
    _peer(None, "example.org", subject="CN=legacy-batch", dns=("batch.example.org",)),
    _peer(None, "other.org", subject="CN=legacy-batch", dns=("batch.example.org",)),
    _peer(None, "example.org", subject="CN=legacy-batch", dns=("Batch.Example.ORG",)),  # DNS names have no case
    _peer(None, "other.org", subject="CN=partner"),
    _peer(None, "legacy.org", subject="CN=partner", thumb="ab" * 32),
    _peer(None, "example.org", subject="CN=nobody", thumb="ab" * 32),
]
METHODS = ["/meshid.examples.v1.Greeter/SayHello", "/meshid.examples.v1.Greeter/Chat", "/a.S/Get", "/a.S/Put"]
HEADERS = [{}, {"x-env": "prod"}, {"x-env": "dev"}]
POLICIES = {
    "native": lambda: meshid.AuthorizationPolicy.load(POLICY_REPO / "policy-v2.yaml"),
    "grpc-json": lambda: meshid.AuthorizationPolicy.load(POLICY_REPO / "policy-grpc.json"),
    "scoped": lambda: SCOPED,
}


@pytest.mark.parametrize("name", POLICIES)
def test_explain_names_the_rule_the_decision_core_decides_by(name: str) -> None:
    policy = POLICIES[name]()
    for peer, method, headers, local in itertools.product(PEERS, METHODS, HEADERS, (None, TrustDomain("example.org"))):
        decision = policy.decide(peer, method, headers, local_trust_domain=local)
        gate, checks = explain(policy, peer, method, headers, local_trust_domain=local)
        matched = [c.rule.name for c in checks if c.matched]
        assert len(matched) <= 1
        where = f"{peer.describe()} {method} {headers} local={local}"
        if gate is not None:
            assert (decision.allowed, decision.rule, gate) == (False, None, decision.reason), where
            assert not any(c.reached for c in checks)
        else:
            assert (matched[0] if matched else None) == decision.rule, where
        # the rules after the deciding one are not consulted; all before it are
        reached = [c.reached for c in checks]
        assert reached == sorted(reached, reverse=True), where
