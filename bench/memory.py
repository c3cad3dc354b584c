"""`make bench` [memory], issue #10 item 4: how much memory callers can make a server hold.

Three scenarios, each against a server in a process of its own on loopback, whose resident
memory (``VmRSS`` in ``/proc/<pid>/status``, Linux only) is read from outside:

  * greeter flood: a greeter behind ``meshid.AuthorizationInterceptor`` whose policy allows
    the caller nothing; the caller (a valid SVID) sends 10,000 calls, each to a distinct
    unimplemented method with an 8 KiB name. Target: RSS grows by less than 20 MB.
  * CA flood: the same against ``meshid ca serve``, the caller presenting only the public
    anonymous client certificate (``meshid.ca.bootstrap``). Target: less than 20 MB.
  * CA renewals: workload processes renew over and over, each time with a new key, so every
    renewal shows the CA a client certificate it has not seen. Target: RSS after 20,000
    renewals less than 40 MB above RSS after 1,000.

A flood's baseline is read after a warm-up of 200 calls of the same shape, its end 1 s after
the last call; the renewals' baseline is the first 1,000 renewals. MB is 10^6 bytes.

grpc refuses request metadata above 8 KiB with a probability that grows to certainty at 16 KiB
(``RESOURCE_EXHAUSTED``, before any interceptor runs). The server keeps grpc's defaults (an
attacker cannot change them); a call grpc refuses is replaced by another name until 10,000
calls have been answered by meshid. The client raises its own limit so that it can read a
denial that quotes the long name.

A measurement, not a test: it exits 0 whatever the figures and prints FAIL beside a missed
target. Every process it starts is stopped at the end, on error and on Ctrl-C.

    python bench/memory.py [--calls 10000] [--renewals 20000] [--workloads 8] [--only ca-renewals] [--json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import itertools
import json
import os
import pathlib
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

import meshid
from meshid.ca import Authority

TD = "example.org"
CALLER = f"spiffe://{TD}/ns/prod/sa/frontend"
SERVER = f"spiffe://{TD}/ns/prod/sa/greeter"
CA_ID = f"spiffe://{TD}/meshid/ca"
#: The greeter's policy: one rule, for someone else; the flood's caller may call nothing.
POLICY = {
    "name": "memory-bench",
    "allow": [{"name": "someone-else", "methods": ["/meshid.examples.v1.Greeter/*"], "spiffe_ids": [f"{SERVER}-peer"]}],
}

MB = 1_000_000
FLOOD_TARGET_MB = 20.0
RENEWAL_TARGET_MB = 40.0
NAME_BYTES = 8192
WARMUP_CALLS = 200
#: Calls in flight at once: one call takes ~20 ms on loopback, so fewer leave the CPUs idle.
FLOOD_THREADS = 16
SETTLE_SECONDS = 1.0
ENTRY_TTL = datetime.timedelta(hours=1)  # far longer than the run: no SVID expires mid-chain
#: The client's limits only: a denial's grpc-message quotes the 8 KiB method name.
CLIENT_OPTIONS = [("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20)]
START_TIMEOUT = 60.0
MAX_RENEWAL_ERRORS = 50  # per worker and phase, then it gives up and says why


# --- the child processes ------------------------------------------------------------------


def serve_greeter(folder: str) -> None:
    """The greeter flood's server: meshid's interceptor, grpc's default limits, until stdin closes."""
    from meshid._proto import greeter_pb2, greeter_pb2_grpc

    class Greeter(greeter_pb2_grpc.GreeterServicer):
        def SayHello(self, request: Any, context: Any) -> Any:
            return greeter_pb2.HelloReply(message="hi")

    source = meshid.FileSource(*(os.path.join(folder, n) for n in ("svid.pem", "svid.key", "bundle.pem")))
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=source)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
    server.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.stop(None).wait()


def renewer(address: str, bundle_file: str, token: str) -> None:
    """One workload chain: first SVID by join token, then for each line "N" on stdin, N renewals
    (each with a new key, authenticating with the SVID the previous one returned)."""
    from meshid.ca.client import fetch_svid, renew_svid

    svid, bundle = fetch_svid(address, bundle_file, token)
    bundles = meshid.BundleSet.of(bundle)
    print(json.dumps({"ready": str(svid.spiffe_id)}), flush=True)
    for line in sys.stdin:
        want, done, errors, last_error = int(line), 0, 0, ""
        while done < want and errors < MAX_RENEWAL_ERRORS:
            try:
                svid, _ = renew_svid(address, svid, bundles)
            except meshid.RemoteError as err:
                errors, last_error = errors + 1, str(err)[:300]
            else:
                done += 1
        print(json.dumps({"done": done, "errors": errors, "last_error": last_error}), flush=True)


