"""Compiled single-pass loops for the NumPy backend, used when numba is installed.

Each NumPy pass of :mod:`xbn.kernels.numpy` streams its chunk through memory once more; on the
reference shapes that leaves it 2-5x above the memory-bandwidth floor however the chunks are
cut. These loops fuse every op into one pass over x (and dy), which is what reaches the floor:
measured 1.7-5x faster than the NumPy passes on one thread, and faster than PyTorch's CPU
kernels on every reference shape (see benchmarks/results/).

The numerics are those of the NumPy passes: each row (a run of one channel's values) or each
column of a block of rows is a partial, centred on its own rounded mean in a second pass over
data still in cache, and the partials are merged in float64 by the caller in a fixed order.
``reassoc`` lets LLVM vectorize the sums; their order is then fixed by the compiled code, the
same on every call, and a partial never spans threads, so results are bitwise reproducible
for a given thread count whatever the timing. One thread runs a serial build and more threads
a parallel build, which LLVM may vectorize differently: between 1 and 2 threads, float32
results can differ in the last bit (seen: 3e-5 on sums of 380). Spelling the sums out in
fixed lanes under strict IEEE arithmetic would make them equal by construction, but LLVM then
keeps the lane accumulators in memory and the row statistics run 3-4x slower. No
``nnan``/``ninf``: NaN and inf propagate as in NumPy.

:mod:`xbn.kernels.numpy` imports this module on first use; without numba it still imports
(so that doctest collection and introspection work) with ``AVAILABLE = False``, and the NumPy
passes are used. The first call of each loop compiles it (about a second; cached on disk
afterwards, next to this file or in numba's user cache directory).
"""

from __future__ import annotations

