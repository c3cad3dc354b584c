"""The CA's gRPC API: the Issuer, Registration and Agent servicers, thin adapters from protobuf
to :class:`~meshid.ca.issuing.IssuingService` and :class:`~meshid.ca.agents.AgentService` (the
issuing logic; :mod:`meshid.ca.server` runs it all as a process).

Every refusal is an :class:`IssuanceError`, and a store that cannot be used a :class:`StoreError`;
:func:`status_for` is the one place that maps them to gRPC status codes. Anything else is a
bug: it is logged and answered ``INTERNAL`` without details.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid import metrics
from meshid._proto import (
    agent_pb2,
    agent_pb2_grpc,
    issuer_pb2,
    issuer_pb2_grpc,
    registration_pb2,
    registration_pb2_grpc,
)
from meshid._x509 import public_key_der
from meshid.bundle import TrustBundle
from meshid.ca.agents import AgentService
from meshid.ca.issuing import Issued, IssuingService
from meshid.ca.store import AgentRecord, Entry
from meshid.errors import (
    AlreadyExistsError,
    AttestationError,
    InvalidRequestError,
    IssuanceError,
    NotAuthorizedError,
    NotFoundError,
    RateLimitedError,
    StoreError,
    TokenError,
)
from meshid.peer import peer_identity
from meshid.spiffeid import SpiffeId

__all__ = ["AgentServicer", "IssuerServicer", "RegistrationServicer", "status_for"]

log = logging.getLogger("meshid.ca")

_STATUS: tuple[tuple[type[IssuanceError | StoreError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (TokenError, grpc.StatusCode.UNAUTHENTICATED),
    (AttestationError, grpc.StatusCode.UNAUTHENTICATED),
    (NotAuthorizedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
)

T = TypeVar("T")
_DER = serialization.Encoding.DER


def status_for(error: IssuanceError | StoreError) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


def _run(context: grpc.ServicerContext, what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except (IssuanceError, StoreError) as err:
        metrics.CA_REFUSALS.labels(type(err).__name__.removesuffix("Error").lower()).inc()
        context.abort(status_for(err), str(err))
    except Exception:
        log.exception("CA: %s failed", what)
        context.abort(grpc.StatusCode.INTERNAL, f"CA: {what} failed; see the CA's log")
    raise AssertionError("unreachable: abort raises")


def bundle_message(bundle: TrustBundle) -> issuer_pb2.Bundle:
    return issuer_pb2.Bundle(
        trust_domain=bundle.trust_domain.name,
        roots=[r.public_bytes(_DER) for r in bundle.roots],
        sequence=bundle.sequence or 0,
        jwt_keys=[
            issuer_pb2.JwtKey(kid=kid, public_key=public_key_der(key))
            for kid, key in sorted(bundle.jwt_authorities.items())
        ],
    )


def _svid_response(issued: Issued) -> issuer_pb2.SvidResponse:
    return issuer_pb2.SvidResponse(
        spiffe_id=str(issued.spiffe_id),
        chain=[c.public_bytes(_DER) for c in issued.chain],
        bundle=bundle_message(issued.bundle),
        issued_at=issued.issued_at.timestamp(),
    )


def _entry_message(entry: Entry) -> registration_pb2.Entry:
    return registration_pb2.Entry(
        spiffe_id=str(entry.spiffe_id),
        dns_names=list(entry.dns_names),
        ttl_seconds=int(entry.ttl.total_seconds()),
        created_at=int(entry.created_at.timestamp()),
        parent_id="" if entry.parent_id is None else str(entry.parent_id),
        selectors=list(entry.selectors),
        svid_types=list(entry.svid_types),
    )


def _agent_message(agent: AgentRecord) -> registration_pb2.AgentInfo:
    return registration_pb2.AgentInfo(
        spiffe_id=str(agent.spiffe_id),
        attestation=agent.attestation,
        attested_by=agent.attested_by,
        last_seen=int(agent.last_seen.timestamp()),
        expires_at=int(agent.expires_at.timestamp()),
        evicted=agent.evicted,
    )


def _refused(response: Any, spiffe_id: str, error: IssuanceError | StoreError) -> None:
    """One refused item of a batch response: its status code (:func:`status_for`) and message."""
    response.results.add(spiffe_id=spiffe_id, code=status_for(error).value[0], message=str(error))


def _counted(label: str, kind: str, caller: SpiffeId, issued: int, asked: int) -> None:
    """A batch's issuances counted under ``label`` and logged."""
    metrics.CA_ISSUANCES.labels(label).inc(issued)
    log.debug("CA: node agent %s got %d of %d %s(s) asked for in a batch", caller, issued, asked, kind)


