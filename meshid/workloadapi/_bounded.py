"""A gRPC request message read within bounds from a grpclib stream (the attested Workload API's).

grpclib's ``Stream.recv_message`` buffers as long a message as its 5-byte prefix declares and
offers no limit (grpclib issue #195); the attested Workload API's socket is world-connectable
by default, so :func:`recv_request` reads the prefix itself and refuses, before any of the body
arrives, a message over :data:`MAX_REQUEST_BYTES`.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import grpclib.server
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError

__all__ = ["MAX_REQUEST_BYTES", "grpclib_version", "recv_request"]

log = logging.getLogger("meshid.agent")  # as the attested server's

#: The largest request message read, from any caller, before it is attested. The largest real ones
#: are ValidateJWTSVID's (a token of at most meshid.jwtsvid.JWT_SVID_MAX_BYTES, 8 KiB, and an
#: audience) and FetchJWTSVID's (its audiences); the others are empty. 64 KiB, as the CA's
#: MAX_REQUEST_BYTES: grpclib sets no limit, and the socket is world-connectable by default.
MAX_REQUEST_BYTES = 64 * 1024
_TOO_LARGE = Status.RESOURCE_EXHAUSTED  # as grpcio answers a message over its limit
_COMPRESSED = (Status.UNIMPLEMENTED, "Workload API: compressed request messages are not supported")
_NOT_A_REQUEST = Status.INVALID_ARGUMENT  # the request message does not parse
_GRPC_PREFIX = struct.Struct(">BI")  # what precedes each gRPC message: compressed flag, length


async def recv_request(stream: grpclib.server.Stream[Any, Any], message_type: Any) -> Any | None:
    """The request message of ``stream``, None if the caller sent none; refused from its 5-byte
    gRPC prefix, before a byte of its body is read, if it declares more than MAX_REQUEST_BYTES.

    grpclib's ``Stream.recv_message`` reads whatever length the prefix declares and offers no
    limit, so this reads the message from grpclib's protocol stream, the private
    ``stream._stream`` (pinned by ``grpclib<0.5``, as the attested server's ``stream.peer._transport``
    is): its ``recv_data(n)`` waits for n bytes, and gives the caller HTTP/2 window only for what
    it has read. protobuf parses the body.

    Raises:
        GRPCError: RESOURCE_EXHAUSTED, too large; UNIMPLEMENTED, compressed; INVALID_ARGUMENT, not a
            ``message_type``; INTERNAL, grpclib no longer works this way.
    """
    data: Any = getattr(stream, "_stream", None)
    if not callable(getattr(data, "recv_data", None)):
        why = (
            f"Workload API: grpclib {grpclib_version()} no longer keeps the request at stream._stream.recv_data; "
            "meshid cannot read it within bounds (fix meshid.workloadapi._bounded.recv_request)"
        )
        log.error("%s", why)
        raise GRPCError(Status.INTERNAL, why)
    prefix = await data.recv_data(_GRPC_PREFIX.size)
    if not prefix:
        return None
    compressed, length = _GRPC_PREFIX.unpack(prefix)
    if compressed:
        raise GRPCError(*_COMPRESSED)
    if length > MAX_REQUEST_BYTES:
        raise GRPCError(
            _TOO_LARGE,
            f"Workload API: the request message is {length} bytes, more than the {MAX_REQUEST_BYTES} this server reads",
        )
    try:
        return message_type.FromString(await data.recv_data(length))
    except DecodeError as err:
        raise GRPCError(
            _NOT_A_REQUEST, f"Workload API: the request is not a valid {message_type.DESCRIPTOR.name}"
        ) from err


def grpclib_version() -> str:
    from importlib.metadata import version

    return version("grpclib")
