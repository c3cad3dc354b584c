"""Workload attestation on Linux: which process is at the other end of a Workload API connection.

The caller is identified by the kernel, never by what it sends. The server takes the accepted
Unix connection's peer credentials (``SO_PEERCRED``: pid, uid, gid, recorded by the kernel at
``connect()``) and hands them to :func:`attest`, which reads ``/proc/<pid>``: the executable
(``exe``), the start time (``stat``, field 22) and the effective and supplementary groups
(``status``). :func:`selectors_of` turns the result into the selectors of SPIRE's ``unix``
workload attestor, with the same names and meaning; :func:`matches` says whether a registration
entry's selectors (all of them) hold for the process.

==========================================  ==================================================
``unix:uid:N``, ``unix:user:NAME``          the effective user (the name as resolved here)
``unix:gid:N``, ``unix:group:NAME``         the effective (primary) group
``unix:supplementary_gid:N``,               each supplementary group (``Groups:`` of
``unix:supplementary_group:NAME``           ``/proc/<pid>/status``), as SPIRE reports them
``unix:path:/abs/path``                     the executable, as the kernel names it (symlinks
                                            resolved; none if it was deleted or replaced)
``unix:sha256:HEX``                         the SHA-256 of that executable's content
==========================================  ==================================================

A pid names a process only while it runs: once it exits, the number can be given to another
process. The guard, as SPIRE's peer tracker does it: the start time is read before and after
everything else (a different start time is a different process), the effective uid and gid must
still be those of the connection, and :func:`check_alive` checks again right before an answer
is sent. Given a *pidfd* of the connecting process (Linux 6.5 hands one out for the peer of a
Unix connection, ``SO_PEERPIDFD``), the guard is exact: a pidfd names one process, not a number,
and says when that process has exited; what was read from ``/proc/<pid>`` while it was alive
was read from it. Without one from the kernel (Linux < 6.5) the server opens a pidfd by number
when the first request comes: a process that connected and exited before asking may by then
have left its pid to another process of the *same* user (one of another user is refused: its
uid is not the connection's), which would then be attested in its place. uid, gid, user and
group selectors lose nothing by it (that process has them anyway); path and sha256 selectors
are then no boundary between programs of one user.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import logging
import os
import posixpath
import pwd
import re
import select
from collections.abc import Iterable
from dataclasses import dataclass

from meshid._cache import BoundedCache
from meshid.errors import MeshIdError

__all__ = [
    "KINDS",
    "MAX_EXE_BYTES",
    "ProcessInfo",
    "Selector",
    "WorkloadAttestationError",
    "attest",
    "check_alive",
    "matches",
    "selectors_of",
]

log = logging.getLogger("meshid.attestation")

#: The largest executable :meth:`ProcessInfo.exe_sha256` hashes; a larger one has no digest, so
#: no ``unix:sha256`` selector matches it (hashing is work any local process can ask for).
MAX_EXE_BYTES = 512 * 1024 * 1024
_CHUNK = 1024 * 1024
_PROC = "/proc"

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of an executable. Any write moves mtime
#: and ctime, and ctime cannot be set back by a user (utime() sets mtime, and moves ctime).
ExeStamp = tuple[int, int, int, int, int]

# Digests by file identity: a thousand processes of one binary are hashed once. Starting over
# when full (BoundedCache) bounds what any number of distinct binaries can make it hold.
_digests: BoundedCache[ExeStamp, str] = BoundedCache(max_entries=4096, max_bytes=4096 * 160)


class WorkloadAttestationError(MeshIdError):
    """The process that opened a connection cannot be identified: it has exited, its pid now
    names another process, or it no longer runs with the credentials it connected with.
    (Not :class:`meshid.errors.AttestationError`, the CA's refusal of a *node* agent.)"""


# --- selectors -------------------------------------------------------------------------------

_NUMBER = re.compile(r"0|[1-9][0-9]{0,9}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.@-]*\$?")
_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id"
_MAX_NAME = 256
_MAX_PATH = 4095
_NUMERIC = frozenset({"uid", "gid", "supplementary_gid"})
_NAMES = frozenset({"user", "group", "supplementary_group"})
#: Every kind, in the order :func:`matches` checks them (the digest, which reads a file, last).
KINDS = ("uid", "gid", "user", "group", "supplementary_gid", "supplementary_group", "path", "sha256")


def _value_error(kind: str, value: str) -> str | None:
    """What is wrong with ``value`` for ``kind``, or None."""
    if kind in _NUMERIC:
        if not _NUMBER.fullmatch(value) or int(value) > _MAX_ID:
            return f"{kind} must be a decimal number from 0 to {_MAX_ID} without leading zeros"
    elif kind in _NAMES:
        if len(value) > _MAX_NAME or not _NAME.fullmatch(value):
            return (
                f"{kind} must be a name of at most {_MAX_NAME} characters: a letter or _, then letters, "
                "digits, _ . @ -, and an optional final $ (a number is written as a uid or gid selector)"
            )
    elif kind == "path":
        if not value.startswith("/") or value.startswith("//") or value == "/":
            return "path must be an absolute path to a file, e.g. /usr/bin/nginx"
        if len(value) > _MAX_PATH or any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
            return f"path must be at most {_MAX_PATH} characters, without control characters"
        if posixpath.normpath(value) != value:
            return f"path must be normalised (no //, /./, /../ or final /): write {posixpath.normpath(value)}"
    elif kind == "sha256":
        if not _HEX.fullmatch(value):
            return "sha256 must be 64 lowercase hexadecimal digits"
    else:
        return f"unknown kind {kind!r}; the unix attestor's kinds are {', '.join(KINDS)}"
    return None


@dataclass(frozen=True, slots=True)
class Selector:
    """One selector of the ``unix`` attestor, e.g. ``unix:uid:1001``; ``str()`` gives it back.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS` or ``value`` is not valid for it.
    """

    kind: str
    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not isinstance(self.value, str):
            raise TypeError("a selector's kind and value are strings")
        problem = _value_error(self.kind, self.value)
        if problem is not None:
            shown = f"unix:{self.kind}:{self.value}"
            raise ValueError(f"selector {shown[:200]!r}: {problem}")

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``unix:<kind>:<value>``, checked strictly: nothing is trimmed, case-folded or left over.

        Raises:
            ValueError: not a selector of the unix attestor, or a value not valid for its kind.
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"a selector is a string, not {type(text).__name__}")
        prefix, sep, rest = text.partition(":")
        kind, sep2, value = rest.partition(":")
        if prefix != "unix" or not sep or not sep2:
            raise ValueError(f"selector {text!r}: write unix:<kind>:<value>, e.g. unix:uid:1001")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"unix:{self.kind}:{self.value}"


