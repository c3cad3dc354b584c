"""IssuerSource keeps renewing through failures that are not the CA's: its loop never dies."""

from __future__ import annotations

import datetime
import shutil
import time

import pytest

from meshid.agent import IssuerSource

pytestmark = pytest.mark.timeout(60)
WORKLOAD = "spiffe://example.org/ns/prod/sa/stubborn"


def test_an_unwritable_svid_dir_does_not_stop_renewal(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WORKLOAD, datetime.timedelta(seconds=2))
    out = tmp_path / "svid"
    source = IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token, svid_dir=out).start()
    notified = []
    source.subscribe(lambda: notified.append(source.get_svid().serial))
    try:
        shutil.rmtree(out)
        out.write_text("now a file, not a folder")  # every write of the SVID files fails from here on
        deadline = time.monotonic() + 15
        while len(notified) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(set(notified)) >= 3, "renewals stopped"
        assert source.state.last_error is not None and "cannot write" in source.state.last_error
        assert source.get_svid().not_after > datetime.datetime.now(datetime.UTC)
    finally:
        source.close()
