"""Compiled single-pass loops for the NumPy backend, used when numba is installed.

Each NumPy pass of :mod:`xbn.kernels.numpy` streams its chunk through memory once more; on the
reference shapes that leaves it 2-5x above the memory-bandwidth floor however the chunks are
cut. These loops fuse every op into one pass over x (and dy), which is what reaches the floor:
measured 1.7-5x faster than the NumPy passes on one thread, and faster than PyTorch's CPU
kernels on every reference shape (see benchmarks/results/).

The numerics are those of the NumPy passes: one partial per (block of rows, channel), summed
in one pass about a shift that is a value of the channel there (see the reductions below),
merged in float64 by :func:`chan_merge` in a fixed order. ``reassoc`` lets LLVM vectorize the
sums; their order is then fixed by the compiled code, the same on every call, and a partial
never spans threads, so results are bitwise reproducible for a given thread count whatever the
timing. One thread runs a serial build and more threads a parallel build, which LLVM may
vectorize differently: between 1 and 2 threads, float32 results can differ in the last bit
(seen: 3e-5 on sums of 380). Spelling the sums out in fixed lanes under strict IEEE arithmetic
would make them equal by construction, but LLVM then keeps the lane accumulators in memory and
the row statistics run 3-4x slower. No ``nnan``/``ninf``: NaN and inf propagate as in NumPy.

Threads: numba's work-queue threading layer (the one a pip install falls back to without TBB
or an OpenMP runtime, and the one to use next to torch) aborts the process when two threads
enter a parallel region at once. Parallel calls therefore take a process-wide lock until numba
reports a thread-safe layer (``omp``, ``tbb``); one-thread calls run the serial builds, which
involve no threading layer and never wait.

:mod:`xbn.kernels.numpy` imports this module on first use; without numba it still imports
(so that doctest collection and introspection work) with ``AVAILABLE = False``, and the NumPy
passes are used. The first call of each loop compiles it (about a second; cached on disk
afterwards, next to this file or in numba's user cache directory).
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import numba as nb
    from numba import prange
except ImportError:
    nb = None
    prange = range
AVAILABLE = nb is not None

_FAST = {"reassoc", "nsz", "contract"}


class _Loop:
    """A loop compiled twice: ``parallel`` (prange spread over numba's threads) and ``serial``
    (prange as range). One-thread calls take the serial one: no threading layer involved, which
    is both faster on small inputs and free of the layers' side effects (numba's OpenMP layer
    changes the OpenMP thread count that torch reads; its work-queue layer wakes its workers
    even for one thread).

    Parallel calls hold ``_PARALLEL_LOCK`` unless the threading layer is known to be thread-safe:
    numba's work-queue layer aborts the whole process (SIGABRT, not an exception) when two
    threads enter a parallel region at once, and it is the layer a pip install without TBB or
    a libgomp falls back to (and the one to use next to torch)."""

    def __init__(self, fn: Callable[..., Any]):
        self.py = fn
        if nb is not None:  # else never called: xbn.kernels.numpy checks AVAILABLE first
            self.parallel = nb.njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)(fn)
            # A twin function object under its own name: numba's on-disk cache is keyed by the
            # function's name and signature, not by parallel=, so two builds of one function
            # would load each other's machine code (seen: the parallel build running serially).
            twin = types.FunctionType(
                fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
            )
            twin.__qualname__ = fn.__qualname__ + "_serial"
            twin.__module__ = fn.__module__
            self.serial = nb.njit(fastmath=_FAST, cache=True, nogil=True)(twin)

    def __call__(self, *args: Any) -> Any:
        if _state().threads <= 1:
            return self.serial(*args)
        if _layer_threadsafe:
            return self.parallel(*args)
        with _PARALLEL_LOCK:  # nogil loops: waiting threads release the GIL meanwhile
            return self.parallel(*args)


def _jit(fn: Callable[..., Any]) -> _Loop:
    return _Loop(fn)


# -- elementwise, rows: R is (outer * C, L), row r holds L values of channel r % C; blocks of
# `rb` rows --------------------------------------------------------------------------------


@_jit
def rows_affine(R, a, b, C, rb, Y):  # pragma: no cover - compiled
    n, L = R.shape
    for bi in prange((n + rb - 1) // rb):
        for r in range(bi * rb, min(n, bi * rb + rb)):
            ar = a[r % C]
            br = b[r % C]
            for j in range(L):
                Y[r, j] = R[r, j] * ar + br


@_jit
def rows_backward_apply(X, D, mean, k_dy, k_xmu, k_const, C, rb, DX):  # pragma: no cover - compiled
    n, L = X.shape
    for bi in prange((n + rb - 1) // rb):
        for r in range(bi * rb, min(n, bi * rb + rb)):
            c = r % C
            m = mean[c]
            a = k_dy[c]
            b = k_xmu[c]
            k = k_const[c]
            for j in range(L):
                DX[r, j] = D[r, j] * a + (X[r, j] - m) * b + k


# -- elementwise, cols: X is (rows, W), column j has per-column coefficients; blocks of `blk`
# whole rows (strips of a wide W measured 1.4-1.6x slower than whole rows of 200000 columns:
# long streams prefetch best, and the coefficients come from L3 fast enough) ---------------


@_jit
def cols_affine(X, a, b, blk, Y):  # pragma: no cover - compiled
    M, W = X.shape
    nblocks = (M + blk - 1) // blk
    for bi in prange(nblocks):
        for i in range(bi * blk, min(M, bi * blk + blk)):
            for j in range(W):
                Y[i, j] = X[i, j] * a[j] + b[j]


@_jit
def cols_backward_apply(X, D, mean, k_dy, k_xmu, k_const, blk, DX):  # pragma: no cover - compiled
    M, W = X.shape
    nblocks = (M + blk - 1) // blk
    for bi in prange(nblocks):
        for i in range(bi * blk, min(M, bi * blk + blk)):
            for j in range(W):
                DX[i, j] = D[i, j] * k_dy[j] + (X[i, j] - mean[j]) * k_xmu[j] + k_const[j]


# -- reductions: partials per (block of outer rows, channel) ----------------------------------
# X is the (outer, C, L) view (rows_*) or the (outer, C*L) view (cols_*, short L). A task is
# a block of `nb` outer rows times a strip of `cs` channels, and it writes one partial per
# (block, channel) into row b of the (blocks, C) outputs: the caller sizes the blocks so that
# these stay a small fraction of x (never one per row of a tall input).
#
# Statistics are one pass about a shift s, the median of three of the block's values of the
# channel (its first, one in the middle, its last): d = sum(v - s), q = sum((v - s)^2). The
# merge takes q - d^2 / n in float64, which loses (mean - s)^2 / var of float32's digits
# relative to centred sums; a median of the channel's own values is within about one
# standard deviation of the mean (|median - mean| <= std for any distribution), where a
# plain first value could be an outlier. A constant channel has v - s == 0 exactly for
# every v, whatever the summation order, so its partial is (s, 0, 0) bit for bit.


@(nb.njit(inline="always", cache=True) if nb is not None else (lambda f: f))
def _median3(a, b, c):  # pragma: no cover - compiled
    return max(min(a, b), min(max(a, b), c))


@_jit
def rows_stats(X, nb, cs, ctr, d, q):  # pragma: no cover - compiled
    outer, C, L = X.shape
    nblocks = ctr.shape[0]
    nstrips = (C + cs - 1) // cs
    zero = X.dtype.type(0)
    for t in prange(nblocks * nstrips):
        b = t // nstrips
        c0 = (t - b * nstrips) * cs
        n0 = b * nb
        n1 = min(outer, n0 + nb)
        for c in range(c0, min(C, c0 + cs)):
            s = _median3(X[n0, c, 0], X[(n0 + n1 - 1) // 2, c, L // 2], X[n1 - 1, c, L - 1])
            sd = 0.0
            sq = 0.0
            for n in range(n0, n1):
                row = X[n, c]
                a = zero
                e = zero
                for j in range(L):
                    v = row[j] - s
                    a += v
                    e += v * v
                sd += a
                sq += e
            ctr[b, c] = s
            d[b, c] = sd
            q[b, c] = sq


@(nb.njit(inline="always", cache=True) if nb is not None else (lambda f: f))
def _cols_task(t, nstrips, cs, C, nb, M):  # pragma: no cover - compiled
    """Task t of a cols reduction: (block, its channels c0:c1, its rows r0:r1)."""
    b = t // nstrips
    c0 = (t - b * nstrips) * cs
    r0 = b * nb
    return b, c0, min(C, c0 + cs), r0, min(M, r0 + nb)


@(nb.njit(inline="always", cache=True) if nb is not None else (lambda f: f))
def _channel_totals(u, v, inner, nch, b, c0, out_u, out_v):  # pragma: no cover - compiled
    """out_u[b, c0 + k] and out_v[b, c0 + k]: float64 sums, in order, of the per-column sums u
    and v over channel k's ``inner`` columns, for the strip's nch channels."""
    for k in range(nch):
        su = 0.0
        sv = 0.0
        for jj in range(k * inner, (k + 1) * inner):
            su += u[jj]
            sv += v[jj]
        out_u[b, c0 + k] = su
        out_v[b, c0 + k] = sv


_COL_RUN = 32


@_jit
def cols_stats(X, inner, nb, cs, ctr, d, q):  # pragma: no cover - compiled
    M, W = X.shape
    C = W // inner
    nblocks = ctr.shape[0]
    nstrips = (C + cs - 1) // cs
    for t in prange(nblocks * nstrips):
        b, c0, c1, r0, r1 = _cols_task(t, nstrips, cs, C, nb, M)
        j0 = c0 * inner
        w = (c1 - c0) * inner
        sh = np.empty(w, X.dtype)
        for k in range(c1 - c0):
            col = j0 + k * inner
            s = _median3(X[r0, col], X[(r0 + r1 - 1) // 2, col + inner // 2], X[r1 - 1, col + inner - 1])
            for jj in range(k * inner, (k + 1) * inner):
                sh[jj] = s
        # float32 sums down _COL_RUN rows at a time, added into float64 ones: a float32 running
        # sum down a whole block (up to 4096 rows) loses digits that the merge's q - d^2/n
        # amplifies (measured: 1e-5 relative error of the variance of a bimodal channel), and
        # float64 running sums convert every value and vectorize at half the width (1.6-2x
        # slower in cache, which the narrow (N, C) shapes are bound by); runs of 32 keep the
        # variance within 3e-7 of float64's
        sd = np.zeros(w)
        sq = np.zeros(w)
        a = np.empty(w, X.dtype)
        e = np.empty(w, X.dtype)
        for i0 in range(r0, r1, _COL_RUN):
            i1 = min(r1, i0 + _COL_RUN)
            a[:] = 0
            e[:] = 0
            if nstrips == 1:  # whole rows, indexed directly: a row view per row costs 25% at 16 columns
                for i in range(i0, i1):
                    for jj in range(W):
                        v = X[i, jj] - sh[jj]
                        a[jj] += v
                        e[jj] += v * v
            else:
                for i in range(i0, i1):
                    row = X[i, j0 : j0 + w]
                    for jj in range(w):
                        v = row[jj] - sh[jj]
                        a[jj] += v
                        e[jj] += v * v
            for jj in range(w):
                sd[jj] += a[jj]
                sq[jj] += e[jj]
        for k in range(c1 - c0):
            ctr[b, c0 + k] = sh[k * inner]
        _channel_totals(sd, sq, inner, c1 - c0, b, c0, d, q)


@_jit
def rows_backward_reduce(X, D, mean, nb, cs, sdy, sdx):  # pragma: no cover - compiled
    outer, C, L = X.shape
    nblocks = sdy.shape[0]
    nstrips = (C + cs - 1) // cs
    zero = X.dtype.type(0)
    for t in prange(nblocks * nstrips):
        b = t // nstrips
        c0 = (t - b * nstrips) * cs
        n0 = b * nb
        n1 = min(outer, n0 + nb)
        for c in range(c0, min(C, c0 + cs)):
            m = mean[c]
            sa = 0.0
            sb = 0.0
            for n in range(n0, n1):
                x = X[n, c]
                g = D[n, c]
                a = zero
                e = zero
                for j in range(L):
                    a += g[j]
                    e += g[j] * (x[j] - m)
                sa += a
                sb += e
            sdy[b, c] = sa
            sdx[b, c] = sb


@_jit
def cols_backward_reduce(X, D, mean, inner, nb, cs, sdy, sdx):  # pragma: no cover - compiled
    M, W = X.shape
    C = W // inner
    nblocks = sdy.shape[0]
    nstrips = (C + cs - 1) // cs
    for t in prange(nblocks * nstrips):
        b, c0, c1, r0, r1 = _cols_task(t, nstrips, cs, C, nb, M)
        j0 = c0 * inner
        w = (c1 - c0) * inner
        mu = np.empty(w, X.dtype)
        for jj in range(w):
            mu[jj] = mean[c0 + jj // inner]
        a = np.zeros(w, X.dtype)
        e = np.zeros(w, X.dtype)
        if nstrips == 1:
            for i in range(r0, r1):
                for jj in range(W):
                    a[jj] += D[i, jj]
                    e[jj] += D[i, jj] * (X[i, jj] - mu[jj])
        else:
            for i in range(r0, r1):
                x = X[i, j0 : j0 + w]
                g = D[i, j0 : j0 + w]
                for jj in range(w):
                    a[jj] += g[jj]
                    e[jj] += g[jj] * (x[jj] - mu[jj])
        _channel_totals(a, e, inner, c1 - c0, b, c0, sdy, sdx)


@(nb.njit(cache=True, nogil=True) if nb is not None else (lambda f: f))
def chan_merge(ctr, d, q, n, count, mean, var):  # pragma: no cover - compiled
    """The float64 merge of xbn.kernels.numpy._chan_merge, one sequential loop per channel
    (a fixed order); n is (P, 1) or (P, C) partial counts, 0 where a channel is absent.
    Returns whether every mean and variance is finite (else the caller recomputes those
    channels the plain way)."""
    P, C = ctr.shape
    wide = n.shape[1] > 1
    finite = True
    if P == 1 and not wide:  # one block of rows (a wide input): the loop below, for P = 1
        k = n[0, 0]
        for c in range(C):
            dn = d[0, c] / k
            mean[c] = ctr[0, c] + dn
            m2 = q[0, c] - d[0, c] * dn
            if m2 < 0.0:
                m2 = 0.0
            var[c] = m2 / count
            # x - x is 0 for finite x and NaN for inf or NaN: no call per channel
            finite = finite and mean[c] - mean[c] == 0.0 and var[c] - var[c] == 0.0
        return finite
    for c in range(C):
        ref = 0.0
        found = False
        s1 = 0.0
        s2 = 0.0
        sq = 0.0
        for p in range(P):
            k = n[p, c] if wide else n[p, 0]
            if k <= 0:
                continue
            dn = d[p, c] / k
            u = ctr[p, c] + dn
            if not found:
                ref = u
                found = True
            u -= ref
            s1 += k * u
            s2 += k * u * u
            sq += q[p, c] - d[p, c] * dn
        ubar = s1 / count
        mean[c] = ref + ubar
        m2 = sq + s2 - count * ubar * ubar
        if m2 < 0.0:  # rounding only; NaN (from inf or NaN input) is kept
            m2 = 0.0
        var[c] = m2 / count
        finite = finite and mean[c] - mean[c] == 0.0 and var[c] - var[c] == 0.0
    return finite


@(nb.njit(cache=True, nogil=True) if nb is not None else (lambda f: f))
def sum_partials(a, k, out):  # pragma: no cover - compiled
    """out[c] = the sum of a[:, c*k:(c+1)*k] in float64, in a fixed order, rounded once to
    out's dtype (no NumPy warning for inf - inf or an overflowing cast: those are results)."""
    P = a.shape[0]
    for c in range(out.shape[0]):
        s = 0.0
        for p in range(P):
            for kk in range(c * k, (c + 1) * k):
                s += a[p, kk]
        out[c] = s


