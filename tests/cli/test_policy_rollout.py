"""``meshid policy test``, ``policy replay`` and ``policy check --explain`` (issue #17) as real
processes, on the hand-written files in tests/policy_repo/ and on an audit log a real server wrote
in the test. Exit codes: 0 all pass / nothing changes, 1 a failure / a change, 2 bad input."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

import meshid
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, RawSource, call, forge, sync_server

pytestmark = pytest.mark.timeout(180)

POLICY_REPO = Path(__file__).parent.parent / "policy_repo"
BATCH_ID = "spiffe://example.org/ns/prod/sa/batch"
PARTNER_ID = "spiffe://other.org/ns/prod/sa/client"
PASSED, FAILED, BAD_INPUT = 0, 1, 2


def meshid_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshid", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def repo(tmp_path: Path, ca) -> Path:
    """A policy repository: the hand-written files, and the two certificates cases.yaml names
    (made now by the project's CA: the frontend's SVID, a legacy certificate without a SPIFFE ID)."""
    for item in POLICY_REPO.iterdir():
        shutil.copy(item, tmp_path / item.name)
    (tmp_path / "frontend.pem").write_bytes(ca.issue_svid(FRONTEND_ID).leaf.public_bytes(serialization.Encoding.PEM))
    chain, _ = forge(ca, uris=[], subject_cn="legacy-batch")
    (tmp_path / "legacy-batch.pem").write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    return tmp_path


def test_policy_test_passes_on_the_native_policy_and_its_cases(repo: Path) -> None:
    done = meshid_cli("policy", "test", repo / "policy-v2.yaml", repo / "cases.yaml")
    assert (done.returncode, done.stderr) == (PASSED, "")
    assert done.stdout == "9 passed, 0 failed (9 cases, policy 'greeter-v2')\n"


def test_policy_test_passes_on_grpc_authz_json_with_headers(repo: Path) -> None:
    done = meshid_cli("policy", "test", repo / "policy-grpc.json", repo / "cases-grpc.json")
    assert (done.returncode, done.stdout) == (PASSED, "5 passed, 0 failed (5 cases, policy 'greeter-grpc')\n")


def test_policy_test_prints_every_failure_with_the_decision_and_rule_it_got(repo: Path) -> None:
    done = meshid_cli("policy", "test", repo / "policy-v2.yaml", repo / "cases-wrong.yaml")
    assert done.returncode == FAILED
    assert done.stdout.splitlines() == [
        f"FAIL dev still greets (wrong since v2): {INTRUDER_ID} {SAY_HELLO}: expected allow by rule 'dev-hello', "
        "got deny by no rule (no rule allows it (default deny))",
        f"FAIL other.org chat is denied by the wrong rule: {PARTNER_ID} /meshid.examples.v1.Greeter/Chat: "
        "expected deny by rule 'other-org', got deny by rule 'no-other-org-chat'",
        "1 passed, 2 failed (3 cases, policy 'greeter-v2')",
    ]


def test_the_old_policy_fails_the_new_cases(repo: Path) -> None:
    # the same table against greeter-v1: what the change is for shows as failures
    done = meshid_cli("policy", "test", repo / "policy.yaml", repo / "cases.yaml")
    assert done.returncode == FAILED
    failed = [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [
        "FAIL prod batch greets",
        "FAIL dev no longer greets",
        "FAIL a legacy batch certificate greets",
    ]


BAD_CASES = [
    ("cases: []\n", "'cases' must be a non-empty list"),
    ("cases:\n  - {spiffe_id: 'spiffe://example.org/a', method: /a.B/C, expect: maybe}\n", "'expect' must be allow"),
    ("cases:\n  - {method: /a.B/C, expect: allow}\n", "give the caller as one of 'spiffe_id' or 'cert'"),
    ("cases:\n  - {spiffe_id: 'spiffe://example.org/a', method: '/a.B/*', expect: allow}\n", "the one method called"),
    (
        "cases:\n  - {spiffe_id: 'spiffe://example.org/a', method: /a.B/C, expect: allow, rul: x}\n",
        "unknown key(s) 'rul'",
    ),
    ("cases:\n  - {cert: missing.pem, method: /a.B/C, expect: allow}\n", "cannot read"),
    ("cases:\n  - {spiffe_id: 'not an id', method: /a.B/C, expect: allow}\n", "SPIFFE ID"),
    ("cases: [\n", "invalid YAML at line"),
    ("casez: []\n", "unknown top-level key(s) 'casez'"),
    (
        "cases:\n  - {spiffe_id: 'spiffe://example.org/a', trust_domain: other.org, method: /a.B/C, expect: allow}\n",
        "this caller has one",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CASES, ids=[m for _, m in BAD_CASES])
def test_policy_test_refuses_a_bad_case_table_in_one_line(repo: Path, text: str, message: str) -> None:
    cases = repo / "bad-cases.yaml"
    cases.write_text(text)
    done = meshid_cli("policy", "test", repo / "policy-v2.yaml", cases)
    assert (done.returncode, done.stdout) == (BAD_INPUT, "")
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def audit_log(tmp_path: Path, ca, other_ca, bundles, server_source) -> Path:
    """An audit log as a server enforcing tests/policy_repo/policy.yaml writes it, with the README's
    logging line (time, logger, level, message), among meshid's other log lines."""
    path = tmp_path / "audit.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    meshid_log = logging.getLogger("meshid")
    old_level = meshid_log.level
    meshid_log.addHandler(handler)
    meshid_log.setLevel(logging.INFO)
    try:
        # with a dry run of greeter-v2 going on: its records are in the same log, and replay skips them
        interceptor = meshid.AuthorizationInterceptor(
            str(POLICY_REPO / "policy.yaml"), source=server_source, candidate=str(POLICY_REPO / "policy-v2.yaml")
        )
        callers = [
            meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles),
            meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles),
            meshid.StaticSource(ca.issue_svid(BATCH_ID), bundles),
            meshid.StaticSource(other_ca.issue_svid(PARTNER_ID), bundles),
        ]
        codes = []
        with interceptor, sync_server(server_source, interceptor) as port:
            for times, source in zip((1, 2, 3, 1), callers, strict=True):
                with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                    codes += [call(channel)[0] for _ in range(times)]
        assert codes == ["OK", "OK", "OK", "PERMISSION_DENIED", "PERMISSION_DENIED", "PERMISSION_DENIED", "OK"]
    finally:
        meshid_log.removeHandler(handler)
        meshid_log.setLevel(old_level)
        handler.close()
    text = path.read_text()
    assert text.count(" meshid.audit ") == 7 and text.count(" meshid.dryrun ") == 5
    assert text.count(" meshid.authz INFO policy: dry run: candidate 'greeter-v2'") == 1
    return path


