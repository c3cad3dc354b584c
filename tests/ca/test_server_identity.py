"""When a call meshid makes to its CA reaches a server that cannot prove it is that CA (issue
#13): the error says which SPIFFE ID was expected and what the server presented, instead of
grpc's ``Hostname Verification Check failed`` or "cannot reach the CA ... is it running?"."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshid
from agent.conftest import RunningCa
from meshid.ca.client import fetch_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from support import SERVER_ID, sync_server

pytestmark = pytest.mark.timeout(120)
WORKLOAD = "spiffe://example.org/ns/prod/sa/lost"
OUR_CA = "spiffe://example.org/meshid/ca"


@pytest.fixture
def running_ca(tmp_path: Path) -> Iterator[RunningCa]:
    """Our CA (trust domain example.org), that a test can stop."""
    ours = RunningCa(tmp_path / "ca")
    try:
        yield ours
    finally:
        ours.stop()


@pytest.fixture
def other_td_ca(tmp_path: Path) -> Iterator[str]:
    """A real meshid CA of trust domain other.org; yields its address."""
    init_data_dir(tmp_path / "other-ca", "other.org", max_ttl=datetime.timedelta(hours=1))
    server = CaServer(tmp_path / "other-ca", "127.0.0.1:0")
    port = server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _svid_fetch(server: str, bundle: Path, token: str, out: Path) -> subprocess.CompletedProcess[str]:
    token_file = out.parent / "token"
    token_file.write_text(token)
    command = [sys.executable, "-m", "meshid.cli", "svid", "fetch", "--server", server, "--bundle", str(bundle)]
    command += ["--join-token-file", str(token_file), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_ca_of_another_trust_domain_is_named(running_ca, other_td_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    with pytest.raises(meshid.RemoteError) as err:
        fetch_svid(other_td_ca, running_ca.bundle_file, token)
    assert err.value.code == "UNAVAILABLE"
    assert str(err.value).startswith(
        f"svid fetch: UNAVAILABLE: the CA's identity was not proven: the server at {other_td_ca} presents "
        f"spiffe://other.org/meshid/ca, of trust domain other.org, so it cannot prove it is {OUR_CA}: it is the "
        "CA of another trust domain (or a workload of one), or the bundle given is not trust domain example.org's "
        "(grpc: failed to connect to all addresses"
    ), str(err.value)


def test_another_server_of_the_trust_domain_is_named(running_ca, ca, bundles, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    greeter = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)
    with sync_server(greeter, None) as port:
        with pytest.raises(meshid.RemoteError) as err:
            fetch_svid(f"127.0.0.1:{port}", running_ca.bundle_file, token)
    assert f"presents {SERVER_ID}, not {OUR_CA}: it is another server of trust domain example.org" in str(err.value)


def test_nothing_listening_is_still_unreachable(running_ca) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    address = running_ca.address
    running_ca.stop()
    with pytest.raises(meshid.RemoteError) as err:
        fetch_svid(address, running_ca.bundle_file, token)
    assert f"cannot reach the CA at {address} (is it running" in str(err.value)


def test_the_cli_says_which_id_the_server_failed_to_prove(running_ca, other_td_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    out = _svid_fetch(other_td_ca, running_ca.bundle_file, token, tmp_path / "svid")
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert "presents spiffe://other.org/meshid/ca" in lines[0] and f"cannot prove it is {OUR_CA}" in lines[0]


def test_an_issuer_source_renewing_against_another_trust_domain_s_ca_says_so(
    running_ca: RunningCa, other_td_ca, tmp_path, caplog
) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    source = meshid.IssuerSource([other_td_ca], running_ca.bundle_file, join_token=token, wait=0)
    with pytest.raises(meshid.RemoteError) as err:
        source.start()
    assert "presents spiffe://other.org/meshid/ca" in str(err.value)
    assert f"cannot prove it is {OUR_CA}" in str(err.value)
