"""What the node-agent tests of the CA share: a meshid CA in process on loopback (optionally
trusting a host PKI for x509pop, optionally on a ManualClock), host certificates made with plain
cryptography builders under a root made by meshid's own CA code, and raw calls on the wire.

Used by tests/ca/test_agents.py, tests/ca/test_batch_issuance.py, tests/ca/test_agents_cli.py
and tests/security/test_attacks_agents.py.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
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
    ) -> None:
        self.folder = folder
        agent_ca = (
            None if hosts is None else str(pem_file(folder.parent / f"{folder.name}-hosts.pem", hosts.certificate))
        )
        init_data_dir(folder, TD, agent_ca=agent_ca, agent_id_template=template)
        self.server = CaServer(folder, "127.0.0.1:0", clock=None if clock is None else clock.now)
        self.address = f"127.0.0.1:{self.server.start()}"
        self.bundle_file = folder / "bundle.pem"
        self.bundles = meshid.BundleSet.of(meshid.TrustBundle.load(TD, self.bundle_file))
        self.roots_pem = self.bundle_file.read_bytes()

    def stop(self) -> None:
        self.server.stop(grace=None)

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
