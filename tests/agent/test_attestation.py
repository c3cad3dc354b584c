"""Workload attestation: the unix selectors' grammar, what attest() reads about real processes, and
the guard that keeps an exited process's pid from speaking for whatever runs under it next.

Every process here is real (this test process, or children it starts and always stops); nothing
reads a fake /proc.
"""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from meshid.workloadapi import (
    ProcessInfo,
    Selector,
    WorkloadAttestationError,
    attest,
    check_alive,
    matches,
    selectors_of,
)
from support import eventually

pytestmark = pytest.mark.timeout(60)

HEX = "ab" * 32

# --- the grammar (the CA validates entries with the same Selector.parse) --------------------------

VALID = [
    ("unix:uid:0", "uid", "0"),
    ("unix:uid:1001", "uid", "1001"),
    ("unix:uid:4294967294", "uid", "4294967294"),
    ("unix:gid:65534", "gid", "65534"),
    ("unix:user:nginx", "user", "nginx"),
    ("unix:user:www-data", "user", "www-data"),
    ("unix:user:_apt", "user", "_apt"),
    ("unix:user:host$", "user", "host$"),
    ("unix:user:ann@corp.example", "user", "ann@corp.example"),
    ("unix:group:meshid-a", "group", "meshid-a"),
    ("unix:supplementary_gid:27", "supplementary_gid", "27"),
    ("unix:supplementary_group:docker", "supplementary_group", "docker"),
    ("unix:path:/usr/bin/nginx", "path", "/usr/bin/nginx"),
    ("unix:path:/opt/my app/bin:x", "path", "/opt/my app/bin:x"),
    ("unix:sha256:" + HEX, "sha256", HEX),
]

INVALID = [
    ("", "empty"),
    ("uid:1001", "no-unix-type"),
    ("k8s:ns:default", "another-attestor"),
    ("Unix:uid:1", "type-is-case-sensitive"),
    ("unix:uid", "no-value-separator"),
    ("unix:uid:", "empty-number"),
    ("unix:uid:01", "leading-zero"),
    ("unix:uid:+1", "signed-number"),
    ("unix:uid:-1", "negative-number"),
    ("unix:uid: 1", "space-in-number"),
    ("unix:uid:1 ", "trailing-space"),
    ("unix:uid:1\n", "trailing-newline"),
    ("unix:uid:4294967295", "uid-minus-one"),
    ("unix:uid:99999999999", "number-too-large"),
    ("unix:uid:١٢", "non-ascii-digits"),
    ("unix:gid:0x10", "hex-number"),
    ("unix:UID:1", "kind-is-case-sensitive"),
    ("unix:pid:1", "unknown-kind"),
    ("unix:user:", "empty-name"),
    ("unix:user:1001", "numeric-name"),
    ("unix:user:-admin", "name-starts-with-dash"),
    ("unix:user:a b", "space-in-name"),
    ("unix:user:a:b", "colon-in-name"),
    ("unix:user:a$b", "dollar-not-final"),
    ("unix:user:" + "a" * 257, "name-too-long"),
    ("unix:group:wheel\n", "newline-in-name"),
    ("unix:path:", "empty-path"),
    ("unix:path:usr/bin/nginx", "relative-path"),
    ("unix:path:/", "root-is-not-a-file"),
    ("unix:path://usr/bin/nginx", "double-leading-slash"),
    ("unix:path:/usr//bin/nginx", "double-slash"),
    ("unix:path:/usr/./bin/nginx", "dot-segment"),
    ("unix:path:/usr/lib/../bin/nginx", "dot-dot-segment"),
    ("unix:path:/usr/bin/", "trailing-slash"),
    ("unix:path:/usr/bin/ng\x00inx", "nul-in-path"),
    ("unix:path:/usr/bin/nginx\n", "newline-in-path"),
    ("unix:path:/" + "a" * 4095, "path-too-long"),
    ("unix:sha256:" + HEX.upper(), "uppercase-hex"),
    ("unix:sha256:" + HEX[:-1], "short-digest"),
    ("unix:sha256:" + HEX + "0", "long-digest"),
    ("unix:sha256:" + "g" * 64, "not-hex"),
    ("unix:sha256:sha256:" + HEX, "prefixed-digest"),
]


@pytest.mark.parametrize(("text", "kind", "value"), VALID, ids=[t for t, _, _ in VALID])
def test_selector_parses_and_prints_back(text: str, kind: str, value: str) -> None:
    selector = Selector.parse(text)
    assert (selector.kind, selector.value) == (kind, value)
    assert str(selector) == text
    assert Selector(kind, value) == selector and hash(Selector(kind, value)) == hash(selector)


@pytest.mark.parametrize(("text", "rule"), INVALID, ids=[r for _, r in INVALID])
def test_selector_refused(text: str, rule: str) -> None:
    with pytest.raises(ValueError, match="selector"):
        Selector.parse(text)


def test_selector_constructor_checks_like_parse() -> None:
    with pytest.raises(ValueError, match="leading zeros"):
        Selector("uid", "007")
    with pytest.raises(TypeError):
        Selector.parse(b"unix:uid:1")  # type: ignore[arg-type]


