"""`make demo`: meshid end to end on loopback, with real processes.

1. `meshid ca init` creates a CA for example.org; `meshid ca serve` runs it.
2. Three workloads are registered (`meshid entry create`) and get one-time join tokens
   (`meshid token create`); keys are made by the workloads and never leave them.
3. The greeter and the frontend each run a `meshid agent` sidecar that fetches and renews their
   short-lived SVIDs; the intruder fetches one with `meshid svid fetch`.
4. The greeter service starts over mTLS with meshid's interceptor and examples/greeter/policy.yaml.
5. The frontend calls it (allowed); the intruder calls it (denied).
6. `meshid svid inspect` and `meshid policy check` explain the files.
7. The frontend keeps calling while both SVIDs rotate underneath: no restart, no failed call.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
GREETER = "spiffe://example.org/ns/prod/sa/greeter"
FRONTEND = "spiffe://example.org/ns/prod/sa/frontend"
INTRUDER = "spiffe://example.org/ns/dev/sa/intruder"
POLICY = ROOT / "examples" / "greeter" / "policy.yaml"
SHORT_TTL = "10s"
TALK_SECONDS = 14


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, check=False, env=env)
    print(out.stdout.rstrip())
    if out.stderr.strip():
        print(out.stderr.rstrip())
    if check and out.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args)} exited {out.returncode}")
    return out


def meshid(*args: str, env: dict[str, str] | None = None) -> str:
    return run("-m", "meshid.cli", *args, env=env).stdout.strip()


def token(server: str, spiffe_id: str) -> dict[str, str]:
    """An environment holding a one-time join token for ``spiffe_id`` (the CA keeps only its hash).

    The token goes to the workload in $MESHID_JOIN_TOKEN, not on its command line, where
    every local user could read it in the process list.
    """
    admin = ("--server", server, "--data-dir", str(RUN / "ca"))
    out = subprocess.run(
        [sys.executable, "-m", "meshid.cli", "token", "create", *admin, "--spiffe-id", spiffe_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    print(f"  join token for {spiffe_id}: {out[:24]}... (single use, handed over in $MESHID_JOIN_TOKEN)")
    return {**os.environ, "MESHID_JOIN_TOKEN": out}


def start(args: list[str], ready: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
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


def client(folder: pathlib.Path, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    script = str(ROOT / "examples" / "greeter" / "client.py")
    target = f"127.0.0.1:{port}"
    return run(script, "--dir", str(folder), "--target", target, "--server-id", GREETER, *extra, check=False)


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
        step(f"Register three workloads; greeter and frontend get {SHORT_TTL} SVIDs, so they rotate often")
        admin = ("--server", server, "--data-dir", str(RUN / "ca"))
        meshid("entry", "create", *admin, "--spiffe-id", GREETER, "--ttl", SHORT_TTL)
        meshid("entry", "create", *admin, "--spiffe-id", FRONTEND, "--ttl", SHORT_TTL)
        meshid("entry", "create", *admin, "--spiffe-id", INTRUDER)

        step("Each service's sidecar (`meshid agent`) fetches its SVID with a one-time join token and renews it")
        for name, spiffe_id in (("greeter", GREETER), ("frontend", FRONTEND)):
            agent, _ = start(
                [
                    "-m",
                    "meshid.cli",
                    "agent",
                    "--server",
                    server,
                    "--bundle",
                    str(RUN / "ca" / "bundle.pem"),
                    "--out",
                    str(RUN / name),
                ],
                "agent:",
                env=token(server, spiffe_id),
            )
            procs.append(agent)
            print(f"  agent for {name} running; files in {(RUN / name).relative_to(ROOT)}/")
        step("The intruder fetches an SVID once (`meshid svid fetch`)")
        meshid(
            "svid",
            "fetch",
            "--server",
            server,
            "--bundle",
            str(RUN / "ca" / "bundle.pem"),
            "--out",
            str(RUN / "intruder"),
            env=token(server, INTRUDER),
        )
        key_mode = oct(os.stat(RUN / "greeter" / "svid.key").st_mode & 0o777)
        print(f"  private keys were made by the workloads and written {key_mode}")

        step(f"The greeter starts with policy {POLICY.relative_to(ROOT)}")
        greeter, port_text = start(
            [
                str(ROOT / "examples" / "greeter" / "server.py"),
                "--dir",
                str(RUN / "greeter"),
                "--policy",
                str(POLICY),
                "--metrics",
                "127.0.0.1:0",
            ],
            "metrics on",
        )
        metrics_port = int(port_text)
        assert greeter.stdout is not None
        port_text = greeter.stdout.readline().split()[-1]
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
        run("-m", "meshid.cli", "svid", "inspect", str(RUN / "intruder" / "svid.pem"))
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

        step(f"Rotation while they talk: the frontend calls for {TALK_SECONDS} s; both SVIDs renew underneath")
        talk = client(RUN / "frontend", port, "--talk", str(TALK_SECONDS))
        lines = [line for line in talk.stdout.splitlines() if "greeter presents serial" in line]
        server_serials = {line.split("serial ")[1].split("...")[0] for line in lines}
        client_serials = {line.rsplit("serial ", 1)[1] for line in lines}
        if talk.returncode != 0 or len(server_serials) < 2 or len(client_serials) < 2:
            raise SystemExit("demo: expected both services to rotate with no failed call")
        print(
            f"  greeter rotated {len(server_serials) - 1}x and frontend {len(client_serials) - 1}x, with no failed call"
        )

        step(f"The greeter's Prometheus metrics (http://127.0.0.1:{metrics_port}/metrics), a few lines")
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        for line in scraped.splitlines():
            if line.startswith(("meshid_authz_decisions_total", "meshid_svid_expiry_seconds")):
                print(f"  {line}")
    finally:
        for proc in reversed(procs):
            stop(proc)
    step("Demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
