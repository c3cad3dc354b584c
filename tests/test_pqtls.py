"""The post-quantum mTLS path (issue #18, must show 2): two workloads with ML-DSA-65 SVIDs from
meshid's CA complete a mutual TLS 1.3 handshake over pyOpenSSL with a hybrid ML-KEM group, and
meshid's own verifier and policy decide the peer; a policy requiring a PQ signature denies ECDSA."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.x509.oid import SignatureAlgorithmOID

from meshid import AuthorizationPolicy, BundleSet, StaticSource, TrustBundle, X509Svid
from meshid.ca import Authority, generate_key
from meshid.errors import AccessDeniedError, VerificationError
from support import eventually, free_port

pqtls = pytest.importorskip("meshid.pqtls")
pytest.importorskip("OpenSSL", reason="the pqtls path needs pyOpenSSL (meshid[pq])")

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/ns/prod/sa/echo"
CLIENT_ID = f"spiffe://{TD}/ns/prod/sa/frontend"
METHOD = "/echo.Echo/Say"


@dataclass
class Cas:
    classical: Authority
    pq: Authority
    bundles: BundleSet

    def pq_source(self, spiffe_id: str) -> StaticSource:
        return StaticSource(self.pq.issue_svid(spiffe_id, key_kind="ml-dsa-65"), self.bundles)

    def classical_source(self, spiffe_id: str) -> StaticSource:
        return StaticSource(self.classical.issue_svid(spiffe_id), self.bundles)


@pytest.fixture(scope="module")
def cas() -> Cas:
    classical = Authority.create_root(TD)
    pq = Authority.create_root(TD, key=generate_key("ml-dsa-65"))
    return Cas(classical, pq, BundleSet.of(TrustBundle(TD, (*classical.roots, *pq.roots))))


def policy(*, require_pq_signature: bool) -> AuthorizationPolicy:
    return AuthorizationPolicy.from_dict(
        {
            "name": "echo",
            "require_pq_key_exchange": True,
            "require_pq_signature": require_pq_signature,
            "allow": [{"name": "frontend", "methods": ["/echo.Echo/*"], "spiffe_ids": [CLIENT_ID]}],
        }
    )


@dataclass
class EchoServer:
    """One pqtls.accept on 127.0.0.1 in a thread: it echoes one message, or records its refusal."""

    port: int
    peers: list[object] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def echo_server() -> Iterator[Callable[[StaticSource, AuthorizationPolicy], EchoServer]]:
    started: list[tuple[socket.socket, threading.Thread]] = []

    def start(source: StaticSource, server_policy: AuthorizationPolicy, is_revoked=None) -> EchoServer:
        listener = socket.create_server(("127.0.0.1", 0))
        server = EchoServer(listener.getsockname()[1])

        def serve() -> None:
            try:
                raw, _ = listener.accept()
                with pqtls.accept(
                    raw, source, policy=server_policy, method=METHOD, timeout=10, is_revoked=is_revoked
                ) as conn:
                    server.peers.append(conn.peer)
                    conn.sendall(conn.recv(1024))
            except BaseException as err:  # recorded for the test to assert on
                server.errors.append(err)
            finally:
                server.done.set()

        thread = threading.Thread(target=serve, name="pqtls-echo", daemon=True)
        thread.start()
        started.append((listener, thread))
        return server

    try:
        yield start
    finally:
        for listener, thread in started:
            listener.close()
            thread.join(timeout=10)
            assert not thread.is_alive()


def test_mutual_tls13_with_ml_dsa_svids_uses_a_hybrid_group_and_ml_dsa_on_both_sides(cas: Cas, echo_server) -> None:
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True))
    with pqtls.connect(("127.0.0.1", server.port), cas.pq_source(CLIENT_ID), server_id=SERVER_ID, timeout=10) as conn:
        conn.sendall(b"hello")
        assert conn.recv(1024) == b"hello"
        seen_by_client = conn.peer
    assert server.done.wait(10) and not server.errors, server.errors
    (seen_by_server,) = server.peers
    for peer, expected in ((seen_by_client, SERVER_ID), (seen_by_server, CLIENT_ID)):
        assert str(peer.spiffe_id) == expected
        assert peer.tls_version == "TLSv1.3"
        assert peer.key_exchange_group == "X25519MLKEM768" and peer.post_quantum
        assert peer.signature_algorithm == "ML-DSA-65" and peer.issuer_signature_algorithm == "ML-DSA-65"
        assert peer.post_quantum_signature
        assert peer.certificate.signature_algorithm_oid == SignatureAlgorithmOID.ML_DSA_65


def test_require_pq_signature_denies_a_peer_that_presented_ecdsa(cas: Cas, echo_server) -> None:
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True))
    with pqtls.connect(
        ("127.0.0.1", server.port), cas.classical_source(CLIENT_ID), server_id=SERVER_ID, timeout=10
    ) as conn:
        assert conn.recv(1024) == b""  # the server closed it without a word
    assert server.done.wait(10)
    (error,) = server.errors
    assert isinstance(error, AccessDeniedError)
    assert f"pqtls: {CLIENT_ID} may not call {METHOD}: the peer authenticated with ECDSA-P256" in str(error)
    assert "requires a post-quantum one" in str(error)


def test_without_require_pq_signature_the_same_ecdsa_peer_is_allowed_and_named(cas: Cas, echo_server) -> None:
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=False))
    with pqtls.connect(
        ("127.0.0.1", server.port), cas.classical_source(CLIENT_ID), server_id=SERVER_ID, timeout=10
    ) as conn:
        conn.sendall(b"hi")
        assert conn.recv(1024) == b"hi"
    assert server.done.wait(10) and not server.errors, server.errors
    (peer,) = server.peers
    assert peer.signature_algorithm == "ECDSA-P256" and not peer.post_quantum_signature
    assert peer.key_exchange_group == "X25519MLKEM768"


def test_policy_default_deny_refuses_an_ml_dsa_peer_no_rule_names(cas: Cas, echo_server) -> None:
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True))
    intruder = cas.pq_source(f"spiffe://{TD}/ns/dev/sa/intruder")
    with pqtls.connect(("127.0.0.1", server.port), intruder, server_id=SERVER_ID, timeout=10) as conn:
        assert conn.recv(1024) == b""
    assert server.done.wait(10)
    (error,) = server.errors
    assert isinstance(error, AccessDeniedError) and "no rule allows it (default deny)" in str(error)


def test_client_refuses_a_server_that_is_not_the_expected_spiffe_id(cas: Cas, echo_server) -> None:
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True))
    other = f"spiffe://{TD}/ns/prod/sa/other"
    with pytest.raises(VerificationError, match=f"pqtls: the server {SERVER_ID} is not {other}"):
        pqtls.connect(("127.0.0.1", server.port), cas.pq_source(CLIENT_ID), server_id=other, timeout=10)
    assert server.done.wait(10)


def test_client_with_require_pq_signature_refuses_an_ecdsa_server(cas: Cas, echo_server) -> None:
    server = echo_server(cas.classical_source(SERVER_ID), policy(require_pq_signature=False))
    with pytest.raises(VerificationError, match="authenticated with ECDSA-P256, not a post-quantum signature"):
        pqtls.connect(
            ("127.0.0.1", server.port),
            cas.pq_source(CLIENT_ID),
            server_id=SERVER_ID,
            timeout=10,
            require_pq_signature=True,
        )
    assert server.done.wait(10)


def test_chain_is_verified_against_the_bundle_of_the_peers_own_trust_domain(cas: Cas, echo_server) -> None:
    """A root trusted for example.org never vouches for an other.org ID, though OpenSSL's store has it."""
    rogue = Authority.create_root("other.org", key=generate_key("ml-dsa-65"))
    other = Authority.create_root("other.org", key=generate_key("ml-dsa-65"))
    bundles = BundleSet.of(
        TrustBundle(TD, (*cas.pq.roots, *rogue.roots)),  # the rogue root is trusted for example.org only
        TrustBundle("other.org", other.roots),
    )
    server_source = StaticSource(cas.pq.issue_svid(SERVER_ID, key_kind="ml-dsa-65"), bundles)
    server = echo_server(server_source, policy(require_pq_signature=True))
    impostor = StaticSource(rogue.issue_svid("spiffe://other.org/ns/prod/sa/frontend", key_kind="ml-dsa-65"), bundles)
    with pqtls.connect(("127.0.0.1", server.port), impostor, server_id=SERVER_ID, timeout=10) as conn:
        assert conn.recv(1024) == b""
    assert server.done.wait(10)
    (error,) = server.errors
    assert isinstance(error, VerificationError)
    assert "chain does not verify against its trust domain's bundle" in str(error)


