from __future__ import annotations

import pytest

import meshid
from meshid.ca import Authority
from support import FRONTEND_ID, SERVER_ID, TD


@pytest.fixture(scope="session")
def ca() -> Authority:
    return Authority.create_root(TD)


@pytest.fixture(scope="session")
def other_ca() -> Authority:
    return Authority.create_root("other.org")


@pytest.fixture(scope="session")
def bundles(ca: Authority, other_ca: Authority) -> meshid.BundleSet:
    return meshid.BundleSet.of(
        meshid.TrustBundle(ca.trust_domain, ca.roots), meshid.TrustBundle(other_ca.trust_domain, other_ca.roots)
    )


@pytest.fixture(scope="session")
def server_source(ca: Authority, bundles: meshid.BundleSet) -> meshid.StaticSource:
    return meshid.StaticSource(ca.issue_svid(SERVER_ID, dns_names=["localhost"]), bundles)


@pytest.fixture(scope="session")
def policy() -> meshid.AuthorizationPolicy:
    return meshid.AuthorizationPolicy.from_dict(
        {
            "name": "greeter",
            "allow": [
                {"name": "frontend", "methods": ["/meshid.examples.v1.Greeter/*"], "spiffe_ids": [FRONTEND_ID]},
                {
                    "name": "other-org-hello",
                    "methods": ["/meshid.examples.v1.Greeter/SayHello"],
                    "trust_domains": ["other.org"],
                },
            ],
        }
    )


def client_source(authority: Authority, spiffe_id: str, bundles: meshid.BundleSet, **kw: object) -> meshid.StaticSource:
    return meshid.StaticSource(authority.issue_svid(spiffe_id, **kw), bundles)  # type: ignore[arg-type]
