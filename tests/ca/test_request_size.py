"""meshid.ca.request_size: the agent sizes each SvidRequest of a batch without building it, the same figure
as protobuf's ByteSize for any SPIFFE ID text and CSR length (so a batch stays under the CA's limit)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshid._proto import agent_pb2
from meshid.ca.request_size import svid_request_size


@given(st.text(min_size=1, max_size=3000), st.binary(min_size=1, max_size=70_000))
def test_the_size_is_protobufs(spiffe_id: str, csr: bytes) -> None:
    assert svid_request_size(spiffe_id, csr) == agent_pb2.SvidRequest(spiffe_id=spiffe_id, csr=csr).ByteSize()
