"""The ``xbn`` command line: ``xbn demo | parity | bench | info``.

Each subcommand lives in its own module and is imported only when run (its options too: the
parser adds them for the subcommand on the command line alone), so ``xbn info`` works without
the demo's or the benchmarks' extras installed, and a broken extra breaks only its subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help); each module has add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "demo": ("xbn.demo", "train a small classifier with and without BatchNorm"),
    "parity": ("xbn.parity", "every backend against a float64 reference"),
    "bench": ("xbn.bench", "microbenchmarks with tables and plots"),
    "info": ("xbn.info", "versions, importable backends, usable devices"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="xbn", description="Batch Normalization for array programmers")
    sub = parser.add_subparsers(dest="command", required=True)
    # The top-level parser has no options of its own but -h, so the first word that is not an
    # option names the subcommand.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name != chosen:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", False):
        parser.error(f"'xbn {args.command}' is not available in this build")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
