"""Loops that must not spin on an odd answer: every retry, reconnect and re-attestation waits.

Each test holds an input steady that once turned a loop into a busy one (an SVID expired by the
local clock on arrival, a stream that ends after one answer) and counts what the loop does."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

import meshid
from conftest import CLOCKED_LIFETIME
from meshid.agent import IssuerSource, NodeAgent
from meshid.ca import Authority
from meshid.clock import ManualClock
from meshid.workloadapi import WorkloadApiServer, WorkloadApiSource
from nodeagents import AgentCa, host_certificate, pem_file

pytestmark = pytest.mark.timeout(60)
WORKLOAD = "spiffe://example.org/ns/prod/sa/batch"


def test_an_agent_svid_expired_by_the_local_clock_is_not_attested_again_in_a_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's clock runs 70 s ahead of the CA's (real time), so the agent's 40 s SVID arrives
    expired by it, and an agent that can attest again (x509pop) must. It attests once more at the
    most every half second of its clock (which this test holds still), not as fast as the CA
    answers, forever."""
    hosts = Authority.create_root("hosts.example")
    ca = AgentCa(tmp_path / "ca", hosts=hosts, max_ttl=CLOCKED_LIFETIME)  # the CA on real time
    cert, key = host_certificate(hosts, "node-1")
    pem_file(tmp_path / "host.pem", cert)
    (tmp_path / "host.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    clock = ManualClock(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=70))
    agent = NodeAgent(
        ca.address,
        ca.bundle_file,
        tmp_path / "agent",
        x509pop_cert=tmp_path / "host.pem",
        x509pop_key=tmp_path / "host.key",
        clock=clock,
    )
    caplog.set_level(logging.INFO, logger="meshid.agent")
    try:
        with agent:
            assert agent.state.expires_at is not None and agent.state.expires_at < clock.now()
            time.sleep(1.0)  # real time; the agent's clock does not move
    finally:
        ca.stop()
    attested = [r for r in caplog.records if "attested as" in r.getMessage()]
    assert len(attested) <= 2, f"{len(attested)} attestations in one second with the agent's clock held still"


def _one_response(source: meshid.StaticSource, folder: Path) -> bytes:
    """One X509SVIDResponse, as bytes, from a real Workload API server over ``source``."""
    with WorkloadApiServer(source, f"unix:{folder}/real.sock"), grpc.insecure_channel(f"unix:{folder}/real.sock") as ch:
        stream = ch.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID", lambda _: b"", lambda raw: raw)
        call = stream(b"", metadata=(("workload.spiffe.io", "true"),), timeout=10)
        response = next(call)
        call.cancel()
    return bytes(response)


def _fetch_x509_server(
    behaviour: Callable[[bytes, grpc.ServicerContext], Iterator[bytes]], socket: Path, request: pytest.FixtureRequest
) -> str:
    """A Workload API server on ``socket`` whose FetchX509SVID is ``behaviour`` (raw bytes in and
    out), stopped when the test ends; its address."""
    handler = grpc.unary_stream_rpc_method_handler(behaviour, lambda raw: raw, lambda raw: raw)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", {"FetchX509SVID": handler})])  # fmt: skip
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    request.addfinalizer(lambda: server.stop(None).wait())
    return f"unix:{socket}"


def test_a_stream_that_ends_after_each_answer_is_reconnected_with_growing_backoff(
    ca: Authority, bundles: meshid.BundleSet, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A Workload API server that answers each FetchX509SVID once and then ends the stream (as
    a proxy or a broken agent may). Every answer is good, yet the stream gives nothing lasting:
    the source waits longer before each reconnection, up to its ``max_backoff``, instead of
    reconnecting every 0.1 s forever."""
    response = _one_response(meshid.StaticSource(ca.issue_svid(WORKLOAD), bundles), tmp_path)
    calls = []

    def answer_once(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.append(1)
        yield response

    address = _fetch_x509_server(answer_once, tmp_path / "flapping.sock", request)
    clock = ManualClock()
    with WorkloadApiSource(address, max_backoff=5.0, clock=clock) as source:
        assert str(source.get_svid().spiffe_id) == WORKLOAD
        waits = [clock.advance_to_next_wakeup() for _ in range(10)]
    assert len(calls) >= 10
    assert max(waits) >= 2.5, f"reconnected after {[f'{w:.2f}' for w in waits]} s of the source's clock"
    assert all(w <= 5.0 for w in waits), waits


def test_close_from_another_thread_ends_a_start_still_waiting_for_the_first_answer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A Workload API server that takes FetchX509SVID and never answers (an agent still waiting
    for its CA). A close() from another thread (a signal's) ends the start() waiting for the
    first answer at once, with an error that says so, rather than after its whole timeout."""
    asked = threading.Event()

    def never_answer(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        asked.set()
        done = threading.Event()
        context.add_callback(done.set)
        done.wait()
        yield from ()

    source = WorkloadApiSource(_fetch_x509_server(never_answer, tmp_path / "silent.sock", request), timeout=30)
    outcome: list[Exception | WorkloadApiSource] = []

    def start() -> None:
        try:
            outcome.append(source.start())
        except Exception as err:  # the test looks at it
            outcome.append(err)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        assert asked.wait(10), "the source never called FetchX509SVID"
        source.close()
        starter.join(10)
        assert not starter.is_alive(), "start() still waiting 10 s after close()"
    finally:
        source.close()
        starter.join()
    [result] = outcome
    assert isinstance(result, meshid.SourceError) and "closed" in str(result), result


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("kind", ["issuer source", "node agent"])
def test_a_refresh_interval_that_is_not_positive_is_refused(tmp_path: Path, kind: str, interval: float) -> None:
    """A refresh every 0 s is a loop that asks the CA for its bundle without pause (a whole core
    of CPU, measured, for an IssuerSource with refresh_interval=0): refused when it is built."""
    (tmp_path / "bundle.pem").write_bytes(Authority.create_root("example.org").roots[0].public_bytes(Encoding.PEM))
    with pytest.raises(ValueError, match="refresh_interval must be more than 0 seconds"):
        if kind == "issuer source":
            IssuerSource("127.0.0.1:1", tmp_path / "bundle.pem", join_token="t", refresh_interval=interval)
        else:
            NodeAgent("127.0.0.1:1", tmp_path / "bundle.pem", tmp_path / "agent", refresh_interval=interval)
