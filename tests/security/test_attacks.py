"""Issue #6's attack matrix: attacks against a real meshid greeter and a real meshid CA.

One module-scoped world serves every row: a meshid CA (``init_data_dir`` + ``CaServer``) on
loopback, a greeter behind :class:`meshid.AuthorizationInterceptor` whose peers are SVIDs that
CA issued (its CRL wired in with :class:`meshid.CrlWatcher`), a second greeter that reads an
nginx-style forwarded-certificate header, and impostor servers. Each row is one attack and the
exact outcome it must get: ``HANDSHAKE`` (the TLS handshake fails, which grpc reports as
UNAVAILABLE), or the status code of the refusal. A row whose outcome is wrong from a security
standpoint is a bug in meshid and is marked ``xfail(strict=True, reason="BUG: ...")``.

The last test checks that both servers still answer a legitimate call and prints the tally.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError

import meshid

# The generated protobuf messages are private; this module imports them only because the
# attacks speak the wire protocols directly: the CA's (requests the public client never builds:
# a foreign SPIFFE ID in a renewal, oversized CSRs, admin calls from the wrong peer) and, for
# the grpclib client, the example greeter's.
from meshid._proto import greeter_pb2, issuer_pb2, registration_pb2
from meshid.ca import Authority, generate_key
from meshid.ca.bootstrap import anonymous_client, anonymous_root_pem
from meshid.ca.client import AdminClient, fetch_svid, renew_svid
from meshid.ca.csr import build_csr
from meshid.ca.datadir import init_data_dir, load_authority
from meshid.ca.server import CaServer
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, SERVICE, RawSource, forge, hello, sync_server

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
CA_ID = f"spiffe://{TD}/meshid/ca"
ADMIN_ID = f"spiffe://{TD}/meshid/admin"
HELLO_ONLY_ID = f"spiffe://{TD}/ns/prod/sa/hello-only"  # allowed on SayHello and nothing else
GLOB_ID = f"spiffe://{TD}/ns/solo"  # matched by the one-segment glob spiffe://example.org/ns/*
NO_HELLO_ID = f"spiffe://{TD}/ns/prod/sa/no-hello"  # allowed on every method, denied SayHello
PROXY_ID = f"spiffe://{TD}/ns/edge/sa/proxy"  # the greeters' trusted TLS-terminating proxy
REVOKED_ID = f"spiffe://{TD}/ns/prod/sa/revoked"
RENEWER_ID = f"spiffe://{TD}/ns/prod/sa/renewer"
KEY_REUSER_ID = f"spiffe://{TD}/ns/prod/sa/key-reuser"
ORPHAN_ID = f"spiffe://{TD}/ns/prod/sa/orphan"  # its entry is deleted after issuance
TOKEN_ID = f"spiffe://{TD}/ns/prod/sa/token-holder"
PAYMENTS_ID = f"spiffe://{TD}/ns/prod/sa/payments"  # what a thief asks the CA for
NGINX_HEADER = "x-client-cert"
XFCC = "x-forwarded-client-cert"

ISSUER = "/meshid.v1.Issuer"
REGISTRATION = "/meshid.v1.Registration"

#: What the anonymous bootstrap root's key is derived from; copied from meshid/ca/bootstrap.py,
#: whose docstring says the constant is public by design. Anyone can compute that key.
ANONYMOUS_SEED = b"meshid anonymous bootstrap client, public by design, v1"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551



def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


POLICY = {
    "name": "greeter",
    "deny": [{"name": "no-hello", "methods": [SAY_HELLO], "spiffe_ids": [NO_HELLO_ID]}],
    "allow": [
        {"name": "everything", "methods": ["*"], "spiffe_ids": [NO_HELLO_ID]},
        {"name": "frontend", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [FRONTEND_ID]},
        {"name": "hello-only", "methods": [SAY_HELLO], "spiffe_ids": [HELLO_ONLY_ID]},
        {"name": "one-segment-glob", "methods": [SAY_HELLO], "spiffe_id_patterns": [f"spiffe://{TD}/ns/*"]},
    ],
}


# --- the world the attacks run in ------------------------------------------------------------------


@dataclass
class World:
    ca: str  # the CA's address
    folder: Path  # its data folder (admin SVID in folder/admin)
    authority: Authority  # the CA's signing key, loaded from its data folder, to forge with
    other: Authority  # another trust domain's CA, federated into the greeters' bundle set
    bundles: meshid.BundleSet  # example.org (the CA's bundle) and other.org
    greeter: int  # XFCC from PROXY_ID trusted, CRL wired in
    nginx_greeter: int  # NGINX_HEADER from PROXY_ID trusted
    impostor_greeter: int  # a genuine SVID of the intruder, serving the greeter's API
    federated_impostor: int  # other.org's CA vouches for the greeter's identity DNS names
    fake_cas: dict[str, int]  # impostor CAs by kind
    fake_ca_calls: list[str]  # join tokens an impostor CA received
    svids: dict[str, meshid.X509Svid]  # SVIDs the real CA issued, by SPIFFE ID
    used_token: str
    spare_token: str  # valid, never spent
    expiring_token: str
    expiring_at: datetime.datetime
    race_token: str  # valid, never spent: sent by many callers at once
    tmp: Path  # scratch files for the OpenSSL client

    @property
    def bundle_file(self) -> Path:
        return self.folder / "bundle.pem"

    @property
    def ca_bundles(self) -> meshid.BundleSet:
        return meshid.BundleSet.of(meshid.TrustBundle.load(TD, self.bundle_file))

    def issue(self, spiffe_id: str, **kw: Any) -> meshid.X509Svid:
        """An SVID signed by the CA's own key without spending the CA's per-admin rate limit."""
        return self.authority.issue_svid(spiffe_id, **kw)


def _fake_ca(stack: contextlib.ExitStack, svid: meshid.X509Svid, calls: list[str]) -> int:
    """A server that presents ``svid`` and records every join token sent to its IssueWithToken."""

    def steal(request: Any, context: grpc.ServicerContext) -> Any:
        calls.append(request.join_token)
        context.abort(grpc.StatusCode.INTERNAL, "thanks for the token")

    handler = grpc.method_handlers_generic_handler(
        "meshid.v1.Issuer",
        {
            "IssueWithToken": grpc.unary_unary_rpc_method_handler(
                steal,
                request_deserializer=issuer_pb2.IssueWithTokenRequest.FromString,
                response_serializer=issuer_pb2.SvidResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(svid.key_pem(), svid.chain_pem())]))
    server.start()
    stack.callback(lambda: server.stop(None).wait())
    return port


def greeter_lookalike(other: Authority) -> tuple[list[x509.Certificate], Any]:
    """A server certificate from other.org's CA that names the greeter's identity DNS names.

    Nothing stops a federated CA from writing them; only the client's narrowing of the roots to
    the pinned ID's own trust domain can.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    names = [
        x509.DNSName(meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID))),
        x509.DNSName(meshid.identity_dns_name(meshid.TrustDomain.parse(TD))),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "greeter")]))
        .issuer_name(other.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://other.org/ns/prod/sa/greeter"), *names]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(other.private_key, hashes.SHA256())
    )
    return [cert], key


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("attacks") / "ca"
    init_data_dir(folder, TD, max_ttl=datetime.timedelta(hours=1))
    with contextlib.ExitStack() as stack:
        ca_server = CaServer(folder, "127.0.0.1:0")
        address = f"127.0.0.1:{ca_server.start()}"
        stack.callback(ca_server.stop, None)
        authority, _ = load_authority(folder)
        other = Authority.create_root("other.org")
        bundle_file = folder / "bundle.pem"
        bundles = meshid.BundleSet.of(
            meshid.TrustBundle.load(TD, bundle_file), meshid.TrustBundle(other.trust_domain, other.roots)
        )

        svids: dict[str, meshid.X509Svid] = {}
        with AdminClient(address, folder) as admin:
            # 10 entries and 13 tokens: well under the CA's 60 creations per admin and minute,
            # which the last CA row then exhausts on purpose.
            for sid in (SERVER_ID, FRONTEND_ID, HELLO_ONLY_ID, PROXY_ID, INTRUDER_ID, REVOKED_ID, RENEWER_ID,
                        KEY_REUSER_ID, ORPHAN_ID):  # fmt: skip
                admin.create_entry(sid)
                svids[sid], _ = fetch_svid(address, bundle_file, str(admin.create_token(sid).token))
            admin.create_entry(TOKEN_ID)
            used_token = str(admin.create_token(TOKEN_ID).token)
            fetch_svid(address, bundle_file, used_token)
            spare_token = str(admin.create_token(TOKEN_ID).token)
            expiring = admin.create_token(TOKEN_ID, ttl=datetime.timedelta(seconds=1))
            race_token = str(admin.create_token(TOKEN_ID).token)
            assert admin.revoke(serial=f"{svids[REVOKED_ID].serial:x}") == [f"{svids[REVOKED_ID].serial:x}"]
            admin.delete_entry(ORPHAN_ID)

        greeter_source = meshid.StaticSource(svids[SERVER_ID], bundles)
        policy = meshid.AuthorizationPolicy.from_dict(POLICY)
        interceptor = meshid.AuthorizationInterceptor(policy, source=greeter_source, trusted_proxies=[PROXY_ID])
        watcher = meshid.CrlWatcher(address, greeter_source)
        assert watcher.refresh(), watcher.last_error
        interceptor.set_revocation_check(watcher.is_revoked)
        nginx_interceptor = meshid.AuthorizationInterceptor(
            policy, source=greeter_source, trusted_proxies=[PROXY_ID], forwarded_header=NGINX_HEADER
        )
        greeter = stack.enter_context(sync_server(greeter_source, interceptor))
        nginx_greeter = stack.enter_context(sync_server(greeter_source, nginx_interceptor))
        impostor = stack.enter_context(sync_server(meshid.StaticSource(svids[INTRUDER_ID], bundles), None))
        federated = stack.enter_context(sync_server(RawSource(*greeter_lookalike(other), bundles), None))

        calls: list[str] = []
        fake_cas = {
            # The CA's own SPIFFE ID (and so its identity DNS names), from a root nobody trusts.
            "stranger-root": _fake_ca(stack, Authority.create_root(TD).issue_svid(CA_ID), calls),
            # A genuine SVID of the real CA, but a workload's, not the CA's.
            "workload-svid": _fake_ca(stack, svids[INTRUDER_ID], calls),
        }
        yield World(
            ca=address,
            folder=folder,
            authority=authority,
            other=other,
            bundles=bundles,
            greeter=greeter,
            nginx_greeter=nginx_greeter,
            impostor_greeter=impostor,
            federated_impostor=federated,
            fake_cas=fake_cas,
            fake_ca_calls=calls,
            svids=svids,
            used_token=used_token,
            spare_token=spare_token,
            expiring_token=str(expiring.token),
            expiring_at=datetime.datetime.fromtimestamp(expiring.expires_at, datetime.UTC),
            race_token=race_token,
            tmp=folder.parent,
        )


