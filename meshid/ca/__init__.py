"""meshid's certificate authority: signing (``authority``), and later its store and gRPC services."""

from __future__ import annotations

from meshid.ca.authority import Authority, generate_key

__all__ = ["Authority", "generate_key"]
