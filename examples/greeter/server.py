"""The greeter service over mTLS, authorized by meshid's interceptor.

    python examples/greeter/server.py --dir DIR --policy examples/greeter/policy.yaml --port 50051
    python examples/greeter/server.py --workload-api unix:///PATH --policy ... --port 50051

Its identity comes from exactly one of: --dir, a folder holding svid.pem, svid.key and
bundle.pem (written by `meshid svid fetch` or a `meshid agent --out` sidecar), or
--workload-api, a SPIFFE Workload API socket (a node agent, `meshid agent --node`, which
attests this process by its kernel credentials). Either way the server follows rotations, and
changes to the policy file. It prints "listening on PORT" once ready.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any

# grpc's C core logs failed handshakes itself ("E1201 ... ssl_transport_security.cc ... No match
# found for server name"), before and beside meshid's own message; GRPC_VERBOSITY=ERROR (or
# DEBUG) in the environment brings those lines back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import meshid
from meshid import metrics
from meshid.examples import greeter_pb2, greeter_pb2_grpc


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def __init__(self, source: meshid.Source) -> None:
        self._source = source

    def SayHello(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller = meshid.peer_identity(context)
        me = self._source.get_svid()
        return greeter_pb2.HelloReply(
            message=f"hello {request.name}, from {me.spiffe_id} (certificate serial {me.serial:x})",
            caller=f"{caller.spiffe_id} serial {caller.serial:x}",
        )


def identity_source(args: argparse.Namespace) -> meshid.FileSource | meshid.WorkloadApiSource:
    """The source --dir or --workload-api names (not started)."""
    if args.workload_api:
        return meshid.WorkloadApiSource(args.workload_api)
    files = [os.path.join(args.dir, n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    return meshid.FileSource(*files, poll_interval=0.5)


def main() -> int:
    parser = argparse.ArgumentParser()
    identity = parser.add_mutually_exclusive_group(required=True)
    identity.add_argument("--dir", help="folder with svid.pem, svid.key, bundle.pem")
    identity.add_argument("--workload-api", metavar="unix:///PATH", help="a SPIFFE Workload API socket (node agent)")
    parser.add_argument("--policy", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="greeter: %(name)s %(levelname)s %(message)s")

    try:
        source = identity_source(args).start()
    except (meshid.MeshIdError, ValueError) as err:  # e.g. the agent issued this process no identity
        print(f"greeter: {err}", file=sys.stderr)
        return 2
    try:
        authz = meshid.AuthorizationInterceptor(args.policy, source=source)
    except meshid.MeshIdError as err:  # a policy file that is missing or does not load
        source.close()
        print(f"greeter: {err}", file=sys.stderr)
        return 2
    with contextlib.closing(source), authz:
        # grpc would otherwise set SO_REUSEPORT: a second server on the same port would start and
        # silently take a share of its connections. Without it, a port in use fails to bind.
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), interceptors=[authz], options=[("grpc.so_reuseport", 0)]
        )
        greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(source), server)
        # Standard health checking; the policy decides who may ask, like any other method.
        health_servicer = health.HealthServicer()
        health_servicer.set("meshid.examples.v1.Greeter", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        metrics.watch_source(source)
        address = f"127.0.0.1:{args.port}"
        try:
            port = server.add_secure_port(address, meshid.server_credentials(source))
            metrics_port = metrics.serve_metrics(args.metrics) if args.metrics else None
        except RuntimeError:
            print(f"greeter: cannot listen on {address}: the address is in use, or cannot be bound", file=sys.stderr)
            return 2
        except meshid.MeshIdError as err:
            print(f"greeter: {err}", file=sys.stderr)
            return 2
        server.start()
        if metrics_port is not None:
            print(f"metrics on {metrics_port}", flush=True)
        print(f"listening on {port}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
