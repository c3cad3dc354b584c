"""How a node agent proves its node to the CA: a join token made for it, or x509pop (the key of a
host certificate from the PKI the CA trusts for agents). Either gives the agent its own SVID."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid._x509 import pem_blocks
from meshid.bundle import TrustBundle
from meshid.ca.client import Issuance, attest_agent_with_token, attest_agent_with_x509pop, read_roots
from meshid.errors import MeshIdError, SourceError, UnreachableError
from meshid.spiffeid import TrustDomain

__all__ = ["attest_node"]

log = logging.getLogger("meshid.agent")


def attest_node(
    servers: Sequence[str],
    first: int,
    bundle_file: str,
    *,
    join_token: str | None,
    x509pop: tuple[str, str] | None,
    trust_domain: TrustDomain | None,
    key_kind: str,
    timeout: float,
) -> tuple[int, Issuance]:
    """Node attestation with ``join_token``, else with the x509pop ``(certificate file, key file)``,
    trying ``servers`` from index ``first`` on while they are unreachable. Returns the index of
    the server that answered and the agent's SVID.

    Raises:
        UnreachableError: no server answered (every one was UNAVAILABLE); trying later may work.
        SourceError: the host files cannot be used, or a server refused the node (the reasons).
    """
    roots = read_roots(bundle_file)
    attest: Callable[[str], Issuance]
    if join_token is not None:
        how, token = "join token", join_token
        attest = lambda server: attest_agent_with_token(  # noqa: E731
            server, roots, token, key_kind=key_kind, timeout=timeout
        )
    elif x509pop is not None:
        how = "x509pop"
        chain, key = _host_credentials(*x509pop)
        td = trust_domain or _bundle_trust_domain(bundle_file)
        attest = lambda server: attest_agent_with_x509pop(  # noqa: E731
            server, roots, td, chain, key, key_kind=key_kind, timeout=timeout
        )
    else:
        raise SourceError("node agent: give a join token or an x509pop host certificate and key")
    errors = []
    unreachable = 0
    for offset in range(len(servers)):
        index = (first + offset) % len(servers)
        try:
            issued = attest(servers[index])
        except MeshIdError as err:
            errors.append(str(err))
            if getattr(err, "code", "") != "UNAVAILABLE":
                break  # the CA answered: another replica would answer the same
            unreachable += 1
            continue
        log.info("node agent: attested as %s by %s (serial %x)", issued.svid.spiffe_id, how, issued.svid.serial)
        return index, issued
    if unreachable == len(servers):  # every server was tried, and none answered
        raise UnreachableError(f"node agent: node attestation by {how}: no CA answered: " + "; ".join(errors))
    raise SourceError(f"node agent: node attestation by {how} failed: " + "; ".join(errors))


def _host_credentials(cert_file: str, key_file: str) -> tuple[list[x509.Certificate], Any]:
    """The host certificate chain (leaf first) and key for x509pop, each file strictly one thing.

    Raises:
        SourceError: a file cannot be read, holds anything else, or does not parse.
    """
    try:
        cert_pem, key_pem = _read_bounded(cert_file, _MAX_CERT_BYTES), _read_bounded(key_file, _MAX_KEY_BYTES)
        blocks, key_blocks = pem_blocks(cert_pem), pem_blocks(key_pem)
        if not blocks or any(label != "CERTIFICATE" for label, _ in blocks):
            raise ValueError(f"{cert_file} must hold the host certificate (then its intermediates) and nothing else")
        if len(key_blocks) != 1 or not key_blocks[0][0].endswith("PRIVATE KEY"):
            raise ValueError(f"{key_file} must hold the host certificate's private key and nothing else")
        chain = [x509.load_pem_x509_certificate(block) for _, block in blocks]
        key = serialization.load_pem_private_key(key_blocks[0][1], password=None)
    except OSError as err:
        raise SourceError(f"node agent: x509pop: cannot read {err.filename}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise SourceError(f"node agent: x509pop: {err}") from err
    return chain, key


def _bundle_trust_domain(bundle_file: str) -> TrustDomain:
    """The one trust domain the roots in ``bundle_file`` name in a URI SAN (meshid's roots do)."""
    roots = TrustBundle.load_roots(bundle_file)
    names = set()
    for root in roots:
        try:
            sans = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
                names.add(uri[len("spiffe://") :])
    if len(names) != 1:
        raise SourceError(
            f"node agent: x509pop: the roots in {bundle_file} name {len(names)} trust domains; give the trust domain "
            "(trust_domain=, --trust-domain)"
        )
    return TrustDomain.parse(names.pop())


_MAX_CERT_BYTES = 1024 * 1024
_MAX_KEY_BYTES = 64 * 1024


def _read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """The file's bytes, refused (ValueError) past ``limit``: a prefix is never parsed as the whole."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{os.fspath(path)} is larger than {limit} bytes; give the PEM file itself")
    return data
