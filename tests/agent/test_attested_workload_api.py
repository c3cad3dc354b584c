"""The attested Workload API end to end: client processes of real Unix users, told apart by the kernel.

The clients are separate processes started as the users ``meshid-a``, ``meshid-b`` and
``meshid-c`` (``.ci/run`` creates them; starting a process as another user needs root, as CI
runs): exec'd as that user from the start (``Popen(user=..., group=..., extra_groups=[])``), so
the kernel's peer credentials, ``/proc/<pid>/status`` and the executable are theirs. They run a
Python the users can execute (the test interpreter's real file when they can reach it, else the
system's ``/usr/bin/python3.X`` of the same version) with ``-S`` and ``PYTHONPATH`` naming this
checkout and the test environment's packages. Missing users or such a Python: skipped, or a
failure under ``MESHID_REQUIRE_INTEROP=1`` (set by .ci/run), so CI never passes by skipping.

The pid-reuse tests give an exited client's pid to another process for real: as root, writing
``/proc/sys/kernel/ns_last_pid`` makes the next process started get the pid after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpclib.const
import pytest
import spiffe

import meshid
from meshid.ca import Authority
from meshid.workloadapi import (
    AttestedWorkloadApiServer,
    ProcessInfo,
    Selector,
    WorkloadApiSource,
    attest,
    matches,
)
from support import eventually

pytestmark = pytest.mark.timeout(120)

USERS = ("meshid-a", "meshid-b", "meshid-c")
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
BATCH = "spiffe://example.org/batch"
HEADER = (("workload.spiffe.io", "true"),)
NO_IDENTITY = "no identity issued to this process"

#: The client the tests run as the test users (written to the test's folder); it prints JSON lines.
CLIENT = r'''
import json, os, signal, socket, sys, urllib.parse


def out(**fields):
    print(json.dumps(fields), flush=True)


def varint(buf, i):
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def fields(buf):
    """(number, value) of each field of a protobuf message; enough for the Workload API's replies."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = varint(buf, i)
        elif kind == 2:
            size, i = varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif kind == 1:
            value, i = buf[i : i + 8], i + 8
        else:
            value, i = buf[i : i + 4], i + 4
        yield key >> 3, value


def svid_ids(message):  # X509SVIDResponse.svids[].spiffe_id, in order
    return [dict(fields(svid))[1].decode() for number, svid in fields(message) if number == 1]


def bundle_names(message):  # the keys of X509BundlesResponse.bundles (field 2)
    return sorted(dict(fields(entry))[1].decode() for number, entry in fields(message) if number == 2)


def fetch(path, method):
    """One response of a grpcio call, or its status."""
    import grpc

    with grpc.insecure_channel("unix:" + path) as channel:
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/" + method, request_serializer=lambda _: b"", response_deserializer=lambda raw: raw
        )
        stream = call(b"", metadata=(("workload.spiffe.io", "true"),), timeout=20)
        try:
            first = next(stream)
        except grpc.RpcError as err:
            return out(code=err.code().name, details=err.details())
        stream.cancel()
        out(code="OK", ids=svid_ids(first) if method == "FetchX509SVID" else bundle_names(first))


def follow(path):
    """A py-spiffe X509Source: the SVID's serial each time it changes, until stdin closes."""
    import spiffe

    source = spiffe.X509Source(socket_path="unix://" + path, timeout_in_seconds=20)

    def report():
        svid = source.get_x509_context().default_svid
        out(id=str(svid.spiffe_id), serial=svid.leaf.serial_number)

    source.subscribe_for_updates(report)
    report()
    sys.stdin.read()
    source.close()


