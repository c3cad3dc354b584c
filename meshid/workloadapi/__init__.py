"""The SPIFFE Workload API in one place: the client (:class:`WorkloadApiSource`, an identity
source fed by SPIRE's agent or ``meshid agent``), the server (:class:`WorkloadApiServer`, any
source served on a Unix socket) and the wire format they share (:mod:`meshid.workloadapi.wire`)."""

from __future__ import annotations

from meshid.workloadapi.client import WorkloadApiSource
from meshid.workloadapi.server import WorkloadApiServer
from meshid.workloadapi.wire import ENDPOINT_SOCKET_ENV, socket_path

__all__ = ["ENDPOINT_SOCKET_ENV", "WorkloadApiServer", "WorkloadApiSource", "socket_path"]
