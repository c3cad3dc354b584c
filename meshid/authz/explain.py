"""Why a policy decides a call as it does: each rule in evaluation order, and why it matched or not.

The decision core (:mod:`meshid.authz.model`) finds the deciding rule through indexes; this
module walks the rules one by one, as a person reads the policy, for ``meshid policy check
--explain``. It reports; :meth:`AuthorizationPolicy.decide` decides (a test holds the two to
the same deciding rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshid.authz.model import Rule, principal_names
from meshid.authz.patterns import string_matches
from meshid.authz.policy import AuthorizationPolicy
from meshid.peer import PeerIdentity
from meshid.spiffeid import TrustDomain

__all__ = ["RuleCheck", "explain"]


@dataclass(frozen=True, slots=True)
class RuleCheck:
    """One rule as the decision met it. ``matched``: it decides the call; ``reached``: it was
    consulted at all (rules after the deciding one are not)."""

    rule: Rule
    reached: bool
    matched: bool
    why: str


def _methods(rule: Rule) -> str:
    return ", ".join(text if kind == "exact" else _pattern(kind, text) for kind, text in rule.methods)


def _pattern(kind: str, text: str) -> str:
    return {"any": "*", "prefix": f"{text}*", "suffix": f"*{text}", "present": "*"}.get(kind, text)


def _who(rule: Rule, peer: PeerIdentity, vouched: bool) -> tuple[str | None, list[str]]:
    """The condition naming ``peer`` (None if none does), and notes on near misses (scope)."""
    notes: list[str] = []
    if rule.any_peer:
        return "any_peer", notes
    sid = str(peer.spiffe_id) if peer.spiffe_id is not None else None
    if peer.spiffe_id is not None and peer.spiffe_id in rule.spiffe_ids:
        return f"spiffe_ids lists {sid}", notes
    if peer.trust_domain in rule.trust_domains:
        if peer.spiffe_id is not None or rule.action == "deny":
            return f"trust_domains lists {peer.trust_domain.name}", notes
        notes.append("an allow rule's trust_domains matches SPIFFE peers only")
    if peer.thumbprint and peer.thumbprint in rule.thumbprints:
        return "thumbprints lists the certificate's", notes
    if sid is not None:
        for p in rule.spiffe_id_patterns:
            if p.fullmatch(sid):
                return f"spiffe_id_patterns matches {sid}", notes
    scope = f"trust domain {peer.trust_domain.name} is not in the rule's scope"
    if peer.spiffe_id is None:
        for name in peer.dns_sans:
            if name.lower() in rule.dns_names:  # as the decision compares them: without case
                if vouched:
                    return f"dns_names lists {name}", notes
                notes.append(f"dns_names lists {name}, but {scope}")
    for p in rule.subject_patterns:
        if p.fullmatch(peer.subject):
            if vouched:
                return f"subject_patterns matches {peer.subject!r}", notes
            notes.append(f"subject_patterns matches {peer.subject!r}, but {scope}")
    if rule.principals:
        for name in principal_names(peer):
            for kind, text in rule.principals:
                if string_matches(kind, text, name):
                    if vouched or peer.uri_sans:
                        return f"principals {_pattern(kind, text)!r} matches {name}", notes
                    notes.append(f"principals {_pattern(kind, text)!r} matches {name}, but {scope}")
    return None, notes


def _check(
    rule: Rule, peer: PeerIdentity, method: str, headers: Mapping[str, str] | None, default_scope: bool
) -> tuple[bool, str]:
    who, notes = _who(rule, peer, rule.vouches(peer.trust_domain, default_scope))
    if who is None:
        why = f"no condition names {peer.describe()}"
        return False, why + (f" ({'; '.join(notes)})" if notes else "")
    if not rule.method_matches(method):
        return False, f"{who}, but {method} is not in methods [{_methods(rule)}]"
    for header in rule.headers:
        value = None if headers is None else headers.get(header.key)
        if value is None:
            return False, f"{who}, but header {header.key} is not sent"
        if not header.matches(headers or {}):
            return False, f"{who}, but header {header.key}={value!r} matches none of its values"
    return True, f"{who}; {method} is in methods [{_methods(rule)}]" + (
        f"; headers {', '.join(h.key for h in rule.headers)} match" if rule.headers else ""
    )


def explain(
    policy: AuthorizationPolicy,
    peer: PeerIdentity,
    method: str,
    headers: Mapping[str, str] | None = None,
    *,
    local_trust_domain: TrustDomain | None = None,
) -> tuple[str | None, list[RuleCheck]]:
    """Each rule in evaluation order (deny rules, then allow rules, each in file order).

    Returns what decides before any rule (a certificate without a SPIFFE ID under a policy that
    does not admit one, a classical key exchange under ``require_pq_key_exchange``) or None,
    and the rules as the decision met them.
    """
    gate = policy.decide(peer, method, headers, local_trust_domain=local_trust_domain)
    if gate.rule is None and gate.explained:
        return gate.reason, [RuleCheck(r, False, False, "not consulted") for r in _ordered(policy)]
    scope = policy.non_spiffe_trust_domains
    if scope:
        default_scope = peer.trust_domain in scope
    else:
        default_scope = local_trust_domain is not None and peer.trust_domain == local_trust_domain
    checks: list[RuleCheck] = []
    decided: str | None = None
    for rule in _ordered(policy):
        if decided is not None:
            checks.append(RuleCheck(rule, False, False, f"not consulted: rule {decided!r} decided"))
            continue
        matched, why = _check(rule, peer, method, headers, default_scope)
        checks.append(RuleCheck(rule, True, matched, why))
        if matched:
            decided = rule.name
    return None, checks


def _ordered(policy: AuthorizationPolicy) -> list[Rule]:
    return [r for r in policy.rules if r.action == "deny"] + [r for r in policy.rules if r.action == "allow"]
