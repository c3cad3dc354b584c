"""What meshid's background loops share: the thread's lifecycle, the subscriber list, file stamps.

Five things watch something in the background (a file source, the issuer source, the
Workload API source, the CRL watcher, the policy watcher). Each gets a :class:`Worker`: no
thread until ``start()``; ``close()`` stops it and waits for it; both are idempotent. A
:class:`Notifier` is the subscriber list of a source, :func:`file_stamp` tells one version
of a file from the next.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["Notifier", "Unsubscribe", "Worker", "file_stamp"]

log = logging.getLogger("meshid")

Unsubscribe = Callable[[], None]
#: What a file's versions differ by: inode (an atomic rename), size and mtime; zeros if absent.
FileStamp = tuple[int, int, int]


def file_stamp(path: str | os.PathLike[str]) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Notifier:
    """The subscriber list every source shares: ``subscribe`` a callback, ``notify`` them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> Unsubscribe:
        if not callable(callback):
            raise TypeError("subscribe() needs a callable")
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def notify(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a broken subscriber must not stop the others
                log.exception("identity source subscriber failed")


class Worker:
    """One named daemon thread running ``body(stop)`` until ``stop`` is set.

    ``start()`` starts it (once); ``close()`` sets ``stop``, calls ``wake`` (to interrupt a
    blocking call the body makes: cancel a stream, set another event), and waits for the thread.
    Both may be called from any thread at the same time: a signal's thread and the main thread
    both close an agent while it stops.
    """

    def __init__(self, name: str, body: Callable[[threading.Event], None], *, wake: Callable[[], None] | None = None):
        self._name = name
        self._body = body
        self._wake = wake
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def current(self) -> bool:
        """Whether the caller runs on this worker's thread (in a subscriber its body called)."""
        return self._thread is threading.current_thread()

    def signal(self) -> None:
        """Set ``stop`` and call ``wake``, without waiting for the thread to end (:meth:`close`
        does both): for an owner whose other thread may be what that thread waits for."""
        with self._lock:
            self.stop.set()
        if self._wake is not None:
            self._wake()

    def start(self, *, unless: threading.Event | None = None) -> bool:
        """Start the thread; False if it already runs, or if ``unless`` is set.

        ``unless`` is read under the lock :meth:`close` takes to set ``stop``: an owner that sets
        it before calling :meth:`close` from another thread either finds the thread started and
        joins it, or this start finds ``unless`` set and starts nothing.
        """
        with self._lock:
            if self._thread is not None or (unless is not None and unless.is_set()):
                return False
            self.stop.clear()
            thread = threading.Thread(target=self._body, args=(self.stop,), name=self._name, daemon=True)
            thread.start()
            self._thread = thread
        return True

    def close(self) -> None:
        with self._lock:
            self.stop.set()
            thread = self._thread
        if self._wake is not None:
            self._wake()
        if thread is None or thread is threading.current_thread():
            return
        thread.join()
        with self._lock:
            if self._thread is thread:
                self._thread = None
