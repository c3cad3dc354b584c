"""Issue #10 item 3: one upstream root shared by two trust domains.

The world: a corporate root, and two meshid CAs made the way ``meshid ca init --upstream-cert``
makes them, ``a.org`` (by the CLI, with ``--dns-suffix a.example``) and ``b.org`` (by
``init_data_dir``, with ``b.example``), each an intermediate under that root, so both trust
domains' bundles are that one root. A greeter of a.org behind
:class:`meshid.AuthorizationInterceptor` trusts both bundles, and a.org's CA serves on loopback.
Every row is a real TLS connection; its outcome is ``OK``, ``HANDSHAKE`` (the TLS handshake
failed), ``DOWN`` (nothing listens), or the status code of the refusal.

Two things bind each meshid intermediate to its trust domain. It carries a critical DNS name
constraint permitting only its own trust domain's identity names
(``<id-hash>.<td-hash>.td.meshid.invalid`` lie under ``<td-hash>.td.meshid.invalid``) and its
operator's DNS suffixes: BoringSSL (grpcio) enforces it during the handshake on both sides, so
a client's ``server_id`` pin, which grpcio checks alone, refuses a server (or a CA) that
b.org's CA key minted for a.org; cryptography, meshid's verifier, enforces it too. And meshid's
verifier requires every CA between the shared root and a leaf to name the leaf's trust domain,
which still guards servers against a b.org intermediate without the constraint (one made before
it existed). What remains: the shared root's own key, a CA outside meshid under that root that
carries no constraint, and such an old b.org intermediate, against a client's pin. The last
test shows why the constraint is on DNS names and not on URIs: BoringSSL enforces a URI
constraint, but cryptography's verifier refuses every chain that has one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshid

# The CA's wire messages are private; the fake CA below speaks that protocol directly.
from meshid._proto import issuer_pb2
from meshid.ca import Authority
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import DataDirError, init_data_dir, load_authority
from meshid.ca.server import CaServer
from meshid.cli import main as meshid_cli
from support import SAY_HELLO, SERVICE, hello, stub, sync_server

pytestmark = pytest.mark.timeout(120)

A, B = meshid.TrustDomain.parse("a.org"), meshid.TrustDomain.parse("b.org")
A_SERVER = "spiffe://a.org/ns/prod/sa/greeter"
A_FRONTEND = "spiffe://a.org/ns/prod/sa/frontend"
A_WEB = "spiffe://a.org/ns/prod/sa/web"
A_ADMIN = "spiffe://a.org/meshid/admin"
A_CA = "spiffe://a.org/meshid/ca"
B_SERVER = "spiffe://b.org/ns/prod/sa/greeter"
B_PARTNER = "spiffe://b.org/ns/prod/sa/partner"

POLICY = {
    "name": "a-greeter",
    "allow": [
        {"name": "frontend", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [A_FRONTEND]},
        {"name": "b-org-hello", "methods": [SAY_HELLO], "trust_domains": ["b.org"]},
    ],
}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _plain_ca(
    issuer: Authority, name: str, *, constraint: x509.NameConstraints | None = None, uri: str | None = None
) -> Authority:
    """A CA under ``issuer`` that meshid did not make: no name constraint unless given, a URI SAN if given.

    Returned as an Authority of trust domain a.org so that it can sign a.org SVIDs, as its
    key's holder could.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corp"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    signer = issuer.private_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    if constraint is not None:
        builder = builder.add_extension(constraint, critical=True)
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    cert = builder.sign(signer, hashes.SHA256())
    return Authority(A, cert, key, (cert, *issuer.chain), issuer.roots)


def as_trust_domain(authority: Authority, td: meshid.TrustDomain) -> Authority:
    """``authority``'s own key and certificate, signing for ``td``: what the key's holder can do."""
    return dataclasses.replace(authority, trust_domain=td)


