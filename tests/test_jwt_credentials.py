"""meshid.jwt_call_credentials on real channels, and the interceptor's cache of validated tokens.

The per-call credentials fetch a JWT-SVID from any JwtSource and reuse it until half its
lifetime has passed; the server validates a token once and then serves it from a cache that
never outlives the token's exp. Time is a ManualClock, moved on by the test.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest

import meshid
from meshid.ca import Authority, generate_key
from meshid.clock import ManualClock
from meshid.jwtsvid import sign_jwt_svid
from meshid.peer import JwtVerifier
from support import FRONTEND_ID, SERVER_ID, call, sync_server, tls_channel

KEY = generate_key("ec-p256")
LIFETIME = datetime.timedelta(minutes=10)


class Signer:
    """A JwtSource that signs on the test's clock and records each fetch."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.fetched: list[tuple[tuple[str, ...], meshid.SpiffeId | None]] = []

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: meshid.SpiffeId | None = None) -> meshid.JwtSvid:
        self.fetched.append((tuple(audience), spiffe_id))
        who = spiffe_id or meshid.SpiffeId.parse(FRONTEND_ID)
        return sign_jwt_svid(KEY, "k1", who, audience, lifetime=LIFETIME, now=self.clock.now())

    def get_jwt_bundles(self) -> meshid.BundleSet:
        raise NotImplementedError


class Failing:
    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: meshid.SpiffeId | None = None) -> meshid.JwtSvid:
        raise meshid.SourceError("workload API: no JWT-SVID for this workload")

    def get_jwt_bundles(self) -> meshid.BundleSet:
        raise NotImplementedError


@pytest.fixture(scope="module")
def jwt_bundles(ca: Authority) -> meshid.BundleSet:
    return meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, ca.roots, jwt_authorities={"k1": KEY.public_key()}))


@pytest.fixture(scope="module")
def source(ca: Authority, jwt_bundles: meshid.BundleSet) -> meshid.StaticSource:
    return meshid.StaticSource(ca.issue_svid(SERVER_ID), jwt_bundles)


