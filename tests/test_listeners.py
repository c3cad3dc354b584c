"""Issue #10, item 7: no listener meshid opens starts on an address another process holds.

grpc sets SO_REUSEPORT by default, so a second server on a port in use would start and take a
share of the connections. Each listener (the CA, its metrics, the example greeter, the
Workload API socket) must refuse instead, with one line saying so; the CLI exits 2. The CLI
and the example run as real processes; the servers holding the addresses are real too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import meshid
from meshid.ca import Authority
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.errors import InvalidAddressError
from meshid.metrics import serve_metrics
from support import FRONTEND_ID, SERVER_ID

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
TD = "example.org"
WORKLOAD_ID = f"spiffe://{TD}/ns/prod/sa/workload"
#: How long a process that should refuse at once may take to exit before it counts as started.
EXIT_DEADLINE = 30.0


def meshid_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshid.cli", *args]


class Lines:
    """The stdout lines of a running process, read by a thread (a pipe read can take several lines at once)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc, self._lines = proc, queue.Queue[str | None]()
        self._reader = threading.Thread(target=self._read, name="test-stdout-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output: the process exited

    def wait_for(self, pattern: str, what: str) -> re.Match[str]:
        """The next line matching ``pattern`` (fails if the process exits or stalls first)."""
        give_up = time.monotonic() + EXIT_DEADLINE
        while (left := give_up - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"{what} exited with {self._proc.wait()} before printing {pattern!r}")
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"{what} printed no {pattern!r} within {EXIT_DEADLINE} s")

    def close(self) -> None:
        """After the process has ended: the reader sees the end of its output, then the pipe closes."""
        self._reader.join(10)
        assert self._proc.stdout is not None
        self._proc.stdout.close()


@contextlib.contextmanager
def running(args: list[str], *, env: dict[str, str] | None = None) -> Iterator[Lines]:
    """A long-running process (stderr discarded) and its stdout lines; always ended."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines = Lines(proc)
    try:
        yield lines
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        lines.close()


def refused(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a process that must refuse to start: it has to exit on its own within the deadline."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=EXIT_DEADLINE, env=env, check=False)
    except subprocess.TimeoutExpired as err:  # run() has killed it
        pytest.fail(f"{' '.join(args[1:])} started on an address in use instead of refusing; stderr: {err.stderr!r}")


def assert_one_line(result: subprocess.CompletedProcess[str], prefix: str, *words: str) -> str:
    """Exit code 2 and exactly one line on stderr, never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("listeners") / "ca"
    init = subprocess.run(
        meshid_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD), capture_output=True, text=True
    )
    assert init.returncode == 0, init.stderr
    return folder


