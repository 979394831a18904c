"""Hand-written CUDA kernels for batch norm, registered for the ``"cupy"`` backend: the four
pass ops and the two whole-step ops of :mod:`xbn.backends`.

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
  bfloat16 arrays are ml_dtypes' (see below).
* Anything that is not a ``cupy.ndarray`` (or sits on another device than ``x``) falls back.

Launch shapes (:mod:`xbn.kernels._launch` plans them, in plain Python): the channel-major
family runs grid (C, parts) with 32-256 threads per block, each block walking a contiguous
slice of one channel's N*S values (the inference kernel holds several channels a block, one per
row of threads, where a channel needs fewer than 256 threads); ``parts`` splits a channel only
as far as one full wave of the GPU needs (small C, large N*S). The channels-last family runs
blocks of (TX, TY) threads, TX across channels (each thread owning 1 or W channels), TY across
rows, and splits rows over
``parts`` blocks, with TX narrowed for a reduction so that the last block merges at most four
partials per thread. Loads are 16 bytes wide (float4, double2, 8 halves) when every pointer is
16-byte aligned and S (or C, channels-last) is a multiple of the width, else 8 bytes wide
(float2, 4 halves; 14x14 float16 planes) under the same conditions, else scalar.

Determinism: no floating-point atomics. A reduction split over ``parts`` blocks writes one
partial per block to a workspace slot of its own; the last block to finish (threadfence, then
an atomic ticket on a counter per column of blocks) merges the slots in slot order, with Chan's
formula for (count, mean, M2) in the statistics (of the values shifted by their channel's first
value, so a constant channel has exactly variance 0) and plain sums in the backward. The same
inputs give bitwise the same outputs on every run. The ticket is ``atomicInc`` with the number
of blocks as its wrap, so the last block's own ticket puts the counter back to zero: no reset
step exists that an exception or a replayed graph could skip. The zeroed counters live in one
small buffer per thread, device and stream (threads that share a stream pointer, as every
thread's default stream does with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1, get their own); the
partials come from CuPy's memory pool per call. Under CUDA graph capture
(``Stream.is_capturing()``) reductions are planned unsplit: no workspace from the pool that the
graph would keep writing after the call gave it back, and no counter buffer whose zeroing would
only be captured. Such a launch rounds as another split does (within the accuracy bounds) and is
slower for few channels over many values.

bfloat16: CuPy 14 holds bfloat16 arrays through ml_dtypes (dtype name "bfloat16"), and the
registered ops take them on the bf16 kernels. The layers do not: array-api-compat's CuPy
namespace has no ``bfloat16``, so ``BatchNorm(..., dtype="bfloat16")`` is refused, and its
``isdtype`` (NumPy's) raises for ml_dtypes' dtype, so an input of it fails the layer's dtype
check. bfloat16 reaches the kernels through ``xbn.backends.resolve("cupy").ops`` or
:mod:`xbn.functional` with ``ops=``.

Whole steps: a training forward (``batch_norm_forward``) is two launches, ``stats_fused``
(the statistics kernel whose last block per channel goes on with the per-channel work: invstd,
the scale and shift of y = x * scale + shift with the var == 0 rule, the new running
statistics), then scale_shift; a backward (``batch_norm_backward``) is two launches too,
``backward_reduce_fused`` (the backward reduction whose last block computes dgamma, dbeta and
dx's coefficients), then backward_apply (or scale_shift of dy alone after an eval-mode
forward); an eval-mode forward (``batch_norm_inference``) is one launch, the inference
kernel, which computes each channel's scale and shift from the running statistics itself. The
generic composition in :mod:`xbn.functional` spends about thirty small CuPy
operations on that per-channel work, each a kernel launch with microseconds of CPU overhead;
the fused epilogues compute the same formulas in the same order, each operation correctly
rounded, so the two agree to the rounding of the statistics. Parameters and running statistics
(float32 or float64, the layer's dtype) may differ from the accumulator dtype; all that are
given must share one dtype, else the generic composition runs.

Names: ``launch_<family>`` launches the kernels ``xbn_<family>_<layout>_v<W>`` of one family of
:data:`xbn.kernels._launch.OPS` (``launch_batch_stats`` is family ``stats``). The registered
functions have the signatures of their :mod:`xbn.functional` counterparts and return
``NotImplemented`` for inputs the kernels do not take; the seam in :mod:`xbn.backends` then runs
the generic function. The ``launch_*`` functions underneath take an optional ``out=`` (the
tests pass NaN-filled outputs to catch unwritten elements) and return None instead.

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
import threading
from types import ModuleType
from typing import Any

import numpy as np

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
    "batch_norm_forward",
    "batch_norm_backward",
    "launch_stats_fused",
    "launch_backward_reduce_fused",
    "batch_norm_inference",
    "launch_inference",
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


@functools.cache
def _module(source: str, key: str, device_id: int) -> Any:
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=_source.kernel_source(source), options=_source.compile_options(key))


@functools.cache
def _function(source: str, key: str, name: str, device_id: int) -> Any:
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return _module(source, key, device_id).get_function(name)


@functools.cache
def _sm_count(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.cache
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


# Zeroed uint32 counters per thread, then per (device id, stream pointer). A split reduction's
# kernel leaves its counters at zero by itself (the ticket wraps, xbn_common.cuh), so launches
# that run in order can share them: those of one stream. Not those of two threads, though, even
# on one stream pointer: with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 every thread's default
# stream has the same pointer, and two threads' kernels would run at once on one buffer. Kept
# in the thread's own storage rather than keyed by its ident, which a new thread may reuse
# while the old one's kernels are still queued; a buffer is freed with its thread, as CuPy
# frees any array (and is replaced by a larger one, never shrunk).
_LOCAL = threading.local()


def _thread_counters() -> dict[tuple[int, int], Any]:
    """This thread's counter buffers, by (device id, stream pointer)."""
    mine = getattr(_LOCAL, "counters", None)
    if mine is None:
        mine = _LOCAL.counters = {}
    return mine


