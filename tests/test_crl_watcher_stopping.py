"""A CrlWatcher or CrlFileWriter closed from another thread while its start() is still fetching
the first CRL (a CA slow to answer, a SIGTERM meanwhile) is closed: start() then starts no
refresh thread, so nothing is left running after close()."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import meshid
from meshid.agent.crl_file import CrlFileWriter

pytestmark = pytest.mark.timeout(60)


def _refresh_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in ("meshid-crl", "meshid-crl-file")]


def test_close_while_start_fetches_the_first_crl_leaves_no_thread(server_source: meshid.StaticSource) -> None:
    fetching, closed = threading.Event(), threading.Event()

    def slow_ca() -> tuple[bytes, list[object]]:
        fetching.set()
        closed.wait(10)
        raise meshid.RemoteError("CRL: the CA did not answer")

    watcher = meshid.CrlWatcher(None, server_source, fetch=slow_ca)  # type: ignore[arg-type]
    starter = threading.Thread(target=watcher.start)
    starter.start()
    try:
        assert fetching.wait(10)
        watcher.close()  # from another thread, while start() waits for the CA
        closed.set()
        starter.join(10)
        assert not starter.is_alive()
        assert _refresh_threads() == [], "a refresh thread runs after close()"
    finally:
        closed.set()
        starter.join()
        watcher.close()


def test_close_while_the_file_writer_starts_leaves_no_thread(
    server_source: meshid.StaticSource, tmp_path: Path
) -> None:
    """The same for the agent's CRL file: its start() fetches from a CA address that takes the
    connection and never answers TLS, until close() is called meanwhile."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    writer = CrlFileWriter(server_source, [address], tmp_path)
    starter = threading.Thread(target=writer.start)
    accepted: list[socket.socket] = []
    try:
        starter.start()
        listener.settimeout(10)
        accepted.append(listener.accept()[0])  # start() is now fetching
        writer.close()
        for conn in accepted:
            conn.close()  # the fetch fails at once
        starter.join(30)
        assert not starter.is_alive()
        assert _refresh_threads() == [], "a refresh thread runs after close()"
    finally:
        for conn in accepted:
            conn.close()
        starter.join()
        writer.close()
        listener.close()
