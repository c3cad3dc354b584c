"""A repeat call on one connection is decided from the interceptor's memo (issue #14): it must
still be refused once anything the first decision rested on has changed.

Each test opens one channel (one TLS connection, so no new handshake), makes a call that is
allowed and memoised, changes one thing on the server, and calls again on the same channel.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import meshid
import meshid.aio
from meshid.ca import Authority
from support import FRONTEND_ID, SERVER_ID, SERVICE, aio_server_in_a_thread, call, sync_server

pytestmark = pytest.mark.timeout(60)

OTHER_CALLER = "spiffe://other.org/ns/prod/sa/partner"
POLICY = {
    "allow": [
        {"name": "frontend", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [FRONTEND_ID]},
        {"name": "partners", "methods": [f"/{SERVICE}/*"], "trust_domains": ["other.org"]},
    ]
}


def _server_source(ca: Authority, bundles: meshid.BundleSet) -> meshid.StaticSource:
    return meshid.StaticSource(ca.issue_svid(SERVER_ID), bundles)


def _twice(
    server_source: meshid.StaticSource,
    interceptor: meshid.AuthorizationInterceptor,
    client: meshid.X509Svid,
    bundles: meshid.BundleSet,
    change: Callable[[], object],
) -> tuple[tuple[str, str], tuple[str, str]]:
    """Call, apply ``change()``, call again on the same channel; both results."""
    with sync_server(server_source, interceptor) as port:
        source = meshid.StaticSource(client, bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
            first = call(channel)
            change()
            return first, call(channel)


def _whole_path_calls(
    interceptor: meshid.AuthorizationInterceptor | meshid.aio.AuthorizationInterceptor,
) -> list[object]:
    """The methods of the calls ``interceptor`` decides on its whole path (``Authorizer.authorize``),
    appended as they come."""
    authorizer = interceptor._authorizer
    whole: list[object] = []
    authorize = authorizer.authorize

    def counted_authorize(*args: object, **kwargs: object) -> object:
        whole.append(args[1])
        return authorize(*args, **kwargs)  # type: ignore[arg-type]

    authorizer.authorize = counted_authorize  # type: ignore[method-assign]
    return whole


def test_a_trust_domain_dropped_from_the_bundles_refuses_its_connected_peer(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    only_ours = meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, ca.roots))
    first, again = _twice(
        server, interceptor, other_ca.issue_svid(OTHER_CALLER), bundles, lambda: server.update(bundles=only_ours)
    )
    assert first == ("OK", OTHER_CALLER)
    assert again[0] == "UNAUTHENTICATED", again
    assert "other.org" in again[1]


def test_a_replaced_root_of_the_same_trust_domain_refuses_its_connected_peer(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    successor = Authority.create_root("other.org")  # other.org's roots, replaced by a new CA's
    replaced = meshid.BundleSet.of(
        meshid.TrustBundle(ca.trust_domain, ca.roots), meshid.TrustBundle(successor.trust_domain, successor.roots)
    )
    first, again = _twice(
        server, interceptor, other_ca.issue_svid(OTHER_CALLER), bundles, lambda: server.update(bundles=replaced)
    )
    assert first == ("OK", OTHER_CALLER)
    assert again[0] == "UNAUTHENTICATED", again


def test_a_reloaded_policy_decides_the_next_call_of_a_connected_peer(ca: Authority, bundles: meshid.BundleSet) -> None:
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    partners_only = {"allow": [POLICY["allow"][1]]}
    first, again = _twice(
        server,
        interceptor,
        ca.issue_svid(FRONTEND_ID),
        bundles,
        lambda: interceptor.reload(meshid.AuthorizationPolicy.from_dict(partners_only)),
    )
    assert first == ("OK", FRONTEND_ID)
    assert again[0] == "PERMISSION_DENIED", again


def test_a_revocation_check_set_later_refuses_a_connected_peer(ca: Authority, bundles: meshid.BundleSet) -> None:
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    client = ca.issue_svid(FRONTEND_ID)
    first, again = _twice(
        server,
        interceptor,
        client,
        bundles,
        lambda: interceptor.set_revocation_check(lambda peer: peer.serial == client.serial),
    )
    assert first == ("OK", FRONTEND_ID)
    assert again[0] == "UNAUTHENTICATED" and "revoked" in again[1], again


def test_repeat_calls_of_a_sync_server_take_the_fast_path_and_name_the_same_peer(
    ca: Authority, bundles: meshid.BundleSet
) -> None:
    """The sync interceptor decides a connected peer's repeat call from the memo, from grpc's
    raw auth context, without building the mapping the whole path reads (Authorizer.repeat_call):
    the whole path runs for the first call only, and every call names the same verified peer."""
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    authorizer = interceptor._authorizer
    whole = _whole_path_calls(interceptor)
    fast: list[bool] = []
    repeat_call = authorizer.repeat_call

    def counted_repeat(auth_get: object, names: tuple[object, ...], *args: object, **kwargs: object) -> object:
        answer = repeat_call(auth_get, names, *args, **kwargs)  # type: ignore[arg-type]
        if isinstance(names[0], bytes):  # the names of grpc's raw auth context: the sync fast path
            fast.append(answer is not None)
        return answer

    authorizer.repeat_call = counted_repeat  # type: ignore[method-assign]
    with sync_server(server, interceptor) as port:
        source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
            answers = [call(channel) for _ in range(5)]
    assert answers == [("OK", FRONTEND_ID)] * 5
    assert fast == [False, True, True, True, True]  # the first call misses the memo ...
    assert len(whole) == 1  # ... and only it takes the whole path


def test_repeat_calls_of_an_aio_server_are_decided_from_the_memo_without_the_whole_path(
    ca: Authority, bundles: meshid.BundleSet
) -> None:
    """The aio interceptor looks a connected peer's repeat call up in the memo first
    (Authorizer.repeat_call) and takes the whole path for the first call only; every call names the
    same verified peer, and a reloaded policy still decides the next call on the connection."""
    server = _server_source(ca, bundles)
    interceptor = meshid.aio.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    whole = _whole_path_calls(interceptor)
    with aio_server_in_a_thread(server, interceptor) as port:
        source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
            answers = [call(channel) for _ in range(4)]
            assert len(whole) == 1  # the first call took the whole path, the others the memo
            interceptor.reload(meshid.AuthorizationPolicy.from_dict({"allow": [POLICY["allow"][1]]}))  # partners only
            refused = call(channel)
    assert answers == [("OK", FRONTEND_ID)] * 4
    assert refused[0] == "PERMISSION_DENIED", refused
    assert len(whole) == 2  # the new policy made the memo stale: the whole path decided


def test_a_new_own_trust_domain_rescopes_subject_rules_for_a_connected_peer(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    """A subject rule without ``vouched_by`` covers peers of the server's own trust domain. When
    the server's SVID moves to another trust domain, the memo (whose verdict rested on the old
    one) is stale: the connected peer's next call is decided under the new scope."""
    server = _server_source(ca, bundles)
    by_subject = {"allow": [{"name": "any-subject", "methods": [f"/{SERVICE}/*"], "subject_patterns": [".*"]}]}
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(by_subject), source=server)
    moved = other_ca.issue_svid("spiffe://other.org/ns/prod/sa/greeter")
    first, again = _twice(server, interceptor, ca.issue_svid(FRONTEND_ID), bundles, lambda: server.update(svid=moved))
    assert first == ("OK", FRONTEND_ID)
    assert again[0] == "PERMISSION_DENIED", again


