"""Identity sources: where credentials get the current SVID and trust bundles.

Any object with ``get_svid()``, ``get_bundles()`` and ``subscribe(callback)`` is a source
(:class:`Source`), so a static pair, files on disk, the issuing service (an
:class:`~meshid.IssuerSource`) or a Workload API are interchangeable. No source starts a
thread in its constructor: call ``start()`` (or use it as a context manager) to begin
watching, ``close()`` to stop.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from meshid._background import FileStamp, Notifier, Unsubscribe, Worker, file_stamp
from meshid.bundle import BundleSet, TrustBundle
from meshid.errors import MeshIdError, SourceError
from meshid.svid import X509Svid

__all__ = ["FileSource", "Source", "StaticSource"]

log = logging.getLogger("meshid.sources")



@runtime_checkable
class Source(Protocol):
    """Anything that hands out the current SVID and bundles and says when they change."""

    def get_svid(self) -> X509Svid:
        """The SVID to present now. Raises :class:`SourceError` when there is none."""
        ...

    def get_bundles(self) -> BundleSet:
        """The bundles to verify peers against now."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        """Call ``callback()`` after every change; returns a function that unsubscribes."""
        ...


def _as_bundle_set(bundles: BundleSet | TrustBundle) -> BundleSet:
    if isinstance(bundles, BundleSet):
        return bundles
    if isinstance(bundles, TrustBundle):
        return BundleSet.of(bundles)
    raise TypeError(f"bundles must be a BundleSet or TrustBundle, not {type(bundles).__name__}")


class StaticSource:
    """A source that hands out a fixed SVID and bundles until :meth:`update` replaces them."""

    def __init__(self, svid: X509Svid, bundles: BundleSet | TrustBundle) -> None:
        if not isinstance(svid, X509Svid):
            raise TypeError(f"svid must be an X509Svid, not {type(svid).__name__}")
        self._state = (svid, _as_bundle_set(bundles))
        self._notifier = Notifier()

    def get_svid(self) -> X509Svid:
        return self._state[0]

    def get_bundles(self) -> BundleSet:
        return self._state[1]

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._notifier.subscribe(callback)

    def update(self, svid: X509Svid | None = None, bundles: BundleSet | TrustBundle | None = None) -> None:
        """Replace the SVID and/or bundles atomically and notify subscribers.

        Raises:
            TypeError: ``svid`` is not an X509Svid, or ``bundles`` not a BundleSet/TrustBundle.
        """
        if svid is not None and not isinstance(svid, X509Svid):
            raise TypeError(f"svid must be an X509Svid, not {type(svid).__name__}")
        old_svid, old_bundles = self._state
        self._state = (svid or old_svid, old_bundles if bundles is None else _as_bundle_set(bundles))
        self._notifier.notify()


def _stamp(*paths: str) -> tuple[FileStamp, ...]:
    return tuple(file_stamp(path) for path in paths)


class FileSource:
    """A source that reads an SVID and its trust domain's bundle from PEM files and follows them.

    ``bundle_file`` holds the roots of the workload's own trust domain; other trust domains
    come from ``federated``. The files are read once here; :meth:`start` begins polling them
    every ``poll_interval`` seconds and :meth:`reload` checks at once. A file that fails to
    parse leaves the previous identity in force and is logged.

    Raises:
        InvalidSvidError, InvalidBundleError: the files cannot be loaded the first time.
    """

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        bundle_file: str | os.PathLike[str],
        *,
        federated: BundleSet | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._paths = (os.fspath(cert_file), os.fspath(key_file), os.fspath(bundle_file))
        self._federated = federated or BundleSet.of()
        self._poll_interval = poll_interval
        self._notifier = Notifier()
        self._lock = threading.Lock()
        self._worker = Worker("meshid-file-source", self._run)
        self._stamp = _stamp(*self._paths)
        self._state = self._read()
        #: The last load error, or None after a good load. For health checks.
        self.last_error: str | None = None

    def _read(self) -> tuple[X509Svid, BundleSet]:
        cert_file, key_file, bundle_file = self._paths
        svid = X509Svid.load(cert_file, key_file)
        own = TrustBundle.load(svid.spiffe_id.trust_domain, bundle_file)
        return svid, self._federated.with_bundle(own)

    def get_svid(self) -> X509Svid:
        return self._state[0]

    def get_bundles(self) -> BundleSet:
        return self._state[1]

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        return self._notifier.subscribe(callback)

    def reload(self) -> bool:
        """Reload if the files changed. Returns True when a new identity took effect."""
        with self._lock:
            stamp = _stamp(*self._paths)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                state = self._read()
            except MeshIdError as err:
                self.last_error = str(err)
                log.error("identity files: keeping the current SVID %s: %s", self._state[0].spiffe_id, err)
                return False
            self.last_error = None
            if state == self._state:
                return False
            self._state = state
        log.info("identity files: now presenting %s (serial %x)", state[0].spiffe_id, state[0].serial)
        self._notifier.notify()
        return True

    def start(self) -> FileSource:
        """Begin polling the files in a daemon thread. Returns self."""
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop polling."""
        self._worker.close()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self._poll_interval):
            self.reload()

    def __enter__(self) -> FileSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_source(source: object) -> Source:
    if not isinstance(source, Source):
        raise TypeError(f"source must provide get_svid(), get_bundles() and subscribe(), not {type(source).__name__}")
    try:
        source.get_svid()
    except MeshIdError as err:
        raise SourceError(f"identity source: no SVID available: {err}") from err
    return source
