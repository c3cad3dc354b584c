"""`make bench`: meshid's costs as ratios against baselines measured in the same run.

Sections: [core] (below), [ca] issuance throughput and the renewal path against a baseline
commit side by side (bench/issuance.py), [rotation] latency and
failures while SVIDs rotate (bench/rotation.py), [replicas] issuance on PostgreSQL with one and
two CA replicas next to SQLite (bench/replicas.py), [memory] server and CA memory under floods of
long method names and under renewals (bench/memory.py), [node-agent] batch issuance against
per-workload renewal, Workload API fetch latency and the node agent's RSS (bench/node_agent.py),
[hotpath] audit records' cost per call, agents' idle refreshes at the CA, import and channel
construction (bench/hotpath.py), [rollout] the cost per call of carrying a candidate policy
(bench/rollout.py), [pq] ML-DSA-65 against ECDSA P-256: issuance rate, SVID size, handshake
time (bench/pq.py), [jwt] JWT-SVID validations/s and a JWT-authenticated call against an
mTLS-authenticated one (bench/jwt_svid.py).

Issue #2 (core):
  * median latency of a unary RPC on an mTLS server with meshid's interceptor and a
    1,000-rule policy, against the same server without the interceptor (target <= 1.05);
  * the cost of one policy decision at 10 and at 10,000 rules (target: ratio <= 1.5).

Both servers run in one process on loopback (the same interpreter and scheduling for both); the
client alternates between them in blocks of 20 calls, which goes first alternating too, so that
drift on the machine affects both alike. The measurement is bench/hotpath.py's (its WARNING
setting, where an allowed call writes no record), in 5 server processes: where a process's
threads land on the CPUs moves its ratio by more than the target's margin, so the median
process is reported with the range.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import grpc
from hotpath import AUDIT_PROCESSES, median_process, per_process_share

import meshid
from meshid._files import write_svid_files
from meshid.ca import Authority

CALLER = "spiffe://example.org/ns/prod/sa/frontend"
SERVER = "spiffe://example.org/ns/prod/sa/greeter"
METHOD = "/meshid.examples.v1.Greeter/SayHello"


def synthetic_policy(n: int) -> dict[str, object]:
    """``n`` rules shaped like a real fleet: mostly exact IDs on specific methods, some patterns.

    Every hundredth rule is a namespace pattern for a service-wide method set; the rule that
    allows the benchmark's caller is the last one.
    """
    rules: list[dict[str, object]] = []
    for i in range(n - 1):
        service = f"/svc{i % 50}.v1.Service{i % 7}"
        if i % 100 == 99:
            rules.append(
                {
                    "name": f"r{i}",
                    "methods": [f"{service}/*"],
                    "spiffe_id_patterns": [f"spiffe://example.org/ns/team{i}/**"],
                }
            )
        else:
            rules.append(
                {
                    "name": f"r{i}",
                    "methods": [f"{service}/Get", f"{service}/List"],
                    "spiffe_ids": [f"spiffe://example.org/ns/team{i}/sa/w{i}"],
                }
            )
    rules.append({"name": "frontend", "methods": ["/meshid.examples.v1.Greeter/*"], "spiffe_ids": [CALLER]})
    return {"name": f"synthetic-{n}", "allow": rules}


def decision_cost(authority: Authority, n: int, repeat: int) -> float:
    policy = meshid.AuthorizationPolicy.from_dict(synthetic_policy(n))
    svid = authority.issue_svid(CALLER)
    peer = meshid.PeerIdentity.from_certificate(svid.leaf, spiffe_id=svid.spiffe_id)
    assert policy.decide(peer, METHOD).allowed
    best = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(repeat):
            policy.decide(peer, METHOD)
        best.append((time.perf_counter() - t0) / repeat)
    return statistics.median(best)


def verdict(ratio: float, target: float) -> str:
    return f"(target <= {target}) {'OK' if ratio <= target else 'MISSED'}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--core-only", action="store_true", help="only the interceptor and decision figures")
    args = parser.parse_args()

    authority = Authority.create_root("example.org")
    bundle = meshid.TrustBundle(authority.trust_domain, authority.roots).to_pem()
    with tempfile.TemporaryDirectory() as folder:
        for name, sid in (("server", SERVER), ("client", CALLER)):
            svid = authority.issue_svid(sid)
            write_svid_files(pathlib.Path(folder) / name, svid.chain_pem(), svid.key_pem(), bundle)
        print(f"meshid bench (Python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs)")
        share = per_process_share(args.calls, AUDIT_PROCESSES)
        print(
            f"\n[core] unary RPC over mTLS on loopback: {AUDIT_PROCESSES} server processes, each with a bare and a "
            f"guarded server, {share} calls to each in blocks of 20, alternating; ratio: median over block pairs "
            "in a process, then the median process (range: all processes)"
        )
        (bare, guarded, ratio), ratios, _ = median_process(folder, "warning", "sync", args.calls)
        print(f"  bare mTLS server                      {bare * 1e6:8.1f} us")
        print(f"  + interceptor, 1,000-rule policy      {guarded * 1e6:8.1f} us")
        print(
            f"  latency ratio                         {ratio:8.3f}   (range {ratios[0]:.3f}-{ratios[-1]:.3f}) "
            f"{verdict(ratio, 1.05)}"
        )

    print("\n[core] one policy decision (AuthorizationPolicy.decide), median of 7 runs")
    small = decision_cost(authority, 10, 20000)
    large = decision_cost(authority, 10_000, 20000)
    dratio = large / small
    print(f"  10 rules                              {small * 1e9:8.0f} ns")
    print(f"  10,000 rules                          {large * 1e9:8.0f} ns")
    print(f"  cost ratio 10,000 / 10                {dratio:8.3f}   {verdict(dratio, 1.5)}")

    if not args.core_only:
        import hotpath  # bench/hotpath.py: issue #14
        import issuance  # bench/issuance.py: issue #3
        import jwt_svid  # bench/jwt_svid.py: issue #16 (not jwt.py: that would shadow PyJWT)
        import memory  # bench/memory.py: issue #10
        import node_agent  # bench/node_agent.py: issue #12
        import ocsp  # bench/ocsp.py: issue #15
        import pq  # bench/pq.py: issue #18
        import replicas  # bench/replicas.py: issue #7
        import rollout  # bench/rollout.py: issue #17
        import rotation  # bench/rotation.py: issue #4

        issuance.run()
        issuance.report_side_by_side(print, issuance.side_by_side(2, issuance.SECONDS, issuance.BASELINE))
        rotation.run()
        replicas.run()
        memory.run()
        node_agent.run()
        hotpath.run()
        ocsp.run()
        rollout.run()
        pq.run()
        jwt_svid.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
