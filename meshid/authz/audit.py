"""Decision records: one structured record per decision on the ``meshid.audit`` logger, and
gRFC A59's ``stdout_logger`` for gRPC authz policies that ask for it."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Callable

from meshid import metrics
from meshid.authz.model import Decision
from meshid.authz.policy import AuthorizationPolicy
from meshid.peer import PeerIdentity

__all__ = ["record"]

audit_log = logging.getLogger("meshid.audit")

#: The one metric label of every method the server does not implement.
UNKNOWN_METHOD = "(unknown)"
#: How much of an unknown method's name records and refusals show.
SHOWN_UNKNOWN = 256


def shown(method: str, known: bool) -> str:
    """A method name as records show it: an unknown one cut to ``SHOWN_UNKNOWN`` characters."""
    if known or len(method) <= SHOWN_UNKNOWN:
        return method
    return f"{method[:SHOWN_UNKNOWN]}...({len(method)} characters)"


def record(
    policy: AuthorizationPolicy,
    decision: Decision,
    method: str,
    peer: PeerIdentity | None,
    *,
    peer_address: str | Callable[[], str] | None = None,
    error: str | None = None,
    known: bool = True,
) -> None:
    """Log and count one decision. Cheap when nobody listens: fields are built only if the record is kept.

    ``known`` is False for a method the server does not implement: its name is the caller's to
    choose, so it is counted under ``(unknown)`` and shortened in records.
    """
    unauthenticated = (peer is None and not decision.allowed) or decision.reason == "revoked"
    metrics.count_decision(
        method if known else UNKNOWN_METHOD, "unauthenticated" if unauthenticated else decision.decision, decision.rule
    )
    method = shown(method, known)
    level = logging.INFO if decision.allowed else logging.WARNING
    if audit_log.isEnabledFor(level):
        fields = {
            "caller": peer.describe() if peer is not None else None,
            "method": method,
            "decision": decision.decision,
            "rule": decision.rule,
            "policy": policy.name,
            "reason": decision.reason if error is None else error,
            "serial": format(peer.serial, "x") if peer is not None and peer.serial is not None else None,
            "peer_address": peer_address() if callable(peer_address) else peer_address,
        }
        audit_log.log(level, "authz %s", json.dumps(fields, sort_keys=True), extra={"meshid_audit": fields})
    if policy.audit.loggers and policy.audit.wants(decision.allowed):
        # The shape grpc's own stdout_logger writes (gRFC A59).
        entry = {
            "grpc_audit_log": {
                "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
                "rpc_method": method,
                "principal": (peer.uri_sans or peer.dns_sans or (peer.subject,))[0] if peer is not None else "",
                "policy_name": policy.name,
                "matched_rule": decision.rule or "",
                "authorized": decision.allowed,
            }
        }
        if "stdout_logger" in policy.audit.loggers:
            sys.stdout.write(json.dumps(entry) + "\n")
            sys.stdout.flush()
