"""Node agents, the CA's side: attestation, the agent's own renewal, entry sync, batch issuance,
eviction. No gRPC here; :mod:`meshid.ca.grpc_api` adapts it.

Rules enforced here:

* An agent's ID is ``spiffe://<td>/meshid/agent/<name>``, in the reserved namespace: no entry
  can be made for it, so it is obtained only by node attestation, never by a workload's token
  or renewal. Attestation is by a join token made for that ID (proves: whoever holds the token
  the admin made), or by x509pop (proves: whoever holds the key of a host certificate the
  agent-CA bundle vouches for; the name comes from the template, see :mod:`meshid.ca.x509pop`).
* Attesting again (a new token, a new x509pop proof) replaces the agent's record and ends an
  eviction. An evicted agent's SVIDs are revoked, and it can neither renew, sync nor ask for
  SVIDs until it attests again.
* Every new agent SVID and batch SVID brings a key no certificate of this CA was issued for
  before (the store records the SHA-256 of each such key), and a workload's SVID never carries
  the agent's own key.
* A batch is at most :data:`MAX_BATCH` requests; each is for an entry parented to the caller
  (else ``PERMISSION_DENIED`` for that request) and its CSR is checked as every CSR is (one
  that asks for another SPIFFE ID is refused, as in a renewal); the SVIDs of one batch are
  recorded in one transaction.
* A JWT batch is at most :data:`MAX_JWT_BATCH` requests, each for an entry parented to the caller
  (else ``PERMISSION_DENIED`` for that request, the same answer whether or not the entry exists)
  with an audience checked as :func:`~meshid.ca.issuing.check_audience` does.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshid import _x509
from meshid._x509 import key_sha256, public_key_der, spki_sha256
from meshid.ca.csr import parse_csr
from meshid.ca.issuing import Issued, IssuingService, agent_id, check_audience, is_agent_id, token_hash
from meshid.ca.store import AgentRecord, AgentSigner, BatchItem, Entry
from meshid.ca.turns import Turns
from meshid.ca.x509pop import Challenge, Challenges, X509Pop
from meshid.errors import (
    AttestationError,
    InvalidRequestError,
    InvalidSpiffeIdError,
    IssuanceError,
    NotAuthorizedError,
    TokenError,
)
from meshid.spiffeid import SpiffeId

if TYPE_CHECKING:
    from meshid.ca.authority import Authority
    from meshid.jwtsvid import JwtSvid

__all__ = ["DEFAULT_AGENT_TTL", "MAX_BATCH", "MAX_JWT_BATCH", "AgentService", "BatchResult", "JwtBatchResult"]

#: How long an agent's own SVID lives (capped by the CA's maximum TTL); it renews at will.
DEFAULT_AGENT_TTL = datetime.timedelta(hours=1)
#: The most requests one BatchNewX509Svid may carry (the CA's 64 KiB request limit holds about
#: 250 requests with P-256 CSRs; the client splits longer lists into several batches).
MAX_BATCH = 1000
#: The most requests one BatchNewJwtSvid may carry (an agent asks per workload and audience).
MAX_JWT_BATCH = 256


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request of a batch: what was asked for, and the SVID or why not."""

    spiffe_id: str
    issued: Issued | None = None
    error: IssuanceError | None = None


@dataclass(frozen=True, slots=True)
class JwtBatchResult:
    """One request of a JWT batch: what was asked for, and the JWT-SVID or why not."""

    spiffe_id: str
    svid: JwtSvid | None = None
    error: IssuanceError | None = None


