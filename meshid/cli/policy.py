"""``meshid policy check``: what a policy decides for a caller and a method, offline."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from meshid import _x509
from meshid.authz.policy import AuthorizationPolicy
from meshid.bundle import BundleSet, TrustBundle
from meshid.cli.svid import load_chain
from meshid.errors import InvalidPolicyError, InvalidSvidError
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId
from meshid.svid import spiffe_id_from_certificate


def register(groups: Any) -> None:
    group = groups.add_parser("policy", help="work with authorization policies")
    commands = group.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="print the decision and deciding rule; exit 0 allow, 1 deny, 2 bad input")
    check.add_argument("policy", help="policy file (native YAML/JSON or gRPC authz JSON)")
    who = check.add_mutually_exclusive_group(required=True)
    who.add_argument("--spiffe-id", help="the caller's SPIFFE ID")
    who.add_argument("--cert", help="the caller's certificate (PEM, leaf first)")
    check.add_argument("--bundle", help="verify --cert against this trust bundle (PEM) first")
    check.add_argument("--method", required=True, help="the full method, /package.Service/Method")
    check.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="a request header")
    check.set_defaults(run=run_check)


def _peer(args: argparse.Namespace) -> PeerIdentity:
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
        if sid is None:
            raise InvalidSvidError("--bundle: the certificate carries no SPIFFE ID to pick a trust domain by")
        BundleSet.of(TrustBundle.load(sid.trust_domain, args.bundle)).verify(leaf, chain[1:])
    return PeerIdentity.from_certificate(leaf, spiffe_id=sid)


def run_check(args: argparse.Namespace) -> int:
    policy = AuthorizationPolicy.load(args.policy)
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidPolicyError(f"--header {item!r}: write KEY=VALUE")
        headers[key.lower()] = value
    peer = _peer(args)
    decision = policy.decide(peer, args.method, headers)
    print(f"{decision.decision.upper()} {peer.describe()} {args.method}: {decision.reason}")
    return 0 if decision.allowed else 1
