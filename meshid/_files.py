"""Atomic file output: write to a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
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


def write_svid_files(
    folder: str | os.PathLike[str], chain_pem: bytes, key_pem: bytes, bundle_pem: bytes | None
) -> None:
    """Write ``svid.key`` (0600), then ``svid.pem`` and ``bundle.pem``, each atomically.

    The key goes first so a watcher that sees a new certificate always finds its key.
    """
    os.makedirs(folder, exist_ok=True)
    write_atomic(os.path.join(folder, "svid.key"), key_pem, mode=0o600)
    write_atomic(os.path.join(folder, "svid.pem"), chain_pem)
    if bundle_pem is not None:
        write_atomic(os.path.join(folder, "bundle.pem"), bundle_pem)
