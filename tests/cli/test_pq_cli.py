"""The CLI's post-quantum commands (issue #18), run as real processes: ``ca init --key-type
ml-dsa-65``, ``ca key add``, ``ca rotate --key-type``, and ``svid inspect`` / ``policy check``
reading ML-DSA certificates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshid import TrustBundle
from meshid.ca import Authority, generate_key
from support import assert_refused, run_cli

TD = "example.org"
FRONTEND = f"spiffe://{TD}/ns/prod/sa/frontend"


def test_ca_init_key_type_ml_dsa_65_makes_a_post_quantum_only_ca_that_refuses_to_serve(tmp_path: Path) -> None:
    folder = str(tmp_path / "pq")
    made = run_cli("ca", "init", "--data-dir", folder, "--trust-domain", TD, "--key-type", "ml-dsa-65")
    assert made.returncode == 0, made.stderr
    assert "(ml-dsa-65 key)" in made.stdout
    info = json.loads(run_cli("svid", "inspect", "--json", f"{folder}/bundle.pem").stdout)
    assert (info["kind"], info["key_algorithm"], info["signature_algorithm"]) == (
        "CA certificate",
        "ML-DSA-65",
        "ML-DSA-65",
    )
    served = run_cli("ca", "serve", "--data-dir", folder, "--listen", "127.0.0.1:0")
    assert_refused(served, "signs with ML-DSA only", "grpcio", "meshid ca key add --key-type ml-dsa-65")


def test_ca_init_refuses_an_unknown_key_type(tmp_path: Path) -> None:
    result = run_cli("ca", "init", "--data-dir", str(tmp_path / "x"), "--trust-domain", TD, "--key-type", "ml-dsa-44")
    assert result.returncode == 2 and "invalid choice: 'ml-dsa-44'" in result.stderr
    assert "Traceback" not in result.stderr


def test_ca_key_add_then_rotate_the_ml_dsa_ca_with_prepare_and_activate(tmp_path: Path) -> None:
    folder = str(tmp_path / "ca")
    assert run_cli("ca", "init", "--data-dir", folder, "--trust-domain", TD).returncode == 0
    added = run_cli("ca", "key", "add", "--data-dir", folder)
    assert added.returncode == 0, added.stderr
    assert_refused(run_cli("ca", "key", "add", "--data-dir", folder), "has an ml-dsa-65 CA already", "rotate it")
    assert len(TrustBundle.load(TD, Path(folder) / "bundle.pem").roots) == 2
    prepared = run_cli("ca", "rotate", "prepare", "--data-dir", folder, "--key-type", "ml-dsa-65")
    assert prepared.returncode == 0, prepared.stderr
    assert f"meshid ca rotate activate --data-dir {folder} --key-type ml-dsa-65\n" in prepared.stdout
    status = run_cli("ca", "rotate", "status", "--data-dir", folder).stdout
    assert f"run `meshid ca rotate activate --data-dir {folder} --key-type ml-dsa-65`" in status, status
    assert len(TrustBundle.load(TD, Path(folder) / "bundle.pem").roots) == 3
    activated = run_cli("ca", "rotate", "activate", "--data-dir", folder, "--key-type", "ml-dsa-65")
    assert activated.returncode == 0, activated.stderr
    status = run_cli("ca", "rotate", "status", "--data-dir", folder).stdout
    assert status.count("signing (") == 2 and "signing (ML-DSA-65)" in status
    assert "retiring " in status
    assert_refused(
        run_cli("ca", "rotate", "activate", "--data-dir", folder, "--key-type", "ml-dsa-65"), "nothing prepared"
    )


@pytest.fixture(scope="module")
def pq_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pq-files")
    pq = Authority.create_root(TD, key=generate_key("ml-dsa-65"))
    classical = Authority.create_root(TD)
    (folder / "pq.pem").write_bytes(pq.issue_svid(FRONTEND, key_kind="ml-dsa-65").chain_pem())
    (folder / "ec.pem").write_bytes(classical.issue_svid(FRONTEND).chain_pem())
    (folder / "bundle.pem").write_bytes(TrustBundle(TD, (*classical.roots, *pq.roots)).to_pem())
    (folder / "policy.yaml").write_text(
        f"name: pq\nrequire_pq_signature: true\nallow:\n  - name: f\n    methods: ['*']\n    spiffe_ids: ['{FRONTEND}']\n"
    )
    return folder


def test_svid_inspect_reads_an_ml_dsa_svid_and_names_its_algorithms(pq_files: Path) -> None:
    out = run_cli("svid", "inspect", str(pq_files / "pq.pem"))
    assert out.returncode == 0, out.stderr
    assert f"SPIFFE ID:   {FRONTEND}" in out.stdout
    assert "Algorithms:  key ML-DSA-65, signed with ML-DSA-65 (post-quantum)" in out.stdout
    classical = run_cli("svid", "inspect", str(pq_files / "ec.pem")).stdout
    assert "Algorithms:  key ECDSA-P256, signed with ECDSA-SHA256\n" in classical


def test_policy_check_with_require_pq_signature_allows_ml_dsa_and_denies_ecdsa(pq_files: Path) -> None:
    args = ("policy", "check", str(pq_files / "policy.yaml"), "--method", "/echo.Echo/Say", "--bundle")
    allowed = run_cli(*args, str(pq_files / "bundle.pem"), "--cert", str(pq_files / "pq.pem"))
    assert allowed.returncode == 0, (allowed.stdout, allowed.stderr)
    assert allowed.stdout.startswith(f"ALLOW {FRONTEND} /echo.Echo/Say: allowed by rule 'f'")
    denied = run_cli(*args, str(pq_files / "bundle.pem"), "--cert", str(pq_files / "ec.pem"))
    assert denied.returncode == 1, (denied.stdout, denied.stderr)
    assert "the peer authenticated with ECDSA-P256, a classical signature" in denied.stdout


def test_svid_fetch_key_type_ml_dsa_65_for_an_ml_dsa_only_entry(tmp_path: Path) -> None:
    from meshid.ca.server import CaServer

    folder = tmp_path / "ca"
    assert run_cli("ca", "init", "--data-dir", str(folder), "--trust-domain", TD).returncode == 0
    assert run_cli("ca", "key", "add", "--data-dir", str(folder)).returncode == 0
    server = CaServer(folder, "127.0.0.1:0")
    address = f"127.0.0.1:{server.start()}"
    try:
        admin = ("--server", address, "--data-dir", str(folder))
        created = run_cli("entry", "create", *admin, "--spiffe-id", FRONTEND, "--svid-types", "ml-dsa-65")
        assert created.returncode == 0, created.stderr
        assert "svids ml-dsa-65" in created.stdout
        listed = run_cli("entry", "list", *admin)
        assert f"{FRONTEND}  ttl=3600s" in listed.stdout and "svids=ml-dsa-65" in listed.stdout
        fetch = ("svid", "fetch", "--server", address, "--bundle", str(folder / "bundle.pem"))
        token = run_cli("token", "create", *admin, "--spiffe-id", FRONTEND).stdout.strip()
        refused = run_cli(*fetch, "--join-token-file", _file(tmp_path / "t1", token), "--out", str(tmp_path / "ec"))
        assert_refused(refused, "PERMISSION_DENIED", "allows ml-dsa-65 SVIDs, not classical ones")
        fetched = run_cli(
            *fetch, "--join-token-file", _file(tmp_path / "t2", token), "--out", str(tmp_path / "pq"),
            "--key-type", "ml-dsa-65",
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        bad = run_cli("entry", "create", *admin, "--spiffe-id", f"{FRONTEND}-x", "--svid-types", "classical,,x")
        assert bad.returncode == 2 and "write names separated by commas" in bad.stderr
    finally:
        server.stop(grace=None)
    inspected = run_cli("svid", "inspect", str(tmp_path / "pq" / "svid.pem"))
    assert "Algorithms:  key ML-DSA-65, signed with ML-DSA-65 (post-quantum)" in inspected.stdout


def _file(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def test_svid_inspect_does_not_call_an_svid_under_an_ecdsa_signed_ml_dsa_intermediate_post_quantum(
    tmp_path: Path,
) -> None:
    """Forging the ECDSA signature on the intermediate forges every leaf under it."""
    classical = Authority.create_root(TD)
    intermediate = Authority.from_upstream(
        TD, classical.certificate, classical.private_key, key=generate_key("ml-dsa-65")
    )
    path = tmp_path / "svid.pem"
    path.write_bytes(intermediate.issue_svid(FRONTEND, key_kind="ml-dsa-65").chain_pem())
    out = run_cli("svid", "inspect", str(path))
    assert out.returncode == 0, out.stderr
    assert "Algorithms:  key ML-DSA-65, signed with ML-DSA-65" in out.stdout
    assert "(post-quantum)" not in out.stdout
    assert "ECDSA-SHA256" in out.stdout  # the classical signature the chain carries is named
