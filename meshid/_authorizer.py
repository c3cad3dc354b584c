"""The decision path shared by the sync and aio interceptors: who is calling, may they, and
which status code a refusal gets. No grpc I/O happens here; the interceptors adapt it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from meshid.authz import audit
from meshid.authz.grpc_json import collect_headers
from meshid.authz.model import Decision
from meshid.authz.policy import AuthorizationPolicy
from meshid.bundle import BundleSet, TrustBundle
from meshid.errors import MeshIdError, VerificationError
from meshid.peer import PeerIdentity, PeerVerifier
from meshid.sources import Source

log = logging.getLogger("meshid.authz")

PolicyInput = AuthorizationPolicy | str | os.PathLike[str]
TrustInput = Source | BundleSet | TrustBundle


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call refused: the status code and the message the caller sees."""

    code: grpc.StatusCode
    message: str


def _bundles_getter(trust: TrustInput) -> Callable[[], BundleSet]:
    if isinstance(trust, BundleSet):
        return lambda: trust
    if isinstance(trust, TrustBundle):
        fixed = BundleSet.of(trust)
        return lambda: fixed
    if isinstance(trust, Source):
        return trust.get_bundles
    raise TypeError(f"source must be an identity source, BundleSet or TrustBundle, not {type(trust).__name__}")


def _load(policy: PolicyInput) -> tuple[AuthorizationPolicy, str | None]:
    if isinstance(policy, AuthorizationPolicy):
        return policy, None
    if isinstance(policy, str | os.PathLike):
        return AuthorizationPolicy.load(policy), os.fspath(policy)
    raise TypeError(f"policy must be an AuthorizationPolicy or a path, not {type(policy).__name__}")


class Authorizer:
    """Holds the current policy and decides calls; the one place status codes are chosen."""

    def __init__(self, policy: PolicyInput, *, source: TrustInput, poll_interval: float = 2.0) -> None:
        self._policy, self._path = _load(policy)
        self._verifier = PeerVerifier(_bundles_getter(source))
        self._poll_interval = poll_interval
        self._stamp = self._file_stamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.revoked: Callable[[PeerIdentity], bool] | None = None

    @property
    def policy(self) -> AuthorizationPolicy:
        return self._policy

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self, policy: PolicyInput | None = None) -> bool:
        """Swap in a new policy atomically; with no argument, re-read the policy file.

        A policy that fails to load leaves the current one in force; the error is logged and
        re-raised for a direct call with an argument. Returns True when a new policy took effect.
        """
        if policy is None:
            if self._path is None:
                raise ValueError("reload() without a policy needs an interceptor built from a policy file")
            self._stamp = self._file_stamp()
            try:
                new, _ = _load(self._path)
            except MeshIdError as err:
                log.error("policy: keeping policy %r in force: %s", self._policy.name, err)
                return False
        else:
            try:
                new, path = _load(policy)
            except MeshIdError as err:
                log.error("policy: keeping policy %r in force: %s", self._policy.name, err)
                raise
            if path is not None:
                self._path, self._stamp = path, self._file_stamp()
        self._policy = new
        log.info("policy: now enforcing %r (%d rules) from %s", new.name, len(new.rules), new.origin)
        return True

    def start(self) -> None:
        if self._path is None:
            raise ValueError("start() watches a policy file; this interceptor was given a policy object")
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="meshid-policy-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_interval):
            if self._file_stamp() != self._stamp:
                self.reload()

    def authorize(
        self,
        auth_context: Mapping[str, Sequence[bytes]],
        method: str,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        peer_address: str | None = None,
    ) -> PeerIdentity | Refusal:
        """Decide one call: the verified peer when allowed, else the refusal to send."""
        policy = self._policy  # one read: the whole call sees one policy
        try:
            identity = self._verifier.identify(auth_context, allow_non_spiffe=policy.allow_non_spiffe_peers)
        except VerificationError as err:
            audit.record(policy, Decision(False, None, "unauthenticated"), method, None, peer_address=peer_address, error=str(err))
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {err}")
        if self.revoked is not None and self.revoked(identity):
            message = f"peer {identity.describe()}: certificate serial {identity.serial:x} is revoked"
            audit.record(policy, Decision(False, None, "revoked"), method, identity, peer_address=peer_address, error=message)
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, f"meshid: {message}")
        headers = collect_headers(metadata or ()) if policy.uses_headers else None
        decision = policy.decide(identity, method, headers)
        audit.record(policy, decision, method, identity, peer_address=peer_address)
        if decision.allowed:
            return identity
        detail = "" if decision.rule is not None or decision.reason.startswith("no rule") else f": {decision.reason}"
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"meshid: {identity.describe()} may not call {method}{detail}",
        )
