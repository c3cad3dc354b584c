"""Call the greeter once as the workload whose SVID is in --dir, or that a node agent serves.

    python examples/greeter/client.py --dir DIR --target 127.0.0.1:50051 \
        --server-id spiffe://example.org/ns/prod/sa/greeter
    python examples/greeter/client.py --workload-api unix:///PATH --target ... --server-id ...

Exactly one of --dir (svid.pem, svid.key, bundle.pem) and --workload-api (a SPIFFE Workload API
socket, e.g. of `meshid agent --node`, which attests this process by its kernel credentials).
Exit 0 on success; otherwise prints the status code and message (or why there is no SVID) and
exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

# grpc's C core logs failed handshakes itself ("E1201 ... ssl_transport_security.cc ... No match
# found for server name"), before and beside meshid's own message; GRPC_VERBOSITY=ERROR (or
# DEBUG) in the environment brings those lines back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc

import meshid
from meshid.examples import greeter_pb2, greeter_pb2_grpc


def identity_source(args: argparse.Namespace) -> meshid.FileSource | meshid.WorkloadApiSource:
    """The source --dir or --workload-api names (not started)."""
    if args.workload_api:
        return meshid.WorkloadApiSource(args.workload_api, timeout=args.wait)
    files = [os.path.join(args.dir, n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    return meshid.FileSource(*files, poll_interval=0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    identity = parser.add_mutually_exclusive_group(required=True)
    identity.add_argument("--dir", help="folder with svid.pem, svid.key, bundle.pem")
    identity.add_argument("--workload-api", metavar="unix:///PATH", help="a SPIFFE Workload API socket (node agent)")
    parser.add_argument(
        "--wait", type=float, default=10, metavar="SECONDS", help="with --workload-api: how long to wait for an SVID"
    )
    parser.add_argument("--target", required=True)
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--name", default="world")
    parser.add_argument(
        "--talk", type=float, default=0, metavar="SECONDS", help="keep calling (5 per second) this long"
    )
    args = parser.parse_args()
    # meshid's warnings (an expired SVID in --dir, a server that fails to prove --server-id) on stderr.
    logging.basicConfig(level=logging.WARNING, format="client: %(name)s %(levelname)s %(message)s")
    try:
        source = identity_source(args).start()
    except (meshid.MeshIdError, ValueError) as err:  # e.g. the agent issued this process no identity
        print(f"no SVID: {err}")
        return 1
    with contextlib.closing(source):
        me = source.get_svid().spiffe_id
        try:
            channel = meshid.secure_channel(args.target, source, server_id=args.server_id)
        except (meshid.MeshIdError, ValueError) as err:  # a malformed --server-id, or one no bundle covers
            print(f"client: {err}", file=sys.stderr)
            return 2
        with channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            if args.talk:
                return talk(stub, source, args.talk)
            try:
                reply = stub.SayHello(greeter_pb2.HelloRequest(name=args.name), timeout=10)
            except grpc.RpcError as err:
                print(f"{me}: {err.code().name}: {err.details()}")
                return 1
    print(f"{me}: OK: {reply.message}")
    return 0


def talk(stub: greeter_pb2_grpc.GreeterStub, source: meshid.Source, seconds: float) -> int:
    """Call continuously; print whenever either side's certificate changes; exit 1 on any failure."""
    ok = failed = 0
    last: tuple[str, str] | None = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            reply = stub.SayHello(greeter_pb2.HelloRequest(name="demo"), timeout=10)
        except grpc.RpcError as err:
            failed += 1
            print(f"  FAILED: {err.code().name}: {err.details()}", flush=True)
        else:
            ok += 1
            server_serial = reply.message.rsplit("serial ", 1)[-1].rstrip(")")
            client_serial = reply.caller.rsplit("serial ", 1)[-1]
            if (server_serial, client_serial) != last:
                print(
                    f"  greeter presents serial {server_serial[:12]}..., sees frontend serial {client_serial[:12]}...",
                    flush=True,
                )
                last = (server_serial, client_serial)
        time.sleep(0.2)
    print(f"  {ok} calls OK, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
