"""NumPy fast paths for the four batch-norm passes, registered for the ``"numpy"`` backend,
and, on the compiled engine, for the whole steps (training forward, backward, eval forward),
whose per-channel work is then one compiled call instead of a dozen NumPy operations on C values.

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
  pairwise loop); chunks are shared by a small thread pool, since ufuncs and einsum release the
  GIL (NumPy's matmul and vecdot hold it, so the BLAS sums of two threads take turns). Still
  1.5-2.7x above the floor: a training step makes 12-13 NumPy passes over each chunk, and each
  in cache costs half to all of what a pass from memory does (docs/performance.md).

Numerics match :mod:`xbn.functional`: statistics in float64 for float64 input and in float32
otherwise; each partial (a row, or a channel's columns in a block of rows) summed about a shift
that is one of its own values (so a constant channel is exact: mean its value, variance 0),
then the partials merged with Chan's formula in float64; channels holding inf or NaN get
torch's values (the plain mean, a NaN variance), without NumPy warnings; ``(x - mean)`` never
expanded in the backward. Results are bitwise reproducible: partials are fixed by the shape
alone, each lands in its own slot, and slots are merged in index order, so neither thread
timing nor the thread count changes a bit.

Memory: beyond the arrays an op returns, O(C) plus a workspace bounded by the larger of a
small share of x and a few hundred KiB per thread. Reductions keep one partial per (block of
rows, channel), the blocks sized by :func:`_partial_budget` (a wide input gets one block of
rows, its channels split among the tasks instead).

Threads: any number of threads may call the ops at once, on either engine. The NumPy passes
share one pool (each caller waits for its own tasks only); the compiled loops serialize their
parallel regions on numba's work-queue threading layer, which is not thread-safe (see
:mod:`xbn.kernels._numba_cpu`).

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from ..backends import register_kernel

__all__ = ["get_engine", "get_num_threads", "set_engine", "set_num_threads"]

# The NumPy passes walk x in chunks of about this many bytes (in the compute dtype), each
# read from memory once while several NumPy passes run over it in cache. Each chunk's task
# costs 15-20 us of Python besides its passes, and with 2 threads the tasks' Python runs under
# the GIL, so larger chunks run faster until they and their scratch buffer leave the L2
# (measured on a 1 MiB-L2 core, forward + backward, 1 / 2 threads, 256 KiB -> 768 KiB: 12.0 ->
# 11.2 / 9.5 -> 7.4 ms on (4096, 1024), 21.2 -> 16.1 / 17.8 -> 11.0 ms on channels-last
# 32x56x56x64, 24.7 -> 19.0 / 22.6 -> 17.0 ms on 128x256x14x14; 1 MiB was 5-15% faster
# still; 2 MiB gained nothing over 1 MiB on NCHW and was slower than 256 KiB on the first
# two). A thread's scratch is one chunk (float32), so 768 KiB leaves room for the partials
# within the workspace rule of 1 MiB a thread (see the module docstring).
_PASS_CHUNK_BYTES = 768 * 1024
# The compiled loops' blocks: about this many bytes each.
_CHUNK_BYTES = 256 * 1024
# Below this many bytes of input the pool's hand-off (~20 us a task) costs more than it saves.
_PARALLEL_MIN_BYTES = 1 << 20
# Rows of at least this many contiguous values of one channel are walked row by row (a per-row
# scalar broadcast, BLAS row sums); shorter ones make NumPy's per-row loop overhead dominate,
# so those arrays are walked as (batch, channel*spatial) columns with per-column coefficients.
_ROW_MIN = 2048
# Longest row handed to one BLAS call in the row layout; longer spatial extents are split into
# equal sub-rows so that a chunk can still be small.
_ROW_MAX = _PASS_CHUNK_BYTES // 4
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
    """ "auto" (numba when installed, the default), or "numpy" to use NumPy passes only."""
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
    """The pool, grown to ``workers`` if smaller; call with ``_pool_lock`` held."""
    global _pool
    if _pool is None or _pool._max_workers < workers:
        if _pool is not None:
            _pool.shutdown(wait=False)  # its queued work still runs; nothing new goes there
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xbn-numpy")
    return _pool


def _run_tasks(
    plan: _Plan,
    nbytes: int,
    scratch: Callable[[], Any],
    task: Callable[[int, Any], None],
) -> None:
    """Run ``task(i, s)`` for i in range(plan.n_tasks), each thread with its own scratch ``s``.

    Tasks are handed out dynamically (a core that another process is using should not hold the
    others up), which keeps results reproducible because a task's result depends only on ``i``.
    Several threads may call this at once: they share the pool, each waits only for its own
    tasks, and a pool task that has not started when its caller has finished is cancelled.
    """
    n_tasks = plan.n_tasks
    threads = min(_num_threads, n_tasks) if nbytes >= _PARALLEL_MIN_BYTES else 1
    counter = itertools.count()
    failed: list[bool] = []

    def work() -> None:
        s = scratch()
        while not failed:
            i = next(counter)  # atomic under the GIL
            if i >= n_tasks:
                return
            try:
                task(i, s)
            except BaseException:
                failed.append(True)  # the others stop taking tasks
                raise

    def worker() -> None:
        # errstate (and the bufsize, which it scopes) is per thread: set it in each worker
        with np.errstate(all="ignore"):
            if _SCOPED_BUFSIZE:  # every pass broadcasts a coefficient row or column
                np.setbufsize(_BUFSIZE)
            work()

    if threads <= 1:
        worker()
        return
    # Submitted under the lock: another caller that grows the pool, or set_num_threads, shuts
    # the old pool down, and a submit to a pool already shut down raises.
    with _pool_lock:
        pool = _get_pool(threads - 1)
        futures = [pool.submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        for f in futures:
            if not f.cancel():  # started: wait for it (and see its error)
                f.result()


# -- geometry -------------------------------------------------------------------------------


def _divisor(n: int, lo: int, hi: int) -> int | None:
    """The smallest divisor d of n with lo <= d <= hi, if any."""
    return next((d for d in range(max(1, lo), min(n, hi) + 1) if n % d == 0), None)


def _partial_budget(nbytes: int) -> int:
    """Bytes the per-(block, channel) partials of a reduction may take: a small share of the
    input (the merge and its temporaries included), so that the blocks, not the rows or the
    threads, decide how many partials there are. A channel needs at least one partial, so
    wide inputs get one block of rows: O(C) whatever the batch."""
    return max(nbytes // 32, _PARTIAL_MIN_BYTES)


# Smallest budget above: enough for a few thousand partials, so that small and medium inputs
# keep short blocks (more tasks for the threads, shorter float32 sums down a column).
_PARTIAL_MIN_BYTES = 512 * 1024
# Bytes a (partial, channel) costs at the peak of the NumPy passes' merge: three float64
# partial arrays and the merge's temporaries.
_PARTIAL_BYTES = 64
# ... and in the compiled route: three float64 arrays, merged in a compiled loop.
_NB_PARTIAL_BYTES = 32
# Folding rows (cols layout) puts every channel in every block, so each block has C partials:
# only worth it while C partials are few next to a block's values.
_FOLD_MAX_C = 128
# Longest strip of columns a compiled task keeps per-column sums for (three arrays of it).
_NB_STRIP_MAX = 16384


class _Plan:
    """Blocks of ``rpc`` rows x ``cpc`` columns over an (nrows, ncols) matrix; task i is block
    (i // n_cb, i % n_cb)."""

    __slots__ = ("nrows", "ncols", "rpc", "cpc", "n_rb", "n_cb", "n_tasks")

    def __init__(self, nrows: int, ncols: int, rpc: int, cpc: int):
        self.nrows, self.ncols = nrows, ncols
        self.rpc, self.cpc = max(1, min(nrows, rpc)), max(1, min(ncols, cpc))
        self.n_rb = -(-nrows // self.rpc)
        self.n_cb = -(-ncols // self.cpc)
        self.n_tasks = self.n_rb * self.n_cb

    def block(self, i: int) -> tuple[slice, slice]:
        rb, cb = divmod(i, self.n_cb)
        return (
            slice(rb * self.rpc, min(self.nrows, (rb + 1) * self.rpc)),
            slice(cb * self.cpc, min(self.ncols, (cb + 1) * self.cpc)),
        )

    def rows_of(self, rb: int) -> int:
        return min(self.nrows, (rb + 1) * self.rpc) - rb * self.rpc


class _NbPlan:
    """The compiled reductions' walk: blocks of ``nb`` outer rows times strips of ``cs``
    channels, one partial per (block, channel).

    ``rows`` (spatial extent >= _NB_ROW_MIN): the (outer, C*k, L) view, each (sample, channel)
    run of ``inner`` values split into k sub-rows of L when it is longer than a chunk (each
    sub-row a partial of its own); ``cols``: the (outer, C*inner) view, per-column sums down
    the block (at most 4096 rows), then per channel. ``counts``: values per partial,
    (nblocks * k, 1). Blocks have at least ``nb_min`` rows, so that the partials stay within
    :func:`_partial_budget`.
    """

    __slots__ = ("rows", "k", "L", "Ck", "nb", "cs", "nblocks", "counts")

    def __init__(self, outer: int, C: int, inner: int, itemsize: int):
        chunk = max(1, _CHUNK_BYTES // itemsize)
        budget = _partial_budget(outer * C * inner * itemsize)
        self.rows = inner >= _NB_ROW_MIN
        k = 1
        if self.rows and inner > chunk:
            k = _divisor(inner, -(-inner // chunk), inner // 1024) or 1
        self.k, self.L, self.Ck = k, inner // k if self.rows else inner, C * k
        nb_min = -(-outer // max(1, budget // (_NB_PARTIAL_BYTES * self.Ck)))
        # Wide strips: per block of rows, long contiguous runs (measured: a strip of all 256
        # channels of 14x14 ran 1.2-2.5x faster than one channel at a time, and whole rows of
        # (4096, 1024) 1.5-2x faster than strips of 128-256 columns). Each block is read
        # once, so its size is not held to L2.
        if self.rows:
            cs = min(self.Ck, max(1, (4 * chunk) // self.L))
            cs = -(-self.Ck // -(-self.Ck // cs))  # even strips
            nb = max(nb_min, chunk // (cs * self.L))
        else:
            cs = min(C, max(1, _NB_STRIP_MAX // inner))
            cs = -(-C // -(-C // cs))
            nb = max(nb_min, min(4096, chunk // (cs * inner)))
        self.cs, self.nb = cs, min(outer, nb)
        self.nblocks = -(-outer // self.nb)
        rows = np.minimum(self.nb, outer - self.nb * np.arange(self.nblocks)).astype(np.float64)
        self.counts = np.repeat(rows * self.L, k)[:, None]


class _Geom:
    """How an array is walked: a 2-D matrix view of its memory, and the blocks over it.

    ``rows`` layout, for long contiguous runs per channel (NCHW with large images): the matrix
    is (outer*C*k, L), each row L values of one channel (k equal sub-rows per (n, c) pair);
    a block is a range of whole rows, and each row is a partial of the reductions.
    ``cols`` layout, for everything else (channels-last, (N, C), small images): the matrix is
    (outer/t, t*C*inner), t consecutive outer rows folded into one matrix row; column j
    belongs to channel (j mod C*inner) // inner. Blocks are whole ``unit``s of columns: a
    channel's ``inner`` columns (t = 1), or whole folded rows (t > 1). The elementwise passes
    walk ``map`` blocks; the reductions ``red`` blocks, tall enough that their partials (one
    per block and channel, or per block with t > 1) stay within :func:`_partial_budget`.

    Row partials (rows layout) reshape to ``part_shape`` = (outer, C, k).
    """

    __slots__ = (
        "order",
        "shape",
        "outer",
        "C",
        "inner",
        "rows",
        "k",
        "t",
        "L",
        "nrows",
        "ncols",
        "unit",
        "map",
        "red",
        "part_shape",
        "red_counts",
        "spread_all",
        "_ones",
        "_channel",
        "_cols",
        "_nb",
    )

    def __init__(self, shape: tuple[int, ...], axis: int, order: tuple[int, ...], itemsize: int):
        self.order = order
        self.shape = shape  # of the C-contiguous (permuted) view
        self.outer = math.prod(shape[:axis])
        self.C = shape[axis]
        self.inner = math.prod(shape[axis + 1 :])
        chunk = max(1, _PASS_CHUNK_BYTES // itemsize)
        self.rows = self.inner >= _ROW_MIN
        self.red_counts: np.ndarray | None = None
        nbytes = math.prod(shape) * itemsize
        self.spread_all = True
        if self.rows:
            k = 1
            if self.inner > _ROW_MAX:
                # a prime extent stays whole: one long row per BLAS call is still correct
                k = _divisor(self.inner, -(-self.inner // _ROW_MAX), self.inner // _ROW_MIN) or 1
            self.k, self.t, self.L = k, 1, self.inner // k
            self.nrows, self.ncols = self.outer * self.C * k, self.L
            self.unit = self.L
            self.map = self.red = _Plan(self.nrows, self.ncols, chunk // self.L, self.L)
            self.part_shape = (self.outer, self.C, k)
        else:
            width = self.C * self.inner
            t = 1
            if width < _COL_MIN and self.C <= _FOLD_MAX_C:
                t = _divisor(self.outer, -(-_COL_MIN // width), _COL_MAX // width) or 1
            self.k, self.t, self.L = 1, t, self.inner
            self.nrows, self.ncols = self.outer // t, t * width
            self.unit = width if t > 1 else self.inner
            # a per-column copy of a coefficient (and its channel index), 12 bytes a column
            self.spread_all = 12 * self.ncols <= _partial_budget(nbytes)
            self.part_shape = (self.outer, self.C, 1)
            # at least 16 rows a block: BLAS column sums over fewer rows are mostly overhead;
            # at most 1024, so that float32 column sums down a block stay short
            cpc = self._whole_units(chunk // 16)
            self.map = _Plan(self.nrows, self.ncols, min(1024, chunk // cpc), cpc)
            if t > 1:
                self.red = self.map  # a partial per block, for every channel
                m = np.array(
                    [
                        (self.map.block(i)[1].stop - self.map.block(i)[1].start) // width
                        for i in range(self.map.n_cb)
                    ],
                    dtype=np.float64,
                )
                rows = np.array([self.map.rows_of(rb) for rb in range(self.map.n_rb)], dtype=np.float64)
                self.red_counts = (rows[:, None] * m[None, :] * self.inner).reshape(-1, 1)
            else:
                # A block of rows may be taller than a chunk (the partial budget sets its
                # height); its task walks it in the map's chunk-sized sub-blocks, adding their
                # column sums in float64. Blocks keep the map's width, whole rows where a row
                # fits in a chunk: strips of a few channels of (4096, 1024), 512 B a row, ran
                # at half the speed.
                blocks = max(1, _partial_budget(nbytes) // (_PARTIAL_BYTES * self.C))
                rpc_min = -(-self.nrows // blocks)
                self.red = _Plan(self.nrows, self.ncols, max(rpc_min, self.map.rpc), self.map.cpc)
                rows = np.array([self.red.rows_of(rb) for rb in range(self.red.n_rb)], dtype=np.float64)
                self.red_counts = (rows * self.inner)[:, None]
        self._ones: dict[np.dtype, np.ndarray] = {}
        self._channel: np.ndarray | None = None  # channel of each matrix row (rows layout)
        self._cols: dict[int, np.ndarray] = {}  # see _local_channels
        self._nb: _NbPlan | None = None

    def _whole_units(self, n: int) -> int:
        """``n`` columns rounded down to whole units (at least one), at most every column."""
        return min(self.ncols, max(self.unit, n // self.unit * self.unit))

    def sub_blocks(self, rs: slice) -> Any:
        """Reduction block rows ``rs`` (cols layout) in sub-blocks of the map's height (a chunk)."""
        step = self.map.rpc
        return (slice(r, min(rs.stop, r + step)) for r in range(rs.start, rs.stop, step))

    def slot(self, i: int) -> tuple[int, int, int]:
        """Where reduction task i (cols layout) puts its partials: (partial row, first channel,
        channels)."""
        cs = self.red.block(i)[1]
        if self.t > 1:
            return i, 0, self.C
        return i // self.red.n_cb, cs.start // self.inner, (cs.stop - cs.start) // self.inner

    def _local_channels(self, w: int) -> np.ndarray:
        """Channel of each column of a cols-layout block w columns wide, counted from the
        block's first channel (blocks start on a channel, or a folded row, boundary)."""
        idx = self._cols.get(w)
        if idx is None:
            idx = (np.arange(w, dtype=np.intp) % (self.C * self.inner)) // self.inner
            if len(self._cols) >= 8:
                self._cols.clear()
            self._cols[w] = idx
        return idx

    def spread(self, v: np.ndarray, cs: slice) -> np.ndarray:
        """Values of the channels of block columns ``cs``, one per column."""
        if self.t == 1:  # the block's channels, from v[0] on
            v = v[: (cs.stop - cs.start) // self.inner]
            return v if self.inner == 1 else np.repeat(v, self.inner)
        return v.take(self._local_channels(cs.stop - cs.start))

    def per_channel(self, cols: np.ndarray, cs: slice, nch: int) -> np.ndarray:
        """Column sums of block columns ``cs`` as float64 sums per channel, in a fixed order."""
        if self.t == 1 and self.inner == 1:
            return cols.astype(np.float64)
        # a sum over a reshape, not np.bincount by channel index: 3 us, not 15, for 3920 columns
        return cols.reshape(-1, nch, self.inner).sum(axis=(0, 2), dtype=np.float64)

    def view3(self, a: np.ndarray) -> np.ndarray:
        """``a`` as its C-contiguous (outer, C, inner) view."""
        return (a.transpose(self.order) if self.order else a).reshape(self.outer, self.C, self.inner)

    # -- the compiled loops: reductions by (block of rows, strip of channels) (see _NbPlan);
    # elementwise passes one row per (outer, channel) pair when rows are long enough to
    # vectorize, else (outer, C*inner) rows in blocks.

    def nb_plan(self, itemsize: int) -> _NbPlan:
        if self._nb is None:
            self._nb = _NbPlan(self.outer, self.C, self.inner, itemsize)
        return self._nb

    def nb_rows(self) -> bool:
        return self.inner >= _NB_ROW_MIN

    def nb_matrix(self, a: np.ndarray) -> np.ndarray:
        v = a.transpose(self.order) if self.order else a
        if self.nb_rows():
            return v.reshape(self.outer * self.C, self.inner)
        return v.reshape(self.outer, self.C * self.inner)

    def nb_block(self) -> int:
        """Rows of a block of the elementwise passes: about 256 KiB, whole rows at least."""
        if self.nb_rows():
            return max(1, (_CHUNK_BYTES // 4) // self.inner)
        return max(1, min(4096, _CHUNK_BYTES // (4 * self.C * self.inner)))

    def nb_cols(self, v: Any, dt: np.dtype) -> np.ndarray:
        v = np.ascontiguousarray(v, dtype=dt)
        return v if self.inner == 1 else np.repeat(v, self.inner)

    def matrix(self, a: np.ndarray) -> np.ndarray:
        """``a`` (laid out like the analysed array) as the 2-D matrix, without a copy."""
        return (a.transpose(self.order) if self.order else a).reshape(self.nrows, self.ncols)

    def coef(self, v: Any, dt: np.dtype) -> Callable[[slice, slice], np.ndarray] | None:
        """A per-channel vector as a function of a block: the slice of it that broadcasts
        against the block's (rows, columns). None stays None. A copy per column is made once per
        call only when it is small next to x (``spread_all``); otherwise each block of a wide
        cols layout repeats its own channels' values."""
        if v is None:
            return None
        v = np.asarray(v, dtype=dt)
        if self.rows:
            if self._channel is None:
                c = np.broadcast_to(np.arange(self.C, dtype=np.intp)[None, :, None], self.part_shape)
                self._channel = c.reshape(-1)
            spread = v.take(self._channel)[:, None]
            return lambda rs, cs: spread[rs]
        if self.t > 1:  # at most _COL_MAX columns: spread once per call
            full = v.take(self._local_channels(self.ncols))[None, :]
            return lambda rs, cs: full[:, cs]
        if self.inner == 1:
            row = v[None, :]
            return lambda rs, cs: row[:, cs]
        if self.spread_all:  # a row of coefficients small next to x: spread once per call
            full = v.take(self._local_channels(self.ncols))[None, :]
            return lambda rs, cs: full[:, cs]
        # else each block spreads its own channels' values (blocks start on a channel)
        inner = self.inner
        return lambda rs, cs: self.spread(v[cs.start // inner :], cs)[None, :]

    def ones(self, dt: np.dtype) -> np.ndarray:
        """A vector of ones long enough for the BLAS sums of any block (shared, read-only)."""
        o = self._ones.get(dt)
        if o is None:
            n = max(self.map.rpc, self.map.cpc)  # the sums run over map blocks or sub-blocks
            o = np.ones(n, dtype=dt)
            o.flags.writeable = False
            self._ones[dt] = o
        return o

    def scratch_size(self) -> int:
        # a map block: the rows layout reduces over map blocks, the cols layout over sub-blocks
        # of the map's size
        return self.map.rpc * self.map.cpc

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


def _load(block: np.ndarray, dt: np.dtype, s: _Scratch, i: int) -> np.ndarray:
    """``block`` in the compute dtype: itself, or converted into scratch buffer ``s[i]`` (which
    is allocated only then)."""
    if block.dtype == dt:
        return block
    out = _view(s[i], block.shape)
    np.copyto(out, block, casting="unsafe")
    return out


class _Scratch:
    """A thread's block-sized buffers, each allocated on first use (float32 input with float32
    coefficients needs at most one, so the peak memory stays close to the outputs alone)."""

    __slots__ = ("size", "dtype", "bufs")

    def __init__(self, size: int, dtype: np.dtype):
        self.size, self.dtype = size, dtype
        self.bufs: dict[int, np.ndarray] = {}

    def __getitem__(self, i: int) -> np.ndarray:
        buf = self.bufs.get(i)
        if buf is None:
            buf = self.bufs[i] = np.empty(self.size, dtype=self.dtype)
        return buf


def _scratch(g: _Geom, dt: np.dtype) -> Callable[[], _Scratch]:
    return lambda: _Scratch(g.scratch_size(), dt)


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
        mean, var, finite = _nb_batch_stats(nbk, g, x, dt)  # compiled: nothing warns
    else:
        # inf and NaN give NaN and inf here as in torch: results, not warnings
        with np.errstate(all="ignore"):
            m64, v64 = _passes_batch_stats(g, x, dt)
            mean, var = m64.astype(dt), v64.astype(dt)
            finite = math.isfinite(float(np.dot(m64, v64)))  # an inf or NaN in either shows
    if not finite:
        with np.errstate(all="ignore"):
            _nonfinite_channels(g, x, mean, var)
    return mean, var


def _median3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def _passes_batch_stats(g: _Geom, x: np.ndarray, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    mat = g.matrix(x)
    ones = g.ones(dt)
    plan = g.red
    # Each partial (a row; or a channel's columns in a block) is one pass about a shift s, the
    # median of three of its values (first, middle, last): d = sum(v - s), q = sum((v - s)^2)
    # from the shifted copy in cache, and the merge takes q - d^2/n in float64. The median is
    # within about a standard deviation of the mean, so that costs a digit at most, and
    # removes any common offset (accurate when |mean| >> std); a constant channel has v - s
    # exactly 0 everywhere, whatever BLAS's summation order, so its variance is exactly 0.
    if g.rows:
        pz, pd, pq = (np.empty(g.nrows) for _ in range(3))
        L = g.L

        def task(i: int, s: _Scratch) -> None:
            rs, _ = plan.block(i)
            blk = _load(mat[rs], dt, s, 1)
            c = _view(s[0], blk.shape)
            z = _median3(blk[:, 0], blk[:, L // 2], blk[:, L - 1])
            np.subtract(blk, z[:, None], out=c)
            pd[rs] = c @ ones[:L]
            pq[rs] = np.vecdot(c, c)
            pz[rs] = z

        _run_tasks(plan, x.nbytes, _scratch(g, dt), task)
        parts = [_rows_by_channel(a, g) for a in (pz, pd, pq)]
        n_part: Any = float(L)
    else:
        P = g.red_counts.shape[0]  # type: ignore[union-attr]
        cz, cd, cq = (np.empty((P, g.C)) for _ in range(3))
        inner = g.inner

        def task(i: int, s: _Scratch) -> None:
            rs, cs = plan.block(i)
            p, c0, nch = g.slot(i)
            n = rs.stop - rs.start
            # samples from three rows and, when rows are folded, three folds: far apart, so
            # that one local outlier (or a periodic one) does not make the median
            span = nch * inner
            f = (cs.stop - cs.start) // span - 1  # the last fold in the block
            z = _median3(
                mat[rs.start, cs.start : cs.start + span : inner],
                mat[rs.start + n // 2, cs.start + (f // 2) * span + inner // 2 :: inner][:nch],
                mat[rs.stop - 1, cs.start + f * span + inner - 1 :: inner][:nch],
            ).astype(dt)
            zs = g.spread(z, cs)
            sd: Any = None
            sq: Any = None
            for sub in g.sub_blocks(rs):
                c = _view(s[0], (sub.stop - sub.start, cs.stop - cs.start))
                np.subtract(_load(mat[sub, cs], dt, s, 1), zs, out=c)
                # one pass for square-and-sum down the columns; BLAS has no such call
                sd, sq = _add_cols(sd, ones[: c.shape[0]] @ c), _add_cols(sq, np.einsum("ij,ij->j", c, c))
            cd[p, c0 : c0 + nch] = g.per_channel(sd, cs, nch)
            cq[p, c0 : c0 + nch] = g.per_channel(sq, cs, nch)
            cz[p, c0 : c0 + nch] = z

        _run_tasks(plan, x.nbytes, _scratch(g, dt), task)
        parts, n_part = [cz, cd, cq], g.red_counts
    return _chan_merge(parts[0], parts[1], parts[2], n_part, float(x.size // g.C))


def _add_cols(acc: np.ndarray | None, cols: np.ndarray) -> np.ndarray:
    """A sub-block's column sums added to a block's float64 running sums (first: converted)."""
    if acc is None:
        return cols.astype(np.float64)
    acc += cols
    return acc


def _rows_by_channel(a: np.ndarray, g: _Geom) -> np.ndarray:
    """Row partials (one per matrix row) as a float64 (partials, C) array."""
    return a.astype(np.float64, copy=False).reshape(g.part_shape).transpose(0, 2, 1).reshape(-1, g.C)


def _chan_merge(
    ctr: np.ndarray, d: np.ndarray, q: np.ndarray, n: Any, count: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, var) from (P, C) float64 partials, merged in a fixed order.

    A partial has n values (a scalar, or a (P, 1) column), centre ctr, d = sum(v - ctr) and
    q = sum((v - ctr)^2). With u = its mean minus the first partial's mean, mean = ref +
    sum(n u) / M and M2 = sum(q - d^2 / n) + sum(n u^2) - M ubar^2: every term small, and a
    constant channel (every partial (value, 0, 0)) has u == 0 exactly, so its mean is its value
    and its variance exactly 0.
    """
    P, C = ctr.shape
    if P == 1:  # one block of rows (a wide input): in place, no temporaries of size C
        d /= n
        ctr += d
        d *= d
        d *= n
        q -= d
        q[q < 0.0] = 0.0  # rounding only; NaN stays NaN
        q /= count
        return ctr[0], q[0]
    mean, var = np.empty(C), np.empty(C)
    step = max(1, _MERGE_VALUES // P)  # channels at a time: the temporaries stay small
    for lo in range(0, C, step):
        cs = slice(lo, lo + step)
        dc, qc = d[:, cs], q[:, cs]
        d_n = dc / n
        u = ctr[:, cs] + d_n
        ref = u[0].copy()
        u -= ref
        nu = n * u
        ubar = nu.sum(axis=0) / count
        nu *= u
        d_n *= dc
        d_n -= qc  # minus the partials' own squared deviations
        nu -= d_n
        m2 = nu.sum(axis=0) - count * ubar * ubar
        mean[cs] = ref + ubar
        var[cs] = np.where(m2 < 0.0, 0.0, m2) / count  # rounding only; NaN stays NaN
    return mean, var


# Values per temporary of the NumPy merge (a slice of channels at a time)
_MERGE_VALUES = 1 << 14


def _nonfinite_channels(g: _Geom, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
    """Channels holding inf or NaN, in place: torch's plain mean (sum / M: +inf, -inf, or NaN
    when both signs or a NaN occur) and its two-pass variance (NaN once the mean is not
    finite). The shifted partials would give NaN for a mean of +-inf (inf - inf), and a
    finite input whose shifted sums overflowed gets its statistics from float64 sums here."""
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    v3 = g.view3(x)
    step = max(1, (_CHUNK_BYTES // 4) // (g.C * g.inner))
    total = np.zeros(g.C)
    for o in range(0, g.outer, step):  # float64 sums through NumPy's buffer, no float64 copy
        total += np.sum(v3[o : o + step], axis=(0, 2), dtype=np.float64)
    count = x.size // g.C
    plain = total / count
    mean[bad] = plain[bad]
    var[bad] = np.nan
    for c in np.flatnonzero(bad & np.isfinite(plain)):
        ss = 0.0
        for piece in _channel_pieces(v3, int(c)):
            dev = piece.astype(np.float64) - plain[c]
            ss += float(np.vdot(dev, dev))
        var[c] = ss / count


def _channel_pieces(v3: np.ndarray, c: int) -> Any:
    """Channel c of an (outer, C, inner) view in pieces of at most a chunk."""
    outer, _, inner = v3.shape
    step = _CHUNK_BYTES // 8
    rows = max(1, step // inner)
    for o in range(0, outer, rows):
        for j in range(0, inner, step):
            yield v3[o : o + rows, c, j : j + step]


# -- scale_shift ----------------------------------------------------------------------------


@register_kernel("numpy", "scale_shift")
def scale_shift(x: Any, scale: Any, shift: Any, /, *, axis: int, xp: ModuleType | None = None) -> Any:
    g = _geometry(x, axis)
    dt = _float_dtype(scale)
    if g is None or dt is None or (shift is not None and _float_dtype(shift) != dt):
        return NotImplemented
    nbk = _compiled()
    if nbk is not None and x.dtype == dt:
        return _nb_scale_shift(nbk, g, x, scale, shift, dt)  # compiled: nothing warns
    with np.errstate(all="ignore"):
        return _passes_scale_shift(g, x, scale, shift, dt)


def _passes_scale_shift(g: _Geom, x: np.ndarray, scale: Any, shift: Any, dt: np.dtype) -> np.ndarray:
    y = g.empty_like(x.dtype)
    mat, out = g.matrix(x), g.matrix(y)
    a, b = g.coef(scale, dt), g.coef(shift, dt)
    direct = x.dtype == dt
    plan = g.map

    def task(i: int, s: _Scratch) -> None:
        rs, cs = plan.block(i)
        xb = mat[rs, cs]
        # straight into y unless a dtype conversion is needed on the way
        dst = out[rs, cs] if direct else _view(s[0], xb.shape)
        np.multiply(_load(xb, dt, s, 0), a(rs, cs), out=dst)  # type: ignore[misc]
        if b is not None:
            np.add(dst, b(rs, cs), out=dst)
        if not direct:
            np.copyto(out[rs, cs], dst, casting="unsafe")

    _run_tasks(plan, x.nbytes + y.nbytes, _scratch(g, dt), task)
    return y


# -- backward_reduce ------------------------------------------------------------------------


@register_kernel("numpy", "backward_reduce")
def backward_reduce(
    dy: Any, x: Any, mean: Any, /, *, axis: int, xp: ModuleType | None = None
) -> tuple[Any, Any]:
    g = _geometry(x, axis, dy)
    dt = _float_dtype(mean)
    if g is None or dt is None:
        return NotImplemented
    nbk = _compiled()
    if nbk is not None and x.dtype == dy.dtype == dt:
        return _nb_backward_reduce(nbk, g, dy, x, mean, dt)  # compiled: nothing warns
    with np.errstate(all="ignore"):  # inf and NaN propagate as in torch, without warnings
        return _passes_backward_reduce(g, dy, x, mean, dt)


def _passes_backward_reduce(
    g: _Geom, dy: np.ndarray, x: np.ndarray, mean: Any, dt: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    mx, mdy = g.matrix(x), g.matrix(dy)
    mu = g.coef(mean, dt)
    ones = g.ones(dt)
    plan = g.red
    if g.rows:
        p_dy, p_dyx = (np.empty(g.nrows, dtype=dt) for _ in range(2))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = plan.block(i)
            d = _load(mdy[rs], dt, s, 1)
            c = _view(s[0], d.shape)
            np.subtract(_load(mx[rs], dt, s, 0), mu(rs, cs), out=c)  # type: ignore[misc]
            p_dy[rs] = d @ ones[: g.L]
            p_dyx[rs] = np.vecdot(c, d)
    else:
        P = g.red_counts.shape[0]  # type: ignore[union-attr]
        p_dy, p_dyx = (np.empty((P, g.C)) for _ in range(2))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = plan.block(i)
            p, c0, nch = g.slot(i)
            m = mu(rs, cs)  # type: ignore[misc]
            sd: Any = None
            sx: Any = None
            for sub in g.sub_blocks(rs):
                d = _load(mdy[sub, cs], dt, s, 1)
                c = _view(s[0], d.shape)
                np.subtract(_load(mx[sub, cs], dt, s, 0), m, out=c)
                sd, sx = _add_cols(sd, ones[: d.shape[0]] @ d), _add_cols(sx, np.einsum("ij,ij->j", c, d))
            p_dy[p, c0 : c0 + nch] = g.per_channel(sd, cs, nch)
            p_dyx[p, c0 : c0 + nch] = g.per_channel(sx, cs, nch)

    _run_tasks(plan, x.nbytes + dy.nbytes, _scratch(g, dt), task)
    if g.rows:
        p_dy, p_dyx = _rows_by_channel(p_dy, g), _rows_by_channel(p_dyx, g)
    # partials are added in float64 in a fixed order and rounded once
    return _sum_rows(p_dy, dt), _sum_rows(p_dyx, dt)


def _sum_rows(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    """Partials (P, C) added in float64 in a fixed order, rounded once to ``dt``."""
    return (a[0] if a.shape[0] == 1 else a.sum(axis=0)).astype(dt)


# -- backward_apply -------------------------------------------------------------------------


@register_kernel("numpy", "backward_apply")
def backward_apply(
    dy: Any,
    x: Any,
    mean: Any,
    k_dy: Any,
    k_xmu: Any,
    k_const: Any,
    /,
    *,
    axis: int,
    xp: ModuleType | None = None,
) -> Any:
    g = _geometry(x, axis, dy)
    dt = _float_dtype(k_dy)
    if g is None or dt is None:
        return NotImplemented
    nbk = _compiled()
    if nbk is not None and x.dtype == dy.dtype == dt:
        return _nb_backward_apply(nbk, g, dy, x, (mean, k_dy, k_xmu, k_const), dt)
    with np.errstate(all="ignore"):
        return _passes_backward_apply(g, dy, x, mean, k_dy, k_xmu, k_const, dt)


def _passes_backward_apply(
    g: _Geom, dy: np.ndarray, x: np.ndarray, mean: Any, k_dy: Any, k_xmu: Any, k_const: Any, dt: np.dtype
) -> np.ndarray:
    dx = g.empty_like(dy.dtype)
    mx, mdy, out = g.matrix(x), g.matrix(dy), g.matrix(dx)
    direct = dy.dtype == dt
    plan = g.map
    folded = _fold_backward(mean, k_dy, k_xmu, k_const, dt)
    if folded is not None:
        centre, ratio = (g.coef(v, dt) for v in folded)
        scale = g.coef(k_dy, dt)

        def task(i: int, s: _Scratch) -> None:
            rs, cs = plan.block(i)
            dst = out[rs, cs] if direct else _view(s[2], (rs.stop - rs.start, cs.stop - cs.start))
            np.subtract(_load(mx[rs, cs], dt, s, 1), centre(rs, cs), out=dst)  # type: ignore[misc]
            np.multiply(dst, ratio(rs, cs), out=dst)  # type: ignore[misc]
            np.add(dst, _load(mdy[rs, cs], dt, s, 1), out=dst)
            np.multiply(dst, scale(rs, cs), out=dst)  # type: ignore[misc]
            if not direct:
                np.copyto(out[rs, cs], dst, casting="unsafe")

    else:
        mu, a, b, c0 = (g.coef(v, dt) for v in (mean, k_dy, k_xmu, k_const))

        def task(i: int, s: _Scratch) -> None:
            rs, cs = plan.block(i)
            shape = (rs.stop - rs.start, cs.stop - cs.start)
            dst = out[rs, cs] if direct else _view(s[2], shape)
            tmp = _view(s[0], shape)
            np.subtract(_load(mx[rs, cs], dt, s, 1), mu(rs, cs), out=dst)  # type: ignore[misc]
            np.multiply(dst, b(rs, cs), out=dst)  # type: ignore[misc]
            np.multiply(_load(mdy[rs, cs], dt, s, 1), a(rs, cs), out=tmp)  # type: ignore[misc]
            np.add(dst, tmp, out=dst)
            np.add(dst, c0(rs, cs), out=dst)  # type: ignore[misc]
            if not direct:
                np.copyto(out[rs, cs], dst, casting="unsafe")

    _run_tasks(plan, x.nbytes + 2 * dy.nbytes, _scratch(g, dt), task)
    return dx


def _fold_backward(
    mean: Any, k_dy: Any, k_xmu: Any, k_const: Any, dt: np.dtype
) -> tuple[np.ndarray, np.ndarray] | None:
    """(centre, ratio) with dx = ((x - centre) * ratio + dy) * k_dy, or None where that fails.

    dy * k_dy + (x - mean) * k_xmu + k_const has five elementwise passes in NumPy; this form
    has four. The constant moves into the centre, centre = mean - delta with delta =
    k_const / k_xmu, not into a term x * k_xmu. The subtraction x - centre is then accurate,
    but the centre itself is rounded to the compute dtype, an error of ulp(centre) / 2 in every
    x - centre, which k_xmu carries into dx: harmless next to the k_const term (delta * k_xmu)
    the five-pass form adds while |centre| <= 64 |delta|, and unbounded when a large mean meets
    a small delta (measured before this rule: 2.6e-2 relative error in dx for float32
    1e4 + N(0, 1) with 3 values per channel, where the five-pass form gives 6e-8). So it folds
    only when every channel meets that bound, and k_xmu and k_dy are nonzero everywhere (gamma
    = 0, as in a zero-initialised residual branch, or sum(dy * (x - mean)) = 0 exactly, take
    the five-pass form).
    """
    kd, kx = np.asarray(k_dy), np.asarray(k_xmu)
    if not (kd.all() and kx.all()):
        return None
    # float64, a wide C's few temporaries at a time
    kx = kx.astype(np.float64)
    delta = np.array(k_const, dtype=np.float64)
    delta /= kx
    centre = np.subtract(np.asarray(mean, np.float64), delta)
    np.abs(delta, out=delta)
    delta *= _FOLD_MAX_CENTRE
    if not (np.abs(centre) <= delta).all():  # NaN fails too
        return None
    centre = centre.astype(dt)
    kx /= kd
    ratio = kx.astype(dt)
    # an inf or nan anywhere shows in the sum (as may an overflowing sum: then too, no fold)
    if not (np.isfinite(centre.sum() + ratio.sum()) and ratio.all()):
        return None
    return centre, ratio


# See _fold_backward: the largest |centre| / |k_const / k_xmu| the fold accepts.
_FOLD_MAX_CENTRE = 64.0


# -- the compiled route (numba) -------------------------------------------------------------
# One pass per op; the same kind of partials and the same float64 merge as the NumPy passes.
# Inputs that need a dtype conversion (float16, mixed dtypes) stay on the NumPy passes.


def _nb_threads(nbk: Any, nbytes: int) -> None:
    # every compiled loop hands out blocks of about a chunk each, one at a time
    nbk.set_threads(_num_threads if nbytes >= _PARALLEL_MIN_BYTES else 1, 1)


def _nb_vec(v: Any, dt: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(v, dtype=dt)


def _nb_batch_stats(nbk: Any, g: _Geom, x: np.ndarray, dt: np.dtype) -> tuple[np.ndarray, np.ndarray, bool]:
    _nb_threads(nbk, x.nbytes)
    p = g.nb_plan(x.itemsize)
    ctr, d, q = (np.empty((p.nblocks, p.Ck)) for _ in range(3))
    v = x.transpose(g.order) if g.order else x
    if p.rows:
        nbk.rows_stats(v.reshape(g.outer, p.Ck, p.L), p.nb, p.cs, ctr, d, q)
    else:
        nbk.cols_stats(v.reshape(g.outer, g.C * g.inner), g.inner, p.nb, p.cs, ctr, d, q)
    if p.k > 1:  # sub-rows: (blocks, C, k) -> (blocks * k, C)
        ctr, d, q = (a.reshape(p.nblocks, g.C, p.k).transpose(0, 2, 1).reshape(-1, g.C) for a in (ctr, d, q))
    mean, var = np.empty(g.C, dt), np.empty(g.C, dt)
    # the same merge as _chan_merge, compiled: a dozen NumPy calls cost more than the pass
    # itself on small inputs
    finite = nbk.chan_merge(ctr, d, q, p.counts, float(x.size // g.C), mean, var)
    return mean, var, finite


def _nb_scale_shift(nbk: Any, g: _Geom, x: np.ndarray, scale: Any, shift: Any, dt: np.dtype) -> np.ndarray:
    _nb_threads(nbk, 2 * x.nbytes)
    y = g.empty_like(x.dtype)
    b = np.zeros(g.C, dt) if shift is None else shift
    if g.nb_rows():
        nbk.rows_affine(g.nb_matrix(x), _nb_vec(scale, dt), _nb_vec(b, dt), g.C, g.nb_block(), g.nb_matrix(y))
    else:
        nbk.cols_affine(g.nb_matrix(x), g.nb_cols(scale, dt), g.nb_cols(b, dt), g.nb_block(), g.nb_matrix(y))
    return y


def _nb_backward_reduce(
    nbk: Any, g: _Geom, dy: np.ndarray, x: np.ndarray, mean: Any, dt: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    _nb_threads(nbk, 2 * x.nbytes)
    p = g.nb_plan(x.itemsize)
    sdy, sdx = np.empty((p.nblocks, p.Ck)), np.empty((p.nblocks, p.Ck))
    vx = x.transpose(g.order) if g.order else x
    vdy = dy.transpose(g.order) if g.order else dy
    m = _nb_vec(mean, dt)
    if p.rows:
        m = np.repeat(m, p.k) if p.k > 1 else m
        r3 = (g.outer, p.Ck, p.L)
        nbk.rows_backward_reduce(vx.reshape(r3), vdy.reshape(r3), m, p.nb, p.cs, sdy, sdx)
    else:
        r2 = (g.outer, g.C * g.inner)
        nbk.cols_backward_reduce(vx.reshape(r2), vdy.reshape(r2), m, g.inner, p.nb, p.cs, sdy, sdx)
    # float64 sums of the partials, in a fixed order
    s_dy, s_dx = np.empty(g.C, dt), np.empty(g.C, dt)
    nbk.sum_partials(sdy, p.k, s_dy)
    nbk.sum_partials(sdx, p.k, s_dx)
    return s_dy, s_dx


def _nb_backward_apply(
    nbk: Any, g: _Geom, dy: np.ndarray, x: np.ndarray, coefs: tuple[Any, ...], dt: np.dtype
) -> np.ndarray:
    _nb_threads(nbk, 3 * x.nbytes)
    dx = g.empty_like(dy.dtype)
    mx, mdy, out = g.nb_matrix(x), g.nb_matrix(dy), g.nb_matrix(dx)
    if g.nb_rows():
        nbk.rows_backward_apply(mx, mdy, *(_nb_vec(v, dt) for v in coefs), g.C, g.nb_block(), out)
    else:
        nbk.cols_backward_apply(mx, mdy, *(g.nb_cols(v, dt) for v in coefs), g.nb_block(), out)
    return dx


# -- whole steps on the compiled engine: the passes above plus the per-channel epilogues in
# one compiled call each (xbn.functional spends a dozen NumPy operations on C values there,
# about 15 us a training step, as much as the passes of a small input). The results are the
# generic composition's bit for bit; anything else (the NumPy passes, float16, vectors of
# another dtype) takes the composition itself.


def _nb_vectors(dt: np.dtype, c: int, *vectors: Any) -> bool:
    """Whether the epilogues take these per-channel vectors: each None, or an ndarray of ``dt``
    and length c."""
    return all(v is None or (type(v) is np.ndarray and v.dtype == dt and v.shape == (c,)) for v in vectors)


def _nb_step(x: Any, axis: int, *vectors: Any, dy: Any = None) -> tuple[Any, _Geom] | None:
    """(compiled loops, geometry) for a whole step on ``x`` (and ``dy``) with these per-channel
    vectors, or None where the composition is to run: the NumPy passes, float16 input, an
    unsupported layout, vectors of another dtype."""
    nbk = _compiled()
    if nbk is None:
        return None
    g = _geometry(x, axis, *(() if dy is None else (dy,)))
    if g is None or x.dtype != _cdtype(x) or (dy is not None and dy.dtype != x.dtype):
        return None
    return (nbk, g) if _nb_vectors(x.dtype, g.C, *vectors) else None


def _nb_normalize(
    nbk: Any,
    g: _Geom,
    x: np.ndarray,
    mean: Any,
    var: Any,
    weight: Any,
    bias: Any,
    eps: float,
    *,
    constant_channels: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(y, invstd): y = (x - mean) * invstd * weight + bias as one compiled scale-shift pass,
    its coefficients from one epilogue call. ``constant_channels``: var is the batch's, and a
    channel with var == 0 gets scale 0 (y exactly its bias), as xbn.functional.normalize does."""
    dt = x.dtype
    inv, scale, shift = (np.empty(g.C, dt) for _ in range(3))
    k = np.array([eps, 1.0, 0.0], dt)
    nbk.affine_coefficients(
        mean, var, _nb_arg(weight, dt), _nb_arg(bias, dt), k, constant_channels, inv, scale, shift
    )
    return _nb_scale_shift(nbk, g, x, scale, shift, dt), inv


def _nb_arg(v: Any, dt: np.dtype) -> np.ndarray:
    """A vector for the compiled epilogues: contiguous, or empty for None."""
    return np.empty(0, dt) if v is None else _nb_vec(v, dt)


@register_kernel("numpy", "batch_norm_forward")
def batch_norm_forward(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    momentum: float = 0.1,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> Any:
    step = _nb_step(x, axis, weight, bias, running_mean, running_var)
    if step is None:
        return NotImplemented
    nbk, g = step
    dt, C = x.dtype, g.C
    count = x.size // C
    update = running_mean is not None and running_var is not None
    if update and count < 2:
        return NotImplemented  # the composition raises its error for the unbiased variance
    mean, var = batch_stats(x, axis=axis)
    y, inv = _nb_normalize(nbk, g, x, mean, var, weight, bias, eps, constant_channels=True)
    if not update:
        return y, mean, inv, None, None
    new_mean, new_var = np.empty(C, dt), np.empty(C, dt)
    k = np.array([1.0 - momentum, momentum, count / (count - 1)], dt)
    nbk.running_update(_nb_arg(running_mean, dt), _nb_arg(running_var, dt), mean, var, k, new_mean, new_var)
    return y, mean, inv, new_mean, new_var


@register_kernel("numpy", "batch_norm_backward")
def batch_norm_backward(
    dy: Any,
    x: Any,
    mean: Any,
    inv: Any,
    weight: Any,
    /,
    *,
    axis: int,
    batch_stats_used: bool = True,
    need_param_grads: bool = True,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> Any:
    # an eval-mode backward (dx = dy * k_dy) is the composition's one small pass
    needed = batch_stats_used and mean is not None and inv is not None
    step = _nb_step(x, axis, mean, inv, weight, dy=dy) if needed else None
    if step is None:
        return NotImplemented
    nbk, g = step
    dt, C = x.dtype, g.C
    mean, inv = _nb_vec(mean, dt), _nb_vec(inv, dt)
    sum_dy, sum_dy_xmu = _nb_backward_reduce(nbk, g, dy, x, mean, dt)
    k_dy, k_xmu, k_const, dgamma = (np.empty(C, dt) for _ in range(4))
    k = np.array([x.size // C], dt)
    nbk.backward_coefficients(sum_dy, sum_dy_xmu, inv, _nb_arg(weight, dt), k, k_dy, k_xmu, k_const, dgamma)
    dx = _nb_backward_apply(nbk, g, dy, x, (mean, k_dy, k_xmu, k_const), dt)
    return dx, dgamma, sum_dy


@register_kernel("numpy", "batch_norm_inference")
def batch_norm_inference(
    x: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> Any:
    # float64 running statistics with float32 input are declined: the composition computes
    # in float64 then
    step = _nb_step(x, axis, weight, bias, running_mean, running_var)
    if step is None or running_mean is None or running_var is None:
        return NotImplemented
    nbk, g = step
    rm, rv = _nb_vec(running_mean, x.dtype), _nb_vec(running_var, x.dtype)
    return _nb_normalize(nbk, g, x, rm, rv, weight, bias, eps, constant_channels=False)[0]
