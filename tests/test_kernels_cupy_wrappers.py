"""xbn/kernels/cupy.py end to end on the CPU: the real wrappers, a NumPy-backed stand-in for
CuPy (tests/fake_cupy.py) and the real kernels run by the CPU emulator (tests/cuda_host).

What this covers that the other CPU tests do not: the wrappers' argument assembly, workspace
and placeholder arguments, out= handling, vector width from real pointers, the fallbacks of
the registered functions, the per-stream counters. What it cannot cover: CuPy itself, NVRTC at
run time, the GPU (tests/test_kernels_cupy.py on a GPU does).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import host_kernels as hk

pytestmark = pytest.mark.skipif(
    hk.compiler() is None, reason="needs g++ with sanitizers to run the CUDA kernels on the CPU"
)


@pytest.fixture
def fake():
    import fake_cupy
    from xbn.kernels import cupy as kc

    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = fake_cupy
    caches = (kc._module, kc._function, kc._sm_count, kc._threads_per_sm)
    for c in caches:
        c.cache_clear()
    kc._COUNTERS.clear()
    fake_cupy.launches.clear()
    try:
        yield fake_cupy, kc
    finally:
        for c in caches:
            c.cache_clear()
        kc._COUNTERS.clear()
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved


def _axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _bs(ndim, axis):
    s = [1] * ndim
    s[axis % ndim] = -1
    return tuple(s)


def _rel(got, ref):
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all(), "unwritten (NaN) outputs"
    return float(np.max(np.abs(got - ref))) / (float(np.max(np.abs(ref))) or 1.0)


TOL = {"float32": 2e-6, "float64": 1e-12, "float16": 1e-3}


@pytest.mark.parametrize(("shape", "axis"), [
    ((3, 2, 4096), 1),       # ncl, vector loads, channels split over blocks
    ((5, 3, 7), 1),          # ncl, scalar
    ((300, 24), 1),          # nlc, vector loads, split over blocks
    ((64, 5, 5, 3), -1),     # nlc, scalar
])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_registered_ops_run_the_kernels(fake, shape, axis, dtype):
    cp, kc = fake
    rng = np.random.default_rng(0)
    acc = np.float64 if dtype == "float64" else np.float32
    xh = rng.normal(1.0, 2.0, size=shape).astype(dtype)
    dyh = rng.normal(size=shape).astype(dtype)
    x, dy = cp.asarray(xh), cp.asarray(dyh)
    x64, dy64 = xh.astype(np.float64), dyh.astype(np.float64)
    axes, bs, c = _axes(len(shape), axis), _bs(len(shape), axis), shape[axis]

    mean, var = kc.batch_stats(x, axis=axis)
    assert isinstance(mean, cp.ndarray) and mean.dtype == acc
    assert _rel(mean, x64.mean(axis=axes)) <= TOL[dtype] and _rel(var, x64.var(axis=axes)) <= TOL[dtype]

    s1, s2 = kc.backward_reduce(dy, x, mean, axis=axis)
    m64 = np.asarray(mean, dtype=np.float64).reshape(bs)
    assert _rel(s1, dy64.sum(axis=axes)) <= 10 * TOL[dtype]
    assert _rel(s2, (dy64 * (x64 - m64)).sum(axis=axes)) <= 10 * TOL[dtype]

    scale = cp.asarray(rng.normal(size=c).astype(acc))
    shift = cp.asarray(rng.normal(size=c).astype(acc))
    for sh in (shift, None):
        y = kc.scale_shift(x, scale, sh, axis=axis)
        assert y.dtype == x.dtype and y.shape == x.shape
        expect = x64 * np.asarray(scale, np.float64).reshape(bs)
        if sh is not None:
            expect = expect + np.asarray(sh, np.float64).reshape(bs)
        assert _rel(y, expect) <= max(TOL[dtype], 1e-3 if dtype == "float16" else 0)

    k = [cp.asarray(rng.normal(size=c).astype(acc)) for _ in range(3)]
    dx = kc.backward_apply(dy, x, mean, *k, axis=axis)
    k64 = [np.asarray(v, np.float64).reshape(bs) for v in k]
    assert _rel(dx, dy64 * k64[0] + (x64 - m64) * k64[1] + k64[2]) <= max(TOL[dtype], 1e-3 if dtype == "float16" else 0)

    kinds = {name.rsplit("_", 2)[0] for _, name, _, _ in cp.launches}
    assert kinds == {"xbn_stats", "xbn_backward_reduce", "xbn_scale_shift", "xbn_backward_apply"}
    assert {key for key, *_ in cp.launches} == {{"float32": "f32", "float16": "f16", "float64": "f64"}[dtype]}
    for buf in kc._COUNTERS.values():
        assert not np.any(np.asarray(buf)), "counters must be left at zero"


def test_vector_width_follows_real_pointers(fake):
    cp, kc = fake
    base = cp.asarray(np.arange(4 * 3 * 64 + 1, dtype=np.float32))
    aligned = cp.asarray(np.asarray(base[1:]).reshape(4, 3, 64))        # fresh, aligned copy
    shifted = base[1:].reshape(4, 3, 64)                                 # 4 bytes off
    assert shifted.flags.c_contiguous and shifted.data.ptr % 16 == 4
    m1, v1 = kc.launch_batch_stats(aligned, axis=1)
    m2, v2 = kc.launch_batch_stats(shifted, axis=1)
    names = [name for _, name, _, _ in cp.launches]
    assert names == ["xbn_stats_ncl_v4", "xbn_stats_ncl_v1"]
    np.testing.assert_allclose(np.asarray(v1), np.asarray(v2), rtol=1e-6)


def test_out_arguments_are_filled_and_checked(fake):
    cp, kc = fake
    x = cp.asarray(np.random.default_rng(1).normal(size=(6, 4, 9)).astype(np.float32))
    out = (cp.full((4,), np.nan), cp.full((4,), np.nan))
    got = kc.launch_batch_stats(x, axis=1, out=out)
    assert got[0] is out[0] and got[1] is out[1] and np.isfinite(np.asarray(out[0])).all()
    y = cp.full((6, 4, 9), np.nan)
    assert kc.launch_scale_shift(x, cp.ones(4), None, axis=1, out=y) is y
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    with pytest.raises(ValueError, match="out must be"):
        kc.launch_batch_stats(x, axis=1, out=(cp.empty((5,)), cp.empty((4,))))
    with pytest.raises(ValueError, match="out must be"):
        kc.launch_scale_shift(x, cp.ones(4), None, axis=1, out=cp.empty((6, 4, 9), np.float64))


def test_fallbacks(fake):
    cp, kc = fake
    xh = np.random.default_rng(2).normal(size=(6, 4, 10)).astype(np.float32)
    x = cp.asarray(xh)
    strided = x[:, :, ::2]
    assert kc.launch_batch_stats(strided, axis=1) is None
    _, var = kc.batch_stats(strided, axis=1)
    np.testing.assert_allclose(np.asarray(var), xh[:, :, ::2].var(axis=(0, 2)), rtol=1e-5)
    # coefficients in another dtype than the accumulator: generic path
    assert kc.launch_scale_shift(x, cp.ones(4, dtype=np.float64), None, axis=1) is None
    assert kc.launch_backward_reduce(x, x, cp.zeros(4, dtype=np.float64), axis=1) is None
    # dy of another dtype or layout than x
    assert kc.launch_backward_reduce(cp.asarray(xh.astype(np.float64)), x,
                                     cp.zeros(4, np.float32), axis=1) is None
    assert kc.launch_backward_apply(strided, strided, *(cp.zeros(4, np.float32),) * 4,
                                    axis=1) is None
    # not an array of this backend at all
    assert kc.launch_batch_stats(xh, axis=1) is None
    # wrong channel count in a coefficient vector
    assert kc.launch_scale_shift(x, cp.ones(3), None, axis=1) is None
    assert cp.launches == []
