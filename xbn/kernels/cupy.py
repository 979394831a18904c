"""Hand-written CUDA kernels for the four batch-norm ops, registered for the ``"cupy"`` backend.

The CUDA C sources (``bn_stats.cu``, ``bn_backward_reduce.cu``, ``bn_elementwise.cu`` and their
header ``xbn_common.cuh``) ship as package data and are compiled with NVRTC through
``cupy.RawModule``, once per (source, dtype, device) per process: a dtype is a ``-DXBN_DTYPE_*``
define, and every vector width of every kernel comes from the same compilation.

What the kernels take, and what goes to the generic :mod:`xbn.functional` path instead:

* Layouts: C-contiguous arrays, seen as (outer, C, inner) around the channel axis. inner > 1 is
  the channel-major kernel family (NCHW, (N, C, L), NCDHW, and a channel axis in the middle of a
  contiguous array as well); inner == 1 is the channels-last family (NHWC, (N, C) 2-D). A
  non-contiguous input (strided views, transposes, Fortran order), an empty one, or one of
  2**31 - 2**24 elements or more (the kernels index with 32-bit ints) goes to the generic path.
* dtypes: float32, float16 and bfloat16 inputs with float32 statistics and coefficients;
  float64 with float64 accumulation. Every per-channel vector (mean, scale, shift, k_*) must
  have that accumulator dtype (``xbn.functional.compute_dtype`` of the input); other mixes, e.g.
  float64 running statistics used with float32 input in eval mode, go to the generic path.
  CuPy has no bfloat16 dtype of its own: the bf16 kernels run where CuPy holds an array of dtype
  name "bfloat16" (ml_dtypes), which array-api-compat's CuPy namespace does not expose today.
* Anything that is not a ``cupy.ndarray`` (or sits on another device than ``x``) falls back.

Launch shapes (:mod:`xbn.kernels._launch` plans them, in plain Python): the channel-major
family runs grid (C, parts) with 32-256 threads per block, each block walking a contiguous
slice of one channel's N*S values; ``parts`` splits a channel only as far as one full wave of
the GPU needs (small C, large N*S). The channels-last family runs blocks of (TX, TY) threads,
TX across channels (each thread owning 1 or W channels), TY across rows, and splits rows over
``parts`` blocks. Loads are 16 bytes wide (float4, double2, 8 halves) when every pointer is
16-byte aligned and S (or C, channels-last) is a multiple of the width, else 8 bytes wide
(float2, 4 halves; 14x14 float16 planes) under the same conditions, else scalar.

Determinism: no floating-point atomics. A reduction split over ``parts`` blocks writes one
partial per block to a workspace slot of its own; the last block to finish (threadfence, then
an atomic ticket on a per-channel counter) merges the slots in slot order, with Chan's formula
for (count, mean, M2) in the statistics and plain sums in the backward, then resets its counter
to zero. The same inputs give bitwise the same outputs on every run. The zeroed counters live in
one small buffer per (device, stream), reused by every launch on that stream; the partials come
from CuPy's memory pool per call.

The four registered functions have the signatures of their :mod:`xbn.functional` counterparts.
The ``launch_*`` functions underneath take an optional ``out=`` (the tests pass NaN-filled
outputs to catch unwritten elements) and return None when the kernels do not take the input.

Examples
--------
>>> from xbn.kernels import cupy as kc          # importable without CuPy or a GPU
>>> kc.route((32, 64, 56, 56), "float32", axis=1)
'ncl'
>>> kc.route((32, 56, 56, 64), "float16", axis=3)
'nlc'
>>> kc.route((32, 64, 56, 56), "int8", axis=1)
'generic: dtype int8 has no kernel'
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from .. import functional
from ..backends import register_kernel
from . import _launch, _source

__all__ = [
    "batch_stats",
    "scale_shift",
    "backward_reduce",
    "backward_apply",
    "launch_batch_stats",
    "launch_scale_shift",
    "launch_backward_reduce",
    "launch_backward_apply",
    "route",
]

Array = Any


def _cupy() -> ModuleType:
    # Imported on first use: CI imports this module (doctests) on machines without CuPy.
    import cupy

    return cupy


def route(shape: tuple[int, ...], dtype: str, *, axis: int, c_contiguous: bool = True) -> str:
    """Which kernel family takes an input of this shape and dtype: "ncl", "nlc", or
    "generic: <reason>" (plain Python, for tables and debugging)."""
    if _launch.dtype_key(dtype) is None:
        return f"generic: dtype {dtype} has no kernel"
    layout = _launch.plan_layout(shape, axis, c_contiguous=c_contiguous)
    if isinstance(layout, _launch.Fallback):
        return f"generic: {layout.reason}"
    return layout.kind


# -- compilation and device properties ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module(source: str, key: str, device_id: int) -> Any:
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=_source.kernel_source(source), options=_source.compile_options(key)
        )


@functools.lru_cache(maxsize=None)
def _function(source: str, key: str, name: str, device_id: int) -> Any:
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return _module(source, key, device_id).get_function(name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def _threads_per_sm(source: str, key: str, name: str, device_id: int) -> int:
    """Resident threads per SM of this kernel at MAX_THREADS per block (its occupancy)."""
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        limit = int(cupy.cuda.Device(device_id).attributes["MaxThreadsPerMultiProcessor"])
        try:
            fn = _function(source, key, name, device_id)
            blocks = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                fn.kernel.ptr, _launch.MAX_THREADS, 0
            )
        except Exception:  # older CuPy without the binding: assume half occupancy
            return limit // 2
    return max(_launch.MAX_THREADS, min(limit, int(blocks) * _launch.MAX_THREADS))


# (device id, stream pointer) -> zeroed uint32 counters; every finished reduction leaves its
# counters at zero again, so launches on one stream (which run in order) can share them.
_COUNTERS: dict[tuple[int, int], Any] = {}


def _counters(n: int, device_id: int) -> Any:
    cupy = _cupy()
    key = (device_id, cupy.cuda.get_current_stream().ptr)
    buf = _COUNTERS.get(key)
    if buf is None or buf.size < n:
        size = max(n, 1024, 0 if buf is None else 2 * buf.size)
        buf = cupy.zeros(size, dtype=cupy.uint32)
        _COUNTERS[key] = buf
    return buf


# -- input checks -------------------------------------------------------------------------------


def _input(x: Array, axis: int) -> tuple[_launch.Layout, str] | None:
    """(layout, dtype key) if the kernels take ``x`` with channel axis ``axis``."""
    cupy = _cupy()
    if not isinstance(x, cupy.ndarray):
        return None
    key = _launch.dtype_key(x.dtype.name)
    if key is None:
        return None
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=x.flags.c_contiguous)
    if isinstance(layout, _launch.Fallback):
        return None
    return layout, key


def _same_array_kind(a: Array, x: Array) -> bool:
    """``a`` is a C-contiguous array like ``x``: same type, shape, dtype and device."""
    return (
        type(a) is type(x)
        and a.shape == x.shape
        and a.dtype == x.dtype
        and a.flags.c_contiguous
        and a.device.id == x.device.id
    )


def _channel_vector(v: Array, x: Array, c: int, acc: str) -> Array | None:
    """``v`` as a contiguous (C,) vector of dtype ``acc`` on x's device, or None."""
    if (
        type(v) is not type(x)
        or v.ndim != 1
        or v.shape[0] != c
        or v.dtype.name != acc
        or v.device.id != x.device.id
    ):
        return None
    return v if v.flags.c_contiguous else _cupy().ascontiguousarray(v)


