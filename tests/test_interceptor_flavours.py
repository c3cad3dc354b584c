"""One test body per behaviour, run against both interceptors: ``meshid.AuthorizationInterceptor``
on a sync grpc server and ``meshid.aio.AuthorizationInterceptor`` on a grpc.aio server (its own
event loop in a thread). Clients are real (grpcio, or grpclib for what grpcio cannot offer)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import meshid
import meshid.aio
from support import (
    FRONTEND_ID,
    INTRUDER_ID,
    SERVER_ID,
    RawSource,
    aio_server_in_a_thread,
    call,
    forge,
    grpclib_context,
    grpclib_say_hello,
    handshake_failed,
    sync_server,
)

PROXY_ID = "spiffe://example.org/ns/edge/sa/proxy"
XFCC = "x-forwarded-client-cert"
RULES = [{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]


@dataclasses.dataclass(frozen=True)
class Flavour:
    name: str
    interceptor: type
    serve: Callable[[meshid.Source, Any], AbstractContextManager[int]]

    def server(self, source: meshid.Source, policy: dict[str, Any] | meshid.AuthorizationPolicy, **kw: Any) -> Any:
        if isinstance(policy, dict):
            policy = meshid.AuthorizationPolicy.from_dict(policy)
        interceptor = self.interceptor(policy, source=source, **kw)
        return interceptor, self.serve(source, interceptor)


FLAVOURS = [
    Flavour("sync", meshid.AuthorizationInterceptor, sync_server),
    Flavour("sync-server", meshid.AuthorizationInterceptor, functools.partial(sync_server, guarded=True)),
    Flavour("aio", meshid.aio.AuthorizationInterceptor, aio_server_in_a_thread),
    Flavour("aio-server", meshid.aio.AuthorizationInterceptor, functools.partial(aio_server_in_a_thread, guarded=True)),
]


@pytest.fixture(params=FLAVOURS, ids=lambda f: f.name)
def flavour(request: pytest.FixtureRequest) -> Iterator[Flavour]:
    yield request.param


def _greet(port: int, source: meshid.Source, *, server_id: str = SERVER_ID, metadata: Any = None) -> tuple[str, str]:
    with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=server_id) as channel:
        return call(channel, metadata=metadata)


def test_no_client_certificate_fails_the_handshake(flavour: Flavour, bundles, server_source) -> None:
    _, server = flavour.server(server_source, {"allow": RULES})
    roots = bundles[meshid.TrustDomain.parse("example.org")].to_pem()
    pin = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))]
    with server as port, grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(roots), options=pin) as channel:
        code, details = call(channel)
        assert handshake_failed(code, details), (code, details)
        assert _greet(port, meshid.StaticSource(server_source.get_svid(), bundles))[0] == "PERMISSION_DENIED"  # it is up


def test_handler_sees_the_verified_caller(flavour: Flavour, ca, bundles, server_source) -> None:
    _, server = flavour.server(server_source, {"allow": RULES})
    with server as port:
        assert _greet(port, meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)) == ("OK", FRONTEND_ID)
        code, details = _greet(port, meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles))
    assert code == "PERMISSION_DENIED" and f"{INTRUDER_ID} may not call" in details


def test_server_id_mismatch_is_refused_before_any_request(flavour: Flavour, ca, bundles, server_source, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    _, server = flavour.server(server_source, {"allow": RULES})
    frontend = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with server as port:
        code, details = _greet(port, frontend, server_id="spiffe://example.org/ns/prod/sa/impostor")
        assert handshake_failed(code, details), (code, details)
        assert not [r for r in caplog.records if r.name == "meshid.audit"], "the server saw a request"
        assert _greet(port, frontend) == ("OK", FRONTEND_ID)


def _source_of(pair: Any, bundles: meshid.BundleSet) -> RawSource:
    chain, key = pair
    return RawSource(chain, key, bundles)


def test_non_spiffe_peers_only_when_the_policy_admits_them(flavour: Flavour, ca, bundles, server_source) -> None:
    legacy = _source_of(forge(ca, uris=[], subject_cn="legacy"), bundles)
    rules = [*RULES, {"name": "legacy", "methods": ["*"], "subject_patterns": ["CN=legacy"]}]
    _, closed = flavour.server(server_source, {"allow": rules})
    with closed as port:
        code, details = _greet(port, legacy)
    assert code == "UNAUTHENTICATED" and "carries no SPIFFE ID" in details
    _, admitting = flavour.server(server_source, {"allow": rules, "allow_non_spiffe_peers": True})
    with admitting as port:
        assert _greet(port, legacy) == ("OK", "CN=legacy")


def _xfcc(cert: x509.Certificate) -> str:
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return f'By={SERVER_ID};Hash={digest};Cert="{urllib.parse.quote(cert.public_bytes(Encoding.PEM).decode())}"'


def test_trusted_proxy_forwards_the_caller(flavour: Flavour, ca, bundles, server_source) -> None:
    _, server = flavour.server(server_source, {"allow": RULES}, trusted_proxies=[PROXY_ID])
    header = [(XFCC, _xfcc(ca.issue_svid(FRONTEND_ID).leaf))]
    with server as port:
        via_proxy = _greet(port, meshid.StaticSource(ca.issue_svid(PROXY_ID), bundles), metadata=header)
        from_intruder = _greet(port, meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles), metadata=header)
        proxy_alone = _greet(port, meshid.StaticSource(ca.issue_svid(PROXY_ID), bundles))
    assert via_proxy == ("OK", FRONTEND_ID)
    assert from_intruder[0] == "PERMISSION_DENIED" and INTRUDER_ID in from_intruder[1]  # the header is ignored
    assert proxy_alone[0] == "UNAUTHENTICATED" and "forwarded no client certificate" in proxy_alone[1]


def test_revoked_peer_is_refused(flavour: Flavour, ca, bundles, server_source) -> None:
    revoked = ca.issue_svid(FRONTEND_ID)
    interceptor, server = flavour.server(server_source, {"allow": RULES})
    interceptor.set_revocation_check(lambda peer: peer.serial == revoked.serial)
    with server as port:
        code, details = _greet(port, meshid.StaticSource(revoked, bundles))
        assert _greet(port, meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)) == ("OK", FRONTEND_ID)
    assert code == "UNAUTHENTICATED" and "is revoked" in details


def test_tls12_is_refused_unless_the_policy_allows_it(flavour: Flavour, ca, bundles, server_source, tmp_path) -> None:
    def tls12_only() -> ssl.SSLContext:
        ctx = grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    _, strict = flavour.server(server_source, {"allow": RULES})
    with strict as port:
        refused = grpclib_say_hello(port, tls12_only())
        tls13 = grpclib_say_hello(port, grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path))
    _, lenient = flavour.server(server_source, {"allow": RULES, "allow_tls12": True})
    with lenient as port:
        admitted = grpclib_say_hello(port, tls12_only())
    assert refused[0] == "UNAUTHENTICATED" and "requires TLS 1.3" in refused[1]
    assert tls13 == ("OK", FRONTEND_ID)
    assert admitted == ("OK", FRONTEND_ID)


def test_classical_key_exchange_is_denied_when_the_policy_requires_pq(
    flavour: Flavour, ca, bundles, server_source, tmp_path
) -> None:
    _, server = flavour.server(server_source, {"allow": RULES, "require_pq_key_exchange": True})
    with server as port:
        classical = grpclib_say_hello(port, grpclib_context(ca.issue_svid(FRONTEND_ID), bundles, tmp_path))
        hybrid = _greet(port, meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles))  # grpcio offers X25519MLKEM768
    assert classical[0] == "PERMISSION_DENIED" and "is classical" in classical[1]
    assert hybrid == ("OK", FRONTEND_ID)