# -- per-channel epilogues: the small vector arithmetic of xbn.functional around the passes,
# one compiled call instead of a dozen NumPy operations on C values (which cost more than the
# passes themselves on small inputs). Compiled without fastmath, every operation in the
# arrays' dtype and in xbn.functional's order, so each result is rounded as NumPy rounds it
# there: the same bits as the generic composition. Constants come in ``k``, already in that
# dtype (a Python float meets a float32 array as a float32 in NumPy). An absent weight or bias
# is an array of length 0.


@(nb.njit(cache=True, nogil=True) if nb is not None else (lambda f: f))
def affine_coefficients(mean, var, weight, bias, k, zero_constant, inv, scale, shift):  # pragma: no cover
    """inv = 1 / sqrt(var + eps); scale = inv * weight (inv without one), 0 where var == 0 if
    ``zero_constant`` (a constant channel normalizes to exactly its bias); shift = -mean *
    scale + bias. k = [eps, 1, 0]."""
    has_w = weight.shape[0] > 0
    has_b = bias.shape[0] > 0
    for c in range(mean.shape[0]):
        iv = k[1] / np.sqrt(var[c] + k[0])
        inv[c] = iv
        sc = iv * weight[c] if has_w else iv
        if zero_constant and var[c] == 0:
            sc = k[2]
        scale[c] = sc
        sh = -mean[c] * sc
        shift[c] = sh + bias[c] if has_b else sh


