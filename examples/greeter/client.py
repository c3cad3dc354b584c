"""Call the greeter once as the workload whose SVID is in --dir.

    python examples/greeter/client.py --dir DIR --target 127.0.0.1:50051 \
        --server-id spiffe://example.org/ns/prod/sa/greeter

Exit 0 on success; otherwise prints the status code and message and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

import meshid
from meshid._proto import greeter_pb2, greeter_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--name", default="world")
    args = parser.parse_args()
    files = [os.path.join(args.dir, n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    me = source.get_svid().spiffe_id
    with meshid.secure_channel(args.target, source, server_id=args.server_id) as channel:
        try:
            reply = greeter_pb2_grpc.GreeterStub(channel).SayHello(greeter_pb2.HelloRequest(name=args.name), timeout=10)
        except grpc.RpcError as err:
            print(f"{me}: {err.code().name}: {err.details()}")
            return 1
    print(f"{me}: OK: {reply.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
