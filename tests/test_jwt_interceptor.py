"""JWT-SVIDs as the caller's identity, against real grpc servers on loopback (issue #16, must-show 2).

The hop that terminates the client's TLS is shown two ways: a TLS channel without a client
certificate to a listener that asks for none (``server_credentials(...,
require_client_certificate=False)``), and real nginx ``grpc_pass`` re-originating TLS to the
service with nginx's own SVID. Tokens are signed with a real key (``generate_key``) whose public
half the server's bundle publishes in ``jwt_authorities``; the attack tokens are assembled by
hand, as an attacker would.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

import meshid
from meshid.ca import Authority, generate_key
from meshid.clock import ManualClock
from meshid.examples import greeter_pb2, greeter_pb2_grpc
from meshid.jwtsvid import JWT_SVID_MAX_BYTES, sign_jwt_svid
from support import (
    FRONTEND_ID,
    INTRUDER_ID,
    SAY_HELLO,
    SERVER_ID,
    aio_server_in_a_thread,
    call,
    free_port,
    handshake_failed,
    nginx_process,
    require_program,
    sync_server,
    tls_channel,
)

KEY = generate_key("ec-p256")
OTHER_KEY = generate_key("ec-p256")
NGINX_ID = "spiffe://example.org/ns/edge/sa/nginx"
ADMIN_METHOD = "/meshid.examples.v1.Greeter/CollectHellos"
# Let grpc carry a header over 8 KiB, so that what refuses the oversized token is meshid's bound.
BIG_METADATA = [("grpc.max_metadata_size", 64 * 1024), ("grpc.absolute_max_metadata_size", 64 * 1024)]


class Greeter(greeter_pb2_grpc.GreeterServicer):
    """Says who called and how: "<source> <SPIFFE ID>"."""

    def SayHello(self, request: Any, context: Any) -> Any:
        identity = meshid.peer_identity(context)
        assert (identity.jwt_svid is not None) == (identity.source == "jwt")
        return greeter_pb2.HelloReply(message="hello", caller=f"{identity.source} {identity.spiffe_id}")

    def CollectHellos(self, request_iterator: Any, context: Any) -> Any:
        names = [r.name for r in request_iterator]
        return greeter_pb2.HelloReply(message=",".join(names), caller=str(meshid.peer_identity(context).spiffe_id))

    def SayHelloStream(self, request: Any, context: Any) -> Any:
        for _ in range(3):
            yield greeter_pb2.HelloReply(message="hello", caller=meshid.peer_identity(context).source)


class Signer:
    """A JwtSource that signs with the test's JWT key, counting what it hands out."""

    def __init__(self, spiffe_id: str, *, key: Any = KEY, kid: str = "k1", lifetime: float = 300) -> None:
        self.spiffe_id = meshid.SpiffeId.parse(spiffe_id)
        self.key, self.kid, self.lifetime = key, kid, datetime.timedelta(seconds=lifetime)
        self.fetched: list[tuple[str, ...]] = []
        self.now = lambda: datetime.datetime.now(datetime.UTC)

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: meshid.SpiffeId | None = None) -> meshid.JwtSvid:
        self.fetched.append(tuple(audience))
        who = spiffe_id or self.spiffe_id
        return sign_jwt_svid(self.key, self.kid, who, audience, lifetime=self.lifetime, now=self.now())

    def get_jwt_bundles(self) -> meshid.BundleSet:
        raise NotImplementedError


@pytest.fixture(scope="module")
def jwt_bundles(ca: Authority, other_ca: Authority) -> meshid.BundleSet:
    return meshid.BundleSet.of(
        meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"k1": KEY.public_key()}),
        meshid.TrustBundle(other_ca.trust_domain, other_ca.roots, jwt_authorities={"o1": OTHER_KEY.public_key()}),
    )


@pytest.fixture(scope="module")
def source(ca: Authority, jwt_bundles: meshid.BundleSet) -> meshid.StaticSource:
    return meshid.StaticSource(ca.issue_svid(SERVER_ID, dns_names=["localhost"]), jwt_bundles)


