"""`flamingo-edge <subcommand>`: dispatch, logging and exit codes (the only place that exits the process)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flamingo_edge import __version__
from flamingo_edge.cli import eval as eval_command
from flamingo_edge.cli import triton_repo
from flamingo_edge.cli import (bench, build, calibrate, compare, convert, demo, export, generate, info, plan,
                               quantize, serve)
from flamingo_edge.errors import FlamingoEdgeError

SUBCOMMANDS = {"info": info, "convert": convert, "export": export, "generate": generate, "eval": eval_command,
               "demo": demo, "compare": compare, "bench": bench, "calibrate": calibrate, "quantize": quantize,
               "build": build, "plan": plan, "serve": serve, "triton-repo": triton_repo}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


class ArgumentParser(argparse.ArgumentParser):
    """argparse, printing a refused argument as the one error line every command prints (the usage: --help)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="flamingo-edge", description="Flamingo-style vision-language models from checkpoint to edge inference."
    )
    parser.add_argument("--version", action="version", version=f"flamingo-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (default: warnings only)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.configure_parser(subparsers.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return SUBCOMMANDS[args.command].main(args) or 0
    except FlamingoEdgeError as error:
        one_line = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # quoted tool output
        print(f"flamingo-edge {args.command}: error: {one_line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # every writer is atomic: what was being written is gone with its temporary name
        print(f"flamingo-edge {args.command}: interrupted (nothing was left half-written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush at exit goes nowhere
        return 1


if __name__ == "__main__":
    sys.exit(main())
