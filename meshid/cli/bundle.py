"""``meshid bundle show``: a CA's trust bundle, as SPIFFE bundle JSON or PEM."""

from __future__ import annotations

import argparse
from typing import Any

from meshid import _x509
from meshid.cli._common import address, ca_bundle, seconds


def register(groups: Any) -> None:
    group = groups.add_parser("bundle", help="trust bundles")
    commands = group.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the CA's current bundle (for federation partners)")
    show.add_argument("--server", required=True, type=address(), metavar="HOST:PORT", help="the running CA")
    show.add_argument(
        "--bundle", required=True, type=ca_bundle, metavar="FILE", help="a bundle you already trust the CA by (PEM)"
    )
    show.add_argument("--trust-domain", required=True, metavar="TD", help="the CA's trust domain, e.g. example.org")
    show.add_argument(
        "--format",
        choices=("spiffe", "pem"),
        default="spiffe",
        help="spiffe: SPIFFE bundle JSON, for federation partners (default); pem: the root certificates",
    )
    show.add_argument(
        "--refresh-hint",
        type=seconds(whole=True),
        default=300,
        metavar="SECONDS",
        help="the spiffe_refresh_hint to publish: how often partners should fetch again, in seconds or "
        "as 5m (default 300)",
    )
    show.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    import dataclasses

    from meshid.bundle import TrustBundle
    from meshid.ca.client import get_bundle_anonymously
    from meshid.spiffeid import TrustDomain

    roots = b"".join(_x509.cert_pem(root) for root in TrustBundle.load_roots(args.bundle))
    bundle = get_bundle_anonymously(args.server, roots, TrustDomain.parse(args.trust_domain))
    if args.format == "pem":
        print(bundle.to_pem().decode(), end="")
    else:
        print(dataclasses.replace(bundle, refresh_hint=int(args.refresh_hint)).to_spiffe_json())
    return 0
