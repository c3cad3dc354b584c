"""Real nginx in front, fed by meshid (issue #15, must show 2 and 3): ``ssl_ocsp`` checks clients
against the CA's OCSP responder, ``ssl_stapling`` staples nginx's own status, and a real
``meshid agent`` rotates nginx's SVID and reloads it while a client calls through it."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import string
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

import meshid
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from support import (
    FRONTEND_ID,
    SERVER_ID,
    call,
    eventually,
    free_port,
    nginx_process,
    require_program,
    stop_process,
    sync_server,
)

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
NGINX_ID = "spiffe://example.org/ns/edge/sa/nginx"
TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "nginx" / "nginx.conf"
OTHER_FRONTEND_ID = "spiffe://example.org/ns/prod/sa/frontend2"
#: The responses' validity (nextUpdate), which is also how long nginx caches a client's status.
OCSP_VALIDITY = datetime.timedelta(seconds=2)


def _nginx() -> str:
    nginx = require_program("nginx", "/usr/sbin/nginx")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)", version)
    if not found or (int(found.group(1)), int(found.group(2))) < (1, 19):
        message = f"ssl_ocsp needs nginx 1.19 or later, not {version.strip()!r}"
        if os.environ.get("MESHID_REQUIRE_INTEROP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return nginx


@dataclass
class Ca:
    server: CaServer
    data_dir: Path
    address: str

    @property
    def bundle_file(self) -> Path:
        return self.data_dir / "bundle.pem"

    @property
    def bundles(self) -> meshid.BundleSet:
        return meshid.BundleSet.of(meshid.TrustBundle.load(TD, self.bundle_file))

    def token(self, spiffe_id: str, ttl: datetime.timedelta | None = None) -> str:
        with AdminClient(self.address, self.data_dir) as admin:
            admin.create_entry(spiffe_id, None, ttl)
            return str(admin.create_token(spiffe_id).token)

    def enroll(self, spiffe_id: str) -> meshid.X509Svid:
        svid, _ = fetch_svid(self.address, self.bundle_file, self.token(spiffe_id))
        return svid


@pytest.fixture
def meshid_ca(tmp_path: Path) -> Iterator[Ca]:
    """A meshid CA whose SVIDs name its OCSP responder, serving gRPC and OCSP on loopback."""
    ocsp_port = free_port()
    data_dir = tmp_path / "ca"
    init_data_dir(data_dir, TD, ocsp_url=f"http://127.0.0.1:{ocsp_port}/ocsp")
    server = CaServer(data_dir, "127.0.0.1:0", ocsp_listen=f"127.0.0.1:{ocsp_port}", ocsp_validity=OCSP_VALIDITY)
    port = server.start()
    try:
        yield Ca(server, data_dir, f"127.0.0.1:{port}")
    finally:
        server.stop()


def _write(folder: Path, svid: meshid.X509Svid, bundle_pem: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "svid.pem").write_bytes(svid.chain_pem())
    (folder / "svid.key").write_bytes(svid.key_pem())
    (folder / "svid.key").chmod(0o600)
    (folder / "bundle.pem").write_bytes(bundle_pem)


@contextlib.contextmanager
def greeter(ca: Ca) -> Iterator[int]:
    """The meshid greeter nginx forwards to: it trusts nginx's header and admits the frontend."""
    source = meshid.StaticSource(ca.enroll(SERVER_ID), ca.bundles)
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "frontend", "methods": ["*"], "spiffe_ids": [FRONTEND_ID, OTHER_FRONTEND_ID]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(
        policy, source=source, trusted_proxies=[NGINX_ID], forwarded_header="x-client-cert"
    )
    with sync_server(source, interceptor) as port:
        yield port


@contextlib.contextmanager
def nginx_in_front(tmp_path: Path, svid_dir: Path, upstream_port: int) -> Iterator[tuple[int, Path]]:
    """nginx with the example config on a free loopback port; yields (port, run folder); always stopped."""
    nginx = _nginx()
    run = tmp_path / "nginx-run"
    run.mkdir()
    listen_port = free_port()
    config = string.Template(TEMPLATE.read_text()).safe_substitute(
        USER_LINE="user root;" if os.geteuid() == 0 else "",
        RUN=run,
        LISTEN=f"127.0.0.1:{listen_port}",
        SVID_DIR=svid_dir,
        UPSTREAM=f"127.0.0.1:{upstream_port}",
        UPSTREAM_NAME=meshid.identity_dns_name(meshid.SpiffeId.parse(SERVER_ID)),
        SSL_OCSP="leaf",
    )
    assert "${" not in config, "a placeholder of the example config was left unfilled"
    # info: nginx says why it refused a client certificate only at that level
    (run / "nginx.conf").write_text(config.replace("error.log warn;", "error.log info;"))
    with nginx_process(run, listen_port, nginx):
        yield listen_port, run
    log = (run / "error.log").read_text() if (run / "error.log").exists() else ""
    assert "ssl_stapling ignored" not in log, log  # nginx found the OCSP URL in its own SVID


def _through(port: int, svid: meshid.X509Svid, bundles: meshid.BundleSet) -> tuple[str, str]:
    with meshid.secure_channel(f"127.0.0.1:{port}", meshid.StaticSource(svid, bundles), server_id=NGINX_ID) as channel:
        return call(channel)


