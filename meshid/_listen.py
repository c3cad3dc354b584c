"""Addresses and listeners: ``HOST:PORT`` parsed strictly, and an address some other process
already serves on refused, in one line.

grpc reads ``127.0.0.1:99999`` as port 34463 (the port wraps modulo 65536), ``127.0.0.1`` as
port 443, and reports ``nonsense`` only in a log line of its own; :func:`parse_address` is the
one place every meshid listener, and the command line, checks an address first.

grpc sets ``SO_REUSEPORT`` (so a second server on a port would quietly share its connections)
and unlinks a Unix socket before binding it (so a second agent would steal a live one's
socket); meshid's listeners turn the first off and probe before they bind."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import stat

from meshid.errors import InvalidAddressError, ListenError

__all__ = ["NO_REUSEPORT", "parse_address", "refuse_tcp_in_use", "refuse_unix_in_use"]

_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_EXAMPLE = "write HOST:PORT, e.g. 127.0.0.1:8443, localhost:8443 or [::1]:8443"

#: The grpc server option every meshid listener sets: a port in use is refused, never shared.
NO_REUSEPORT = ("grpc.so_reuseport", 0)


def parse_address(text: str, *, port_zero: bool = False, unix: bool = False) -> str:
    """Check an address strictly and return it as grpc takes it.

    ``HOST:PORT`` where HOST is a DNS name, an IPv4 address or a bracketed IPv6 address
    (``[::1]:8443``) and PORT a decimal number from 1 to 65535; 0 too with ``port_zero`` (a
    listener's "pick a free port"). With ``unix``, also ``unix:PATH`` or ``unix:///PATH``.
    Nothing is resolved or bound here.

    Raises:
        InvalidAddressError: anything else, with what is wrong and how to write it.
    """
    if not isinstance(text, str):
        raise TypeError(f"address must be a str, not {type(text).__name__}")
    shown = repr(text[:100])
    if unix and text.startswith("unix:"):
        path = text[len("unix://") :] if text.startswith("unix://") else text[len("unix:") :]
        if not path or (text.startswith("unix://") and not path.startswith("/")):
            raise InvalidAddressError(f"address {shown}: no socket path; write unix:/PATH or unix:///PATH")
        return text
    if not text.strip():
        raise InvalidAddressError(f"address: empty; {_EXAMPLE}")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise InvalidAddressError(f"address {shown}: no port; {_EXAMPLE}")
    if not port:
        raise InvalidAddressError(f"address {shown}: no port after ':'; {_EXAMPLE}")
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        raise InvalidAddressError(f"address {shown}: port {port[:20]!r} is not a number from 1 to 65535")
    number = int(port)
    if number > 65535 or (number == 0 and not port_zero):
        allowed = "0 (any free port) to 65535" if port_zero else "1 to 65535"
        raise InvalidAddressError(f"address {shown}: port {number} is out of range; a port is {allowed}")
    if not host:
        raise InvalidAddressError(f"address {shown}: no host before ':{port}'; {_EXAMPLE}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as err:
            raise InvalidAddressError(f"address {shown}: {host} is not an IPv6 address") from err
        return text
    if ":" in host:
        raise InvalidAddressError(f"address {shown}: an IPv6 address goes in brackets, e.g. [::1]:{port}")
    if not host.isascii() or not _HOST_NAME.fullmatch(host) or len(host) > 253:
        raise InvalidAddressError(f"address {shown}: {host[:80]!r} is not a host name or IP address; {_EXAMPLE}")
    if host.replace(".", "").isdigit():  # all digits and dots: it must be an IPv4 address
        try:
            ipaddress.IPv4Address(host)
        except ValueError as err:
            raise InvalidAddressError(f"address {shown}: {host!r} is not an IPv4 address") from err
    return text


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
