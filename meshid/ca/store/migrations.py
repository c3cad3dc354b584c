"""The CA store's schema, written once for every SQL database the store runs on.

Each migration is a list of statements with dialect placeholders, rendered by
:func:`statements`: ``{text}`` (compared byte by byte, as SQLite does, so that ordering never
depends on a server's locale), ``{int64}`` (Unix seconds and counters: never a 32-bit column)
and ``{blob}``. Version N is the N-th migration; a store records each applied version in
``schema_version`` (see :func:`schema_version_table`). The list is append only: a released
migration is never edited, or databases that already applied it would differ from new ones.

Times are integer Unix seconds (UTC); serials are lowercase hex text; DNS names and selectors
a JSON list. No table has a foreign key on purpose: certificate rows and used tokens outlive
their entry (a deleted entry's certificates must still be revocable, its spent tokens still
refused), and an entry may name a node agent as its parent before that agent first attests.

Version 2 (node agents, issue #12): an entry's ``parent_id`` ('' for none) and ``selectors``;
a token's ``purpose`` ('entry', or 'agent' for node attestation); the SHA-256 of each new
certificate's public key (``key_sha256``, NULL for rows issued before, and for workloads' own
issuance and renewal), by which batch and agent issuance refuse a key certified before; and
the ``agents`` table.

Version 3 (post-quantum SVIDs, issue #18): an entry's ``svid_types``, a JSON list of
``classical`` and ``ml-dsa-65`` (existing entries: classical only, as before).

Version 4 (JWT-SVIDs, issue #16): ``jwt_keys``, the JWT-SVID public keys every CA on this
store publishes (each replica signs with a key of its own data folder): the bundle carries
them all, so a token one replica signed validates with the bundle another serves. A row lives
until ``published_until``: a retiring key until every token it signed has expired, a key in use
as long as its replica keeps renewing the row (so a replica that is gone leaves within minutes).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Dialect", "latest_version", "newer_schema_message", "schema_version_table", "statements"]

Dialect = Literal["sqlite", "postgres"]

_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {"text": "TEXT", "int64": "INTEGER", "blob": "BLOB"},
    "postgres": {"text": 'TEXT COLLATE "C"', "int64": "BIGINT", "blob": "BYTEA"},
}

_SCHEMA_VERSION = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL PRIMARY KEY, applied_at {int64})"

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE entries (
            spiffe_id {text} NOT NULL PRIMARY KEY,
            dns_names {text} NOT NULL,
            ttl_seconds {int64} NOT NULL,
            created_at {int64} NOT NULL
        )""",
        """CREATE TABLE tokens (
            hash {blob} NOT NULL PRIMARY KEY,
            spiffe_id {text} NOT NULL,
            expires_at {int64} NOT NULL,
            used_at {int64}
        )""",
        "CREATE INDEX tokens_spiffe_id ON tokens (spiffe_id)",
        """CREATE TABLE certificates (
            serial {text} NOT NULL PRIMARY KEY,
            spiffe_id {text} NOT NULL,
            not_after {int64} NOT NULL,
            issued_at {int64} NOT NULL,
            revoked_at {int64}
        )""",
        "CREATE INDEX certificates_spiffe_id ON certificates (spiffe_id)",
        """CREATE TABLE counters (
            name {text} NOT NULL PRIMARY KEY,
            value {int64} NOT NULL
        )""",
        "INSERT INTO counters (name, value) VALUES ('crl_number', 0)",
        "INSERT INTO counters (name, value) VALUES ('bundle_sequence', 0)",
    ),
    (
        "ALTER TABLE entries ADD COLUMN parent_id {text} NOT NULL DEFAULT ''",
        "ALTER TABLE entries ADD COLUMN selectors {text} NOT NULL DEFAULT '[]'",
        "CREATE INDEX entries_parent_id ON entries (parent_id)",
        "ALTER TABLE tokens ADD COLUMN purpose {text} NOT NULL DEFAULT 'entry'",
        "ALTER TABLE certificates ADD COLUMN key_sha256 {blob}",
        "CREATE INDEX certificates_key_sha256 ON certificates (key_sha256)",
        """CREATE TABLE agents (
            spiffe_id {text} NOT NULL PRIMARY KEY,
            attestation {text} NOT NULL,
            attested_by {text} NOT NULL,
            last_seen {int64} NOT NULL,
            expires_at {int64} NOT NULL,
            evicted_at {int64}
        )""",
    ),
    ("""ALTER TABLE entries ADD COLUMN svid_types {text} NOT NULL DEFAULT '["classical"]'""",),
    (
        """CREATE TABLE jwt_keys (
            kid {text} NOT NULL PRIMARY KEY,
            public_key {blob} NOT NULL,
            published_until {int64} NOT NULL
        )""",
    ),
)


def _types(dialect: str) -> dict[str, str]:
    try:
        return _TYPES[dialect]
    except KeyError:
        raise ValueError(f"CA store: unknown SQL dialect {dialect!r}; expected one of {sorted(_TYPES)}") from None


def statements(dialect: Dialect) -> list[list[str]]:
    """Every migration's statements for ``dialect``; version N is item N - 1.

    Raises:
        ValueError: an unknown dialect.
    """
    types = _types(dialect)
    return [[statement.format_map(types) for statement in migration] for migration in _MIGRATIONS]


def schema_version_table(dialect: Dialect) -> str:
    """The ``CREATE TABLE IF NOT EXISTS`` of the table that records applied migrations."""
    return _SCHEMA_VERSION.format_map(_types(dialect))


def latest_version() -> int:
    """The schema version this meshid writes: the number of migrations."""
    return len(_MIGRATIONS)


def newer_schema_message(current: int) -> str:
    """What a store says when the database was migrated by a newer meshid (after ``CA store X:``)."""
    return f"schema version {current} is newer than this meshid (which knows up to {latest_version()}); upgrade meshid"