class AgentService:
    """The node-agent side of one CA, over its :class:`IssuingService` (signing, store, clock).

    ``x509pop`` is what the CA trusts for x509pop node attestation (None: only join tokens).
    """

    def __init__(
        self,
        issuing: IssuingService,
        *,
        x509pop: X509Pop | None = None,
        agent_ttl: datetime.timedelta = DEFAULT_AGENT_TTL,
    ) -> None:
        self._issuing = issuing
        self._store = issuing.store
        self.x509pop = x509pop
        self._ttl = agent_ttl
        self._challenges = Challenges(issuing.now)
        # One X509 batch checks its CSRs and signs at a time, in the order they came (its commit
        # waits for the disk without its turn). Batches in parallel only took turns on the GIL,
        # and each turn (cryptography lets go of it to verify every CSR) was a context switch:
        # 2.6 to 2.9 per SVID, and some 80 us more CPU per SVID than one batch at a time (0.3).
        # In order: an agent reads its answers in the order it sent them.
        self._turns = Turns()

    def _sign_agent(self, public_key: object, now: datetime.datetime, key_sha256: bytes) -> AgentSigner:
        sign = self._issuing.signer(public_key, now, key_sha256=key_sha256)

        def sign_agent(sid: SpiffeId) -> tuple[int, datetime.datetime, object]:
            return sign(Entry(sid, (), self._ttl, now))

        return sign_agent

    def _issued(self, record: AgentRecord, chain: object, now: datetime.datetime) -> Issued:
        return Issued(record.spiffe_id, chain, self._issuing.bundle(), now)  # type: ignore[arg-type]

    # --- attestation (unauthenticated callers) ---------------------------------------------

    def challenge(self) -> Challenge:
        """A fresh x509pop challenge.

        Raises:
            AttestationError: this CA is not configured for x509pop.
        """
        self._require_x509pop()
        return self._challenges.issue()

    def attest_with_token(self, token: str, csr_der: bytes) -> tuple[Issued, AgentRecord]:
        """Node attestation with a join token made for an agent ID.

        Raises:
            InvalidRequestError: a bad CSR, or its key was certified before (nothing is consumed).
            TokenError: unknown, used, expired, or made for a workload's entry.
        """
        if not isinstance(token, str) or not token or len(token) > 512:
            raise TokenError("join token: missing or malformed")
        csr = parse_csr(csr_der)
        now = self._issuing.now()
        digest = key_sha256(csr.public_key)
        record, chain = self._store.attest_agent_with_token(
            token_hash(token), now, self._sign_agent(csr.public_key, now, digest), key_sha256=digest
        )
        return self._issued(record, chain, now), record

    def attest_with_x509pop(
        self, chain_der: Sequence[bytes], challenge_id: str, signature: bytes, csr_der: bytes
    ) -> tuple[Issued, AgentRecord]:
        """Node attestation by x509pop (see :mod:`meshid.ca.x509pop`); the challenge is spent
        once the proof verifies.

        Raises:
            InvalidRequestError: a bad CSR or chain, a template the certificate does not fill or
                that gives no valid SPIFFE ID path segment, a CSR over the host key itself, or a
                key certified before.
            AttestationError: x509pop is not configured, an unknown, expired or used challenge,
                a chain that does not verify to the agent-CA bundle, a signature that does not verify.
        """
        pop = self._require_x509pop()
        csr = parse_csr(csr_der)
        nonce, spend = self._challenges.nonce(challenge_id)
        now = self._issuing.now()
        proof = pop.verify(
            chain_der, signature, nonce, csr_der, now=now, trust_domain=self._issuing.authority.trust_domain
        )
        self._challenges.spend(spend)
        try:
            sid = agent_id(self._issuing.authority.trust_domain, proof.name)
        except InvalidSpiffeIdError as err:
            raise InvalidRequestError(
                f"x509pop: the agent ID template {pop.template} gives {proof.name[:100]!r} for this host certificate, "
                "which is not a SPIFFE ID path segment (letters, digits, '.', '-', '_')"
            ) from err
        key_der = public_key_der(csr.public_key)
        if key_der == proof.public_key_der:
            raise InvalidRequestError(
                "x509pop: the CSR is over the host key; the agent's SVID needs a key of its own (the host key proves "
                "the node only)"
            )
        digest = spki_sha256(key_der)
        record, chain = self._store.attest_agent(
            sid, "x509pop", proof.subject, now, self._sign_agent(csr.public_key, now, digest), key_sha256=digest
        )
        return self._issued(record, chain, now), record

    def _require_x509pop(self) -> X509Pop:
        if self.x509pop is None:
            raise AttestationError(
                "x509pop: this CA trusts no PKI for node attestation; attest with a join token, or configure it "
                "(`meshid ca init --agent-ca FILE --agent-id-template TEMPLATE`)"
            )
        return self.x509pop

    # --- the agent itself (mTLS with its SVID) ---------------------------------------------

    def _caller(self, caller: SpiffeId, what: str) -> SpiffeId:
        if not (caller.is_member_of(self._issuing.authority.trust_domain) and is_agent_id(caller)):
            raise NotAuthorizedError(f"{what}: {caller} is not a node agent of this CA")
        return caller

    def _batch_caller(self, caller: SpiffeId, caller_serial: int | None, count: int, limit: int, what: str) -> None:
        """What a batch checks before its items: a node agent, 1 to ``limit`` requests, an SVID not revoked."""
        self._caller(caller, what)
        if not count or count > limit:
            raise InvalidRequestError(f"{what}: give 1 to {limit} requests, not {count}")
        if self._issuing.is_revoked(caller_serial):
            raise NotAuthorizedError(f"{what}: the SVID {caller_serial:x} of {caller} is revoked")

    def renew(
        self, caller: SpiffeId, csr_der: bytes, caller_serial: int | None = None, caller_key: bytes | None = None
    ) -> Issued:
        """A new SVID for the calling agent, over a new key. A revocation of the caller's SVID
        that lands while this runs revokes the new one too (as workload renewal does).

        Raises:
            InvalidRequestError: a bad CSR, or its key is the current one or was certified before.
            NotAuthorizedError: the caller is not a node agent, the CSR asks for another SPIFFE
                ID, or the caller's SVID was revoked.
            AttestationError: the agent is unknown here, or evicted.
        """
        self._caller(caller, "agent renewal")
        csr = parse_csr(csr_der)
        for asked in csr.requested_uris:
            if asked != str(caller):
                raise NotAuthorizedError(f"agent renewal: {caller} may renew only its own SPIFFE ID, not {asked[:200]}")
        key_der = public_key_der(csr.public_key)
        if caller_key is not None and key_der == caller_key:
            raise InvalidRequestError(
                "agent renewal: the CSR reuses the key of the current SVID; make a new key for each renewal"
            )
        if self._issuing.is_revoked(caller_serial):
            raise NotAuthorizedError(f"agent renewal: the SVID {caller_serial:x} of {caller} is revoked")
        now = self._issuing.now()
        digest = spki_sha256(key_der)
        sign = self._sign_agent(csr.public_key, now, digest)
        record, chain = self._store.renew_agent(caller, now, sign, key_sha256=digest)
        issued = self._issued(record, chain, now)
        self._revoke_if_caller_revoked(caller, caller_serial, [issued.chain[0].serial_number])
        return issued

    def sync_entries(self, caller: SpiffeId) -> list[Entry]:
        """The entries parented to the calling agent.

        Raises:
            NotAuthorizedError: the caller is not a node agent. AttestationError: unknown or evicted.
        """
        self._caller(caller, "entry sync")
        return self._store.list_entries_for_agent(caller, self._issuing.now())

    def batch_new_svids(
        self,
        caller: SpiffeId,
        requests: Sequence[tuple[str, bytes]],
        caller_serial: int | None = None,
        caller_key: bytes | None = None,
    ) -> list[BatchResult]:
        """SVIDs for entries parented to the calling agent: one result per ``(spiffe_id, csr)``,
        in order, all recorded in one transaction.

        Raises:
            InvalidRequestError: no request, or more than :data:`MAX_BATCH`.
            NotAuthorizedError: the caller is not a node agent, or its SVID was revoked
                (also while the batch ran: what it issued is then revoked).
            AttestationError: the agent is unknown here, or evicted.
            StoreError: the store failed; nothing was recorded.
        """
        self._batch_caller(caller, caller_serial, len(requests), MAX_BATCH, "batch")
        with self._turns.take() as turn:  # ends here if it has not ended yet
            now = self._issuing.now()  # read in its turn: a batch may wait for the ones before it
            authority = self._issuing.authority  # one CA key for the whole batch (a rotation waits for the next)
            results, items = self._checked_requests(requests, caller_key, now, authority)
            # The store signs in this turn too, ends it, then writes (its durable commit).
            outcomes = iter(self._store.issue_batch(caller, items, now, signing=turn) if items else [])
        bundle = self._issuing.bundle()
        done: list[BatchResult] = []
        for (text, _), result in zip(requests, results, strict=True):
            if result is None:
                outcome = next(outcomes)
                if isinstance(outcome, IssuanceError):
                    result = BatchResult(text, error=outcome)
                else:
                    entry, chain = outcome
                    result = BatchResult(text, Issued(entry.spiffe_id, chain, bundle, now))  # type: ignore[arg-type]
            done.append(result)
        issued = [r.issued.chain[0].serial_number for r in done if r.issued is not None]
        self._revoke_if_caller_revoked(caller, caller_serial, issued)
        return done

    def _checked_requests(
        self,
        requests: Sequence[tuple[str, bytes]],
        caller_key: bytes | None,
        now: datetime.datetime,
        authority: Authority,
    ) -> tuple[list[BatchResult | None], list[BatchItem]]:
        """Per request, its refusal, or None and an item for the store to sign."""
        results: list[BatchResult | None] = []
        items: list[BatchItem] = []
        for text, csr_der in requests:
            try:
                sid = SpiffeId.parse(text)
                csr = parse_csr(csr_der)
            except (InvalidSpiffeIdError, TypeError) as err:
                results.append(BatchResult(str(text)[:2048], error=InvalidRequestError(f"batch: {err}")))
                continue
            except InvalidRequestError as err:
                results.append(BatchResult(text, error=err))
                continue
            key_der = public_key_der(csr.public_key)  # serialised once: compared, then hashed
            if caller_key is not None and key_der == caller_key:
                results.append(BatchResult(text, error=InvalidRequestError("CSR: it is over the agent's own key")))
                continue
            if any(asked != text for asked in csr.requested_uris):
                refusal = NotAuthorizedError(f"batch: the CSR for {text} asks for another SPIFFE ID")
                results.append(BatchResult(text, error=refusal))
                continue
            if _x509.is_post_quantum_key(csr.public_key):
                # Entries with a parent are classical only (create_entry), so the signer's check
                # of the entry's SVID types never fails a whole batch.
                classical_only = InvalidRequestError("batch: node agents serve classical SVIDs only; send an EC CSR")
                results.append(BatchResult(text, error=classical_only))
                continue
            results.append(None)
            digest = spki_sha256(key_der)  # recorded by the store, and the leaf's SKI
            signer = self._issuing.signer(csr.public_key, now, authority=authority, key_sha256=digest)
            items.append(BatchItem(sid, digest, signer))
        return results, items

    def batch_new_jwt_svids(
        self, caller: SpiffeId, requests: Sequence[tuple[str, Sequence[str]]], caller_serial: int | None = None
    ) -> list[JwtBatchResult]:
        """JWT-SVIDs for entries parented to the calling agent: one result per ``(spiffe_id,
        audience)``, in order. Nothing is recorded (a JWT-SVID is short-lived and not revocable).

        Raises:
            InvalidRequestError: no request, or more than :data:`MAX_JWT_BATCH`.
            NotAuthorizedError: the caller is not a node agent, or its SVID was revoked.
            AttestationError: the agent is unknown here, or evicted.
            StoreError: the store failed.
        """
        what = "JWT batch"
        self._batch_caller(caller, caller_serial, len(requests), MAX_JWT_BATCH, what)
        entries = {e.spiffe_id: e for e in self._store.list_entries_for_agent(caller, self._issuing.now())}
        results = []
        for text, audience in requests:
            try:
                sid = SpiffeId.parse(text)
                chosen = check_audience(audience, what)
            except (InvalidSpiffeIdError, TypeError) as err:
                results.append(JwtBatchResult(str(text)[:2048], error=InvalidRequestError(f"{what}: {err}")))
                continue
            except InvalidRequestError as err:
                results.append(JwtBatchResult(text, error=err))
                continue
            entry = entries.get(sid)
            if entry is None:
                refusal = NotAuthorizedError(f"{what}: {sid} has no entry parented to {caller}")
                results.append(JwtBatchResult(text, error=refusal))
                continue
            try:
                results.append(JwtBatchResult(text, svid=self._issuing.sign_jwt_svid(entry, chosen)))
            except IssuanceError as err:
                results.append(JwtBatchResult(text, error=err))
        return results

    def _revoke_if_caller_revoked(self, caller: SpiffeId, caller_serial: int | None, new: list[int]) -> None:
        if not self._issuing.is_revoked(caller_serial):
            return
        for serial in new:  # revoked while we signed (here, or on another replica): these go too
            self._store.revoke_serial(serial, self._issuing.now())
        self._issuing.note_revoked(new)
        raise NotAuthorizedError(f"agent: the SVID {caller_serial:x} of {caller} was revoked meanwhile")

    # --- admins ----------------------------------------------------------------------------

    def evict(self, spiffe_id: str) -> list[int]:
        """Evict a node agent: its unexpired SVIDs are revoked (the next CRL lists them) and it
        must attest again. Returns the serials revoked now.

        Raises:
            InvalidRequestError: not a node agent's ID of this trust domain.
            NotFoundError: no such agent ever attested here.
        """
        sid = self._issuing.agent(spiffe_id, "agent eviction")
        revoked = self._store.evict_agent(sid, self._issuing.now())
        self._issuing.note_revoked(revoked)
        return revoked

    def list_agents(self) -> list[AgentRecord]:
        return self._store.list_agents()