def test_an_identity_cache_that_starts_over_takes_the_memo_with_it(ca: Authority, bundles: meshid.BundleSet) -> None:
    """The memo's entries hold identities the verifier's cache accounts for: when that cache
    starts over (here: full at one entry, a second peer arrives), the memo is dropped with it and
    the first peer's next call takes the whole path again (and is still allowed)."""
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    interceptor._authorizer._verifier._cache.max_entries = 1
    whole = _whole_path_calls(interceptor)
    with sync_server(server, interceptor) as port:
        first = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
        second = meshid.StaticSource(ca.issue_svid(f"spiffe://{ca.trust_domain.name}/ns/prod/sa/second"), bundles)
        with (
            meshid.secure_channel(f"127.0.0.1:{port}", first, server_id=SERVER_ID) as one,
            meshid.secure_channel(f"127.0.0.1:{port}", second, server_id=SERVER_ID) as two,
        ):
            answers = [call(one), call(one)]
            assert len(whole) == 1  # the second call came from the memo
            call(two)  # a second peer: the one-entry verifier cache starts over
            assert len(whole) == 2
            answers.append(call(one))
    assert answers == [("OK", FRONTEND_ID)] * 3
    assert len(whole) == 3  # the memo went with the cache: the whole path again


def test_a_decision_made_while_the_source_changed_is_not_memoised(ca: Authority, bundles: meshid.BundleSet) -> None:
    """A call that reads the memo's inputs, then sees the source change before its decision is
    filed (here: the change lands while the call's revocation check runs), is answered but not
    memoised: its verdict rests on what it read before the change. The next call takes the whole
    path and files its decision; the one after comes from the memo."""
    server = _server_source(ca, bundles)
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(POLICY), source=server)
    changes = [lambda: server.update(svid=ca.issue_svid(SERVER_ID))]  # the first check changes the source

    def revoked(peer: meshid.PeerIdentity) -> bool:
        if changes:
            changes.pop()()
        return False

    interceptor.set_revocation_check(revoked)
    whole = _whole_path_calls(interceptor)
    with sync_server(server, interceptor) as port:
        source = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
        with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=SERVER_ID) as channel:
            answers = [call(channel) for _ in range(3)]
    assert answers == [("OK", FRONTEND_ID)] * 3
    assert not changes  # the change did land during the first call
    assert len(whole) == 2  # the first call's decision was not filed; the second's was


