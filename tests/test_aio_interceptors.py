"""The grpc.aio interceptor against real grpc.aio servers over mTLS (pair: test_interceptors.py),
each test twice (``guarded``): the interceptor passed to ``grpc.aio.server`` and attached by ``meshid.aio.server``."""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
import pytest

import meshid
import meshid.aio
from refusals import CASES, Case
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, aio_server, handshake_failed, hello, stub


async def _call(channel) -> tuple[str, str]:
    try:
        reply = await stub(channel).SayHello(hello(), timeout=10)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", reply.caller


def _pin():
    return [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_caller_matrix(case: Case, ca, other_ca, bundles, server_source, policy, guarded: bool) -> None:
    source = case.make_source(ca, other_ca, bundles)
    svid = source.get_svid()
    roots = bundles[meshid.TrustDomain.parse("example.org")].to_pem()

    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        async with aio_server(server_source, interceptor, guarded=guarded) as port:
            creds = grpc.ssl_channel_credentials(roots, svid.key_pem(), svid.chain_pem())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=_pin()) as channel:
                return await _call(channel)

    code, details = asyncio.run(run())
    if case.outcome == "HANDSHAKE":
        assert handshake_failed(code, details), (code, details)
    else:
        assert code == case.outcome, details
        assert case.detail in details


def test_all_four_rpc_shapes_are_authorized(ca, bundles, server_source, policy, guarded: bool) -> None:
    allowed = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    denied = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)

    async def requests():
        for name in ("a", "b"):
            yield hello(name)

    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        async with aio_server(server_source, interceptor, guarded=guarded) as port:
            async with meshid.aio.secure_channel(f"127.0.0.1:{port}", allowed, server_id=SERVER_ID) as channel:
                s = stub(channel)
                assert (await s.SayHello(hello("a"), timeout=10)).caller == FRONTEND_ID
                assert [r.caller async for r in s.SayHelloStream(hello("a"), timeout=10)] == [FRONTEND_ID] * 3
                assert (await s.CollectHellos(requests(), timeout=10)).message == "hello a,b"
                assert [r.message async for r in s.Chat(requests(), timeout=10)] == ["hello a", "hello b"]
            async with meshid.aio.secure_channel(f"127.0.0.1:{port}", denied, server_id=SERVER_ID) as channel:
                s = stub(channel)

                async def drain(call):
                    return [r async for r in call]

                async def no_requests():
                    # The refusal comes at call start, before any message. Sending messages
                    # into a call the server has already ended races in grpc.aio's client
                    # (it may report INTERNAL "Failed execute_batch" instead of the status).
                    return
                    yield

                attempts = [
                    s.SayHello(hello(), timeout=10),
                    drain(s.SayHelloStream(hello(), timeout=10)),
                    s.CollectHellos(no_requests(), timeout=10),
                    drain(s.Chat(no_requests(), timeout=10)),
                ]
                for attempt in attempts:
                    with pytest.raises(grpc.RpcError) as info:
                        await attempt
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert INTRUDER_ID in info.value.details()

    asyncio.run(run())


def test_unknown_method_is_authorized_before_unimplemented(ca, bundles, server_source, policy, guarded: bool) -> None:
    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        out = []
        async with aio_server(server_source, interceptor, guarded=guarded) as port:
            for sid in (FRONTEND_ID, INTRUDER_ID):
                source = meshid.StaticSource(ca.issue_svid(sid), bundles)
                async with meshid.aio.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                    try:
                        await channel.unary_unary("/meshid.examples.v1.Greeter/NoSuchMethod")(b"", timeout=10)
                    except grpc.RpcError as err:
                        out.append(err.code())
        return out

    assert asyncio.run(run()) == [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED]


def test_every_decision_is_one_audit_record(ca, bundles, server_source, policy, caplog, guarded: bool) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")

    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        async with aio_server(server_source, interceptor, guarded=guarded) as port:
            for sid in (FRONTEND_ID, INTRUDER_ID):
                source = meshid.StaticSource(ca.issue_svid(sid), bundles)
                async with meshid.aio.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                    await _call(channel)

    asyncio.run(run())
    records = [r.meshid_audit for r in caplog.records if r.name == "meshid.audit"]
    assert [(r["caller"], r["method"], r["decision"], r["rule"]) for r in records] == [
        (FRONTEND_ID, SAY_HELLO, "allow", "frontend"),
        (INTRUDER_ID, SAY_HELLO, "deny", None),
    ]


def test_reload_swaps_policy_and_a_broken_one_keeps_the_old(ca, bundles, server_source, policy, guarded: bool) -> None:
    intruder_allowed = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "intruder", "methods": ["*"], "spiffe_ids": [INTRUDER_ID]}]}
    )
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)

    async def run():
        interceptor = meshid.aio.AuthorizationInterceptor(policy, source=server_source)
        async with (
            aio_server(server_source, interceptor, guarded=guarded) as port,
            meshid.aio.secure_channel(f"127.0.0.1:{port}", intruder, server_id=SERVER_ID) as channel,
        ):
            before = (await _call(channel))[0]
            interceptor.reload(intruder_allowed)
            after = (await _call(channel))[0]
            with pytest.raises(meshid.InvalidPolicyError):
                interceptor.reload("/nonexistent/policy.yaml")
            kept = (await _call(channel))[0]
        return before, after, kept

    assert asyncio.run(run()) == ("PERMISSION_DENIED", "OK", "OK")
