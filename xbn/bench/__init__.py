"""``xbn bench``: microbenchmarks against PyTorch and the memory-bandwidth floor.

``--cpu`` runs :mod:`xbn.bench.cpu` (NumPy backend vs torch CPU), ``--gpu`` runs
:mod:`xbn.bench.gpu` (CuPy kernels vs torch CUDA and the generic CuPy path). The scripts under
``benchmarks/`` call the same modules.
"""

from __future__ import annotations

import argparse
import importlib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu", dest="target", action="store_const", const="cpu",
                       help="NumPy backend vs torch CPU (default)")
    which.add_argument("--gpu", dest="target", action="store_const", const="gpu",
                       help="CuPy kernels vs torch CUDA and the generic CuPy path")
    parser.set_defaults(target="cpu")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="options passed to the benchmark (see xbn bench --cpu -- --help)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"xbn.bench.{args.target}")
    rest = [a for a in args.bench_args if a != "--"]
    return int(module.main(rest) or 0)
