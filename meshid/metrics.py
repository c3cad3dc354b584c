"""Prometheus metrics (through ``prometheus-client``).

* ``meshid_authz_decisions_total{method,decision,rule}``: every authorization decision.
* ``meshid_authz_dry_run_differences_total{outcome,enforced_rule,candidate_rule}``: calls a
  candidate policy decides otherwise (``would_allow``, ``would_deny``).
* ``meshid_svid_expiry_seconds{spiffe_id}``: seconds until the SVID of each watched source expires.
* ``meshid_svid_renewals_total{spiffe_id,result}``: renewals by ``IssuerSource``, ok or error.
* ``meshid_ca_issuances_total{kind}`` and ``meshid_ca_refusals_total{reason}``: the CA's answers.
* ``meshid_ocsp_responses_total{outcome}``: the OCSP responder's answers (good, revoked, unknown,
  malformed, unauthorized, try_later, internal) and ``meshid_ocsp_response_seconds``: the time to make one.
* ``meshid_agent_reload_total{result}``: the agent's reload hook runs (``--exec``, ``--signal``), ok or error.

Metrics live in ``REGISTRY`` (a registry of meshid's own, so an application's registry is
untouched); :func:`serve_metrics` exposes it over HTTP, or add it to your own exposition.
"""

from __future__ import annotations

import datetime
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshid._decisions import MAX_DECISION_LABELS as MAX_DECISION_LABELS
from meshid._decisions import count_decision as count_decision
from meshid._decisions import decision_counter as decision_counter
from meshid._decisions import decisions as _decisions
from meshid._decisions import dry_runs as _dry_runs

__all__ = ["REGISTRY", "serve_metrics", "watch_source"]

REGISTRY = CollectorRegistry(auto_describe=True)

SVID_RENEWALS = Counter(
    "meshid_svid_renewals", "SVID renewals by IssuerSource.", ["spiffe_id", "result"], registry=REGISTRY
)
CA_ISSUANCES = Counter("meshid_ca_issuances", "SVIDs issued by the CA.", ["kind"], registry=REGISTRY)
CA_REFUSALS = Counter("meshid_ca_refusals", "Requests the CA refused.", ["reason"], registry=REGISTRY)
#: Labelled by meshid.ca.ocsp.OcspAnswer.outcome, a fixed set (never by anything the client sent).
OCSP_RESPONSES = Counter("meshid_ocsp_responses", "OCSP answers by outcome.", ["outcome"], registry=REGISTRY)
#: meshid agent's reload hook (--exec, --signal): runs by result, ok or error.
AGENT_RELOADS = Counter("meshid_agent_reload", "Reload hook runs after new SVID files.", ["result"], registry=REGISTRY)
OCSP_SECONDS = Histogram(
    "meshid_ocsp_response_seconds",
    "Time to make (parse, look up, sign) one OCSP answer.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0),
    registry=REGISTRY,
)


class _Decisions(Collector):
    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "meshid_authz_decisions", "Authorization decisions.", labels=["method", "decision", "rule"]
        )
        for labels, counter in list(_decisions.items()):
            next_value = counter.__reduce__()[1][0]  # count(N) pickles as (count, (N,))
            family.add_metric(list(labels), int(next_value) - 1)
        yield family
        dry = CounterMetricFamily(
            "meshid_authz_dry_run_differences",
            "Calls a candidate (dry-run) policy decides otherwise than the enforced one.",
            labels=["outcome", "enforced_rule", "candidate_rule"],
        )
        for labels, counter in list(_dry_runs.items()):
            dry.add_metric(list(labels), int(counter.__reduce__()[1][0]) - 1)
        yield dry


class _Expiry(Collector):
    def __init__(self) -> None:
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, source: Any) -> None:
        with self._lock:
            self._sources.add(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meshid_svid_expiry_seconds", "Seconds until the SVID expires.", labels=["spiffe_id"]
        )
        now = datetime.datetime.now(datetime.UTC)
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            try:
                svid = source.get_svid()
            except Exception:  # a source with no SVID yet has nothing to report
                continue
            family.add_metric([str(svid.spiffe_id)], (svid.not_after - now).total_seconds())
        yield family


