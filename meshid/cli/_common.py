"""What several command groups share: durations, addresses, exit codes and the admin options."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import threading
from collections.abc import Callable

#: The command line's exit codes (the README's table): 0 success or "allow", 1 a negative answer
#: ("deny", an expired or not yet valid SVID), 2 bad input or a refusal by the CA (a server that
#: fails to prove the identity asked for included), 3 a server that could not be reached or gave
#: no answer (retrying may help), 130 interrupted (Ctrl-C), 141 stdout closed early (``| head``,
#: as a shell reports SIGPIPE).
EXIT_OK, EXIT_NEGATIVE, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_PIPE_CLOSED = 141

#: What every duration option's help ends with.
DURATION_FORMAT = "a number and a unit: 30s, 10m, 1h, 7d"

_DURATION = re.compile(r"([-+]?\d{1,9})([smhd]?)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> datetime.timedelta:
    """Parse ``30s``, ``10m``, ``1h`` or ``7d`` (argparse type); zero and negative are refused."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write {DURATION_FORMAT}")
    if int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive; write {DURATION_FORMAT}")
    if not match.group(2):
        raise argparse.ArgumentTypeError(f"{text!r}: a duration needs a unit; write {DURATION_FORMAT}")
    return datetime.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


_SECONDS = re.compile(r"([-+]?\d{1,9}(?:\.\d{1,9})?)([smhd]?)")


