"""gRPC's own authorization policy (gRFC A43, audit options from gRFC A59), read into meshid rules.

This is the policy grpc-go's ``authz.NewStatic``, grpc-java and gRPC C++ load::

    {
      "name": "greeter",
      "deny_rules": [{"name": "no-secrets", "request": {"paths": ["*/Secret"]}}],
      "allow_rules": [
        {"name": "admins", "source": {"principals": ["spiffe://example.org/sa/admin*"]}},
        {"name": "health", "request": {"paths": ["/grpc.health.v1.Health/*"],
                                       "headers": [{"key": "x-env", "values": ["prod", "staging"]}]}}
      ],
      "audit_logging_options": {"audit_condition": "ON_DENY",
                                "audit_loggers": [{"name": "stdout_logger"}]}
    }

The translation follows grpc-go's ``authz/rbac_translator.go`` and gRPC core's
``rbac_translator.cc`` so that meshid decides as they do:

* ``name`` and a non-empty ``allow_rules`` are required; ``deny_rules`` and
  ``audit_logging_options`` are optional; an explicit ``null`` counts as absent (as in Go).
  Unknown fields are errors at every level (Go decodes with ``DisallowUnknownFields``; core
  rejects them too), so meshid accepts no extension keys here.
* A rule matches when its source and its request match. No ``source`` (or no principals)
  matches every peer; no ``request`` matches every call. Principals and paths are OR-ed;
  headers are AND-ed, and the values of one header are OR-ed.
* Strings: ``*`` is a presence match, ``abc*`` a prefix, ``*abc`` a suffix, anything else
  exact (a ``*`` inside, as in ``a*b``, is literal). A value starting *and* ending with
  ``*`` (``*abc*``, ``**``) is refused: grpc-go reads it as a prefix, gRPC core as a suffix.
* Principals are matched against the peer's URI SANs; only when it has none, its DNS SANs;
  only when it has neither, its subject (:func:`meshid.authz.model.principal_names`).
  Matched against DNS SANs or the subject, they match only a peer vouched for by a trust
  domain in the policy's scope: those given as ``allow_non_spiffe_peers=[...]`` to
  :meth:`meshid.AuthorizationPolicy.load`, else the server's own trust domain (a federated CA
  can write any DNS name or subject). This format has no field for a rule's own scope (native
  ``vouched_by``): grpc rejects unknown fields, so every rule here uses the policy's.
* Header keys are lowercased; pseudo-headers, ``host``, hop-by-hop headers and ``grpc-``
  headers are refused; ``values`` must be a non-empty list. A header sent several times is
  matched as its values joined with ``,`` (see :func:`collect_headers`).
* Rule names must be unique within ``deny_rules`` and within ``allow_rules``: gRPC keeps
  rules in a map and would silently drop the earlier of two rules with the same name.
* ``audit_logging_options`` (gRFC A59): ``audit_condition`` is ``NONE`` (also when omitted or
  ``""``), ``ON_DENY``, ``ON_ALLOW`` or ``ON_DENY_AND_ALLOW``; it chooses the decisions the
  ``audit_loggers`` are called for, and those recorded on meshid's ``meshid.audit`` logger. A
  policy without ``audit_logging_options`` records every decision on ``meshid.audit`` (its
  level then chooses) and calls no A59 logger. Of the loggers, ``stdout_logger`` is built in
  (its ``config``, which must be an object, is ignored, as grpc-go does); any other is refused
  unless ``"is_optional": true``, then skipped (A59: an unsupported logger fails the policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from meshid.authz.model import HeaderMatch, ParsedPolicy, Rule, StringMatch
from meshid.authz.patterns import show
from meshid.errors import InvalidPolicyError

__all__ = ["AUDIT_CONDITIONS", "BUILTIN_AUDIT_LOGGERS", "collect_headers", "parse"]

#: The values ``audit_logging_options.audit_condition`` may take (gRFC A59); absent means NONE.
AUDIT_CONDITIONS = ("NONE", "ON_DENY", "ON_ALLOW", "ON_DENY_AND_ALLOW")
#: The audit loggers meshid provides; gRFC A59 defines ``stdout_logger`` as the built-in one.
BUILTIN_AUDIT_LOGGERS = frozenset({"stdout_logger"})

_TOP_KEYS = ("name", "deny_rules", "allow_rules", "audit_logging_options")
_RULE_KEYS = ("name", "source", "request")
_SOURCE_KEYS = ("principals",)
_REQUEST_KEYS = ("paths", "headers")
_HEADER_KEYS = ("key", "values")
_AUDIT_KEYS = ("audit_condition", "audit_loggers")
_LOGGER_KEYS = ("name", "config", "is_optional")
# The headers A43 excludes besides ":"- and "grpc-"-prefixed ones: Host and the hop-by-hop
# headers (the list grpc-go and gRPC core both refuse).
_UNSUPPORTED_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _fail(where: str, what: str) -> InvalidPolicyError:
    return InvalidPolicyError(f"{where}: {what}")


def _check_fields(obj: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [str(k) for k in obj if k not in allowed]
    if unknown:
        raise _fail(
            where,
            f"unknown field(s) {', '.join(map(repr, sorted(unknown)))}; allowed: {', '.join(allowed)} "
            "(gRPC refuses unknown fields, so meshid does too)",
        )


def _object(value: Any, where: str, what: str) -> Mapping[Any, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail(where, f"{what} must be an object, not {_kind(value)}")
    return value


def _strings(value: Any, where: str, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(where, f"{what} must be a list of strings, not {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _fail(where, f"{what}[{i}] must be a string, not {_kind(item)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _matcher(text: str, where: str, what: str) -> StringMatch:
    """A43 string matching, as grpc-go's ``getStringMatcher`` and core's ``GetMatcherType`` agree on it."""
    if text == "*":
        return ("present", "")
    starts, ends = text.startswith("*"), text.endswith("*")
    if starts and ends:
        raise _fail(
            where,
            f"{what} {text!r}: '*' at both ends is ambiguous (grpc-go reads it as a prefix, gRPC core as a "
            "suffix); use '*' alone, 'abc*' or '*abc'",
        )
    if ends:
        return ("prefix", text[:-1])
    if starts:
        return ("suffix", text[1:])
    return ("exact", text)


def _required_string(obj: Mapping[Any, Any], key: str, where: str, what: str) -> str:
    value = obj.get(key)
    if value is None or value == "":
        raise _fail(where, f"{what} is required")
    if not isinstance(value, str):
        raise _fail(where, f"{what} must be a string, not {_kind(value)}")
    return value


def _header(raw: Any, where: str) -> HeaderMatch:
    header = _object(raw, where, "the header")
    if header is None:
        raise _fail(where, "the header must be an object with 'key' and 'values'")
    _check_fields(header, _HEADER_KEYS, where)
    key = _required_string(header, "key", where, "'key'").lower()
    if key.startswith(":") or key.startswith("grpc-") or key in _UNSUPPORTED_HEADERS:
        raise _fail(
            where,
            f"header {key!r} cannot be matched; gRPC authz excludes pseudo-headers (':...'), 'host', "
            "hop-by-hop headers and 'grpc-' headers",
        )
    if header.get("values") is None:
        raise _fail(where, "'values' is required")
    values = _strings(header["values"], where, "'values'")
    if not values:
        raise _fail(where, "'values' is empty, so the header could never match")
    return HeaderMatch(key, tuple(_matcher(v, where, "value") for v in values))


def _rule(raw: Any, action: str, index: int, origin: str, seen: set[str]) -> Rule:
    list_key = f"{action}_rules"
    where = f"policy {origin}: {action} rule #{index + 1}"
    if not isinstance(raw, Mapping):
        raise _fail(where, f"each entry of '{list_key}' must be an object, not {_kind(raw)}")
    name = _required_string(raw, "name", where, "'name'")
    where = f"policy {origin}: {action} rule {name!r}"
    if name in seen:
        raise _fail(
            where,
            f"the name is used by another rule in '{list_key}'; gRPC would silently drop the earlier rule",
        )
    seen.add(name)
    _check_fields(raw, _RULE_KEYS, where)

    principals: list[str] = []
    source = _object(raw.get("source"), where, "'source'")
    if source is not None:
        _check_fields(source, _SOURCE_KEYS, f"{where}: source")
        principals = _strings(source.get("principals"), where, "source.principals")

    paths: list[str] = []
    headers: list[HeaderMatch] = []
    request = _object(raw.get("request"), where, "'request'")
    if request is not None:
        _check_fields(request, _REQUEST_KEYS, f"{where}: request")
        paths = _strings(request.get("paths"), where, "request.paths")
        raw_headers = request.get("headers")
        if raw_headers is not None and not isinstance(raw_headers, list):
            raise _fail(where, f"request.headers must be a list of objects, not {_kind(raw_headers)}")
        headers = [_header(h, f"{where}: request.headers[{i}]") for i, h in enumerate(raw_headers or ())]

    return Rule(
        name=name,
        action="allow" if action == "allow" else "deny",
        methods=tuple(_matcher(p, where, "path") for p in paths) or (("any", ""),),
        principals=tuple(_matcher(p, where, "principal") for p in principals),
        any_peer=not principals,
        headers=tuple(headers),
    )


def _rules(data: Mapping[str, Any], action: str, origin: str) -> list[Rule]:
    key = f"{action}_rules"
    raw = data.get(key)
    if raw is None:
        if action == "allow":
            raise _fail(f"policy {origin}", "'allow_rules' is required (gRPC denies every call without it)")
        return []
    if not isinstance(raw, list):
        raise _fail(f"policy {origin}", f"'{key}' must be a list of rules, not {_kind(raw)}")
    if action == "allow" and not raw:
        raise _fail(f"policy {origin}", "'allow_rules' is empty (gRPC requires at least one allow rule)")
    seen: set[str] = set()
    return [_rule(r, action, i, origin, seen) for i, r in enumerate(raw)]


def _audit(raw: Any, origin: str) -> tuple[str | None, list[str]]:
    where = f"policy {origin}: audit_logging_options"
    options = _object(raw, f"policy {origin}", "'audit_logging_options'")
    if options is None:  # no audit options: meshid.audit's level alone chooses, no A59 logger
        return None, []
    _check_fields(options, _AUDIT_KEYS, where)
    condition = options.get("audit_condition")
    if condition is None or condition == "":  # grpc-go leaves the condition at NONE for ""
        condition = "NONE"
    elif not isinstance(condition, str) or condition not in AUDIT_CONDITIONS:
        raise _fail(where, f"audit_condition {show(condition)} is not one of {', '.join(AUDIT_CONDITIONS)}")
    raw_loggers = options.get("audit_loggers")
    if raw_loggers is None:
        raw_loggers = []
    if not isinstance(raw_loggers, list):
        raise _fail(where, f"audit_loggers must be a list of objects, not {_kind(raw_loggers)}")
    loggers = []
    for i, item in enumerate(raw_loggers):
        at = f"{where}: audit_loggers[{i}]"
        logger = _object(item, at, "the logger")
        if logger is None:
            raise _fail(at, "the logger must be an object with a 'name'")
        _check_fields(logger, _LOGGER_KEYS, at)
        name = _required_string(logger, "name", at, "'name'")
        _object(logger.get("config"), at, "'config'")  # stdout_logger takes no configuration and ignores it
        optional = logger.get("is_optional")
        if optional is not None and not isinstance(optional, bool):
            raise _fail(at, f"'is_optional' must be true or false, not {_kind(optional)}")
        if name in BUILTIN_AUDIT_LOGGERS:
            loggers.append(name)
        elif not optional:
            raise _fail(
                at,
                f"audit logger {show(name)} is not supported (built in: {', '.join(sorted(BUILTIN_AUDIT_LOGGERS))}); "
                'set "is_optional": true to skip it',
            )
    return condition, loggers


def parse(data: Mapping[str, Any], *, origin: str) -> ParsedPolicy:
    """Translate a gRPC authorization policy (already parsed from JSON or YAML) into meshid rules.

    Raises:
        InvalidPolicyError: naming the origin, the rule and what is wrong.
    """
    where = f"policy {origin}"
    _check_fields(data, _TOP_KEYS, where)
    name = _required_string(data, "name", where, "'name'")
    allow = _rules(data, "allow", origin)
    condition, loggers = _audit(data.get("audit_logging_options"), origin)
    deny = _rules(data, "deny", origin)
    return ParsedPolicy(name=name, rules=[*deny, *allow], audit_condition=condition, audit_loggers=loggers)


def collect_headers(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The request headers gRPC authz matches against, from a call's invocation metadata.

    Keys are lowercased. A header sent several times becomes its values joined with ``,`` (no
    space), in the order received (gRFC A41; grpc-go's header matchers do the same). Binary
    (``-bin``) values are matched as the decoded bytes, as grpc-go and gRPC core see them,
    read as UTF-8 (undecodable bytes become lone surrogates that no policy value matches).
    """
    joined: dict[str, list[str]] = {}
    for key, value in metadata:
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        joined.setdefault(key.lower(), []).append(text)
    return {key: ",".join(values) for key, values in joined.items()}