# --- how an attack is made and judged --------------------------------------------------------------


def outcome(attempt: Callable[[], object]) -> tuple[str, str]:
    """Run one attempt: ("OK", "") or (outcome, details); a failed handshake is "HANDSHAKE"."""
    try:
        attempt()
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
    except meshid.RemoteError as err:
        code, details = err.code, str(err)
    else:
        return "OK", ""
    if code == "UNAVAILABLE" and "failed to connect to all addresses" in details:  # no connection at all
        # A server that stopped answering refuses the connection (a crash); any other failure to
        # connect to a listening server on loopback is the TLS handshake failing.
        return ("DOWN" if "Connection refused" in details else "HANDSHAKE"), details
    if code == "UNAVAILABLE" and "the CA's identity was not proven" in details:
        return "HANDSHAKE", details  # meshid's client says which identity the server failed to prove
    return code, details


def source_of(w: World, forged: meshid.X509Svid | tuple[Any, Any], *above: x509.Certificate) -> Any:
    """A client source presenting ``forged`` (and ``above`` after it in its chain)."""
    if isinstance(forged, meshid.X509Svid):
        if not above:
            return meshid.StaticSource(forged, w.bundles)
        forged = list(forged.chain), forged.private_key
    chain, key = forged
    return RawSource([*chain, *above], key, w.bundles)


def greet(
    w: World,
    source: Any,
    *,
    method: str = SAY_HELLO,
    metadata: list[tuple[str, str]] | None = None,
    port: int | None = None,
) -> tuple[str, str]:
    """One unary call to a greeter (by full method name), the greeter's identity pinned."""

    def attempt() -> None:
        with meshid.secure_channel(f"127.0.0.1:{port or w.greeter}", source, server_id=SERVER_ID) as channel:
            rpc = channel.unary_unary(method, request_serializer=type(hello()).SerializeToString)
            rpc(hello(), metadata=metadata, timeout=10)

    return outcome(attempt)


def greet_as(w: World, spiffe_id: str, **kw: Any) -> tuple[str, str]:
    return greet(w, meshid.StaticSource(w.svids.get(spiffe_id) or w.issue(spiffe_id), w.bundles), **kw)