def seconds(*, limit: float | None = None, whole: bool = False) -> Callable[[str], float]:
    """The argparse type of the options that count seconds (``--sync-interval``, ``--refresh-hint``):
    a bare number of seconds (``5``, ``0.5``) or a duration as every other option takes it
    (``30s``, ``10m``); greater than 0, at most ``limit`` seconds, a whole number if ``whole``."""

    def parse(text: str) -> float:
        match = _SECONDS.fullmatch(text.strip())
        if not match:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds; write seconds (5, 0.5) or {DURATION_FORMAT}"
            )
        value = float(match.group(1)) * _UNITS[match.group(2) or "s"]
        if value <= 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds greater than 0; write seconds (5, 0.5) or {DURATION_FORMAT}"
            )
        if limit is not None and value > limit:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at most {show(datetime.timedelta(seconds=limit))}")
        if whole and value != int(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of seconds")
        return value

    parse.__name__ = "seconds"
    return parse


def positive_int(text: str) -> int:
    """A whole number greater than 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number greater than 0")
    return value


def show(delta: datetime.timedelta) -> str:
    """A duration as the options take it, largest units first: ``1d 2h``, ``5m 3s``, ``0s``."""
    seconds = int(abs(delta.total_seconds()))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def address(*, port_zero: bool = False, unix: bool = False) -> Callable[[str], str]:
    """The argparse type of every ``HOST:PORT`` option: the one parser, ``meshid._listen.parse_address``.

    ``port_zero`` for a listener (0: any free port); ``unix`` to allow ``unix:PATH`` too.
    """

    def parse(text: str) -> str:
        from meshid._listen import parse_address
        from meshid.errors import InvalidAddressError

        try:
            return parse_address(text, port_zero=port_zero, unix=unix)
        except InvalidAddressError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parse.__name__ = "address"
    return parse


def ca_bundle(path: str) -> str:
    """The argparse type of ``--bundle`` (the roots a CA is trusted by): the path, once the file
    has been read as CA certificates, so a wrong file is named in plain words before any call."""
    from meshid.bundle import TrustBundle
    from meshid.errors import InvalidBundleError

    try:
        TrustBundle.load_roots(path)
    except InvalidBundleError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return path


def writable_out(path: str, what: str) -> None:
    """Check that ``--out`` can be written in, or created, before a join token is spent on an SVID
    that could not be saved: a mistyped ``--out`` costs no token. Nothing is left behind: the
    folder itself is made by the writer, after the CA has answered.

    Raises:
        MeshIdError: the folder cannot be created or written in; the message names it.
    """
    import errno
    import tempfile

    from meshid.errors import MeshIdError

    target = os.path.abspath(path)
    nearest = target
    while not os.path.lexists(nearest):
        nearest = os.path.dirname(nearest)
    try:
        if not os.path.isdir(nearest):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), nearest)
        if nearest == target:
            with tempfile.TemporaryFile(dir=nearest):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=nearest))
    except OSError as err:
        raise MeshIdError(
            f"{what}: --out {path!r}: cannot write there: {err.strerror or err}; the join token was not used"
        ) from err


def unix_socket(text: str) -> str:
    """The argparse type of the Workload API socket options: ``unix:///PATH`` (or a path)."""
    from meshid.workloadapi.wire import socket_path

    try:
        socket_path(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def add_admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, type=address(), metavar="HOST:PORT", help="the running CA")
    parser.add_argument(
        "--data-dir",
        required=True,
        type=admin_folder,
        metavar="DIR",
        help="where `meshid ca init` left the admin SVID",
    )


def admin_folder(path: str) -> str:
    """The argparse type of the admin commands' ``--data-dir``: a folder with the admin SVID in
    ``admin/``, so a wrong folder (a workload's, a typo) is named as such, not as a missing file."""
    if not os.path.isfile(os.path.join(path, "admin", "svid.pem")):
        what = "no such folder" if not os.path.isdir(path) else "no admin SVID in it (admin/svid.pem)"
        raise argparse.ArgumentTypeError(
            f"{path!r}: {what}; give the CA's folder, the one `meshid ca init --data-dir` made"
        )
    return path


def add_join_token_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--join-token, or --join-token-file, or $MESHID_JOIN_TOKEN: a token on the command line is
    visible in `ps` and shell history, so the file and the variable are the safer ways."""
    parser.add_argument(
        "--join-token",
        metavar="TOKEN",
        help="a one-time join token (every local user can read it in the process list; "
        "prefer --join-token-file FILE or the MESHID_JOIN_TOKEN environment variable)",
    )
    parser.add_argument(
        "--join-token-file",
        metavar="FILE",
        help="read the join token from FILE; without either option, $MESHID_JOIN_TOKEN is used",
    )
    parser.set_defaults(join_token_required=required)


def join_token(args: argparse.Namespace, *, check: bool = True) -> str | None:
    """The join token from --join-token, --join-token-file or $MESHID_JOIN_TOKEN.

    --join-token still works, with a warning on stderr: by the time it is read, the token has
    been in the process list (``ps``, ``/proc/PID/cmdline``) where every local user can see it.

    ``check=False`` leaves the token's shape to :func:`check_join_token`, for a command that
    first refuses other bad input.

    Raises:
        TokenError: required and missing, the file cannot be read, or (``check``) it is not
            one token.
    """
    import os
    import sys

    from meshid.errors import TokenError

    token: str | None = args.join_token
    if token is not None and args.join_token_file:
        raise TokenError("join token: give --join-token or --join-token-file, not both")
    if token is not None:
        print(
            "meshid: warning: --join-token puts the token in the process list, where every local user can read it; "
            "use --join-token-file FILE or $MESHID_JOIN_TOKEN instead",
            file=sys.stderr,
            flush=True,
        )
    if token is None and args.join_token_file:
        try:
            with open(args.join_token_file, encoding="utf-8") as f:
                token = f.read(_MAX_TOKEN_FILE + 1)
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not text"
            raise TokenError(f"join token: cannot read {args.join_token_file!r}: {why}") from err
        if len(token) > _MAX_TOKEN_FILE:  # never its first part taken as the whole
            raise TokenError(
                f"join token: {args.join_token_file!r} is larger than {_MAX_TOKEN_FILE} characters; "
                "expected one line, '<trust domain>:<secret>', as `meshid token create` prints it"
            )
    if token is None:
        token = os.environ.get("MESHID_JOIN_TOKEN") or None
    if token is None and args.join_token_required:
        raise TokenError("join token: give --join-token, --join-token-file or $MESHID_JOIN_TOKEN")
    if token is not None:
        token = token.strip()  # `export MESHID_JOIN_TOKEN="$(cat token)\n"`: the newline is not the token's
        if check:
            check_join_token(args, token)
    return token


#: The most a join token file may hold (a token is well under 300 characters).
_MAX_TOKEN_FILE = 1024


def check_join_token(args: argparse.Namespace, token: str) -> None:
    """Refuse, naming where it came from, what cannot be a join token (an empty file, two tokens
    in one file, a line of other text) before the CA is called: the trust domain is taken from
    the token, and a wrong one would be reported as a bad trust domain.

    Raises:
        TokenError: ``token`` is not one ``<trust domain>:<secret>``.
    """
    from meshid.ca.issuing import parse_token_trust_domain
    from meshid.errors import MeshIdError, TokenError
    from meshid.spiffeid import TrustDomain

    if args.join_token is not None:
        where = "--join-token"
    elif args.join_token_file:
        where = repr(args.join_token_file)
    else:
        where = "$MESHID_JOIN_TOKEN"
    shape = "expected one line, '<trust domain>:<secret>', as `meshid token create` prints it"
    if not token:
        raise TokenError(f"join token: {where} is empty; {shape}")
    if any(c.isspace() for c in token):
        lines = len(token.splitlines())
        what = f"{lines} lines" if lines > 1 else "spaces"
        raise TokenError(f"join token: {where} holds {what}; {shape}")
    try:
        TrustDomain.parse(parse_token_trust_domain(token))
    except MeshIdError as err:
        raise TokenError(f"join token: {where} is not a join token ({err}); {shape}") from err


def stop_on_signals(stop: threading.Event) -> Callable[[Callable[[], None]], None]:
    """Set ``stop`` at SIGTERM or SIGINT, then run what was added with the function returned.

    Two ways a stop signal got lost: a Python handler runs on the main thread between two
    bytecodes, so one that takes a lock (``Event.set`` does) deadlocks when it interrupts that
    thread holding the same lock, as ``Event.wait`` does for a moment before it sleeps; and the
    kernel may hand a process's signal to any of its threads (grpc's among them), in which case a
    main thread asleep in an untimed wait never runs the Python handler at all. So the handler
    does nothing; the C-level handler, in whichever thread the signal lands, writes the signal's
    number to a pipe (``signal.set_wakeup_fd``), and a thread of its own reads it and does the
    stopping. Call from the main thread.
    """
    actions: list[Callable[[], None]] = []
    read_end, write_end = os.pipe()  # not inherited by the programs an agent runs (PEP 446)
    os.set_blocking(write_end, False)  # set_wakeup_fd requires it: a signal handler never blocks

    def stopper() -> None:
        # the pipe carries the number of every signal with a Python handler; only these stop
        while not {signal.SIGTERM, signal.SIGINT} & set(os.read(read_end, 64)):
            pass
        stop.set()
        for action in list(actions):
            action()

    threading.Thread(target=stopper, name="meshid-stop-signal", daemon=True).start()
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _ignore_in_python)
    signal.signal(signal.SIGINT, _ignore_in_python)
    return actions.append


def _ignore_in_python(signum: int, frame: object) -> None:
    """The Python half of a stop signal: nothing (the wakeup pipe carries it to the stopper)."""
