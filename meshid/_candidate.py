"""The candidate policy an interceptor carries beside the enforced one (a dry run).

Loaded, reloaded and watched as the enforced policy is, with one difference: a broken candidate
never stops anything. At construction it is logged and watched until its file is fixed; a
broken reload keeps the previous candidate (or none) and is logged. The enforced policy never
depends on it. A candidate file that does not exist is no dry run (yet): one that appears
starts it, one that is removed ends it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from meshid._background import FileStamp, file_stamp
from meshid.authz.policy import AuthorizationPolicy
from meshid.errors import MeshIdError

__all__ = ["CandidatePolicy"]

log = logging.getLogger("meshid.authz")

CandidateInput = AuthorizationPolicy | str | os.PathLike[str]
#: What :func:`file_stamp` gives for a file that does not exist.
_ABSENT: FileStamp = (0, 0, 0)


def _load(policy: CandidateInput) -> tuple[AuthorizationPolicy, str | None]:
    if isinstance(policy, AuthorizationPolicy):
        return policy, None
    if isinstance(policy, str | os.PathLike):
        return AuthorizationPolicy.load(policy), os.fspath(policy)
    raise TypeError(f"candidate must be an AuthorizationPolicy or a path, not {type(policy).__name__}")


class CandidatePolicy:
    """Holds the dry-run policy: ``policy`` is None while there is none (or it never loaded)."""

    def __init__(self, candidate: CandidateInput | None, *, on_change: Callable[[], None] | None = None) -> None:
        #: Called after every change of :attr:`policy` (the authorizer's memo holds the
        #: candidate's decisions: a new candidate makes it stale).
        self.on_change = on_change
        self._policy: AuthorizationPolicy | None = None
        self.path: str | None = None
        self._stamp: FileStamp | None = None
        self._lock = threading.Lock()
        if candidate is None:
            return
        if isinstance(candidate, str | os.PathLike):
            self.path = os.fspath(candidate)
            self._stamp = file_stamp(self.path)
            if self._stamp == _ABSENT:
                log.info("policy: dry run: no candidate at %s yet; it starts when the file appears", self.path)
                return
            try:
                self.policy, _ = _load(self.path)
            except MeshIdError as err:  # enforcement goes on; the file is watched until it loads
                log.error("policy: dry run: refusing candidate %s: %s", self.path, err)
                return
        else:
            self.policy, _ = _load(candidate)
        self._announce()

    @property
    def policy(self) -> AuthorizationPolicy | None:
        """The candidate in force now; None while there is none."""
        return self._policy

    @policy.setter
    def policy(self, policy: AuthorizationPolicy | None) -> None:
        self._policy = policy
        if self.on_change is not None:
            self.on_change()

    def _announce(self) -> None:
        if self.policy is not None:
            log.info(
                "policy: dry run: candidate %r (%d rules) from %s",
                self.policy.name,
                len(self.policy.rules),
                self.policy.origin,
            )

    def changed(self) -> bool:
        """Whether the candidate's file changed since it was last read."""
        return self.path is not None and file_stamp(self.path) != self._stamp

    def reload(self, candidate: CandidateInput | None = None) -> bool:
        """Swap in a new candidate; with no argument, re-read its file. True when one took effect.

        A candidate that fails to load leaves the previous one (or none) and is logged; given as
        an argument, the error is re-raised too.

        Raises:
            ValueError: no argument, and no candidate file to re-read.
            InvalidPolicyError: ``candidate`` (an argument) cannot be loaded.
        """
        with self._lock:  # serialised, as the enforced policy's reloads are
            if candidate is None:
                if self.path is None:
                    raise ValueError("reload_candidate() without a policy needs a candidate policy file")
                stamp = file_stamp(self.path)
                if stamp == _ABSENT:
                    self._stamp, self.policy = stamp, None
                    log.info("policy: dry run: candidate %s removed; no dry run until it is back", self.path)
                    return False
                try:
                    new, _ = _load(self.path)
                except MeshIdError as err:
                    self._stamp = stamp  # reported once, not at every poll
                    log.error("policy: dry run: refusing candidate %s (keeping the previous one): %s", self.path, err)
                    return False
                self._stamp = stamp
            else:
                given = file_stamp(candidate) if isinstance(candidate, str | os.PathLike) else None
                try:
                    new, path = _load(candidate)
                except MeshIdError as err:
                    log.error("policy: dry run: refusing candidate (keeping the previous one): %s", err)
                    raise
                self.path, self._stamp = path, given
            self.policy = new
        self._announce()
        return True

    def clear(self) -> None:
        """End the dry run: no candidate, no file watched."""
        with self._lock:
            self.policy, self.path, self._stamp = None, None, None
        log.info("policy: dry run ended")
