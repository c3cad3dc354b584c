"""Audit records, as a real server writes them: every field of meshid's ``meshid.audit`` record,
and gRFC A59's ``stdout_logger`` for a gRPC authorization policy that asks for it."""

from __future__ import annotations

import datetime
import json
import logging

import grpc
import pytest

import meshid
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, SERVICE, call, sync_server

POLICY = {"name": "audited", "allow": [{"name": "frontend", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [FRONTEND_ID]}]}
FIELDS = {"caller", "method", "decision", "rule", "policy", "reason", "serial", "peer_address"}


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "meshid.audit"]


def test_every_field_of_allow_deny_and_unauthenticated_records(ca, bundles, server_source, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server_source)
    frontend, intruder = (meshid.StaticSource(ca.issue_svid(sid), bundles) for sid in (FRONTEND_ID, INTRUDER_ID))
    with sync_server(server_source, interceptor) as port:
        for source in (frontend, intruder):
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                call(channel)
    allow, deny = _records(caplog)
    assert (allow.levelno, deny.levelno) == (logging.INFO, logging.WARNING)
    for record, source in ((allow, frontend), (deny, intruder)):
        fields = record.meshid_audit  # type: ignore[attr-defined]
        assert set(fields) == FIELDS
        assert json.loads(record.getMessage().removeprefix("authz ")) == fields  # the message is the same record
        svid = source.get_svid()
        assert fields["caller"] == str(svid.spiffe_id)
        assert fields["serial"] == format(svid.serial, "x")
        assert fields["method"] == SAY_HELLO
        assert fields["policy"] == "audited"
        assert fields["peer_address"].startswith("ipv4:127.0.0.1:")
    assert (allow.meshid_audit["decision"], allow.meshid_audit["rule"]) == ("allow", "frontend")  # type: ignore[attr-defined]
    assert allow.meshid_audit["reason"] == "allowed by rule 'frontend'"  # type: ignore[attr-defined]
    assert (deny.meshid_audit["decision"], deny.meshid_audit["rule"]) == ("deny", None)  # type: ignore[attr-defined]
    assert deny.meshid_audit["reason"] == "no rule allows it (default deny)"  # type: ignore[attr-defined]


def test_unauthenticated_record_names_no_caller_and_says_why(ca, bundles, server_source, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server_source)
    interceptor.set_revocation_check(lambda peer: peer.spiffe_id == meshid.SpiffeId.parse(FRONTEND_ID))
    frontend = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", frontend, server_id=SERVER_ID) as channel:
            assert call(channel)[0] == "UNAUTHENTICATED"
    (record,) = _records(caplog)
    fields = record.meshid_audit  # type: ignore[attr-defined]
    assert record.levelno == logging.WARNING
    assert fields["decision"] == "deny" and fields["rule"] is None
    assert fields["caller"] == FRONTEND_ID  # a revoked peer is named: the certificate did verify
    assert "is revoked" in fields["reason"]


def test_grpc_stdout_logger_writes_grfc_a59_entries(ca, bundles, server_source, capsys) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "name": "grpc-audited",
            "allow_rules": [{"name": "frontend", "source": {"principals": [FRONTEND_ID]}, "request": {"paths": [f"/{SERVICE}/*"]}}],
            "audit_logging_options": {"audit_condition": "ON_DENY_AND_ALLOW", "audit_loggers": [{"name": "stdout_logger"}]},
        }
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    before = datetime.datetime.now(datetime.UTC)
    with sync_server(server_source, interceptor) as port:
        for sid in (FRONTEND_ID, INTRUDER_ID):
            source = meshid.StaticSource(ca.issue_svid(sid), bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                call(channel)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"grpc_audit_log"')]
    assert [entry["grpc_audit_log"]["principal"] for entry in lines] == [FRONTEND_ID, INTRUDER_ID]
    allowed, denied = (entry["grpc_audit_log"] for entry in lines)
    assert set(allowed) == {"timestamp", "rpc_method", "principal", "policy_name", "matched_rule", "authorized"}
    assert (allowed["authorized"], allowed["matched_rule"]) == (True, "frontend")
    assert (denied["authorized"], denied["matched_rule"]) == (False, "")
    assert allowed["rpc_method"] == SAY_HELLO and allowed["policy_name"] == "grpc-audited"
    assert datetime.datetime.fromisoformat(allowed["timestamp"]) >= before


def test_on_deny_logs_denials_only(ca, bundles, server_source, capsys) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "name": "deny-audited",
            "allow_rules": [{"name": "frontend", "source": {"principals": [FRONTEND_ID]}}],
            "audit_logging_options": {"audit_condition": "ON_DENY", "audit_loggers": [{"name": "stdout_logger"}]},
        }
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    with sync_server(server_source, interceptor) as port:
        for sid in (FRONTEND_ID, INTRUDER_ID):
            source = meshid.StaticSource(ca.issue_svid(sid), bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                code, _ = call(channel)
                assert code == ("OK" if sid == FRONTEND_ID else grpc.StatusCode.PERMISSION_DENIED.name)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"grpc_audit_log"')]
    assert [entry["grpc_audit_log"]["principal"] for entry in lines] == [INTRUDER_ID]
