"""``meshid policy check``: what a policy decides for a caller and a method, offline."""

from __future__ import annotations

import argparse
import datetime
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
    check.set_defaults(run=run_check)


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
        given = SpiffeId.parse(args.spiffe_id)
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
    return 0 if decision.allowed else 1
