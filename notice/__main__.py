"""Command line: `python -m notice <command> ...`.

A command is a module with `add_arguments(parser)` and `command(args)`, listed in COMMANDS. Bad input
(its known error types) is one line on stderr and exit code 2, as argparse's own errors are here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from notice import knockout_pair, patch_pair
from notice.files.hub import ModelNotFoundError

PROG = "python -m notice"
COMMANDS = {
    "patch-pair": (patch_pair, "patch one (clean, corrupt) pair with the default patch set"),
    "knockout-pair": (knockout_pair, "attention knockout between token groups on one image and question"),
}
INPUT_ERRORS = (patch_pair.InputError, ModelNotFoundError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is the one line `prog: error: message` without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The parser with one subparser per command; the chosen module is stored as `args.module`."""
    root = OneLineParser(prog=PROG, description="NOTICE: causal activation patching of vision-language models.")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of `argv` (default: sys.argv); 0 on success, 2 on bad input."""
    args = parser().parse_args(argv)
    try:
        args.module.command(args)
    except INPUT_ERRORS as error:
        message = " ".join(str(error).split())
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
