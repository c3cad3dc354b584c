"""`make bench` [node-agent], issue #12 must-show 5: what a node agent buys, measured in one run.

Three parts, each against servers in processes of their own on loopback:

  * batch issuance: a CA (``meshid ca init`` + ``meshid ca serve``, SQLite with its durable
    writes) and a node agent attested with a join token, 1,000 entries parented to it.
    ``AgentClient.batch_new_svids`` for all 1,000, timed with the keys generated inside the
    timed part (the target figure: an agent makes a new key for every SVID it asks for, as
    ``NodeAgent`` does, each as its CSR is built) and with the keys made beforehand (CSRs are
    built inside the call either way). Baseline, against the same CA in the same run, rounds
    interleaved with the batches: today's per-workload path, 200 workloads renewing once each
    per round with ``renew_with_svid`` (a new key and a new mTLS connection per renewal) from
    4 client processes. Targets: >= 1,500 SVIDs/s and >= 5x the per-workload path. A missed
    target (or ``--profile``) adds cProfile profiles of a batch: the agent's side over the real
    connection, and the CA's side in this process (with the CA stopped, on its data folder: the
    CA's logic and store without gRPC and TLS).
  * Workload API fetch latency: ``AttestedWorkloadApiServer`` (grpclib; attests each stream's
    process from /proc) with a static provider (one SVID, for this user's uid), and the grpcio
    ``WorkloadApiServer`` over a ``StaticSource`` as the baseline, both in one server process.
    100 connections (4 client processes x 25 threads, each with its own connection to each
    server) fetch at once: FetchX509SVID, time to the first response, cancel. Blocks of 5
    fetches per connection alternate between the servers. p50 and p99 of each, and the ratio.
  * node agent RSS: ``meshid agent --node`` (a ``NodeAgent`` serving an
    ``AttestedWorkloadApiServer``) attested with a join token, 1,000 entries parented to it; its
    VmRSS from /proc once its state line says it serves all 1,000. Target <= 150 MB.

The CA limits each admin to 60 creations per minute (``IssuingService(creations_per_minute=)``;
``ca serve`` has no option for it), so 1,000 entries through ``AdminClient.create_entry`` would
take 17 minutes. The entries (and the baseline workloads' join tokens) are made between ``ca
init`` and ``ca serve``, with the CA not running, through ``meshid.ca.datadir.open_service(DIR,
creations_per_minute=...)``: the same ``IssuingService.create_entry`` checks (parent, selectors,
TTL) into the same store, with the limit raised for this one offline admin. Only the agents'
join tokens go through the running CA.

Every absolute figure moves with other work on the machine: the 1-minute load average is
printed before and after. MB is 10^6 bytes. A measurement, not a test: it exits 0 whatever the
figures and prints FAIL beside a missed target. Every process it starts is stopped at the end,
on error and on Ctrl-C.

    python bench/node_agent.py [--entries 1000] [--rounds 3] [--workloads 200] [--fetches 2000]
        [--connections 100] [--only batch|fetch|rss] [--profile] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pathlib
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from issuance import cpu_seconds, percentile
from memory import Child, _tree, children, rss_bytes

import meshid

TD = "example.org"
MB = 1_000_000
START_TIMEOUT = 60.0
BATCH_TARGET = 1500.0  # SVIDs/s
RATIO_TARGET = 5.0
RSS_TARGET_MB = 150.0
BATCH_AGENT = "bench-batch"
NODE_AGENT = "bench-node"
#: Entries' selectors: a uid each, none of them this user's (nothing local matches them).
FIRST_UID = 20_000
RENEWERS = 4  # client processes of the per-workload baseline, as bench/issuance.py
FETCHERS = 4  # client processes of the fetch latency part
FETCH_BLOCK = 5  # fetches per connection before switching servers
TOP = 8  # rows of each view of a profile


# --- the child processes ------------------------------------------------------------------


def renewer(address: str, bundle_file: str, tokens_file: str) -> None:
    """Workloads of today's path: each gets its first SVID by join token; then, for each line on
    stdin, each renews once (a new key, a new mTLS connection); one JSON line per round."""
    from meshid.ca.client import fetch_svid, renew_with_svid

    svids = []
    for token in json.loads(pathlib.Path(tokens_file).read_text()):
        svids.append(fetch_svid(address, bundle_file, token))
    print(json.dumps({"ready": len(svids)}), flush=True)
    for _ in sys.stdin:
        latencies, errors, last_error = [], 0, ""
        start = time.time()
        for i, (svid, bundle) in enumerate(svids):
            t0 = time.perf_counter()
            try:
                issued = renew_with_svid(address, svid, meshid.BundleSet.of(bundle))
            except meshid.RemoteError as err:
                errors, last_error = errors + 1, str(err)[:300]
                continue
            latencies.append(time.perf_counter() - t0)
            svids[i] = (issued.svid, issued.bundle)
        report = {"latencies": latencies, "errors": errors, "last_error": last_error, "start": start}
        print(json.dumps({**report, "end": time.time()}), flush=True)


class OneUid:
    """An IdentityProvider with one SVID, for the processes of one uid (an entry ``unix:uid:N``)."""

    def __init__(self, svid: meshid.X509Svid, bundles: meshid.BundleSet, uid: int) -> None:
        self._identities = [(svid, bundles)]
        self._selectors = (f"unix:uid:{uid}",)

    def identities_for(self, process: Any) -> list[tuple[meshid.X509Svid, meshid.BundleSet]]:
        from meshid.workloadapi import matches

        return self._identities if matches(self._selectors, process) else []

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        return lambda: None  # static: nothing ever changes


def serve_workload_apis(folder: str, streams: int) -> None:
    """Both Workload API servers in one process (the same interpreter and CPU for the two), one
    SVID for this user's uid; prints their sockets, serves until stdin closes."""
    from meshid.ca import Authority
    from meshid.workloadapi import AttestedWorkloadApiServer, WorkloadApiServer

    authority = Authority.create_root(TD)
    svid = authority.issue_svid(f"spiffe://{TD}/bench/uid/{os.getuid()}")
    bundles = meshid.BundleSet.of(meshid.TrustBundle(authority.trust_domain, authority.roots))
    sockets = {"attested": os.path.join(folder, "attested.sock"), "grpcio": os.path.join(folder, "grpcio.sock")}
    # The grpcio server holds a thread per stream and refuses above max_streams (default 64):
    # both are given room for every connection, as an operator serving that many would.
    attested = AttestedWorkloadApiServer(OneUid(svid, bundles, os.getuid()), sockets["attested"], max_streams=streams)
    plain = WorkloadApiServer(meshid.StaticSource(svid, bundles), sockets["grpcio"], max_streams=streams)
    attested.start()
    plain.start()
    print(json.dumps(sockets), flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    plain.stop(None)
    attested.close(0)


def fetcher(sockets_json: str, connections: int) -> None:
    """``connections`` threads, each with its own connection to each server. For each line
    "SERVER N" on stdin, every thread fetches N times from that server at once; one JSON line."""
    from meshid._proto import workload_pb2, workload_pb2_grpc
    from meshid.workloadapi import wire

    sockets = json.loads(sockets_json)
    # grpcio shares one connection among channels to the same target unless each has its own pool.
    options = [("grpc.use_local_subchannel_pool", 1)]
    stubs = {
        name: [
            workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{path}", options=options))  # type: ignore[no-untyped-call]
            for _ in range(connections)
        ]
        for name, path in sockets.items()
    }
    request = workload_pb2.X509SVIDRequest()

    def fetch(stub: Any) -> float:
        t0 = time.perf_counter()
        call = stub.FetchX509SVID(request, metadata=wire.METADATA, timeout=10)
        try:
            response = next(call)
        finally:
            call.cancel()
        elapsed = time.perf_counter() - t0
        if not response.svids:
            raise RuntimeError("bench: a Workload API answered without an SVID")
        return elapsed

    def many(stub: Any, n: int) -> tuple[list[float], list[str]]:
        latencies, errors = [], []
        for _ in range(n):
            try:
                latencies.append(fetch(stub))
            except grpc.RpcError as err:
                errors.append(f"{err.code().name}: {(err.details() or '')[:200]}")
        return latencies, errors

    with futures.ThreadPoolExecutor(connections) as pool:
        for name in stubs:  # connect each channel and warm it up: not measured
            for _, errors in pool.map(many, stubs[name], [2] * connections):
                if errors:
                    raise RuntimeError(f"bench: warm-up fetch from {name} failed: {errors[0]}")
        print(json.dumps({"ready": connections}), flush=True)
        for line in sys.stdin:
            name, n = line.split()
            latencies, errors = [], []
            for lat, err in pool.map(many, stubs[name], [int(n)] * connections):
                latencies += lat
                errors += err
            print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)


