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
