"""Mutual TLS 1.3 with ML-DSA SVIDs, today: pyOpenSSL on ``cryptography``'s OpenSSL.

grpcio (1.85) refuses ML-DSA certificates in its handshake, so a connection that is post-quantum
end to end (ML-DSA-65 signatures, and the X25519MLKEM768 hybrid key exchange that OpenSSL 3.5+
offers first by default) runs over this module instead, on plain sockets. Install the extra:
``pip install 'meshid[pq]'``.

meshid's rules are applied to the peer exactly as on the grpc path, by the same code: OpenSSL
checks that the peer holds the key of a chain to one of the roots, then
:class:`meshid.PeerVerifier` takes the SPIFFE ID from the leaf's one URI SAN and verifies the
chain against the bundle of *that* trust domain (:meth:`meshid.BundleSet.verify`). The result is
a :class:`meshid.PeerIdentity` whose ``signature_algorithm`` says what authenticated the peer
(``ML-DSA-65``, ``ECDSA-P256``...) and whose ``key_exchange_group`` the group negotiated; a
policy's ``require_pq_signature`` and ``require_pq_key_exchange`` then apply to it::

    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw, _ = listener.accept()
        with meshid.pqtls.accept(raw, pq_source, policy=policy, method="/echo.Echo/Say") as conn:
            conn.sendall(conn.recv(1024))

    with meshid.pqtls.connect(("127.0.0.1", port), pq_source, server_id="spiffe://example.org/echo") as conn:
        conn.peer.signature_algorithm  # "ML-DSA-65"

The source hands out the SVID to present: an ML-DSA one for a post-quantum connection (e.g. a
:class:`meshid.FileSource` on the agent's ``svid-mldsa.pem``/``svid-mldsa.key``).
"""

from __future__ import annotations

import selectors
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from meshid import _x509
from meshid.authz import AuthorizationPolicy
from meshid.errors import AccessDeniedError, MeshIdError, VerificationError
from meshid.peer import PeerIdentity, PeerVerifier
from meshid.sources import Source
from meshid.spiffeid import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = ["PqTlsConnection", "accept", "connect", "context"]

T = TypeVar("T")

#: The most bytes :meth:`PqTlsConnection.recv` returns in one call.
MAX_RECV = 1 << 20


def _ssl() -> Any:
    try:
        from OpenSSL import SSL, crypto
    except ImportError as err:  # an optional extra: say how to get it
        raise MeshIdError("pqtls: needs pyOpenSSL; install meshid[pq] (pip install 'meshid[pq]')") from err
    return SSL, crypto


def context(source: Source, *, server: bool) -> SSL.Context:
    """An ``OpenSSL.SSL.Context`` for mutual TLS 1.3 with the source's SVID (TLS 1.3 only).

    It presents the SVID's chain, asks the peer for a certificate and refuses a handshake without
    one, and trusts every root of every bundle; :func:`accept` and :func:`connect` then verify
    the peer against its own trust domain's bundle. Key exchange groups are OpenSSL's defaults,
    X25519MLKEM768 first (pyOpenSSL has no call to choose them).

    Raises:
        SourceError: the source has no SVID. MeshIdError: pyOpenSSL is missing.
    """
    ssl, crypto = _ssl()
    svid = source.get_svid()
    bundles = source.get_bundles()
    ctx = ssl.Context(ssl.TLS_METHOD)
    ctx.set_min_proto_version(ssl.TLS1_3_VERSION)
    ctx.set_max_proto_version(ssl.TLS1_3_VERSION)
    ctx.use_certificate(svid.leaf)
    for cert in svid.chain[1:]:
        ctx.add_extra_chain_cert(cert)
    # pyOpenSSL takes as cryptography keys only the types it knows (not ML-DSA yet); through PEM
    # and its PKey, OpenSSL reads any key it supports. Passing a PKey is deprecated in favour of
    # the path that cannot take ML-DSA: that one warning is silenced by its exact text (a
    # catch_warnings block would not do: it is not thread-safe, and servers hand shake in threads;
    # the same filter again replaces the first, so the list does not grow).
    warnings.filterwarnings(
        "ignore", message="Passing pyOpenSSL PKey objects is deprecated", category=DeprecationWarning
    )
    ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, svid.key_pem()))
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    for bundle in bundles.values():
        for root in bundle.roots:
            store.add_cert(crypto.X509.from_cryptography(root))
    ctx.set_verify(ssl.VERIFY_PEER | ssl.VERIFY_FAIL_IF_NO_PEER_CERT, _keep_openssl_verdict)
    if server:
        # No session cache and no tickets: a resumed session skips the certificates, and every
        # connection must prove its identity (and meet today's bundle and policy) afresh.
        ctx.set_session_cache_mode(ssl.SESS_CACHE_OFF)
        ctx.set_options(ssl.OP_NO_TICKET)
    return ctx  # type: ignore[no-any-return]


