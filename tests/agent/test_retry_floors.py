"""Loops that must not spin on an odd answer: every retry, reconnect and re-attestation waits.

Each test holds an input steady that once turned a loop into a busy one (an SVID expired by the
local clock on arrival, a stream that ends after one answer) and counts what the loop does."""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from conftest import CLOCKED_LIFETIME
from meshid.agent import NodeAgent
from meshid.ca import Authority
from meshid.clock import ManualClock
from nodeagents import AgentCa, host_certificate, pem_file

pytestmark = pytest.mark.timeout(60)


def test_an_agent_svid_expired_by_the_local_clock_is_not_attested_again_in_a_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's clock runs 70 s ahead of the CA's (real time), so the agent's 40 s SVID arrives
    expired by it, and an agent that can attest again (x509pop) must. It attests once more at the
    most every half second of its clock (which this test holds still), not as fast as the CA
    answers, forever."""
    hosts = Authority.create_root("hosts.example")
    ca = AgentCa(tmp_path / "ca", hosts=hosts, max_ttl=CLOCKED_LIFETIME)  # the CA on real time
    cert, key = host_certificate(hosts, "node-1")
    pem_file(tmp_path / "host.pem", cert)
    (tmp_path / "host.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    clock = ManualClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=70))
    agent = NodeAgent(
        ca.address,
        ca.bundle_file,
        tmp_path / "agent",
        x509pop_cert=tmp_path / "host.pem",
        x509pop_key=tmp_path / "host.key",
        clock=clock,
    )
    caplog.set_level(logging.INFO, logger="meshid.agent")
    try:
        with agent:
            assert agent.state.expires_at is not None and agent.state.expires_at < clock.now()
            time.sleep(1.0)  # real time; the agent's clock does not move
    finally:
        ca.stop()
    attested = [r for r in caplog.records if "attested as" in r.getMessage()]
    assert len(attested) <= 2, f"{len(attested)} attestations in one second with the agent's clock held still"
