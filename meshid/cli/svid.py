"""``meshid svid ...``: look at SVIDs."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from cryptography import x509

from meshid import _x509
from meshid.cli._common import add_admin_options, add_join_token_options, join_token
from meshid.errors import InvalidSvidError
from meshid.svid import check_leaf


def register(groups: Any) -> None:
    group = groups.add_parser("svid", help="inspect X509-SVIDs")
    commands = group.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="show an SVID's SPIFFE ID, subject, serial, validity, thumbprint and chain"
    )
    inspect.add_argument("file", help="PEM certificate chain, leaf first")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=run_inspect)
    fetch = commands.add_parser("fetch", help="obtain an SVID from the CA with a join token")
    fetch.add_argument(
        "--server", required=True, action="append", metavar="HOST:PORT", help="the CA (repeat: replicas, tried in turn)"
    )
    fetch.add_argument(
        "--bundle", required=True, metavar="FILE", help="the CA's trust bundle (PEM), obtained out of band"
    )
    add_join_token_options(fetch, required=True)
    fetch.add_argument("--out", required=True, metavar="DIR", help="writes svid.pem, svid.key (0600), bundle.pem")
    fetch.set_defaults(run=run_fetch)
    revoke = commands.add_parser("revoke", help="revoke SVIDs on the running CA")
    add_admin_options(revoke)
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--serial", help="one SVID, by serial (hex)")
    target.add_argument("--spiffe-id", help="every unexpired SVID of this SPIFFE ID")
    revoke.set_defaults(run=run_revoke)


def load_chain(path: str) -> list[x509.Certificate]:
    """Read a PEM chain, leaf first.

    Raises:
        InvalidSvidError: unreadable, empty, or not certificates.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_x509.MAX_PEM_BYTES + 1)
    except OSError as err:
        raise InvalidSvidError(f"X509-SVID: cannot read {path!r}: {err.strerror}") from err
    try:
        blocks = _x509.pem_blocks(data)
    except ValueError as err:
        raise InvalidSvidError(f"X509-SVID: {path!r}: {err}") from err
    if not blocks:
        raise InvalidSvidError(f"X509-SVID: no PEM certificate in {path!r}")
    chain = []
    for index, (label, block) in enumerate(blocks):
        if label != "CERTIFICATE":
            raise InvalidSvidError(f"X509-SVID: block {index} of {path!r} is a {label!r}, expected 'CERTIFICATE'")
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except _x509.PARSE_ERRORS as err:
            raise InvalidSvidError(f"X509-SVID: block {index} of {path!r} is not a valid certificate: {err}") from err
    return chain


def describe(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "thumbprint": _x509.thumbprint(cert),
        "uri_sans": _x509.uri_sans(cert),
        "dns_sans": _x509.dns_sans(cert),
        "ca": _x509.is_ca(cert),
    }


def run_inspect(args: argparse.Namespace) -> int:
    chain = load_chain(args.file)
    try:  # cryptography reads names and extensions lazily: any of them may be malformed
        spiffe_id = check_leaf(chain[0])
        info = {"file": os.fspath(args.file), "spiffe_id": str(spiffe_id), **describe(chain[0])}
        info["chain"] = [describe(c) for c in chain[1:]]
    except InvalidSvidError:
        raise  # meshid's own verdict (also a ValueError): as it is
    except _x509.READ_ERRORS as err:
        raise InvalidSvidError(f"X509-SVID: a certificate in {args.file!r} cannot be read: {err}") from err
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"SPIFFE ID:   {info['spiffe_id']}")
    print(f"Subject:     {info['subject']}")
    print(f"Issuer:      {info['issuer']}")
    print(f"Serial:      {info['serial']}")
    print(f"Not before:  {info['not_before']}")
    print(f"Not after:   {info['not_after']}")
    print(f"Thumbprint:  {info['thumbprint']} (SHA-256)")
    print(f"DNS SANs:    {', '.join(info['dns_sans']) or '-'}")
    for index, cert in enumerate(info["chain"], start=1):
        print(f"Chain [{index}]:   {cert['subject']} (serial {cert['serial']}, until {cert['not_after']})")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from meshid.ca.client import fetch_svid, write_fetched

    svid, bundle = fetch_svid(args.server, args.bundle, join_token(args) or "")
    write_fetched(args.out, svid, bundle)
    print(f"fetched {svid.spiffe_id} (serial {svid.serial:x}, until {svid.not_after.isoformat()}) into {args.out}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from meshid.ca.client import AdminClient

    with AdminClient(args.server, args.data_dir) as admin:
        serials = admin.revoke(serial=args.serial or "", spiffe_id=args.spiffe_id or "")
    for serial in serials:
        print(f"revoked {serial}")
    if not serials:
        print("nothing to revoke")
    return 0
