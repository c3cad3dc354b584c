"""IssuerSource as a JWT source (issue #16): JWT-SVIDs from the CA over its mTLS channel, cached
per audience until half their lifetime, and the JWT keys in its bundles. A real CA in process on
loopback; the cache's schedule stepped on a ManualClock."""

from __future__ import annotations

import datetime
import threading

import pytest

import meshid
from meshid.agent import IssuerSource
from meshid.agent.jwt_cache import JwtSvidCache
from meshid.ca.datadir import load_jwt_keys
from meshid.ca.jwt_keys import JwtKeys
from meshid.clock import ManualClock
from meshid.errors import RemoteError

WEB = "spiffe://example.org/ns/prod/sa/web"
AUDIENCE = ["spiffe://example.org/ns/prod/sa/api"]


def test_issuer_source_is_a_jwt_source_that_caches_per_audience(running_ca) -> None:
    token = running_ca.enroll(WEB, datetime.timedelta(minutes=10))
    with IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token) as source:
        assert isinstance(source, meshid.JwtSource)
        first = source.fetch_jwt_svid(AUDIENCE)
        assert str(first.spiffe_id) == WEB and first.audience == tuple(AUDIENCE)
        assert source.fetch_jwt_svid(AUDIENCE).token == first.token  # cached
        assert source.fetch_jwt_svid(["another"]).token != first.token  # another audience, another token
        keys = load_jwt_keys(running_ca.folder)
        assert keys is not None
        bundles = source.get_jwt_bundles()
        assert set(bundles[meshid.TrustDomain.parse("example.org")].jwt_authorities) == {keys.signing.kid}
        assert meshid.JwtSvid.parse_and_validate(first.token, bundles, AUDIENCE).spiffe_id == first.spiffe_id

        with pytest.raises(meshid.SourceError, match="it holds"):
            source.fetch_jwt_svid(AUDIENCE, meshid.SpiffeId.parse("spiffe://example.org/ns/prod/sa/other"))
        with pytest.raises(ValueError, match="non-empty list"):
            source.fetch_jwt_svid([])
        with pytest.raises(ValueError, match="non-empty list"):
            source.fetch_jwt_svid("a-plain-string")  # type: ignore[arg-type]
        with pytest.raises(RemoteError) as refused:
            source.fetch_jwt_svid(["x" * 3000])
        assert refused.value.code == "INVALID_ARGUMENT"

        # Many threads at once (the Workload API's): one channel, every answer right.
        answers: list[str] = []
        threads = [
            threading.Thread(target=lambda i=i: answers.append(str(source.fetch_jwt_svid([f"aud-{i}"]).audience)))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(answers) == sorted(str((f"aud-{i}",)) for i in range(8))


def test_the_cache_keeps_a_token_until_half_its_lifetime_and_stays_bounded() -> None:
    clock = ManualClock()
    keys = JwtKeys.generate()
    cache = JwtSvidCache(max_entries=3, clock=clock)
    sid = meshid.SpiffeId.parse(WEB)
    token = keys.sign(sid, ["a", "b"], lifetime=datetime.timedelta(minutes=5), now=clock.now().replace(microsecond=0))
    cache.put(token)
    assert cache.get(sid, ["b", "a"]) is token  # the audience as a set
    assert cache.get(sid, ["a"]) is None
    clock.advance(149)
    assert cache.get(sid, ["a", "b"]) is token
    clock.advance(1)
    assert cache.get(sid, ["a", "b"]) is None  # half of 5 minutes: ask again
    for i in range(5):
        cache.put(keys.sign(sid, [f"aud-{i}"], lifetime=datetime.timedelta(minutes=5), now=clock.now()))
    assert len(cache) <= 3


def test_a_restart_with_the_saved_svid_has_the_saved_jwt_keys_before_the_ca_answers(running_ca, tmp_path) -> None:
    token = running_ca.enroll(WEB, datetime.timedelta(minutes=10))
    folder = tmp_path / "svid"
    with IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token, svid_dir=folder) as source:
        jwt_svid = source.fetch_jwt_svid(AUDIENCE)
    assert (folder / "jwt-bundle.json").exists()
    running_ca.stop()  # the restarted source can only have the keys from its folder
    with IssuerSource(running_ca.address, running_ca.bundle_file, svid_dir=folder, timeout=1) as again:
        bundles = again.get_jwt_bundles()
        assert meshid.JwtSvid.parse_and_validate(jwt_svid.token, bundles, AUDIENCE).spiffe_id == jwt_svid.spiffe_id
    (folder / "jwt-bundle.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}')
    with IssuerSource(running_ca.address, running_ca.bundle_file, svid_dir=folder, timeout=1) as broken:
        assert not broken.get_jwt_bundles()[meshid.TrustDomain.parse("example.org")].jwt_authorities  # refused, logged


@pytest.mark.parametrize(
    "document",
    ['{"keys": [{"kty": "oct", "kid": "x"}]}', '{"keys": [{"kty": "EC", "kid": "x", "crv": "P-256"}]}'],
    ids=["oct-without-k", "ec-without-x-y"],
)
def test_a_saved_jwt_bundle_with_a_jwk_missing_its_members_is_ignored_not_a_crash(
    running_ca, tmp_path, document: str
) -> None:
    token = running_ca.enroll(WEB, datetime.timedelta(minutes=10))
    folder = tmp_path / "svid"
    with IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token, svid_dir=folder) as source:
        source.get_svid()
    running_ca.stop()  # the restarted source has only its folder
    (folder / "jwt-bundle.json").write_text(document)
    with IssuerSource(running_ca.address, running_ca.bundle_file, svid_dir=folder, timeout=1) as again:
        assert again.get_svid().spiffe_id == meshid.SpiffeId.parse(WEB)
        assert not again.get_jwt_bundles()[meshid.TrustDomain.parse("example.org")].jwt_authorities


def test_an_oversized_saved_jwt_bundle_is_refused_unread_and_the_svid_still_serves(
    running_ca, tmp_path, caplog
) -> None:
    """jwt-bundle.json is read at most 1 MiB + 1 byte: a bigger one (a disk filled by mistake or
    on purpose) is ignored with a line saying so, not parsed whole."""
    token = running_ca.enroll(WEB, datetime.timedelta(minutes=10))
    folder = tmp_path / "svid"
    with IssuerSource(running_ca.address, running_ca.bundle_file, join_token=token, svid_dir=folder) as source:
        source.get_svid()
    running_ca.stop()
    (folder / "jwt-bundle.json").write_bytes(b'{"keys": [' + b" " * (2 << 20) + b"]}")  # valid JSON, 2 MiB
    with caplog.at_level("WARNING", logger="meshid.agent"):
        with IssuerSource(running_ca.address, running_ca.bundle_file, svid_dir=folder, timeout=1) as again:
            assert again.get_svid().spiffe_id == meshid.SpiffeId.parse(WEB)
            assert not again.get_jwt_bundles()[meshid.TrustDomain.parse("example.org")].jwt_authorities
    assert "larger than 1048576 bytes" in caplog.text
