"""What an allowed repeat call costs meshid inside a server, over grpc's own auth context read.

Latency ratios (bench/hotpath.py) move by ±0.02 from one server process to the next, more than a
few microseconds of meshid's work. This measures that work directly: a server process (pinned to
one CPU, the client to the other) whose calls take turns between the floor (an interceptor that
only reads the call's auth context) and meshid's interceptor, timing each in the call. A check in
a server costs several times what the same code costs in a tight loop (its caches are cold after
grpc's own work, and each function of another module it enters costs microseconds), so only this
figure says what a change to the check saves.

  * sync: meshid's ``_check`` (which reads grpc's raw auth context too) against that read alone.
  * aio: the whole of what each interceptor adds to a call, its ``intercept_service`` and its
    wrapper with the handler's own time taken out; the floor is bench/hotpath.py's
    ``AioReadsAuthContext`` (``context.auth_context()``, grpc.aio's only way).

Each tree given is a folder whose ``meshid`` package the server imports (``PYTHONPATH``); several
are measured in turn, in alternating order, one server process each per round:

    python bench/check_cost.py [--flavour sync|aio] [--trees /path/a,/path/b] [--rounds 5] [--calls 3000]

A measurement, not a test: it prints the median over processes of each process's median
(meshid minus floor), with every process's figure.
"""

from __future__ import annotations

import argparse
import asyncio
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
import grpc.aio

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
METHOD = "/meshid.examples.v1.Greeter/SayHello"


class _Timed(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps the one method: odd calls time the floor read, even calls meshid's check."""

    def __init__(self, check: Any, read: Any) -> None:
        self._check, self._read = check, read
        self.floor: list[int] = []
        self.check: list[int] = []
        self._wrapped: Any = None
        self._calls = 0

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if self._wrapped is None:
            inner, check, read, now = handler.unary_unary, self._check, self._read, time.perf_counter_ns

            def unary_unary(request: Any, context: Any) -> Any:
                self._calls += 1
                if self._calls % 2:
                    t0 = now()
                    read(context._rpc_event.call)
                    self.floor.append(now() - t0)
                else:
                    t0 = now()
                    check(context, METHOD)
                    self.check.append(now() - t0)
                return inner(request, context)

            self._wrapped = grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        return self._wrapped


def serve(folder: str) -> None:
    """One sync server; prints its port, serves until stdin closes, then prints floor and check medians (µs)."""
    from grpc._cython import cygrpc  # type: ignore[attr-defined]
    from hotpath import Greeter, synthetic_policy

    import meshid
    from meshid._proto import greeter_pb2_grpc

    os.sched_setaffinity(0, {1})
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)
    source = meshid.FileSource(*(os.path.join(folder, "server", n) for n in ("svid.pem", "svid.key", "bundle.pem")))
    interceptor = meshid.AuthorizationInterceptor(
        meshid.AuthorizationPolicy.from_dict(synthetic_policy(1000)), source=source
    ).start()
    timed = _Timed(interceptor._check, cygrpc.auth_context)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[timed])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(None)
    interceptor.close()
    warm = 300  # the first calls (the handshake's, the memo's first filing) are not repeat calls
    print(statistics.median(timed.floor[warm:]) / 1000, statistics.median(timed.check[warm:]) / 1000, flush=True)


class _Stamp:
    """When the aio handler began and ended its own work, for the timing interceptor to take out."""

    began = ended = 0


