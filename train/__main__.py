"""The IDAdapter trainer's command line, `python -m train <command> ...`.

Each command is a module train/<command>.py with `add_arguments(parser)` and `run(args)`; the first line of its
docstring is the command's help."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from idadapter_core.errors import IDAdapterError

COMMANDS = ("prepare", "fit", "export", "eval", "demo")

log = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__ or 'train'}.{name}")
        summary = (module.__doc__ or name).strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except IDAdapterError as err:
        log.error("%s: %s", args.command, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
