"""``meshid bundle show``: a CA's trust bundle, as SPIFFE bundle JSON or PEM."""

from __future__ import annotations

import argparse
from typing import Any


def register(groups: Any) -> None:
    group = groups.add_parser("bundle", help="trust bundles")
    commands = group.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the CA's current bundle (for federation partners)")
    show.add_argument("--server", required=True, metavar="HOST:PORT")
    show.add_argument("--bundle", required=True, metavar="FILE", help="a bundle you already trust the CA by (PEM)")
    show.add_argument("--trust-domain", required=True, metavar="TD")
    show.add_argument("--format", choices=("spiffe", "pem"), default="spiffe")
    show.add_argument("--refresh-hint", type=int, default=300, metavar="SECONDS", help="spiffe_refresh_hint to publish")
    show.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    import dataclasses

    from meshid.ca.client import get_bundle_anonymously, read_roots
    from meshid.spiffeid import TrustDomain

    bundle = get_bundle_anonymously(args.server, read_roots(args.bundle), TrustDomain.parse(args.trust_domain))
    if args.format == "pem":
        print(bundle.to_pem().decode(), end="")
    else:
        print(dataclasses.replace(bundle, refresh_hint=args.refresh_hint).to_spiffe_json())
    return 0
