"""Identity sources: where credentials get the current SVID and trust bundles.

Any object with ``get_svid()``, ``get_bundles()`` and ``subscribe(callback)`` is a source
(:class:`Source`), so a static pair, files on disk, the issuing service (an
:class:`~meshid.IssuerSource`) or a Workload API are interchangeable. No source starts a
thread in its constructor: call ``start()`` (or use it as a context manager) to begin
watching, ``close()`` to stop.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from meshid._background import FileStamp, Notifier, Unsubscribe, Worker, file_stamp
from meshid.bundle import BundleSet, TrustBundle
from meshid.clock import SYSTEM_CLOCK, Clock
from meshid.errors import MeshIdError, SourceError
from meshid.svid import X509Svid

if TYPE_CHECKING:
    from collections.abc import Sequence

    from meshid.jwtsvid import JwtSvid
    from meshid.spiffeid import SpiffeId

__all__ = ["FileSource", "FileSourceState", "JwtSource", "Source", "StaticSource"]

log = logging.getLogger("meshid.sources")

Validity = Literal["valid", "expired", "not yet valid"]


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


@runtime_checkable
class JwtSource(Protocol):
    """Anything that hands out JWT-SVIDs and the JWT bundles to validate them with (the
    Workload API, the issuing service): what :func:`meshid.jwt_call_credentials` takes."""

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: SpiffeId | None = None) -> JwtSvid:
        """A JWT-SVID for ``audience`` (one or more), of ``spiffe_id`` or the source's default
        identity. Raises :class:`SourceError` when there is none."""
        ...

    def get_jwt_bundles(self) -> BundleSet:
        """The bundles whose ``jwt_authorities`` validate JWT-SVIDs now."""
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


def _validity(svid: X509Svid, now: datetime.datetime) -> Validity:
    if now >= svid.not_after:
        return "expired"
    if now < svid.not_before:
        return "not yet valid"
    return "valid"


@dataclass(frozen=True, slots=True)
class FileSourceState:
    """What a :class:`FileSource` presents now, for health checks: ``FileSource.state``.

    ``validity`` is measured on the source's clock when the state is read: ``"valid"``,
    ``"expired"`` (peers refuse the SVID: whatever writes the files has stopped renewing it) or
    ``"not yet valid"`` (the local clock is behind the CA's).
    """

    spiffe_id: str
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    validity: Validity
    last_error: str | None

    @property
    def expired(self) -> bool:
        return self.validity == "expired"


class FileSource:
    """A source that reads an SVID and its trust domain's bundle from PEM files and follows them.

    ``bundle_file`` holds the roots of the workload's own trust domain; other trust domains
    come from ``federated``. The files are read once here; :meth:`start` begins polling them
    every ``poll_interval`` seconds and :meth:`reload` checks at once. A file that fails to
    parse leaves the previous identity in force and is logged. An SVID that is expired or not
    yet valid is still handed out (peers will refuse it), but :meth:`start`, every reload and
    the poll at which it expires log a warning, and :attr:`state` says so.

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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._paths = (os.fspath(cert_file), os.fspath(key_file), os.fspath(bundle_file))
        self._federated = federated or BundleSet.of()
        self._poll_interval = poll_interval
        self._clock = clock
        self._notifier = Notifier()
        self._lock = threading.Lock()
        self._worker = Worker("meshid-file-source", self._run)
        self._stamp = _stamp(*self._paths)
        self._state = self._read()
        #: The last load error, or None after a good load. For health checks.
        self.last_error: str | None = None
        # The (serial, validity) last warned about, so a poll warns once per change, not every second.
        self._warned: tuple[int, Validity] | None = None

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

    @property
    def state(self) -> FileSourceState:
        """The SVID presented now and its validity on this source's clock."""
        svid = self._state[0]
        return FileSourceState(
            spiffe_id=str(svid.spiffe_id),
            serial=f"{svid.serial:x}",
            not_before=svid.not_before,
            not_after=svid.not_after,
            validity=_validity(svid, self._clock.now()),
            last_error=self.last_error,
        )

    def _check_validity(self, *, again: bool = False) -> None:
        """Warns when the SVID presented is expired or not yet valid: once per SVID and validity,
        or every time with ``again`` (start and reloads)."""
        svid = self._state[0]
        now = self._clock.now()
        validity = _validity(svid, now)
        seen = (svid.serial, validity)
        if seen == self._warned and not again:
            return
        self._warned = seen
        cert_file = self._paths[0]
        if validity == "expired":
            log.warning(
                "identity files: the SVID of %s in %s EXPIRED at %s (%s ago); peers will refuse it: "
                "renew it (meshid svid fetch, or a running meshid agent --out)",
                svid.spiffe_id,
                cert_file,
                svid.not_after.isoformat(),
                _ago(now - svid.not_after),
            )
        elif validity == "not yet valid":
            log.warning(
                "identity files: the SVID of %s in %s is not valid until %s (%s from now); peers will "
                "refuse it until then: is this host's clock behind?",
                svid.spiffe_id,
                cert_file,
                svid.not_before.isoformat(),
                _ago(svid.not_before - now),
            )

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
        self._check_validity(again=True)
        self._notifier.notify()
        return True

    def start(self) -> FileSource:
        """Begin polling the files in a daemon thread (warning if the SVID is expired or not yet
        valid). Returns self."""
        self._check_validity(again=True)
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop polling."""
        self._worker.close()

    def _run(self, stop: threading.Event) -> None:
        while not self._clock.wait(stop, self._poll_interval):
            if not self.reload():
                self._check_validity()

    def __enter__(self) -> FileSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ago(delta: datetime.timedelta) -> str:
    """A span, as precise as a log line needs: 90s, 59m, 2h55m, 3d4h."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{hours // 24}d{hours % 24}h"


def require_source(source: object) -> Source:
    if not isinstance(source, Source):
        raise TypeError(f"source must provide get_svid(), get_bundles() and subscribe(), not {type(source).__name__}")
    try:
        source.get_svid()
    except MeshIdError as err:
        raise SourceError(f"identity source: no SVID available: {err}") from err
    return source
