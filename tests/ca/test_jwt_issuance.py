"""The CA's JWT-SVIDs (issue #16): its JWT signing key, issuance over Issuer/NewJwtSvid and
Agent/BatchNewJwtSvid, the keys in the bundle, and their rotation. A real CA in process on
loopback, real mTLS with SVIDs it issued; tokens validated with meshid's own validator."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

import meshid
from meshid._proto import agent_pb2, issuer_pb2
from meshid.ca.client import AgentClient, IssuerClient, get_bundle_with_svid
from meshid.ca.datadir import (
    activate_rotation,
    init_data_dir,
    load_jwt_keys,
    open_service,
    prepare_jwt_rotation,
    prepare_rotation,
    retire_due_jwt_keys,
)
from meshid.errors import DataDirError, InvalidRequestError, RemoteError
from nodeagents import TD, AgentCa, agent_id, call
from support import eventually

WEB = f"spiffe://{TD}/ns/prod/sa/web"
API = f"spiffe://{TD}/ns/prod/sa/api"
AUDIENCE = [f"spiffe://{TD}/ns/prod/sa/backend"]
NEW_JWT = "/meshid.v1.Issuer/NewJwtSvid"
BATCH_JWT = "/meshid.v1.Agent/BatchNewJwtSvid"


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[AgentCa]:
    running = AgentCa(tmp_path / "ca")
    try:
        yield running
    finally:
        running.stop()


def _header(token: str) -> dict[str, object]:
    return jwt.get_unverified_header(token)


def _validate(ca: AgentCa, svid: meshid.X509Svid, token: str, audience: list[str]) -> meshid.JwtSvid:
    """The token validated against the bundle the CA serves now (its JWT keys included)."""
    bundle = get_bundle_with_svid(ca.address, svid, ca.bundles)
    return meshid.JwtSvid.parse_and_validate(token, meshid.BundleSet.of(bundle), audience)


def test_a_workload_gets_a_jwt_svid_of_its_own_id_that_validates_with_the_published_key(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    with IssuerClient(ca.address, svid, ca.bundles) as client:
        token = client.new_jwt_svid(AUDIENCE)
    assert str(token.spiffe_id) == WEB
    assert token.audience == tuple(AUDIENCE)
    header = _header(token.token)
    assert header == {"alg": "ES256", "kid": token.key_id, "typ": "JWT"}  # ES256 by default, as SPIRE
    assert set(token.claims) == {"sub", "aud", "exp", "iat"}
    assert token.issued_at is not None
    assert token.expiry - token.issued_at == datetime.timedelta(minutes=5)  # the default lifetime

    validated = _validate(ca, svid, token.token, AUDIENCE)
    assert validated.spiffe_id == token.spiffe_id
    keys = load_jwt_keys(ca.folder)
    assert keys is not None and token.key_id == keys.signing.kid
    assert len(str(token.key_id)) == 32 and str(token.key_id).isalnum()


def test_the_bundle_carries_the_jwt_keys_as_jwt_svid_jwks_with_their_kid(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    bundle = get_bundle_with_svid(ca.address, svid, ca.bundles)
    keys = load_jwt_keys(ca.folder)
    assert keys is not None
    assert set(bundle.jwt_authorities) == {keys.signing.kid}
    document = json.loads(bundle.to_spiffe_json())
    jwks = [k for k in document["keys"] if k["use"] == "jwt-svid"]
    assert [k["kid"] for k in jwks] == [keys.signing.kid]
    assert jwks[0]["kty"] == "EC" and jwks[0]["crv"] == "P-256"


def test_another_spiffe_id_is_permission_denied(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    ca.workload("ns/prod/sa/api")
    with ca.channel(svid) as channel:
        request = issuer_pb2.NewJwtSvidRequest(audience=AUDIENCE, spiffe_id=API)
        code, details, _ = call(channel, NEW_JWT, request, issuer_pb2.JwtSvidResponse)
    assert code == "PERMISSION_DENIED"
    assert "may ask only for its own SPIFFE ID" in details


def test_a_caller_without_an_svid_is_refused(ca: AgentCa) -> None:
    with ca.channel() as channel:  # the anonymous bootstrap certificate
        code, _, _ = call(channel, NEW_JWT, issuer_pb2.NewJwtSvidRequest(audience=AUDIENCE), issuer_pb2.JwtSvidResponse)
    assert code in ("UNAUTHENTICATED", "PERMISSION_DENIED")


@pytest.mark.parametrize(
    ("audience", "reason"),
    [
        ([], "an audience is required"),
        ([f"aud-{i}" for i in range(17)], "at most 16 audience values"),
        (["a" * 2049], "longer than 2048 characters"),
        (["a" * 2000, "b" * 2000, "c" * 200], "longer than 4096 bytes in all"),
        ([""], "an audience value is empty"),
        (["bad\naudience"], "control characters"),
    ],
    ids=["missing", "too-many", "too-long", "too-long-in-all", "empty-value", "control-character"],
)
def test_a_bad_audience_is_invalid_argument(ca: AgentCa, audience: list[str], reason: str) -> None:
    svid = ca.workload("ns/prod/sa/web")
    with ca.channel(svid) as channel:
        request = issuer_pb2.NewJwtSvidRequest(audience=audience)
        code, details, _ = call(channel, NEW_JWT, request, issuer_pb2.JwtSvidResponse)
    assert code == "INVALID_ARGUMENT"
    assert details.startswith("JWT-SVID: ") and reason in details


def test_an_audience_that_is_not_a_list_of_strings_is_refused(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    service = ca.server.service
    for audience in ("spiffe://example.org/backend", [42], None):
        with pytest.raises(InvalidRequestError, match=r"must be a list of strings|must be a string"):
            service.new_jwt_svid(svid.spiffe_id, audience)  # type: ignore[arg-type]


def test_the_lifetime_is_capped_by_the_entrys_ttl(ca: AgentCa) -> None:
    with ca.admin() as admin:
        admin.create_entry(API, ttl=datetime.timedelta(seconds=90))
        token = str(admin.create_token(API).token)
    svid, _ = meshid.ca.client.fetch_svid(ca.address, ca.bundle_file, token)
    with IssuerClient(ca.address, svid, ca.bundles) as client:
        jwt_svid = client.new_jwt_svid(AUDIENCE)
    assert jwt_svid.issued_at is not None
    assert jwt_svid.expiry - jwt_svid.issued_at == datetime.timedelta(seconds=90)


def test_an_entry_served_by_a_node_agent_gets_no_jwt_svid_from_the_issuer(ca: AgentCa) -> None:
    """Only the agent obtains such an entry's SVIDs; a holder of one asks the agent."""
    node = ca.attest("node-1")
    with ca.admin() as admin:
        admin.create_entry(WEB, parent_id=agent_id("node-1"), selectors=["unix:uid:1001"])
    with AgentClient(ca.address, node.svid, ca.bundles) as agent:
        [result] = agent.batch_new_svids([(WEB, meshid.ca.generate_key())])
    assert result.issuance is not None
    with IssuerClient(ca.address, result.issuance.svid, ca.bundles) as client, pytest.raises(RemoteError) as refused:
        client.new_jwt_svid(AUDIENCE)
    assert refused.value.code == "PERMISSION_DENIED"
    assert "served by node agent" in str(refused.value)


