"""RowCodec's decoded entries, kept by their whole row: an unchanged row gives the same entry,
any changed column a new one, a malformed row an error every time, and the memo stays bounded."""

from __future__ import annotations

import json

import pytest

from meshid.ca.store import rows
from meshid.ca.store.rows import RowCodec
from meshid.errors import StoreError


def _row(n: int, selectors: list[str] | None = None) -> tuple[object, ...]:
    sid = f"spiffe://example.org/w{n}"
    chosen = selectors if selectors is not None else [f"unix:uid:{1000 + n}"]
    return (sid, "[]", 3600, 1_700_000_000, "spiffe://example.org/meshid/agent/a", json.dumps(chosen), '["classical"]')


def test_an_unchanged_row_is_decoded_once_and_a_changed_one_again() -> None:
    codec = RowCodec("test")
    first = codec.entry(_row(1))
    assert codec.entry(list(_row(1))) is first  # the same row, as a list (PostgreSQL) or a tuple (SQLite)
    changed = codec.entry(_row(1, ["unix:uid:0"]))
    assert changed is not first and changed.selectors == ("unix:uid:0",)
    assert codec.entry(_row(1)).selectors == ("unix:uid:1001",)


def test_a_malformed_row_raises_every_time_and_is_not_kept(monkeypatch) -> None:
    monkeypatch.setattr(rows, "ENTRY_CACHE", 1)  # room for one decoded row
    codec = RowCodec("test")
    kept = codec.entry(_row(1))
    bad = (*_row(2)[:5], "not json", '["classical"]')
    for _ in range(2):
        with pytest.raises(StoreError, match="malformed selectors"):
            codec.entry(bad)
    assert codec.entry(_row(1)) is kept  # the malformed row took no room: the good one is still kept


def test_the_memo_keeps_at_most_entry_cache_rows(monkeypatch) -> None:
    monkeypatch.setattr(rows, "ENTRY_CACHE", 8)
    codec = RowCodec("test")
    first = [codec.entry(_row(n)) for n in range(20)]
    # the newest 8 are kept (the same objects) ...
    assert all(codec.entry(_row(n)) is first[n] for n in range(19, 11, -1))
    # ... and no more: the 9th newest was let go (decoded again), as were the older ones
    again = codec.entry(_row(11))
    assert again is not first[11] and again.spiffe_id.path == "/w11"