# --- what /proc says about a process ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the kernel says about one process, as :func:`attest` read it.

    ``uid`` and ``gid`` are the effective ones, equal to the connection's peer credentials.
    ``user``, ``group`` and ``supplementary_groups`` are the names those ids resolve to here
    (None, or left out, when an id has no name). ``exe`` is the executable's path as the kernel
    reports it, None when it cannot be read or the file has been deleted or replaced since the
    process started it. ``start_time`` is in clock ticks since boot. ``exe_stamp`` identifies
    the executable file (device, inode, size, mtime, ctime); its digest is not read until
    :meth:`exe_sha256` is called.
    """

    pid: int
    uid: int
    gid: int
    user: str | None
    group: str | None
    supplementary_gids: tuple[int, ...]
    supplementary_groups: tuple[str, ...]
    exe: str | None
    start_time: int
    exe_stamp: ExeStamp | None

    def exe_sha256(self, *, max_bytes: int = MAX_EXE_BYTES) -> str | None:
        """The SHA-256 of the executable (lowercase hex), read through ``/proc/<pid>/exe`` so that
        it is the file the process runs even if its path now names another; cached by file
        identity. None when there is no executable to read or it is larger than ``max_bytes``.

        Raises:
            WorkloadAttestationError: the file behind ``/proc/<pid>/exe`` is no longer the one attested
                (the process exited and the pid was reused, or it executed another program).
        """
        if self.exe_stamp is None:
            return None
        if self.exe_stamp[2] > max_bytes:
            log.warning(
                "attestation: pid %d's executable %s has %d bytes, more than the %d hashed; no sha256 selector matches",
                self.pid,
                self.exe,
                self.exe_stamp[2],
                max_bytes,
            )
            return None
        cached = _digests.get(self.exe_stamp)
        if cached is not None:
            return cached
        try:
            with open(f"{_PROC}/{self.pid}/exe", "rb", buffering=0) as f:
                if _stamp(os.fstat(f.fileno())) != self.exe_stamp:
                    raise WorkloadAttestationError(
                        f"attestation: pid {self.pid} no longer runs the executable it was attested with"
                    )
                digest, left = hashlib.sha256(), self.exe_stamp[2]
                while left > 0:  # no more than fstat said: the file is busy (ETXTBSY) while it runs
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    digest.update(chunk)
                    left -= len(chunk)
        except OSError as err:
            why = err.strerror
            raise WorkloadAttestationError(f"attestation: cannot read pid {self.pid}'s executable: {why}") from err
        if left:
            raise WorkloadAttestationError(f"attestation: pid {self.pid}'s executable was shorter than its size")
        value = digest.hexdigest()
        _digests.put(self.exe_stamp, value, 160)
        return value


def _stamp(st: os.stat_result) -> ExeStamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _gone(pid: int, err: OSError) -> WorkloadAttestationError:
    if err.errno in (errno.ENOENT, errno.ESRCH):
        return WorkloadAttestationError(f"attestation: process {pid} has exited")
    return WorkloadAttestationError(f"attestation: cannot read /proc/{pid}: {err.strerror}")


def _start_time(pid: int) -> int:
    """Field 22 of ``/proc/<pid>/stat``. The command name (field 2) may hold spaces and
    parentheses, so fields are counted from its last ``)``."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError as err:
        raise _gone(pid, err) from err
    end = data.rfind(b")")
    fields = data[end + 2 :].split() if end >= 0 else []
    if len(fields) < 20 or not fields[19].isdigit():
        raise WorkloadAttestationError(f"attestation: /proc/{pid}/stat cannot be read as a process's stat")
    return int(fields[19])


