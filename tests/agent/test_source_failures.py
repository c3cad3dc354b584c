"""IssuerSource keeps renewing through failures that are not the CA's: its loop never dies."""

from __future__ import annotations

import datetime
import shutil

import pytest

from conftest import CLOCKED_LIFETIME, step
from meshid import SourceError, TrustBundle, TrustDomain
from meshid.agent import IssuerSource
from meshid.ca import Authority

pytestmark = pytest.mark.timeout(60)
WORKLOAD = "spiffe://example.org/ns/prod/sa/stubborn"


def test_an_unwritable_svid_dir_does_not_stop_renewal(clocked_ca, clock, tmp_path) -> None:
    token = clocked_ca.enroll(WORKLOAD, CLOCKED_LIFETIME)
    out = tmp_path / "svid"
    source = IssuerSource(
        clocked_ca.address, clocked_ca.bundle_file, join_token=token, svid_dir=out, clock=clock
    ).start()
    notified = []
    source.subscribe(lambda: notified.append(source.get_svid().serial))
    try:
        shutil.rmtree(out)
        out.write_text("now a file, not a folder")  # every write of the SVID files fails from here on
        for _ in range(20):
            if len(notified) >= 3:
                break
            step(clock)
        assert len(set(notified)) >= 3, "renewals stopped"
        assert source.state.last_error is not None and "cannot write" in source.state.last_error
        assert source.get_svid().not_after > clock.now()
    finally:
        source.close()


def test_a_saved_svid_is_not_reused_once_the_configured_root_changed(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    out = tmp_path / "svid"
    with IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token, svid_dir=out) as source:
        saved_serial = source.get_svid().serial
    # Restarted with the same (good) bundle and no token: the saved SVID is reused.
    with IssuerSource(running_ca.address, running_ca.bundle_file, svid_dir=out) as again:
        assert again.get_svid().serial == saved_serial
    # The operator replaced the root it trusts the CA by: the saved SVID is no longer reused,
    # and with no token there is nothing to start from.
    other_root = tmp_path / "other-root.pem"
    other_root.write_bytes(
        TrustBundle(TrustDomain.parse("example.org"), Authority.create_root("example.org").roots).to_pem()
    )
    with pytest.raises(SourceError, match="no reusable SVID and no join token"):
        IssuerSource(running_ca.address, other_root, svid_dir=out).start()
