"""The policy model and the decision core: a pure function of (policy, peer, method, headers).

A policy is an ordered list of :class:`Rule`. Deny rules are consulted before allow rules;
what no rule allows is denied. Rules are compiled once, when the policy is built, into:

* dict indexes from the exact keys a peer carries (SPIFFE ID, thumbprint, trust domain, and
  for gRPC authz principals its URI SANs, DNS SANs or subject) to the rules naming them, so a
  decision costs O(1) in the number of exact rules;
* per-method and per-service buckets of the remaining (pattern) rules, so only rules that
  can apply to the called method are scanned (rules for "*" or a suffix are always scanned).

Trust is scoped to a trust domain. A federated CA may write any subject or DNS name it likes,
so a rule's ``subject_patterns`` and ``dns_names``, and gRPC authz principals whenever they are
matched against a peer's DNS SANs or subject, match only a peer whose ``trust_domain`` (the
trust domain whose bundle vouched for its certificate) is in the rule's *scope*: the rule's
``vouched_by`` if it names any, else the policy's ``non_spiffe_trust_domains`` if it names any,
else the server's own trust domain (``local_trust_domain``; when that is unknown, such
conditions match nobody). SPIFFE IDs, SPIFFE ID patterns, trust domains and thumbprints are not
scoped: a SPIFFE ID is verified against its own trust domain's bundle, and a thumbprint names
one certificate. The scope is checked per condition, after the index lookup, in O(1).

A deny rule's ``trust_domains`` also matches a peer without a SPIFFE ID that a listed trust
domain's bundle vouched for; an allow rule's ``trust_domains`` matches SPIFFE peers only.

A peer identified by a JWT-SVID (``peer.source == "jwt"``) has a SPIFFE ID and no certificate:
SPIFFE ID, pattern, trust domain and URI principal conditions match it; subject patterns,
thumbprints and DNS names never do. A rule's ``identity_sources``, when set, narrows which
sources of identity it matches (e.g. an admin rule for certificates only).
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
#: Where a caller's identity may come from: its TLS client certificate, or a JWT-SVID.
IDENTITY_SOURCES = ("x509", "jwt")


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

    ``vouched_by`` is the scope of the rule's subject, DNS and (non-URI) principal conditions:
    the trust domains whose bundles may vouch for a peer matched by them. Empty means the
    policy's default scope (see the module docstring).
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
    vouched_by: frozenset[TrustDomain] = frozenset()
    #: The identity sources this rule matches ("x509", "jwt"); empty: whatever the policy accepts.
    identity_sources: frozenset[str] = frozenset()

    def method_matches(self, method: str) -> bool:
        return any(string_matches(kind, text, method) for kind, text in self.methods)

    def vouches(self, trust_domain: TrustDomain, default: bool) -> bool:
        """Whether ``trust_domain`` is in this rule's scope; ``default``: whether it is in the policy's."""
        return trust_domain in self.vouched_by if self.vouched_by else default

    def peer_matches_by_scan(self, peer: PeerIdentity, *, vouched: bool) -> bool:
        """The conditions the indexes do not cover: patterns and non-exact principals.

        ``vouched``: whether the peer's trust domain is in this rule's scope (:meth:`vouches`);
        without it, subject patterns and principals matched against DNS SANs or the subject
        do not match.
        """
        if self.any_peer:
            return True
        sid = str(peer.spiffe_id) if peer.spiffe_id is not None else None
        if sid is not None and any(p.fullmatch(sid) for p in self.spiffe_id_patterns):
            return True
        if vouched and peer.source == "x509" and any(p.fullmatch(peer.subject) for p in self.subject_patterns):
            return True
        if self.principals and (vouched or peer.uri_sans):
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
    """Rules of one action, compiled for lookup.

    ``by_key`` holds keys that match whoever carries them ("id", "td", "thumb"); ``by_scoped_key``
    those that match only a peer vouched for by a trust domain in the rule's scope ("dns", and
    "principal" when the peer has no URI SAN).
    """

    rules: list[Rule] = field(default_factory=list)
    by_key: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    by_scoped_key: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    scan_by_method: dict[str, list[int]] = field(default_factory=dict)
    scan_any_method: list[int] = field(default_factory=list)
    #: Whether trust_domains rules also match peers without a SPIFFE ID (deny rules do).
    td_covers_non_spiffe: bool = False

    @classmethod
    def build(cls, rules: Iterable[Rule], *, td_covers_non_spiffe: bool = False) -> _Index:
        index = cls(list(rules), td_covers_non_spiffe=td_covers_non_spiffe)
        for i, rule in enumerate(index.rules):
            keys = [("id", str(s)) for s in rule.spiffe_ids]
            keys += [("td", t.name) for t in rule.trust_domains]
            keys += [("thumb", t) for t in rule.thumbprints]
            for key in keys:
                index.by_key.setdefault(key, []).append(i)
            scoped = [("dns", d) for d in rule.dns_names]
            scoped += [("principal", text) for kind, text in rule.principals if kind == "exact"]
            for key in scoped:
                index.by_scoped_key.setdefault(key, []).append(i)
            if rule.needs_scan:
                buckets = [_method_bucket(kind, text) for kind, text in rule.methods]
                if all(b is not None for b in buckets):
                    for bucket in dict.fromkeys(buckets):
                        index.scan_by_method.setdefault(bucket, []).append(i)  # type: ignore[arg-type]
                else:
                    index.scan_any_method.append(i)
        return index

    def first_match(
        self, peer: PeerIdentity, method: str, headers: Mapping[str, str] | None, *, default_scope: bool
    ) -> Rule | None:
        """The first rule (in file order) that matches; ``default_scope``: whether the peer's trust
        domain is in the policy's default scope (for rules without ``vouched_by``)."""
        candidates: set[int] = set()
        by_key = self.by_key
        td = peer.trust_domain
        if by_key:
            if peer.spiffe_id is not None:
                candidates.update(by_key.get(("id", str(peer.spiffe_id)), ()))
            if peer.spiffe_id is not None or self.td_covers_non_spiffe:
                candidates.update(by_key.get(("td", td.name), ()))
            candidates.update(by_key.get(("thumb", peer.thumbprint), ()))
        by_scoped = self.by_scoped_key
        if by_scoped:
            rules = self.rules
            if peer.spiffe_id is None:  # dns_names rules are for certificates without a SPIFFE ID
                for name in peer.dns_sans:  # DNS names are compared without case (RFC 4343), as rules keep them
                    candidates.update(
                        i for i in by_scoped.get(("dns", name.lower()), ()) if rules[i].vouches(td, default_scope)
                    )
            names = principal_names(peer)
            for name in names:
                hits = by_scoped.get(("principal", name), ())
                if peer.uri_sans:  # matched against URI SANs: a SPIFFE ID, verified by its own bundle
                    candidates.update(hits)
                else:
                    candidates.update(i for i in hits if rules[i].vouches(td, default_scope))
        by_method = self.scan_by_method
        # The service is everything up to the second '/': for odd names such as
        # "/pkg.Admin/Drop/x" or "/pkg.Admin//Drop" the "/pkg.Admin/*" rules must still be consulted.
        second = method.find("/", 1)
        service = method[: second + 1] if second > 0 else method
        scanned = [
            i
            for bucket in (by_method.get(method, ()), by_method.get(service, ()), self.scan_any_method)
            for i in bucket
            if i not in candidates
            and self.rules[i].peer_matches_by_scan(peer, vouched=self.rules[i].vouches(td, default_scope))
        ]
        for i in sorted((*candidates, *scanned)):
            rule = self.rules[i]
            if rule.identity_sources and peer.source not in rule.identity_sources:
                continue
            if rule.method_matches(method) and (
                not rule.headers or (headers is not None and all(h.matches(headers) for h in rule.headers))
            ):
                return rule
        return None


