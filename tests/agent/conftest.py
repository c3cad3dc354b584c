"""A CA the agent tests can stop and restart, on the real clock or on the test's ManualClock, and
the helpers the clocked tests step a renewal schedule with."""

from __future__ import annotations

import datetime
import pathlib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from cryptography import x509

import meshid
from meshid.ca.client import AdminClient
from meshid.ca.datadir import add_key_type, init_data_dir
from meshid.ca.server import CaServer
from meshid.clock import ManualClock
from support import stop_process

#: The SVID lifetime of the tests on a ManualClock. TLS checks certificates on the real clock, so
#: what the CA signs on the test's clock must also be valid in real time: NotBefore is back-dated
#: 5 minutes, so the clock may run at most that far ahead of real time (see :func:`step`), and
#: 40 s leaves the real time a test spends between two steps far inside NotAfter.
CLOCKED_LIFETIME = datetime.timedelta(seconds=40)
#: How far the test's clock may run ahead of the real one: inside the CA's 5 minutes of back-dating.
CLOCK_LEAD_LIMIT = datetime.timedelta(seconds=280)


class RunningCa:
    """A meshid CA on loopback, in process, that a test can stop and start again on the same port;
    with ``ml_dsa``, an ML-DSA-65 CA beside the classical one.

    With ``clock`` it signs on that :class:`ManualClock` (restarts too), so IssuerSources on the
    same clock follow a schedule the test steps."""

    def __init__(
        self,
        folder: pathlib.Path,
        max_ttl: datetime.timedelta = datetime.timedelta(hours=1),
        clock: ManualClock | None = None,
        *,
        ml_dsa: bool = False,
    ) -> None:
        self.folder = folder
        self.clock = clock
        init_data_dir(folder, "example.org", max_ttl=max_ttl)
        if ml_dsa:  # an ML-DSA-65 CA beside the classical one, there when the CA starts
            add_key_type(folder)
        self.server = self._server("127.0.0.1:0")
        self.port = self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.bundle_file = folder / "bundle.pem"

    def _server(self, listen: str) -> CaServer:
        return CaServer(self.folder, listen, clock=self.clock)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None  # type: ignore[assignment]

    def restart(self) -> None:
        self.stop()
        self.server = self._server(self.address)
        self.server.start()

    def enroll(
        self, spiffe_id: str, ttl: datetime.timedelta, dns: list[str] | None = None, svid_types: Sequence[str] = ()
    ) -> str:
        """Register ``spiffe_id`` (with the ``svid_types`` it may hold; none: classical) and return
        a join token for it."""
        with AdminClient(self.address, self.folder) as admin:
            admin.create_entry(spiffe_id, dns or [], ttl, svid_types=svid_types)
            return str(admin.create_token(spiffe_id).token)


#: `meshid agent --renew-at`: the agent's jitter is a fixed 0.1 of the lifetime and must stay
#: below it, so a little above 0.1 is the earliest renewal it takes (0.02 to 0.12 of the lifetime).
AGENT_RENEW_AT = "0.12"


class Agent:
    """A `meshid agent --workload-api` process (``extra``: more of its options, such as
    ``--join-token``), started ready to serve; the test's fixture or finalizer stops it."""

    def __init__(self, running_ca, socket: str, *extra: str) -> None:
        self.socket = socket
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshid.cli",
                "agent",
                "--server",
                running_ca.address,
                "--bundle",
                str(running_ca.bundle_file),
                "--workload-api",
                f"unix://{socket}",
                "--renew-at",
                AGENT_RENEW_AT,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.ready = self.proc.stdout.readline()
        if not self.ready.startswith("agent: "):
            _, err = self.stop()
            pytest.fail(f"the agent did not start: {self.ready!r}\n{err}")

    def stop(self) -> tuple[int, str]:
        code, _, err = stop_process(self.proc)
        return code, err


@pytest.fixture
def closing(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    """Registers ``thing.close()`` as a finalizer and returns ``thing``."""

    def register(thing: Any) -> Any:
        request.addfinalizer(thing.close)
        return thing

    return register


@pytest.fixture
def running_ca(tmp_path: pathlib.Path) -> Iterator[RunningCa]:
    ca = RunningCa(tmp_path / "ca")
    try:
        yield ca
    finally:
        ca.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def clocked_ca(tmp_path: pathlib.Path, clock: ManualClock) -> Iterator[RunningCa]:
    """A :class:`RunningCa` signing on the test's ``clock``."""
    ca = RunningCa(tmp_path / "ca", clock=clock)
    try:
        yield ca
    finally:
        ca.stop()


def step(clock: ManualClock, waiters: int = 1) -> float:
    """One step of a schedule: once ``waiters`` loops sleep on ``clock``, move it to the earliest
    deadline among them and wait until whoever was due has done its work (a renewal, a refresh,
    a retry) and sleeps again. Returns the seconds advanced.

    Fails when the clock would run further ahead of real time than :data:`CLOCK_LEAD_LIMIT`:
    from there on, what the CA signs would not yet be valid for TLS.
    """
    advanced = clock.advance_to_next_wakeup(waiters=waiters, timeout=30)
    clock.settle(waiters=waiters, timeout=30)
    lead = clock.now() - datetime.datetime.now(datetime.UTC)
    assert lead < CLOCK_LEAD_LIMIT, f"the test's clock runs {lead} ahead of real time: past the CA's back-dating"
    return advanced


def presented_serial(port: int, svid: meshid.X509Svid, bundles: meshid.BundleSet, folder: pathlib.Path) -> int:
    """The serial of the certificate a server on 127.0.0.1:``port`` presents to a new TLS
    connection: what is on the wire, not what its source holds. ``svid`` is the client
    certificate the server asks for; ``bundles`` verify the server's chain."""
    cert, key = folder / f"probe-{svid.serial:x}.pem", folder / f"probe-{svid.serial:x}.key"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the chain is verified; the name is not what this asks
    context.load_verify_locations(cadata=bundles.all_roots_pem().decode())
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, context.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
