"""The rotation loop (IssuerSource) and the ``meshid agent`` sidecar built on it."""

from __future__ import annotations

from meshid.agent.source import IssuerSource, SourceState
from meshid.agent.workload_api import WorkloadApiServer

__all__ = ["IssuerSource", "SourceState", "WorkloadApiServer"]
