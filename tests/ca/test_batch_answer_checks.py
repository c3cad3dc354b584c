"""A node agent checks every SVID of a batch answer (issue #12): the answer's first leaf gets full
path validation, each further leaf is still checked against the issuing CA of that path (its
signature, validity and the end-entity policy), its SPIFFE ID against the request, its key
against the agent's. Shown with a real CA behind a server that holds a real CA SVID and alters
the CA's answers on their way to the agent (what a compromised or buggy CA replica could send).
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

import meshid

# Private: the server below speaks the Agent service's wire messages to alter them.
from meshid._proto import agent_pb2_grpc
from meshid.ca import Authority, generate_key
from meshid.ca.client import AgentClient
from meshid.ca.datadir import load_authority
from meshid.errors import InvalidSvidError, VerificationError
from nodeagents import CA_ID, TD, AgentCa, agent_id

pytestmark = pytest.mark.timeout(120)

NODE = agent_id("node-1")
WEB = f"spiffe://{TD}/ns/prod/sa/web"
DB = f"spiffe://{TD}/ns/prod/sa/db"
_DER = serialization.Encoding.DER

#: Alters the answer: (the real answer, the keys the agent asked with, the CA's own authority).
Alteration = Callable[[Any, list[Any], Authority], None]


class AlteringAgent(agent_pb2_grpc.AgentServicer):
    """Forwards BatchNewX509Svid to the real CA with the agent's own SVID, alters the answer."""

    def __init__(self, ca: AgentCa, agent: meshid.X509Svid, authority: Authority, alter: Alteration) -> None:
        self._ca, self._agent, self._authority, self._alter = ca, agent, authority, alter
        self.keys: list[Any] = []

    def BatchNewX509Svid(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._ca.channel(self._agent) as channel:
            answer = agent_pb2_grpc.AgentStub(channel).BatchNewX509Svid(request, timeout=30)  # type: ignore[no-untyped-call]
        self._alter(answer, self.keys, self._authority)
        return answer


@contextlib.contextmanager
def altering_server(ca: AgentCa, agent: meshid.X509Svid, alter: Alteration) -> Iterator[tuple[str, AlteringAgent]]:
    """A server on loopback that proves the CA's own SPIFFE ID (an SVID the CA's key signed)."""
    authority, _ = load_authority(ca.folder)
    servicer = AlteringAgent(ca, agent, authority, alter)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    source = meshid.StaticSource(authority.issue_svid(CA_ID), ca.bundles)
    port = server.add_secure_port("127.0.0.1:0", meshid.server_credentials(source))
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None).wait()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path_factory.mktemp("answers") / "ca")
    with running.admin() as admin:
        for sid, uid in ((WEB, 1001), (DB, 1002)):
            admin.create_entry(sid, parent_id=NODE, selectors=[f"unix:uid:{uid}"])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def node(ca: AgentCa) -> meshid.X509Svid:
    return ca.attest("node-1").svid


def second_leaf(make: Callable[[Authority, Any], tuple[Any, ...]]) -> Alteration:
    """Replace the second result's leaf with ``make(authority, key the agent asked with)``'s leaf."""

    def alter(answer: Any, keys: list[Any], authority: Authority) -> None:
        answer.results[1].certificate = make(authority, keys[1])[0].public_bytes(_DER)

    return alter


def _sid(text: str) -> meshid.SpiffeId:
    return meshid.SpiffeId.parse(text)


NOW = datetime.datetime.now(datetime.UTC)
ALTERED: dict[str, tuple[Alteration, type[Exception], str]] = {
    "signed by another CA of the trust domain": (
        second_leaf(lambda _, key: Authority.create_root(TD).sign_svid(_sid(DB), key.public_key())),
        VerificationError,
        rf"^peer certificate {DB}: chain does not verify against its trust domain's bundle",
    ),
    "for another SPIFFE ID than asked": (
        second_leaf(lambda real, key: real.sign_svid(_sid(WEB), key.public_key())),
        InvalidSvidError,
        rf"^batch: the CA answered an SVID for {WEB} to a request for {DB}$",
    ),
    "over another key than the agent's": (
        second_leaf(lambda real, _: real.sign_svid(_sid(DB), generate_key().public_key())),
        InvalidSvidError,
        r"^X509-SVID: the private key does not match the leaf certificate$",
    ),
    "expired": (
        second_leaf(
            lambda real, key: real.sign_svid(
                _sid(DB), key.public_key(), ttl=datetime.timedelta(minutes=5), now=NOW - datetime.timedelta(hours=1)
            )
        ),
        VerificationError,
        rf"^peer certificate {DB}: chain does not verify .*: the certificate expired at ",
    ),
    "a CA certificate as leaf": (
        second_leaf(lambda real, _: (real.certificate,)),
        InvalidSvidError,
        r"^X509-SVID: leaf SPIFFE ID spiffe://example.org has no path",
    ),
}


def ask(address: str, servicer: AlteringAgent, node: meshid.X509Svid, ca: AgentCa) -> list[str]:
    keys = [generate_key(), generate_key()]
    servicer.keys[:] = keys
    client = AgentClient(address, node, ca.bundles)
    try:
        return [r.code for r in client.batch_new_svids([(WEB, keys[0]), (DB, keys[1])])]
    finally:
        client.close()


def test_an_unaltered_answer_through_the_same_server_is_accepted(ca: AgentCa, node: meshid.X509Svid) -> None:
    with altering_server(ca, node, lambda *_: None) as (address, servicer):
        assert ask(address, servicer, node, ca) == ["OK", "OK"]


@pytest.mark.parametrize("case", sorted(ALTERED))
def test_a_later_leaf_of_an_answer_is_checked_on_its_own(ca: AgentCa, node: meshid.X509Svid, case: str) -> None:
    alter, error, message = ALTERED[case]
    with altering_server(ca, node, alter) as (address, servicer), pytest.raises(error, match=message):
        ask(address, servicer, node, ca)


def test_an_answer_whose_chain_is_not_the_bundles_is_refused_at_its_first_leaf(
    ca: AgentCa, node: meshid.X509Svid
) -> None:
    other = Authority.create_root(TD)

    def alter(answer: Any, keys: list[Any], authority: Authority) -> None:
        for result, key in zip(answer.results, keys, strict=True):
            result.certificate = other.sign_svid(_sid(result.spiffe_id), key.public_key())[0].public_bytes(_DER)
        del answer.intermediates[:]

    refused = pytest.raises(VerificationError, match=rf"^peer certificate {WEB}: chain does not verify")
    with altering_server(ca, node, alter) as (address, servicer), refused:
        ask(address, servicer, node, ca)