def _policy(sources: list[str] | None = None, **extra: Any) -> meshid.AuthorizationPolicy:
    doc: dict[str, Any] = {
        "name": "greeter",
        "allow": [
            {
                "name": "frontend",
                "methods": [SAY_HELLO, "/meshid.examples.v1.Greeter/SayHelloStream"],
                "spiffe_ids": [FRONTEND_ID],
            },
            {"name": "partner", "methods": [SAY_HELLO], "trust_domains": ["other.org"]},
            {"name": "admin", "methods": [ADMIN_METHOD], "spiffe_ids": [FRONTEND_ID], "identity_sources": ["x509"]},
        ],
        **extra,
    }
    if sources is not None:
        doc["identity_sources"] = sources
        if "x509" not in sources:  # a rule may not name a source its policy leaves out
            doc["allow"].pop()
    return meshid.AuthorizationPolicy.from_dict(doc)


@contextlib.contextmanager
def server(
    source: meshid.StaticSource,
    policy: meshid.AuthorizationPolicy,
    *,
    client_certificates: bool = False,
    servicer: Any = None,
    **kw: Any,
) -> Iterator[int]:
    """A greeter behind meshid's interceptor on 127.0.0.1; yields its port and always stops it."""
    interceptor = meshid.AuthorizationInterceptor(policy, source=source, **kw)
    with sync_server(
        source,
        interceptor,
        servicer=servicer or Greeter(),
        require_client_certificate=client_certificates,
        options=BIG_METADATA,
    ) as port:
        yield port


def _pin(spiffe_id: str = SERVER_ID) -> list[tuple[str, Any]]:
    return [
        ("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(spiffe_id))),
        *BIG_METADATA,
    ]


def _tls_only(port: int, bundles: meshid.BundleSet, call_creds: grpc.CallCredentials | None = None) -> grpc.Channel:
    """:func:`support.tls_channel` to the greeter, allowed headers over 8 KiB."""
    return tls_channel(port, bundles, call_creds, options=BIG_METADATA)


def _mtls(port: int, ca: Authority, bundles: meshid.BundleSet, spiffe_id: str, call_creds: Any = None) -> grpc.Channel:
    svid = ca.issue_svid(spiffe_id)
    creds = grpc.ssl_channel_credentials(bundles[ca.trust_domain].to_pem(), svid.key_pem(), svid.chain_pem())
    if call_creds is not None:
        creds = grpc.composite_channel_credentials(creds, call_creds)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=_pin())


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _token(spiffe_id: str = FRONTEND_ID, audience: Sequence[str] = (SERVER_ID,), **kw: Any) -> str:
    now = datetime.datetime.now(datetime.UTC)
    return sign_jwt_svid(
        kw.pop("key", KEY),
        kw.pop("kid", "k1"),
        meshid.SpiffeId.parse(spiffe_id),
        audience,
        lifetime=datetime.timedelta(minutes=5),
        now=now,
    ).token


# --- allowed and denied by policy, through a TLS channel without a client certificate ----------


def test_a_jwt_svid_identifies_a_caller_without_a_client_certificate(source, jwt_bundles) -> None:
    creds = meshid.jwt_call_credentials(Signer(FRONTEND_ID), audience=SERVER_ID)
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles, creds) as channel:
        assert call(channel) == ("OK", f"jwt {FRONTEND_ID}")


def test_a_jwt_caller_the_policy_does_not_allow_is_denied(source, jwt_bundles) -> None:
    creds = meshid.jwt_call_credentials(Signer(INTRUDER_ID), audience=SERVER_ID)
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles, creds) as channel:
        code, details = call(channel)
    assert code == "PERMISSION_DENIED" and INTRUDER_ID in details, details


def test_a_federated_jwt_caller_is_matched_by_its_trust_domain(source, jwt_bundles) -> None:
    creds = meshid.jwt_call_credentials(
        Signer("spiffe://other.org/partner", key=OTHER_KEY, kid="o1"), audience=SERVER_ID
    )
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles, creds) as channel:
        assert call(channel) == ("OK", "jwt spiffe://other.org/partner")


def test_a_configured_audience_is_accepted(source, jwt_bundles) -> None:
    policy = _policy(["jwt"], jwt_audiences=["greeter"])
    with server(source, policy) as port, _tls_only(port, jwt_bundles) as channel:
        assert call(channel, _bearer(_token(audience=["greeter"]))) == ("OK", f"jwt {FRONTEND_ID}")
        code, details = call(channel, _bearer(_token()))  # its own SPIFFE ID is then not an audience
    assert code == "UNAUTHENTICATED" and "does not name this server" in details, details


