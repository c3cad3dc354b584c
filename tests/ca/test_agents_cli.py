"""The operators' commands for node agents (issue #12), each a real ``meshid`` process against a
CA on loopback: ``entry create --parent-id --selector``, ``entry list``, ``token create --agent``,
``agent list``, ``agent evict``, ``ca init --agent-ca --agent-id-template``; exit codes and
one-line errors. (Named apart from tests/agent/test_agent_cli.py, the sidecar's: pytest imports
test files without packages by their base name.)"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from meshid.ca import Authority
from meshid.ca.client import attest_agent_with_token, attest_agent_with_x509pop
from meshid.ca.server import CaServer
from nodeagents import TD, AgentCa, agent_id, host_certificate, pem_file
from support import assert_refused, run_cli

pytestmark = pytest.mark.timeout(120)

WEB = f"spiffe://{TD}/ns/prod/sa/web"


def assert_usage_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """argparse's refusal: exit code 2 and one line, ``meshid: <message> (see `meshid ... --help`)``."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"meshid: {message} (see `meshid "), result.stderr
    assert line.endswith(" --help`)"), result.stderr


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path_factory.mktemp("cli") / "ca")
    try:
        yield running
    finally:
        running.stop()


def admin_args(ca: AgentCa) -> tuple[str, ...]:
    return ("--server", ca.address, "--data-dir", str(ca.folder))


# --- entries with a parent -------------------------------------------------------------------------


def test_entry_create_with_parent_and_selectors_and_entry_list(ca: AgentCa) -> None:
    created = run_cli(
        "entry", "create", *admin_args(ca), "--spiffe-id", WEB, "--parent-id", agent_id("node-1"),
        "--selector", "unix:uid:1001", "--selector", "unix:path:/usr/bin/web",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == (
        f"created {WEB} (ttl 3600s, parent {agent_id('node-1')}, selectors unix:uid:1001 unix:path:/usr/bin/web)"
    )
    listed = run_cli("entry", "list", *admin_args(ca))
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(WEB + " ")]
    assert line.endswith(f'parent={agent_id("node-1")}  selectors=["unix:uid:1001", "unix:path:/usr/bin/web"]')
    rows = {r["spiffe_id"]: r for r in json.loads(run_cli("entry", "list", *admin_args(ca), "--json").stdout)}
    assert rows[WEB]["parent_id"] == agent_id("node-1")
    assert rows[WEB]["selectors"] == ["unix:uid:1001", "unix:path:/usr/bin/web"]
    assert rows[f"spiffe://{TD}/meshid/admin"]["parent_id"] is None


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            ("--parent-id", agent_id("node-1"), "--selector", "unix:uid:abc"),
            ("entry create: INVALID_ARGUMENT: selector 'unix:uid:abc': uid must be",),
        ),
        (
            ("--parent-id", agent_id("node-1"), "--selector", "docker:label:x"),
            ("INVALID_ARGUMENT", "write unix:<kind>:<value>, e.g. unix:uid:1001"),
        ),
        (("--selector", "unix:uid:1"), ("INVALID_ARGUMENT", "selectors need a parent_id")),
        (("--parent-id", agent_id("node-1")), ("INVALID_ARGUMENT", "needs at least one selector")),
        (("--parent-id", WEB, "--selector", "unix:uid:1"), ("INVALID_ARGUMENT", "is not a node agent of this CA")),
    ],
    ids=["bad-uid", "unknown-kind", "selector-without-parent", "parent-without-selector", "parent-not-an-agent"],
)
def test_entry_create_refusals_are_one_line(ca: AgentCa, extra: tuple[str, ...], words: tuple[str, ...]) -> None:
    assert_refused(run_cli("entry", "create", *admin_args(ca), "--spiffe-id", f"{WEB}-refused", *extra), *words)


# --- tokens for node agents ------------------------------------------------------------------------


