"""Who answers at an address: when a call to the CA fails before any answer, one plain TLS
handshake tells "nothing listens there" from "a server that is not the CA expected" (another
workload, or the CA of another trust domain), which grpc reports alike as UNAVAILABLE.

Only ever run after a call failed, never on the way of one that works.
"""

from __future__ import annotations

import socket
import ssl

from cryptography import x509

from meshid.errors import MeshIdError
from meshid.spiffeid import SpiffeId
from meshid.svid import spiffe_id_from_certificate

__all__ = ["presented_certificate", "unproven_identity"]

#: A probe never waits longer than this (seconds): it only explains a failure already met.
PROBE_TIMEOUT = 3.0


def _host_port(server: str) -> tuple[str, int] | None:
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def presented_certificate(server: str, *, timeout: float = PROBE_TIMEOUT) -> x509.Certificate | None:
    """The leaf certificate the TLS server at ``server`` presents, unverified; None if none does
    (nothing listens, no TLS, or the handshake fails before the server's certificate)."""
    address = _host_port(server)
    if address is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # read what it presents; whether to trust it is not asked here
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(address, timeout=timeout) as sock, context.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return None
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def unproven_identity(server: str, expected: SpiffeId, *, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the server at ``server`` could not prove it is ``expected``, in a sentence; None when
    it presents ``expected`` (the failure is something else) or presents nothing."""
    cert = presented_certificate(server, timeout=timeout)
    if cert is None:
        return None
    try:
        presented = spiffe_id_from_certificate(cert)
    except MeshIdError:
        return (
            f"the server at {server} presents {cert.subject.rfc4514_string()!r}, a certificate without a "
            f"SPIFFE ID, so it cannot prove it is {expected}: is {server} the right address?"
        )
    if presented == expected:
        return None
    if presented.trust_domain != expected.trust_domain:
        return (
            f"the server at {server} presents {presented}, of trust domain {presented.trust_domain}, so it cannot "
            f"prove it is {expected}: it is the CA of another trust domain (or a workload of one), or the bundle "
            f"given is not trust domain {expected.trust_domain}'s"
        )
    return (
        f"the server at {server} presents {presented}, not {expected}: it is another server of trust domain "
        f"{expected.trust_domain}; is {server} the right address?"
    )
