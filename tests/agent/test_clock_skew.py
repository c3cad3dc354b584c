"""A few minutes of clock skew between workload and CA does not break renewal."""

from __future__ import annotations

import datetime
import time

import pytest

from meshid.agent import IssuerSource
from meshid.ca.client import AdminClient
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer

pytestmark = pytest.mark.timeout(60)
WORKLOAD = "spiffe://example.org/ns/prod/sa/skewed"


def _skewed_ca(folder, offset: datetime.timedelta) -> CaServer:
    init_data_dir(folder, "example.org", max_ttl=datetime.timedelta(hours=1))
    server = CaServer(folder, "127.0.0.1:0", clock=lambda: datetime.datetime.now(datetime.UTC) + offset)
    server.start()
    return server


@pytest.mark.parametrize(
    ("offset", "ttl"),
    [
        # CA 3 minutes ahead: NotAfter is 3 min further than the lifetime; renew by the lifetime.
        (datetime.timedelta(minutes=3), datetime.timedelta(seconds=4)),
        # CA 3 minutes behind: 3 min 6 s of lifetime leaves 6 s by the local clock; renew by that.
        (datetime.timedelta(minutes=-3), datetime.timedelta(minutes=3, seconds=6)),
    ],
    ids=["ca-clock-ahead", "ca-clock-behind"],
)
def test_renewal_keeps_its_rhythm_under_skew(tmp_path, offset, ttl) -> None:
    ca = _skewed_ca(tmp_path / "ca", offset)
    address = f"127.0.0.1:{ca.port}"
    try:
        with AdminClient(address, tmp_path / "ca") as admin:
            admin.create_entry(WORKLOAD, [], ttl)
            token = admin.create_token(WORKLOAD).token
        with IssuerSource(address, tmp_path / "ca" / "bundle.pem", join_token=token) as source:
            first = source.get_svid()
            deadline = time.monotonic() + 15
            while source.state.renewals < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            state = source.state
            now = datetime.datetime.now(datetime.UTC)
            assert state.renewals >= 3, f"renewed {state.renewals}x under {offset} of skew"
            assert state.failures == 0, state.last_error
            assert source.get_svid().not_after > now  # never left holding an expired SVID
            assert source.get_svid().serial != first.serial
    finally:
        ca.stop()