def test_replay_reports_the_decisions_a_new_policy_changes(audit_log: Path) -> None:
    done = meshid_cli(
        "policy", "replay", POLICY_REPO / "policy-v2.yaml", "--audit-log", audit_log, "--trust-domain", "example.org"
    )
    assert (done.returncode, done.stderr) == (FAILED, "")
    assert done.stdout.splitlines() == [
        f"would_allow      3  {BATCH_ID} {SAY_HELLO}: deny (no rule) -> allow (rule 'batch-hello')",
        f"would_deny       2  {INTRUDER_ID} {SAY_HELLO}: allow (rule 'dev-hello') -> deny (no rule allows it (default deny))",
        "replayed 7 decisions with policy 'greeter-v2': 5 would change (2 caller/method pairs), 2 unchanged "
        "(0 by another rule); skipped 0 records not decided by a policy and 6 other lines",
    ]


def test_replay_with_the_policy_that_decided_changes_nothing(audit_log: Path) -> None:
    done = meshid_cli("policy", "replay", POLICY_REPO / "policy.yaml", "--audit-log", audit_log)
    assert done.returncode == PASSED, done.stdout + done.stderr
    assert done.stdout.startswith("replayed 7 decisions with policy 'greeter-v1': 0 would change")


def test_replay_with_a_grpc_authz_policy(audit_log: Path) -> None:
    # greeter-grpc lets prod callers greet only with x-env: prod; audit records carry no headers
    done = meshid_cli("policy", "replay", POLICY_REPO / "policy-grpc.json", "--audit-log", audit_log)
    assert done.returncode == FAILED
    lines = done.stdout.splitlines()
    assert (
        f"would_deny       2  {INTRUDER_ID} {SAY_HELLO}: allow (rule 'dev-hello') -> deny (no rule allows it (default deny))"
        in lines
    )
    assert lines[-1].startswith("note: audit records carry no request headers")


