"""The node agent (issue #12): one agent per host, attested once, serving every local process the
SVIDs of the entries parented to it whose selectors match that process.

Real processes, a real CA on loopback, real Unix users: the workloads are separate processes run
as ``meshid-a``, ``meshid-b`` and ``meshid-c`` (tests/nodeagents.py: they read the Workload API
with raw gRPC, py-spiffe's ``X509Source`` or meshid's ``WorkloadApiSource``). The in-process agents
and their CA share a :class:`ManualClock` that the tests step (40 s SVIDs, within the CA's 5
minutes of back-dating, so what it signs also verifies in real time); the ``meshid agent --node``
processes run on the real clock. The schedule itself (:mod:`meshid.agent.node_cache`) is checked
first, without a CA.
"""

from __future__ import annotations

import datetime
import grp
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

import meshid
from conftest import CLOCKED_LIFETIME, step
from meshid.agent import NodeAgent
from meshid.agent.node_cache import EntryCache, retry_delay
from meshid.ca import Authority, generate_key
from meshid.ca.client import AdminClient, AgentClient, AgentEntry
from meshid.ca.server import CaServer
from meshid.ca.store import Entry
from meshid.clock import ManualClock
from meshid.errors import RemoteError
from meshid.spiffeid import SpiffeId
from meshid.workloadapi import AttestedWorkloadApiServer, ProcessInfo
from nodeagents import (
    TD,
    WORKLOAD_CLIENT,
    AgentCa,
    Workload,
    WorkloadPython,
    agent_id,
    host_certificate,
    pem_file,
    workload_python,
    workload_users,
)
from support import eventually, signal_another_thread

pytestmark = pytest.mark.timeout(180)

NODE_ID = agent_id("node-1")
WEB = f"spiffe://{TD}/ns/prod/sa/web"
DB = f"spiffe://{TD}/ns/prod/sa/db"
API = f"spiffe://{TD}/ns/prod/sa/api"
CACHE = f"spiffe://{TD}/ns/prod/sa/cache"  # another agent's
NO_IDENTITY = {"code": "PERMISSION_DENIED", "details": "no identity issued to this process"}
LIFETIME = CLOCKED_LIFETIME  # 40 s, entries and (the CA's max TTL) the agent's own SVID alike
SYNC = 5.0  # the in-process agents' sync interval, on the test's clock


# --- the schedule, without a CA ---------------------------------------------------------------------


def _entry(i: int, *, ttl: float = 3600, selectors: tuple[str, ...] = ("unix:uid:1",)) -> AgentEntry:
    return AgentEntry(SpiffeId.parse(f"spiffe://{TD}/w/{i}"), selectors, (), datetime.timedelta(seconds=ttl))


@pytest.fixture(scope="module")
def an_svid() -> meshid.X509Svid:
    return Authority.create_root(TD).issue_svid(f"spiffe://{TD}/w/any")


def test_renewals_of_a_thousand_entries_come_in_one_batch_per_cycle(an_svid: meshid.X509Svid) -> None:
    cache = EntryCache(renew_at=0.5, jitter=0.1, max_backoff=30)
    cache.sync([_entry(i) for i in range(1000)])
    now, batches = 0.0, []
    while now < 20 * 3600:
        due = cache.due(now)
        batches.append(len(due))
        for sid in due:
            cache.issued(sid, an_svid, 3600, now)
        now = cache.next_due()
    # After the first batch every renewal starts one batch that takes every entry along: each
    # is renewed 40-50 % into its life, and may go up to 10 % of it early, inside its jitter.
    assert batches[0] == 1000 and set(batches) == {1000}, batches
    print(f"\n[schedule] 1000 entries, 20 h of 1 h SVIDs: {len(batches)} batches of {batches[0]}")


def test_a_failed_batch_retries_together_and_closer_as_expiry_nears(an_svid: meshid.X509Svid) -> None:
    cache = EntryCache(renew_at=0.5, jitter=0.1, max_backoff=30)
    cache.sync([_entry(i, ttl=40) for i in range(3)])
    due = cache.due(0.0)
    delay = cache.failed(due, 1, 0.0, remaining=0.0)
    assert cache.due(delay) == due and cache.due(delay - 0.001) == []  # one group, one time
    # Capped by a quarter of the lifetime, and by half of what is left of the first SVID to expire.
    assert max(retry_delay(40, n, 0.0, 30, lambda: 1.0) for n in range(20)) == 10
    assert retry_delay(40, 20, 6.0, 30, lambda: 1.0) == 3.0
    assert retry_delay(40, 20, 0.5, 30, lambda: 1.0) == 0.25


