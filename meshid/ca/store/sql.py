"""The CA's store written once (:class:`SqlStore`), on any SQL database a
:class:`~meshid.ca.store.dialect.Dialect` describes.

Every method is one transaction the dialect runs. What differs between databases is the
dialect's alone: how a transaction is run and its failures named, the placeholder style, the
row locks a read takes for the write that follows, and how a row is inserted only if its key is
absent. What does not differ is here, once: the checks on a token, the serial checks and the
re-signing when a serial is taken, the error messages, the migrations' bookkeeping.

The statements are written with ``?`` placeholders and rendered in the dialect's style. They
rely on READ COMMITTED or stricter: a statement that waited for a row lock reads the row as
the other transaction left it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Self, TypeVar

from meshid.ca.store import migrations
from meshid.ca.store.dialect import Connection, Cursor, Dialect, Transaction, insert_statement
from meshid.ca.store.records import AgentRecord, BatchItem, BatchOutcome, Entry, IssuedRecord, Signer
from meshid.ca.store.rows import AGENT_TOKEN, ENTRY_TOKEN, RowCodec, hex_serial, to_unix
from meshid.errors import (
    AlreadyExistsError,
    AttestationError,
    InvalidRequestError,
    NotAuthorizedError,
    NotFoundError,
    StoreError,
    TokenError,
)
from meshid.spiffeid import SpiffeId

#: ``issue_batch``'s default ``signing``: no lock (nullcontext may be entered again and again).
_NOTHING_HELD: AbstractContextManager[object] = contextlib.nullcontext()

# The dialect's protocols are re-exported: the dialects import them from here.
__all__ = ["AgentSigner", "Connection", "Cursor", "Dialect", "SqlStore", "Transaction", "insert_statement"]

_T = TypeVar("_T")

#: How many times ``sign`` is called in all when its serial is already taken.
SIGN_ATTEMPTS = 3
MAX_SERIAL_BITS = 160

#: How many values one ``IN (...)`` list carries at most (SQLite's default limit is far above it).
IN_CHUNK = 500
#: How many certificate rows one INSERT carries at most (6 values each).
INSERT_CHUNK = 250

_SELECT_ENTRY = "SELECT spiffe_id, dns_names, ttl_seconds, created_at, parent_id, selectors, svid_types FROM entries"
_SELECT_ISSUED = "SELECT serial, spiffe_id, not_after, issued_at, revoked_at FROM certificates"
_SELECT_AGENT = "SELECT spiffe_id, attestation, attested_by, last_seen, expires_at, evicted_at FROM agents"
_SELECT_TOKEN = "SELECT spiffe_id, expires_at, used_at, purpose FROM tokens WHERE hash = ?"
#: Signs for a node agent's own SVID: (serial, not_after) of what it signed, plus an opaque result.
AgentSigner = Callable[[SpiffeId], tuple[int, datetime.datetime, object]]
_KEY_REUSED = "CSR: its key was certified before by this CA; make a new key for each SVID"


class SqlStore:
    """The CA's :class:`~meshid.ca.store.Store` on the database ``dialect`` has opened.

    Opening applies pending migrations. Use it as a context manager, or call :meth:`close`.
    Threads may call any method at once. Times are kept to the whole second (rounded down);
    datetimes passed in must be timezone-aware and are returned in UTC.

    Raises:
        StoreError: the database was migrated by a newer meshid, or failed. Every method raises
            it for any database failure; the message starts ``CA store <name>:``.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._name = dialect.name
        self._rows = RowCodec(dialect.name)
        try:
            self._run(self._migrate, write=True)
        except BaseException:
            dialect.close()
            raise

    # -- entries -------------------------------------------------------------------------------

    def create_entry(self, entry: Entry) -> None:
        """Add an entry. Raises AlreadyExistsError if the SPIFFE ID has one."""
        row = {
            "spiffe_id": str(entry.spiffe_id),
            "dns_names": json.dumps(list(entry.dns_names)),
            "ttl_seconds": math.floor(entry.ttl.total_seconds()),
            "created_at": to_unix(entry.created_at, "created_at"),
            "parent_id": "" if entry.parent_id is None else str(entry.parent_id),
            "selectors": json.dumps(list(entry.selectors)),
            "svid_types": json.dumps(list(entry.svid_types)),
        }

        def work(tx: Transaction) -> None:
            if not self._dialect.insert_if_absent(tx, "entries", "spiffe_id", row):
                raise AlreadyExistsError(f"registration entry: {entry.spiffe_id} already exists")

        self._run(work, write=True)

    def get_entry(self, spiffe_id: SpiffeId) -> Entry | None:
        """The entry for ``spiffe_id``, or None."""
        return self._run(lambda tx: self._fetch_entry(tx, spiffe_id), write=False)

    def list_entries(self) -> list[Entry]:
        """Every entry, ordered by SPIFFE ID (byte order, whatever the server's locale)."""
        rows = self._run(lambda tx: tx.execute(_SELECT_ENTRY + " ORDER BY spiffe_id").fetchall(), write=False)
        return [self._rows.entry(row) for row in rows]

    def list_entries_for_agent(self, agent_id: SpiffeId, now: datetime.datetime) -> list[Entry]:
        """In one transaction: check that ``agent_id`` is a known agent that was not evicted, note
        that it was seen at ``now``, and return the entries parented to it, ordered by SPIFFE ID.

        Raises:
            AttestationError: the agent is unknown here, or evicted.
        """
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> list[Entry]:
            self._see_agent(tx, agent_id, now_s)
            rows = tx.execute(_SELECT_ENTRY + " WHERE parent_id = ? ORDER BY spiffe_id", (str(agent_id),)).fetchall()
            return [self._rows.entry(row) for row in rows]

        return self._run(work, write=True)

    def delete_entry(self, spiffe_id: SpiffeId) -> bool:
        """Remove an entry and its unused tokens. Returns False if there was none.

        Its certificates stay (they can still be revoked), and so do its used tokens.
        """

        def work(tx: Transaction) -> bool:
            # The entry first: a concurrent add_token holds it FOR SHARE, so this waits for that
            # token to commit, and the next statement (a new snapshot) deletes it too.
            deleted = tx.execute("DELETE FROM entries WHERE spiffe_id = ?", (str(spiffe_id),)).rowcount > 0
            tx.execute("DELETE FROM tokens WHERE spiffe_id = ? AND used_at IS NULL", (str(spiffe_id),))
            return deleted

        return self._run(work, write=True)

    def count_entries(self) -> int:
        """How many entries there are."""
        return self._run(lambda tx: int(tx.execute("SELECT COUNT(*) FROM entries").fetchone()[0]), write=False)

    # -- tokens and issuance -------------------------------------------------------------------

    def add_token(self, token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store a join token's hash, bound to an existing entry.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            AlreadyExistsError: a token with this hash is already stored.
        """
        row = self._token_row(token_hash, spiffe_id, expires_at, ENTRY_TOKEN)

        def work(tx: Transaction) -> None:
            # Shared lock: a concurrent delete_entry waits for this token, then deletes it too.
            entry = tx.execute("SELECT 1 FROM entries WHERE spiffe_id = ?" + self._dialect.for_share, (str(spiffe_id),))
            if entry.fetchone() is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found; create it before its join token")
            if not self._dialect.insert_if_absent(tx, "tokens", "hash", row):
                raise AlreadyExistsError("join token: a token with this hash already exists; generate a new token")

        self._run(work, write=True)

    def add_agent_token(self, token_hash: bytes, agent_id: SpiffeId, expires_at: datetime.datetime) -> None:
        """Store the hash of a join token for a node agent's attestation (no entry: agents have none).

        Raises:
            AlreadyExistsError: a token with this hash is already stored.
        """
        row = self._token_row(token_hash, agent_id, expires_at, AGENT_TOKEN)

        def work(tx: Transaction) -> None:
            if not self._dialect.insert_if_absent(tx, "tokens", "hash", row):
                raise AlreadyExistsError("join token: a token with this hash already exists; generate a new token")

        self._run(work, write=True)

    @staticmethod
    def _token_row(
        token_hash: bytes, spiffe_id: SpiffeId, expires_at: datetime.datetime, purpose: str
    ) -> dict[str, object]:
        return {
            "hash": bytes(token_hash),
            "spiffe_id": str(spiffe_id),
            "expires_at": to_unix(expires_at, "expires_at"),
            "used_at": None,
            "purpose": purpose,
        }

    def issue_with_token(self, token_hash: bytes, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: check the token (known, unused, unexpired), call ``sign(entry)``,
        record the certificate, mark the token used. Returns the entry and ``sign``'s result.

        The token's row stays locked until the transaction ends, so of several callers (threads,
        replicas) racing on one token exactly one issues; the others then find it used. If
        ``sign`` raises, nothing is written (the token stays usable) and its error propagates.
        If the serial it returns is already recorded, it is called again, at most 3 times in all.

        Raises:
            TokenError: unknown, already used, or expired, made for node attestation, or its
                entry is served by a node agent (nothing is written).
            NotFoundError: the token's entry was deleted.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        token = bytes(token_hash)

        def work(tx: Transaction) -> tuple[Entry, object]:
            row = tx.execute(_SELECT_TOKEN + self._dialect.for_update, (token,)).fetchone()
            spiffe_id = self._rows.usable_token(row, now_s, ENTRY_TOKEN)
            entry = self._fetch_entry(tx, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} was deleted; its join token cannot be used")
            if entry.parent_id is not None:  # re-created with a parent since the token was made
                raise TokenError("join token: its entry is served by a node agent now; a join token cannot obtain it")
            _, _, result = self._sign_and_record(tx, entry.spiffe_id, now_s, lambda: sign(entry))
            tx.execute("UPDATE tokens SET used_at = ? WHERE hash = ?", (now_s, token))
            return entry, result

        return self._run(work, write=True)

    def record_issuance(self, spiffe_id: SpiffeId, now: datetime.datetime, sign: Signer) -> tuple[Entry, object]:
        """In one transaction: look up the entry, call ``sign(entry)``, record the certificate.

        ``sign`` is treated as in :meth:`issue_with_token`. An entry with a parent is refused:
        its SVIDs go only to its node agent, through :meth:`issue_batch`.

        Raises:
            NotFoundError: no entry for ``spiffe_id``.
            NotAuthorizedError: the entry has a parent.
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> tuple[Entry, object]:
            entry = self._fetch_entry(tx, spiffe_id)
            if entry is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found")
            if entry.parent_id is not None:
                raise NotAuthorizedError(
                    f"registration entry: {spiffe_id} is served by node agent {entry.parent_id}; "
                    "its SVIDs are issued only to that agent"
                )
            return entry, self._sign_and_record(tx, entry.spiffe_id, now_s, lambda: sign(entry))[2]

        return self._run(work, write=True)

    def renew(
        self, spiffe_id: SpiffeId, caller_serial: int | None, now: datetime.datetime, sign: Signer
    ) -> tuple[Entry, object, int]:
        """A workload's renewal in one read and one write, with no lock held while ``sign`` runs;
        returns the entry, ``sign``'s result and the bundle sequence.

        The read gets the entry, whether the caller's certificate ``caller_serial`` is revoked
        and the bundle sequence; ``sign(entry)`` is then called outside any transaction. The
        write holds the caller's certificate row (a revocation of it waits, or was seen), checks
        it again and the entry (signed again if the entry changed meanwhile), and records the
        certificate; a taken serial is signed again as in :meth:`issue_with_token`.

        Raises:
            NotFoundError: no entry for ``spiffe_id`` (at the read or at the write).
            NotAuthorizedError: the entry has a parent, or ``caller_serial`` is revoked (nothing
                is recorded, also when the revocation landed while ``sign`` ran).
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")

        def checked(tx: Transaction, *, lock: str) -> tuple[tuple[object, ...], Entry]:
            row = tx.execute(_SELECT_ENTRY + " WHERE spiffe_id = ?" + lock, (str(spiffe_id),)).fetchone()
            if row is None:
                raise NotFoundError(f"registration entry: {spiffe_id} not found")
            entry = self._rows.entry(row)
            if entry.parent_id is not None:
                raise NotAuthorizedError(
                    f"registration entry: {spiffe_id} is served by node agent {entry.parent_id}; "
                    "its SVIDs are issued only to that agent"
                )
            if caller_serial is not None:
                revoked = tx.execute(
                    "SELECT revoked_at FROM certificates WHERE serial = ?" + lock, (hex_serial(caller_serial),)
                ).fetchone()
                if revoked is not None and revoked[0] is not None:
                    raise NotAuthorizedError(f"renewal: the SVID {caller_serial:x} of {spiffe_id} is revoked")
            return tuple(row), entry

        def read(tx: Transaction) -> tuple[tuple[object, ...], Entry, int]:
            return (*checked(tx, lock=""), self._counter(tx, "bundle_sequence"))

        seen_row, seen, sequence = self._run(read, write=False)
        signed = self._signed_row(spiffe_id, now_s, functools.partial(sign, seen), None)[1:]

        def write(tx: Transaction) -> tuple[Entry, object, int]:
            row, entry = checked(tx, lock=self._dialect.for_share)
            if row != seen_row:  # the entry changed since the read: signed again, from what it is now
                _, _, result = self._sign_and_record(tx, spiffe_id, now_s, functools.partial(sign, entry))
                return entry, result, sequence
            cert_row, result = signed
            if not self._dialect.insert_if_absent(tx, "certificates", "serial", cert_row):
                _, _, result = self._sign_and_record(tx, spiffe_id, now_s, functools.partial(sign, seen))
            return seen, result, sequence

        return self._run(write, write=True)

    def issue_batch(
        self,
        agent_id: SpiffeId,
        items: Sequence[BatchItem],
        now: datetime.datetime,
        *,
        signing: AbstractContextManager[object] = _NOTHING_HELD,
    ) -> list[BatchOutcome]:
        """In ONE write transaction: check the node agent (known, not evicted), note it was seen,
        and for each item in order either record its certificate, or say why not.

        An item is refused (its outcome is the error; the others go on) when its entry is not
        parented to ``agent_id`` (a missing entry gives the same answer, so an agent cannot
        probe which entries exist), when its key was certified before (by this batch or any
        earlier issuance that recorded its key), or when an earlier item asked for the same
        entry. Everything is committed together; if the transaction fails nothing is recorded.

        The certificates are signed *before* the write transaction, from a read of the agent
        and the entries, so that no lock is held while the CA signs; the write transaction
        then checks again what the read saw, signs again an item whose entry changed meanwhile
        (or refuses it), and records all rows with one statement per few hundred. A serial
        that is already taken is signed again, as in :meth:`issue_with_token`. ``signing`` is
        held while the read and the signatures run, and not during the write (the CA signs one
        batch at a time, and another's signatures go on while this one's commit waits for the disk).

        Raises:
            AttestationError: the agent is unknown here, or evicted (nothing is written).
            StoreError: the database failed, or a signer kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        wanted = {item.spiffe_id for item in items}

        def read(tx: Transaction) -> tuple[dict[str, tuple[object, ...]], set[bytes]]:
            self._check_agent(self._fetch_agent(tx, agent_id, lock=False), agent_id)
            return self._entry_rows(tx, wanted), self._used_keys(tx, [item.key_sha256 for item in items])

        def seen_entry(text: str, row: tuple[object, ...]) -> Entry:
            return seen_by_text[text] if seen_rows.get(text) == row else self._rows.entry(row)

        def signed_row(item: BatchItem, entry: Entry) -> tuple[dict[str, object], object]:
            return self._signed_row(item.spiffe_id, now_s, functools.partial(item.sign, entry), item.key_sha256)[1:]

        with signing:
            seen_rows, used = self._run(read, write=False)
            seen_by_text = {text: self._rows.entry(row) for text, row in seen_rows.items()}
            seen = {entry.spiffe_id: entry for entry in seen_by_text.values()}
            plan = self._plan_batch(agent_id, items, seen, used)
            signed = {i: signed_row(item, seen[item.spiffe_id]) for i, item in enumerate(items) if plan[i] is None}

        def write(tx: Transaction) -> list[BatchOutcome]:
            self._see_agent(tx, agent_id, now_s)
            rows_now = self._entry_rows(tx, wanted)  # decoded again only where a row changed
            entries = {entry.spiffe_id: entry for entry in (seen_entry(text, row) for text, row in rows_now.items())}
            used = self._used_keys(tx, [item.key_sha256 for item in items])
            outcomes = self._plan_batch(agent_id, items, entries, used)
            rows: dict[int, tuple[dict[str, object], object]] = {}
            for i, item in enumerate(items):
                if outcomes[i] is not None:
                    continue
                entry = entries[item.spiffe_id]
                if i in signed and seen.get(item.spiffe_id) is entry:  # the row the signature was made from
                    rows[i] = signed[i]
                else:  # the entry changed (or appeared) since the read: signed again, from what it is now
                    rows[i] = signed_row(item, entry)
            taken = self._insert_certificates(tx, [row for row, _ in rows.values()])
            for n, (i, (_, result)) in enumerate(rows.items()):
                item = items[i]
                if n in taken:  # rare: signed again, one by one, until a serial is free
                    _, _, result = self._sign_and_record(
                        tx, item.spiffe_id, now_s, functools.partial(item.sign, entries[item.spiffe_id]),
                        key_sha256=item.key_sha256,
                    )  # fmt: skip
                outcomes[i] = (entries[item.spiffe_id], result)
            return outcomes  # type: ignore[return-value]

        return self._run(write, write=True)

    @staticmethod
    def _plan_batch(
        agent_id: SpiffeId, items: Sequence[BatchItem], entries: dict[SpiffeId, Entry], used: set[bytes]
    ) -> list[BatchOutcome | None]:
        """Per item, why it is refused, or None where it is to be signed."""
        asked: set[SpiffeId] = set()
        used = set(used)
        plan: list[BatchOutcome | None] = []
        for item in items:
            entry = entries.get(item.spiffe_id)
            if entry is None or entry.parent_id != agent_id:
                plan.append(NotAuthorizedError(f"batch: {item.spiffe_id} has no entry parented to {agent_id}"))
            elif item.spiffe_id in asked:
                plan.append(InvalidRequestError(f"batch: {item.spiffe_id} is asked for twice in one batch"))
            elif item.key_sha256 in used:
                plan.append(InvalidRequestError(_KEY_REUSED))
            else:
                asked.add(item.spiffe_id)
                used.add(item.key_sha256)
                plan.append(None)
        return plan

    def _insert_certificates(self, tx: Transaction, rows: Sequence[dict[str, object]]) -> set[int]:
        """Insert the certificate rows whose serial is not recorded yet (nor an earlier row's);
        returns the indexes of the rows that were not inserted.

        One statement per :data:`INSERT_CHUNK` rows, the same on both databases (``ON CONFLICT
        DO NOTHING``: SQLite 3.24+, PostgreSQL 9.5+; ``RETURNING``: SQLite 3.35+).
        """
        first: dict[object, int] = {}
        for index, row in enumerate(rows):
            first.setdefault(row["serial"], index)
        unique = sorted(first.values())
        taken = set(range(len(rows))) - set(unique)
        for start in range(0, len(unique), INSERT_CHUNK):
            chunk = [rows[i] for i in unique[start : start + INSERT_CHUNK]]
            columns = tuple(chunk[0])
            values = ", ".join(["(" + ", ".join("?" * len(columns)) + ")"] * len(chunk))
            query = (
                f"INSERT INTO certificates ({', '.join(columns)}) VALUES {values}"
                " ON CONFLICT (serial) DO NOTHING RETURNING serial"
            )
            inserted = {row[0] for row in tx.execute(query, [row[c] for row in chunk for c in columns]).fetchall()}
            taken.update(first[row["serial"]] for row in chunk if row["serial"] not in inserted)
        return taken

    def _signed_row(
        self,
        spiffe_id: SpiffeId,
        now_s: int,
        sign: Callable[[], tuple[int, datetime.datetime, object]],
        key_sha256: bytes | None,
    ) -> tuple[int, dict[str, object], object]:
        """Call ``sign`` and check its serial; returns the serial, the certificate's row and the signer's result."""
        serial, not_after, result = sign()
        if isinstance(serial, bool) or not isinstance(serial, int):
            raise TypeError(f"CA store: the signer returned a serial of type {type(serial).__name__}, not int")
        if serial <= 0 or serial.bit_length() > MAX_SERIAL_BITS:
            raise ValueError(f"CA store: the signer returned serial {serial:x}, not a positive 160-bit number")
        row: dict[str, object] = {
            "serial": hex_serial(serial),
            "spiffe_id": str(spiffe_id),
            "not_after": to_unix(not_after, "not_after"),
            "issued_at": now_s,
            "revoked_at": None,
            "key_sha256": None if key_sha256 is None else bytes(key_sha256),
        }
        return serial, row, result

    def _sign_and_record(
        self,
        tx: Transaction,
        spiffe_id: SpiffeId,
        now_s: int,
        sign: Callable[[], tuple[int, datetime.datetime, object]],
        *,
        key_sha256: bytes | None = None,
    ) -> tuple[int, int, object]:
        """Sign (again while the serial is taken) and record; returns (serial, not_after_s, result)."""
        for _ in range(SIGN_ATTEMPTS):
            serial, row, result = self._signed_row(spiffe_id, now_s, sign, key_sha256)
            # A serial another caller's uncommitted transaction holds makes this wait for it.
            if self._dialect.insert_if_absent(tx, "certificates", "serial", row):
                return serial, row["not_after"], result  # type: ignore[return-value]
        raise StoreError(
            f"CA store {self._name}: the signer returned an already recorded serial {SIGN_ATTEMPTS} times;"
            " its serials are not random"
        )

    # -- issued certificates -------------------------------------------------------------------

    def get_issued(self, serial: int) -> IssuedRecord | None:
        """The record of certificate ``serial``, or None."""
        row = self._run(
            lambda tx: tx.execute(_SELECT_ISSUED + " WHERE serial = ?", (hex_serial(serial),)).fetchone(), write=False
        )
        return None if row is None else self._rows.issued(row)

    def list_issued(self) -> list[IssuedRecord]:
        """Every issued certificate, oldest first."""
        rows = self._run(lambda tx: tx.execute(_SELECT_ISSUED + " ORDER BY issued_at, serial").fetchall(), write=False)
        return [self._rows.issued(row) for row in rows]

    def revoke_serial(self, serial: int, now: datetime.datetime) -> bool:
        """Mark one certificate revoked. False if unknown; revoking twice keeps the first time."""
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> bool:
            revoked = tx.execute(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now_s, hex_serial(serial)),
            )
            if revoked.rowcount > 0:
                return True
            known = tx.execute("SELECT 1 FROM certificates WHERE serial = ?", (hex_serial(serial),))
            return known.fetchone() is not None

        return self._run(work, write=True)

    def revoke_spiffe_id(self, spiffe_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """Revoke every unexpired, unrevoked certificate of ``spiffe_id``; returns their serials, sorted.

        A certificate is unexpired while ``now`` is at or before its not_after.
        """
        now_s = to_unix(now, "now")
        return self._run(lambda tx: self._revoke_unexpired(tx, spiffe_id, now_s), write=True)

    def _revoke_unexpired(self, tx: Transaction, spiffe_id: SpiffeId, now_s: int) -> list[int]:
        # Locked, then revoked by serial: exactly the certificates returned are revoked, even
        # if another replica issues one for ``spiffe_id`` in between.
        rows = tx.execute(
            "SELECT serial FROM certificates WHERE spiffe_id = ? AND revoked_at IS NULL AND not_after >= ?"
            + self._dialect.for_update,
            (str(spiffe_id), now_s),
        ).fetchall()
        serials = [str(row[0]) for row in rows]
        tx.executemany("UPDATE certificates SET revoked_at = ? WHERE serial = ?", [(now_s, s) for s in serials])
        return sorted(int(serial, 16) for serial in serials)

    def revoked_unexpired(self, now: datetime.datetime) -> list[IssuedRecord]:
        """What the next CRL must list: revoked certificates whose not_after is not before ``now``."""
        now_s = to_unix(now, "now")
        rows = self._run(
            lambda tx: tx.execute(
                _SELECT_ISSUED + " WHERE revoked_at IS NOT NULL AND not_after >= ? ORDER BY issued_at, serial", (now_s,)
            ).fetchall(),
            write=False,
        )
        return [self._rows.issued(row) for row in rows]

    # -- node agents ---------------------------------------------------------------------------

    def attest_agent_with_token(
        self, token_hash: bytes, now: datetime.datetime, sign: AgentSigner, *, key_sha256: bytes
    ) -> tuple[AgentRecord, object]:
        """In one transaction: check a node agent's join token (known, unused, unexpired, made
        for an agent), call ``sign(agent_id)``, record the certificate and the agent (attested
        by ``join_token``, no longer evicted), mark the token used.

        The token's row is locked as in :meth:`issue_with_token`; ``sign`` is treated as there.

        Raises:
            TokenError: unknown, used, expired, or made for a workload (nothing is written).
            InvalidRequestError: ``key_sha256`` was certified before (nothing is written).
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        token = bytes(token_hash)

        def work(tx: Transaction) -> tuple[AgentRecord, object]:
            row = tx.execute(_SELECT_TOKEN + self._dialect.for_update, (token,)).fetchone()
            agent_id = self._rows.usable_token(row, now_s, AGENT_TOKEN)
            result = self._attest(tx, agent_id, "join_token", "", now_s, sign, key_sha256)
            tx.execute("UPDATE tokens SET used_at = ? WHERE hash = ?", (now_s, token))
            return result

        return self._run(work, write=True)

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
        """In one transaction: call ``sign(agent_id)`` and record the certificate and the agent
        (how it attested and by what, no longer evicted). The caller has checked the proof.

        Raises:
            InvalidRequestError: ``key_sha256`` was certified before (nothing is written).
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")
        return self._run(
            lambda tx: self._attest(tx, agent_id, attestation, attested_by, now_s, sign, key_sha256), write=True
        )

    def renew_agent(
        self, agent_id: SpiffeId, now: datetime.datetime, sign: AgentSigner, *, key_sha256: bytes
    ) -> tuple[AgentRecord, object]:
        """In one transaction: check the agent (known, not evicted; its row locked, so an
        eviction waits for this renewal and then revokes its result too), call ``sign(agent_id)``,
        record the certificate, note the new expiry and that the agent was seen.

        Raises:
            AttestationError: the agent is unknown here, or evicted (nothing is written).
            InvalidRequestError: ``key_sha256`` was certified before (nothing is written).
            StoreError: the database failed, or ``sign`` kept returning recorded serials.
        """
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> tuple[AgentRecord, object]:
            self._see_agent(tx, agent_id, now_s)
            if self._used_keys(tx, [key_sha256]):
                raise InvalidRequestError(_KEY_REUSED)
            _, not_after_s, result = self._sign_and_record(
                tx, agent_id, now_s, lambda: sign(agent_id), key_sha256=key_sha256
            )
            tx.execute("UPDATE agents SET expires_at = ? WHERE spiffe_id = ?", (not_after_s, str(agent_id)))
            return self._fetch_agent(tx, agent_id, lock=False), result  # type: ignore[return-value]

        return self._run(work, write=True)

    def evict_agent(self, agent_id: SpiffeId, now: datetime.datetime) -> list[int]:
        """In one transaction: mark the agent evicted (it may renew, sync or ask for SVIDs no
        more, until it attests again) and revoke its unexpired certificates; returns their
        serials, sorted. Evicting twice keeps the first time and revokes what is left.

        Raises:
            NotFoundError: no agent ``agent_id`` ever attested here.
        """
        now_s = to_unix(now, "now")

        def work(tx: Transaction) -> list[int]:
            if self._fetch_agent(tx, agent_id, lock=True) is None:
                raise NotFoundError(f"node agent: {agent_id} never attested to this CA")
            tx.execute(
                "UPDATE agents SET evicted_at = ? WHERE spiffe_id = ? AND evicted_at IS NULL", (now_s, str(agent_id))
            )
            return self._revoke_unexpired(tx, agent_id, now_s)

        return self._run(work, write=True)

    def get_agent(self, agent_id: SpiffeId) -> AgentRecord | None:
        """The record of node agent ``agent_id``, or None."""
        return self._run(lambda tx: self._fetch_agent(tx, agent_id, lock=False), write=False)

    def list_agents(self) -> list[AgentRecord]:
        """Every node agent that ever attested here, evicted ones too, ordered by SPIFFE ID."""
        rows = self._run(lambda tx: tx.execute(_SELECT_AGENT + " ORDER BY spiffe_id").fetchall(), write=False)
        return [self._rows.agent(row) for row in rows]

    def _attest(
        self,
        tx: Transaction,
        agent_id: SpiffeId,
        attestation: str,
        attested_by: str,
        now_s: int,
        sign: AgentSigner,
        key_sha256: bytes,
    ) -> tuple[AgentRecord, object]:
        if self._used_keys(tx, [key_sha256]):
            raise InvalidRequestError(_KEY_REUSED)
        signed = self._sign_and_record(tx, agent_id, now_s, functools.partial(sign, agent_id), key_sha256=key_sha256)
        _, not_after_s, result = signed
        # The same statement on both databases (SQLite 3.24+, PostgreSQL 9.5+): a new agent, or
        # one attesting again (after an eviction, a lost SVID, a new host certificate).
        tx.execute(
            "INSERT INTO agents (spiffe_id, attestation, attested_by, last_seen, expires_at, evicted_at)"
            " VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (spiffe_id) DO UPDATE SET attestation = excluded.attestation,"
            " attested_by = excluded.attested_by, last_seen = excluded.last_seen, expires_at = excluded.expires_at,"
            " evicted_at = NULL",
            (str(agent_id), attestation, attested_by, now_s, not_after_s),
        )
        return self._fetch_agent(tx, agent_id, lock=False), result  # type: ignore[return-value]

    def _see_agent(self, tx: Transaction, agent_id: SpiffeId, now_s: int) -> AgentRecord:
        """Lock the agent's row (an eviction waits for this transaction), check it, note it was seen."""
        agent = self._check_agent(self._fetch_agent(tx, agent_id, lock=True), agent_id)
        tx.execute("UPDATE agents SET last_seen = ? WHERE spiffe_id = ?", (now_s, str(agent_id)))
        return agent

    @staticmethod
    def _check_agent(agent: AgentRecord | None, agent_id: SpiffeId) -> AgentRecord:
        """``agent`` if it attested here and is not evicted."""
        if agent is None:
            raise AttestationError(f"node agent: {agent_id} is not known to this CA; it must attest first")
        if agent.evicted:
            raise AttestationError(
                f"node agent: {agent_id} was evicted; it must attest again (a new join token, or x509pop)"
            )
        return agent

    def _fetch_agent(self, tx: Transaction, agent_id: SpiffeId, *, lock: bool) -> AgentRecord | None:
        query = _SELECT_AGENT + " WHERE spiffe_id = ?" + (self._dialect.for_update if lock else "")
        row = tx.execute(query, (str(agent_id),)).fetchone()
        return None if row is None else self._rows.agent(row)

    def _fetch_entries(self, tx: Transaction, spiffe_ids: set[SpiffeId]) -> dict[SpiffeId, Entry]:
        return {entry.spiffe_id: entry for entry in map(self._rows.entry, self._entry_rows(tx, spiffe_ids).values())}

    def _entry_rows(self, tx: Transaction, spiffe_ids: set[SpiffeId]) -> dict[str, tuple[object, ...]]:
        """The entries' rows as the database has them, by SPIFFE ID (not decoded)."""
        found: dict[str, tuple[object, ...]] = {}
        wanted = sorted(str(s) for s in spiffe_ids)
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            rows = tx.execute(_SELECT_ENTRY + f" WHERE spiffe_id IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
            found.update((row[0], tuple(row)) for row in rows)
        return found

    def _used_keys(self, tx: Transaction, keys: Sequence[bytes]) -> set[bytes]:
        """Which of ``keys`` (SHA-256 of a public key) a recorded certificate already carries."""
        used: set[bytes] = set()
        wanted = sorted({bytes(k) for k in keys})
        for start in range(0, len(wanted), IN_CHUNK):
            chunk = wanted[start : start + IN_CHUNK]
            query = f"SELECT key_sha256 FROM certificates WHERE key_sha256 IN ({', '.join('?' * len(chunk))})"
            used.update(bytes(row[0]) for row in tx.execute(query, chunk).fetchall())
        return used

    # -- counters ------------------------------------------------------------------------------

    def next_crl_number(self) -> int:
        """Increment and return the CRL number (monotonic across replicas, durable); the first is 1."""
        return self._bump("crl_number")

    def bundle_sequence(self) -> int:
        """The current bundle sequence number; 0 until the first bump."""
        return self._run(lambda tx: self._counter(tx, "bundle_sequence"), write=False)

    def bump_bundle_sequence(self) -> int:
        """Increment and return the bundle sequence number (monotonic across replicas, durable)."""
        return self._bump("bundle_sequence")

    # -- JWT keys ------------------------------------------------------------------------------

    def publish_jwt_keys(
        self,
        keys: Sequence[tuple[str, bytes, datetime.datetime]],
        now: datetime.datetime,
        withdraw: Sequence[str] = (),
    ) -> bool:
        """In one transaction: publish each ``(kid, SPKI DER, until)`` (a kid already published keeps
        its key and the later of the two times), drop the rows whose time has passed and those of
        ``withdraw`` (keys their CA no longer holds), and grow the bundle sequence if the set of
        published kids changed. Returns whether it changed."""
        now_s = to_unix(now, "now")
        wanted = [(kid, bytes(der), to_unix(until, "until")) for kid, der, until in keys]

        def work(tx: Transaction) -> bool:
            rows = tx.execute("SELECT kid, published_until FROM jwt_keys").fetchall()
            held = {str(kid): int(until) for kid, until in rows}
            before = set(held)  # rows past their time count until deleted: bundles made before still carry them
            tx.execute("DELETE FROM jwt_keys WHERE published_until <= ?", (now_s,))
            for kid in withdraw:
                tx.execute("DELETE FROM jwt_keys WHERE kid = ?", (kid,))
            for kid, der, until in wanted:
                if until <= now_s:
                    continue
                row = {"kid": kid, "public_key": der, "published_until": until}
                if not self._dialect.insert_if_absent(tx, "jwt_keys", "kid", row) and held.get(kid, 0) < until:
                    tx.execute("UPDATE jwt_keys SET published_until = ? WHERE kid = ?", (until, kid))
            after = {str(r[0]) for r in tx.execute("SELECT kid FROM jwt_keys").fetchall()}
            if after == before:
                return False
            tx.execute("UPDATE counters SET value = value + 1 WHERE name = ?", ("bundle_sequence",))
            return True

        return self._run(work, write=True)

    def jwt_keys(self, now: datetime.datetime) -> list[tuple[str, bytes]]:
        """The JWT keys every CA on this store publishes now: ``(kid, SPKI DER)``, by kid."""
        now_s = to_unix(now, "now")
        rows = self._run(
            lambda tx: tx.execute(
                "SELECT kid, public_key FROM jwt_keys WHERE published_until > ? ORDER BY kid", (now_s,)
            ).fetchall(),
            write=False,
        )
        return [(str(kid), bytes(der)) for kid, der in rows]

    def _bump(self, name: str) -> int:
        def work(tx: Transaction) -> int:
            # The UPDATE locks the row until the transaction ends: the SELECT reads this increment.
            tx.execute("UPDATE counters SET value = value + 1 WHERE name = ?", (name,))
            return self._counter(tx, name)

        return self._run(work, write=True)

    def _counter(self, tx: Transaction, name: str) -> int:
        row = tx.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"CA store {self._name}: counter {name!r} is missing; {self._dialect.restore_hint}")
        return int(row[0])

    # -- lifecycle -----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StoreError if the store cannot be used (for health checks)."""
        self._run(lambda tx: tx.execute("SELECT 1 FROM counters LIMIT 1").fetchall(), write=False)

    def close(self) -> None:
        """Close the database. Safe to call twice; every other method then raises StoreError."""
        self._dialect.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"

    # -- plumbing ------------------------------------------------------------------------------

    def _run(self, work: Callable[[Transaction], _T], *, write: bool) -> _T:
        placeholder = self._dialect.placeholder
        return self._dialect.run(lambda conn: work(Transaction(conn, placeholder)), write=write)

    def _migrate(self, tx: Transaction) -> None:
        self._dialect.prepare_migrations(tx)
        current = int(tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        if current > migrations.latest_version():
            raise StoreError(f"CA store {self._name}: {migrations.newer_schema_message(current)}")
        now_s = math.floor(datetime.datetime.now(datetime.UTC).timestamp())
        pending = migrations.statements(self._dialect.schema)[current:]
        for version, statements in enumerate(pending, start=current + 1):
            for statement in statements:
                tx.execute(statement)
            tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now_s))

    def _fetch_entry(self, tx: Transaction, spiffe_id: SpiffeId) -> Entry | None:
        row = tx.execute(_SELECT_ENTRY + " WHERE spiffe_id = ?", (str(spiffe_id),)).fetchone()
        return None if row is None else self._rows.entry(row)