@dataclass
class World:
    corp: Authority  # the corporate root both trust domains' bundles hold
    a_ca: Authority  # a.org's CA, an intermediate under corp (from its data folder)
    b_ca: Authority  # b.org's CA, the same
    old_b_ca: Authority  # a b.org intermediate without a name constraint, as meshid made them before
    bundles: meshid.BundleSet  # a.org and b.org, each the corporate root
    a_folder: Path
    ca: str  # the address of a.org's CA
    greeter: int  # a.org's greeter, behind meshid's interceptor
    tmp: Path

    def client(self, svid: meshid.X509Svid) -> meshid.StaticSource:
        return meshid.StaticSource(svid, self.bundles)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("shared-root")
    corp = Authority.create_root("corp.example")
    (tmp / "corp.pem").write_bytes(corp.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp / "corp.key").write_bytes(_key_pem(corp.private_key))
    upstream = ["--upstream-cert", str(tmp / "corp.pem"), "--upstream-key", str(tmp / "corp.key")]
    init_a = ["ca", "init", "--data-dir", str(tmp / "a"), "--trust-domain", "a.org", *upstream]
    assert meshid_cli([*init_a, "--dns-suffix", "a.example"]) == 0
    init_data_dir(
        tmp / "b", "b.org", upstream_cert=str(tmp / "corp.pem"), upstream_key=str(tmp / "corp.key"),
        dns_suffixes=["b.example"],
    )  # fmt: skip
    a_ca, _ = load_authority(tmp / "a")
    b_ca, _ = load_authority(tmp / "b")
    old_b_ca = _plain_ca(corp, "meshid intermediate CA b.org (no name constraint)", uri="spiffe://b.org")
    bundles = meshid.BundleSet.of(
        meshid.TrustBundle.load(A, tmp / "a" / "bundle.pem"), meshid.TrustBundle.load(B, tmp / "b" / "bundle.pem")
    )
    assert bundles[A].roots == bundles[B].roots == (corp.certificate,)  # the premise: one root, two bundles
    with contextlib.ExitStack() as stack:
        ca_server = CaServer(tmp / "a", "127.0.0.1:0")
        address = f"127.0.0.1:{ca_server.start()}"
        stack.callback(ca_server.stop, None)
        with AdminClient(address, tmp / "a") as admin:
            admin.create_entry(A_FRONTEND)
        source = meshid.StaticSource(a_ca.issue_svid(A_SERVER), bundles)
        interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=source)
        greeter = stack.enter_context(sync_server(source, interceptor))
        yield World(corp, a_ca, b_ca, old_b_ca, bundles, tmp / "a", address, greeter, tmp)


def outcome(attempt: Callable[[], object]) -> tuple[str, str]:
    """Run one attempt: ("OK", caller) or (outcome, details); a failed handshake is "HANDSHAKE"."""
    try:
        result = attempt()
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
    except meshid.RemoteError as err:
        code, details = err.code, str(err)
    else:
        return "OK", str(result)
    if code == "UNAVAILABLE" and "failed to connect to all addresses" in details:
        # A listening server on loopback that drops the connection failed the handshake; a
        # refused connection means nothing listens.
        return ("DOWN" if "Connection refused" in details else "HANDSHAKE"), details
    return code, details


def greet(port: int, source: Any, *, server_id: str | None = A_SERVER, host_name: str | None = None) -> tuple[str, str]:
    """One SayHello, pinning the server's identity or DNS name: ("OK", the caller the server saw) or the refusal."""
    options = [("grpc.ssl_target_name_override", host_name)] if host_name else None
    pin = {"server_id": server_id} if server_id else {}

    def attempt() -> str:
        with meshid.secure_channel(f"127.0.0.1:{port}", source, options=options, **pin) as channel:  # type: ignore[arg-type]
            return str(stub(channel).SayHello(hello(), timeout=10).caller)

    return outcome(attempt)


@contextlib.contextmanager
def serving(svid: meshid.X509Svid, bundles: meshid.BundleSet) -> Iterator[int]:
    """A greeter presenting ``svid`` behind meshid's interceptor (the a.org policy)."""
    source = meshid.StaticSource(svid, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=source)
    with sync_server(source, interceptor) as port:
        yield port


# --- the intermediates meshid makes under the shared root -------------------------------------------


def test_each_intermediate_permits_only_its_trust_domains_names_and_suffixes(world: World) -> None:
    for ca, td, suffix in ((world.a_ca, A, "a.example"), (world.b_ca, B, "b.example")):
        constraint = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
        assert constraint.critical
        assert constraint.value.permitted_subtrees == [
            x509.DNSName(meshid.identity_dns_name(td)),
            x509.DNSName(suffix),
        ]
        assert constraint.value.excluded_subtrees is None
        assert ca.dns_suffixes == (suffix,)
    assert json.loads((world.a_folder / "config.json").read_text())["dns_suffixes"] == ["a.example"]
    # Every SVID's identity names lie under its trust domain's permitted name.
    leaf = world.a_ca.issue_svid(A_SERVER).leaf
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == [meshid.identity_dns_name(meshid.SpiffeId.parse(A_SERVER)), meshid.identity_dns_name(A)]
    assert all(n.endswith(meshid.identity_dns_name(A)) for n in names)


