"""Stopping a server from two threads at once (a signal's and the main one, as `meshid ca serve`
and `meshid agent` do): the second waits for the first, nothing is stopped twice, and neither
returns before the server has stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

import meshid
from meshid.ca import Authority
from meshid.ca.datadir import init_data_dir
from meshid.ca.server import CaServer
from meshid.errors import DataDirError
from meshid.workloadapi import WorkloadApiServer

TD = "example.org"


def _slow_first_call(
    inner: Callable[[], None], entered: threading.Event, release: threading.Event
) -> Callable[[], None]:
    """``inner``, held on its first call until ``release`` is set; counts the calls."""
    calls: list[int] = []

    def wrapped() -> None:
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
        inner()

    wrapped.calls = calls  # type: ignore[attr-defined]
    return wrapped


def _stop_twice(stop: Callable[[], None], entered: threading.Event, release: threading.Event) -> list[str]:
    """The first stop() held inside, a second started meanwhile; what happened, in order."""
    events: list[str] = []
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            stop()
            events.append(f"{name} returned")
        except BaseException as err:  # reported by the test below
            errors.append(err)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    try:
        assert entered.wait(10), "the first stop() never got that far"
        second = threading.Thread(target=run, args=("second",))
        second.start()
        second.join(0.3)  # it must still be waiting for the first one (no event says it has not returned)
        events.append("released")
    finally:
        release.set()  # never leaves the first stop() held, whatever failed
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive(), "a stop() never returned"
    assert not errors, errors
    return events


def test_a_ca_stopped_from_two_threads_stops_once_and_both_wait_for_it(tmp_path: Path) -> None:
    init_data_dir(tmp_path / "ca", TD)
    server = CaServer(tmp_path / "ca", "127.0.0.1:0")
    port = server.start()
    entered, release = threading.Event(), threading.Event()
    close = _slow_first_call(server.service.store.close, entered, release)
    server.service.store.close = close  # type: ignore[method-assign]
    try:
        events = _stop_twice(lambda: server.stop(grace=None), entered, release)
    finally:
        server.stop(grace=None)  # stopped already unless _stop_twice failed: then now
    # neither returned while the first was held inside (the order of their returns is theirs)
    assert events[0] == "released" and sorted(events[1:]) == ["first returned", "second returned"], events
    assert len(close.calls) == 1  # type: ignore[attr-defined]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.5)
    with pytest.raises(DataDirError, match="was stopped and its store closed"):
        server.start()


class _HeldUnsubscribe:
    """A Source (a StaticSource's SVID and bundles) whose unsubscribe is held on its first call."""

    def __init__(self, inner: meshid.StaticSource, entered: threading.Event, release: threading.Event) -> None:
        self._inner, self._entered, self._release = inner, entered, release

    def get_svid(self) -> meshid.X509Svid:
        return self._inner.get_svid()

    def get_bundles(self) -> meshid.BundleSet:
        return self._inner.get_bundles()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.unsubscribe = _slow_first_call(self._inner.subscribe(callback), self._entered, self._release)
        return self.unsubscribe


def test_a_workload_api_server_stopped_from_two_threads_returns_only_once_it_has_stopped(tmp_path: Path) -> None:
    ca = Authority.create_root(TD)
    bundles = meshid.BundleSet.of(meshid.TrustBundle(ca.trust_domain, ca.roots))
    entered, release = threading.Event(), threading.Event()
    source = _HeldUnsubscribe(meshid.StaticSource(ca.issue_svid(f"spiffe://{TD}/w"), bundles), entered, release)
    socket = tmp_path / "agent.sock"
    server = WorkloadApiServer(source, f"unix://{socket}").start()
    assert socket.exists()
    seen: list[bool] = []

    def stop() -> None:
        server.stop(grace=None)
        seen.append(socket.exists())  # as each stop() returns

    try:
        events = _stop_twice(stop, entered, release)
    finally:
        server.stop(grace=None)  # stopped already unless _stop_twice failed: then now
    # neither returned while the first was held inside (the order of their returns is theirs)
    assert events[0] == "released" and sorted(events[1:]) == ["first returned", "second returned"], events
    assert seen == [False, False]
    assert len(source.unsubscribe.calls) == 1  # type: ignore[attr-defined]
