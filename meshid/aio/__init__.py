"""meshid for ``grpc.aio``: the interceptor and the channel."""

from __future__ import annotations

from meshid.aio.channel import RotatingChannel, secure_channel
from meshid.aio.interceptors import AuthorizationInterceptor

__all__ = ["AuthorizationInterceptor", "RotatingChannel", "secure_channel"]