def _s_client(port: int, client_dir: Path, bundle: Path) -> str:
    openssl = require_program("openssl", "/usr/bin/openssl")
    done = subprocess.run(
        [
            openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-status", "-tls1_3",
            "-cert", str(client_dir / "svid.pem"), "-key", str(client_dir / "svid.key"),
            "-CAfile", str(bundle), "-showcerts",
        ],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout


def _served_serial(s_client_output: str) -> int | None:
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", s_client_output, re.S)
    return None if pem is None else x509.load_pem_x509_certificate(pem.group(0).encode()).serial_number


# --- must show 2: ssl_ocsp refuses a revoked client, and the stapled status is good ----------------


def test_nginx_refuses_a_revoked_client_within_the_ocsp_validity_and_staples_good(
    meshid_ca: Ca, tmp_path: Path
) -> None:
    ca = meshid_ca
    _write(tmp_path / "nginx-svid", ca.enroll(NGINX_ID), ca.bundle_file.read_bytes())
    client = ca.enroll(FRONTEND_ID)
    _write(tmp_path / "client", client, ca.bundle_file.read_bytes())
    with greeter(ca) as upstream, nginx_in_front(tmp_path, tmp_path / "nginx-svid", upstream) as (port, run):
        assert _through(port, client, ca.bundles) == ("OK", FRONTEND_ID)

        # nginx fetches its own status on a first handshake and staples it from then on
        stapled = eventually(
            lambda: (
                (out := _s_client(port, tmp_path / "client", ca.bundle_file)) and "Cert Status: good" in out and out
            ),
            20,
            "nginx to staple its OCSP status",
        )
        assert "OCSP Response Status: successful" in str(stapled)

        with AdminClient(ca.address, ca.data_dir) as admin:
            admin.revoke(serial=format(client.leaf.serial_number, "x"))
        revoked_at = time.monotonic()
        refused = eventually(
            lambda: (answer := _through(port, client, ca.bundles))[0] != "OK" and answer,
            20,
            "nginx to refuse the revoked client",
        )
        waited = time.monotonic() - revoked_at
        # nginx cached the good answer until its nextUpdate: refused within that (and the handshake)
        assert waited < OCSP_VALIDITY.total_seconds() + 5, waited
        assert refused == ("INTERNAL", "Received http2 header with status: 400")  # nginx's "SSL certificate error"
        log = (run / "error.log").read_text()
        assert "client SSL certificate verify error: certificate revoked" in log, log

        # and a good client is still admitted
        assert _through(port, ca.enroll(OTHER_FRONTEND_ID), ca.bundles) == ("OK", OTHER_FRONTEND_ID)


# --- must show 3: the agent rotates nginx's SVID and reloads it; no failed call --------------------


@pytest.mark.parametrize("hook", ["signal", "exec"])
def test_agent_rotates_nginx_five_times_under_load_with_no_failed_call(
    meshid_ca: Ca, tmp_path: Path, hook: str
) -> None:
    ca = meshid_ca
    svid_dir, run = tmp_path / "nginx-svid", tmp_path / "nginx-run"
    conf = run / "nginx.conf"
    reload = (
        ["--signal", "HUP", "--pid-file", str(run / "nginx.pid")]
        if hook == "signal"
        else ["--exec", f"{_nginx()} -p {run} -c {conf} -s reload", "--exec-timeout", "10"]
    )
    token_file = tmp_path / "token"
    token_file.write_text(ca.token(NGINX_ID, ttl=datetime.timedelta(seconds=6)))
    log = tmp_path / "agent.log"
    with log.open("wb") as log_file:
        agent = subprocess.Popen(
            [
                sys.executable, "-m", "meshid.cli", "agent", "--server", ca.address, "--bundle", str(ca.bundle_file),
                "--join-token-file", str(token_file), "--out", str(svid_dir), *reload,
            ],
            stdout=subprocess.PIPE, stderr=log_file,
        )  # fmt: skip
    try:
        eventually(lambda: (svid_dir / "svid.pem").exists() and (svid_dir / "bundle.pem").exists(), 30, "the agent")
        client = ca.enroll(FRONTEND_ID)
        _write(tmp_path / "client", client, ca.bundle_file.read_bytes())
        with greeter(ca) as upstream, nginx_in_front(tmp_path, svid_dir, upstream) as (port, _):
            results: list[tuple[str, str]] = []
            stop = threading.Event()

            def caller() -> None:
                source = meshid.StaticSource(client, ca.bundles)
                with meshid.secure_channel(f"127.0.0.1:{port}", source, server_id=NGINX_ID) as channel:
                    while not stop.is_set():
                        results.append(call(channel))

            thread = threading.Thread(target=caller)
            thread.start()
            try:

                def file_serial() -> int:
                    return x509.load_pem_x509_certificates((svid_dir / "svid.pem").read_bytes())[0].serial_number

                seen = [file_serial()]
                eventually(lambda: _served_serial(_s_client(port, tmp_path / "client", ca.bundle_file)) == seen[0], 20,
                           "nginx to serve the agent's first SVID")  # fmt: skip
                while len(seen) < 6:  # five rotations
                    eventually(lambda: file_serial() != seen[-1], 20, "the agent to rotate nginx's SVID")
                    new = file_serial()
                    eventually(
                        lambda new=new: _served_serial(_s_client(port, tmp_path / "client", ca.bundle_file)) == new,
                        20,
                        "nginx to serve the new SVID after the agent's signal",
                    )
                    seen.append(new)
            finally:
                stop.set()
                thread.join()
        assert len(set(seen)) == 6
        failed = [r for r in results if r != ("OK", FRONTEND_ID)]
        assert results and not failed, (len(results), failed[:5])
    finally:
        stop_process(agent, timeout=20)
    text = log.read_text()
    assert "reload hook ran" in text and "Traceback" not in text, text
