"""Decision records: one structured record per audited decision on the ``meshid.audit`` logger,
and gRFC A59's ``stdout_logger`` for gRPC authz policies that ask for it.

Which decisions are audited is the policy's choice (its audit condition: ``NONE``, ``ON_DENY``,
``ON_ALLOW``, ``ON_DENY_AND_ALLOW``; a policy that sets none audits every decision); which of
them are written is the logger's: allows are recorded at INFO, denies at WARNING, so
``meshid.audit`` at INFO keeps both and at WARNING only denies.

A record costs little on the call path: what a decision's record holds is built once, with the
memoised decision (:func:`prepare`), and a call adds only the time and its peer address. With an
:class:`AuditWriter` started (the interceptor's ``start()`` or ``with`` block), the JSON, the
``LogRecord``, the handlers' formatting and their I/O happen on the writer's thread; without
one they happen in the call, as any logging call does.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import json
import logging
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps writes a str as
from typing import Any

from meshid import _decisions
from meshid.authz.model import Decision
from meshid.authz.policy import AuthorizationPolicy
from meshid.peer import PeerIdentity

__all__ = ["AuditWriter", "Prepared", "emit", "hand_off", "prepare", "record"]

audit_log = logging.getLogger("meshid.audit")
log = logging.getLogger("meshid.authz")

#: The reason of a call to an unauthenticated method (open to every caller).
OPEN = "unauthenticated method"
#: The one metric label of every method the server does not implement.
UNKNOWN_METHOD = "(unknown)"
#: How much of an unknown method's name records and refusals show.
SHOWN_UNKNOWN = 256
_START: float = logging._startTime  # type: ignore[attr-defined]  # what relativeCreated counts from
#: How long the writer's thread waits after a record for more, to write them in one batch (seconds).
LINGER = 0.05
#: Records waiting for the writer's thread, past which a call writes its own (the queue is bounded).
MAX_QUEUED = 65536


def shown(method: str, known: bool) -> str:
    """A method name as records show it: an unknown one cut to ``SHOWN_UNKNOWN`` characters."""
    if known or len(method) <= SHOWN_UNKNOWN:
        return method
    return f"{method[:SHOWN_UNKNOWN]}...({len(method)} characters)"


@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """What every record of one decision shares, built once per memoised decision.

    ``fields`` is the ``meshid.audit`` record without its peer address (None: the policy does
    not audit this decision); ``grpc_entry`` the A59 entry without its timestamp (None: no A59
    logger wants it).
    """

    counter: itertools.count[int]
    level: int
    fields: Mapping[str, object] | None
    grpc_entry: Mapping[str, object] | None
    #: The record's JSON before and after the peer address (keys sorted, as ``json.dumps`` does).
    text: tuple[str, str] = ("", "")
    #: Where ``fields`` is recorded, and the message around its JSON (a dry run's differences
    #: go to ``meshid.dryrun``, see :mod:`meshid.authz.dryrun`).
    logger: logging.Logger = audit_log
    message: str = "authz %s"


def _counter(decision: Decision, method: str, peer: PeerIdentity | None, known: bool) -> itertools.count[int]:
    unauthenticated = (peer is None and not decision.allowed) or decision.reason == "revoked"
    return _decisions.decision_counter(
        method if known else UNKNOWN_METHOD, "unauthenticated" if unauthenticated else decision.decision, decision.rule
    )


def _a59_wants(policy: AuthorizationPolicy, allowed: bool) -> bool:
    """Whether the policy's gRFC A59 ``stdout_logger`` writes this decision."""
    return "stdout_logger" in policy.audit.loggers and policy.audit.wants(allowed)


