"""The wire size of a node agent's batch request, worked out without building the protobuf
message: the agent sizes each request as it adds it, to keep the batch under the CA's limit."""

from __future__ import annotations

__all__ = ["svid_request_size", "varint_size"]


def svid_request_size(spiffe_id: str, csr: bytes) -> int:
    """``SvidRequest(spiffe_id=, csr=).ByteSize()`` without building the message: each field
    is a one-byte tag, a varint length and the bytes (an empty field counted too: an upper bound)."""
    name = len(spiffe_id.encode("utf-8", "surrogatepass"))
    return 2 + varint_size(name) + name + varint_size(len(csr)) + len(csr)


def varint_size(value: int) -> int:
    """How many bytes protobuf's varint encoding of ``value`` (not negative) takes."""
    return max(1, (value.bit_length() + 6) // 7)