# --- the CA --------------------------------------------------------------------------------


def init_ca(folder: pathlib.Path) -> pathlib.Path:
    data = folder / "ca"
    cli = [sys.executable, "-m", "meshid.cli", "ca", "init", "--data-dir", str(data), "--trust-domain", TD]
    subprocess.run(cli, check=True, capture_output=True, timeout=60)
    return data


def agent_sid(name: str) -> str:
    return f"spiffe://{TD}/meshid/agent/{name}"


def entry_ids(agent: str, n: int) -> list[str]:
    return [f"spiffe://{TD}/bench/{agent}/w{i:04d}" for i in range(n)]


def create_offline(data: pathlib.Path, agents: dict[str, int], workloads: int) -> tuple[list[str], float]:
    """With the CA stopped: ``n`` entries parented to each agent, and ``workloads`` entries without
    a parent with a join token each. Returns the tokens and the seconds it took."""
    from meshid.ca.datadir import open_service
    from meshid.ca.issuing import admin_id

    t0 = time.monotonic()
    total = sum(agents.values()) + 2 * workloads
    service = open_service(data, creations_per_minute=total + 1)
    try:
        admin = str(admin_id(service.authority))
        uid = FIRST_UID
        for name, n in agents.items():
            for sid in entry_ids(name, n):
                service.create_entry(admin, sid, parent_id=agent_sid(name), selectors=[f"unix:uid:{uid}"])
                uid += 1
        tokens = []
        for sid in entry_ids("workload", workloads):
            service.create_entry(admin, sid)
            tokens.append(service.create_token(admin, sid)[0])
    finally:
        service.store.close()
    return tokens, time.monotonic() - t0