def _keep_openssl_verdict(connection: object, cert: object, errno: int, depth: int, ok: int) -> bool:
    return bool(ok)


@dataclass(eq=False)
class PqTlsConnection:
    """A mutual TLS 1.3 connection whose peer meshid has verified (``peer``).

    Use it as a context manager; :meth:`close` sends TLS close_notify and closes the socket.
    """

    connection: SSL.Connection = field(repr=False)
    peer: PeerIdentity
    #: Seconds each send or receive may wait (None: forever).
    timeout: float | None = 30.0

    def sendall(self, data: bytes) -> None:
        """Send all of ``data``.

        Raises:
            TimeoutError: the peer took more than ``timeout`` to take it. OSError: the connection broke.
        """
        view = memoryview(data)
        while view:
            chunk = view[:16384]
            sent = _io(self.connection, lambda chunk=chunk: self.connection.send(chunk), self.timeout)  # type: ignore[misc]
            view = view[sent:]

    def recv(self, size: int = 65536) -> bytes:
        """Up to ``size`` bytes (at most :data:`MAX_RECV`); ``b""`` once the peer closed the connection.

        Raises:
            TimeoutError: nothing came for ``timeout`` seconds.
        """
        ssl, _ = _ssl()
        try:
            return bytes(_io(self.connection, lambda: self.connection.recv(min(size, MAX_RECV)), self.timeout))
        except ssl.ZeroReturnError:  # close_notify
            return b""
        except ssl.SysCallError as err:
            if err.args and err.args[0] == -1:  # closed without close_notify: an end all the same
                return b""
            raise ConnectionError(f"pqtls: the peer ended the connection: {_reason(err)}") from err
        except ssl.Error as err:  # TLS 1.3: a peer refuses this side's certificate after its own Finished
            raise ConnectionError(f"pqtls: the peer ended the connection: {_reason(err)}") from err

    def close(self) -> None:
        """Send TLS close_notify (if the peer is still there) and close the socket."""
        ssl, _ = _ssl()
        try:
            self.connection.shutdown()
        except (ssl.Error, OSError):
            pass  # the peer went first, or the socket is gone: nothing to tell it
        finally:
            self.connection.close()

    def __enter__(self) -> PqTlsConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _io(connection: SSL.Connection, call: Callable[[], T], timeout: float | None) -> T:
    """``call()``, retried while OpenSSL wants to read or write, waiting on the socket up to ``timeout`` each time.

    pyOpenSSL over a socket with a timeout (a non-blocking one underneath) raises WantRead/WantWrite
    instead of waiting; this waits for the socket as a blocking call would.
    """
    ssl, _ = _ssl()
    while True:
        try:
            return call()
        except ssl.WantReadError:
            event = selectors.EVENT_READ
        except ssl.WantWriteError:
            event = selectors.EVENT_WRITE
        with selectors.DefaultSelector() as waiting:  # not select.select: no limit on the descriptor's number
            waiting.register(connection.fileno(), event)
            if not waiting.select(timeout):
                raise TimeoutError(f"pqtls: the peer sent nothing for {timeout} s")


def _reason(err: Exception) -> str:
    """OpenSSL's reasons in an error, joined (``tlsv1 alert unknown ca``); a system call's, as it says them."""
    first = err.args[0] if err.args else None
    if isinstance(first, list):
        reasons = [str(part[2]) for part in first if isinstance(part, tuple) and len(part) == 3]
        return "; ".join(reasons) or str(err)
    if isinstance(first, int) and len(err.args) > 1:  # SysCallError: (errno, 'ECONNRESET')
        return str(err.args[1])
    return str(err)


def _handshake(connection: SSL.Connection, verifier: PeerVerifier, timeout: float | None) -> PeerIdentity:
    ssl, _ = _ssl()
    try:
        _io(connection, connection.do_handshake, timeout)
    except ssl.Error as err:
        raise VerificationError(f"pqtls: the TLS handshake failed: {_reason(err)}") from err
    leaf = connection.get_peer_certificate(as_cryptography=True)
    if leaf is None:  # VERIFY_FAIL_IF_NO_PEER_CERT refuses this; never trust its absence
        raise VerificationError("pqtls: the peer presented no certificate")
    sent = connection.get_peer_cert_chain(as_cryptography=True) or []
    intermediates = [c for c in sent if c != leaf]
    group = connection.get_group_name()
    # The same shape as grpc's auth context, so the one verifier decides both paths.
    auth = {
        "x509_pem_cert": [_x509.cert_pem(leaf)],
        "x509_pem_cert_chain": [b"".join(_x509.cert_pem(c) for c in intermediates)] if intermediates else [],
        "ssl_tls_version": [connection.get_protocol_version_name().encode()],
        "ssl_negotiated_key_exchange_group": [group.encode()] if group else [],
    }
    return verifier.identify(auth)