@pytest.fixture(scope="module")
def ca(data_dir: Path) -> Iterator[tuple[str, int]]:
    """`meshid ca serve` with metrics, as a real process: (its address, its metrics port)."""
    args = ["ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    with running(meshid_cli(*args)) as lines:
        port = int(lines.wait_for(r"^CA serving on 127\.0\.0\.1:(\d+)$", "the first CA").group(1))
        metrics_port = int(lines.wait_for(r"^CA metrics on http://127\.0\.0\.1:(\d+)/metrics$", "the CA").group(1))
        yield f"127.0.0.1:{port}", metrics_port


def answers(address: str, data_dir: Path) -> bool:
    with AdminClient(address, data_dir) as admin:
        admin.list_entries()
    return True


# --- what the code relies on ---------------------------------------------------------------------


def test_grpc_refuses_a_second_bind_once_so_reuseport_is_off() -> None:
    first = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # grpc's default: SO_REUSEPORT set
    port = first.add_insecure_port("127.0.0.1:0")
    first.start()
    try:
        sharing = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        assert sharing.add_insecure_port(f"127.0.0.1:{port}") == port  # what the option is for
        refusing = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
        with pytest.raises(RuntimeError, match="Failed to bind"):
            refusing.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        first.stop(None).wait()


# --- the CA ---------------------------------------------------------------------------------------


def test_second_ca_serve_on_the_port_in_use_exits_2_with_one_line(ca: tuple[str, int], data_dir: Path) -> None:
    address, _ = ca
    result = refused(meshid_cli("ca", "serve", "--data-dir", str(data_dir), "--listen", address))
    assert_one_line(result, f"meshid: CA: cannot listen on {address}: ", "in use")
    assert answers(address, data_dir)  # the first CA still serves, alone


def test_ca_serve_with_metrics_on_a_port_in_use_exits_2_with_one_line(ca: tuple[str, int], data_dir: Path) -> None:
    address, metrics_port = ca
    args = ["ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--metrics"]
    result = refused(meshid_cli(*args, f"127.0.0.1:{metrics_port}"))
    assert_one_line(result, f"meshid: metrics: cannot listen on 127.0.0.1:{metrics_port}: ", "in use")
    assert answers(address, data_dir)


def test_ca_server_refuses_a_port_a_grpc_server_shares(tmp_path: Path) -> None:
    # The holder sets SO_REUSEPORT (grpc's default, as meshid's own servers did): sharing is
    # refused all the same, since it takes both sockets to ask for it.
    holder = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    init_data_dir(tmp_path / "ca", TD)
    server = CaServer(tmp_path / "ca", f"127.0.0.1:{port}")
    try:
        with pytest.raises(meshid.MeshIdError, match=rf"^CA: cannot listen on 127\.0\.0\.1:{port}: .*in use"):
            server.start()
    finally:
        server.stop(None)
        holder.stop(None).wait()


def test_ca_server_refuses_the_port_of_another_ca_server(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "one", TD)
    init_data_dir(tmp_path / "two", TD)
    first = CaServer(tmp_path / "one", "127.0.0.1:0")
    port = first.start()
    second = CaServer(tmp_path / "two", f"127.0.0.1:{port}")
    admin_svid = (tmp_path / "two" / "admin" / "svid.pem").read_bytes()
    try:
        with pytest.raises(meshid.MeshIdError, match="in use by another process"):
            second.start()
        # Refused before it signed anything: the second CA's admin SVID was not rewritten.
        assert (tmp_path / "two" / "admin" / "svid.pem").read_bytes() == admin_svid
        assert answers(f"127.0.0.1:{port}", tmp_path / "one")
    finally:
        second.stop(None)
        first.stop(None)


# --- the example greeter --------------------------------------------------------------------------


def test_example_greeter_on_a_port_in_use_exits_2(tmp_path: Path) -> None:
    authority = Authority.create_root(TD)
    svid = authority.issue_svid(SERVER_ID)
    (tmp_path / "svid.pem").write_bytes(svid.chain_pem())
    (tmp_path / "svid.key").write_bytes(svid.key_pem())
    (tmp_path / "bundle.pem").write_bytes(meshid.TrustBundle(authority.trust_domain, authority.roots).to_pem())
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"allow:\n  - name: all\n    methods: ['*']\n    spiffe_ids: [{FRONTEND_ID}]\n")
    holder = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        script = str(ROOT / "examples" / "greeter" / "server.py")
        result = refused([sys.executable, script, "--dir", str(tmp_path), "--policy", str(policy), "--port", str(port)])
    finally:
        holder.stop(None).wait()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # grpc's C core logs its own line first; the greeter's is the last.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"greeter: cannot listen on 127.0.0.1:{port}: the address is in use"), last


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("server.py", ["--policy", "{dir}/missing.yaml"], "greeter: policy {dir}/missing.yaml: cannot read"),
        ("server.py", ["--policy", "{dir}/broken.json"], "greeter: policy {dir}/broken.json: invalid JSON"),
        ("client.py", ["--target", "127.0.0.1:1", "--server-id", "spiffe://other.org/ns/x"], "no trust bundle"),
        ("client.py", ["--target", "127.0.0.1:1", "--server-id", "spiffe://example.org/ns/*"], "exact SPIFFE ID"),
    ],
)
def test_example_greeter_and_client_refuse_bad_input_in_one_line(tmp_path: Path, script, args, expected) -> None:
    authority = Authority.create_root(TD)
    svid = authority.issue_svid(SERVER_ID)
    (tmp_path / "svid.pem").write_bytes(svid.chain_pem())
    (tmp_path / "svid.key").write_bytes(svid.key_pem())
    (tmp_path / "bundle.pem").write_bytes(meshid.TrustBundle(authority.trust_domain, authority.roots).to_pem())
    (tmp_path / "broken.json").write_text('{"name": ')
    path = str(ROOT / "examples" / "greeter" / script)
    words = [a.format(dir=tmp_path) for a in args]
    result = refused([sys.executable, path, "--dir", str(tmp_path), *words])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert expected.format(dir=tmp_path) in result.stderr.strip().splitlines()[-1], result.stderr


