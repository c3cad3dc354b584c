"""Call the greeter once as the workload whose SVID is in --dir.

    python examples/greeter/client.py --dir DIR --target 127.0.0.1:50051 \
        --server-id spiffe://example.org/ns/prod/sa/greeter

Exit 0 on success; otherwise prints the status code and message and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

import meshid
from meshid._proto import greeter_pb2, greeter_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--name", default="world")
    parser.add_argument(
        "--talk", type=float, default=0, metavar="SECONDS", help="keep calling (5 per second) this long"
    )
    args = parser.parse_args()
    files = [os.path.join(args.dir, n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    with meshid.FileSource(*files, poll_interval=0.2) as source:
        me = source.get_svid().spiffe_id
        with meshid.secure_channel(args.target, source, server_id=args.server_id) as channel:
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


def talk(stub: greeter_pb2_grpc.GreeterStub, source: meshid.FileSource, seconds: float) -> int:
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
