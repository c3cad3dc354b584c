"""The Workload API's bundle streams through a CA key rotation, to several clients at once
(issue #19, item 5).

A real CA and an :class:`IssuerSource` on the test's ManualClock (tests/agent/conftest.py: the
renewals and bundle refreshes that carry the rotation are stepped); a
:class:`WorkloadApiServer` over that source; and six clients following it at the same time in
real time: three :class:`meshid.WorkloadApiSource`, py-spiffe's ``X509Source`` (both on
``FetchX509SVID``) and two raw ``FetchX509Bundles`` streams read off the wire. Every one of them
must see the bundle go from the old root, to old and new, to the new root alone, in that
order, and the SVID clients must end up holding an SVID the new CA signed.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import meshid
from conftest import CLOCKED_LIFETIME, RunningCa, step
from meshid.agent import IssuerSource
from meshid.ca.datadir import activate_rotation, prepare_rotation, retire_due_roots
from meshid.clock import ManualClock
from meshid.workloadapi import WorkloadApiServer, WorkloadApiSource
from support import eventually

pytestmark = pytest.mark.timeout(120)

TD = meshid.TrustDomain.parse("example.org")
WORKLOAD = "spiffe://example.org/ns/prod/sa/batch"
HEADER = (("workload.spiffe.io", "true"),)
FETCH_X509_BUNDLES = "/SpiffeWorkloadAPI/FetchX509Bundles"

Roots = frozenset[bytes]  # a bundle as a client saw it: its roots, DER


# -- the wire, read as an outside client would --------------------------------------------------


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The length-delimited fields of a protobuf message, (number, payload); nothing else is expected."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        assert key & 7 == 2, f"wire type {key & 7} of field {key >> 3}: X509BundlesResponse has none"
        size, at = _varint(data, at)
        yield key >> 3, data[at : at + size]
        at += size


def _split_der(data: bytes) -> Roots:
    """Concatenated DER certificates (each a SEQUENCE with a short or long length), checked by parsing."""
    roots, at = [], 0
    while at < len(data):
        assert data[at] == 0x30, "not a DER SEQUENCE"
        size, head = data[at + 1], 2
        if size & 0x80:
            count = size & 0x7F
            size, head = int.from_bytes(data[at + 2 : at + 2 + count], "big"), 2 + count
        der = data[at : at + head + size]
        x509.load_der_x509_certificate(der)
        roots.append(der)
        at += head + size
    return frozenset(roots)


def bundles_response(raw: bytes) -> dict[str, Roots]:
    """``X509BundlesResponse { repeated bytes crl = 1; map<string, bytes> bundles = 2; }``
    (SPIFFE's workload.proto): trust domain ID -> roots. meshid sends no CRLs."""
    out = {}
    for number, entry in _fields(raw):
        assert number == 2, f"field {number}: only bundles expected"
        parts = dict(_fields(entry))  # a map entry: key = 1, value = 2
        out[parts[1].decode()] = _split_der(parts.get(2, b""))
    return out


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- the clients ----------------------------------------------------------------------------------


class Client:
    """What one client saw of example.org's bundle, in order, each change once; and its SVID."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[Roots] = []
        self.messages = 0  # raw streams: responses received (each should be a change)
        self._lock = threading.Lock()
        self.svid: Callable[[], x509.Certificate] | None = None

    def saw(self, roots: Roots) -> None:
        with self._lock:
            if not self.seen or self.seen[-1] != roots:
                self.seen.append(roots)

    def holds(self, roots: Roots) -> bool:
        with self._lock:
            return bool(self.seen) and self.seen[-1] == roots


def follow_meshid(socket: str, name: str) -> tuple[Client, WorkloadApiSource]:
    client, source = Client(name), WorkloadApiSource(f"unix://{socket}")
    record = lambda: client.saw(frozenset(der(r) for r in source.get_bundles()[TD].roots))  # noqa: E731
    source.subscribe(record)
    source.start()
    record()
    client.svid = lambda: source.get_svid().leaf
    return client, source


def follow_py_spiffe(socket: str) -> tuple[Client, spiffe.X509Source]:
    client = Client("py-spiffe X509Source")
    source = spiffe.X509Source(socket_path=f"unix://{socket}", timeout_in_seconds=10)

    def record() -> None:
        bundle = source.get_bundle_for_trust_domain(spiffe.TrustDomain(TD.name))
        assert bundle is not None
        client.saw(frozenset(der(r) for r in bundle.x509_authorities))

    source.subscribe_for_updates(record)
    record()
    client.svid = lambda: source.get_x509_context().default_svid.leaf
    return client, source


def follow_raw(channel: grpc.Channel, name: str) -> tuple[Client, grpc.Call, threading.Thread]:
    """A FetchX509Bundles stream read in a thread of its own until it is cancelled."""
    client = Client(name)
    stream = channel.unary_stream(FETCH_X509_BUNDLES, lambda _: b"", lambda raw: raw)(b"", metadata=HEADER)

    def read() -> None:
        try:
            for raw in stream:
                client.messages += 1
                client.saw(bundles_response(raw)[str(TD.id())])
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                client.saw(frozenset({f"stream ended: {err.code().name}: {err.details()}".encode()}))

    reader = threading.Thread(target=read, name=f"test-{name}")
    reader.start()
    return client, stream, reader


# -- the rotation ---------------------------------------------------------------------------------


def _step_until(clock: ManualClock, done: Callable[[], bool], what: str, limit: int = 40) -> None:
    """Step the issuer source's schedule until ``done()``."""
    for _ in range(limit):
        if done():
            return
        step(clock, waiters=1)
    raise AssertionError(f"not within {limit} steps ({clock.monotonic():.0f} s of clock): {what}")


def test_every_client_follows_the_bundle_through_a_ca_rotation(tmp_path: Path, clock: ManualClock) -> None:
    ca = RunningCa(tmp_path / "ca", max_ttl=CLOCKED_LIFETIME, clock=clock)
    socket = str(tmp_path / "api.sock")
    closers: list[Callable[[], object]] = [ca.stop]
    try:
        issuer = IssuerSource(
            ca.address,
            ca.bundle_file,
            join_token=ca.enroll(WORKLOAD, CLOCKED_LIFETIME),
            refresh_interval=5,
            clock=clock,
        ).start()
        closers.append(issuer.close)
        server = WorkloadApiServer(issuer, socket).start()
        closers.append(server.stop)
        [old_root] = meshid.TrustBundle.load(TD, ca.bundle_file).roots

        clients: list[Client] = []
        for i in range(3):
            client, source = follow_meshid(socket, f"WorkloadApiSource {i}")
            clients.append(client)
            closers.append(source.close)
        client, py_source = follow_py_spiffe(socket)
        clients.append(client)
        closers.append(py_source.close)
        channel = grpc.insecure_channel(f"unix:{socket}")
        closers.append(channel.close)
        raw = []
        for i in range(2):
            client, stream, reader = follow_raw(channel, f"FetchX509Bundles stream {i}")
            clients.append(client)
            raw.append(client)
            closers += [reader.join, stream.cancel]

        def every_client_holds(roots: Roots, what: str) -> None:
            eventually(
                lambda: all(c.holds(roots) for c in clients),
                15,
                f"every client to hold {what}: " + ", ".join(f"{c.name} saw {len(c.seen)}" for c in clients),
            )

        before = frozenset({der(old_root)})
        every_client_holds(before, "the old root")

        # Prepare: a new root joins the bundle; the CA serves it (on its 0.5 s poll of the data
        # folder), the issuer source fetches it, the server streams it to every client.
        new_root = prepare_rotation(ca.folder)
        both = frozenset({der(old_root), der(new_root)})
        eventually(lambda: len(ca.server.service.bundle().roots) == 2, 10, "the CA to serve the two-root bundle")
        _step_until(clock, lambda: len(issuer.get_bundles()[TD].roots) == 2, "the issuer source to fetch two roots")
        every_client_holds(both, "the old and the new root")

        # Activate: the new CA signs; the next renewal brings every SVID client an SVID from it.
        activate_rotation(ca.folder, grace=datetime.timedelta(seconds=1))
        eventually(lambda: ca.server.service.authority.certificate == new_root, 10, "the CA to sign with the new CA")
        _step_until(clock, lambda: issuer.get_svid().leaf.issuer == new_root.subject, "a renewal by the new CA")

        def signed_by_new_ca(client: Client) -> bool:
            assert client.svid is not None
            leaf = client.svid()
            if leaf.issuer != new_root.subject:
                return False
            leaf.verify_directly_issued_by(new_root)  # the new key signed it, not only a name
            return True

        svid_clients = [c for c in clients if c.svid is not None]
        eventually(
            lambda: all(signed_by_new_ca(c) for c in svid_clients), 15, "every SVID client to hold the new CA's SVID"
        )

        # Retire: once the max TTL and the grace have passed on the CA's clock, the old root
        # leaves the bundle (`ca serve` checks on the real clock; the test does it on the CA's).
        _step_until(
            clock,
            lambda: (
                bool(retire_due_roots(ca.folder, clock.now()))
                or len(meshid.TrustBundle.load(TD, ca.bundle_file).roots) == 1
            ),
            "the old root's retirement to come due",
        )
        eventually(lambda: len(ca.server.service.bundle().roots) == 1, 10, "the CA to serve the new root alone")
        after = frozenset({der(new_root)})
        _step_until(
            clock, lambda: issuer.get_bundles()[TD].roots == (new_root,), "the issuer source to drop the old root"
        )
        every_client_holds(after, "the new root alone")
        assert all(signed_by_new_ca(c) for c in svid_clients)  # and still, with the old root gone
    finally:
        for close in reversed(closers):
            close()

    print(
        "\n[workload api bundles] "
        + "; ".join(f"{c.name}: {[len(r) for r in c.seen]} roots" + (f", {c.messages} messages" if c in raw else "")
                    for c in clients)
        + f"; {clock.monotonic():.0f} s of clock"
    )  # fmt: skip
    for client in clients:
        assert client.seen == [before, both, after], client.name
    for client in raw:  # FetchX509Bundles sends a bundle change only, never an SVID's renewal
        assert client.messages == 3, client.name
