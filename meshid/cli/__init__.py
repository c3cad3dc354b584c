"""The ``meshid`` command line: one module per command group.

Exit codes (``meshid.cli._common``): 0 success (or "allow"), 1 a negative answer ("deny", an
expired or not yet valid SVID), 2 bad input or a refusal by the CA, 3 a server that could not
be reached or gave no answer, 130 interrupted, 141 stdout closed early (``| head``). Errors are
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

import meshid
from meshid.cli import agent, bundle, ca, entry, policy, svid
from meshid.cli._common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PIPE_CLOSED, EXIT_UNREACHABLE
from meshid.errors import MeshIdError, RemoteError, UnreachableError

__all__ = ["build_parser", "main"]

#: What a server that could not be reached (or answer in time) is told apart by.
_UNREACHABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
#: ... unless grpc's details say a server answered but failed to prove the identity asked for
#: (a wrong --bundle or trust domain): retrying will not help, so that is bad input (2).
_HANDSHAKE_REFUSED = ("Tls handshake failed", "CERTIFICATE_VERIFY_FAILED", "Hostname Verification")


class _Parser(argparse.ArgumentParser):
    """One line on stderr for bad usage, and ``-1h`` / ``-5`` read as values (to be refused
    with a reason) rather than as unknown options."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # argparse takes "-1h" for an option ("expected one argument"); as a value, the
        # duration type says what is wrong with it.
        self._negative_number_matcher = re.compile(r"^-\d+[smhd]?$|^-\d*\.\d+$")

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"meshid: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _usage(parser: argparse.ArgumentParser) -> object:
    """A group named without a command: its help, with the commands it has, on stderr; exit 2."""

    def run(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT

    return run


def _usage_when_no_command(parser: argparse.ArgumentParser) -> None:
    """``meshid``, ``meshid ca``, ...: the usage and the commands there are, not "the following
    arguments are required: group"."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            if parser.get_default("run") is None:
                parser.set_defaults(run=_usage(parser))
            for sub in action.choices.values():
                _usage_when_no_command(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meshid",
        description="SPIFFE identities and authorization for gRPC services.",
        epilog="Exit codes: 0 ok (allow), 1 a negative answer (deny, an expired SVID), 2 bad input or a "
        "refusal by the CA, 3 could not reach a server. Durations are written 30s, 10m, 1h, 7d. "
        "Run `meshid GROUP --help` for a group's commands.",
    )
    parser.add_argument("--version", action="version", version=f"meshid {meshid.__version__}")
    groups = parser.add_subparsers(dest="group", title="command groups", metavar="GROUP", parser_class=_Parser)
    ca.register(groups)
    agent.register(groups)
    bundle.register(groups)
    entry.register(groups)
    svid.register(groups)
    policy.register(groups)
    _usage_when_no_command(parser)
    return parser


def _quiet_grpc(args: argparse.Namespace) -> None:
    """grpc's C core logs on stderr (a failed TLS handshake at INFO or ERROR) lines that would
    turn a command's one-line error into several; it reads GRPC_VERBOSITY when grpc is first
    imported, which no command has done yet. One-shot commands keep it silent; the servers
    (``ca serve``, ``agent``) keep its errors for their logs. An operator's own value wins."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if getattr(args, "long_running", False) else "NONE")


def _unreachable(err: BaseException | None) -> bool:
    """Whether a server could not be reached (or answer): an UnreachableError, a RemoteError
    with such a status code and no refused TLS handshake, or an error raised from one (e.g. an
    agent's first issuance)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, UnreachableError):
            return True
        if isinstance(err, RemoteError) and err.code in _UNREACHABLE_CODES:
            return not any(words in str(err) for words in _HANDSHAKE_REFUSED)
        err, seen = err.__cause__, seen + 1
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_grpc(args)
    try:
        return int(args.run(args))
    except MeshIdError as err:
        print(f"meshid: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE if _unreachable(err) else EXIT_BAD_INPUT
    except BrokenPipeError:  # `meshid ... | head`: the reader has what it wanted; no message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return EXIT_PIPE_CLOSED
    except OSError as err:  # a file (named) or a socket (no name) that cannot be used
        where = f"{err.filename}: " if err.filename else ""
        print(f"meshid: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
