"""The CA's records behind a small interface, so that another SQL database can serve later.

What is kept: registration entries, join-token hashes (never tokens), every issued
certificate (serial, SPIFFE ID, not_after, revoked_at), the CRL number and the bundle
sequence. Every method is one transaction; a method that returns has made its change
durable. ``issue_with_token`` consumes a token and records the certificate signed for it in
the *same* transaction, so a crash leaves either both or neither.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meshid.spiffeid import SpiffeId

__all__ = ["Entry", "IssuedRecord", "Store", "open_store"]


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


class Store(Protocol):
    """The CA's persistence. Implementations raise :class:`meshid.errors.StoreError` subclasses."""

    def create_entry(self, entry: Entry) -> None:
        """Add an entry. Raises AlreadyExistsError if the SPIFFE ID has one."""
        ...

    def get_entry(self, spiffe_id: SpiffeId) -> Entry | None: ...

    def list_entries(self) -> list[Entry]: ...

    def delete_entry(self, spiffe_id: SpiffeId) -> bool:
        """Remove an entry (and its unused tokens). Returns False if there was none."""
        ...

    def count_entries(self) -> int: ...

    def add_token(self, token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store a join token's hash, bound to an existing entry. Raises NotFoundError if none."""
        ...

    def issue_with_token(self, token_hash: bytes, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: check the token (known, unused, unexpired), call ``sign(entry)``,
        record the certificate, mark the token used. Returns the entry and ``sign``'s result.

        Raises:
            TokenError: unknown, already used, or expired (nothing is written).
            NotFoundError: the token's entry was deleted.
        """
        ...

    def record_issuance(self, spiffe_id: SpiffeId, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: look up the entry, call ``sign(entry)``, record the certificate.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
        """
        ...

    def get_issued(self, serial: int) -> IssuedRecord | None: ...

    def list_issued(self) -> list[IssuedRecord]: ...

    def revoke_serial(self, serial: int, now: datetime.datetime) -> bool:
        """Mark one certificate revoked. False if unknown; revoking twice keeps the first time."""
        ...

    def revoke_spiffe_id(self, spiffe_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """Revoke every unexpired, unrevoked certificate of ``spiffe_id``; returns their serials."""
        ...

    def revoked_unexpired(self, now: datetime.datetime) -> list[IssuedRecord]:
        """What the next CRL must list: revoked certificates that have not yet expired."""
        ...

    def next_crl_number(self) -> int:
        """Increment and return the CRL number (monotonic, durable)."""
        ...

    def bundle_sequence(self) -> int: ...

    def bump_bundle_sequence(self) -> int: ...

    def check(self) -> None:
        """Raise StoreError if the store cannot be used (for health checks)."""
        ...

    def close(self) -> None: ...


def open_store(datastore: str | os.PathLike[str]) -> Store:
    """The store a datastore names: ``postgresql://...`` (PostgreSQL, shared by CA replicas) or
    the path of an SQLite file (the embedded default).

    Raises:
        StoreError: the store cannot be opened.
    """
    text = os.fspath(datastore)
    if text.startswith(("postgresql://", "postgres://")):
        from meshid.ca.postgres import PostgresStore

        return PostgresStore(text)
    from meshid.ca.sqlite import SqliteStore

    return SqliteStore(text)
