"""Entries served by a node agent, and batch issuance (issue #12): parent_id and selectors
(validated strictly), SyncEntries (the caller's entries only), BatchNewX509Svid (SVIDs for the
caller's entries only, per-request refusals, new keys only), who may call the Agent service, and
one durable commit per batch: a batch survives ``kill -9`` of the CA whole or not at all, and a
store that fails fails the whole batch with nothing recorded. Real CAs on loopback, real TLS."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

import meshid

# Private messages: batches the public client never builds (garbage CSRs, the agent's own key,
# one key twice, more requests than allowed).
from meshid._proto import agent_pb2, issuer_pb2
from meshid.ca import generate_key
from meshid.ca.client import (
    SMALL_BATCH,
    SMALL_BATCHES_AT_THE_END,
    AdminClient,
    AgentClient,
    attest_agent_with_token,
    batch_new_svids_with_svid,
    sync_entries_with_svid,
)
from meshid.ca.csr import build_csr
from meshid.ca.datadir import init_data_dir
from meshid.ca.store import Entry, SqliteStore
from meshid.ca.store.rows import hex_serial
from meshid.errors import RemoteError
from meshid.spiffeid import SpiffeId
from nodeagents import AGENT, TD, AgentCa, agent_id, call

pytestmark = pytest.mark.timeout(120)

NODE_1, NODE_2 = agent_id("node-1"), agent_id("node-2")
WEB = f"spiffe://{TD}/ns/prod/sa/web"
DB = f"spiffe://{TD}/ns/prod/sa/db"
CACHE = f"spiffe://{TD}/ns/prod/sa/cache"  # node-2's
API = f"spiffe://{TD}/ns/prod/sa/api"  # no parent: a join token's


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path / "ca")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path_factory.mktemp("shared") / "ca")
    try:
        yield running
    finally:
        running.stop()


def remote_error(fn: object) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()  # type: ignore[operator]
    return info.value


@pytest.fixture
def fleet(ca: AgentCa) -> dict[str, meshid.X509Svid]:
    """Two attested agents, their entries (web and db for node-1, cache for node-2) and one without a parent."""
    agents = {NODE_1: ca.attest("node-1").svid, NODE_2: ca.attest("node-2").svid}
    with ca.admin() as admin:
        admin.create_entry(
            WEB, ["web.internal"], datetime.timedelta(minutes=20), parent_id=NODE_1, selectors=["unix:uid:1001"]
        )
        admin.create_entry(
            DB,
            [],
            None,
            parent_id=NODE_1,
            selectors=["unix:user:postgres", "unix:path:/usr/lib/postgresql/16/bin/postgres"],
        )
        admin.create_entry(CACHE, [], None, parent_id=NODE_2, selectors=["unix:gid:50"])
        admin.create_entry(API)
    return agents


# --- entries with a parent and selectors -----------------------------------------------------------

GOOD_SELECTORS = [
    "unix:uid:0",
    "unix:uid:4294967294",
    "unix:gid:1001",
    "unix:user:www-data",
    "unix:group:_postgres",
    "unix:path:/usr/bin/python3.12",
    "unix:path:/opt/my app/bin:x",
    "unix:sha256:" + "0123456789abcdef" * 4,
]

BAD_SELECTORS = [  # one grammar for CA and agent: meshid.workloadapi.attestation.Selector
    ("unix:uid:-1", "uid must be a decimal number from 0 to 4294967294 without leading zeros"),
    ("unix:uid:4294967295", "uid must be a decimal number"),
    ("unix:uid:007", "without leading zeros"),
    ("unix:uid:1e3", "uid must be a decimal number"),
    ("unix:uid: 1", "uid must be a decimal number"),
    ("unix:gid:", "gid must be a decimal number"),
    ("unix:user:-rf", "user must be a name of at most 256 characters: a letter or _, then letters"),
    ("unix:user:root;id", "user must be a name of at most 256 characters"),
    ("unix:group:" + "g" * 257, "group must be a name of at most 256 characters"),
    ("unix:user:", "user must be a name"),
    ("unix:path:usr/bin/python3", "path must be an absolute path to a file"),
    ("unix:path://usr/bin/python3", "path must be an absolute path to a file"),
    ("unix:path:/usr/bin/../bin/python3", "path must be normalised (no //, /./, /../ or final /): write /usr/bin/python3"),
    ("unix:path:/usr/bin/", "path must be normalised"),
    ("unix:path:/usr//bin/python3", "path must be normalised"),
    ("unix:path:/usr/./bin", "path must be normalised"),
    ("unix:path:/usr/bin/py\x00thon", "without control characters"),
    ("unix:path:/usr/bin/py\nthon", "without control characters"),
    ("unix:path:/" + "a" * 4096, "path must be at most 4095 characters"),
    ("unix:sha256:" + "A" * 64, "sha256 must be 64 lowercase hexadecimal digits"),
    ("unix:sha256:" + "a" * 63, "sha256 must be 64 lowercase hexadecimal digits"),
    (
        "unix:sha1:" + "a" * 40,
        "the unix attestor's kinds are uid, gid, user, group, supplementary_gid, supplementary_group, path, sha256",
    ),
    ("unix:uid", "write unix:<kind>:<value>"),
]


@pytest.mark.parametrize("selector", GOOD_SELECTORS)
def test_good_selectors_are_kept_as_written(shared_ca: AgentCa, selector: str) -> None:
    spiffe_id = f"spiffe://{TD}/ns/good/sa/s{GOOD_SELECTORS.index(selector)}"
    with shared_ca.admin() as admin:
        created = admin.create_entry(spiffe_id, parent_id=NODE_1, selectors=[selector])
        listed = {e.spiffe_id: e for e in admin.list_entries()}[spiffe_id]
    assert list(created.selectors) == list(listed.selectors) == [selector]
    assert created.parent_id == listed.parent_id == NODE_1


@pytest.mark.parametrize(("selector", "message"), BAD_SELECTORS, ids=[f"bad-{i}" for i in range(len(BAD_SELECTORS))])
def test_bad_selectors_are_invalid_argument(shared_ca: AgentCa, selector: str, message: str) -> None:
    with shared_ca.admin() as admin:
        err = remote_error(
            lambda: admin.create_entry(
                f"spiffe://{TD}/ns/bad/sa/x", parent_id=NODE_1, selectors=["unix:uid:1", selector]
            )
        )
        assert f"spiffe://{TD}/ns/bad/sa/x" not in {e.spiffe_id for e in admin.list_entries()}
    assert err.code == "INVALID_ARGUMENT" and message in str(err), str(err)
    assert f"entry create: INVALID_ARGUMENT: selector {selector[:100]!r}"[:60] in str(err)


@pytest.mark.parametrize(
    ("parent", "selectors", "code", "message"),
    [
        ("", ["unix:uid:1"], "INVALID_ARGUMENT", "selectors need a parent_id (the node agent that matches them)"),
        (NODE_1, [], "INVALID_ARGUMENT", "an entry with a parent_id needs at least one selector"),
        (WEB, ["unix:uid:1"], "INVALID_ARGUMENT", f"parent_id: {WEB} is not a node agent of this CA"),
        (
            "spiffe://other.org/meshid/agent/node-1",
            ["unix:uid:1"],
            "INVALID_ARGUMENT",
            "is not a node agent of this CA",
        ),
        (f"spiffe://{TD}/meshid/agent", ["unix:uid:1"], "INVALID_ARGUMENT", "is not a node agent of this CA"),
        (f"spiffe://{TD}/meshid/agent/a/b", ["unix:uid:1"], "INVALID_ARGUMENT", "is not a node agent of this CA"),
        ("node-1", ["unix:uid:1"], "INVALID_ARGUMENT", "parent_id: SPIFFE ID 'node-1'"),
        (NODE_1, [f"unix:uid:{i}" for i in range(33)], "INVALID_ARGUMENT", "selectors: at most 32 per entry"),
    ],
)
def test_entry_parent_and_selector_rules(
    shared_ca: AgentCa, parent: str, selectors: list[str], code: str, message: str
) -> None:
    with shared_ca.admin() as admin:
        err = remote_error(
            lambda: admin.create_entry(f"spiffe://{TD}/ns/rules/sa/x", parent_id=parent, selectors=selectors)
        )
    assert err.code == code and message in str(err), str(err)


def test_duplicate_selectors_are_kept_once_and_32_are_allowed(shared_ca: AgentCa) -> None:
    with shared_ca.admin() as admin:
        dup = admin.create_entry(
            f"spiffe://{TD}/ns/dup/sa/x", parent_id=NODE_1, selectors=["unix:uid:1", "unix:gid:2", "unix:uid:1"]
        )
        many = admin.create_entry(
            f"spiffe://{TD}/ns/many/sa/x", parent_id=NODE_1, selectors=[f"unix:gid:{i}" for i in range(32)]
        )
    assert list(dup.selectors) == ["unix:uid:1", "unix:gid:2"] and len(many.selectors) == 32


def test_an_agent_id_can_never_be_registered(shared_ca: AgentCa) -> None:
    with shared_ca.admin() as admin:
        err = remote_error(lambda: admin.create_entry(NODE_1))
    assert err.code == "PERMISSION_DENIED" and "reserved for the CA itself" in str(err)


def test_join_token_for_an_entry_with_a_parent_is_refused(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    with ca.admin() as admin:
        err = remote_error(lambda: admin.create_token(WEB))
    assert err.code == "PERMISSION_DENIED"
    assert f"join token: {WEB} is served by node agent {NODE_1}; its SVIDs go only to that agent" in str(err)


# --- SyncEntries ---------------------------------------------------------------------------------


def test_sync_entries_gives_the_caller_its_own_entries_only(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    mine = sync_entries_with_svid(ca.address, fleet[NODE_1], ca.bundles)
    assert [(str(e.spiffe_id), e.selectors, e.dns_names, e.ttl) for e in mine] == [
        (DB, ("unix:user:postgres", "unix:path:/usr/lib/postgresql/16/bin/postgres"), (), datetime.timedelta(hours=1)),
        (WEB, ("unix:uid:1001",), ("web.internal",), datetime.timedelta(minutes=20)),
    ]
    theirs = sync_entries_with_svid(ca.address, fleet[NODE_2], ca.bundles)
    assert [str(e.spiffe_id) for e in theirs] == [CACHE]
    assert sync_entries_with_svid(ca.address, ca.attest("node-3").svid, ca.bundles) == []


# --- BatchNewX509Svid ----------------------------------------------------------------------------


def test_batch_issues_svids_for_the_callers_entries(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    keys = {WEB: generate_key(), DB: generate_key("ed25519")}
    results = batch_new_svids_with_svid(ca.address, fleet[NODE_1], ca.bundles, list(keys.items()))
    assert [(r.spiffe_id, r.code) for r in results] == [(WEB, "OK"), (DB, "OK")]
    for result in results:
        assert result.issuance is not None
        svid = result.issuance.svid
        assert str(svid.spiffe_id) == result.spiffe_id
        ca.bundles.verify(svid.leaf, svid.chain[1:])
        assert svid.private_key is keys[result.spiffe_id]
        # Its subject key identifier is the key digest the store recorded for it (RFC 7093 method 4).
        with contextlib.closing(sqlite3.connect(ca.folder / "meshid.db")) as db:
            (recorded,) = db.execute(
                "SELECT key_sha256 FROM certificates WHERE serial = ?", (hex_serial(svid.leaf.serial_number),)
            ).fetchone()
        ski = svid.leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert ski == recorded and len(ski) == 32
    web = results[0].issuance.svid  # type: ignore[union-attr]
    assert "web.internal" in web.leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    assert (
        datetime.timedelta(minutes=19)
        < web.not_after - datetime.datetime.now(datetime.UTC)
        <= datetime.timedelta(minutes=20)
    )


def test_batch_refuses_per_request_and_never_issues_what_it_refuses(
    ca: AgentCa, fleet: dict[str, meshid.X509Svid]
) -> None:
    agent = fleet[NODE_1]
    shared_key = generate_key()
    asked = [
        (WEB, build_csr(shared_key)),
        (CACHE, build_csr(generate_key())),  # another agent's entry
        (API, build_csr(generate_key())),  # an entry without a parent
        (f"spiffe://{TD}/ns/prod/sa/nobody", build_csr(generate_key())),  # no entry at all: the same answer
        (NODE_1, build_csr(generate_key())),  # the agent's own ID
        (DB, b"not a CSR"),
        (DB, build_csr(agent.private_key)),  # the agent's own key
        (DB, build_csr(shared_key)),  # the key WEB just got
        ("spiffe://example.org/ns/../x", build_csr(generate_key())),
        (DB, build_csr(generate_key())),
    ]
    request = agent_pb2.BatchNewX509SvidRequest(requests=[agent_pb2.SvidRequest(spiffe_id=s, csr=c) for s, c in asked])
    with ca.channel(agent) as channel:
        code, details, response = call(
            channel, f"{AGENT}/BatchNewX509Svid", request, agent_pb2.BatchNewX509SvidResponse
        )
    assert code == "OK", details
    got = [
        (r.spiffe_id, grpc.StatusCode.OK.name if r.code == 0 else _code(r.code), r.message, bool(r.certificate))
        for r in response.results
    ]
    assert got == [
        (WEB, "OK", "", True),
        (CACHE, "PERMISSION_DENIED", f"batch: {CACHE} has no entry parented to {NODE_1}", False),
        (API, "PERMISSION_DENIED", f"batch: {API} has no entry parented to {NODE_1}", False),
        (
            f"spiffe://{TD}/ns/prod/sa/nobody",
            "PERMISSION_DENIED",
            f"batch: spiffe://{TD}/ns/prod/sa/nobody has no entry parented to {NODE_1}",
            False,
        ),
        (NODE_1, "PERMISSION_DENIED", f"batch: {NODE_1} has no entry parented to {NODE_1}", False),
        (DB, "INVALID_ARGUMENT", got[5][2], False),
        (DB, "INVALID_ARGUMENT", "CSR: it is over the agent's own key", False),
        (DB, "INVALID_ARGUMENT", "CSR: its key was certified before by this CA; make a new key for each SVID", False),
        ("spiffe://example.org/ns/../x", "INVALID_ARGUMENT", got[8][2], False),
        (DB, "OK", "", True),
    ]
    assert got[5][2].startswith("CSR: not a") and "dot segments" in got[8][2]
    issued = [x509.load_der_x509_certificate(r.certificate) for r in response.results if r.certificate]
    assert [
        c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        for c in issued
    ] == [[WEB], [DB]]


def _code(number: int) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == number)


def test_a_key_is_never_certified_twice_across_batches(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    key = generate_key()
    with AgentClient(ca.address, fleet[NODE_1], ca.bundles) as client:
        assert [r.code for r in client.batch_new_svids([(WEB, key)])] == ["OK"]
        again = client.batch_new_svids([(WEB, key), (DB, key)])
        renewed = client.batch_new_svids([(WEB, generate_key())])  # the agent's way to renew web
    assert [(r.code, r.message) for r in again] == [
        ("INVALID_ARGUMENT", "CSR: its key was certified before by this CA; make a new key for each SVID")
    ] * 2
    assert [r.code for r in renewed] == ["OK"]


def test_an_entry_asked_twice_in_one_batch_is_issued_once(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    results = batch_new_svids_with_svid(
        ca.address, fleet[NODE_1], ca.bundles, [(WEB, generate_key()), (WEB, generate_key())]
    )
    assert [(r.code, r.message) for r in results] == [
        ("OK", ""),
        ("INVALID_ARGUMENT", f"batch: {WEB} is asked for twice in one batch"),
    ]


@pytest.mark.parametrize("count", [0, 1001])
def test_a_batch_holds_1_to_1000_requests(ca: AgentCa, fleet: dict[str, meshid.X509Svid], count: int) -> None:
    request = agent_pb2.BatchNewX509SvidRequest(requests=[agent_pb2.SvidRequest(spiffe_id="x")] * count)
    with ca.channel(fleet[NODE_1]) as channel:
        code, details, _ = call(channel, f"{AGENT}/BatchNewX509Svid", request, agent_pb2.BatchNewX509SvidResponse)
    assert code == "INVALID_ARGUMENT" and f"batch: give 1 to 1000 requests, not {count}" in details


def test_the_client_splits_a_long_list_into_batches_under_the_request_limit(
    ca: AgentCa, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshid.ca")
    agent = ca.attest("node-big").svid
    ids = [f"spiffe://{TD}/ns/big/sa/w{i:03d}" for i in range(600)]
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    for sid in ids:  # straight into the store: 600 admin calls would meet the admin's rate limit
        ca.server.service.store.create_entry(
            Entry(
                SpiffeId.parse(sid),
                (),
                datetime.timedelta(hours=1),
                now,
                SpiffeId.parse(agent_id("node-big")),
                ("unix:uid:1",),
            )
        )
    requests = [(sid, generate_key()) for sid in ids]
    one = agent_pb2.BatchNewX509SvidRequest(
        requests=[agent_pb2.SvidRequest(spiffe_id=s, csr=build_csr(k)) for s, k in requests]
    )
    assert one.ByteSize() > 64 * 1024  # more than the CA takes in one request
    with ca.channel(agent) as channel:
        code, details, _ = call(channel, f"{AGENT}/BatchNewX509Svid", one, agent_pb2.BatchNewX509SvidResponse)
    assert code == "RESOURCE_EXHAUSTED" and "larger than max" in details
    started = time.monotonic()
    results = batch_new_svids_with_svid(ca.address, agent, ca.bundles, requests)
    took = time.monotonic() - started
    assert [r.code for r in results] == ["OK"] * 600
    assert [str(r.issuance.svid.spiffe_id) for r in results] == ids  # type: ignore[union-attr]
    print(f"\n[batch] 600 SVIDs in {took:.2f} s over one connection ({600 / took:.0f} SVIDs/s, SQLite)")
    # As the CA saw them: a small first request (it starts signing sooner), full ones under the
    # byte limit, and the last requests small again (the agent has less to check at the end).
    sizes = [int(m.group(1)) for m in re.finditer(r"got \d+ of (\d+) SVID\(s\) asked for in a batch", caplog.text)]
    assert sum(sizes) == 600 and sizes[0] == SMALL_BATCH, sizes
    assert all(n <= SMALL_BATCH for n in sizes[-3:]) and max(sizes) > SMALL_BATCH, sizes
    assert sum(sizes[-3:]) >= SMALL_BATCHES_AT_THE_END - SMALL_BATCH, sizes


def test_keys_may_be_made_as_their_csrs_are_built(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    """A function for a key is called once per request, right before its CSR (NodeAgent's way:
    the first request leaves without waiting for every key); each SVID holds the key made for it."""
    made: list[object] = []

    def make_key() -> object:
        made.append(generate_key())
        return made[-1]

    results = batch_new_svids_with_svid(ca.address, fleet[NODE_1], ca.bundles, [(WEB, make_key), (DB, make_key)])
    assert [(r.spiffe_id, r.code) for r in results] == [(WEB, "OK"), (DB, "OK")]
    assert len(made) == 2
    assert [r.issuance.svid.private_key for r in results] == made  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="key kind 'nope' is unknown"):  # a factory that fails: nothing sent
        batch_new_svids_with_svid(ca.address, fleet[NODE_1], ca.bundles, [(WEB, lambda: generate_key("nope"))])


def test_batches_of_two_agents_at_once_are_each_answered_whole(ca: AgentCa) -> None:
    """The CA signs one batch at a time (AgentService's turns): the batches two agents send
    at once (each list is more than one request, sent with several in flight) all complete,
    each agent's with its own entries only."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    agents, ids = {}, {}
    for name in ("node-a", "node-b"):
        agents[name] = ca.attest(name).svid
        ids[name] = [f"spiffe://{TD}/ns/{name}/sa/w{i:03d}" for i in range(300)]
        for sid in ids[name]:  # straight into the store: 600 admin calls would meet the admin's rate limit
            ca.server.service.store.create_entry(
                Entry(
                    SpiffeId.parse(sid),
                    (),
                    datetime.timedelta(hours=1),
                    now,
                    SpiffeId.parse(agent_id(name)),
                    ("unix:uid:1",),
                )
            )
    answers: dict[str, object] = {}

    def send(name: str, asked: list[str]) -> None:
        with AgentClient(ca.address, agents[name], ca.bundles, timeout=60) as client:
            answers[name] = client.batch_new_svids([(sid, generate_key()) for sid in asked])

    # node-a asks for its own entries and for node-b's first ten (refused), node-b for its own
    senders = [
        threading.Thread(target=send, args=("node-a", ids["node-a"] + ids["node-b"][:10])),
        threading.Thread(target=send, args=("node-b", ids["node-b"])),
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(90)
    a, b = answers["node-a"], answers["node-b"]
    assert [r.code for r in a] == ["OK"] * 300 + ["PERMISSION_DENIED"] * 10  # type: ignore[attr-defined]
    assert [r.code for r in b] == ["OK"] * 300  # type: ignore[attr-defined]
    assert [str(r.issuance.svid.spiffe_id) for r in b] == ids["node-b"]  # type: ignore[attr-defined]


# --- who may call the Agent service ---------------------------------------------------------------

AGENT_CALLS = [
    ("RenewAgent", agent_pb2.RenewAgentRequest(csr=build_csr(generate_key())), issuer_pb2.SvidResponse),
    ("SyncEntries", agent_pb2.SyncEntriesRequest(), agent_pb2.SyncEntriesResponse),
    (
        "BatchNewX509Svid",
        agent_pb2.BatchNewX509SvidRequest(
            requests=[agent_pb2.SvidRequest(spiffe_id=WEB, csr=build_csr(generate_key()))]
        ),
        agent_pb2.BatchNewX509SvidResponse,
    ),
]


@pytest.mark.parametrize(("method", "request_", "response_type"), AGENT_CALLS, ids=[m for m, _, _ in AGENT_CALLS])
def test_a_workload_svid_may_not_call_the_agent_service(
    ca: AgentCa, fleet: dict[str, meshid.X509Svid], method: str, request_: object, response_type: object
) -> None:
    workload = ca.workload("ns/prod/sa/frontend")
    with ca.channel(workload) as channel:
        code, details, _ = call(channel, f"{AGENT}/{method}", request_, response_type)
    assert code == "PERMISSION_DENIED" and f"{workload.spiffe_id} may not call {AGENT}/{method}" in details


def test_the_holder_of_an_agent_issued_svid_cannot_renew_it_past_its_agent(
    ca: AgentCa, fleet: dict[str, meshid.X509Svid]
) -> None:
    # The workload got its key from the agent's Workload API; renewing it directly would let it
    # keep the identity after it stopped matching the selectors, or after the agent was evicted.
    (result,) = batch_new_svids_with_svid(ca.address, fleet[NODE_1], ca.bundles, [(WEB, generate_key())])
    assert result.issuance is not None
    with ca.channel(result.issuance.svid) as channel:
        request = issuer_pb2.RenewRequest(csr=build_csr(generate_key()))
        code, details, _ = call(channel, "/meshid.v1.Issuer/Renew", request, issuer_pb2.SvidResponse)
    assert code == "PERMISSION_DENIED" and f"{WEB} is served by node agent {NODE_1}" in details


def test_an_evicted_agent_gets_no_batch(ca: AgentCa, fleet: dict[str, meshid.X509Svid]) -> None:
    with ca.admin() as admin:
        admin.evict_agent(NODE_1)
    err = remote_error(
        lambda: batch_new_svids_with_svid(ca.address, fleet[NODE_1], ca.bundles, [(WEB, generate_key())])
    )
    assert err.code == "UNAUTHENTICATED" and "is revoked" in str(err)


# --- one durable commit per batch ----------------------------------------------------------------


def test_a_store_failure_fails_the_whole_batch_and_records_nothing(
    ca: AgentCa, fleet: dict[str, meshid.X509Svid]
) -> None:
    db = ca.folder / "meshid.db"
    with contextlib.closing(SqliteStore(db)) as store:
        before = {r.serial for r in store.list_issued()}
    locker = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        err = remote_error(
            lambda: batch_new_svids_with_svid(
                ca.address, fleet[NODE_1], ca.bundles, [(WEB, generate_key()), (DB, generate_key())], timeout=30
            )
        )
        waited = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert err.code == "UNAVAILABLE" and "database is locked" in str(err), str(err)
    with contextlib.closing(SqliteStore(db)) as store:
        assert {r.serial for r in store.list_issued()} == before
    results = batch_new_svids_with_svid(
        ca.address, fleet[NODE_1], ca.bundles, [(WEB, generate_key()), (DB, generate_key())]
    )
    assert [r.code for r in results] == ["OK", "OK"]
    print(f"\n[batch] store locked: the whole batch UNAVAILABLE after {waited:.1f} s, nothing recorded; then issued")


BATCH = 250
ROUNDS = (None, 0.15, 0.35, 0.55)  # None: not killed, the batch's duration measured; else kill at that fraction of it


def _serve(data_dir: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    with log.open("a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("CA serving on "), f"ca serve printed {line!r}; see {log}"
    return proc, line.removeprefix("CA serving on ")


def test_a_batch_survives_kill_9_of_the_ca_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client sends its first and last requests in small batches: here all 250 go as one.
    monkeypatch.setattr(meshid.ca.client, "SMALL_BATCH", BATCH)
    data_dir = tmp_path / "ca"
    init_data_dir(data_dir, TD)
    node = SpiffeId.parse(agent_id("node-k"))
    rounds = [[f"spiffe://{TD}/ns/kill/sa/r{r}w{i:03d}" for i in range(BATCH)] for r in range(len(ROUNDS))]
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    with SqliteStore(data_dir / "meshid.db") as store:
        for sid in (s for ids in rounds for s in ids):
            store.create_entry(Entry(SpiffeId.parse(sid), (), datetime.timedelta(hours=1), now, node, ("unix:uid:1",)))
    log = tmp_path / "ca.log"
    proc, address = _serve(data_dir, log)
    procs = [proc]
    try:
        bundles = meshid.BundleSet.of(meshid.TrustBundle.load(TD, data_dir / "bundle.pem"))
        with AdminClient(address, data_dir) as admin:
            token = str(admin.create_agent_token("node-k").token)
        agent = attest_agent_with_token(address, (data_dir / "bundle.pem").read_bytes(), token).svid
        outcomes = []
        duration = 0.0
        for ids, fraction in zip(rounds, ROUNDS, strict=True):
            requests = [(sid, generate_key()) for sid in ids]
            answer: list[object] = []
            client = AgentClient(address, agent, bundles, timeout=30)

            def send(
                client: AgentClient = client,
                requests: list[tuple[str, object]] = requests,
                answer: list[object] = answer,
            ) -> None:
                try:
                    answer.append(client.batch_new_svids(requests))
                except RemoteError as err:
                    answer.append(err)

            sender = threading.Thread(target=send)
            started = time.monotonic()
            sender.start()
            if fraction is None:
                sender.join()
                duration = time.monotonic() - started
            else:
                time.sleep(duration * fraction)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                sender.join()
            client.close()
            with contextlib.closing(SqliteStore(data_dir / "meshid.db")) as store:
                wanted = set(ids)
                recorded = sum(1 for r in store.list_issued() if str(r.spiffe_id) in wanted)
            answered = isinstance(answer[0], list) and all(r.code == "OK" for r in answer[0])  # type: ignore[attr-defined]
            outcomes.append((fraction, answered, recorded))
            if fraction is not None:
                proc, address = _serve(data_dir, log)  # the same data folder, a new port
                procs.append(proc)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            assert p.stdout is not None
            p.stdout.close()
    shown = ", ".join(
        f"{'not killed' if f is None else f'killed at {f:.0%}'}: {'answered' if a else 'no answer'}, {n} recorded"
        for f, a, n in outcomes
    )
    print(f"\n[batch kill -9] a batch of {BATCH} takes {duration * 1000:.0f} ms; {shown}")
    assert all(n in (0, BATCH) for _, _, n in outcomes), f"a batch was recorded in part: {shown}"
    assert all(n == BATCH for _, a, n in outcomes if a), shown  # what was answered was recorded
    assert outcomes[0][1:] == (True, BATCH)
    assert any(not a and n == 0 for f, a, n in outcomes if f is not None), f"no kill landed before the commit: {shown}"
