"""The authorization decision counters: plain ``itertools.count`` objects per label set, read by
:mod:`meshid.metrics` at scrape time. Apart from it so that deciding a call loads no Prometheus
client (``prometheus_client`` and ``http.server`` are a third of ``import meshid``'s core)."""

from __future__ import annotations

import itertools

__all__ = ["MAX_DECISION_LABELS", "count_decision", "decision_counter", "decisions", "dry_run_counter", "dry_runs"]

# Decisions are counted on every call, so not through prometheus_client's Counter (a lock and
# a few calls per increment): an itertools.count per label set, whose next() is atomic in
# CPython, read by a collector at scrape time.
decisions: dict[tuple[str, str, str], itertools.count[int]] = {}

#: Label sets kept for decisions; past it (a generic handler that takes any method name) new
#: methods count under "(unknown)", as unimplemented ones always do.
MAX_DECISION_LABELS = 4096


def decision_counter(method: str, decision: str, rule: str | None) -> itertools.count[int]:
    """The counter of one label set: ``next()`` on it counts a decision (atomic, no lock).

    ``method`` must be a method the server implements, or ``(unknown)``: the interceptor never
    passes a name the caller chose. The interceptor keeps the counter with a memoised decision,
    so a repeated decision costs one ``next()``.
    """
    key = (method, decision, rule or "")
    counter = decisions.get(key)
    if counter is None:
        if len(decisions) >= MAX_DECISION_LABELS:
            key = ("(unknown)", decision, rule or "")
        counter = decisions.setdefault(key, itertools.count(1))
    return counter


def count_decision(method: str, decision: str, rule: str | None) -> None:
    """One decision: a dict lookup and an atomic increment."""
    next(decision_counter(method, decision, rule))


#: A dry run's differences, by (outcome, the enforced policy's rule, the candidate's rule): the
#: outcome is ``would_allow`` or ``would_deny``; rule names come from the policy files, never
#: from the caller.
dry_runs: dict[tuple[str, str, str], itertools.count[int]] = {}


def dry_run_counter(outcome: str, enforced_rule: str | None, candidate_rule: str | None) -> itertools.count[int]:
    """The counter of one dry-run difference; past ``MAX_DECISION_LABELS`` label sets (many
    reloaded policies with ever new rule names) the rules count as ``(other)``."""
    key = (outcome, enforced_rule or "", candidate_rule or "")
    counter = dry_runs.get(key)
    if counter is None:
        if len(dry_runs) >= MAX_DECISION_LABELS:
            key = (outcome, "(other)", "(other)")
        counter = dry_runs.setdefault(key, itertools.count(1))
    return counter