def test_changes_of_an_entry(an_svid: meshid.X509Svid) -> None:
    cache = EntryCache(renew_at=0.5, jitter=0.1, max_backoff=30)
    cache.sync([_entry(1), _entry(2)])
    for sid in cache.due(0.0):
        cache.issued(sid, an_svid, 3600, 0.0)
    assert cache.publish() and cache.due(1.0) == []
    # New selectors: served to others at once, no new SVID needed.
    assert cache.sync([_entry(1, selectors=("unix:uid:2",)), _entry(2)])
    assert cache.due(1.0) == [] and str(cache.served[0][0][0]) == "unix:uid:2"  # type: ignore[index]
    # A new TTL: a new SVID at once; the old one is served meanwhile.
    assert not cache.sync([_entry(1, ttl=60, selectors=("unix:uid:2",)), _entry(2)])
    assert cache.due(1.0) == [f"spiffe://{TD}/w/1"] and len(cache.served) == 2
    # Deleted: no longer served, SVID and key forgotten.
    assert cache.sync([_entry(2)]) and len(cache.served) == 1 and len(cache) == 1
    # A selector this agent cannot evaluate matches no process.
    assert cache.sync([_entry(2), _entry(3, selectors=("unix:future:x",))]) is False
    assert cache.due(1.0) == [f"spiffe://{TD}/w/3"]
    cache.issued(f"spiffe://{TD}/w/3", an_svid, 3600, 1.0)
    assert cache.publish() and cache.served[1][0] is None


# --- processes of other users -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> dict[str, Any]:
    return workload_users()


