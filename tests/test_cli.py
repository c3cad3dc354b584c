"""The CLI as real processes: exit codes, output, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meshid import TrustBundle
from meshid.ca import Authority


def meshid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshid.cli", *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    ca = Authority.create_root("example.org")
    svid = ca.issue_svid("spiffe://example.org/ns/prod/sa/frontend", dns_names=["frontend.local"])
    (folder / "svid.pem").write_bytes(svid.chain_pem())
    (folder / "bundle.pem").write_bytes(TrustBundle(ca.trust_domain, ca.roots).to_pem())
    other = Authority.create_root("example.org").issue_svid("spiffe://example.org/ns/prod/sa/frontend")
    (folder / "foreign.pem").write_bytes(other.chain_pem())
    (folder / "policy.yaml").write_text(
        "name: greeter\n"
        "deny:\n  - name: no-dev\n    methods: ['*']\n    spiffe_id_patterns: ['spiffe://example.org/ns/dev/**']\n"
        "allow:\n  - name: frontend-greets\n    methods: [/meshid.examples.v1.Greeter/SayHello]\n"
        "    spiffe_ids: [spiffe://example.org/ns/prod/sa/frontend]\n"
    )
    (folder / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    return folder, svid


def test_svid_inspect_prints_identity_serial_validity_thumbprint(files) -> None:
    folder, svid = files
    out = meshid("svid", "inspect", str(folder / "svid.pem"))
    assert out.returncode == 0, out.stderr
    assert "SPIFFE ID:   spiffe://example.org/ns/prod/sa/frontend" in out.stdout
    assert f"Serial:      {svid.serial:x}" in out.stdout
    assert f"Thumbprint:  {svid.thumbprint}" in out.stdout
    assert "frontend.local" in out.stdout


def test_svid_inspect_json(files) -> None:
    folder, svid = files
    out = meshid("svid", "inspect", str(folder / "svid.pem"), "--json")
    info = json.loads(out.stdout)
    assert info["spiffe_id"] == "spiffe://example.org/ns/prod/sa/frontend"
    assert info["thumbprint"] == svid.thumbprint
    assert info["not_after"] == svid.not_after.isoformat()


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--spiffe-id", "spiffe://example.org/ns/prod/sa/frontend"], 0, "ALLOW"),
        (["--spiffe-id", "spiffe://example.org/ns/dev/sa/frontend"], 1, "DENY"),
        (["--spiffe-id", "spiffe://example.org/ns/prod/sa/other"], 1, "default deny"),
        (["--spiffe-id", "spiffe://Example.org/x"], 2, "trust domain must be lowercase"),
    ],
)
def test_policy_check_exit_codes(files, args, code, text) -> None:
    folder, _ = files
    out = meshid("policy", "check", str(folder / "policy.yaml"), *args, "--method", "/meshid.examples.v1.Greeter/SayHello")
    assert out.returncode == code, out.stderr
    assert text in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_policy_check_with_a_certificate_and_its_bundle(files) -> None:
    folder, _ = files
    method = ["--method", "/meshid.examples.v1.Greeter/SayHello"]
    out = meshid("policy", "check", str(folder / "policy.yaml"), "--cert", str(folder / "svid.pem"), "--bundle", str(folder / "bundle.pem"), *method)
    assert (out.returncode, out.stdout.split()[0]) == (0, "ALLOW")
    assert out.stderr == ""
    out = meshid("policy", "check", str(folder / "policy.yaml"), "--cert", str(folder / "foreign.pem"), "--bundle", str(folder / "bundle.pem"), *method)
    assert out.returncode == 2
    assert "does not verify" in out.stderr


def test_svid_inspect_of_a_two_root_bundle_shows_the_second_root_as_in_the_file_not_in_the_chain(tmp_path) -> None:
    """bundle.pem after `ca key add` or during a rotation: two roots, neither the other's issuer."""
    first, second = Authority.create_root("example.org"), Authority.create_root("example.org")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(TrustBundle(first.trust_domain, first.roots + second.roots).to_pem())
    out = meshid("svid", "inspect", str(bundle))
    assert out.returncode == 0, out.stderr
    assert "Chain [1]" not in out.stdout, out.stdout
    assert f"Also in file: {second.certificate.subject.rfc4514_string()} " in out.stdout, out.stdout


