"""The rotation loop (IssuerSource) that the ``meshid agent`` sidecar runs; the Workload API it
serves lives in :mod:`meshid.workloadapi`."""

from __future__ import annotations

from meshid.agent.source import IssuerSource, SourceState

__all__ = ["IssuerSource", "SourceState"]
