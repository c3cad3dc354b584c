"""Authorization: the policy model, its two loaders (native and gRPC authz JSON), the decision core."""

from __future__ import annotations

from meshid.authz.model import Decision, Rule
from meshid.authz.policy import AuditOptions, AuthorizationPolicy

__all__ = ["AuditOptions", "AuthorizationPolicy", "Decision", "Rule"]
