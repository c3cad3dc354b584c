"""``CaServer`` re-issues the SVID it serves with half-way through its lifetime on the CA's own
clock (the clock it signs with), not on the machine's: a CA run on an injected clock renews when
that clock says so, as it renews the admin SVID (test_admin_ttl.py)."""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from pathlib import Path

from cryptography import x509

from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.clock import ManualClock
from support import eventually

MAX_TTL = datetime.timedelta(minutes=2)


def _presented(port: int) -> x509.Certificate:
    """The leaf the CA presents in a real TLS 1.3 handshake on loopback."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading what is presented: nothing is sent
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_ca_renews_the_svid_it_serves_with_at_half_its_lifetime_on_its_own_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    data_dir = tmp_path / "ca"
    init_data_dir(data_dir, "example.org", max_ttl=MAX_TTL)
    server = CaServer(data_dir, "127.0.0.1:0", clock=clock, poll_interval=0.02)
    port = server.start()
    try:
        first = _presented(port)
        assert first.not_valid_before_utc <= clock.now()
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        half_way = first.not_valid_before_utc + lifetime / 2
        # Just short of half the lifetime on the CA's clock: the loop, polling every 20 ms, keeps
        # the SVID for 25 polls (a loop that renewed at every poll would not).
        clock.advance((half_way - clock.now()).total_seconds() - 5)
        time.sleep(25 * 0.02)
        assert _presented(port).serial_number == first.serial_number
        # Half the lifetime and a second, on the CA's clock; the machine's clock has barely moved.
        clock.advance((half_way - clock.now()).total_seconds() + 1)
        renewed = eventually(
            lambda: (leaf := _presented(port)).serial_number != first.serial_number and leaf,
            10,
            "the CA serving with a renewed SVID",
        )
        assert isinstance(renewed, x509.Certificate)
        assert renewed.not_valid_before_utc > first.not_valid_before_utc  # signed at the CA's new time
        assert renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
            first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )
    finally:
        server.stop(None)
