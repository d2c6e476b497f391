"""`flamingo-edge <subcommand>`: dispatch, logging and exit codes (the only place that exits the process)."""

from __future__ import annotations

import argparse
import logging
import sys

from flamingo_edge import __version__
from flamingo_edge.cli import eval as eval_command
from flamingo_edge.cli import (bench, build, calibrate, compare, convert, demo, export, generate, info,
                               quantize)
from flamingo_edge.errors import FlamingoEdgeError

SUBCOMMANDS = {"info": info, "convert": convert, "export": export, "generate": generate, "eval": eval_command, "demo": demo,
               "compare": compare, "bench": bench, "calibrate": calibrate,
               "quantize": quantize, "build": build}

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        print(f"flamingo-edge {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
