"""Dry-run records: a call that a candidate policy decides otherwise than the enforced one.

The interceptor can carry a *candidate* policy beside the one it enforces. Every call is decided
by the enforced policy; the candidate's decision is taken with it, once per memoised decision,
and when the outcomes differ the call is one record on the ``meshid.dryrun`` logger (at
WARNING, whichever way they differ) and one count of
``meshid_authz_dry_run_differences_total{outcome,enforced_rule,candidate_rule}``::

    dryrun {"dry_run": "would_deny", "caller": "spiffe://example.org/ns/dev/sa/batch",
            "method": "/pkg.Svc/Get", "policy": "prod", "rule": "batch-reads",
            "candidate_policy": "prod-next", "candidate_rule": null,
            "candidate_reason": "no rule allows it (default deny)", "peer_address": "ipv4:...", ...}

``would_deny``: allowed now, denied by the candidate; ``would_allow``: the reverse. Calls the
two decide alike (also when by different rules) are not recorded. What is settled before a
policy decides is the enforced policy's alone, and not compared: whether a certificate verifies
(so a candidate's ``allow_non_spiffe_peers`` admits no one the enforced policy does not),
TLS 1.2 (``allow_tls12``), revocation, and unauthenticated methods. The record is written as
audit records are (:mod:`meshid.authz.audit`): built once, written off the call path.
"""

from __future__ import annotations

import json
import logging

from meshid import _decisions
from meshid.authz import audit
from meshid.authz.model import Decision
from meshid.authz.policy import AuthorizationPolicy
from meshid.peer import PeerIdentity

__all__ = ["dry_run_log", "prepare"]

dry_run_log = logging.getLogger("meshid.dryrun")


def prepare(
    enforced: AuthorizationPolicy,
    candidate: AuthorizationPolicy,
    decision: Decision,
    candidate_decision: Decision,
    method: str,
    peer: PeerIdentity,
    *,
    known: bool = True,
) -> audit.Prepared | None:
    """The record of a call the two policies decide otherwise; None when they agree."""
    if decision.allowed == candidate_decision.allowed:
        return None
    outcome = "would_allow" if candidate_decision.allowed else "would_deny"
    fields: dict[str, object] = {
        "dry_run": outcome,
        "caller": peer.describe(),
        "method": audit.shown(method, known),
        "policy": enforced.name,
        "rule": decision.rule,
        "candidate_policy": candidate.name,
        "candidate_rule": candidate_decision.rule,
        "candidate_reason": candidate_decision.reason,
        **audit.peer_fields(peer),
    }
    head, _, tail = json.dumps({**fields, "peer_address": audit._MARK}, sort_keys=True).partition(
        json.dumps(audit._MARK)
    )
    counter = _decisions.dry_run_counter(outcome, decision.rule, candidate_decision.rule)
    return audit.Prepared(counter, logging.WARNING, fields, None, (head, tail), logger=dry_run_log, message="dryrun %s")
