"""``meshid svid ...``: fetch, inspect and revoke SVIDs (inspect also reads CA certificates)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from typing import Any

from cryptography import x509

from meshid import _x509
from meshid.bundle import ca_trust_domains
from meshid.cli._common import (
    EXIT_NEGATIVE,
    add_admin_options,
    add_join_token_options,
    address,
    ca_bundle,
    join_token,
    show,
    writable_out,
)
from meshid.errors import InvalidSvidError
from meshid.svid import check_leaf


def register(groups: Any) -> None:
    group = groups.add_parser("svid", help="fetch, inspect and revoke X509-SVIDs")
    commands = group.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="show an SVID's (or a CA certificate's) identity, serial, validity and time left, thumbprint and "
        "chain; exit 1 if it has expired or is not yet valid",
    )
    inspect.add_argument("file", help="PEM certificate chain, leaf first (an SVID, or a CA certificate such as ca.pem)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=run_inspect)
    fetch = commands.add_parser("fetch", help="obtain an SVID from the CA with a join token")
    fetch.add_argument(
        "--server",
        required=True,
        action="append",
        type=address(),
        metavar="HOST:PORT",
        help="the CA (repeat: replicas, tried in turn)",
    )
    fetch.add_argument(
        "--bundle",
        required=True,
        type=ca_bundle,
        metavar="FILE",
        help="the CA's trust bundle (PEM), obtained out of band",
    )
    add_join_token_options(fetch, required=True)
    fetch.add_argument("--out", required=True, metavar="DIR", help="writes svid.pem, svid.key (0600), bundle.pem")
    fetch.add_argument(
        "--key-type",
        choices=("ec-p256", "ml-dsa-65"),
        default="ec-p256",
        help="the SVID's key (default ec-p256); ml-dsa-65 for an entry created with --svid-types ml-dsa-65",
    )
    fetch.set_defaults(run=run_fetch)
    revoke = commands.add_parser("revoke", help="revoke SVIDs on the running CA")
    add_admin_options(revoke)
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--serial", help="one SVID, by serial (hex, as `svid inspect` shows it)")
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
    if len(data) > _x509.MAX_PEM_BYTES:
        raise InvalidSvidError(
            f"X509-SVID: {path!r} is larger than {_x509.MAX_PEM_BYTES} bytes; no certificate chain is"
        )
    try:
        blocks = _x509.pem_blocks(data)
    except ValueError as err:
        raise InvalidSvidError(f"X509-SVID: {path!r}: {err}") from err
    if not blocks:
        raise InvalidSvidError(f"X509-SVID: no PEM certificate in {path!r}")
    chain = []
    for index, (label, block) in enumerate(blocks):
        if label != "CERTIFICATE":
            hint = "; give the certificate file (svid.pem), not its key" if label.endswith("PRIVATE KEY") else ""
            raise InvalidSvidError(f"X509-SVID: block {index} of {path!r} is a {label!r}, expected 'CERTIFICATE'{hint}")
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
        "key_algorithm": _x509.key_algorithm(cert.public_key()),
        "signature_algorithm": _x509.signature_algorithm(cert),
    }


def validity(cert: x509.Certificate, now: datetime.datetime) -> tuple[str, str]:
    """("valid" | "expired" | "not yet valid", and in words how long it has left, or since or until when)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return "not yet valid", f"valid from {start.isoformat()}, in {show(start - now)}"
    if now > end:
        return "expired", f"expired at {end.isoformat()}, {show(now - end)} ago"
    return "valid", f"{show(end - now)} left"