def test_selector_equals_only_selectors() -> None:
    selector = Selector.parse("unix:uid:1")
    assert selector != "unix:uid:1"
    assert selector != ("uid", "1")


def test_path_selector_names_the_normalised_form() -> None:
    with pytest.raises(ValueError, match="write /usr/bin/nginx"):
        Selector.parse("unix:path:/usr/local/../bin/nginx")


# --- attest() of real processes -------------------------------------------------------------------


def _stat_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def _me() -> ProcessInfo:
    return attest(os.getpid(), os.geteuid(), os.getegid())


def test_attest_the_test_process_itself() -> None:
    info = _me()
    exe = os.path.realpath("/proc/self/exe")
    assert info.pid == os.getpid()
    assert (info.uid, info.gid) == (os.geteuid(), os.getegid())
    assert info.user == pwd.getpwuid(os.geteuid()).pw_name
    assert info.group == grp.getgrgid(os.getegid()).gr_name
    assert set(info.supplementary_gids) == set(os.getgroups())
    assert info.exe == exe == os.path.realpath(sys.executable)
    assert info.start_time == _stat_start_time(os.getpid())
    with open(exe, "rb") as f:
        assert info.exe_sha256() == hashlib.sha256(f.read()).hexdigest()
    check_alive(info)


def test_selectors_of_the_test_process() -> None:
    info = _me()
    got = selectors_of(info)
    assert f"unix:uid:{os.geteuid()}" in got and f"unix:gid:{os.getegid()}" in got
    assert f"unix:user:{info.user}" in got and f"unix:group:{info.group}" in got
    assert f"unix:path:{info.exe}" in got and f"unix:sha256:{info.exe_sha256()}" in got
    for text in got:  # everything a process reports, an entry can be written for
        Selector.parse(text)


def test_process_info_is_a_frozen_value() -> None:
    info = _me()
    assert info == _me() and hash(info) == hash(_me())
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.uid = 0  # type: ignore[misc]


def test_matches_needs_every_selector() -> None:
    info = _me()
    uid, gid = Selector("uid", str(info.uid)), Selector("gid", str(info.gid))
    assert matches([uid], info)
    assert matches([uid, gid, f"unix:path:{info.exe}"], info)  # text is parsed
    assert not matches([uid, Selector("gid", str(info.gid + 1))], info)
    assert not matches([uid, Selector("path", "/usr/bin/other")], info)
    assert not matches([uid, Selector("sha256", HEX)], info)
    assert matches([uid, Selector("sha256", info.exe_sha256() or "")], info)


def test_an_entry_without_selectors_matches_no_process() -> None:
    assert not matches([], _me())


def test_matches_refuses_a_malformed_selector() -> None:
    with pytest.raises(ValueError):
        matches(["unix:uid:01"], _me())


def test_the_digest_is_read_only_when_the_rest_matches() -> None:
    # exe_stamp names no file this process runs: reading the digest would raise.
    info = dataclasses.replace(_me(), exe_stamp=(0, 0, 1, 0, 0))
    other_uid = Selector("uid", str(info.uid + 1))
    assert not matches([Selector("sha256", HEX), other_uid], info)
    with pytest.raises(WorkloadAttestationError, match="no longer runs the executable"):
        matches([Selector("sha256", HEX)], info)


def test_digest_reading_is_bounded() -> None:
    info = _me()
    assert info.exe_stamp is not None
    assert info.exe_sha256(max_bytes=info.exe_stamp[2] - 1) is None


def test_attest_refuses_other_credentials_than_the_connection_s() -> None:
    with pytest.raises(WorkloadAttestationError, match="connected as uid"):
        attest(os.getpid(), os.geteuid() + 1, os.getegid())
    with pytest.raises(WorkloadAttestationError, match="connected as uid"):
        attest(os.getpid(), os.geteuid(), os.getegid() + 1)


def test_attest_refuses_pid_zero_and_bad_arguments() -> None:
    with pytest.raises(WorkloadAttestationError, match="no peer process"):
        attest(0, 0, 0)
    with pytest.raises(TypeError):
        attest(-1, 0, 0)
    with pytest.raises(TypeError):
        attest("1", 0, 0)  # type: ignore[arg-type]