@(nb.njit(cache=True, nogil=True) if nb is not None else (lambda f: f))
def running_update(running_mean, running_var, mean, var, k, new_mean, new_var):  # pragma: no cover - compiled
    """(1 - m) * running + m * batch, the variance unbiased; k = [1 - m, m, M / (M - 1)]."""
    for c in range(mean.shape[0]):
        new_mean[c] = k[0] * running_mean[c] + k[1] * mean[c]
        new_var[c] = k[0] * running_var[c] + k[1] * (var[c] * k[2])


@(nb.njit(cache=True, nogil=True) if nb is not None else (lambda f: f))
def backward_coefficients(sdy, sdx, inv, weight, k, k_dy, k_xmu, k_const, dgamma):  # pragma: no cover
    """From sdy = sum(dy) and sdx = sum(dy * (x - mean)): k_dy = inv * weight; k_xmu = -k_dy *
    (inv * (inv * (sdx / M))); k_const = -k_dy * sdy / M; dgamma = sdx * inv. k = [M]."""
    has_w = weight.shape[0] > 0
    for c in range(inv.shape[0]):
        kd = inv[c] * weight[c] if has_w else inv[c]
        k_dy[c] = kd
        k_xmu[c] = -kd * (inv[c] * (inv[c] * (sdx[c] / k[0])))
        k_const[c] = -kd * sdy[c] / k[0]
        dgamma[c] = sdx[c] * inv[c]