def _output(out: Array | None, x: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    cupy = _cupy()
    if out is None:
        return cupy.empty(shape, dtype=dtype)
    if (
        type(out) is not type(x)
        or tuple(out.shape) != tuple(shape)
        or out.dtype != cupy.dtype(dtype)
        or not out.flags.c_contiguous
        or out.device.id != x.device.id
    ):
        raise ValueError(
            f"out must be a C-contiguous {cupy.dtype(dtype)} array of shape {shape} on device "
            f"{x.device.id}, got {type(out).__name__} {getattr(out, 'shape', None)} "
            f"{getattr(out, 'dtype', None)}"
        )
    return out


def _plan(op: str, layout: _launch.Layout, key: str, vec: int, device_id: int) -> _launch.LaunchPlan:
    name = f"xbn_{op}_{layout.kind}_v{vec}"
    source = _launch.SOURCE_OF[op]
    return _launch.plan(
        op,
        layout,
        vec,
        sm_count=_sm_count(device_id),
        threads_per_sm=_threads_per_sm(source, key, name, device_id),
    )


def _run(op: str, key: str, plan: _launch.LaunchPlan, values: dict[str, Any], device_id: int) -> None:
    args = _launch.arguments(op, plan, values)
    fn = _function(_launch.SOURCE_OF[op], key, plan.kernel, device_id)
    fn(plan.grid, plan.block, tuple(np.int32(a) if isinstance(a, int) else a for a in args))


# -- kernel entry points (None: not taken, use the generic path) --------------------------------


def launch_batch_stats(x: Array, *, axis: int, out: tuple[Array, Array] | None = None) -> tuple[Array, Array] | None:
    """Per-channel (mean, biased var) by the Welford kernel, or None if it does not take ``x``."""
    taken = _input(x, axis)
    if taken is None:
        return None
    layout, key = taken
    cupy = _cupy()
    acc = _launch.accumulator_dtype(x.dtype.name)
    c = layout.channels
    with x.device:
        dev = x.device.id
        mean = _output(None if out is None else out[0], x, (c,), acc)
        var = _output(None if out is None else out[1], x, (c,), acc)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr,))
        plan = _plan("stats", layout, key, vec, dev)
        if plan.parts > 1:
            ws = cupy.empty(2 * plan.workspace, dtype=acc)
            ws_n = cupy.empty(plan.workspace, dtype=cupy.int32)
            counters = _counters(plan.counters, dev)
            ws_mean, ws_m2 = ws[: plan.workspace], ws[plan.workspace:]
        else:  # no grid reduction: the kernel never touches the workspace pointers
            counters = _counters(1, dev)
            ws_mean, ws_m2, ws_n = mean, var, counters
        _run("stats", key, plan, {"x": x, "mean": mean, "var": var, "ws_a": ws_mean,
                                  "ws_b": ws_m2, "ws_n": ws_n, "counters": counters}, dev)
    return mean, var