def greet_with(w: World, forged: meshid.X509Svid | tuple[Any, Any], **kw: Any) -> tuple[str, str]:
    return greet(w, source_of(w, forged), **kw)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def xfcc(cert: x509.Certificate, uri: str = "") -> str:
    """One element of an Envoy x-forwarded-client-cert header carrying ``cert``."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return f'Hash={digest};Cert="{urllib.parse.quote(pem(cert))}"' + (f";URI={uri}" if uri else "")


def envoy_appends(w: World, client_supplied: str) -> tuple[str, str]:
    """Envoy in APPEND_FORWARD mode: the intruder's own header, then the proxy's element for the
    certificate the intruder really presented. Only the last element may count."""
    header = client_supplied + "," + f"By={SERVER_ID};" + xfcc(w.svids[INTRUDER_ID].leaf, INTRUDER_ID)
    return greet_as(w, PROXY_ID, metadata=[(XFCC, header)])


def proxy_forwards(w: World, header: str, value: str) -> tuple[str, str]:
    port = w.greeter if header == XFCC else w.nginx_greeter
    return greet_as(w, PROXY_ID, port=port, metadata=[(header, value)])


def quoted_pems(*certs: x509.Certificate, extra: str = "") -> str:
    return urllib.parse.quote("".join(pem(c) for c in certs) + extra)


def ca_pin() -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(CA_ID)))]


def ca_call(
    w: World, channel_as: str | meshid.X509Svid | tuple[bytes, bytes], method: str, request: Any
) -> tuple[str, str]:
    """One raw call to the CA, as "anonymous", a given SVID, or a raw (key PEM, chain PEM) pair."""

    def attempt() -> None:
        if isinstance(channel_as, meshid.X509Svid):
            channel: Any = meshid.secure_channel(w.ca, meshid.StaticSource(channel_as, w.bundles), server_id=CA_ID)
        else:
            key_pem, chain_pem = anonymous_client() if channel_as == "anonymous" else channel_as  # type: ignore[misc]
            creds = grpc.ssl_channel_credentials(w.bundle_file.read_bytes(), key_pem, chain_pem)
            channel = grpc.secure_channel(w.ca, creds, options=ca_pin())
        with channel:
            channel.unary_unary(method, request_serializer=type(request).SerializeToString)(request, timeout=10)

    return outcome(attempt)


def anonymous_root_key() -> ec.EllipticCurvePrivateKey:
    """The anonymous bootstrap root's private key, computed from the public constant."""
    scalar = int.from_bytes(hashlib.sha256(ANONYMOUS_SEED + b"/root").digest(), "big") % (P256_ORDER - 1) + 1
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    root = x509.load_pem_x509_certificate(anonymous_root_pem())
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    # Otherwise the attack below would fail for the wrong reason (a bad signature).
    assert key.public_key().public_bytes(*der) == root.public_key().public_bytes(*der)
    return key


