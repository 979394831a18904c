"""The CUDA sources of the kernels, read from package data, and the options they compile with.

Shared by :mod:`xbn.kernels.cupy` (runtime compilation through ``cupy.RawModule``) and
``ci/check_kernels.py`` (the NVRTC compile check without a GPU), so both compile exactly the
same text with the same defines. Plain Python: importable without CuPy.

Examples
--------
>>> from xbn.kernels._source import kernel_source, compile_options, SOURCES
>>> SOURCES
('bn_stats.cu', 'bn_backward_reduce.cu', 'bn_elementwise.cu')
>>> '#include "xbn_common.cuh"' in kernel_source("bn_stats.cu")
False
>>> compile_options("f16")
('--std=c++17', '-DXBN_DTYPE_F16')
"""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["SOURCES", "HEADERS", "DTYPE_KEYS", "kernel_source", "compile_options", "kernel_names"]

#: Every .cu file, each compiled once per dtype key.
SOURCES = ("bn_stats.cu", "bn_backward_reduce.cu", "bn_elementwise.cu")
#: Headers the sources include with #include "name"; inlined by :func:`kernel_source`.
HEADERS = ("xbn_common.cuh",)
#: Compile keys (-DXBN_DTYPE_<KEY>), see :data:`xbn.kernels._launch.DTYPES`.
DTYPE_KEYS = ("f32", "f64", "f16", "bf16")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_ENTRY = re.compile(r'extern "C" __global__ void __launch_bounds__\([^)]*\)\s+(\w+_)##SUFFIX')


def _read(name: str) -> str:
    return resources.files("xbn.kernels").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def kernel_source(name: str) -> str:
    """The text of ``name`` with its local headers inlined (NVRTC then needs no include path).

    A header is inlined once, at its first include; it carries an include guard anyway.
    """
    seen: set[str] = set()

    def expand(text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            header = match.group(1)
            if header not in HEADERS:
                raise ValueError(f"{name}: unknown include {header!r}; expected one of {HEADERS}")
            if header in seen:
                return f"// {header} already inlined"
            seen.add(header)
            return f"// begin {header}\n{expand(_read(header))}\n// end {header}"

        return _INCLUDE.sub(replace, text)

    return expand(_read(name))


def compile_options(key: str) -> tuple[str, ...]:
    """NVRTC options selecting the dtype ``key``; CuPy adds -arch, -ftz=true and
    --device-as-default-execution-space itself (the compile check adds the same)."""
    if key not in DTYPE_KEYS:
        raise ValueError(f"unknown dtype key {key!r}; expected one of {DTYPE_KEYS}")
    return ("--std=c++17", f"-DXBN_DTYPE_{key.upper()}")


def kernel_names(name: str, key: str) -> tuple[str, ...]:
    """The extern "C" entry points ``name`` defines when compiled for dtype ``key``.

    >>> kernel_names("bn_stats.cu", "f16")[:4]
    ('xbn_stats_ncl_v1', 'xbn_stats_nlc_v1', 'xbn_stats_fused_ncl_v1', 'xbn_stats_fused_nlc_v1')
    >>> len(kernel_names("bn_stats.cu", "f16"))   # plain and fused, two layouts, widths 1, 4, 8
    12
    """
    from ._launch import WIDTHS

    text = _read(name).replace("\\\n", " ")
    bases = _ENTRY.findall(text)
    return tuple(f"{b}v{w}" for w in WIDTHS[key] for b in bases)
