"""`make demo`: meshid end to end on loopback, with real processes.

1. `meshid ca init` creates a CA for example.org; `meshid ca serve` runs it.
2. Three workloads are registered (`meshid entry create`), get one-time join tokens
   (`meshid token create`) and fetch their SVIDs (`meshid svid fetch`): keys never leave them.
3. The greeter service starts over mTLS with meshid's interceptor and examples/greeter/policy.yaml.
4. The frontend calls it (allowed); the intruder calls it (denied).
5. `meshid svid inspect` and `meshid policy check` explain the files.
6. The greeter gets a new SVID while it runs; it presents the new certificate from the next
   handshake on, with no restart.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
GREETER = "spiffe://example.org/ns/prod/sa/greeter"
FRONTEND = "spiffe://example.org/ns/prod/sa/frontend"
INTRUDER = "spiffe://example.org/ns/dev/sa/intruder"
POLICY = ROOT / "examples" / "greeter" / "policy.yaml"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, check=False)
    print(out.stdout.rstrip())
    if out.stderr.strip():
        print(out.stderr.rstrip())
    if check and out.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args)} exited {out.returncode}")
    return out


def meshid(*args: str) -> str:
    return run("-m", "meshid.cli", *args).stdout.strip()


def enroll(server: str, spiffe_id: str, folder: pathlib.Path, *dns: str) -> None:
    """Register a workload (once), give it a join token, and let it fetch its SVID."""
    admin = ("--server", server, "--data-dir", str(RUN / "ca"))
    token = subprocess.run(
        [sys.executable, "-m", "meshid.cli", "token", "create", *admin, "--spiffe-id", spiffe_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    print(f"  join token for {spiffe_id}: {token[:24]}... (single use, stored hashed)")
    meshid(
        "svid",
        "fetch",
        "--server",
        server,
        "--bundle",
        str(RUN / "ca" / "bundle.pem"),
        "--join-token",
        token,
        "--out",
        str(folder),
    )


def start(args: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        raise SystemExit(f"demo: {' '.join(args[:3])} did not start: {line}")
    return proc, line.split()[-1]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def client(folder: pathlib.Path, port: int) -> subprocess.CompletedProcess[str]:
    return run(
        str(ROOT / "examples" / "greeter" / "client.py"),
        "--dir",
        str(folder),
        "--target",
        f"127.0.0.1:{port}",
        "--server-id",
        GREETER,
        check=False,
    )


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()
    step("meshid ca init / ca serve: a CA for trust domain example.org")
    meshid("ca", "init", "--data-dir", str(RUN / "ca"), "--trust-domain", "example.org")
    ca, server = start(
        ["-m", "meshid.cli", "ca", "serve", "--data-dir", str(RUN / "ca"), "--listen", "127.0.0.1:0"], "CA serving on"
    )
    print(f"  CA serving on {server}")
    procs = [ca]
    try:
        step("Register three workloads; each fetches its SVID with a one-time join token")
        admin = ("--server", server, "--data-dir", str(RUN / "ca"))
        for spiffe_id in (GREETER, FRONTEND, INTRUDER):
            meshid("entry", "create", *admin, "--spiffe-id", spiffe_id)
        for name, spiffe_id in (("greeter", GREETER), ("frontend", FRONTEND), ("intruder", INTRUDER)):
            enroll(server, spiffe_id, RUN / name)
        key_mode = oct(os.stat(RUN / "greeter" / "svid.key").st_mode & 0o777)
        print(f"  private keys were made by the workloads and written {key_mode}")

        step(f"The greeter starts with policy {POLICY.relative_to(ROOT)}")
        greeter, port_text = start(
            [str(ROOT / "examples" / "greeter" / "server.py"), "--dir", str(RUN / "greeter"), "--policy", str(POLICY)],
            "listening on",
        )
        procs.append(greeter)
        port = int(port_text)
        print(f"  greeter listening on 127.0.0.1:{port}")

        step("The frontend calls the greeter (allowed by rule frontend-greets)")
        if client(RUN / "frontend", port).returncode != 0:
            raise SystemExit("demo: the frontend should have been allowed")
        step("The intruder calls the greeter (denied: spiffe://example.org/ns/dev/** is denied)")
        if client(RUN / "intruder", port).returncode == 0:
            raise SystemExit("demo: the intruder should have been denied")

        step("meshid svid inspect / meshid policy check explain the same files")
        run("-m", "meshid.cli", "svid", "inspect", str(RUN / "frontend" / "svid.pem"))
        for caller in (FRONTEND, INTRUDER):
            run(
                "-m",
                "meshid.cli",
                "policy",
                "check",
                str(POLICY),
                "--spiffe-id",
                caller,
                "--method",
                "/meshid.examples.v1.Greeter/SayHello",
                check=False,
            )

        step("Rotation: the greeter fetches a new SVID from the CA while it runs")
        enroll(server, GREETER, RUN / "greeter")
        inspected = subprocess.run(
            [sys.executable, "-m", "meshid.cli", "svid", "inspect", str(RUN / "greeter" / "svid.pem"), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        serial = json.loads(inspected)["serial"]
        deadline = time.monotonic() + 15
        while True:
            out = client(RUN / "frontend", port)
            if f"serial {serial}" in out.stdout:
                print("  the running greeter now presents its new certificate (no restart)")
                break
            if time.monotonic() > deadline:
                raise SystemExit("demo: the greeter did not pick up its new SVID within 15 s")
            time.sleep(0.3)
    finally:
        for proc in reversed(procs):
            stop(proc)
    step("Demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
