"""The caller matrix that the sync and aio interceptor tests both run.

Each case names a caller and the exact outcome a greeter server (policy in conftest: the
frontend may call everything, other.org workloads may call SayHello) must give it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import meshid
from meshid.ca import Authority
from support import FRONTEND_ID, INTRUDER_ID, RawSource, forge


@dataclass(frozen=True)
class Case:
    name: str
    make_source: Callable[[Authority, Authority, meshid.BundleSet], Any]
    outcome: str  # "OK", a status code name; "HANDSHAKE" means the TLS handshake fails (UNAVAILABLE)
    detail: str = ""  # a fragment the status details must contain


def _static(svid: Any, bundles: meshid.BundleSet) -> Any:
    return meshid.StaticSource(svid, bundles) if isinstance(svid, meshid.X509Svid) else RawSource(*svid, bundles)


def _expired(ca: Authority, oca: Authority, b: meshid.BundleSet) -> Any:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    return _static(ca.issue_svid(FRONTEND_ID, now=long_ago, ttl=datetime.timedelta(hours=1)), b)


def _untrusted(ca: Authority, oca: Authority, b: meshid.BundleSet) -> Any:
    stranger = Authority.create_root("example.org")  # same name, not in the bundle
    return _static(stranger.issue_svid(FRONTEND_ID), b)


CASES = [
    Case("allowed-caller", lambda ca, oca, b: _static(ca.issue_svid(FRONTEND_ID), b), "OK", FRONTEND_ID),
    Case(
        "denied-caller-same-trust-domain",
        lambda ca, oca, b: _static(ca.issue_svid(INTRUDER_ID), b),
        "PERMISSION_DENIED",
        f"{INTRUDER_ID} may not call /meshid.examples.v1.Greeter/SayHello",
    ),
    Case(
        "federated-trust-domain-allowed-by-its-rule",
        lambda ca, oca, b: _static(oca.issue_svid("spiffe://other.org/ns/prod/sa/partner"), b),
        "OK",
        "spiffe://other.org/ns/prod/sa/partner",
    ),
    Case("expired-certificate", _expired, "HANDSHAKE"),
    Case("chain-to-untrusted-root", _untrusted, "HANDSHAKE"),
    Case(
        "ca-certificate-as-leaf",
        lambda ca, oca, b: _static(forge(ca, uris=[FRONTEND_ID], ca=True, key_cert_sign=True), b),
        "UNAUTHENTICATED",  # grpc's TLS accepts it; meshid's X509-SVID leaf rules refuse it
        "the leaf certificate is a CA",
    ),
    Case(
        "two-uri-sans",
        lambda ca, oca, b: _static(forge(ca, uris=[FRONTEND_ID, "spiffe://example.org/ns/prod/sa/admin"]), b),
        "UNAUTHENTICATED",
        "2 URI SANs",
    ),
    Case(
        "other-trust-domains-ca-signs-this-trust-domains-id",
        lambda ca, oca, b: _static(forge(oca, uris=[FRONTEND_ID]), b),
        "UNAUTHENTICATED",
        "does not verify against its trust domain's bundle",
    ),
    Case(
        "spiffe-id-only-in-common-name",
        lambda ca, oca, b: _static(forge(ca, uris=[], subject_cn=FRONTEND_ID), b),
        "UNAUTHENTICATED",
        "carries no SPIFFE ID",
    ),
    Case(
        "leaf-with-keycertsign",
        lambda ca, oca, b: _static(forge(ca, uris=[FRONTEND_ID], key_cert_sign=True), b),
        "UNAUTHENTICATED",
        "keyCertSign",
    ),
]