def minted_with_anonymous_root(spiffe_id: str) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) of a well-formed SVID for ``spiffe_id`` signed by the anonymous root."""
    root = x509.load_pem_x509_certificate(anonymous_root_pem())
    forged = forge(SimpleNamespace(certificate=root, private_key=anonymous_root_key()), uris=[spiffe_id])
    assert isinstance(forged, meshid.X509Svid)
    return forged.key_pem(), forged.chain_pem()


def csr_for(key: Any = None, **kw: Any) -> bytes:
    return build_csr(key or generate_key(), **kw)


def csr_with_uris(*uris: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False
    )
    return builder.sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def tampered_csr() -> bytes:
    """A CSR whose signature no longer verifies (its last byte, inside the signature, flipped)."""
    der = bytearray(csr_for())
    der[-1] ^= 0x01
    return bytes(der)


def issue_with(w: World, token: str, csr: bytes | None = None) -> tuple[str, str]:
    request = issuer_pb2.IssueWithTokenRequest(join_token=token, csr=csr or csr_for())
    return ca_call(w, "anonymous", f"{ISSUER}/IssueWithToken", request)


def renew_as(w: World, who: Any, **request: Any) -> tuple[str, str]:
    request.setdefault("csr", csr_for())
    return ca_call(w, who, f"{ISSUER}/Renew", issuer_pb2.RenewRequest(**request))


def wait_until(moment: datetime.datetime, *, deadline: float = 10.0) -> None:
    give_up = time.monotonic() + deadline
    while datetime.datetime.now(datetime.UTC) <= moment:
        assert time.monotonic() < give_up, f"{moment} did not pass within {deadline} s"
        time.sleep(0.05)


def expired_token(w: World) -> tuple[str, str]:
    wait_until(w.expiring_at + datetime.timedelta(seconds=1))  # expiry has whole-second precision
    return issue_with(w, w.expiring_token)


def token_from_the_other_trust_domain(w: World) -> tuple[str, str]:
    # The secret of a valid, unspent token, presented under another trust domain's prefix.
    secret = w.spare_token.rpartition(":")[2]
    return issue_with(w, f"other.org:{secret}")


def phish_token(w: World, kind: str) -> tuple[str, str]:
    """A workload fetches its first SVID from an impostor CA: the pinned CA identity must stop it."""
    before = len(w.fake_ca_calls)
    result = outcome(lambda: fetch_svid(f"127.0.0.1:{w.fake_cas[kind]}", w.bundle_file, w.spare_token))
    if len(w.fake_ca_calls) != before:
        return "TOKEN LEAKED", result[1]
    return result


def race_one_token(w: World) -> tuple[str, str]:
    """Eight callers spend one join token at once: exactly one may get an SVID."""
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: issue_with(w, w.race_token), range(8)))
    issued = [r for r in results if r[0] == "OK"]
    refused = [r for r in results if r[0] == "UNAUTHENTICATED" and "already used" in r[1]]
    if len(issued) > 1:
        return "OK", f"{len(issued)} SVIDs from one join token"
    if len(issued) == 1 and len(refused) == 7:
        return refused[0]
    return "MIXED", repr(results)


def flood_tokens(w: World) -> tuple[str, str]:
    # Every entry and token this module created so far counts; the CA allows 60 a minute per admin.
    with AdminClient(w.ca, w.folder) as admin:
        for _ in range(61):
            result = outcome(lambda: admin.create_token(TOKEN_ID))
            if result[0] != "OK":
                return result
    return "OK", "61 join tokens in a row"


def admin_as(w: World, who: Any, method: str) -> tuple[str, str]:
    requests = {
        "ListEntries": registration_pb2.ListEntriesRequest(),
        "CreateEntry": registration_pb2.CreateEntryRequest(spiffe_id=PAYMENTS_ID),
        "DeleteEntry": registration_pb2.DeleteEntryRequest(spiffe_id=FRONTEND_ID),
        "CreateJoinToken": registration_pb2.CreateJoinTokenRequest(spiffe_id=FRONTEND_ID),
        "RevokeSvids": registration_pb2.RevokeSvidsRequest(spiffe_id=SERVER_ID),
    }
    return ca_call(w, who, f"{REGISTRATION}/{method}", requests[method])


def admin_svid(w: World) -> meshid.X509Svid:
    return meshid.X509Svid.load(w.folder / "admin" / "svid.pem", w.folder / "admin" / "svid.key")


def admin_does(w: World, call: Callable[[AdminClient], object]) -> tuple[str, str]:
    with AdminClient(w.ca, w.folder) as admin:
        return outcome(lambda: call(admin))


def weak_rsa_csr() -> bytes:
    return csr_for(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def leaf_with_key_usage(authority: Authority, spiffe_id: str, **usage: bool) -> tuple[list[x509.Certificate], Any]:
    """A leaf for ``spiffe_id`` signed by ``authority`` whose key usage holds exactly the bits in ``usage``."""
    key = ec.generate_private_key(ec.SECP256R1())
    bits = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{**bits, **usage}), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(authority.private_key, hashes.SHA256())
    )
    return [cert], key


async def _say_hello_over_openssl(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    pin = Configuration(ssl_target_name_override=meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))
    channel = Channel("127.0.0.1", port, ssl=ctx, config=pin)
    try:
        async with channel.request(
            SAY_HELLO, Cardinality.UNARY_UNARY, greeter_pb2.HelloRequest, greeter_pb2.HelloReply
        ) as stream:
            await stream.send_message(hello(), end=True)
            await stream.recv_message()
            await stream.recv_trailing_metadata()
        return "OK", ""
    except GRPCError as err:
        return err.status.name, err.message or ""
    except (StreamTerminatedError, ssl.SSLError, ConnectionError) as err:
        return "HANDSHAKE", repr(err)  # the server ended the TLS connection
    finally:
        channel.close()


def greet_over_openssl(
    w: World, chain: list[x509.Certificate], key: Any, *, maximum_version: ssl.TLSVersion | None = None
) -> tuple[str, str]:
    """One SayHello from grpclib on Python's ssl (OpenSSL).

    grpcio's BoringSSL client refuses to present a leaf without digitalSignature at all; OpenSSL
    sends it, as a hand-made client would, so the server's own check is what gets tested.
    """
    folder = w.tmp / f"openssl-{secrets.token_hex(4)}"
    folder.mkdir()
    (folder / "chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=w.bundles.all_roots_pem().decode())
    ctx.load_cert_chain(folder / "chain.pem", folder / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return asyncio.run(_say_hello_over_openssl(w.greeter, ctx))


# --- the matrix ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable[[World], tuple[str, str]]
    expected: str  # "HANDSHAKE" or a status code name
    detail: str = ""  # a fragment the refusal's details must contain
    bug: str = ""  # set when the observed outcome is wrong: the row is a strict xfail


def greet_raw(w: World, key_pem: bytes | None = None, chain_pem: bytes | None = None) -> tuple[str, str]:
    """One SayHello over plain grpc TLS credentials: a client certificate, or none at all."""

    def attempt() -> None:
        creds = grpc.ssl_channel_credentials(w.bundles.all_roots_pem(), key_pem, chain_pem)
        pin = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)))]
        with grpc.secure_channel(f"127.0.0.1:{w.greeter}", creds, options=pin) as channel:
            channel.unary_unary(SAY_HELLO, request_serializer=type(hello()).SerializeToString)(hello(), timeout=10)

    return outcome(attempt)


def _leaf_signs_leaf(w: World) -> tuple[str, str]:
    # The intruder's genuine SVID (CA:false) used as an issuer for the frontend's ID.
    intruder = w.svids[INTRUDER_ID]
    forged = forge(SimpleNamespace(certificate=intruder.leaf, private_key=intruder.private_key), uris=[FRONTEND_ID])
    return greet(w, source_of(w, forged, intruder.leaf))


def _frontend_leaf(w: World) -> x509.Certificate:
    return w.svids[FRONTEND_ID].leaf


GREETER_ATTACKS = [
    # --- the TLS layer: no chain to a trusted root, or outside its validity ---
    Attack("no-client-certificate", lambda w: greet_raw(w), "HANDSHAKE"),
    Attack("self-signed-certificate", lambda w: greet_with(w, forge(None, uris=[FRONTEND_ID], self_signed=True)), "HANDSHAKE"),
    Attack("chain-to-untrusted-root", lambda w: greet_with(w, Authority.create_root(TD).issue_svid(FRONTEND_ID)), "HANDSHAKE"),
    Attack("expired-certificate", lambda w: greet_with(w, w.issue(FRONTEND_ID, now=_now() - datetime.timedelta(days=2))), "HANDSHAKE"),
    Attack("not-yet-valid-certificate", lambda w: greet_with(w, w.issue(FRONTEND_ID, now=_now() + datetime.timedelta(days=2))), "HANDSHAKE"),
    Attack("leaf-signs-a-leaf", _leaf_signs_leaf, "HANDSHAKE"),
    Attack("anonymous-bootstrap-client-certificate", lambda w: greet_raw(w, *anonymous_client()), "HANDSHAKE"),
    # --- revocation, through the CA's CRL ---
    Attack("revoked-by-the-ca", lambda w: greet_as(w, REVOKED_ID), "UNAUTHENTICATED", "is revoked"),
    # --- the X509-SVID leaf rules (signed by the real CA's key, so only the rule can refuse them) ---
    Attack("ca-certificate-as-leaf", lambda w: greet_with(w, forge(w.authority, uris=[FRONTEND_ID], ca=True, key_cert_sign=True)), "UNAUTHENTICATED", "is a CA"),
    Attack("leaf-with-keycertsign", lambda w: greet_with(w, forge(w.authority, uris=[FRONTEND_ID], key_cert_sign=True)), "UNAUTHENTICATED", "keyCertSign"),
    # keyAgreement only (a key usage with no bit at all is malformed; OpenSSL would not even load it).
    Attack("leaf-without-digitalsignature", lambda w: greet_over_openssl(w, *leaf_with_key_usage(w.authority, FRONTEND_ID, key_agreement=True)), "HANDSHAKE"),
    Attack("tls-1.2-downgrade", lambda w: greet_over_openssl(w, list(w.svids[FRONTEND_ID].chain), w.svids[FRONTEND_ID].private_key, maximum_version=ssl.TLSVersion.TLSv1_2), "UNAUTHENTICATED", "requires TLS 1.3"),
    Attack("two-uri-sans", lambda w: greet_with(w, forge(w.authority, uris=[INTRUDER_ID, FRONTEND_ID])), "UNAUTHENTICATED", "2 URI SANs"),
    Attack("spiffe-id-only-in-the-common-name", lambda w: greet_with(w, forge(w.authority, uris=[], subject_cn=FRONTEND_ID)), "UNAUTHENTICATED", "carries no SPIFFE ID"),
    Attack("https-uri-san", lambda w: greet_with(w, forge(w.authority, uris=["https://example.org/ns/prod/sa/frontend"])), "UNAUTHENTICATED", "scheme"),
    Attack("uppercase-trust-domain", lambda w: greet_with(w, forge(w.authority, uris=["spiffe://EXAMPLE.org/ns/prod/sa/frontend"])), "UNAUTHENTICATED", "lowercase"),
    Attack("uppercase-scheme", lambda w: greet_with(w, forge(w.authority, uris=["SPIFFE://example.org/ns/prod/sa/frontend"])), "UNAUTHENTICATED", "scheme"),
    Attack("percent-encoded-slash", lambda w: greet_with(w, forge(w.authority, uris=["spiffe://example.org/ns%2Fprod/sa/frontend"])), "UNAUTHENTICATED", "percent-encoding"),
    Attack("dot-dot-segment", lambda w: greet_with(w, forge(w.authority, uris=["spiffe://example.org/ns/dev/../prod/sa/frontend"])), "UNAUTHENTICATED", "dot segments"),
    Attack("dot-segment", lambda w: greet_with(w, forge(w.authority, uris=["spiffe://example.org/ns/prod/./sa/frontend"])), "UNAUTHENTICATED", "dot segments"),
    Attack("trust-domain-only-id-as-leaf", lambda w: greet_with(w, forge(w.authority, uris=[f"spiffe://{TD}"])), "UNAUTHENTICATED", "has no path"),
    Attack("other-trust-domains-ca-signs-this-trust-domains-id", lambda w: greet_with(w, forge(w.other, uris=[FRONTEND_ID])), "UNAUTHENTICATED", "does not verify against its trust domain's bundle"),
    Attack("this-trust-domains-ca-signs-another-trust-domains-id", lambda w: greet_with(w, forge(w.authority, uris=["spiffe://other.org/ns/prod/sa/frontend"])), "UNAUTHENTICATED", "does not verify against its trust domain's bundle"),
    # --- valid SVIDs the policy must not confuse with the allowed ones ---
    Attack("uppercase-path-lookalike", lambda w: greet_as(w, "spiffe://example.org/NS/PROD/SA/FRONTEND", method=f"/{SERVICE}/Chat"), "PERMISSION_DENIED", "FRONTEND may not call"),
    Attack("same-path-in-another-trust-domain", lambda w: greet(w, meshid.StaticSource(w.other.issue_svid("spiffe://other.org/ns/prod/sa/frontend"), w.bundles)), "PERMISSION_DENIED", "spiffe://other.org/ns/prod/sa/frontend may not call"),
    Attack("one-segment-glob-vs-longer-path", lambda w: greet_as(w, f"spiffe://{TD}/ns/prod/sa/x"), "PERMISSION_DENIED", "spiffe://example.org/ns/prod/sa/x may not call"),
    # --- method names in odd forms, from a caller allowed only on the exact SayHello ---
    Attack("method-double-leading-slash", lambda w: greet_as(w, HELLO_ONLY_ID, method=f"/{SAY_HELLO}"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-missing-service", lambda w: greet_as(w, HELLO_ONLY_ID, method="/SayHello"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-unknown-service", lambda w: greet_as(w, HELLO_ONLY_ID, method="/meshid.examples.v1.Admin/SayHello"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-case-change", lambda w: greet_as(w, HELLO_ONLY_ID, method="/meshid.examples.v1.greeter/sayhello"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-trailing-slash", lambda w: greet_as(w, HELLO_ONLY_ID, method=f"{SAY_HELLO}/"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-dot-dot-segment", lambda w: greet_as(w, HELLO_ONLY_ID, method=f"/{SERVICE}/../{SERVICE}/SayHello"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-without-leading-slash", lambda w: greet_as(w, HELLO_ONLY_ID, method=SAY_HELLO[1:]), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("method-with-a-query-string", lambda w: greet_as(w, HELLO_ONLY_ID, method=f"{SAY_HELLO}?admin=1"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    Attack("other-method-of-the-service", lambda w: greet_as(w, HELLO_ONLY_ID, method=f"/{SERVICE}/Chat"), "PERMISSION_DENIED", f"{HELLO_ONLY_ID} may not call"),
    # A caller allowed on every method of the service: an unknown one is authorized, then unimplemented.
    Attack("unknown-method-for-a-caller-allowed-on-the-service", lambda w: greet_as(w, FRONTEND_ID, method=f"/{SERVICE}/DeleteEverything"), "UNIMPLEMENTED", "Method not found"),
    # A caller allowed on every method but denied SayHello: odd spellings of SayHello are allowed
    # by the policy as other methods, and UNIMPLEMENTED proves grpc never routed them to SayHello.
    Attack("deny-rule-on-the-exact-method", lambda w: greet_as(w, NO_HELLO_ID), "PERMISSION_DENIED", f"{NO_HELLO_ID} may not call"),
    Attack("deny-rule-bypass-double-leading-slash", lambda w: greet_as(w, NO_HELLO_ID, method=f"/{SAY_HELLO}"), "UNIMPLEMENTED", "Method not found"),
    Attack("deny-rule-bypass-case-change", lambda w: greet_as(w, NO_HELLO_ID, method=SAY_HELLO.lower()), "UNIMPLEMENTED", "Method not found"),
    Attack("deny-rule-bypass-trailing-slash", lambda w: greet_as(w, NO_HELLO_ID, method=f"{SAY_HELLO}/"), "UNIMPLEMENTED", "Method not found"),
    Attack("deny-rule-bypass-query-string", lambda w: greet_as(w, NO_HELLO_ID, method=f"{SAY_HELLO}?x=1"), "UNIMPLEMENTED", "Method not found"),
    Attack("deny-rule-bypass-dot-dot-segment", lambda w: greet_as(w, NO_HELLO_ID, method=f"/{SERVICE}/../{SERVICE}/SayHello"), "UNIMPLEMENTED", "Method not found"),
    # --- forwarded identities ---
    Attack("forged-xfcc-from-a-non-proxy-peer", lambda w: greet_as(w, INTRUDER_ID, metadata=[(XFCC, xfcc(_frontend_leaf(w), FRONTEND_ID))]), "PERMISSION_DENIED", f"{INTRUDER_ID} may not call"),
    Attack("forged-nginx-header-from-a-non-proxy-peer", lambda w: greet_as(w, INTRUDER_ID, port=w.nginx_greeter, metadata=[(NGINX_HEADER, urllib.parse.quote(pem(_frontend_leaf(w))))]), "PERMISSION_DENIED", f"{INTRUDER_ID} may not call"),
    Attack("proxy-forwards-an-unverifiable-certificate", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, xfcc(Authority.create_root(TD).issue_svid(FRONTEND_ID).leaf))]), "UNAUTHENTICATED", "does not verify"),
    Attack("proxy-forwards-a-revoked-certificate", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, xfcc(w.svids[REVOKED_ID].leaf))]), "UNAUTHENTICATED", "is revoked"),
    Attack("proxy-forwards-the-trust-domains-root", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, xfcc(w.authority.roots[0]))]), "UNAUTHENTICATED", "has no path"),
    Attack("proxy-forwards-a-uri-but-no-certificate", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, f"By={SERVER_ID};URI={FRONTEND_ID}")]), "UNAUTHENTICATED", "not a PEM certificate"),
    Attack("proxy-forwards-an-expired-certificate", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, xfcc(w.issue(FRONTEND_ID, now=_now() - datetime.timedelta(days=2)).leaf))]), "UNAUTHENTICATED", "does not verify"),
    Attack("proxy-forwards-an-empty-header", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, "")]), "UNAUTHENTICATED", "not a PEM certificate"),
    Attack("proxy-forwards-garbage", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, 'Cert="not%20a%20certificate"')]), "UNAUTHENTICATED", "not a PEM certificate"),
    # Envoy appends its own element; the client-supplied one before it must not count.
    Attack("client-supplied-xfcc-element-before-the-proxys", lambda w: greet_as(w, PROXY_ID, metadata=[(XFCC, xfcc(_frontend_leaf(w)) + "," + xfcc(w.svids[INTRUDER_ID].leaf))]), "PERMISSION_DENIED", f"{INTRUDER_ID} may not call"),
    # Smuggling (issue #10): a public certificate (the frontend's) presented as the intruder's own.
    Attack("xfcc-unbalanced-quote-swallows-the-proxys-element", lambda w: envoy_appends(w, f'Cert="{quoted_pems(_frontend_leaf(w))}'), "UNAUTHENTICATED", "forwarded certificate: XFCC"),
    Attack("xfcc-unbalanced-quote-with-the-frontends-hash", lambda w: envoy_appends(w, xfcc(_frontend_leaf(w), FRONTEND_ID)[:-1] + ';URI="x'), "UNAUTHENTICATED", "forwarded certificate: XFCC"),
    Attack("xfcc-escaped-quote-never-closes", lambda w: envoy_appends(w, f'Subject="CN=x\\";Cert="{quoted_pems(_frontend_leaf(w))}'), "UNAUTHENTICATED", "forwarded certificate: XFCC"),
    Attack("xfcc-cert-with-two-pem-blocks", lambda w: proxy_forwards(w, XFCC, f'Cert="{quoted_pems(_frontend_leaf(w), w.svids[INTRUDER_ID].leaf)}"'), "UNAUTHENTICATED", "exactly one PEM certificate, found 2"),
    Attack("xfcc-cert-with-trailing-text", lambda w: proxy_forwards(w, XFCC, f'Cert="{quoted_pems(_frontend_leaf(w), extra="junk")}"'), "UNAUTHENTICATED", "text outside its PEM blocks"),
    Attack("xfcc-cert-with-leading-text", lambda w: proxy_forwards(w, XFCC, 'Cert="junk' + quoted_pems(_frontend_leaf(w)) + '"'), "UNAUTHENTICATED", "text outside its PEM blocks"),
    Attack("xfcc-hash-of-another-certificate", lambda w: proxy_forwards(w, XFCC, xfcc(_frontend_leaf(w)).replace("Hash=", "Hash=0", 1)), "UNAUTHENTICATED", "Hash is not the SHA-256"),
    Attack("xfcc-cert-key-twice-in-one-element", lambda w: proxy_forwards(w, XFCC, xfcc(_frontend_leaf(w)) + f';Cert="{quoted_pems(w.svids[INTRUDER_ID].leaf)}"'), "UNAUTHENTICATED", "appears twice"),
    Attack("xfcc-key-in-another-case-twice", lambda w: proxy_forwards(w, XFCC, xfcc(_frontend_leaf(w)) + f';CERT="{quoted_pems(w.svids[INTRUDER_ID].leaf)}"'), "UNAUTHENTICATED", "appears twice"),
    Attack("xfcc-empty-key", lambda w: proxy_forwards(w, XFCC, xfcc(_frontend_leaf(w)) + ';=x'), "UNAUTHENTICATED", "empty key"),
    Attack("xfcc-unknown-key", lambda w: proxy_forwards(w, XFCC, xfcc(_frontend_leaf(w)) + ';Admin=1'), "UNAUTHENTICATED", "not one Envoy writes"),
    Attack("xfcc-text-after-the-closing-quote", lambda w: proxy_forwards(w, XFCC, 'Subject="CN=x"y;' + xfcc(_frontend_leaf(w))), "UNAUTHENTICATED", "text after a closing quote"),
    Attack("xfcc-empty-last-element", lambda w: proxy_forwards(w, XFCC, xfcc(_frontend_leaf(w)) + ","), "UNAUTHENTICATED", "empty element"),
    Attack("xfcc-quote-inside-an-unquoted-value", lambda w: proxy_forwards(w, XFCC, 'URI=a"b;' + xfcc(_frontend_leaf(w))), "UNAUTHENTICATED", "unquoted"),
    Attack("nginx-header-with-two-certificates", lambda w: proxy_forwards(w, NGINX_HEADER, quoted_pems(_frontend_leaf(w), w.svids[INTRUDER_ID].leaf)), "UNAUTHENTICATED", "exactly one PEM certificate, found 2"),
    Attack("nginx-header-with-a-key-block-after-the-certificate", lambda w: proxy_forwards(w, NGINX_HEADER, quoted_pems(_frontend_leaf(w), extra=w.svids[INTRUDER_ID].key_pem().decode())), "UNAUTHENTICATED", "PEM 'PRIVATE KEY' block"),
    Attack("nginx-header-with-trailing-text", lambda w: proxy_forwards(w, NGINX_HEADER, quoted_pems(_frontend_leaf(w), extra="\nx")), "UNAUTHENTICATED", "text outside its PEM blocks"),
    # --- the client's side: a server that cannot prove the pinned identity ---
    Attack("server-impersonates-the-pinned-server-id", lambda w: greet_as(w, FRONTEND_ID, port=w.impostor_greeter), "HANDSHAKE"),
    Attack("federated-ca-vouches-for-the-pinned-identity-dns-name", lambda w: greet_as(w, FRONTEND_ID, port=w.federated_impostor), "HANDSHAKE"),
    # --- a genuine SVID with no business here ---
    Attack("the-cas-admin-svid-at-the-greeter", lambda w: greet(w, meshid.StaticSource(admin_svid(w), w.bundles)), "PERMISSION_DENIED", f"{ADMIN_ID} may not call"),
]


CA_ATTACKS = [
    # --- join tokens ---
    Attack("reused-join-token", lambda w: issue_with(w, w.used_token), "UNAUTHENTICATED", "already used"),
    Attack("expired-join-token", expired_token, "UNAUTHENTICATED", "expired"),
    Attack("guessed-join-token", lambda w: issue_with(w, f"{TD}:{'A' * 43}"), "UNAUTHENTICATED", "unknown"),
    Attack("join-token-of-another-trust-domains-format", token_from_the_other_trust_domain, "UNAUTHENTICATED", "unknown"),
    Attack("oversized-join-token", lambda w: issue_with(w, f"{TD}:" + "A" * 600), "UNAUTHENTICATED", "malformed"),
    Attack("one-join-token-spent-by-eight-callers-at-once", race_one_token, "UNAUTHENTICATED", "already used"),
    # --- CSRs and request sizes ---
    Attack("oversized-csr", lambda w: issue_with(w, w.spare_token, b"\x30" * (20 * 1024)), "INVALID_ARGUMENT", "larger than the limit"),
    Attack("oversized-request", lambda w: issue_with(w, w.spare_token, b"\x30" * (70 * 1024)), "RESOURCE_EXHAUSTED", "larger than max"),
    Attack("csr-with-a-bad-signature", lambda w: issue_with(w, w.spare_token, tampered_csr()), "INVALID_ARGUMENT", "CSR"),
    Attack("csr-with-a-weak-rsa-key", lambda w: issue_with(w, w.spare_token, weak_rsa_csr()), "INVALID_ARGUMENT", "1024 bits"),
    # --- renewal ---
    Attack("renewal-for-another-id-in-the-csr", lambda w: renew_as(w, w.svids[RENEWER_ID], csr=csr_for(uri=PAYMENTS_ID)), "PERMISSION_DENIED", PAYMENTS_ID),
    Attack("renewal-csr-with-its-own-id-and-another", lambda w: renew_as(w, w.svids[RENEWER_ID], csr=csr_with_uris(RENEWER_ID, PAYMENTS_ID)), "PERMISSION_DENIED", PAYMENTS_ID),
    Attack("renewal-for-another-id-in-the-request", lambda w: renew_as(w, w.svids[RENEWER_ID], spiffe_id=PAYMENTS_ID), "PERMISSION_DENIED", PAYMENTS_ID),
    Attack("renewal-with-the-anonymous-client", lambda w: renew_as(w, "anonymous"), "UNAUTHENTICATED", "carries no SPIFFE ID"),
    Attack("renewal-with-a-revoked-svid", lambda w: renew_as(w, w.svids[REVOKED_ID]), "UNAUTHENTICATED", "revoked"),
    Attack("renewal-with-an-expired-svid", lambda w: renew_as(w, w.issue(RENEWER_ID, now=_now() - datetime.timedelta(days=2))), "HANDSHAKE"),
    Attack("renewal-with-another-trust-domains-svid", lambda w: renew_as(w, w.other.issue_svid("spiffe://other.org/ns/prod/sa/renewer")), "HANDSHAKE"),
    Attack("renewal-with-an-svid-minted-by-the-anonymous-root", lambda w: renew_as(w, minted_with_anonymous_root(RENEWER_ID)), "UNAUTHENTICATED", "does not verify"),
    Attack("renewal-after-the-entry-was-deleted", lambda w: renew_as(w, w.svids[ORPHAN_ID]), "PERMISSION_DENIED", "no registration entry"),
    # --- only IssueWithToken, GetBundle, GetCrl and health are open, by exact name ---
    Attack("unknown-issuer-method-with-the-anonymous-client", lambda w: ca_call(w, "anonymous", f"{ISSUER}/Debug", issuer_pb2.GetBundleRequest()), "UNAUTHENTICATED", "carries no SPIFFE ID"),
    Attack("open-method-name-with-a-trailing-slash", lambda w: ca_call(w, "anonymous", f"{ISSUER}/GetBundle/", issuer_pb2.GetBundleRequest()), "UNAUTHENTICATED", "carries no SPIFFE ID"),
    Attack("open-method-name-in-another-case", lambda w: ca_call(w, "anonymous", "/meshid.v1.issuer/getbundle", issuer_pb2.GetBundleRequest()), "UNAUTHENTICATED", "carries no SPIFFE ID"),
    # --- registration: only the admin SVID ---
    *(
        Attack(f"admin-{method}-from-a-workload-svid", lambda w, m=method: admin_as(w, w.svids[INTRUDER_ID], m), "PERMISSION_DENIED", f"{INTRUDER_ID} may not call")
        for method in ("ListEntries", "CreateEntry", "DeleteEntry", "CreateJoinToken", "RevokeSvids")
    ),
    *(
        Attack(f"admin-{method}-with-the-anonymous-client", lambda w, m=method: admin_as(w, "anonymous", m), "UNAUTHENTICATED", "carries no SPIFFE ID")
        for method in ("ListEntries", "CreateEntry", "CreateJoinToken", "RevokeSvids")
    ),
    Attack("admin-svid-minted-by-the-anonymous-root", lambda w: admin_as(w, minted_with_anonymous_root(ADMIN_ID), "CreateJoinToken"), "UNAUTHENTICATED", "does not verify"),
    Attack("entry-for-the-reserved-admin-id", lambda w: admin_does(w, lambda a: a.create_entry(ADMIN_ID)), "PERMISSION_DENIED", "reserved"),
    Attack("join-token-for-the-cas-own-id", lambda w: admin_does(w, lambda a: a.create_token(CA_ID)), "PERMISSION_DENIED", "reserved"),
    Attack("deleting-the-cas-own-entry", lambda w: admin_does(w, lambda a: a.delete_entry(CA_ID)), "PERMISSION_DENIED", "reserved"),
    Attack("entry-with-the-cas-identity-dns-name", lambda w: admin_does(w, lambda a: a.create_entry(PAYMENTS_ID, [meshid.identity_dns_name(meshid.SpiffeId.parse(CA_ID))])), "INVALID_ARGUMENT", "reserved"),
    Attack("entry-with-a-wildcard-dns-name", lambda w: admin_does(w, lambda a: a.create_entry(PAYMENTS_ID, ["*.id.meshid.invalid"])), "INVALID_ARGUMENT", "not a valid host name"),
    Attack("revocation-of-a-serial-never-issued-here", lambda w: admin_does(w, lambda a: a.revoke(serial=f"{w.issue(FRONTEND_ID).serial:x}")), "NOT_FOUND", "no certificate with serial"),
    Attack("entry-in-another-trust-domain", lambda w: admin_does(w, lambda a: a.create_entry("spiffe://other.org/ns/prod/sa/web")), "INVALID_ARGUMENT", "trust domain"),
    # --- the client's side: impostor CAs must never see a join token ---
    Attack("impostor-ca-with-the-cas-id-from-an-untrusted-root", lambda w: phish_token(w, "stranger-root"), "HANDSHAKE"),
    Attack("impostor-ca-with-a-genuine-workload-svid", lambda w: phish_token(w, "workload-svid"), "HANDSHAKE"),
    # Last: it spends the admin's creations for the next minute.
    Attack("join-token-flood-from-the-admin", flood_tokens, "RESOURCE_EXHAUSTED", "try again later"),
]

ATTACKS = [*GREETER_ATTACKS, *CA_ATTACKS]
#: name -> (expected, observed), filled as the rows run.
TALLY: dict[str, tuple[str, str]] = {}


# --- positive controls: each refusal below is about its attack, not the setup -----------------------


def test_controls_are_allowed(world: World) -> None:
    w = world
    assert greet_as(w, FRONTEND_ID, method=f"/{SERVICE}/Chat") == ("OK", "")
    assert greet_as(w, HELLO_ONLY_ID) == ("OK", "")
    assert greet_as(w, GLOB_ID) == ("OK", "")
    # The proxy forwarding the frontend's certificate decides the call as the frontend.
    assert greet_as(w, PROXY_ID, metadata=[(XFCC, xfcc(_frontend_leaf(w)))], method=f"/{SERVICE}/Chat") == ("OK", "")
    header = urllib.parse.quote(pem(_frontend_leaf(w)))
    assert greet_as(w, PROXY_ID, port=w.nginx_greeter, metadata=[(NGINX_HEADER, header)]) == ("OK", "")
    # A fresh token with a good CSR is issued; the renewer renews its own ID.
    with AdminClient(w.ca, w.folder) as admin:
        assert issue_with(w, str(admin.create_token(TOKEN_ID).token)) == ("OK", "")
    assert renew_as(w, w.svids[RENEWER_ID], spiffe_id=RENEWER_ID) == ("OK", "")
    assert greet_as(w, NO_HELLO_ID, method=f"/{SERVICE}/Chat") == ("OK", "")


def test_first_issuance_ignores_what_the_csr_asks_for(world: World) -> None:
    # Not a refusal but a neutralization: a CSR asking for another SPIFFE ID and for a CA
    # certificate gets the token's entry, as a plain leaf.
    w = world
    with AdminClient(w.ca, w.folder) as admin:
        token = str(admin.create_token(TOKEN_ID).token)
    key = generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(PAYMENTS_ID)]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem, cert_pem = anonymous_client()
    creds = grpc.ssl_channel_credentials(w.bundle_file.read_bytes(), key_pem, cert_pem)
    with grpc.secure_channel(w.ca, creds, options=ca_pin()) as channel:
        issue = channel.unary_unary(
            f"{ISSUER}/IssueWithToken",
            request_serializer=issuer_pb2.IssueWithTokenRequest.SerializeToString,
            response_deserializer=issuer_pb2.SvidResponse.FromString,
        )
        request = issuer_pb2.IssueWithTokenRequest(join_token=token, csr=csr.public_bytes(serialization.Encoding.DER))
        response = issue(request, timeout=10)
    leaf = x509.load_der_x509_certificate(response.chain[0])
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [TOKEN_ID]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def _param(attack: Attack) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=attack.bug)] if attack.bug else []
    return pytest.param(attack, id=attack.name, marks=marks)


@pytest.mark.parametrize("attack", [_param(a) for a in ATTACKS])
def test_attack(world: World, attack: Attack) -> None:
    try:
        observed, details = attack.run(world)
    except Exception as err:  # an exception type no attack should raise: a crash
        observed, details = "CRASH", f"{type(err).__name__}: {err}"
    TALLY[attack.name] = (attack.expected, observed)
    assert observed == attack.expected, f"{attack.name}: expected {attack.expected}, got {observed}: {details}"
    assert attack.detail in details, details


def test_renewal_over_the_old_key_is_refused(world: World) -> None:
    # A renewal must bring a new key (README, "The issuing service"): a key that may have
    # leaked is not carried into the next certificate.
    w = world
    old = w.svids[KEY_REUSER_ID]
    request = issuer_pb2.RenewRequest(csr=build_csr(old.private_key), spiffe_id=KEY_REUSER_ID)
    code, details = ca_call(w, old, f"{ISSUER}/Renew", request)
    assert code == "INVALID_ARGUMENT" and "reuses the key" in details
    renewed, _ = renew_svid(w.ca, old, w.ca_bundles)  # the public client renews with a new key
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert renewed.leaf.public_key().public_bytes(*der) != old.leaf.public_key().public_bytes(*der)


# --- after the matrix: both servers still answer, and the tally ------------------------------------


def test_servers_still_answer_and_summary(world: World) -> None:
    w = world
    legitimate = {
        "greeter SayHello": greet_as(w, FRONTEND_ID),
        "CA renewal": outcome(lambda: renew_svid(w.ca, w.svids[RENEWER_ID], w.ca_bundles)),
        # The token every bad CSR and both impostor CAs were offered: neither spent nor leaked.
        "CA issuance with the spare token": issue_with(w, w.spare_token),
    }
    stopped = {name: result for name, result in legitimate.items() if result != ("OK", "")}
    tried = len(TALLY)
    as_expected = sum(1 for expected, observed in TALLY.values() if observed == expected)
    allowed = sum(1 for expected, observed in TALLY.values() if observed == "OK" and expected != "OK")
    crashes = sum(1 for _, observed in TALLY.values() if observed in ("CRASH", "DOWN")) + len(stopped)
    print(f"\n[attacks] {tried} tried, {as_expected} refused as expected, {allowed} allowed, {crashes} crashes")
    assert not stopped, f"a legitimate call failed after the matrix: {stopped}"
    assert crashes == 0, {name: seen for name, seen in TALLY.items() if seen[1] in ("CRASH", "DOWN")}
