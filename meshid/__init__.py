"""meshid: SPIFFE identities, mTLS and identity-based authorization for Python gRPC services."""

from __future__ import annotations

import logging

from meshid.agent import IssuerSource, SourceState
from meshid.authz import AuthorizationPolicy, Decision
from meshid.bundle import BundleSet, TrustBundle
from meshid.channel import RotatingChannel, secure_channel
from meshid.credentials import channel_credentials, server_credentials
from meshid.errors import (
    InvalidBundleError,
    InvalidPolicyError,
    InvalidSpiffeIdError,
    InvalidSvidError,
    MeshIdError,
    RemoteError,
    SourceError,
    VerificationError,
)
from meshid.interceptors import AuthorizationInterceptor
from meshid.peer import PeerIdentity, peer_identity
from meshid.revocation import CrlWatcher, RevocationList
from meshid.sources import FileSource, Source, StaticSource
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid, identity_dns_name
from meshid.workload import WorkloadApiSource

__version__ = "0.1.0"

# A library logs only where its application asks it to.
logging.getLogger("meshid").addHandler(logging.NullHandler())

__all__ = [
    "AuthorizationInterceptor",
    "AuthorizationPolicy",
    "BundleSet",
    "CrlWatcher",
    "Decision",
    "FileSource",
    "InvalidBundleError",
    "InvalidPolicyError",
    "InvalidSpiffeIdError",
    "InvalidSvidError",
    "IssuerSource",
    "MeshIdError",
    "PeerIdentity",
    "RemoteError",
    "RevocationList",
    "RotatingChannel",
    "Source",
    "SourceError",
    "SourceState",
    "SpiffeId",
    "StaticSource",
    "TrustBundle",
    "TrustDomain",
    "VerificationError",
    "WorkloadApiSource",
    "X509Svid",
    "channel_credentials",
    "identity_dns_name",
    "peer_identity",
    "secure_channel",
    "server_credentials",
]