def serve_ca(folder: pathlib.Path, data: pathlib.Path, started: list[Child]) -> tuple[Child, str]:
    # The CA logs every issuance at INFO: to a file, not the terminal (the cost stays in).
    argv = [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"]
    ca = Child("the CA", argv, folder / "ca.log")
    started.append(ca)
    line = ca.line(START_TIMEOUT).strip()
    if not line.startswith("CA serving on "):
        raise RuntimeError(f"bench: `meshid ca serve` did not start (printed {line!r})")
    return ca, line.removeprefix("CA serving on ")


def agent_token(address: str, data: pathlib.Path, name: str) -> str:
    """A join token for node agent ``name``, from the running CA (one creation: within its limit)."""
    from meshid.ca.client import AdminClient

    with AdminClient(address, data) as admin:
        return str(admin.create_agent_token(name).token)


# --- part 1: batch issuance ----------------------------------------------------------------


def one_batch(client: Any, ids: Sequence[str], keys_inside: bool, ca_pid: int) -> dict[str, Any]:
    """One ``batch_new_svids`` for ``ids``: wall time (with key generation inside it or not),
    SVIDs issued, CPU seconds of the CA and of this process."""
    from meshid.ca.authority import generate_key

    # inside: each key made as its CSR is built (a function for a key), as NodeAgent asks
    keys: list[Any] = [generate_key] * len(ids) if keys_inside else [generate_key() for _ in ids]
    ca_cpu, own_cpu = cpu_seconds(ca_pid), time.process_time()
    t0 = time.perf_counter()
    results = client.batch_new_svids(list(zip(ids, keys, strict=True)))
    seconds = time.perf_counter() - t0
    ca_after, own_after = cpu_seconds(ca_pid), time.process_time()
    refused = [f"{r.spiffe_id}: {r.code}: {r.message}" for r in results if r.code != "OK"]
    return {
        "seconds": seconds,
        "issued": len(results) - len(refused),
        "refused": refused[:3],
        "ca_cpu": None if ca_cpu is None or ca_after is None else ca_after - ca_cpu,
        "agent_cpu": own_after - own_cpu,
    }


def baseline_round(renewers: list[Child], timeout: float) -> dict[str, Any]:
    for r in renewers:
        r.send("go")
    reports = [r.json(timeout) for r in renewers]
    latencies = [t for rep in reports for t in rep["latencies"]]
    return {
        "renewed": len(latencies),
        "latencies": latencies,
        "errors": sum(rep["errors"] for rep in reports),
        "last_error": next((rep["last_error"] for rep in reports if rep["last_error"]), ""),
        "seconds": max(rep["end"] for rep in reports) - min(rep["start"] for rep in reports),
    }


def rate(rounds: list[dict[str, Any]], count: str) -> float:
    """SVIDs per second over all ``rounds``: the sum of their ``count`` over the sum of their seconds."""
    return float(sum(r[count] for r in rounds) / sum(r["seconds"] for r in rounds))


def batch_part(
    folder: pathlib.Path, entries: int, rounds: int, workloads: int, profile: bool, say: Callable[..., object]
) -> dict[str, Any]:
    from meshid.ca.client import AgentClient, attest_agent_with_token

    data = init_ca(folder)
    tokens, offline = create_offline(data, {BATCH_AGENT: entries}, workloads)
    say(
        f"  {entries} entries parented to {agent_sid(BATCH_AGENT)} and {workloads} workload entries + tokens"
        f" made with the CA stopped (open_service, limit raised) in {offline:.1f} s"
    )
    ids = entry_ids(BATCH_AGENT, entries)
    result: dict[str, Any] = {"entries": entries, "workloads": workloads, "offline_creation_seconds": offline}
    with children() as started:
        ca, address = serve_ca(folder, data, started)
        bundle_file = data / "bundle.pem"
        issued = attest_agent_with_token(address, bundle_file.read_bytes(), agent_token(address, data, BATCH_AGENT))
        renewers = []
        for k in range(RENEWERS):
            share = folder / f"tokens{k}.json"
            share.write_text(json.dumps(tokens[k::RENEWERS]))
            argv = [sys.executable, __file__, "--renewer", address, str(bundle_file), str(share)]
            renewers.append(Child(f"renewer {k}", argv, folder / f"renewer{k}.log"))
        started.extend(renewers)
        for r in renewers:
            r.json(START_TIMEOUT + workloads * 0.5)  # first SVIDs by join token: not measured
        with AgentClient(address, issued.svid, meshid.BundleSet.of(issued.bundle)) as client:
            one_batch(client, ids, True, ca.proc.pid)  # warm-up: the first SVIDs of every entry
            batches: dict[str, list[dict[str, Any]]] = {"keys_inside": [], "keys_before": []}
            baseline: list[dict[str, Any]] = []
            for _ in range(rounds):  # interleaved, so drift on the machine affects all three alike
                batches["keys_inside"].append(one_batch(client, ids, True, ca.proc.pid))
                batches["keys_before"].append(one_batch(client, ids, False, ca.proc.pid))
                baseline.append(baseline_round(renewers, 60 + workloads))
            if not all(r["renewed"] for r in baseline):
                raise RuntimeError(f"bench: a baseline round renewed nothing: {baseline[-1]['last_error']}")
            batch_rate = rate(batches["keys_inside"], "issued")
            ratio = batch_rate / rate(baseline, "renewed")
            missed = batch_rate < BATCH_TARGET or ratio < RATIO_TARGET
            if profile or missed:
                result["agent_profile"] = profile_agent(client, ids)
    for kind, done in batches.items():
        result[kind] = {
            "svids_per_second": rate(done, "issued"),
            "per_round": [r["issued"] / r["seconds"] for r in done],
            "incomplete": [r["refused"] for r in done if r["issued"] < entries][:1],
            "wall_us_per_svid": sum(r["seconds"] for r in done) / max(1, sum(r["issued"] for r in done)) * 1e6,
            "ca_cpu_us_per_svid": _per(done, "ca_cpu"),
            "agent_cpu_us_per_svid": _per(done, "agent_cpu"),
        }
    lat = [t for r in baseline for t in r["latencies"]]
    result["per_workload"] = {
        "svids_per_second": rate(baseline, "renewed"),
        "per_round": [r["renewed"] / r["seconds"] for r in baseline],
        "renewals": len(lat),
        "errors": sum(r["errors"] for r in baseline),
        "last_error": next((r["last_error"] for r in baseline if r["last_error"]), ""),
        "latency_p50_ms": statistics.median(lat) * 1e3 if lat else None,
        "latency_p99_ms": percentile(lat, 99) * 1e3 if lat else None,
    }
    result["ratio"] = ratio
    complete = not any(result[k]["incomplete"] for k in batches)
    result["passed"] = not missed and complete
    if profile or missed:
        result["ca_profile"] = profile_ca(data, ids)
    return result


def _per(done: list[dict[str, Any]], field: str) -> float | None:
    if any(r[field] is None for r in done):
        return None
    return float(sum(r[field] for r in done) / sum(r["issued"] for r in done) * 1e6)


def _top(prof: cProfile.Profile, seconds: float) -> dict[str, list[str]]:
    """The profile's top rows, as shares of the wall time profiled: by own time among all
    functions, and by cumulative time among meshid's below the call's entry points (those above
    70%, which only say that the call took the time), i.e. where in meshid the time goes."""
    root = str(pathlib.Path(meshid.__file__).resolve().parent)
    rows = []
    for (file, line, fn), (_, calls, own, cum, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        path = pathlib.Path(file)
        where = fn if file == "~" else f"{path.parent.name}/{path.name}:{line}({fn})"
        rows.append((own, cum, calls, where, file.startswith(root)))

    def show(picked: list[tuple[float, float, int, str, bool]]) -> list[str]:
        return [f"{o / seconds:6.1%} own {c / seconds:6.1%} cum {n:6d}x  {w}" for o, c, n, w, _ in picked]

    by_own = sorted(rows, key=lambda r: -r[0])[:TOP]
    by_cum = sorted((r for r in rows if r[4] and r[1] < 0.7 * seconds), key=lambda r: -r[1])[:TOP]
    return {"by_own_time": show(by_own), "meshid_by_cumulative_time": show(by_cum)}


def profile_ca(data: pathlib.Path, ids: Sequence[str]) -> dict[str, Any]:
    """The CA's side of 1,000 SVIDs in this process, with the CA stopped, on the same data folder
    (SQLite, synchronous=FULL), split into the batches the client sends; no gRPC, no TLS. Once
    without the profiler (its CPU time per SVID, to set against the CA process's), then under it."""
    from meshid._proto import agent_pb2
    from meshid.ca.agents import AgentService
    from meshid.ca.authority import generate_key
    from meshid.ca.client import BATCH_REQUEST_BYTES, BATCH_REQUESTS
    from meshid.ca.csr import build_csr
    from meshid.ca.datadir import open_service

    def batches() -> list[list[tuple[str, bytes]]]:  # new keys each time; split as AgentClient does
        out: list[list[tuple[str, bytes]]] = []
        batch = agent_pb2.BatchNewX509SvidRequest()
        for sid in ids:
            item = agent_pb2.SvidRequest(spiffe_id=sid, csr=build_csr(generate_key()))
            full = len(batch.requests) >= BATCH_REQUESTS
            if batch.requests and (full or batch.ByteSize() + item.ByteSize() + 8 > BATCH_REQUEST_BYTES):
                out.append([(r.spiffe_id, r.csr) for r in batch.requests])
                batch = agent_pb2.BatchNewX509SvidRequest()
            batch.requests.append(item)
        return [*out, [(r.spiffe_id, r.csr) for r in batch.requests]]

    service = open_service(data)
    try:
        agents = AgentService(service)
        caller = meshid.SpiffeId.parse(agent_sid(BATCH_AGENT))
        cpu = []
        for _ in range(3):  # the median of 3: other work on the machine moves CPU time too
            plain = batches()
            t = time.process_time()
            for chunk in plain:
                agents.batch_new_svids(caller, chunk)
            cpu.append(time.process_time() - t)
        profiled = batches()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for chunk in profiled:
            agents.batch_new_svids(caller, chunk)
        prof.disable()
        seconds = time.perf_counter() - t0
    finally:
        service.store.close()
    return {
        "svids": len(ids),
        "batches": len(plain),
        "cpu_us_per_svid_unprofiled": statistics.median(cpu) / len(ids) * 1e6,
        "seconds": seconds,
        **_top(prof, seconds),
    }


def profile_agent(client: Any, ids: Sequence[str]) -> dict[str, Any]:
    """The agent's side of one batch of 1,000 over the real connection: keys, CSRs, the calls
    (waiting on the CA shows as the grpc call), reading and verifying the SVIDs."""
    from meshid.ca.authority import generate_key

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    client.batch_new_svids([(sid, generate_key()) for sid in ids])
    prof.disable()
    seconds = time.perf_counter() - t0
    return {"svids": len(ids), "seconds": seconds, **_top(prof, seconds)}


# --- part 2: Workload API fetch latency ----------------------------------------------------


def fetch_part(folder: pathlib.Path, fetches: int, connections: int) -> dict[str, Any]:
    per_process = [connections // FETCHERS + (k < connections % FETCHERS) for k in range(FETCHERS)]
    per_process = [n for n in per_process if n]
    blocks = max(1, round(fetches / connections / FETCH_BLOCK))
    samples: dict[str, list[float]] = {"attested": [], "grpcio": []}
    errors: dict[str, list[str]] = {"attested": [], "grpcio": []}
    busy = {"attested": 0.0, "grpcio": 0.0}
    with children() as started:
        server = Child(
            "the Workload API servers",
            [sys.executable, __file__, "--serve-workload-apis", str(folder), str(connections + 16)],
            folder / "servers.log",
        )
        started.append(server)
        sockets = server.line(START_TIMEOUT).strip()
        clients = [
            Child(f"fetcher {k}", [sys.executable, __file__, "--fetcher", sockets, str(n)], folder / f"fetcher{k}.log")
            for k, n in enumerate(per_process)
        ]
        started.extend(clients)
        for c in clients:
            c.json(START_TIMEOUT)
        t0 = time.monotonic()
        for b in range(blocks):  # A B, B A, ...: drift affects both alike
            for name in ("attested", "grpcio") if b % 2 == 0 else ("grpcio", "attested"):
                t1 = time.monotonic()
                for c in clients:
                    c.send(f"{name} {FETCH_BLOCK}")
                for c in clients:
                    report = c.json(120)
                    samples[name] += report["latencies"]
                    errors[name] += report["errors"]
                busy[name] += time.monotonic() - t1
        seconds = time.monotonic() - t0
    result: dict[str, Any] = {"connections": connections, "client_processes": len(per_process), "seconds": seconds}
    for name, lat in samples.items():
        result[name] = {
            "fetches": len(lat),
            "errors": len(errors[name]),
            "first_error": errors[name][0] if errors[name] else "",
            "fetches_per_second": len(lat) / busy[name],
            "p50_ms": statistics.median(lat) * 1e3 if lat else None,
            "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        }
    if samples["attested"] and samples["grpcio"]:
        result["p50_ratio"] = result["attested"]["p50_ms"] / result["grpcio"]["p50_ms"]
        result["p99_ratio"] = result["attested"]["p99_ms"] / result["grpcio"]["p99_ms"]
    return result


# --- part 3: node agent RSS ----------------------------------------------------------------


def rss_part(folder: pathlib.Path, entries: int) -> dict[str, Any]:
    """``meshid agent --node`` (a NodeAgent and its AttestedWorkloadApiServer) with ``entries``
    entries: its RSS once it serves them all. Its start-up line is its state after the first sync
    and batch, which ``NodeAgent.start`` does before the Workload API opens."""
    try:
        import meshid.agent.node  # noqa: F401  (written while this bench was)
    except ImportError as err:
        return {"measured": False, "why": f"meshid.agent.node is not importable: {err}"}
    data = init_ca(folder)
    _, offline = create_offline(data, {NODE_AGENT: entries}, 0)
    with children() as started:
        _, address = serve_ca(folder, data, started)
        token_file = folder / "agent-token"
        token_file.write_text(agent_token(address, data, NODE_AGENT))
        token_file.chmod(0o600)
        argv = [sys.executable, "-m", "meshid.cli", "agent", "--node", "--server", address]
        argv += ["--bundle", str(data / "bundle.pem"), "--data-dir", str(folder / "agent")]
        argv += ["--socket", f"unix://{folder / 'agent.sock'}", "--join-token-file", str(token_file)]
        t0 = time.monotonic()
        agent = Child("the node agent", argv, folder / "agent.log")
        started.append(agent)
        line = agent.line(START_TIMEOUT + entries * 0.1).strip()
        ready = time.monotonic() - t0
        found = re.search(r"serving (\d+) of (\d+) entries", line)
        if found is None:
            raise RuntimeError(f"bench: `meshid agent --node` did not start (printed {line!r})")
        served, known = int(found[1]), int(found[2])
        time.sleep(1.0)  # settle: the Workload API's threads are up, nothing is due for half an hour
        rss, peak = rss_bytes(agent.proc.pid), rss_bytes(agent.proc.pid, "VmHWM")
    return {
        "measured": True,
        "entries": entries,
        "offline_creation_seconds": offline,
        "served": served,
        "entries_synced": known,
        "seconds_to_serving": ready,
        "rss_mb": rss / MB,
        "peak_mb": peak / MB,
        "target_mb": RSS_TARGET_MB,
        "passed": served >= entries and rss / MB <= RSS_TARGET_MB,
    }


# --- the report ----------------------------------------------------------------------------


def _load() -> str:
    """The 1-minute load average: other work on the machine moves every absolute figure."""
    try:
        return pathlib.Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(print: Callable[..., object], results: dict[str, Any]) -> None:
    """The table: one row per figure, its target and verdict; CPU, latency and profiles below."""
    print(f"\n  {'measure':52} {'value':>12} {'target':>12}  verdict")
    if "batch" in results:
        b = results["batch"]
        inside, before, per = b["keys_inside"], b["keys_before"], b["per_workload"]
        print(
            f"  {'batch, keys made by the agent (SVIDs/s)':52} {inside['svids_per_second']:12.0f}"
            f" {'>= 1500':>12}  {_pf(inside['svids_per_second'] >= BATCH_TARGET)}"
        )
        print(f"  {'batch, keys made beforehand (SVIDs/s)':52} {before['svids_per_second']:12.0f}")
        print(f"  {'per-workload renew_with_svid (SVIDs/s)':52} {per['svids_per_second']:12.0f}")
        print(
            f"  {'ratio batch (keys by agent) / per-workload':52} {b['ratio']:11.2f}x {'>= 5x':>12}"
            f"  {_pf(b['ratio'] >= RATIO_TARGET)}"
        )
        for kind, label in (("keys_inside", "keys by agent"), ("keys_before", "keys beforehand")):
            ca, ag = b[kind]["ca_cpu_us_per_svid"], b[kind]["agent_cpu_us_per_svid"]
            cpu = f"CA {ca:.0f} us + agent {ag:.0f} us" if ca is not None else f"agent {ag:.0f} us"
            print(f"    per SVID, batch {label}: wall {b[kind]['wall_us_per_svid']:.0f} us; CPU {cpu}")
        print(
            f"    per-workload renewal latency p50 {per['latency_p50_ms']:.1f} ms, p99 {per['latency_p99_ms']:.1f} ms"
            f" ({per['renewals']} renewals)"
        )
        for key in ("ca_profile", "agent_profile"):
            prof = b.get(key)
            if prof:
                where = "CA side, in-process (no gRPC/TLS)" if key == "ca_profile" else "agent side, real connection"
                extra = ""
                if "batches" in prof:
                    cpu = prof["cpu_us_per_svid_unprofiled"]
                    extra = f", {prof['batches']} batches; unprofiled CPU {cpu:.0f} us/SVID"
                print(f"    profile, {where}: {prof['svids']} SVIDs in {prof['seconds']:.2f} s{extra}, cProfile")
                for kind in ("meshid_by_cumulative_time", "by_own_time"):
                    print(f"      {kind.replace('_', ' ')}:")
                    for row in prof[kind]:
                        print(f"        {row}")
    if "fetch" in results:
        f = results["fetch"]
        for name, label in (("attested", "AttestedWorkloadApiServer"), ("grpcio", "WorkloadApiServer (grpcio)")):
            if f[name]["p50_ms"] is not None:
                print(
                    f"  {'fetch p50 / p99 (ms), ' + label:52} {f[name]['p50_ms']:5.2f} / {f[name]['p99_ms']:5.2f}"
                    f"   ({f[name]['fetches']} fetches, {f[name]['fetches_per_second']:.0f}/s)"
                )
        if "p50_ratio" in f:
            print(f"  {'fetch ratio attested / grpcio, p50 / p99':52} {f['p50_ratio']:5.2f} / {f['p99_ratio']:5.2f}")
    if "rss" in results:
        r = results["rss"]
        if r["measured"]:
            print(
                f"  {'node agent RSS, ' + str(r['served']) + ' SVIDs cached (MB)':52}"
                f" {r['rss_mb']:12.1f} {'<= 150':>12}  {_pf(r['passed'])}"
            )
            print(f"    peak {r['peak_mb']:.1f} MB; serving {r['seconds_to_serving']:.1f} s after start")
        else:
            print(f"  node agent RSS: not measured ({r['why']})")
    print(
        f"  ({results['seconds']:.0f} s; 1-minute load average {results['load_before']} before,"
        f" {results['load_after']} after, on {os.cpu_count()} CPUs)"
    )


PARTS = ("batch", "fetch", "rss")


def run(
    print: Callable[..., object] = print,
    *,
    entries: int = 1000,
    rounds: int = 3,
    workloads: int = 200,
    fetches: int = 2000,
    connections: int = 100,
    profile: bool = False,
    only: tuple[str, ...] = PARTS,
) -> dict[str, Any]:
    """Measure and print the parts in ``only``; returns the figures."""
    started = time.monotonic()
    results: dict[str, Any] = {
        "tree": _tree(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "load_before": _load(),
    }
    print(f"\n[node-agent] batch issuance, Workload API fetches, agent RSS (issue #12), measured at {results['tree']}")
    print(f"  servers in their own processes on loopback; {os.cpu_count()} CPUs shared by all; MB = 10^6 bytes")
    with tempfile.TemporaryDirectory(prefix="meshid-bench-agent-") as tmp:
        folder = pathlib.Path(tmp)
        if "batch" in only:
            (folder / "batch").mkdir()
            print(
                f"  batch: {entries} SVIDs per batch_new_svids x {rounds}, vs {workloads} workloads renewing"
                f" once each per round from {RENEWERS} processes; SQLite, durable writes"
            )
            results["batch"] = b = batch_part(folder / "batch", entries, rounds, workloads, profile, print)
            for kind in ("keys_inside", "keys_before"):
                if b[kind]["incomplete"]:
                    print(f"  INCOMPLETE batch ({kind}): {b[kind]['incomplete'][0]}")
            if b["per_workload"]["errors"]:
                print(f"  per-workload errors: {b['per_workload']['errors']}, last: {b['per_workload']['last_error']}")
        if "fetch" in only:
            (folder / "fetch").mkdir()
            print(
                f"  fetch: {connections} connections at once, ~{fetches} FetchX509SVID per server,"
                f" time to the first response"
            )
            results["fetch"] = f = fetch_part(folder / "fetch", fetches, connections)
            for name in ("attested", "grpcio"):
                if f[name]["errors"]:
                    print(f"  {name}: {f[name]['errors']} failed fetches, first: {f[name]['first_error']}")
        if "rss" in only:
            (folder / "rss").mkdir()
            results["rss"] = r = rss_part(folder / "rss", entries)
            if r["measured"] and r["served"] < entries:
                print(f"  the node agent served only {r['served']} of {r['entries_synced']} entries at start-up")
    results["seconds"] = time.monotonic() - started
    results["load_after"] = _load()

    report(print, results)
    return results


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a positive number, not {text}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--entries", type=_positive, default=1000, help="entries parented to each agent (1000)")
    parser.add_argument(
        "--rounds", type=_positive, default=3, help="timed batches of each kind and baseline rounds (3)"
    )
    parser.add_argument("--workloads", type=_positive, default=200, help="workloads of the per-workload baseline (200)")
    parser.add_argument("--fetches", type=_positive, default=2000, help="fetches per Workload API server (2000)")
    parser.add_argument("--connections", type=_positive, default=100, help="concurrent Workload API connections (100)")
    parser.add_argument("--profile", action="store_true", help="profile a batch even when the targets are met")
    parser.add_argument("--quick", action="store_true", help="1 round, 100 workloads, 500 fetches")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--json", action="store_true", help="the figures as JSON on stdout (the report goes to stderr)")
    parser.add_argument("--renewer", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--serve-workload-apis", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--fetcher", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.renewer:
        renewer(*args.renewer)
        return 0
    if args.serve_workload_apis:
        serve_workload_apis(args.serve_workload_apis[0], int(args.serve_workload_apis[1]))
        return 0
    if args.fetcher:
        fetcher(args.fetcher[0], int(args.fetcher[1]))
        return 0
    if args.quick:
        args.rounds, args.workloads, args.fetches = 1, 100, 500
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops cleanly, like Ctrl-C
    say = functools.partial(print, file=sys.stderr, flush=True) if args.json else functools.partial(print, flush=True)
    results = run(
        say,
        entries=args.entries,
        rounds=args.rounds,
        workloads=args.workloads,
        fetches=args.fetches,
        connections=args.connections,
        profile=args.profile,
        only=tuple(args.only or PARTS),
    )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0  # a measurement: FAIL is printed, not an exit status


if __name__ == "__main__":
    sys.exit(main())
