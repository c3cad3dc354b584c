"""Identity sources: StaticSource, FileSource, and server credentials that follow a rotating source.

FileSource tests write the identity files with plain ``open`` (as any tool might) and check
what ``reload()`` and the polling thread make of them. The rotation test runs real mTLS
handshakes: grpc does not show a client the server's certificate, so the server's identity
is proved by pinning (``secure_channel(server_id=...)`` succeeds only against that ID).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path

import pytest

import meshid
from meshid.ca import Authority
from meshid.clock import ManualClock
from support import FRONTEND_ID, SERVER_ID, call, eventually, handshake_failed, sync_server

GREETER_V2 = "spiffe://example.org/ns/prod/sa/greeter-v2"
PARTNER = "spiffe://other.org/ns/prod/sa/partner"
EXAMPLE = meshid.TrustDomain.parse("example.org")
OTHER = meshid.TrustDomain.parse("other.org")


class Counter:
    """A subscriber that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class Files:
    """The three identity files in a folder, written with plain open."""

    def __init__(self, folder: Path) -> None:
        self.cert, self.key, self.bundle = folder / "svid.pem", folder / "svid.key", folder / "bundle.pem"

    def write(self, svid: meshid.X509Svid, bundle_pem: bytes | None = None) -> None:
        _write(self.key, svid.key_pem())
        _write(self.cert, svid.chain_pem())
        if bundle_pem is not None:
            _write(self.bundle, bundle_pem)

    def backdate(self) -> None:
        # Files written "a minute ago": on a filesystem with a coarse clock, a rewrite of the same
        # size in the same tick would otherwise carry the very same (size, mtime) stamp.
        then = time.time_ns() - 60 * 10**9
        for path in (self.cert, self.key, self.bundle):
            os.utime(path, ns=(then, then))

    def source(self, **kw: object) -> meshid.FileSource:
        return meshid.FileSource(self.cert, self.key, self.bundle, **kw)  # type: ignore[arg-type]


@pytest.fixture
def files(tmp_path: Path, ca: Authority) -> Files:
    f = Files(tmp_path)
    f.write(ca.issue_svid(SERVER_ID), meshid.TrustBundle(ca.trust_domain, ca.roots).to_pem())
    f.backdate()
    return f


# --- StaticSource --------------------------------------------------------------------------


def test_static_source_hands_out_what_it_was_given(ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = ca.issue_svid(SERVER_ID)
    source = meshid.StaticSource(svid, bundles)
    assert source.get_svid() is svid
    assert source.get_bundles() is bundles
    assert isinstance(source, meshid.Source)


def test_static_source_wraps_a_single_trust_bundle(ca: Authority) -> None:
    bundle = meshid.TrustBundle(ca.trust_domain, ca.roots)
    source = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundle)
    assert source.get_bundles() == meshid.BundleSet.of(bundle)


def test_static_source_update_replaces_and_notifies(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    first, second = ca.issue_svid(SERVER_ID), ca.issue_svid(SERVER_ID)
    source = meshid.StaticSource(first, bundles)
    counter = Counter()
    source.subscribe(counter)

    source.update(second)
    assert source.get_svid() is second
    assert source.get_bundles() is bundles  # bundles untouched when not given
    assert counter.calls == 1

    only_other = meshid.TrustBundle(other_ca.trust_domain, other_ca.roots)
    source.update(bundles=only_other)
    assert source.get_svid() is second  # SVID untouched when not given
    assert source.get_bundles() == meshid.BundleSet.of(only_other)
    assert counter.calls == 2


def test_unsubscribed_callback_is_not_called(ca: Authority, bundles: meshid.BundleSet) -> None:
    source = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)
    kept, dropped = Counter(), Counter()
    source.subscribe(kept)
    unsubscribe = source.subscribe(dropped)
    source.update(ca.issue_svid(SERVER_ID))
    unsubscribe()
    unsubscribe()  # a second call is harmless
    source.update(ca.issue_svid(SERVER_ID))
    assert kept.calls == 2
    assert dropped.calls == 1


