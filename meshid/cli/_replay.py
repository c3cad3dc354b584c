"""``meshid policy replay``: past decisions (meshid's audit records) decided again by a new policy.

An audit log is read line by line: a line holding ``authz {...}`` (the message the
``meshid.audit`` logger writes, whatever the handler's format puts before it) or a JSON object
with the record's fields (a JSON log handler). Other lines (meshid's other log lines, dry-run
records, gRPC's ``stdout_logger``) are skipped and counted. Records of refusals made before the
policy (no verified certificate, TLS 1.2, revoked) and of unauthenticated methods are counted
but not replayed: a policy did not decide them. Input is bounded: a line longer than
``MAX_LINE`` bytes, or one that holds ``authz {`` and is not a record, is an error naming it.
"""

from __future__ import annotations

import collections
import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshid.authz.model import Decision
from meshid.authz.policy import AuthorizationPolicy
from meshid.errors import InvalidAuditLogError, InvalidSpiffeIdError
from meshid.peer import PeerIdentity
from meshid.spiffeid import SpiffeId, TrustDomain

__all__ = ["MAX_LINE", "Past", "Replay", "read_records", "replay"]

#: The longest line read (an audit record is well under 4 KiB: methods it shows are cut at 256).
MAX_LINE = 64 * 1024
_MARKER = "authz {"
#: The stages an audit record names (meshid.authz.audit): decided by the policy, refused before
#: it (authentication), or an unauthenticated method (open).
_STAGES = ("policy", "authentication", "open")
_NEEDED = {
    "caller": (str,),
    "method": (str,),
    "decision": (str,),
    "rule": (str, type(None)),
    "stage": (str,),
    "trust_domain": (str,),
    "has_spiffe_id": (bool,),
}


@dataclass(frozen=True, slots=True)
class Past:
    """One past decision by a policy, as its audit record has it."""

    line: int
    peer: PeerIdentity
    method: str
    allowed: bool
    rule: str | None


@dataclass(slots=True)
class Replay:
    """What a replay found: changed decisions grouped by (caller, method, before, after), with counts."""

    changed: collections.Counter[tuple[str, str, str, str]] = field(default_factory=collections.Counter)
    replayed: int = 0
    unchanged: int = 0
    other_rule: int = 0
    not_by_policy: int = 0
    other_lines: int = 0