# --- the parent: processes and memory -----------------------------------------------------


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """``field`` (VmRSS, or VmHWM for the peak) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"bench: no {field} for process {pid}")


class Child:
    """A child process whose stdout lines are read by a thread, so every wait has a timeout."""

    def __init__(self, name: str, argv: list[str], log: pathlib.Path) -> None:
        self.name = name
        self._log = log.open("w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"bench: {self.name} said nothing for {timeout:.0f} s") from None
        if line is None:
            tail = pathlib.Path(self._log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bench: {self.name} exited (status {self.proc.wait()}); its log ends:\n{tail}")
        return line

    def json(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.line(timeout))  # type: ignore[no-any-return]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """Close stdin and send SIGTERM; kill it if it has not gone within 10 s."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to append Child objects to; every one is stopped on the way out."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            child.stop()


def start_ca(folder: pathlib.Path, started: list[Child]) -> tuple[Child, str, pathlib.Path]:
    """``meshid ca init`` and ``meshid ca serve`` in ``folder``: the CA child, its address, its data folder."""
    data = folder / "ca"
    cli = [sys.executable, "-m", "meshid.cli", "ca"]
    subprocess.run(
        [*cli, "init", "--data-dir", str(data), "--trust-domain", TD], check=True, capture_output=True, timeout=60
    )
    # The CA logs every decision (8 KiB method names included) at INFO: to a file, not the terminal.
    ca = Child("the CA", [*cli, "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"], folder / "ca.log")
    started.append(ca)
    line = ca.line(START_TIMEOUT).strip()
    if not line.startswith("CA serving on "):
        raise RuntimeError(f"bench: `meshid ca serve` did not start (printed {line!r})")
    return ca, line.removeprefix("CA serving on "), data


# --- the floods ---------------------------------------------------------------------------


