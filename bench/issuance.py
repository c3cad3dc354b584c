"""`python bench/issuance.py`: what one X509-SVID issuance costs the CA, against its crypto alone.

Issue #3 (CA), measured in one run:
  * the cost of signing alone (``Authority.sign_svid`` on a fresh P-256 key), of CSR
    verification alone (``parse_csr``) and of one durable store write (``record_issuance``
    with ``synchronous=FULL``), per operation, median of several batches;
  * a real CA (``meshid ca serve`` in its own process) renewing over mTLS for 4 client
    processes at once, each in a loop for a fixed time after one join-token fetch: SVIDs per
    second in total and the latency of one renewal as a client sees it (new key, CSR, new
    TLS connection, the call);
  * the CA's CPU time per issuance (from /proc, Linux only) as a ratio of sign + verify.

Clients are processes, not threads, so that they do not share a GIL with each other or the CA.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from meshid.ca.authority import Authority, generate_key
from meshid.ca.client import AdminClient
from meshid.ca.csr import build_csr, parse_csr
from meshid.ca.datadir import init_data_dir
from meshid.ca.store import Entry, SqliteStore
from meshid.spiffeid import SpiffeId

TD = "example.org"
CLIENTS = 4
SECONDS = 5.0
BATCHES = 7

#: A workload: argv = CA address, bundle file, join token, seconds. Fetches its first SVID, says
#: "ready", waits for a line on stdin, renews in a loop for that long, then prints one JSON line.
CLIENT = r"""
import json, sys, time
from meshid.bundle import BundleSet
from meshid.ca.client import fetch_svid, renew_svid
from meshid import RemoteError

server, bundle_file, token, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
svid, bundle = fetch_svid(server, bundle_file, token)
bundles = BundleSet.of(bundle)
print("ready", flush=True)
sys.stdin.readline()
latencies, errors = [], 0
start = time.time()
end = start + seconds
while time.time() < end:
    t0 = time.perf_counter()
    try:
        svid = renew_svid(server, svid, bundles)[0]
    except RemoteError:
        errors += 1
        continue
    latencies.append(time.perf_counter() - t0)
print(json.dumps({"latencies": latencies, "errors": errors, "start": start, "end": time.time()}), flush=True)
"""


def per_op(batch: Callable[[], int]) -> float:
    """Median over ``BATCHES`` runs of ``batch`` (which returns how many operations it did) of the time per op."""
    batch()  # warm up
    samples = []
    for _ in range(BATCHES):
        t0 = time.perf_counter()
        n = batch()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def sign_cost(authority: Authority, n: int = 200) -> float:
    sid = SpiffeId.parse(f"spiffe://{TD}/ns/bench/sa/sign")
    keys = [generate_key().public_key() for _ in range(n)]

    def batch() -> int:
        for key in keys:
            authority.sign_svid(sid, key)
        return n

    return per_op(batch)


def verify_cost(n: int = 500) -> float:
    csr = build_csr(generate_key())

    def batch() -> int:
        for _ in range(n):
            parse_csr(csr)
        return n

    return per_op(batch)


def store_cost(folder: Path, n: int = 100) -> float:
    sid = SpiffeId.parse(f"spiffe://{TD}/ns/bench/sa/store")
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)

    def sign(entry: Entry) -> tuple[int, datetime.datetime, object]:
        return secrets.randbits(159) | 1 << 158, not_after, None

    with SqliteStore(folder / "store-alone.db") as store:
        store.create_entry(Entry(sid, (), datetime.timedelta(hours=1), datetime.datetime.now(datetime.UTC)))

        def batch() -> int:
            now = datetime.datetime.now(datetime.UTC)
            for _ in range(n):
                store.record_issuance(sid, now, sign)
            return n

        return per_op(batch)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), or None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def start_ca(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # it logs every issuance; the cost stays in, the text goes
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("CA serving on "):
        proc.kill()
        raise RuntimeError(f"bench: `meshid ca serve` did not start (printed {line!r})")
    return proc, line.removeprefix("CA serving on ")


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def issuance_run(folder: Path, seconds: float) -> tuple[list[float], int, float, float | None]:
    """Renewals by ``CLIENTS`` processes against a CA process: latencies, errors, window, CA CPU seconds."""
    data_dir = folder / "ca"
    init_data_dir(data_dir, TD)
    ca, address = start_ca(data_dir)
    procs = [ca]
    try:
        with AdminClient(address, data_dir) as admin:
            tokens = []
            for i in range(CLIENTS):
                sid = f"spiffe://{TD}/ns/bench/sa/w{i}"
                admin.create_entry(sid)
                tokens.append(admin.create_token(sid).token)
        clients = []
        for token in tokens:
            args = [address, str(data_dir / "bundle.pem"), token, str(seconds)]
            proc = subprocess.Popen(
                [sys.executable, "-c", CLIENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            clients.append(proc)
        for proc in clients:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("bench: a client could not fetch its first SVID")
        cpu_before = cpu_seconds(ca.pid)
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in clients:
            assert proc.stdout is not None
            results.append(json.loads(proc.stdout.readline()))
        cpu_after = cpu_seconds(ca.pid)
    finally:
        stop(procs)
    latencies = [t for r in results for t in r["latencies"]]
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return latencies, sum(r["errors"] for r in results), window, cpu


def run(print: Callable[..., object] = print) -> None:
    """Measure and print the CA's issuance figures (takes ``SECONDS`` and a few more)."""
    folder = Path(tempfile.mkdtemp(prefix="meshid-bench-ca-"))
    try:
        authority = Authority.create_root(TD)
        sign = sign_cost(authority)
        verify = verify_cost()
        write = store_cost(folder)
        latencies, errors, window, cpu = issuance_run(folder, SECONDS)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    count = len(latencies)
    print(f"\n[ca] issuance throughput over mTLS, durable SQLite writes, {CLIENTS} concurrent clients")
    print(f"  ({os.cpu_count()} CPUs shared by the CA process and {CLIENTS} client processes; {SECONDS:g} s run)")
    print(f"  sign alone (sign_svid, P-256 leaf)     {sign * 1e6:8.1f} us   median of {BATCHES} batches")
    print(f"  CSR verification alone (parse_csr)     {verify * 1e6:8.1f} us")
    print(f"  durable write alone (record_issuance)  {write * 1e6:8.1f} us   synchronous=FULL, WAL")
    if not count:
        print(f"  no renewal succeeded ({errors} errors)")
        return
    rate = count / window
    print(f"  SVIDs issued                           {count:8d}      {errors} errors")
    print(f"  throughput                             {rate:8.1f} SVIDs/s")
    print(f"  renewal latency p50 (client side)      {statistics.median(latencies) * 1e3:8.2f} ms")
    print(f"  renewal latency p99 (client side)      {percentile(latencies, 99) * 1e3:8.2f} ms")
    print(f"  CA wall time per issuance (1/rate)     {1e6 / rate:8.1f} us")
    if cpu is not None and cpu > 0:
        per_issue = cpu / count
        print(f"  CA CPU time per issuance               {per_issue * 1e6:8.1f} us")
        print(f"  ratio CA CPU / (sign + verify)         {per_issue / (sign + verify):8.2f}x")
        print("    (the rest: a TLS handshake per renewal, gRPC, peer verification, SQLite, logging)")
    else:
        print("  CA CPU time per issuance               n/a (needs /proc)")


if __name__ == "__main__":
    run()
