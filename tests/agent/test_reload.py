"""The agent's reload hook (issue #15): a command and/or a signal after each new set of files,
with a timeout, failures counted, never holding up the caller."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshid.agent.reload import ReloadHook, parse_signal
from support import eventually

pytestmark = pytest.mark.timeout(60)


def test_the_command_runs_after_each_change(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    command = [sys.executable, "-c", f"open({str(marks)!r}, 'a').write('x')"]
    with ReloadHook(command=command) as hook:
        hook.changed()
        eventually(lambda: hook.stats.ok == 1, 20, "the first run")
        hook.changed()
        eventually(lambda: hook.stats.ok == 2, 20, "the second run")
    assert marks.read_text() == "xx"
    assert hook.stats.failed == 0


def test_changed_returns_at_once_and_changes_during_a_run_fold_into_one_more(tmp_path: Path) -> None:
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    waits = (
        "import os, time\n"
        f"open({str(marks)!r}, 'a').write('x')\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
    )
    with ReloadHook(command=[sys.executable, "-c", waits]) as hook:
        hook.changed()
        eventually(lambda: marks.exists(), 20, "the first run to start")
        started = time.monotonic()
        for _ in range(5):
            hook.changed()  # while the first run blocks
        assert time.monotonic() - started < 0.5
        gate.write_text("")
        eventually(lambda: hook.stats.ok == 2, 20, "one more run")
    assert marks.read_text() == "xx"


def test_a_failing_command_is_counted_and_the_hook_goes_on(tmp_path: Path) -> None:
    with ReloadHook(command=[sys.executable, "-c", "import sys; sys.exit('no nginx here')"]) as hook:
        hook.changed()
        eventually(lambda: hook.stats.failed == 1, 20, "the failure")
        assert hook.stats.last_error is not None and "status 1" in hook.stats.last_error
        assert "no nginx here" in hook.stats.last_error
        hook.changed()
        eventually(lambda: hook.stats.failed == 2, 20, "the second failure")


def test_a_command_past_its_timeout_is_killed_and_counted() -> None:
    with ReloadHook(command=[sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5) as hook:
        hook.changed()
        eventually(lambda: hook.stats.failed == 1, 20, "the timeout")
    assert "did not finish within 0.5 s" in str(hook.stats.last_error)


def test_the_signal_reaches_the_process_in_the_pid_file(tmp_path: Path) -> None:
    got = tmp_path / "got"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            f"signal.signal(signal.SIGHUP, lambda *_: (open({str(got)!r}, 'w').write('HUP'), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        (tmp_path / "pid").write_text(f"{child.pid}\n")
        with ReloadHook(signal_to_send=signal.SIGHUP, pid_file=tmp_path / "pid") as hook:
            hook.changed()
            eventually(lambda: hook.stats.ok == 1, 20, "the signal")
        assert child.wait(20) == 0
        assert got.read_text() == "HUP"
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


@pytest.mark.parametrize(
    ("content", "words"), [(None, "cannot read the pid file"), ("nginx\n", "holds no process ID"), ("1", "holds no")]
)
def test_a_missing_or_garbled_pid_file_is_a_counted_failure(tmp_path: Path, content: str | None, words: str) -> None:
    if content is not None:
        (tmp_path / "pid").write_text(content)
    with ReloadHook(signal_to_send=signal.SIGHUP, pid_file=tmp_path / "pid") as hook:
        hook.changed()
        eventually(lambda: hook.stats.failed == 1, 20, "the failure")
    assert words in str(hook.stats.last_error)


def test_bad_hook_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="go together"):
        ReloadHook(signal_to_send=signal.SIGHUP)
    with pytest.raises(ValueError, match="give a command"):
        ReloadHook()
    with pytest.raises(ValueError, match="empty"):
        ReloadHook(command="  ")
    with pytest.raises(ValueError, match="not a signal"):
        parse_signal("HANGUP")
    assert parse_signal("hup") == parse_signal("SIGHUP") == parse_signal("1") == signal.SIGHUP


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["ends-at-sigterm", "ignores-sigterm"])
def test_close_stops_a_running_command_instead_of_waiting_out_its_timeout(
    tmp_path: Path, ignores_sigterm: bool
) -> None:
    """An agent told to stop while its reload command hangs stops within the grace period
    (SIGTERM, then SIGKILL after meshid.agent.reload.STOP_GRACE), not after the command's 30 s
    timeout; the stop is not counted as the command failing."""
    from meshid.agent.reload import STOP_GRACE

    pid_file = tmp_path / "pid"
    hang = (
        "import os, signal, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignores_sigterm else "")
        + f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        + "time.sleep(120)\n"
    )
    hook = ReloadHook(command=[sys.executable, "-c", hang]).start()  # the default timeout: 30 s
    try:
        hook.changed()
        eventually(lambda: pid_file.exists() and pid_file.read_text().isdigit(), 20, "the command to run")
        pid = int(pid_file.read_text())
    finally:
        started = time.monotonic()
        hook.close()
        took = time.monotonic() - started
    assert took < STOP_GRACE + 3 if ignores_sigterm else took < 3, f"close() took {took:.1f} s"
    assert not Path(f"/proc/{pid}").exists(), "the command still runs"
    assert hook.stats.failed == 0 and hook.stats.ok == 0, hook.stats