@pytest.mark.parametrize(
    "suffix",
    [".a.example", "*.a.example", "a..example", "a.example.", "", "meshid.invalid", "invalid", "x.td.meshid.invalid"],
    ids=["leading-dot", "wildcard", "empty-label", "trailing-dot", "empty", "identity-zone", "its-parent", "inside"],
)
def test_dns_suffix_that_is_no_host_name_or_covers_identity_names_is_refused(world: World, suffix: str) -> None:
    folder = world.tmp / "refused"
    with pytest.raises(DataDirError, match="DNS suffix"):
        init_data_dir(
            folder, "c.org", upstream_cert=str(world.tmp / "corp.pem"), upstream_key=str(world.tmp / "corp.key"),
            dns_suffixes=[suffix],
        )  # fmt: skip
    assert not (folder / "ca.key").exists()


def test_dns_suffix_for_a_self_signed_ca_is_refused(world: World) -> None:
    with pytest.raises(DataDirError, match="a self-signed CA needs none"):
        init_data_dir(world.tmp / "self-signed", "c.org", dns_suffixes=["c.example"])


def test_upstream_ca_whose_name_constraint_leaves_out_the_identity_names_is_refused(world: World) -> None:
    corp_web = _plain_ca(
        world.corp, "corp web CA", constraint=x509.NameConstraints([x509.DNSName("corp.example")], None)
    )
    with pytest.raises(ValueError, match=r"does not permit DNS name .*\.td\.meshid\.invalid"):
        Authority.from_upstream(A, corp_web.certificate, corp_web.private_key, upstream_chain=[world.corp.certificate])


# --- the greeter: a CA of another trust domain cannot vouch for a.org -------------------------------


def test_a_org_svid_from_a_org_ca_is_allowed(world: World) -> None:
    assert greet(world.greeter, world.client(world.a_ca.issue_svid(A_FRONTEND))) == ("OK", A_FRONTEND)


def test_b_org_svid_from_b_org_ca_is_allowed_for_b_org(world: World) -> None:
    assert greet(world.greeter, world.client(world.b_ca.issue_svid(B_PARTNER))) == ("OK", B_PARTNER)


def test_b_org_ca_key_signing_an_a_org_svid_is_refused(world: World) -> None:
    minted = as_trust_domain(world.b_ca, A).issue_svid(A_FRONTEND)
    # b.org's name constraint does not permit a.org's identity names: BoringSSL refuses the
    # client certificate during the handshake, and meshid's verifier (cryptography's) refuses it.
    assert greet(world.greeter, world.client(minted))[0] == "HANDSHAKE"
    with pytest.raises(meshid.VerificationError, match="no permitted name constraints matched"):
        world.bundles.verify(minted.leaf, minted.chain[1:])


def test_b_org_intermediate_without_a_name_constraint_cannot_sign_for_a_org(world: World) -> None:
    # A b.org intermediate made before meshid wrote name constraints: the TLS layer admits the
    # chain, and meshid's verifier refuses it, since the CA names another trust domain.
    minted = world.old_b_ca.issue_svid(A_FRONTEND)
    assert greet(world.greeter, world.client(minted))[0] == "UNAUTHENTICATED"
    with pytest.raises(meshid.VerificationError, match=r"belongs to trust domain b\.org, not a\.org"):
        world.bundles.verify(minted.leaf, minted.chain[1:])


def test_ca_outside_meshid_under_the_shared_root_cannot_sign_for_a_org(world: World) -> None:
    # A corporate CA under the same root that names no trust domain (say, the web servers' CA).
    outsider = _plain_ca(world.corp, "corp web CA")
    minted = outsider.issue_svid(A_FRONTEND)
    assert greet(world.greeter, world.client(minted))[0] == "UNAUTHENTICATED"
    with pytest.raises(meshid.VerificationError, match="names no trust domain"):
        world.bundles.verify(minted.leaf, minted.chain[1:])