def test_token_create_for_an_agent_attests_it(ca: AgentCa) -> None:
    created = run_cli("token", "create", *admin_args(ca), "--agent", "node-cli", "--ttl", "5m")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith(f"{TD}:") and "\n" not in token
    issued = attest_agent_with_token(ca.address, ca.roots_pem, token)
    assert str(issued.svid.spiffe_id) == agent_id("node-cli")


def test_token_create_refusals(ca: AgentCa) -> None:
    parented = f"spiffe://{TD}/ns/prod/sa/parented"
    assert (
        run_cli(
            "entry",
            "create",
            *admin_args(ca),
            "--spiffe-id",
            parented,
            "--parent-id",
            agent_id("n"),
            "--selector",
            "unix:uid:1",
        ).returncode
        == 0
    )
    assert_refused(
        run_cli("token", "create", *admin_args(ca), "--spiffe-id", parented),
        "token create: PERMISSION_DENIED", f"is served by node agent {agent_id('n')}",
    )  # fmt: skip
    assert_refused(run_cli("token", "create", *admin_args(ca), "--agent", "two words"), "SPIFFE ID", "path segment")
    assert_usage_error(
        run_cli("token", "create", *admin_args(ca), "--agent", "n", "--spiffe-id", WEB),
        "argument --spiffe-id: not allowed with argument --agent",
    )
    assert_usage_error(
        run_cli("token", "create", *admin_args(ca)), "one of the arguments --spiffe-id --agent is required"
    )


# --- agent list and evict --------------------------------------------------------------------------


def test_agent_list_and_evict(ca: AgentCa, tmp_path: Path) -> None:
    issued = ca.attest("node-list")
    listed = run_cli("agent", "list", *admin_args(ca))
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(agent_id("node-list") + " ")]
    assert f"{agent_id('node-list')}  join_token  last_seen=" in line and "EVICTED" not in line
    assert f"svid_expires={issued.svid.not_after.isoformat()}" in line
    rows = {r["spiffe_id"]: r for r in json.loads(run_cli("agent", "list", *admin_args(ca), "--json").stdout)}
    row = rows[agent_id("node-list")]
    assert (row["attestation"], row["attested_by"], row["evicted"]) == ("join_token", None, False)
    assert row["svid_expires_at"] == issued.svid.not_after.isoformat()

    evicted = run_cli("agent", "evict", agent_id("node-list"), *admin_args(ca))
    assert evicted.returncode == 0, evicted.stderr
    assert evicted.stdout.strip() == f"evicted {agent_id('node-list')}; revoked 1 SVID(s): {issued.svid.serial:x}"
    listed = run_cli("agent", "list", *admin_args(ca))
    (line,) = [ln for ln in listed.stdout.splitlines() if ln.startswith(agent_id("node-list") + " ")]
    assert line.endswith("  EVICTED")
    again = run_cli("agent", "evict", agent_id("node-list"), *admin_args(ca))
    assert again.returncode == 0 and again.stdout.strip() == f"evicted {agent_id('node-list')}; revoked 0 SVID(s)"


def test_agent_evict_refusals(ca: AgentCa) -> None:
    assert_refused(
        run_cli("agent", "evict", agent_id("ghost"), *admin_args(ca)), "agent evict: NOT_FOUND", "never attested"
    )
    assert_refused(
        run_cli("agent", "evict", WEB, *admin_args(ca)), "agent evict: INVALID_ARGUMENT", "is not a node agent"
    )
    assert_usage_error(run_cli("agent", "evict", *admin_args(ca)), "the following arguments are required: ID")
    assert_usage_error(
        run_cli("agent", "list", "--server", ca.address), "the following arguments are required: --data-dir"
    )


def test_the_sidecar_form_of_agent_still_requires_its_options() -> None:
    assert_usage_error(run_cli("agent"), "the following arguments are required: --server, --bundle")
    assert_usage_error(run_cli("agent", "--server", "127.0.0.1:1"), "the following arguments are required: --bundle")
    assert_usage_error(
        run_cli("agent", "frobnicate"),
        "argument {list,evict}: invalid choice: 'frobnicate' (choose from 'list', 'evict')",
    )


