"""NumPy fast paths for the four batch-norm ops, registered for the ``"numpy"`` backend.

Batch norm is memory-bound, and a NumPy expression like ``mean((x - m) ** 2, axis=axes)``
streams every temporary through DRAM. These paths instead walk the input in fixed chunks that
stay in a core's L2 cache, so each chunk comes from memory once however many NumPy passes run
over it; per-channel sums go through BLAS matrix-vector products (several times faster than
``sum(axis=...)``, which is a scalar pairwise loop); and the chunks are shared between a small
thread pool, since ufuncs and BLAS release the GIL.

Numerics match :mod:`xbn.functional`: statistics in float64 for float64 input and in float32
otherwise, the variance from centered squares (each chunk row is centered on its own mean,
then the rows are merged with Chan's parallel formula in float64), and ``(x - mean)`` kept in
the backward. Results are bitwise reproducible: chunk boundaries depend only on the shape, each
chunk's partial result goes to its own slot, and slots are merged in index order, so neither
thread timing nor the thread count changes a bit.

Layouts: any array whose axes can be permuted into a C-contiguous one (NCHW, channels-last,
torch's channels_last strides, a channel axis in the middle, Fortran order). Anything else
(negative or gapped strides, object or integer dtypes, mixed layouts of ``x`` and ``dy``) goes
to the generic function.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable

import numpy as np

from .. import functional as F
from ..backends import register_kernel

__all__ = ["get_num_threads", "set_num_threads"]

# A chunk of about this many bytes (in the compute dtype), plus a scratch buffer or two of
# the same size, stays in a 1-2 MiB L2 while the several NumPy passes over it run.
_CHUNK_BYTES = 256 * 1024
# Below this many bytes of input the pool's hand-off (~20 us a task) costs more than it saves.
_PARALLEL_MIN_BYTES = 1 << 20
# Rows of at least this many contiguous values of one channel are walked row by row (a per-row
# scalar broadcast, BLAS row sums); shorter ones make NumPy's per-row loop overhead dominate,
# so those arrays are walked as (batch, channel*spatial) columns with per-column coefficients.
_ROW_MIN = 2048
# Longest row handed to one BLAS call in the row layout; longer spatial extents are split into
# equal sub-rows so that a chunk can still be small.
_ROW_MAX = _CHUNK_BYTES // 4
# Column layouts narrower than this fold consecutive rows together (channels-last with C=64 is
# 64 values a row, and NumPy's per-row overhead would dominate again).
_COL_MIN = 2048
_COL_MAX = 16384
# A row-broadcast operand makes NumPy's iterator copy rows into its buffer whenever two rows
# fit in it (8192 values by default), which runs at a third of the speed of the plain loop.
# A buffer shorter than a row disables that; the size only matters for broadcasting and
# casting, never for the order of a reduction here (all reductions are BLAS or float64 sums).
_BUFSIZE = 1024
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_SCOPED_BUFSIZE = np.lib.NumpyVersion(np.__version__) >= "2.0.0"  # context-local since 2.0


def _default_threads() -> int:
    env = os.environ.get("XBN_NUM_THREADS", "").strip()
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


_num_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def get_num_threads() -> int:
    """Threads the NumPy kernels use (``XBN_NUM_THREADS``, default: the CPUs this process may use)."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads from now on (1 runs everything on the calling thread)."""
    global _num_threads, _pool
    if int(n) < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    with _pool_lock:
        _num_threads = int(n)
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:  # type: ignore[attr-defined]
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xbn-numpy")
        return _pool


