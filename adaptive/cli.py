"""The ``adaptive`` command line. Subcommands live in :mod:`adaptive.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from adaptive import RESEARCH_USE_STATEMENT, __version__, commands
from adaptive.errors import AdaptiveError
from adaptive.log import configure_logging, get_logger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaptive",
        description=f"Online adaptive radiotherapy pipeline. {RESEARCH_USE_STATEMENT}.",
    )
    p.add_argument("--version", action="version", version=f"adaptive {__version__}")
    p.add_argument("--log-json", action="store_true", default=None,
                   help="log JSON lines (default: JSON unless stderr is a terminal)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        importlib.import_module(f"adaptive.commands.{mod.name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(json=args.log_json, level=args.log_level)
    try:
        return int(args.func(args) or 0)
    except AdaptiveError as e:
        get_logger("adaptive.cli").error("command_failed", command=args.command,
                                         error_type=type(e).__name__, error=str(e))
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
