"""``meshid agent``: the rotation loop as a sidecar that keeps SVID files current and/or serves them
over the SPIFFE Workload API; ``meshid agent --node``: one node agent per host, serving each local
process the identities its selectors match; ``meshid agent list|evict``: the node agents a running
CA knows."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

from meshid.cli._common import (
    DURATION_FORMAT,
    add_admin_options,
    add_join_token_options,
    address,
    ca_bundle,
    check_join_token,
    duration,
    join_token,
    seconds,
    stop_on_signals,
    unix_socket,
    writable_out,
)


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode; write e.g. 0600 or 0660")
    return mode


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction between 0 and 1, e.g. 0.5")
    return value


def register(groups: Any) -> None:
    agent = groups.add_parser(
        "agent",
        help="keep a workload's SVID renewed: in files (--out) and/or over the Workload API (sidecar); or, with "
        "--node, serve every local workload its own identity (node agent)",
    )
    # --server and --bundle are required of the sidecar (checked in run), not of `agent list|evict`.
    agent.add_argument(
        "--server", action="append", type=address(), metavar="HOST:PORT", help="the CA (repeat to fail over; required)"
    )
    agent.add_argument("--bundle", type=ca_bundle, metavar="FILE", help="the CA's trust bundle (PEM; required)")
    add_join_token_options(agent, required=False)  # not needed once --out holds a valid SVID
    agent.add_argument("--out", metavar="DIR", help="svid.pem, svid.key (0600), bundle.pem, written atomically")
    agent.add_argument(
        "--workload-api",
        type=unix_socket,
        metavar="unix:///PATH",
        help="serve the SVID over the SPIFFE Workload API on this Unix socket (no attestation: "
        "whoever can connect gets the SVID and its key, so the socket's mode is the access control)",
    )
    agent.add_argument(
        "--workload-api-mode", type=_mode, default=0o600, metavar="MODE", help="the socket's file mode (default 0600)"
    )
    agent.add_argument(
        "--also-key-type",
        choices=("ml-dsa-65",),
        help="also keep an ML-DSA-65 SVID of the same SPIFFE ID (the CA needs `meshid ca key add`): in "
        "DIR/ml-dsa-65/ (svid.pem, svid.key, bundle.pem) and second in Workload API responses (hint ml-dsa-65)",
    )
    agent.add_argument(
        "--renew-at",
        type=_fraction,
        default=0.5,
        metavar="F",
        help="renew once this fraction of the SVID's lifetime has passed, 0 < F < 1 (default 0.5)",
    )
    agent.add_argument(
        "--wait",
        type=duration,
        metavar="DURATION",
        help="how long to keep trying the first issuance while no CA answers "
        f"({DURATION_FORMAT}; default: until one does); then exit 3",
    )
    _add_reload_options(agent)
    _add_node_options(agent)

    def run_sidecar(args: argparse.Namespace) -> int:
        required = [("--server", args.server), ("--bundle", args.bundle)]
        if args.node:
            required += [("--data-dir", args.node_data_dir), ("--socket", args.socket)]
        missing = [flag for flag, value in required if not value]
        if missing:
            agent.error(f"the following arguments are required: {', '.join(missing)}")
        return run_node(args) if args.node else run_agent(args)

    agent.set_defaults(run=run_sidecar, long_running=True)
    _register_admin_commands(agent)


def _signal(text: str) -> Any:
    from meshid.agent.reload import parse_signal

    try:
        return parse_signal(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _add_reload_options(agent: argparse.ArgumentParser) -> None:
    hook = agent.add_argument_group(
        "reload on rotation (with --out)",
        "after each new set of files is in place, run a command and/or signal a process, so that a program "
        "that reads the files (nginx, envoy) takes them up; failures are logged and counted, renewal goes on",
    )
    hook.add_argument(
        "--exec",
        dest="exec_command",
        metavar="CMD",
        help='run CMD (split into words as a shell would; no shell runs it), e.g. "nginx -s reload"',
    )
    hook.add_argument("--signal", dest="reload_signal", type=_signal, metavar="SIG", help="send SIG, e.g. HUP")
    hook.add_argument("--pid-file", metavar="FILE", help="to the process whose ID is in FILE (with --signal)")
    hook.add_argument(
        "--exec-timeout", type=_seconds, default=30.0, metavar="S", help="kill CMD after S seconds, or 1m (default 30)"
    )
    hook.add_argument(
        "--write-crl",
        action="store_true",
        help="also keep the CA's CRL in DIR/crl.pem (for nginx's ssl_crl); a new one runs the reload too",
    )
    hook.add_argument(
        "--crl-refresh",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="with --write-crl: fetch every S seconds, or 5m (default 30)",
    )


# --- `meshid agent --node`: one node agent per host -------------------------------------------


_seconds = seconds(limit=86400)


def _add_node_options(agent: argparse.ArgumentParser) -> None:
    node = agent.add_argument_group(
        "node agent (--node)",
        "one agent per host: attests the node once (a join token made with `meshid token create --agent NAME`, "
        "or x509pop with the host's certificate), then serves every local process the SVIDs of the entries "
        "parented to it whose selectors match the process",
    )
    node.add_argument("--node", action="store_true", help="run as the node agent of this host")
    node.add_argument(
        "--data-dir", dest="node_data_dir", metavar="DIR", help="the agent's own SVID, key (0600) and bundle"
    )
    node.add_argument(
        "--socket", type=unix_socket, metavar="unix:///PATH", help="serve the attested Workload API on this Unix socket"
    )
    node.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o666,
        metavar="MODE",
        help="the socket's file mode (default 0666: any local process may ask; each gets only what matches it)",
    )
    node.add_argument(
        "--sync-interval",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="seconds between entry syncs, or 1m (default 5)",
    )
    node.add_argument("--x509pop-cert", metavar="FILE", help="the host certificate (PEM, then its intermediates)")
    node.add_argument("--x509pop-key", metavar="FILE", help="the host certificate's private key (PEM)")
    node.add_argument("--trust-domain", metavar="TD", help="for x509pop (default: the one the --bundle roots name)")


def run_node(args: argparse.Namespace) -> int:
    from meshid.agent import NodeAgent
    from meshid.errors import SourceError

    for flag, value in (("--out", args.out), ("--workload-api", args.workload_api)):
        if value:
            print(f"meshid: agent: --node serves on --socket; {flag} belongs to the sidecar form", file=sys.stderr)
            return 2
    try:
        from meshid.workloadapi import AttestedWorkloadApiServer
    except ImportError as err:
        print(f"meshid: agent: --node needs grpclib ({err}); install meshid[agent]", file=sys.stderr)
        return 2
    token = join_token(args, check=False)  # its shape is checked after the options and the socket
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)
    stop = threading.Event()
    on_stop = stop_on_signals(stop)
    try:
        agent = NodeAgent(
            args.server,
            args.bundle,
            args.node_data_dir,
            join_token=token,
            x509pop_cert=args.x509pop_cert,
            x509pop_key=args.x509pop_key,
            trust_domain=args.trust_domain,
            sync_interval=args.sync_interval,
            renew_at=args.renew_at,
            wait=args.wait.total_seconds() if args.wait is not None else None,
        )
        server = AttestedWorkloadApiServer(agent, args.socket, mode=args.socket_mode)
    except ValueError as err:
        print(f"meshid: agent: {err}", file=sys.stderr)
        return 2
    server.check_free()  # before a join token is spent: a socket another agent serves is refused
    if token is not None:
        check_join_token(args, token)

    on_stop(agent.close)  # also ends start() waiting for a CA
    try:
        agent.start()  # UnreachableError (exit 3) once --wait runs out; SourceError (2) if refused
    except SourceError:
        if stop.is_set():
            print("node agent: stopped", flush=True)
            return 0
        raise
    try:
        server.start()
        state = agent.state
        print(
            f"node agent: {state.spiffe_id} (serial {state.serial}) serving {state.served} of {state.entries} "
            f"entries on unix://{server.path}; syncing every {args.sync_interval:g}s",
            flush=True,
        )
        stop.wait()
    finally:
        server.close()
        agent.close()
    print("node agent: stopped", flush=True)
    return 0


# --- `meshid agent list|evict`: node agents, through the running CA's admin API -------------


def _register_admin_commands(agent: argparse.ArgumentParser) -> None:
    """``list`` and ``evict`` beside the sidecar form, which takes no positional argument."""
    commands = agent.add_subparsers(dest="agent_command", required=False, metavar="{list,evict}")
    listing = commands.add_parser("list", help="the node agents the CA knows: attestation, last seen, SVID expiry")
    add_admin_options(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_list, long_running=False)
    evict = commands.add_parser("evict", help="revoke a node agent's SVIDs; it must attest again")
    add_admin_options(evict)
    evict.add_argument("spiffe_id", metavar="ID", help="spiffe://<td>/meshid/agent/<name>")
    evict.set_defaults(run=run_evict, long_running=False)


def _when(seconds: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat() if seconds else "-"


def run_list(args: argparse.Namespace) -> int:
    import json

    from meshid.ca.client import AdminClient

    with AdminClient(args.server, args.data_dir) as admin:
        agents = admin.list_agents()
    rows = [
        {
            "spiffe_id": a.spiffe_id,
            "attestation": a.attestation,
            "attested_by": a.attested_by or None,
            "last_seen": _when(a.last_seen),
            "svid_expires_at": _when(a.expires_at),
            "evicted": a.evicted,
        }
        for a in agents
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    for row in [] if args.json else rows:
        by = f" ({row['attested_by']})" if row["attested_by"] else ""
        state = "  EVICTED" if row["evicted"] else ""
        print(
            f"{row['spiffe_id']}  {row['attestation']}{by}  last_seen={row['last_seen']}"
            f"  svid_expires={row['svid_expires_at']}{state}"
        )
    return 0


def run_evict(args: argparse.Namespace) -> int:
    from meshid.ca.client import AdminClient

    with AdminClient(args.server, args.data_dir) as admin:
        serials = admin.evict_agent(args.spiffe_id)
    print(f"evicted {args.spiffe_id}; revoked {len(serials)} SVID(s){': ' + ' '.join(serials) if serials else ''}")
    return 0


def run_agent(args: argparse.Namespace) -> int:
    from meshid.agent import IssuerSource
    from meshid.errors import RemoteError, SourceError
    from meshid.workloadapi import WorkloadApiServer

    if not args.out and not args.workload_api:
        print("meshid: agent: give --out DIR, --workload-api unix:///PATH, or both", file=sys.stderr)
        return 2
    token = join_token(args)
    if not token and not args.out:
        print(
            "meshid: agent: without --out holding a saved SVID, give --join-token-file FILE or $MESHID_JOIN_TOKEN",
            file=sys.stderr,
        )
        return 2
    if args.out:
        writable_out(args.out, "agent")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)
    stop = threading.Event()
    on_stop = stop_on_signals(stop)
    if args.write_crl and not args.out:
        print("meshid: agent: --write-crl writes DIR/crl.pem beside the files of --out; give --out", file=sys.stderr)
        return 2
    hook = None
    if args.exec_command is not None or args.reload_signal is not None or args.pid_file is not None:
        from meshid.agent.reload import ReloadHook

        if not args.out:
            print("meshid: agent: --exec and --signal need --out: they reload what reads its files", file=sys.stderr)
            return 2
        try:
            hook = ReloadHook(
                command=args.exec_command,
                signal_to_send=args.reload_signal,
                pid_file=args.pid_file,
                timeout=args.exec_timeout,
            )
        except ValueError as err:
            print(f"meshid: agent: {err}", file=sys.stderr)
            return 2
    try:
        wait = args.wait.total_seconds() if args.wait is not None else None
        source = IssuerSource(
            args.server,
            args.bundle,
            join_token=token,
            svid_dir=args.out,
            renew_at=args.renew_at,
            wait=wait,
            pq_key_kind=args.also_key_type,
        )
        server = (
            WorkloadApiServer(source, args.workload_api, mode=args.workload_api_mode) if args.workload_api else None
        )
    except ValueError as err:
        print(f"meshid: agent: {err}", file=sys.stderr)
        return 2
    if server is not None:
        server.check_free()  # before the join token is spent: a socket another agent serves is refused

    on_stop(source.close)  # also ends start() waiting for a CA
    try:
        source.start()
    except RemoteError as err:  # no CA answered the first issuance in time
        print(f"meshid: agent: {err}", file=sys.stderr)
        return 3
    except SourceError as err:
        if stop.is_set():
            print("agent: stopped", flush=True)
            return 0
        print(f"meshid: agent: {err}", file=sys.stderr)
        return 2
    if hook is not None:  # after the first files: it runs for each new set from now on
        hook.start()
        source.subscribe(hook.changed)
    crl_writer = None
    if args.write_crl:
        from meshid.agent.crl_file import CrlFileWriter

        on_change = hook.changed if hook is not None else None
        crl_writer = CrlFileWriter(source, args.server, args.out, interval=args.crl_refresh, on_change=on_change)
        crl_writer.start()
    try:
        places = []
        if args.out:
            places.append(f"in {args.out}")
        if server is not None:
            server.start()
            places.append(f"on unix://{server.path}")
        state = source.state
        print(f"agent: {state.spiffe_id} (serial {state.serial}) {' and '.join(places)}; renewing", flush=True)
        stop.wait()
    finally:
        if server is not None:
            server.stop()
        if crl_writer is not None:
            crl_writer.close()
        source.close()
        if hook is not None:
            hook.close()
    print("agent: stopped", flush=True)
    return 0
