"""Stopping an agent or a CA: from a signal that lands on any of the process's threads, and from a
thread of its own while the main thread is still starting it or stopping it too.

CI once saw `meshid agent` print a traceback from its signal thread: SIGTERM came while the main
thread was still starting the renewal thread (the test stops it as soon as its files exist), and
closing it joined a thread not yet started.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest

from meshid._background import Worker
from meshid.agent import IssuerSource
from meshid.errors import SourceError
from support import run_cli, signal_another_thread, stop_process

pytestmark = pytest.mark.timeout(90)
WORKLOAD = "spiffe://example.org/ns/prod/sa/batch"
TTL = datetime.timedelta(minutes=10)


def test_worker_start_and_close_from_two_threads_at_once_never_fail() -> None:
    """Start racing a close, and two closes racing each other, 400 times each. The switch interval
    is shortened so the threads interleave between any two bytecodes: before the fix, about one
    start in four raced a close into "cannot join thread before it is started"."""
    errors: list[BaseException] = []

    def close_at(worker: Worker, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            worker.close()
        except BaseException as err:  # the test collects whatever a close raises
            errors.append(err)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(400):
            worker = Worker("meshid-test-race", lambda stop: stop.wait())
            barrier = threading.Barrier(2)
            closer = threading.Thread(target=close_at, args=(worker, barrier))
            closer.start()
            barrier.wait()
            worker.start()
            closer.join()
            worker.close()  # whichever came first, nothing runs after this

            worker = Worker("meshid-test-race", lambda stop: stop.wait())
            worker.start()
            barrier = threading.Barrier(3)
            closers = [threading.Thread(target=close_at, args=(worker, barrier)) for _ in range(2)]
            for thread in closers:
                thread.start()
            barrier.wait()
            worker.close()
            for thread in closers:
                thread.join()
            assert not worker.running
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert not [t for t in threading.enumerate() if t.name == "meshid-test-race"]


def test_a_worker_start_after_its_owner_began_closing_starts_nothing() -> None:
    closing = threading.Event()
    worker = Worker("meshid-test-unless", lambda stop: stop.wait())
    closing.set()
    assert worker.start(unless=closing) is False
    assert not worker.running
    closing.clear()
    assert worker.start(unless=closing) is True
    worker.close()


def test_an_issuer_source_closed_by_another_thread_while_it_starts_raises_and_runs_nothing(running_ca) -> None:
    """The close lands after the first SVID is installed (its subscribers are told) and before
    the renewal thread starts: start() says so, and no renewal thread is left running."""
    source = IssuerSource(running_ca.address, running_ca.bundle_file, join_token=running_ca.enroll(WORKLOAD, TTL))
    closed = threading.Event()

    def close_from_another_thread() -> None:
        if not closed.is_set():
            closer = threading.Thread(target=source.close)
            closer.start()
            closer.join(30)
            closed.set()

    source.subscribe(close_from_another_thread)
    with pytest.raises(SourceError, match="closed while it started"):
        source.start()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "meshid-issuer-source"]
    source.close()  # a second close is harmless


def _start_ca_serve(folder: pathlib.Path) -> subprocess.Popen[str]:
    made = run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", "example.org")
    assert made.returncode == 0, made.stderr
    return subprocess.Popen(
        [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(folder), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
    )  # fmt: skip


def _start_agent(running_ca, out: pathlib.Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MESHID_JOIN_TOKEN": running_ca.enroll(WORKLOAD, TTL), "GRPC_VERBOSITY": "ERROR"}
    return subprocess.Popen(
        [sys.executable, "-m", "meshid.cli", "agent", "--server", running_ca.address, "--bundle",
         str(running_ca.bundle_file), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("program", ["ca serve", "agent"])
def test_sigterm_delivered_to_a_thread_other_than_the_main_one_stops_the_process(
    program: str, running_ca, tmp_path: pathlib.Path
) -> None:
    """The kernel gives a process-directed signal to any thread that does not block it; this sends
    it to a grpc or meshid thread on purpose (tgkill), while the main thread sleeps in its untimed
    wait. Before the wakeup pipe, the Python handler never ran and the process never stopped."""
    if program == "ca serve":
        proc, ready_prefix, stopped = _start_ca_serve(tmp_path / "served-ca"), "CA serving on", "CA stopped"
    else:
        proc, ready_prefix, stopped = _start_agent(running_ca, tmp_path / "out"), "agent: ", "agent: stopped"
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith(ready_prefix), ready
        signal_another_thread(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        code, _, rest = stop_process(proc, timeout=5)
    assert code == 0, err + rest
    assert stopped in out
    assert "Traceback" not in err