def test_a_node_agent_gets_jwt_svids_for_its_own_entries_only(ca: AgentCa) -> None:
    node = ca.attest("node-1")
    ca.attest("node-2")
    with ca.admin() as admin:
        admin.create_entry(WEB, parent_id=agent_id("node-1"), selectors=["unix:uid:1001"])
        admin.create_entry(API, parent_id=agent_id("node-2"), selectors=["unix:uid:1002"])
    missing = f"spiffe://{TD}/ns/prod/sa/nobody"
    with AgentClient(ca.address, node.svid, ca.bundles) as agent:
        results = agent.batch_new_jwt_svids([(WEB, AUDIENCE), (API, AUDIENCE), (missing, AUDIENCE), (WEB, [])])
    assert [r.code for r in results] == ["OK", "PERMISSION_DENIED", "PERMISSION_DENIED", "INVALID_ARGUMENT"]
    assert results[1].message == f"JWT batch: {API} has no entry parented to {agent_id('node-1')}"
    assert results[2].message == f"JWT batch: {missing} has no entry parented to {agent_id('node-1')}"  # no probing
    token = results[0].svid
    assert token is not None and str(token.spiffe_id) == WEB
    _validate(ca, node.svid, token.token, AUDIENCE)


def test_a_workload_cannot_call_the_agents_batch(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    request = agent_pb2.BatchNewJwtSvidRequest(requests=[agent_pb2.JwtSvidRequest(spiffe_id=WEB, audience=AUDIENCE)])
    with ca.channel(svid) as channel:
        code, _, _ = call(channel, BATCH_JWT, request, agent_pb2.BatchNewJwtSvidResponse)
    assert code == "PERMISSION_DENIED"


def test_jwt_issuance_is_logged_at_debug_without_the_token(ca: AgentCa, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "meshid.ca")
    svid = ca.workload("ns/prod/sa/web")
    caplog.clear()
    with IssuerClient(ca.address, svid, ca.bundles) as client:
        token = client.new_jwt_svid(AUDIENCE)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "meshid.ca"]
    assert (logging.DEBUG, f"CA: issued a JWT-SVID for {WEB} (kid {token.key_id}, 1 audience value(s), "
            f"until {token.expiry.isoformat()})") in lines  # fmt: skip
    assert all(token.token not in message for _, message in lines)


