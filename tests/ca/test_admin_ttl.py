"""The admin SVID obeys the CA's maximum TTL (``ca init --ttl``, issue #13), and ``CaServer``
renews it half-way through that lifetime, on the CA's own clock."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509

from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.clock import ManualClock
from support import eventually

MAX_TTL = datetime.timedelta(minutes=2)


def _admin_leaf(data_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((data_dir / "admin" / "svid.pem").read_bytes())[0]


def test_init_issues_an_admin_svid_no_longer_than_the_max_ttl(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "ca", "example.org", max_ttl=MAX_TTL)
    leaf = _admin_leaf(tmp_path / "ca")
    assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) <= MAX_TTL  # it was 24 h


def test_ca_server_renews_the_capped_admin_svid_when_half_of_it_has_passed(tmp_path: Path) -> None:
    clock = ManualClock()
    data_dir = tmp_path / "ca"
    init_data_dir(data_dir, "example.org", max_ttl=MAX_TTL)
    server = CaServer(data_dir, "127.0.0.1:0", clock=clock, poll_interval=0.02)
    server.start()
    try:
        first = _admin_leaf(data_dir)
        assert first.not_valid_after_utc - clock.now() <= MAX_TTL
        clock.advance((MAX_TTL / 2).total_seconds() + 1)  # on the CA's clock; the real one has barely moved
        eventually(lambda: _admin_leaf(data_dir).serial_number != first.serial_number, 10, "a renewed admin SVID")
        renewed = _admin_leaf(data_dir)
        assert renewed.not_valid_after_utc - clock.now() <= MAX_TTL
    finally:
        server.stop(None)