@pytest.fixture
def child(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping child process of this test (``request.param``: extra Popen arguments)."""
    kwargs = getattr(request, "param", {})
    proc = subprocess.Popen(kwargs.pop("args", ["sleep", "60"]), stdin=subprocess.DEVNULL, **kwargs)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_start_time_read_past_a_command_name_with_parentheses() -> None:
    # A process names itself (only it may write its comm); fields 3.. would shift if counted
    # from the first ")" rather than the last.
    rename = "import sys; open('/proc/self/comm', 'w').write('x) R 1 2 3 (y'); print(flush=True); sys.stdin.read()"
    with subprocess.Popen([sys.executable, "-c", rename], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                assert b"(x) R 1 2 3 (y)" in f.read()
            info = attest(proc.pid, os.geteuid(), os.getegid())
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                assert str(info.start_time).encode() == f.read().split(b"(y) ", 1)[1].split()[19]
        finally:
            proc.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="setting another process's groups needs root")
@pytest.mark.parametrize("child", [{"extra_groups": [4242, 0]}], indirect=True)
def test_supplementary_groups_as_spire_reports_them(child: subprocess.Popen[bytes]) -> None:
    info = attest(child.pid, os.geteuid(), os.getegid())
    assert sorted(info.supplementary_gids) == [0, 4242]
    assert info.supplementary_groups == (grp.getgrgid(0).gr_name,)  # 4242 has no name: no group selector
    got = selectors_of(info)
    assert {"unix:supplementary_gid:0", "unix:supplementary_gid:4242", "unix:supplementary_group:root"} <= got
    assert matches(["unix:supplementary_gid:4242"], info)
    assert not matches(["unix:supplementary_gid:4243"], info)


def test_a_deleted_executable_has_no_path_but_its_digest(tmp_path) -> None:
    program = tmp_path / "sleeper"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    digest = hashlib.sha256(program.read_bytes()).hexdigest()
    proc = subprocess.Popen([str(program), "60"])
    try:
        eventually(lambda: os.path.realpath(f"/proc/{proc.pid}/exe") == str(program), 10, "the copy to run")
        program.unlink()
        program.write_bytes(b"#!/bin/sh\n")  # the same path now names another file
        info = attest(proc.pid, os.geteuid(), os.getegid())
        assert info.exe is None  # the kernel says "<path> (deleted)": not the file at that path
        assert not matches([f"unix:path:{program}"], info)
        assert info.exe_sha256() == digest  # read through /proc/<pid>/exe: the file it runs
    finally:
        proc.kill()
        proc.wait()


# --- the guard: the pid of an exited process speaks for nobody ------------------------------------


def test_an_exited_process_is_refused(child: subprocess.Popen[bytes]) -> None:
    info = attest(child.pid, os.geteuid(), os.getegid())
    child.kill()
    child.wait()  # reaped: the pid is free for the next process
    with pytest.raises(WorkloadAttestationError, match="has exited"):
        check_alive(info)
    with pytest.raises(WorkloadAttestationError, match="has exited"):
        attest(child.pid, os.geteuid(), os.getegid())


def test_a_zombie_is_refused(child: subprocess.Popen[bytes]) -> None:
    info = attest(child.pid, os.geteuid(), os.getegid())
    child.send_signal(signal.SIGKILL)
    eventually(lambda: _state(child.pid) == "Z", 10, "the child to be a zombie")  # exited, not reaped
    with pytest.raises(WorkloadAttestationError, match="has exited"):
        check_alive(info)
    with pytest.raises(WorkloadAttestationError, match="has exited"):
        attest(child.pid, os.geteuid(), os.getegid())


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def test_the_same_pid_with_another_start_time_is_another_process(child: subprocess.Popen[bytes]) -> None:
    # What a reused pid looks like to the guard: the number is the same, the start time is not.
    info = attest(child.pid, os.geteuid(), os.getegid())
    earlier = dataclasses.replace(info, start_time=info.start_time - 1)
    with pytest.raises(WorkloadAttestationError, match="now names another process"):
        check_alive(earlier)
    check_alive(info)


def test_a_pidfd_says_when_its_process_has_exited(child: subprocess.Popen[bytes]) -> None:
    pidfd = os.pidfd_open(child.pid)
    try:
        info = attest(child.pid, os.geteuid(), os.getegid(), pidfd=pidfd)
        check_alive(info, pidfd=pidfd)
        child.kill()
        child.wait()
        with pytest.raises(WorkloadAttestationError, match="has exited"):
            check_alive(info, pidfd=pidfd)
    finally:
        os.close(pidfd)


def test_a_pidfd_of_another_process_is_refused(child: subprocess.Popen[bytes]) -> None:
    pidfd = os.pidfd_open(os.getpid())
    try:
        with pytest.raises(WorkloadAttestationError, match="has exited"):
            attest(child.pid, os.geteuid(), os.getegid(), pidfd=pidfd)
    finally:
        os.close(pidfd)


def test_a_changed_uid_is_refused() -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a process's uid needs root")
    # The process is attested as root, then becomes nobody: it no longer speaks as root.
    code = "import os, sys; sys.stdin.readline(); os.setuid(65534); sys.stdin.readline()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        try:
            info = attest(proc.pid, 0, 0)
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            eventually(lambda: _euid(proc.pid) == 65534, 10, "the child to change its uid")
            with pytest.raises(WorkloadAttestationError, match="now runs as uid 65534"):
                check_alive(info)
            with pytest.raises(WorkloadAttestationError, match="connected as uid 0"):
                attest(proc.pid, 0, 0)
        finally:
            proc.kill()


def _euid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[2]) for line in f if line.startswith("Uid:"))


def test_attest_is_quick() -> None:
    # The server attests before every response: /proc reads, names, no hashing (digests are cached).
    _me().exe_sha256()
    started = time.perf_counter()
    for _ in range(200):
        info = _me()
        info.exe_sha256()
        check_alive(info)
    assert time.perf_counter() - started < 2.0
