"""`make demo`: meshid end to end on loopback, with real processes and one node agent.

1. `meshid ca init` creates a CA for example.org; `meshid ca serve` runs it.
2. The real Python interpreter is copied to demo-run/bin/{greeter,frontend,intruder,stranger}:
   four executables with the same bytes at four paths, so the node agent can tell the services
   apart by the executable the kernel reports for each process (all run as this one user).
3. Three workloads are registered (`meshid entry create`) under the node agent, each selected by
   `unix:uid` (this user), `unix:path` (its own copy) and `unix:sha256` (the interpreter's digest,
   the same for all: it pins the build, the path tells them apart). The stranger has no entry.
4. One join token (`meshid token create --agent node1`), the only token in the demo, attests the
   node agent (`meshid agent --node`); it serves the attested Workload API on demo-run/agent.sock.
   `meshid agent list` shows it. No workload gets a token; their keys never touch the disk.
5. The greeter service starts over mTLS with meshid's interceptor and examples/greeter/policy.yaml,
   its SVID from the agent (`--workload-api`).
6. The frontend calls it (allowed); the intruder calls it (denied by the policy); the stranger
   asks the agent for an SVID and gets PERMISSION_DENIED "no identity issued to this process".
7. `meshid svid inspect` reads the certificate the intruder's process got from the agent (it
   writes it out, the key stays in memory); `meshid policy check` explains both decisions.
8. The frontend keeps calling while both SVIDs rotate underneath: no restart, no failed call.
9. A few lines of the greeter's Prometheus metrics.

Changed for issue #12: each workload used to run a `meshid agent --out` sidecar with its own
one-time join token and read its SVID from files (the intruder used `meshid svid fetch` with a
token), and `svid inspect` read the intruder's svid.pem. Now one node agent serves all three by
selector over the Workload API (`--workload-api` in the examples; `--dir` still reads files),
the denied stranger and `entry list`/`agent list` are new, and the other steps are as before.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
GREETER = "spiffe://example.org/ns/prod/sa/greeter"
FRONTEND = "spiffe://example.org/ns/prod/sa/frontend"
INTRUDER = "spiffe://example.org/ns/dev/sa/intruder"
AGENT = "node1"
AGENT_ID = f"spiffe://example.org/meshid/agent/{AGENT}"
SOCKET = RUN / "agent.sock"
POLICY = ROOT / "examples" / "greeter" / "policy.yaml"
SHORT_TTL = "10s"
TALK_SECONDS = 14
# What each copy of the interpreter runs as; the stranger has no registration entry.
WORKLOADS = {"greeter": GREETER, "frontend": FRONTEND, "intruder": INTRUDER, "stranger": None}
# Run by the intruder's copy: take its SVID from the agent, write the certificate chain (no key).
WRITE_CERT = (
    "import sys, meshid\n"
    "with meshid.WorkloadApiSource(sys.argv[1]) as source:\n"
    "    open(sys.argv[2], 'wb').write(source.get_svid().chain_pem())\n"
)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(
    *args: str, exe: str = sys.executable, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False, env=env)
    if out.stdout.strip():
        print(out.stdout.rstrip())
    if out.stderr.strip():
        print(out.stderr.rstrip())
    if check and out.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args)} exited {out.returncode}")
    return out


def meshid(*args: str) -> str:
    return run("-m", "meshid.cli", *args).stdout.strip()


def start(
    name: str, args: list[str], ready: str, exe: str = sys.executable, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start a long-running process and wait for its ready line; its stderr goes to demo-run/logs/."""
    (RUN / "logs").mkdir(exist_ok=True)
    log = RUN / "logs" / f"{name}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        raise SystemExit(f"demo: {name} did not start: {line.strip() or 'no output'}; see {log.relative_to(ROOT)}")
    return proc, line.strip()


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def copy_interpreters() -> tuple[dict[str, str], dict[str, str]]:
    """Copy the real interpreter binary to demo-run/bin/<workload>; returns their paths and the
    environment they run in.

    A copy finds its standard library through the prefix compiled into it (nothing sits next to
    it), but not the virtualenv, which Python finds only from .venv/pyvenv.cfg beside .venv/bin's
    link. So the copies get the repository and this interpreter's site-packages on PYTHONPATH.
    """
    real = os.path.realpath(sys.executable)
    (RUN / "bin").mkdir()
    paths = {}
    for name in WORKLOADS:
        shutil.copy2(real, RUN / "bin" / name)
        paths[name] = os.path.realpath(RUN / "bin" / name)  # what the kernel reports as its executable
    site = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site])}
    env.pop("MESHID_JOIN_TOKEN", None)
    check = "import sys, meshid; print(sys.executable, sys.base_prefix)"
    out = subprocess.run([paths["greeter"], "-c", check], capture_output=True, text=True, timeout=60, env=env)
    if out.returncode != 0:
        raise SystemExit(f"demo: a copy of {real} does not run from {RUN / 'bin'}: {out.stderr.strip()}")
    exe, prefix = out.stdout.split()
    print(f"  {real} copied to demo-run/bin/{{{','.join(WORKLOADS)}}}")
    print(f"  a copy runs: sys.executable={exe}, stdlib from its compiled-in prefix {prefix},")
    print("  meshid and its dependencies from PYTHONPATH (the repository and the venv's site-packages)")
    return paths, env


def under_agent(path: str, digest: str) -> list[str]:
    """`entry create` options: served by the node agent to a process that matches all three
    selectors (this user, this copy's path, the interpreter's digest)."""
    chosen = [f"unix:uid:{os.getuid()}", f"unix:path:{path}", f"unix:sha256:{digest}"]
    return ["--parent-id", AGENT_ID, *(arg for selector in chosen for arg in ("--selector", selector))]


