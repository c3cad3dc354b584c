"""``meshid policy test``: a table of cases (caller, method, headers, expected decision and rule)
run against a policy, for a policy repository's CI.

::

    trust_domain: example.org          # optional: the server's own trust domain (else each caller's)
    cases:
      - name: the frontend greets       # optional (else "case #N")
        spiffe_id: spiffe://example.org/ns/prod/sa/frontend   # or cert: FILE (PEM, leaf first;
        method: /meshid.examples.v1.Greeter/SayHello          #   relative to this file)
        headers: {x-env: prod}          # optional
        expect: allow                   # allow or deny
        rule: frontend-greets           # optional; null: decided by no rule (default deny)
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshid import _x509
from meshid.authz.model import Decision
from meshid.authz.patterns import method_pattern, show
from meshid.authz.policy import AuthorizationPolicy, parse_text, read_text
from meshid.cli.svid import load_chain
from meshid.errors import InvalidPolicyError, InvalidSpiffeIdError, InvalidSvidError
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import spiffe_id_from_certificate

__all__ = ["Case", "Outcome", "load_cases", "run_case"]

_TOP_KEYS = ("trust_domain", "cases")
_CASE_KEYS = ("name", "spiffe_id", "cert", "trust_domain", "method", "headers", "expect", "rule")
_UNSET = object()


@dataclass(frozen=True, slots=True)
class Case:
    """One row of the table: ``rule`` is ``_UNSET`` when the case names no expected rule."""

    name: str
    peer: PeerIdentity
    method: str
    headers: Mapping[str, str]
    expect_allow: bool
    rule: object
    local: TrustDomain | None


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    decision: Decision

    @property
    def passed(self) -> bool:
        if self.decision.allowed != self.case.expect_allow:
            return False
        return self.case.rule is _UNSET or self.case.rule == self.decision.rule


def spiffe_peer(given: SpiffeId) -> PeerIdentity:
    """A caller known only by its SPIFFE ID (as ``policy check --spiffe-id`` takes it)."""
    return PeerIdentity(
        spiffe_id=given,
        trust_domain=given.trust_domain,
        subject="",
        common_name=None,
        thumbprint="",
        certificate=None,
        not_after=datetime.datetime.max.replace(tzinfo=datetime.UTC),
        uri_sans=(str(given),),
    )


def _trust_domain(value: Any, where: str) -> TrustDomain:
    if not isinstance(value, str):
        raise InvalidPolicyError(f"{where}: 'trust_domain' must be a trust domain name such as example.org")
    try:
        return TrustDomain.parse(value)
    except InvalidSpiffeIdError as err:
        raise InvalidPolicyError(f"{where}: 'trust_domain': {err}") from err


def _peer(raw: Mapping[str, Any], where: str, folder: str, vouched: TrustDomain | None) -> PeerIdentity:
    if ("spiffe_id" in raw) == ("cert" in raw):
        raise InvalidPolicyError(f"{where}: give the caller as one of 'spiffe_id' or 'cert' (a PEM file)")
    if "spiffe_id" in raw:
        if not isinstance(raw["spiffe_id"], str):
            raise InvalidPolicyError(f"{where}: 'spiffe_id' must be a string")
        try:
            return spiffe_peer(SpiffeId.parse(raw["spiffe_id"]))
        except InvalidSpiffeIdError as err:
            raise InvalidPolicyError(f"{where}: {err}") from err
    if not isinstance(raw["cert"], str) or not raw["cert"]:
        raise InvalidPolicyError(f"{where}: 'cert' must be the path of a PEM certificate")
    path = os.path.join(folder, raw["cert"])
    try:
        leaf = load_chain(path)[0]
        sid = spiffe_id_from_certificate(leaf) if _x509.uri_sans(leaf) else None
    except InvalidSvidError as err:
        raise InvalidPolicyError(f"{where}: {err}") from err
    return PeerIdentity.from_certificate(leaf, None if sid is not None else vouched, spiffe_id=sid)


def _case(raw: Any, index: int, origin: str, folder: str, table_td: TrustDomain | None) -> Case:
    where = f"policy cases {origin}: case #{index + 1}"
    if not isinstance(raw, Mapping):
        raise InvalidPolicyError(f"{where}: must be a mapping (name, spiffe_id or cert, method, expect)")
    name = raw.get("name", f"case #{index + 1}")
    if not isinstance(name, str) or not name:
        raise InvalidPolicyError(f"{where}: 'name' must be a non-empty string")
    where = f"policy cases {origin}: case {name!r}"
    unknown = sorted(set(raw) - set(_CASE_KEYS), key=str)
    if unknown:
        raise InvalidPolicyError(
            f"{where}: unknown key(s) {', '.join(show(k) for k in unknown)}; allowed: {', '.join(_CASE_KEYS)}"
        )
    own_td = _trust_domain(raw["trust_domain"], where) if "trust_domain" in raw else None
    peer = _peer(raw, where, folder, own_td or table_td)
    if own_td is not None and peer.spiffe_id is not None:  # it would be silently ignored
        raise InvalidPolicyError(
            f"{where}: 'trust_domain' names who vouched for a certificate without a SPIFFE ID; this caller "
            "has one (its trust domain is its SPIFFE ID's; the table's trust_domain is the server's)"
        )
    method = raw.get("method")
    if not isinstance(method, str):
        raise InvalidPolicyError(f"{where}: needs 'method', the full method called (/package.Service/Method)")
    try:
        kind, _ = method_pattern(method)
    except InvalidPolicyError as err:
        raise InvalidPolicyError(f"{where}: {err}") from err
    if kind != "exact":
        raise InvalidPolicyError(f"{where}: method {method!r}: give the one method called, /package.Service/Method")
    headers = raw.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidPolicyError(f"{where}: 'headers' must map header names to string values")
    expect = raw.get("expect")
    if expect not in ("allow", "deny"):
        raise InvalidPolicyError(f"{where}: 'expect' must be allow or deny, not {show(expect)}")
    rule = raw.get("rule", _UNSET)
    if rule is not _UNSET and rule is not None and not isinstance(rule, str):
        raise InvalidPolicyError(f"{where}: 'rule' must be a rule name (or null: decided by no rule)")
    local = table_td or (peer.trust_domain if peer.spiffe_id is not None else own_td)
    return Case(name, peer, method, {k.lower(): v for k, v in headers.items()}, expect == "allow", rule, local)


def load_cases(origin: str) -> list[Case]:
    """Read a table of cases (YAML, or JSON for ``.json``).

    Raises:
        InvalidPolicyError: the file cannot be read, or a case is wrong (named, with what is wrong).
    """
    data = parse_text(origin, read_text(origin, "policy cases"), "policy cases")
    if not isinstance(data, Mapping):
        raise InvalidPolicyError(f"policy cases {origin}: the top level must be a mapping with 'cases'")
    unknown = sorted(set(data) - set(_TOP_KEYS), key=str)
    if unknown:
        raise InvalidPolicyError(
            f"policy cases {origin}: unknown top-level key(s) {', '.join(show(k) for k in unknown)}; "
            f"allowed: {', '.join(_TOP_KEYS)}"
        )
    table_td = _trust_domain(data["trust_domain"], f"policy cases {origin}") if "trust_domain" in data else None
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise InvalidPolicyError(f"policy cases {origin}: 'cases' must be a non-empty list of cases")
    folder = os.path.dirname(origin)
    cases = [_case(raw, i, origin, folder, table_td) for i, raw in enumerate(raw_cases)]
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise InvalidPolicyError(f"policy cases {origin}: case {case.name!r}: the name is used by another case")
        seen.add(case.name)
    return cases


def run_case(policy: AuthorizationPolicy, case: Case) -> Outcome:
    decision = policy.decide(case.peer, case.method, case.headers, local_trust_domain=case.local)
    return Outcome(case, decision)


def expected(case: Case) -> str:
    what = "allow" if case.expect_allow else "deny"
    if case.rule is _UNSET:
        return what
    return f"{what} by rule {case.rule!r}" if case.rule is not None else f"{what} by no rule"


def actual(decision: Decision) -> str:
    if decision.rule is not None:
        return f"{decision.decision} by rule {decision.rule!r}"
    return f"{decision.decision} by no rule ({decision.reason})"
