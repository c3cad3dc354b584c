"""What several command groups share: durations and the admin options."""

from __future__ import annotations

import argparse
import datetime
import re

_DURATION = re.compile(r"(\d{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> datetime.timedelta:
    """Parse ``30s``, ``10m``, ``1h`` or ``7d`` (argparse type)."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 30s, 10m, 1h or 7d")
    return datetime.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def add_admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the running CA")
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="where `meshid ca init` left the admin SVID")


def add_join_token_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--join-token, or --join-token-file, or $MESHID_JOIN_TOKEN: a token on the command line is
    visible in `ps` and shell history, so the file and the variable are the safer ways."""
    parser.add_argument(
        "--join-token",
        metavar="TOKEN",
        help="a one-time join token (every local user can read it in the process list; "
        "prefer --join-token-file or $MESHID_JOIN_TOKEN)",
    )
    parser.add_argument("--join-token-file", metavar="FILE", help="read the join token from FILE")
    parser.set_defaults(join_token_required=required)


def join_token(args: argparse.Namespace) -> str | None:
    """The join token from --join-token, --join-token-file or $MESHID_JOIN_TOKEN.

    --join-token still works, with a warning on stderr: by the time it is read, the token has
    been in the process list (``ps``, ``/proc/PID/cmdline``) where every local user can see it.

    Raises:
        TokenError: required and missing, or the file cannot be read.
    """
    import os
    import sys

    from meshid.errors import TokenError

    token: str | None = args.join_token
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
                token = f.read(1024).strip()
        except OSError as err:
            raise TokenError(f"join token: cannot read {args.join_token_file!r}: {err.strerror}") from err
    if token is None:
        token = os.environ.get("MESHID_JOIN_TOKEN") or None
    if token is None and args.join_token_required:
        raise TokenError("join token: give --join-token, --join-token-file or $MESHID_JOIN_TOKEN")
    return token