def test_a_jwt_key_rotation_publishes_first_signs_next_and_retires_after_the_tokens_expire(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    old = load_jwt_keys(ca.folder)
    assert old is not None
    with IssuerClient(ca.address, svid, ca.bundles) as client:
        before = client.new_jwt_svid(AUDIENCE)

        prepared = prepare_jwt_rotation(ca.folder)
        assert prepare_jwt_rotation(ca.folder) == prepared  # idempotent
        eventually(
            lambda: (
                set(get_bundle_with_svid(ca.address, svid, ca.bundles).jwt_authorities)
                == {old.signing.kid, prepared.kid}
            ),
            10,
            "the CA to publish the prepared key",
        )
        assert client.new_jwt_svid(["another"]).key_id == old.signing.kid  # published, not signing yet

        activate_rotation(ca.folder, grace=datetime.timedelta(0))
        eventually(lambda: client.new_jwt_svid(["a third"]).key_id == prepared.kid, 10, "the new key to sign")
        after = client.new_jwt_svid(AUDIENCE)
    # Both validate: the old key stays published until every token it signed has expired.
    assert _validate(ca, svid, before.token, AUDIENCE).key_id == old.signing.kid
    assert _validate(ca, svid, after.token, AUDIENCE).key_id == prepared.kid
    keys = load_jwt_keys(ca.folder)
    assert keys is not None and [k.kid for k in keys.retiring] == [old.signing.kid]
    retire_after = keys.retiring[0].retire_after
    assert retire_after >= before.expiry  # 5 minutes after activation, at least

    assert retire_due_jwt_keys(ca.folder, now=retire_after - datetime.timedelta(seconds=1)) == []
    assert retire_due_jwt_keys(ca.folder, now=retire_after) == [old.signing.kid]
    eventually(
        lambda: set(get_bundle_with_svid(ca.address, svid, ca.bundles).jwt_authorities) == {prepared.kid},
        10,
        "the CA to drop the retired key",
    )
    with pytest.raises(meshid.InvalidJwtSvidError, match="kid"):
        _validate(ca, svid, before.token, AUDIENCE)


def test_ca_rotate_prepare_rotates_the_jwt_key_with_the_x509_ca(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, TD)
    old = load_jwt_keys(folder)
    prepare_rotation(folder)
    prepared = load_jwt_keys(folder)
    assert old is not None and prepared is not None and prepared.prepared is not None
    assert prepared.signing.kid == old.signing.kid
    activate_rotation(folder)
    activated = load_jwt_keys(folder)
    assert activated is not None and activated.signing.kid == prepared.prepared.kid
    assert [k.kid for k in activated.retiring] == [old.signing.kid]
    assert activated.prepared is None


@pytest.mark.parametrize(("kind", "alg"), [("ec-p384", "ES384"), ("rsa-2048", "RS256")])
def test_the_jwt_key_type_is_chosen_at_init_and_kept_by_rotations(tmp_path: Path, kind: str, alg: str) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, TD, jwt_key_type=kind)
    service = open_service(folder)
    try:
        entry = service.create_entry("admin", WEB)
        assert _header(service.sign_jwt_svid(entry, AUDIENCE).token)["alg"] == alg
        prepare_jwt_rotation(folder)
        activate_rotation(folder)
        keys = load_jwt_keys(folder)
        assert keys is not None
        service.set_jwt_keys(keys)
        assert _header(service.sign_jwt_svid(entry, AUDIENCE).token)["alg"] == alg
    finally:
        service.store.close()