def _caller(context: grpc.ServicerContext, what: str) -> tuple[SpiffeId, int | None, bytes | None]:
    """The verified caller of an mTLS call: its SPIFFE ID, its SVID's serial and public key."""
    peer = peer_identity(context)
    if peer.spiffe_id is None:  # the policy admits only SPIFFE peers here; belt and braces
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{what}: an X509-SVID is required")
    assert peer.spiffe_id is not None
    key = public_key_der(peer.certificate.public_key()) if peer.certificate is not None else None
    return peer.spiffe_id, peer.serial, key


class IssuerServicer(issuer_pb2_grpc.IssuerServicer):
    def __init__(self, service: IssuingService) -> None:
        self._service = service

    def IssueWithToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        issued = _run(context, "issuance", lambda: self._service.issue_with_token(request.join_token, request.csr))
        metrics.CA_ISSUANCES.labels("token").inc()
        log.info("CA: issued %s (serial %x) for a join token", issued.spiffe_id, issued.chain[0].serial_number)
        return _svid_response(issued)

    def Renew(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller, serial, key = _caller(context, "renewal")
        issued = _run(
            context, "renewal", lambda: self._service.renew(caller, request.csr, request.spiffe_id, serial, key)
        )
        metrics.CA_ISSUANCES.labels("renewal").inc()
        log.debug("CA: renewed %s (serial %x)", issued.spiffe_id, issued.chain[0].serial_number)
        return _svid_response(issued)

    def GetBundle(self, request: Any, context: grpc.ServicerContext) -> Any:
        return bundle_message(_run(context, "bundle", self._service.bundle))

    def GetCrl(self, request: Any, context: grpc.ServicerContext) -> Any:
        der, number = _run(context, "CRL", self._service.crl)
        return self._crl_message(der, number)

    def GetTrustUpdates(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The bundle and the CRL, each only if the caller's sequence or number is not current."""
        _caller(context, "trust updates")
        bundle = _run(context, "bundle", self._service.bundle)
        der, number = _run(context, "CRL", self._service.crl)
        reply = issuer_pb2.TrustUpdates()
        if not request.bundle_sequence or request.bundle_sequence != (bundle.sequence or 0):
            reply.bundle.CopyFrom(bundle_message(bundle))
        if not request.crl_number or request.crl_number != number:
            reply.crl.CopyFrom(self._crl_message(der, number))
        return reply

    def NewJwtSvid(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller, serial, _ = _caller(context, "JWT-SVID")
        audience = list(request.audience)
        svid = _run(
            context, "JWT-SVID", lambda: self._service.new_jwt_svid(caller, audience, request.spiffe_id, serial)
        )
        metrics.CA_ISSUANCES.labels("jwt").inc()
        # Routine traffic (a workload asks again at half of each token's 5 minutes): DEBUG, as
        # renewals; never the token itself.
        log.debug(
            "CA: issued a JWT-SVID for %s (kid %s, %d audience value(s), until %s)",
            svid.spiffe_id, svid.key_id, len(svid.audience), svid.expiry.isoformat(),
        )  # fmt: skip
        return issuer_pb2.JwtSvidResponse(spiffe_id=str(svid.spiffe_id), token=svid.token)

    def _crl_message(self, der: bytes, number: int) -> issuer_pb2.Crl:
        authority = self._service.authority
        chain = (authority.certificate, *authority.chain[1:]) if authority.chain else (authority.certificate,)
        return issuer_pb2.Crl(der=der, number=number, issuer_chain=[c.public_bytes(_DER) for c in chain])


class RegistrationServicer(registration_pb2_grpc.RegistrationServicer):
    def __init__(self, service: IssuingService, agents: AgentService) -> None:
        self._service = service
        self._agents = agents

    @staticmethod
    def _admin(context: grpc.ServicerContext) -> str:
        return peer_identity(context).describe()

    @staticmethod
    def _ttl(seconds: int) -> datetime.timedelta | None:
        return datetime.timedelta(seconds=seconds) if seconds else None

    def CreateEntry(self, request: Any, context: grpc.ServicerContext) -> Any:
        admin = self._admin(context)
        entry = _run(
            context,
            "entry creation",
            lambda: self._service.create_entry(
                admin,
                request.spiffe_id,
                list(request.dns_names),
                self._ttl(request.ttl_seconds),
                parent_id=request.parent_id,
                selectors=list(request.selectors),
                svid_types=list(request.svid_types),
            ),
        )
        parent = f" under node agent {entry.parent_id}" if entry.parent_id is not None else ""
        log.info("CA: %s registered %s%s", admin, entry.spiffe_id, parent)
        return _entry_message(entry)

    def ListEntries(self, request: Any, context: grpc.ServicerContext) -> Any:
        entries = _run(context, "entry listing", self._service.list_entries)
        return registration_pb2.ListEntriesResponse(entries=[_entry_message(e) for e in entries])

    def DeleteEntry(self, request: Any, context: grpc.ServicerContext) -> Any:
        _run(context, "entry deletion", lambda: self._service.delete_entry(request.spiffe_id))
        log.info("CA: %s deleted the entry of %s", self._admin(context), request.spiffe_id)
        return registration_pb2.DeleteEntryResponse()

    def CreateJoinToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        admin = self._admin(context)
        token, expires_at = _run(
            context,
            "token creation",
            lambda: self._service.create_token(admin, request.spiffe_id, self._ttl(request.ttl_seconds)),
        )
        log.info("CA: %s created a join token for %s", admin, request.spiffe_id)  # never the token itself
        return registration_pb2.JoinToken(token=token, expires_at=int(expires_at.timestamp()))

    def RevokeSvids(self, request: Any, context: grpc.ServicerContext) -> Any:
        target = request.WhichOneof("target")
        revoked = _run(
            context,
            "revocation",
            lambda: self._service.revoke(
                serial=request.serial if target == "serial" else "",
                spiffe_id=request.spiffe_id if target == "spiffe_id" else "",
            ),
        )
        log.info("CA: %s revoked %d SVID(s)", self._admin(context), len(revoked))
        return registration_pb2.RevokeSvidsResponse(serials=[format(s, "x") for s in revoked])

    def ListAgents(self, request: Any, context: grpc.ServicerContext) -> Any:
        agents = _run(context, "agent listing", self._agents.list_agents)
        return registration_pb2.ListAgentsResponse(agents=[_agent_message(a) for a in agents])

    def EvictAgent(self, request: Any, context: grpc.ServicerContext) -> Any:
        revoked = _run(context, "agent eviction", lambda: self._agents.evict(request.spiffe_id))
        log.info(
            "CA: %s evicted node agent %s (%d SVID(s) revoked)", self._admin(context), request.spiffe_id, len(revoked)
        )
        return registration_pb2.EvictAgentResponse(serials=[format(s, "x") for s in revoked])


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Node agents: attestation (open to unverified callers), then mTLS with the agent's SVID."""

    def __init__(self, agents: AgentService) -> None:
        self._agents = agents

    def GetAttestationChallenge(self, request: Any, context: grpc.ServicerContext) -> Any:
        challenge = _run(context, "attestation challenge", self._agents.challenge)
        return agent_pb2.AttestationChallenge(
            id=challenge.id, nonce=challenge.nonce, expires_at=challenge.expires_at.timestamp()
        )

    def AttestAgent(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = request.WhichOneof("method")
        if method == "join_token":
            issued, record = _run(
                context, "node attestation", lambda: self._agents.attest_with_token(request.join_token, request.csr)
            )
        elif method == "x509pop":
            proof = request.x509pop
            issued, record = _run(
                context,
                "node attestation",
                lambda: self._agents.attest_with_x509pop(
                    list(proof.certificate_chain), proof.challenge_id, proof.signature, request.csr
                ),
            )
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node attestation: give a join_token or an x509pop proof")
        metrics.CA_ISSUANCES.labels("agent").inc()
        by = f" ({record.attested_by})" if record.attested_by else ""
        log.info(
            "CA: node agent %s attested by %s%s (serial %x)",
            record.spiffe_id, record.attestation, by, issued.chain[0].serial_number,
        )  # fmt: skip
        return _svid_response(issued)

    def RenewAgent(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller, serial, key = _caller(context, "agent renewal")
        issued = _run(context, "agent renewal", lambda: self._agents.renew(caller, request.csr, serial, key))
        metrics.CA_ISSUANCES.labels("agent").inc()
        log.debug("CA: renewed node agent %s (serial %x)", issued.spiffe_id, issued.chain[0].serial_number)
        return _svid_response(issued)

    def SyncEntries(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller, _, _ = _caller(context, "entry sync")
        entries = _run(context, "entry sync", lambda: self._agents.sync_entries(caller))
        return agent_pb2.SyncEntriesResponse(
            entries=[
                agent_pb2.AgentEntry(
                    spiffe_id=str(e.spiffe_id),
                    selectors=list(e.selectors),
                    dns_names=list(e.dns_names),
                    ttl_seconds=int(e.ttl.total_seconds()),
                )
                for e in entries
            ]
        )

    def BatchNewX509Svid(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller, serial, key = _caller(context, "batch")
        asked = [(r.spiffe_id, r.csr) for r in request.requests]
        results = _run(context, "batch", lambda: self._agents.batch_new_svids(caller, asked, serial, key))
        response = agent_pb2.BatchNewX509SvidResponse()
        above: tuple[x509.Certificate, ...] | None = None
        for result in results:
            if result.issued is not None:
                chain = result.issued.chain
                if above is None:  # every SVID of a batch is signed by one CA key: its chain and bundle go once
                    above = chain[1:]
                    response.intermediates.extend(c.public_bytes(_DER) for c in above)
                    response.bundle.CopyFrom(bundle_message(result.issued.bundle))
                    response.issued_at = result.issued.issued_at.timestamp()
                elif chain[1:] != above:
                    context.abort(grpc.StatusCode.INTERNAL, "batch: the CA signed one batch with two keys")
                response.results.add(spiffe_id=result.spiffe_id, certificate=chain[0].public_bytes(_DER))
            else:
                assert result.error is not None
                _refused(response, result.spiffe_id, result.error)
        _counted("batch", "SVID", caller, sum(1 for r in results if r.issued is not None), len(results))
        return response

    def BatchNewJwtSvid(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller, serial, _ = _caller(context, "JWT batch")
        asked = [(r.spiffe_id, list(r.audience)) for r in request.requests]
        results = _run(context, "JWT batch", lambda: self._agents.batch_new_jwt_svids(caller, asked, serial))
        response = agent_pb2.BatchNewJwtSvidResponse()
        for result in results:
            if result.svid is not None:
                response.results.add(spiffe_id=result.spiffe_id, token=result.svid.token)
            else:
                assert result.error is not None
                _refused(response, result.spiffe_id, result.error)
        _counted("jwt-batch", "JWT-SVID", caller, sum(1 for r in results if r.svid is not None), len(results))
        return response