def _counters(n: int, device_id: int) -> Any:
    cupy = _cupy()
    mine = _thread_counters()
    key = (device_id, cupy.cuda.get_current_stream().ptr)
    buf = mine.get(key)
    if buf is None or buf.size < n:
        size = max(n, 1024, 0 if buf is None else 2 * buf.size)
        buf = cupy.zeros(size, dtype=cupy.uint32)
        mine[key] = buf
    return buf


def _capturing() -> bool:
    """Whether the current stream is being captured into a CUDA graph.

    A split reduction then must not run: its partials would come from the memory pool and go
    back to it when the call returns while the graph still writes them on every replay, and a
    new counter buffer's zeroing would be captured rather than run. A query that fails counts
    as capturing (CUDA refuses it on the legacy stream while another stream captures).
    """
    try:
        return bool(_cupy().cuda.get_current_stream().is_capturing())
    except Exception:
        return True


# -- input checks -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _taken(
    shape: tuple[int, ...], dtype: Any, axis: int, c_contiguous: bool
) -> tuple[_launch.Layout, str, Any] | None:
    # Cached: dtype names and the layout cost microseconds of Python on every launch otherwise.
    key = _launch.dtype_key(dtype.name)
    if key is None:
        return None
    layout = _launch.plan_layout(shape, axis, c_contiguous=c_contiguous)
    if isinstance(layout, _launch.Fallback):
        return None
    return layout, key, np.dtype(_launch.accumulator_dtype(dtype.name))


def _input(x: Array, axis: int) -> tuple[_launch.Layout, str, Any] | None:
    """(layout, dtype key, accumulator dtype) if the kernels take ``x`` with channel axis ``axis``."""
    if not isinstance(x, _cupy().ndarray):
        return None
    return _taken(x.shape, x.dtype, axis, x.flags.c_contiguous)


def _same_array_kind(a: Array, x: Array) -> bool:
    """``a`` is a C-contiguous array like ``x``: same type, shape, dtype and device."""
    return (
        type(a) is type(x)
        and a.shape == x.shape
        and a.dtype == x.dtype
        and a.flags.c_contiguous
        and a.device.id == x.device.id
    )


def _channel_vector(v: Array, x: Array, c: int, acc: Any) -> Array | None:
    """``v`` as a contiguous (C,) vector of dtype ``acc`` (a NumPy dtype) on x's device, or None."""
    if (
        type(v) is not type(x)
        or v.ndim != 1
        or v.shape[0] != c
        or v.dtype != acc
        or v.device.id != x.device.id
    ):
        return None
    return v if v.flags.c_contiguous else _cupy().ascontiguousarray(v)


