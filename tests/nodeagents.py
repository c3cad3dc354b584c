"""What the node-agent tests of the CA share: a meshid CA in process on loopback (optionally
trusting a host PKI for x509pop, optionally on a ManualClock), host certificates made with plain
cryptography builders under a root made by meshid's own CA code, and raw calls on the wire.

Used by tests/ca/test_agents.py, tests/ca/test_batch_issuance.py, tests/ca/test_agents_cli.py
and tests/security/test_attacks_agents.py; tests/agent/test_node_agent.py also runs workloads as
the test users with what the last section holds.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import meshid

# The generated messages are private: these helpers send requests the public client never builds
# (proofs signed by the wrong key, replayed challenges, CSRs over a reused key).
from meshid._proto import agent_pb2, issuer_pb2
from meshid.ca import Authority, generate_key
from meshid.ca.bootstrap import anonymous_client
from meshid.ca.client import AdminClient, Issuance, attest_agent_with_token, fetch_svid
from meshid.ca.csr import build_csr
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.ca.x509pop import sign_proof
from meshid.clock import ManualClock

TD = "example.org"
CA_ID = f"spiffe://{TD}/meshid/ca"
AGENT = "/meshid.v1.Agent"
HOUR = datetime.timedelta(hours=1)


def agent_id(name: str) -> str:
    return f"spiffe://{TD}/meshid/agent/{name}"


def host_certificate(
    pki: Authority,
    cn: str | None = "node-1",
    *,
    extra_cns: Sequence[str] = (),
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    key: Any = None,
    ca: bool = False,
    digital_signature: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, Any]:
    """A host certificate signed by ``pki`` (as a site's own PKI would issue it), and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.NameAttribute(NameOID.COMMON_NAME, n) for n in ([cn] if cn is not None else []) + list(extra_cns)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hosts"), *names]))
        .issuer_name(pki.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pki.private_key.public_key()), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(pki.private_key, hashes.SHA256()), key


def pem_file(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


class AgentCa:
    """A meshid CA (``init_data_dir`` + ``CaServer``) on 127.0.0.1, in this process.

    ``hosts`` is the PKI whose host certificates attest agents by x509pop (none: tokens only);
    ``clock`` a ManualClock the CA signs and checks challenges on.
    """

    def __init__(
        self,
        folder: Path,
        *,
        hosts: Authority | None = None,
        template: str | None = None,
        clock: ManualClock | None = None,
        max_ttl: datetime.timedelta | None = None,
    ) -> None:
        self.folder = folder
        self.clock = clock
        agent_ca = (
            None if hosts is None else str(pem_file(folder.parent / f"{folder.name}-hosts.pem", hosts.certificate))
        )
        ttl = {} if max_ttl is None else {"max_ttl": max_ttl}  # max_ttl caps the agents' own SVIDs too
        init_data_dir(folder, TD, agent_ca=agent_ca, agent_id_template=template, **ttl)  # type: ignore[arg-type]
        self.server = CaServer(folder, "127.0.0.1:0", clock=clock)
        self.address = f"127.0.0.1:{self.server.start()}"
        self.bundle_file = folder / "bundle.pem"
        self.bundles = meshid.BundleSet.of(meshid.TrustBundle.load(TD, self.bundle_file))
        self.roots_pem = self.bundle_file.read_bytes()

    def stop(self) -> None:
        self.server.stop(grace=None)

    def restart(self) -> None:
        """Stop the CA (if it runs) and serve the same folder on the same address again."""
        self.stop()
        self.server = CaServer(self.folder, self.address, clock=self.clock)
        self.server.start()

    def admin(self) -> AdminClient:
        return AdminClient(self.address, self.folder)

    def attest(self, name: str) -> Issuance:
        """Node agent ``name``, attested with a join token made for it."""
        with self.admin() as admin:
            token = str(admin.create_agent_token(name).token)
        return attest_agent_with_token(self.address, self.roots_pem, token)

    def workload(self, path: str) -> meshid.X509Svid:
        """An entry without a parent for ``spiffe://example.org/<path>``, and its SVID (a join token)."""
        spiffe_id = f"spiffe://{TD}/{path}"
        with self.admin() as admin:
            admin.create_entry(spiffe_id)
            token = str(admin.create_token(spiffe_id).token)
        svid, _ = fetch_svid(self.address, self.bundle_file, token)
        return svid

    def channel(self, svid: meshid.X509Svid | str = "anonymous") -> grpc.Channel:
        """A channel to the CA with ``svid`` as client certificate (or the anonymous one), the CA's ID pinned."""
        key_pem, cert_pem = anonymous_client() if svid == "anonymous" else (svid.key_pem(), svid.chain_pem())  # type: ignore[union-attr]
        creds = grpc.ssl_channel_credentials(self.roots_pem, key_pem, cert_pem)
        pin = [("grpc.ssl_target_name_override", meshid.identity_dns_name(meshid.SpiffeId.parse(CA_ID)))]
        return grpc.secure_channel(self.address, creds, options=pin)


def call(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> tuple[str, str, Any]:
    """One raw unary call: ("OK", "", response) or (status code name, details, None)."""
    rpc = channel.unary_unary(
        method, request_serializer=type(request).SerializeToString, response_deserializer=response_type.FromString
    )
    try:
        return "OK", "", rpc(request, timeout=10)
    except grpc.RpcError as err:
        return err.code().name, err.details() or "", None


def challenge(channel: grpc.Channel) -> Any:
    code, details, response = call(
        channel,
        f"{AGENT}/GetAttestationChallenge",
        agent_pb2.AttestationChallengeRequest(),
        agent_pb2.AttestationChallenge,
    )
    assert code == "OK", details
    return response


def x509pop_request(
    chain: Sequence[x509.Certificate],
    signing_key: Any,
    nonce: bytes,
    challenge_id: str,
    *,
    csr: bytes | None = None,
) -> Any:
    """An AttestAgentRequest proving ``chain`` with ``signing_key`` over ``nonce`` (the agent's new key's CSR)."""
    csr = csr if csr is not None else build_csr(generate_key())
    proof = agent_pb2.X509PopProof(
        certificate_chain=[c.public_bytes(serialization.Encoding.DER) for c in chain],
        challenge_id=challenge_id,
        signature=sign_proof(signing_key, nonce, csr),
    )
    return agent_pb2.AttestAgentRequest(x509pop=proof, csr=csr)


def attest_raw(channel: grpc.Channel, request: Any) -> tuple[str, str, Any]:
    return call(channel, f"{AGENT}/AttestAgent", request, issuer_pb2.SvidResponse)


# --- workloads run as other Unix users (tests/agent/test_node_agent.py) ----------------------------
#
# Root (as CI runs) starts each workload through setpriv as one of the users .ci/run creates, with
# a Python those users can execute and PYTHONPATH naming this checkout and the test environment's
# packages. setpriv, not Popen(user=...): with a user to switch to, Python forks instead of
# vforking, and a fork of a process running grpc threads (a CA in process) can crash before it
# execs (see tests/pg.py). Missing users or such a Python: skipped, or a failure under
# MESHID_REQUIRE_INTEROP=1 (set by .ci/run), so CI never passes by skipping.

USERS = ("meshid-a", "meshid-b", "meshid-c")

#: The workload program (written to the test's folder); it prints JSON lines.
WORKLOAD_CLIENT = r'''
import json, sys, threading


def out(**fields):
    print(json.dumps(fields), flush=True)


def varint(buf, i):
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def fields(buf):
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = varint(buf, i)
        elif kind == 2:
            size, i = varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif kind == 1:
            value, i = buf[i : i + 8], i + 8
        else:
            value, i = buf[i : i + 4], i + 4
        yield key >> 3, value


def first_certificate_serial(der):
    from cryptography import x509

    size = der[1]
    if size & 0x80:
        count = size & 0x7F
        size, start = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    else:
        start = 2
    return x509.load_der_x509_certificate(der[: start + size]).serial_number


def svids(message):  # X509SVIDResponse.svids: (spiffe_id, leaf serial), in order
    found = []
    for number, svid in fields(message):
        if number == 1:
            parts = dict(fields(svid))
            found.append((parts[1].decode(), first_certificate_serial(parts[2])))
    return found


def report(message, **extra):
    got = svids(message)
    out(ids=[i for i, _ in got], serials=[s for _, s in got], **extra)


def call(path):
    import grpc

    channel = grpc.insecure_channel("unix:" + path)
    method = channel.unary_stream(
        "/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=lambda _: b"", response_deserializer=lambda raw: raw
    )
    return grpc, method(b"", metadata=(("workload.spiffe.io", "true"),), timeout=60)


def fetch(path):
    grpc, stream = call(path)
    try:
        first = next(stream)
    except grpc.RpcError as err:
        return out(code=err.code().name, details=err.details())
    stream.cancel()
    report(first, code="OK")


def stream(path):
    """Every response of one FetchX509SVID stream, then how it ended; stdin closing cancels it."""
    grpc, responses = call(path)
    threading.Thread(target=lambda: (sys.stdin.read(), responses.cancel()), daemon=True).start()
    try:
        for message in responses:
            report(message, event="message")
    except grpc.RpcError as err:
        out(event="status", code=err.code().name, details=err.details())


def follow_py_spiffe(path):
    import spiffe

    source = spiffe.X509Source(socket_path="unix://" + path, timeout_in_seconds=30)

    def update():
        svid = source.get_x509_context().default_svid
        out(source="py-spiffe", id=str(svid.spiffe_id), serial=svid.leaf.serial_number)

    source.subscribe_for_updates(update)
    update()
    sys.stdin.read()
    source.close()


def follow_meshid(path):
    import meshid

    source = meshid.WorkloadApiSource("unix://" + path, timeout=30, max_backoff=0.5).start()

    def update():
        svid = source.get_svid()
        out(source="meshid", id=str(svid.spiffe_id), serial=svid.serial)

    source.subscribe(update)
    update()
    sys.stdin.read()
    source.close()


def read(path):
    try:
        with open(path, "rb"):
            out(read="OK")
    except OSError as err:
        out(read=type(err).__name__)


mode, path = sys.argv[1], sys.argv[2]
{"fetch": fetch, "stream": stream, "follow-py-spiffe": follow_py_spiffe, "follow-meshid": follow_meshid, "read": read}[
    mode
](path)
'''


def unavailable(reason: str) -> None:
    import os

    import pytest

    if os.environ.get("MESHID_REQUIRE_INTEROP") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def workload_users() -> dict[str, Any]:
    """The pwd entries of USERS and of root; skips (see above) when they cannot be used."""
    import os
    import pwd

    if os.geteuid() != 0:
        unavailable("starting workloads as other Unix users needs root (CI runs as root)")
    found, missing = {"root": pwd.getpwuid(0)}, []
    for name in USERS:
        try:
            found[name] = pwd.getpwnam(name)
        except KeyError:
            missing.append(name)
    if missing:
        unavailable(f"the test users {', '.join(missing)} do not exist; .ci/run creates them with useradd --system")
    return found


def as_user(user: Any, args: list[str]) -> list[str]:
    """``args`` run as ``user`` (a pwd entry) through setpriv, with no supplementary groups."""
    import shutil

    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *args]


@dataclass(frozen=True)
class WorkloadPython:
    executable: str
    env: dict[str, str]


def workload_python(user: Any) -> WorkloadPython:
    """A Python of this version that ``user`` can run, with meshid and the test packages."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig

    root = Path(meshid.__file__).resolve().parent.parent
    paths = [str(root), *dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))]
    env = {
        "PYTHONPATH": os.pathsep.join(paths),
        "PATH": "/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "GRPC_VERBOSITY": "ERROR",  # grpc's C core logs each dropped connection otherwise
    }
    version = "{}.{}".format(*sys.version_info[:2])
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{version}", shutil.which(f"python{version}")]
    tried = []
    for executable in dict.fromkeys(c for c in candidates if c):
        probe = [executable, "-S", "-c", "import sys, grpc, spiffe, meshid; print('%d.%d' % sys.version_info[:2])"]
        done = subprocess.run(as_user(user, probe), env=env, cwd="/", capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip() == version:
            return WorkloadPython(executable, env)
        tried.append(f"{executable}: {(done.stderr.strip().splitlines() or [done.stdout.strip()])[-1]}")
    unavailable(f"no Python {version} that {user.pw_name} can run with meshid's packages ({'; '.join(tried)})")
    raise AssertionError("unreachable")


class Workload:
    """WORKLOAD_CLIENT run as a user; a thread collects its JSON lines (and any other output)."""

    def __init__(self, python: WorkloadPython, user: Any, client: Path, *args: str) -> None:
        import subprocess
        import threading

        self.user = user.pw_name
        self.proc = subprocess.Popen(
            as_user(user, [python.executable, "-S", str(client), *args]),
            env=python.env,
            cwd=str(client.parent),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, name="test-workload-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import json

        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"output": line.rstrip()})

    def line(self, key: str, timeout: float = 30) -> dict[str, Any]:
        """The first line holding ``key``, once printed."""
        from support import eventually

        found = eventually(
            lambda: next((x for x in list(self.lines) if key in x), None),
            timeout,
            f"a line with {key!r} from {self.user}'s workload: {self.lines}",
        )
        assert isinstance(found, dict)
        return found

    def serials(self) -> list[tuple[str, int]]:
        """The (SPIFFE ID, serial) of each update a follower printed, in order, repeats removed."""
        seen: list[tuple[str, int]] = []
        for line in list(self.lines):
            if "serial" in line and (not seen or seen[-1] != (line["id"], line["serial"])):
                seen.append((line["id"], line["serial"]))
        return seen

    def stop(self) -> None:
        import contextlib
        import subprocess

        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
