"""Audit records, as a real server writes them: every field of meshid's ``meshid.audit`` record,
and gRFC A59's ``stdout_logger`` for a gRPC authorization policy that asks for it."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import subprocess
import sys
import threading
import time

import grpc
import pytest

import meshid
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, SERVICE, call, sync_server

POLICY = {"name": "audited", "allow": [{"name": "frontend", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [FRONTEND_ID]}]}
FIELDS = {"caller", "method", "decision", "rule", "policy", "reason", "serial", "peer_address"}
#: What `meshid policy replay` needs besides (issue #17): the peer as a policy sees it, and which
#: stage decided (a policy, or authentication before it, or an unauthenticated method).
FIELDS |= {"stage", "trust_domain", "has_spiffe_id", "thumbprint", "dns_sans", "key_exchange"}


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
        assert (fields["stage"], fields["trust_domain"], fields["has_spiffe_id"]) == ("policy", "example.org", True)
        assert fields["thumbprint"] == meshid.PeerIdentity.from_certificate(svid.leaf).thumbprint
        assert fields["dns_sans"] == []  # they decide only for a peer without a SPIFFE ID
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
    assert fields["stage"] == "authentication"  # refused before the policy: replay skips it


def test_grpc_stdout_logger_writes_grfc_a59_entries(ca, bundles, server_source, capsys) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "name": "grpc-audited",
            "allow_rules": [
                {"name": "frontend", "source": {"principals": [FRONTEND_ID]}, "request": {"paths": [f"/{SERVICE}/*"]}}
            ],
            "audit_logging_options": {
                "audit_condition": "ON_DENY_AND_ALLOW",
                "audit_loggers": [{"name": "stdout_logger"}],
            },
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


# --- which decisions are audited, and where records are written -------------------------------


def _audited(policy: dict[str, object], ca, bundles, server_source, caplog, *, start: bool = False) -> list[str]:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(policy), source=server_source)
    with sync_server(server_source, interceptor) as port:
        if start:
            interceptor.start()
        try:
            for sid in (FRONTEND_ID, INTRUDER_ID, FRONTEND_ID):
                source = meshid.StaticSource(ca.issue_svid(sid), bundles)
                with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                    call(channel)
        finally:
            interceptor.close()
    return [r.meshid_audit["decision"] for r in _records(caplog)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (None, ["allow", "deny", "allow"]),
        ("ON_DENY_AND_ALLOW", ["allow", "deny", "allow"]),
        ("ON_DENY", ["deny"]),
        ("ON_ALLOW", ["allow", "allow"]),
        ("NONE", []),
    ],
)
def test_a_native_policy_s_audit_condition_chooses_the_decisions_recorded(
    condition, expected, ca, bundles, server_source, caplog
) -> None:
    policy = dict(POLICY) | ({"audit_condition": condition} if condition else {})
    assert _audited(policy, ca, bundles, server_source, caplog) == expected


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (None, ["allow", "deny", "allow"]),  # no audit options: the logger's level alone chooses
        ({"audit_condition": "ON_DENY"}, ["deny"]),
        ({"audit_condition": "ON_ALLOW"}, ["allow", "allow"]),
        ({}, []),  # gRFC A59: an omitted condition is NONE
    ],
)
def test_a_grpc_policy_s_audit_condition_chooses_the_decisions_recorded(
    options, expected, ca, bundles, server_source, caplog
) -> None:
    policy: dict[str, object] = {
        "name": "grpc-audited",
        "allow_rules": [{"name": "frontend", "source": {"principals": [FRONTEND_ID]}}],
    }
    if options is not None:
        policy["audit_logging_options"] = options
    assert _audited(policy, ca, bundles, server_source, caplog) == expected


def test_audit_at_warning_records_denies_only(ca, bundles, server_source, caplog) -> None:
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server_source)
    caplog.set_level(logging.WARNING, logger="meshid.audit")
    with sync_server(server_source, interceptor) as port:
        for sid in (FRONTEND_ID, INTRUDER_ID):
            with meshid.secure_channel(
                f"127.0.0.1:{port}", meshid.StaticSource(ca.issue_svid(sid), bundles), server_id=SERVER_ID
            ) as channel:
                call(channel)
    assert [r.meshid_audit["decision"] for r in _records(caplog)] == ["deny"]  # type: ignore[attr-defined]


def test_a_started_interceptor_writes_records_on_its_own_thread_and_close_writes_them_all(
    ca, bundles, server_source, caplog
) -> None:
    threads_before = {t.name for t in threading.enumerate()}
    assert _audited(POLICY, ca, bundles, server_source, caplog, start=True) == ["allow", "deny", "allow"]
    records = _records(caplog)
    assert {r.threadName for r in records} == {"meshid-audit"}  # off the call path
    for record in records:  # every field as a record written in the call has it
        assert json.loads(record.getMessage().removeprefix("authz ")) == record.meshid_audit  # type: ignore[attr-defined]
        assert set(record.meshid_audit) == FIELDS  # type: ignore[attr-defined]
    # the record's time is the decision's, not the (later, batched) write's
    assert all(r.created <= time.time() and r.created > time.time() - 60 for r in records)
    assert "meshid-audit" not in {t.name for t in threading.enumerate()} - threads_before  # close() stopped it


def test_flush_audit_waits_for_the_records_queued(ca, bundles, server_source, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server_source)
    with sync_server(server_source, interceptor) as port, interceptor:
        with meshid.secure_channel(
            f"127.0.0.1:{port}", meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles), server_id=SERVER_ID
        ) as channel:
            assert call(channel)[0] == "OK"
        assert interceptor.flush_audit()
        assert [r.meshid_audit["decision"] for r in _records(caplog)] == ["allow"]  # type: ignore[attr-defined]


def test_aio_started_interceptor_writes_records_off_the_event_loop(ca, bundles, server_source, caplog) -> None:
    import asyncio

    import meshid.aio
    from support import aio_server

    caplog.set_level(logging.INFO, logger="meshid.audit")

    async def run() -> None:
        policy = meshid.AuthorizationPolicy.from_dict(POLICY)
        with meshid.aio.AuthorizationInterceptor(policy, source=server_source) as interceptor:
            async with aio_server(server_source, interceptor) as port:
                for sid in (FRONTEND_ID, INTRUDER_ID):
                    source = meshid.StaticSource(ca.issue_svid(sid), bundles)
                    async with meshid.aio.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                        with contextlib.suppress(grpc.RpcError):
                            await channel.unary_unary(SAY_HELLO)(b"", timeout=10)

    asyncio.run(run())
    records = _records(caplog)
    assert [r.meshid_audit["decision"] for r in records] == ["allow", "deny"]  # type: ignore[attr-defined]
    assert {r.threadName for r in records} == {"meshid-audit"}


def test_native_audit_condition_must_be_one_of_grfc_a59_s() -> None:
    with pytest.raises(meshid.InvalidPolicyError) as err:
        meshid.AuthorizationPolicy.from_dict(dict(POLICY) | {"audit_condition": "ALWAYS"}, origin="p.yaml")
    assert str(err.value) == (
        "policy p.yaml: 'audit_condition' 'ALWAYS' is not one of NONE, ON_DENY, ON_ALLOW, ON_DENY_AND_ALLOW"
    )


def test_records_still_queued_are_written_when_the_process_exits(tmp_path) -> None:
    """A server that never closes its interceptor loses no record: at exit the writer empties."""
    script = tmp_path / "server.py"
    script.write_text(
        "import logging, sys\n"
        "import meshid\n"
        "from meshid.authz import audit\n"
        "from meshid.authz.model import Decision\n"
        "logging.basicConfig(filename=sys.argv[1], level=logging.INFO, format='%(message)s')\n"
        "policy = meshid.AuthorizationPolicy.from_dict("
        "{'allow': [{'name': 'all', 'methods': ['*'], 'any_peer': True}]})\n"
        "writer = audit.AuditWriter(linger=5.0)\n"
        "writer.start()\n"
        "for i in range(3):\n"
        "    audit.record(policy, Decision(True, 'all', 'ok'), f'/pkg.S/M{i}', None, writer=writer)\n"
    )
    log = tmp_path / "audit.log"
    subprocess.run([sys.executable, str(script), str(log)], check=True, timeout=60)
    assert [json.loads(line.removeprefix("authz "))["method"] for line in log.read_text().splitlines()] == [
        "/pkg.S/M0",
        "/pkg.S/M1",
        "/pkg.S/M2",
    ]


def test_deciding_a_call_loads_neither_the_metrics_exporter_nor_yaml() -> None:
    """The core a server and a client touch (issue #14): no prometheus_client, http.server or yaml."""
    code = (
        "import sys, meshid\n"
        "policy = meshid.AuthorizationPolicy.from_dict({'allow': [{'name': 'a', 'methods': ['*'], 'any_peer': True}]})\n"
        "meshid.AuthorizationInterceptor, meshid.secure_channel, meshid.server_credentials, meshid.FileSource\n"
        "import meshid.aio\n"
        "meshid.aio.AuthorizationInterceptor\n"
        "print(sorted(m for m in ('prometheus_client', 'http.server', 'yaml', 'meshid.agent') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_records_of_repeat_calls_name_the_address_of_their_own_connection(
    flavour, ca, bundles, server_source, caplog
) -> None:
    """Two connections presenting one certificate share one memoised decision; each call's
    record still names the address of the connection it came on, on the memo's path too."""
    import meshid.aio
    from support import aio_server_in_a_thread

    caplog.set_level(logging.INFO, logger="meshid.audit")
    policy = meshid.AuthorizationPolicy.from_dict(POLICY)
    interceptor = (meshid.AuthorizationInterceptor if flavour == "sync" else meshid.aio.AuthorizationInterceptor)(
        policy, source=server_source
    )
    serve = sync_server if flavour == "sync" else aio_server_in_a_thread
    source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with serve(server_source, interceptor) as port:  # type: ignore[operator]
        with (
            meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as one,
            meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as two,
        ):
            for _ in range(3):
                assert call(one) == call(two) == ("OK", FRONTEND_ID)
    addresses = [r.meshid_audit["peer_address"] for r in _records(caplog)]  # type: ignore[attr-defined]
    assert len(addresses) == 6 and all(a.startswith("ipv4:127.0.0.1:") for a in addresses)
    assert len(set(addresses[0::2])) == len(set(addresses[1::2])) == 1  # one address per connection
    assert addresses[0] != addresses[1]


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_the_grpc_stdout_logger_writes_every_repeat_call_with_meshid_audit_at_warning(
    flavour, ca, bundles, server_source, capsys, caplog
) -> None:
    """gRFC A59's stdout_logger wants every allowed call of a policy that audits allows, whatever
    the level of the ``meshid.audit`` logger: a connected peer's repeat calls, decided from the
    memo, write their entries too when meshid's own record is not kept."""
    import meshid.aio
    from support import aio_server_in_a_thread

    caplog.set_level(logging.WARNING, logger="meshid.audit")
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "name": "grpc-audited",
            "allow_rules": [{"name": "frontend", "source": {"principals": [FRONTEND_ID]}}],
            "audit_logging_options": {"audit_condition": "ON_ALLOW", "audit_loggers": [{"name": "stdout_logger"}]},
        }
    )
    interceptor = (meshid.AuthorizationInterceptor if flavour == "sync" else meshid.aio.AuthorizationInterceptor)(
        policy, source=server_source
    )
    serve = sync_server if flavour == "sync" else aio_server_in_a_thread
    source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with serve(server_source, interceptor) as port:  # type: ignore[operator]
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
            assert [call(channel) for _ in range(3)] == [("OK", FRONTEND_ID)] * 3
    interceptor.close()  # the audit writer's queue is drained before close() returns
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"grpc_audit_log"')]
    assert [(e["grpc_audit_log"]["principal"], e["grpc_audit_log"]["authorized"]) for e in lines] == [
        (FRONTEND_ID, True)
    ] * 3
    assert _records(caplog) == []  # meshid's own allow records are at INFO: not kept