#: dtypes the fused kernels read parameters and running statistics in (FLAG_PARAMS_F64).
_F32, _F64 = np.dtype("float32"), np.dtype("float64")


def _param_vectors(x: Array, c: int, *vectors: Array | None) -> tuple[list[Array | None], Any] | None:
    """The given (not None) vectors as contiguous (C,) arrays on x's device, and their common
    dtype (float32 or float64); None if any is something else or they differ."""
    given = [v for v in vectors if v is not None]
    dtype = getattr(given[0], "dtype", None) if given else _F32
    if dtype != _F32 and dtype != _F64:
        return None
    out: list[Array | None] = []
    for v in vectors:
        if v is not None:
            v = _channel_vector(v, x, c, dtype)
            if v is None:
                return None
        out.append(v)
    return out, dtype


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
    name = _launch.kernel_name(op, layout.kind, vec)
    source = _launch.SOURCE_OF[op]
    sm_count = _sm_count(device_id)
    threads_per_sm = _threads_per_sm(source, key, name, device_id)
    plan = _launch.plan(op, layout, vec, sm_count=sm_count, threads_per_sm=threads_per_sm)
    if plan.parts > 1 and _capturing():
        # Under graph capture nothing may outlive the call: one block per channel slice, no
        # workspace, no counters (slower for few channels; rounds as another split would).
        plan = _launch.plan(op, layout, vec, sm_count=sm_count, threads_per_sm=threads_per_sm, split=False)
    return plan


def _scalar(a: Any) -> Any:
    # Every int argument of the kernels is a C int, every float one a double; CuPy passes NumPy
    # scalars by value in their own dtype. (Exact types first: this runs for every argument.)
    t = type(a)
    if t is int:
        return np.int32(a)
    if t is float:
        return np.float64(a)
    if isinstance(a, (bool, np.integer)):
        return np.int32(a)
    if isinstance(a, np.floating):
        return np.float64(a)
    return a


def _run(op: str, key: str, plan: _launch.LaunchPlan, values: dict[str, Any], device_id: int) -> None:
    args = _launch.arguments(op, plan, values)
    fn = _function(_launch.SOURCE_OF[op], key, plan.kernel, device_id)
    array = _cupy().ndarray
    fn(plan.grid, plan.block, tuple(a if type(a) is array else _scalar(a) for a in args))


# -- one launch per family (None: the kernels do not take these inputs) -------------------------


def launch_batch_stats(
    x: Array, *, axis: int, out: tuple[Array, Array] | None = None
) -> tuple[Array, Array] | None:
    """Per-channel (mean, biased var) by the Welford kernel, or None if it does not take ``x``."""
    taken = _input(x, axis)
    if taken is None:
        return None
    layout, key, acc = taken
    c = layout.channels
    with x.device:
        dev = x.device.id
        mean = _output(None if out is None else out[0], x, (c,), acc)
        var = _output(None if out is None else out[1], x, (c,), acc)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr,))
        plan = _plan("stats", layout, key, vec, dev)
        _run(
            "stats",
            key,
            plan,
            {"x": x, "mean": mean, "var": var, **_workspace(plan, acc, (mean, var), dev, counts=True)},
            dev,
        )
    return mean, var


def launch_backward_reduce(
    dy: Array, x: Array, mean: Array, *, axis: int, out: tuple[Array, Array] | None = None
) -> tuple[Array, Array] | None:
    """Per-channel (sum(dy), sum(dy * (x - mean))), or None if the kernel does not take them."""
    taken = _input(x, axis)
    if taken is None or not _same_array_kind(dy, x):
        return None
    layout, key, acc = taken
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
        _run(
            "backward_reduce",
            key,
            plan,
            {
                "dy": dy,
                "x": x,
                "mean": mean,
                "sum_dy": sum_dy,
                "sum_dy_xmu": sum_dy_xmu,
                **_workspace(plan, acc, (sum_dy, sum_dy_xmu), dev, counts=False),
            },
            dev,
        )
    return sum_dy, sum_dy_xmu