def client(exe: str, env: dict[str, str], port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    script = str(ROOT / "examples" / "greeter" / "client.py")
    args = ("--workload-api", f"unix://{SOCKET}", "--target", f"127.0.0.1:{port}", "--server-id", GREETER)
    return run(script, *args, *extra, exe=exe, env=env, check=False)


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()
    step("meshid ca init / ca serve: a CA for trust domain example.org")
    meshid("ca", "init", "--data-dir", str(RUN / "ca"), "--trust-domain", "example.org")
    ca, ready = start(
        "ca",
        ["-m", "meshid.cli", "ca", "serve", "--data-dir", str(RUN / "ca"), "--listen", "127.0.0.1:0"],
        "CA serving on",
    )
    server = ready.split()[-1]
    print(f"  CA serving on {server}")
    procs = [ca]
    admin = ("--server", server, "--data-dir", str(RUN / "ca"))
    try:
        step("Four copies of one Python interpreter: the node agent tells workloads apart by executable")
        bins, env = copy_interpreters()
        digest = hashlib.sha256(pathlib.Path(bins["greeter"]).read_bytes()).hexdigest()
        same = {hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in bins.values()} == {digest}
        print(f"  all four run as uid {os.getuid()}, and all four have sha256 {digest[:16]}... ({same=})")
        print("  so neither unix:uid nor unix:sha256 tells them apart; unix:path, the executable as the kernel")
        print("  names it, does. The selectors name the executable (the interpreter), not the script it runs.")

        step(f"Register three workloads under node agent {AGENT}; greeter and frontend get {SHORT_TTL} SVIDs")
        for name, spiffe_id in WORKLOADS.items():
            if spiffe_id is None:
                continue
            ttl = ("--ttl", SHORT_TTL) if spiffe_id != INTRUDER else ()
            meshid("entry", "create", *admin, "--spiffe-id", spiffe_id, *ttl, *under_agent(bins[name], digest))
        print("  the stranger (demo-run/bin/stranger) gets no entry. `meshid entry list`:")
        meshid("entry", "list", *admin)

        step("One node agent (`meshid agent --node`): one join token, for the node, the only token in this demo")
        token = subprocess.run(
            [sys.executable, "-m", "meshid.cli", "token", "create", *admin, "--agent", AGENT],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        print(f"  join token for node agent {AGENT}: {token[:24]}... (single use, handed over in $MESHID_JOIN_TOKEN)")
        node_args = ["--server", server, "--bundle", str(RUN / "ca" / "bundle.pem"), "--data-dir", str(RUN / "agent")]
        agent, ready = start(
            "agent",
            ["-m", "meshid.cli", "agent", "--node", *node_args, "--socket", f"unix://{SOCKET}"],
            "node agent:",
            env={**os.environ, "MESHID_JOIN_TOKEN": token},
        )
        procs.append(agent)
        print(f"  {ready}")
        key_mode = oct(os.stat(RUN / "agent" / "svid.key").st_mode & 0o777)
        print(f"  its own key is in demo-run/agent/ ({key_mode}); the workloads' keys, made by it, are held in memory")
        print("  `meshid agent list`:")
        meshid("agent", "list", *admin)

        step(f"The greeter (demo-run/bin/greeter) starts with policy {POLICY.relative_to(ROOT)}, SVID from the agent")
        greeter, ready = start(
            "greeter",
            [
                str(ROOT / "examples" / "greeter" / "server.py"),
                "--workload-api",
                f"unix://{SOCKET}",
                "--policy",
                str(POLICY),
                "--metrics",
                "127.0.0.1:0",
            ],
            "metrics on",
            exe=bins["greeter"],
            env=env,
        )
        procs.append(greeter)
        metrics_port = int(ready.split()[-1])
        assert greeter.stdout is not None
        port = int(greeter.stdout.readline().split()[-1])
        print(f"  greeter listening on 127.0.0.1:{port}")

        step("The frontend (demo-run/bin/frontend) calls the greeter (allowed by rule frontend-greets)")
        if client(bins["frontend"], env, port).returncode != 0:
            raise SystemExit("demo: the frontend should have been allowed")
        step("The intruder (demo-run/bin/intruder) calls the greeter (denied: spiffe://example.org/ns/dev/**)")
        if client(bins["intruder"], env, port).returncode == 0:
            raise SystemExit("demo: the intruder should have been denied")
        step("The stranger (demo-run/bin/stranger, no entry) asks the node agent for an SVID")
        refused = client(bins["stranger"], env, port, "--wait", "3")
        if refused.returncode == 0 or "PERMISSION_DENIED: no identity issued to this process" not in refused.stdout:
            raise SystemExit("demo: the agent should have refused the stranger an identity")

        step("meshid svid inspect / meshid policy check explain the intruder's certificate and both decisions")
        (RUN / "intruder").mkdir()
        cert = RUN / "intruder" / "svid.pem"
        run("-c", WRITE_CERT, f"unix://{SOCKET}", str(cert), exe=bins["intruder"], env=env)
        print(f"  the intruder's process wrote the certificate chain it got from the agent to {cert.relative_to(ROOT)}")
        run("-m", "meshid.cli", "svid", "inspect", str(cert))
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

        step(f"Rotation while they talk: the frontend calls for {TALK_SECONDS} s; the agent renews both SVIDs")
        talk = client(bins["frontend"], env, port, "--talk", str(TALK_SECONDS))
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
