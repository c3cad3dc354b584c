"""``meshid ca init|serve``: create and run the issuing service."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

from meshid.cli._common import DURATION_FORMAT, address, duration, show, stop_on_signals


def register(groups: Any) -> None:
    group = groups.add_parser("ca", help="create and run meshid's certificate authority")
    commands = group.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="create a CA: key (0600), certificate, bundle.pem, database, admin SVID")
    init.add_argument(
        "--data-dir", required=True, metavar="DIR", help="a folder for the CA's files: new, or one without a CA in it"
    )
    init.add_argument(
        "--trust-domain", required=True, metavar="TD", help="the trust domain the CA issues for, e.g. example.org"
    )
    init.add_argument(
        "--ttl",
        type=duration,
        default=duration("24h"),
        help=f"the longest SVID TTL this CA issues, the admin SVID's included (default 24h; {DURATION_FORMAT})",
    )
    init.add_argument(
        "--upstream-cert", metavar="FILE", help="an existing CA certificate to chain under (PEM, its chain may follow)"
    )
    init.add_argument("--upstream-key", metavar="FILE", help="the upstream CA's private key (PEM)")
    init.add_argument(
        "--datastore",
        metavar="postgresql://...",
        help="a PostgreSQL database shared by CA replicas (default: DIR/meshid.db, SQLite); needs --upstream-*",
    )
    init.add_argument(
        "--dns-suffix",
        action="append",
        default=[],
        metavar="SUFFIX",
        help="with --upstream-*: a DNS suffix entries' DNS names may end in (repeatable; none by default)",
    )
    init.add_argument(
        "--agent-ca",
        metavar="FILE",
        help="node agents may attest by x509pop with host certificates of this PKI (PEM roots; copied to DIR)",
    )
    init.add_argument(
        "--agent-id-template",
        metavar="TEMPLATE",
        help="with --agent-ca: the agent's name from its host certificate, from {cn} {san_dns} {serial} "
        "{fingerprint} and letters, digits . - _ (default {cn}); the agent is spiffe://TD/meshid/agent/<name>",
    )
    init.add_argument(
        "--ocsp-url",
        metavar="URL",
        help="every SVID names this OCSP responder (AIA), e.g. http://ca.example.org:8080/ (see serve --ocsp-listen)",
    )
    init.add_argument(
        "--crl-url",
        metavar="URL",
        help="every SVID names this CRL (CRL distribution point), e.g. http://HOST:PORT/crl.der",
    )
    init.add_argument(
        "--key-type",
        default="ec-p256",
        choices=("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ml-dsa-65"),
        help="the CA key (default ec-p256); ml-dsa-65 makes a post-quantum-only CA, which grpcio cannot serve yet: "
        "to have both, init a classical CA, then `meshid ca key add --key-type ml-dsa-65`",
    )
    init.add_argument(
        "--jwt-key-type",
        choices=("ec-p256", "ec-p384", "rsa-2048"),
        default="ec-p256",
        help="the JWT-SVID signing key, separate from the X.509 CA key: ec-p256 (ES256, default), ec-p384 "
        "(ES384) or rsa-2048 (RS256); rotations keep the type",
    )
    init.set_defaults(run=run_init)
    key = commands.add_parser("key", help="a second, post-quantum CA beside the classical one")
    key_steps = key.add_subparsers(dest="step", required=True)
    key_add = key_steps.add_parser(
        "add", help="add an ML-DSA-65 CA: its root joins bundle.pem; it signs the SVIDs of ML-DSA-65 CSRs"
    )
    key_add.add_argument("--data-dir", required=True, metavar="DIR", help="the CA's folder (a running CA takes it up)")
    key_add.add_argument("--key-type", default="ml-dsa-65", choices=("ml-dsa-65",), help="the added CA's key")
    key_add.set_defaults(run=run_key_add)
    config = commands.add_parser("config", help="change a CA's configuration (a running CA picks it up)")
    config_steps = config.add_subparsers(dest="step", required=True)
    config_set = config_steps.add_parser("set", help="set the OCSP and CRL URLs SVIDs carry from now on")
    config_set.add_argument(
        "--data-dir", required=True, metavar="DIR", help="the CA's folder (a running CA takes it up)"
    )
    config_set.add_argument("--ocsp-url", metavar="URL", help='the OCSP responder\'s URL ("" removes it)')
    config_set.add_argument("--crl-url", metavar="URL", help='the CRL\'s URL ("" removes it)')
    config_set.set_defaults(run=run_config_set)
    serve = commands.add_parser("serve", help="serve the issuer and registration APIs over mTLS")
    serve.add_argument("--data-dir", required=True, metavar="DIR", help="the folder `meshid ca init` created")
    serve.add_argument(
        "--listen",
        required=True,
        type=address(port_zero=True, unix=True),
        metavar="HOST:PORT",
        help="where to serve, e.g. 127.0.0.1:8443 or 0.0.0.0:8443 (port 0: any free port, printed)",
    )
    serve.add_argument("--datastore", metavar="postgresql://...", help="override the datastore `ca init` recorded")
    serve.add_argument(
        "--metrics",
        type=address(port_zero=True),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    serve.add_argument(
        "--ocsp-listen",
        type=address(port_zero=True),
        metavar="HOST:PORT",
        help="serve the OCSP responder (RFC 6960, GET and POST) and the CRL (/crl.der, /crl.pem) over HTTP here",
    )
    serve.add_argument(
        "--ocsp-validity",
        type=duration,
        default=None,
        metavar="DURATION",
        help=f"how long an OCSP response stays valid, its nextUpdate (default 5m; {DURATION_FORMAT})",
    )
    serve.set_defaults(run=run_serve, long_running=True)
    rotate = commands.add_parser("rotate", help="rotate the CA's signing key with no failed handshake")
    steps = rotate.add_subparsers(dest="step", required=True)
    prepare = steps.add_parser(
        "prepare", help="create the next CA and JWT signing key and publish their root and key in the bundle"
    )
    prepare.add_argument("--data-dir", required=True, metavar="DIR", help="the CA's folder")
    prepare.add_argument(
        "--upstream-cert", metavar="FILE", help="chain the next CA under this upstream CA certificate (PEM)"
    )
    prepare.add_argument("--upstream-key", metavar="FILE", help="the upstream CA's private key (PEM)")
    prepare.add_argument(
        "--key-type", choices=("ml-dsa-65",), help="rotate the ML-DSA CA `ca key add` made instead of the first"
    )
    prepare.add_argument(
        "--jwt-only", action="store_true", help="prepare only the next JWT signing key (the X.509 CA stays as it is)"
    )
    prepare.set_defaults(run=run_prepare)
    activate = steps.add_parser(
        "activate",
        help="sign with what is prepared; the old root retires after the max TTL, the old JWT key after 5 minutes",
    )
    activate.add_argument("--data-dir", required=True, metavar="DIR", help="the CA's folder")
    activate.add_argument(
        "--grace",
        type=duration,
        default=duration("5m"),
        help=f"extra time before the old root leaves (default 5m; {DURATION_FORMAT})",
    )
    activate.add_argument(
        "--key-type", choices=("ml-dsa-65",), help="activate the ML-DSA CA's rotation instead of the first CA's"
    )
    activate.set_defaults(run=run_activate)
    status = steps.add_parser("status", help="the roots and JWT keys in the bundle and what is retiring when")
    status.add_argument("--data-dir", required=True, metavar="DIR", help="the CA's folder")
    status.set_defaults(run=run_status)


def _datastore(args: argparse.Namespace) -> str | None:
    """--datastore, with a warning on stderr when its DSN holds a password: the process list
    (``ps``, ``/proc/PID/cmdline``) shows it to every local user for as long as the CA runs."""
    dsn: str | None = args.datastore
    if dsn is None:
        return dsn
    try:
        from meshid.ca.store.postgres import _redact
    except ImportError:  # no psycopg: opening the store says so
        return dsn
    try:
        secrets = _redact(dsn)[1]
    except ValueError:  # a DSN libpq cannot parse: opening the store says so
        return dsn
    if secrets:
        print(
            "meshid: warning: --datastore puts the database password in the process list, where every local "
            "user can read it; leave it out of the DSN and give it in $PGPASSWORD or a password file "
            "($PGPASSFILE, ~/.pgpass), which libpq reads, or let `ca serve` use the DSN `ca init` recorded "
            "(config.json, mode 0600)",
            file=sys.stderr,
            flush=True,
        )
    return dsn


def run_init(args: argparse.Namespace) -> int:
    from meshid.ca.datadir import init_data_dir

    config = init_data_dir(
        args.data_dir,
        args.trust_domain,
        max_ttl=args.ttl,
        upstream_cert=args.upstream_cert,
        upstream_key=args.upstream_key,
        datastore=_datastore(args),
        dns_suffixes=args.dns_suffix,
        agent_ca=args.agent_ca,
        agent_id_template=args.agent_id_template,
        ocsp_url=args.ocsp_url,
        crl_url=args.crl_url,
        key_type=args.key_type,
        jwt_key_type=args.jwt_key_type,
    )
    print(f"CA for trust domain {config.trust_domain} created in {args.data_dir} ({args.key_type} key)")
    print(f"  JWT-SVIDs signed by its own {args.jwt_key_type} key: {args.data_dir}/jwt-keys.json")
    print(f"  trust bundle: {args.data_dir}/bundle.pem   admin SVID: {args.data_dir}/admin/")
    print(f"  SVIDs last at most {show(config.max_ttl)} (--ttl), the admin SVID too; `meshid ca serve` renews it")
    if config.agent_id_template is not None:
        print(f"  x509pop: node agents named {config.agent_id_template} from host certificates of {args.agent_ca}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from meshid.ca.server import CaServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # Every allowed call (each agent's bundle, CRL and renewal) would be an audit line: refusals
    # only, as `meshid agent` does; the CA's own INFO lines say what changed.
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)
    server = CaServer(
        args.data_dir,
        args.listen,
        datastore=_datastore(args),
        ocsp_listen=args.ocsp_listen,
        ocsp_validity=args.ocsp_validity,
    )
    metrics_port = None
    if args.metrics:  # bound first: an address in use is refused before the CA does anything
        from meshid.metrics import serve_metrics

        metrics_port = serve_metrics(args.metrics)
    stop = threading.Event()
    stop_on_signals(stop)  # before the announcement: a SIGTERM right after it stops cleanly
    port = server.start()  # MeshIdError (one line, exit 2) if --listen is in use
    # The one announcement (the log line of CaServer.start is DEBUG); scripts read the address here.
    print(f"CA serving on {args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    if server.ocsp_port is not None:
        host = args.ocsp_listen.rsplit(":", 1)[0]
        print(f"CA OCSP responder and CRL on http://{host}:{server.ocsp_port}", flush=True)
    if metrics_port is not None:
        print(f"CA metrics on http://{args.metrics.rsplit(':', 1)[0]}:{metrics_port}/metrics", flush=True)
    stop.wait()
    server.stop()
    print("CA stopped", flush=True)
    return 0


def run_config_set(args: argparse.Namespace) -> int:
    from meshid.ca.datadir import set_revocation_urls

    config = set_revocation_urls(args.data_dir, ocsp_url=args.ocsp_url, crl_url=args.crl_url)
    print(f"OCSP URL: {config.ocsp_url or '(none)'}   CRL URL: {config.crl_url or '(none)'}")
    print("SVIDs issued from now on carry them (a running `meshid ca serve` reloads config.json)")
    return 0


def run_key_add(args: argparse.Namespace) -> int:
    from meshid import _x509
    from meshid.ca.datadir import add_key_type

    cert = add_key_type(args.data_dir, args.key_type)
    print(f"added {cert.subject.rfc4514_string()} ({args.key_type}); its root is in {args.data_dir}/bundle.pem now")
    print(f"  root {_x509.thumbprint(cert)[:16]}: it signs the SVIDs whose CSRs carry {args.key_type} keys")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from meshid.ca.datadir import load_jwt_keys, prepare_jwt_rotation, prepare_rotation

    if args.jwt_only:
        if args.upstream_cert or args.upstream_key or args.key_type:
            print(
                "meshid: ca rotate prepare: --jwt-only takes no --upstream-cert/--upstream-key/--key-type",
                file=sys.stderr,
            )
            return 2
        key = prepare_jwt_rotation(args.data_dir)
        print(f"prepared JWT key {key.kid}; the bundle publishes it now, it signs nothing yet.")
        print(f"Activate once relying parties have fetched the new bundle: {_activate_command(args.data_dir)}")
        return 0
    cert = prepare_rotation(
        args.data_dir, upstream_cert=args.upstream_cert, upstream_key=args.upstream_key, key_type=args.key_type
    )
    print(f"prepared {cert.subject.rfc4514_string()}; its root is in {args.data_dir}/bundle.pem now.")
    keys = load_jwt_keys(args.data_dir)
    if keys is not None and keys.prepared is not None:
        print(f"prepared JWT key {keys.prepared.kid}; the bundle publishes it now.")
    activate = _activate_command(args.data_dir, args.key_type)
    print(f"Activate once workloads have fetched the new bundle (one refresh interval): {activate}")
    return 0


def _activate_command(data_dir: str, key_type: str | None = None) -> str:
    """The command that activates what ``prepare`` made, as it can be pasted."""
    import shlex

    flag = f" --key-type {key_type}" if key_type else ""
    return f"meshid ca rotate activate --data-dir {shlex.quote(data_dir)}{flag}"


def run_activate(args: argparse.Namespace) -> int:
    from meshid.ca.datadir import activate_rotation

    activate_rotation(args.data_dir, grace=args.grace, key_type=args.key_type)
    print("activated: the CA signs with what was prepared; old keys leave the bundle once what they signed has expired")
    return 0


def run_status(args: argparse.Namespace) -> int:
    import json
    import pathlib

    from meshid import _x509
    from meshid.ca.datadir import load_authority, load_jwt_keys, load_pq_authority
    from meshid.ca.jwt_keys import key_type

    authority, _ = load_authority(args.data_dir)
    signing = {_x509.thumbprint(authority.certificate)}
    pq = load_pq_authority(args.data_dir)
    if pq is not None:
        signing.add(_x509.thumbprint(pq.certificate))
    for root in authority.roots:
        mark = f"signing ({_x509.key_algorithm(root.public_key())})" if _x509.thumbprint(root) in signing else ""
        print(f"root {_x509.thumbprint(root)[:16]}  {root.subject.rfc4514_string()}  {mark}")
    for lane, flag in (
        (pathlib.Path(args.data_dir), ""),
        (pathlib.Path(args.data_dir) / "ml-dsa-65", " --key-type ml-dsa-65"),
    ):
        rotation = lane / "rotation.json"
        if rotation.exists():
            for item in json.loads(rotation.read_text()).get("retiring", []):
                print(f"retiring {str(item['fingerprint'])[:16]} after {item['retire_after']}")
        if (lane / "next" / "ca.key").exists():
            print(f"a next CA is prepared; run `{_activate_command(args.data_dir)}{flag}`")
    keys = load_jwt_keys(args.data_dir)
    if keys is not None:
        print(f"JWT key {keys.signing.kid}  {key_type(keys.signing.private_key)}  signing")
        if keys.prepared is not None:
            print(f"JWT key {keys.prepared.kid}  {key_type(keys.prepared.private_key)}  prepared")
        for old in keys.retiring:
            print(f"JWT key {old.kid}  {key_type(old.public_key)}  retiring after {old.retire_after.isoformat()}")
    return 0
