"""What a CA logs, and at which level (issue #13): what an operator needs to know (a new
identity issued, an entry, a token, a revocation, an attestation, an eviction, the CA starting
and stopping) at INFO; the routine traffic of running workloads and agents (renewals, batches,
bundle, CRL and entry-sync requests) at DEBUG or not at all. A real CA in process on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshid.ca import generate_key
from meshid.ca.client import (
    batch_new_svids_with_svid,
    get_bundle_with_svid,
    get_crl_with_svid,
    renew_agent_with_svid,
    renew_with_svid,
    sync_entries_with_svid,
)
from nodeagents import TD, AgentCa, agent_id

WEB = f"spiffe://{TD}/ns/prod/sa/web"
API = f"spiffe://{TD}/ns/prod/sa/api"


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path / "ca")
    try:
        yield running
    finally:
        running.stop()


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meshid.ca" and r.levelno == level]


def test_routine_ca_traffic_is_logged_at_debug_and_news_at_info(ca: AgentCa, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "meshid.ca")
    node = ca.attest("node-1")
    with ca.admin() as admin:
        admin.create_entry(WEB, parent_id=agent_id("node-1"), selectors=["unix:uid:1001"])
    api = ca.workload("ns/prod/sa/api")  # an entry, a join token, an issuance
    news = _lines(caplog, logging.INFO)
    caplog.clear()

    # What running workloads and agents do all day.
    for _ in range(2):
        api = renew_with_svid(ca.address, api, ca.bundles).svid
        get_bundle_with_svid(ca.address, api, ca.bundles)
        get_crl_with_svid(ca.address, api, ca.bundles)
        node = renew_agent_with_svid(ca.address, node.svid, ca.bundles)
        sync_entries_with_svid(ca.address, node.svid, ca.bundles)
        batch_new_svids_with_svid(ca.address, node.svid, ca.bundles, [(WEB, generate_key())])

    assert _lines(caplog, logging.INFO) == []
    routine = _lines(caplog, logging.DEBUG)
    assert sum(line.startswith(f"CA: renewed {API} ") for line in routine) == 2
    assert sum(line.startswith(f"CA: renewed node agent {agent_id('node-1')} ") for line in routine) == 2
    assert sum("got 1 of 1 SVID(s) asked for in a batch" in line for line in routine) == 2

    # What an operator wants to read stays at INFO.
    assert any(line.startswith(f"CA: node agent {agent_id('node-1')} attested by join_token") for line in news), news
    assert any(f"registered {WEB}" in line for line in news)
    assert any(f"created a join token for {API}" in line for line in news)
    assert any(line.startswith(f"CA: issued {API} ") and "for a join token" in line for line in news)
    with ca.admin() as admin:
        admin.revoke(spiffe_id=API)
        admin.evict_agent(agent_id("node-1"))
    ca.stop()
    after = _lines(caplog, logging.INFO)
    assert any("revoked" in line for line in after) and any("evicted node agent" in line for line in after)
    # Start and stop are DEBUG: `meshid ca serve` says both on stdout, once.
    assert _lines(caplog, logging.DEBUG)[-1] == f"CA: stopped serving trust domain {TD} on {ca.address}"
