"""grpcio credentials built from an identity source.

What is verified where:

* Server side, by grpcio: the client presents a certificate (required) whose chain verifies
  against the union of every trust domain's roots in the source. Then, per call, meshid's
  interceptor re-verifies the chain against the bundle of the client's *own* trust domain and
  applies the X509-SVID leaf rules (see :mod:`meshid.peer`).
* Client side, by grpcio: the server's chain verifies against the roots given, and the server
  certificate has a DNS SAN matching the target name. grpcio never looks at URI SANs, so with
  ``server_id`` meshid narrows the roots to that ID's trust domain and pins the identity DNS
  name meshid's CA puts in every SVID (:func:`meshid.identity_dns_name`) with
  ``grpc.ssl_target_name_override``. Under a root that several trust domains share, the pin
  still holds because each meshid intermediate carries a DNS name constraint permitting only
  its own trust domain's identity names, which grpcio's BoringSSL enforces in the handshake.
"""

from __future__ import annotations

from typing import Any

import grpc

from meshid._grpc import ServerConfigs
from meshid.errors import InvalidSpiffeIdError, SourceError
from meshid.sources import Source, require_source
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import identity_dns_name

__all__ = ["channel_credentials", "server_credentials"]

ServerId = SpiffeId | TrustDomain | str

def server_credentials(source: Source) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate and present the source's current SVID.

    The source is consulted on every new TLS handshake, so a rotated SVID or bundle is used
    from the next connection on without a restart.

    Raises:
        TypeError: ``source`` is not a source.
        SourceError: the source has no SVID yet.
    """
    configs = ServerConfigs(require_source(source))
    return grpc.dynamic_ssl_server_credentials(configs.current(), configs.fetch, require_client_authentication=True)


def _parse_server_id(server_id: ServerId) -> SpiffeId | TrustDomain:
    if isinstance(server_id, SpiffeId | TrustDomain):
        return server_id
    if not isinstance(server_id, str):
        raise TypeError(f"server_id must be a SpiffeId, TrustDomain or str, not {type(server_id).__name__}")
    if "*" in server_id:
        raise ValueError(
            f"server_id {server_id!r}: grpcio cannot check a server's URI SAN against a pattern; "
            "give an exact SPIFFE ID, or a trust domain to accept any of its workloads"
        )
    try:
        sid = SpiffeId.parse(server_id)
    except InvalidSpiffeIdError:
        return TrustDomain.parse(server_id)
    return sid if sid.path else sid.trust_domain


def channel_credentials(
    source: Source, *, server_id: ServerId | None = None
) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
    """Channel credentials from the source's current SVID, and the channel options they need.

    Raises:
        SourceError: the source has no SVID, or no bundle for ``server_id``'s trust domain.
        InvalidSpiffeIdError, ValueError: ``server_id`` is malformed or a pattern.
    """
    svid = require_source(source).get_svid()
    bundles = source.get_bundles()
    options: list[tuple[str, Any]] = []
    if server_id is None:
        roots = bundles.all_roots_pem()
    else:
        pinned = _parse_server_id(server_id)
        td = pinned if isinstance(pinned, TrustDomain) else pinned.trust_domain
        if td not in bundles:
            raise SourceError(f"server_id {pinned}: the source has no trust bundle for trust domain {td}")
        roots = bundles[td].to_pem()
        options.append(("grpc.ssl_target_name_override", identity_dns_name(pinned)))
    creds = grpc.ssl_channel_credentials(roots, svid.key_pem(), svid.chain_pem())
    return creds, options
