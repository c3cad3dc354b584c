"""`meshid agent` as a real process: writes files, renews them, survives a restart, stops on SIGTERM."""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys

import pytest

import meshid
from support import eventually, stop_process

pytestmark = pytest.mark.timeout(90)
WORKLOAD = "spiffe://example.org/ns/prod/sa/batch"
#: A process on the real clock: 20 s SVIDs renewed after 2 to 12 % of their lifetime (the
#: agent's jitter is a fixed 0.1 and --renew-at must exceed it), so every renewal has more than
#: 17 s to spare on a loaded machine.
LIFETIME = datetime.timedelta(seconds=20)
RENEW_AT = "0.12"


def _agent(running_ca, out, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshid.cli",
            "agent",
            "--server",
            running_ca.address,
            "--bundle",
            str(running_ca.bundle_file),
            "--out",
            str(out),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _serial(out) -> int:
    """The serial of the SVID in ``out``, read as one version: svid.pem and svid.key switch
    together, but a reader opening one after the other can straddle a renewal, so the
    certificate is read again after the key, and all three again if it changed meanwhile
    (or if the version being read was removed under the reader)."""
    for _ in range(100):
        try:
            chain = (out / "svid.pem").read_bytes()
            key = (out / "svid.key").read_bytes()
            again = (out / "svid.pem").read_bytes()
        except FileNotFoundError:
            continue
        if again == chain:
            return meshid.X509Svid.from_pem(chain, key).serial  # a pair that does not match fails here
    raise AssertionError(f"no stable read of the SVID in {out} in 100 tries")


def test_agent_writes_renews_restarts_and_stops_cleanly(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, LIFETIME)
    out = tmp_path / "svid"
    agent = _agent(running_ca, out, "--join-token", token, "--renew-at", RENEW_AT)
    try:
        assert agent.stdout is not None
        ready = agent.stdout.readline()
        assert ready.startswith(f"agent: {WORKLOAD}"), ready + (agent.stderr.read() if agent.poll() is not None else "")
        assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
        seen = {_serial(out)}

        def renewed_twice() -> bool:
            seen.add(_serial(out))  # every version on disk is a whole, matching pair
            return len(seen) >= 3

        eventually(renewed_twice, 30, "the agent to renew the files twice")
    finally:
        code, _, err = stop_process(agent)
    assert code == 0, err
    assert "Traceback" not in err

    # Restarted without a token, it reuses the still-valid SVID, then renews it.
    before = _serial(out)
    again = _agent(running_ca, out)
    try:
        assert again.stdout is not None
        line = again.stdout.readline()
        assert f"serial {before:x}" in line, line
    finally:
        code, _, err = stop_process(again)
    assert code == 0, err
    assert "reusing the saved SVID" in err


def test_agent_without_token_or_saved_svid_fails_with_one_line(running_ca, tmp_path) -> None:
    proc = _agent(running_ca, tmp_path / "empty")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "no reusable SVID and no join token" in err
    assert "Traceback" not in err


def test_join_token_can_come_from_a_file_or_the_environment(running_ca, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(
        running_ca.enroll("spiffe://example.org/ns/prod/sa/from-file", datetime.timedelta(minutes=5)) + "\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshid.cli",
            "svid",
            "fetch",
            "--server",
            running_ca.address,
            "--bundle",
            str(running_ca.bundle_file),
            "--join-token-file",
            str(token_file),
            "--out",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    env = {
        **os.environ,
        "MESHID_JOIN_TOKEN": running_ca.enroll(
            "spiffe://example.org/ns/prod/sa/from-env", datetime.timedelta(minutes=5)
        ),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshid.cli",
            "svid",
            "fetch",
            "--server",
            running_ca.address,
            "--bundle",
            str(running_ca.bundle_file),
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert meshid.X509Svid.load(
        tmp_path / "b" / "svid.pem", tmp_path / "b" / "svid.key"
    ).spiffe_id == meshid.SpiffeId.parse("spiffe://example.org/ns/prod/sa/from-env")
