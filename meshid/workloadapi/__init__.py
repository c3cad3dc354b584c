"""The SPIFFE Workload API in one place: the client (:class:`WorkloadApiSource`, an identity
source fed by SPIRE's agent or ``meshid agent``), the servers (:class:`WorkloadApiServer`, one
source served on a Unix socket to whoever may open it; :class:`AttestedWorkloadApiServer`, each
caller served the identities of its own process, told by the kernel), workload attestation
(:mod:`meshid.workloadapi.attestation`: selectors, :func:`attest`, :func:`matches`) and the wire
format they share (:mod:`meshid.workloadapi.wire`).

The attested server runs on grpclib (the ``meshid[agent]`` extra), which is loaded only when
one of its names is first used (PEP 562): a workload that imports :class:`WorkloadApiSource`
does not need it.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from meshid.workloadapi.attestation import (
    ProcessInfo,
    Selector,
    WorkloadAttestationError,
    attest,
    check_alive,
    matches,
    selectors_of,
)
from meshid.workloadapi.client import WorkloadApiSource
from meshid.workloadapi.server import WorkloadApiServer
from meshid.workloadapi.wire import ENDPOINT_SOCKET_ENV, socket_path

#: Names loaded on first use, and their module.
_LAZY = {
    "AttestedWorkloadApiServer": "meshid.workloadapi.attested_server",
    "IdentityProvider": "meshid.workloadapi.attested_server",
    "JwtIdentityProvider": "meshid.workloadapi.attested_server",
}

__all__ = [
    "ENDPOINT_SOCKET_ENV",
    "AttestedWorkloadApiServer",
    "IdentityProvider",
    "JwtIdentityProvider",
    "ProcessInfo",
    "Selector",
    "WorkloadApiServer",
    "WorkloadApiSource",
    "WorkloadAttestationError",
    "attest",
    "check_alive",
    "matches",
    "selectors_of",
    "socket_path",
]


def __getattr__(name: str) -> object:
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'meshid.workloadapi' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if _typing.TYPE_CHECKING:
    from meshid.workloadapi.attested_server import AttestedWorkloadApiServer as AttestedWorkloadApiServer
    from meshid.workloadapi.attested_server import IdentityProvider as IdentityProvider
    from meshid.workloadapi.attested_server import JwtIdentityProvider as JwtIdentityProvider
