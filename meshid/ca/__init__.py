"""meshid's certificate authority.

``authority`` signs (roots, intermediates, SVIDs); ``issuing`` decides what is issued (entries,
join tokens, renewals, revocations) and ``agents`` what node agents get (attestation by token
or ``x509pop``, their renewal, entry sync, batch issuance, eviction; entries' ``selectors``),
over ``store`` (one SQL store, SQLite and PostgreSQL dialects); ``grpc_api`` serves that over
gRPC and ``server`` runs it as a process over a data folder (``datadir``); ``client`` is how
workloads, node agents and admins talk to it.
"""

from __future__ import annotations

from meshid.ca.authority import Authority, generate_key

__all__ = ["Authority", "generate_key"]