def test_a_jwt_only_policy_refuses_a_call_without_a_token(source, jwt_bundles) -> None:
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles) as channel:
        code, details = call(channel)
    assert code == "UNAUTHENTICATED" and details.startswith("meshid: JWT-SVID: none sent"), details


def test_jwt_svids_are_never_accepted_by_default(source, jwt_bundles) -> None:
    # The default policy (identity_sources: [x509]) never reads the token: no certificate, no caller.
    with server(source, _policy()) as port, _tls_only(port, jwt_bundles) as channel:
        code, details = call(channel, _bearer(_token()))
    assert code == "UNAUTHENTICATED" and "no verified client certificate" in details, details


def test_client_certificates_stay_required_by_default(source, jwt_bundles) -> None:
    with (
        server(source, _policy(["x509", "jwt"]), client_certificates=True) as port,
        _tls_only(port, jwt_bundles) as channel,
    ):
        code, details = call(channel, _bearer(_token()))
    assert handshake_failed(code, details), (code, details)  # no certificate was sent: no handshake


def test_grpc_authz_policies_accept_jwt_by_a_loader_option(source, jwt_bundles) -> None:
    doc = {
        "name": "greeter",
        "allow_rules": [
            {"name": "frontend", "source": {"principals": [FRONTEND_ID]}, "request": {"paths": [SAY_HELLO]}}
        ],
    }
    policy = meshid.AuthorizationPolicy.from_dict(doc, identity_sources=["jwt"])
    with server(source, policy) as port, _tls_only(port, jwt_bundles) as channel:
        assert call(channel, _bearer(_token())) == ("OK", f"jwt {FRONTEND_ID}")
        assert call(channel, _bearer(_token(INTRUDER_ID)))[0] == "PERMISSION_DENIED"


def test_a_streaming_call_is_authorized_by_its_token(source, jwt_bundles) -> None:
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles) as channel:
        replies = greeter_pb2_grpc.GreeterStub(channel).SayHelloStream(
            greeter_pb2.HelloRequest(name="a"), metadata=_bearer(_token()), timeout=10
        )
        assert [r.caller for r in replies] == ["jwt"] * 3


def test_a_jwt_callers_audit_record_says_so_and_a_bad_token_is_recorded(source, jwt_bundles, caplog) -> None:
    caplog.set_level(logging.INFO, logger="meshid.audit")
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles) as channel:
        assert call(channel, _bearer(_token()))[0] == "OK"
        assert call(channel, _bearer(_token(audience=["elsewhere"])))[0] == "UNAUTHENTICATED"
    records = [r.meshid_audit for r in caplog.records if hasattr(r, "meshid_audit")]  # type: ignore[attr-defined]
    allowed, refused = records
    assert (allowed["caller"], allowed["identity_source"], allowed["serial"]) == (FRONTEND_ID, "jwt", None)
    assert (refused["stage"], refused["caller"]) == ("authentication", None)
    assert "does not name this server" in refused["reason"] and "identity_source" not in refused


