"""`make bench`: meshid's costs as ratios against baselines measured in the same run.

Sections: [core] (below), [ca] issuance throughput and the renewal path against a baseline
commit side by side (bench/issuance.py), [rotation] latency and
failures while SVIDs rotate (bench/rotation.py), [replicas] issuance on PostgreSQL with one and
two CA replicas next to SQLite (bench/replicas.py), [memory] server and CA memory under floods of
long method names and under renewals (bench/memory.py), [node-agent] batch issuance against
per-workload renewal, Workload API fetch latency and the node agent's RSS (bench/node_agent.py),
[hotpath] audit records' cost per call, agents' idle refreshes at the CA, import and channel
construction (bench/hotpath.py), [rollout] the cost per call of carrying a candidate policy
(bench/rollout.py), [pq] ML-DSA-65 against ECDSA P-256: issuance rate, SVID size, handshake
time (bench/pq.py), [jwt] JWT-SVID validations/s and a JWT-authenticated call against an
mTLS-authenticated one (bench/jwt_svid.py).

Issue #2 (core):
  * median latency of a unary RPC on an mTLS server with meshid's interceptor and a
    1,000-rule policy, against the same server without the interceptor (target <= 1.05);
  * the cost of one policy decision at 10 and at 10,000 rules (target: ratio <= 1.5).

Both servers run in one process on loopback (the same interpreter and scheduling for both); the
client alternates between them in small blocks so that drift on the machine affects both alike.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from typing import Any

import grpc

import meshid
from meshid._files import write_svid_files
from meshid._proto import greeter_pb2, greeter_pb2_grpc
from meshid.ca import Authority

CALLER = "spiffe://example.org/ns/prod/sa/frontend"
SERVER = "spiffe://example.org/ns/prod/sa/greeter"
METHOD = "/meshid.examples.v1.Greeter/SayHello"


def synthetic_policy(n: int) -> dict[str, object]:
    """``n`` rules shaped like a real fleet: mostly exact IDs on specific methods, some patterns.

    Every hundredth rule is a namespace pattern for a service-wide method set; the rule that
    allows the benchmark's caller is the last one.
    """
    rules: list[dict[str, object]] = []
    for i in range(n - 1):
        service = f"/svc{i % 50}.v1.Service{i % 7}"
        if i % 100 == 99:
            rules.append(
                {
                    "name": f"r{i}",
                    "methods": [f"{service}/*"],
                    "spiffe_id_patterns": [f"spiffe://example.org/ns/team{i}/**"],
                }
            )
        else:
            rules.append(
                {
                    "name": f"r{i}",
                    "methods": [f"{service}/Get", f"{service}/List"],
                    "spiffe_ids": [f"spiffe://example.org/ns/team{i}/sa/w{i}"],
                }
            )
    rules.append({"name": "frontend", "methods": ["/meshid.examples.v1.Greeter/*"], "spiffe_ids": [CALLER]})
    return {"name": f"synthetic-{n}", "allow": rules}


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request, context):  # type: ignore[no-untyped-def]
        return greeter_pb2.HelloReply(message="hi")


def serve(folder: str) -> None:
    """Both servers in one process: the same interpreter, scheduling and CPU for the two, so the
    only difference between them is the interceptor."""
    files = [os.path.join(folder, "server", n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    policy = meshid.AuthorizationPolicy.from_dict(synthetic_policy(1000))
    servers, ports = [], []
    chains: tuple[list[grpc.ServerInterceptor[Any, Any]], ...] = (
        [],
        [meshid.AuthorizationInterceptor(policy, source=source)],
    )
    for interceptors in chains:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
        ports.append(server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source)))
        server.start()
        servers.append(server)
    print(*ports, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    for server in servers:
        server.stop(None)


def rpc_latency(folder: str, calls: int, block: int) -> tuple[float, float]:
    files = [os.path.join(folder, "client", n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    bare_port, guarded_port = (int(p) for p in proc.stdout.readline().split())
    try:
        channels = [
            meshid.secure_channel(f"127.0.0.1:{p}", source, server_id=SERVER) for p in (bare_port, guarded_port)
        ]
        stubs = [greeter_pb2_grpc.GreeterStub(c) for c in channels]  # type: ignore[no-untyped-call]
        request = greeter_pb2.HelloRequest(name="bench")
        for s in stubs:  # connect and warm up
            for _ in range(300):
                s.SayHello(request, timeout=10)
        samples: list[list[float]] = [[], []]
        for _ in range(calls // block):
            for which, s in enumerate(stubs):
                for _ in range(block):
                    t0 = time.perf_counter()
                    s.SayHello(request, timeout=10)
                    samples[which].append(time.perf_counter() - t0)
        for c in channels:
            c.close()
        return statistics.median(samples[0]), statistics.median(samples[1])
    finally:
        proc.communicate("", timeout=20)


def decision_cost(authority: Authority, n: int, repeat: int) -> float:
    policy = meshid.AuthorizationPolicy.from_dict(synthetic_policy(n))
    svid = authority.issue_svid(CALLER)
    peer = meshid.PeerIdentity.from_certificate(svid.leaf, spiffe_id=svid.spiffe_id)
    assert policy.decide(peer, METHOD).allowed
    best = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(repeat):
            policy.decide(peer, METHOD)
        best.append((time.perf_counter() - t0) / repeat)
    return statistics.median(best)


def verdict(ratio: float, target: float) -> str:
    return f"(target <= {target}) {'OK' if ratio <= target else 'MISSED'}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--core-only", action="store_true", help="only the interceptor and decision figures")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    authority = Authority.create_root("example.org")
    bundle = meshid.TrustBundle(authority.trust_domain, authority.roots).to_pem()
    with tempfile.TemporaryDirectory() as folder:
        for name, sid in (("server", SERVER), ("client", CALLER)):
            svid = authority.issue_svid(sid)
            write_svid_files(pathlib.Path(folder) / name, svid.chain_pem(), svid.key_pem(), bundle)
        print(f"meshid bench (Python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs)")
        print("\n[core] unary RPC over mTLS on loopback, median of", args.calls, "calls each, interleaved blocks")
        bare, guarded = rpc_latency(folder, args.calls, 50)
        ratio = guarded / bare
        print(f"  bare mTLS server                      {bare * 1e6:8.1f} us")
        print(f"  + interceptor, 1,000-rule policy      {guarded * 1e6:8.1f} us")
        print(f"  latency ratio                         {ratio:8.3f}   {verdict(ratio, 1.05)}")

    print("\n[core] one policy decision (AuthorizationPolicy.decide), median of 7 runs")
    small = decision_cost(authority, 10, 20000)
    large = decision_cost(authority, 10_000, 20000)
    dratio = large / small
    print(f"  10 rules                              {small * 1e9:8.0f} ns")
    print(f"  10,000 rules                          {large * 1e9:8.0f} ns")
    print(f"  cost ratio 10,000 / 10                {dratio:8.3f}   {verdict(dratio, 1.5)}")

    if not args.core_only:
        import hotpath  # bench/hotpath.py: issue #14
        import issuance  # bench/issuance.py: issue #3
        import jwt_svid  # bench/jwt_svid.py: issue #16 (not jwt.py: that would shadow PyJWT)
        import memory  # bench/memory.py: issue #10
        import node_agent  # bench/node_agent.py: issue #12
        import ocsp  # bench/ocsp.py: issue #15
        import pq  # bench/pq.py: issue #18
        import replicas  # bench/replicas.py: issue #7
        import rollout  # bench/rollout.py: issue #17
        import rotation  # bench/rotation.py: issue #4

        issuance.run()
        issuance.report_side_by_side(print, issuance.side_by_side(2, issuance.SECONDS, issuance.BASELINE))
        rotation.run()
        replicas.run()
        memory.run()
        node_agent.run()
        hotpath.run()
        ocsp.run()
        rollout.run()
        pq.run()
        jwt_svid.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
