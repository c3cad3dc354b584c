"""What the CA's store keeps, as values: registration entries and issued certificates, and the
signer callback that issuance runs inside the store's transaction."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from meshid.spiffeid import SpiffeId

__all__ = ["Entry", "IssuedRecord", "Signer"]


@dataclass(frozen=True, slots=True)
class Entry:
    """A registration entry: a SPIFFE ID a workload may hold and what its SVIDs carry."""

    spiffe_id: SpiffeId
    dns_names: tuple[str, ...]
    ttl: datetime.timedelta
    created_at: datetime.datetime


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One issued certificate as the store keeps it."""

    serial: int
    spiffe_id: SpiffeId
    not_after: datetime.datetime
    issued_at: datetime.datetime
    revoked_at: datetime.datetime | None = None


#: Signs for an entry and returns (serial, not_after) of what it signed, plus an opaque result.
Signer = Callable[[Entry], tuple[int, datetime.datetime, object]]
