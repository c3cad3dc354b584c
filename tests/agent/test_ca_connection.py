"""An IssuerSource keeps one connection to its CA (issue #14): renewals and refreshes share it
until the SVID changes; a refresh is one GetTrustUpdates call that carries only what changed."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from collections.abc import Iterator

import pytest

import meshid
from agent.conftest import RunningCa, step
from meshid.ca.client import AdminClient, IssuerClient, fetch_svid

pytestmark = pytest.mark.timeout(120)
WORKLOAD = "spiffe://example.org/ns/prod/sa/steady"


class CountingProxy:
    """A TCP forwarder to ``target`` on loopback that counts the connections made through it."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="test-proxy", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pipe, args=(a, b), name="test-proxy-pipe", daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            s.close()
        self._accepting.join(10)
        for t in self._threads:
            t.join(10)


@pytest.fixture
def proxy(clocked_ca: RunningCa) -> Iterator[CountingProxy]:
    p = CountingProxy(clocked_ca.address)
    try:
        yield p
    finally:
        p.close()


def test_refreshes_and_renewals_share_one_connection_per_svid(clocked_ca, clock, proxy) -> None:
    token = clocked_ca.enroll(WORKLOAD, datetime.timedelta(seconds=40))
    source = meshid.IssuerSource(
        proxy.address, clocked_ca.bundle_file, join_token=token, clock=clock, refresh_interval=1.0
    ).start()
    steps = 0
    try:
        first = source.get_svid()
        while source.get_svid() is first:  # refreshes every second (at most), until the renewal
            step(clock)
            steps += 1
        second = source.get_svid()
        for _ in range(5):  # refreshes with the new SVID
            step(clock)
        assert source.get_svid() is second
    finally:
        source.close()
    assert steps >= 5, "several refreshes came before the renewal"
    # The first issuance's anonymous connection, one with the first SVID (every refresh, then the
    # renewal), one with the second: never one per refresh (it used to be two).
    assert proxy.connections == 3


def test_trust_updates_send_only_what_changed(clocked_ca, clock) -> None:
    token = clocked_ca.enroll(WORKLOAD, datetime.timedelta(minutes=5))
    svid, bundle = fetch_svid(clocked_ca.address, clocked_ca.bundle_file, token)
    with IssuerClient(clocked_ca.address, svid, meshid.BundleSet.of(bundle)) as client:
        everything = client.trust_updates(None, None)
        assert everything.bundle is not None and everything.bundle.roots == bundle.roots
        assert everything.crl is not None
        crl = meshid.RevocationList.from_der(*everything.crl, meshid.BundleSet.of(bundle), now=clock.now())
        nothing = client.trust_updates(everything.bundle.sequence, crl.number)
        assert (nothing.bundle, nothing.crl) == (None, None)
        with AdminClient(clocked_ca.address, clocked_ca.folder) as admin:
            other = clocked_ca.enroll("spiffe://example.org/ns/prod/sa/other", datetime.timedelta(minutes=5))
            revoked, _ = fetch_svid(clocked_ca.address, clocked_ca.bundle_file, other)
            admin.revoke(serial=format(revoked.serial, "x"))
        after = client.trust_updates(everything.bundle.sequence, crl.number)
        assert after.bundle is None and after.crl is not None  # a new CRL, the same bundle
        newer = meshid.RevocationList.from_der(*after.crl, meshid.BundleSet.of(bundle), now=clock.now())
        assert newer.number > crl.number and revoked.serial in newer.serials


def test_trust_updates_need_an_svid(clocked_ca) -> None:
    """GetTrustUpdates is not among the CA's open methods: the anonymous bootstrap certificate
    gets no answer."""
    from meshid.ca.server import OPEN_METHODS

    assert "/meshid.v1.Issuer/GetTrustUpdates" not in OPEN_METHODS
