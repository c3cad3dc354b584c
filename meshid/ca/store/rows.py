"""What the SQL stores share: turning rows into records, times into Unix seconds, and the
checks on a join token's row (the same for SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Sequence
from typing import Any

from meshid.ca.store.records import Entry, IssuedRecord
from meshid.errors import StoreError, TokenError
from meshid.spiffeid import SpiffeId

__all__ = ["RowCodec", "from_unix", "hex_serial", "to_unix"]


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

    def spiffe_id(self, text: str) -> SpiffeId:
        try:
            return SpiffeId.parse(text)
        except ValueError as err:
            raise StoreError(f"CA store {self.name}: holds a malformed SPIFFE ID {text!r}") from err

    def entry(self, row: Sequence[Any]) -> Entry:
        try:
            dns_names = tuple(str(name) for name in json.loads(row[1]))
        except (ValueError, TypeError) as err:
            raise StoreError(f"CA store {self.name}: entry {row[0]} has malformed DNS names") from err
        return Entry(self.spiffe_id(row[0]), dns_names, datetime.timedelta(seconds=row[2]), from_unix(row[3]))

    def issued(self, row: Sequence[Any]) -> IssuedRecord:
        return IssuedRecord(
            serial=int(row[0], 16),
            spiffe_id=self.spiffe_id(row[1]),
            not_after=from_unix(row[2]),
            issued_at=from_unix(row[3]),
            revoked_at=None if row[4] is None else from_unix(row[4]),
        )

    def usable_token(self, row: Sequence[Any] | None, now_s: int) -> SpiffeId:
        """The SPIFFE ID a token row (spiffe_id, expires_at, used_at) is bound to, if it may be used.

        Raises:
            TokenError: unknown, already used, or expired. The messages never carry the token,
                its hash or its SPIFFE ID: the caller is not yet authenticated.
        """
        if row is None:
            raise TokenError("join token: unknown; ask an administrator for a new one")
        if row[2] is not None:
            raise TokenError("join token: already used; a token is good for one issuance, ask for a new one")
        if now_s >= row[1]:
            raise TokenError("join token: expired; ask an administrator for a new one")
        return self.spiffe_id(row[0])
