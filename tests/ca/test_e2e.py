"""meshid's CA end to end (issue #3, must show 1 and 3): ``meshid ca init`` and ``meshid ca serve``
run as real processes, and the CLI, the CA client and a greeter talk to them over real mTLS on
loopback. One CA serves most tests; each test registers SPIFFE IDs of its own."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import selectors
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid import (
    AuthorizationInterceptor,
    AuthorizationPolicy,
    BundleSet,
    CrlWatcher,
    SpiffeId,
    StaticSource,
    TrustBundle,
    X509Svid,
    identity_dns_name,
    secure_channel,
)

# The generated protobuf module is private; this test imports it only to send requests the
# public client never builds (a foreign SPIFFE ID in a renewal, an oversized or garbage CSR).
from meshid._proto import issuer_pb2
from meshid.ca import generate_key
from meshid.ca.bootstrap import anonymous_client
from meshid.ca.client import AdminClient, fetch_svid, get_crl_with_svid, renew_svid
from meshid.ca.csr import build_csr
from meshid.errors import RemoteError
from support import assert_refused, call, stop_process, sync_server

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
CA_ID = f"spiffe://{TD}/meshid/ca"
WEB_ID = f"spiffe://{TD}/ns/prod/sa/web"
SERVE_DEADLINE = 30.0


def meshid(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The ``meshid`` CLI as a real process; ``token`` is handed over in $MESHID_JOIN_TOKEN, as
    the README says to (never on the command line, where every local user can read it)."""
    env = None if token is None else {**os.environ, "MESHID_JOIN_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "meshid.cli", *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def assert_unreachable(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit code 3 (could not reach a server) and one line on stderr, never a traceback."""
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshid: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30, check=False)


def wait_until(moment: datetime.datetime, *, deadline: float = 10.0) -> None:
    """Poll the clock until ``moment`` has passed (fails after ``deadline`` seconds)."""
    give_up = time.monotonic() + deadline
    while datetime.datetime.now(datetime.UTC) <= moment:
        assert time.monotonic() < give_up, f"{moment} did not pass within {deadline} s"
        time.sleep(0.05)


def _read_port(proc: subprocess.Popen[str], log: Path) -> int:
    assert proc.stdout is not None
    give_up = time.monotonic() + SERVE_DEADLINE
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"`meshid ca serve` printed no port within {SERVE_DEADLINE} s:\n{log.read_text()}")
            if not selector.select(remaining):
                continue
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"`meshid ca serve` exited with {proc.wait()} before serving:\n{log.read_text()}")
            match = re.fullmatch(r"CA serving on 127\.0\.0\.1:(\d+)", line.strip())
            if match:
                return int(match.group(1))


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[str]:
    """``meshid ca serve`` on a free loopback port; yields ``127.0.0.1:PORT`` and always ends it."""
    log = data_dir.parent / f"{data_dir.name}-serve.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        try:
            yield f"127.0.0.1:{_read_port(proc, log)}"
        finally:
            stop_process(proc, timeout=10)