def test_ca_outside_meshid_above_a_org_intermediate_is_allowed(world: World) -> None:
    # root -> corporate intermediate (no SPIFFE ID) -> a.org's meshid intermediate -> leaf:
    # what `ca init --upstream-cert` makes from a corporate issuing CA and its chain.
    corp_issuing = _plain_ca(world.corp, "corp issuing CA")
    a_under = Authority.from_upstream(
        A, corp_issuing.certificate, corp_issuing.private_key, upstream_chain=[world.corp.certificate]
    )
    assert [c.subject for c in a_under.chain] == [a_under.certificate.subject, corp_issuing.certificate.subject]
    assert greet(world.greeter, world.client(a_under.issue_svid(A_FRONTEND))) == ("OK", A_FRONTEND)


def test_root_key_still_vouches_for_every_trust_domain_whose_bundle_holds_it(world: World) -> None:
    # What remains: the holder of the shared root's key (or of a corporate CA under it that
    # names no trust domain) can make a fresh intermediate naming a.org. A bundle is a trust
    # statement: meshid cannot tell that intermediate from a.org's own.
    rogue = Authority.from_upstream(A, world.corp.certificate, world.corp.private_key)
    assert greet(world.greeter, world.client(rogue.issue_svid(A_FRONTEND))) == ("OK", A_FRONTEND)


# --- a.org's CA: a b.org-minted a.org admin gets nothing --------------------------------------------


def _admin_folder(folder: Path, svid: meshid.X509Svid, bundle: meshid.TrustBundle) -> Path:
    (folder / "admin").mkdir(parents=True)
    (folder / "admin" / "svid.pem").write_bytes(svid.chain_pem())
    (folder / "admin" / "svid.key").write_bytes(svid.key_pem())
    (folder / "admin" / "bundle.pem").write_bytes(bundle.to_pem())
    return folder


def test_a_org_admin_creates_a_join_token(world: World) -> None:
    with AdminClient(world.ca, world.a_folder) as admin:
        assert outcome(lambda: admin.create_token(A_FRONTEND).token)[0] == "OK"


@pytest.mark.parametrize("minter", ["b-org-ca", "b-org-ca-without-name-constraint"])
def test_b_org_minted_a_org_admin_cannot_create_entries_or_join_tokens(world: World, minter: str) -> None:
    # b.org's CA today: refused at the handshake (the name constraint); one made before the
    # constraint existed: refused by meshid's verifier (the CA names b.org).
    ca, expected = (
        (as_trust_domain(world.b_ca, A), "HANDSHAKE") if minter == "b-org-ca" else (world.old_b_ca, "UNAUTHENTICATED")
    )
    minted = ca.issue_svid(A_ADMIN)
    folder = _admin_folder(world.tmp / f"minted-admin-{minter}", minted, world.bundles[A])
    with AdminClient(world.ca, folder) as admin:
        assert outcome(lambda: admin.create_token(A_FRONTEND))[0] == expected
        assert outcome(lambda: admin.create_entry("spiffe://a.org/ns/prod/sa/planted"))[0] == expected


# --- a.org's clients: a server_id pin holds under the shared root -----------------------------------

PINS = pytest.mark.parametrize("pin", ["id", "trust-domain"])


@PINS
def test_a_org_server_passes_an_a_org_clients_pin(world: World, pin: str) -> None:
    client = world.client(world.a_ca.issue_svid(A_FRONTEND))
    assert greet(world.greeter, client, server_id=A_SERVER if pin == "id" else "a.org") == ("OK", A_FRONTEND)


@PINS
def test_b_org_server_passes_a_b_org_pin(world: World, pin: str) -> None:
    client = world.client(world.a_ca.issue_svid(A_FRONTEND))
    with serving(world.b_ca.issue_svid(B_SERVER), world.bundles) as b_server:
        assert greet(b_server, client, server_id=B_SERVER if pin == "id" else "b.org") == ("OK", A_FRONTEND)


@PINS
def test_b_org_minted_a_org_server_fails_an_a_org_clients_pin(world: World, pin: str) -> None:
    client = world.client(world.a_ca.issue_svid(A_FRONTEND))
    with serving(as_trust_domain(world.b_ca, A).issue_svid(A_SERVER), world.bundles) as impostor:
        result = greet(impostor, client, server_id=A_SERVER if pin == "id" else "a.org")
    assert result[0] == "HANDSHAKE", result