import threading
import types
from typing import Any, Callable

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
    even for one thread)."""

    def __init__(self, fn: Callable[..., Any]):
        self.py = fn
        if nb is not None:  # else never called: xbn.kernels.numpy checks AVAILABLE first
            self.parallel = nb.njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)(fn)
            # A twin function object under its own name: numba's on-disk cache is keyed by the
            # function's name and signature, not by parallel=, so two builds of one function
            # would load each other's machine code (seen: the parallel build running serially).
            twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                      fn.__defaults__, fn.__closure__)
            twin.__qualname__ = fn.__qualname__ + "_serial"
            twin.__module__ = fn.__module__
            self.serial = nb.njit(fastmath=_FAST, cache=True, nogil=True)(twin)

    def __call__(self, *args: Any) -> Any:
        return (self.parallel if _state().threads > 1 else self.serial)(*args)


def _jit(fn: Callable[..., Any]) -> _Loop:
    return _Loop(fn)


# -- rows: R is (outer * C, L), row r holds L values of channel r % C ---------------------------


@_jit
def rows_stats(R, ctr, d, q):  # pragma: no cover - compiled
    n, L = R.shape
    inv_l = 1.0 / L
    for r in prange(n):
        row = R[r]
        s = row.dtype.type(0)
        for j in range(L):
            s += row[j]
        c0 = row.dtype.type(s * inv_l)
        sd = row.dtype.type(0)
        sq = row.dtype.type(0)
        for j in range(L):
            v = row[j] - c0
            sd += v
            sq += v * v
        ctr[r] = c0
        d[r] = sd
        q[r] = sq


@_jit
def rows_affine(R, a, b, C, Y):  # pragma: no cover - compiled
    n, L = R.shape
    for r in prange(n):
        ar = a[r % C]
        br = b[r % C]
        for j in range(L):
            Y[r, j] = R[r, j] * ar + br


@_jit
def rows_backward_reduce(X, D, mean, C, sdy, sdx):  # pragma: no cover - compiled
    n, L = X.shape
    for r in prange(n):
        m = mean[r % C]
        a = X.dtype.type(0)
        b = X.dtype.type(0)
        for j in range(L):
            g = D[r, j]
            a += g
            b += g * (X[r, j] - m)
        sdy[r] = a
        sdx[r] = b


@_jit
def rows_backward_apply(X, D, mean, k_dy, k_xmu, k_const, C, DX):  # pragma: no cover - compiled
    n, L = X.shape
    for r in prange(n):
        c = r % C
        m = mean[c]
        a = k_dy[c]
        b = k_xmu[c]
        k = k_const[c]
        for j in range(L):
            DX[r, j] = D[r, j] * a + (X[r, j] - m) * b + k


# -- cols: X is (rows, W), column j has per-column coefficients; blocks of `blk` rows ---------


@_jit
def cols_stats(X, blk, ctr, d, q):  # pragma: no cover - compiled
    M, W = X.shape
    nblocks = ctr.shape[0]
    for bi in prange(nblocks):
        r0 = bi * blk
        r1 = min(M, r0 + blk)
        s = np.zeros(W, X.dtype)
        for i in range(r0, r1):
            for j in range(W):
                s[j] += X[i, j]
        c0 = np.empty(W, X.dtype)
        inv_n = 1.0 / (r1 - r0)
        for j in range(W):
            c0[j] = s[j] * inv_n
        sd = np.zeros(W, X.dtype)
        sq = np.zeros(W, X.dtype)
        for i in range(r0, r1):
            for j in range(W):
                v = X[i, j] - c0[j]
                sd[j] += v
                sq[j] += v * v
        for j in range(W):
            ctr[bi, j] = c0[j]
            d[bi, j] = sd[j]
            q[bi, j] = sq[j]


@_jit
def cols_affine(X, a, b, blk, Y):  # pragma: no cover - compiled
    M, W = X.shape
    nblocks = (M + blk - 1) // blk
    for bi in prange(nblocks):
        for i in range(bi * blk, min(M, bi * blk + blk)):
            for j in range(W):
                Y[i, j] = X[i, j] * a[j] + b[j]


@_jit
def cols_backward_reduce(X, D, mean, blk, sdy, sdx):  # pragma: no cover - compiled
    M, W = X.shape
    nblocks = sdy.shape[0]
    for bi in prange(nblocks):
        a = np.zeros(W, X.dtype)
        b = np.zeros(W, X.dtype)
        for i in range(bi * blk, min(M, bi * blk + blk)):
            for j in range(W):
                g = D[i, j]
                a[j] += g
                b[j] += g * (X[i, j] - mean[j])
        for j in range(W):
            sdy[bi, j] = a[j]
            sdx[bi, j] = b[j]


@_jit
def cols_backward_apply(X, D, mean, k_dy, k_xmu, k_const, blk, DX):  # pragma: no cover - compiled
    M, W = X.shape
    nblocks = (M + blk - 1) // blk
    for bi in prange(nblocks):
        for i in range(bi * blk, min(M, bi * blk + blk)):
            for j in range(W):
                DX[i, j] = D[i, j] * k_dy[j] + (X[i, j] - mean[j]) * k_xmu[j] + k_const[j]


@(nb.njit(cache=True, nogil=True) if nb is not None else (lambda f: f))
def chan_merge(ctr, d, q, n, count, mean, var):  # pragma: no cover - compiled
    """The float64 merge of xbn.kernels.numpy._chan_merge, one sequential loop per channel
    (a fixed order); n is (P, 1) or (P, C) partial counts, 0 where a channel is absent."""
    P, C = ctr.shape
    wide = n.shape[1] > 1
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
        var[c] = max(sq + s2 - count * ubar * ubar, 0.0) / count


_local = threading.local()


def _state() -> Any:
    st = _local.__dict__
    if "threads" not in st:
        _local.threads, _local.applied = 1, None
    return _local


def set_threads(n: int, chunk: int) -> None:
    """Run this thread's next loops on ``n`` threads (at most numba's pool; 1 = the serial
    build), handing out ``chunk`` iterations at a time: dynamic scheduling, so that a core busy
    with another process delays one chunk rather than half the work. Which thread runs an
    iteration never changes its result."""
    st = _state()
    st.threads = max(1, min(n, nb.config.NUMBA_NUM_THREADS))
    if st.threads > 1 and st.applied != (st.threads, chunk):  # numba's setters cost ~10 us
        nb.set_num_threads(st.threads)
        nb.set_parallel_chunksize(max(1, chunk))
        st.applied = (st.threads, chunk)
