"""``meshid entry ...`` and ``meshid token create``: registration, through the running CA
(entries may name a node agent as their parent, with selectors; tokens may be for a node agent)."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from meshid.cli._common import DURATION_FORMAT, add_admin_options, duration, show


def register(groups: Any) -> None:
    group = groups.add_parser("entry", help="registration entries on the running CA")
    commands = group.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="register a SPIFFE ID")
    add_admin_options(create)
    create.add_argument("--spiffe-id", required=True, help="the SPIFFE ID to register, e.g. spiffe://example.org/web")
    create.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="a DNS name for its SVIDs (repeatable)"
    )
    create.add_argument(
        "--ttl",
        type=duration,
        help=f"SVID lifetime (default 1h, capped by the CA's `ca init --ttl`; {DURATION_FORMAT})",
    )
    create.add_argument(
        "--parent-id",
        default="",
        metavar="ID",
        help="served only by this node agent (spiffe://<td>/meshid/agent/<name>), never for a join token",
    )
    create.add_argument(
        "--selector",
        action="append",
        default=[],
        metavar="S",
        help="with --parent-id: what the local process must match, e.g. unix:uid:1001 (repeatable; all must match)",
    )
    create.add_argument(
        "--svid-types",
        type=_svid_types,
        default=(),
        metavar="TYPES",
        help="which SVIDs its workload may hold: classical, ml-dsa-65, or classical,ml-dsa-65 for both "
        "(default classical; ml-dsa-65 needs `meshid ca key add` on the CA)",
    )
    create.set_defaults(run=run_create)
    listing = commands.add_parser("list", help="list registration entries")
    add_admin_options(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_list)
    delete = commands.add_parser("delete", help="delete a registration entry")
    add_admin_options(delete)
    delete.add_argument("--spiffe-id", required=True, help="the SPIFFE ID whose entry to delete")
    delete.set_defaults(run=run_delete)

    tokens = groups.add_parser("token", help="join tokens on the running CA")
    token_commands = tokens.add_subparsers(dest="command", required=True)
    token = token_commands.add_parser(
        "create", help="print a one-time join token for an entry, or for a node agent to attest with"
    )
    add_admin_options(token)
    target = token.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--spiffe-id", help="for a workload: the SPIFFE ID of an entry made without --parent-id (one SVID per token)"
    )
    target.add_argument(
        "--agent", metavar="NAME", help="a node agent: spiffe://<td>/meshid/agent/NAME attests with the token"
    )
    token.add_argument(
        "--ttl",
        type=duration,
        default=duration("10m"),
        help=f"how long the token is valid (default 10m; {DURATION_FORMAT})",
    )
    token.set_defaults(run=run_token)


def _svid_types(text: str) -> tuple[str, ...]:
    """``classical,ml-dsa-65`` as a tuple; the CA checks the names (one list of them, in issuing)."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: write names separated by commas, e.g. classical,ml-dsa-65")
    return names


def _admin(args: argparse.Namespace) -> Any:
    from meshid.ca.client import AdminClient

    return AdminClient(args.server, args.data_dir)


def run_create(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        entry = admin.create_entry(
            args.spiffe_id,
            args.dns,
            args.ttl,
            parent_id=args.parent_id,
            selectors=args.selector,
            svid_types=args.svid_types,
        )
    dns = f", dns {', '.join(entry.dns_names)}" if entry.dns_names else ""
    parent = f", parent {entry.parent_id}, selectors {' '.join(entry.selectors)}" if entry.parent_id else ""
    types = list(entry.svid_types) or ["classical"]  # a CA from before issue #18 sends none
    svids = f", svids {','.join(types)}" if types != ["classical"] else ""
    print(f"created {entry.spiffe_id} (ttl {entry.ttl_seconds}s{dns}{parent}{svids})")
    asked = int(args.ttl.total_seconds()) if args.ttl is not None else None
    if asked is not None and entry.ttl_seconds < asked:
        given = datetime.timedelta(seconds=entry.ttl_seconds)
        less = datetime.timedelta(seconds=asked - entry.ttl_seconds)
        print(
            f"  --ttl {show(args.ttl)} was capped to {show(given)}, the CA's maximum ({show(less)} less); "
            "the CA's `ca init --ttl` sets it"
        )
    return 0


def run_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        entries = admin.list_entries()
    rows = [
        {
            "spiffe_id": e.spiffe_id,
            "dns_names": list(e.dns_names),
            "ttl_seconds": e.ttl_seconds,
            "created_at": datetime.datetime.fromtimestamp(e.created_at, datetime.UTC).isoformat(),
            "parent_id": e.parent_id or None,
            "selectors": list(e.selectors),
            "svid_types": list(e.svid_types) or ["classical"],
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            dns = ",".join(row["dns_names"]) or "-"
            line = f"{row['spiffe_id']}  ttl={row['ttl_seconds']}s  dns={dns}  created={row['created_at']}"
            if row["svid_types"] != ["classical"]:
                line += f"  svids={','.join(row['svid_types'])}"
            if row["parent_id"]:
                line += f"  parent={row['parent_id']}  selectors={json.dumps(row['selectors'])}"
            print(line)
    return 0


def run_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_entry(args.spiffe_id)
    print(f"deleted {args.spiffe_id}")
    return 0


def run_token(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        if args.agent is not None:
            token = admin.create_agent_token(args.agent, args.ttl)
        else:
            token = admin.create_token(args.spiffe_id, args.ttl)
    print(token.token)
    return 0
