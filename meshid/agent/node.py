"""NodeAgent: one agent per host that serves each local workload the identities issued to it.

The agent proves its node to the CA once (a join token made for it, or x509pop with the host's
certificate and key) and keeps its own SVID (``spiffe://<td>/meshid/agent/<name>``) in its data
folder; after a restart it reuses that SVID while it is valid, so no new token is needed. Over one
mTLS channel with that SVID (:class:`~meshid.ca.client.AgentClient`) it renews its own SVID, syncs
the entries parented to it every ``sync_interval`` seconds, and obtains their SVIDs in batches
(the schedule is :mod:`meshid.agent.node_cache`'s). It is the :class:`IdentityProvider` of an
:class:`~meshid.workloadapi.AttestedWorkloadApiServer`: a process gets the SVIDs of the entries
whose selectors all match it, in the CA's order of entries (by SPIFFE ID), the first being the
default.

JWT-SVIDs (:meth:`NodeAgent.jwt_svid_for`, the attested Workload API's ``FetchJWTSVID``): for
an entry it serves, asked of the CA per SPIFFE ID and audience (``meshid.v1.Agent/BatchNewJwtSvid``)
and kept until half its lifetime (:class:`~meshid.agent.jwt_cache.JwtSvidCache`).

On disk, in the data folder: the agent's own SVID, key (0600) and bundle, written atomically.
Only in memory: the entries, their SVIDs and their private keys (a new key for every SVID).

Failures: the CA unreachable (or one replica of it): the next replica is tried, the SVIDs held are
served until they expire, and retries back off, capped so that they come closer together as the
first expiry nears (:func:`~meshid.agent.node_cache.retry_delay`); an outage shorter than the time
left at renewal loses no identity. The CA refusing the agent itself (evicted, its SVID revoked):
logged, :attr:`NodeAgentState.refused`; with x509pop the agent attests again; a join token is spent
once, so it attests again only with a token it has not used yet (given to a restart: the saved SVID
is still tried first, and the token kept for such a refusal).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import pathlib
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshid._background import Notifier, Unsubscribe, Worker
from meshid._files import write_svid_files
from meshid.agent._renewal import MIN_WAIT, renewal_wait
from meshid.agent.jwt_cache import JwtSvidCache
from meshid.agent.node_attestation import attest_node
from meshid.agent.node_cache import EntryCache, retry_delay
from meshid.agent.saved_svid import load_saved_svid, write_jwt_bundle
from meshid.bundle import BundleSet, TrustBundle
from meshid.ca.authority import generate_key
from meshid.ca.client import AgentClient, AgentEntry
from meshid.ca.issuing import is_agent_id
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import MeshIdError, RemoteError, SourceError, UnreachableError
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import X509Svid
from meshid.workloadapi.attestation import ProcessInfo, matches
from meshid.workloadapi.wire import same_trust

if TYPE_CHECKING:
    from meshid.jwtsvid import JwtSvid

__all__ = ["NodeAgent", "NodeAgentState"]

log = logging.getLogger("meshid.agent")

#: Status codes by which the CA refuses the agent itself (evicted, revoked): it must attest again.
_REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


@dataclass(frozen=True, slots=True)
class NodeAgentState:
    """What a :class:`NodeAgent` is doing, for health checks: its own SVID, its entries, its calls.

    ``read_at`` is when the state was read (``NodeAgent.state``), on the agent's clock:
    ``expired`` is measured then, on that clock (on the machine's for a state made by hand).
    """

    spiffe_id: str | None  # the agent's own SVID, and when it expires
    serial: str | None
    expires_at: datetime.datetime | None
    last_renewal: datetime.datetime | None
    entries: int  # parented to it, as of the last sync
    served: int  # of those, how many have an SVID to serve
    next_expiry: datetime.datetime | None  # the earliest NotAfter among the SVIDs served
    last_sync: datetime.datetime | None
    last_batch: datetime.datetime | None
    batches: int
    issued: int  # SVIDs obtained since start()
    failures: int  # calls that failed since start()
    last_error: str | None  # of the last failed call; None once a later step's calls all succeed
    refused: bool  # the CA refuses this agent (evicted, revoked): it must attest again
    server: str | None
    read_at: datetime.datetime | None = None

    @property
    def expired(self) -> bool:
        """Whether the agent's own SVID had expired when the state was read."""
        now = self.read_at if self.read_at is not None else datetime.datetime.now(datetime.UTC)
        return self.expires_at is not None and self.expires_at <= now


class NodeAgent:
    """A node agent: attests its node, keeps its own SVID, and serves its entries' SVIDs to the
    local processes that match them (as the provider of an ``AttestedWorkloadApiServer``).

    Args:
        server: the CA's ``HOST:PORT``, or several to fail over between.
        bundle_file: the CA's bundle (PEM), trusted for the first contact and kept as the anchor.
        data_dir: the agent's folder (created 0700): its own SVID, key (0600) and bundle.
        join_token: a token made for this agent (``meshid token create --agent NAME``); used at
            most once: when ``data_dir`` holds no reusable SVID, or when the CA refuses the saved one.
        x509pop_cert, x509pop_key: the host's certificate (PEM, with its intermediates) and key,
            from the PKI the CA trusts for agents (``meshid ca init --agent-ca``).
        trust_domain: for x509pop; by default the one the roots in ``bundle_file`` name.
        sync_interval: seconds between entry syncs: how soon a change at the CA is served.
        renew_at, jitter: SVIDs are renewed after ``renew_at`` of their lifetime, up to ``jitter``
            of it earlier (at random, and to join a batch).
        refresh_interval: at most this many seconds without a fresh bundle from the CA.
        max_backoff: the longest wait between retries while the CA is unreachable.
        timeout: of each call to the CA.
        clock: where the time comes from and how the loop waits (:class:`meshid.clock.ManualClock`).
        wait: how long :meth:`start` keeps trying the node attestation while no CA answers
            (None, the default: until one does; 0: once). A refusal ends it at once.

    Nothing happens until :meth:`start`.

    Raises:
        ValueError: no server, a bad ``renew_at``, ``jitter``, ``sync_interval`` or
            ``refresh_interval``, both a join token and x509pop, or only one of the x509pop
            certificate and key.
    """

    def __init__(
        self,
        server: str | Sequence[str],
        bundle_file: str | os.PathLike[str],
        data_dir: str | os.PathLike[str],
        *,
        join_token: str | None = None,
        x509pop_cert: str | os.PathLike[str] | None = None,
        x509pop_key: str | os.PathLike[str] | None = None,
        trust_domain: TrustDomain | str | None = None,
        sync_interval: float = 5.0,
        renew_at: float = 0.5,
        jitter: float = 0.1,
        refresh_interval: float = 60.0,
        max_backoff: float = 30.0,
        timeout: float = 10.0,
        key_kind: str = "ec-p256",
        clock: Clock = SYSTEM_CLOCK,
        wait: float | None = None,
    ) -> None:
        servers = [server] if isinstance(server, str) else list(server)
        if not servers or not all(isinstance(s, str) and s for s in servers):
            raise ValueError("server must be a HOST:PORT or a non-empty list of them")
        if not 0 < renew_at < 1:
            raise ValueError("renew_at must be between 0 and 1")
        if not 0 <= jitter < renew_at:
            raise ValueError("jitter must be at least 0 and less than renew_at")
        if not sync_interval > 0:
            raise ValueError("sync_interval must be more than 0 seconds")
        if not refresh_interval > 0:  # 0: a loop asking the CA for its bundle without pause
            raise ValueError("refresh_interval must be more than 0 seconds")
        if (x509pop_cert is None) != (x509pop_key is None):
            raise ValueError("give the x509pop host certificate and its key together")
        if join_token is not None and x509pop_cert is not None:
            raise ValueError("give a join token or an x509pop host certificate, not both")
        self._servers = servers
        self._bundle_file = os.fspath(bundle_file)
        self._data_dir = pathlib.Path(data_dir)
        self._join_token = join_token
        self._x509pop = None if x509pop_cert is None else (os.fspath(x509pop_cert), os.fspath(x509pop_key))  # type: ignore[arg-type]
        self._trust_domain = TrustDomain.parse(trust_domain) if isinstance(trust_domain, str) else trust_domain
        self._sync_interval = sync_interval
        self._renew_at, self._jitter = renew_at, jitter
        self._refresh_interval = refresh_interval
        self._max_backoff = max_backoff
        if wait is not None and wait < 0:
            raise ValueError("wait must be None (keep trying) or at least 0 seconds")
        self._wait = wait
        self._closing = threading.Event()
        self._timeout = timeout
        self._key_kind = key_kind
        self._clock = clock
        self._cache = EntryCache(renew_at=renew_at, jitter=jitter, max_backoff=max_backoff)
        self._notifier = Notifier()
        self._wake = threading.Event()
        self._worker = Worker("meshid-node-agent", self._run, wake=self._wake.set)
        self._client: AgentClient | None = None
        self._server_index = 0
        self._svid: X509Svid | None = None
        self._bundles: BundleSet | None = None
        self._lifetime = 0.0  # of the agent's own SVID
        self._next_renewal = self._next_sync = self._next_refresh = self._next_attest = 0.0  # monotonic
        self._not_before = 0.0  # after an unexpected failure, no step before this
        self._bundle_seen = float("-inf")
        self._agent_failures = self._batch_failures = 0
        self._last_renewal: datetime.datetime | None = None
        self._last_sync: datetime.datetime | None = None
        self._last_batch: datetime.datetime | None = None
        self._batches = self._issued = self._failures = 0
        self._last_error: str | None = None
        self._refused = False
        self._answers = 0  # calls the CA answered (a step whose calls all succeed clears last_error)
        self._jwt_cache = JwtSvidCache(clock=clock)
        self._jwt_lock = threading.Lock()
        self._jwt_client: AgentClient | None = None  # workload threads' JWT calls: a channel of their own

    # --- the IdentityProvider protocol ---------------------------------------------------

    def identities_for(self, process: ProcessInfo) -> list[tuple[X509Svid, BundleSet]]:
        """The SVIDs of the entries whose selectors all match ``process``, in the CA's order of
        entries (by SPIFFE ID), each with the agent's bundles; empty for none.

        Raises:
            WorkloadAttestationError: the process's executable changed while it was hashed.
        """
        bundles, served = self._bundles, self._cache.served
        if bundles is None:
            return []
        return [(svid, bundles) for selectors, svid in served if selectors is not None and matches(selectors, process)]

    def jwt_svid_for(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID of ``spiffe_id`` (an entry this agent serves; the caller attested it) for
        ``audience``: the cached one until half its lifetime, else one from the CA.

        Raises:
            SourceError: the agent holds no SVID of its own yet, or it is closed (and holds no
                cached one).
            RemoteError: the CA refused (``.code``) or is unreachable.
        """
        cached = self._jwt_cache.get(spiffe_id, audience)
        if cached is not None:
            return cached
        with self._jwt_lock:
            if self._closing.is_set():  # close() has closed the channel: open none it would leave open
                raise SourceError("node agent: closed; no new JWT-SVID is fetched")
            svid, bundles = self._svid, self._bundles
            if svid is None or bundles is None:
                raise SourceError("node agent: no SVID of its own yet")
            client = self._jwt_client
            if client is None or client.svid is not svid:
                if client is not None:
                    client.close()
                server = self._servers[self._server_index]
                client = self._jwt_client = AgentClient(server, svid, bundles, timeout=self._timeout)
            try:
                [result] = client.batch_new_jwt_svids([(str(spiffe_id), list(audience))])
            except RemoteError as err:
                if err.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    self._jwt_client = None
                    client.close()
                raise
        if result.svid is None:
            raise RemoteError(f"JWT-SVID for {spiffe_id}: {result.code}: {result.message}", result.code)
        self._jwt_cache.put(result.svid)
        return result.svid

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        """Call ``callback()`` after any change of what is served (an SVID, an entry, the bundles)."""
        return self._notifier.subscribe(callback)

    # --- what it holds ---------------------------------------------------------------------

    def entries(self) -> tuple[AgentEntry, ...]:
        """The entries parented to this agent as of the last sync, in the CA's order."""
        return self._cache.entries()

    @property
    def state(self) -> NodeAgentState:
        svid = self._svid
        expiries = [s.not_after for s in self._cache.svids()]
        return NodeAgentState(
            spiffe_id=None if svid is None else str(svid.spiffe_id),
            serial=None if svid is None else format(svid.serial, "x"),
            expires_at=None if svid is None else svid.not_after,
            last_renewal=self._last_renewal,
            entries=len(self._cache),
            served=len(expiries),
            next_expiry=min(expiries, default=None),
            last_sync=self._last_sync,
            last_batch=self._last_batch,
            batches=self._batches,
            issued=self._issued,
            failures=self._failures,
            last_error=self._last_error,
            refused=self._refused,
            server=self._servers[self._server_index],
            read_at=self._clock.now(),
        )

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        """Get the agent's SVID (the saved one, else by node attestation), sync and obtain the
        entries' SVIDs once (a failure there is logged and retried), then go on in a thread.

        Raises:
            SourceError: no reusable SVID, and attestation is impossible or was refused (or
                :meth:`close` was called while it waited for a CA).
            UnreachableError: no CA answered the node attestation within ``wait`` seconds.
            OSError: the data folder cannot be created.
        """
        if self._worker.running:
            return self
        self._closing.clear()
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self._load_saved():
            self._attest()
        self._step()
        if not self._worker.start(unless=self._closing) and self._closing.is_set():
            self.close()  # again: a channel opened after the other thread's close() is closed too
            raise SourceError("node agent: closed while it started")
        return self

    def close(self) -> None:
        """Stop the thread and close the channel to the CA (what was on disk stays); also ends a
        :meth:`start` still waiting for a CA to answer the node attestation, from another thread."""
        self._closing.set()
        self._worker.close()
        client, self._client = self._client, None
        if client is not None:
            client.close()
        with self._jwt_lock:
            jwt_client, self._jwt_client = self._jwt_client, None
        if jwt_client is not None:
            jwt_client.close()

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the agent's own SVID --------------------------------------------------------------

    def _load_saved(self) -> bool:
        saved = load_saved_svid(
            self._data_dir, self._bundle_file, clock=self._clock, who="node agent", otherwise="attesting the node"
        )
        if saved is None:
            return False
        if not is_agent_id(saved.svid.spiffe_id):
            log.warning(
                "node agent: %s in %s is not a node agent's SVID; attesting the node",
                saved.svid.spiffe_id,
                self._data_dir,
            )
            return False
        self._install_agent(saved.svid, saved.bundle, saved.remaining, renewed=False, write=False)
        log.info(
            "node agent: reusing the saved SVID of %s (serial %x); no attestation needed",
            saved.svid.spiffe_id,
            saved.svid.serial,
        )
        return True

    def _attest(self) -> None:
        if self._join_token is None and self._x509pop is None:
            raise SourceError(
                f"node agent: no reusable SVID in {self._data_dir} and no way to attest the node; give a join token "
                "(`meshid token create --agent NAME`) or an x509pop host certificate and key"
            )
        # While no CA answers (an agent may start before its CA), attestation is retried with the
        # renewals' capped backoff until ``wait`` runs out; a refusal ends it at once.
        deadline = None if self._wait is None else self._clock.monotonic() + self._wait
        failures = 0
        while True:
            try:
                index, issued = attest_node(
                    self._servers,
                    self._server_index,
                    self._bundle_file,
                    join_token=self._join_token,
                    x509pop=self._x509pop,
                    trust_domain=self._trust_domain,
                    key_kind=self._key_kind,
                    timeout=self._timeout,
                )
                break
            except UnreachableError as err:
                failures += 1
                left = None if deadline is None else deadline - self._clock.monotonic()
                if left is not None and left <= 0:
                    raise UnreachableError(f"{err} (tried for {self._wait:g}s)") from err
                delay = retry_delay(0.0, failures, 0.0, self._max_backoff, random.random)
                delay = delay if left is None else min(delay, left)
                self._last_error = str(err)
                log.warning("%s; retrying in %.2fs", err, delay)
                self._clock.wait(self._closing, delay)
                if self._closing.is_set():
                    raise SourceError("node agent: closed while waiting for a CA to attest the node") from err
        self._server_index = index
        self._join_token = None  # spent: never sent again
        # Not again for a moment even if this SVID is of no use: one that arrives expired by the
        # local clock (a clock running ahead of the CA's) must not turn into a loop of attestations.
        self._next_attest = self._clock.monotonic() + MIN_WAIT
        self._install_agent(issued.svid, issued.bundle, issued.lifetime.total_seconds(), renewed=False)

    def _install_agent(
        self, svid: X509Svid, bundle: TrustBundle, lifetime: float, *, renewed: bool, write: bool = True
    ) -> None:
        local_remaining = (svid.not_after - self._clock.now()).total_seconds()
        self._lifetime = max(0.0, min(lifetime, local_remaining))
        self._svid = svid
        self._take_bundle(bundle, write=False)
        self._next_renewal = self._clock.monotonic() + renewal_wait(self._lifetime, self._renew_at, self._jitter)
        self._agent_failures, self._refused = 0, False
        if renewed:
            self._last_renewal = self._clock.now()
        else:  # a new agent SVID: a new channel (AgentClient.renew moves its own)
            self._disconnect()
        if write:
            self._write()

    def _write(self) -> None:
        svid, bundles = self._svid, self._bundles
        assert svid is not None and bundles is not None
        try:
            own = bundles[svid.spiffe_id.trust_domain]
            write_svid_files(self._data_dir, svid.chain_pem(), svid.key_pem(), own.to_pem())
            write_jwt_bundle(self._data_dir, own)
        except OSError as err:  # serve on; a restart would attest again
            self._last_error = f"cannot write {self._data_dir}: {err}"
            log.error("node agent: %s", self._last_error)

    def _take_bundle(self, bundle: TrustBundle, *, write: bool = True) -> bool:
        """Adopt the CA's bundle as it came with a response; returns whether it changed."""
        self._bundle_seen = self._clock.monotonic()
        old = self._bundles
        held = None if old is None else old.get(bundle.trust_domain)
        if held == bundle:
            return False
        self._bundles = (old or BundleSet.of()).with_bundle(bundle)
        if held is not None and same_trust(held, bundle):
            return False  # the same roots (a bundle read from a file has no sequence number)
        if old is not None:
            log.info("node agent: trust bundle of %s changed (sequence %s)", bundle.trust_domain, bundle.sequence)
            self._disconnect()  # the channel trusts the roots it was made with
            if write:
                self._write()
        return True

    # --- the CA, through one channel ----------------------------------------------------------

    def _connected(self) -> AgentClient:
        if self._client is None:
            assert self._svid is not None and self._bundles is not None
            self._client = AgentClient(
                self._servers[self._server_index], self._svid, self._bundles, timeout=self._timeout
            )
        return self._client

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _failed(self, what: str, err: Exception, delay: float) -> None:
        self._failures += 1
        self._last_error = f"{what}: {err}"
        if getattr(err, "code", None) in _REFUSED:
            self._refused = True
            if self._x509pop is not None:
                again = "attesting again by x509pop"
            elif self._join_token is not None:
                again = "attesting again with the join token it was given"
            else:
                again = "give it a new join token and restart it"
            log.error("node agent: the CA refuses this agent (%s): %s; %s", what, err, again)
            return
        log.warning("node agent: %s failed: %s; retrying in %.2fs", what, err, delay)
        # Unreachable, or an answer that makes no sense: the next replica, on a new connection
        # (a channel that failed to connect waits out grpc's own backoff before trying again).
        self._disconnect()
        self._server_index = (self._server_index + 1) % len(self._servers)

    def _remaining(self, not_after: datetime.datetime | None) -> float:
        return 0.0 if not_after is None else (not_after - self._clock.now()).total_seconds()

    def _renew_agent(self) -> None:
        assert self._svid is not None
        try:
            issued = self._connected().renew(key_kind=self._key_kind)
        except (MeshIdError, ValueError) as err:
            self._agent_failures += 1
            delay = retry_delay(
                self._lifetime,
                self._agent_failures,
                self._remaining(self._svid.not_after),
                self._max_backoff,
                random.random,
            )
            self._next_renewal = self._clock.monotonic() + delay
            expired = self._remaining(self._svid.not_after) <= 0
            what = f"renewal of its own SVID (EXPIRED at {self._svid.not_after.isoformat()})" if expired else ""
            self._failed(what or "renewal of its own SVID", err, delay)
            return
        self._answers += 1
        self._install_agent(issued.svid, issued.bundle, issued.lifetime.total_seconds(), renewed=True)
        log.info(
            "node agent: renewed its own SVID (serial %x, until %s)",
            issued.svid.serial,
            issued.svid.not_after.isoformat(),
        )

    def _can_attest(self) -> bool:
        """Whether the agent can attest again: by x509pop, or with a join token not yet spent (one
        given to a restart, while the saved SVID was still reused)."""
        return self._x509pop is not None or self._join_token is not None

    def _must_attest(self) -> bool:
        """Refused by the CA, or its own SVID expired (the CA down too long): attest again if it can."""
        expired = self._svid is not None and self._remaining(self._svid.not_after) <= 0
        return (self._refused or expired) and self._can_attest()

    def _reattest(self) -> None:
        try:
            self._attest()
        except MeshIdError as err:
            self._agent_failures += 1
            delay = retry_delay(self._lifetime, self._agent_failures, 0.0, self._max_backoff, random.random)
            self._next_attest = self._clock.monotonic() + delay
            self._failures += 1
            self._last_error = str(err)
            log.error("node agent: %s; trying again in %.2fs", err, delay)
            return
        self._next_sync = 0.0

    def _sync(self) -> bool:
        self._next_sync = self._clock.monotonic() + self._sync_interval
        try:
            entries = self._connected().sync_entries()
        except (MeshIdError, ValueError) as err:
            self._failed("entry sync", err, self._sync_interval)
            return False
        self._last_sync, self._refused = self._clock.now(), False
        self._answers += 1
        before = {str(e.spiffe_id): e for e in self._cache.entries()}
        changed = self._cache.sync(entries)
        after = {str(e.spiffe_id): e for e in entries}
        if before != after:
            log.info(
                "node agent: %d entries (%d new, %d deleted, %d changed)",
                len(after),
                len(after.keys() - before.keys()),
                len(before.keys() - after.keys()),
                sum(1 for k in after.keys() & before.keys() if after[k] != before[k]),
            )
        return changed

    def _batch(self) -> bool:
        now = self._clock.monotonic()
        due = self._cache.due(now)
        if not due:
            return False
        # new keys, in memory only, each made as its CSR is built
        make_key = functools.partial(generate_key, self._key_kind)
        try:
            results = self._connected().batch_new_svids([(sid, make_key) for sid in due])
        except (MeshIdError, ValueError) as err:
            self._batch_failures += 1
            first = self._cache.earliest_expiry(due)
            delay = self._cache.failed(due, self._batch_failures, now, self._remaining(first))
            expired = sum(1 for sid in due if (e := self._cache.expiry(sid)) is not None and self._remaining(e) <= 0)
            note = f" ({expired} of them EXPIRED)" if expired else ""
            self._failed(f"batch of {len(due)} SVIDs{note}", err, delay)
            return False
        self._batch_failures, self._refused = 0, False
        self._batches += 1
        self._answers += 1
        self._last_batch = self._clock.now()
        issued, bundle = 0, None
        for result in results:
            if result.issuance is None:
                left = self._remaining(self._cache.expiry(result.spiffe_id))
                delay = self._cache.refused(result.spiffe_id, now, left)
                log.warning(
                    "node agent: the CA refused the SVID of %s: %s: %s; retrying in %.2fs, syncing now",
                    result.spiffe_id,
                    result.code,
                    result.message,
                    delay,
                )
                self._next_sync = 0.0  # the entry may have been deleted or moved: ask
                continue
            svid = result.issuance.svid
            lifetime = min(result.issuance.lifetime.total_seconds(), self._remaining(svid.not_after))
            self._cache.issued(result.spiffe_id, svid, max(0.0, lifetime), now)
            issued, bundle = issued + 1, result.issuance.bundle
        self._issued += issued
        log.info("node agent: batch of %d: %d SVIDs issued, %d refused", len(due), issued, len(due) - issued)
        changed = bundle is not None and self._take_bundle(bundle)
        return self._cache.publish() or changed

    def _refresh(self) -> bool:
        from meshid.ca.client import get_bundle_with_svid

        now = self._clock.monotonic()
        self._next_refresh = now + self._refresh_interval
        if now - self._bundle_seen < self._refresh_interval or self._svid is None or self._bundles is None:
            return False  # a response brought the bundle recently
        server = self._servers[self._server_index]
        try:
            bundle = get_bundle_with_svid(server, self._svid, self._bundles, timeout=self._timeout)
        except MeshIdError as err:
            self._failed("bundle refresh", err, self._refresh_interval)
            return False
        self._answers += 1
        return self._take_bundle(bundle)

    # --- the loop ----------------------------------------------------------------------------

    def _step(self) -> None:
        """One pass: whatever is due, in order (the agent's SVID, a sync, a batch, the bundle)."""
        failures, answers, changed = self._failures, self._answers, False
        try:
            now = self._clock.monotonic()
            if self._must_attest() and now >= self._next_attest:
                self._reattest()
            if now >= self._next_renewal:
                self._renew_agent()
            if now >= self._next_sync:
                changed |= self._sync()
            changed |= self._batch()
            if now >= self._next_refresh:
                changed |= self._refresh()
        except Exception as err:  # the loop must outlive any one failure: every workload depends on it
            log.exception("node agent: unexpected failure; going on in a second")
            self._failures += 1
            self._last_error = f"unexpected: {err}"
            self._not_before = self._clock.monotonic() + 1.0
        if self._failures == failures and self._answers > answers:
            self._last_error = None
        if changed:
            self._notifier.notify()

    def _next_wakeup(self) -> float:
        wakeups = [self._next_renewal, self._next_sync, self._cache.next_due(), self._next_refresh]
        if self._must_attest():
            wakeups.append(self._next_attest)
        return max(self._not_before, min(wakeups))

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            timeout = max(0.0, self._next_wakeup() - self._clock.monotonic())
            self._clock.wait(self._wake, timeout)
            self._wake.clear()
            if not stop.is_set():
                self._step()
