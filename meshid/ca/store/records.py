"""What the CA's store keeps, as values: registration entries, node agents and issued
certificates, and the signer callback that issuance runs inside the store's transaction."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from meshid.errors import IssuanceError
from meshid.spiffeid import SpiffeId

__all__ = ["AgentRecord", "BatchItem", "BatchOutcome", "Entry", "IssuedRecord", "Signer"]


@dataclass(frozen=True, slots=True)
class Entry:
    """A registration entry: a SPIFFE ID a workload may hold and what its SVIDs carry.

    With ``parent_id`` (a node agent's ID) its SVIDs go only to that agent, for the local
    processes that match every one of ``selectors``; without, a join token obtains them.
    """

    spiffe_id: SpiffeId
    dns_names: tuple[str, ...]
    ttl: datetime.timedelta
    created_at: datetime.datetime
    parent_id: SpiffeId | None = None
    selectors: tuple[str, ...] = ()
    #: Which SVIDs the entry's workload may hold: ``classical`` (EC, RSA, Ed25519 keys) and/or
    #: ``ml-dsa-65`` (post-quantum, signed by the trust domain's ML-DSA CA).
    svid_types: tuple[str, ...] = ("classical",)


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One issued certificate as the store keeps it."""

    serial: int
    spiffe_id: SpiffeId
    not_after: datetime.datetime
    issued_at: datetime.datetime
    revoked_at: datetime.datetime | None = None


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """A node agent the CA knows: how it attested, when it was last seen, its SVID's expiry.

    ``attestation`` is ``"join_token"`` or ``"x509pop"``; ``attested_by`` the host
    certificate's subject for x509pop (empty for a token). ``evicted_at`` is set once an admin
    evicted it, until it attests again.
    """

    spiffe_id: SpiffeId
    attestation: str
    attested_by: str
    last_seen: datetime.datetime
    expires_at: datetime.datetime
    evicted_at: datetime.datetime | None = None

    @property
    def evicted(self) -> bool:
        return self.evicted_at is not None


#: Signs for an entry and returns (serial, not_after) of what it signed, plus an opaque result.
Signer = Callable[[Entry], tuple[int, datetime.datetime, object]]


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One SVID of a batch: the entry asked for, the SHA-256 of the CSR's public key (DER
    SubjectPublicKeyInfo; a key certified before is refused) and the signer for that key."""

    spiffe_id: SpiffeId
    key_sha256: bytes
    sign: Signer


#: What a batch gives for each item, in order: the entry and the signer's result, or why not.
BatchOutcome = tuple[Entry, object] | IssuanceError