def launch_scale_shift(
    x: Array, scale: Array, shift: Array | None, *, axis: int, out: Array | None = None
) -> Array | None:
    """y = x * scale + shift per channel in x's dtype, or None if the kernel does not take them."""
    taken = _input(x, axis)
    if taken is None:
        return None
    layout, key, acc = taken
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
        _run(
            "scale_shift",
            key,
            plan,
            {
                "x": x,
                "scale": scale,
                "shift": scale if shift is None else shift,
                "has_shift": 0 if shift is None else 1,
                "y": y,
            },
            dev,
        )
    return y


def launch_backward_apply(
    dy: Array,
    x: Array,
    mean: Array,
    k_dy: Array,
    k_xmu: Array,
    k_const: Array,
    *,
    axis: int,
    out: Array | None = None,
) -> Array | None:
    """dx = dy * k_dy + (x - mean) * k_xmu + k_const in dy's dtype, or None if not taken."""
    taken = _input(x, axis)
    if taken is None or not _same_array_kind(dy, x):
        return None
    layout, key, acc = taken
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
        _run(
            "backward_apply",
            key,
            plan,
            {"dy": dy, "x": x, "mean": m, "k_dy": k_dy, "k_xmu": k_xmu, "k_const": k_const, "dx": dx},
            dev,
        )
    return dx


def _workspace(
    plan: _launch.LaunchPlan, acc: Any, placeholders: tuple[Array, Array], dev: int, *, counts: bool
) -> dict[str, Any]:
    """A reduction's partials and counters; with one part, placeholders the kernel never touches
    (outputs of the launch: nothing is allocated, and no counter buffer is made, which under
    graph capture would be zeroed only in the graph)."""
    cupy = _cupy()
    if plan.parts > 1:
        ws = cupy.empty(2 * plan.workspace, dtype=acc)
        counters = _counters(plan.counters, dev)
        values = {"ws_a": ws[: plan.workspace], "ws_b": ws[plan.workspace :], "counters": counters}
        if counts:
            values["ws_n"] = cupy.empty(plan.workspace, dtype=cupy.int32)
        return values
    values = {"ws_a": placeholders[0], "ws_b": placeholders[1], "counters": placeholders[0]}
    if counts:
        values["ws_n"] = placeholders[1]
    return values


def launch_stats_fused(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    *,
    axis: int,
    eps: float,
    momentum: float,
    out: tuple[Array | None, ...] | None = None,
) -> tuple[Array, Array, Array, Array, Array | None, Array | None] | None:
    """The statistics kernel with the forward's per-channel work in its last block:
    (mean, invstd, scale, shift, new_running_mean, new_running_var), the last two None without
    running statistics; or None if the kernels do not take these inputs.

    scale and shift are y = x * scale + shift (xbn.functional.scale_shift_coefficients with the
    batch variance); the new running statistics are new arrays in the parameters' dtype (the
    given ones are only read). ``out``: six arrays (None for absent running statistics).
    """
    taken = _input(x, axis)
    if taken is None:
        return None
    layout, key, acc = taken
    c = layout.channels
    running = running_mean is not None and running_var is not None
    params = _param_vectors(x, c, weight, bias, *((running_mean, running_var) if running else ()))
    if params is None:
        return None
    vectors, pdt = params
    weight, bias = vectors[0], vectors[1]
    if running:
        running_mean, running_var = vectors[2], vectors[3]
        count = layout.count
        unbias = count / (count - 1)  # ZeroDivisionError for M == 1, as the generic path
        keep, m = 1.0 - momentum, momentum
    else:
        unbias = keep = m = 0.0
    outs = (None,) * 6 if out is None else tuple(out)
    with x.device:
        dev = x.device.id
        mean, inv, scale, shift = (_output(outs[i], x, (c,), acc) for i in range(4))
        new_mean = _output(outs[4], x, (c,), pdt) if running else None
        new_var = _output(outs[5], x, (c,), pdt) if running else None
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr,))
        plan = _plan("stats_fused", layout, key, vec, dev)
        flags = (
            (_launch.FLAG_HAS_WEIGHT if weight is not None else 0)
            | (_launch.FLAG_HAS_BIAS if bias is not None else 0)
            | (_launch.FLAG_HAS_RUNNING if running else 0)
            | (_launch.FLAG_PARAMS_F64 if pdt == _F64 else 0)
        )
        # Absent vectors: the flags keep the kernel off them; an output stands in for the pointer.
        _run(
            "stats_fused",
            key,
            plan,
            {
                "x": x,
                "mean": mean,
                "inv": inv,
                "scale": scale,
                "shift": shift,
                "weight": mean if weight is None else weight,
                "bias": mean if bias is None else bias,
                "running_mean": running_mean if running else mean,
                "running_var": running_var if running else mean,
                "new_running_mean": new_mean if running else mean,
                "new_running_var": new_var if running else mean,
                **_workspace(plan, acc, (mean, inv), dev, counts=True),
                "eps": float(eps),
                "keep": float(keep),
                "momentum": float(m),
                "unbias": float(unbias),
                "flags": flags,
            },
            dev,
        )
    return mean, inv, scale, shift, new_mean, new_var