def test_a_peer_with_a_certificate_no_bundle_trusts_fails_the_handshake(cas: Cas, echo_server) -> None:
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True))
    stranger = Authority.create_root(TD, key=generate_key("ml-dsa-65"))
    source = StaticSource(stranger.issue_svid(CLIENT_ID, key_kind="ml-dsa-65"), cas.bundles)
    # TLS 1.3: the server's refusal of the client's certificate comes after the client's Finished,
    # so the client learns it at its first read (or, if the server's close is quicker, at the handshake)
    with pytest.raises(
        (ConnectionError, VerificationError), match=r"pqtls: the (peer ended the connection|TLS handshake failed)"
    ):
        with pqtls.connect(("127.0.0.1", server.port), source, server_id=SERVER_ID, timeout=10) as conn:
            conn.recv(1024)
    assert server.done.wait(10)
    (error,) = server.errors
    assert isinstance(error, VerificationError)
    assert "pqtls: the TLS handshake failed: certificate verify failed" in str(error)


def test_a_revoked_ml_dsa_svid_is_refused_by_the_ca_crl(cas: Cas, echo_server) -> None:
    """The CA's CRL (signed by its classical key) lists every revoked serial of the trust domain,
    the ML-DSA SVIDs' too; the check matches a peer by trust domain and serial."""
    import datetime

    from meshid import RevocationList, SpiffeId
    from meshid.ca.crl import build_crl
    from meshid.ca.store import IssuedRecord

    client = cas.pq_source(CLIENT_ID)
    leaf = client.get_svid().leaf
    now = datetime.datetime.now(datetime.UTC)
    record = IssuedRecord(leaf.serial_number, SpiffeId.parse(CLIENT_ID), leaf.not_valid_after_utc, now, now)
    crl = build_crl(cas.classical, [record], number=1, now=now)
    revoked = RevocationList.from_der(crl, [cas.classical.certificate], cas.bundles)
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True), revoked.is_revoked)
    with pqtls.connect(("127.0.0.1", server.port), client, server_id=SERVER_ID, timeout=10) as conn:
        assert conn.recv(1024) == b""
    assert server.done.wait(10)
    (error,) = server.errors
    assert isinstance(error, VerificationError)
    assert f"pqtls: the certificate of {CLIENT_ID} (serial {leaf.serial_number:x}) is revoked" in str(error)
    # an SVID it does not list is let through by the same check
    fresh = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True), revoked.is_revoked)
    with pqtls.connect(("127.0.0.1", fresh.port), cas.pq_source(CLIENT_ID), server_id=SERVER_ID, timeout=10) as conn:
        conn.sendall(b"ok")
        assert conn.recv(1024) == b"ok"
    assert fresh.done.wait(10) and not fresh.errors