def test_a_server_that_is_gone_is_down_not_a_failed_handshake(world: World) -> None:
    # What tells the rows above apart from a dead server: a closed port is "DOWN".
    with serving(world.a_ca.issue_svid(A_SERVER), world.bundles) as port:
        pass
    assert greet(port, world.client(world.a_ca.issue_svid(A_FRONTEND)))[0] == "DOWN"


def _token_thief(minted: meshid.X509Svid, stolen: list[str]) -> grpc.Server:
    """A CA impostor presenting ``minted`` that records every join token sent to it."""

    def steal(request: Any, context: grpc.ServicerContext) -> Any:
        stolen.append(request.join_token)
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
    return grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])


@pytest.mark.parametrize("minter", ["b-org-ca", "a-org-ca"])
def test_b_org_minted_a_org_ca_receives_no_a_org_join_token(world: World, minter: str) -> None:
    # The "a-org-ca" row is the control: the same thief with a.org's own CA key gets the token,
    # so the b.org row fails at the name constraint and for no other reason.
    ca = as_trust_domain(world.b_ca, A) if minter == "b-org-ca" else world.a_ca
    minted = ca.issue_svid(A_CA)
    stolen: list[str] = []
    server = _token_thief(minted, stolen)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(minted.key_pem(), minted.chain_pem())]))
    server.start()
    try:
        with AdminClient(world.ca, world.a_folder) as admin:
            token = str(admin.create_token(A_FRONTEND).token)
        result = outcome(lambda: fetch_svid(f"127.0.0.1:{port}", world.a_folder / "bundle.pem", token))
    finally:
        server.stop(None).wait()
    if minter == "b-org-ca":
        assert stolen == [] and result[0] == "HANDSHAKE", (stolen, result)
    else:
        assert stolen == [token] and result[0] == "INTERNAL", (stolen, result)


def test_a_org_ca_issues_for_an_a_org_join_token(world: World) -> None:
    with AdminClient(world.ca, world.a_folder) as admin:
        token = str(admin.create_token(A_FRONTEND).token)
    svid, bundle = fetch_svid(world.ca, world.a_folder / "bundle.pem", token)
    assert (str(svid.spiffe_id), bundle.roots) == (A_FRONTEND, (world.corp.certificate,))


def test_b_org_intermediate_without_a_name_constraint_still_passes_an_a_org_pin(world: World) -> None:
    # What remains on the client side: a b.org intermediate made before meshid wrote name
    # constraints (rotate b.org's CA to get one), like the root key and an unconstrained
    # corporate CA under the root, can still write a.org's identity names.
    client = world.client(world.a_ca.issue_svid(A_FRONTEND))
    with serving(world.old_b_ca.issue_svid(A_SERVER), world.bundles) as impostor:
        assert greet(impostor, client)[0] == "OK"


def test_a_bundle_of_a_org_own_intermediate_makes_the_pin_hold_against_any_other_ca(world: World) -> None:
    # The remedy for what remains: a.org's bundle holds a.org's own CA certificate, not the
    # shared root. BoringSSL (in grpcio) and cryptography both accept a trust anchor that is not self-signed.
    narrowed = meshid.BundleSet.of(meshid.TrustBundle(A, (world.a_ca.certificate,)), world.bundles[B])
    client = meshid.StaticSource(world.a_ca.issue_svid(A_FRONTEND), narrowed)
    with serving(world.old_b_ca.issue_svid(A_SERVER), world.bundles) as impostor:
        assert greet(impostor, client)[0] == "HANDSHAKE"
    assert greet(world.greeter, client) == ("OK", A_FRONTEND)


# --- entries' DNS names: only under the suffixes the intermediate permits ---------------------------


def test_entry_with_dns_names_under_a_suffix_is_issued_and_verified(world: World) -> None:
    with AdminClient(world.ca, world.a_folder) as admin:
        admin.create_entry(A_WEB, ["web.a.example", "A.Example"])
        token = str(admin.create_token(A_WEB).token)
    svid, _ = fetch_svid(world.ca, world.a_folder / "bundle.pem", token)
    san = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName)[:2] == ["web.a.example", "a.example"]
    # meshid's verifier (cryptography's) ...
    assert world.bundles.verify(svid.leaf, svid.chain[1:]) == meshid.SpiffeId.parse(A_WEB)
    # ... and BoringSSL, in a real handshake: a client that checks the DNS name, and one that pins the ID.
    client = world.client(world.a_ca.issue_svid(A_FRONTEND))
    with serving(svid, world.bundles) as web:
        assert greet(web, client, server_id=None, host_name="web.a.example") == ("OK", A_FRONTEND)
        assert greet(web, client, server_id=A_WEB) == ("OK", A_FRONTEND)


