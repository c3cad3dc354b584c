"""`python bench/ocsp.py`: what the CA's OCSP responder answers per second, next to its signing rate.

Issue #15, measured in one run:
  * the CA's raw signing rate: ``Authority.sign_svid`` on fresh P-256 keys, one thread, and the
    bare ECDSA signature under it;
  * the responder's logic alone (``OcspResponder.respond``: parse, the store's record of the
    serial from a real SQLite file, build, sign a fresh response with a nonce), one thread;
  * a real CA (``meshid ca serve --ocsp-listen`` in its own process) answering 4 client
    processes that POST nonced requests over keep-alive HTTP for a fixed time: signed, fresh
    responses per second in total, and the latency one client sees.

Every response is signed when asked (a nonce per request: nothing can be cached), so the figure
is a floor; RFC 5019 pre-signed answers would be cheaper.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from meshid.ca.authority import Authority, generate_key
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.ocsp import OcspResponder
from meshid.ca.store import Entry, SqliteStore
from meshid.spiffeid import SpiffeId

TD = "example.org"
CLIENTS = 4
SECONDS = 5.0
BATCHES = 7

#: A client: argv = host, port, a file of DER requests (length-prefixed), seconds. Says "ready",
#: waits for a line on stdin, POSTs in a loop for that long, prints one JSON line.
CLIENT = r"""
import http.client, json, struct, sys, time
host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
data, requests = open(path, "rb").read(), []
while data:
    (n,) = struct.unpack(">I", data[:4]); requests.append(data[4:4 + n]); data = data[4 + n:]
conn = http.client.HTTPConnection(host, port, timeout=30)
print("ready", flush=True)
sys.stdin.readline()
latencies, errors, i = [], 0, 0
end = time.time() + seconds
headers = {"Content-Type": "application/ocsp-request"}
while time.time() < end:
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/", body=requests[i % len(requests)], headers=headers)
        reply = conn.getresponse(); body = reply.read()
        if reply.status != 200 or body[4:7] != b"\x0a\x01\x00":  # OCSPResponseStatus successful
            errors += 1
    except OSError:
        errors += 1; conn.close(); conn = http.client.HTTPConnection(host, port, timeout=30)
    latencies.append(time.perf_counter() - t0); i += 1
