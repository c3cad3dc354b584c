"""The command line of the CA's JWT-SVID keys (issue #16): ``ca init --jwt-key-type``, ``ca rotate
prepare [--jwt-only] | activate | status``, and the agent's ``jwt-bundle.json``. Real ``meshid``
processes; the sidecar agent against a real CA on loopback."""

from __future__ import annotations

import datetime
import json
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

import meshid
from meshid.ca.client import AdminClient
from meshid.ca.datadir import load_jwt_keys
from meshid.ca.server import CaServer
from support import eventually, run_cli, stop_process

pytestmark = pytest.mark.timeout(120)

TD = "example.org"


def test_ca_init_chooses_the_jwt_key_type_and_rotate_steps_show_the_keys(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    out = run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD, "--jwt-key-type", "ec-p384")
    assert out.returncode == 0, out.stderr
    assert "JWT-SVIDs signed by its own ec-p384 key" in out.stdout
    assert stat.S_IMODE((folder / "jwt-keys.json").stat().st_mode) == 0o600
    keys = load_jwt_keys(folder)
    assert keys is not None
    first = keys.signing.kid

    status = run_cli("ca", "rotate", "status", "--data-dir", str(folder))
    assert status.returncode == 0, status.stderr
    assert f"JWT key {first}  ec-p384  signing" in status.stdout.splitlines()

    prepared = run_cli("ca", "rotate", "prepare", "--jwt-only", "--data-dir", str(folder))
    assert prepared.returncode == 0, prepared.stderr
    keys = load_jwt_keys(folder)
    assert keys is not None and keys.prepared is not None
    assert f"prepared JWT key {keys.prepared.kid}" in prepared.stdout
    assert f"meshid ca rotate activate --data-dir {folder}\n" in prepared.stdout  # the command, to paste
    assert not (folder / "next").exists()  # the X.509 CA stays as it is
    assert (
        f"JWT key {keys.prepared.kid}  ec-p384  prepared"
        in run_cli("ca", "rotate", "status", "--data-dir", str(folder)).stdout.splitlines()
    )

    activated = run_cli("ca", "rotate", "activate", "--data-dir", str(folder))
    assert activated.returncode == 0, activated.stderr
    lines = run_cli("ca", "rotate", "status", "--data-dir", str(folder)).stdout.splitlines()
    assert f"JWT key {keys.prepared.kid}  ec-p384  signing" in lines
    assert any(line.startswith(f"JWT key {first}  ec-p384  retiring after ") for line in lines)

    again = run_cli("ca", "rotate", "activate", "--data-dir", str(folder))
    assert again.returncode != 0 and "nothing prepared" in again.stderr
    assert "Traceback" not in again.stderr


def test_an_unknown_jwt_key_type_is_refused_in_one_line(tmp_path: Path) -> None:
    out = run_cli("ca", "init", "--data-dir", str(tmp_path / "ca"), "--trust-domain", TD, "--jwt-key-type", "hs256")
    assert out.returncode == 2
    assert "invalid choice: 'hs256'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "ca").exists()


def test_jwt_only_takes_no_upstream_ca(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    assert run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD).returncode == 0
    out = run_cli("ca", "rotate", "prepare", "--jwt-only", "--data-dir", str(folder), "--upstream-cert", "x.pem")
    assert out.returncode == 2 and "--jwt-only takes no --upstream-cert" in out.stderr


def test_the_sidecar_agent_writes_the_jwt_bundle_beside_bundle_pem(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    assert run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD).returncode == 0
    server = CaServer(folder, "127.0.0.1:0")
    address = f"127.0.0.1:{server.start()}"
    agent = None
    try:
        workload = f"spiffe://{TD}/ns/prod/sa/web"
        with AdminClient(address, folder) as admin:
            admin.create_entry(workload, [], datetime.timedelta(minutes=10))
            token = str(admin.create_token(workload).token)
        out = tmp_path / "out"
        agent = subprocess.Popen(
            [sys.executable, "-m", "meshid", "agent", "--server", address, "--bundle", str(folder / "bundle.pem"),
             "--join-token", token, "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        eventually(lambda: (out / "jwt-bundle.json").exists(), 30, "the agent to write jwt-bundle.json")
        document = json.loads((out / "jwt-bundle.json").read_text())
        keys = load_jwt_keys(folder)
        assert keys is not None
        assert [(k["use"], k["kid"]) for k in document["keys"]] == [("jwt-svid", keys.signing.kid)]
        # What a JWT validator that reads files does: a token the CA signs verifies with that JWK Set.
        entry = server.service.store.get_entry(meshid.SpiffeId.parse(workload))
        assert entry is not None
        token = server.service.sign_jwt_svid(entry, ["backend"]).token
        key = jwt.PyJWKSet.from_dict(document)[keys.signing.kid]
        assert jwt.decode(token, key.key, algorithms=["ES256"], audience="backend")["sub"] == workload
    finally:
        if agent is not None:
            stop_process(agent)
        server.stop()
