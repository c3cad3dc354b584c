"""The sync interceptor against real grpc servers over mTLS on loopback (pair: test_aio_interceptors.py),
each test using ``guarded`` twice: the interceptor passed to ``grpc.server`` and attached by ``meshid.server``."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

import meshid
from refusals import CASES, Case
from support import (
    FRONTEND_ID,
    INTRUDER_ID,
    SAY_HELLO,
    SERVER_ID,
    RawSource,
    call,
    forge,
    handshake_failed,
    hello,
    stub,
    sync_server,
)


@pytest.fixture
def interceptor(
    policy: meshid.AuthorizationPolicy, server_source: meshid.StaticSource
) -> meshid.AuthorizationInterceptor:
    return meshid.AuthorizationInterceptor(policy, source=server_source)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_caller_matrix(case: Case, ca, other_ca, bundles, server_source, interceptor, guarded: bool) -> None:
    source = case.make_source(ca, other_ca, bundles)
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        creds, _ = _creds(source)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=_pin()) as channel:
            code, details = call(channel)
    if case.outcome == "HANDSHAKE":
        assert handshake_failed(code, details), (code, details)
    else:
        assert code == case.outcome, details
        assert case.detail in details


def _creds(source):
    svid = source.get_svid()
    roots = source.get_bundles()[meshid.TrustDomain.parse("example.org")].to_pem()
    return grpc.ssl_channel_credentials(roots, svid.key_pem(), svid.chain_pem()), None


def _pin():
    return [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))]


def test_no_client_certificate_fails_the_handshake(bundles, server_source, interceptor, guarded: bool) -> None:
    roots = bundles[meshid.TrustDomain.parse("example.org")].to_pem()
    with (
        sync_server(server_source, interceptor, guarded=guarded) as port,
        grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(roots), options=_pin()) as channel,
    ):
        code, details = call(channel)
    assert handshake_failed(code, details), (code, details)


def test_all_four_rpc_shapes_are_authorized(ca, bundles, server_source, interceptor, guarded: bool) -> None:
    allowed = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    denied = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", allowed, server_id=SERVER_ID) as channel:
            s = stub(channel)
            assert s.SayHello(hello("a"), timeout=10).caller == FRONTEND_ID
            assert [r.caller for r in s.SayHelloStream(hello("a"), timeout=10)] == [FRONTEND_ID] * 3
            assert s.CollectHellos(iter([hello("a"), hello("b")]), timeout=10).message == "hello a,b"
            assert [r.message for r in s.Chat(iter([hello("x"), hello("y")]), timeout=10)] == ["hello x", "hello y"]
        with meshid.secure_channel(f"127.0.0.1:{port}", denied, server_id=SERVER_ID) as channel:
            s = stub(channel)
            calls = [
                lambda: s.SayHello(hello(), timeout=10),
                lambda: list(s.SayHelloStream(hello(), timeout=10)),
                lambda: s.CollectHellos(iter([]), timeout=10),  # refused at call start, before any message
                lambda: list(s.Chat(iter([]), timeout=10)),
            ]
            for make_call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    make_call()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert INTRUDER_ID in info.value.details()


def test_denial_names_method_and_caller_but_not_the_policy(ca, bundles, server_source, interceptor, guarded: bool) -> None:
    denied = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with (
        sync_server(server_source, interceptor, guarded=guarded) as port,
        meshid.secure_channel(f"127.0.0.1:{port}", denied, server_id=SERVER_ID) as channel,
    ):
        code, details = call(channel)
    assert code == "PERMISSION_DENIED"
    assert SAY_HELLO in details and INTRUDER_ID in details
    for secret in ("frontend", "other-org-hello", FRONTEND_ID, "other.org"):
        assert secret not in details


def test_unknown_method_is_authorized_before_unimplemented(ca, bundles, server_source, interceptor, guarded: bool) -> None:
    allowed = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    denied = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        for source, expected in ((allowed, grpc.StatusCode.UNIMPLEMENTED), (denied, grpc.StatusCode.PERMISSION_DENIED)):
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    channel.unary_unary("/meshid.examples.v1.Greeter/NoSuchMethod")(b"", timeout=10)
                assert info.value.code() == expected


def test_handler_reads_the_verified_identity(ca, bundles, server_source, guarded: bool) -> None:
    seen = []

    class Spy(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            return continuation(details)

    caller_svid = ca.issue_svid(FRONTEND_ID)
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "by-thumbprint", "methods": ["*"], "thumbprints": [caller_svid.thumbprint]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    import support

    original = support.Greeter.SayHello

    def spying(self, request, context):
        seen.append(meshid.peer_identity(context))
        return original(self, request, context)

    support.Greeter.SayHello = spying
    try:
        caller = meshid.StaticSource(caller_svid, bundles)
        with (
            sync_server(server_source, interceptor, guarded=guarded) as port,
            meshid.secure_channel(f"127.0.0.1:{port}", caller, server_id=SERVER_ID) as ch,
        ):
            assert call(ch)[0] == "OK"
    finally:
        support.Greeter.SayHello = original
    (identity,) = seen
    assert identity.spiffe_id == meshid.SpiffeId.parse(FRONTEND_ID)
    assert identity.thumbprint == caller_svid.thumbprint
    assert identity.subject == "CN=frontend,O=example.org"
    assert identity.common_name == "frontend"
    assert identity.not_after == caller_svid.not_after
    assert identity.tls_version == "TLSv1.3"
    assert identity.key_exchange_group  # grpcio names the negotiated group, e.g. X25519MLKEM768


def test_server_id_mismatch_is_refused_before_any_request(ca, bundles, server_source, interceptor, caplog, guarded: bool) -> None:
    allowed = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    caplog.set_level(logging.INFO, logger="meshid.audit")
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        with meshid.secure_channel(
            f"127.0.0.1:{port}", allowed, server_id="spiffe://example.org/ns/prod/sa/impostor"
        ) as channel:
            code, details = call(channel)
        assert handshake_failed(code, details), (code, details)
        assert not [r for r in caplog.records if r.name == "meshid.audit"], "the server saw a request"
        with meshid.secure_channel(f"127.0.0.1:{port}", allowed, server_id="example.org") as channel:
            assert call(channel) == ("OK", FRONTEND_ID)
        with meshid.secure_channel(f"127.0.0.1:{port}", allowed, server_id="other.org") as channel:
            assert handshake_failed(*call(channel))


def test_server_id_pattern_is_refused_with_reason(ca, bundles) -> None:
    source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with pytest.raises(ValueError, match="cannot check a server's URI SAN against a pattern"):
        meshid.secure_channel("127.0.0.1:1", source, server_id="spiffe://example.org/ns/*/sa/greeter")


def test_every_decision_is_one_audit_record(ca, bundles, server_source, interceptor, caplog, guarded: bool) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        for sid in (FRONTEND_ID, INTRUDER_ID):
            caller = meshid.StaticSource(ca.issue_svid(sid), bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", caller, server_id=SERVER_ID) as ch:
                call(ch)
    records = [r.meshid_audit for r in caplog.records if r.name == "meshid.audit"]
    assert [(r["caller"], r["method"], r["decision"], r["rule"]) for r in records] == [
        (FRONTEND_ID, SAY_HELLO, "allow", "frontend"),
        (INTRUDER_ID, SAY_HELLO, "deny", None),
    ]
    json.dumps(records)  # structured: serializable as-is


def test_reload_swaps_policy_and_a_broken_file_keeps_the_old(ca, bundles, server_source, tmp_path, guarded: bool) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("allow:\n  - name: frontend\n    methods: ['*']\n    spiffe_ids: [" + FRONTEND_ID + "]\n")
    interceptor = meshid.AuthorizationInterceptor(str(path), source=server_source)
    frontend = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        target = f"127.0.0.1:{port}"

        def outcome(source):
            with meshid.secure_channel(target, source, server_id=SERVER_ID) as ch:
                return call(ch)[0]

        assert (outcome(frontend), outcome(intruder)) == ("OK", "PERMISSION_DENIED")
        path.write_text("allow:\n  - name: intruder\n    methods: ['*']\n    spiffe_ids: [" + INTRUDER_ID + "]\n")
        assert interceptor.reload() is True
        assert (outcome(frontend), outcome(intruder)) == ("PERMISSION_DENIED", "OK")
        path.write_text("allow:\n  - name: broken\n    methods: ['*']\n    spiffe_idz: [x]\n")
        assert interceptor.reload() is False
        assert interceptor.policy.rules[0].name == "intruder"
        assert (outcome(frontend), outcome(intruder)) == ("PERMISSION_DENIED", "OK")
        with pytest.raises(meshid.InvalidPolicyError, match="unknown key"):
            interceptor.reload(str(path))
        assert interceptor.policy.rules[0].name == "intruder"


def test_interceptor_needs_trust_material(policy) -> None:
    with pytest.raises(TypeError, match="source must be"):
        meshid.AuthorizationInterceptor(policy, source="bundle.pem")  # type: ignore[arg-type]


def test_non_spiffe_client_certificates_are_vouched_for_only_by_the_servers_trust_domain(
    ca, other_ca, bundles, server_source, guarded: bool
) -> None:
    policy = meshid.AuthorizationPolicy.from_dict(
        {
            "allow_non_spiffe_peers": True,
            "allow": [{"name": "legacy", "methods": ["*"], "subject_patterns": ["CN=legacy-billing"]}],
        }
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    ours = RawSource(*forge(ca, uris=[], subject_cn="legacy-billing"), bundles)
    federated = RawSource(*forge(other_ca, uris=[], subject_cn="legacy-billing"), bundles)
    with sync_server(server_source, interceptor, guarded=guarded) as port:
        outcomes = []
        for source in (ours, federated):
            svid = source.get_svid()
            roots = bundles[meshid.TrustDomain.parse("example.org")].to_pem()
            creds = grpc.ssl_channel_credentials(roots, svid.key_pem(), svid.chain_pem())
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=_pin()) as channel:
                outcomes.append(call(channel))
    assert outcomes[0] == ("OK", "CN=legacy-billing")
    assert outcomes[1][0] == "UNAUTHENTICATED"  # other.org's CA may not vouch for certificates without a SPIFFE ID
