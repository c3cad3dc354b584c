"""`make bench` [hotpath], issue #14 must-shows 1-3: the per-call and per-process costs meshid adds.

Parts, each a ratio against a baseline measured in the same run:

  * audit: median latency of a unary RPC through meshid's interceptor with a 1,000-rule policy,
    against a bare grpcio mTLS server in the same server process (so both share interpreter,
    scheduling and CPU), the client alternating between them in blocks of 50 calls. One server
    process per setting of the ``meshid.audit`` logger: at INFO with a ``logging.FileHandler``
    (every allow and deny written to a file, what anyone who keeps an audit trail runs) and at
    WARNING (only denies; this bench's calls are all allowed). Sync and aio servers. Targets:
    INFO to a file <= 1.05, WARNING <= 1.03; aio the same targets within 0.02.
  * refresh: CA CPU per agent-hour of idle refreshes (an agent whose SVID is not due: bundle and
    CRL only). Old path: ``GetBundle`` and ``GetCrl`` over a new mTLS connection each, every
    refresh (what ``IssuerSource`` did). New path: one ``GetTrustUpdates`` call, carrying the
    bundle sequence and CRL number the agent has, over one channel kept open (unchanged: empty
    answer). Both against one ``meshid ca serve`` process, alternating in rounds; the CA's CPU
    from /proc/PID/stat. Target: new <= 0.4x old.
  * startup: ``import meshid`` against ``import grpc`` in fresh processes (target <= 1.7x);
    ``meshid.secure_channel`` construction against ``grpc.secure_channel`` with equivalent
    credentials (target <= 2x); time from construction to the first answered RPC (<= 1.05).

A measurement, not a test: it exits 0 whatever the figures and prints FAIL beside a missed
target. The 1-minute load average is printed before and after: absolute figures move with it.

    python bench/hotpath.py [--only audit|refresh|startup] [--calls 10000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
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
from meshid._files import write_svid_files
from meshid._proto import greeter_pb2, greeter_pb2_grpc
from meshid.ca import Authority

TD = "example.org"
CALLER = f"spiffe://{TD}/ns/prod/sa/frontend"
SERVER = f"spiffe://{TD}/ns/prod/sa/greeter"
AUDIT_TARGETS = {"info-file": 1.05, "warning": 1.03}
AIO_SLACK = 0.02
PARTS = ("audit", "refresh", "startup")


def loadavg() -> str:
    try:
        return pathlib.Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def synthetic_policy(n: int) -> dict[str, object]:
    from run import synthetic_policy as make  # bench/run.py: the [core] section's policy

    return make(n)


# -- audit ---------------------------------------------------------------------------------


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message="hi")


class AioGreeter(greeter_pb2_grpc.GreeterServicer):
    async def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message="hi")


def _audit_logger(setting: str, folder: str) -> logging.Handler:
    audit = logging.getLogger("meshid.audit")
    handler = logging.FileHandler(os.path.join(folder, f"audit-{setting}-{os.getpid()}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    audit.addHandler(handler)
    audit.setLevel(logging.INFO if setting == "info-file" else logging.WARNING)
    audit.propagate = False
    return handler


def serve(folder: str, setting: str, flavour: str) -> None:
    """A bare server and a guarded one in this process; prints both ports, serves until stdin closes."""
    handler = _audit_logger(setting, folder)
    files = [os.path.join(folder, "server", n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    policy = meshid.AuthorizationPolicy.from_dict(synthetic_policy(1000))
    if flavour == "aio":
        asyncio.run(_serve_aio(source, policy))
    else:
        interceptor = meshid.AuthorizationInterceptor(policy, source=source).start()
        servers, ports = [], []
        for interceptors in ([], [interceptor]):
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
            greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
            ports.append(server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source)))
            server.start()
            servers.append(server)
        print(*ports, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        for server in servers:
            server.stop(None)
        interceptor.close()
    handler.close()


async def _serve_aio(source: meshid.FileSource, policy: meshid.AuthorizationPolicy) -> None:
    import meshid.aio

    interceptor = meshid.aio.AuthorizationInterceptor(policy, source=source).start()
    servers, ports = [], []
    for interceptors in ([], [interceptor]):
        server = grpc.aio.server(interceptors=interceptors)
        greeter_pb2_grpc.add_GreeterServicer_to_server(AioGreeter(), server)
        ports.append(server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source)))
        await server.start()
        servers.append(server)
    print(*ports, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers:
        await server.stop(None)
    interceptor.close()


def audit_latency(folder: str, setting: str, flavour: str, calls: int, block: int = 50) -> tuple[float, float]:
    files = [os.path.join(folder, "client", n) for n in ("svid.pem", "svid.key", "bundle.pem")]
    source = meshid.FileSource(*files)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", folder, "--setting", setting, "--flavour", flavour],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        bare_port, guarded_port = (int(p) for p in proc.stdout.readline().split())
        channels = [
            meshid.secure_channel(f"127.0.0.1:{p}", source, server_id=SERVER) for p in (bare_port, guarded_port)
        ]
        stubs = [greeter_pb2_grpc.GreeterStub(c) for c in channels]
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
        proc.communicate("", timeout=30)


def run_audit(folder: str, calls: int) -> dict[str, Any]:
    print(f"\n[hotpath] audit records: unary RPC, 1,000-rule policy vs bare mTLS, median of {calls} calls each")
    results: dict[str, Any] = {}
    for flavour in ("sync", "aio"):
        for setting, target in AUDIT_TARGETS.items():
            bare, guarded = audit_latency(folder, setting, flavour, calls)
            ratio = guarded / bare
            limit = target + (AIO_SLACK if flavour == "aio" else 0.0)
            ok = ratio <= limit
            label = f"{flavour}, meshid.audit at {'INFO to a file' if setting == 'info-file' else 'WARNING'}"
            print(
                f"  {label:38} bare {bare * 1e6:7.1f} us  guarded {guarded * 1e6:7.1f} us  "
                f"ratio {ratio:6.3f} (target <= {limit:.2f}) {verdict(ok)}"
            )
            results[f"{flavour}-{setting}"] = {
                "bare_us": bare * 1e6,
                "guarded_us": guarded * 1e6,
                "ratio": ratio,
                "ok": ok,
            }
    return results


# -- main ----------------------------------------------------------------------------------


def make_files(folder: str) -> Authority:
    authority = Authority.create_root(TD)
    bundle = meshid.TrustBundle(authority.trust_domain, authority.roots).to_pem()
    for name, sid in (("server", SERVER), ("client", CALLER)):
        svid = authority.issue_svid(sid)
        write_svid_files(pathlib.Path(folder) / name, svid.chain_pem(), svid.key_pem(), bundle)
    return authority


def run(only: list[str] | None = None, calls: int = 10000, as_json: bool = False) -> dict[str, Any]:
    parts = only or list(PARTS)
    print(f"\n[hotpath] load average {loadavg()} (1 min) before")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        make_files(folder)
        if "audit" in parts:
            results["audit"] = run_audit(folder, calls)
    print(f"[hotpath] load average {loadavg()} (1 min) after")
    if as_json:
        print(json.dumps(results, indent=2))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--setting", choices=tuple(AUDIT_TARGETS), default="warning")
    parser.add_argument("--flavour", choices=("sync", "aio"), default="sync")
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="2,000 calls per setting")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.setting, args.flavour)
        return 0
    run(args.only, 2000 if args.quick else args.calls, args.json)
    return 0  # a measurement: FAIL is printed, not an exit status


if __name__ == "__main__":
    sys.exit(main())
