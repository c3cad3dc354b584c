"""The first issuance of an agent or IssuerSource started before its CA (issue #13): it retries
with the renewals' capped backoff until a CA answers or ``wait`` runs out; a refusal ends it."""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import meshid
from agent.conftest import RunningCa, step
from meshid.ca.client import fetch_svid
from support import eventually

pytestmark = pytest.mark.timeout(120)
WORKLOAD = "spiffe://example.org/ns/prod/sa/early"
LIFETIME = datetime.timedelta(minutes=10)


def _agent(ca: RunningCa, folder: Path, token: str, *extra: str) -> tuple[subprocess.Popen[str], Path, Path]:
    out, err = folder / "agent.out", folder / "agent.err"
    token_file = folder / "token"
    token_file.write_text(token)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshid.cli",
            "agent",
            "--server",
            ca.address,
            "--bundle",
            str(ca.bundle_file),
            "--out",
            str(folder / "svid"),
            "--join-token-file",
            str(token_file),
            *extra,
        ],
        stdout=out.open("w"),
        stderr=err.open("w"),
        text=True,
    )
    return proc, out, err


def _end(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_an_agent_started_before_its_ca_gets_its_svid_once_the_ca_is_up(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, LIFETIME)
    running_ca.stop()
    agent, out, err = _agent(running_ca, tmp_path, token)
    try:
        eventually(lambda: "first issuance failed" in err.read_text(), 30, "the agent to report the CA unreachable")
        assert agent.poll() is None, err.read_text()  # still trying, not crashed
        eventually(lambda: err.read_text().count("retrying in") >= 2, 30, "a second attempt")
        running_ca.restart()
        eventually(lambda: out.read_text().startswith(f"agent: {WORKLOAD}"), 60, "the agent to get its SVID")
    finally:
        code = _end(agent)
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text()
    assert meshid.FileSource(*(tmp_path / "svid" / n for n in ("svid.pem", "svid.key", "bundle.pem"))).get_svid()


def test_an_agent_with_a_used_token_exits_at_once_with_one_line(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, LIFETIME)
    fetch_svid(running_ca.address, running_ca.bundle_file, token)  # the token is spent
    agent, _out, err = _agent(running_ca, tmp_path, token)
    try:
        assert agent.wait(timeout=60) == 2
    finally:
        _end(agent)
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("meshid: agent: issuer source: first issuance refused: svid fetch: "), lines[0]
    assert "Traceback" not in lines[0]


def test_an_agent_with_wait_and_no_ca_ends_with_the_unreachable_exit_code(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, LIFETIME)
    running_ca.stop()
    agent, _out, err = _agent(running_ca, tmp_path, token, "--wait", "2s")
    try:
        assert agent.wait(timeout=60) == 3
    finally:
        _end(agent)
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith("meshid: agent: issuer source: first issuance: no CA answered within 2s: "), last
    assert "Traceback" not in err.read_text()


def test_the_first_issuance_backs_off_as_renewals_do_until_the_ca_is_up(clocked_ca, clock) -> None:
    token = clocked_ca.enroll(WORKLOAD, datetime.timedelta(seconds=40))
    clocked_ca.stop()
    source = meshid.IssuerSource(clocked_ca.address, clocked_ca.bundle_file, join_token=token, clock=clock)
    started: list[object] = []
    starter = threading.Thread(target=lambda: started.append(source.start()), name="test-start")
    starter.start()
    try:
        waits = []
        while len(waits) < 5:
            waits.append(step(clock))
        assert source.state.failures >= 5 and "UNAVAILABLE" in (source.state.last_error or "")
        # capped exponential: from 0.05 s doubling (each delay jittered to 50-100 %)
        assert all(0.025 <= w <= 30 for w in waits), waits
        assert waits[-1] > waits[0], waits
        clocked_ca.restart()
        while not started:
            step(clock)
        assert str(source.get_svid().spiffe_id) == WORKLOAD
    finally:
        source.close()
        starter.join(30)


def test_close_ends_a_first_issuance_waiting_for_the_ca(clocked_ca, clock) -> None:
    token = clocked_ca.enroll(WORKLOAD, datetime.timedelta(seconds=40))
    clocked_ca.stop()
    source = meshid.IssuerSource(clocked_ca.address, clocked_ca.bundle_file, join_token=token, clock=clock)
    failures: list[BaseException] = []

    def start() -> None:
        try:
            source.start()
        except meshid.MeshIdError as err:
            failures.append(err)

    starter = threading.Thread(target=start, name="test-start")
    starter.start()
    try:
        step(clock)
    finally:
        source.close()
        starter.join(30)
    assert [str(f) for f in failures] == ["issuer source: closed while waiting for the CA for the first issuance"]


def test_an_issuer_source_with_wait_raises_the_unreachable_error(clocked_ca, clock) -> None:
    token = clocked_ca.enroll(WORKLOAD, datetime.timedelta(seconds=40))
    clocked_ca.stop()
    source = meshid.IssuerSource(clocked_ca.address, clocked_ca.bundle_file, join_token=token, clock=clock, wait=1.0)
    failures: list[meshid.RemoteError] = []

    def start() -> None:
        try:
            source.start()
        except meshid.RemoteError as err:
            failures.append(err)

    def asleep_or_done() -> bool:
        if not starter.is_alive():
            return True
        try:
            clock.settle(waiters=1, timeout=0.05)
        except TimeoutError:
            return False
        return True

    starter = threading.Thread(target=start, name="test-start")
    starter.start()
    try:
        while True:
            eventually(asleep_or_done, 30, "start() to wait for its next attempt, or to give up")
            if not starter.is_alive():
                break
            clock.advance_to_next_wakeup(waiters=1, timeout=30)
    finally:
        starter.join(30)
        source.close()
    (failure,) = failures
    assert failure.code == "UNAVAILABLE"
    assert str(failure).startswith("issuer source: first issuance: no CA answered within 1s: svid fetch: UNAVAILABLE")
