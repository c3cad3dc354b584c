"""meshid's native policy format (YAML or JSON).

::

    name: greeter
    allow_non_spiffe_peers: false      # optional: true (this server's trust domain) or [trust domains]
    require_pq_key_exchange: false     # optional
    require_pq_signature: false        # optional: the peer authenticated with ML-DSA (pqtls path)
    allow_tls12: false                 # optional: admit peers that negotiated TLS 1.2
    identity_sources: [x509]           # optional: [x509] (default), [x509, jwt] or [jwt]
    jwt_audiences: [greeter]           # optional: what a JWT-SVID's aud may name (default: this
                                       # server's own SPIFFE ID)
    audit_condition: ON_DENY_AND_ALLOW # optional: NONE, ON_DENY, ON_ALLOW (gRFC A59's values)
    deny:                              # consulted first
      - name: no-legacy
        methods: ["*"]
        trust_domains: [legacy.example.org]
    allow:
      - name: frontend-greets
        methods: [/helloworld.Greeter/SayHello, /helloworld.Greeter/*]
        spiffe_ids: [spiffe://example.org/ns/prod/sa/frontend]
        spiffe_id_patterns: [spiffe://example.org/ns/*/sa/frontend]
        subject_patterns: ['CN=frontend,O=Example']
        thumbprints: [<sha-256 hex>]
        dns_names: [frontend.example.org]   # for non-SPIFFE peers
        any_peer: false
      - name: partner-batch
        methods: ["*"]
        subject_patterns: ['CN=batch,O=Partner']
        vouched_by: [partner.example.org]   # whose CA may vouch for these subjects and DNS names
      - name: admin
        methods: [/helloworld.Admin/*]
        spiffe_ids: [spiffe://example.org/ns/prod/sa/ops]
        identity_sources: [x509]            # this rule: certificates only, even if the policy takes jwt

Every rule needs a ``name``, ``methods`` and at least one "who" key (or ``any_peer: true``).
Unknown keys are errors: a misspelt key must never silently widen or narrow a rule.

``subject_patterns`` and ``dns_names`` match only peers whose certificate was vouched for by a
trust domain in the rule's scope (a federated CA can write any subject or DNS name): the
rule's ``vouched_by``, else the trust domains ``allow_non_spiffe_peers`` lists, else the
server's own trust domain. ``vouched_by`` is refused on a rule with neither condition, where
it would scope nothing. A deny rule's ``trust_domains`` also covers certificates without a
SPIFFE ID vouched for by those trust domains; an allow rule's matches SPIFFE peers only.

``identity_sources`` says where a caller's identity may come from: ``x509`` (its TLS client
certificate, the default) and/or ``jwt`` (a JWT-SVID sent as ``authorization: Bearer``; never
accepted unless listed). A call that carries a bearer token under a policy that accepts ``jwt``
is decided by the token, even when the connection also has a client certificate (behind a
TLS-terminating hop the certificate names the hop); a bad token is refused, never passed over
for the certificate. ``jwt_audiences`` lists what the token's ``aud`` may name; without it, the
server's own SPIFFE ID. A rule's ``identity_sources`` narrows the sources it matches and must be
among the policy's. A JWT peer matches SPIFFE ID, pattern and trust domain conditions only.

``audit_condition`` chooses which decisions are recorded on the ``meshid.audit`` logger, as a
gRPC authz policy's ``audit_logging_options.audit_condition`` does; without it every decision
is, and the logger's level chooses (allows are recorded at INFO, denies at WARNING).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from meshid.authz.grpc_json import AUDIT_CONDITIONS  # gRFC A59's names, for both formats
from meshid.authz.model import IDENTITY_SOURCES, ParsedPolicy, Rule
from meshid.authz.patterns import compile_spiffe_id_pattern, compile_subject_pattern, method_pattern, show
from meshid.errors import InvalidPolicyError, InvalidSpiffeIdError
from meshid.spiffeid import SpiffeId, TrustDomain

__all__ = ["parse"]

_TOP_KEYS = {
    "name",
    "allow",
    "deny",
    "allow_non_spiffe_peers",
    "require_pq_key_exchange",
    "require_pq_signature",
    "allow_tls12",
    "audit_condition",
    "identity_sources",
    "jwt_audiences",
}
#: gRFC A59's audit conditions.
_WHO_KEYS = ("spiffe_ids", "spiffe_id_patterns", "trust_domains", "subject_patterns", "thumbprints", "dns_names")
_RULE_KEYS = {"name", "methods", "any_peer", "vouched_by", "identity_sources", *_WHO_KEYS}
#: The longest audience a policy may list (a SPIFFE ID is at most 2048 bytes).
_MAX_AUDIENCE = 2048
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DNS = re.compile(r"(?=.{1,253}$)(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _strings(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidPolicyError(f"{where}: '{key}' must be a list of strings")
    return value


def _thumbprint(text: str) -> str:
    norm = text.replace(":", "").lower()
    if not _HEX64.fullmatch(norm):
        raise InvalidPolicyError(f"thumbprint {text!r} is not a SHA-256 hex digest (64 hex digits)")
    return norm


def _dns(text: str) -> str:
    if not _DNS.fullmatch(text.lower()):
        raise InvalidPolicyError(f"DNS name {text!r} is not a valid host name")
    return text.lower()


def _each(values: list[str], convert: Callable[[str], Any]) -> list[Any]:
    return [convert(v) for v in values]


def identity_sources(value: Any, where: str) -> frozenset[str]:
    """A non-empty list of "x509" and/or "jwt".

    Raises:
        InvalidPolicyError: anything else.
    """
    if (
        not isinstance(value, list | tuple | frozenset | set)
        or not value
        or not all(isinstance(v, str) and v in IDENTITY_SOURCES for v in value)
    ):
        raise InvalidPolicyError(
            f"{where}: 'identity_sources' must be a non-empty list of {' and/or '.join(IDENTITY_SOURCES)}, "
            f"not {show(value)}"
        )
    return frozenset(value)


def jwt_audiences(value: Any, where: str) -> frozenset[str]:
    """A non-empty list of non-empty audience strings.

    Raises:
        InvalidPolicyError: anything else.
    """
    if (
        not isinstance(value, list | tuple | frozenset | set)
        or not value
        or not all(isinstance(v, str) and 0 < len(v) <= _MAX_AUDIENCE for v in value)
    ):
        raise InvalidPolicyError(
            f"{where}: 'jwt_audiences' must be a non-empty list of audience strings (at most "
            f"{_MAX_AUDIENCE} characters each); omit it to accept tokens for this server's own SPIFFE ID"
        )
    return frozenset(value)


def _rule(raw: Any, action: str, index: int, origin: str, seen: set[str], sources: frozenset[str]) -> Rule:
    where = f"policy {origin}: {action} rule #{index + 1}"
    if not isinstance(raw, Mapping):
        raise InvalidPolicyError(f"{where}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidPolicyError(f"{where}: needs a non-empty 'name'")
    where = f"policy {origin}: {action} rule {name!r}"
    if name in seen:
        raise InvalidPolicyError(f"{where}: the name is used by another rule")
    seen.add(name)
    unknown = sorted((set(raw) - _RULE_KEYS), key=str)  # YAML keys may be ints or None too
    if unknown:
        raise InvalidPolicyError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_RULE_KEYS))}"
        )
    if "methods" not in raw:
        raise InvalidPolicyError(f"{where}: needs 'methods' (use ['*'] for every method)")
    methods = _strings(raw["methods"], where, "methods")
    if not methods:
        raise InvalidPolicyError(f"{where}: 'methods' is empty, so the rule could never match")
    any_peer = raw.get("any_peer", False)
    if not isinstance(any_peer, bool):
        raise InvalidPolicyError(f"{where}: 'any_peer' must be true or false")
    lists = {key: _strings(raw.get(key, []), where, key) for key in _WHO_KEYS}
    if not any_peer and not any(lists.values()):
        raise InvalidPolicyError(
            f"{where}: names nobody; give spiffe_ids, spiffe_id_patterns, trust_domains, "
            "subject_patterns, thumbprints or dns_names (or any_peer: true)"
        )
    vouched_by = _strings(raw["vouched_by"], where, "vouched_by") if "vouched_by" in raw else None
    if vouched_by is not None and not vouched_by:
        raise InvalidPolicyError(f"{where}: 'vouched_by' is empty; omit it for the default scope")
    if vouched_by and not (lists["subject_patterns"] or lists["dns_names"]):
        raise InvalidPolicyError(
            f"{where}: 'vouched_by' scopes subject_patterns and dns_names, and this rule has neither"
        )
    rule_sources = identity_sources(raw["identity_sources"], where) if "identity_sources" in raw else frozenset()
    if rule_sources - sources:
        raise InvalidPolicyError(
            f"{where}: 'identity_sources' names {', '.join(sorted(rule_sources - sources))}, which the policy "
            f"does not accept (its identity_sources: {', '.join(sorted(sources))})"
        )
    try:
        return Rule(
            name=name,
            action=action,  # type: ignore[arg-type]
            methods=tuple(method_pattern(m) for m in methods),
            spiffe_ids=frozenset(_each(lists["spiffe_ids"], _spiffe_id)),
            spiffe_id_patterns=tuple(_each(lists["spiffe_id_patterns"], compile_spiffe_id_pattern)),
            trust_domains=frozenset(_each(lists["trust_domains"], _trust_domain)),
            subject_patterns=tuple(_each(lists["subject_patterns"], compile_subject_pattern)),
            thumbprints=frozenset(_each(lists["thumbprints"], _thumbprint)),
            dns_names=frozenset(_each(lists["dns_names"], _dns)),
            any_peer=any_peer,
            vouched_by=frozenset(_each(vouched_by or [], _trust_domain)),
            identity_sources=rule_sources,
        )
    except (InvalidPolicyError, InvalidSpiffeIdError) as err:
        raise InvalidPolicyError(f"{where}: {err}") from err


def _spiffe_id(text: str) -> SpiffeId:
    if "*" in text:
        raise InvalidPolicyError(f"{text!r} contains '*'; put globs under 'spiffe_id_patterns'")
    return SpiffeId.parse(text)


def _non_spiffe(value: Any, origin: str) -> bool | list[TrustDomain]:
    """``allow_non_spiffe_peers``: false, true (the bundle of this server's own trust domain may
    vouch), or the list of trust domains whose bundles may vouch for such certificates."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        try:
            return [_trust_domain(v) for v in value]
        except (InvalidPolicyError, InvalidSpiffeIdError) as err:
            raise InvalidPolicyError(f"policy {origin}: allow_non_spiffe_peers: {err}") from err
    raise InvalidPolicyError(
        f"policy {origin}: 'allow_non_spiffe_peers' must be true, false, or a list of trust domains"
    )


