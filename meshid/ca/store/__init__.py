"""The CA's records behind one small interface, on SQLite (embedded) or PostgreSQL (shared by replicas).

What is kept: registration entries (with their parent node agent and selectors), join-token
hashes (never tokens), node agents, every issued certificate (serial, SPIFFE ID, not_after,
revoked_at, and for agent and batch issuance the SHA-256 of its key), the CRL number and the
bundle sequence. Every method is one transaction; a method that returns has made its change
durable. ``issue_with_token`` consumes a token and records the certificate signed for it in
the *same* transaction, so a crash leaves either both or neither; ``issue_batch`` records every
certificate of a batch in one transaction, so a crash leaves all of them or none.

The store is written once (:mod:`~meshid.ca.store.sql`) against a small dialect: how a
database runs a transaction and names its failures, its placeholders, its row locks and how
it inserts a row only if its key is absent. :mod:`~meshid.ca.store.sqlite` and
:mod:`~meshid.ca.store.postgres` are the two dialects; :mod:`~meshid.ca.store.migrations`
is the schema both create. ``PostgresStore`` is imported on first use: it needs psycopg
(``pip install meshid[postgres]``), which nothing else in meshid does.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from meshid.ca.store.records import AgentRecord, BatchItem, BatchOutcome, Entry, IssuedRecord, Signer
from meshid.ca.store.sql import AgentSigner
from meshid.ca.store.sqlite import SqliteStore
from meshid.spiffeid import SpiffeId

if TYPE_CHECKING:
    from meshid.ca.store.postgres import PostgresStore

__all__ = [
    "AgentRecord",
    "AgentSigner",
    "BatchItem",
    "BatchOutcome",
    "Entry",
    "IssuedRecord",
    "PostgresStore",
    "Signer",
    "SqliteStore",
    "Store",
    "open_store",
]


class Store(Protocol):
    """The CA's persistence. Implementations raise :class:`meshid.errors.StoreError` subclasses."""

    def create_entry(self, entry: Entry) -> None:
        """Add an entry. Raises AlreadyExistsError if the SPIFFE ID has one."""
        ...

    def get_entry(self, spiffe_id: SpiffeId) -> Entry | None: ...

    def list_entries(self) -> list[Entry]: ...

    def list_entries_for_agent(self, agent_id: SpiffeId, now: datetime.datetime) -> list[Entry]:
        """The entries parented to a known, unevicted agent (noted as seen at ``now``).
        Raises AttestationError if it is unknown or evicted."""
        ...

    def delete_entry(self, spiffe_id: SpiffeId) -> bool:
        """Remove an entry (and its unused tokens). Returns False if there was none."""
        ...

    def count_entries(self) -> int: ...

    def add_token(self, token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store a join token's hash, bound to an existing entry. Raises NotFoundError if none."""
        ...

    def add_agent_token(self, token_hash: bytes, agent_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store the hash of a join token for a node agent's attestation (agents have no entry)."""
        ...

    def issue_with_token(self, token_hash: bytes, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: check the token (known, unused, unexpired, made for an entry
        without a parent), call ``sign(entry)``, record the certificate, mark the token used.
        Returns the entry and ``sign``'s result.

        Raises:
            TokenError: unknown, already used, expired, or not for this (nothing is written).
            NotFoundError: the token's entry was deleted.
        """
        ...

    def record_issuance(self, spiffe_id: SpiffeId, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: look up the entry, call ``sign(entry)``, record the certificate.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            NotAuthorizedError: the entry has a parent (only its agent obtains its SVIDs).
        """
        ...

    def renew(
        self, spiffe_id: SpiffeId, caller_serial: int | None, now: datetime.datetime, sign: Signer
    ) -> tuple[Entry, object, int]:
        """A renewal: one read (entry, the caller's revocation, the bundle sequence), ``sign(entry)``
        with no lock held, one write that checks again and records; returns (entry, result,
        bundle sequence).

        Raises:
            NotFoundError: no entry. NotAuthorizedError: the entry has a parent, or ``caller_serial``
                is revoked (also while ``sign`` ran; nothing is recorded).
        """
        ...

    def issue_batch(
        self,
        agent_id: SpiffeId,
        items: Sequence[BatchItem],
        now: datetime.datetime,
        *,
        signing: AbstractContextManager[object] = ...,
    ) -> list[BatchOutcome]:
        """In ONE transaction: for each item, sign and record its certificate if its entry is
        parented to ``agent_id`` and its key is new, else give the error for that item.
        ``signing`` (default: nothing) is held while the certificates are signed, not while
        the transaction commits.

        Raises:
            AttestationError: the agent is unknown or evicted (nothing is written).
            StoreError: the database failed (nothing is recorded).
        """
        ...

    # -- node agents

    def attest_agent_with_token(
        self, token_hash: bytes, now: datetime.datetime, sign: AgentSigner, *, key_sha256: bytes
    ) -> tuple[AgentRecord, object]:
        """In one transaction: consume an agent's join token, sign, record certificate and agent."""
        ...

    def attest_agent(
        self,
        agent_id: SpiffeId,
        attestation: str,
        attested_by: str,
        now: datetime.datetime,
        sign: AgentSigner,
        *,
        key_sha256: bytes,
    ) -> tuple[AgentRecord, object]:
        """In one transaction: sign, record the certificate and the (no longer evicted) agent."""
        ...

    def renew_agent(
        self, agent_id: SpiffeId, now: datetime.datetime, sign: AgentSigner, *, key_sha256: bytes
    ) -> tuple[AgentRecord, object]:
        """In one transaction: check the agent is known and not evicted, sign, record."""
        ...

    def evict_agent(self, agent_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """Mark the agent evicted and revoke its unexpired certificates; returns their serials."""
        ...

    def get_agent(self, agent_id: SpiffeId) -> AgentRecord | None: ...

    def list_agents(self) -> list[AgentRecord]: ...

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

    def publish_jwt_keys(
        self,
        keys: Sequence[tuple[str, bytes, datetime.datetime]],
        now: datetime.datetime,
        withdraw: Sequence[str] = (),
    ) -> bool:
        """Publish JWT keys ``(kid, SPKI DER, until)``, drop those whose time has passed and the
        kids of ``withdraw``, and grow the bundle sequence if the set published changed (one
        transaction). Whether it changed."""
        ...

    def jwt_keys(self, now: datetime.datetime) -> list[tuple[str, bytes]]:
        """The JWT keys published by every CA on this store, ``(kid, SPKI DER)``, by kid."""
        ...

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
        from meshid.ca.store.postgres import PostgresStore

        return PostgresStore(text)
    return SqliteStore(text)


def __getattr__(name: str) -> Any:
    # PostgresStore on first use, so that importing the store does not import psycopg.
    if name == "PostgresStore":
        from meshid.ca.store.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
