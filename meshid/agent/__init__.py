"""The agents: :class:`IssuerSource`, the rotation loop of one workload with a join token (what the
``meshid agent`` sidecar runs), and :class:`NodeAgent`, one agent per host that attests its node
and serves each local process the identities of the entries its selectors match (``meshid agent
--node``). The Workload API they serve lives in :mod:`meshid.workloadapi`.

:class:`NodeAgent` is loaded on first use (PEP 562): a workload that imports :class:`IssuerSource`
does not load the CA client and the workload attestation it needs.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from meshid.agent.source import IssuerSource, SourceState

#: Names loaded on first use, and their module.
_LAZY = {"NodeAgent": "meshid.agent.node", "NodeAgentState": "meshid.agent.node"}

__all__ = ["IssuerSource", "NodeAgent", "NodeAgentState", "SourceState"]


def __getattr__(name: str) -> object:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'meshid.agent' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if _typing.TYPE_CHECKING:
    from meshid.agent.node import NodeAgent as NodeAgent
    from meshid.agent.node import NodeAgentState as NodeAgentState
