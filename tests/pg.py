"""A real PostgreSQL server for tests: started on a free loopback port, always stopped.

``running_postgres(folder)`` yields the DSN of a superuser ``meshid`` on a database ``meshid``;
``create_database(dsn, name)`` makes another database on the same server (one per test is cheap),
``new_database(dsn)`` one with a name not used before; ``query(dsn, ...)`` runs one statement.
PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user.
No PostgreSQL installed: the test is skipped, or fails under MESHID_REQUIRE_INTEROP=1.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from support import require_program

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_databases = itertools.count()


def postgres_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``postgres``: PATH first, then the newest Debian one."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path))

    fallbacks = sorted(glob("/usr/lib/postgresql/*/bin/postgres"), key=version, reverse=True)
    postgres = Path(require_program("postgres", *fallbacks)).resolve()
    if not (postgres.parent / "initdb").exists():
        require_program("initdb", *(str(Path(f).parent / "initdb") for f in fallbacks))
    return postgres.parent


@contextlib.contextmanager
def running_postgres(folder: Path) -> Iterator[str]:
    """A PostgreSQL server listening on 127.0.0.1 only; yields ``postgresql://meshid@127.0.0.1:PORT/meshid``.

    The cluster lives in a fresh short-named folder under the system temp folder (a Unix socket
    path must stay under 108 bytes, and under root the ``postgres`` user must reach it, which
    pytest's private base folder forbids); it is removed afterwards. ``folder`` keeps the
    server's log, for reading after a failure.
    """
    bin_dir = postgres_bin_dir()
    cluster = Path(tempfile.mkdtemp(prefix="meshid-pg-"))
    log_path = Path(folder) / "postgres.log"
    user = _server_user()
    try:
        if user is not None:
            os.chown(cluster, user.pw_uid, user.pw_gid)
        data, sockets = cluster / "data", cluster / "s"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "meshid"]
        _as_server_user(user, [*initdb, "-E", "UTF8", "--locale=C", "--no-sync"], cluster, log_path)
        sockets.mkdir(mode=0o700)
        if user is not None:
            os.chown(sockets, user.pw_uid, user.pw_gid)
        with _server(bin_dir, user, data, sockets, cluster, log_path) as port:
            admin = f"postgresql://meshid@127.0.0.1:{port}/postgres"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("CREATE DATABASE meshid")
            yield f"postgresql://meshid@127.0.0.1:{port}/meshid"
    finally:
        shutil.rmtree(cluster, ignore_errors=True)


def create_database(dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``dsn``; returns the DSN naming it instead."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return dsn.rsplit("/", 1)[0] + "/" + name


def new_database(dsn: str) -> str:
    """A new, empty database on the server of ``dsn`` (``test_0``, ``test_1``...); returns its DSN."""
    return create_database(dsn, f"test_{next(_databases)}")


def query(dsn: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement (``%s`` placeholders) in its own autocommitted connection; its rows, if any."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def _server(
    bin_dir: Path, user: pwd.struct_passwd | None, data: Path, sockets: Path, cluster: Path, log_path: Path
) -> Iterator[int]:
    """``postgres`` on a free port, ready for connections; stopped (fast, then killed) on exit."""
    for attempt in range(3):
        port = _free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                _as_user(user, [
                    str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
                    "-c", "listen_addresses=127.0.0.1",
                    # A test server: speed over crash safety.
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "max_connections=200",
                ]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cluster,
                env=_clean_env(), start_new_session=True,
            )  # fmt: skip
        try:
            if _wait_ready(proc, port, log_path):
                yield port
                return
        finally:
            _stop(proc)
        # The port was taken between choosing it and binding it: try another one.
        if attempt == 2 or "could not bind" not in log_path.read_text(errors="replace"):
            break
    raise RuntimeError(f"PostgreSQL did not start; its log:\n{_tail(log_path)}")


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            psycopg.connect(f"postgresql://meshid@127.0.0.1:{port}/postgres", connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            time.sleep(0.05)
    raise RuntimeError(f"PostgreSQL did not accept connections within {START_TIMEOUT:g}s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # SIGINT is PostgreSQL's fast shutdown (what `pg_ctl stop -m fast` sends); then SIGKILL to
    # the whole process group, which holds only the server we started.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: ``postgres`` under root (initdb and postgres refuse root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as err:
        raise RuntimeError("running as root, and there is no `postgres` user to run PostgreSQL as") from err


def _as_user(user: pwd.struct_passwd | None, args: list[str]) -> list[str]:
    """``args`` run as ``user``, through setpriv rather than Popen(user=...): with a user or group
    to switch to, Python forks instead of vforking, and a fork of a process that runs grpc
    threads can crash in the child before it execs (seen: grpc's "Check failed:
    next_worker->state == KICKED" in the postgres log of a restarted server)."""
    if user is None:
        return args
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *args]


def _as_server_user(user: pwd.struct_passwd | None, args: list[str], cwd: Path, log_path: Path) -> None:
    with open(log_path, "ab") as log:
        done = subprocess.run(
            _as_user(user, args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
            env=_clean_env(), timeout=120, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({done.returncode}):\n{_tail(log_path)}")


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... of the caller must not steer the test server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
