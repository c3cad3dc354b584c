"""A few minutes of clock skew between workload and CA does not break renewal.

The workload's source runs on the test's ManualClock and the CA on that clock plus the skew, so
the renewal schedule is stepped and each renewal's place in it can be checked."""

from __future__ import annotations

import datetime
import itertools

import pytest

from conftest import CLOCKED_LIFETIME, step
from meshid.agent import IssuerSource
from meshid.ca.client import AdminClient
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.clock import ManualClock, OffsetClock

pytestmark = pytest.mark.timeout(60)
WORKLOAD = "spiffe://example.org/ns/prod/sa/skewed"
SKEW = datetime.timedelta(minutes=3)


def _skewed_ca(folder, clock: ManualClock, offset: datetime.timedelta) -> CaServer:
    init_data_dir(folder, "example.org", max_ttl=datetime.timedelta(hours=1))
    server = CaServer(folder, "127.0.0.1:0", clock=OffsetClock(clock, offset))
    server.start()
    return server


def _workload_token(ca: CaServer, folder, ttl: datetime.timedelta) -> str:
    """The workload's entry (``ttl``) made through the running CA, and a join token for it."""
    with AdminClient(f"127.0.0.1:{ca.port}", folder) as admin:
        admin.create_entry(WORKLOAD, [], ttl)
        return str(admin.create_token(WORKLOAD).token)


# Either way the SVID has CLOCKED_LIFETIME (40 s) to live by the workload's clock, and renewal
# is due at half of that at the latest. (The CA's NotBefore is back-dated 5 minutes, so a CA 3
# minutes ahead leaves the clock 2 minutes of lead over real time: these tests use about one.)
@pytest.mark.parametrize(
    ("offset", "ttl"),
    [
        # CA 3 minutes ahead: NotAfter is 3 min further than the lifetime; renew by the lifetime.
        (SKEW, CLOCKED_LIFETIME),
        # CA 3 minutes behind: 3 min 40 s of lifetime leaves 40 s by the local clock; renew by that.
        (-SKEW, SKEW + CLOCKED_LIFETIME),
    ],
    ids=["ca-clock-ahead", "ca-clock-behind"],
)
def test_renewal_keeps_its_rhythm_under_skew(tmp_path, offset, ttl) -> None:
    clock = ManualClock()  # the workload's; the CA's runs `offset` from it
    ca = _skewed_ca(tmp_path / "ca", clock, offset)
    address = f"127.0.0.1:{ca.port}"
    try:
        token = _workload_token(ca, tmp_path / "ca", ttl)
        with IssuerSource(address, tmp_path / "ca" / "bundle.pem", join_token=token, clock=clock) as source:
            first = source.get_svid()
            renewed_at = [clock.monotonic()]  # the workload's clock at issuance and at each renewal
            for _ in range(20):
                if source.state.renewals >= 3:
                    break
                step(clock)
                assert source.get_svid().not_after > clock.now(), "left holding an expired SVID"
                if source.state.renewals >= len(renewed_at):
                    renewed_at.append(clock.monotonic())
            state = source.state
            assert state.renewals >= 3, f"renewed {state.renewals}x under {offset} of skew"
            assert state.failures == 0, state.last_error
            assert source.get_svid().serial != first.serial
    finally:
        ca.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(renewed_at)]
    print(f"\n[skew {offset.total_seconds() / 60:+.0f} min] renewals {[f'{g:.1f}' for g in gaps]} s apart on the workload's clock")
    assert max(gaps) <= CLOCKED_LIFETIME.total_seconds() / 2, f"renewed later than half the local lifetime: {gaps}"


def test_an_svid_already_expired_by_the_local_clock_is_not_renewed_in_a_loop(tmp_path) -> None:
    """The workload's clock runs 70 s ahead of the CA's (and of real time), so every SVID of
    40 s arrives expired by the local clock: its lifetime counts as 0. The next renewal still
    waits half a second of the local clock (which this test holds still), rather than asking
    the CA again at once, forever."""
    import time

    clock = ManualClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=70))
    ca = _skewed_ca(tmp_path / "ca", clock, -datetime.timedelta(seconds=70))  # the CA on real time
    address = f"127.0.0.1:{ca.port}"
    try:
        token = _workload_token(ca, tmp_path / "ca", CLOCKED_LIFETIME)
        with IssuerSource(address, tmp_path / "ca" / "bundle.pem", join_token=token, clock=clock) as source:
            assert source.get_svid().not_after < clock.now()  # expired on arrival, by the local clock
            time.sleep(1.0)  # real time; the local clock does not move
            renewals = source.state.renewals
    finally:
        ca.stop()
    assert renewals == 0, f"{renewals} renewals in one second with the local clock held still"
