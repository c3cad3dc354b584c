"""`make demo`: meshid end to end on loopback, with real processes.

1. A CA for example.org (meshid's own CA code) issues SVIDs for three workloads.
2. The greeter service starts over mTLS with meshid's interceptor and examples/greeter/policy.yaml.
3. The frontend calls it (allowed); the intruder calls it (denied).
4. `meshid svid inspect` and `meshid policy check` explain the files.
5. The greeter's SVID is rotated on disk; the running server presents the new certificate
   from the next handshake on, with no restart.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

from meshid import TrustBundle
from meshid._files import write_svid_files
from meshid.ca import Authority

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


def issue(ca: Authority, spiffe_id: str, folder: pathlib.Path, **kw: object) -> int:
    svid = ca.issue_svid(spiffe_id, **kw)  # type: ignore[arg-type]
    bundle = TrustBundle(ca.trust_domain, ca.roots).to_pem()
    write_svid_files(folder, svid.chain_pem(), svid.key_pem(), bundle)
    print(f"  {spiffe_id:45} serial {svid.serial:x}  -> {folder.relative_to(ROOT)}/")
    return svid.serial


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
    step("A CA for trust domain example.org issues SVIDs")
    ca = Authority.create_root("example.org")
    issue(ca, GREETER, RUN / "greeter")
    issue(ca, FRONTEND, RUN / "frontend")
    issue(ca, INTRUDER, RUN / "intruder")
    key_mode = oct(os.stat(RUN / "greeter" / "svid.key").st_mode & 0o777)
    print(f"  private keys are written {key_mode}")

    step(f"The greeter starts with policy {POLICY.relative_to(ROOT)}")
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "greeter" / "server.py"),
            "--dir",
            str(RUN / "greeter"),
            "--policy",
            str(POLICY),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"demo: the greeter did not start: {line}{server.stdout.read()}")
        port = int(line.split()[-1])
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

        step("Rotation: the greeter's SVID is replaced on disk while it runs")
        new_serial = issue(ca, GREETER, RUN / "greeter")
        deadline = time.monotonic() + 15
        while True:
            out = client(RUN / "frontend", port)
            if f"serial {new_serial:x}" in out.stdout:
                print("  the running greeter now presents its new certificate (no restart)")
                break
            if time.monotonic() > deadline:
                raise SystemExit("demo: the greeter did not pick up its new SVID within 15 s")
            time.sleep(0.3)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    step("Demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
