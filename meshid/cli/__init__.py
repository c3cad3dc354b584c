"""The ``meshid`` command line: one module per command group.

Exit codes: 0 success (or "allow"), 1 a negative answer (or "deny"), 2 bad input.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import os

# grpc's C core logs each failed TLS handshake on stderr (at INFO, through absl), which would
# turn a command's one-line error into several; it reads the setting when grpc is first
# imported, so this comes before anything that imports grpc. An operator's own value wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import sys
from collections.abc import Sequence

import meshid
from meshid.cli import agent, bundle, ca, entry, policy, svid
from meshid.errors import MeshIdError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"meshid: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshid", description="SPIFFE identities and authorization for gRPC services.")
    parser.add_argument("--version", action="version", version=f"meshid {meshid.__version__}")
    groups = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)
    ca.register(groups)
    agent.register(groups)
    bundle.register(groups)
    entry.register(groups)
    svid.register(groups)
    policy.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except MeshIdError as err:
        print(f"meshid: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file (named) or a socket (no name) that cannot be used
        where = f"{err.filename}: " if err.filename else ""
        print(f"meshid: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
