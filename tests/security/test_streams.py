"""Issue #10, item 5: a streaming call outlives neither its peer's revocation nor its expiry.

A real meshid CA issues the SVIDs and revokes one; a real greeter (sync, and grpc.aio) reads
the CA's CRL through :class:`meshid.CrlWatcher`. A bidi stream opened before the revocation
(or before the peer's certificate expires) ends with UNAUTHENTICATED at its next message.
"""

from __future__ import annotations

import asyncio
import datetime
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshid
import meshid.aio
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import init_data_dir, load_authority
from meshid.ca.server import CaServer
from support import FRONTEND_ID, SERVER_ID, SERVICE, aio_server, call, eventually, hello, stub, sync_server

pytestmark = pytest.mark.timeout(90)

TD = "example.org"
CHATTY_ID = f"spiffe://{TD}/ns/prod/sa/chatty"  # revoked while its stream is open
AIO_CHATTY_ID = f"spiffe://{TD}/ns/prod/sa/aio-chatty"
CONNECTED_ID = f"spiffe://{TD}/ns/prod/sa/connected"  # revoked while connected, seen by a started CrlWatcher
ISSUED_ID = f"spiffe://{TD}/ns/prod/sa/issued"  # revoked while connected, seen by the server's IssuerSource
SERVER2_ID = f"spiffe://{TD}/ns/prod/sa/greeter-on-an-issuer-source"
CALLERS = [FRONTEND_ID, CHATTY_ID, AIO_CHATTY_ID, CONNECTED_ID, ISSUED_ID]
POLICY = {"allow": [{"name": "all", "methods": [f"/{SERVICE}/*"], "spiffe_ids": CALLERS}]}


@dataclass
class World:
    ca: str
    folder: Path
    svids: dict[str, meshid.X509Svid]
    server_source: meshid.StaticSource
    watcher: meshid.CrlWatcher
    bundles: meshid.BundleSet


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("streams") / "ca"
    init_data_dir(folder, TD, max_ttl=datetime.timedelta(hours=1))
    server = CaServer(folder, "127.0.0.1:0")
    address = f"127.0.0.1:{server.start()}"
    try:
        bundle_file = folder / "bundle.pem"
        svids = {}
        with AdminClient(address, folder) as admin:
            for sid in (SERVER_ID, *CALLERS):
                admin.create_entry(sid)
                svids[sid], _ = fetch_svid(address, bundle_file, str(admin.create_token(sid).token))
        bundles = meshid.BundleSet.of(meshid.TrustBundle.load(TD, bundle_file))
        source = meshid.StaticSource(svids[SERVER_ID], bundles)
        watcher = meshid.CrlWatcher(address, source)
        assert watcher.refresh(), watcher.last_error
        yield World(address, folder, svids, source, watcher, bundles)
    finally:
        server.stop(None)


def _interceptor(w: World, cls: Any = meshid.AuthorizationInterceptor) -> Any:
    interceptor = cls(meshid.AuthorizationPolicy.from_dict(POLICY), source=w.server_source)
    interceptor.set_revocation_check(w.watcher.is_revoked)
    return interceptor


def _revoke(w: World, spiffe_id: str) -> None:
    with AdminClient(w.ca, w.folder) as admin:
        assert admin.revoke(serial=f"{w.svids[spiffe_id].serial:x}")
    assert w.watcher.refresh(), w.watcher.last_error