def test_failing_subscriber_does_not_stop_the_others(ca: Authority, bundles: meshid.BundleSet) -> None:
    source = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)

    def broken() -> None:
        raise RuntimeError("subscriber bug")

    counter = Counter()
    source.subscribe(broken)
    source.subscribe(counter)
    source.update(ca.issue_svid(SERVER_ID))
    assert counter.calls == 1


def test_static_source_refuses_a_non_svid(ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = ca.issue_svid(SERVER_ID)
    with pytest.raises(TypeError, match="svid must be an X509Svid"):
        meshid.StaticSource((svid.chain_pem(), svid.key_pem()), bundles)  # type: ignore[arg-type]


def test_static_source_refuses_bundles_of_the_wrong_type(ca: Authority) -> None:
    svid = ca.issue_svid(SERVER_ID)
    with pytest.raises(TypeError, match="bundles must be a BundleSet or TrustBundle"):
        meshid.StaticSource(svid, ca.roots)  # type: ignore[arg-type]
    source = meshid.StaticSource(svid, meshid.TrustBundle(ca.trust_domain, ca.roots))
    with pytest.raises(TypeError):
        source.update(bundles=ca.roots)  # type: ignore[arg-type]
    assert EXAMPLE in source.get_bundles()


def test_static_source_update_refuses_a_non_svid(ca: Authority, bundles: meshid.BundleSet) -> None:
    svid = ca.issue_svid(SERVER_ID)
    source = meshid.StaticSource(svid, bundles)
    with pytest.raises(TypeError):
        source.update("not an svid")  # type: ignore[arg-type]
    assert source.get_svid() is svid


def test_subscribe_refuses_a_non_callable(ca: Authority, bundles: meshid.BundleSet) -> None:
    source = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)
    with pytest.raises(TypeError, match="callable"):
        source.subscribe("not callable")  # type: ignore[arg-type]


# --- FileSource ----------------------------------------------------------------------------


def test_file_source_reads_the_files(files: Files, ca: Authority) -> None:
    source = files.source()
    assert isinstance(source, meshid.Source)
    assert str(source.get_svid().spiffe_id) == SERVER_ID
    assert source.get_svid().chain_pem() == files.cert.read_bytes()
    assert source.get_bundles()[EXAMPLE].roots == ca.roots
    assert source.last_error is None


def test_file_source_refuses_broken_files_at_first_load(files: Files) -> None:
    _write(files.cert, b"garbage\n")
    with pytest.raises(meshid.InvalidSvidError, match="no PEM certificate found"):
        files.source()


def test_file_source_refuses_a_non_positive_poll_interval(files: Files) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        files.source(poll_interval=0)


def test_reload_without_a_change_returns_false(files: Files) -> None:
    source = files.source()
    counter = Counter()
    source.subscribe(counter)
    before = source.get_svid()
    assert source.reload() is False
    assert source.get_svid() is before
    assert counter.calls == 0


def test_reload_after_the_files_change_returns_true_and_notifies(files: Files, ca: Authority) -> None:
    source = files.source()
    counter = Counter()
    source.subscribe(counter)
    rotated = ca.issue_svid(SERVER_ID)

    files.write(rotated)

    assert source.reload() is True
    assert source.get_svid() == rotated
    assert counter.calls == 1
    assert source.last_error is None
    assert source.reload() is False  # nothing changed since
    assert counter.calls == 1


def test_broken_new_certificate_keeps_the_previous_svid(files: Files, ca: Authority) -> None:
    source = files.source()
    counter = Counter()
    source.subscribe(counter)
    before = source.get_svid()

    _write(files.cert, b"garbage, not a certificate\n")

    assert source.reload() is False
    assert source.get_svid() is before
    assert counter.calls == 0
    assert source.last_error is not None
    assert "no PEM certificate found" in source.last_error
    assert str(files.cert) in source.last_error

    good = ca.issue_svid(SERVER_ID)
    files.write(good)

    assert source.reload() is True
    assert source.get_svid() == good
    assert source.last_error is None
    assert counter.calls == 1


