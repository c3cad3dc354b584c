"""Tell a program that reads the SVID files (nginx, envoy, haproxy) that new ones are in place.

:class:`ReloadHook` runs a command (``meshid agent --exec "nginx -s reload"``) and/or sends a
signal to the process whose ID is in a file (``--signal HUP --pid-file /run/nginx.pid``), as
spiffe-helper's ``cmd`` and ``renew_signal`` do. Its :meth:`~ReloadHook.changed` is a source
subscriber: the agent calls it after each new set of files is written, in its renewal thread,
so it only wakes the hook's own thread and returns. That thread runs the command with a timeout
(then kills it); changes that come while it runs are folded into one more run. A failure (exit
status, timeout, no such process, an unreadable pid file) is logged and counted
(``meshid_agent_reload_total{result}``) and never holds renewal back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshid._background import Worker

__all__ = ["ReloadHook", "ReloadStats", "parse_signal"]

log = logging.getLogger("meshid.agent")

#: The longest a pid file may be (a pid is at most 7 digits on Linux).
_MAX_PID_FILE = 64
#: How much of the end of a command's stderr is kept: its last line goes into the failure.
_STDERR_TAIL = 4096
#: How long :meth:`ReloadHook.close` lets a running command end after SIGTERM before SIGKILL.
STOP_GRACE = 5.0


def parse_signal(text: str) -> signal.Signals:
    """``HUP``, ``SIGHUP`` or ``1`` as a signal.

    Raises:
        ValueError: not a signal's name or number.
    """
    name = text.strip().upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError) as err:
        raise ValueError(f"reload: {text[:40]!r} is not a signal; write e.g. HUP, USR1 or 1") from err


@dataclass(frozen=True, slots=True)
class ReloadStats:
    """How the hook has done: runs that succeeded, runs that failed, and the last failure."""

    ok: int = 0
    failed: int = 0
    last_error: str | None = None


class ReloadHook:
    """Runs ``command`` and/or signals the process in ``pid_file`` after each change.

    Raises:
        ValueError: nothing to do, a signal without a pid file (or the reverse), an empty
            command, or a timeout that is not positive.
    """

    def __init__(
        self,
        *,
        command: str | Sequence[str] | None = None,
        signal_to_send: signal.Signals | None = None,
        pid_file: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if (signal_to_send is None) != (pid_file is None):
            raise ValueError("reload: --signal and --pid-file go together (which signal, to which process)")
        if command is None and signal_to_send is None:
            raise ValueError("reload: give a command to run, or a signal and a pid file")
        argv = shlex.split(command) if isinstance(command, str) else list(command or ())
        if command is not None and not argv:
            raise ValueError("reload: the command is empty")
        if not timeout > 0:
            raise ValueError("reload: the timeout must be positive")
        self._argv = argv
        self._signal = signal_to_send
        self._pid_file = pathlib.Path(pid_file) if pid_file is not None else None
        self._timeout = timeout
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stats = ReloadStats()
        self._closing = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None  # the command now running, for close()
        self._worker = Worker("meshid-reload", self._run, wake=self._wake.set)

    @property
    def stats(self) -> ReloadStats:
        return self._stats

    def start(self) -> ReloadHook:
        self._closing.clear()
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop; a command still running is stopped too (SIGTERM, then SIGKILL after
        :data:`STOP_GRACE` seconds), so an agent told to stop does not wait out its timeout."""
        with self._lock:
            self._closing.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._worker.close()

    def __enter__(self) -> ReloadHook:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def changed(self) -> None:
        """New files are in place: reload soon (a source subscriber; returns at once)."""
        self._wake.set()

    def _run(self, stop: threading.Event) -> None:
        while True:
            self._wake.wait()
            if stop.is_set():
                return
            self._wake.clear()  # a change from now on is one more run
            self._reload_once()

    def _reload_once(self) -> None:
        from meshid.metrics import AGENT_RELOADS

        error = None
        try:
            if self._signal is not None:
                self._send_signal()
            if self._argv:
                self._run_command()
        except _ReloadFailed as err:
            error = str(err)
        if error is not None and self._closing.is_set():  # stopped by close(): not the command's failure
            log.info("agent: reload hook: the running command was stopped with the agent (%s)", error)
            return
        with self._lock:
            ok, failed = self._stats.ok, self._stats.failed
            if error is None:
                self._stats = ReloadStats(ok + 1, failed, self._stats.last_error)
            else:
                self._stats = ReloadStats(ok, failed + 1, error)
        AGENT_RELOADS.labels("ok" if error is None else "error").inc()
        if error is None:
            log.info("agent: reload hook ran after new SVID files")
        else:
            log.error("agent: reload hook failed: %s (the SVID files are in place; renewal goes on)", error)

    def _send_signal(self) -> None:
        assert self._pid_file is not None and self._signal is not None
        try:
            with self._pid_file.open("rb") as f:
                text = f.read(_MAX_PID_FILE + 1)
        except OSError as err:
            raise _ReloadFailed(f"cannot read the pid file {self._pid_file}: {err.strerror}") from err
        pid_text = text.decode("ascii", "replace").strip()
        if len(text) > _MAX_PID_FILE or not pid_text.isdigit() or int(pid_text) <= 1:
            raise _ReloadFailed(f"the pid file {self._pid_file} holds no process ID")
        try:
            os.kill(int(pid_text), self._signal)
        except OSError as err:
            raise _ReloadFailed(f"cannot send {self._signal.name} to process {pid_text}: {err.strerror}") from err

    def _run_command(self) -> None:
        # Its stdout is not read and of its stderr only the tail is kept: a command that prints
        # hundreds of megabytes (a runaway loop, a debug flag) must not grow the agent with it.
        deadline = time.monotonic() + self._timeout
        try:
            proc = subprocess.Popen(
                self._argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as err:
            raise _ReloadFailed(f"cannot run {self._argv[0]}: {err.strerror}") from err
        with self._lock:
            self._proc = proc
            closing = self._closing.is_set()
        if closing:  # close() came while it started: it saw no command to stop
            proc.kill()
        try:
            self._finish(proc, deadline)
        finally:
            with self._lock:
                self._proc = None

    def _finish(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        with proc:
            assert proc.stderr is not None
            tail = _read_tail(proc.stderr.fileno(), deadline)
            returncode = None
            if tail is not None:  # its stderr has ended; it may still run a moment
                with contextlib.suppress(subprocess.TimeoutExpired):
                    returncode = proc.wait(max(0.0, deadline - time.monotonic()))
            if tail is None or returncode is None:
                proc.kill()
                proc.wait()
                raise _ReloadFailed(f"{self._argv[0]} did not finish within {self._timeout:g} s; killed")
        if returncode != 0:
            said = tail.decode("utf-8", "replace").strip().splitlines()
            last = f": {said[-1][:200]}" if said else ""
            raise _ReloadFailed(f"{self._argv[0]} exited with status {returncode}{last}")


def _read_tail(fd: int, deadline: float) -> bytes | None:
    """What ``fd`` gives until its end, as its last :data:`_STDERR_TAIL` bytes; None if
    ``deadline`` (monotonic) comes first."""
    tail = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return tail
            tail = (tail + chunk)[-_STDERR_TAIL:]


class _ReloadFailed(Exception):
    """One run of the hook failed; logged and counted, never raised out of the hook."""