class _AioTimed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Calls take turns between the floor and meshid's interceptor; each call records what its
    interceptor's ``intercept_service`` and wrapper took, without the handler's own time."""

    def __init__(self, floor: Any, guarded: Any) -> None:
        self._turns = (floor, guarded)
        self.floor: list[int] = []
        self.check: list[int] = []
        self._calls = 0

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self._calls += 1
        interceptor, samples = (self._turns[0], self.floor) if self._calls % 2 else (self._turns[1], self.check)
        now = time.perf_counter_ns
        t0 = now()
        handler = await interceptor.intercept_service(continuation, details)
        intercepted = now() - t0
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            t1 = now()
            answer = await inner(request, context)
            samples.append(intercepted + now() - t1 - (_Stamp.ended - _Stamp.began))
            return answer

        deser, ser = handler.request_deserializer, handler.response_serializer
        return grpc.unary_unary_rpc_method_handler(unary_unary, deser, ser)


def serve_aio(folder: str) -> None:
    """One aio server; prints its port, serves until stdin closes, then prints floor and meshid medians (µs)."""
    from hotpath import AioReadsAuthContext, synthetic_policy

    import meshid
    import meshid.aio
    from meshid._proto import greeter_pb2, greeter_pb2_grpc

    class Greeter(greeter_pb2_grpc.GreeterServicer):
        async def SayHello(self, request: Any, context: Any) -> Any:
            _Stamp.began = time.perf_counter_ns()
            answer = greeter_pb2.HelloReply(message="hi")
            _Stamp.ended = time.perf_counter_ns()
            return answer

    async def main() -> _AioTimed:
        files = (os.path.join(folder, "server", n) for n in ("svid.pem", "svid.key", "bundle.pem"))
        source = meshid.FileSource(*files)
        policy = meshid.AuthorizationPolicy.from_dict(synthetic_policy(1000))
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=source).start()
        timed = _AioTimed(AioReadsAuthContext(), interceptor)
        server = grpc.aio.server(interceptors=[timed])
        greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
        port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
        await server.start()
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(None)
        interceptor.close()
        return timed

    os.sched_setaffinity(0, {1})
    logging.getLogger("meshid.audit").setLevel(logging.WARNING)
    timed = asyncio.run(main())
    warm = 300  # the first calls (the handshake's, the memo's first filing) are not repeat calls
    print(statistics.median(timed.floor[warm:]) / 1000, statistics.median(timed.check[warm:]) / 1000, flush=True)


def one_process(folder: str, tree: str, calls: int, flavour: str = "sync") -> tuple[float, float]:
    """The (floor, meshid) medians of one server process importing meshid from ``tree``."""
    from hotpath import SERVER

    import meshid
    from meshid._proto import greeter_pb2, greeter_pb2_grpc

    env = dict(os.environ, PYTHONPATH=os.pathsep.join((tree, str(BENCH))), PYTHONHASHSEED="0")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", folder, "--flavour", flavour],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        client = meshid.FileSource(*(os.path.join(folder, "client", n) for n in ("svid.pem", "svid.key", "bundle.pem")))
        with meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=SERVER) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)  # type: ignore[no-untyped-call]
            request = greeter_pb2.HelloRequest(name="bench")
            for _ in range(calls):
                stub.SayHello(request, timeout=10)
        out, _ = proc.communicate("", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    floor, check = (float(x) for x in out.split())
    return floor, check


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--flavour", choices=("sync", "aio"), default="sync")
    parser.add_argument("--trees", default=str(ROOT), help="comma-separated folders holding a meshid package")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    if args.serve:
        (serve_aio if args.flavour == "aio" else serve)(args.serve)
        return 0
    from hotpath import make_files

    os.sched_setaffinity(0, {0})
    trees = args.trees.split(",")
    extra: dict[str, list[float]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as folder:
        make_files(folder)
        for n in range(args.rounds):
            for tree in trees if n % 2 == 0 else trees[::-1]:
                floor, check = one_process(folder, tree, args.calls, args.flavour)
                extra[tree].append(check - floor)
    what = "the check" if args.flavour == "sync" else "intercept_service and the wrapper"
    print(
        f"\n[check cost] {args.flavour} repeat call, 1,000 rules, audit at WARNING; "
        f"{args.rounds} server processes per tree"
    )
    for tree, figures in extra.items():
        shown = ", ".join(f"{x:.2f}" for x in sorted(figures))
        median = statistics.median(figures)
        print(f"  {tree}: {what} cost {median:.2f} µs over the floor's (processes: {shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
