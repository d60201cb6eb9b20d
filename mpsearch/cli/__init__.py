"""``mpsearch`` command line: parse flags, call one library function, print; map errors to exit codes.

Exit codes: 0 success, 2 bad input (one line on stderr; ``--debug`` shows the traceback),
1 anything else (a bug: the traceback is kept), 130 interrupted. Machine-readable output
(``--json``) goes to stdout; progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from mpsearch.cli import commands, deploy, study
from mpsearch.cli.flags import FIELD_FLAGS
from mpsearch.errors import UserError

__all__ = ["main", "build_parser", "entry"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpsearch", description="Search-based mixed-precision quantization for PyTorch/timm models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.register(sub)
    study.register(sub)
    deploy.register(sub)
    for command in sub.choices.values():  # which flags a command has: errors name those, not config fields
        command.set_defaults(flags=frozenset(s for action in command._actions for s in action.option_strings))
    return parser


def _in_flags(message: str, fields: Sequence[str], flags: frozenset[str]) -> str:
    """``message`` with each config field it names replaced by the flag that sets it, where this command has that flag."""
    for field in sorted(fields, key=len, reverse=True):
        flag = FIELD_FLAGS.get(field)
        if flag in flags:
            message = re.sub(rf"(?<![\w.-]){re.escape(field)}(?![\w.])", flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from mpsearch.log import set_verbosity

    parser = build_parser()
    args = parser.parse_args(argv)
    set_verbosity(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.handler(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"mpsearch: error: {_in_flags(str(exc), exc.fields, args.flags)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mpsearch: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    sys.exit(main())
