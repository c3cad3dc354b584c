"""Issue #10, item 6: which CRLs meshid accepts, and what a stale one does.

A real meshid CA (``init_data_dir`` + ``CaServer``) issues the SVIDs, revokes one and signs the
genuine CRLs; a real greeter behind :class:`meshid.AuthorizationInterceptor` checks peers
against a :class:`meshid.CrlWatcher`. The crafted CRLs reach the watcher through a CRL
endpoint: a server that presents the CA's own SPIFFE ID (an SVID the real CA signed, as a CA
replica restored from an old backup, or a compromised CA host, would) and answers ``GetCrl``
with whatever the test hands it. Each refusal must leave the list in force enforced at the
greeter: a revoked peer still gets UNAUTHENTICATED, an honest one is still served.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshid

# The generated protobuf module is private; the CRL endpoint imports it only because it speaks
# the CA's wire protocol (GetCrl) with CRLs the real CA would never sign.
from meshid._proto import issuer_pb2
from meshid.ca import Authority
from meshid.ca.client import AdminClient, fetch_svid, get_crl_with_svid
from meshid.ca.datadir import init_data_dir, load_authority
from meshid.ca.server import CaServer
from meshid.clock import ManualClock
from meshid.metrics import REGISTRY
from support import FRONTEND_ID, SERVER_ID, SERVICE, call, sync_server

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
CA_ID = f"spiffe://{TD}/meshid/ca"
REVOKED_ID = f"spiffe://{TD}/ns/prod/sa/revoked"
POLICY = {"allow": [{"name": "all", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [FRONTEND_ID, REVOKED_ID]}]}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class World:
    ca: str  # the real CA's address
    authority: Authority  # its signing key, loaded from its data folder
    bundles: meshid.BundleSet  # its bundle
    svids: dict[str, meshid.X509Svid]  # SVIDs it issued, by SPIFFE ID
    crl_before: tuple[bytes, list[x509.Certificate]]  # its CRL before the revocation (number n)
    crl_after: tuple[bytes, list[x509.Certificate]]  # after REVOKED_ID was revoked (number n + 1)

    def source(self, spiffe_id: str) -> meshid.StaticSource:
        return meshid.StaticSource(self.svids[spiffe_id], self.bundles)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("crl") / "ca"
    init_data_dir(folder, TD, max_ttl=datetime.timedelta(hours=1))
    with contextlib.ExitStack() as stack:
        ca_server = CaServer(folder, "127.0.0.1:0")
        address = f"127.0.0.1:{ca_server.start()}"
        stack.callback(ca_server.stop, None)
        authority, _ = load_authority(folder)
        bundles = meshid.BundleSet.of(meshid.TrustBundle.load(TD, folder / "bundle.pem"))
        svids = {}
        with AdminClient(address, folder) as admin:
            for sid in (SERVER_ID, FRONTEND_ID, REVOKED_ID):
                admin.create_entry(sid)
                svids[sid], _ = fetch_svid(address, folder / "bundle.pem", str(admin.create_token(sid).token))
            before = get_crl_with_svid(address, svids[SERVER_ID], bundles)
            admin.revoke(serial=f"{svids[REVOKED_ID].serial:x}")
            after = get_crl_with_svid(address, svids[SERVER_ID], bundles)
        yield World(address, authority, bundles, svids, before, after)


class CrlEndpoint:
    """A server with the CA's SPIFFE ID whose GetCrl answers whatever was last handed to :meth:`serve`."""

    def __init__(self, svid: meshid.X509Svid) -> None:
        self._answer: tuple[bytes, list[x509.Certificate]] = (b"", [])
        handler = grpc.method_handlers_generic_handler(
            "meshid.v1.Issuer",
            {
                "GetCrl": grpc.unary_unary_rpc_method_handler(
                    self._get_crl,
                    request_deserializer=issuer_pb2.GetCrlRequest.FromString,
                    response_serializer=issuer_pb2.Crl.SerializeToString,
                )
            },
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        creds = grpc.ssl_server_credentials([(svid.key_pem(), svid.chain_pem())])
        self.address = f"127.0.0.1:{self._server.add_secure_port('127.0.0.1:0', creds)}"

    def _get_crl(self, request: Any, context: grpc.ServicerContext) -> Any:
        der, chain = self._answer
        return issuer_pb2.Crl(der=der, issuer_chain=[c.public_bytes(serialization.Encoding.DER) for c in chain])

    def serve(self, crl: tuple[bytes, list[x509.Certificate]]) -> None:
        self._answer = crl

    def __enter__(self) -> CrlEndpoint:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(None).wait()


@pytest.fixture
def endpoint(world: World) -> Iterator[CrlEndpoint]:
    with CrlEndpoint(world.authority.issue_svid(CA_ID)) as served:
        yield served


@contextlib.contextmanager
def greeter(world: World, watcher: meshid.CrlWatcher) -> Iterator[int]:
    """A real greeter whose interceptor asks ``watcher`` whether a peer is revoked."""
    source = world.source(SERVER_ID)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=source)
    interceptor.set_revocation_check(watcher.is_revoked)
    with sync_server(source, interceptor) as port:
        yield port


