"""JWT-SVIDs end to end (issue #16): a real meshid CA signs them, a workload's ``IssuerSource``
fetches them, ``jwt_call_credentials`` sends them over a TLS channel without a client
certificate (what is left after a hop that terminates TLS), and a greeter's interceptor, whose
bundles come from its own ``IssuerSource``, validates them against the CA's published JWT keys.
A JWT key rotation at the CA reaches the greeter before the new key signs.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshid
from meshid.ca.client import AdminClient, IssuerClient
from meshid.ca.datadir import activate_rotation, init_data_dir, load_jwt_keys, prepare_jwt_rotation
from meshid.ca.server import CaServer
from meshid.examples import greeter_pb2, greeter_pb2_grpc
from support import FRONTEND_ID, INTRUDER_ID, SAY_HELLO, SERVER_ID, TD, eventually, sync_server, tls_channel

pytestmark = pytest.mark.timeout(90)

POLICY = {
    "name": "greeter",
    "identity_sources": ["jwt"],
    "allow": [{"name": "frontend", "methods": [SAY_HELLO], "spiffe_ids": [FRONTEND_ID]}],
}


class Greeter(greeter_pb2_grpc.GreeterServicer):
    def SayHello(self, request: Any, context: Any) -> Any:
        identity = meshid.peer_identity(context)
        kid = identity.jwt_svid.key_id if identity.jwt_svid is not None else None
        return greeter_pb2.HelloReply(message=str(kid), caller=f"{identity.source} {identity.spiffe_id}")


@dataclass
class World:
    folder: Path
    address: str
    sources: dict[str, meshid.IssuerSource]
    port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("jwt-e2e") / "ca"
    init_data_dir(folder, TD, max_ttl=datetime.timedelta(hours=1))
    ca = CaServer(folder, "127.0.0.1:0")
    address = f"127.0.0.1:{ca.start()}"
    sources: dict[str, meshid.IssuerSource] = {}
    try:
        with AdminClient(address, folder) as admin:
            for sid in (SERVER_ID, FRONTEND_ID, INTRUDER_ID):
                admin.create_entry(sid)
                token = str(admin.create_token(sid).token)
                sources[sid] = meshid.IssuerSource(
                    address, folder / "bundle.pem", join_token=token, svid_dir=folder.parent / sid.rsplit("/", 1)[1],
                    refresh_interval=0.2, wait=30,
                ).start()  # fmt: skip
        server_source = sources[SERVER_ID]
        interceptor = meshid.AuthorizationInterceptor(
            meshid.AuthorizationPolicy.from_dict(POLICY), source=server_source
        )
        with sync_server(server_source, interceptor, servicer=Greeter(), require_client_certificate=False) as port:
            yield World(folder, address, sources, port)
    finally:
        for source in sources.values():
            source.close()
        ca.stop(None)


def _say_hello(world: World, caller: str, source: meshid.IssuerSource | None = None) -> tuple[str, str, str]:
    """SayHello over TLS without a client certificate, with a JWT-SVID of ``caller`` from its
    source (or ``source``); (code, caller, kid of the token's key)."""
    source = source or world.sources[caller]
    call_creds = meshid.jwt_call_credentials(source, audience=SERVER_ID)
    with tls_channel(world.port, source.get_bundles(), call_creds) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        try:
            reply = stub.SayHello(greeter_pb2.HelloRequest(name="e2e"), timeout=10)
        except grpc.RpcError as err:
            return err.code().name, err.details() or "", ""
    return "OK", reply.caller, reply.message


def test_a_ca_issued_jwt_svid_is_accepted_and_a_caller_the_policy_names_not_is_denied(world: World) -> None:
    assert _say_hello(world, FRONTEND_ID)[:2] == ("OK", f"jwt {FRONTEND_ID}")
    code, details, _ = _say_hello(world, INTRUDER_ID)
    assert code == "PERMISSION_DENIED" and INTRUDER_ID in details, (code, details)


def test_a_jwt_key_rotation_reaches_the_server_before_the_new_key_signs(world: World) -> None:
    keys = load_jwt_keys(world.folder)
    assert keys is not None
    old_kid = keys.signing.kid
    assert _say_hello(world, FRONTEND_ID) == ("OK", f"jwt {FRONTEND_ID}", old_kid)

    prepared = prepare_jwt_rotation(world.folder)
    server_source = world.sources[SERVER_ID]
    td = meshid.TrustDomain.parse(TD)
    eventually(
        lambda: prepared.kid in server_source.get_bundles()[td].jwt_authorities, 20, "the greeter to see the new key"
    )
    activate_rotation(world.folder, grace=datetime.timedelta(0))
    frontend = world.sources[FRONTEND_ID]
    with IssuerClient(world.address, frontend.get_svid(), frontend.get_bundles()) as client:
        eventually(lambda: client.new_jwt_svid(["probe"]).key_id == prepared.kid, 20, "the CA to sign with the new key")
    # A source caches a token per audience until half its lifetime: a new one (from the saved
    # SVID, no join token) fetches a token of the new key.
    again = meshid.IssuerSource(world.address, world.folder / "bundle.pem", svid_dir=world.folder.parent / "frontend")
    try:
        assert _say_hello(world, FRONTEND_ID, again.start()) == ("OK", f"jwt {FRONTEND_ID}", prepared.kid)
    finally:
        again.close()
    # The cached token of the old key still validates: that key stays published until it has expired.
    assert _say_hello(world, FRONTEND_ID) == ("OK", f"jwt {FRONTEND_ID}", old_kid)