@contextlib.contextmanager
def _server(source: meshid.StaticSource, clock: ManualClock) -> Iterator[int]:
    policy = meshid.AuthorizationPolicy.from_dict(
        {"identity_sources": ["jwt"], "allow": [{"name": "all", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=source, clock=clock)
    with sync_server(source, interceptor, require_client_certificate=False) as port:
        yield port


def test_a_token_is_reused_until_half_its_lifetime(source: Any, jwt_bundles: meshid.BundleSet) -> None:
    clock = ManualClock()
    signer = Signer(clock)
    creds = meshid.jwt_call_credentials(signer, audience=SERVER_ID, clock=clock)
    with _server(source, clock) as port, tls_channel(port, jwt_bundles, creds) as channel:
        assert [call(channel) for _ in range(3)] == [("OK", FRONTEND_ID)] * 3
        assert signer.fetched == [((SERVER_ID,), None)]
        clock.advance(LIFETIME.total_seconds() / 2 - 1)
        assert call(channel) == ("OK", FRONTEND_ID)
        assert len(signer.fetched) == 1
        clock.advance(2)  # past half the lifetime: a fresh token
        assert call(channel) == ("OK", FRONTEND_ID)
        assert len(signer.fetched) == 2


def test_a_spiffe_id_and_several_audiences_are_passed_to_the_source() -> None:
    clock = ManualClock()
    signer = Signer(clock)
    creds = meshid.jwt_call_credentials(signer, audience=["a", "b"], spiffe_id=FRONTEND_ID, clock=clock)
    assert isinstance(creds, grpc.CallCredentials)
    assert isinstance(signer, meshid.JwtSource)


def test_a_source_that_fails_fails_the_call_without_a_token(source: Any, jwt_bundles: meshid.BundleSet) -> None:
    clock = ManualClock()
    creds = meshid.jwt_call_credentials(Failing(), audience=SERVER_ID, clock=clock)
    with _server(source, clock) as port, tls_channel(port, jwt_bundles, creds) as channel:
        code, details = call(channel)
    assert code == "UNAVAILABLE" and "no JWT-SVID for this workload" in details, (code, details)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="JwtSource"):
        meshid.jwt_call_credentials(object(), audience=SERVER_ID)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="audience"):
        meshid.jwt_call_credentials(Signer(ManualClock()), audience=[])
    with pytest.raises(meshid.InvalidSpiffeIdError):
        meshid.jwt_call_credentials(Signer(ManualClock()), audience=SERVER_ID, spiffe_id="not an id")


def test_the_server_never_serves_a_cached_token_past_its_exp(source: Any, jwt_bundles: meshid.BundleSet) -> None:
    clock = ManualClock()
    token = Signer(clock).fetch_jwt_svid([SERVER_ID]).token
    metadata = [("authorization", f"Bearer {token}")]
    with _server(source, clock) as port, tls_channel(port, jwt_bundles) as channel:
        assert call(channel, metadata) == ("OK", FRONTEND_ID)
        clock.advance(LIFETIME.total_seconds() + 31)  # past exp and the 30 s leeway
        code, details = call(channel, metadata)
    assert code == "UNAUTHENTICATED" and "token expired at" in details, details


# --- the verifier's cache, directly -------------------------------------------------------------------


def test_a_validated_token_is_served_from_the_cache(jwt_bundles: meshid.BundleSet) -> None:
    clock = ManualClock()
    verifier = JwtVerifier(lambda: jwt_bundles, clock=clock)
    token = Signer(clock).fetch_jwt_svid([SERVER_ID]).token
    first = verifier.identify(token, frozenset({SERVER_ID}))
    assert first.source == "jwt" and str(first.spiffe_id) == FRONTEND_ID and first.jwt_svid is not None
    assert verifier.identify(token, frozenset({SERVER_ID})) is first  # no second signature check
    assert verifier.identify(token, frozenset({SERVER_ID, "other"})) is not first  # other audiences: validated again
    clock.advance(LIFETIME.total_seconds())  # at exp: validated again (within the leeway it still passes)
    again = verifier.identify(token, frozenset({SERVER_ID, "other"}))
    assert again is not first and again == first
    clock.advance(31)
    with pytest.raises(meshid.InvalidJwtSvidError, match="expired"):
        verifier.identify(token, frozenset({SERVER_ID, "other"}))


def test_a_new_bundle_set_drops_the_cache(ca: Authority, jwt_bundles: meshid.BundleSet) -> None:
    clock = ManualClock()
    current = [jwt_bundles]
    verifier = JwtVerifier(lambda: current[0], clock=clock)
    token = Signer(clock).fetch_jwt_svid([SERVER_ID]).token
    verifier.identify(token, frozenset({SERVER_ID}))
    current[0] = meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, ca.roots))  # the JWT key withdrawn
    with pytest.raises(meshid.InvalidJwtSvidError, match="kid 'k1' is not a JWT key"):
        verifier.identify(token, frozenset({SERVER_ID}))


def test_the_cache_is_bounded_by_entries(jwt_bundles: meshid.BundleSet) -> None:
    clock = ManualClock()
    verifier = JwtVerifier(lambda: jwt_bundles, clock=clock, cache_size=2)
    signer = Signer(clock)
    tokens = [signer.fetch_jwt_svid([SERVER_ID, f"x{i}"]).token for i in range(3)]
    first = verifier.identify(tokens[0], frozenset({SERVER_ID}))
    generation = verifier.generation
    for token in tokens[1:]:
        verifier.identify(token, frozenset({SERVER_ID}))
    assert verifier.generation != generation  # the third entry made it start over
    assert verifier.identify(tokens[0], frozenset({SERVER_ID})) is not first