def h2_request(sock):
    """FetchX509SVID over raw HTTP/2 on ``sock``: the connection's state lives in this process's
    memory, so a forked child can go on with it."""
    import h2.config, h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [
        (":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ])
    conn.send_data(stream_id, b"\0\0\0\0\0", end_stream=True)
    sock.sendall(conn.data_to_send())
    return conn


def h2_events(sock, conn):
    import h2.events

    pending = b""
    while True:
        data = sock.recv(65536)
        if not data:
            yield {"event": "closed"}
            return
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                pending += event.data
                while len(pending) >= 5 and len(pending) >= 5 + int.from_bytes(pending[1:5], "big"):
                    size = int.from_bytes(pending[1:5], "big")
                    yield {"event": "message", "ids": svid_ids(pending[5 : 5 + size])}
                    pending = pending[5 + size :]
            elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers = dict(event.headers)
                if "grpc-status" in headers:
                    message = urllib.parse.unquote(headers.get("grpc-message", ""))
                    yield {"event": "status", "code": int(headers["grpc-status"]), "details": message}
            elif isinstance(event, h2.events.StreamReset):
                yield {"event": "reset"}
        sock.sendall(conn.data_to_send())


def hold(sock, events):
    """The child that keeps the connection after the process that opened it has gone."""
    signal.alarm(60)  # never outlives the test
    for event in events:
        out(holder_event=event)
        if event["event"] != "message":
            break
    os._exit(0)


def connect_then_fork(path):
    """Connect, hand the connection to a child, exit; the child asks once told to (a stdin line)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    child = os.fork()
    if child:
        out(connected=os.getpid(), holder=child)
        os._exit(0)
    if not sys.stdin.readline():
        os._exit(0)
    hold(sock, h2_events(sock, h2_request(sock)))


def fetch_then_fork(path):
    """Connect and receive the first response; hand the open stream to a child, exit."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    events = h2_events(sock, h2_request(sock))
    first = next(events)
    child = os.fork()
    if child:
        out(connected=os.getpid(), holder=child, first=first)
        os._exit(0)
    hold(sock, events)


mode, path = sys.argv[1], sys.argv[2]
if mode == "fetch":
    fetch(path, "FetchX509SVID")
elif mode == "bundles":
    fetch(path, "FetchX509Bundles")
elif mode == "follow":
    follow(path)
elif mode == "connect-then-fork":
    connect_then_fork(path)
elif mode == "fetch-then-fork":
    fetch_then_fork(path)
'''


# --- prerequisites: the users, a Python they can run ------------------------------------------------


def _unavailable(reason: str) -> None:
    if os.environ.get("MESHID_REQUIRE_INTEROP") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def users() -> dict[str, pwd.struct_passwd]:
    if os.geteuid() != 0:
        _unavailable("starting clients as other Unix users needs root (CI runs as root)")
    missing = []
    found = {}
    for name in USERS:
        try:
            found[name] = pwd.getpwnam(name)
        except KeyError:
            missing.append(name)
    if missing:
        _unavailable(f"the test users {', '.join(missing)} do not exist; .ci/run creates them with useradd --system")
    return found


@dataclass(frozen=True)
class WorkloadPython:
    executable: str
    env: dict[str, str]


def _as_user(entry: pwd.struct_passwd) -> dict[str, Any]:
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@pytest.fixture(scope="module")
def python(users: dict[str, pwd.struct_passwd]) -> WorkloadPython:
    """A Python of this version that the test users can run, with meshid and the test packages."""
    root = Path(meshid.__file__).resolve().parent.parent
    paths = [str(root), *dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))]
    env = {"PYTHONPATH": os.pathsep.join(paths), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    version = "{}.{}".format(*sys.version_info[:2])
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{version}", shutil.which(f"python{version}")]
    tried = []
    for executable in dict.fromkeys(c for c in candidates if c):
        probe = [executable, "-S", "-c", "import sys, grpc, h2, spiffe, meshid; print('%d.%d' % sys.version_info[:2])"]
        try:
            out = subprocess.run(probe, env=env, cwd="/", capture_output=True, text=True, timeout=60, **_as_user(users["meshid-a"]))
        except OSError as err:
            tried.append(f"{executable}: {err.strerror}")
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return WorkloadPython(executable, env)
        tried.append(f"{executable}: {(out.stderr.strip().splitlines() or [out.stdout.strip()])[-1]}")
    _unavailable(f"no Python {version} that meshid-a can run with meshid's packages ({'; '.join(tried)})")
    raise AssertionError("unreachable")


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder the test users can read (pytest's tmp_path is private to root); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="meshid-attest-"))
    path.chmod(0o755)
    (path / "client.py").write_text(CLIENT)
    (path / "client.py").chmod(0o644)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the provider: registration entries and their SVIDs, as a node agent's cache holds them --------


class Entries:
    """(SPIFFE ID, selectors) entries in order, each with a current SVID; ``rotate`` and ``remove``
    change them and notify, as the node agent's cache does on renewal and on deletion."""

    def __init__(self, ca: Authority, bundles: meshid.BundleSet, *entries: tuple[str, Sequence[str]]) -> None:
        self._ca, self._bundles = ca, bundles
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.entries = [(sid, tuple(Selector.parse(s) for s in selectors)) for sid, selectors in entries]
        self.svids = {sid: ca.issue_svid(sid) for sid, _ in self.entries}

    def identities_for(self, process: ProcessInfo) -> list[tuple[meshid.X509Svid, meshid.BundleSet]]:
        with self._lock:
            svids = dict(self.svids)
        return [(svids[sid], self._bundles) for sid, selectors in self.entries if sid in svids and matches(selectors, process)]

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            callback()

    def rotate(self, spiffe_id: str) -> meshid.X509Svid:
        svid = self._ca.issue_svid(spiffe_id)
        with self._lock:
            self.svids[spiffe_id] = svid
        self._notify()
        return svid

    def remove(self, spiffe_id: str) -> None:
        with self._lock:
            del self.svids[spiffe_id]
        self._notify()


@pytest.fixture
def serve(folder: Path, request: pytest.FixtureRequest) -> Callable[..., AttestedWorkloadApiServer]:
    def start(provider: Entries, **kwargs: Any) -> AttestedWorkloadApiServer:
        server = AttestedWorkloadApiServer(provider, str(folder / "agent.sock"), **kwargs)
        request.addfinalizer(server.close)
        return server.start()

    return start


# --- client processes --------------------------------------------------------------------------------


class Workload:
    """A CLIENT process run as a test user; a thread collects its JSON lines (and any other output)."""

    def __init__(self, python: WorkloadPython, entry: pwd.struct_passwd, folder: Path, *args: str, executable: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [executable or python.executable, "-S", str(folder / "client.py"), *args],
            env=python.env,
            cwd=str(folder),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **_as_user(entry),
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, name="test-workload-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"output": line.rstrip()})

    def line(self, key: str, timeout: float = 30) -> dict[str, Any]:
        """The first line holding ``key``, once it has been printed."""
        found = eventually(lambda: next((x for x in list(self.lines) if key in x), None), timeout, f"a line with {key!r} from the client: {self.lines}")
        assert isinstance(found, dict)
        return found

    def tell(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def run(python: WorkloadPython, users: dict[str, pwd.struct_passwd], folder: Path, request: pytest.FixtureRequest) -> Callable[..., Workload]:
    def start(user: str, *args: str, executable: str | None = None) -> Workload:
        workload = Workload(python, users[user], folder, *args, executable=executable)
        request.addfinalizer(workload.stop)
        return workload

    return start


def _socket(folder: Path) -> str:
    return str(folder / "agent.sock")


# --- who gets what ----------------------------------------------------------------------------------


def test_each_user_gets_the_identity_issued_to_it(ca, bundles, serve, run, users, folder) -> None:
    entries = Entries(ca, bundles, (WEB, [f"unix:uid:{users['meshid-a'].pw_uid}"]), (DB, ["unix:user:meshid-b"]))
    serve(entries)
    clients = {user: run(user, "fetch", _socket(folder)) for user in USERS}
    assert clients["meshid-a"].line("code") == {"code": "OK", "ids": [WEB]}
    assert clients["meshid-b"].line("code") == {"code": "OK", "ids": [DB]}
    assert clients["meshid-c"].line("code") == {"code": "PERMISSION_DENIED", "details": NO_IDENTITY}


def test_bundles_only_for_a_caller_with_an_identity(ca, bundles, serve, run, users, folder) -> None:
    serve(Entries(ca, bundles, (WEB, ["unix:user:meshid-a"])))
    a, c = run("meshid-a", "bundles", _socket(folder)), run("meshid-c", "bundles", _socket(folder))
    assert a.line("code") == {"code": "OK", "ids": sorted(str(td.id()) for td in bundles)}
    assert c.line("code") == {"code": "PERMISSION_DENIED", "details": NO_IDENTITY}


def test_a_caller_matching_several_entries_gets_all_the_first_being_the_default(ca, bundles, serve, run, folder) -> None:
    entries = Entries(
        ca,
        bundles,
        (WEB, ["unix:user:meshid-a", "unix:group:meshid-a"]),
        (DB, ["unix:user:meshid-b"]),
        (BATCH, ["unix:group:meshid-a"]),
    )
    serve(entries)
    assert run("meshid-a", "fetch", _socket(folder)).line("code") == {"code": "OK", "ids": [WEB, BATCH]}


def test_py_spiffe_source_of_user_a_follows_rotations(ca, bundles, serve, run, users, folder) -> None:
    entries = Entries(ca, bundles, (WEB, ["unix:user:meshid-a"]), (DB, ["unix:user:meshid-b"]))
    serve(entries)
    follower = run("meshid-a", "follow", _socket(folder))
    assert follower.line("serial") == {"id": WEB, "serial": entries.svids[WEB].serial}
    for _ in range(3):
        serial = entries.rotate(WEB).serial
        eventually(lambda s=serial: {"id": WEB, "serial": s} in follower.lines, 30, f"the A process to see serial {serial:x}")
    entries.rotate(DB)  # B's identity changes: A's source sees nothing of it
    assert all(line.get("id") == WEB for line in follower.lines), follower.lines


# --- unix:path and unix:sha256, told apart by two copies of one interpreter --------------------------


def test_path_and_sha256_selectors_are_told_apart(ca, bundles, python, serve, run, folder) -> None:
    original = Path(python.executable).read_bytes()
    copies = {}
    for name, content in (("one", original), ("two", original), ("changed", original + b"\0" * 64)):
        directory = folder / name
        directory.mkdir(mode=0o755)
        copies[name] = directory / "python"
        copies[name].write_bytes(content)
        copies[name].chmod(0o755)
    (folder / "link").mkdir(mode=0o755)
    (folder / "link" / "python").symlink_to(copies["one"])
    digest = __import__("hashlib").sha256(original).hexdigest()
    by_path, by_digest = "spiffe://example.org/by-path", "spiffe://example.org/by-digest"
    serve(Entries(ca, bundles, (by_path, [f"unix:path:{copies['one']}"]), (by_digest, [f"unix:sha256:{digest}"])))

    def fetch(executable: Path) -> dict[str, Any]:
        return run("meshid-a", "fetch", _socket(folder), executable=str(executable)).line("code")

    assert fetch(copies["one"]) == {"code": "OK", "ids": [by_path, by_digest]}  # its path, its content
    assert fetch(copies["two"]) == {"code": "OK", "ids": [by_digest]}  # another path, the same content
    assert fetch(copies["changed"]) == {"code": "PERMISSION_DENIED", "details": NO_IDENTITY}  # neither
    # A symlink is not a path of its own: the kernel names the file the process runs.
    assert fetch(folder / "link" / "python") == {"code": "OK", "ids": [by_path, by_digest]}


# --- an exited process's pid speaks for nobody ------------------------------------------------------


def _take_pid(pid: int, args: list[str], **kwargs: Any) -> subprocess.Popen[str] | None:
    """A process started with pid ``pid``, free again now that its last owner has exited and been
    reaped; None when another process (or thread) on the machine has taken it meanwhile."""
    for _ in range(100):
        if os.path.exists(f"/proc/{pid}"):
            return None
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError as err:
            _unavailable(f"cannot choose the next pid (/proc/sys/kernel/ns_last_pid: {err.strerror}); needs root with CAP_SYS_ADMIN")
        proc = subprocess.Popen(args, **kwargs)
        if proc.pid == pid:
            return proc
        proc.kill()  # a process forked in between got it: try again
        proc.wait()
    return None


@dataclass
class TakenOver:
    client: Workload  # the client process that connected (exited) and its holder child's output
    pids: dict[str, Any]  # "connected": the exited process's pid, "holder": the child's
    taker: subprocess.Popen[str]  # the process that now has the pid, run as the victim


@pytest.fixture
def take_over(run, python, users, folder, request) -> Callable[..., TakenOver]:
    """Run the client in ``mode`` as ``user``; once the process that connected has exited, start
    ``program`` as ``victim`` with its pid. A new client is tried when the machine takes the pid first.
    The holder (an orphan, not our child) and the taker are always killed."""

    def start(mode: str, user: str, victim: str, program: str) -> TakenOver:
        for _ in range(5):
            client = run(user, mode, _socket(folder))
            pids = client.line("connected")
            request.addfinalizer(_killer(pids["holder"]))
            assert client.proc.wait(timeout=20) == 0
            taker = _take_pid(
                pids["connected"],
                [program, "-S", "-c", "import sys; sys.stdin.read()"],
                env=python.env,
                stdin=subprocess.PIPE,
                text=True,
                **_as_user(users[victim]),
            )
            if taker is not None:
                request.addfinalizer(lambda t=taker: (t.kill(), t.wait(), t.stdin and t.stdin.close()))
                return TakenOver(client, pids, taker)
            _killer(pids["holder"])()
        pytest.fail("five times another process took the exited client's pid before the test could")

    return start


def _killer(pid: int) -> Callable[[], None]:
    """Kills process ``pid`` when called: through a pidfd opened now, so exactly that process."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return lambda: None

    def kill() -> None:
        nonlocal pidfd
        if pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        pidfd = -1

    return kill


def _kernel_hands_out_peer_pidfds() -> bool:
    """Whether the kernel has SO_PEERPIDFD (Linux 6.5; 77 where socket options take the generic numbers)."""
    option = getattr(socket, "SO_PEERPIDFD", None)
    if option is None and platform.machine() in ("x86_64", "aarch64", "arm64", "i686", "riscv64"):
        option = 77
    if option is None:
        return False
    a, b = socket.socketpair()
    try:
        os.close(a.getsockopt(socket.SOL_SOCKET, option))
        return True
    except OSError:
        return False
    finally:
        a.close()
        b.close()


def _status(line: dict[str, Any]) -> tuple[str, str]:
    """The status a holder's stream ended with; which guard refused is in the details."""
    event = line["holder_event"]
    assert event["event"] == "status", event
    assert event["details"].startswith("attestation: "), event
    return grpclib.const.Status(event["code"]).name, event["details"]


def _messages(client: Workload) -> list[dict[str, Any]]:
    return [x for x in client.lines if x.get("holder_event", {}).get("event") == "message"]


SAME_USER = pytest.param(
    "meshid-c",
    marks=pytest.mark.xfail(
        not _kernel_hands_out_peer_pidfds(),
        reason="without SO_PEERPIDFD (Linux < 6.5) the server opens a pidfd by number when the request comes, "
        "and a process of the same user that took the pid is not told apart",
        strict=True,
    ),
    id="same-user-other-program",
)


@pytest.mark.parametrize("victim", [pytest.param("meshid-a", id="another-user"), SAME_USER])
def test_a_connection_whose_process_exited_gets_nothing_from_the_pid_s_next_process(
    victim, ca, bundles, python, serve, take_over, users, folder
) -> None:
    # The attacker, C, connects and exits, leaving the connection to a child; the victim's process
    # takes its pid; then the child asks. The victim has an identity (web for A; for C, the entry
    # naming C's other program), so a server that believed the pid would hand it over.
    other_program = folder / "bin" / "python"
    other_program.parent.mkdir(mode=0o755)
    shutil.copy(python.executable, other_program)
    entries = Entries(
        ca,
        bundles,
        (WEB, ["unix:user:meshid-a"]),
        (BATCH, ["unix:user:meshid-c", f"unix:path:{other_program}"]),
    )
    serve(entries)
    program = python.executable if victim == "meshid-a" else str(other_program)
    taken = take_over("connect-then-fork", "meshid-c", victim, program)  # C connects from python.executable
    entry = users[victim]
    info = attest(taken.taker.pid, entry.pw_uid, entry.pw_gid)
    assert entries.identities_for(info) != []  # the pid has an identity now
    taken.client.tell("go\n")  # the holder asks on the connection the exited process opened
    assert _status(taken.client.line("holder_event"))[0] == "UNAUTHENTICATED"
    assert not _messages(taken.client)


def test_a_stream_whose_process_exited_sends_no_identity_to_the_pid_s_next_process(
    ca, bundles, python, serve, take_over, users, folder
) -> None:
    # A's client receives web's SVID, hands the open stream to a child and exits; B's process
    # takes the pid, and both identities rotate. The connection gets nothing more: neither A's new
    # SVID nor B's, and the stream ends UNAUTHENTICATED.
    entries = Entries(ca, bundles, (WEB, ["unix:user:meshid-a"]), (DB, ["unix:user:meshid-b"]))
    serve(entries)
    taken = take_over("fetch-then-fork", "meshid-a", "meshid-b", python.executable)
    assert taken.pids["first"] == {"event": "message", "ids": [WEB]}
    b = users["meshid-b"]
    info = attest(taken.taker.pid, b.pw_uid, b.pw_gid)
    assert [str(svid.spiffe_id) for svid, _ in entries.identities_for(info)] == [DB]
    entries.rotate(WEB)
    entries.rotate(DB)
    assert _status(taken.client.line("holder_event"))[0] == "UNAUTHENTICATED"
    assert not _messages(taken.client), taken.client.lines


# --- the protocol, from this process ------------------------------------------------------------------


def _me_entries(ca: Authority, bundles: meshid.BundleSet, *ids: str) -> Entries:
    return Entries(ca, bundles, *((sid, [f"unix:uid:{os.geteuid()}"]) for sid in ids))


def _raw_stream(path: str, method: str = "FetchX509SVID", metadata: Any = HEADER) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel("unix:" + path)
    call = channel.unary_stream(f"/SpiffeWorkloadAPI/{method}", request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)
    return channel, call(b"", metadata=metadata, timeout=20)


def _status_of(stream: Any) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as failure:
        for _ in stream:
            pass
    return failure.value.code().name, failure.value.details()


def test_the_security_header_is_required(ca, bundles, serve, folder) -> None:
    serve(_me_entries(ca, bundles, WEB))
    for metadata in (None, (("workload.spiffe.io", "false"),), (("workload.spiffe.io", "true"), ("workload.spiffe.io", "true"))):
        channel, stream = _raw_stream(_socket(folder), metadata=metadata)
        with channel:
            assert _status_of(stream) == ("INVALID_ARGUMENT", "security header missing from request")


def test_jwt_methods_are_unimplemented(ca, bundles, serve, folder) -> None:
    serve(_me_entries(ca, bundles, WEB))
    with grpc.insecure_channel("unix:" + _socket(folder)) as channel:
        for method in ("FetchJWTSVID", "ValidateJWTSVID"):
            call = channel.unary_unary(f"/SpiffeWorkloadAPI/{method}", request_serializer=lambda _: b"", response_deserializer=lambda raw: raw)
            with pytest.raises(grpc.RpcError) as failure:
                call(b"", metadata=HEADER, timeout=10)
            assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel, stream = _raw_stream(_socket(folder), "FetchJWTBundles")
    with channel:
        assert _status_of(stream)[0] == "UNIMPLEMENTED"


def test_meshid_and_py_spiffe_clients_see_the_default_first(ca, bundles, serve, folder, request) -> None:
    serve(_me_entries(ca, bundles, WEB, BATCH))
    client = spiffe.WorkloadApiClient(socket_path="unix://" + _socket(folder))
    request.addfinalizer(client.close)
    assert [str(svid.spiffe_id) for svid in client.fetch_x509_svids(timeout=10)] == [WEB, BATCH]
    with WorkloadApiSource("unix://" + _socket(folder)) as source:
        assert str(source.get_svid().spiffe_id) == WEB
    with WorkloadApiSource("unix://" + _socket(folder), spiffe_id=BATCH) as source:
        assert str(source.get_svid().spiffe_id) == BATCH


def test_a_deleted_entry_ends_the_stream(ca, bundles, serve, folder) -> None:
    entries = _me_entries(ca, bundles, WEB)
    serve(entries)
    channel, stream = _raw_stream(_socket(folder))
    with channel:
        next(stream)
        entries.remove(WEB)
        assert _status_of(stream) == ("PERMISSION_DENIED", NO_IDENTITY)


def test_close_ends_streams_with_unavailable_and_removes_the_socket(ca, bundles, serve, folder) -> None:
    server = serve(_me_entries(ca, bundles, WEB))
    channel, stream = _raw_stream(_socket(folder))
    with channel:
        next(stream)
        server.close()
        assert _status_of(stream) == ("UNAVAILABLE", "the Workload API server is shutting down; reconnect")
    assert not os.path.exists(_socket(folder))


def test_streams_beyond_max_streams_are_refused(ca, bundles, serve, folder) -> None:
    serve(_me_entries(ca, bundles, WEB), max_streams=1)
    first_channel, first = _raw_stream(_socket(folder))
    with first_channel:
        next(first)
        channel, second = _raw_stream(_socket(folder))
        with channel:
            assert _status_of(second)[0] == "RESOURCE_EXHAUSTED"


def test_the_socket_is_world_connectable_by_default(ca, bundles, serve, folder) -> None:
    serve(_me_entries(ca, bundles, WEB))
    assert stat.S_IMODE(os.stat(_socket(folder)).st_mode) == 0o666


def test_a_narrower_socket_mode(ca, bundles, serve, folder) -> None:
    serve(_me_entries(ca, bundles, WEB), mode=0o660)
    assert stat.S_IMODE(os.stat(_socket(folder)).st_mode) == 0o660


def test_a_second_server_on_the_same_path_is_refused(ca, bundles, serve, folder) -> None:
    serve(_me_entries(ca, bundles, WEB))
    second = AttestedWorkloadApiServer(_me_entries(ca, bundles, DB), _socket(folder))
    with pytest.raises(meshid.errors.ListenError, match="another server is listening"):
        second.start()
    with WorkloadApiSource("unix://" + _socket(folder)) as source:  # the first still serves
        assert str(source.get_svid().spiffe_id) == WEB


def test_a_stale_socket_file_is_replaced(ca, bundles, serve, folder) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(_socket(folder))
    stale.close()  # the file stays, nobody listens
    serve(_me_entries(ca, bundles, WEB))
    with WorkloadApiSource("unix://" + _socket(folder)) as source:
        assert str(source.get_svid().spiffe_id) == WEB


def test_the_constructor_starts_nothing(ca, bundles, folder) -> None:
    before = {t.name for t in threading.enumerate()}
    server = AttestedWorkloadApiServer(_me_entries(ca, bundles, WEB), _socket(folder))
    assert {t.name for t in threading.enumerate()} == before
    assert not os.path.exists(server.path)
    with pytest.raises(TypeError, match="identities_for"):
        AttestedWorkloadApiServer(object(), _socket(folder))  # type: ignore[arg-type]


def test_grpclib_still_keeps_the_connection_where_meshid_reads_it() -> None:
    # grpclib has no public way from a handler to its connection; AttestedWorkloadApiServer reads
    # stream.peer._transport (meshid.workloadapi.attested_server._connection_of). If this fails,
    # grpclib has changed: every caller would be refused INTERNAL until that function follows.
    from importlib.metadata import version

    import grpclib.protocol

    transport = object()
    assert grpclib.protocol.Peer(transport)._transport is transport  # type: ignore[arg-type]
    assert tuple(int(p) for p in version("grpclib").split(".")[:2]) < (0, 5)