class Ticking(Greeter):
    """Moves the server's clock on by the token's lifetime after each streamed message."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock

    def SayHelloStream(self, request: Any, context: Any) -> Any:
        for _ in range(3):
            yield greeter_pb2.HelloReply(message="hello", caller=meshid.peer_identity(context).source)
            self.clock.advance(400)


def test_a_stream_ends_when_its_token_expires(source, jwt_bundles) -> None:
    clock = ManualClock()
    token = sign_jwt_svid(
        KEY,
        "k1",
        meshid.SpiffeId.parse(FRONTEND_ID),
        [SERVER_ID],
        lifetime=datetime.timedelta(minutes=5),
        now=clock.now(),
    ).token
    got = []
    with (
        server(source, _policy(["jwt"]), servicer=Ticking(clock), clock=clock) as port,
        _tls_only(port, jwt_bundles) as channel,
    ):
        replies = greeter_pb2_grpc.GreeterStub(channel).SayHelloStream(
            greeter_pb2.HelloRequest(name="a"), metadata=_bearer(token), timeout=10
        )
        with pytest.raises(grpc.RpcError) as info:
            got.extend(r.caller for r in replies)
    assert got == ["jwt"]  # the second message comes after exp: the stream is ended
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "JWT-SVID expired at" in info.value.details()


def test_an_unauthenticated_method_names_a_caller_with_a_good_token(source, jwt_bundles) -> None:
    with server(source, _policy(["jwt"]), unauthenticated_methods=[SAY_HELLO]) as port:
        with _tls_only(port, jwt_bundles) as channel:
            assert call(channel, _bearer(_token())) == ("OK", f"jwt {FRONTEND_ID}")
            # open to all: a bad token is no refusal there, and names nobody
            code, details = call(channel, _bearer(_token(audience=["elsewhere"])))
    assert (code, details) == (
        "UNKNOWN",
        "Exception calling application: peer identity: none for this call; build the server with meshid's AuthorizationInterceptor",
    ), details  # the handler finds no caller


# --- a certificate and a token on one connection --------------------------------------------------


def test_the_token_decides_when_the_policy_accepts_both(ca, source, jwt_bundles) -> None:
    with server(source, _policy(["x509", "jwt"]), client_certificates=True) as port:
        with _mtls(port, ca, jwt_bundles, INTRUDER_ID) as channel:
            # A hop's certificate (here the intruder's) with the caller's token: the token names the caller.
            assert call(channel, _bearer(_token())) == ("OK", f"jwt {FRONTEND_ID}")
            code, details = call(channel)  # without a token, the certificate decides
            assert code == "PERMISSION_DENIED" and INTRUDER_ID in details
        with _mtls(port, ca, jwt_bundles, FRONTEND_ID) as channel:
            assert call(channel) == ("OK", f"x509 {FRONTEND_ID}")
            # A bad token is refused, never passed over for the good certificate.
            code, details = call(channel, _bearer(_token(audience=["elsewhere"])))
            assert code == "UNAUTHENTICATED" and "does not name this server" in details, details


def test_a_rule_for_certificates_only_does_not_match_a_token(ca, source, jwt_bundles) -> None:
    with server(source, _policy(["x509", "jwt"]), client_certificates=True) as port:
        with _mtls(port, ca, jwt_bundles, FRONTEND_ID) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            hellos = [greeter_pb2.HelloRequest(name="a")]
            assert stub.CollectHellos(iter(hellos), timeout=10).caller == FRONTEND_ID
            with pytest.raises(grpc.RpcError) as info:
                stub.CollectHellos(iter(hellos), metadata=_bearer(_token()), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_aio_interceptor_takes_a_token_too(ca, source, jwt_bundles) -> None:
    interceptor = meshid.aio.AuthorizationInterceptor(_policy(["x509", "jwt"]), source=source)
    with aio_server_in_a_thread(source, interceptor) as port, _mtls(port, ca, jwt_bundles, INTRUDER_ID) as channel:
        allowed = call(channel, _bearer(_token()))
        refused = call(channel, _bearer(_token(audience=["elsewhere"])))
    assert allowed == ("OK", FRONTEND_ID)  # support's greeter names the SPIFFE ID: the token's, not the certificate's
    assert refused[0] == "UNAUTHENTICATED" and "JWT-SVID: aud" in refused[1], refused


# --- the issue's attack list, each against the real server -------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": FRONTEND_ID, "aud": SERVER_ID, "exp": now + 300, "iat": now, **changes}
    return {k: v for k, v in claims.items() if v is not None}


def _signed(claims: dict[str, Any], key: Any = KEY, kid: str = "k1") -> str:
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def _hmac(alg: str) -> str:
    secret = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = (
        f"{_b64(json.dumps({'alg': alg, 'kid': 'k1', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(_claims()).encode())}"
    )
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def _with_header(header: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}.{_b64(b'not a signature')}"


def _unsigned() -> str:
    return f"{_b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{_b64(json.dumps(_claims()).encode())}."


ATTACKS = {
    "alg-none": (_unsigned, "alg 'none' is refused"),
    "hmac-key-confusion": (lambda: _hmac("HS256"), "is an HMAC algorithm, refused"),
    "unknown-kid": (lambda: _signed(_claims(), kid="k9"), "kid 'k9' is not a JWT key of trust domain example.org"),
    "key-of-another-trust-domain": (
        lambda: _signed(_claims(), key=OTHER_KEY, kid="o1"),
        "kid 'o1' is not a JWT key of trust domain example.org",
    ),
    "forged-signature": (lambda: _signed(_claims(), key=OTHER_KEY, kid="k1"), "signature does not verify"),
    "expired": (lambda: _signed(_claims(exp=int(time.time()) - 120)), "token expired at"),
    "not-yet-valid": (lambda: _signed(_claims(nbf=int(time.time()) + 600)), "not yet valid (nbf"),
    "wrong-audience": (
        lambda: _signed(_claims(aud="spiffe://example.org/ns/prod/sa/billing")),
        "does not name this server",
    ),
    "missing-audience": (lambda: _signed(_claims(aud=None)), "claim 'aud' is missing"),
    "sub-not-a-spiffe-id": (
        lambda: _signed(_claims(sub="https://example.org/frontend")),
        "claim 'sub' is not a SPIFFE ID",
    ),
    "over-8-kib": (lambda: _signed(_claims(pad="x" * JWT_SVID_MAX_BYTES)), "more than the 8192 allowed"),
    "malformed-base64": (lambda: "eyJhbGciOiJFUzI1NiJ9!.e30.AA", "malformed token"),
    "malformed-json": (lambda: f"{_b64(b'{nope')}.{_b64(b'{}')}.AA", "malformed token"),
    "two-authorization-headers": (None, "more than one 'authorization' header"),
    # Unsigned header tricks that PyJWT refuses with its own InvalidTokenError (not a DecodeError).
    "kid-not-a-string": (lambda: _with_header({"alg": "ES256", "kid": 5}), "malformed token: Key ID header"),
    "unsupported-crit": (
        lambda: _with_header({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
        "malformed token: Unsupported critical extension",
    ),
    # Signed, so only a trust domain's key could make them; still refused with a reason, not a traceback.
    "exp-beyond-a-float": (lambda: _signed(_claims(exp=10**400)), "claim 'exp' must be a NumericDate"),
    "nbf-beyond-a-float": (lambda: _signed(_claims(nbf=10**400)), "claim 'nbf' must be a NumericDate"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_bad_token_is_unauthenticated_with_its_reason(attack: str, source, jwt_bundles) -> None:
    make, fragment = ATTACKS[attack]
    metadata = _bearer(make()) if make is not None else [*_bearer(_token()), *_bearer(_token())]
    with server(source, _policy(["jwt"])) as port, _tls_only(port, jwt_bundles) as channel:
        code, details = call(channel, metadata)
    assert code == "UNAUTHENTICATED", (code, details)
    assert details.startswith("meshid: JWT-SVID: ") and fragment in details, details
    assert FRONTEND_ID not in details or attack in ("sub-not-a-spiffe-id",), details  # nothing but the reason


# --- real nginx grpc_pass: terminates the client's TLS, re-originates TLS with its own SVID --------

NGINX_CONF = """
{user}
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    large_client_header_buffers 4 16k;
    server {{
        listen 127.0.0.1:{listen} ssl http2;
        ssl_certificate {svid}/svid.pem;
        ssl_certificate_key {svid}/svid.key;
        ssl_protocols TLSv1.3;
        location / {{
            grpc_pass grpcs://127.0.0.1:{upstream};
            grpc_ssl_certificate {svid}/svid.pem;
            grpc_ssl_certificate_key {svid}/svid.key;
            grpc_ssl_trusted_certificate {svid}/bundle.pem;
            grpc_ssl_verify on;
            grpc_ssl_name {upstream_name};
            grpc_ssl_server_name on;
            grpc_ssl_protocols TLSv1.3;
        }}
    }}
}}
"""


@pytest.fixture
def nginx_hop(tmp_path: Path, ca: Authority, source) -> Iterator[tuple[int, int]]:
    """nginx on a free loopback port, terminating clients' TLS (no client certificate asked) and
    forwarding to a greeter that requires a client certificate (nginx's SVID) and accepts tokens."""
    nginx = require_program("nginx", "/usr/sbin/nginx")
    svid_dir, run = tmp_path / "svid", tmp_path / "run"
    svid_dir.mkdir()
    run.mkdir()
    nginx_svid = ca.issue_svid(NGINX_ID, dns_names=["localhost"])
    (svid_dir / "svid.pem").write_bytes(nginx_svid.chain_pem())
    (svid_dir / "svid.key").write_bytes(nginx_svid.key_pem())
    (svid_dir / "svid.key").chmod(0o600)
    (svid_dir / "bundle.pem").write_bytes(meshid.TrustBundle(ca.trust_domain, ca.roots).to_pem())
    with server(source, _policy(["x509", "jwt"]), client_certificates=True) as upstream:
        listen = free_port()
        conf = NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            run=run,
            listen=listen,
            svid=svid_dir,
            upstream=upstream,
            upstream_name=meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)),
        )
        (run / "nginx.conf").write_text(conf)
        with nginx_process(run, listen, nginx):
            yield listen, upstream


