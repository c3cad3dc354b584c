"""`make bench`, issue #4: RPC latency and failures under load while SVIDs rotate every few
seconds, next to the same load with no rotation, in one run.

A CA (`meshid ca serve`) and a server process run on loopback. The server process hosts two
greeters: one whose SVID lives 4 s (renewed every ~2 s), one whose SVID lives an hour. This
process calls both with 4 threads, in alternating 2-second blocks, through one
`meshid.secure_channel` each, whose client SVIDs rotate (or not) the same way.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from typing import Any

import grpc

import meshid
from meshid._proto import greeter_pb2, greeter_pb2_grpc
from meshid.agent import IssuerSource
from meshid.ca.client import AdminClient

ROTATING, STEADY = "rotating", "steady"
TTL = {ROTATING: datetime.timedelta(seconds=4), STEADY: datetime.timedelta(hours=1)}


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message="hi")


def serve(ca: str, bundle: str, tokens: dict[str, str]) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "allow": [
                {"name": "clients", "methods": ["*"], "spiffe_id_patterns": ["spiffe://example.org/bench/client/*"]}
            ]
        }
    )
    servers, sources, ports = [], [], []
    for kind in (ROTATING, STEADY):
        source = IssuerSource(ca, bundle, join_token=tokens[kind], refresh_interval=1.0).start()
        server = grpc.server(
            futures.ThreadPoolExecutor(8), interceptors=[meshid.AuthorizationInterceptor(policy, source=source)]
        )
        greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
        ports.append(server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source)))
        server.start()
        servers.append(server)
        sources.append(source)
    print(*ports, flush=True)
    sys.stdin.read()
    for server in servers:
        server.stop(None)
    print(*(s.state.renewals for s in sources), flush=True)
    for source in sources:
        source.close()


def _measure(stub: Any, seconds: float, threads: int) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    failures: list[str] = []
    stop = time.monotonic() + seconds
    request = greeter_pb2.HelloRequest(name="bench")

    def worker() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                stub.SayHello(request, timeout=10)
            except grpc.RpcError as err:
                failures.append(f"{err.code().name}: {err.details()}")
            else:
                latencies.append(time.perf_counter() - t0)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, failures


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


def run(print: Any = print, seconds: float = 20.0, block: float = 2.0, threads: int = 4) -> None:
    shape = f"{threads} threads, alternating {block:.0f}-second blocks, {seconds:.0f} s each"
    print(f"\n[rotation] unary RPCs under load, {shape}")
    with tempfile.TemporaryDirectory() as folder:
        data = os.path.join(folder, "ca")
        subprocess.run(
            [sys.executable, "-m", "meshid.cli", "ca", "init", "--data-dir", data, "--trust-domain", "example.org"],
            check=True,
            capture_output=True,
        )
        ca = subprocess.Popen(
            [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", data, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        server = None
        client_sources: dict[str, IssuerSource] = {}
        try:
            assert ca.stdout is not None
            address = ca.stdout.readline().split()[-1]
            bundle = os.path.join(data, "bundle.pem")
            tokens: dict[str, dict[str, str]] = {"server": {}, "client": {}}
            with AdminClient(address, data) as admin:
                for kind in (ROTATING, STEADY):
                    for role in ("server", "client"):
                        sid = f"spiffe://example.org/bench/{role}/{kind}"
                        admin.create_entry(sid, [], TTL[kind])
                        tokens[role][kind] = admin.create_token(sid).token
            server = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--serve",
                    address,
                    bundle,
                    tokens["server"][ROTATING],
                    tokens["server"][STEADY],
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert server.stdout is not None
            ports = dict(zip((ROTATING, STEADY), server.stdout.readline().split(), strict=True))
            channels, stubs = {}, {}
            for kind in (ROTATING, STEADY):
                source = IssuerSource(address, bundle, join_token=tokens["client"][kind], refresh_interval=1.0).start()
                client_sources[kind] = source
                channels[kind] = meshid.secure_channel(
                    f"127.0.0.1:{ports[kind]}", source, server_id=f"spiffe://example.org/bench/server/{kind}"
                )
                stubs[kind] = greeter_pb2_grpc.GreeterStub(channels[kind])  # type: ignore[no-untyped-call]
                _measure(stubs[kind], 0.5, threads)  # connect and warm up
            results: dict[str, tuple[list[float], list[str]]] = {ROTATING: ([], []), STEADY: ([], [])}
            for _ in range(int(seconds / block)):
                for kind in (STEADY, ROTATING):
                    latencies, failures = _measure(stubs[kind], block, threads)
                    results[kind][0].extend(latencies)
                    results[kind][1].extend(failures)
            rebuilt = {kind: channels[kind].rotations for kind in channels}
            for channel in channels.values():
                channel.close()
            server_out, _ = server.communicate("", timeout=30)
            server_renewals = dict(zip((ROTATING, STEADY), server_out.split(), strict=True))
        finally:
            for source in client_sources.values():
                source.close()
            for proc in (server, ca):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
    print(
        f"  {'':28}{'calls':>8}{'failed':>8}{'p50 us':>10}{'p99 us':>10}{'server renewals':>17}{'client renewals':>17}"
    )
    for kind, label in ((STEADY, "no rotation (1 h SVIDs)"), (ROTATING, "rotation (4 s SVIDs)")):
        latencies, failures = results[kind]
        print(
            f"  {label:28}{len(latencies) + len(failures):8d}{len(failures):8d}{_pct(latencies, 50) * 1e6:10.0f}"
            f"{_pct(latencies, 99) * 1e6:10.0f}{server_renewals[kind]:>17}{client_sources[kind].state.renewals:>17}"
        )
    p50 = _pct(results[ROTATING][0], 50) / _pct(results[STEADY][0], 50)
    p99 = _pct(results[ROTATING][0], 99) / _pct(results[STEADY][0], 99)
    print(f"  rotating / steady: p50 {p50:.3f}, p99 {p99:.3f}; client channel rebuilt {rebuilt[ROTATING]}x")
    for failure in sorted(set(results[ROTATING][1] + results[STEADY][1]))[:5]:
        print(f"  failure: {failure}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", nargs=4, metavar=("CA", "BUNDLE", "TOKEN_ROTATING", "TOKEN_STEADY"))
    args = parser.parse_args()
    if args.serve:
        ca_address, bundle_file, rotating, steady = args.serve
        serve(ca_address, bundle_file, {ROTATING: rotating, STEADY: steady})
    else:
        run()
