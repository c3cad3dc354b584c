"""``meshid agent`` when no retry can help: the CA refuses its SVID (revoked through the admin
API) or the SVID has expired (the CA's TLS layer refuses it). A real agent process against a
real CA on loopback with its SQLite store, read from its log as an operator would; and, beside
them, a CA that is only down, which the agent keeps retrying as before."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AGENT_RENEW_AT, RunningCa
from meshid import X509Svid
from meshid.ca.client import AdminClient
from support import eventually, stop_process

pytestmark = pytest.mark.timeout(90)
WEB = "spiffe://example.org/ns/prod/sa/web"
#: What the old loop waited at most between two refused renewals of a 30 s SVID: a quarter of it.
OLD_CAP = 7.5
#: The shortest wait after a refusal: half of the first 30 s (its random part takes up to half).
REFUSED_FLOOR = 15.0


class _Agent:
    """``meshid agent --out DIR --write-crl`` (its CRL fetched every half second), its stderr in a file."""

    def __init__(self, ca: RunningCa, folder: Path, token: str) -> None:
        self.out, self.log = folder / "out", folder / f"agent-{time.monotonic_ns()}.log"
        token_file = folder / "token"
        token_file.write_text(token)
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "meshid.cli", "agent", "--server", ca.address,
                    "--bundle", str(ca.bundle_file), "--join-token-file", str(token_file), "--out", str(self.out),
                    "--renew-at", AGENT_RENEW_AT, "--write-crl", "--crl-refresh", "0.5",
                ],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready.startswith("agent: "):
            self.stop()
            pytest.fail(f"the agent did not start: {ready!r}\n{self.log.read_text()}")

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def svid(self) -> X509Svid:
        return X509Svid.load(self.out / "svid.pem", self.out / "svid.key")

    def stop(self) -> int:
        return stop_process(self.proc)[0]


def _waits(line: str) -> float:
    found = re.search(r"(?:asking|retrying) again in ([0-9.]+)s|retrying in ([0-9.]+)s", line)
    assert found is not None, line
    return float(found.group(1) or found.group(2))


def _refused_renewals(agent: _Agent) -> list[str]:
    return [line for line in agent.lines() if "svid renew" in line and "revoked" in line and "attesting" not in line]


def _revoke(ca: RunningCa) -> None:
    with AdminClient(ca.address, ca.folder) as admin:
        assert admin.revoke(spiffe_id=WEB)


def test_a_revoked_svid_is_an_error_that_says_to_re_attest_and_is_asked_again_minutes_later(
    running_ca, tmp_path
) -> None:
    agent = _Agent(running_ca, tmp_path, running_ca.enroll(WEB, datetime.timedelta(seconds=30)))
    try:
        _revoke(running_ca)
        first = eventually(lambda: _refused_renewals(agent), 20, "the agent's renewal to be refused")[0]  # type: ignore[index]
        assert " ERROR " in first and "re-attest with a new join token" in first, first
        assert f"meshid token create --spiffe-id {WEB}" in first, first
        assert _waits(first) >= REFUSED_FLOOR > OLD_CAP, first
        time.sleep(2 * OLD_CAP / 4)  # the old loop asked again within a quarter of its cap
        assert len(_refused_renewals(agent)) == 1, "\n".join(_refused_renewals(agent))
        assert agent.proc.poll() is None  # still serving its files; the log is the news
    finally:
        agent.stop()


def test_a_new_join_token_given_to_a_restart_re_attests_the_agent_whose_saved_svid_is_revoked(
    running_ca, tmp_path
) -> None:
    agent = _Agent(running_ca, tmp_path, running_ca.enroll(WEB, datetime.timedelta(seconds=30)))
    try:
        _revoke(running_ca)
        eventually(lambda: _refused_renewals(agent), 20, "the agent's renewal to be refused")
        revoked = agent.svid().serial
    finally:
        assert agent.stop() == 0
    with AdminClient(running_ca.address, running_ca.folder) as admin:
        token = str(admin.create_token(WEB).token)
    # The saved SVID is still in time, so the restart reuses it; the CA refuses it, and the agent
    # spends the new token then.
    again = _Agent(running_ca, tmp_path, token)
    try:
        eventually(lambda: again.svid().serial != revoked, 20, "the agent to attest again with the new token")
        assert any("attested again with the join token" in line for line in again.lines()), again.log.read_text()
    finally:
        again.stop()


def test_an_expired_svid_is_reported_as_expired_not_as_an_unreachable_ca_while_an_outage_is_retried(
    running_ca, tmp_path
) -> None:
    lifetime = 8.0
    agent = _Agent(running_ca, tmp_path, running_ca.enroll(WEB, datetime.timedelta(seconds=lifetime)))
    try:
        running_ca.stop()

        def outage_retries() -> list[str]:
            return [line for line in agent.lines() if "WARNING issuer source: renewal failed" in line]

        # Down, the SVID still good: retried as before, seconds apart (at most a quarter of the lifetime).
        retries = eventually(lambda: len(outage_retries()) >= 2 and outage_retries(), 20, "two renewal retries")
        assert all("cannot reach the CA" in line and _waits(line) <= lifetime / 4 for line in retries), retries  # type: ignore[union-attr]
        not_after = agent.svid().not_after
        eventually(lambda: datetime.datetime.now(datetime.UTC) > not_after, 2 * lifetime, "the SVID to expire")
        seen = len(agent.lines())
        running_ca.restart()  # up again, and refusing the expired SVID in its TLS handshake

        def crl_after_restart() -> list[str]:
            return [line for line in agent.lines()[seen:] if "agent CRL file" in line]

        eventually(lambda: len(crl_after_restart()) >= 2, 20, "two CRL fetches after the CA came back")
        for line in crl_after_restart():
            assert "EXPIRED at" in line and "re-attest with a new join token" in line, line
            assert "cannot reach the CA" not in line, line
        # The renewal retried within a quarter of the lifetime says so too, and waits minutes from then.
        expired = eventually(
            lambda: [line for line in agent.lines() if "ERROR issuer source: renewal: the SVID of" in line],
            lifetime,
            "the renewal to report the expired SVID",
        )[0]  # type: ignore[index]
        assert "EXPIRED at" in expired and "re-attest with a new join token" in expired, expired
        assert _waits(expired) >= REFUSED_FLOOR, expired
    finally:
        agent.stop()
