"""``meshid agent``: the rotation loop as a sidecar that keeps SVID files current."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any


def register(groups: Any) -> None:
    agent = groups.add_parser("agent", help="keep a workload's SVID files renewed (sidecar)")
    agent.add_argument(
        "--server", required=True, action="append", metavar="HOST:PORT", help="the CA (repeat to fail over)"
    )
    agent.add_argument("--bundle", required=True, metavar="FILE", help="the CA's trust bundle (PEM)")
    agent.add_argument(
        "--join-token", metavar="TOKEN", help="for the first issuance; not needed once --out holds a valid SVID"
    )
    agent.add_argument(
        "--out", required=True, metavar="DIR", help="svid.pem, svid.key (0600), bundle.pem, written atomically"
    )
    agent.add_argument("--renew-at", type=float, default=0.5, help="fraction of the lifetime after which to renew")
    agent.set_defaults(run=run_agent)


def run_agent(args: argparse.Namespace) -> int:
    from meshid.agent import IssuerSource

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    source = IssuerSource(
        args.server, args.bundle, join_token=args.join_token, svid_dir=args.out, renew_at=args.renew_at
    )
    source.start()
    state = source.state
    print(f"agent: {state.spiffe_id} (serial {state.serial}) in {args.out}; renewing", flush=True)
    try:
        stop.wait()
    finally:
        source.close()
    print("agent: stopped", flush=True)
    return 0
