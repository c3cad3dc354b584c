"""`make soak`, issue #6: minutes (or hours) of calls while every SVID rotates every ~2 seconds.

On loopback: a CA (`meshid ca serve`), a greeter server process whose SVID comes from an
IssuerSource and lives 4 s (renewed at about half its life), and several client processes,
each with its own IssuerSource (same lifetime) and one `meshid.secure_channel`, calling
SayHello back to back. At the start (after a warm-up) and at the end it prints requests,
failures, rotations and the server's resident memory; the targets are zero failed calls and
less than 10% memory growth. Exit status 0 when both are met, 1 when one is missed, 130 when
interrupted.

    python bench/soak.py [--minutes 10] [--clients 4]

Every process is stopped at the end, on Ctrl-C and on SIGTERM; the CA is also asked (by
PR_SET_PDEATHSIG) to go if this script is killed outright, and the others stop when their
standard input closes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime
import json
import os
import signal
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

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/soak/server"
TTL = datetime.timedelta(seconds=4)
MAX_MINUTES = 120
WARMUP_SECONDS = 10.0
REPORT_SECONDS = 2.0  # how often each child prints its counters
PROGRESS_SECONDS = 60.0
MAX_RSS_GROWTH = 0.10


# --- the child processes ------------------------------------------------------------------


def _stdin_closed() -> threading.Event:
    """Set when the parent closes our standard input (or dies)."""
    closed = threading.Event()

    def watch() -> None:
        sys.stdin.read()
        closed.set()

    threading.Thread(target=watch, daemon=True).start()
    return closed


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        return greeter_pb2.HelloReply(message=f"hello {request.name}")


def serve(ca: str, bundle: str, token: str) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "name": "soak",
            "allow": [{"name": "clients", "methods": ["*"], "spiffe_id_patterns": [f"spiffe://{TD}/soak/client/*"]}],
        }
    )
    source = IssuerSource(ca, bundle, join_token=token, refresh_interval=1.0).start()
    interceptor = meshid.AuthorizationInterceptor(policy, source=source)
    interceptor.set_revocation_check(source.is_revoked)
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
    server.start()
    _emit({"port": port})
    closed = _stdin_closed()

    def state() -> dict[str, Any]:
        s = source.state
        return {"renewals": s.renewals, "renewal_failures": s.failures, "last_error": s.last_error}

    while not closed.wait(REPORT_SECONDS):
        _emit(state())
    server.stop(5).wait()
    _emit({**state(), "final": True})
    source.close()


def call(ca: str, bundle: str, token: str, target: str) -> None:
    source = IssuerSource(ca, bundle, join_token=token, refresh_interval=1.0).start()
    channel = meshid.secure_channel(target, source, server_id=SERVER_ID)
    stub = greeter_pb2_grpc.GreeterStub(channel)  # type: ignore[no-untyped-call]
    closed = _stdin_closed()
    counts = {"ok": 0, "failed": 0}
    errors: collections.Counter[str] = collections.Counter()
    request = greeter_pb2.HelloRequest(name="soak")

    def loop() -> None:
        while not closed.is_set():
            try:
                stub.SayHello(request, timeout=10)
            except grpc.RpcError as err:
                counts["failed"] += 1
                errors[f"{err.code().name}: {err.details()}"[:200]] += 1
            else:
                counts["ok"] += 1

    caller = threading.Thread(target=loop, daemon=True)
    caller.start()
    _emit({"ready": str(source.get_svid().spiffe_id)})

    def state() -> dict[str, Any]:
        s = source.state
        return {
            **counts,
            "renewals": s.renewals,
            "renewal_failures": s.failures,
            "rotations": channel.rotations,
            "errors": dict(errors.most_common(3)),
        }

    while not closed.wait(REPORT_SECONDS):
        _emit(state())
    caller.join(15)
    _emit({**state(), "final": True})
    channel.close()
    source.close()


# --- the parent ---------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the CA's child process: SIGTERM when this script's process ends, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


class Child:
    """A child process printing JSON lines; keeps the latest one."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self.first: dict[str, Any] = {}
        self.latest: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)

    def ready(self) -> Child:
        """Wait for its first line (it is up), then follow the rest in a thread."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited with status {self.proc.wait()} before it was ready")
        self.first = json.loads(line)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.latest = json.loads(line)

    def stop(self, timeout: float = 30) -> None:
        """Close its stdin (it prints its final counters and exits); kill it if it does not."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader.is_alive():
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _totals(clients: list[Child]) -> dict[str, int]:
    out = {"ok": 0, "failed": 0, "renewals": 0, "renewal_failures": 0, "rotations": 0}
    for c in clients:
        for key in out:
            out[key] += int(c.latest.get(key, 0))
    return out


def _line(label: str, t: dict[str, int], server: dict[str, Any], rss: int) -> str:
    return (
        f"  {label:6} requests {t['ok'] + t['failed']:>9}  failures {t['failed']:>4}  "
        f"server renewals {server.get('renewals', 0):>5}  client renewals {t['renewals']:>5}  "
        f"channel rebuilds {t['rotations']:>5}  server RSS {rss / 1024:7.1f} MiB"
    )


