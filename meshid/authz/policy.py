"""AuthorizationPolicy: loading a policy file (native or gRPC authz JSON) and deciding with it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshid import _x509
from meshid._json import DuplicateKeyError, unique_keys
from meshid.authz import grpc_json, native
from meshid.authz.model import CompiledRules, Decision, Rule
from meshid.errors import InvalidPolicyError
from meshid.peer import PeerIdentity
from meshid.spiffeid import TrustDomain

__all__ = ["AuditOptions", "AuthorizationPolicy"]

#: Policy files larger than this are refused before parsing.
MAX_POLICY_BYTES = 8 * 1024 * 1024


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def read_text(origin: str, what: str = "policy") -> str:
    """The UTF-8 text of a policy-shaped file (a policy, a table of cases), at most
    :data:`MAX_POLICY_BYTES`.

    Raises:
        InvalidPolicyError: the file cannot be read, is too large, or is not UTF-8 (``what`` starts the message).
    """
    try:
        with open(origin, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as err:
        raise InvalidPolicyError(f"{what} {origin}: cannot read: {err.strerror}") from err
    if len(raw) > MAX_POLICY_BYTES:
        raise InvalidPolicyError(f"{what} {origin}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidPolicyError(f"{what} {origin}: not UTF-8 text: {err}") from err


def parse_text(origin: str, text: str, what: str = "policy") -> Any:
    """``text`` parsed as JSON when ``origin`` ends in ``.json``, else as YAML (safe loader).

    Raises:
        InvalidPolicyError: it does not parse; the message gives the line and column.
    """
    import yaml  # only for a YAML file: a JSON policy (or none) does not load it

    from meshid.authz import _yaml

    try:
        return json.loads(text, object_pairs_hook=unique_keys) if origin.endswith(".json") else _yaml.load(text)
    except DuplicateKeyError as err:
        raise InvalidPolicyError(f"{what} {origin}: {err}") from err
    except json.JSONDecodeError as err:
        raise InvalidPolicyError(
            f"{what} {origin}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    except yaml.YAMLError as err:  # PyYAML's message spans lines (a snippet): keep it on one
        raise _yaml.error(origin, err, what) from err
    except RecursionError as err:
        raise InvalidPolicyError(f"{what} {origin}: nested too deeply") from err
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as err:
        # YAML tags and scalars (`!!timestamp x`, a 5,000-digit number, ...) fail as plain errors
        raise InvalidPolicyError(f"{what} {origin}: a value cannot be read: {type(err).__name__}: {err}") from err


@dataclass(frozen=True, slots=True)
class AuditOptions:
    """Which decisions a policy audits (gRFC A59's ``audit_condition``), and by which A59 loggers.

    ``condition`` is ``NONE``, ``ON_DENY``, ``ON_ALLOW`` or ``ON_DENY_AND_ALLOW``, or None when
    the policy sets none: then every decision goes to the ``meshid.audit`` logger (whose level
    chooses: INFO keeps allows and denies, WARNING denies only) and no A59 logger is called.
    An audited decision is recorded on ``meshid.audit`` and by each of ``loggers``
    (``stdout_logger`` is built in).
    """

    condition: str | None = None
    loggers: tuple[str, ...] = ()

    def wants(self, allowed: bool) -> bool:
        """Whether the A59 loggers are called for a decision (never, without a condition)."""
        if self.condition == "ON_DENY_AND_ALLOW":
            return True
        if self.condition == "ON_DENY":
            return not allowed
        if self.condition == "ON_ALLOW":
            return allowed
        return False

    def audits(self, allowed: bool) -> bool:
        """Whether a decision is recorded on ``meshid.audit``: every one, without a condition."""
        return self.condition is None or self.wants(allowed)


@dataclass(frozen=True, slots=True, eq=False)
class AuthorizationPolicy:
    """Who may call which gRPC method. Build it with :meth:`load` or :meth:`from_dict`.

    ``allow_non_spiffe_peers`` admits verified client certificates without a SPIFFE ID
    (matched by subject pattern, DNS SAN or thumbprint only); ``allow_tls12`` admits peers
    whose connection negotiated TLS 1.2 (by default only TLS 1.3); ``require_pq_key_exchange``
    denies peers whose connection negotiated a classical key exchange; ``require_pq_signature``
    denies peers that did not authenticate with a post-quantum (ML-DSA) signature, which today
    only the :mod:`meshid.pqtls` path carries (grpcio refuses ML-DSA certificates).

    Subject patterns, DNS names and principals matched against DNS SANs or the subject match
    only peers vouched for by a trust domain in scope: the rule's ``vouched_by``, else
    ``non_spiffe_trust_domains``, else the server's own trust domain (the ``local_trust_domain``
    given to :meth:`decide`). A federated CA can write any subject or DNS name it likes; this
    is what keeps it from naming itself into a rule meant for this trust domain.
    """

    name: str
    rules: tuple[Rule, ...]
    allow_non_spiffe_peers: bool = False
    require_pq_key_exchange: bool = False
    audit: AuditOptions = AuditOptions()
    #: Whose bundles may vouch for a certificate without a SPIFFE ID, and the default scope of
    #: subject, DNS and principal conditions; empty means the trust domain of the server's own SVID.
    non_spiffe_trust_domains: frozenset[TrustDomain] = frozenset()
    allow_tls12: bool = False
    origin: str = "<dict>"
    #: Where a caller's identity may come from: "x509" (its client certificate) and/or "jwt".
    identity_sources: frozenset[str] = frozenset({"x509"})
    #: What a JWT-SVID's aud may name; empty means the server's own SPIFFE ID.
    jwt_audiences: frozenset[str] = frozenset()
    require_pq_signature: bool = False
    _compiled: CompiledRules = field(init=False, repr=False)
    #: Whether a JWT-SVID may identify a caller (``identity_sources`` lists ``jwt``); read on
    #: every call, so worked out once.
    accepts_jwt: bool = field(init=False, repr=False)
    #: Whether a TLS client certificate may identify a caller (``identity_sources`` lists ``x509``).
    accepts_x509: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", CompiledRules(self.rules, self.non_spiffe_trust_domains))
        object.__setattr__(self, "identity_sources", native.identity_sources(self.identity_sources, "policy"))
        object.__setattr__(self, "accepts_jwt", "jwt" in self.identity_sources)
        object.__setattr__(self, "accepts_x509", "x509" in self.identity_sources)
        if self.jwt_audiences:
            object.__setattr__(self, "jwt_audiences", native.jwt_audiences(self.jwt_audiences, "policy"))

    @property
    def uses_headers(self) -> bool:
        """Whether any rule looks at request headers (so the interceptor must collect them)."""
        return self._compiled.uses_headers

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        origin: str = "<dict>",
        allow_non_spiffe_peers: bool | Collection[str | TrustDomain] | None = None,
        require_pq_key_exchange: bool | None = None,
        allow_tls12: bool | None = None,
        identity_sources: Collection[str] | None = None,
        jwt_audiences: Collection[str] | None = None,
        require_pq_signature: bool | None = None,
    ) -> AuthorizationPolicy:
        """Build a policy from parsed YAML/JSON: gRPC authz format when it has ``allow_rules``, else native.

        The keyword options, when given, override the file: a gRPC authz policy has no field
        for them (grpc rejects unknown fields), so this is how such a policy admits peers named
        by DNS SAN or subject, requires a post-quantum key exchange, admits TLS 1.2, or accepts
        JWT-SVIDs (``identity_sources=["x509", "jwt"]``, and the ``jwt_audiences`` a token may name).

        Raises:
            InvalidPolicyError: naming the origin, the rule and what is wrong.
        """
        policy = cls._from_dict(data, origin=origin)
        given = {
            "require_pq_key_exchange": require_pq_key_exchange,
            "allow_tls12": allow_tls12,
            "require_pq_signature": require_pq_signature,
        }
        overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if identity_sources is not None:
            overrides["identity_sources"] = native.identity_sources(list(identity_sources), f"policy {origin}")
            narrower = [r.name for r in policy.rules if r.identity_sources - overrides["identity_sources"]]
            if narrower:
                raise InvalidPolicyError(
                    f"policy {origin}: rule {narrower[0]!r} names an identity source that "
                    f"identity_sources={sorted(overrides['identity_sources'])} leaves out"
                )
        if jwt_audiences is not None:
            overrides["jwt_audiences"] = native.jwt_audiences(list(jwt_audiences), f"policy {origin}")
        if isinstance(allow_non_spiffe_peers, bool):
            overrides["allow_non_spiffe_peers"] = allow_non_spiffe_peers
        elif allow_non_spiffe_peers is not None:
            tds = frozenset(t if isinstance(t, TrustDomain) else TrustDomain.parse(t) for t in allow_non_spiffe_peers)
            overrides.update(allow_non_spiffe_peers=bool(tds), non_spiffe_trust_domains=tds)
        return dataclasses.replace(policy, **overrides) if overrides else policy

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any], *, origin: str) -> AuthorizationPolicy:
        if not isinstance(data, Mapping):
            raise InvalidPolicyError(f"policy {origin}: the top level must be a mapping, not {type(data).__name__}")
        if "allow_rules" in data or "deny_rules" in data:
            parsed = grpc_json.parse(data, origin=origin)
            return cls(
                name=parsed.name,
                rules=tuple(parsed.rules),
                allow_non_spiffe_peers=parsed.allow_non_spiffe_peers,
                require_pq_key_exchange=parsed.require_pq_key_exchange,
                audit=AuditOptions(parsed.audit_condition, tuple(parsed.audit_loggers)),
                origin=origin,
            )
        parsed_native = native.parse(data, origin=origin)
        return cls(
            name=parsed_native.name,
            rules=tuple(parsed_native.rules),
            allow_non_spiffe_peers=parsed_native.allow_non_spiffe_peers,
            non_spiffe_trust_domains=parsed_native.non_spiffe_trust_domains,
            require_pq_key_exchange=parsed_native.require_pq_key_exchange,
            allow_tls12=parsed_native.allow_tls12,
            identity_sources=parsed_native.identity_sources,
            jwt_audiences=parsed_native.jwt_audiences,
            require_pq_signature=parsed_native.require_pq_signature,
            audit=AuditOptions(parsed_native.audit_condition),
            origin=origin,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        allow_non_spiffe_peers: bool | Collection[str | TrustDomain] | None = None,
        require_pq_key_exchange: bool | None = None,
        allow_tls12: bool | None = None,
        identity_sources: Collection[str] | None = None,
        jwt_audiences: Collection[str] | None = None,
        require_pq_signature: bool | None = None,
    ) -> AuthorizationPolicy:
        """Load a policy file: ``.json`` is read as JSON, anything else as YAML.

        The keywords override the file, as in :meth:`from_dict`.

        Raises:
            InvalidPolicyError: the file cannot be read or parsed, or a rule is wrong.
        """
        origin = os.fspath(path)
        text = read_text(origin)
        if not text.strip() or (not origin.endswith(".json") and _only_comments(text)):
            raise InvalidPolicyError(
                f"policy {origin}: is empty; a policy needs at least one allow rule (name, methods, and who)"
            )
        data = parse_text(origin, text)
        return cls.from_dict(
            data,
            origin=origin,
            allow_non_spiffe_peers=allow_non_spiffe_peers,
            require_pq_key_exchange=require_pq_key_exchange,
            allow_tls12=allow_tls12,
            identity_sources=identity_sources,
            jwt_audiences=jwt_audiences,
            require_pq_signature=require_pq_signature,
        )

    def decide(
        self,
        peer: PeerIdentity,
        method: str,
        headers: Mapping[str, str] | None = None,
        *,
        local_trust_domain: TrustDomain | None = None,
    ) -> Decision:
        """Decide whether ``peer`` may call ``method``. Pure: no I/O, no logging.

        ``local_trust_domain`` is the server's own trust domain: the scope of subject, DNS and
        principal conditions when neither the rule (``vouched_by``) nor the policy
        (``non_spiffe_trust_domains``) names one. None (unknown) leaves that scope empty, so
        such conditions then match nobody.
        """
        if peer.source not in self.identity_sources:
            return Decision(
                False,
                None,
                f"the caller is identified by {'a JWT-SVID' if peer.source == 'jwt' else 'its certificate'}, "
                f"which this policy does not accept (identity_sources: {', '.join(sorted(self.identity_sources))})",
                explained=True,
            )
        if peer.spiffe_id is None and not self.allow_non_spiffe_peers:
            return Decision(
                False,
                None,
                "the certificate carries no SPIFFE ID and the policy does not set allow_non_spiffe_peers",
                explained=True,
            )
        if self.require_pq_key_exchange and not peer.post_quantum:
            group = peer.key_exchange_group or "unknown"
            return Decision(
                False,
                None,
                f"the connection's key exchange ({group}) is classical; this policy requires a "
                "post-quantum hybrid such as X25519MLKEM768",
                explained=True,
            )
        if self.require_pq_signature and not peer.post_quantum_signature:
            if _x509.is_post_quantum(peer.signature_algorithm):  # an ML-DSA key a classical signature vouches for
                what = f"a chain that carries a {peer.classical_chain_signature} signature, a classical one"
            else:
                what = f"{peer.signature_algorithm or 'an unknown algorithm'}, a classical signature"
            return Decision(
                False,
                None,
                f"the peer authenticated with {what}; this policy requires a post-quantum one "
                "(an ML-DSA-65 SVID under an all-ML-DSA chain, over meshid.pqtls)",
                explained=True,
            )
        return self._compiled.decide(peer, method, headers, local_trust_domain=local_trust_domain)