def test_an_unknown_jwt_key_type_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="--jwt-key-type 'ed25519' is unknown"):
        init_data_dir(tmp_path / "ca", TD, jwt_key_type="ed25519")
    assert not (tmp_path / "ca").exists()


def test_the_jwt_key_file_is_0600_and_an_old_folder_gets_one_when_served(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, TD)
    path = folder / "jwt-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.unlink()  # a folder made before JWT-SVIDs: no key file, no key in the store
    with sqlite3.connect(folder / "meshid.db") as db:
        db.execute("DELETE FROM jwt_keys")
    service = open_service(folder)
    try:
        sequence = service.bundle().sequence
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        keys = load_jwt_keys(folder)
        assert keys is not None and set(service.bundle().jwt_authorities) == {keys.signing.kid}
        assert _header(service.sign_jwt_svid(service.create_entry("admin", WEB), AUDIENCE).token)["alg"] == "ES256"
    finally:
        service.store.close()
    assert sequence is not None and sequence >= 2  # the published keys changed: the sequence grew


def test_a_malformed_jwt_key_file_is_refused_with_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    init_data_dir(folder, TD)
    path = folder / "jwt-keys.json"
    document = json.loads(path.read_text())
    for broken, reason in (
        ({**document, "extra": 1}, "unknown field"),
        ({**document, "signing": {**document["signing"], "kid": "not/a kid"}}, "kid must be"),
        ({**document, "signing": {**document["signing"], "private_key": "junk"}}, "not a usable key"),
    ):
        path.write_text(json.dumps(broken))
        os.chmod(path, 0o600)
        with pytest.raises(DataDirError, match=reason) as refused:
            load_jwt_keys(folder)
        assert "jwt-keys.json" in str(refused.value)


def test_replicas_on_one_store_each_carry_every_replicas_jwt_key(tmp_path: Path) -> None:
    """Each CA on a shared store signs with a JWT key of its own data folder; the bundle every one
    of them serves carries all those keys, so a token one signed validates with another's bundle."""
    init_data_dir(tmp_path / "a", TD)
    init_data_dir(tmp_path / "b", TD)
    shared = str(tmp_path / "a" / "meshid.db")
    a, b = open_service(tmp_path / "a"), open_service(tmp_path / "b", datastore=shared)
    try:
        b.publish_jwt_keys()  # what `ca serve` does when it starts
        a_keys, b_keys = load_jwt_keys(tmp_path / "a"), load_jwt_keys(tmp_path / "b")
        assert a_keys is not None and b_keys is not None and a_keys.signing.kid != b_keys.signing.kid
        entry = a.create_entry("admin", WEB)
        token = b.sign_jwt_svid(entry, AUDIENCE)
        assert token.key_id == b_keys.signing.kid
        bundle = a.bundle()
        assert set(bundle.jwt_authorities) == {a_keys.signing.kid, b_keys.signing.kid}
        assert meshid.JwtSvid.parse_and_validate(token.token, meshid.BundleSet.of(bundle), AUDIENCE).key_id == (
            b_keys.signing.kid
        )
        # B rotates: its next key is published to A's bundle before it signs.
        prepared = prepare_jwt_rotation(tmp_path / "b")
        keys = load_jwt_keys(tmp_path / "b")
        assert keys is not None
        b.set_jwt_keys(keys)  # what the running CA does when its jwt-keys.json changes
        assert prepared.kid in a.bundle().jwt_authorities
    finally:
        a.store.close()
        b.store.close()


