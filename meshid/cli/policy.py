"""``meshid policy check``: what a policy decides for a caller and a method, offline (with
``--explain``, rule by rule); ``policy test``: a table of such cases, for CI; ``policy replay``:
past decisions from an audit log, decided again by a new policy."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshid import _x509
from meshid.authz.patterns import method_pattern
from meshid.authz.policy import AuthorizationPolicy
from meshid.bundle import BundleSet, TrustBundle
from meshid.cli.svid import load_chain
from meshid.errors import InvalidPolicyError, InvalidSvidError
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import spiffe_id_from_certificate


def register(groups: Any) -> None:
    group = groups.add_parser("policy", help="work with authorization policies")
    commands = group.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="print the decision and deciding rule; exit 0 allow, 1 deny, 2 bad input")
    check.add_argument("policy", help="policy file (native YAML/JSON or gRPC authz JSON)")
    who = check.add_mutually_exclusive_group(required=True)
    who.add_argument("--spiffe-id", help="the caller's SPIFFE ID")
    who.add_argument("--cert", help="the caller's certificate (PEM, leaf first)")
    check.add_argument("--bundle", metavar="FILE", help="verify --cert against this trust bundle (PEM) first")
    check.add_argument(
        "--trust-domain",
        help="the server's own trust domain, the default scope of subject and DNS rules (default: the "
        "caller's SPIFFE ID's); a certificate without a SPIFFE ID is taken as vouched for by this trust "
        "domain (and --bundle as its bundle)",
    )
    check.add_argument(
        "--method", required=True, type=full_method, help="the full method called, /package.Service/Method"
    )
    check.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="a request header")
    check.add_argument(
        "--explain", action="store_true", help="list each rule in evaluation order and why it matched or not"
    )
    check.set_defaults(run=run_check)
    test = commands.add_parser(
        "test", help="run a table of cases against a policy; exit 0 all pass, 1 any fails, 2 bad input"
    )
    test.add_argument("policy", help="policy file (native YAML/JSON or gRPC authz JSON)")
    test.add_argument(
        "cases", help="cases file (YAML, or JSON for .json): caller (spiffe_id or cert), method, headers, expect, rule"
    )
    test.set_defaults(run=run_test)
    replay = commands.add_parser(
        "replay",
        help="decide the calls of an audit log again with a new policy; exit 0 nothing changes, 1 some "
        "decisions change, 2 bad input",
    )
    replay.add_argument(
        "policy", metavar="NEW_POLICY", help="the new policy file (native YAML/JSON or gRPC authz JSON)"
    )
    replay.add_argument(
        "--audit-log", required=True, metavar="FILE", help="meshid.audit records, one per line (authz {...} or JSON)"
    )
    replay.add_argument(
        "--trust-domain",
        help="the server's own trust domain, the default scope of subject and DNS rules (default: each "
        "record's: the caller's, or for a certificate without a SPIFFE ID the one that vouched for it)",
    )
    replay.set_defaults(run=run_replay)


def full_method(text: str) -> str:
    """The argparse type of --method: checked as the policy loader checks a rule's methods
    (the same function, the same hint), and one method, not a pattern."""
    try:
        kind, _ = method_pattern(text)
    except InvalidPolicyError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    if kind != "exact":
        raise argparse.ArgumentTypeError(f"method {text!r}: give the one method called, /package.Service/Method")
    return text


def _peer(args: argparse.Namespace, local: TrustDomain | None) -> PeerIdentity:
    if args.spiffe_id is not None:
        from meshid.cli._cases import spiffe_peer

        return spiffe_peer(SpiffeId.parse(args.spiffe_id))
    chain = load_chain(args.cert)
    leaf = chain[0]
    sid = spiffe_id_from_certificate(leaf) if _x509.uri_sans(leaf) else None
    if args.bundle:
        if sid is not None:
            BundleSet.of(TrustBundle.load(sid.trust_domain, args.bundle)).verify(leaf, chain[1:])
        elif local is not None:
            BundleSet.of(TrustBundle.load(local, args.bundle)).verify_any(leaf, chain[1:])
        else:
            raise InvalidSvidError(
                "--bundle: the certificate carries no SPIFFE ID to pick a trust domain by; pass --trust-domain"
            )
    else:
        print(
            "meshid: warning: --cert was not verified (no --bundle): the decision takes its identity at its word; "
            "give --bundle FILE to verify its chain first",
            file=sys.stderr,
        )
    return PeerIdentity.from_certificate(leaf, None if sid is not None else local, spiffe_id=sid)


def _scope(policy: AuthorizationPolicy, local: TrustDomain | None, given: bool) -> str:
    """Which trust domains scoped subject and DNS rules (those without their own vouched_by)."""
    if policy.non_spiffe_trust_domains:
        names = ", ".join(sorted(t.name for t in policy.non_spiffe_trust_domains))
        return f"{names} (the policy's allow_non_spiffe_peers)"
    if local is None:
        return "none, so they match nobody (pass --trust-domain, the server's trust domain)"
    if given:
        return f"{local.name} (--trust-domain)"
    return f"{local.name} (the caller's trust domain; pass --trust-domain to give the server's)"


def run_check(args: argparse.Namespace) -> int:
    policy = AuthorizationPolicy.load(args.policy)
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidPolicyError(f"--header {item!r}: write KEY=VALUE")
        headers[key.lower()] = value
    given = TrustDomain.parse(args.trust_domain) if args.trust_domain is not None else None
    peer = _peer(args, given)
    local = given or (peer.trust_domain if peer.spiffe_id is not None else None)
    decision = policy.decide(peer, args.method, headers, local_trust_domain=local)
    print(f"{decision.decision.upper()} {peer.describe()} {args.method}: {decision.reason}")
    print(f"subject and DNS rules scoped to: {_scope(policy, local, given is not None)}")
    if args.explain:
        _print_explanation(policy, peer, args.method, headers, local)
    return 0 if decision.allowed else 1


def _print_explanation(
    policy: AuthorizationPolicy, peer: PeerIdentity, method: str, headers: dict[str, str], local: TrustDomain | None
) -> None:
    from meshid.authz.explain import explain

    gate, checks = explain(policy, peer, method, headers, local_trust_domain=local)
    if gate is not None:
        print(f"decided before any rule: {gate}")
    print("rules in evaluation order (deny rules first, then allow rules):")
    width = max((len(c.rule.name) for c in checks), default=0)
    for number, check in enumerate(checks, 1):
        mark = "MATCH" if check.matched else "no   " if check.reached else "-    "
        print(f"  {number:>3}. {check.rule.action:<5} {check.rule.name:<{width}}  {mark} {check.why}")
    if gate is None and not any(c.matched for c in checks):
        print("no rule matched: denied by default")


def run_test(args: argparse.Namespace) -> int:
    from meshid.cli import _cases

    policy = AuthorizationPolicy.load(args.policy)
    cases = _cases.load_cases(args.cases)  # every case is checked before any runs
    failed = 0
    for case in cases:
        outcome = _cases.run_case(policy, case)
        if not outcome.passed:
            failed += 1
            print(
                f"FAIL {case.name}: {case.peer.describe()} {case.method}: expected {_cases.expected(case)}, "
                f"got {_cases.actual(outcome.decision)}"
            )
    print(f"{len(cases) - failed} passed, {failed} failed ({len(cases)} cases, policy {policy.name!r})")
    return 1 if failed else 0


def run_replay(args: argparse.Namespace) -> int:
    from meshid.cli import _replay

    policy = AuthorizationPolicy.load(args.policy)
    local = TrustDomain.parse(args.trust_domain) if args.trust_domain is not None else None
    result = _replay.replay(policy, args.audit_log, local)
    for (caller, method, before, after), count in sorted(result.changed.items(), key=lambda kv: (-kv[1], kv[0])):
        outcome = "would_allow" if after.startswith("allow") else "would_deny"
        print(f"{outcome:<11} {count:>6}  {caller} {method}: {before} -> {after}")
    changed = sum(result.changed.values())
    print(
        f"replayed {result.replayed} decisions with policy {policy.name!r}: {changed} would change "
        f"({len(result.changed)} caller/method pairs), {result.unchanged} unchanged "
        f"({result.other_rule} by another rule); skipped {result.not_by_policy} records not decided by a "
        f"policy and {result.other_lines} other lines"
    )
    if policy.uses_headers:
        print("note: audit records carry no request headers; header conditions were matched against none")
    return 1 if changed else 0
