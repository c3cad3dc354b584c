"""What the CA store tests share: the records they write and a signer that names what it signed.

The contract every store keeps is tests/ca/test_store_contract.py (run on SQLite and on
PostgreSQL); tests/ca/test_sqlite.py and tests/ca/test_postgres.py hold what only one dialect does.
"""

from __future__ import annotations

import datetime
import secrets
import threading
from collections.abc import Callable

from meshid.ca.store import Entry, Signer
from meshid.spiffeid import SpiffeId

NOW = datetime.datetime(2030, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/payments")
OTHER = SpiffeId.parse("spiffe://example.org/ns/prod/sa/frontend")
TOKEN = bytes.fromhex("11" * 32)


def entry(spiffe_id: SpiffeId = WORKLOAD, *dns_names: str) -> Entry:
    return Entry(spiffe_id, dns_names, datetime.timedelta(minutes=30), NOW)


def signer(*serials: int, not_after: datetime.datetime = NOW + HOUR) -> Signer:
    """Signs with the given serials in turn (or random ones once they run out); the result names the serial."""
    queue = list(serials)

    def sign(entry: Entry) -> tuple[int, datetime.datetime, object]:
        serial = queue.pop(0) if queue else secrets.randbits(159) | 1
        return serial, not_after, f"cert {serial:x} for {entry.spiffe_id}"

    return sign


def failing_sign(entry: Entry) -> tuple[int, datetime.datetime, object]:
    raise RuntimeError("HSM unavailable")


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """``target(0)`` ... ``target(count - 1)``, each in its own thread; returns when all have."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