class _MovesWhileRead(meshid.StaticSource):
    """The interceptor's source: the first time the server's own SVID is read, a new one (of
    another trust domain) lands after the read and before the reader has kept what it read,
    the worst moment a real rotation can pick."""

    def __init__(self, svid: meshid.X509Svid, bundles: meshid.BundleSet, moved: meshid.X509Svid) -> None:
        super().__init__(svid, bundles)
        self._moved: meshid.X509Svid | None = moved

    def get_svid(self) -> meshid.X509Svid:
        read = super().get_svid()
        moved, self._moved = self._moved, None
        if moved is not None:
            self.update(svid=moved)  # notifies the interceptor, as a rotation does
        return read


def test_a_change_of_own_svid_during_its_read_is_not_missed(
    ca: Authority, other_ca: Authority, bundles: meshid.BundleSet
) -> None:
    """The server's own trust domain (the scope of subject rules) and SPIFFE ID (a JWT-SVID's
    audience) are read once and kept until the source changes. A change that lands while they
    are being read must not be lost under the old value: the next call reads them again and is
    decided under the new scope (here the server moved to other.org, so a subject rule without
    ``vouched_by`` no longer covers the example.org caller)."""
    server = _server_source(ca, bundles)  # what the TLS layer presents; unchanged
    moved = other_ca.issue_svid("spiffe://other.org/ns/prod/sa/greeter")
    own = _MovesWhileRead(ca.issue_svid(SERVER_ID), bundles, moved)
    by_subject = {"allow": [{"name": "any-subject", "methods": [f"/{SERVICE}/*"], "subject_patterns": [".*"]}]}
    interceptor = meshid.AuthorizationInterceptor(meshid.AuthorizationPolicy.from_dict(by_subject), source=own)
    first, again = _twice(server, interceptor, ca.issue_svid(FRONTEND_ID), bundles, lambda: None)
    assert own._moved is None  # the change did land during the first call's read
    assert first == ("OK", FRONTEND_ID)  # decided on what that call read (and not memoised)
    assert again[0] == "PERMISSION_DENIED", again
    assert interceptor._authorizer._audiences(meshid.AuthorizationPolicy.from_dict(by_subject)) == frozenset(
        {"spiffe://other.org/ns/prod/sa/greeter"}
    )
