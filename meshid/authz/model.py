"""The policy model and the decision core: a pure function of (policy, peer, method, headers).

A policy is an ordered list of :class:`Rule`. Deny rules are consulted before allow rules;
what no rule allows is denied. Rules are compiled once, when the policy is built, into:

* dict indexes from the exact keys a peer carries (SPIFFE ID, thumbprint, trust domain, and
  for gRPC authz principals its URI SANs, DNS SANs or subject) to the rules naming them, so a
  decision costs O(1) in the number of exact rules;
* per-method and per-service buckets of the remaining (pattern) rules, so only rules that
  can apply to the called method are scanned (rules for "*" or a suffix are always scanned).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from meshid.authz.patterns import Matcher, string_matches
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId, TrustDomain

__all__ = ["Decision", "Rule", "StringMatch"]

Action = Literal["allow", "deny"]
#: (kind, value): kind is "exact", "prefix", "suffix", "present" (non-empty) or "any".
StringMatch = tuple[str, str]


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A gRPC authz header condition: the header must be present and match one of ``values``."""

    key: str
    values: tuple[StringMatch, ...]

    def matches(self, headers: Mapping[str, str]) -> bool:
        value = headers.get(self.key)
        if value is None:
            return False
        return any(string_matches(kind, text, value) for kind, text in self.values)


@dataclass(frozen=True, slots=True)
class Rule:
    """One named rule. A peer matches when any of its "who" conditions match (or ``any_peer``);
    the call matches when the peer, one of ``methods`` and every header condition match.

    ``principals`` are gRPC authz principals (A43): matched against the peer's URI SANs, or
    when it has none its DNS SANs, or when it has neither its subject.
    """

    name: str
    action: Action
    methods: tuple[StringMatch, ...] = (("any", ""),)
    spiffe_ids: frozenset[SpiffeId] = frozenset()
    spiffe_id_patterns: tuple[Matcher, ...] = ()
    trust_domains: frozenset[TrustDomain] = frozenset()
    subject_patterns: tuple[Matcher, ...] = ()
    thumbprints: frozenset[str] = frozenset()
    dns_names: frozenset[str] = frozenset()
    principals: tuple[StringMatch, ...] = ()
    any_peer: bool = False
    headers: tuple[HeaderMatch, ...] = ()

    def method_matches(self, method: str) -> bool:
        return any(string_matches(kind, text, method) for kind, text in self.methods)

    def peer_matches_by_scan(self, peer: PeerIdentity) -> bool:
        """The conditions the indexes do not cover: patterns and non-exact principals."""
        if self.any_peer:
            return True
        sid = str(peer.spiffe_id) if peer.spiffe_id is not None else None
        if sid is not None and any(p.fullmatch(sid) for p in self.spiffe_id_patterns):
            return True
        if any(p.fullmatch(peer.subject) for p in self.subject_patterns):
            return True
        if self.principals:
            names = principal_names(peer)
            for kind, text in self.principals:
                if kind != "exact" and any(string_matches(kind, text, n) for n in names):
                    return True
        return False

    @property
    def needs_scan(self) -> bool:
        return (
            self.any_peer
            or bool(self.spiffe_id_patterns or self.subject_patterns)
            or any(kind != "exact" for kind, _ in self.principals)
        )


