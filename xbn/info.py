"""``xbn info``: versions, which backends import here, which devices are usable, which fast paths."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform

from . import __version__, backends

_DISTRIBUTIONS = (
    "numpy",
    "array-api-compat",
    "array-api-strict",
    "torch",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "mpi4py",
    "scikit-learn",
    "matplotlib",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_lines() -> list[str]:
    try:
        import cupy
    except ImportError:
        return ["CUDA: CuPy not installed"]
    try:
        rt = cupy.cuda.runtime
        lines = [f"CUDA runtime {rt.runtimeGetVersion()}, driver {rt.driverGetVersion()}"]
        for i in range(rt.getDeviceCount()):
            props = rt.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            lines.append(
                f"GPU {i}: {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                f"compute capability {props['major']}.{props['minor']}"
            )
        return lines
    except Exception as e:  # CuPy installed, but no driver or no device
        return [f"CUDA: not usable ({type(e).__name__}: {e})"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    print(
        f"xbn {__version__} on Python {platform.python_version()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs)"
    )
    for dist in _DISTRIBUTIONS:
        v = _version(dist)
        if v is not None:
            print(f"  {dist} {v}")
    for line in _cuda_lines():
        print(line)
    generic = backends.generic_forced()
    print(f"backends{' (XBN_FORCE_GENERIC set: fast paths off)' if generic else ''}:")
    for name, status in backends.available_backends().items():
        if status == "ok":
            b = backends.resolve(name)
            fast = ", ".join(b.ops.fast) or "none (generic Array API path)"
            print(f"  {name:<17} ok   device {b.device!r}; fast paths: {fast}")
        else:
            print(f"  {name:<17} no   {status}")
    print(f"  'auto' resolves to: {backends.resolve('auto').name}")
    return 0