_EXPIRY = _Expiry()
REGISTRY.register(_EXPIRY)
REGISTRY.register(_Decisions())


def watch_source(source: Any) -> None:
    """Report ``meshid_svid_expiry_seconds`` for this source (held weakly)."""
    _EXPIRY.add(source)


def serve_metrics(address: str) -> int:
    """Expose ``REGISTRY`` at ``http://HOST:PORT/metrics``; returns the bound port (0 picks one).

    Raises:
        InvalidAddressError (a ValueError): ``address`` is not ``HOST:PORT`` with a port from 0 to 65535.
        ListenError: the address is in use (another process serves there) or cannot be bound.
    """
    import errno

    from meshid._listen import parse_address
    from meshid.errors import InvalidAddressError, ListenError

    try:
        host, _, port = parse_address(address, port_zero=True).rpartition(":")
    except InvalidAddressError as err:
        raise InvalidAddressError(f"metrics: {err}") from err
    try:
        # http.server sets SO_REUSEADDR only, never SO_REUSEPORT: on Linux a second bind of a
        # port someone listens on fails (EADDRINUSE) instead of sharing its connections.
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=REGISTRY)
    except OSError as err:
        why = "the address is in use by another process" if err.errno == errno.EADDRINUSE else err.strerror or err
        raise ListenError(f"metrics: cannot listen on {address}: {why}") from err
    return int(server.server_port)


# --- the CRL in force, per trust domain (meshid.revocation) -----------------------------------------
# * ``meshid_crl_stale{trust_domain}``: 1 while the CRL in force is past its nextUpdate (it is
#   still enforced: fail-static), else 0.
# * ``meshid_crl_next_update_seconds{trust_domain}``: seconds until that nextUpdate (negative once past).
# Read at scrape time from every CrlWatcher and IssuerSource that holds a list (held weakly); when
# several hold one for the same trust domain, the one due soonest is reported.


class _CrlFreshness(Collector):
    def __init__(self) -> None:
        # holder -> (its list in force, its clock), both called with the holder
        self._holders: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, holder: Any, current: Any, now: Any) -> None:
        with self._lock:
            self._holders[holder] = (current, now)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stale = GaugeMetricFamily(
            "meshid_crl_stale",
            "1 while the CRL in force is past its nextUpdate (it is still enforced).",
            labels=["trust_domain"],
        )
        until = GaugeMetricFamily(
            "meshid_crl_next_update_seconds",
            "Seconds until the nextUpdate of the CRL in force (negative once past).",
            labels=["trust_domain"],
        )
        with self._lock:
            holders = list(self._holders.items())
        soonest: dict[str, float] = {}
        for holder, (current, now) in holders:
            try:
                crl = current(holder)
                if crl is None:  # nothing fetched yet: nothing to report
                    continue
                left = (crl.next_update - now(holder)).total_seconds()
            except Exception:
                continue
            td = str(crl.trust_domain)
            soonest[td] = min(left, soonest.get(td, left))
        for td, left in sorted(soonest.items()):
            stale.add_metric([td], 1.0 if left <= 0 else 0.0)
            until.add_metric([td], left)
        yield stale
        yield until


_CRL_FRESHNESS = _CrlFreshness()
REGISTRY.register(_CRL_FRESHNESS)


def watch_revocation(holder: Any, current: Any, now: Any) -> None:
    """Report ``meshid_crl_stale`` and ``meshid_crl_next_update_seconds`` for ``holder`` (held weakly).

    ``current(holder)`` returns its RevocationList in force (or None) and ``now(holder)`` the
    time on its clock; both take the holder as argument, so they do not keep it alive.
    """
    _CRL_FRESHNESS.add(holder, current, now)
