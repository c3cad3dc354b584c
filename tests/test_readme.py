"""The README's walkthrough runs as written (issue #13), so the README cannot drift from the CLI.

The ``sh`` blocks between ``<!-- walkthrough:start -->`` and ``<!-- walkthrough:end -->`` are fed,
as written, to one bash (``set -euo pipefail``: a failing command fails the test) in a temporary
folder holding links to this repository's ``examples/`` and the running interpreter's venv as
``.venv``. Only the ports change: free ones stand in for 8443 and 50051, as the README says.

bash runs each command as soon as it reads it; a person waits until a program started with ``&``
is up before typing the next line. The test waits as that person would, for what the command
says it will make: ``--listen`` / ``--port`` listening, ``--out DIR`` holding ``svid.pem``. A
background command it cannot wait for fails the test, as do a ``# prints:`` line that the run's
output lacks, and a process still running after the walkthrough's last line.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import eventually

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PORTS = ("8443", "50051")

pytestmark = pytest.mark.timeout(300)


def walkthrough() -> str:
    text = README.read_text()
    start, end = text.index("<!-- walkthrough:start -->"), text.index("<!-- walkthrough:end -->")
    blocks = re.findall(r"^```sh\n(.*?)^```$", text[start:end], re.MULTILINE | re.DOTALL)
    assert blocks, "the README's walkthrough has no ```sh block"
    return "".join(blocks)


def commands(script: str) -> list[str]:
    """The script's logical lines (a line ending in a backslash continues on the next)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines():
        pending += line + "\n"
        if not line.endswith("\\"):
            out.append(pending)
            pending = ""
    assert not pending, "the walkthrough ends inside a continued line"
    return out


def _code(command: str) -> str:
    """A command without its comment (a ``#`` after a blank, outside the one-line forms used here)."""
    return re.sub(r"(^|\s)#.*$", "", command.replace("\\\n", " "), flags=re.MULTILINE).strip()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def readiness(command: str, folder: Path) -> tuple[str, object]:
    """What to wait for after a background command: (what, predicate)."""
    code = _code(command)
    if m := re.search(r"--listen \S+:(\d+)|--port (\d+)", code):
        port = int(m.group(1) or m.group(2))
        return f"port {port} listening", lambda: _listening(port)
    if m := re.search(r"--out (\S+)", code):
        svid = folder / m.group(1) / "svid.pem"
        return f"{svid} written", svid.exists
    raise AssertionError(f"the test does not know when this background command is ready: {code}")


def _free_ports(n: int) -> list[str]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():
        pytest.skip("the tests do not run in a virtualenv; the walkthrough activates .venv")
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "by-hand").mkdir()  # what `ca init` makes first; the CA's log goes there before it

    script = walkthrough()
    for readme_port, free in zip(PORTS, _free_ports(len(PORTS)), strict=True):
        assert readme_port in script, f"the walkthrough no longer uses port {readme_port}"
        script = re.sub(rf"\b{readme_port}\b", free, script)

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MESHID_JOIN_TOKEN", "PYTHONPATH")}
    log = tmp_path / "walkthrough.log"
    with log.open("w") as out:
        shell = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-euo", "pipefail", "-s"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=env, text=True, start_new_session=True,
        )  # fmt: skip
    assert shell.stdin is not None

    def output() -> str:
        return f"\n--- the walkthrough's output ---\n{log.read_text()}"

    try:
        for command in commands(script):
            shell.stdin.write(command)
            shell.stdin.flush()
            if _code(command).endswith("&") and not _code(command).endswith("&&"):
                what, ready = readiness(command, tmp_path)

                def up(ready: object = ready) -> bool:
                    assert shell.poll() is None, f"the walkthrough stopped (exit {shell.returncode}){output()}"
                    return bool(ready())  # type: ignore[operator]

                try:
                    eventually(up, 60, what)
                except AssertionError as err:
                    raise AssertionError(f"{err}{output()}") from err
        shell.stdin.close()
        assert shell.wait(timeout=120) == 0, f"a walkthrough command failed (exit {shell.returncode}){output()}"
        printed = log.read_text()
        for expected in re.findall(r"^# prints: (.*)$", walkthrough(), re.MULTILINE):
            assert expected in printed, f"the walkthrough did not print {expected!r}{output()}"
        try:
            eventually(lambda: not _group_alive(shell.pid), 30, "the walkthrough's processes to end")
        except AssertionError as err:
            raise AssertionError(f"processes outlived the walkthrough's last line: {err}{output()}") from err
    finally:
        if _group_alive(shell.pid):
            os.killpg(shell.pid, signal.SIGKILL)
        if shell.poll() is None:
            shell.wait(timeout=30)


# --- the audit logging line -------------------------------------------------------------------

SERVE_AND_CALL = """
import sys
sys.path.insert(0, {tests!r})
import meshid
from meshid.ca import Authority
from support import FRONTEND_ID, SERVER_ID, sync_server, stub, hello
import grpc

ca = Authority.create_root("example.org")
bundles = meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, ca.roots))
server = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)
policy = meshid.AuthorizationPolicy.from_dict(
    {{"name": "greeter", "allow": [{{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}}]}}
)
with sync_server(server, meshid.AuthorizationInterceptor(policy, source=server)) as port:
    for caller in (FRONTEND_ID, "spiffe://example.org/ns/prod/sa/stranger"):
        client = meshid.StaticSource(ca.issue_svid(caller), bundles)
        with meshid.secure_channel(f"127.0.0.1:{{port}}", client, server_id=SERVER_ID) as channel:
            try:
                stub(channel).SayHello(hello(), timeout=30)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
"""


def audit_setup() -> str:
    text = README.read_text()
    block = re.search(r"<!-- audit-setup -->\n```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert block, "the README has no audit-setup block"
    return block.group(1)


def test_the_documented_audit_logging_line_shows_every_decision() -> None:
    script = "import logging\n" + audit_setup() + SERVE_AND_CALL.format(tests=str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    records = [line for line in out.stderr.splitlines() if " meshid.audit " in line]
    assert len(records) == 2, out.stderr
    allowed, denied = records
    assert ' meshid.audit INFO authz {"caller": "spiffe://example.org/ns/prod/sa/frontend"' in allowed
    assert '"decision": "allow"' in allowed and '"rule": "frontend"' in allowed
    assert ' meshid.audit WARNING authz {"caller": "spiffe://example.org/ns/prod/sa/stranger"' in denied
    assert '"decision": "deny"' in denied


def test_without_the_line_a_server_prints_no_audit_records() -> None:
    # Why the README has to say it: meshid is a library and configures no logging of its own.
    script = SERVE_AND_CALL.format(tests=str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "authz" not in out.stderr
