"""Issue #10, item 4: memory that callers control stays bounded.

A verified caller who is denied everything floods a real greeter, and the public anonymous
certificate floods a real CA, with calls to distinct unimplemented methods whose long names
the caller chose. What the server keeps for them (decision memo, wrapped handlers, metric
label sets) must not grow with the flood: Python's own allocations are traced around it.
The RSS figures at the issue's scale (10,000 calls of 8 KB names, 20,000 renewals) are
``bench/memory.py``'s.
"""

from __future__ import annotations

import datetime
import gc
import logging
import secrets
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

import meshid
from meshid.ca.bootstrap import anonymous_client
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.metrics import REGISTRY
from support import INTRUDER_ID, SERVER_ID, SERVICE, sync_server

pytestmark = pytest.mark.timeout(120)

CALLS = 1500
NAME_BYTES = 4000  # grpc's default limit on a request's headers is 8 KB, :path included
LIMIT = 4 << 20  # what the server may keep across the whole flood; the names alone are ~6 MB


def _decision_label_sets() -> set[tuple[str, ...]]:
    return {
        tuple(sample.labels.values())
        for family in REGISTRY.collect()
        if family.name == "meshid_authz_decisions"
        for sample in family.samples
    }


@pytest.fixture(autouse=True)
def audit_records_are_made_and_dropped() -> Iterator[None]:
    """Audit records are built (the logger is enabled at INFO) and then dropped by a filter, so
    pytest's log capture, which would hold every one, is not counted as the server's memory."""
    audit = logging.getLogger("meshid.audit")
    level = audit.level
    audit.setLevel(logging.INFO)
    drop = logging.Filter("nothing-matches-this-name")
    audit.addFilter(drop)
    try:
        yield
    finally:
        audit.removeFilter(drop)
        audit.setLevel(level)


def _flood(call_one: Callable[[str], str]) -> tuple[int, set[str]]:
    """``CALLS`` calls to distinct long method names; returns the traced growth and the codes seen."""
    names = [f"/x.{secrets.token_hex(4)}/{'m' * NAME_BYTES}{i}" for i in range(CALLS)]
    for name in names[:50]:  # warm up: grpc's and meshid's one-off allocations
        call_one(name)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with futures.ThreadPoolExecutor(4) as pool:
            codes = set(pool.map(call_one, names[50:]))
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after - before, codes


def _caller(target: str, creds: grpc.ChannelCredentials, server_name: str) -> tuple[grpc.Channel, Callable[[str], str]]:
    channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", server_name)])

    def call_one(method: str) -> str:
        try:
            channel.unary_unary(method)(b"", timeout=10)
        except grpc.RpcError as err:
            return err.code().name
        return "OK"

    return channel, call_one


def test_denied_callers_flood_of_unknown_methods_is_not_kept(ca, bundles, server_source) -> None:
    rules = [{"name": "not-the-intruder", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [SERVER_ID]}]
    policy = meshid.AuthorizationPolicy.from_dict({"allow": rules})
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source)
    intruder = meshid.StaticSource(ca.issue_svid(INTRUDER_ID), bundles)
    with sync_server(server_source, interceptor) as port:
        creds, _ = meshid.channel_credentials(intruder)
        server_name = meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID))
        channel, call_one = _caller(f"127.0.0.1:{port}", creds, server_name)
        with channel:
            labels_before = _decision_label_sets()
            growth, codes = _flood(call_one)
            labels_after = _decision_label_sets()
    assert codes == {"PERMISSION_DENIED"}  # positive control: every call reached the decision
    new_labels = labels_after - labels_before
    assert all(len(value) < 100 for labels in new_labels for value in labels), "a caller's method name became a label"
    assert len(new_labels) <= 1, new_labels  # at most the one "(unknown)" label set
    assert growth < LIMIT, f"the server kept {growth / 1e6:.1f} MB for {CALLS} denied calls"


def test_anonymous_flood_at_the_ca_is_not_kept(tmp_path) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, "example.org", max_ttl=datetime.timedelta(hours=1))
    server = CaServer(folder, "127.0.0.1:0")
    port = server.start()
    try:
        roots = (folder / "bundle.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(roots, *anonymous_client())
        ca_name = meshid.identity_dns_name(meshid.SpiffeId.parse("spiffe://example.org/meshid/ca"))
        channel, call_one = _caller(f"127.0.0.1:{port}", creds, ca_name)
        with channel:
            growth, codes = _flood(call_one)
    finally:
        server.stop(None)
    assert codes == {"UNAUTHENTICATED"}  # the anonymous certificate vouches for nobody
    assert growth < LIMIT, f"the CA kept {growth / 1e6:.1f} MB for {CALLS} anonymous calls"