def _run_tasks(n_tasks: int, nbytes: int, scratch: Callable[[], Any], task: Callable[[int, Any], None]) -> None:
    """Run ``task(i, s)`` for i in range(n_tasks), each thread with its own scratch ``s``.

    Tasks are handed out dynamically (a core that another process is using should not hold the
    others up), which keeps results reproducible because a task's result depends only on ``i``.
    """
    threads = min(_num_threads, n_tasks) if nbytes >= _PARALLEL_MIN_BYTES else 1
    counter = itertools.count()

    def worker() -> None:
        with np.errstate():  # scopes the bufsize below to this call
            if _SCOPED_BUFSIZE:
                np.setbufsize(_BUFSIZE)
            s = scratch()
            while True:
                i = next(counter)  # atomic under the GIL
                if i >= n_tasks:
                    return
                task(i, s)

    if threads <= 1:
        worker()
        return
    futures = [_get_pool(threads - 1).submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        for f in futures:
            f.result()


# -- geometry -------------------------------------------------------------------------------


def _divisor(n: int, lo: int, hi: int) -> int | None:
    """The smallest divisor d of n with lo <= d <= hi, if any."""
    return next((d for d in range(max(1, lo), min(n, hi) + 1) if n % d == 0), None)


class _Geom:
    """How an array is walked: a 2-D matrix view of its memory, and the chunks over it.

    ``rows`` layout, for long contiguous runs per channel (NCHW with large images): the matrix
    is (outer*C*k, L), each row L values of one channel (k equal sub-rows per (n, c) pair);
    a chunk is a range of whole rows.
    ``cols`` layout, for everything else (channels-last, (N, C), small images): the matrix is
    (outer/t, t*C*inner), t consecutive outer rows folded into one matrix row; column j
    belongs to channel (j mod C*inner) // inner; a chunk is a block of rows times columns.

    Per-chunk partial results land in arrays of ``part_shape``; summing over ``part_axes``
    leaves one value per channel.
    """

    __slots__ = ("order", "shape", "outer", "C", "inner", "rows", "k", "t", "L",
                 "nrows", "ncols", "rpc", "cpc", "n_rb", "n_cb", "n_tasks", "part_shape", "part_axes")

    def __init__(self, shape: tuple[int, ...], axis: int, order: tuple[int, ...], itemsize: int):
        self.order = order
        self.shape = shape  # of the C-contiguous (permuted) view
        self.outer = math.prod(shape[:axis])
        self.C = shape[axis]
        self.inner = math.prod(shape[axis + 1:])
        chunk = max(1, _CHUNK_BYTES // itemsize)
        self.rows = self.inner >= _ROW_MIN
        if self.rows:
            k = 1
            if self.inner > _ROW_MAX:
                # a prime extent stays whole: one long row per BLAS call is still correct
                k = _divisor(self.inner, -(-self.inner // _ROW_MAX), self.inner // _ROW_MIN) or 1
            self.k, self.t, self.L = k, 1, self.inner // k
            self.nrows, self.ncols = self.outer * self.C * k, self.L
            self.rpc, self.cpc = max(1, chunk // self.L), self.L
            self.part_shape, self.part_axes = (self.outer, self.C, k), (0, 2)
        else:
            width = self.C * self.inner
            t = 1
            if width < _COL_MIN:
                t = _divisor(self.outer, -(-_COL_MIN // width), _COL_MAX // width) or 1
            self.k, self.t, self.L = 1, t, self.inner
            self.nrows, self.ncols = self.outer // t, t * width
            # at least 16 rows a chunk, so that the per-chunk partials stay small next to x
            self.cpc = min(self.ncols, max(1, chunk // 16))
            # at most 1024 rows, so that float32 column sums down a chunk stay short
            self.rpc = min(1024, max(1, chunk // self.cpc))
        self.n_rb = -(-self.nrows // self.rpc)
        self.n_cb = -(-self.ncols // self.cpc)
        self.n_tasks = self.n_rb * self.n_cb
        if not self.rows:
            self.part_shape, self.part_axes = (self.n_rb, self.t, self.C, self.inner), (0, 1, 3)

    def block(self, i: int) -> tuple[slice, slice]:
        rb, cb = divmod(i, self.n_cb)
        return (slice(rb * self.rpc, min(self.nrows, (rb + 1) * self.rpc)),
                slice(cb * self.cpc, min(self.ncols, (cb + 1) * self.cpc)))

    def matrix(self, a: np.ndarray) -> np.ndarray:
        """``a`` (laid out like the analysed array) as the 2-D matrix, without a copy."""
        return (a.transpose(self.order) if self.order else a).reshape(self.nrows, self.ncols)

    def coef(self, v: Any, dt: np.dtype) -> np.ndarray | None:
        """A per-channel vector laid out to broadcast against the matrix (None stays None)."""
        if v is None:
            return None
        v = np.asarray(v, dtype=dt)
        if self.rows:
            return np.broadcast_to(v[None, :, None], self.part_shape).reshape(-1, 1)
        per_col = v if self.inner == 1 else np.repeat(v, self.inner)
        return (per_col if self.t == 1 else np.tile(per_col, self.t))[None, :]

    def coef_block(self, c: np.ndarray, rs: slice, cs: slice) -> np.ndarray:
        return c[rs] if self.rows else c[:, cs]

    def empty_like(self, dtype: Any) -> np.ndarray:
        """A new array with the analysed array's shape and memory layout, in ``dtype``."""
        out = np.empty(self.shape, dtype=dtype)
        return out.transpose(np.argsort(self.order)) if self.order else out


def _contiguous_order(a: np.ndarray) -> tuple[int, ...] | None:
    """The axis permutation that makes ``a`` C-contiguous: () if it already is, None if none does."""
    if a.flags.c_contiguous:
        return ()
    order = tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return order if a.transpose(order).flags.c_contiguous else None


def _geometry(x: Any, axis: int, *others: Any) -> _Geom | None:
    """The walk over ``x`` (and ``others``, which must share its layout), or None to go generic."""
    if type(x) is not np.ndarray or x.dtype not in _FLOATS or x.size == 0:
        return None
    if not -x.ndim <= axis < x.ndim:
        return None  # the generic function raises the error
    axis %= x.ndim
    order = _contiguous_order(x)
    if order is None:
        return None
    for o in others:
        if type(o) is not np.ndarray or o.shape != x.shape or o.dtype not in _FLOATS:
            return None
        if not (o.transpose(order) if order else o).flags.c_contiguous:
            return None
    shape = tuple(x.shape[i] for i in order) if order else tuple(x.shape)
    ax = order.index(axis) if order else axis
    return _Geom(shape, ax, order, 8 if x.dtype == np.float64 else 4)


def _cdtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _load(block: np.ndarray, dt: np.dtype, buf: np.ndarray) -> np.ndarray:
    """``block`` in the compute dtype: itself, or converted into the scratch ``buf``."""
    if block.dtype == dt:
        return block
    out = _view(buf, block.shape)
    np.copyto(out, block, casting="unsafe")
    return out


class _Scratch:
    """A thread's chunk-sized buffers, each allocated on first use (float32 input with float32
    coefficients needs at most one, so the peak memory stays close to the outputs alone)."""

    __slots__ = ("size", "dtype", "bufs")

    def __init__(self, size: int, dtype: np.dtype):
        self.size, self.dtype, self.bufs = size, dtype, {}

    def __getitem__(self, i: int) -> np.ndarray:
        buf = self.bufs.get(i)
        if buf is None:
            buf = self.bufs[i] = np.empty(self.size, dtype=self.dtype)
        return buf


def _scratch(g: _Geom, dt: np.dtype) -> Callable[[], _Scratch]:
    return lambda: _Scratch(g.rpc * g.cpc, dt)


def _view(buf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return buf[: shape[0] * shape[1]].reshape(shape)


def _float_dtype(a: Any) -> np.dtype | None:
    """The dtype of a per-channel vector if the fast paths compute in it (float32/64), else None."""
    dt = getattr(a, "dtype", None)
    return np.dtype(dt) if dt in _FLOATS[1:] else None


# -- batch_stats ----------------------------------------------------------------------------


@register_kernel("numpy", "batch_stats")
def batch_stats(x: Any, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Any, Any]:
    g = _geometry(x, axis)
    if g is None:
        return F.batch_stats(x, axis=axis, xp=xp)
    dt = _cdtype(x)
    mat = g.matrix(x)
    ones = np.ones(max(g.rpc, g.cpc), dtype=dt)
    # Each partial (a row, or a column of a chunk) of n values is centred on c0 = its rounded
    # mean; d = sum(v - c0) and q = sum((v - c0)^2) come from the centred copy in cache.
    # Its exact mean is c0 + d/n and its centred sum of squares q - d^2/n (the corrected
    # two-pass form): accurate when |mean| >> std, and exactly 0 for a constant channel,
    # whose v - c0 is one repeated value (so the layer can give such a channel exactly beta).
    if g.rows:
        pctr, pd, pq = (np.empty(g.nrows, dtype=dt) for _ in range(3))
        n_part: Any = float(g.L)

        def task(i: int, s: _Scratch) -> None:
            rs, _ = g.block(i)
            blk = _load(mat[rs], dt, s[1])
            ctr = (blk @ ones[: g.L]) / dt.type(g.L)
            c = _view(s[0], blk.shape)
            np.subtract(blk, ctr[:, None], out=c)
            pctr[rs] = ctr
            pd[rs] = c @ ones[: g.L]
            pq[rs] = np.vecdot(c, c)
    else:
        pctr, pd, pq = (np.empty((g.n_rb, g.ncols), dtype=dt) for _ in range(3))
        rows_in_block = np.minimum(g.rpc, g.nrows - g.rpc * np.arange(g.n_rb))
        n_part = rows_in_block.astype(np.float64).reshape(-1, 1, 1, 1)

        def task(i: int, s: _Scratch) -> None:
            rs, cs = g.block(i)
            rb = i // g.n_cb
            blk = _load(mat[rs, cs], dt, s[1])
            n = blk.shape[0]
            ctr = (ones[:n] @ blk) / dt.type(n)
            c = _view(s[0], blk.shape)
            np.subtract(blk, ctr, out=c)
            pctr[rb, cs] = ctr
            pd[rb, cs] = ones[:n] @ c
            # one pass for square-and-sum down the columns; BLAS has no such call
            pq[rb, cs] = np.einsum("ij,ij->j", c, c)

    _run_tasks(g.n_tasks, x.nbytes, _scratch(g, dt), task)
    # Chan's merge of the partials in float64, in a fixed order
    c0, d, q = (a.astype(np.float64).reshape(g.part_shape) for a in (pctr, pd, pq))
    pmean = c0 + d / n_part
    pm2 = q - d * d / n_part
    count = float(x.size // g.C)
    # summed relative to the first partial's mean, so that a constant channel's mean is its
    # value exactly (n * v would round for float64 v)
    ref = pmean[(0, slice(None), 0) if g.rows else (0, 0, slice(None), 0)]
    mean = ref + (n_part * (pmean - _expand(ref, g))).sum(axis=g.part_axes) / count
    dev = pmean - _expand(mean, g)
    m2 = (pm2 + n_part * dev * dev).sum(axis=g.part_axes)
    var = np.maximum(m2, 0.0) / count
    return mean.astype(dt), var.astype(dt)


def _expand(v: np.ndarray, g: _Geom) -> np.ndarray:
    """A per-channel vector shaped to broadcast against ``g.part_shape``."""
    return v[None, :, None] if g.rows else v[None, None, :, None]


# -- scale_shift ----------------------------------------------------------------------------


@register_kernel("numpy", "scale_shift")
def scale_shift(x: Any, scale: Any, shift: Any, /, *, axis: int, xp: ModuleType | None = None) -> Any:
    g = _geometry(x, axis)
    dt = _float_dtype(scale)
    if g is None or dt is None or (shift is not None and _float_dtype(shift) != dt):
        return F.scale_shift(x, scale, shift, axis=axis, xp=xp)
    y = g.empty_like(x.dtype)
    mat, out = g.matrix(x), g.matrix(y)
    a, b = g.coef(scale, dt), g.coef(shift, dt)
    direct = x.dtype == dt

    def task(i: int, s: _Scratch) -> None:
        rs, cs = g.block(i)
        xb = mat[rs, cs]
        # straight into y unless a dtype conversion is needed on the way
        dst = out[rs, cs] if direct else _view(s[0], xb.shape)
        np.multiply(_load(xb, dt, s[0]), g.coef_block(a, rs, cs), out=dst)
        if b is not None:
            np.add(dst, g.coef_block(b, rs, cs), out=dst)
        if not direct:
            np.copyto(out[rs, cs], dst, casting="unsafe")

    _run_tasks(g.n_tasks, x.nbytes + y.nbytes, _scratch(g, dt), task)
    return y


# -- backward_reduce ------------------------------------------------------------------------


@register_kernel("numpy", "backward_reduce")
def backward_reduce(dy: Any, x: Any, mean: Any, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Any, Any]:
    g = _geometry(x, axis, dy)
    dt = _float_dtype(mean)
    if g is None or dt is None:
        return F.backward_reduce(dy, x, mean, axis=axis, xp=xp)
    mx, mdy = g.matrix(x), g.matrix(dy)
    mu = g.coef(mean, dt)
    ones = np.ones(max(g.rpc, g.cpc), dtype=dt)
    if g.rows:
        p_dy, p_dyx = (np.empty(g.nrows, dtype=dt) for _ in range(2))

        def task(i: int, s: _Scratch) -> None:
            rs, _ = g.block(i)
            d = _load(mdy[rs], dt, s[1])
            c = _view(s[0], d.shape)
            np.subtract(_load(mx[rs], dt, s[0]), mu[rs], out=c)
            p_dy[rs] = d @ ones[: g.L]
            p_dyx[rs] = np.vecdot(c, d)
    else:
        p_dy, p_dyx = (np.empty((g.n_rb, g.ncols), dtype=dt) for _ in range(2))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = g.block(i)
            rb = i // g.n_cb
            d = _load(mdy[rs, cs], dt, s[1])
            n = d.shape[0]
            c = _view(s[0], d.shape)
            np.subtract(_load(mx[rs, cs], dt, s[0]), mu[:, cs], out=c)
            p_dy[rb, cs] = ones[:n] @ d
            p_dyx[rb, cs] = np.einsum("ij,ij->j", c, d)

    _run_tasks(g.n_tasks, x.nbytes + dy.nbytes, _scratch(g, dt), task)
    # partials are added in float64 in a fixed order and rounded once
    sum_dy = p_dy.astype(np.float64).reshape(g.part_shape).sum(axis=g.part_axes)
    sum_dyx = p_dyx.astype(np.float64).reshape(g.part_shape).sum(axis=g.part_axes)
    return sum_dy.astype(dt), sum_dyx.astype(dt)


# -- backward_apply -------------------------------------------------------------------------


@register_kernel("numpy", "backward_apply")
def backward_apply(
    dy: Any, x: Any, mean: Any, k_dy: Any, k_xmu: Any, k_const: Any, /, *, axis: int,
    xp: ModuleType | None = None,
) -> Any:
    g = _geometry(x, axis, dy)
    dt = _float_dtype(k_dy)
    if g is None or dt is None:
        return F.backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis, xp=xp)
    dx = g.empty_like(dy.dtype)
    mx, mdy, out = g.matrix(x), g.matrix(dy), g.matrix(dx)
    direct = dy.dtype == dt
    folded = _fold_backward(mean, k_dy, k_xmu, k_const, dt)
    if folded is not None:
        centre, ratio = (g.coef(v, dt) for v in folded)
        scale = g.coef(k_dy, dt)

        def task(i: int, s: _Scratch) -> None:
            rs, cs = g.block(i)
            dst = out[rs, cs] if direct else _view(s[2], (rs.stop - rs.start, cs.stop - cs.start))
            np.subtract(_load(mx[rs, cs], dt, s[1]), g.coef_block(centre, rs, cs), out=dst)
            np.multiply(dst, g.coef_block(ratio, rs, cs), out=dst)
            np.add(dst, _load(mdy[rs, cs], dt, s[1]), out=dst)
            np.multiply(dst, g.coef_block(scale, rs, cs), out=dst)
            if not direct:
                np.copyto(out[rs, cs], dst, casting="unsafe")

    else:
        mu, a, b, c0 = (g.coef(v, dt) for v in (mean, k_dy, k_xmu, k_const))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = g.block(i)
            shape = (rs.stop - rs.start, cs.stop - cs.start)
            dst = out[rs, cs] if direct else _view(s[2], shape)
            tmp = _view(s[0], shape)
            np.subtract(_load(mx[rs, cs], dt, s[1]), g.coef_block(mu, rs, cs), out=dst)
            np.multiply(dst, g.coef_block(b, rs, cs), out=dst)
            np.multiply(_load(mdy[rs, cs], dt, s[1]), g.coef_block(a, rs, cs), out=tmp)
            np.add(dst, tmp, out=dst)
            np.add(dst, g.coef_block(c0, rs, cs), out=dst)
            if not direct:
                np.copyto(out[rs, cs], dst, casting="unsafe")

    _run_tasks(g.n_tasks, x.nbytes + 2 * dy.nbytes, _scratch(g, dt), task)
    return dx


def _fold_backward(mean: Any, k_dy: Any, k_xmu: Any, k_const: Any, dt: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, ratio) with dx = ((x - centre) * ratio + dy) * k_dy, or None where that fails.

    dy * k_dy + (x - mean) * k_xmu + k_const has five elementwise passes in NumPy; this form
    has four. The constant moves into the centre, centre = mean - k_const / k_xmu, not into a
    term x * k_xmu: x - centre is still a difference of nearby numbers, so its rounding is
    relative to |x - mean| + |k_const / k_xmu| (the two terms being added anyway), never to
    |mean|. It needs k_xmu and k_dy nonzero in every channel (gamma = 0, as in a zero-initialised
    residual branch, or sum(dy * (x - mean)) = 0 exactly, take the five-pass form instead).
    """
    k_dy, k_xmu, k_const, mean = (np.asarray(v, dtype=np.float64) for v in (k_dy, k_xmu, k_const, mean))
    if not (np.all(k_dy != 0) and np.all(k_xmu != 0)):
        return None
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        centre = (mean - k_const / k_xmu).astype(dt)
        ratio = (k_xmu / k_dy).astype(dt)
    if not (np.all(np.isfinite(centre)) and np.all(np.isfinite(ratio)) and np.all(ratio != 0)):
        return None
    return centre, ratio