def _trust_domain(text: str) -> TrustDomain:
    """A bare trust domain name. A SPIFFE ID here is refused: it would silently widen to its
    whole trust domain."""
    if "/" in text or ":" in text:
        raise InvalidPolicyError(
            f"trust domain {text!r} must be a bare name such as 'example.org'; "
            "put SPIFFE IDs under spiffe_ids or spiffe_id_patterns"
        )
    return TrustDomain.parse(text)


def _flag(data: Mapping[str, Any], key: str, origin: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise InvalidPolicyError(f"policy {origin}: '{key}' must be true or false")
    return value


def _audit_condition(data: Mapping[str, Any], origin: str) -> str | None:
    value = data.get("audit_condition")
    if value is None:
        return None
    if not isinstance(value, str) or value not in AUDIT_CONDITIONS:
        raise InvalidPolicyError(
            f"policy {origin}: 'audit_condition' {show(value)} is not one of {', '.join(AUDIT_CONDITIONS)}"
        )
    return value


def parse(data: Mapping[str, Any], *, origin: str) -> ParsedPolicy:
    """Parse a native policy document.

    Raises:
        InvalidPolicyError: naming the origin, the rule and what is wrong.
    """
    unknown = sorted((set(data) - _TOP_KEYS), key=str)
    if unknown:
        raise InvalidPolicyError(
            f"policy {origin}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    name = data.get("name", "policy")
    if not isinstance(name, str):
        raise InvalidPolicyError(f"policy {origin}: 'name' must be a string")
    non_spiffe = _non_spiffe(data.get("allow_non_spiffe_peers", False), origin)
    sources = identity_sources(data["identity_sources"], f"policy {origin}") if "identity_sources" in data else None
    audiences = jwt_audiences(data["jwt_audiences"], f"policy {origin}") if "jwt_audiences" in data else frozenset()
    if audiences and (sources is None or "jwt" not in sources):
        raise InvalidPolicyError(
            f"policy {origin}: 'jwt_audiences' is set but identity_sources does not list jwt, so no token is accepted"
        )
    sources = sources or frozenset({"x509"})
    seen: set[str] = set()
    rules = []
    for action in ("deny", "allow"):
        raw_rules = data.get(action, [])
        if raw_rules is None:
            raw_rules = []
        if not isinstance(raw_rules, list):
            raise InvalidPolicyError(f"policy {origin}: '{action}' must be a list of rules")
        rules += [_rule(raw, action, i, origin, seen, sources) for i, raw in enumerate(raw_rules)]
    if not any(r.action == "allow" for r in rules):
        raise InvalidPolicyError(f"policy {origin}: has no allow rule, so it would deny every call")
    return ParsedPolicy(
        name=name,
        rules=rules,
        allow_non_spiffe_peers=bool(non_spiffe),
        non_spiffe_trust_domains=frozenset(non_spiffe) if isinstance(non_spiffe, list) else frozenset(),
        require_pq_key_exchange=_flag(data, "require_pq_key_exchange", origin),
        allow_tls12=_flag(data, "allow_tls12", origin),
        identity_sources=sources,
        jwt_audiences=audiences,
        audit_condition=_audit_condition(data, origin),
        require_pq_signature=_flag(data, "require_pq_signature", origin),
    )
