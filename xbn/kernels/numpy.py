"""NumPy fast paths for the four batch-norm ops, registered for the ``"numpy"`` backend.

Batch norm is memory-bound: the floor is 3 passes over x for a training forward and 5 for a
backward. A NumPy expression like ``mean((x - m) ** 2, axis=axes)`` streams every temporary
through DRAM instead. Two engines do better, chosen once per process (:func:`set_engine`,
``XBN_NUMPY_ENGINE``):

* ``numba`` (when numba is installed; :mod:`xbn.kernels._numba_cpu`): each op is one compiled
  pass. This is the one that reaches the floor and beats PyTorch's CPU kernels (see
  ``benchmarks/results/cpu.md``).
* ``numpy`` (always available): the input is walked in fixed chunks that stay in a core's L2,
  so each chunk comes from memory once however many NumPy passes run over it; per-channel sums
  go through BLAS matrix-vector products (several times faster than ``sum(axis=...)``, a scalar
  pairwise loop); chunks are shared by a small thread pool, since ufuncs and BLAS release the
  GIL. Still 2-5x above the floor: each in-cache NumPy pass costs about what a DRAM pass does.

Numerics match :mod:`xbn.functional`: statistics in float64 for float64 input and in float32
otherwise; the variance from centred squares (each partial, a row or a chunk's column, is
centred on its own rounded mean, then the partials are merged with Chan's formula in float64);
``(x - mean)`` never folded into a constant in the backward. Results are bitwise reproducible:
partials are fixed by the shape alone, each lands in its own slot, and slots are merged in
index order, so neither thread timing nor the thread count changes a bit.

Layouts: any array whose axes can be permuted into a C-contiguous one (NCHW, channels-last,
torch's channels_last strides, a channel axis in the middle, Fortran order); outputs keep the
input's layout. Anything else (negative or gapped strides, mixed layouts of ``x`` and ``dy``,
non-float dtypes, empty arrays) is declined: the op returns ``NotImplemented`` and the seam in
:mod:`xbn.backends` runs the generic function instead.
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

from ..backends import register_kernel

__all__ = ["get_engine", "get_num_threads", "set_engine", "set_num_threads"]

# A chunk of about this many bytes (in the compute dtype), plus a scratch buffer or two of
# the same size, stays in a 1-2 MiB L2 while the several NumPy passes over it run. It also
# keeps each BLAS call below the size (about 1 MiB) at which OpenBLAS starts threads of its
# own, which would fight the pool's threads.
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
# The compiled loops take one row per (sample, channel) from this many values on (a vector
# register's worth, a few times over); below it, columns.
_NB_ROW_MIN = 16
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
# "auto": the compiled single-pass loops of xbn.kernels._numba_cpu when numba is installed,
# else NumPy passes; "numpy": NumPy passes only (XBN_NUMPY_ENGINE=numpy rules numba out).
_engine = os.environ.get("XBN_NUMPY_ENGINE", "auto").strip().lower() or "auto"
_compiled_module: Any = None  # the loaded xbn.kernels._numba_cpu, False once known unavailable
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


def get_engine() -> str:
    """What the fast paths run on: "numba" (compiled single-pass loops) or "numpy" (passes)."""
    return "numba" if _compiled() is not None else "numpy"


def set_engine(name: str) -> None:
    """"auto" (numba when installed, the default), or "numpy" to use NumPy passes only."""
    global _engine
    if name not in ("auto", "numpy", "numba"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'numpy', got {name!r}")
    if name == "numba" and _load_compiled() is None:
        raise ImportError("engine 'numba' needs numba: pip install numba")
    _engine = name


def _load_compiled() -> Any:
    global _compiled_module
    if _compiled_module is None:
        from . import _numba_cpu

        _compiled_module = _numba_cpu if _numba_cpu.AVAILABLE else False
    return _compiled_module or None


def _compiled() -> Any:
    """The compiled loops when they are to be used, else None."""
    return None if _engine == "numpy" else _load_compiled()


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:  # type: ignore[attr-defined]
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xbn-numpy")
        return _pool


def _run_tasks(g: "_Geom", nbytes: int, scratch: Callable[[], Any], task: Callable[[int, Any], None]) -> None:
    """Run ``task(i, s)`` for i in range(n_tasks), each thread with its own scratch ``s``.

    Tasks are handed out dynamically (a core that another process is using should not hold the
    others up), which keeps results reproducible because a task's result depends only on ``i``.
    """
    n_tasks = g.n_tasks
    # per-row broadcasts are the ones the bufsize matters for (see _BUFSIZE)
    bufsize = g.rows and _SCOPED_BUFSIZE
    if n_tasks == 1 and not bufsize:
        task(0, scratch())  # small inputs: every microsecond of set-up shows
        return
    threads = min(_num_threads, n_tasks) if nbytes >= _PARALLEL_MIN_BYTES else 1
    counter = itertools.count()

    def work() -> None:
        s = scratch()
        while True:
            i = next(counter)  # atomic under the GIL
            if i >= n_tasks:
                return
            task(i, s)

    def worker() -> None:
        if not bufsize:
            return work()
        with np.errstate():  # scopes the bufsize to this call
            np.setbufsize(_BUFSIZE)
            work()

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

    Row partials (rows layout) reshape to ``part_shape`` = (outer, C, k).
    """

    __slots__ = ("order", "shape", "outer", "C", "inner", "rows", "k", "t", "L", "nrows", "ncols",
                 "rpc", "cpc", "n_rb", "n_cb", "n_tasks", "part_shape", "_ones",
                 "_channel", "_blocks")

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
            self.part_shape = (self.outer, self.C, k)
        else:
            width = self.C * self.inner
            t = 1
            if width < _COL_MIN:
                t = _divisor(self.outer, -(-_COL_MIN // width), _COL_MAX // width) or 1
            self.k, self.t, self.L = 1, t, self.inner
            self.nrows, self.ncols = self.outer // t, t * width
            # at least 16 rows a chunk: BLAS column sums over fewer rows are mostly overhead
            self.cpc = min(self.ncols, max(1, chunk // 16))
            # at most 1024 rows, so that float32 column sums down a chunk stay short
            self.rpc = min(1024, max(1, chunk // self.cpc))
        self.n_rb = -(-self.nrows // self.rpc)
        self.n_cb = -(-self.ncols // self.cpc)
        self.n_tasks = self.n_rb * self.n_cb
        self._ones: dict[np.dtype, np.ndarray] = {}
        self._channel: np.ndarray | None = None  # channel of each matrix row or column
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # -- the compiled loops' walk: one row per (outer, channel) pair when rows are long enough
    # to vectorize, else (outer, C*inner) columns in blocks of rows; no folding or splitting,
    # which only the NumPy passes need against their per-call overhead.

    def nb_rows(self) -> bool:
        return self.inner >= _NB_ROW_MIN

    def nb_matrix(self, a: np.ndarray) -> np.ndarray:
        v = a.transpose(self.order) if self.order else a
        if self.nb_rows():
            return v.reshape(self.outer * self.C, self.inner)
        return v.reshape(self.outer, self.C * self.inner)

    def nb_block(self) -> tuple[int, int]:
        """(rows a block, blocks) of the column walk, fixed by the shape alone: about 256 KiB
        a block, in L2 for the second pass, and few enough blocks that merging one partial per
        (block, column) costs little next to the pass itself."""
        width = self.C * self.inner
        blk = max(1, min(4096, _CHUNK_BYTES // (4 * width)))
        return blk, -(-self.outer // blk)

    def nb_cols(self, v: Any, dt: np.dtype) -> np.ndarray:
        v = np.ascontiguousarray(v, dtype=dt)
        return v if self.inner == 1 else np.repeat(v, self.inner)

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
        if not self.rows and self.t == 1 and self.inner == 1:
            return v[None, :]
        if self._channel is None:
            shape = self.part_shape if self.rows else (self.t, self.C, self.inner)
            c = np.broadcast_to(np.arange(self.C, dtype=np.intp)[None, :, None], shape).reshape(-1)
            self._channel = c
        spread = v.take(self._channel)
        return spread[:, None] if self.rows else spread[None, :]

    def column_channels(self, cb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For column block ``cb`` (cols layout): each column's channel, how many columns each
        channel has there (float64), and that count with 0 replaced by 1 (a safe divisor)."""
        info = self._blocks.get(cb)
        if info is None:
            lo, hi = cb * self.cpc, min(self.ncols, (cb + 1) * self.cpc)
            ch = (np.arange(lo, hi, dtype=np.intp) % (self.C * self.inner)) // self.inner
            per_channel = np.bincount(ch, minlength=self.C).astype(np.float64)
            info = self._blocks[cb] = (ch, per_channel, np.maximum(per_channel, 1.0))
        return info

    def ones(self, dt: np.dtype) -> np.ndarray:
        """A vector of ones long enough for the BLAS sums of any chunk (shared, read-only)."""
        o = self._ones.get(dt)
        if o is None:
            o = self._ones[dt] = np.ones(max(self.rpc, self.cpc), dtype=dt)
            o.flags.writeable = False
        return o

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
    key = (shape, ax, order, x.itemsize == 8)
    g = _GEOMETRIES.get(key)
    if g is None:
        # planning costs tens of microseconds, as much as the whole work on a small input
        if len(_GEOMETRIES) >= 256:
            _GEOMETRIES.clear()
        g = _GEOMETRIES[key] = _Geom(shape, ax, order, 8 if x.itemsize == 8 else 4)
    return g


_GEOMETRIES: dict[tuple[Any, ...], _Geom] = {}


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
        return NotImplemented
    dt = _cdtype(x)
    nbk = _compiled()
    if nbk is not None and x.dtype == dt:
        return _nb_batch_stats(nbk, g, x, dt)
    mat = g.matrix(x)
    ones = g.ones(dt)
    # Each partial (a row; or a channel's columns in a chunk) of n values is centred on c0,
    # its rounded mean; d = sum(v - c0) and q = sum((v - c0)^2) come from the centred copy in
    # cache. Its exact mean is c0 + d/n and its centred sum of squares q - d^2/n (the corrected
    # two-pass form): accurate when |mean| >> std, and exactly 0 for a constant channel, whose
    # v - c0 is one repeated value (so the layer can give such a channel exactly beta).
    if g.rows:
        pctr, pd, pq = (np.empty(g.nrows, dtype=dt) for _ in range(3))

        def task(i: int, s: _Scratch) -> None:
            rs, _ = g.block(i)
            blk = _load(mat[rs], dt, s[1])
            ctr = (blk @ ones[: g.L]) / dt.type(g.L)
            c = _view(s[0], blk.shape)
            np.subtract(blk, ctr[:, None], out=c)
            pctr[rs] = ctr
            pd[rs] = c @ ones[: g.L]
            pq[rs] = np.vecdot(c, c)

        _run_tasks(g, x.nbytes, _scratch(g, dt), task)
        parts = [_rows_by_channel(a, g) for a in (pctr, pd, pq)]
        n_part: Any = float(g.L)
    else:
        # partials per (chunk, channel): the merge then touches O(chunks * C) numbers, not
        # O(chunks * columns), which for channels-last inputs is 30x more
        pctr, pd, pq, pn = (np.zeros((g.n_tasks, g.C)) for _ in range(4))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = g.block(i)
            ch, per_channel, safe = g.column_channels(i % g.n_cb)
            blk = _load(mat[rs, cs], dt, s[1])
            n = blk.shape[0]
            sums = np.bincount(ch, weights=ones[:n] @ blk, minlength=g.C)
            ctr = (sums / (n * safe)).astype(dt)
            c = _view(s[0], blk.shape)
            np.subtract(blk, ctr.take(ch), out=c)
            pctr[i] = ctr
            pd[i] = np.bincount(ch, weights=ones[:n] @ c, minlength=g.C)
            # one pass for square-and-sum down the columns; BLAS has no such call
            pq[i] = np.bincount(ch, weights=np.einsum("ij,ij->j", c, c), minlength=g.C)
            pn[i] = n * per_channel

        _run_tasks(g, x.nbytes, _scratch(g, dt), task)
        parts, n_part = [pctr, pd, pq], pn
    mean, var = _chan_merge(*parts, n_part, float(x.size // g.C))
    return mean.astype(dt), var.astype(dt)


def _rows_by_channel(a: np.ndarray, g: _Geom) -> np.ndarray:
    """Row partials (one per matrix row) as a float64 (partials, C) array."""
    return a.astype(np.float64).reshape(g.part_shape).transpose(0, 2, 1).reshape(-1, g.C)


def _chan_merge(ctr: np.ndarray, d: np.ndarray, q: np.ndarray, n: Any, count: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, var) from (P, C) float64 partials, merged in a fixed order.

    A partial has n values (n = 0: the channel is not in it), centre ctr, d = sum(v - ctr) and
    q = sum((v - ctr)^2). With u = its mean minus the first partial's mean, mean = ref +
    sum(n u) / M and M2 = sum(q - d^2 / n) + sum(n u^2) - M ubar^2: every term small, and a
    constant channel's mean is its value exactly (where sum(n * v) / M would round for
    float64 v) and its variance exactly 0.
    """
    if np.ndim(n):
        present = n > 0
        d_n = d / np.where(present, n, 1.0)
        first = present.argmax(axis=0)
    else:
        d_n = d / n
        first = np.zeros(ctr.shape[1], dtype=np.intp)
    u = ctr + d_n
    ref = u[first, np.arange(u.shape[1])]
    u -= ref
    nu = n * u
    ubar = nu.sum(axis=0) / count
    q = q - d * d_n + nu * u
    m2 = q.sum(axis=0) - count * ubar * ubar
    return ref + ubar, np.maximum(m2, 0.0) / count


# -- scale_shift ----------------------------------------------------------------------------


@register_kernel("numpy", "scale_shift")
def scale_shift(x: Any, scale: Any, shift: Any, /, *, axis: int, xp: ModuleType | None = None) -> Any:
    g = _geometry(x, axis)
    dt = _float_dtype(scale)
    if g is None or dt is None or (shift is not None and _float_dtype(shift) != dt):
        return NotImplemented
    nbk = _compiled()
    if nbk is not None and x.dtype == dt:
        return _nb_scale_shift(nbk, g, x, scale, shift, dt)
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

    _run_tasks(g, x.nbytes + y.nbytes, _scratch(g, dt), task)
    return y


# -- backward_reduce ------------------------------------------------------------------------


@register_kernel("numpy", "backward_reduce")
def backward_reduce(dy: Any, x: Any, mean: Any, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Any, Any]:
    g = _geometry(x, axis, dy)
    dt = _float_dtype(mean)
    if g is None or dt is None:
        return NotImplemented
    nbk = _compiled()
    if nbk is not None and x.dtype == dy.dtype == dt:
        return _nb_backward_reduce(nbk, g, dy, x, mean, dt)
    mx, mdy = g.matrix(x), g.matrix(dy)
    mu = g.coef(mean, dt)
    ones = g.ones(dt)
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
        p_dy, p_dyx = (np.empty((g.n_tasks, g.C)) for _ in range(2))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = g.block(i)
            ch = g.column_channels(i % g.n_cb)[0]
            d = _load(mdy[rs, cs], dt, s[1])
            n = d.shape[0]
            c = _view(s[0], d.shape)
            np.subtract(_load(mx[rs, cs], dt, s[0]), mu[:, cs], out=c)
            p_dy[i] = np.bincount(ch, weights=ones[:n] @ d, minlength=g.C)
            p_dyx[i] = np.bincount(ch, weights=np.einsum("ij,ij->j", c, d), minlength=g.C)

    _run_tasks(g, x.nbytes + dy.nbytes, _scratch(g, dt), task)
    if g.rows:
        p_dy, p_dyx = _rows_by_channel(p_dy, g), _rows_by_channel(p_dyx, g)
    # partials are added in float64 in a fixed order and rounded once
    return p_dy.sum(axis=0).astype(dt), p_dyx.sum(axis=0).astype(dt)


# -- backward_apply -------------------------------------------------------------------------


@register_kernel("numpy", "backward_apply")
def backward_apply(
    dy: Any, x: Any, mean: Any, k_dy: Any, k_xmu: Any, k_const: Any, /, *, axis: int,
    xp: ModuleType | None = None,
) -> Any:
    g = _geometry(x, axis, dy)
    dt = _float_dtype(k_dy)
    if g is None or dt is None:
        return NotImplemented
    nbk = _compiled()
    if nbk is not None and x.dtype == dy.dtype == dt:
        return _nb_backward_apply(nbk, g, dy, x, (mean, k_dy, k_xmu, k_const), dt)
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

    _run_tasks(g, x.nbytes + 2 * dy.nbytes, _scratch(g, dt), task)
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
    kd, kx = np.asarray(k_dy, np.float64), np.asarray(k_xmu, np.float64)
    if not (kd.all() and kx.all()):
        return None
    with np.errstate(all="ignore"):
        centre = (np.asarray(mean, np.float64) - np.asarray(k_const, np.float64) / kx).astype(dt)
        ratio = (kx / kd).astype(dt)
        # an inf or nan anywhere shows in the sum (as may an overflowing sum: then too, no fold)
        if not (np.isfinite(centre.sum() + ratio.sum()) and ratio.all()):
            return None
    return centre, ratio


# -- the compiled route (numba) -------------------------------------------------------------
# One pass per op; the same partials and the same float64 merges as the NumPy passes. Inputs
# that need a dtype conversion (float16, mixed dtypes) stay on the NumPy passes.


def _nb_threads(nbk: Any, g: _Geom, nbytes: int) -> None:
    # about one chunk of the NumPy passes per hand-out: a row or a column block
    chunk = max(1, (_CHUNK_BYTES // 4) // g.inner) if g.nb_rows() else 1
    nbk.set_threads(_num_threads if nbytes >= _PARALLEL_MIN_BYTES else 1, chunk)


def _nb_vec(v: Any, dt: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=dt)


def _nb_batch_stats(nbk: Any, g: _Geom, x: np.ndarray, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    _nb_threads(nbk, g, x.nbytes)
    m = g.nb_matrix(x)
    if g.nb_rows():
        ctr, d, q = (np.empty(m.shape[0]) for _ in range(3))
        nbk.rows_stats(m, ctr, d, q)
        parts = [a.reshape(g.outer, g.C) for a in (ctr, d, q)]
        n_part: Any = float(g.inner)
    else:
        blk, nblocks = g.nb_block()
        ctr, d, q = (np.empty((nblocks, m.shape[1])) for _ in range(3))
        nbk.cols_stats(m, blk, ctr, d, q)
        parts = [a.reshape(nblocks, g.C, g.inner).transpose(0, 2, 1).reshape(-1, g.C) for a in (ctr, d, q)]
        rows = np.minimum(blk, g.outer - blk * np.arange(nblocks)).astype(np.float64)
        n_part = np.repeat(rows, g.inner)[:, None]
    mean, var = np.empty(g.C), np.empty(g.C)
    n_arr = np.full((parts[0].shape[0], 1), n_part) if np.ndim(n_part) == 0 else n_part
    # the same merge as _chan_merge, compiled: a dozen NumPy calls cost more than the pass
    # itself on small inputs
    nbk.chan_merge(*(np.ascontiguousarray(a) for a in (*parts, n_arr)), float(x.size // g.C), mean, var)
    return mean.astype(dt), var.astype(dt)


def _nb_scale_shift(nbk: Any, g: _Geom, x: np.ndarray, scale: Any, shift: Any, dt: np.dtype) -> np.ndarray:
    _nb_threads(nbk, g, 2 * x.nbytes)
    y = g.empty_like(x.dtype)
    b = np.zeros(g.C, dt) if shift is None else shift
    if g.nb_rows():
        nbk.rows_affine(g.nb_matrix(x), _nb_vec(scale, dt), _nb_vec(b, dt), g.C, g.nb_matrix(y))
    else:
        nbk.cols_affine(g.nb_matrix(x), g.nb_cols(scale, dt), g.nb_cols(b, dt), g.nb_block()[0], g.nb_matrix(y))
    return y


def _nb_backward_reduce(nbk: Any, g: _Geom, dy: np.ndarray, x: np.ndarray, mean: Any, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    _nb_threads(nbk, g, 2 * x.nbytes)
    mx, mdy = g.nb_matrix(x), g.nb_matrix(dy)
    if g.nb_rows():
        sdy, sdx = np.empty(mx.shape[0]), np.empty(mx.shape[0])
        nbk.rows_backward_reduce(mx, mdy, _nb_vec(mean, dt), g.C, sdy, sdx)
        shape, axes = (g.outer, g.C), (0,)
    else:
        blk, nblocks = g.nb_block()
        sdy, sdx = np.empty((nblocks, mx.shape[1])), np.empty((nblocks, mx.shape[1]))
        nbk.cols_backward_reduce(mx, mdy, g.nb_cols(mean, dt), blk, sdy, sdx)
        shape, axes = (nblocks, g.C, g.inner), (0, 2)
    # float64 sums of the partials, in a fixed order
    return sdy.reshape(shape).sum(axis=axes).astype(dt), sdx.reshape(shape).sum(axis=axes).astype(dt)


def _nb_backward_apply(nbk: Any, g: _Geom, dy: np.ndarray, x: np.ndarray, coefs: tuple[Any, ...], dt: np.dtype) -> np.ndarray:
    _nb_threads(nbk, g, 3 * x.nbytes)
    dx = g.empty_like(dy.dtype)
    mx, mdy, out = g.nb_matrix(x), g.nb_matrix(dy), g.nb_matrix(dx)
    if g.nb_rows():
        nbk.rows_backward_apply(mx, mdy, *(_nb_vec(v, dt) for v in coefs), g.C, out)
    else:
        nbk.cols_backward_apply(mx, mdy, *(g.nb_cols(v, dt) for v in coefs), g.nb_block()[0], out)
    return dx