def greet(world: World, port: int, spiffe_id: str) -> tuple[str, str]:
    with meshid.secure_channel(f"127.0.0.1:{port}", world.source(spiffe_id), server_id=SERVER_ID) as channel:
        return call(channel)


def assert_revoked(outcome: tuple[str, str]) -> None:
    code, details = outcome
    assert code == "UNAUTHENTICATED" and f"{REVOKED_ID}: certificate serial" in details and "is revoked" in details, (
        outcome
    )


def sign_crl(
    key: Any,
    issuer: x509.Name,
    serials: tuple[int, ...] = (),
    *,
    number: int | None,
) -> bytes:
    """A DER CRL valid for an hour, as any tool could make it; ``number=None`` leaves out the CRL number."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now)
        .next_update(now + datetime.timedelta(hours=1))
    )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def ca_without_crl_sign(authority: Authority) -> tuple[x509.Certificate, Any]:
    """An intermediate CA of the trust domain, signed by the real CA, whose key may sign certificates but not CRLs."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuing CA without cRLSign")]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.private_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}")]), critical=False)
        .sign(authority.private_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert, key


def crl_number(crl: tuple[bytes, list[x509.Certificate]]) -> int:
    return x509.load_der_x509_crl(crl[0]).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# --- who may sign a CRL --------------------------------------------------------------------------


def test_crl_signed_by_a_workload_leaf_is_refused(world: World, endpoint: CrlEndpoint) -> None:
    # A workload's own SVID key, a genuine leaf of the trust domain, "revokes" another workload.
    leaf = world.svids[REVOKED_ID]
    forged = (
        sign_crl(leaf.private_key, leaf.leaf.subject, (world.svids[FRONTEND_ID].serial,), number=10**6),
        list(leaf.chain),
    )
    endpoint.serve(forged)
    watcher = meshid.CrlWatcher(endpoint.address, world.source(SERVER_ID))
    refreshed = watcher.refresh()
    with greeter(world, watcher) as port:
        assert greet(world, port, FRONTEND_ID)[0] == "OK"
    assert refreshed is False
    assert watcher.last_error is not None and "is not a CA certificate" in watcher.last_error
    assert watcher.current is None
    with pytest.raises(meshid.VerificationError, match="is not a CA certificate"):
        meshid.RevocationList.from_der(*forged, world.bundles)


def test_crl_signed_by_a_ca_without_crl_sign_is_refused(world: World, endpoint: CrlEndpoint) -> None:
    cert, key = ca_without_crl_sign(world.authority)
    forged = (sign_crl(key, cert.subject, (world.svids[FRONTEND_ID].serial,), number=10**6), [cert])
    endpoint.serve(forged)
    watcher = meshid.CrlWatcher(endpoint.address, world.source(SERVER_ID))
    refreshed = watcher.refresh()
    with greeter(world, watcher) as port:
        assert greet(world, port, FRONTEND_ID)[0] == "OK"
    assert refreshed is False
    assert watcher.last_error is not None and "cRLSign" in watcher.last_error
    with pytest.raises(meshid.VerificationError, match="does not include cRLSign"):
        meshid.RevocationList.from_der(*forged, world.bundles)


# --- which CRL replaces the list in force ---------------------------------------------------------


def test_crl_without_a_crl_number_is_refused(world: World, endpoint: CrlEndpoint) -> None:
    watcher = meshid.CrlWatcher(endpoint.address, world.source(SERVER_ID))
    endpoint.serve(world.crl_after)
    assert watcher.refresh(), watcher.last_error
    # Signed by the CA's own key, but without a number: it would un-revoke REVOKED_ID.
    unnumbered = (
        sign_crl(world.authority.private_key, world.authority.certificate.subject, number=None),
        [world.authority.certificate],
    )
    endpoint.serve(unnumbered)
    with greeter(world, watcher) as port:
        assert_revoked(greet(world, port, REVOKED_ID))
        refreshed = watcher.refresh()
        assert_revoked(greet(world, port, REVOKED_ID))
        assert greet(world, port, FRONTEND_ID)[0] == "OK"
    assert refreshed is False
    assert watcher.last_error is not None and "no CRL number" in watcher.last_error
    with pytest.raises(meshid.VerificationError, match="no CRL number"):
        meshid.RevocationList.from_der(*unnumbered, world.bundles)


def test_older_crl_number_after_a_newer_one_is_refused(
    world: World, endpoint: CrlEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    assert crl_number(world.crl_before) < crl_number(world.crl_after)
    watcher = meshid.CrlWatcher(endpoint.address, world.source(SERVER_ID))
    endpoint.serve(world.crl_after)
    assert watcher.refresh(), watcher.last_error
    with greeter(world, watcher) as port:
        assert_revoked(greet(world, port, REVOKED_ID))
        # The CA's own, genuine, earlier CRL replayed: it does not list REVOKED_ID yet.
        endpoint.serve(world.crl_before)
        refreshed = watcher.refresh()
        assert_revoked(greet(world, port, REVOKED_ID))
        assert greet(world, port, FRONTEND_ID)[0] == "OK"
        assert refreshed is False
        assert watcher.last_error is not None and "older than number" in watcher.last_error
        assert watcher.current is not None and watcher.current.number == crl_number(world.crl_after)
        # The same CRL again is a refetch: no change, no error, nothing logged.
        endpoint.serve(world.crl_after)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meshid.revocation"):
            assert watcher.refresh() is True
        assert watcher.last_error is None
        assert caplog.records == []


# --- a stale CRL ---------------------------------------------------------------------------------


def test_crl_past_next_update_is_reported_stale_and_still_enforced(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    watcher = meshid.CrlWatcher(world.ca, world.source(SERVER_ID), clock=clock)
    assert watcher.refresh(), watcher.last_error
    assert watcher.current is not None and REGISTRY.get_sample_value("meshid_crl_stale", {"trust_domain": TD}) == 0
    assert not watcher.stale
    with greeter(world, watcher) as port:
        assert_revoked(greet(world, port, REVOKED_ID))
        # The CA signs CRLs for an hour; two hours on, the one it still hands out is stale.
        clock.advance(2 * 3600)
        assert watcher.stale
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meshid.revocation"):
            assert watcher.refresh() is True
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "past its nextUpdate" in caplog.records[0].getMessage()
        assert "still enforcing it" in caplog.records[0].getMessage()
        assert REGISTRY.get_sample_value("meshid_crl_stale", {"trust_domain": TD}) == 1
        left = REGISTRY.get_sample_value("meshid_crl_next_update_seconds", {"trust_domain": TD})
        assert left is not None and left < 0
        assert_revoked(greet(world, port, REVOKED_ID))
        assert greet(world, port, FRONTEND_ID)[0] == "OK"


def test_stale_crl_stays_enforced_while_the_ca_answers_nothing_usable(world: World, endpoint: CrlEndpoint) -> None:
    clock = ManualClock()
    watcher = meshid.CrlWatcher(endpoint.address, world.source(SERVER_ID), clock=clock)
    endpoint.serve(world.crl_after)
    assert watcher.refresh(), watcher.last_error
    endpoint.serve((b"", []))  # the endpoint now answers with nothing usable
    clock.advance(2 * 3600)
    with greeter(world, watcher) as port:
        assert watcher.refresh() is False
        assert watcher.stale
        assert_revoked(greet(world, port, REVOKED_ID))


# --- RevocationList on its own --------------------------------------------------------------------


def test_same_crl_number_again_changes_nothing(world: World) -> None:
    first = meshid.RevocationList.from_der(*world.crl_after, world.bundles)
    again = meshid.RevocationList.from_der(*world.crl_after, world.bundles)
    assert again.supersedes(first) is False
    assert meshid.RevocationList.from_der(*world.crl_after, world.bundles).supersedes(None) is True
    assert first.supersedes(meshid.RevocationList.from_der(*world.crl_before, world.bundles)) is True


def test_same_crl_number_with_other_contents_is_refused(world: World) -> None:
    authority = world.authority
    number = crl_number(world.crl_after)
    listed = meshid.RevocationList.from_der(*world.crl_after, world.bundles)
    other = meshid.RevocationList.from_der(
        sign_crl(authority.private_key, authority.certificate.subject, number=number),
        [authority.certificate],
        world.bundles,
    )
    with pytest.raises(meshid.VerificationError, match="again, but with other contents"):
        other.supersedes(listed)


def test_crl_signed_by_a_ca_outside_the_bundle_is_refused(world: World) -> None:
    stranger = Authority.create_root(TD)  # the trust domain's name, not its bundle
    der = sign_crl(stranger.private_key, stranger.certificate.subject, number=10**6)
    with pytest.raises(meshid.VerificationError, match=r"does not chain to the bundle of example\.org"):
        meshid.RevocationList.from_der(der, [stranger.certificate], world.bundles)


def test_crl_that_is_not_der_is_refused(world: World) -> None:
    with pytest.raises(meshid.VerificationError, match="CRL: cannot be read"):
        meshid.RevocationList.from_der(b"not a CRL", [world.authority.certificate], world.bundles)
