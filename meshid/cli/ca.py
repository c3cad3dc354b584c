"""``meshid ca init|serve``: create and run the issuing service."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from meshid.cli._common import duration


def register(groups: Any) -> None:
    group = groups.add_parser("ca", help="create and run meshid's certificate authority")
    commands = group.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create a CA: key (0600), certificate, bundle.pem, database, admin SVID")
    init.add_argument("--data-dir", required=True, metavar="DIR")
    init.add_argument("--trust-domain", required=True, metavar="TD")
    init.add_argument(
        "--ttl", type=duration, default=duration("24h"), help="the longest SVID TTL this CA issues (default 24h)"
    )
    init.add_argument(
        "--upstream-cert", metavar="FILE", help="an existing CA to chain under (PEM, its chain may follow)"
    )
    init.add_argument("--upstream-key", metavar="FILE", help="the upstream CA's private key (PEM)")
    init.set_defaults(run=run_init)
    serve = commands.add_parser("serve", help="serve the issuer and registration APIs over mTLS")
    serve.add_argument("--data-dir", required=True, metavar="DIR")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    serve.set_defaults(run=run_serve)


def run_init(args: argparse.Namespace) -> int:
    from meshid.ca.datadir import init_data_dir

    config = init_data_dir(
        args.data_dir,
        args.trust_domain,
        max_ttl=args.ttl,
        upstream_cert=args.upstream_cert,
        upstream_key=args.upstream_key,
    )
    print(f"CA for trust domain {config.trust_domain} created in {args.data_dir}")
    print(f"  trust bundle: {args.data_dir}/bundle.pem   admin SVID: {args.data_dir}/admin/")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from meshid.ca.server import CaServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    server = CaServer(args.data_dir, args.listen)
    port = server.start()
    print(f"CA serving on {args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0