def _through_nginx(port: int, bundles: meshid.BundleSet, creds: grpc.CallCredentials | None = None) -> grpc.Channel:
    return tls_channel(port, bundles, creds, server_id=NGINX_ID, options=BIG_METADATA)


def test_a_jwt_svid_crosses_nginx(nginx_hop, jwt_bundles) -> None:
    listen, _ = nginx_hop
    allowed = meshid.jwt_call_credentials(Signer(FRONTEND_ID), audience=SERVER_ID)
    with _through_nginx(listen, jwt_bundles, allowed) as channel:
        assert call(channel) == ("OK", f"jwt {FRONTEND_ID}")
    denied = meshid.jwt_call_credentials(Signer(INTRUDER_ID), audience=SERVER_ID)
    with _through_nginx(listen, jwt_bundles, denied) as channel:
        code, details = call(channel)
    assert code == "PERMISSION_DENIED" and INTRUDER_ID in details, details


def test_without_a_token_nginx_itself_is_the_caller(nginx_hop, jwt_bundles) -> None:
    listen, _ = nginx_hop
    with _through_nginx(listen, jwt_bundles) as channel:
        code, details = call(channel)
    assert code == "PERMISSION_DENIED" and NGINX_ID in details, details


@pytest.mark.parametrize("attack", ["alg-none", "hmac-key-confusion", "expired", "wrong-audience", "forged-signature"])
def test_a_bad_token_through_nginx_is_unauthenticated(attack: str, nginx_hop, jwt_bundles) -> None:
    listen, _ = nginx_hop
    make, fragment = ATTACKS[attack]
    assert make is not None
    with _through_nginx(listen, jwt_bundles) as channel:
        code, details = call(channel, _bearer(make()))
    assert code == "UNAUTHENTICATED" and fragment in details, (code, details)