def launch_backward_reduce(
    dy: Array, x: Array, mean: Array, *, axis: int, out: tuple[Array, Array] | None = None
) -> tuple[Array, Array] | None:
    """Per-channel (sum(dy), sum(dy * (x - mean))), or None if the kernel does not take them."""
    taken = _input(x, axis)
    if taken is None or not _same_array_kind(dy, x):
        return None
    layout, key = taken
    cupy = _cupy()
    acc = _launch.accumulator_dtype(x.dtype.name)
    c = layout.channels
    mean = _channel_vector(mean, x, c, acc)
    if mean is None:
        return None
    with x.device:
        dev = x.device.id
        sum_dy = _output(None if out is None else out[0], x, (c,), acc)
        sum_dy_xmu = _output(None if out is None else out[1], x, (c,), acc)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr, dy.data.ptr))
        plan = _plan("backward_reduce", layout, key, vec, dev)
        if plan.parts > 1:
            ws = cupy.empty(2 * plan.workspace, dtype=acc)
            counters = _counters(plan.counters, dev)
            ws_dy, ws_dy_xmu = ws[: plan.workspace], ws[plan.workspace:]
        else:
            counters = _counters(1, dev)
            ws_dy, ws_dy_xmu = sum_dy, sum_dy_xmu
        _run("backward_reduce", key, plan, {
            "dy": dy, "x": x, "mean": mean, "sum_dy": sum_dy, "sum_dy_xmu": sum_dy_xmu,
            "ws_a": ws_dy, "ws_b": ws_dy_xmu, "counters": counters}, dev)
    return sum_dy, sum_dy_xmu


