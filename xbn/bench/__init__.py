"""``xbn bench``: microbenchmarks against PyTorch and the memory-bandwidth floor.

``--cpu`` runs :mod:`xbn.bench.cpu` (NumPy backend vs torch CPU), ``--gpu`` runs
:mod:`xbn.bench.gpu` (CuPy kernels vs torch CUDA and the generic CuPy path). The scripts under
``benchmarks/`` call the same modules. The CPU benchmark's shapes are :data:`REFERENCE_SHAPES`
below; the GPU benchmark's configurations, sized for DRAM rather than a GPU's L2, are
``xbn.bench.gpu.REFERENCE`` (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import importlib

#: The CPU benchmark's shapes, float32: (shape, channel axis, label) (docs/performance.md).
REFERENCE_SHAPES: list[tuple[tuple[int, ...], int, str]] = [
    ((32, 64, 56, 56), 1, "NCHW"),
    ((128, 256, 14, 14), 1, "NCHW"),
    ((8, 32, 224, 224), 1, "NCHW"),
    ((4096, 1024), 1, "NC"),
    ((32, 56, 56, 64), -1, "NHWC"),
    ((64, 16, 8, 8), 1, "NCHW small"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--cpu", dest="target", action="store_const", const="cpu", help="NumPy backend vs torch CPU (default)"
    )
    which.add_argument(
        "--gpu",
        dest="target",
        action="store_const",
        const="gpu",
        help="CuPy kernels vs torch CUDA and the generic CuPy path",
    )
    parser.set_defaults(target="cpu")
    parser.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="options passed to the benchmark (see xbn bench --cpu -- --help)",
    )


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"xbn.bench.{args.target}")
    rest = [a for a in args.bench_args if a != "--"]
    return int(module.main(rest) or 0)