def prepare(
    policy: AuthorizationPolicy,
    decision: Decision,
    method: str,
    peer: PeerIdentity | None,
    *,
    error: str | None = None,
    known: bool = True,
) -> Prepared:
    """Build the parts of a decision's record that do not change from call to call.

    ``known`` is False for a method the server does not implement: its name is the caller's to
    choose, so it is counted under ``(unknown)`` and shortened in records.
    """
    counter = _counter(decision, method, peer, known)
    method = shown(method, known)
    fields: dict[str, object] | None = None
    if policy.audit.audits(decision.allowed):
        fields = {
            "caller": peer.describe() if peer is not None else None,
            "method": method,
            "decision": decision.decision,
            "rule": decision.rule,
            "policy": policy.name,
            "reason": decision.reason if error is None else error,
            "serial": format(peer.serial, "x") if peer is not None and peer.serial is not None else None,
            # what `meshid policy replay` needs to decide the call again under another policy
            "stage": "authentication" if error is not None else "open" if decision.reason == OPEN else "policy",
            **peer_fields(peer),
        }
    grpc_entry: dict[str, object] | None = None
    if _a59_wants(policy, decision.allowed):
        # The shape grpc's own stdout_logger writes (gRFC A59).
        grpc_entry = {
            "rpc_method": method,
            "principal": (peer.uri_sans or peer.dns_sans or (peer.subject,))[0] if peer is not None else "",
            "policy_name": policy.name,
            "matched_rule": decision.rule or "",
            "authorized": decision.allowed,
        }
    level = logging.INFO if decision.allowed else logging.WARNING
    text = ("", "")
    if fields is not None:
        head, _, tail = json.dumps({**fields, "peer_address": _MARK}, sort_keys=True).partition(json.dumps(_MARK))
        text = (head, tail)
    return Prepared(counter, level, fields, grpc_entry, text)


_MARK = "\x00meshid peer address\x00"


def peer_fields(peer: PeerIdentity | None) -> dict[str, object]:
    """The parts of a peer a policy decides by, besides the caller's name (``describe()``)."""
    if peer is None:
        return {"trust_domain": None, "has_spiffe_id": False, "thumbprint": None, "dns_sans": [], "key_exchange": None}
    return {
        "trust_domain": peer.trust_domain.name,
        "has_spiffe_id": peer.spiffe_id is not None,
        "thumbprint": peer.thumbprint or None,
        # DNS SANs decide only for a peer without a SPIFFE ID (dns_names rules, gRPC principals)
        "dns_sans": list(peer.dns_sans) if peer.spiffe_id is None else [],
        "key_exchange": peer.key_exchange_group,
        # only for a caller named by a JWT-SVID: certificate callers' records stay as they were
        **({"identity_source": "jwt"} if peer.source == "jwt" else {}),
    }


def emit(prepared: Prepared, peer_address: str | Callable[[], str | bytes] | None, writer: AuditWriter | None) -> None:
    """Count one decision and hand its records to ``writer`` (or write them now, without one).

    ``peer_address`` may give the address as grpc's core does, in bytes (the sync fast path
    passes the call's own accessor): it is decoded where the record is written, off the call.
    """
    next(prepared.counter)
    logged = prepared.fields is not None and prepared.logger.isEnabledFor(prepared.level)
    if logged or prepared.grpc_entry is not None:
        hand_off(prepared, peer_address, writer, logged)


def hand_off(
    prepared: Prepared, peer_address: str | Callable[[], str | bytes] | None, writer: AuditWriter | None, logged: bool
) -> None:
    """The second half of :func:`emit`, for a counted decision that a logger wants: hand its
    records to ``writer`` (or write them now). ``logged``: the ``meshid.audit`` record is kept
    (else only the gRFC A59 entry is written)."""
    address = None
    if logged:  # the address is fetched only for a record that is kept
        address = peer_address() if callable(peer_address) else peer_address
    item = (time.time(), prepared, address, logged)
    if writer is None or not writer.offer(item):
        _write(item)


def record(
    policy: AuthorizationPolicy,
    decision: Decision,
    method: str,
    peer: PeerIdentity | None,
    *,
    peer_address: str | Callable[[], str] | None = None,
    error: str | None = None,
    known: bool = True,
    writer: AuditWriter | None = None,
) -> None:
    """Count and record one decision that is not memoised (:func:`prepare` then :func:`emit`).

    A decision no logger keeps is only counted: its record is never built.
    """
    kept = policy.audit.audits(decision.allowed) and audit_log.isEnabledFor(
        logging.INFO if decision.allowed else logging.WARNING
    )
    if not kept and not _a59_wants(policy, decision.allowed):
        next(_counter(decision, method, peer, known))
        return
    emit(prepare(policy, decision, method, peer, error=error, known=known), peer_address, writer)


