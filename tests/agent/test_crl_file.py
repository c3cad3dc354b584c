"""``meshid agent --out DIR --write-crl`` (issue #15): the CA's CRL beside the SVID files, for
nginx's ``ssl_crl``; a new CRL runs the reload hook. A real agent process against a real CA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from meshid.ca import Authority
from meshid.ca.client import AdminClient, fetch_svid
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from support import eventually, require_program, stop_process

pytestmark = pytest.mark.timeout(120)
TD = "example.org"


def _crl_text(path: Path, bundle: Path) -> str:
    openssl = require_program("openssl", "/usr/bin/openssl")
    done = subprocess.run(
        [openssl, "crl", "-in", str(path), "-noout", "-text", "-CAfile", str(bundle)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "verify OK" in done.stderr, (done.stdout, done.stderr)
    return done.stdout.replace(":", "").upper()


def test_the_agent_writes_the_crl_beside_the_svid_files_and_reloads_on_a_new_one(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "ca", TD)
    bundle = tmp_path / "ca" / "bundle.pem"
    server = CaServer(tmp_path / "ca", "127.0.0.1:0")
    port = server.start()
    address = f"127.0.0.1:{port}"
    try:
        with AdminClient(address, tmp_path / "ca") as admin:
            for name in ("nginx", "client"):
                admin.create_entry(f"spiffe://{TD}/ns/edge/sa/{name}")
            (tmp_path / "token").write_text(str(admin.create_token(f"spiffe://{TD}/ns/edge/sa/nginx").token))
            client_token = str(admin.create_token(f"spiffe://{TD}/ns/edge/sa/client").token)
        client, _ = fetch_svid(address, bundle, client_token)
        out, marks = tmp_path / "out", tmp_path / "marks"
        hook = f"{sys.executable} -c \"open('{marks}', 'a').write('x')\""
        log = tmp_path / "agent.log"
        with log.open("wb") as log_file:
            agent = subprocess.Popen(
                [
                    sys.executable, "-m", "meshid.cli", "agent", "--server", address, "--bundle", str(bundle),
                    "--join-token-file", str(tmp_path / "token"), "--out", str(out),
                    "--write-crl", "--crl-refresh", "0.2", "--exec", hook,
                ],
                stdout=subprocess.PIPE, stderr=log_file,
            )  # fmt: skip
        try:
            eventually(lambda: (out / "crl.pem").exists(), 30, "the agent to write crl.pem")
            assert (out / "svid.pem").exists()
            serial = format(client.leaf.serial_number, "X")
            assert serial not in _crl_text(out / "crl.pem", bundle)
            assert not marks.exists()  # the first files reload nothing

            with AdminClient(address, tmp_path / "ca") as admin:
                admin.revoke(serial=format(client.leaf.serial_number, "x"))
            eventually(lambda: serial in _crl_text(out / "crl.pem", bundle), 30, "the revocation in crl.pem")
            eventually(lambda: marks.exists(), 30, "the reload hook after the new CRL")
        finally:
            stop_process(agent, timeout=20)
    finally:
        server.stop()
    text = log.read_text()
    assert "CRL number" in text and "Traceback" not in text, text


def test_write_crl_without_out_is_refused_in_one_line(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"  # a real bundle: a missing one is refused first, by the CLI's parser
    bundle.write_bytes(Authority.create_root("example.org").certificate.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(
        [sys.executable, "-m", "meshid.cli", "agent", "--server", "127.0.0.1:1", "--bundle", str(bundle),
         "--workload-api", f"unix://{tmp_path}/s", "--write-crl"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "MESHID_JOIN_TOKEN": "td:x"},
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "meshid: agent: --write-crl writes DIR/crl.pem beside the files of --out; give --out"
    ]