def test_a_peer_that_never_starts_the_handshake_times_out(cas: Cas) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as silent:  # a TCP peer that says nothing
            raw, _ = listener.accept()
            with pytest.raises(TimeoutError, match=r"pqtls: the peer sent nothing for 0.2 s"):
                pqtls.accept(raw, cas.pq_source(SERVER_ID), policy=policy(require_pq_signature=True), method=METHOD,
                             timeout=0.2)  # fmt: skip
            assert raw.fileno() == -1  # closed by the refusal
            assert silent.recv(1) == b""


# --- the system's openssl, where it is 3.5 or later -----------------------------------------------------


def _openssl_version() -> tuple[int, int] | None:
    if shutil.which("openssl") is None:
        return None
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False).stdout
    found = re.match(r"OpenSSL (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


_SYSTEM_OPENSSL = _openssl_version()


@pytest.mark.skipif(
    _SYSTEM_OPENSSL is None or _SYSTEM_OPENSSL < (3, 5),
    reason=f"the system openssl is {_SYSTEM_OPENSSL or 'missing'}; ML-DSA certificates need OpenSSL 3.5 or later",
)
def test_openssl_s_server_and_meshid_client_with_ml_dsa_svids(cas: Cas, tmp_path) -> None:
    server_svid: X509Svid = cas.pq.issue_svid(SERVER_ID, key_kind="ml-dsa-65")
    (tmp_path / "svid.pem").write_bytes(server_svid.chain_pem())
    (tmp_path / "svid.key").write_bytes(server_svid.key_pem())
    (tmp_path / "bundle.pem").write_bytes(cas.bundles[server_svid.spiffe_id.trust_domain].to_pem())
    port = free_port()
    process = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-cert", "svid.pem", "-key", "svid.key",
         "-CAfile", "bundle.pem", "-Verify", "2", "-verify_return_error", "-groups", "X25519MLKEM768", "-rev"],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def connected() -> object:
            try:
                return pqtls.connect(("127.0.0.1", port), cas.pq_source(CLIENT_ID), server_id=SERVER_ID, timeout=10)
            except ConnectionRefusedError:  # s_server is not listening yet
                return None

        conn = eventually(connected, 10, "openssl s_server to listen")
        with conn:
            assert conn.peer.signature_algorithm == "ML-DSA-65"
            assert conn.peer.key_exchange_group == "X25519MLKEM768"
            conn.sendall(b"hello\n")
            assert conn.recv(1024).strip() == b"olleh"
    finally:
        process.kill()
        process.wait(timeout=10)


