"""What the SQL stores share: turning rows into records, times into Unix seconds, and the
checks on a join token's row (the same for SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime
import json
import math
import threading
from collections.abc import Sequence
from typing import Any

from meshid.ca.store.records import AgentRecord, Entry, IssuedRecord
from meshid.errors import StoreError, TokenError
from meshid.spiffeid import SpiffeId

__all__ = ["AGENT_TOKEN", "ENTRY_TOKEN", "RowCodec", "from_unix", "hex_serial", "to_unix"]

#: A token's purpose (its ``purpose`` column): a workload's first issuance, or a node agent's attestation.
ENTRY_TOKEN = "entry"
#: Decoded entries kept by :class:`RowCodec` (a few MB at most).
ENTRY_CACHE = 4096
AGENT_TOKEN = "agent"


def hex_serial(serial: int) -> str:
    return format(serial, "x")


def to_unix(value: datetime.datetime, name: str) -> int:
    if not isinstance(value, datetime.datetime):
        raise TypeError(f"CA store: {name} must be a datetime, not {type(value).__name__}")
    if value.utcoffset() is None:
        raise ValueError(f"CA store: {name} must be timezone-aware, e.g. datetime.now(datetime.UTC)")
    return math.floor(value.timestamp())


def from_unix(value: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(value, datetime.UTC)


class RowCodec:
    """Decodes rows of one store; ``name`` is how its errors name it (a path, a DSN without password)."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Decoded entries by their row, all of it (so a changed row is decoded again): a node
        # agent's batch reads hundreds of rows that have not changed since the last one.
        self._entries: dict[tuple[Any, ...], Entry] = {}
        self._entries_lock = threading.Lock()

    def spiffe_id(self, text: str) -> SpiffeId:
        try:
            return SpiffeId.parse(text)
        except ValueError as err:
            raise StoreError(f"CA store {self.name}: holds a malformed SPIFFE ID {text!r}") from err

    def entry(self, row: Sequence[Any]) -> Entry:
        """An entry from (spiffe_id, dns_names, ttl_seconds, created_at, parent_id, selectors, svid_types)."""
        key = tuple(row)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._decode_entry(key)
            with self._entries_lock:
                if len(self._entries) >= ENTRY_CACHE:
                    del self._entries[next(iter(self._entries))]  # the oldest
                self._entries[key] = entry
        return entry

    def _decode_entry(self, row: Sequence[Any]) -> Entry:
        dns_names = self._strings(row[1], row[0], "DNS names")
        selectors = self._strings(row[5], row[0], "selectors")
        svid_types = self._strings(row[6], row[0], "SVID types")
        parent = self.spiffe_id(row[4]) if row[4] else None
        return Entry(
            self.spiffe_id(row[0]),
            dns_names,
            datetime.timedelta(seconds=row[2]),
            from_unix(row[3]),
            parent,
            selectors,
            svid_types,
        )

    def _strings(self, text: str, spiffe_id: str, what: str) -> tuple[str, ...]:
        try:
            values = json.loads(text)
        except (ValueError, TypeError) as err:
            raise StoreError(f"CA store {self.name}: entry {spiffe_id} has malformed {what}") from err
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise StoreError(f"CA store {self.name}: entry {spiffe_id} has malformed {what}")
        return tuple(values)

    def agent(self, row: Sequence[Any]) -> AgentRecord:
        """An agent from (spiffe_id, attestation, attested_by, last_seen, expires_at, evicted_at)."""
        return AgentRecord(
            spiffe_id=self.spiffe_id(row[0]),
            attestation=str(row[1]),
            attested_by=str(row[2]),
            last_seen=from_unix(row[3]),
            expires_at=from_unix(row[4]),
            evicted_at=None if row[5] is None else from_unix(row[5]),
        )

    def issued(self, row: Sequence[Any]) -> IssuedRecord:
        return IssuedRecord(
            serial=int(row[0], 16),
            spiffe_id=self.spiffe_id(row[1]),
            not_after=from_unix(row[2]),
            issued_at=from_unix(row[3]),
            revoked_at=None if row[4] is None else from_unix(row[4]),
        )

    def usable_token(self, row: Sequence[Any] | None, now_s: int, purpose: str = ENTRY_TOKEN) -> SpiffeId:
        """The SPIFFE ID a token row (spiffe_id, expires_at, used_at, purpose) is bound to, if it
        may be used for ``purpose`` (a workload's first issuance, or a node agent's attestation).

        Raises:
            TokenError: unknown, already used, expired, or made for the other purpose. The
                messages never carry the token, its hash or its SPIFFE ID: the caller is not yet
                authenticated.
        """
        if row is None:
            raise TokenError("join token: unknown; ask an administrator for a new one")
        if row[2] is not None:
            raise TokenError("join token: already used; a token is good for one issuance, ask for a new one")
        if now_s >= row[1]:
            raise TokenError("join token: expired; ask an administrator for a new one")
        if row[3] != purpose:
            if purpose == AGENT_TOKEN:
                raise TokenError(
                    "join token: made for a workload's entry, not for node attestation; "
                    "ask for one made with `meshid token create --agent NAME`"
                )
            raise TokenError(
                "join token: made for node attestation (a node agent attests with it); "
                "a workload needs a token made for its entry"
            )
        return self.spiffe_id(row[0])
