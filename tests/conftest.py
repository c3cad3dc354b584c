from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator

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


# --- every test cleans up after itself: the threads and processes it started end with it ------------

_POOL_WORKER = re.compile(r"_\d+$")


def _children() -> set[int]:
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _meshid_threads() -> set[threading.Thread]:
    # meshid's background loops, named meshid-<what>; not the workers of a server's thread pool
    # (meshid-ca_3), which grpc starts on demand and a module-scoped server keeps.
    return {t for t in threading.enumerate() if t.name.startswith("meshid") and not _POOL_WORKER.search(t.name)}


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes() -> Iterator[None]:
    """Fail a test that leaves a meshid background thread (watchers, renewal loops) or a child
    process running: a leak makes later tests flaky and CI hang."""
    threads, children = _meshid_threads(), _children()
    yield
    leaked_threads = lambda: _meshid_threads() - threads  # noqa: E731
    leaked_children = lambda: _children() - children  # noqa: E731
    deadline = time.monotonic() + 10
    while (leaked_threads() or leaked_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked_threads(), f"threads left running: {sorted(t.name for t in leaked_threads())}"
    assert not leaked_children(), f"child processes left running: {sorted(leaked_children())}"


@pytest.fixture(params=[False, True], ids=["interceptor", "guarded-server"])
def guarded(request: pytest.FixtureRequest) -> bool:
    """Each interceptor test twice: the interceptor passed to grpc's server, and attached by
    ``meshid.server`` / ``meshid.aio.server`` (``guarded``)."""
    return request.param
