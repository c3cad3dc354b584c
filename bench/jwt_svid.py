"""`make bench` [jwt], issue #16 must-show 3: JWT-SVID validation in the interceptor's path, and
what a JWT-authenticated call costs against an mTLS-authenticated one, in the same run.

(Named jwt_svid.py, not jwt.py: bench/ is the script folder on sys.path, and a bench/jwt.py would
shadow PyJWT for everything the bench imports.)

Parts:

  * validations/s of ``meshid.peer.JwtVerifier.identify``, what the interceptor calls for a
    bearer token: cold (every token new, so its ES256 signature is verified; also RS256) and warm
    (the same token again, served from the cache keyed by its SHA-256 until its exp);
  * per-call latency of a unary RPC through meshid's interceptor in one server process with two
    listeners: mTLS (the client certificate identifies the caller) and TLS without a client
    certificate (a JWT-SVID in ``authorization: Bearer`` does, sent as plain metadata, through
    ``meshid.jwt_call_credentials``, and through a grpc plugin that returns a fixed header: the
    cost of grpc's call-credential machinery alone, beside meshid's). The client alternates
    between them in blocks of 20 calls; the ratio is the median over adjacent block pairs, so
    drift of the machine cancels out.

The issue sets no target: the figures and ratios are printed, nothing passes or fails.

    python bench/jwt_svid.py [--calls 5000] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from hotpath import CALLER, SERVER, TD, Greeter, loadavg  # bench/hotpath.py: the same names, servicer and load line

import meshid
from meshid._proto import greeter_pb2, greeter_pb2_grpc
from meshid.ca import Authority
from meshid.ca.jwt_keys import JwtPrivateKey, generate_jwt_key
from meshid.jwtsvid import sign_jwt_svid
from meshid.peer import JwtVerifier

LIFETIME = datetime.timedelta(minutes=5)


def _key_pem(key: JwtPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# -- validations/s --------------------------------------------------------------------------------


def validations(count: int) -> dict[str, float]:
    authority = Authority.create_root(TD)
    now = datetime.datetime.now(datetime.UTC)
    audiences = frozenset({SERVER})
    rates: dict[str, float] = {}
    for kind, label in (("ec-p256", "ES256"), ("rsa-2048", "RS256")):
        key = generate_jwt_key(kind)
        bundles = meshid.BundleSet.of(
            meshid.TrustBundle(authority.trust_domain, authority.roots, jwt_authorities={"k1": key.public_key()})
        )
        caller = meshid.SpiffeId.parse(CALLER)
        # Distinct tokens (a second audience each), so every one misses the cache.
        tokens = [
            sign_jwt_svid(key, "k1", caller, [SERVER, f"n{i}"], lifetime=LIFETIME, now=now).token for i in range(count)
        ]

        def current(b: meshid.BundleSet = bundles) -> meshid.BundleSet:
            return b

        verifier = JwtVerifier(current, cache_size=count + 1)
        t0 = time.perf_counter()
        for token in tokens:
            verifier.identify(token, audiences)
        rates[f"cold {label}"] = count / (time.perf_counter() - t0)
        if label == "ES256":
            token = tokens[0]
            warm = count * 20
            t0 = time.perf_counter()
            for _ in range(warm):
                verifier.identify(token, audiences)
            rates["warm (cache hit)"] = warm / (time.perf_counter() - t0)
    return rates


# -- per-call overhead ------------------------------------------------------------------------------


def make_files(folder: str) -> None:
    authority = Authority.create_root(TD)
    key = generate_jwt_key("ec-p256")
    bundle = meshid.TrustBundle(authority.trust_domain, authority.roots, jwt_authorities={"k1": key.public_key()})
    base = pathlib.Path(folder)
    (base / "bundle.json").write_text(bundle.to_spiffe_json())
    (base / "jwt.key").write_bytes(_key_pem(key))
    (base / "jwt.key").chmod(0o600)
    for name, sid in (("server", SERVER), ("client", CALLER)):
        svid = authority.issue_svid(sid)
        (base / f"{name}.pem").write_bytes(svid.chain_pem())
        (base / f"{name}.key").write_bytes(svid.key_pem())
        (base / f"{name}.key").chmod(0o600)


def _load(folder: str, name: str) -> tuple[meshid.StaticSource, meshid.BundleSet]:
    base = pathlib.Path(folder)
    bundles = meshid.BundleSet.of(meshid.TrustBundle.from_spiffe_json(TD, (base / "bundle.json").read_text()))
    svid = meshid.X509Svid.load(base / f"{name}.pem", base / f"{name}.key")
    return meshid.StaticSource(svid, bundles), bundles


def serve(folder: str) -> None:
    """One greeter, one interceptor (policy accepting x509 and jwt), two listeners; prints their ports."""
    source, _ = _load(folder, "server")
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "identity_sources": ["x509", "jwt"],
            "allow": [{"name": "frontend", "methods": ["/meshid.examples.v1.Greeter/*"], "spiffe_ids": [CALLER]}],
        }
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=source)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)  # type: ignore[no-untyped-call]
    mtls = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
    tls = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source, require_client_certificate=False))
    server.start()
    print(mtls, tls, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(None)


class _Signer:
    def __init__(self, key: Any) -> None:
        self.key = key

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: meshid.SpiffeId | None = None) -> meshid.JwtSvid:
        now = datetime.datetime.now(datetime.UTC)
        return sign_jwt_svid(self.key, "k1", meshid.SpiffeId.parse(CALLER), audience, lifetime=LIFETIME, now=now)

    def get_jwt_bundles(self) -> meshid.BundleSet:
        raise NotImplementedError


class _FixedHeader(grpc.AuthMetadataPlugin):
    """grpc's call-credential plugin at its cheapest: the same header every call. What its
    machinery costs (core hands each call to a Python thread), without meshid's part."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, context: Any, callback: Any) -> None:
        callback(self.metadata, None)