Item = tuple[float, Prepared, str | bytes | None, bool]


def _write(item: Item, template: dict[str, Any] | None = None) -> None:
    """Write one item's records. ``template``: the attributes every ``LogRecord`` made on this
    thread shares (made once per thread: ``LogRecord.__init__`` costs more than the rest)."""
    created, prepared, address, logged = item
    if isinstance(address, bytes):  # as grpc's core gives it (see emit)
        address = address.decode("utf-8", "replace")
    if logged and prepared.fields is not None:
        fields = {**prepared.fields, "peer_address": address}
        head, tail = prepared.text
        text = head + ("null" if address is None else _json_string(address)) + tail
        logger = prepared.logger
        if template is None:
            entry = logger.makeRecord(logger.name, prepared.level, __file__, 0, prepared.message, (text,), None)
        else:
            entry = logging.LogRecord.__new__(logging.LogRecord)
            entry.__dict__.update(template)
            entry.levelno, entry.levelname, entry.args = prepared.level, logging.getLevelName(prepared.level), (text,)
            if logger is not audit_log:
                entry.name, entry.msg = logger.name, prepared.message
        entry.meshid_audit = fields
        # the time of the decision, not of the write
        entry.created = created
        entry.msecs = int((created - int(created)) * 1000) + 0.0
        entry.relativeCreated = (created - _START) * 1000
        logger.handle(entry)
    if prepared.grpc_entry is not None:
        stamp = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="microseconds")
        line = json.dumps({"grpc_audit_log": {"timestamp": stamp, **prepared.grpc_entry}})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class AuditWriter:
    """Writes audit records on a thread of its own, off the call path.

    ``start()`` starts the thread (once); ``close()`` writes what is queued, then stops it and
    waits for it. Both are idempotent; after ``close()`` records are written in the call again.
    """

    def __init__(self, *, linger: float = LINGER) -> None:
        self._linger = linger
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()  # cuts a batch's wait short

    def offer(self, item: Item) -> bool:
        """Queue ``item`` for the writer's thread; False (nothing queued) when the thread is not
        running or ``MAX_QUEUED`` items wait already: the caller writes it itself."""
        if self._thread is None or self._queue.qsize() >= MAX_QUEUED:
            return False
        self._queue.put(item)
        return True

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._closing.clear()
                self._thread = threading.Thread(target=self._run, name="meshid-audit", daemon=True)
                self._thread.start()
                _STARTED.add(self)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._closing.set()
            self._queue.put(None)
        thread.join()
        self._drain()  # what a call queued while the thread was stopping

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record queued so far is written; False if ``timeout`` passed first."""
        if self._thread is None:
            self._drain()
            return True
        done = threading.Event()
        self._queue.put((0.0, _Marker(done), None, False))  # type: ignore[arg-type]
        return done.wait(timeout)

    def _run(self) -> None:
        made = audit_log.makeRecord(audit_log.name, logging.INFO, __file__, 0, "authz %s", (), None)
        template = dict(made.__dict__)
        while True:
            item = self._queue.get()
            # Records are written in batches: one wake-up of this thread per batch, not per call
            # (on a busy server the thread switches cost more than writing the records).
            if self._linger > 0 and item is not None and not isinstance(item[1], _Marker):
                self._closing.wait(self._linger)
            while item is not None:
                self._write_one(item, template)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                return

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._write_one(item)

    @staticmethod
    def _write_one(item: Item, template: dict[str, Any] | None = None) -> None:
        if isinstance(item[1], _Marker):
            item[1].done.set()
            return
        try:
            _write(item, template)
        except Exception:  # a broken handler must not stop the writer
            log.exception("audit: a record could not be written")


@dataclass(frozen=True, slots=True, eq=False)
class _Marker:
    done: threading.Event


#: Writers started and not yet closed: at exit, what they hold is written (a daemon thread
#: would otherwise die with its last batch).
_STARTED: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


@atexit.register
def _close_started() -> None:
    for writer in list(_STARTED):
        writer.close()