def test_certificate_without_its_new_key_keeps_the_previous_svid(files: Files, ca: Authority) -> None:
    source = files.source()
    before = source.get_svid()
    rotated = ca.issue_svid(SERVER_ID)

    _write(files.cert, rotated.chain_pem())  # the key is not written yet

    assert source.reload() is False
    assert source.get_svid() is before
    assert source.last_error is not None and "does not match the leaf" in source.last_error

    _write(files.key, rotated.key_pem())

    assert source.reload() is True
    assert source.get_svid() == rotated


def test_broken_bundle_file_keeps_the_previous_bundles(files: Files) -> None:
    source = files.source()
    bundles_before = source.get_bundles()

    _write(files.bundle, source.get_svid().key_pem())  # a key where the roots should be

    assert source.reload() is False
    assert source.get_bundles() is bundles_before
    assert source.last_error is not None and "expected 'CERTIFICATE'" in source.last_error


def test_started_file_source_picks_up_a_change_by_polling(files: Files, ca: Authority) -> None:
    rotated = ca.issue_svid(SERVER_ID)
    counter = Counter()
    with files.source(poll_interval=0.05) as source:
        source.subscribe(counter)
        files.write(rotated)
        eventually(lambda: source.get_svid() == rotated, 10, "the source to load the rotated files")
    assert counter.calls == 1


def test_file_source_can_be_started_again_after_close(files: Files, ca: Authority) -> None:
    source = files.source(poll_interval=0.05)
    assert source.start() is source
    source.close()
    source.close()  # closing twice is harmless
    rotated = ca.issue_svid(SERVER_ID)
    source.start()
    try:
        files.write(rotated)
        eventually(lambda: source.get_svid() == rotated, 10, "the source to load the rotated files")
    finally:
        source.close()


def _validity_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meshid.sources" and r.levelname == "WARNING"]


def test_file_source_start_warns_of_an_expired_svid_and_says_so_in_its_state(
    files: Files, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    # Files as a demo leaves them: an SVID whose hour ran out two hours ago, read on the real clock.
    two_hours_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    expired = ca.issue_svid(SERVER_ID, ttl=datetime.timedelta(hours=1), now=two_hours_ago)
    files.write(expired)
    caplog.set_level(logging.WARNING, "meshid.sources")
    source = files.source()
    assert _validity_warnings(caplog) == []  # reading the files is not the place; start() is
    with source:
        (warning,) = _validity_warnings(caplog)
        assert (
            f"the SVID of {SERVER_ID} in {files.cert} EXPIRED at {expired.not_after.isoformat()} (60m ago)" in warning
        )
        assert "renew it" in warning
        state = source.state
        assert state.validity == "expired" and state.expired
        assert state.spiffe_id == SERVER_ID and state.serial == f"{expired.serial:x}"
        assert state.not_after == expired.not_after
        assert source.get_svid() == expired  # still handed out: the warning is the news


def test_file_source_warns_of_a_not_yet_valid_svid(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    not_before = meshid.X509Svid.load(files.cert, files.key).not_before
    clock = ManualClock(not_before - datetime.timedelta(hours=3))  # a host clock hours behind the CA's
    caplog.set_level(logging.WARNING, "meshid.sources")
    with files.source(clock=clock) as source:
        (warning,) = _validity_warnings(caplog)
        assert "is not valid until" in warning and "(3h00m from now)" in warning and "clock behind" in warning
        assert source.state.validity == "not yet valid"
        assert not source.state.expired


def test_file_source_state_of_a_valid_svid(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "meshid.sources")
    with files.source() as source:
        assert source.state.validity == "valid"
        assert source.state.last_error is None
    assert _validity_warnings(caplog) == []


def test_file_source_warns_once_when_its_svid_expires_while_polled(
    files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    caplog.set_level(logging.WARNING, "meshid.sources")
    with files.source(clock=clock, poll_interval=1.0) as source:
        clock.settle()
        assert _validity_warnings(caplog) == []
        clock.advance(2 * 3600)  # the files' 1 h SVID has expired; nothing rewrote them
        clock.settle()
        assert source.state.expired
        assert len(_validity_warnings(caplog)) == 1
        for _ in range(3):  # later polls do not repeat it
            clock.advance(1.0)
            clock.settle()
        assert len(_validity_warnings(caplog)) == 1


def test_file_source_reload_warns_of_an_expired_new_svid(
    files: Files, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    source = files.source()
    caplog.set_level(logging.WARNING, "meshid.sources")
    two_hours_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    files.write(ca.issue_svid(SERVER_ID, ttl=datetime.timedelta(hours=1), now=two_hours_ago))
    assert source.reload() is True
    (warning,) = _validity_warnings(caplog)
    assert "EXPIRED" in warning
    assert source.state.expired


def test_file_source_keeps_federated_bundles(files: Files, ca: Authority, other_ca: Authority) -> None:
    federated = meshid.BundleSet.of(meshid.TrustBundle(other_ca.trust_domain, other_ca.roots))
    source = files.source(federated=federated)
    assert set(source.get_bundles()) == {EXAMPLE, OTHER}
    assert source.get_bundles()[OTHER].roots == other_ca.roots
    partner = other_ca.issue_svid(PARTNER)
    assert source.get_bundles().verify(partner.leaf) == partner.spiffe_id

    files.write(ca.issue_svid(SERVER_ID))
    assert source.reload() is True
    assert source.get_bundles()[OTHER].roots == other_ca.roots


def test_bundle_file_replaces_a_federated_bundle_of_the_same_trust_domain(files: Files, ca: Authority) -> None:
    stale = Authority.create_root("example.org")
    source = files.source(federated=meshid.BundleSet.of(meshid.TrustBundle(stale.trust_domain, stale.roots)))
    assert source.get_bundles()[EXAMPLE].roots == ca.roots


# --- server credentials follow the source --------------------------------------------------


def _allow_all(source: meshid.Source) -> meshid.AuthorizationInterceptor:
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "all", "methods": ["*"], "trust_domains": ["example.org"]}]}
    )
    return meshid.AuthorizationInterceptor(policy, source=source)


