"""`make bench`, issue #7: issuance throughput on PostgreSQL with one and with two CA replicas,
next to SQLite, measured in one run (durable writes, 4 client processes renewing over mTLS).

Each configuration runs the same workload as bench/issuance.py: CA processes (`meshid ca
serve`), 4 client processes renewing in a loop for a few seconds, clients spread over the
replicas. PostgreSQL is a real server started in a temporary folder (tests/pg.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import issuance  # bench/issuance.py: the client workload and process helpers

from meshid import TrustBundle
from meshid.ca import Authority
from meshid.ca.client import AdminClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
TD = "example.org"


def _key_pem(authority: Authority) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return authority.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _init(folder: Path, replicas: int, datastore: str | None) -> list[Path]:
    root = Authority.create_root(TD)
    (folder / "root.pem").write_bytes(TrustBundle(root.trust_domain, root.roots).to_pem())
    (folder / "root.key").write_bytes(_key_pem(root))
    dirs = []
    for i in range(replicas):
        data_dir = folder / f"replica{i}"
        args = ["ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD]
        if datastore is not None:
            args += [
                "--datastore",
                datastore,
                "--upstream-cert",
                str(folder / "root.pem"),
                "--upstream-key",
                str(folder / "root.key"),
            ]
        subprocess.run([sys.executable, "-m", "meshid.cli", *args], check=True, capture_output=True)
        dirs.append(data_dir)
    return dirs


def measure(folder: Path, replicas: int, datastore: str | None, seconds: float) -> tuple[int, int, float]:
    """SVIDs issued, errors, and the window in seconds."""
    dirs = _init(folder, replicas, datastore)
    procs = []
    try:
        addresses = []
        for data_dir in dirs:
            proc, address = issuance.start_ca(data_dir)
            procs.append(proc)
            addresses.append(address)
        tokens = []
        with AdminClient(addresses[0], dirs[0]) as admin:
            for i in range(issuance.CLIENTS):
                sid = f"spiffe://{TD}/ns/bench/sa/w{i}"
                admin.create_entry(sid)
                tokens.append(admin.create_token(sid).token)
        clients = []
        for i, token in enumerate(tokens):
            bundle = folder / "root.pem" if datastore is not None else dirs[0] / "bundle.pem"
            args = [addresses[i % len(addresses)], str(bundle), token, str(seconds)]
            proc = subprocess.Popen(
                [sys.executable, "-c", issuance.CLIENT, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            clients.append(proc)
        for proc in clients:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("bench: a client could not fetch its first SVID")
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in clients:
            assert proc.stdout is not None
            results.append(json.loads(proc.stdout.readline()))
    finally:
        issuance.stop(procs)
    issued = sum(len(r["latencies"]) for r in results)
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    return issued, sum(r["errors"] for r in results), window


def run(print: Callable[..., object] = print, seconds: float = 5.0) -> None:
    shape = f"{issuance.CLIENTS} client processes renewing over mTLS for {seconds:.0f} s, durable writes"
    print(f"\n[replicas] issuance throughput, {shape}")
    rows: list[tuple[str, int, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "sqlite").mkdir()
        rows.append(("SQLite, 1 replica", *measure(folder / "sqlite", 1, None, seconds)))
        try:
            from pg import create_database, running_postgres  # type: ignore[import-not-found]
        except ImportError as err:
            print(f"  PostgreSQL rows skipped: {err}")
            running_postgres = None
        if running_postgres is not None:
            try:
                (folder / "pg").mkdir()
                with running_postgres(folder / "pg") as dsn:
                    for replicas in (1, 2):
                        sub = folder / f"pg{replicas}"
                        sub.mkdir()
                        db = create_database(dsn, f"bench{replicas}")
                        rows.append(
                            (
                                f"PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}",
                                *measure(sub, replicas, db, seconds),
                            )
                        )
            except BaseException as err:  # pytest's skip when PostgreSQL is not installed
                if type(err).__name__ not in ("Skipped", "Failed"):
                    raise
                print(f"  PostgreSQL rows skipped: {err}")
    base = rows[0][1] / rows[0][3]
    print(f"  {'':26}{'SVIDs':>8}{'errors':>8}{'per second':>12}{'vs SQLite':>11}")
    for label, issued, errors, window in rows:
        rate = issued / window
        print(f"  {label:26}{issued:8d}{errors:8d}{rate:12.1f}{rate / base:10.2f}x")
    print("  (one 2-CPU machine runs every CA, client and the database: replicas share the same cores)")


if __name__ == "__main__":
    run()