class CompiledRules:
    """Deny and allow rules compiled for :meth:`decide`.

    ``non_spiffe_trust_domains`` is the policy's default scope for subject, DNS and principal
    conditions; empty means the server's own trust domain, given to :meth:`decide`.
    """

    __slots__ = ("allow", "deny", "non_spiffe_trust_domains", "uses_headers")

    def __init__(self, rules: Iterable[Rule], non_spiffe_trust_domains: frozenset[TrustDomain] = frozenset()) -> None:
        rules = list(rules)
        self.deny = _Index.build((r for r in rules if r.action == "deny"), td_covers_non_spiffe=True)
        self.allow = _Index.build(r for r in rules if r.action == "allow")
        self.uses_headers = any(r.headers for r in rules)
        self.non_spiffe_trust_domains = non_spiffe_trust_domains

    def decide(
        self,
        peer: PeerIdentity,
        method: str,
        headers: Mapping[str, str] | None = None,
        *,
        local_trust_domain: TrustDomain | None = None,
    ) -> Decision:
        """Deny rules first, then allow rules, else deny. ``local_trust_domain``: the server's own
        trust domain, the default scope when the policy names none (None: the default scope is empty)."""
        scope = self.non_spiffe_trust_domains
        if scope:
            default_scope = peer.trust_domain in scope
        else:
            default_scope = local_trust_domain is not None and peer.trust_domain == local_trust_domain
        rule = self.deny.first_match(peer, method, headers, default_scope=default_scope)
        if rule is not None:
            return Decision(False, rule.name, f"denied by rule {rule.name!r}")
        rule = self.allow.first_match(peer, method, headers, default_scope=default_scope)
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
    identity_sources: frozenset[str] = frozenset({"x509"})
    jwt_audiences: frozenset[str] = frozenset()
    audit_condition: str | None = None
    require_pq_signature: bool = False
    audit_loggers: list[str] = field(default_factory=list)