def launch_inference(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    *,
    axis: int,
    eps: float,
    out: Array | None = None,
) -> Array | None:
    """An eval-mode forward in one launch: y = x * scale + shift with each channel's scale and
    shift computed in the kernel from the running statistics, weight and bias
    (xbn.functional.batch_norm_inference); or None if the kernels do not take these inputs.

    The parameters and running statistics must share one dtype, float32 or float64, and the
    generic path must compute in the kernels' accumulator dtype: float64 statistics with
    float32 or 16-bit input (which the generic path computes in float64) are declined.
    """
    taken = _input(x, axis)
    if taken is None or running_mean is None or running_var is None:
        return None
    layout, key, acc = taken
    c = layout.channels
    params = _param_vectors(x, c, weight, bias, running_mean, running_var)
    if params is None:
        return None
    (weight, bias, running_mean, running_var), pdt = params
    if pdt == _F64 and acc != _F64:
        return None
    with x.device:
        dev = x.device.id
        y = _output(out, x, x.shape, x.dtype)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr, y.data.ptr))
        plan = _plan("inference", layout, key, vec, dev)
        flags = (
            (_launch.FLAG_HAS_WEIGHT if weight is not None else 0)
            | (_launch.FLAG_HAS_BIAS if bias is not None else 0)
            | (_launch.FLAG_PARAMS_F64 if pdt == _F64 else 0)
        )
        # Absent vectors: the flags keep the kernel off them; the running mean stands in.
        _run(
            "inference",
            key,
            plan,
            {
                "x": x,
                "weight": running_mean if weight is None else weight,
                "bias": running_mean if bias is None else bias,
                "running_mean": running_mean,
                "running_var": running_var,
                "y": y,
                "eps": float(eps),
                "flags": flags,
            },
            dev,
        )
    return y


def launch_backward_reduce_fused(
    dy: Array,
    x: Array,
    mean: Array,
    inv: Array,
    weight: Array | None,
    *,
    axis: int,
    out: tuple[Array, ...] | None = None,
) -> tuple[Array, Array, Array, Array, Array] | None:
    """The backward reduction with the backward's per-channel work in its last block:
    (dgamma, dbeta, k_dy, k_xmu, k_const) with dgamma = sum(dy * (x - mean)) * inv,
    dbeta = sum(dy) and dx = dy * k_dy + (x - mean) * k_xmu + k_const
    (xbn.functional.backward_coefficients); or None if the kernels do not take these inputs.
    ``out``: five arrays.
    """
    taken = _input(x, axis)
    if taken is None or not _same_array_kind(dy, x):
        return None
    layout, key, acc = taken
    c = layout.channels
    mean, inv = _channel_vector(mean, x, c, acc), _channel_vector(inv, x, c, acc)
    params = _param_vectors(x, c, weight)
    if mean is None or inv is None or params is None:
        return None
    (weight,), pdt = params
    outs = (None,) * 5 if out is None else tuple(out)
    with x.device:
        dev = x.device.id
        dgamma, dbeta, k_dy, k_xmu, k_const = (_output(o, x, (c,), acc) for o in outs)
        vec = _launch.vector_width(layout, x.itemsize, (x.data.ptr, dy.data.ptr))
        plan = _plan("backward_reduce_fused", layout, key, vec, dev)
        flags = (_launch.FLAG_HAS_WEIGHT if weight is not None else 0) | (
            _launch.FLAG_PARAMS_F64 if pdt == _F64 else 0
        )
        _run(
            "backward_reduce_fused",
            key,
            plan,
            {
                "dy": dy,
                "x": x,
                "mean": mean,
                "inv": inv,
                "weight": inv if weight is None else weight,
                "dgamma": dgamma,
                "dbeta": dbeta,
                "k_dy": k_dy,
                "k_xmu": k_xmu,
                "k_const": k_const,
                **_workspace(plan, acc, (dgamma, dbeta), dev, counts=False),
                "flags": flags,
            },
            dev,
        )
    return dgamma, dbeta, k_dy, k_xmu, k_const