def method_name(n: int, size: int) -> str:
    """A method nobody implements, ``size`` bytes long, distinct for each ``n``."""
    head = f"/bench.flood.v1.Nowhere/M{n:09d}"
    return head + secrets.token_hex(size // 2 + 1)[: size - len(head)]


class Flood:
    """Calls to distinct long method names from ``threads`` threads until ``count`` of them have
    been answered with ``expected`` (meshid's answer), or twice as many attempts have been made."""

    def __init__(self, call: Callable[[str], None], expected: grpc.StatusCode, size: int, threads: int) -> None:
        self._call, self._expected, self._size, self._threads = call, expected, size, threads
        self._names = itertools.count()
        self.outcomes: collections.Counter[str] = collections.Counter()

    @property
    def answered(self) -> int:
        return self.outcomes[self._expected.name]

    @property
    def refused_by_grpc(self) -> int:
        return self.outcomes["RESOURCE_EXHAUSTED (grpc metadata limit)"]

    def run(self, count: int) -> None:
        changed = threading.Condition()
        goal, cap = self.answered + count, 2 * count + 100
        attempts = in_flight = 0
        interrupted = threading.Event()  # Ctrl-C in the main thread: the workers stop too

        def worker() -> None:
            nonlocal attempts, in_flight
            while True:
                with changed:
                    # exactly ``count`` answers: wait while the calls in flight could complete it
                    while self.answered < goal and attempts < cap and self.answered + in_flight >= goal:
                        changed.wait(1.0)
                    if self.answered >= goal or attempts >= cap or interrupted.is_set():
                        return
                    attempts += 1
                    in_flight += 1
                outcome = self._one(next(self._names))
                with changed:
                    in_flight -= 1
                    self.outcomes[outcome] += 1
                    changed.notify_all()

        with futures.ThreadPoolExecutor(self._threads) as pool:
            try:
                for job in [pool.submit(worker) for _ in range(self._threads)]:
                    job.result()
            finally:
                interrupted.set()

    def _one(self, n: int) -> str:
        try:
            self._call(method_name(n, self._size))
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            if code == self._expected:
                return code.name
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in details:
                return "RESOURCE_EXHAUSTED (grpc metadata limit)"
            return f"{code.name}: {details[:100]}"
        return "OK (unexpected)"

    def others(self) -> dict[str, int]:
        skip = {self._expected.name, "RESOURCE_EXHAUSTED (grpc metadata limit)"}
        return {k: v for k, v in self.outcomes.most_common() if k not in skip and v > 0}


def _caller(channel: grpc.Channel) -> Callable[[str], None]:
    """One call with an empty request to a method named by the argument."""

    def call(method: str) -> None:
        channel.unary_unary(method, None, None)(b"", timeout=10)

    return call


def measure_flood(pid: int, flood: Flood, calls: int, warmup: int) -> dict[str, Any]:
    flood.run(warmup)
    if flood.answered == 0:
        raise RuntimeError(f"bench: no warm-up call reached meshid: {dict(flood.outcomes)}")
    warm = collections.Counter(flood.outcomes)
    before = rss_bytes(pid)
    t0 = time.monotonic()
    flood.run(calls)
    seconds = time.monotonic() - t0
    time.sleep(SETTLE_SECONDS)
    after = rss_bytes(pid)
    flood.outcomes.subtract(warm)  # the figures below are the measured calls' only
    return {
        "calls_answered_by_meshid": flood.answered,
        "refused_by_grpc_metadata_limit": flood.refused_by_grpc,
        "other_outcomes": flood.others(),
        "seconds": round(seconds, 1),
        "rss_before_mb": before / MB,
        "rss_after_mb": after / MB,
        "rss_peak_mb": rss_bytes(pid, "VmHWM") / MB,
        "growth_mb": (after - before) / MB,
        "target_mb": FLOOD_TARGET_MB,
        "passed": flood.answered >= calls and (after - before) / MB < FLOOD_TARGET_MB,
    }


def greeter_flood(folder: pathlib.Path, calls: int, size: int, threads: int, warmup: int) -> dict[str, Any]:
    authority = Authority.create_root(TD)
    bundles = meshid.BundleSet.of(meshid.TrustBundle(authority.trust_domain, authority.roots))
    server_dir = folder / "greeter"
    server_dir.mkdir()
    server_svid = authority.issue_svid(SERVER)
    (server_dir / "svid.pem").write_bytes(server_svid.chain_pem())
    (server_dir / "svid.key").write_bytes(server_svid.key_pem())
    (server_dir / "bundle.pem").write_bytes(bundles[authority.trust_domain].to_pem())
    client = meshid.StaticSource(authority.issue_svid(CALLER), bundles)
    with children() as started:
        server = Child(
            "the greeter", [sys.executable, __file__, "--serve-greeter", str(server_dir)], folder / "greeter.log"
        )
        started.append(server)
        port = server.json(START_TIMEOUT)["port"]
        channel = meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=SERVER, options=CLIENT_OPTIONS)
        try:
            flood = Flood(_caller(channel), grpc.StatusCode.PERMISSION_DENIED, size, threads)
            result = measure_flood(server.proc.pid, flood, calls, warmup)
        finally:
            channel.close()
    return result


def ca_flood(folder: pathlib.Path, calls: int, size: int, threads: int, warmup: int) -> dict[str, Any]:
    from meshid.ca.bootstrap import anonymous_client

    with children() as started:
        ca, address, data = start_ca(folder, started)
        key_pem, chain_pem = anonymous_client()
        creds = grpc.ssl_channel_credentials((data / "bundle.pem").read_bytes(), key_pem, chain_pem)
        pin = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(CA_ID)))]
        with grpc.secure_channel(address, creds, options=pin + CLIENT_OPTIONS) as channel:
            flood = Flood(_caller(channel), grpc.StatusCode.UNAUTHENTICATED, size, threads)
            return measure_flood(ca.proc.pid, flood, calls, warmup)


# --- the renewals -------------------------------------------------------------------------


