"""A channel without ``server_id`` accepts a server by the DNS name grpc checks against the target,
and any CA can write any DNS name: only the client's own trust domain's CAs may prove one. A
federated partner's CA that writes ``localhost`` into an SVID must not pass as a server of ours;
with its ``server_id`` the partner's server is reached as itself. Real servers, real mTLS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

import meshid
import meshid.aio
from meshid.ca import Authority

pytestmark = pytest.mark.timeout(60)

METHOD = "/t.T/Who"


@pytest.fixture(scope="module")
def federation(ca: Authority, other_ca: Authority) -> meshid.BundleSet:
    return meshid.BundleSet.of(*(meshid.TrustBundle(a.trust_domain, a.roots) for a in (ca, other_ca)))


def _serving(svid: meshid.X509Svid, bundles: meshid.BundleSet) -> Iterator[int]:
    name = str(svid.spiffe_id).encode()

    class Who(grpc.GenericRpcHandler):  # type: ignore[type-arg]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
            return grpc.unary_unary_rpc_method_handler(lambda request, context: name)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([Who()])
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(meshid.StaticSource(svid, bundles)))
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()


@pytest.fixture(scope="module")
def partner_says_localhost(other_ca: Authority, federation: meshid.BundleSet) -> Iterator[int]:
    yield from _serving(other_ca.issue_svid("spiffe://other.org/ns/prod/sa/evil", dns_names=["localhost"]), federation)


@pytest.fixture(scope="module")
def ours_says_localhost(ca: Authority, federation: meshid.BundleSet) -> Iterator[int]:
    yield from _serving(ca.issue_svid("spiffe://example.org/ns/prod/sa/web", dns_names=["localhost"]), federation)


def _who(port: int, source: meshid.StaticSource, server_id: str | None) -> str:
    with meshid.secure_channel(f"localhost:{port}", source, server_id=server_id) as channel:
        try:
            return channel.unary_unary(METHOD)(b"", timeout=10).decode()
        except grpc.RpcError as err:
            return err.code().name


async def _who_aio(port: int, source: meshid.StaticSource, server_id: str | None) -> str:
    async with meshid.aio.secure_channel(f"localhost:{port}", source, server_id=server_id) as channel:
        try:
            return (await channel.unary_unary(METHOD)(b"", timeout=10)).decode()
        except grpc.RpcError as err:
            return err.code().name  # type: ignore[no-any-return]


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_without_server_id_only_the_clients_own_trust_domain_proves_a_dns_name(
    ca, federation, partner_says_localhost, ours_says_localhost, flavour
) -> None:
    client = meshid.StaticSource(ca.issue_svid("spiffe://example.org/ns/prod/sa/client"), federation)

    def who(port: int, server_id: str | None = None) -> str:
        return _who(port, client, server_id) if flavour == "sync" else asyncio.run(_who_aio(port, client, server_id))

    assert who(ours_says_localhost) == "spiffe://example.org/ns/prod/sa/web"  # the control
    assert who(partner_says_localhost) == "UNAVAILABLE"  # the partner's CA may not vouch for localhost to us
    # the partner's server, asked for by its identity, is reached as itself
    assert who(partner_says_localhost, "spiffe://other.org/ns/prod/sa/evil") == "spiffe://other.org/ns/prod/sa/evil"
    assert who(partner_says_localhost, "example.org") == "UNAVAILABLE"