# -- the registered fast paths: the signatures of xbn.functional, NotImplemented where the ------
# -- kernels do not take the input (the seam in xbn.backends then runs the generic function) ----


@register_kernel("cupy", "batch_stats")
def batch_stats(x: Array, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Array, Array]:
    """:func:`xbn.functional.batch_stats` by the Welford kernel."""
    result = launch_batch_stats(x, axis=axis)
    return NotImplemented if result is None else result


@register_kernel("cupy", "scale_shift")
def scale_shift(
    x: Array, scale: Array, shift: Array | None, /, *, axis: int, xp: ModuleType | None = None
) -> Array:
    """:func:`xbn.functional.scale_shift` in one elementwise kernel."""
    result = launch_scale_shift(x, scale, shift, axis=axis)
    return NotImplemented if result is None else result


@register_kernel("cupy", "backward_reduce")
def backward_reduce(
    dy: Array, x: Array, mean: Array, /, *, axis: int, xp: ModuleType | None = None
) -> tuple[Array, Array]:
    """:func:`xbn.functional.backward_reduce` by the deterministic reduction kernel."""
    result = launch_backward_reduce(dy, x, mean, axis=axis)
    return NotImplemented if result is None else result


@register_kernel("cupy", "backward_apply")
def backward_apply(
    dy: Array,
    x: Array,
    mean: Array,
    k_dy: Array,
    k_xmu: Array,
    k_const: Array,
    /,
    *,
    axis: int,
    xp: ModuleType | None = None,
) -> Array:
    """:func:`xbn.functional.backward_apply` in one elementwise kernel."""
    result = launch_backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis)
    return NotImplemented if result is None else result


@register_kernel("cupy", "batch_norm_forward")
def batch_norm_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    momentum: float = 0.1,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """:func:`xbn.functional.batch_norm_forward` in two launches: stats_fused, then
    scale_shift. (``ops`` is the generic composition's; the seam uses it where this declines.)"""
    fused = launch_stats_fused(
        x, weight, bias, running_mean, running_var, axis=axis, eps=eps, momentum=momentum
    )
    if fused is None:
        return NotImplemented
    mean, inv, scale, shift, new_mean, new_var = fused
    # scale and shift have the accumulator dtype on x's device: the kernel takes what the
    # statistics kernel took.
    y = launch_scale_shift(x, scale, shift, axis=axis)
    return y, mean, inv, new_mean, new_var


@register_kernel("cupy", "batch_norm_backward")
def batch_norm_backward(
    dy: Array,
    x: Array,
    mean: Array,
    inv: Array,
    weight: Array | None,
    /,
    *,
    axis: int,
    batch_stats_used: bool = True,
    need_param_grads: bool = True,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> tuple[Array, Array | None, Array | None]:
    """:func:`xbn.functional.batch_norm_backward` in two launches: backward_reduce_fused, then
    backward_apply (or, after an eval-mode forward, scale_shift of dy by k_dy)."""
    # Eval mode without parameter gradients needs no reduction: dx = dy * (weight * inv) is the
    # generic path's one small product and one scale_shift launch already.
    if not (batch_stats_used or need_param_grads):
        return NotImplemented
    fused = launch_backward_reduce_fused(dy, x, mean, inv, weight, axis=axis)
    if fused is None:
        return NotImplemented
    dgamma, dbeta, k_dy, k_xmu, k_const = fused
    if batch_stats_used:
        dx = launch_backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis)
    else:  # mean and inv were constants: dx = dy * k_dy, without reading x again
        dx = launch_scale_shift(dy, k_dy, None, axis=axis)
    return dx, dgamma, dbeta


@register_kernel("cupy", "batch_norm_inference")
def batch_norm_inference(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> Array:
    """:func:`xbn.functional.batch_norm_inference` in one launch, the per-channel coefficients
    computed inside it (the generic composition spends about ten small operations on them)."""
    y = launch_inference(x, weight, bias, running_mean, running_var, axis=axis, eps=eps)
    return NotImplemented if y is None else y