# --- the JWT-SVID standard §7.3: a bearer token travels over links that keep it confidential -------


@contextlib.contextmanager
def _plaintext_server(source: meshid.StaticSource, policy: meshid.AuthorizationPolicy, address: str) -> Iterator[str]:
    interceptor = meshid.AuthorizationInterceptor(policy, source=source)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServicer_to_server(Greeter(), grpc_server)
    port = grpc_server.add_insecure_port(address)
    grpc_server.start()
    try:
        yield address.replace(":0", f":{port}")
    finally:
        grpc_server.stop(None).wait()


def test_a_token_sent_over_plaintext_tcp_is_unauthenticated(source, jwt_bundles) -> None:
    """Whoever saw it on the wire could replay it for minutes: refused, as a call without TLS."""
    with _plaintext_server(source, _policy(["jwt"]), "127.0.0.1:0") as target, grpc.insecure_channel(target) as channel:
        code, details = call(channel, _bearer(_token()))
    assert code == "UNAUTHENTICATED", (code, details)
    assert "JWT-SVID" in details and "TLS" in details, details


def test_a_token_over_a_unix_socket_is_accepted(source, jwt_bundles, tmp_path) -> None:
    """A non-network link between two processes of one host is the standard's own exception."""
    with _plaintext_server(source, _policy(["jwt"]), f"unix:{tmp_path}/greeter.sock") as target:
        with grpc.insecure_channel(target) as channel:
            assert call(channel, _bearer(_token())) == ("OK", f"jwt {FRONTEND_ID}")