@pytest.fixture(scope="module")
def python(users: dict[str, Any]) -> WorkloadPython:
    return workload_python(users["meshid-a"])


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder the test users can reach (tmp_path is private to root): the socket and the client."""
    path = Path(tempfile.mkdtemp(prefix="meshid-node-"))
    path.chmod(0o755)
    (path / "client.py").write_text(WORKLOAD_CLIENT)
    (path / "client.py").chmod(0o644)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run(python: WorkloadPython, users: dict[str, Any], folder: Path, request: pytest.FixtureRequest) -> Callable[..., Workload]:  # fmt: skip
    def start(user: str, mode: str, path: str | Path) -> Workload:
        workload = Workload(python, users[user], folder / "client.py", mode, str(path))
        request.addfinalizer(workload.stop)
        return workload

    return start


def process_of(user: Any) -> ProcessInfo:
    """What attestation would say of a process of ``user`` (for asking the agent directly)."""
    group = grp.getgrgid(user.pw_gid).gr_name
    return ProcessInfo(0, user.pw_uid, user.pw_gid, user.pw_name, group, (), (), None, 0, None)


def served(agent: NodeAgent, user: Any) -> list[meshid.X509Svid]:
    return [svid for svid, _ in agent.identities_for(process_of(user))]


def step_until(clock: ManualClock, done: Callable[[], object], what: str, steps: int = 60) -> None:
    for _ in range(steps):
        if done():
            return
        step(clock)
    assert done(), f"{steps} steps of the clock and still not {what}"


@pytest.fixture
def clocked(folder: Path, clock: ManualClock) -> Iterator[AgentCa]:
    """A CA signing on the test's clock, its SVIDs (the agents' too) at most 40 s long."""
    ca = AgentCa(folder / "ca", clock=clock, max_ttl=LIFETIME)
    try:
        yield ca
    finally:
        ca.stop()


class InProcessAgent:
    """A NodeAgent in this process and its attested Workload API on folder/agent.sock (mode 0666)."""

    def __init__(self, ca: AgentCa, folder: Path, request: pytest.FixtureRequest, **options: Any) -> None:
        self.agent = NodeAgent(ca.address, ca.bundle_file, folder / "agent", sync_interval=SYNC, **options)
        self.server = AttestedWorkloadApiServer(self.agent, str(folder / "agent.sock"))
        request.addfinalizer(self.close)
        self.agent.start()
        self.server.start()
        self.socket = self.server.path

    def close(self) -> None:
        self.server.close()
        self.agent.close()


def register(ca: AgentCa, *entries: tuple[str, str, list[str]]) -> str:
    """Entries (SPIFFE ID, parent, selectors) of 40 s SVIDs, and a join token for node-1."""
    with ca.admin() as admin:
        for spiffe_id, parent, selectors in entries:
            admin.create_entry(spiffe_id, [], LIFETIME, parent_id=parent, selectors=selectors)
        return str(admin.create_agent_token("node-1").token)


# --- must show 1: who gets what, rotations, entries created and deleted, a restart without token -----


def test_each_user_gets_its_own_entry_follows_rotations_and_sees_changes_within_a_sync(
    clocked: AgentCa, clock: ManualClock, users: dict[str, Any], run: Callable[..., Workload], folder: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    b_uid = users["meshid-b"].pw_uid
    token = register(clocked, (WEB, NODE_ID, ["unix:user:meshid-a"]), (DB, NODE_ID, [f"unix:uid:{b_uid}"]))
    node = InProcessAgent(clocked, folder, request, join_token=token, clock=clock)
    agent, socket = node.agent, node.socket

    def fetch(user: str) -> dict[str, Any]:
        return run(user, "fetch", socket).line("code")

    a = fetch("meshid-a")
    assert (a["code"], a["ids"]) == ("OK", [WEB])
    assert fetch("meshid-b")["ids"] == [DB]
    assert fetch("meshid-c") == NO_IDENTITY

    # py-spiffe's X509Source in an A process follows two rotations of web's SVID.
    follower = run("meshid-a", "follow-py-spiffe", socket)
    follower.line("serial")
    for rotation in (1, 2):
        before = served(agent, users["meshid-a"])[0].serial
        step_until(clock, lambda b=before: served(agent, users["meshid-a"])[0].serial != b, f"rotation {rotation}")
        now = served(agent, users["meshid-a"])[0].serial
        eventually(lambda n=now: follower.serials()[-1] == (WEB, n), 30, f"py-spiffe to see rotation {rotation}")
    assert len(follower.serials()) >= 3 and {sid for sid, _ in follower.serials()} == {WEB}

    # An entry created at the CA is served within one sync interval of the clock.
    with clocked.admin() as admin:
        admin.create_entry(API, [], LIFETIME, parent_id=NODE_ID, selectors=["unix:user:meshid-c"])
    created = clock.monotonic()
    step_until(clock, lambda: served(agent, users["meshid-c"]), "api served")
    assert clock.monotonic() - created <= SYNC
    assert fetch("meshid-c")["ids"] == [API]

    # A deleted entry stops being served: B's open stream ends, and B gets nothing more.
    stream = run("meshid-b", "stream", socket)
    assert stream.line("event")["ids"] == [DB]
    with clocked.admin() as admin:
        admin.delete_entry(DB)
    deleted = clock.monotonic()
    step_until(clock, lambda: not served(agent, users["meshid-b"]), "db dropped")
    assert clock.monotonic() - deleted <= SYNC
    ended = stream.line("code")
    assert (ended["event"], ended["code"], ended["details"]) == ("status", *NO_IDENTITY.values())
    assert fetch("meshid-b") == NO_IDENTITY
    print(f"\n[node agent] rotations {len(follower.serials()) - 1}, created and deleted entries served/dropped "
          f"within {SYNC:g} s of the clock; {clock.monotonic():.0f} s of clock, state {agent.state}")  # fmt: skip

    # Restarted on the same data folder without any token: the same agent SVID, serving again.
    serial = agent.state.serial
    node.close()
    again = InProcessAgent(clocked, folder, request, clock=clock).agent
    assert again.state.serial == serial and again.state.served == 2
    assert fetch("meshid-a")["ids"] == [WEB]
    with clocked.admin() as admin:
        [record] = [a for a in admin.list_agents() if a.spiffe_id == NODE_ID]
    assert record.attestation == "join_token" and not record.evicted


# --- must show 2: other agents' entries, eviction, the agent's own SVID --------------------------------


def test_other_agents_entries_never_reach_it_and_workloads_never_get_its_own_svid(
    clocked: AgentCa, clock: ManualClock, users: dict[str, Any], run: Callable[..., Workload], folder: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    clocked.attest("node-2")
    token = register(
        clocked, (WEB, NODE_ID, ["unix:user:meshid-a"]), (CACHE, agent_id("node-2"), ["unix:user:meshid-a"])
    )
    node = InProcessAgent(clocked, folder, request, join_token=token, clock=clock)
    agent, socket = node.agent, node.socket
    for _ in range(3):
        step(clock)
    assert [str(e.spiffe_id) for e in agent.entries()] == [WEB]  # node-2's entry is not in its sync
    assert run("meshid-a", "fetch", socket).line("code")["ids"] == [WEB]

    # With the agent's own SVID (from its data folder), straight at the CA: refused.
    data = folder / "agent"
    own = meshid.FileSource(data / "svid.pem", data / "svid.key", data / "bundle.pem").get_svid()
    assert str(own.spiffe_id) == NODE_ID
    with AgentClient(clocked.address, own, clocked.bundles) as client:
        [result] = client.batch_new_svids([(CACHE, generate_key())])
    assert result.code == "PERMISSION_DENIED" and result.issuance is None

    # The agent's own SVID: no process gets it, not even one of the agent's own user (root).
    assert run("root", "fetch", socket).line("code") == NO_IDENTITY
    assert run("meshid-a", "read", data / "svid.key").line("read") == {"read": "PermissionError"}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "svid.key").stat().st_mode) == 0o600
    with clocked.admin() as admin, pytest.raises(RemoteError) as refused:
        admin.create_entry(NODE_ID, parent_id=agent_id("node-2"), selectors=["unix:user:meshid-a"])
    assert refused.value.code == "PERMISSION_DENIED" and "is reserved for the CA itself" in str(refused.value)


def test_an_evicted_agent_can_no_longer_renew_and_says_so(
    clocked: AgentCa, clock: ManualClock, folder: Path, request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, "meshid.agent")
    token = register(clocked, (WEB, NODE_ID, ["unix:user:meshid-a"]))
    node = InProcessAgent(clocked, folder, request, join_token=token, clock=clock)
    agent = node.agent
    serial = agent.state.serial
    with clocked.admin() as admin:
        admin.evict_agent(NODE_ID)

    def refused_renewal() -> list[str]:
        return [r.getMessage() for r in caplog.records if "the CA refuses this agent (renewal of its own SVID)" in r.getMessage()]  # fmt: skip

    step_until(clock, refused_renewal, "a refused renewal")
    state = agent.state
    assert state.refused and state.serial == serial and state.last_error is not None
    assert state.read_at == clock.now() and not state.expired
    assert "revoked" in refused_renewal()[0] and "give it a new join token and restart it" in refused_renewal()[0]
    print(f"\n[eviction] {refused_renewal()[0]}\n[eviction] state: refused={state.refused}, {state.last_error}")

    # Restarted with a new token: the saved SVID is tried first, refused, and the token attests it again.
    node.close()
    with clocked.admin() as admin:
        token = str(admin.create_agent_token("node-1").token)
    again = InProcessAgent(clocked, folder, request, join_token=token, clock=clock).agent
    step_until(clock, lambda: not again.state.refused and again.state.serial != serial, "attested again")
    assert again.state.served == 1
    with clocked.admin() as admin:
        [record] = [a for a in admin.list_agents() if a.spiffe_id == NODE_ID]
    assert not record.evicted

    # The evicted SVID runs out on the agents' clock (the machine's has barely moved): its state says so.
    assert state.expires_at is not None
    clock.advance((state.expires_at - clock.now()).total_seconds() + 1)
    assert agent.state.expired and state.expires_at > datetime.datetime.now(datetime.UTC)


# --- must show 3: kill -9 and restart; the CA down ---------------------------------------------------------


class NodeAgentProcess:
    """``meshid agent --node`` as a process on the real clock; its log goes to folder/agent.log."""

    def __init__(self, address: str, bundle: Path, folder: Path, *extra: str) -> None:
        self.log = folder / "agent.log"
        env = {k: v for k, v in os.environ.items() if k != "MESHID_JOIN_TOKEN"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "meshid.cli", "agent", "--node", "--server", address, "--bundle", str(bundle),
                    "--data-dir", str(folder / "agent"), "--socket", f"unix://{folder}/agent.sock",
                    "--sync-interval", "1", *extra,
                ],
                stdout=subprocess.PIPE, stderr=log, text=True, env={**env, "GRPC_VERBOSITY": "ERROR"},
            )  # fmt: skip

    def ready(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("node agent: spiffe://"), line + self.log.read_text()
        return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def real_ca(folder: Path) -> Iterator[AgentCa]:
    ca = AgentCa(folder / "ca")
    try:
        yield ca
    finally:
        ca.stop()


def test_kill_9_and_a_restart_without_token_workloads_reconnect_and_keep_their_identities(
    real_ca: AgentCa, run: Callable[..., Workload], folder: Path, request: pytest.FixtureRequest
) -> None:
    ca, ttl = real_ca, datetime.timedelta(minutes=10)
    with ca.admin() as admin:
        admin.create_entry(WEB, [], ttl, parent_id=NODE_ID, selectors=["unix:user:meshid-a"])
        admin.create_entry(DB, [], ttl, parent_id=NODE_ID, selectors=["unix:user:meshid-b"])
        token_file = folder / "token"
        token_file.write_text(str(admin.create_agent_token("node-1").token))
        token_file.chmod(0o600)
    first = NodeAgentProcess(ca.address, ca.bundle_file, folder, "--join-token-file", str(token_file))
    request.addfinalizer(first.stop)
    ready = first.ready()
    agent_serial = re.search(r"\(serial ([0-9a-f]+)\)", ready).group(1)  # type: ignore[union-attr]
    assert "serving 2 of 2 entries" in ready, ready
    a = run("meshid-a", "follow-py-spiffe", folder / "agent.sock")
    b = run("meshid-b", "follow-meshid", folder / "agent.sock")
    before = {WEB: a.line("serial")["serial"], DB: b.line("serial")["serial"]}

    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(timeout=10) == -signal.SIGKILL
    started = time.monotonic()
    again = NodeAgentProcess(ca.address, ca.bundle_file, folder)  # no token at all
    request.addfinalizer(again.stop)
    assert f"(serial {agent_serial})" in again.ready()  # its own SVID from the data folder
    # New SVIDs (the keys died with the process), the same identities, over reconnected streams.
    eventually(lambda: a.serials()[-1][1] != before[WEB], 30, "py-spiffe to follow the restarted agent")
    eventually(lambda: b.serials()[-1][1] != before[DB], 30, "WorkloadApiSource to follow the restarted agent")
    took = time.monotonic() - started
    assert {sid for sid, _ in a.serials()} == {WEB} and {sid for sid, _ in b.serials()} == {DB}
    assert a.proc.poll() is None and b.proc.poll() is None
    assert again.stop() == 0
    log = (folder / "agent.log").read_text()
    assert log.count("attested as") == 1 and "reusing the saved SVID" in log and "Traceback" not in log
    print(f"\n[kill -9] restarted agent served both workloads new SVIDs {took:.1f} s after the kill")


def test_the_ca_down_for_most_of_an_svid_lifetime_loses_no_identity_and_renewals_resume(
    clock: ManualClock, users: dict[str, Any], run: Callable[..., Workload], folder: Path,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    # The workloads' SVIDs live 40 s; the agent's own 200 s (the CA's max TTL; by default an hour),
    # so that what the outage tests is the workloads' identities, not the agent's.
    clocked = AgentCa(folder / "ca", clock=clock, max_ttl=datetime.timedelta(seconds=200))
    request.addfinalizer(clocked.stop)
    token = register(clocked, (WEB, NODE_ID, ["unix:user:meshid-a"]), (DB, NODE_ID, ["unix:user:meshid-b"]))
    node = InProcessAgent(clocked, folder, request, join_token=token, clock=clock)
    agent, socket = node.agent, node.socket
    follower = run("meshid-a", "follow-py-spiffe", socket)
    follower.line("serial")
    issued = agent.state.issued
    step_until(clock, lambda: agent.state.issued >= issued + 2, "a renewal of both")  # freshly renewed: now
    held = {user: served(agent, users[user])[0] for user in ("meshid-a", "meshid-b")}
    clocked.stop()
    down_at, outage = clock.now(), LIFETIME * 0.75
    steps = 0
    while clock.now() - down_at < outage:
        step(clock)
        steps += 1
        for user in held:
            [svid] = served(agent, users[user])
            assert svid.not_after > clock.now(), f"{user}'s SVID expired while the CA was down"
        assert agent.state.expires_at > clock.now()  # type: ignore[operator]
    state = agent.state
    assert state.issued == issued + 2 and state.failures > 0 and "UNAVAILABLE" in (state.last_error or "")

    clocked.restart()
    back_at = clock.now()
    step_until(clock, lambda: agent.state.issued >= issued + 4 and agent.state.last_error is None, "renewals")
    assert clock.now() < min(svid.not_after for svid in held.values())
    renewed = served(agent, users["meshid-a"])[0].serial
    assert renewed != held["meshid-a"].serial
    eventually(lambda: follower.serials()[-1] == (WEB, renewed), 30, "py-spiffe to see the renewal")
    print(f"\n[CA down] {outage.total_seconds():.0f} s of 40 s SVIDs ({steps} steps, {state.failures} failed calls); "
          f"renewed {(clock.now() - back_at).total_seconds():.1f} s after the CA was back, "
          f"{(min(s.not_after for s in held.values()) - clock.now()).total_seconds():.1f} s before expiry")  # fmt: skip


# --- x509pop, end to end ------------------------------------------------------------------------------


def test_x509pop_node_agent_from_ca_init_to_a_workload_and_again_after_eviction(
    run: Callable[..., Workload], folder: Path, request: pytest.FixtureRequest
) -> None:
    hosts = Authority.create_root("hosts.example")  # the site's own PKI
    data = folder / "ca"
    init = subprocess.run(
        [sys.executable, "-m", "meshid.cli", "ca", "init", "--data-dir", str(data), "--trust-domain", TD,
         "--agent-ca", str(pem_file(folder / "hosts.pem", hosts.certificate))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    server = CaServer(data, "127.0.0.1:0")
    address = f"127.0.0.1:{server.start()}"
    request.addfinalizer(lambda: server.stop(grace=None))
    cert, key = host_certificate(hosts, "node-7")
    pem_file(folder / "host.pem", cert)
    (folder / "host.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "host.key").chmod(0o600)
    node_7 = agent_id("node-7")
    with AdminClient(address, data) as admin:
        admin.create_entry(WEB, [], None, parent_id=node_7, selectors=["unix:user:meshid-a"])

    agent = NodeAgentProcess(
        address, data / "bundle.pem", folder, "--x509pop-cert", str(folder / "host.pem"),
        "--x509pop-key", str(folder / "host.key"),
    )  # fmt: skip
    request.addfinalizer(agent.stop)
    assert agent.ready().startswith(f"node agent: {node_7} (serial ")
    assert run("meshid-a", "fetch", folder / "agent.sock").line("code")["ids"] == [WEB]
    assert run("meshid-c", "fetch", folder / "agent.sock").line("code") == NO_IDENTITY

    # Evicted, it attests again by x509pop (the host still holds a certificate the CA trusts).
    with AdminClient(address, data) as admin:
        assert admin.evict_agent(node_7)
    log = folder / "agent.log"
    eventually(lambda: log.read_text().count(f"attested as {node_7} by x509pop") == 2, 30, "attesting again")
    with AdminClient(address, data) as admin:
        [record] = [a for a in admin.list_agents() if a.spiffe_id == node_7]
    assert record.attestation == "x509pop" and not record.evicted
    assert run("meshid-a", "fetch", folder / "agent.sock").line("code")["ids"] == [WEB]
    assert agent.stop() == 0
    assert "Traceback" not in log.read_text()


# --- a thousand entries ----------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_thousand_entries_in_one_batch_call_within_150_mb(
    real_ca: AgentCa, run: Callable[..., Workload], folder: Path, request: pytest.FixtureRequest
) -> None:
    ca = real_ca
    with ca.admin() as admin:
        token = str(admin.create_agent_token("node-1").token)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    parent = SpiffeId.parse(NODE_ID)
    for i in range(1000):  # straight into the store: 1,000 admin calls would meet the admin's rate limit
        selector = "unix:user:meshid-a" if i == 0 else f"unix:uid:{200000 + i}"
        ca.server.service.store.create_entry(
            Entry(SpiffeId.parse(f"spiffe://{TD}/ns/fleet/sa/w{i:04d}"), (), datetime.timedelta(hours=1), now,
                  parent, (selector,))
        )  # fmt: skip
    (folder / "token").write_text(token)
    started = time.monotonic()
    agent = NodeAgentProcess(ca.address, ca.bundle_file, folder, "--join-token-file", str(folder / "token"))
    request.addfinalizer(agent.stop)
    assert "serving 1000 of 1000 entries" in agent.ready()
    ready = time.monotonic() - started
    rss = _rss_mb(agent.proc.pid)
    assert run("meshid-a", "fetch", folder / "agent.sock").line("code")["ids"] == [f"spiffe://{TD}/ns/fleet/sa/w0000"]
    rss_after = _rss_mb(agent.proc.pid)
    assert agent.stop() == 0
    batches = re.findall(r"batch of (\d+): (\d+) SVIDs issued", (folder / "agent.log").read_text())
    assert batches[0] == ("1000", "1000"), batches
    print(f"\n[node agent] 1000 entries: process ready (attested, synced, 1000 SVIDs in one batch call) in "
          f"{ready:.1f} s; RSS {rss:.0f} MB, {rss_after:.0f} MB after serving a workload")  # fmt: skip
    assert max(rss, rss_after) <= 150


# --- the command line's refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--socket", "unix:///tmp/x.sock"), "the following arguments are required: --data-dir"),
        (("--data-dir", "D", "--socket", "S", "--out", "D"), "--node serves on --socket; --out belongs to the sidecar form"),
        (("--data-dir", "D", "--socket", "S", "--x509pop-cert", "F"), "give the x509pop host certificate and its key together"),
        (("--data-dir", "D", "--socket", "S", "--x509pop-cert", "F", "--x509pop-key", "F", "--join-token-file", "T"),
         "give a join token or an x509pop host certificate, not both"),
        (("--data-dir", "D", "--socket", "S", "--sync-interval", "0"), "'0' is not a number of seconds"),
        (("--data-dir", "D", "--socket", "tcp://127.0.0.1:1"), "only Unix sockets are supported"),
        (("--data-dir", "D", "--socket", "S", "--renew-at", "1.5"), "'1.5': give a fraction between 0 and 1"),
        (("--data-dir", "D", "--socket", "S"), "no reusable SVID in {D} and no way to attest the node"),
        (("--data-dir", "D", "--socket", "S", "--join-token-file", "missing"), "join token: cannot read"),
        (("--data-dir", "D", "--socket", "S", "--x509pop-cert", "F", "--x509pop-key", "F"),
         "x509pop: {F} must hold the host certificate (then its intermediates) and nothing else"),
        (("--data-dir", "D", "--socket", "S", "--x509pop-cert", "BIG", "--x509pop-key", "F"),
         "x509pop: {BIG} is larger than 1048576 bytes"),
        (("--data-dir", "D", "--socket", "LIVE", "--join-token-file", "T"), "another server"),
    ],
)  # fmt: skip
def test_node_form_refuses_bad_input_in_one_line(real_ca: AgentCa, folder: Path, extra: tuple[str, ...], message: str) -> None:  # fmt: skip
    names = {"D": str(folder / "data"), "S": f"unix://{folder}/agent.sock", "F": str(folder / "not-pem"),
             "T": str(folder / "token"), "LIVE": f"unix://{folder}/live.sock", "missing": str(folder / "missing"),
             "BIG": str(folder / "big.pem")}  # fmt: skip
    (folder / "not-pem").write_text("not PEM\n")
    (folder / "big.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (2 << 20))  # read no further than 1 MiB
    (folder / "token").write_text("a token never spent: the socket is refused first\n")
    live = AttestedWorkloadApiServer(NodeAgent(real_ca.address, real_ca.bundle_file, folder / "x"), names["LIVE"])
    live.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "meshid.cli", "agent", "--node", "--server", real_ca.address, "--bundle",
             str(real_ca.bundle_file), *(names.get(arg, arg) for arg in extra)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        live.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("meshid: ") and message.format(**names) in lines[-1], lines
    assert len(lines) == 1 or lines[0].startswith("usage: "), lines


# --- issue #13: a node agent started before its CA keeps trying the node attestation ---------------------


def _agent_token(ca: AgentCa, folder: Path) -> Path:
    with ca.admin() as admin:
        admin.create_entry(WEB, [], datetime.timedelta(minutes=10), parent_id=NODE_ID, selectors=["unix:user:meshid-a"])
        token_file = folder / "token"
        token_file.write_text(str(admin.create_agent_token("node-1").token))
    token_file.chmod(0o600)
    return token_file


def test_a_node_agent_started_before_its_ca_attests_once_the_ca_is_up(real_ca: AgentCa, folder: Path) -> None:
    token_file = _agent_token(real_ca, folder)
    real_ca.stop()
    agent = NodeAgentProcess(real_ca.address, real_ca.bundle_file, folder, "--join-token-file", str(token_file))
    try:
        eventually(lambda: agent.log.read_text().count("no CA answered") >= 2, 30, "two attempts at the attestation")
        assert agent.proc.poll() is None, agent.log.read_text()  # still trying, not crashed
        assert "retrying in" in agent.log.read_text()
        real_ca.restart()
        assert "serving 1 of 1 entries" in agent.ready()
    finally:
        code = agent.stop()
    assert code == 0 and "Traceback" not in agent.log.read_text(), agent.log.read_text()


def test_a_node_agent_whose_wait_runs_out_exits_3_and_one_stopped_by_sigterm_exits_0(
    real_ca: AgentCa, folder: Path
) -> None:
    token_file = _agent_token(real_ca, folder)
    real_ca.stop()
    waiting = NodeAgentProcess(
        real_ca.address, real_ca.bundle_file, folder, "--join-token-file", str(token_file), "--wait", "2s"
    )
    assert waiting.proc.wait(timeout=60) == 3, waiting.log.read_text()
    last = waiting.log.read_text().strip().splitlines()[-1]
    assert last.startswith("meshid: ") and "no CA answered" in last and "Traceback" not in waiting.log.read_text()
    waiting.stop()
    second = folder / "second"  # its own log: the first one's already says "no CA answered"
    second.mkdir()
    stopped = NodeAgentProcess(real_ca.address, real_ca.bundle_file, second, "--join-token-file", str(token_file))
    eventually(lambda: "no CA answered" in stopped.log.read_text(), 30, "a first attempt")
    stopped.proc.send_signal(signal.SIGTERM)  # while it waits for the CA
    assert stopped.proc.wait(timeout=20) == 0, stopped.log.read_text()
    assert stopped.proc.stdout is not None and "node agent: stopped" in stopped.proc.stdout.read()
    stopped.stop()


def test_sigterm_delivered_to_another_thread_of_the_node_agent_stops_it(real_ca: AgentCa, folder: Path) -> None:
    """As for `ca serve` and the sidecar agent (tests/agent/test_stopping.py): the signal lands on a
    grpc, grpclib or meshid thread while the main thread sleeps in its untimed wait."""
    agent = NodeAgentProcess(
        real_ca.address, real_ca.bundle_file, folder, "--join-token-file", str(_agent_token(real_ca, folder))
    )
    try:
        agent.ready()
        signal_another_thread(agent.proc.pid, signal.SIGTERM)
        assert agent.proc.wait(timeout=20) == 0, agent.log.read_text()
        assert agent.proc.stdout is not None and "node agent: stopped" in agent.proc.stdout.read()
    finally:
        agent.stop()
    assert "Traceback" not in agent.log.read_text()


def test_a_node_agent_whose_token_is_refused_exits_at_once(real_ca: AgentCa, folder: Path) -> None:
    token_file = folder / "token"
    token_file.write_text("example.org:" + "A" * 43)  # well formed, never made: the CA answers, refusing it
    token_file.chmod(0o600)
    agent = NodeAgentProcess(real_ca.address, real_ca.bundle_file, folder, "--join-token-file", str(token_file))
    assert agent.proc.wait(timeout=60) == 2, agent.log.read_text()
    assert "retrying in" not in agent.log.read_text() and "Traceback" not in agent.log.read_text()
    agent.stop()