@dataclass(frozen=True)
class RunningCa:
    server: str
    data_dir: Path

    @property
    def bundle_file(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def bundles(self) -> BundleSet:
        return BundleSet.of(TrustBundle.load(TD, self.bundle_file))

    def admin(self) -> AdminClient:
        return AdminClient(self.server, self.data_dir)

    def admin_args(self) -> tuple[str, ...]:
        return ("--server", self.server, "--data-dir", str(self.data_dir))

    def token_for(self, path: str, *, ttl: datetime.timedelta | None = None, dns: tuple[str, ...] = ()) -> str:
        """Register ``spiffe://example.org/<path>`` and return a join token for it."""
        spiffe_id = f"spiffe://{TD}/{path}"
        with self.admin() as admin:
            admin.create_entry(spiffe_id, list(dns), ttl)
            return str(admin.create_token(spiffe_id).token)

    def enroll(self, path: str, *, ttl: datetime.timedelta | None = None) -> X509Svid:
        """Register ``spiffe://example.org/<path>`` and fetch an SVID for it with a join token."""
        svid, _ = fetch_svid(self.server, self.bundle_file, self.token_for(path, ttl=ttl))
        assert str(svid.spiffe_id) == f"spiffe://{TD}/{path}"
        return svid


@pytest.fixture(scope="module")
def running_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCa]:
    data_dir = tmp_path_factory.mktemp("ca") / "data"
    init = meshid("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD)
    assert init.returncode == 0, init.stderr
    with serving(data_dir) as server:
        yield RunningCa(server, data_dir)


def remote_error(fn: Callable[[], object]) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()
    return info.value


def invoke(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> tuple[str, str]:
    """One raw unary call: ("OK", "") or (status code name, details)."""
    rpc = channel.unary_unary(
        method, request_serializer=type(request).SerializeToString, response_deserializer=response_type.FromString
    )
    try:
        rpc(request, timeout=10)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


def anonymous_channel(ca: RunningCa) -> grpc.Channel:
    """What a workload without an SVID uses: the anonymous bootstrap client, the CA's ID pinned."""
    key_pem, cert_pem = anonymous_client()
    creds = grpc.ssl_channel_credentials(ca.bundle_file.read_bytes(), key_pem, cert_pem)
    pin = [("grpc.ssl_target_name_override", identity_dns_name(SpiffeId.parse(CA_ID)))]
    return grpc.secure_channel(ca.server, creds, options=pin)


# --- must show 1: issuance through the CLI, checked by openssl and py-spiffe ----------------------


def test_fetched_svid_is_accepted_by_openssl_and_py_spiffe(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    created = meshid("entry", "create", *ca.admin_args(), "--spiffe-id", WEB_ID, "--dns", "web.local")
    assert created.returncode == 0, created.stderr
    assert WEB_ID in created.stdout
    token = meshid("token", "create", *ca.admin_args(), "--spiffe-id", WEB_ID)
    assert token.returncode == 0, token.stderr
    out = tmp_path / "out"
    fetched = meshid(
        "svid", "fetch", "--server", ca.server, "--bundle", str(ca.bundle_file),
        "--out", str(out), token=token.stdout.strip(),
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
    assert (out / "svid.pem").is_file() and (out / "bundle.pem").is_file()

    for purpose in ("sslclient", "sslserver"):
        verified = openssl("verify", "-CAfile", str(out / "bundle.pem"), "-purpose", purpose, str(out / "svid.pem"))
        assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), (purpose, verified)

    theirs = spiffe.X509Svid.load(str(out / "svid.pem"), str(out / "svid.key"), serialization.Encoding.PEM)
    assert str(theirs.spiffe_id) == WEB_ID
    assert (
        x509.DNSName("web.local") in theirs.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )
    their_bundle = spiffe.X509Bundle.load(spiffe.TrustDomain(TD), str(out / "bundle.pem"), serialization.Encoding.PEM)
    (root,) = their_bundle.x509_authorities
    theirs.leaf.verify_directly_issued_by(root)

    listed = meshid("entry", "list", *ca.admin_args(), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["spiffe_id"]: row for row in json.loads(listed.stdout)}
    assert rows[WEB_ID]["dns_names"] == ["web.local"]


# --- join tokens -----------------------------------------------------------------------------------


def test_join_token_is_single_use(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    token = ca.token_for("ns/prod/sa/reuse")
    fetch = ("svid", "fetch", "--server", ca.server, "--bundle", str(ca.bundle_file))
    first = meshid(*fetch, "--out", str(tmp_path / "first"), token=token)
    assert first.returncode == 0, first.stderr
    assert_refused(meshid(*fetch, "--out", str(tmp_path / "second"), token=token), "UNAUTHENTICATED", "already used")
    assert not (tmp_path / "second").exists()
    err = remote_error(lambda: fetch_svid(ca.server, ca.bundle_file, token))
    assert err.code == "UNAUTHENTICATED" and "already used" in str(err)


def test_expired_join_token_is_unauthenticated(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    spiffe_id = f"spiffe://{TD}/ns/prod/sa/late"
    with ca.admin() as admin:
        admin.create_entry(spiffe_id)
    created = meshid("token", "create", *ca.admin_args(), "--spiffe-id", spiffe_id, "--ttl", "1s")
    assert created.returncode == 0, created.stderr
    # The CA stamps expiry as (its clock, whole seconds) + 1 s, so it has passed 1 s after the reply.
    wait_until(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.05))
    token = created.stdout.strip()
    err = remote_error(lambda: fetch_svid(ca.server, ca.bundle_file, token))
    assert err.code == "UNAUTHENTICATED" and "expired" in str(err)
    fetched = meshid(
        "svid", "fetch", "--server", ca.server, "--bundle", str(ca.bundle_file),
        "--out", str(tmp_path / "out"), token=token,
    )  # fmt: skip
    assert_refused(fetched, "UNAUTHENTICATED", "expired")


def test_unknown_join_token_is_unauthenticated(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    guessed = f"{TD}:{secrets.token_urlsafe(32)}"
    err = remote_error(lambda: fetch_svid(ca.server, ca.bundle_file, guessed))
    assert err.code == "UNAUTHENTICATED" and "unknown" in str(err)
    fetched = meshid(
        "svid", "fetch", "--server", ca.server, "--bundle", str(ca.bundle_file),
        "--out", str(tmp_path / "out"), token=guessed,
    )  # fmt: skip
    assert_refused(fetched, "UNAUTHENTICATED")


@pytest.mark.parametrize(
    ("csr", "words"),
    [
        pytest.param(b"\x30" * (20 * 1024), ("CSR", "larger than the limit"), id="oversized"),
        pytest.param(b"this is not a certificate request", ("CSR",), id="garbage"),
    ],
)
def test_bad_csr_is_invalid_argument_and_spends_no_token(
    running_ca: RunningCa, csr: bytes, words: tuple[str, ...], request: pytest.FixtureRequest
) -> None:
    ca = running_ca
    path = f"ns/prod/sa/csr-{request.node.callspec.id}"
    token = ca.token_for(path)
    with anonymous_channel(ca) as channel:
        code, details = invoke(
            channel,
            "/meshid.v1.Issuer/IssueWithToken",
            issuer_pb2.IssueWithTokenRequest(join_token=token, csr=csr),
            issuer_pb2.SvidResponse,
        )
    assert code == "INVALID_ARGUMENT", details
    for word in words:
        assert word in details
    svid, _ = fetch_svid(ca.server, ca.bundle_file, token)
    assert str(svid.spiffe_id) == f"spiffe://{TD}/{path}"


# --- renewal ---------------------------------------------------------------------------------------


def test_renewal_keeps_the_spiffe_id_with_a_new_serial_and_key(running_ca: RunningCa) -> None:
    ca = running_ca
    svid = ca.enroll("ns/prod/sa/renewer")
    renewed, bundle = renew_svid(ca.server, svid, ca.bundles)
    assert renewed.spiffe_id == svid.spiffe_id
    assert renewed.serial != svid.serial
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert renewed.leaf.public_key().public_bytes(*der) != svid.leaf.public_key().public_bytes(*der)
    assert bundle.roots == ca.bundles[svid.spiffe_id.trust_domain].roots
    # The renewed SVID is a working credential in its own right.
    again, _ = renew_svid(ca.server, renewed, ca.bundles)
    assert again.spiffe_id == svid.spiffe_id


@pytest.mark.parametrize("where", ["csr-uri-san", "request-field"])
def test_renewal_for_another_spiffe_id_is_permission_denied(running_ca: RunningCa, where: str) -> None:
    ca = running_ca
    svid = ca.enroll(f"ns/prod/sa/greedy-{where}")
    other = f"spiffe://{TD}/ns/prod/sa/payments"
    key = generate_key()
    request = (
        issuer_pb2.RenewRequest(csr=build_csr(key, uri=other))
        if where == "csr-uri-san"
        else issuer_pb2.RenewRequest(csr=build_csr(key), spiffe_id=other)
    )
    with secure_channel(ca.server, StaticSource(svid, ca.bundles), server_id=CA_ID) as channel:
        code, details = invoke(channel, "/meshid.v1.Issuer/Renew", request, issuer_pb2.SvidResponse)
    assert code == "PERMISSION_DENIED", details
    assert other in details


def test_renewal_with_an_expired_svid_fails_the_handshake(running_ca: RunningCa) -> None:
    ca = running_ca
    svid = ca.enroll("ns/prod/sa/stale", ttl=datetime.timedelta(seconds=2))
    assert svid.not_after <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=2)
    # NotAfter has whole-second precision; one more second leaves no doubt for the TLS stack.
    wait_until(svid.not_after + datetime.timedelta(seconds=1))
    err = remote_error(lambda: renew_svid(ca.server, svid, ca.bundles))
    # The CA's TLS layer verifies client certificates (with their validity period) before any
    # handler or interceptor runs, so an expired SVID never gets a connection: the client sees
    # a failed handshake, which grpc reports as UNAVAILABLE rather than an application status.
    assert err.code == "UNAVAILABLE", err


def test_renewal_with_a_revoked_svid_is_unauthenticated(running_ca: RunningCa) -> None:
    ca = running_ca
    svid = ca.enroll("ns/prod/sa/revoked-renewer")
    with ca.admin() as admin:
        assert admin.revoke(serial=f"{svid.serial:x}") == [f"{svid.serial:x}"]
    err = remote_error(lambda: renew_svid(ca.server, svid, ca.bundles))
    assert err.code == "UNAUTHENTICATED" and "revoked" in str(err)


# --- registration ----------------------------------------------------------------------------------


def test_admin_call_with_a_workload_svid_is_permission_denied(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    svid = ca.enroll("ns/prod/sa/would-be-admin")
    # AdminClient reads DIR/admin/; here that folder holds a workload's SVID.
    folder = tmp_path / "impostor"
    (folder / "admin").mkdir(parents=True)
    (folder / "admin" / "svid.pem").write_bytes(svid.chain_pem())
    (folder / "admin" / "svid.key").write_bytes(svid.key_pem())
    (folder / "admin" / "bundle.pem").write_bytes(ca.bundle_file.read_bytes())
    with AdminClient(ca.server, folder) as impostor:
        err = remote_error(impostor.list_entries)
    assert err.code == "PERMISSION_DENIED", err
    assert_refused(meshid("entry", "list", "--server", ca.server, "--data-dir", str(folder)), "PERMISSION_DENIED")


def test_entry_for_a_reserved_id_is_permission_denied(running_ca: RunningCa) -> None:
    ca = running_ca
    reserved = f"spiffe://{TD}/meshid/admin"
    with ca.admin() as admin:
        err = remote_error(lambda: admin.create_entry(reserved))
    assert err.code == "PERMISSION_DENIED" and "reserved" in str(err)
    assert_refused(meshid("entry", "create", *ca.admin_args(), "--spiffe-id", reserved), "PERMISSION_DENIED")


def test_entry_outside_the_trust_domain_is_invalid_argument(running_ca: RunningCa) -> None:
    ca = running_ca
    foreign = "spiffe://other.org/ns/prod/sa/web"
    with ca.admin() as admin:
        err = remote_error(lambda: admin.create_entry(foreign))
    assert err.code == "INVALID_ARGUMENT" and "trust domain" in str(err)
    assert_refused(meshid("entry", "create", *ca.admin_args(), "--spiffe-id", foreign), "INVALID_ARGUMENT")


# --- must show 3: revocation end to end ------------------------------------------------------------


def _crl_serials(text: str) -> set[int]:
    return {int(m.replace(":", ""), 16) for m in re.findall(r"Serial Number:\s*([0-9A-Fa-f:]+)", text)}


def test_revoked_svid_is_in_the_crl_and_refused_by_a_greeter(running_ca: RunningCa, tmp_path: Path) -> None:
    ca = running_ca
    leaving = ca.enroll("ns/prod/sa/leaving")
    staying = ca.enroll("ns/prod/sa/staying")
    greeter = ca.enroll("ns/prod/sa/greeter")

    revoked = meshid("svid", "revoke", *ca.admin_args(), "--serial", f"{leaving.serial:x}")
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {leaving.serial:x}" in revoked.stdout

    der, issuer_chain = get_crl_with_svid(ca.server, greeter, ca.bundles)
    assert issuer_chain and issuer_chain[0].subject == x509.load_der_x509_crl(der).issuer
    crl_file = tmp_path / "ca.crl"
    crl_file.write_bytes(der)
    shown = openssl("crl", "-inform", "DER", "-in", str(crl_file), "-text", "-noout")
    assert shown.returncode == 0, shown.stderr
    assert leaving.serial in _crl_serials(shown.stdout)
    assert staying.serial not in _crl_serials(shown.stdout)

    source = StaticSource(greeter, ca.bundles)
    policy = AuthorizationPolicy.from_dict(
        {
            "name": "greeter",
            "allow": [{"name": "td", "methods": ["/meshid.examples.v1.Greeter/*"], "trust_domains": [TD]}],
        }
    )
    interceptor = AuthorizationInterceptor(policy, source=source)
    watcher = CrlWatcher(ca.server, source)
    assert watcher.refresh(), watcher.last_error
    interceptor.set_revocation_check(watcher.is_revoked)
    results = {}
    with sync_server(source, interceptor) as port:
        for svid in (leaving, staying):
            client = StaticSource(svid, ca.bundles)
            with secure_channel(f"127.0.0.1:{port}", client, server_id=str(greeter.spiffe_id)) as channel:
                results[svid.spiffe_id] = call(channel)
    code, details = results[leaving.spiffe_id]
    assert code == "UNAUTHENTICATED" and "revoked" in details, details
    assert results[staying.spiffe_id] == ("OK", str(staying.spiffe_id))


# --- an upstream CA, and init's refusal ---------------------------------------------------------------


def test_upstream_ca_chains_svids_to_the_org_root(tmp_path: Path) -> None:
    root_pem, root_key = tmp_path / "root.pem", tmp_path / "root.key"
    made = openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(root_key), "-out", str(root_pem), "-days", "2", "-subj", "/O=Example Org/CN=Example Org Root CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    data_dir = tmp_path / "ca"
    init = meshid(
        "ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD,
        "--upstream-cert", str(root_pem), "--upstream-key", str(root_key),
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    root = x509.load_pem_x509_certificate(root_pem.read_bytes())
    with serving(data_dir) as server:
        ca = RunningCa(server, data_dir)
        token = ca.token_for("ns/prod/sa/web")
        out = tmp_path / "out"
        fetched = meshid(
            "svid", "fetch", "--server", server, "--bundle", str(ca.bundle_file),
            "--out", str(out), token=token,
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr

    leaf, *intermediates = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert len(intermediates) == 1 and intermediates[0].issuer == root.subject
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "intermediate.pem").write_bytes(intermediates[0].public_bytes(serialization.Encoding.PEM))
    verified = openssl(
        "verify", "-CAfile", str(root_pem), "-untrusted", str(tmp_path / "intermediate.pem"), str(tmp_path / "leaf.pem")
    )
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified
    assert x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes()) == [root]


def test_ca_init_refuses_a_folder_that_already_holds_a_ca(tmp_path: Path) -> None:
    data_dir = tmp_path / "ca"
    first = meshid("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert data_dir / "ca.key" in before
    again = meshid("ca", "init", "--data-dir", str(data_dir), "--trust-domain", "other.org")
    assert_refused(again, "already holds a CA")
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()} == before


# --- CLI exit codes against the running CA (issue #19: claims with no test) --------------------------


def _dead_address() -> str:
    """A loopback port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_bundle_show_exit_codes(running_ca: RunningCa, tmp_path: Path) -> None:
    args = ("bundle", "show", "--server", running_ca.server, "--bundle", str(running_ca.bundle_file))
    shown = meshid(*args, "--trust-domain", TD)
    assert shown.returncode == 0, shown.stderr
    published = TrustBundle.from_spiffe_json(TD, shown.stdout)
    assert published.roots == running_ca.bundles[published.trust_domain].roots
    as_pem = meshid(*args, "--trust-domain", TD, "--format", "pem")
    assert as_pem.returncode == 0 and TrustBundle.from_pem(TD, as_pem.stdout).roots == published.roots
    hinted = meshid(*args, "--trust-domain", TD, "--refresh-hint", "300")
    assert json.loads(hinted.stdout)["spiffe_refresh_hint"] == 300
    stranger = tmp_path / "stranger.pem"
    from meshid.ca import Authority

    stranger.write_bytes(TrustBundle(*(lambda a: (a.trust_domain, a.roots))(Authority.create_root(TD))).to_pem())
    assert_refused(meshid("bundle", "show", "--server", running_ca.server, "--bundle", str(stranger), "--trust-domain", TD))
    assert_unreachable(meshid(*args[:3], _dead_address(), *args[4:], "--trust-domain", TD), "UNAVAILABLE")
    assert_refused(meshid("bundle", "show", "--server", running_ca.server, "--bundle", str(tmp_path / "none.pem"), "--trust-domain", TD), "none.pem")
    assert_refused(meshid(*args, "--trust-domain", "Not A Domain"), "trust domain")


def test_ca_serve_start_up_failures_are_one_line(tmp_path: Path) -> None:
    assert_refused(meshid("ca", "serve", "--data-dir", str(tmp_path / "nothing-here"), "--listen", "127.0.0.1:0"))
    (tmp_path / "not-a-ca").mkdir()
    assert_refused(meshid("ca", "serve", "--data-dir", str(tmp_path / "not-a-ca"), "--listen", "127.0.0.1:0"))


def test_svid_revoke_by_spiffe_id_revokes_every_unexpired_svid(running_ca: RunningCa) -> None:
    first, second = running_ca.enroll("ns/prod/sa/revoke-all"), None
    with running_ca.admin() as admin:
        token = str(admin.create_token(f"spiffe://{TD}/ns/prod/sa/revoke-all").token)
    second, _ = fetch_svid(running_ca.server, running_ca.bundle_file, token)
    revoked = meshid("svid", "revoke", *running_ca.admin_args(), "--spiffe-id", f"spiffe://{TD}/ns/prod/sa/revoke-all")
    assert revoked.returncode == 0, revoked.stderr
    assert sorted(revoked.stdout.split()) == sorted(["revoked", f"{first.serial:x}", "revoked", f"{second.serial:x}"])
    again = meshid("svid", "revoke", *running_ca.admin_args(), "--spiffe-id", f"spiffe://{TD}/ns/prod/sa/revoke-all")
    assert (again.returncode, again.stdout.strip()) == (0, "nothing to revoke: no unexpired, unrevoked SVID of this SPIFFE ID")  # fmt: skip
    der, _ = get_crl_with_svid(running_ca.server, running_ca.enroll("ns/prod/sa/crl-reader"), running_ca.bundles)
    listed = {r.serial_number for r in x509.load_der_x509_crl(der)}
    assert {first.serial, second.serial} <= listed
    assert_refused(meshid("svid", "revoke", *running_ca.admin_args(), "--spiffe-id", "not a spiffe id"))


def test_svid_fetch_fails_over_across_several_servers(running_ca: RunningCa, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(running_ca.token_for("ns/prod/sa/fail-over"))
    token_file.chmod(0o600)
    out = tmp_path / "out"
    fetched = meshid(
        "svid", "fetch", "--server", _dead_address(), "--server", running_ca.server,
        "--bundle", str(running_ca.bundle_file), "--join-token-file", str(token_file), "--out", str(out),
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert str(X509Svid.load(out / "svid.pem", out / "svid.key").spiffe_id) == f"spiffe://{TD}/ns/prod/sa/fail-over"
    with running_ca.admin() as admin:
        token_file.write_text(str(admin.create_token(f"spiffe://{TD}/ns/prod/sa/fail-over").token))
    nobody = meshid(
        "svid", "fetch", "--server", _dead_address(), "--server", _dead_address(),
        "--bundle", str(running_ca.bundle_file), "--join-token-file", str(token_file), "--out", str(tmp_path / "none"),
    )  # fmt: skip
    assert_unreachable(nobody, "UNAVAILABLE")
    assert not (tmp_path / "none" / "svid.key").exists()
