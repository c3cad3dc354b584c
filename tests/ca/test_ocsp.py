"""The CA's OCSP responder and CRL over HTTP (issue #15, must show 1 and 4), checked by openssl.

``meshid ca init --ocsp-url --crl-url`` and ``meshid ca serve --ocsp-listen`` run as real
processes; ``openssl ocsp``, ``openssl x509`` and ``openssl crl`` read what they serve."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import os
import re
import selectors
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshid import BundleSet, SpiffeId, StaticSource, TrustBundle, X509Svid, secure_channel
from meshid.ca import Authority
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.http import RevocationHttpServer
from meshid.ca.ocsp import OcspResponder
from meshid.ca.store import IssuedRecord
from support import eventually, require_program, stop_process

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
CA_ID = f"spiffe://{TD}/meshid/ca"


def meshid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshid.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_program("openssl", "/usr/bin/openssl"), *args], capture_output=True, text=True, timeout=30, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_lines(proc: subprocess.Popen[bytes], log: Path, wanted: dict[str, str]) -> dict[str, int]:
    """Ports from the lines ``ca serve`` prints, one per pattern in ``wanted``."""
    assert proc.stdout is not None
    found: dict[str, int] = {}
    pending = b""
    give_up = time.monotonic() + 30
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while len(found) < len(wanted):
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"`meshid ca serve` printed no ports within 30 s:\n{log.read_text()}")
            if not selector.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)  # unbuffered: select() sees every line
            if not chunk:
                pytest.fail(f"`meshid ca serve` exited with {proc.wait()} before serving:\n{log.read_text()}")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                for name, pattern in wanted.items():
                    match = re.fullmatch(pattern, line.decode().strip())
                    if match:
                        found[name] = int(match.group(1))
    return found


@contextlib.contextmanager
def serving(data_dir: Path, *extra: str) -> Iterator[dict[str, int]]:
    """``meshid ca serve`` with the OCSP listener and metrics; yields their ports; always ends it."""
    log = data_dir.parent / f"{data_dir.name}-serve.log"
    with log.open("wb") as log_file:
        command = [sys.executable, "-m", "meshid.cli", "ca", "serve", "--data-dir", str(data_dir)]
        proc = subprocess.Popen(
            [*command, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE,
            stderr=log_file,
            bufsize=0,
        )
        try:
            yield _read_lines(
                proc,
                log,
                {
                    "grpc": r"CA serving on 127\.0\.0\.1:(\d+)",
                    "ocsp": r"CA OCSP responder and CRL on http://127\.0\.0\.1:(\d+)",
                    "metrics": r"CA metrics on http://127\.0\.0\.1:(\d+)/metrics",
                },
            )
        finally:
            stop_process(proc, timeout=10)
    assert "Traceback" not in log.read_text(), log.read_text()


@dataclass(frozen=True)
class Ca:
    data_dir: Path
    server: str
    ocsp_url: str
    metrics_port: int

    @property
    def bundle_file(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def issuer_file(self) -> Path:
        return self.data_dir / "ca.pem"

    def enroll(self, name: str, folder: Path) -> X509Svid:
        """Register ``spiffe://example.org/<name>``, fetch its SVID, write svid.pem in ``folder``."""
        spiffe_id = f"spiffe://{TD}/{name}"
        with AdminClient(self.server, self.data_dir) as admin:
            admin.create_entry(spiffe_id)
            token = str(admin.create_token(spiffe_id).token)
        svid, _ = fetch_svid(self.server, self.bundle_file, token)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "svid.pem").write_bytes(svid.chain_pem())
        return svid

    def ocsp(self, cert: Path | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
        """``openssl ocsp`` about ``cert``; ``extra`` goes before it (openssl wants -sha256, -serial there)."""
        target = ("-cert", str(cert)) if cert is not None else ()
        return openssl(
            "ocsp", "-issuer", str(self.issuer_file), *extra, *target, "-url", self.ocsp_url,
            "-CAfile", str(self.bundle_file),
        )  # fmt: skip


@pytest.fixture(scope="module")
def running_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ca]:
    data_dir = tmp_path_factory.mktemp("ocsp") / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    init = meshid(
        "ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD,
        "--ocsp-url", f"{url}/ocsp", "--crl-url", f"{url}/crl.der",
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    with serving(data_dir, "--ocsp-listen", f"127.0.0.1:{port}") as ports:
        assert ports["ocsp"] == port
        yield Ca(data_dir, f"127.0.0.1:{ports['grpc']}", url, ports["metrics"])


def _status_line(result: subprocess.CompletedProcess[str], cert: Path) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return next(line for line in result.stdout.splitlines() if line.startswith(f"{cert}:")).split(":", 1)[1].strip()


# --- must show 1: openssl ocsp ---------------------------------------------------------------------


def test_openssl_ocsp_says_good_then_revoked_after_meshid_svid_revoke(running_ca: Ca, tmp_path: Path) -> None:
    svid = running_ca.enroll("ns/prod/sa/web", tmp_path)
    cert = tmp_path / "svid.pem"
    before = running_ca.ocsp(cert)
    assert _status_line(before, cert) == "good"
    assert "Response verify OK" in before.stderr
    assert "nonce" not in before.stderr.lower()  # openssl sends a nonce and warns when it is not echoed

    revoked = meshid(
        "svid", "revoke", "--server", running_ca.server, "--data-dir", str(running_ca.data_dir),
        "--serial", format(svid.leaf.serial_number, "x"),
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    after = running_ca.ocsp(cert)  # the first answer after the revocation, not one of several tries
    assert time.monotonic() - started < 5
    assert _status_line(after, cert) == "revoked"
    assert "Response verify OK" in after.stderr
    assert "Revocation Time:" in after.stdout


def test_openssl_ocsp_says_unknown_for_a_serial_the_ca_never_issued(running_ca: Ca) -> None:
    result = running_ca.ocsp(None, "-serial", "0x1234abcd")
    assert result.returncode == 0, result.stderr
    assert "0x1234abcd: unknown" in result.stdout
    assert "Response verify OK" in result.stderr


def test_openssl_ocsp_with_sha256_cert_ids_and_get(running_ca: Ca, tmp_path: Path) -> None:
    running_ca.enroll("ns/prod/sa/get", tmp_path)
    cert = tmp_path / "svid.pem"
    result = running_ca.ocsp(cert, "-sha256")
    assert _status_line(result, cert) == "good"
    # RFC 6960 appendix A: GET {url}/{url-encoded base64 of the DER request}
    reqout = tmp_path / "req.der"
    made = openssl(
        "ocsp", "-issuer", str(running_ca.issuer_file), "-cert", str(cert), "-no_nonce", "-reqout", str(reqout)
    )
    assert made.returncode == 0, made.stderr
    encoded = urllib.parse.quote(base64.b64encode(reqout.read_bytes()).decode(), safe="")
    unescaped = base64.b64encode(reqout.read_bytes()).decode()
    for path in (f"/ocsp/{encoded}", f"/{encoded}", f"/some/prefix/{encoded}", f"/ocsp/{unescaped}"):
        with urllib.request.urlopen(f"{running_ca.ocsp_url}{path}", timeout=10) as reply:
            assert reply.headers["Content-Type"] == "application/ocsp-response"
            assert "max-age=" in reply.headers["Cache-Control"]
            response = ocsp.load_der_ocsp_response(reply.read())
        assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, path
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert response.next_update_utc is not None and response.this_update_utc < response.next_update_utc


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> ocsp.OCSPResponse:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers={"Content-Type": "application/ocsp-request", **(headers or {})})
        reply = conn.getresponse()
        return ocsp.load_der_ocsp_response(reply.read())
    finally:
        conn.close()


def _raw(url: str, data: bytes) -> ocsp.OCSPResponse:
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return ocsp.load_der_ocsp_response(body)


MALFORMED = ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_malformed_and_oversized_requests_get_malformed_request(running_ca: Ca, tmp_path: Path) -> None:
    url = running_ca.ocsp_url
    assert _post(url, b"not DER at all").response_status == MALFORMED
    assert _post(url, b"").response_status == MALFORMED
    assert _post(url, b"\x30\x82\xff\xff" + b"\x00" * 20).response_status == MALFORMED  # a length past the end
    assert _post(url, b"\x30" * (17 * 1024)).response_status == MALFORMED  # over the 16 KiB bound, never read
    # a body with no length (chunked) is not read either
    assert _raw(url, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").response_status == MALFORMED
    with urllib.request.urlopen(f"{url}/ocsp/{'A' * 5000}", timeout=10) as reply:  # an over-long URL
        assert ocsp.load_der_ocsp_response(reply.read()).response_status == MALFORMED
    with urllib.request.urlopen(f"{url}/ocsp/not*base64", timeout=10) as reply:
        assert ocsp.load_der_ocsp_response(reply.read()).response_status == MALFORMED
    # a request line past http.server's own limit (64 KiB): still one OCSP answer
    assert _raw(url, b"GET /" + b"A" * 70000 + b" HTTP/1.1\r\n\r\n").response_status == MALFORMED
    # one request about two certificates: meshid answers for one at a time (RFC 6960 allows either)
    two = running_ca.ocsp(None, "-serial", "0x1", "-serial", "0x2")
    assert "Responder Error: malformedrequest" in two.stdout + two.stderr, (two.stdout, two.stderr)
    # and the responder still answers
    running_ca.enroll("ns/prod/sa/after-garbage", tmp_path)
    assert _status_line(running_ca.ocsp(tmp_path / "svid.pem"), tmp_path / "svid.pem") == "good"


def test_a_nonce_longer_than_32_octets_is_malformed(running_ca: Ca, tmp_path: Path) -> None:
    svid = running_ca.enroll("ns/prod/sa/nonce", tmp_path)
    issuer = x509.load_pem_x509_certificates(running_ca.issuer_file.read_bytes())[0]

    def request(nonce: bytes) -> bytes:
        builder = ocsp.OCSPRequestBuilder().add_certificate(svid.leaf, issuer, hashes.SHA1())
        return (
            builder.add_extension(x509.OCSPNonce(nonce), critical=False)
            .build()
            .public_bytes(serialization.Encoding.DER)
        )

    fine = _post(running_ca.ocsp_url, request(b"n" * 32))
    assert fine.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert fine.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == b"n" * 32
    assert _post(running_ca.ocsp_url, request(b"n" * 33)).response_status == MALFORMED


def test_ocsp_metrics_and_health(running_ca: Ca, tmp_path: Path) -> None:
    running_ca.enroll("ns/prod/sa/metrics", tmp_path)
    running_ca.ocsp(tmp_path / "svid.pem")
    _post(running_ca.ocsp_url, b"garbage")
    with urllib.request.urlopen(f"http://127.0.0.1:{running_ca.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert re.search(r'meshid_ocsp_responses_total\{outcome="good"\} [1-9]', text), text
    assert re.search(r'meshid_ocsp_responses_total\{outcome="malformed"\} [1-9]', text), text
    assert "meshid_ocsp_response_seconds_count" in text
    admin = running_ca.data_dir / "admin"
    source = StaticSource(
        X509Svid.load(admin / "svid.pem", admin / "svid.key"),
        BundleSet.of(TrustBundle.load(TD, running_ca.bundle_file)),
    )
    with secure_channel(running_ca.server, source, server_id=CA_ID) as channel:
        checked = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="meshid.ocsp"))
    assert checked.status == health_pb2.HealthCheckResponse.SERVING


# --- must show 4: AIA, CDP, and the CRL over HTTP --------------------------------------------------


def test_svids_carry_aia_and_cdp_and_openssl_crl_reads_the_crl_over_http(running_ca: Ca, tmp_path: Path) -> None:
    svid = running_ca.enroll("ns/prod/sa/crl", tmp_path)
    text = openssl("x509", "-in", str(tmp_path / "svid.pem"), "-noout", "-text")
    assert text.returncode == 0, text.stderr
    assert "Authority Information Access" in text.stdout
    assert f"OCSP - URI:{running_ca.ocsp_url}/ocsp" in text.stdout
    assert "X509v3 CRL Distribution Points" in text.stdout
    assert f"URI:{running_ca.ocsp_url}/crl.der" in text.stdout

    with AdminClient(running_ca.server, running_ca.data_dir) as admin:
        admin.revoke(serial=format(svid.leaf.serial_number, "x"))
    for path, form in (("crl.der", "DER"), ("crl.pem", "PEM")):
        with urllib.request.urlopen(f"{running_ca.ocsp_url}/{path}", timeout=10) as reply:
            (tmp_path / path).write_bytes(reply.read())
        read = openssl(
            "crl", "-inform", form, "-in", str(tmp_path / path), "-noout", "-text",
            "-CAfile", str(running_ca.bundle_file),
        )  # fmt: skip
        assert read.returncode == 0, read.stderr
        assert "verify OK" in read.stderr
        assert format(svid.leaf.serial_number, "X") in read.stdout.replace(":", "").upper()


def test_a_ca_without_urls_issues_svids_without_aia_or_cdp() -> None:
    svid = Authority.create_root(TD).issue_svid(f"spiffe://{TD}/plain")
    classes = {type(ext.value) for ext in svid.leaf.extensions}
    assert x509.AuthorityInformationAccess not in classes and x509.CRLDistributionPoints not in classes


def test_ca_config_set_changes_the_urls_of_a_running_ca(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert meshid("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD).returncode == 0
    with serving(data_dir, "--ocsp-listen", "127.0.0.1:0") as ports:
        ca = Ca(data_dir, f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['ocsp']}", ports["metrics"])
        first = ca.enroll("ns/a/first", tmp_path / "first")
        assert x509.AuthorityInformationAccess not in {type(e.value) for e in first.leaf.extensions}
        changed = meshid("ca", "config", "set", "--data-dir", str(data_dir), "--ocsp-url", ca.ocsp_url)
        assert changed.returncode == 0, changed.stderr

        def enrolled_with_aia() -> X509Svid | None:
            svid = ca.enroll(f"ns/a/n{time.monotonic_ns()}", tmp_path / "later")
            return svid if x509.AuthorityInformationAccess in {type(e.value) for e in svid.leaf.extensions} else None

        svid = eventually(enrolled_with_aia, 10, "the running CA to pick up the OCSP URL", interval=0.1)
        assert x509.CRLDistributionPoints not in {type(e.value) for e in svid.leaf.extensions}
        # and openssl follows the URL in the certificate (-url taken from the AIA)
        result = openssl(
            "ocsp", "-issuer", str(ca.issuer_file), "-cert", str(tmp_path / "later" / "svid.pem"),
            "-url", ca.ocsp_url, "-CAfile", str(ca.bundle_file),
        )  # fmt: skip
        assert _status_line(result, tmp_path / "later" / "svid.pem") == "good"


@pytest.mark.parametrize("url", ["ftp://x/", "http://", "http://a b/", "x" * 600])
def test_ca_init_refuses_a_malformed_url_in_one_line(tmp_path: Path, url: str) -> None:
    result = meshid("ca", "init", "--data-dir", str(tmp_path / "d"), "--trust-domain", TD, "--ocsp-url", url)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "OCSP URL" in result.stderr
    assert not (tmp_path / "d").exists()


# --- the responder's logic, with no HTTP ------------------------------------------------------------


def _request(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256())
    return builder.build().public_bytes(serialization.Encoding.DER)


def test_a_certificate_of_another_issuer_is_unauthorized() -> None:
    ca, other = Authority.create_root(TD), Authority.create_root(TD)
    leaf = other.issue_svid(f"spiffe://{TD}/x").leaf
    responder = OcspResponder(lambda: ca, lambda serial: None)
    answer = responder.respond(_request(leaf, other.certificate))
    assert answer.outcome == "unauthorized"
    assert ocsp.load_der_ocsp_response(answer.der).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_a_store_that_cannot_answer_gives_try_later() -> None:
    ca = Authority.create_root(TD)
    leaf = ca.issue_svid(f"spiffe://{TD}/x").leaf

    def broken(serial: int) -> IssuedRecord | None:
        raise OSError("database is down")

    answer = OcspResponder(lambda: ca, broken).respond(_request(leaf, ca.certificate))
    assert ocsp.load_der_ocsp_response(answer.der).response_status == ocsp.OCSPResponseStatus.TRY_LATER


def test_the_ca_signs_and_ships_its_certificate_also_as_an_intermediate() -> None:
    root = Authority.create_root(TD)
    ca = Authority.from_upstream(TD, root.certificate, root.private_key)
    leaf = ca.issue_svid(f"spiffe://{TD}/x").leaf
    now = datetime.datetime.now(datetime.UTC)
    record = IssuedRecord(leaf.serial_number, SpiffeId.parse(f"spiffe://{TD}/x"), leaf.not_valid_after_utc, now, now)
    answer = OcspResponder(lambda: ca, lambda serial: record if serial == leaf.serial_number else None).respond(
        _request(leaf, ca.certificate)
    )
    response = ocsp.load_der_ocsp_response(answer.der)
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_time_utc == now.replace(microsecond=0)
    assert response.certificates == [ca.certificate]
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(ca.certificate.public_key()).digest


def test_after_a_key_rotation_the_old_keys_svids_are_still_answered_for(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert meshid("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD).returncode == 0
    with serving(data_dir, "--ocsp-listen", "127.0.0.1:0") as ports:
        ca = Ca(data_dir, f"127.0.0.1:{ports['grpc']}", f"http://127.0.0.1:{ports['ocsp']}", ports["metrics"])
        old = ca.enroll("ns/r/old", tmp_path / "old")
        old_issuer = tmp_path / "old-ca.pem"
        old_issuer.write_bytes(ca.issuer_file.read_bytes())
        for step in ("prepare", "activate"):
            done = meshid("ca", "rotate", step, "--data-dir", str(data_dir))
            assert done.returncode == 0, done.stderr

        def enrolled_by_the_new_key() -> X509Svid | None:
            new = ca.enroll(f"ns/r/n{time.monotonic_ns()}", tmp_path / "new")
            return new if new.leaf.issuer != old.leaf.issuer else None

        eventually(enrolled_by_the_new_key, 10, "the running CA to take the new key", interval=0.1)
        for issuer, folder in ((old_issuer, "old"), (ca.issuer_file, "new")):
            cert = tmp_path / folder / "svid.pem"
            result = openssl(
                "ocsp", "-issuer", str(issuer), "-cert", str(cert), "-url", ca.ocsp_url, "-CAfile", str(ca.bundle_file)
            )
            assert _status_line(result, cert) == "good", (folder, result.stdout, result.stderr)
            assert "Response verify OK" in result.stderr


@pytest.mark.parametrize("taken", [True, False])
def test_ocsp_listen_in_use_or_malformed_is_refused_in_one_line(tmp_path: Path, taken: bool) -> None:
    data_dir = tmp_path / "data"
    assert meshid("ca", "init", "--data-dir", str(data_dir), "--trust-domain", TD).returncode == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}" if taken else "no-port-here"
        result = meshid(
            "ca", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--ocsp-listen", address
        )  # fmt: skip
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, lines
    if taken:
        assert lines[0].startswith("meshid: OCSP: ") and "in use by another process" in lines[0], lines
    else:  # the one address parser of every HOST:PORT option refuses it before anything starts
        assert lines[0].startswith("meshid: argument --ocsp-listen: address 'no-port-here': no port"), lines


def test_stopping_the_listener_ends_keep_alive_connections() -> None:
    ca = Authority.create_root(TD)
    server = RevocationHttpServer("127.0.0.1:0", OcspResponder(lambda: ca, lambda serial: None), lambda: b"")
    port = server.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/", body=b"x", headers={"Content-Type": "application/ocsp-request"})
        assert ocsp.load_der_ocsp_response(conn.getresponse().read()).response_status == MALFORMED
        assert server.serving
        server.stop()
        assert not server.serving
        assert conn.sock is not None
        conn.sock.settimeout(3)  # well under the listener's 10 s idle timeout
        assert conn.sock.recv(1) == b""  # closed by the server at once
    finally:
        conn.close()
        server.stop()


def test_connections_past_the_limit_are_closed_unanswered() -> None:
    ca = Authority.create_root(TD)
    server = RevocationHttpServer(
        "127.0.0.1:0", OcspResponder(lambda: ca, lambda serial: None), lambda: b"", max_connections=2
    )
    port = server.start()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:

        def third_is_closed() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as extra:
                extra.sendall(b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx")
                return extra.recv(1) == b""  # closed, not queued behind the two silent ones

        assert eventually(third_is_closed, 10, "the third connection to be refused")
        for conn in idle:
            conn.close()

        def answered() -> bool:
            try:
                return _post(f"http://127.0.0.1:{port}", b"x").response_status == MALFORMED
            except (OSError, http.client.HTTPException, ValueError):
                return False

        assert eventually(answered, 10, "an answer once the two silent connections are gone")
    finally:
        for conn in idle:
            conn.close()
        server.stop()
