"""meshid for ``grpc.aio``: the interceptor, the guarded server and the channel."""

from __future__ import annotations

from meshid.aio.channel import RotatingChannel, secure_channel
from meshid.aio.guard import server
from meshid.aio.interceptors import AuthorizationInterceptor

__all__ = ["AuthorizationInterceptor", "RotatingChannel", "secure_channel", "server"]