def test_replay_skips_refusals_made_before_the_policy(tmp_path: Path, ca, bundles, server_source) -> None:
    path = tmp_path / "audit.log"
    handler = logging.FileHandler(path)
    audit = logging.getLogger("meshid.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        interceptor = meshid.AuthorizationInterceptor(str(POLICY_REPO / "policy.yaml"), source=server_source)
        interceptor.set_revocation_check(lambda peer: True)
        with sync_server(server_source, interceptor) as port:
            source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                assert call(channel)[0] == "UNAUTHENTICATED"
    finally:
        audit.removeHandler(handler)
        audit.setLevel(logging.NOTSET)
        handler.close()
    done = meshid_cli("policy", "replay", POLICY_REPO / "policy-v2.yaml", "--audit-log", path)
    assert done.returncode == PASSED
    assert "replayed 0 decisions" in done.stdout and "skipped 1 records not decided by a policy" in done.stdout


def test_replay_refuses_a_huge_or_malformed_line_in_one_line(audit_log: Path, tmp_path: Path) -> None:
    lines = audit_log.read_text().splitlines()
    cases = {
        "huge": ("x" * (1 << 20), "line 2: longer than 65536 bytes"),
        "cut": (
            '2026-12-01 meshid.audit INFO authz {"caller": "spiffe://example.org/a", "meth',
            "line 2: the audit record is not valid JSON",
        ),
        "old": (
            'authz {"caller": "spiffe://example.org/a", "method": "/a.B/C", "decision": "allow", "rule": "r"}',
            "line 2: the record has no 'stage'",
        ),
        "binary": ("\udcff", "line 2: not UTF-8"),
        "no-decision": ('x authz {"caller": 1}', "line 2: the audit record has no 'decision'"),
        "unknown-stage": (
            'authz {"caller": "spiffe://example.org/a", "method": "/a.B/C", "decision": "allow", "stage": "bogus"}',
            "line 2: 'stage' must be one of policy, authentication, open, not 'bogus'",
        ),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.log"
        path.write_bytes("\n".join([lines[0], bad, *lines[1:]]).encode("utf-8", "surrogateescape") + b"\n")
        done = meshid_cli("policy", "replay", POLICY_REPO / "policy-v2.yaml", "--audit-log", path)
        assert (done.returncode, done.stdout) == (BAD_INPUT, ""), name
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, (name, done.stderr)
    done = meshid_cli("policy", "replay", POLICY_REPO / "policy-v2.yaml", "--audit-log", tmp_path / "missing.log")
    assert done.returncode == BAD_INPUT and "cannot read" in done.stderr


def test_check_explain_lists_each_rule_in_evaluation_order(repo: Path) -> None:
    done = meshid_cli(
        "policy",
        "check",
        repo / "policy-v2.yaml",
        "--cert",
        repo / "legacy-batch.pem",
        "--trust-domain",
        "example.org",
        "--method",
        SAY_HELLO,
        "--explain",
    )
    assert done.returncode == PASSED, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"ALLOW CN=legacy-batch {SAY_HELLO}: allowed by rule 'legacy-batch'"
    assert lines[2] == "rules in evaluation order (deny rules first, then allow rules):"
    rules = [line.split()[1:4] for line in lines[3:]]
    assert rules == [
        ["deny", "no-other-org-chat", "no"],
        ["allow", "frontend", "no"],
        ["allow", "batch-hello", "no"],
        ["allow", "legacy-batch", "MATCH"],
        ["allow", "other-org", "-"],
    ]
    assert "no condition names CN=legacy-batch" in lines[4]
    assert "subject_patterns matches 'CN=legacy-batch'" in lines[6]
    assert "not consulted: rule 'legacy-batch' decided" in lines[7]


def test_check_explain_says_when_a_subject_matches_out_of_scope(repo: Path) -> None:
    done = meshid_cli(
        "policy",
        "check",
        repo / "policy-v2.yaml",
        "--cert",
        repo / "legacy-batch.pem",
        "--trust-domain",
        "other.org",
        "--method",
        SAY_HELLO,
        "--explain",
    )
    # --trust-domain other.org: the certificate is taken as vouched for by other.org, this server's own
    assert done.returncode == PASSED
    done = meshid_cli(
        "policy",
        "check",
        repo / "policy-v2.yaml",
        "--spiffe-id",
        INTRUDER_ID,
        "--method",
        SAY_HELLO,
        "--explain",
    )
    assert done.returncode == FAILED
    assert done.stdout.splitlines()[-1] == "no rule matched: denied by default"


def test_replay_decides_a_certificate_without_a_spiffe_id_again(tmp_path: Path, ca, bundles, server_source) -> None:
    # a real server enforcing greeter-v2 admits a legacy certificate (no SPIFFE ID) by subject;
    # its records carry what replay needs to decide it again: no SPIFFE ID, who vouched
    path = tmp_path / "audit.log"
    handler = logging.FileHandler(path)
    audit = logging.getLogger("meshid.audit")
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    try:
        interceptor = meshid.AuthorizationInterceptor(str(POLICY_REPO / "policy-v2.yaml"), source=server_source)
        legacy = RawSource(*forge(ca, uris=[], subject_cn="legacy-batch"), bundles).get_svid()
        roots = bundles[meshid.TrustDomain.parse("example.org")].to_pem()
        creds = grpc.ssl_channel_credentials(roots, legacy.key_pem(), legacy.chain_pem())
        options = [("grpc.ssl_target_name_override", "localhost")]
        with sync_server(server_source, interceptor) as port:
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
                assert call(channel) == ("OK", "CN=legacy-batch")
    finally:
        audit.removeHandler(handler)
        audit.setLevel(logging.NOTSET)
        handler.close()
    same = meshid_cli("policy", "replay", POLICY_REPO / "policy-v2.yaml", "--audit-log", path)
    assert same.returncode == PASSED, same.stdout
    assert same.stdout.startswith("replayed 1 decisions with policy 'greeter-v2': 0 would change")
    older = meshid_cli("policy", "replay", POLICY_REPO / "policy.yaml", "--audit-log", path)
    assert older.returncode == FAILED
    assert older.stdout.splitlines()[0] == (
        f"would_deny       1  CN=legacy-batch {SAY_HELLO}: allow (rule 'legacy-batch') -> deny (the certificate "
        "carries no SPIFFE ID and the policy does not set allow_non_spiffe_peers)"
    )
    # vouched for by another trust domain than the one the new policy's rules are scoped to
    elsewhere = meshid_cli(
        "policy", "replay", POLICY_REPO / "policy-v2.yaml", "--audit-log", path, "--trust-domain", "other.org"
    )
    assert elsewhere.returncode == FAILED and "deny (no rule allows it (default deny))" in elsewhere.stdout