def run(minutes: float, clients: int) -> int:
    print(f"[soak] {minutes:g} min, {clients} clients, SVIDs of {TTL.total_seconds():.0f} s (rotating every ~2 s)")
    with tempfile.TemporaryDirectory(prefix="meshid-soak-") as folder:
        data = os.path.join(folder, "ca")
        bundle = os.path.join(data, "bundle.pem")
        meshid_cli = [sys.executable, "-m", "meshid.cli"]
        subprocess.run(
            [*meshid_cli, "ca", "init", "--data-dir", data, "--trust-domain", TD], check=True, capture_output=True
        )
        ca_log = open(os.path.join(folder, "ca.log"), "w")  # noqa: SIM115 - closed in finally
        ca = subprocess.Popen(
            [*meshid_cli, "ca", "serve", "--data-dir", data, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=ca_log,
            text=True,
            start_new_session=True,  # Ctrl-C reaches only this script, which stops everything in order
            preexec_fn=_die_with_parent,  # safe here: no thread has started yet
        )
        children: list[Child] = []
        interrupted = False
        try:
            assert ca.stdout is not None
            address = ca.stdout.readline().split()[-1]
            client_ids = [f"spiffe://{TD}/soak/client/{i}" for i in range(clients)]
            with AdminClient(address, data) as admin:
                tokens = {}
                for sid in (SERVER_ID, *client_ids):
                    admin.create_entry(sid, [], TTL)
                    tokens[sid] = admin.create_token(sid).token
            server = Child("server", [__file__, "--serve", address, bundle, tokens[SERVER_ID]])
            children.append(server)
            server.ready()
            target = f"127.0.0.1:{server.first['port']}"
            callers = [Child(sid, [__file__, "--call", address, bundle, tokens[sid], target]) for sid in client_ids]
            children.extend(callers)
            for child in callers:
                child.ready()
            began = 0.0
            try:
                time.sleep(WARMUP_SECONDS)
                start_totals, start_server, start_rss = _totals(callers), dict(server.latest), rss_kib(server.proc.pid)
                print(f"  after a {WARMUP_SECONDS:.0f} s warm-up (server pid {server.proc.pid}):")
                print(_line("start", start_totals, start_server, start_rss), flush=True)
                began = time.monotonic()
                end = began + minutes * 60
                next_progress = began + PROGRESS_SECONDS
                while (now := time.monotonic()) < end:
                    for child in children:
                        if child.proc.poll() is not None:
                            raise RuntimeError(f"{child.name} exited with status {child.proc.returncode}")
                    if now >= next_progress:
                        rss = rss_kib(server.proc.pid)
                        print(_line(f"{(now - began) / 60:4.0f}m", _totals(callers), server.latest, rss), flush=True)
                        next_progress += PROGRESS_SECONDS
                    time.sleep(min(1.0, max(0.0, end - now)))
            except KeyboardInterrupt:
                interrupted = True
                print("  interrupted: stopping", flush=True)
                if not began:
                    return 130
            end_rss = rss_kib(server.proc.pid)
            elapsed = time.monotonic() - began
            for child in callers:
                child.stop()
            server.stop()
        finally:
            for child in children:
                child.kill()
            if ca.poll() is None:
                ca.terminate()
                try:
                    ca.wait(10)
                except subprocess.TimeoutExpired:
                    ca.kill()
                    ca.wait()
            if ca.stdout is not None:
                ca.stdout.close()
            ca_log.close()
    totals, server_state = _totals(callers), server.latest
    print(_line("end", totals, server_state, end_rss))
    measured = totals["ok"] + totals["failed"] - start_totals["ok"] - start_totals["failed"]
    growth = (end_rss - start_rss) / start_rss
    failures = totals["failed"]
    print(
        f"  measured {elapsed / 60:.1f} min: {measured} requests ({measured / elapsed:.0f}/s),"
        f" server renewals {server_state.get('renewals', 0) - start_server.get('renewals', 0)},"
        f" client renewals {totals['renewals'] - start_totals['renewals']},"
        f" renewal retries: server {server_state.get('renewal_failures', 0)}, clients {totals['renewal_failures']}"
    )
    errors: collections.Counter[str] = collections.Counter()
    for child in callers:
        errors.update(child.latest.get("errors", {}))
    for error, count in errors.most_common(5):
        print(f"  failure x{count}: {error}")
    ok_failures, ok_memory = failures == 0, growth < MAX_RSS_GROWTH
    print(f"  failures: {failures} (target 0) {'OK' if ok_failures else 'MISSED'}")
    print(
        f"  server RSS: {start_rss / 1024:.1f} -> {end_rss / 1024:.1f} MiB, growth {growth * 100:+.1f}%"
        f" (target < {MAX_RSS_GROWTH * 100:.0f}%) {'OK' if ok_memory else 'MISSED'}"
    )
    if interrupted:
        print("  (interrupted before the set time: not a complete soak)")
        return 130
    return 0 if ok_failures and ok_memory else 1


def _minutes(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_MINUTES:
        raise argparse.ArgumentTypeError(f"give between 0 and {MAX_MINUTES} minutes, not {text}")
    return value


def _clients(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 32:
        raise argparse.ArgumentTypeError(f"give between 1 and 32 clients, not {text}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=_minutes, default=10.0, help=f"how long to run (at most {MAX_MINUTES})")
    parser.add_argument("--clients", type=_clients, default=4, help="client processes (default 4)")
    parser.add_argument("--serve", nargs=3, metavar=("CA", "BUNDLE", "TOKEN"), help=argparse.SUPPRESS)
    parser.add_argument("--call", nargs=4, metavar=("CA", "BUNDLE", "TOKEN", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    if args.call:
        call(*args.call)
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops cleanly, like Ctrl-C
    try:
        return run(args.minutes, args.clients)
    except KeyboardInterrupt:  # before the measurement began; everything is stopped already
        print("[soak] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
