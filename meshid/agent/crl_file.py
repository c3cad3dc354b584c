"""The CA's CRL as a file beside the SVID files (``meshid agent --out DIR --write-crl``).

For programs that check revocation from a file (nginx's ``ssl_crl``, haproxy's ``crl-file``):
:class:`CrlFileWriter` fetches the CRL with the source's SVID every ``interval`` seconds, takes
it only as :class:`~meshid.revocation.CrlKeeper` does (its signature verified against the
bundle, and newer than the one in force), and writes a new one to ``DIR/crl.pem`` atomically,
then calls ``on_change`` (the reload hook, so that nginx reads it). A failed or refused fetch
keeps the file as it is, logged; once the source's SVID has expired, the log says so (the CA's TLS
layer refuses it, which the client would otherwise report as a CA it cannot reach).
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from collections.abc import Callable, Sequence

from cryptography import x509

from meshid import _x509
from meshid._background import Worker
from meshid._files import write_atomic
from meshid.agent._renewal import explaining
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import MeshIdError
from meshid.revocation import CrlKeeper
from meshid.sources import Source

__all__ = ["CRL_FILE", "CrlFileWriter"]

log = logging.getLogger("meshid.agent")

CRL_FILE = "crl.pem"


class CrlFileWriter:
    """Keeps ``folder/crl.pem`` the CA's current CRL. ``start()`` fetches once, then every ``interval``."""

    def __init__(
        self,
        source: Source,
        servers: Sequence[str],
        folder: str | os.PathLike[str],
        *,
        interval: float = 30.0,
        on_change: Callable[[], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not servers:
            raise ValueError("CRL file: give at least one CA address")
        if not interval > 0:
            raise ValueError("CRL file: the interval must be positive")
        self._source = source
        self._servers = list(servers)
        self._path = pathlib.Path(folder) / CRL_FILE
        self._interval = interval
        self._on_change = on_change
        self._clock = clock
        self._keeper = CrlKeeper("agent CRL file")
        self._closing = threading.Event()  # close() was called (a start() under way starts no thread)
        self._worker = Worker("meshid-crl-file", self._run)

    @property
    def path(self) -> pathlib.Path:
        return self._path

    def start(self) -> CrlFileWriter:
        """Fetch and write now (``on_change`` is not called for this first file), then keep it
        current. A :meth:`close` from another thread while this first fetch waits for the CA
        wins: no thread is started then."""
        self._closing.clear()
        try:
            self._refresh(notify=False)
        except MeshIdError as err:
            log.warning("agent: no CRL file yet: %s", err)
        self._worker.start(unless=self._closing)
        return self

    def close(self) -> None:
        self._closing.set()
        self._worker.close()

    def refresh(self) -> bool:
        """Fetch once; True if a new CRL was written (and ``on_change`` called)."""
        return self._refresh(notify=True)

    def _refresh(self, *, notify: bool) -> bool:
        from meshid.ca.client import get_crl_with_svid

        svid, bundles = self._source.get_svid(), self._source.get_bundles()
        before = self._keeper.current
        fetched: list[bytes] = []
        for server in self._servers:

            def fetch(server: str = server) -> tuple[bytes, list[x509.Certificate]]:
                with explaining("CRL", svid, self._clock.now):
                    der, chain = get_crl_with_svid(server, svid, bundles)
                fetched.append(der)
                return der, chain

            fetched.clear()
            if self._keeper.refresh(fetch, bundles, self._clock.now()):
                break
        current = self._keeper.current
        if current is None or current is before or not fetched:
            return False  # nothing taken this time: the file stays as it is
        try:
            write_atomic(self._path, _x509.crl_pem(fetched[-1]))
        except OSError as err:
            log.error("agent: cannot write %s: %s", self._path, err.strerror)
            return False
        log.info("agent: CRL number %d (%d revoked) written to %s", current.number, len(current.serials), self._path)
        if notify and self._on_change is not None:
            self._on_change()
        return True

    def _run(self, stop: threading.Event) -> None:
        while not self._clock.wait(stop, self._interval):
            try:
                self.refresh()
            except MeshIdError as err:  # no SVID right now: the next round tries again
                log.warning("agent: CRL file not refreshed: %s", err)
            except Exception:
                log.exception("agent: CRL file refresh failed; will retry")