def _status(pid: int) -> tuple[int, int, tuple[int, ...], bool]:
    """Effective uid, effective gid, supplementary gids, and whether the process is a zombie."""
    try:
        with open(f"{_PROC}/{pid}/status", "rb") as f:
            lines = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        uids, gids = lines[b"Uid"].split(), lines[b"Gid"].split()
        groups = tuple(int(g) for g in lines.get(b"Groups", b"").split())
        return int(uids[1]), int(gids[1]), groups, lines.get(b"State", b"").strip().startswith(b"Z")
    except OSError as err:
        raise _gone(pid, err) from err
    except (KeyError, IndexError, ValueError) as err:
        raise WorkloadAttestationError(f"attestation: /proc/{pid}/status cannot be read: {err!r}") from err


def _exe(pid: int) -> tuple[str | None, ExeStamp | None]:
    link = f"{_PROC}/{pid}/exe"
    try:
        st = os.stat(link)  # the file itself, through the kernel's link
        path = os.readlink(link)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ESRCH):
            return None, None  # a zombie or kernel thread has none; exited is caught by the start time
        log.debug("attestation: cannot read %s: %s; no path or sha256 selector matches", link, err.strerror)
        return None, None
    # A deleted or replaced file reads "<path> (deleted)", which a file could also be named:
    # the link count tells them apart.
    return (path if st.st_nlink > 0 else None), _stamp(st)


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _check_pidfd(pid: int, pidfd: int) -> None:
    """The pidfd names ``pid`` and its process has not exited."""
    try:
        with open(f"{_PROC}/self/fdinfo/{pidfd}", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
    except OSError as err:
        raise WorkloadAttestationError(f"attestation: cannot read the pidfd of process {pid}: {err.strerror}") from err
    named = fields.get(b"Pid", b"").strip()
    if named != str(pid).encode() or _pidfd_exited(pidfd):
        raise WorkloadAttestationError(f"attestation: the process that connected as pid {pid} has exited")


def attest(pid: int, uid: int, gid: int, *, pidfd: int | None = None) -> ProcessInfo:
    """What the kernel says about process ``pid``, which connected with effective ``uid`` and ``gid``.

    Args:
        pid, uid, gid: the connection's peer credentials (``SO_PEERCRED``).
        pidfd: a pidfd of the process that connected (``SO_PEERPIDFD``, or ``os.pidfd_open``);
            with it, the process is known to be the same from first read to last.

    Raises:
        WorkloadAttestationError: the process has exited, its start time changed while it was read
            (another process has the pid), its pidfd says it exited, or it no longer has the
            effective uid and gid it connected with.
    """
    for name, value in (("pid", pid), ("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TypeError(f"attest(): {name} must be a non-negative int, not {value!r}")
    if pid == 0:
        raise WorkloadAttestationError("attestation: the connection has no peer process (pid 0)")
    start = _start_time(pid)
    euid, egid, groups, zombie = _status(pid)
    exe, stamp = _exe(pid)
    if zombie:
        raise WorkloadAttestationError(f"attestation: process {pid} has exited")
    user, group = _user(euid), _group(egid)
    names = tuple(n for n in map(_group, groups) if n is not None)
    if _start_time(pid) != start:
        raise WorkloadAttestationError(f"attestation: pid {pid} was given to another process while it was read")
    if pidfd is not None:
        _check_pidfd(pid, pidfd)
    if (euid, egid) != (uid, gid):
        raise WorkloadAttestationError(
            f"attestation: pid {pid} runs as uid {euid} gid {egid} but connected as uid {uid} gid {gid}"
        )
    return ProcessInfo(pid, euid, egid, user, group, groups, names, exe, start, stamp)


def check_alive(info: ProcessInfo, *, pidfd: int | None = None) -> None:
    """Check, right before answering, that ``info`` still describes a running process: the same
    start time, the same effective uid and gid, and (given its pidfd) not exited.

    Raises:
        WorkloadAttestationError: it does not.
    """
    if pidfd is not None:
        _check_pidfd(info.pid, pidfd)
    if _start_time(info.pid) != info.start_time:
        raise WorkloadAttestationError(f"attestation: pid {info.pid} now names another process")
    euid, egid, _, zombie = _status(info.pid)
    if zombie:
        raise WorkloadAttestationError(f"attestation: process {info.pid} has exited")
    if (euid, egid) != (info.uid, info.gid):
        raise WorkloadAttestationError(f"attestation: pid {info.pid} now runs as uid {euid} gid {egid}")


# --- selectors of a process, and matching -------------------------------------------------------


def selectors_of(info: ProcessInfo) -> frozenset[str]:
    """Every selector that holds for the process, as SPIRE's unix attestor reports them (for logs,
    and for whoever matches selectors itself). Reads the executable's digest.

    Raises:
        WorkloadAttestationError: see :meth:`ProcessInfo.exe_sha256`.
    """
    out = {f"unix:uid:{info.uid}", f"unix:gid:{info.gid}"}
    if info.user is not None:
        out.add(f"unix:user:{info.user}")
    if info.group is not None:
        out.add(f"unix:group:{info.group}")
    out.update(f"unix:supplementary_gid:{g}" for g in info.supplementary_gids)
    out.update(f"unix:supplementary_group:{g}" for g in info.supplementary_groups)
    if info.exe is not None:
        out.add(f"unix:path:{info.exe}")
    digest = info.exe_sha256()
    if digest is not None:
        out.add(f"unix:sha256:{digest}")
    return frozenset(out)


def _holds(selector: Selector, info: ProcessInfo) -> bool:
    kind, value = selector.kind, selector.value
    if kind == "uid":
        return int(value) == info.uid
    if kind == "gid":
        return int(value) == info.gid
    if kind == "user":
        return value == info.user
    if kind == "group":
        return value == info.group
    if kind == "supplementary_gid":
        return int(value) in info.supplementary_gids
    if kind == "supplementary_group":
        return value in info.supplementary_groups
    if kind == "path":
        return value == info.exe
    return value == info.exe_sha256()  # sha256; Selector admits no other kind


def matches(entry_selectors: Iterable[Selector | str], info: ProcessInfo) -> bool:
    """Whether every one of an entry's selectors holds for the process. An entry without
    selectors matches no process (not every process). The executable is hashed only when all
    other selectors hold and one asks for the digest.

    Raises:
        ValueError, TypeError: a selector given as text does not parse (see :meth:`Selector.parse`).
        WorkloadAttestationError: see :meth:`ProcessInfo.exe_sha256`.
    """
    selectors = [s if isinstance(s, Selector) else Selector.parse(s) for s in entry_selectors]
    if not selectors:
        return False
    selectors.sort(key=lambda s: KINDS.index(s.kind))
    return all(_holds(s, info) for s in selectors)