def _wrap(
    sock: socket.socket, source: Source, *, server: bool, verifier: PeerVerifier | None, timeout: float | None
) -> tuple[SSL.Connection, PeerIdentity]:
    ssl, _ = _ssl()
    sock.settimeout(timeout)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # An ML-DSA flight is ~12 KB in several records: with Nagle's algorithm, the last one waits
        # for the peer's delayed ACK (40 ms on Linux) on every handshake.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection = ssl.Connection(context(source, server=server), sock)
    if server:
        connection.set_accept_state()
    else:
        connection.set_connect_state()
    try:
        peer = _handshake(connection, verifier or PeerVerifier(source.get_bundles), timeout)
    except BaseException:
        connection.close()
        raise
    return connection, peer


def accept(
    sock: socket.socket,
    source: Source,
    *,
    policy: AuthorizationPolicy,
    method: str,
    verifier: PeerVerifier | None = None,
    timeout: float | None = 30.0,
    is_revoked: Callable[[PeerIdentity], bool] | None = None,
) -> PqTlsConnection:
    """Serve mutual TLS 1.3 on an accepted socket; the peer must be allowed ``method`` by ``policy``.

    ``method`` names what the connection is for, matched by the policy's ``methods`` as a gRPC
    method would be (``/echo.Echo/Say``). ``is_revoked`` is a revocation check, as the grpc
    interceptor's (``IssuerSource.is_revoked``, ``CrlWatcher.is_revoked``: a meshid CA's CRL lists
    its ML-DSA SVIDs' serials too). The socket is closed on any refusal.

    Raises:
        VerificationError: the handshake failed, the peer's chain does not verify against its
            trust domain's bundle, or its certificate is revoked. AccessDeniedError: the policy
            denies the peer.
    """
    connection, peer = _wrap(sock, source, server=True, verifier=verifier, timeout=timeout)
    if is_revoked is not None and is_revoked(peer):
        PqTlsConnection(connection, peer, timeout).close()
        raise VerificationError(f"pqtls: the certificate of {peer.describe()} (serial {peer.serial:x}) is revoked")
    decision = policy.decide(peer, method, local_trust_domain=source.get_svid().spiffe_id.trust_domain)
    if not decision.allowed:
        PqTlsConnection(connection, peer, timeout).close()  # close_notify, then the socket
        raise AccessDeniedError(f"pqtls: {peer.describe()} may not call {method[:200]}: {decision.reason}")
    return PqTlsConnection(connection, peer, timeout)


def connect(
    address: tuple[str, int],
    source: Source,
    *,
    server_id: SpiffeId | TrustDomain | str,
    verifier: PeerVerifier | None = None,
    timeout: float | None = 30.0,
    require_pq_signature: bool = False,
) -> PqTlsConnection:
    """Connect with mutual TLS 1.3 and prove the server is ``server_id`` (a SPIFFE ID, or a trust domain).

    With ``require_pq_signature``, a server that did not authenticate with an ML-DSA chain is refused.

    Raises:
        VerificationError: the handshake failed, or the server is not ``server_id``, or its chain
            does not verify against its trust domain's bundle, or it is not post-quantum as asked.
        OSError: the connection cannot be made.
    """
    expected = _expected(server_id)
    sock = socket.create_connection(address, timeout=timeout)
    try:
        connection, peer = _wrap(sock, source, server=False, verifier=verifier, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    problem = _mismatch(peer, expected)
    if problem is None and require_pq_signature and not peer.post_quantum_signature:
        classical = (
            peer.signature_algorithm
            if not _x509.is_post_quantum(peer.signature_algorithm)
            else f"a chain that carries {peer.classical_chain_signature}"
        )
        problem = f"authenticated with {classical}, not a post-quantum signature"
    if problem is not None:
        connection.close()
        raise VerificationError(f"pqtls: the server {peer.describe()} {problem}")
    return PqTlsConnection(connection, peer, timeout)


def _expected(server_id: SpiffeId | TrustDomain | str) -> SpiffeId | TrustDomain:
    if isinstance(server_id, SpiffeId | TrustDomain):
        return server_id
    if isinstance(server_id, str):
        return SpiffeId.parse(server_id) if server_id.startswith("spiffe://") else TrustDomain.parse(server_id)
    raise TypeError(f"server_id must be a SpiffeId, TrustDomain or str, not {type(server_id).__name__}")


def _mismatch(peer: PeerIdentity, expected: SpiffeId | TrustDomain) -> str | None:
    if isinstance(expected, SpiffeId):
        return None if peer.spiffe_id == expected else f"is not {expected}"
    if peer.spiffe_id is None or peer.spiffe_id.trust_domain != expected:
        return f"is not in trust domain {expected}"
    return None
