"""Dual SVIDs (issue #18): a workload holds a classical and an ML-DSA-65 SVID for one SPIFFE ID,
from a real CA with both CAs, in its files (``DIR/ml-dsa-65/``) and over the Workload API, where
the classical one comes first so existing clients (py-spiffe, meshid's own) are unaffected."""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
import spiffe
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

import meshid
from conftest import RunningCa
from meshid.agent import IssuerSource
from meshid.workloadapi import WorkloadApiServer, WorkloadApiSource
from support import eventually, stop_process

pytestmark = pytest.mark.timeout(120)

TD = "example.org"
WORKLOAD = f"spiffe://{TD}/ns/prod/sa/batch"
TTL = datetime.timedelta(minutes=10)
BOTH = ["classical", "ml-dsa-65"]

# The generated protobuf module is private; the test reads the raw response to see every SVID in it
# and its hint, which no public client exposes.
from meshid._proto import workload_pb2, workload_pb2_grpc  # noqa: E402


@pytest.fixture
def dual_ca(tmp_path: pathlib.Path) -> Iterator[RunningCa]:
    ca = RunningCa(tmp_path / "ca", ml_dsa=True)
    try:
        yield ca
    finally:
        ca.stop()


def test_issuer_source_keeps_both_svids_in_files_for_one_spiffe_id(dual_ca: RunningCa, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "svid"
    with IssuerSource(
        dual_ca.address,
        dual_ca.bundle_file,
        join_token=dual_ca.enroll(WORKLOAD, TTL, svid_types=BOTH),
        svid_dir=out,
        pq_key_kind="ml-dsa-65",
    ) as source:
        classical, pq = source.get_svid(), source.get_pq_svid()
        assert pq is not None and source.state.last_error is None
        assert source.get_additional_svids() == (("ml-dsa-65", pq),)
    assert classical.spiffe_id == pq.spiffe_id and str(pq.spiffe_id) == WORKLOAD
    assert isinstance(classical.private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(pq.private_key, mldsa.MLDSA65PrivateKey)
    on_disk = meshid.X509Svid.load(out / "ml-dsa-65" / "svid.pem", out / "ml-dsa-65" / "svid.key")
    assert on_disk == pq
    assert (out / "ml-dsa-65" / "svid.key").stat().st_mode & 0o777 == 0o600
    assert meshid.X509Svid.load(out / "svid.pem", out / "svid.key") == classical  # unchanged beside it
    bundles = meshid.BundleSet.of(meshid.TrustBundle.load(TD, out / "ml-dsa-65" / "bundle.pem"))
    assert str(bundles.verify(pq.leaf, pq.chain[1:])) == WORKLOAD
    # what a pqtls user loads: a FileSource on the ML-DSA folder
    files = [out / "ml-dsa-65" / name for name in ("svid.pem", "svid.key", "bundle.pem")]
    assert meshid.FileSource(*files).get_svid() == pq


def test_a_restart_reuses_both_saved_svids_without_a_token(dual_ca: RunningCa, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "svid"
    token = dual_ca.enroll(WORKLOAD, TTL, svid_types=BOTH)
    with IssuerSource(dual_ca.address, dual_ca.bundle_file, join_token=token, svid_dir=out, pq_key_kind="ml-dsa-65"):
        pass
    saved = meshid.X509Svid.load(out / "ml-dsa-65" / "svid.pem", out / "ml-dsa-65" / "svid.key")
    dual_ca.stop()  # no CA: both must come from the files
    with IssuerSource(dual_ca.address, dual_ca.bundle_file, svid_dir=out, pq_key_kind="ml-dsa-65") as again:
        assert again.get_pq_svid() == saved
        assert again.get_additional_svids() == (("ml-dsa-65", saved),)


def test_without_an_ml_dsa_ca_the_classical_svid_still_comes_and_the_error_is_said(tmp_path: pathlib.Path) -> None:
    ca = RunningCa(tmp_path / "ca")
    try:
        with IssuerSource(
            ca.address,
            ca.bundle_file,
            join_token=ca.enroll(WORKLOAD, TTL),
            svid_dir=tmp_path / "o",
            pq_key_kind="ml-dsa-65",
        ) as source:
            assert str(source.get_svid().spiffe_id) == WORKLOAD
            assert source.get_pq_svid() is None and source.get_additional_svids() == ()
            assert "no ML-DSA CA" in (source.state.last_error or "")
    finally:
        ca.stop()
    assert not (tmp_path / "o" / "ml-dsa-65").exists()


def test_workload_api_serves_the_classical_svid_first_and_the_ml_dsa_one_second(
    dual_ca: RunningCa, tmp_path: pathlib.Path
) -> None:
    socket = tmp_path / "wl.sock"
    source = IssuerSource(
        dual_ca.address,
        dual_ca.bundle_file,
        join_token=dual_ca.enroll(WORKLOAD, TTL, svid_types=BOTH),
        pq_key_kind="ml-dsa-65",
    )
    with source, WorkloadApiServer(source, f"unix://{socket}"):
        with grpc.insecure_channel(f"unix:{socket}") as channel:
            stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=10
            )
            response = next(stream)
            stream.cancel()
        assert [(s.spiffe_id, s.hint) for s in response.svids] == [(WORKLOAD, ""), (WORKLOAD, "ml-dsa-65")]
        assert isinstance(load_der_private_key(response.svids[0].x509_svid_key, None), ec.EllipticCurvePrivateKey)
        assert isinstance(load_der_private_key(response.svids[1].x509_svid_key, None), mldsa.MLDSA65PrivateKey)
        # meshid's own client and py-spiffe take the classical one, as before
        with WorkloadApiSource(f"unix://{socket}") as ours:
            assert ours.get_svid() == source.get_svid()
        client = spiffe.WorkloadApiClient(socket_path=f"unix://{socket}")
        try:
            theirs = client.fetch_x509_svid(timeout=10)
            context = client.fetch_x509_context(timeout=10)
        finally:
            client.close()
        assert theirs.leaf == source.get_svid().leaf
        assert [svid.leaf for svid in context.x509_svids] == [source.get_svid().leaf, source.get_pq_svid().leaf]


def test_meshid_agent_also_key_type_writes_the_ml_dsa_folder(dual_ca: RunningCa, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "MESHID_JOIN_TOKEN": dual_ca.enroll(WORKLOAD, TTL, svid_types=BOTH), "GRPC_VERBOSITY": "ERROR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshid.cli", "agent", "--server", dual_ca.address, "--bundle",
         str(dual_ca.bundle_file), "--out", str(out), "--also-key-type", "ml-dsa-65"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        eventually(lambda: (out / "ml-dsa-65" / "svid.pem").exists() or proc.poll() is not None, 60, "the ML-DSA files")
        pq = meshid.X509Svid.load(out / "ml-dsa-65" / "svid.pem", out / "ml-dsa-65" / "svid.key")
        classical = meshid.X509Svid.load(out / "svid.pem", out / "svid.key")
    finally:
        _, _, err = stop_process(proc, timeout=20)
    assert "Traceback" not in err
    assert pq.spiffe_id == classical.spiffe_id and isinstance(pq.private_key, mldsa.MLDSA65PrivateKey)