def _lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; a generator's with would hide OSError's origin
    except OSError as err:
        raise InvalidAuditLogError(f"audit log {path}: cannot read: {err.strerror}") from err
    with f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE:
                raise InvalidAuditLogError(
                    f"audit log {path} line {number}: longer than {MAX_LINE} bytes; is this meshid's audit log?"
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidAuditLogError(f"audit log {path} line {number}: not UTF-8 text: {err}") from err


def _record(path: str, number: int, text: str) -> dict[str, object] | None:
    stripped = text.strip()
    marked = _MARKER in stripped
    if stripped.startswith("{"):
        body = stripped
    elif marked:
        body = stripped[stripped.index(_MARKER) + len("authz ") :]
    else:
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        if not marked:
            return None  # some other JSON-ish line
        raise InvalidAuditLogError(
            f"audit log {path} line {number}: the audit record is not valid JSON at column {err.colno}: {err.msg}"
        ) from err
    except RecursionError as err:
        raise InvalidAuditLogError(f"audit log {path} line {number}: nested too deeply") from err
    if not isinstance(data, dict) or "decision" not in data or "dry_run" in data:
        if marked and not isinstance(data, dict):
            raise InvalidAuditLogError(f"audit log {path} line {number}: the audit record is not a JSON object")
        if marked and "dry_run" not in data:  # an audit record's message, but not one meshid writes
            raise InvalidAuditLogError(f"audit log {path} line {number}: the audit record has no 'decision'")
        return None  # an unmarked JSON line of some other log, or a dry run's record
    return data


def _past(path: str, number: int, data: dict[str, object]) -> Past | None:
    where = f"audit log {path} line {number}"
    stage = data.get("stage", "policy")
    if stage not in _STAGES:
        raise InvalidAuditLogError(f"{where}: 'stage' must be one of {', '.join(_STAGES)}, not {stage!r}")
    if stage != "policy" or data.get("caller") is None:
        return None  # refused before the policy, or an open method: no decision of a policy to replay
    for key, types in _NEEDED.items():
        if key not in data:
            raise InvalidAuditLogError(
                f"{where}: the record has no {key!r}; replay needs records written by a meshid that writes "
                "trust_domain and has_spiffe_id (older records cannot be replayed)"
            )
        if not isinstance(data[key], types):
            raise InvalidAuditLogError(f"{where}: {key!r} has the wrong type ({type(data[key]).__name__})")
    if data["decision"] not in ("allow", "deny"):
        raise InvalidAuditLogError(f"{where}: 'decision' must be allow or deny")
    caller, td_name = str(data["caller"]), str(data["trust_domain"])
    dns = data.get("dns_sans", [])
    thumb = data.get("thumbprint")
    kex = data.get("key_exchange")
    if not isinstance(dns, list) or not all(isinstance(d, str) for d in dns):
        raise InvalidAuditLogError(f"{where}: 'dns_sans' must be a list of strings")
    try:
        td = TrustDomain.parse(td_name)
        sid = SpiffeId.parse(caller) if data["has_spiffe_id"] else None
    except InvalidSpiffeIdError as err:
        raise InvalidAuditLogError(f"{where}: {err}") from err
    peer = PeerIdentity(
        spiffe_id=sid,
        trust_domain=td,
        subject="" if sid is not None else caller,
        common_name=None,
        thumbprint=thumb if isinstance(thumb, str) else "",
        certificate=None,
        not_after=datetime.datetime.max.replace(tzinfo=datetime.UTC),
        uri_sans=(caller,) if sid is not None else (),
        dns_sans=tuple(dns),
        key_exchange_group=kex if isinstance(kex, str) else None,
        source="jwt" if data.get("identity_source") == "jwt" else "x509",
    )
    rule = data["rule"]
    return Past(number, peer, str(data["method"]), data["decision"] == "allow", rule if isinstance(rule, str) else None)


def read_records(path: str, result: Replay) -> Iterator[Past]:
    """The past policy decisions in ``path``; lines and records that are not are counted in ``result``.

    Raises:
        InvalidAuditLogError: the file cannot be read, a line is too long, or a record is malformed.
    """
    for number, text in _lines(path):
        data = _record(path, number, text)
        if data is None:
            result.other_lines += 1
            continue
        past = _past(path, number, data)
        if past is None:
            result.not_by_policy += 1
            continue
        yield past


def _shown(allowed: bool, rule: str | None, reason: str | None = None) -> str:
    what = "allow" if allowed else "deny"
    if rule is not None:
        return f"{what} (rule {rule!r})"
    return f"{what} ({reason})" if reason else f"{what} (no rule)"


def replay(policy: AuthorizationPolicy, path: str, local: TrustDomain | None) -> Replay:
    """Decide every past policy decision in ``path`` again with ``policy``.

    ``local``: the server's trust domain (the scope of subject and DNS rules); None takes the
    record's: a SPIFFE caller's own (as ``policy check`` does), and for a certificate without a
    SPIFFE ID the trust domain that vouched for it, the server's own unless the policy that
    decided listed others in ``allow_non_spiffe_peers``.
    """
    result = Replay()
    for past in read_records(path, result):
        here = local or past.peer.trust_domain
        decision: Decision = policy.decide(past.peer, past.method, {}, local_trust_domain=here)
        result.replayed += 1
        if decision.allowed == past.allowed:
            result.unchanged += 1
            if decision.rule != past.rule:
                result.other_rule += 1
            continue
        before = _shown(past.allowed, past.rule)
        after = _shown(decision.allowed, decision.rule, None if decision.rule else decision.reason)
        result.changed[(past.peer.describe(), past.method, before, after)] += 1
    return result