def test_get_trust_updates_sends_the_bundle_again_when_a_jwt_key_is_published(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    with IssuerClient(ca.address, svid, ca.bundles) as client:
        current = client.trust_updates(None, None).bundle
        assert current is not None
        assert client.trust_updates(current.sequence, None).bundle is None  # nothing changed
        prepared = prepare_jwt_rotation(ca.folder)

        def sent_again() -> object:
            update = client.trust_updates(current.sequence, None).bundle
            return update is not None and prepared.kid in update.jwt_authorities and update

        update = eventually(sent_again, 10, "GetTrustUpdates to carry the prepared JWT key")
    assert isinstance(update, meshid.TrustBundle)
    assert set(update.jwt_authorities) == {*current.jwt_authorities, prepared.kid}
    assert update.roots == current.roots and (update.sequence or 0) > (current.sequence or 0)


def test_an_evicted_node_agent_gets_no_jwt_svid(ca: AgentCa) -> None:
    node = ca.attest("node-1")
    with ca.admin() as admin:
        admin.create_entry(WEB, parent_id=agent_id("node-1"), selectors=["unix:uid:1001"])
        admin.evict_agent(agent_id("node-1"))
    with AgentClient(ca.address, node.svid, ca.bundles) as agent, pytest.raises(RemoteError) as refused:
        agent.batch_new_jwt_svids([(WEB, AUDIENCE)])
    assert refused.value.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")  # its SVID is revoked, and it is evicted


def test_a_revoked_x509_svid_gets_no_jwt_svid(ca: AgentCa) -> None:
    svid = ca.workload("ns/prod/sa/web")
    with ca.admin() as admin:
        admin.revoke(serial=format(svid.serial, "x"))
    with IssuerClient(ca.address, svid, ca.bundles) as client, pytest.raises(RemoteError) as refused:
        client.new_jwt_svid(AUDIENCE)
    assert refused.value.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")


def test_a_jwt_key_the_bundle_refuses_or_too_many_on_the_store_never_break_the_bundle(tmp_path: Path) -> None:
    """What other replicas publish on a shared store is left out when a bundle cannot carry it (a
    weak key, a kid too long, more keys than a bundle holds), never makes every bundle, and so
    every issuance of every replica, fail; this CA's own keys always stay in."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from meshid.bundle import MAX_JWT_KEYS

    def der(key: object) -> bytes:
        return key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    init_data_dir(tmp_path / "a", TD)
    a = open_service(tmp_path / "a")
    try:
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=15)
        now = datetime.datetime.now(datetime.UTC)
        rows = [
            ("weak", der(rsa.generate_private_key(65537, 1024)), until),
            ("L" * 300, der(ec.generate_private_key(ec.SECP256R1())), until),
        ]
        rows += [(f"replica{i:03d}", der(ec.generate_private_key(ec.SECP256R1())), until) for i in range(MAX_JWT_KEYS)]
        a.store.publish_jwt_keys(rows, now)
        bundle = a.bundle()  # raised InvalidBundleError before
        own = load_jwt_keys(tmp_path / "a")
        assert own is not None and own.signing.kid in bundle.jwt_authorities
        assert "weak" not in bundle.jwt_authorities and "L" * 300 not in bundle.jwt_authorities
        assert len(bundle.jwt_authorities) == MAX_JWT_KEYS
        entry = a.create_entry("admin", WEB)
        token = a.sign_jwt_svid(entry, AUDIENCE)
        assert meshid.JwtSvid.parse_and_validate(token.token, meshid.BundleSet.of(bundle), AUDIENCE).key_id == (
            own.signing.kid
        )
    finally:
        a.store.close()


def test_a_jwt_rotation_that_would_retire_more_keys_than_a_bundle_carries_is_refused(tmp_path: Path) -> None:
    """Rotating often with a long grace piles up retiring keys: the rotation that would leave the
    bundle more than MAX_JWT_KEYS is refused with what to do, and the CA keeps serving its bundle."""
    from meshid.bundle import MAX_JWT_KEYS

    folder = tmp_path / "ca"
    init_data_dir(folder, TD)
    week = datetime.timedelta(days=7)
    refused = None
    for _ in range(MAX_JWT_KEYS + 2):
        prepare_jwt_rotation(folder)
        try:
            activate_rotation(folder, grace=week)
        except DataDirError as err:
            refused = err
            break
    assert refused is not None and "retiring" in str(refused) and "--grace" in str(refused), refused
    keys = load_jwt_keys(folder)  # the file still loads
    assert keys is not None and keys.prepared is not None
    service = open_service(folder)
    try:
        bundle = service.bundle()  # and the bundle carries every key: signing, prepared, retiring
        assert len(bundle.jwt_authorities) == len(keys.published) <= MAX_JWT_KEYS
    finally:
        service.store.close()