# --- the Workload API socket ----------------------------------------------------------------------


def test_agent_on_a_socket_another_agent_serves_exits_2_and_keeps_its_join_token(
    ca: tuple[str, int], data_dir: Path, tmp_path: Path
) -> None:
    address, _ = ca
    bundle = str(data_dir / "bundle.pem")
    with AdminClient(address, data_dir) as admin:
        admin.create_entry(WORKLOAD_ID)
        first_token = str(admin.create_token(WORKLOAD_ID).token)
        second_token = str(admin.create_token(WORKLOAD_ID, ttl=datetime.timedelta(minutes=5)).token)
    sock = tmp_path / "api.sock"
    env = {**os.environ, "MESHID_JOIN_TOKEN": first_token}
    agent = ["agent", "--server", address, "--bundle", bundle, "--workload-api", f"unix://{sock}"]
    with running(meshid_cli(*agent), env=env) as first:
        first.wait_for(r"^agent: ", "the first agent")
        result = refused(meshid_cli(*agent), env={**os.environ, "MESHID_JOIN_TOKEN": second_token})
        assert_one_line(result, f"meshid: Workload API: another server is listening on {sock}")
        # The first agent still serves on its socket...
        with meshid.WorkloadApiSource(f"unix:{sock}") as served:
            assert str(served.get_svid().spiffe_id) == WORKLOAD_ID
    # ...and the refused one never spent its one-time token.
    svid, _ = fetch_svid(address, bundle, second_token)
    assert str(svid.spiffe_id) == WORKLOAD_ID


def test_agent_replaces_a_stale_socket_file(ca: tuple[str, int], data_dir: Path, tmp_path: Path) -> None:
    address, _ = ca
    with AdminClient(address, data_dir) as admin:
        admin.create_entry(f"{WORKLOAD_ID}-stale")
        token = str(admin.create_token(f"{WORKLOAD_ID}-stale").token)
    sock = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:  # bound, never listening, then closed
        dead.bind(str(sock))
    assert sock.is_socket()
    agent = ["agent", "--server", address, "--bundle", str(data_dir / "bundle.pem"), "--workload-api", f"unix://{sock}"]
    with running(meshid_cli(*agent), env={**os.environ, "MESHID_JOIN_TOKEN": token}) as agent_lines:
        agent_lines.wait_for(r"^agent: ", "the agent")
        with meshid.WorkloadApiSource(f"unix:{sock}") as served:
            assert str(served.get_svid().spiffe_id) == f"{WORKLOAD_ID}-stale"


# --- addresses checked before anything listens (issue #13): no wrap-around, no default port ---------


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range"),  # grpc would serve on 99999 - 65536 = 34463
        ("127.0.0.1", "no port"),  # grpc would serve on 443
        ("nonsense", "no port"),
        ("127.0.0.1:abc", "port 'abc' is not a number"),
        (":8443", "no host"),
        ("localhost:-1", "port '-1' is not a number"),
    ],
)
def test_ca_server_refuses_a_bad_address_before_opening_the_data_folder(
    tmp_path: Path, listen: str, words: str
) -> None:
    with pytest.raises(InvalidAddressError, match=re.escape(words)) as info:
        CaServer(tmp_path / "never-created", listen)
    assert isinstance(info.value, ValueError) and str(info.value).startswith(f"address {listen!r}: ")
    assert not (tmp_path / "never-created").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1", "127.0.0.1:port", ":9100"])
def test_metrics_refuse_a_bad_address(address: str) -> None:
    with pytest.raises(InvalidAddressError, match=rf"^metrics: address {re.escape(repr(address))}: "):
        serve_metrics(address)
