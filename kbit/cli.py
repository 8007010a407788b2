"""The ``kbit`` command line: ``kbit quantize``, ``kbit advise`` and ``kbit plan``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command name -> (module, one-line help); modules are imported only when used
COMMANDS = {
    "quantize": ("kbit.commands.quantize", "quantize a local or hub model to a packed artifact"),
    "advise": ("kbit.commands.advise", "best model size and precision for a memory budget"),
    "plan": ("kbit.commands.plan", "what a study will cost: jobs, disk, GPU hours"),
}


def _plain(doc: str | None) -> str | None:
    """A docstring as terminal text: reStructuredText's double backticks dropped."""
    return doc.replace("``", "") if doc else doc


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="kbit", description=_plain(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (modname, helptext) in COMMANDS.items():
        mod = importlib.import_module(modname)
        modules[name] = mod
        mod.add_arguments(sub.add_parser(name, help=helptext, description=_plain(mod.__doc__)))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