_local = threading.local()
_PARALLEL_LOCK = threading.Lock()
# numba names its threading layer only once the first parallel region is set up (in
# set_threads below); until then, and for the work queue, parallel calls take the lock.
_layer_threadsafe = False
_THREADSAFE_LAYERS = ("omp", "tbb")


def _state() -> Any:
    st = _local.__dict__
    if "threads" not in st:
        _local.threads, _local.applied = 1, None
    return _local


def threading_layer() -> str | None:
    """numba's threading layer once a parallel loop has been set up, else None."""
    try:
        return str(nb.threading_layer())
    except ValueError:
        return None


def set_threads(n: int, chunk: int) -> None:
    """Run this thread's next loops on ``n`` threads (at most numba's pool; 1 = the serial
    build), handing out ``chunk`` iterations at a time: dynamic scheduling, so that a core busy
    with another process delays one chunk rather than half the work. Which thread runs an
    iteration never changes its result. numba's settings are per calling thread, so threads
    that use xbn at the same time do not change each other's."""
    global _layer_threadsafe
    st = _state()
    st.threads = max(1, min(n, nb.config.NUMBA_NUM_THREADS))
    if st.threads > 1 and st.applied != (st.threads, chunk):  # numba's setters cost ~10 us
        nb.set_num_threads(st.threads)  # starts the threading layer on first use
        nb.set_parallel_chunksize(max(1, chunk))
        st.applied = (st.threads, chunk)
        if not _layer_threadsafe:
            _layer_threadsafe = threading_layer() in _THREADSAFE_LAYERS