def checkpoints(baseline: int, total: int) -> list[int]:
    """Where RSS is read: after ``baseline`` renewals, then at each quarter of ``total``."""
    return sorted({baseline, *(total * k // 4 for k in range(1, 5) if total * k // 4 > baseline)})


def ca_renewals(folder: pathlib.Path, renewals: int, baseline: int, workloads: int) -> dict[str, Any]:
    from meshid.ca.client import AdminClient

    samples: list[tuple[int, int]] = []  # (renewals so far, RSS bytes)
    errors, last_error = 0, ""
    with children() as started:
        ca, address, data = start_ca(folder, started)
        with AdminClient(address, data) as admin:
            tokens = []
            for i in range(workloads):
                sid = f"spiffe://{TD}/bench/memory/w{i}"
                admin.create_entry(sid, [], ENTRY_TTL)
                tokens.append(admin.create_token(sid).token)
        workers = []
        for i, token in enumerate(tokens):
            argv = [sys.executable, __file__, "--renewer", address, str(data / "bundle.pem"), token]
            workers.append(Child(f"workload {i}", argv, folder / f"w{i}.log"))
        started.extend(workers)
        for w in workers:
            w.json(START_TIMEOUT)  # its first SVID, by join token
        done, seconds = 0, 0.0
        for point in checkpoints(baseline, renewals):
            t0 = time.monotonic()
            share, extra = divmod(point - done, workloads)
            for i, w in enumerate(workers):
                w.send(str(share + (i < extra)))
            timeout = 60 + 0.5 * (share + 1) * workloads  # generous: gives up below 2 renewals/s in all
            for w in workers:
                report = w.json(timeout)
                done += report["done"]
                errors += report["errors"]
                last_error = report["last_error"] or last_error
            if done < point:
                raise RuntimeError(f"bench: renewals stopped at {done} of {point}: {last_error}")
            seconds += time.monotonic() - t0
            time.sleep(SETTLE_SECONDS)
            samples.append((done, rss_bytes(ca.proc.pid)))
        peak = rss_bytes(ca.proc.pid, "VmHWM")
    (n0, before), (n1, after) = samples[0], samples[-1]
    return {
        "workloads": workloads,
        "renewals": n1,
        "renewal_errors": errors,
        "last_error": last_error,
        "seconds": round(seconds, 1),
        "rate_per_second": round(n1 / seconds, 1),
        "rss_mb_by_renewals": {str(n): rss / MB for n, rss in samples},
        "baseline_renewals": n0,
        "rss_before_mb": before / MB,
        "rss_after_mb": after / MB,
        "rss_peak_mb": peak / MB,
        "growth_mb": (after - before) / MB,
        "target_mb": RENEWAL_TARGET_MB,
        "passed": (after - before) / MB < RENEWAL_TARGET_MB,
    }


# --- the report ---------------------------------------------------------------------------


def _tree() -> str:
    """The commit measured, and whether meshid/ had uncommitted changes (they are measured too)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    imported = pathlib.Path(meshid.__file__).resolve().parent
    if imported != root / "meshid":
        return f"meshid imported from {imported}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "meshid"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes in meshid/" if dirty.stdout.strip() else "")


def _verdict(result: dict[str, Any]) -> str:
    return "PASS" if result["passed"] else "FAIL"


def _print_flood(print: Callable[..., object], result: dict[str, Any], calls: int) -> None:
    print(
        f"  {result['calls_answered_by_meshid']} calls answered by meshid in {result['seconds']:.1f} s;"
        f" {result['refused_by_grpc_metadata_limit']} refused by grpc's metadata limit and replaced"
    )
    if result["calls_answered_by_meshid"] < calls:
        print(f"  INCOMPLETE: gave up after twice {calls} attempts; not a PASS")
    for outcome, count in result["other_outcomes"].items():
        print(f"  unexpected x{count}: {outcome}")
    print(
        f"  server RSS {result['rss_before_mb']:.1f} -> {result['rss_after_mb']:.1f} MB"
        f" (peak {result['rss_peak_mb']:.1f}), growth {result['growth_mb']:+.1f} MB"
        f" (target < {result['target_mb']:.0f} MB) {_verdict(result)}"
    )


SCENARIOS = ("greeter-flood", "ca-flood", "ca-renewals")


def run(
    print: Callable[..., object] = print,
    *,
    calls: int = 10_000,
    name_bytes: int = NAME_BYTES,
    threads: int = FLOOD_THREADS,
    warmup: int = WARMUP_CALLS,
    renewals: int = 20_000,
    baseline: int = 1_000,
    workloads: int = 8,
    only: tuple[str, ...] = SCENARIOS,
) -> dict[str, Any]:
    """Measure and print the scenarios in ``only``; returns the figures."""
    results: dict[str, Any] = {
        "tree": _tree(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "method_name_bytes": name_bytes,
    }
    print(f"\n[memory] server RSS under floods and renewals (issue #10), measured at {results['tree']}")
    print("  servers in their own processes on loopback; grpc's default metadata limits on the server; MB = 10^6 bytes")
    with tempfile.TemporaryDirectory(prefix="meshid-bench-memory-") as tmp:
        folder = pathlib.Path(tmp)
        shape = f"{name_bytes}-byte names, {threads} threads"
        if "greeter-flood" in only:
            print(f"  greeter flood: a denied caller, {calls} calls to distinct unimplemented methods ({shape})")
            results["greeter_flood"] = r = greeter_flood(folder, calls, name_bytes, threads, warmup)
            _print_flood(print, r, calls)
        if "ca-flood" in only:
            (folder / "flood").mkdir()
            print(f"  CA flood: the anonymous client certificate, {calls} calls to distinct unknown methods ({shape})")
            results["ca_flood"] = r = ca_flood(folder / "flood", calls, name_bytes, threads, warmup)
            _print_flood(print, r, calls)
        if "ca-renewals" in only:
            (folder / "renewals").mkdir()
            print(f"  CA renewals: {renewals} in all by {workloads} workload processes, each with a new key")
            results["ca_renewals"] = r = ca_renewals(folder / "renewals", renewals, baseline, workloads)
            series = ", ".join(f"{int(n):,}: {mb:.1f}" for n, mb in r["rss_mb_by_renewals"].items())
            rate = f"{r['rate_per_second']:.0f}/s"
            print(f"  {r['renewals']} renewals in {r['seconds']:.1f} s ({rate}), {r['renewal_errors']} errors")
            if r["last_error"]:
                print(f"  last error: {r['last_error']}")
            print(f"  CA RSS (MB) after N renewals: {series}; peak {r['rss_peak_mb']:.1f}")
            print(
                f"  growth {r['baseline_renewals']:,} -> {r['renewals']:,} renewals {r['growth_mb']:+.1f} MB"
                f" (target < {r['target_mb']:.0f} MB) {_verdict(r)}"
            )
    rows = [
        ("greeter_flood", f"greeter, {calls:,} denied long names"),
        ("ca_flood", f"CA, {calls:,} anonymous long names"),
        ("ca_renewals", f"CA, renewals {baseline:,} -> {renewals:,}"),
    ]
    print(f"\n  {'scenario':38} {'before':>8} {'after':>8} {'growth':>8} {'target':>8}  verdict")
    for key, label in rows:
        if key in results:
            r = results[key]
            print(
                f"  {label:38} {r['rss_before_mb']:8.1f} {r['rss_after_mb']:8.1f} {r['growth_mb']:+8.1f}"
                f" {'< ' + format(r['target_mb'], '.0f'):>8}  {_verdict(r)}"
            )
    return results


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a positive number, not {text}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=_positive, default=10_000, help="flood calls answered by meshid (10000)")
    parser.add_argument("--name-bytes", type=_positive, default=NAME_BYTES, help=f"method name length ({NAME_BYTES})")
    parser.add_argument(
        "--threads", type=_positive, default=FLOOD_THREADS, help=f"flood client threads ({FLOOD_THREADS})"
    )
    parser.add_argument(
        "--warmup", type=_positive, default=WARMUP_CALLS, help=f"flood calls before the baseline ({WARMUP_CALLS})"
    )
    parser.add_argument("--renewals", type=_positive, default=20_000, help="renewals in all (20000)")
    parser.add_argument("--baseline", type=_positive, default=1_000, help="renewals before the baseline (1000)")
    parser.add_argument("--workloads", type=_positive, default=8, help="renewing workload processes (8)")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout (the report goes to stderr)")
    parser.add_argument("--serve-greeter", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--renewer", nargs=3, metavar=("CA", "BUNDLE", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_greeter:
        serve_greeter(args.serve_greeter)
        return 0
    if args.renewer:
        renewer(*args.renewer)
        return 0
    if args.baseline >= args.renewals:
        parser.error("--baseline must be smaller than --renewals")
    if args.name_bytes < 64:
        parser.error("--name-bytes must be at least 64")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops cleanly, like Ctrl-C
    say = functools.partial(print, file=sys.stderr, flush=True) if args.json else functools.partial(print, flush=True)
    results = run(
        say,
        calls=args.calls,
        name_bytes=args.name_bytes,
        threads=args.threads,
        warmup=args.warmup,
        renewals=args.renewals,
        baseline=args.baseline,
        workloads=args.workloads,
        only=tuple(args.only or SCENARIOS),
    )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0  # a measurement: FAIL is printed, not an exit status


if __name__ == "__main__":
    sys.exit(main())
