"""meshid: SPIFFE identities, mTLS and identity-based authorization for Python gRPC services.

The public names below are loaded on first use (PEP 562), so ``import meshid`` costs nothing
until a name is touched, and then loads only the module that defines it: a server that uses
the interceptor does not load the agent, the Workload API or the metrics exporter. As
``import grpc`` gives ``grpc.aio``, ``import meshid`` gives ``meshid.aio``.
"""

from __future__ import annotations

import importlib as _importlib
import logging as _logging
import typing as _typing

__version__ = "0.1.0"

# A library logs only where its application asks it to.
_logging.getLogger("meshid").addHandler(_logging.NullHandler())

#: Each public name, and the module that defines it.
_HOMES = {
    "AuthorizationInterceptor": "meshid.interceptors",
    "AuthorizationPolicy": "meshid.authz",
    "BundleSet": "meshid.bundle",
    "CrlWatcher": "meshid.revocation",
    "Decision": "meshid.authz",
    "FileSource": "meshid.sources",
    "FileSourceState": "meshid.sources",
    "InvalidBundleError": "meshid.errors",
    "InvalidJwtSvidError": "meshid.errors",
    "InvalidPolicyError": "meshid.errors",
    "InvalidSpiffeIdError": "meshid.errors",
    "InvalidSvidError": "meshid.errors",
    "IssuerSource": "meshid.agent",
    "JwtSource": "meshid.sources",
    "JwtSvid": "meshid.jwtsvid",
    "MeshIdError": "meshid.errors",
    "PeerIdentity": "meshid.peer",
    "RemoteError": "meshid.errors",
    "RevocationList": "meshid.revocation",
    "RotatingChannel": "meshid.channel",
    "Source": "meshid.sources",
    "SourceError": "meshid.errors",
    "SourceState": "meshid.agent",
    "SpiffeId": "meshid.spiffeid",
    "StaticSource": "meshid.sources",
    "TrustBundle": "meshid.bundle",
    "TrustDomain": "meshid.spiffeid",
    "VerificationError": "meshid.errors",
    "WorkloadApiSource": "meshid.workloadapi",
    "X509Svid": "meshid.svid",
    "channel_credentials": "meshid.credentials",
    "identity_dns_name": "meshid.svid",
    "jwt_call_credentials": "meshid.credentials",
    "peer_identity": "meshid.peer",
    "secure_channel": "meshid.channel",
    "server": "meshid.guard",
    "server_credentials": "meshid.credentials",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    if name == "aio":
        return _importlib.import_module("meshid.aio")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'meshid' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "aio"})


if _typing.TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads each on use
    from meshid import aio as aio
    from meshid.agent import IssuerSource as IssuerSource
    from meshid.agent import SourceState as SourceState
    from meshid.authz import AuthorizationPolicy as AuthorizationPolicy
    from meshid.authz import Decision as Decision
    from meshid.bundle import BundleSet as BundleSet
    from meshid.bundle import TrustBundle as TrustBundle
    from meshid.channel import RotatingChannel as RotatingChannel
    from meshid.channel import secure_channel as secure_channel
    from meshid.credentials import channel_credentials as channel_credentials
    from meshid.credentials import jwt_call_credentials as jwt_call_credentials
    from meshid.credentials import server_credentials as server_credentials
    from meshid.errors import InvalidBundleError as InvalidBundleError
    from meshid.errors import InvalidJwtSvidError as InvalidJwtSvidError
    from meshid.errors import InvalidPolicyError as InvalidPolicyError
    from meshid.errors import InvalidSpiffeIdError as InvalidSpiffeIdError
    from meshid.errors import InvalidSvidError as InvalidSvidError
    from meshid.errors import MeshIdError as MeshIdError
    from meshid.errors import RemoteError as RemoteError
    from meshid.errors import SourceError as SourceError
    from meshid.errors import VerificationError as VerificationError
    from meshid.guard import server as server
    from meshid.interceptors import AuthorizationInterceptor as AuthorizationInterceptor
    from meshid.jwtsvid import JwtSvid as JwtSvid
    from meshid.peer import PeerIdentity as PeerIdentity
    from meshid.peer import peer_identity as peer_identity
    from meshid.revocation import CrlWatcher as CrlWatcher
    from meshid.revocation import RevocationList as RevocationList
    from meshid.sources import FileSource as FileSource
    from meshid.sources import FileSourceState as FileSourceState
    from meshid.sources import JwtSource as JwtSource
    from meshid.sources import Source as Source
    from meshid.sources import StaticSource as StaticSource
    from meshid.spiffeid import SpiffeId as SpiffeId
    from meshid.spiffeid import TrustDomain as TrustDomain
    from meshid.svid import X509Svid as X509Svid
    from meshid.svid import identity_dns_name as identity_dns_name
    from meshid.workloadapi import WorkloadApiSource as WorkloadApiSource
