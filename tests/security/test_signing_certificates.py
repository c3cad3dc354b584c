"""The rules a CA between a trust domain's root and a leaf must meet (X509-SVID 3.2, 4.3; RFC 5280 6.1.4).

Where grpc's TLS layer verifies a chain it applies RFC 5280's own checks; where meshid is the
only verifier (a certificate and chain a trusted proxy forwards, x509pop's host certificates,
CRL signers, ``BundleSet.verify``) meshid must refuse what they refuse: an intermediate whose
key usage does not allow signing certificates, and a signing certificate whose SPIFFE ID has a
path (it names a trust domain, not a workload). Each intermediate here is signed by the root of
a CA made with meshid's own :class:`~meshid.ca.Authority`; the positive control differs from
each refused chain in the one property under test.
"""

from __future__ import annotations

import datetime
import hashlib
import urllib.parse
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

import meshid
from meshid.ca import Authority
from meshid.forwarded import XFCC_HEADER
from support import FRONTEND_ID, SERVER_ID, call, sync_server

pytestmark = pytest.mark.timeout(120)

PROXY_ID = "spiffe://example.org/ns/edge/sa/envoy"
_NO_USAGE = dict.fromkeys(
    (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ),
    False,
)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: Any,
    *,
    ca: bool,
    uri: str,
    usage: dict[str, bool],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(subject))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{**_NO_USAGE, **usage}), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def chain_under(ca: Authority, *, ca_uri: str, ca_usage: dict[str, bool]) -> list[x509.Certificate]:
    """[leaf, intermediate]: an intermediate signed by ``ca``'s root, and a leaf for FRONTEND_ID under it."""
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    intermediate = _certificate(
        "CN=example.org intermediate", ca_key, ca.certificate, ca.private_key, ca=True, uri=ca_uri, usage=ca_usage
    )
    leaf = _certificate(
        "CN=frontend", leaf_key, intermediate, ca_key, ca=False, uri=FRONTEND_ID, usage={"digital_signature": True}
    )
    return [leaf, intermediate]


SIGNS = {"key_cert_sign": True, "crl_sign": True}
# (case, the intermediate's SPIFFE ID, its key usage, what a refusal says or None for accepted)
CASES = [
    ("control", "spiffe://example.org", SIGNS, None),
    ("no-keycertsign", "spiffe://example.org", {"digital_signature": True, "crl_sign": True}, "keyCertSign"),
    ("spiffe-id-with-a-path", "spiffe://example.org/ns/prod/sa/web", SIGNS, "has a path"),
]


@pytest.mark.parametrize(("case", "uri", "usage", "refusal"), CASES, ids=[c[0] for c in CASES])
def test_bundle_set_verify_applies_the_signing_certificate_rules(ca, bundles, case, uri, usage, refusal) -> None:
    leaf, intermediate = chain_under(ca, ca_uri=uri, ca_usage=usage)
    if refusal is None:
        assert bundles.verify(leaf, [intermediate]) == meshid.SpiffeId.parse(FRONTEND_ID)
    else:
        with pytest.raises(meshid.VerificationError, match=refusal):
            bundles.verify(leaf, [intermediate])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def _xfcc(chain: list[x509.Certificate]) -> str:
    """What Envoy forwards for a client that presented ``chain``: the leaf, and the whole chain."""
    leaf = chain[0]
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
    whole = urllib.parse.quote("".join(_pem(c) for c in chain))
    return f'By={SERVER_ID};Hash={digest};Cert="{urllib.parse.quote(_pem(leaf))}";Chain="{whole}";URI={FRONTEND_ID}'


@pytest.fixture(scope="module")
def proxied_server(ca, bundles, server_source):
    policy = meshid.AuthorizationPolicy.from_dict(
        {"allow": [{"name": "fe", "methods": ["*"], "spiffe_ids": [FRONTEND_ID]}]}
    )
    interceptor = meshid.AuthorizationInterceptor(policy, source=server_source, trusted_proxies=[PROXY_ID])
    with sync_server(server_source, interceptor) as port:
        yield port


@pytest.mark.parametrize(("case", "uri", "usage", "refusal"), CASES, ids=[c[0] for c in CASES])
def test_a_chain_a_trusted_proxy_forwards_meets_the_signing_certificate_rules(
    ca, bundles, proxied_server, case, uri, usage, refusal
) -> None:
    # Behind a proxy meshid is the only verifier of the caller's chain: grpc's TLS layer saw the proxy's.
    header = [(XFCC_HEADER, _xfcc(chain_under(ca, ca_uri=uri, ca_usage=usage)))]
    proxy = meshid.StaticSource(ca.issue_svid(PROXY_ID), bundles)
    with meshid.secure_channel(f"127.0.0.1:{proxied_server}", proxy, server_id=SERVER_ID) as channel:
        code, details = call(channel, metadata=header)
    if refusal is None:
        assert (code, details) == ("OK", FRONTEND_ID)
    else:
        assert code == "UNAUTHENTICATED" and refusal in details, (code, details)