def principal_names(peer: PeerIdentity) -> tuple[str, ...]:
    """What gRPC authz principals are matched against (gRFC A43, as grpc-go and grpc-java read it)."""
    if peer.uri_sans:
        return peer.uri_sans
    if peer.dns_sans:
        return peer.dns_sans
    return (peer.subject,)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one authorization decision.

    ``explained``: the reason may be shown to the caller (it is about the caller's connection,
    not the policy's contents), e.g. a classical key exchange under ``require_pq_key_exchange``.
    """

    allowed: bool
    rule: str | None
    reason: str
    explained: bool = False

    @property
    def decision(self) -> str:
        return "allow" if self.allowed else "deny"


def _method_bucket(kind: str, text: str) -> str | None:
    """The bucket a pattern rule is filed under: its exact method, or its service ("/pkg.Svc/")."""
    if kind == "exact":
        return text
    if kind == "prefix" and text.startswith("/") and text.endswith("/") and text.count("/") == 2:
        return text
    return None


@dataclass(slots=True)
class _Index:
    """Rules of one action, compiled for lookup."""

    rules: list[Rule] = field(default_factory=list)
    by_key: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    scan_by_method: dict[str, list[int]] = field(default_factory=dict)
    scan_any_method: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, rules: Iterable[Rule]) -> _Index:
        index = cls(list(rules))
        for i, rule in enumerate(index.rules):
            keys = [("id", str(s)) for s in rule.spiffe_ids]
            keys += [("td", t.name) for t in rule.trust_domains]
            keys += [("thumb", t) for t in rule.thumbprints]
            keys += [("dns", d) for d in rule.dns_names]
            keys += [("principal", text) for kind, text in rule.principals if kind == "exact"]
            for key in keys:
                index.by_key.setdefault(key, []).append(i)
            if rule.needs_scan:
                buckets = [_method_bucket(kind, text) for kind, text in rule.methods]
                if all(b is not None for b in buckets):
                    for bucket in dict.fromkeys(buckets):
                        index.scan_by_method.setdefault(bucket, []).append(i)  # type: ignore[arg-type]
                else:
                    index.scan_any_method.append(i)
        return index

    def first_match(self, peer: PeerIdentity, method: str, headers: Mapping[str, str] | None) -> Rule | None:
        candidates: set[int] = set()
        by_key = self.by_key
        if by_key:
            if peer.spiffe_id is not None:  # trust_domains rules match SPIFFE peers only
                candidates.update(by_key.get(("id", str(peer.spiffe_id)), ()))
                candidates.update(by_key.get(("td", peer.trust_domain.name), ()))
            candidates.update(by_key.get(("thumb", peer.thumbprint), ()))
            if peer.spiffe_id is None:  # dns_names rules are for certificates without a SPIFFE ID
                for name in peer.dns_sans:
                    candidates.update(by_key.get(("dns", name), ()))
            for name in principal_names(peer):
                candidates.update(by_key.get(("principal", name), ()))
        by_method = self.scan_by_method
        # The service is everything up to the second '/': for odd names such as
        # "/pkg.Admin/Drop/x" or "/pkg.Admin//Drop" the "/pkg.Admin/*" rules must still be consulted.
        second = method.find("/", 1)
        service = method[: second + 1] if second > 0 else method
        scanned = [
            i
            for bucket in (by_method.get(method, ()), by_method.get(service, ()), self.scan_any_method)
            for i in bucket
            if i not in candidates and self.rules[i].peer_matches_by_scan(peer)
        ]
        for i in sorted((*candidates, *scanned)):
            rule = self.rules[i]
            if rule.method_matches(method) and (
                not rule.headers or (headers is not None and all(h.matches(headers) for h in rule.headers))
            ):
                return rule
        return None


class CompiledRules:
    """Deny and allow rules compiled for :func:`decide`."""

    __slots__ = ("allow", "deny", "uses_headers")

    def __init__(self, rules: Iterable[Rule]) -> None:
        rules = list(rules)
        self.deny = _Index.build(r for r in rules if r.action == "deny")
        self.allow = _Index.build(r for r in rules if r.action == "allow")
        self.uses_headers = any(r.headers for r in rules)

    def decide(self, peer: PeerIdentity, method: str, headers: Mapping[str, str] | None = None) -> Decision:
        rule = self.deny.first_match(peer, method, headers)
        if rule is not None:
            return Decision(False, rule.name, f"denied by rule {rule.name!r}")
        rule = self.allow.first_match(peer, method, headers)
        if rule is not None:
            return Decision(True, rule.name, f"allowed by rule {rule.name!r}")
        return Decision(False, None, "no rule allows it (default deny)")


@dataclass(slots=True)
class ParsedPolicy:
    """What a loader (native or gRPC authz JSON) hands to :class:`AuthorizationPolicy`."""

    name: str
    rules: list[Rule]
    allow_non_spiffe_peers: bool = False
    non_spiffe_trust_domains: frozenset[TrustDomain] = frozenset()
    require_pq_key_exchange: bool = False
    allow_tls12: bool = False
    audit_condition: str = "NONE"
    audit_loggers: list[str] = field(default_factory=list)