NAMES = (
    "mTLS (client certificate)",
    "JWT-SVID (metadata)",
    "JWT-SVID (jwt_call_credentials)",
    "JWT-SVID (a fixed-header grpc plugin)",
)


def per_call(folder: str, calls: int, block: int = 20) -> dict[str, float]:
    client, bundles = _load(folder, "client")
    key = serialization.load_pem_private_key((pathlib.Path(folder) / "jwt.key").read_bytes(), None)
    signer = _Signer(key)
    token = signer.fetch_jwt_svid([SERVER]).token
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        mtls_port, tls_port = (int(p) for p in proc.stdout.readline().split())
        pin = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER)))]
        roots = bundles[meshid.TrustDomain.parse(TD)].to_pem()
        tls = grpc.ssl_channel_credentials(roots)
        with_creds = grpc.composite_channel_credentials(tls, meshid.jwt_call_credentials(signer, audience=SERVER))
        fixed = grpc.composite_channel_credentials(tls, grpc.metadata_call_credentials(_FixedHeader(token)))
        channels = {
            NAMES[0]: meshid.secure_channel(f"127.0.0.1:{mtls_port}", client, server_id=SERVER),
            NAMES[1]: grpc.secure_channel(f"127.0.0.1:{tls_port}", tls, options=pin),
            NAMES[2]: grpc.secure_channel(f"127.0.0.1:{tls_port}", with_creds, options=pin),
            NAMES[3]: grpc.secure_channel(f"127.0.0.1:{tls_port}", fixed, options=pin),
        }
        metadata = {"JWT-SVID (metadata)": [("authorization", f"Bearer {token}")]}
        stubs = {name: greeter_pb2_grpc.GreeterStub(c) for name, c in channels.items()}  # type: ignore[no-untyped-call]
        request = greeter_pb2.HelloRequest(name="bench")
        for name, s in stubs.items():  # connect, warm up, and fill the server's token cache
            for _ in range(300):
                s.SayHello(request, metadata=metadata.get(name), timeout=10)
        samples: dict[str, list[float]] = {name: [] for name in stubs}
        ratios: dict[str, list[float]] = {name: [] for name in stubs}
        for _ in range(calls // block):
            medians = {}
            for name, s in stubs.items():
                md = metadata.get(name)
                times = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    s.SayHello(request, metadata=md, timeout=10)
                    times.append(time.perf_counter() - t0)
                samples[name] += times
                medians[name] = statistics.median(times)
            base = medians["mTLS (client certificate)"]
            for name, median in medians.items():
                ratios[name].append(median / base)
        for c in channels.values():
            c.close()
        results = {}
        for name in stubs:
            results[f"{name} median_us"] = statistics.median(samples[name]) * 1e6
            results[f"{name} ratio"] = statistics.median(ratios[name])
        return results
    finally:
        proc.communicate("", timeout=30)


def run(calls: int = 5000, as_json: bool = False) -> dict[str, Any]:
    print(f"\n[jwt] load average {loadavg()} (1 min) before")
    print("[jwt] JWT-SVID validations/s in the interceptor's path (JwtVerifier.identify)")
    rates = validations(2000)
    for name, rate in rates.items():
        print(f"  {name:36} {rate:12,.0f} /s")
    print(
        f"[jwt] unary RPC through the interceptor, median of {calls} calls each, blocks of 20 alternating; "
        "ratio to mTLS: median over block pairs (no target set by the issue)"
    )
    with tempfile.TemporaryDirectory() as folder:
        make_files(folder)
        figures = per_call(folder, calls)
    for name in NAMES:
        print(f"  {name:38} {figures[name + ' median_us']:8.1f} us   ratio to mTLS {figures[name + ' ratio']:6.3f}")
    print(f"[jwt] load average {loadavg()} (1 min) after")
    results: dict[str, Any] = {"validations_per_s": rates, "per_call": figures}
    if as_json:
        print(json.dumps(results, indent=2))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    print(f"meshid bench [jwt] (Python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs)")
    run(args.calls, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
