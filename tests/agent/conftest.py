from __future__ import annotations

import datetime
import pathlib
from collections.abc import Iterator

import pytest

from meshid.ca.client import AdminClient
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer


class RunningCa:
    """A meshid CA on loopback, in process, that a test can stop and start again on the same port."""

    def __init__(self, folder: pathlib.Path, max_ttl: datetime.timedelta = datetime.timedelta(hours=1)) -> None:
        self.folder = folder
        init_data_dir(folder, "example.org", max_ttl=max_ttl)
        self.server = CaServer(folder, "127.0.0.1:0")
        self.port = self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.bundle_file = folder / "bundle.pem"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None  # type: ignore[assignment]

    def restart(self) -> None:
        self.stop()
        self.server = CaServer(self.folder, self.address)
        self.server.start()

    def enroll(self, spiffe_id: str, ttl: datetime.timedelta, dns: list[str] | None = None) -> str:
        """Register ``spiffe_id`` and return a join token for it."""
        with AdminClient(self.address, self.folder) as admin:
            admin.create_entry(spiffe_id, dns or [], ttl)
            return str(admin.create_token(spiffe_id).token)


@pytest.fixture
def running_ca(tmp_path: pathlib.Path) -> Iterator[RunningCa]:
    ca = RunningCa(tmp_path / "ca")
    try:
        yield ca
    finally:
        ca.stop()