def launch_scale_shift(
    x: Array, scale: Array, shift: Array | None, *, axis: int, out: Array | None = None
) -> Array | None:
    """y = x * scale + shift per channel in x's dtype, or None if the kernel does not take them."""
    taken = _input(x, axis)
    if taken is None:
        return None
    layout, key = taken
    acc = _launch.accumulator_dtype(x.dtype.name)
    c = layout.channels
    scale = _channel_vector(scale, x, c, acc)
    if scale is None:
        return None
    if shift is not None:
        shift = _channel_vector(shift, x, c, acc)
        if shift is None:
            return None
    with x.device:
        dev = x.device.id
        y = _output(out, x, x.shape, x.dtype)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr, y.data.ptr))
        plan = _plan("scale_shift", layout, key, vec, dev)
        # Without a shift the kernel never reads the shift pointer; scale stands in for it.
        _run("scale_shift", key, plan, {
            "x": x, "scale": scale, "shift": scale if shift is None else shift,
            "has_shift": 0 if shift is None else 1, "y": y}, dev)
    return y


def launch_backward_apply(
    dy: Array, x: Array, mean: Array, k_dy: Array, k_xmu: Array, k_const: Array,
    *, axis: int, out: Array | None = None,
) -> Array | None:
    """dx = dy * k_dy + (x - mean) * k_xmu + k_const in dy's dtype, or None if not taken."""
    taken = _input(x, axis)
    if taken is None or not _same_array_kind(dy, x):
        return None
    layout, key = taken
    acc = _launch.accumulator_dtype(x.dtype.name)
    c = layout.channels
    vectors = [_channel_vector(v, x, c, acc) for v in (mean, k_dy, k_xmu, k_const)]
    if any(v is None for v in vectors):
        return None
    with x.device:
        dev = x.device.id
        dx = _output(out, x, x.shape, x.dtype)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr, dy.data.ptr, dx.data.ptr))
        plan = _plan("backward_apply", layout, key, vec, dev)
        m, k_dy, k_xmu, k_const = vectors
        _run("backward_apply", key, plan, {
            "dy": dy, "x": x, "mean": m, "k_dy": k_dy, "k_xmu": k_xmu, "k_const": k_const,
            "dx": dx}, dev)
    return dx


# -- the registered fast paths: exactly the signatures of xbn.functional ------------------------


@register_kernel("cupy", "batch_stats")
def batch_stats(x: Array, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Array, Array]:
    """:func:`xbn.functional.batch_stats` by the Welford kernel where it applies."""
    result = launch_batch_stats(x, axis=axis)
    if result is None:  # layout or dtype the kernels do not take
        return functional.batch_stats(x, axis=axis, xp=xp)
    return result


@register_kernel("cupy", "scale_shift")
def scale_shift(
    x: Array, scale: Array, shift: Array | None, /, *, axis: int, xp: ModuleType | None = None
) -> Array:
    """:func:`xbn.functional.scale_shift` in one elementwise kernel where it applies."""
    result = launch_scale_shift(x, scale, shift, axis=axis)
    if result is None:
        return functional.scale_shift(x, scale, shift, axis=axis, xp=xp)
    return result


@register_kernel("cupy", "backward_reduce")
def backward_reduce(
    dy: Array, x: Array, mean: Array, /, *, axis: int, xp: ModuleType | None = None
) -> tuple[Array, Array]:
    """:func:`xbn.functional.backward_reduce` by the deterministic reduction kernel."""
    result = launch_backward_reduce(dy, x, mean, axis=axis)
    if result is None:
        return functional.backward_reduce(dy, x, mean, axis=axis, xp=xp)
    return result


@register_kernel("cupy", "backward_apply")
def backward_apply(
    dy: Array, x: Array, mean: Array, k_dy: Array, k_xmu: Array, k_const: Array, /,
    *, axis: int, xp: ModuleType | None = None,
) -> Array:
    """:func:`xbn.functional.backward_apply` in one elementwise kernel where it applies."""
    result = launch_backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis)
    if result is None:
        return functional.backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis, xp=xp)
    return result