# --- ca init for x509pop ---------------------------------------------------------------------------


def test_ca_init_with_an_agent_ca_enables_x509pop(tmp_path: Path) -> None:
    hosts = Authority.create_root("hosts.example")
    bundle = pem_file(tmp_path / "hosts.pem", hosts.certificate)
    data_dir = tmp_path / "ca"
    init = run_cli(
        "ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD,
        "--agent-ca", str(bundle), "--agent-id-template", "host-{cn}",
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert f"x509pop: node agents named host-{{cn}} from host certificates of {bundle}" in init.stdout
    assert json.loads((data_dir / "config.json").read_text())["agent_id_template"] == "host-{cn}"
    assert (data_dir / "agent-ca.pem").read_bytes() == bundle.read_bytes()
    server = CaServer(data_dir, "127.0.0.1:0")
    address = f"127.0.0.1:{server.start()}"
    try:
        cert, key = host_certificate(hosts, "n7")
        issued = attest_agent_with_x509pop(address, (data_dir / "bundle.pem").read_bytes(), TD, [cert], key)
    finally:
        server.stop(grace=None)
    assert str(issued.svid.spiffe_id) == agent_id("host-n7")


def test_ca_init_x509pop_refusals(tmp_path: Path) -> None:
    hosts = Authority.create_root("hosts.example")
    good = pem_file(tmp_path / "hosts.pem", hosts.certificate)
    leaf, _ = host_certificate(hosts, "not-a-ca")
    not_ca = pem_file(tmp_path / "leaf.pem", leaf)
    junk = tmp_path / "junk.pem"
    junk.write_bytes(good.read_bytes() + b"trailing junk\n")
    key_too = tmp_path / "key.pem"
    key_too.write_bytes(good.read_bytes() + b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n")
    cases = [
        (
            ("--agent-ca", str(good), "--agent-id-template", "{hostname}"),
            "unknown field {hostname}; use {cn}, {san_dns}, {serial}, {fingerprint}",
        ),
        (
            ("--agent-ca", str(good), "--agent-id-template", "node"),
            "has no field, so every host would be the same agent",
        ),
        (("--agent-ca", str(good), "--agent-id-template", "a/{cn}"), "'a/' is neither a field in braces nor letters"),
        (("--agent-ca", str(good), "--agent-id-template", "{cn"), "is neither a field in braces"),
        (
            ("--agent-id-template", "{cn}"),
            "--agent-id-template names agents that attest by x509pop; give --agent-ca too",
        ),
        (("--agent-ca", str(not_ca)), "in the agent CA bundle is not a CA"),
        (("--agent-ca", str(junk)), "the agent CA bundle must hold PEM certificates and nothing else"),
        (("--agent-ca", str(key_too)), "holds a 'PRIVATE KEY' block; only certificates belong there"),
        (("--agent-ca", str(tmp_path / "missing.pem")), "cannot read the agent CA bundle"),
    ]
    for i, (extra, message) in enumerate(cases):
        data_dir = tmp_path / f"ca{i}"
        assert_refused(
            run_cli("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD, *extra), "CA init:", message
        )
        assert not (data_dir / "ca.key").exists(), extra  # checked before anything is written


def test_ca_init_refuses_its_own_root_as_the_agent_ca(tmp_path: Path) -> None:
    # A CA under an upstream root that also signs host certificates would let every X509-SVID
    # it issues attest a node.
    root = Authority.create_root("corp.example")
    root_pem = pem_file(tmp_path / "root.pem", root.certificate)
    key_file = tmp_path / "root.key"
    key_file.write_bytes(
        root.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    init = run_cli(
        "ca", "init", "--data-dir", str(tmp_path / "ca"), "--trust-domain", TD,
        "--upstream-cert", str(root_pem), "--upstream-key", str(key_file), "--agent-ca", str(root_pem),
    )  # fmt: skip
    assert_refused(init, "CA init: x509pop: the agent CA bundle holds this CA's own root")
