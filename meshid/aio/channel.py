"""The grpc.aio channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc.aio

from meshid.credentials import ServerId, channel_credentials, merge_options
from meshid.sources import Source

__all__ = ["secure_channel"]


def secure_channel(
    target: str,
    source: Source,
    *,
    server_id: ServerId | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """The ``grpc.aio`` twin of :func:`meshid.secure_channel`."""
    creds, pins = channel_credentials(source, server_id=server_id)
    return grpc.aio.secure_channel(target, creds, options=merge_options(pins, options))