print(json.dumps({"n": len(latencies), "errors": errors, "latencies": latencies}))
"""


def _per_op(fn: Callable[[], object], n: int) -> float:
    """Median seconds per call of ``fn`` over ``BATCHES`` batches of ``n``."""
    runs = []
    for _ in range(BATCHES):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n)
    return statistics.median(runs)


def _requests(leaf: x509.Certificate, issuer: x509.Certificate, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())
        builder = builder.add_extension(x509.OCSPNonce(secrets.token_bytes(16)), critical=False)
        out.append(builder.build().public_bytes(serialization.Encoding.DER))
    return out


def _in_process(folder: Path) -> tuple[float, float, float]:
    """(sign_svid, bare ECDSA sign, OcspResponder.respond) seconds per operation."""
    authority = Authority.create_root(TD)
    keys = [generate_key().public_key() for _ in range(200)]
    sid = SpiffeId.parse(f"spiffe://{TD}/ns/bench/sa/w")
    it = iter(range(10**9))
    sign = _per_op(lambda: authority.sign_svid(sid, keys[next(it) % 200]), 200)
    key = authority.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    digest = secrets.token_bytes(100)
    bare = _per_op(lambda: key.sign(digest, ec.ECDSA(hashes.SHA256())), 500)

    store = SqliteStore(str(folder / "bench.db"))
    try:
        now = datetime.datetime.now(datetime.UTC)
        store.create_entry(Entry(sid, (), datetime.timedelta(hours=1), now.replace(microsecond=0)))
        leaf = authority.sign_svid(sid, keys[0])[0]
        store.record_issuance(sid, now, lambda entry: (leaf.serial_number, leaf.not_valid_after_utc, leaf))
        requests = _requests(leaf, authority.certificate, 500)
        responder = OcspResponder(lambda: authority, store.get_issued)
        first = ocsp.load_der_ocsp_response(responder.respond(requests[0]).der)
        assert first.certificate_status == ocsp.OCSPCertStatus.GOOD
        it2 = iter(range(10**9))
        answer = _per_op(lambda: responder.respond(requests[next(it2) % 500]), 300)
    finally:
        store.close()
    return sign, bare, answer


def _read_ports(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    """(gRPC port, OCSP port) from what ``ca serve`` prints."""
    assert proc.stdout is not None
    pending, give_up = b"", time.monotonic() + 60
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < give_up:
            if not selector.select(1):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            pending += chunk
            grpc_port = re.search(rb"CA serving on 127\.0\.0\.1:(\d+)", pending)
            ocsp_port = re.search(rb"CA OCSP responder and CRL on http://127\.0\.0\.1:(\d+)", pending)
            if grpc_port and ocsp_port:
                return int(grpc_port.group(1)), int(ocsp_port.group(1))
    raise RuntimeError("`meshid ca serve` printed no ports")


def _over_http(folder: Path) -> tuple[float, float, int, int]:
    """(responses per second in total, median latency in s, responses, errors) from a real CA."""
    data_dir = folder / "ca"
    init_data_dir(data_dir, TD)
    serve = [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir)]
    with (folder / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [*serve, "--listen", "127.0.0.1:0", "--ocsp-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log
        )
    clients: list[subprocess.Popen[str]] = []
    try:
        grpc_port, port = _read_ports(proc)
        server = f"127.0.0.1:{grpc_port}"
        spiffe_id = f"spiffe://{TD}/ns/bench/sa/ocsp"
        with AdminClient(server, data_dir) as admin:
            admin.create_entry(spiffe_id)
            token = str(admin.create_token(spiffe_id).token)
        svid, _ = fetch_svid(server, data_dir / "bundle.pem", token)
        issuer = x509.load_pem_x509_certificates((data_dir / "ca.pem").read_bytes())[0]
        blob = b"".join(len(r).to_bytes(4, "big") + r for r in _requests(svid.leaf, issuer, 2000))
        (folder / "requests.bin").write_bytes(blob)
        for _ in range(CLIENTS):
            clients.append(
                subprocess.Popen(
                    [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(folder / "requests.bin"), str(SECONDS)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for c in clients:
            assert c.stdout is not None and c.stdout.readline().strip() == "ready"
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        results = [json.loads(c.communicate(timeout=SECONDS + 60)[0]) for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        proc.terminate()
        proc.wait(20)
    n = sum(r["n"] for r in results)
    errors = sum(r["errors"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    return n / SECONDS, statistics.median(latencies), n, errors


def run() -> None:
    print("\n[ocsp] the CA's OCSP responder (issue #15): signed, fresh responses (a nonce each)")
    folder = Path(tempfile.mkdtemp(prefix="meshid-bench-ocsp-"))
    try:
        sign, bare, answer = _in_process(folder)
        print(f"  CA signing rate, sign_svid (P-256)        {1 / sign:8.0f} /s   ({sign * 1e6:.0f} us)")
        print(f"  bare ECDSA P-256 signature                {1 / bare:8.0f} /s   ({bare * 1e6:.0f} us)")
        print(f"  OcspResponder.respond, SQLite lookup      {1 / answer:8.0f} /s   ({answer * 1e6:.0f} us)")
        print(f"  OCSP answers per CA signature             {sign / answer:8.2f}")
        rate, median, n, errors = _over_http(folder)
        what = f"over HTTP, {CLIENTS} client processes, {SECONDS:g} s"
        print(f"  {what:42s}{rate:8.0f} /s   ({n} answers, {errors} errors)")
        print(f"  latency per answer (median)               {median * 1e3:8.2f} ms")
        print(f"  HTTP answers per second / signing rate    {rate * sign:8.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    run()
