"""The ``lmport`` command line: a thin dispatcher over ``lmport.commands.*``.

Each command module exposes ``add_parser(subparsers)``, which sets ``func`` on its parser.
Heavy imports (torch, the server) happen inside the command, not here, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmport import __version__

COMMANDS = ("launch", "backends", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmport", description="Serve LLMs behind TGI- and OpenAI-compatible HTTP APIs.")
    parser.add_argument("--version", action="version", version=f"lmport {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lmport.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def launcher_main(argv: list[str] | None = None) -> int:
    """``text-generation-launcher``: TGI's command line, which is ``lmport launch``."""
    return main(["launch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
