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

  * issue #14 must-show 2, side by side in one run: the same 4-client renewal load against the
    code of a baseline commit (``--baseline``, default the commit before the issue's work; its
    ``meshid`` package is exported with ``git archive`` into a temporary folder and put first on
    PYTHONPATH of its CA and clients) and against this tree, in alternating rounds. Baseline
    clients renew as they did (``renew_svid``: a new TLS connection each); this tree's renew
    as ``IssuerSource`` now does (``IssuerClient``: one kept channel). Targets: CA CPU per
    renewal <= 0.6x the baseline's, SVIDs/s >= 1.6x.

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
#: The commit before issue #14's changes to the renewal path (this session's starting point).
BASELINE = "6761c50"
CPU_TARGET = 0.6
RATE_TARGET = 1.6
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

#: The same workload renewing over one kept channel, as IssuerSource does since issue #14.
KEPT_CLIENT = (
    CLIENT.replace(
        "from meshid.ca.client import fetch_svid, renew_svid", "from meshid.ca.client import IssuerClient, fetch_svid"
    )
    .replace('print("ready", flush=True)', 'client = IssuerClient(server, svid, bundles)\nprint("ready", flush=True)')
    .replace("svid = renew_svid(server, svid, bundles)[0]", "client.renew()")
)


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


def _env(code: Path | None) -> dict[str, str] | None:
    """The environment of a process running the ``meshid`` package in ``code`` (None: this tree's)."""
    if code is None:
        return None
    path = [str(code), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def start_ca(data_dir: Path, code: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # it logs every issuance; the cost stays in, the text goes
        text=True,
        env=_env(code),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("CA serving on "):
        proc.kill()
        raise RuntimeError(f"bench: `meshid ca serve` did not start (printed {line!r})")
    return proc, line.removeprefix("CA serving on ").split()[0]


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def issuance_run(
    folder: Path, seconds: float, *, code: Path | None = None, client: str = CLIENT
) -> tuple[list[float], int, float, float | None]:
    """Renewals by ``CLIENTS`` processes against a CA process: latencies, errors, window, CA CPU seconds.

    ``code`` is the folder whose ``meshid`` package the CA and the clients run (None: this tree);
    the data folder is made by that code too.
    """
    data_dir = folder / "ca"
    if code is None:
        init_data_dir(data_dir, TD)
    else:
        subprocess.run(
            [sys.executable, "-m", "meshid.cli", "ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD],
            check=True,
            stdout=subprocess.DEVNULL,
            env=_env(code),
        )
    ca, address = start_ca(data_dir, code)
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
                [sys.executable, "-c", client, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=_env(code),
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


def export_baseline(rev: str, into: Path) -> Path:
    """The ``meshid`` package of commit ``rev``, exported into ``into`` (``git archive``; no worktree)."""
    repo = Path(__file__).resolve().parent.parent
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "meshid"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def side_by_side(rounds: int, seconds: float, baseline: str) -> dict[str, object]:
    """Alternating rounds of the renewal load on the baseline's code and on this tree's."""
    folder = Path(tempfile.mkdtemp(prefix="meshid-bench-renewal-"))
    try:
        code = export_baseline(baseline, folder / "baseline")
        figures: dict[str, list[tuple[float, float]]] = {"baseline": [], "now": []}
        for n in range(rounds):
            for name, kwargs in (("baseline", {"code": code, "client": CLIENT}), ("now", {"client": KEPT_CLIENT})):
                latencies, errors, window, cpu = issuance_run(folder / f"{name}-{n}", seconds, **kwargs)
                if not latencies or cpu is None:
                    raise RuntimeError(f"bench: the {name} round issued nothing ({errors} errors) or /proc is missing")
                figures[name].append((cpu / len(latencies), len(latencies) / window))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = {name: tuple(statistics.median(f[i] for f in rows) for i in (0, 1)) for name, rows in figures.items()}
    return {
        "baseline": baseline,
        "rounds": rounds,
        "cpu_us": {name: m[0] * 1e6 for name, m in med.items()},
        "rate": {name: m[1] for name, m in med.items()},
        "cpu_ratio": med["now"][0] / med["baseline"][0],
        "rate_ratio": med["now"][1] / med["baseline"][1],
    }


def report_side_by_side(print: Callable[..., object], r: dict[str, object]) -> None:
    cpu, rate = r["cpu_us"], r["rate"]
    assert isinstance(cpu, dict) and isinstance(rate, dict)
    cpu_ok = float(r["cpu_ratio"]) <= CPU_TARGET  # type: ignore[arg-type]
    rate_ok = float(r["rate_ratio"]) >= RATE_TARGET  # type: ignore[arg-type]
    print(f"\n[ca] renewal path, issue #14: baseline {r['baseline']} vs this tree, {CLIENTS} client processes,")
    print(f"  {r['rounds']} alternating rounds of {SECONDS:g} s each (medians); load {os.getloadavg()[0]:.2f}")
    print(f"  {'measure':44s} {'baseline':>10s} {'now':>10s} {'ratio':>7s} {'target':>8s}  verdict")
    print(
        f"  {'CA CPU per renewal (us)':44s} {cpu['baseline']:10.0f} {cpu['now']:10.0f}"
        f" {r['cpu_ratio']:6.2f}x {'<= ' + str(CPU_TARGET):>8s}  {'PASS' if cpu_ok else 'FAIL'}"
    )
    print(
        f"  {'SVIDs per second':44s} {rate['baseline']:10.1f} {rate['now']:10.1f}"
        f" {r['rate_ratio']:6.2f}x {'>= ' + str(RATE_TARGET):>8s}  {'PASS' if rate_ok else 'FAIL'}"
    )
    print("    baseline: renew_svid, a new TLS connection per renewal; now: IssuerClient, one kept channel")


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each (default 2)")
    parser.add_argument("--only", choices=("issuance", "renewal"), help="run only this part")
    args = parser.parse_args()
    if args.only != "renewal":
        run()
    if args.only != "issuance":
        report_side_by_side(print, side_by_side(args.rounds, SECONDS, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