def test_require_pq_signature_denies_an_ml_dsa_intermediate_that_an_ecdsa_root_signed(cas: Cas, echo_server) -> None:
    """Forging the ECDSA root's signature forges the ML-DSA intermediate, and with it every leaf
    under it: each signature from the root down, not the leaf's alone, must be post-quantum."""
    intermediate = Authority.from_upstream(
        TD, cas.classical.certificate, cas.classical.private_key, key=generate_key("ml-dsa-65")
    )
    client = StaticSource(intermediate.issue_svid(CLIENT_ID, key_kind="ml-dsa-65"), cas.bundles)
    server = echo_server(cas.pq_source(SERVER_ID), policy(require_pq_signature=True))
    with pqtls.connect(("127.0.0.1", server.port), client, server_id=SERVER_ID, timeout=10) as conn:
        assert conn.recv(1024) == b""  # the server closed it without a word
    assert server.done.wait(10)
    (error,) = server.errors
    assert isinstance(error, AccessDeniedError)
    assert "ECDSA-SHA256" in str(error) and "requires a post-quantum one" in str(error)


def test_client_with_require_pq_signature_refuses_a_server_under_an_ecdsa_signed_ml_dsa_intermediate(
    cas: Cas, echo_server
) -> None:
    intermediate = Authority.from_upstream(
        TD, cas.classical.certificate, cas.classical.private_key, key=generate_key("ml-dsa-65")
    )
    server_source = StaticSource(intermediate.issue_svid(SERVER_ID, key_kind="ml-dsa-65"), cas.bundles)
    server = echo_server(server_source, policy(require_pq_signature=False))
    with pytest.raises(VerificationError, match="not a post-quantum signature"):
        pqtls.connect(
            ("127.0.0.1", server.port),
            cas.pq_source(CLIENT_ID),
            server_id=SERVER_ID,
            timeout=10,
            require_pq_signature=True,
        )
    assert server.done.wait(10)
