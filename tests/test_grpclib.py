"""Another gRPC stack: a grpclib client (pure Python, on Python's ssl module) calls a meshid server."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

import meshid
from meshid._proto import greeter_pb2  # the example service's messages
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, call, sync_server

pytestmark = pytest.mark.timeout(60)


def _context(svid: meshid.X509Svid, bundles: meshid.BundleSet, tmp_path) -> ssl.SSLContext:
    cert, key = tmp_path / f"{svid.serial:x}.pem", tmp_path / f"{svid.serial:x}.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=bundles.all_roots_pem().decode())
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def _say_hello(port: int, ctx: ssl.SSLContext) -> tuple[Status, str]:
    # grpclib checks the server's name like grpcio: pin the greeter's identity DNS name.
    pin = Configuration(ssl_target_name_override=meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))
    channel = Channel("127.0.0.1", port, ssl=ctx, config=pin)
    try:
        async with channel.request(
            SAY_HELLO, Cardinality.UNARY_UNARY, greeter_pb2.HelloRequest, greeter_pb2.HelloReply
        ) as stream:
            await stream.send_message(greeter_pb2.HelloRequest(name="grpclib"), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        return Status.OK, reply.caller if reply is not None else ""
    except GRPCError as err:
        return err.status, err.message or ""
    finally:
        channel.close()


def _policy(**options: object) -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}], **options}
    )


def test_grpclib_client_is_allowed_or_denied_as_the_policy_says(ca, bundles, server_source, tmp_path) -> None:
    interceptor = meshid.AuthorizationInterceptor(_policy(), source=server_source)
    with sync_server(server_source, interceptor) as port:
        allowed = asyncio.run(_say_hello(port, _context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path)))
        denied = asyncio.run(_say_hello(port, _context(ca.issue_svid(INTRUDER_ID), bundles, tmp_path)))
    assert allowed == (Status.OK, FRONTEND_ID)
    assert denied[0] == Status.PERMISSION_DENIED and INTRUDER_ID in denied[1]


def test_classical_key_exchange_is_denied_when_the_policy_requires_pq(ca, bundles, server_source, tmp_path) -> None:
    interceptor = meshid.AuthorizationInterceptor(_policy(require_pq_key_exchange=True), source=server_source)
    with sync_server(server_source, interceptor) as port:
        status, message = asyncio.run(_say_hello(port, _context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path)))
        # grpcio itself negotiates a hybrid (X25519MLKEM768), so the same caller over grpcio passes.
        with meshid.secure_channel(
            f"127.0.0.1:{port}", meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles), server_id=SERVER_ID
        ) as channel:
            assert call(channel) == ("OK", FRONTEND_ID)
    assert status == Status.PERMISSION_DENIED
    assert "is classical" in message and "post-quantum" in message
    assert "X25519" in message or "secp" in message.lower()  # the group Python's OpenSSL chose


def test_tls12_is_refused_unless_the_policy_allows_it(ca, bundles, server_source, tmp_path) -> None:
    def tls12_only() -> ssl.SSLContext:
        ctx = _context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a client that offers only TLS 1.2
        return ctx

    with sync_server(server_source, meshid.AuthorizationInterceptor(_policy(), source=server_source)) as port:
        refused = asyncio.run(_say_hello(port, tls12_only()))
        tls13 = asyncio.run(_say_hello(port, _context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path)))
    with sync_server(
        server_source, meshid.AuthorizationInterceptor(_policy(allow_tls12=True), source=server_source)
    ) as port:
        admitted = asyncio.run(_say_hello(port, tls12_only()))
    assert refused[0] == Status.UNAUTHENTICATED
    assert "negotiated TLSv1.2" in refused[1] and "requires TLS 1.3" in refused[1]
    assert tls13 == (Status.OK, FRONTEND_ID)
    assert admitted == (Status.OK, FRONTEND_ID)
