"""`make bench` [rollout], issue #17 must-show 1: the per-call cost of carrying a candidate policy.

One server process serves four greeters on loopback mTLS, so all share interpreter, scheduling
and CPU: bare grpcio; meshid's interceptor with a 1,000-rule policy and no candidate (the
baseline); the same with a candidate that agrees on the bench's call (the usual case: most
calls are decided alike); and the same with a candidate that denies it, so every call is a
``would_deny`` record written to a file and a count. The client alternates between them in
blocks of 50 calls; figures are medians. Targets, as ratios to the no-candidate server in the
same run: agreeing candidate <= 1.03 (its decision comes from the same memo entry: one more
field read per call); differing on every call, records to a file, <= 1.06.

A measurement, not a test: it exits 0 whatever the figures and prints FAIL beside a missed
target. The 1-minute load average is printed before and after.

    python bench/rollout.py [--calls 10000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
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
from meshid._proto import greeter_pb2, greeter_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hotpath import SERVER, Greeter, loadavg, make_files, synthetic_policy

TARGETS = {"agreeing": 1.03, "differing": 1.06}
SETTINGS = ("bare", "no candidate", "agreeing", "differing")


def serve(folder: str) -> None:
    """The four servers in this process; prints their ports, serves until stdin closes."""
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)  # every bench call is allowed: no audit lines
    dry = logging.getLogger("meshid.dryrun")
    handler = logging.FileHandler(os.path.join(folder, f"dryrun-{os.getpid()}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    dry.addHandler(handler)
    dry.propagate = False
    files = [os.path.join(folder, "server", n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    data = synthetic_policy(1000)
    policy = meshid.AuthorizationPolicy.from_dict(data)
    agreeing = meshid.AuthorizationPolicy.from_dict({**data, "name": "candidate"})
    rules = data["allow"]
    assert isinstance(rules, list)
    differing = meshid.AuthorizationPolicy.from_dict({"name": "candidate-without-frontend", "allow": rules[:-1]})
    interceptors = [
        meshid.AuthorizationInterceptor(policy, source=source).start(),
        meshid.AuthorizationInterceptor(policy, source=source, candidate=agreeing).start(),
        meshid.AuthorizationInterceptor(policy, source=source, candidate=differing).start(),
    ]
    servers, ports = [], []
    chains: list[list[grpc.ServerInterceptor[Any, Any]]] = [[]] + [[i] for i in interceptors]
    for chain in chains:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=chain)
        greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
        ports.append(server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source)))
        server.start()
        servers.append(server)
    print(*ports, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    for server in servers:
        server.stop(None)
    for interceptor in interceptors:
        interceptor.close()
    handler.close()
    written = pathlib.Path(handler.baseFilename).read_text().count("would_deny")
    print(written, flush=True)


def latencies(folder: str, calls: int, block: int = 50) -> tuple[list[float], int]:
    files = [os.path.join(folder, "client", n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    ports = [int(p) for p in proc.stdout.readline().split()]
    try:
        channels = [meshid.secure_channel(f"127.0.0.1:{p}", source, server_id=SERVER) for p in ports]
        stubs = [greeter_pb2_grpc.GreeterStub(c) for c in channels]  # type: ignore[no-untyped-call]
        request = greeter_pb2.HelloRequest(name="bench")
        for s in stubs:  # connect and warm up
            for _ in range(300):
                s.SayHello(request, timeout=10)
        samples: list[list[float]] = [[] for _ in stubs]
        for _ in range(calls // block):
            for which, s in enumerate(stubs):
                for _ in range(block):
                    t0 = time.perf_counter()
                    s.SayHello(request, timeout=10)
                    samples[which].append(time.perf_counter() - t0)
        for c in channels:
            c.close()
    finally:
        out, _ = proc.communicate("", timeout=60)
    return [statistics.median(s) for s in samples], int(out.split()[-1])


def run(calls: int = 10000, as_json: bool = False) -> dict[str, Any]:
    print(f"\n[rollout] load average {loadavg()} (1 min) before")
    print(f"[rollout] a candidate policy's cost per call: unary RPC, 1,000-rule policy, median of {calls} calls each")
    with tempfile.TemporaryDirectory() as folder:
        make_files(folder)
        medians, written = latencies(folder, calls)
    base = medians[1]
    results: dict[str, Any] = {"medians_us": dict(zip(SETTINGS, (m * 1e6 for m in medians), strict=True))}
    for setting, median in zip(SETTINGS, medians, strict=True):
        line = f"  {setting:14} {median * 1e6:7.1f} us"
        if setting in TARGETS:
            ratio, target = median / base, TARGETS[setting]
            ok = ratio <= target
            line += f"  ratio to no candidate {ratio:6.3f} (target <= {target:.2f}) {'PASS' if ok else 'FAIL'}"
            results[setting] = {"ratio": ratio, "target": target, "ok": ok}
        print(line)
    print(f"  would_deny records written by the differing server: {written} (one per call, warm-up included)")
    results["records_written"] = written
    print(f"[rollout] load average {loadavg()} (1 min) after")
    if as_json:
        print(json.dumps(results, indent=2))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="2,000 calls per server")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    run(2000 if args.quick else args.calls, args.json)
    return 0  # a measurement: FAIL is printed, not an exit status


if __name__ == "__main__":
    sys.exit(main())
