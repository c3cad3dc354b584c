"""A policy reload racing another (the file watcher, or a second ``reload()``) never leaves an
older policy in force: reloads are serialised, and the file's stamp goes with what was loaded."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import yaml

import meshid
from support import FRONTEND_ID, SERVICE, call, eventually, sync_server


def _policy_text(name: str, allowed: str, padding_rules: int = 0) -> str:
    rules = [{"name": "the-one", "methods": [f"/{SERVICE}/*"], "spiffe_ids": [allowed]}]
    rules += [
        {"name": f"pad-{i}", "methods": [f"/pad.S{i}/M"], "spiffe_ids": [f"spiffe://example.org/pad/{i}"]}
        for i in range(padding_rules)
    ]
    return yaml.safe_dump({"name": name, "allow": rules})


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as an operator's deploy does: a new inode, atomically


def test_a_slow_reload_of_an_older_file_does_not_win_over_a_newer_one(tmp_path, ca, bundles, server_source) -> None:
    path = tmp_path / "policy.yaml"
    _replace(path, _policy_text("v0", FRONTEND_ID))
    interceptor = meshid.AuthorizationInterceptor(str(path), source=server_source)
    frontend = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
    # v1 allows the frontend and takes a long time to parse; v2 allows nobody we know and is quick.
    _replace(path, _policy_text("v1", FRONTEND_ID, padding_rules=4000))
    slow = threading.Thread(target=interceptor.reload)
    slow.start()
    time.sleep(0.05)  # only to let the slow load read v1 first; the outcome must not depend on it
    _replace(path, _policy_text("v2", "spiffe://example.org/ns/prod/sa/someone-else"))
    interceptor.reload()
    slow.join()
    assert interceptor.policy.name == "v2", "an older policy stayed in force under the newer file's stamp"
    with sync_server(server_source, interceptor) as port:
        with meshid.secure_channel(f"127.0.0.1:{port}", frontend, server_id="example.org") as channel:
            assert call(channel)[0] == "PERMISSION_DENIED"


def test_watcher_and_reload_calls_converge_on_the_last_file(tmp_path, ca, bundles, server_source) -> None:
    path = tmp_path / "policy.yaml"
    _replace(path, _policy_text("v0", FRONTEND_ID))
    interceptor = meshid.AuthorizationInterceptor(str(path), source=server_source, poll_interval=0.01)
    with interceptor:  # the watcher polls every 10 ms while reload() is called from two threads
        stop = threading.Event()

        def reloader() -> None:
            while not stop.is_set():
                interceptor.reload()

        threads = [threading.Thread(target=reloader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for i in range(1, 30):
                _replace(path, _policy_text(f"v{i}", FRONTEND_ID, padding_rules=(i % 3) * 300))
        finally:
            stop.set()
            for t in threads:
                t.join()
        eventually(lambda: interceptor.policy.name == "v29", 10, "the watcher to settle on the last file")
        frontend = meshid.StaticSource(ca.issue_svid(FRONTEND_ID), bundles)
        with sync_server(server_source, interceptor) as port:
            with meshid.secure_channel(f"127.0.0.1:{port}", frontend, server_id="example.org") as channel:
                assert call(channel) == ("OK", FRONTEND_ID)