def test_policy_check_of_a_certificate_without_its_bundle_warns_that_it_was_not_verified(files) -> None:
    """A newcomer who leaves out --bundle gets a decision on what the certificate claims, and is told so."""
    folder, _ = files
    method = ["--method", "/meshid.examples.v1.Greeter/SayHello"]
    out = meshid("policy", "check", str(folder / "policy.yaml"), "--cert", str(folder / "foreign.pem"), *method)
    assert (out.returncode, out.stdout.split()[0]) == (0, "ALLOW")  # another CA's certificate, taken at its word
    assert out.stderr.splitlines() == [
        "meshid: warning: --cert was not verified (no --bundle): the decision takes its identity at its word; "
        "give --bundle FILE to verify its chain first"
    ]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["svid", "inspect", "{folder}/missing.pem"], "cannot read"),
        (["svid", "inspect", "{folder}/garbage.pem"], "not a valid certificate"),
        (["svid", "inspect", "{folder}/policy.yaml"], "no PEM certificate"),
        (["policy", "check", "{folder}/svid.pem", "--spiffe-id", "spiffe://example.org/a", "--method", "/a.B/C"], "policy"),
        (["policy", "check", "{folder}/policy.yaml", "--method", "/a.B/C"], "one of the arguments --spiffe-id --cert is required"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(files, args, text) -> None:
    folder, _ = files
    out = meshid(*[a.format(folder=folder) for a in args])
    assert out.returncode == 2
    assert text in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("dsn", "warned"),
    [
        ("postgresql://ca:not-a-real-secret@127.0.0.1:1/meshid", True),
        ("host=127.0.0.1 port=1 dbname=meshid password=not-a-real-secret", True),
        ("postgresql://ca@127.0.0.1:1/meshid", False),  # the password from $PGPASSWORD or ~/.pgpass
    ],
)
def test_a_datastore_password_on_the_command_line_warns(tmp_path, dsn, warned) -> None:
    # ca init refuses a shared datastore without --upstream-*: each run reads --datastore, then stops.
    out = meshid("ca", "init", "--data-dir", str(tmp_path / "ca"), "--trust-domain", "example.org", "--datastore", dsn)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "give --upstream-cert and --upstream-key" in lines[-1], out.stderr
    if warned:
        assert len(lines) == 2 and lines[0].startswith("meshid: warning: --datastore"), out.stderr
        for words in ("process list", "every local user", "$PGPASSWORD", "~/.pgpass"):
            assert words in lines[0], lines[0]
    else:
        assert len(lines) == 1, out.stderr
    assert "not-a-real-secret" not in out.stderr + out.stdout  # never echoed
    assert not (tmp_path / "ca").exists()


def test_join_token_on_the_command_line_warns_and_the_file_or_environment_does_not(files, tmp_path) -> None:
    folder, _ = files
    token = "example.org:not-a-real-secret"
    (tmp_path / "token").write_text(token)
    # Nothing listens on port 1: each run reads its token, then fails to reach the CA.
    fetch = ["svid", "fetch", "--server", "127.0.0.1:1", "--bundle", str(folder / "bundle.pem"), "--out", str(tmp_path)]
    on_the_line = meshid(*fetch, "--join-token", token)
    first, *rest = on_the_line.stderr.strip().splitlines()
    assert first.startswith("meshid: warning: --join-token"), on_the_line.stderr
    for words in ("process list", "every local user", "--join-token-file", "$MESHID_JOIN_TOKEN"):
        assert words in first, first
    # exit 3: the CA could not be reached (not 2, bad input)
    assert on_the_line.returncode == 3 and len(rest) == 1 and "cannot reach the CA" in rest[0], on_the_line.stderr
    both = meshid(*fetch, "--join-token", token, "--join-token-file", str(tmp_path / "token"))
    assert both.returncode == 2 and "give --join-token or --join-token-file, not both" in both.stderr, both.stderr
    quiet = [
        meshid(*fetch, env={**os.environ, "MESHID_JOIN_TOKEN": token}),
        meshid(*fetch, "--join-token-file", str(tmp_path / "token")),
    ]
    for run in quiet:
        assert run.returncode == 3 and "cannot reach the CA" in run.stderr, run.stderr
        assert "warning" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