@pytest.mark.parametrize("name", ["web.b.example", "b.example", "web.example", "weba.example", "a.example.evil.test"])
def test_entry_with_a_dns_name_outside_the_suffixes_is_refused(world: World, name: str) -> None:
    with AdminClient(world.ca, world.a_folder) as admin:
        code, details = outcome(lambda: admin.create_entry(A_WEB + "-outside", [name]))
    assert code == "INVALID_ARGUMENT" and "outside the DNS suffixes" in details and "--dns-suffix" in details, details


def test_svid_with_a_dns_name_outside_the_suffixes_verifies_nowhere(world: World) -> None:
    # Why the CA refuses such an entry: signed anyway (the CA's key can), the SVID fails
    # BoringSSL's handshake, whatever the client checks, and meshid's verifier.
    svid = world.a_ca.issue_svid(A_WEB, dns_names=["web.b.example"])
    client = world.client(world.a_ca.issue_svid(A_FRONTEND))
    with serving(svid, world.bundles) as web:
        assert greet(web, client, server_id=None, host_name="web.b.example")[0] == "HANDSHAKE"
        assert greet(web, client, server_id=A_WEB)[0] == "HANDSHAKE"
    with pytest.raises(meshid.VerificationError, match="no permitted name constraints matched"):
        world.bundles.verify(svid.leaf, svid.chain[1:])


# --- why the name constraint is on DNS names, not URIs ----------------------------------------------


def test_uri_name_constraint_is_enforced_by_boringssl_but_refused_by_cryptography(world: World) -> None:
    # An intermediate permitted only URIs whose host is b.org, in RFC 5280's form: the host alone.
    only_b = x509.NameConstraints(permitted_subtrees=[x509.UniformResourceIdentifier("b.org")], excluded_subtrees=None)
    constrained = _plain_ca(world.corp, "b.org constrained CA", constraint=only_b)
    # BoringSSL (grpcio's TLS) enforces it during the handshake: an a.org SVID under it never connects.
    cross = as_trust_domain(constrained, A).issue_svid(A_FRONTEND)
    assert greet(world.greeter, world.client(cross))[0] == "HANDSHAKE"
    # A b.org SVID under it passes the handshake, and then meshid's verifier, which is
    # cryptography's, refuses the chain: cryptography implements no URI name constraint.
    own = as_trust_domain(constrained, B).issue_svid(B_PARTNER)
    assert greet(world.greeter, world.client(own))[0] == "UNAUTHENTICATED"
    with pytest.raises(meshid.VerificationError, match="unsupported name constraint"):
        world.bundles.verify(own.leaf, own.chain[1:])
    # With the scheme in the constraint, BoringSSL refuses every chain under it, its own trust domain's too.
    with_scheme = x509.NameConstraints([x509.UniformResourceIdentifier("spiffe://b.org")], None)
    schemed = _plain_ca(world.corp, "b.org schemed CA", constraint=with_scheme)
    assert greet(world.greeter, world.client(as_trust_domain(schemed, B).issue_svid(B_PARTNER)))[0] == "HANDSHAKE"


def test_crl_from_a_signer_another_trust_domains_ca_minted_is_refused(world: World) -> None:
    # Revocation is trust too: a CA under b.org's (old, unconstrained) intermediate that names
    # a.org must not be able to replace a.org's CRL (and so un-revoke a.org's peers).
    from meshid.ca.crl import build_crl

    minted_signer = _plain_ca(world.old_b_ca, "a.org CRL signer minted by b.org", uri="spiffe://a.org")
    forged = build_crl(minted_signer, [], number=10**6, now=_now())
    with pytest.raises(meshid.VerificationError, match=r"belongs to trust domain b\.org, not a\.org"):
        meshid.RevocationList.from_der(forged, list(minted_signer.chain), world.bundles)
    genuine = build_crl(world.a_ca, [], number=1, now=_now())  # positive control: a.org's own CA
    assert meshid.RevocationList.from_der(genuine, list(world.a_ca.chain), world.bundles).trust_domain == A
