"""Listeners: refusing an address some other process already serves on, in one line.

grpc sets ``SO_REUSEPORT`` (so a second server on a port would quietly share its connections)
and unlinks a Unix socket before binding it (so a second agent would steal a live one's
socket); meshid's listeners turn the first off and probe before they bind."""

from __future__ import annotations

import errno
import os
import socket
import stat

from meshid.errors import ListenError

__all__ = ["NO_REUSEPORT", "refuse_tcp_in_use", "refuse_unix_in_use"]

#: The grpc server option every meshid listener sets: a port in use is refused, never shared.
NO_REUSEPORT = ("grpc.so_reuseport", 0)


def refuse_tcp_in_use(listen: str, *, who: str, hint: str) -> None:
    """Refuse, in one line, an address some process already listens on.

    grpc would say so only in a log line of its own followed by a generic error (its server is
    also told not to set SO_REUSEPORT, which would let it share the port instead): this probe
    binds each address ``listen`` resolves to, as grpc will, and reports the one in use.
    ``who`` starts the message ("CA"), ``hint`` ends it (what to do).

    Raises:
        ListenError: an address is in use.
    """
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return  # port 0 is never in use; anything else unusual is grpc's to report
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        return
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise ListenError(
                        f"{who}: cannot listen on {listen}: the address is in use by another process{hint}"
                    ) from err



def refuse_unix_in_use(path: str, *, who: str) -> None:
    """Refuse a path held by a live server or by something that is not a socket.

    grpc unlinks whatever socket is at the path before binding, even one a running agent is
    serving on; a stale socket (nobody listening) is left for grpc to replace.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{who}: {path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nobody listens
    except OSError as err:
        raise ListenError(f"{who}: cannot tell whether {path} is in use: {err.strerror}") from err
    finally:
        probe.close()
    raise ListenError(f"{who}: another server is listening on {path}; stop it or choose another path")
