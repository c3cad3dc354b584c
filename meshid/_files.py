"""Atomic file output: write to a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never a mix.

    The file is created with ``mode`` from the start (a key is never readable by others, even
    for an instant) and fsynced before the rename; the folder is fsynced after it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_NAMES = ("svid.pem", "svid.key", "bundle.pem")
_CURRENT = "current"


def _fsync_dir(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _replace_symlink(target: str, link: str) -> None:
    tmp = f"{link}.tmp-{secrets.token_hex(4)}"
    os.symlink(target, tmp)
    os.replace(tmp, link)


def write_svid_files(
    folder: str | os.PathLike[str], chain_pem: bytes, key_pem: bytes, bundle_pem: bytes | None
) -> None:
    """Replace ``svid.pem``, ``svid.key`` (0600) and ``bundle.pem`` in ``folder`` as one unit.

    The three files are written (and fsynced) into a new version folder; then one atomic
    rename of the ``current`` symlink switches to it. ``svid.pem``, ``svid.key`` and
    ``bundle.pem`` are symlinks through ``current``, so the files on disk are always a matching
    certificate and key, even if the process is killed at any instant. Readers that open the
    two files one after the other can still straddle a switch; meshid's FileSource then sees a
    mismatch, keeps its SVID and reloads on its next poll.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    current = os.path.join(folder, _CURRENT)
    if bundle_pem is None:  # keep the bundle of the current version
        try:
            with open(os.path.join(current, "bundle.pem"), "rb") as f:
                bundle_pem = f.read()
        except OSError:
            bundle_pem = None
    version = tempfile.mkdtemp(dir=folder, prefix=".svid-")
    os.chmod(version, 0o755)
    write_atomic(os.path.join(version, "svid.key"), key_pem, mode=0o600)
    write_atomic(os.path.join(version, "svid.pem"), chain_pem)
    if bundle_pem is not None:
        write_atomic(os.path.join(version, "bundle.pem"), bundle_pem)
    previous = os.path.realpath(current) if os.path.islink(current) else None
    _replace_symlink(os.path.basename(version), current)
    for name in _NAMES:
        path = os.path.join(folder, name)
        wanted = os.path.join(_CURRENT, name)
        if not (os.path.islink(path) and os.readlink(path) == wanted):
            _replace_symlink(wanted, path)  # also turns an older layout's plain files into links
    _fsync_dir(folder)
    for entry in os.listdir(folder):  # older versions are no longer reachable
        full = os.path.join(folder, entry)
        if entry.startswith(".svid-") and full != version and os.path.realpath(full) != previous:
            shutil.rmtree(full, ignore_errors=True)
    if previous is not None and previous != os.path.realpath(version):
        shutil.rmtree(previous, ignore_errors=True)