class _Requests:
    """A request stream the test feeds one message at a time."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def send(self, name: str) -> None:
        self._queue.put(hello(name))

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get(timeout=30)) is not None:
            yield item


def _chat_until_refused(port: int, svid: meshid.X509Svid, w: World, between: Any) -> tuple[list[str], str, str]:
    """Open Chat, exchange one message, run ``between``, send another; return what came back and how it ended."""
    requests = _Requests()
    source = meshid.StaticSource(svid, w.bundles)
    replies: list[str] = []
    with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
        responses = stub(channel).Chat(iter(requests), timeout=30)
        try:
            requests.send("before")
            replies.append(next(responses).message)
            between()
            requests.send("after")
            replies.append(next(responses).message)
            requests.close()
            replies.extend(r.message for r in responses)
        except grpc.RpcError as err:
            return replies, err.code().name, err.details() or ""
        finally:
            requests.close()
    return replies, "OK", ""


def test_revocation_ends_an_open_sync_stream(world: World) -> None:
    with sync_server(world.server_source, _interceptor(world)) as port:
        # positive control: an unrevoked peer's stream carries on across the same steps
        replies, code, _ = _chat_until_refused(port, world.svids[FRONTEND_ID], world, lambda: None)
        assert (replies, code) == (["hello before", "hello after"], "OK")
        replies, code, details = _chat_until_refused(
            port, world.svids[CHATTY_ID], world, lambda: _revoke(world, CHATTY_ID)
        )
    assert replies == ["hello before"]
    assert code == "UNAUTHENTICATED", details
    assert "was revoked during the call" in details


def test_expiry_ends_an_open_sync_stream(world: World) -> None:
    authority, _ = load_authority(world.folder)
    # NotAfter falls on a whole second: give it 3 s, and wait for the moment itself, not a guess.
    short = authority.issue_svid(FRONTEND_ID, ttl=datetime.timedelta(seconds=3))

    def until_expired() -> None:
        while datetime.datetime.now(datetime.UTC) <= short.not_after + datetime.timedelta(milliseconds=50):
            time.sleep(0.05)

    with sync_server(world.server_source, _interceptor(world)) as port:
        replies, code, details = _chat_until_refused(port, short, world, until_expired)
    assert replies == ["hello before"]
    assert code == "UNAUTHENTICATED", details
    assert "during the call" in details and "expired" in details


def test_revocation_ends_an_open_aio_stream(world: World) -> None:
    async def scenario() -> tuple[list[str], str, str]:
        interceptor = _interceptor(world, meshid.aio.AuthorizationInterceptor)
        async with aio_server(world.server_source, interceptor) as port:
            source = meshid.StaticSource(world.svids[AIO_CHATTY_ID], world.bundles)
            async with meshid.aio.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                call = stub(channel).Chat(timeout=30)
                replies = []
                try:
                    await call.write(hello("before"))
                    replies.append((await call.read()).message)
                    await asyncio.to_thread(_revoke, world, AIO_CHATTY_ID)
                    await call.write(hello("after"))
                    reply = await call.read()
                    if reply is not grpc.aio.EOF:
                        replies.append(reply.message)
                    await call.done_writing()
                    while (reply := await call.read()) is not grpc.aio.EOF:
                        replies.append(reply.message)
                except grpc.aio.AioRpcError as err:
                    return replies, err.code().name, err.details() or ""
                return replies, (await call.code()).name, await call.details() or ""

    replies, code, details = asyncio.run(scenario())
    assert replies == ["hello before"]
    assert code == "UNAUTHENTICATED", details
    assert "was revoked during the call" in details



def test_expired_certificate_is_refused_on_a_long_lived_connection(world: World) -> None:
    authority, _ = load_authority(world.folder)
    short = authority.issue_svid(FRONTEND_ID, ttl=datetime.timedelta(seconds=3))
    with sync_server(world.server_source, _interceptor(world)) as port:
        source = meshid.StaticSource(short, world.bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
            assert call(channel) == ("OK", FRONTEND_ID)
            eventually(
                lambda: datetime.datetime.now(datetime.UTC) > short.not_after + datetime.timedelta(milliseconds=50),
                10,
                "the client certificate to expire",
            )
            # the same channel, so the same TLS connection: the handshake is not redone
            code, details = call(channel)
    assert code == "UNAUTHENTICATED", details
    assert "expired" in details


def test_connected_peer_is_refused_once_a_started_crl_watcher_sees_its_revocation(world: World) -> None:
    watcher = meshid.CrlWatcher(world.ca, world.server_source, interval=0.2).start()
    try:
        interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=world.server_source)
        interceptor.set_revocation_check(watcher.is_revoked)
        with sync_server(world.server_source, interceptor) as port:
            source = meshid.StaticSource(world.svids[CONNECTED_ID], world.bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
                assert call(channel) == ("OK", CONNECTED_ID)
                with AdminClient(world.ca, world.folder) as admin:
                    admin.revoke(serial=f"{world.svids[CONNECTED_ID].serial:x}")
                code, details = eventually(lambda: (r := call(channel))[0] != "OK" and r, 10, "the revocation to take effect")
    finally:
        watcher.close()
    assert code == "UNAUTHENTICATED" and "is revoked" in details, (code, details)


def test_connected_peer_is_refused_once_the_servers_issuer_source_sees_its_revocation(world: World) -> None:
    with AdminClient(world.ca, world.folder) as admin:
        admin.create_entry(SERVER2_ID, ttl=datetime.timedelta(seconds=4))
        token = str(admin.create_token(SERVER2_ID).token)
    with meshid.IssuerSource(world.ca, world.folder / "bundle.pem", join_token=token, refresh_interval=0.5) as server_source:
        interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server_source)
        interceptor.set_revocation_check(server_source.is_revoked)
        with sync_server(server_source, interceptor) as port:
            source = meshid.StaticSource(world.svids[ISSUED_ID], world.bundles)
            with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER2_ID) as channel:
                assert call(channel) == ("OK", ISSUED_ID)
                with AdminClient(world.ca, world.folder) as admin:
                    admin.revoke(serial=f"{world.svids[ISSUED_ID].serial:x}")
                code, details = eventually(lambda: (r := call(channel))[0] != "OK" and r, 10, "the revocation to take effect")
    assert code == "UNAUTHENTICATED" and "is revoked" in details, (code, details)