def _call_as(port: int, client: meshid.Source, server_id: str) -> tuple[str, str]:
    # A local subchannel pool: each channel makes its own connection, hence its own handshake.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with meshid.secure_channel(f"127.0.0.1:{port}", client, server_id=server_id, options=options) as channel:
        return call(channel)


def test_server_presents_a_rotated_svid_on_the_next_handshake(ca: Authority, bundles: meshid.BundleSet) -> None:
    source = meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)
    client = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    with sync_server(source, _allow_all(source)) as port:
        assert _call_as(port, client, SERVER_ID) == ("OK", FRONTEND_ID)
        assert handshake_failed(*_call_as(port, client, GREETER_V2))

        kept_open = meshid.secure_channel(
            f"127.0.0.1:{port}", client, server_id=SERVER_ID, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            assert call(kept_open) == ("OK", FRONTEND_ID)

            source.update(ca.issue_svid(GREETER_V2))

            assert _call_as(port, client, GREETER_V2) == ("OK", FRONTEND_ID)
            assert handshake_failed(*_call_as(port, client, SERVER_ID))
            assert call(kept_open) == ("OK", FRONTEND_ID)  # an open connection is not cut
        finally:
            kept_open.close()


def test_server_on_a_file_source_presents_rotated_files(files: Files, ca: Authority, bundles: meshid.BundleSet) -> None:
    client = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    source = files.source()
    with sync_server(source, _allow_all(source)) as port:
        assert _call_as(port, client, SERVER_ID) == ("OK", FRONTEND_ID)

        files.write(ca.issue_svid(GREETER_V2))
        assert source.reload() is True

        assert _call_as(port, client, GREETER_V2) == ("OK", FRONTEND_ID)
        assert handshake_failed(*_call_as(port, client, SERVER_ID))


def test_server_credentials_refuse_a_non_source() -> None:
    with pytest.raises(TypeError, match="source must provide"):
        meshid.server_credentials(object())  # type: ignore[arg-type]
