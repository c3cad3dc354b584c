"""The rotation loop (IssuerSource) and the ``meshid agent`` sidecar built on it."""

from __future__ import annotations

from meshid.agent.source import IssuerSource, SourceState

__all__ = ["IssuerSource", "SourceState"]
