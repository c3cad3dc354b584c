"""A dry run (issue #17): a real server enforcing tests/policy_repo/policy.yaml with
tests/policy_repo/policy-v2.yaml as its candidate. Calls are decided by the enforced policy alone;
each call the candidate decides otherwise is one ``meshid.dryrun`` record and one count."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest

import meshid
from meshid.metrics import REGISTRY
from support import (
    FRONTEND_ID,
    INTRUDER_ID,
    SAY_HELLO,
    SERVER_ID,
    aio_server,
    call,
    eventually,
    hello,
    stub,
    sync_server,
)

POLICY_REPO = Path(__file__).parent / "policy_repo"
BATCH_ID = "spiffe://example.org/ns/prod/sa/batch"
METRIC = "meshid_authz_dry_run_differences_total"


def _count(outcome: str, enforced_rule: str, candidate_rule: str) -> float:
    labels = {"outcome": outcome, "enforced_rule": enforced_rule, "candidate_rule": candidate_rule}
    return REGISTRY.get_sample_value(METRIC, labels) or 0.0


def _dry_runs(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.meshid_audit for r in caplog.records if r.name == "meshid.dryrun"]  # type: ignore[attr-defined]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    enforced, candidate = tmp_path / "policy.yaml", tmp_path / "candidate.yaml"
    shutil.copy(POLICY_REPO / "policy.yaml", enforced)
    shutil.copy(POLICY_REPO / "policy-v2.yaml", candidate)
    return enforced, candidate


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as a deploy does: a new inode, atomically


def test_would_deny_calls_still_succeed_and_would_allow_calls_still_fail(
    ca, bundles, server_source, files, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="meshid.dryrun")
    enforced, candidate = files
    interceptor = meshid.AuthorizationInterceptor(str(enforced), source=server_source, candidate=str(candidate))
    assert interceptor.candidate is not None and interceptor.candidate.name == "greeter-v2"
    intruder, batch, frontend = (
        meshid.StaticSource(ca.issue_svid(s), bundles) for s in (INTRUDER_ID, BATCH_ID, FRONTEND_ID)
    )
    before = _count("would_deny", "dev-hello", ""), _count("would_allow", "", "batch-hello")
    with interceptor, sync_server(server_source, interceptor) as port:
        results = {}
        for name, source in (("intruder", intruder), ("batch", batch), ("frontend", frontend)):
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                results[name] = [call(channel)[0] for _ in range(3)]  # the 2nd and 3rd from the memo
        assert interceptor.flush_audit()
    assert results["intruder"] == ["OK"] * 3, "the enforced policy (dev-hello) still allows the dev caller"
    assert results["batch"] == ["PERMISSION_DENIED"] * 3, "the candidate's batch-hello is not enforced"
    assert results["frontend"] == ["OK"] * 3
    records = _dry_runs(caplog)
    assert [r["dry_run"] for r in records] == ["would_deny"] * 3 + ["would_allow"] * 3, "one record per differing call"
    deny, allow = records[0], records[3]
    assert (deny["caller"], deny["method"], deny["rule"], deny["candidate_rule"]) == (
        INTRUDER_ID,
        SAY_HELLO,
        "dev-hello",
        None,
    )
    assert (deny["policy"], deny["candidate_policy"]) == ("greeter-v1", "greeter-v2")
    assert deny["candidate_reason"] == "no rule allows it (default deny)"
    assert (allow["caller"], allow["rule"], allow["candidate_rule"]) == (BATCH_ID, None, "batch-hello")
    assert str(allow["peer_address"]).startswith("ipv4:127.0.0.1:")
    assert (_count("would_deny", "dev-hello", ""), _count("would_allow", "", "batch-hello")) == (
        before[0] + 3,
        before[1] + 3,
    )
    message = next(r for r in caplog.records if r.name == "meshid.dryrun").getMessage()
    assert json.loads(message.removeprefix("dryrun ")) == deny  # the message is the same record


def test_a_broken_candidate_is_refused_and_logged_while_enforcement_goes_on(
    ca, bundles, server_source, files, caplog
) -> None:
    caplog.set_level(logging.INFO)
    enforced, candidate = files
    _replace(candidate, "name: broken\nallow:\n  - name: x\n    methods: [/a.B/C]\n    spiffe_idz: [oops]\n")
    interceptor = meshid.AuthorizationInterceptor(
        str(enforced), source=server_source, candidate=str(candidate), poll_interval=0.01
    )
    assert interceptor.candidate is None  # refused, not raised: enforcement does not depend on it
    refusals = [r for r in caplog.records if r.name == "meshid.authz" and r.levelno == logging.ERROR]
    assert len(refusals) == 1 and "spiffe_idz" in refusals[0].getMessage() and "candidate" in refusals[0].getMessage()
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with interceptor, sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", intruder, server_id=SERVER_ID) as channel:
            assert call(channel)[0] == "OK"
            # fixed: the watcher loads it, and the dry run begins
            shutil.copy(POLICY_REPO / "policy-v2.yaml", candidate.with_suffix(".tmp"))
            os.replace(candidate.with_suffix(".tmp"), candidate)
            eventually(lambda: interceptor.candidate is not None, 10, "the watcher to load the fixed candidate")
            assert call(channel)[0] == "OK"
            assert interceptor.flush_audit()
            assert [r["dry_run"] for r in _dry_runs(caplog)] == ["would_deny"]
            # broken again: the previous candidate stays, the refusal is logged, the enforced policy decides
            caplog.clear()
            _replace(candidate, "name: [not, a, string]\n")
            eventually(
                lambda: any("refusing candidate" in r.getMessage() for r in caplog.records),
                10,
                "the watcher to refuse the broken candidate",
            )
            assert interceptor.candidate is not None and interceptor.candidate.name == "greeter-v2"
            assert interceptor.policy.name == "greeter-v1"
            assert call(channel)[0] == "OK"
            # promoted: the enforced policy now is the candidate's file; the two agree on every call
            _replace(candidate, (POLICY_REPO / "policy-v2.yaml").read_text())
            eventually(lambda: interceptor.candidate is not None, 10, "the candidate")
            assert interceptor.reload(str(candidate))
            assert call(channel)[0] == "PERMISSION_DENIED"
            assert interceptor.flush_audit()  # records of earlier calls are written before the clear
            caplog.clear()
            assert call(channel)[0] == "PERMISSION_DENIED"
            assert interceptor.flush_audit()
            assert _dry_runs(caplog) == []
            interceptor.end_dry_run()
            assert interceptor.candidate is None


def test_a_candidate_with_header_rules_is_decided_per_call(ca, bundles, server_source, caplog) -> None:
    # gRPC authz JSON as candidate; its header condition takes the call past the memo
    caplog.set_level(logging.INFO, logger="meshid.dryrun")
    enforced = meshid.AuthorizationPolicy.load(POLICY_REPO / "policy-v2.yaml")
    interceptor = meshid.AuthorizationInterceptor(
        enforced, source=server_source, candidate=POLICY_REPO / "policy-grpc.json"
    )
    batch = meshid.StaticSource(ca.issue_svid(BATCH_ID), bundles)
    with sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", batch, server_id=SERVER_ID) as channel:
            assert call(channel, metadata=[("x-env", "prod")])[0] == "OK"
            assert call(channel, metadata=[("x-env", "dev")])[0] == "OK"
    (record,) = _dry_runs(caplog)
    assert (record["dry_run"], record["rule"], record["candidate_rule"]) == ("would_deny", "batch-hello", None)


def test_reload_candidate_given_a_broken_policy_raises_and_keeps_the_previous(server_source, files) -> None:
    enforced, candidate = files
    interceptor = meshid.AuthorizationInterceptor(str(enforced), source=server_source, candidate=str(candidate))
    broken = candidate.with_name("broken.yaml")
    broken.write_text("allow: []\n")
    with pytest.raises(meshid.InvalidPolicyError, match="no allow rule"):
        interceptor.reload_candidate(str(broken))
    assert interceptor.candidate is not None and interceptor.candidate.name == "greeter-v2"
    assert interceptor.reload_candidate() is True  # its own file, re-read
    with pytest.raises(ValueError, match="candidate policy file"):
        meshid.AuthorizationInterceptor(str(enforced), source=server_source).reload_candidate()


def test_aio_would_deny_calls_still_succeed(ca, bundles, server_source, files, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshid.dryrun")
    enforced, candidate = files
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)

    async def run() -> list[str]:
        interceptor = meshid.aio.AuthorizationInterceptor(str(enforced), source=server_source, candidate=str(candidate))
        codes = []
        with interceptor:
            async with aio_server(server_source, interceptor) as port:
                async with meshid.aio.secure_channel(f"127.0.0.1:{port}", intruder, server_id=SERVER_ID) as channel:
                    for _ in range(2):
                        try:
                            await stub(channel).SayHello(hello(), timeout=10)
                            codes.append("OK")
                        except grpc.aio.AioRpcError as err:
                            codes.append(err.code().name)
        return codes

    assert asyncio.run(run()) == ["OK", "OK"]
    assert [(r["dry_run"], r["caller"], r["rule"]) for r in _dry_runs(caplog)] == [
        ("would_deny", INTRUDER_ID, "dev-hello")
    ] * 2


def test_the_counter_has_no_label_the_caller_chooses(ca, bundles, server_source, caplog) -> None:
    # an unimplemented method's name is the caller's: it may appear (cut) in the record, never in a label
    caplog.set_level(logging.INFO, logger="meshid.dryrun")
    enforced = meshid.AuthorizationPolicy.load(POLICY_REPO / "policy.yaml")
    everyone = meshid.AuthorizationPolicy.from_dict(
        {"name": "open", "allow": [{"name": "everyone", "methods": ["*"], "any_peer": True}]}
    )
    interceptor = meshid.AuthorizationInterceptor(enforced, source=server_source, candidate=everyone)
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    method = "/probe.Secret/" + "x" * 1000
    with sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", intruder, server_id=SERVER_ID) as channel:
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(method)(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (record,) = _dry_runs(caplog)
    assert record["dry_run"] == "would_allow" and str(record["method"]).endswith("...(1014 characters)")
    (family,) = [f for f in REGISTRY.collect() if f.name == "meshid_authz_dry_run_differences"]
    assert {tuple(sorted(s.labels)) for s in family.samples} == {("candidate_rule", "enforced_rule", "outcome")}
    assert all("x" * 20 not in value for s in family.samples for value in s.labels.values())
    assert _count("would_allow", "", "everyone") >= 1


def test_a_candidate_file_that_appears_starts_the_dry_run_and_its_removal_ends_it(
    ca, bundles, server_source, files, caplog
) -> None:
    caplog.set_level(logging.INFO)
    enforced, candidate = files
    candidate.unlink()
    interceptor = meshid.AuthorizationInterceptor(
        str(enforced), source=server_source, candidate=str(candidate), poll_interval=0.01
    )
    assert interceptor.candidate is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no candidate yet is not an error"
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with interceptor, sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", intruder, server_id=SERVER_ID) as channel:
            assert call(channel)[0] == "OK"
            _replace(candidate, (POLICY_REPO / "policy-v2.yaml").read_text())
            eventually(lambda: interceptor.candidate is not None, 10, "the watcher to start the dry run")
            assert call(channel)[0] == "OK"
            candidate.unlink()
            eventually(lambda: interceptor.candidate is None, 10, "the watcher to end the dry run")
            assert call(channel)[0] == "OK"
            assert interceptor.flush_audit()
    assert [r["dry_run"] for r in _dry_runs(caplog)] == ["would_deny"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