def _name_constraints(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return []
    out = [f"permitted {n.value}" for n in ext.permitted_subtrees or ()]
    return out + [f"excluded {n.value}" for n in ext.excluded_subtrees or ()]


def _refuse_ca_with_workload_id(cert: x509.Certificate, path: str) -> None:
    """A CA whose SPIFFE ID has a path is neither an SVID (never a CA) nor a SPIFFE signing
    certificate (its SPIFFE ID, if any, names only the trust domain)."""
    for uri in _x509.uri_sans(cert):
        if uri[:7].lower() == "spiffe:" and "/" in uri[len("spiffe://") :]:
            raise InvalidSvidError(
                f"X509-SVID: {path!r}: the certificate is a CA (basicConstraints CA:true) yet carries the workload "
                f"SPIFFE ID {uri[:120]}: an SVID is never a CA, and a CA's SPIFFE ID names only its trust domain"
            )


def _linked(chain: list[x509.Certificate]) -> int:
    """How many certificates from the first on form a chain, each the issuer of the one before;
    what follows (a bundle.pem's other roots) is in the file but not in the chain."""
    count = 1
    while count < len(chain) and chain[count - 1].issuer == chain[count].subject and not _self_signed(chain[count - 1]):
        count += 1
    return count


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def run_inspect(args: argparse.Namespace) -> int:
    chain = load_chain(args.file)
    leaf = chain[0]
    now = datetime.datetime.now(datetime.UTC)
    try:  # cryptography reads names and extensions lazily: any of them may be malformed
        info: dict[str, Any] = {"file": os.fspath(args.file)}
        if _x509.is_ca(leaf):
            _refuse_ca_with_workload_id(leaf, args.file)
            info["kind"] = "CA certificate"
            info["trust_domains"] = sorted(ca_trust_domains(leaf))
            info["name_constraints"] = _name_constraints(leaf)
        else:
            info["kind"] = "X509-SVID"
            info["spiffe_id"] = str(check_leaf(leaf))
        info.update(describe(leaf))
        info["chain"] = [describe(c) for c in chain[1:]]
    except InvalidSvidError:
        raise  # meshid's own verdict (also a ValueError): as it is
    except _x509.READ_ERRORS as err:
        raise InvalidSvidError(f"X509-SVID: a certificate in {args.file!r} cannot be read: {err}") from err
    status, when = validity(leaf, now)
    info["status"] = status
    info["seconds_left"] = max(0, int((leaf.not_valid_after_utc - now).total_seconds()))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        if info["kind"] == "CA certificate":
            print("Kind:        CA certificate (it signs SVIDs; it is not one)")
            print(f"Trust domain: {', '.join(info['trust_domains']) or '- (no SPIFFE ID URI SAN)'}")
            print(f"Constraints: {'; '.join(info['name_constraints']) or '-'}")
        else:
            print(f"SPIFFE ID:   {info['spiffe_id']}")
        print(f"Subject:     {info['subject']}")
        print(f"Issuer:      {info['issuer']}")
        print(f"Serial:      {info['serial']}")
        print(f"Not before:  {info['not_before']}")
        print(f"Not after:   {info['not_after']}")
        print(f"Status:      {status} ({when})")
        print(f"Thumbprint:  {info['thumbprint']} (SHA-256)")
        # Post-quantum only if every signature in the file is: an ECDSA signature on an ML-DSA
        # intermediate forges every leaf under it.
        linked = _linked(chain)
        signatures = [info["signature_algorithm"], *(c["signature_algorithm"] for c in info["chain"][: linked - 1])]
        classical = next((a for a in signatures if not _x509.is_post_quantum(a)), None)
        note = ""
        if _x509.is_post_quantum(info["key_algorithm"]):
            note = " (post-quantum)" if classical is None else f" (not post-quantum: its chain carries {classical})"
        print(f"Algorithms:  key {info['key_algorithm']}, signed with {info['signature_algorithm']}{note}")
        if info["kind"] != "CA certificate":
            print(f"DNS SANs:    {', '.join(info['dns_sans']) or '-'}")
        for index, cert in enumerate(info["chain"], start=1):
            label = f"Chain [{index}]:  " if index < linked else "Also in file:"  # a bundle's other roots
            print(f"{label} {cert['subject']} (serial {cert['serial']}, until {cert['not_after']})")
    if status == "valid":
        return 0
    what = (
        "it must be renewed: `meshid svid fetch` or `meshid agent`"
        if info["kind"] == "X509-SVID"
        else ("the CA must be rotated (`meshid ca rotate`)" if status == "expired" else "check the clocks")
    )
    print(f"meshid: {info['kind']} {args.file!r}: {status}: {when}; {what}", file=sys.stderr)
    return EXIT_NEGATIVE


def run_fetch(args: argparse.Namespace) -> int:
    from meshid.ca.client import fetch_svid, write_fetched

    token = join_token(args) or ""
    writable_out(args.out, "svid fetch")
    svid, bundle = fetch_svid(args.server, args.bundle, token, key_kind=args.key_type)
    write_fetched(args.out, svid, bundle)
    print(f"fetched {svid.spiffe_id} (serial {svid.serial:x}, until {svid.not_after.isoformat()}) into {args.out}")
    return 0


def _already_revoked(args: argparse.Namespace, serial: int) -> bool:
    """Whether the CA's current CRL already lists ``serial`` (the CA answers a second revocation
    as it did the first); read with the admin SVID, verified against the CA's bundle."""
    from meshid.ca.client import get_crl_with_svid
    from meshid.revocation import RevocationList
    from meshid.sources import FileSource

    folder = os.path.join(args.data_dir, "admin")
    admin = FileSource(*(os.path.join(folder, name) for name in ("svid.pem", "svid.key", "bundle.pem")))
    svid, bundles = admin.get_svid(), admin.get_bundles()
    der, issuer_chain = get_crl_with_svid(args.server, svid, bundles)
    return serial in RevocationList.from_der(der, issuer_chain, bundles).serials


def run_revoke(args: argparse.Namespace) -> int:
    from meshid.ca.client import AdminClient

    already = False
    if args.serial:
        with contextlib.suppress(ValueError):  # not hexadecimal: the CA says so, in its words
            already = _already_revoked(args, int(args.serial, 16))
    with AdminClient(args.server, args.data_dir) as admin:
        serials = admin.revoke(serial=args.serial or "", spiffe_id=args.spiffe_id or "")
    for serial in serials:
        print(f"{serial} was already revoked; nothing changed" if already else f"revoked {serial}")
    if not serials:
        print("nothing to revoke: no unexpired, unrevoked SVID of this SPIFFE ID")
    return 0
