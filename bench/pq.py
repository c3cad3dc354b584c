"""`make bench` [pq], issue #18 must-show 4: ML-DSA-65 against ECDSA P-256, in the same run.

* issuance rate: the CA parses a CSR (its signature checked) and signs the SVID, in process,
  over keys made beforehand; the two kinds alternate in blocks so drift hits both alike;
* SVID size: DER bytes of the leaf, of the CA certificate, and of the two together (what a peer
  receives and checks against its bundle's root);
* mutual handshake time: meshid.pqtls on both sides (pyOpenSSL on cryptography's OpenSSL, the
  X25519MLKEM768 group in both cases), loopback, with meshid's verification of the peer; median
  of interleaved handshakes.

Figures are measurements, printed as ratios to ECDSA P-256; there is no target. The 1-minute load
average is printed: the machine may be shared.

    python bench/pq.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time

from cryptography.hazmat.primitives.serialization import Encoding
from hotpath import loadavg  # bench/hotpath.py

import meshid
from meshid.ca import Authority, generate_key
from meshid.ca.csr import build_csr, parse_csr

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/prod/sa/echo"
CLIENT_ID = f"spiffe://{TD}/ns/prod/sa/frontend"
KINDS = {"ECDSA P-256": "ec-p256", "ML-DSA-65": "ml-dsa-65"}


def issuance_rates(cas: dict[str, Authority], seconds: float, block: int = 20) -> dict[str, float]:
    """SVIDs signed per second from ready CSRs, for each CA, in alternating blocks."""
    sid = meshid.SpiffeId.parse(CLIENT_ID)
    csrs = {name: [build_csr(generate_key(KINDS[name])) for _ in range(block)] for name in cas}
    done = dict.fromkeys(cas, 0)
    spent = dict.fromkeys(cas, 0.0)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, authority in cas.items():
            t0 = time.perf_counter()
            for der in csrs[name]:
                authority.sign_svid(sid, parse_csr(der).public_key)
            spent[name] += time.perf_counter() - t0
            done[name] += block
    return {name: done[name] / spent[name] for name in cas}


def sizes(authority: Authority, kind: str) -> tuple[int, int, int]:
    svid = authority.issue_svid(CLIENT_ID, key_kind=kind)
    leaf = len(svid.leaf.public_bytes(Encoding.DER))
    ca = len(authority.certificate.public_bytes(Encoding.DER))
    return leaf, ca, leaf + ca


def handshake_times(cas: dict[str, Authority], rounds: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds of one mutual TLS 1.3 handshake with meshid.pqtls, per key kind, interleaved."""
    from meshid import pqtls

    bundles = meshid.BundleSet.of(
        meshid.TrustBundle(meshid.TrustDomain.parse(TD), tuple(r for a in cas.values() for r in a.roots))
    )
    policy = meshid.AuthorizationPolicy.from_dict(
        {"name": "bench", "allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [CLIENT_ID]}]}
    )
    sources = {
        name: (
            meshid.StaticSource(a.issue_svid(SERVER_ID, key_kind=KINDS[name]), bundles),
            meshid.StaticSource(a.issue_svid(CLIENT_ID, key_kind=KINDS[name]), bundles),
        )
        for name, a in cas.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in cas}
    groups: dict[str, str] = {}
    for _ in range(rounds):
        for name, (server_source, client_source) in sources.items():
            with socket.create_server(("127.0.0.1", 0)) as listener:
                port = listener.getsockname()[1]
                failure: list[BaseException] = []

                def serve(
                    listener: socket.socket = listener,
                    source: meshid.StaticSource = server_source,
                    failure: list[BaseException] = failure,
                ) -> None:
                    raw, _ = listener.accept()
                    try:
                        with pqtls.accept(raw, source, policy=policy, method="/bench.Echo/Say", timeout=10) as conn:
                            conn.sendall(b"k")
                    except BaseException as err:
                        failure.append(err)

                thread = threading.Thread(target=serve, daemon=True)
                thread.start()
                t0 = time.perf_counter()
                with pqtls.connect(("127.0.0.1", port), client_source, server_id=SERVER_ID, timeout=10) as conn:
                    assert conn.recv(1) == b"k"  # the server's side is done too: it verified and authorized us
                    samples[name].append(time.perf_counter() - t0)
                    groups[name] = f"{conn.peer.key_exchange_group}, {conn.peer.signature_algorithm}"
                thread.join(10)
                if failure:
                    raise failure[0]
    return {name: statistics.median(s) for name, s in samples.items()}, groups


def run(*, quick: bool = False) -> None:
    cas = {
        "ECDSA P-256": Authority.create_root(TD),
        "ML-DSA-65": Authority.create_root(TD, key=generate_key("ml-dsa-65")),
    }
    base = "ECDSA P-256"
    print(f"\n[pq] ML-DSA-65 against ECDSA P-256 (issue #18); load average {loadavg()}")
    rates = issuance_rates(cas, 1.0 if quick else 4.0)
    print("  issuance, CA parses the CSR and signs, in process")
    for name, rate in rates.items():
        print(f"    {name:<12} {rate:9.0f} SVIDs/s   ratio to {base} {rate / rates[base]:6.3f}")
    print("  SVID size, DER bytes             leaf      CA    leaf+CA")
    figures = {name: sizes(a, KINDS[name]) for name, a in cas.items()}
    for name, (leaf, ca, both) in figures.items():
        ratio = both / figures[base][2]
        print(f"    {name:<12} {leaf:>19} {ca:>7} {both:>10}   ratio {ratio:6.2f}")
    try:
        times, groups = handshake_times(cas, 20 if quick else 100)
    except ImportError:
        print("  handshake: needs pyOpenSSL (pip install 'meshid[pq]')")
    else:
        print("  mutual TLS 1.3 handshake, meshid.pqtls both sides, verification included (median)")
        for name, seconds in times.items():
            ratio = seconds / times[base]
            print(f"    {name:<12} {seconds * 1e3:9.2f} ms   ratio {ratio:6.3f}   ({groups[name]})")
    print(f"  load average after {loadavg()}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a short run (fewer handshakes, 1 s of issuance)")
    args = parser.parse_args()
    print(f"meshid bench [pq] (Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    run(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
