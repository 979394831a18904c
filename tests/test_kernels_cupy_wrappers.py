"""xbn/kernels/cupy.py end to end on the CPU: the real wrappers, a NumPy-backed stand-in for
CuPy (tests/fake_cupy.py) and the real kernels run by the CPU emulator (tests/cuda_host).

What this covers that the other CPU tests do not: the wrappers' argument assembly, workspace
and placeholder arguments, out= handling, vector width from real pointers, the inputs the
registered functions decline (NotImplemented) and the seam's generic results for them, the
per-stream counters; the whole-step ops as two launches each (the eval-mode forward as one),
against the generic composition of xbn.functional, and the seam's fallback to it; counters
per thread, graph capture and exceptions between launches; bfloat16 arrays (ml_dtypes) through
the registered ops. What it cannot cover: CuPy itself, NVRTC at run time, the GPU
(tests/test_kernels_cupy.py on a GPU does).
"""

from __future__ import annotations

import sys

import array_api_compat.numpy as xnp
import numpy as np
import pytest

from xbn import backends, functional

import host_kernels as hk
import reference as ref

pytestmark = pytest.mark.skipif(
    hk.compiler() is None, reason="needs g++ with sanitizers to run the CUDA kernels on the CPU"
)


@pytest.fixture
def fake():
    from xbn.kernels import cupy as kc

    import fake_cupy

    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = fake_cupy
    caches = (kc._module, kc._function, kc._sm_count, kc._threads_per_sm)
    for c in caches:
        c.cache_clear()
    kc._thread_counters().clear()
    fake_cupy.launches.clear()
    fake_cupy.launch_pointers.clear()
    fake_cupy.before_launch = None
    fake_cupy.per_thread_default_stream = False
    fake_cupy.reset_streams()
    try:
        yield fake_cupy, kc
    finally:
        for c in caches:
            c.cache_clear()
        kc._thread_counters().clear()
        fake_cupy.before_launch = None
        fake_cupy.per_thread_default_stream = False
        fake_cupy.reset_streams()
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


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((3, 2, 4096), 1),  # ncl, vector loads, channels split over blocks
        ((5, 3, 7), 1),  # ncl, scalar
        ((300, 24), 1),  # nlc, vector loads, split over blocks
        ((64, 5, 5, 3), -1),  # nlc, scalar
    ],
)
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
    assert _rel(dx, dy64 * k64[0] + (x64 - m64) * k64[1] + k64[2]) <= max(
        TOL[dtype], 1e-3 if dtype == "float16" else 0
    )

    kinds = {name.rsplit("_", 2)[0] for _, name, _, _ in cp.launches}
    assert kinds == {"xbn_stats", "xbn_backward_reduce", "xbn_scale_shift", "xbn_backward_apply"}
    assert {key for key, *_ in cp.launches} == {{"float32": "f32", "float16": "f16", "float64": "f64"}[dtype]}
    for buf in kc._thread_counters().values():
        assert not np.any(np.asarray(buf)), "counters must be left at zero"


def test_vector_width_follows_real_pointers(fake):
    cp, kc = fake
    base = cp.asarray(np.arange(4 * 3 * 64 + 1, dtype=np.float32))
    aligned = cp.asarray(np.asarray(base[1:]).reshape(4, 3, 64))  # fresh, aligned copy
    shifted = base[1:].reshape(4, 3, 64)  # 4 bytes off
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
    assert kc.batch_stats(strided, axis=1) is NotImplemented
    _, var = _ops(kc).batch_stats(strided, axis=1)  # the seam runs the generic function
    np.testing.assert_allclose(np.asarray(var), xh[:, :, ::2].var(axis=(0, 2)), rtol=1e-5)
    # coefficients in another dtype than the accumulator: generic path
    assert kc.launch_scale_shift(x, cp.ones(4, dtype=np.float64), None, axis=1) is None
    assert kc.launch_backward_reduce(x, x, cp.zeros(4, dtype=np.float64), axis=1) is None
    # dy of another dtype or layout than x
    assert (
        kc.launch_backward_reduce(cp.asarray(xh.astype(np.float64)), x, cp.zeros(4, np.float32), axis=1)
        is None
    )
    assert kc.launch_backward_apply(strided, strided, *(cp.zeros(4, np.float32),) * 4, axis=1) is None
    # not an array of this backend at all
    assert kc.launch_batch_stats(xh, axis=1) is None
    # wrong channel count in a coefficient vector
    assert kc.launch_scale_shift(x, cp.ones(3), None, axis=1) is None
    assert cp.launches == []


# -- the whole-step ops: two launches each, the generic composition's results -------------------


def _np(a):
    return None if a is None else np.asarray(a).view(np.ndarray)


def _ops(kc):
    """The ops as the registry binds them for the CuPy backend, seam included (the fake's
    arrays are NumPy arrays, so array-api-compat's NumPy namespace stands in for CuPy's)."""
    ops = backends.Ops.build("cupy", xnp, generic=False)
    assert set(ops.fast) == set(backends.OP_NAMES)
    assert all(getattr(ops, op).__wrapped__ is getattr(kc, op) for op in backends.OP_NAMES)
    return ops


def _kinds(cp):
    kinds = [name.rsplit("_", 2)[0] for _, name, _, _ in cp.launches]
    cp.launches.clear()
    return kinds


STEP_TOL = {"float32": 1e-5, "float64": 1e-10, "float16": 1e-2}


@pytest.mark.parametrize(
    ("shape", "axis", "dtype", "affine", "running", "pdt"),
    [
        ((3, 2, 4096), 1, "float32", True, True, "float32"),  # ncl, vectors, split
        ((300, 24), 1, "float32", False, True, "float32"),  # nlc, vectors, split, no affine
        ((5, 3, 7), 1, "float16", True, True, "float32"),  # 16-bit input, float32 parameters
        ((64, 5, 5, 3), -1, "float64", True, False, "float32"),  # float64 input, float32 parameters
        ((2, 3, 1, 1), 1, "float32", True, True, "float64"),  # M == 2, float64 parameters
    ],
)
def test_step_ops_are_two_launches_with_the_generic_results(fake, shape, axis, dtype, affine, running, pdt):
    cp, kc = fake
    rng = np.random.default_rng(20)
    c, bs = shape[axis], _bs(len(shape), axis)
    xh = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    dyh = rng.normal(size=shape).astype(dtype)
    wh = rng.normal(1.0, 0.3, size=c).astype(pdt) if affine else None
    bh = rng.normal(size=c).astype(pdt) if affine else None
    rmh = rng.normal(size=c).astype(pdt) if running else None
    rvh = rng.uniform(0.5, 2, size=c).astype(pdt) if running else None
    x, dy = cp.asarray(xh), cp.asarray(dyh)
    w, b, rm, rv = (None if a is None else cp.asarray(a) for a in (wh, bh, rmh, rvh))
    ops = _ops(kc)
    tol = STEP_TOL[dtype]

    y, mean, inv, new_rm, new_rv = kc.batch_norm_forward(
        x, w, b, rm, rv, axis=axis, eps=1e-4, momentum=0.2, xp=xnp, ops=ops
    )
    assert _kinds(cp) == ["xbn_stats_fused", "xbn_scale_shift"]
    g = functional.batch_norm_forward(xh, wh, bh, rmh, rvh, axis=axis, eps=1e-4, momentum=0.2, xp=xnp)
    for what, got, want in zip(("y", "mean", "inv", "new_rm", "new_rv"), (y, mean, inv, new_rm, new_rv), g):
        if want is None:
            assert got is None, what
            continue
        assert isinstance(got, cp.ndarray) and got.dtype == want.dtype, (what, got.dtype)
        assert _rel(got, want.astype(np.float64)) <= tol, what
    if running:  # new arrays: the running statistics given are only read
        assert new_rm is not rm and np.array_equal(_np(rm), rmh) and np.array_equal(_np(rv), rvh)
    want = ref.forward(xh, axis=axis, weight=wh, bias=bh, eps=1e-4)
    assert _rel(y, want["y"]) <= max(tol, 1e-5 * 10)

    dx, dgamma, dbeta = kc.batch_norm_backward(dy, x, mean, inv, w, axis=axis, xp=xnp, ops=ops)
    assert _kinds(cp) == ["xbn_backward_reduce_fused", "xbn_backward_apply"]
    gdx, gdg, gdb = functional.batch_norm_backward(dyh, xh, _np(mean), _np(inv), wh, axis=axis, xp=xnp)
    for what, got, want in (("dx", dx, gdx), ("dgamma", dgamma, gdg), ("dbeta", dbeta, gdb)):
        assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
        terms = float(np.max(np.abs(want))) or 1.0
        if what == "dx":  # a difference of terms of the size of dy * k_dy
            k = _np(inv) * (1.0 if wh is None else wh.astype(_np(inv).dtype))
            terms = float(np.max(np.abs(dyh.astype(np.float64) * k.reshape(bs))))
        assert float(np.max(np.abs(_np(got).astype(np.float64) - want))) <= 10 * tol * terms, what


def test_eval_mode_backward(fake):
    """After an eval-mode forward: with parameter gradients, the fused reduction and dx by
    scale_shift of dy alone; without, the generic composition (one scale_shift launch)."""
    cp, kc = fake
    rng = np.random.default_rng(21)
    shape, c = (6, 4, 11), 4
    xh, dyh = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    mh = rng.normal(size=c).astype(np.float32)
    ih = rng.uniform(0.5, 2, size=c).astype(np.float32)
    wh = rng.normal(size=c).astype(np.float32)
    x, dy, m, i, w = (cp.asarray(a) for a in (xh, dyh, mh, ih, wh))
    ops = _ops(kc)
    for need in (True, False):
        got = ops.batch_norm_backward(dy, x, m, i, w, axis=1, batch_stats_used=False, need_param_grads=need)
        want = functional.batch_norm_backward(
            dyh, xh, mh, ih, wh, axis=1, batch_stats_used=False, need_param_grads=need, xp=xnp
        )
        kinds = _kinds(cp)
        if need:
            assert kinds == ["xbn_backward_reduce_fused", "xbn_scale_shift"]
            # dx = dy * (weight * inv): the same product, the same kernel, the same bits
            assert np.array_equal(_np(got[0]), want[0])
            for g, v in zip(got[1:], want[1:]):  # sums in another order: a few ulp apart
                assert g.dtype == v.dtype and _rel(g, v.astype(np.float64)) <= 1e-5
        else:  # declined by the fused op, then the generic composition with the fast passes
            assert (
                kc.batch_norm_backward(dy, x, m, i, w, axis=1, batch_stats_used=False, need_param_grads=False)
                is NotImplemented
            )
            assert kinds == ["xbn_scale_shift"] and got[1] is None and got[2] is None
            assert np.array_equal(_np(got[0]), want[0])


def test_step_ops_constant_channels_give_exactly_the_bias(fake):
    cp, kc = fake
    rng = np.random.default_rng(22)
    xh = rng.normal(size=(5, 4, 9)).astype(np.float32)
    xh[:, 1] = np.float32(0.1)
    xh[:, 3] = np.float32(-1234.567)
    x = cp.asarray(xh)
    bh = np.array([0.5, -0.25, 3.0, 1e-3], np.float32)
    y, mean, inv, _, _ = kc.batch_norm_forward(
        x, cp.asarray(np.full(4, 2.0, np.float32)), cp.asarray(bh), None, None, axis=1, xp=xnp, ops=_ops(kc)
    )
    assert np.all(_np(y)[:, 1] == bh[1]) and np.all(_np(y)[:, 3] == bh[3])
    assert _np(mean)[1] == np.float32(0.1) and _np(mean)[3] == np.float32(-1234.567)


def test_step_ops_fall_back_to_the_generic_composition(fake):
    cp, kc = fake
    rng = np.random.default_rng(23)
    xh = rng.normal(size=(6, 4, 10)).astype(np.float32)
    x = cp.asarray(xh)
    ops = _ops(kc)
    w32, b32 = cp.ones(4, np.float32), cp.zeros(4, np.float32)
    rm64, rv64 = cp.zeros(4, np.float64), cp.ones(4, np.float64)
    cases = {
        "strided input": (x[:, :, ::2], w32, b32, None, None),
        "parameters of two dtypes": (x, w32, b32, rm64, rv64),
        "a weight that is not an array of the backend": (x, np.ones(4, np.float32), b32, None, None),
        "an integer weight": (x, cp.ones(4, np.int32), b32, None, None),
        "a weight of the wrong length": (x, cp.ones(3, np.float32), None, None, None),
    }
    for what, args in cases.items():
        try:
            want = functional.batch_norm_forward(*(_np(a) for a in args), axis=1, xp=xnp)
        except ValueError:  # the generic path's own error, which the seam must give too
            with pytest.raises(ValueError):
                ops.batch_norm_forward(*args, axis=1)
            continue
        assert kc.batch_norm_forward(*args, axis=1, xp=xnp, ops=ops) is NotImplemented, what
        got = ops.batch_norm_forward(*args, axis=1)
        # The pass kernels may run (the fake's where() returns plain NumPy arrays, which they
        # decline), the fused one must not.
        assert "xbn_stats_fused" not in _kinds(cp), what
        for g, v in zip(got, want):
            assert (g is None) == (v is None), what
            if v is not None:
                assert g.dtype == v.dtype and _rel(g, v.astype(np.float64)) <= 1e-5, what
    # backward: a mean of another dtype than the accumulator
    m64 = cp.zeros(4, np.float64)
    assert kc.batch_norm_backward(x, x, m64, cp.ones(4, np.float64), w32, axis=1) is NotImplemented
    dx, dg, db = ops.batch_norm_backward(x, x, m64, cp.ones(4, np.float64), w32, axis=1)
    assert "xbn_backward_reduce_fused" not in _kinds(cp)
    assert dx.dtype == np.float32 and dg.dtype == np.float64


def test_cupy_backend_survives_deepcopy_and_pickle(fake, monkeypatch):
    """A CuPy Backend pickles as ("cupy", device id, generic flag) and is resolved again on load.
    CuPy is the fake here, and its array-api-compat namespace a stand-in: NumPy's functions with
    the fake's empty(), and the fake arrays' own device."""
    import copy
    import pickle
    import types

    import array_api_compat

    cp, kc = fake
    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)
    stub = types.ModuleType("array_api_compat.cupy")
    stub.__getattr__ = lambda name: getattr(xnp, name)
    stub.empty = lambda shape, dtype=np.float32, device=None: cp.empty(shape, dtype)
    namespace_for, device_of = backends._namespace_for, array_api_compat.device
    monkeypatch.setattr(
        backends, "_namespace_for", lambda name: stub if name == "cupy" else namespace_for(name)
    )
    monkeypatch.setattr(backends, "_cuda_usable", lambda: True)
    monkeypatch.setattr(
        array_api_compat, "device", lambda a: a.device if isinstance(a, cp.ndarray) else device_of(a)
    )

    b = backends.resolve("cupy", 0)
    assert (b.name, b.xp, b.device, b.generic) == ("cupy", stub, cp.cuda.Device(0), False)
    assert set(b.ops.fast) == set(backends.OP_NAMES)
    assert copy.deepcopy(b) is b
    assert b.__reduce__()[1] == ("cupy", 0, False)  # the device as its id
    again = pickle.loads(pickle.dumps(b))
    assert again == b and again.ops.fast == b.ops.fast
    x = cp.asarray(np.random.default_rng(3).normal(size=(5, 4, 6)).astype(np.float32))
    y = again.ops.scale_shift(x, cp.full((4,), 2.0, np.float32), None, axis=1)
    assert _kinds(cp) == ["xbn_scale_shift"]
    np.testing.assert_array_equal(np.asarray(y), 2.0 * np.asarray(x))

    g = pickle.loads(pickle.dumps(backends.resolve("cupy", 0, generic=True)))
    assert g.generic and g.ops.fast == () and g.device == cp.cuda.Device(0)


# -- the eval-mode forward: one launch ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis", "dtype", "pdt", "affine"),
    [
        ((3, 4, 64), 1, "float32", "float32", (True, True)),  # ncl, float4
        ((5, 3, 7), 1, "float16", "float32", (True, False)),  # ncl, scalar, 16-bit input
        ((64, 24), 1, "float32", "float32", (False, True)),  # nlc, vectors
        ((9, 5, 5, 3), -1, "float64", "float64", (True, True)),  # nlc scalar, float64 throughout
        ((6, 3, 10), 1, "float64", "float32", (False, False)),  # float32 statistics, float64 input
    ],
)
def test_batch_norm_inference_is_one_launch_with_the_generic_results(fake, shape, axis, dtype, pdt, affine):
    """The registered batch_norm_inference is one launch of the inference kernel, whose y is
    bit for bit the generic function's when that runs its scale_shift on the same kernel (the
    per-channel coefficients computed in the kernel round as the array operations do), and
    within the dtype's tolerance of the generic function on NumPy."""
    cp, kc = fake
    rng = np.random.default_rng(40)
    c = shape[axis]
    xh = rng.normal(1.0, 2.0, size=shape).astype(dtype)
    wh = rng.normal(1.0, 0.3, size=c).astype(pdt) if affine[0] else None
    bh = rng.normal(size=c).astype(pdt) if affine[1] else None
    rmh, rvh = rng.normal(size=c).astype(pdt), rng.uniform(0.0, 2.0, size=c).astype(pdt)
    x, rm, rv = cp.asarray(xh), cp.asarray(rmh), cp.asarray(rvh)
    w, b = (None if a is None else cp.asarray(a) for a in (wh, bh))
    ops = _ops(kc)
    y = ops.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=1e-3)
    assert _kinds(cp) == ["xbn_inference"]
    assert isinstance(y, cp.ndarray) and y.dtype == xh.dtype and y.shape == shape
    passes = backends.PassOps(**{op: getattr(ops, op) for op in backends.PASS_OPS})
    same_kernel = functional.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=1e-3, xp=xnp, ops=passes)
    assert _kinds(cp) == ["xbn_scale_shift"]
    assert _np(y).tobytes() == _np(same_kernel).tobytes()
    want = functional.batch_norm_inference(xh, wh, bh, rmh, rvh, axis=axis, eps=1e-3, xp=xnp)
    assert _rel(y, want.astype(np.float64)) <= {"float16": 1e-3}.get(dtype, 1e-6)


def test_batch_norm_inference_declines_what_the_kernel_does_not_compute(fake):
    """float64 statistics with float32 input (the generic path computes in float64), parameters
    of two dtypes, a strided input, a statistics vector of another length: NotImplemented, and
    the seam gives the generic function's result."""
    cp, kc = fake
    rng = np.random.default_rng(41)
    xh = rng.normal(size=(6, 4, 10)).astype(np.float32)
    x = cp.asarray(xh)
    f32, f64 = np.float32, np.float64
    cases = {
        "float64 statistics, float32 input": (x, None, None, cp.zeros(4, f64), cp.ones(4, f64)),
        "parameters of two dtypes": (x, cp.ones(4, f32), None, cp.zeros(4, f64), cp.ones(4, f64)),
        "strided input": (x[:, :, ::2], None, None, cp.zeros(4, f32), cp.ones(4, f32)),
        "a host weight": (x, np.ones(4, f32), None, cp.zeros(4, f32), cp.ones(4, f32)),
    }
    ops = _ops(kc)
    for what, args in cases.items():
        assert kc.batch_norm_inference(*args, axis=1) is NotImplemented, what
        got = ops.batch_norm_inference(*args, axis=1)
        assert "xbn_inference" not in _kinds(cp), what
        want = functional.batch_norm_inference(*(_np(a) for a in args), axis=1, xp=xnp)
        assert got.dtype == want.dtype and _rel(got, want.astype(np.float64)) <= 1e-6, what


def test_layer_eval_forward_is_one_launch_and_its_backward_is_unchanged(fake, monkeypatch):
    """BatchNorm2d in eval mode on the CuPy kernels: the forward is one launch; its backward
    (the mean and invstd computed from the saved running statistics only then) gives exactly
    the generic function's dx, dgamma, dbeta for the statistics the generic eval forward used."""
    import array_api_compat

    import xbn
    from xbn import _arrays

    cp, kc = fake
    stub = _stub_cupy_namespace(cp, monkeypatch)
    monkeypatch.setattr(
        array_api_compat, "array_namespace", _namespace_with(array_api_compat.array_namespace, cp, stub)
    )
    # The layer computes on an ndarray subclass as the plain ndarray it views; the fake's arrays
    # are such a subclass, and stand for CuPy's, which it keeps.
    check_array = _arrays.check_array
    monkeypatch.setattr(
        _arrays,
        "check_array",
        lambda backend, x, what: (
            x if isinstance(x, cp.ndarray) and backend.owns(x) else check_array(backend, x, what)
        ),
    )
    rng = np.random.default_rng(42)
    bn = xbn.BatchNorm2d(5, backend="cupy", device=0)
    assert "batch_norm_inference" in bn._backend.ops.fast
    bn.load_state_dict(
        {
            "weight": rng.normal(1, 0.2, 5).astype(np.float32),
            "bias": rng.normal(size=5).astype(np.float32),
            "running_mean": rng.normal(size=5).astype(np.float32),
            "running_var": rng.uniform(0.5, 2, 5).astype(np.float32),
            "num_batches_tracked": 3,
        }
    )
    bn.eval()
    xh = rng.normal(size=(4, 5, 6, 6)).astype(np.float32)
    dyh = rng.normal(size=xh.shape).astype(np.float32)
    cp.launches.clear()
    y = bn(cp.asarray(xh))
    assert _kinds(cp) == ["xbn_inference"]
    rmh, rvh = _np(bn.running_mean), _np(bn.running_var)
    wh, bh = _np(bn.weight.data), _np(bn.bias.data)
    want = functional.batch_norm_inference(xh, wh, bh, rmh, rvh, axis=1, eps=bn.eps, xp=xnp)
    assert _rel(y, want.astype(np.float64)) <= 1e-6
    dx = bn.backward(cp.asarray(dyh))
    mean, inv = functional.eval_statistics(rmh, rvh, dtype=xh.dtype, eps=bn.eps, xp=xnp)
    gdx, gdg, gdb = functional.batch_norm_backward(
        dyh, xh, mean, inv, wh, axis=1, batch_stats_used=False, xp=xnp
    )
    np.testing.assert_array_equal(_np(dx), gdx)  # dy * (weight * inv): same product, same kernel
    assert _rel(bn.weight.grad, gdg.astype(np.float64)) <= 1e-5
    assert _rel(bn.bias.grad, gdb.astype(np.float64)) <= 1e-5


def _stub_cupy_namespace(cp, monkeypatch):
    """array-api-compat's CuPy namespace stood in for by NumPy's, with the fake's arrays; the
    registry resolves "cupy" to it (as in test_cupy_backend_survives_deepcopy_and_pickle)."""
    import types

    import array_api_compat

    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)
    stub = types.ModuleType("array_api_compat.cupy")
    stub.__getattr__ = lambda name: getattr(xnp, name)

    def make(fn):
        return lambda *a, device=None, **k: cp.asarray(fn(*a, **k))

    for name in ("empty", "zeros", "ones", "asarray", "full", "empty_like", "zeros_like"):
        setattr(stub, name, make(getattr(xnp, name)))
    namespace_for, device_of = backends._namespace_for, array_api_compat.device
    monkeypatch.setattr(
        backends, "_namespace_for", lambda name: stub if name == "cupy" else namespace_for(name)
    )
    monkeypatch.setattr(backends, "_cuda_usable", lambda: True)
    monkeypatch.setattr(
        array_api_compat, "device", lambda a: a.device if isinstance(a, cp.ndarray) else device_of(a)
    )
    return stub


def _namespace_with(real, cp, stub):
    def namespace(*arrays, **kwargs):
        if arrays and all(isinstance(a, cp.ndarray) for a in arrays if hasattr(a, "shape")):
            return stub
        return real(*arrays, **kwargs)

    return namespace


# -- counters: threads, graph capture, exceptions -----------------------------------------------


def _counters_of(cp, family):
    """The counters pointer of each recorded launch of ``family`` (its argument position among
    the arrays the wrapper passed)."""
    from xbn.kernels import _launch as L

    arrays = [
        n for n in L.ARGUMENTS[family] if n not in ("has_shift", "flags", "eps", "keep", "momentum", "unbias")
    ]
    i = arrays.index("counters")
    return [ptrs[i] for name, ptrs in cp.launch_pointers if name.rsplit("_", 2)[0] == f"xbn_{family}"]


def test_threads_sharing_a_stream_pointer_get_counters_of_their_own(fake):
    """With CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 every thread's default stream has pointer 2:
    keyed by the pointer alone, two threads' reductions would run at once on one counter
    buffer. Keyed by (device, stream, thread) they never share one."""
    import threading

    cp, kc = fake
    cp.per_thread_default_stream = True
    xh = np.random.default_rng(43).normal(size=(600, 16)).astype(np.float32)
    x = cp.asarray(xh)
    results, errors = {}, []

    def work(i):
        try:
            assert cp.cuda.get_current_stream().ptr == 2
            results[i] = [np.asarray(a).copy() for a in kc.batch_stats(x, axis=1)]
        except Exception as e:  # reported below
            errors.append(e)

    both = threading.Barrier(2)  # both threads alive (their buffers too) until both launched
    turn = threading.Lock()

    def worker(i):
        with turn:
            work(i)
        both.wait(timeout=120)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    pointers = _counters_of(cp, "stats")
    assert len(pointers) == 2 and pointers[0] != pointers[1]
    assert kc._thread_counters() == {}  # the main thread launched nothing
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][1], xh.astype(np.float64).var(axis=0), rtol=1e-5)
    # one thread, one stream: launch after launch on the same buffer
    kc.batch_stats(x, axis=1)
    kc.batch_stats(x, axis=1)
    assert len(set(_counters_of(cp, "stats")[2:])) == 1


def test_graph_capture_plans_reductions_without_workspace_or_counters(fake):
    """Under graph capture a split reduction would leave the graph pointing at pool memory the
    call gave back, and a new counter buffer zeroed only in the graph: the reductions run
    unsplit instead (no workspace, no counters: nothing outlives the call), with the same
    results within rounding, and no counter buffer is made during the capture."""
    cp, kc = fake
    rng = np.random.default_rng(44)
    xh = rng.normal(2.0, 1.0, size=(3, 2, 4096)).astype(np.float32)
    dyh = rng.normal(size=xh.shape).astype(np.float32)
    x, dy = cp.asarray(xh), cp.asarray(dyh)
    w, b = cp.ones(2, np.float32), cp.zeros(2, np.float32)
    ops = _ops(kc)
    eager = ops.batch_norm_forward(x, w, b, cp.zeros(2, np.float32), cp.ones(2, np.float32), axis=1)
    assert all(grid[1] > 1 for _, name, grid, _ in cp.launches if "stats_fused" in name)
    kc._thread_counters().clear()
    cp.launches.clear()
    with cp.capture():
        got = ops.batch_norm_forward(x, w, b, cp.zeros(2, np.float32), cp.ones(2, np.float32), axis=1)
        grads = ops.batch_norm_backward(dy, x, got[1], got[2], w, axis=1)
        stats = ops.batch_stats(x, axis=1)
    kinds = [(name.rsplit("_", 2)[0], grid) for _, name, grid, _ in cp.launches]
    assert [k for k, _ in kinds] == [
        "xbn_stats_fused",
        "xbn_scale_shift",
        "xbn_backward_reduce_fused",
        "xbn_backward_apply",
        "xbn_stats",
    ]
    assert all(grid[1] == 1 for k, grid in kinds if k != "xbn_scale_shift" and k != "xbn_backward_apply")
    assert kc._thread_counters() == {}, "no counter buffer made (to be zeroed only in the graph)"
    for g, e in zip(got, eager):
        if e is not None:
            assert _rel(g, _np(e).astype(np.float64)) <= 1e-5
    want = functional.batch_norm_backward(
        dyh, xh, _np(got[1]), _np(got[2]), np.ones(2, np.float32), axis=1, xp=xnp
    )
    for g, v in zip(grads, want):
        assert _rel(g, v.astype(np.float64)) <= 1e-4
    np.testing.assert_allclose(_np(stats[1]), xh.astype(np.float64).var(axis=(0, 2)), rtol=1e-5)
    # after the capture the split plans and the counters are back
    ops.batch_stats(x, axis=1)
    assert cp.launches[-1][2][1] > 1 and len(kc._thread_counters()) == 1


def test_a_query_of_the_capture_state_that_fails_counts_as_capturing(fake, monkeypatch):
    cp, kc = fake

    def refuse():
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    monkeypatch.setattr(cp.get_current_stream(), "is_capturing", refuse)
    x = cp.asarray(np.random.default_rng(45).normal(size=(3, 2, 4096)).astype(np.float32))
    kc.batch_stats(x, axis=1)
    assert cp.launches[-1][2][1] == 1 and kc._thread_counters() == {}


def test_exceptions_between_launches_leave_no_counter_behind(fake):
    """A launch that fails, and an interrupt between the two launches of a step, leave every
    counter at zero: each kernel puts its own back (atomicInc wraps), nothing is left for a
    later launch to reset, and the next reductions on the stream are right."""
    cp, kc = fake
    rng = np.random.default_rng(46)
    xh = rng.normal(3.0, 2.0, size=(600, 16)).astype(np.float32)
    x = cp.asarray(xh)
    w, b = cp.ones(16, np.float32), cp.zeros(16, np.float32)
    ops = _ops(kc)

    def interrupt_before(prefix, exc):
        def hook(name):
            if name.startswith(prefix):
                raise exc

        return hook

    cp.before_launch = interrupt_before("xbn_stats_nlc", RuntimeError("launch failed"))
    with pytest.raises(RuntimeError, match="launch failed"):
        kc.batch_stats(x, axis=1)
    cp.before_launch = interrupt_before("xbn_scale_shift", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):  # after stats_fused, before its scale_shift
        ops.batch_norm_forward(x, w, b, None, None, axis=1)
    assert cp.launches[-1][1].startswith("xbn_stats_fused") and cp.launches[-1][2][1] > 1
    cp.before_launch = None
    buffers = kc._thread_counters().values()
    assert buffers and all(not np.asarray(buf).any() for buf in buffers)
    for _ in range(2):
        mean, var = kc.batch_stats(x, axis=1)
        np.testing.assert_allclose(_np(var), xh.astype(np.float64).var(axis=0), rtol=1e-5)
        y, *_ = ops.batch_norm_forward(x, w, b, None, None, axis=1)
        want = functional.batch_norm_forward(
            xh, np.ones(16, np.float32), np.zeros(16, np.float32), None, None, axis=1, xp=xnp
        )[0]
        assert _rel(y, want.astype(np.float64)) <= 1e-5
    assert all(not np.asarray(buf).any() for buf in kc._thread_counters().values())


# -- bfloat16 (ml_dtypes) through the registered ops ---------------------------------------------


def test_bfloat16_arrays_run_the_bf16_kernels_through_the_ops(fake):
    """CuPy 14 holds bfloat16 arrays through ml_dtypes (dtype name "bfloat16"); the registered
    ops take them, on the bf16 kernels, with float32 statistics and bfloat16 outputs. (The
    layers do not get them: array-api-compat's CuPy namespace has no bfloat16, and its isdtype
    refuses ml_dtypes' dtype; docs/numerics.md section 7.)"""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cp, kc = fake
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(47)
    for shape, axis in (((4, 3, 64), 1), ((300, 24), 1), ((5, 3, 7), 1)):
        c = shape[axis]
        xh = rng.normal(1.0, 2.0, size=shape).astype(np.float32).astype(bf16)
        dyh = rng.normal(size=shape).astype(np.float32).astype(bf16)
        x64, dy64 = xh.astype(np.float64), dyh.astype(np.float64)
        x, dy = cp.asarray(xh), cp.asarray(dyh)
        assert x.dtype.name == "bfloat16"
        axes = _axes(len(shape), axis)
        ops = _ops(kc)
        w, b = cp.asarray(np.linspace(0.5, 1.5, c, dtype=np.float32)), cp.zeros(c, np.float32)
        rm, rv = cp.zeros(c, np.float32), cp.ones(c, np.float32)
        y, mean, inv, new_rm, new_rv = ops.batch_norm_forward(x, w, b, rm, rv, axis=axis)
        assert {k for k, *_ in cp.launches} == {"bf16"}
        assert _kinds(cp) == ["xbn_stats_fused", "xbn_scale_shift"]
        assert y.dtype == bf16 and mean.dtype == np.float32
        assert _rel(mean, x64.mean(axis=axes)) <= 1e-6
        want = ref.forward(x64, axis=axis, weight=_np(w).astype(np.float64), bias=None, eps=1e-5)
        assert _rel(y.astype(np.float64), want["y"]) <= 1e-2
        dx, dgamma, dbeta = ops.batch_norm_backward(dy, x, mean, inv, w, axis=axis)
        assert _kinds(cp) == ["xbn_backward_reduce_fused", "xbn_backward_apply"]
        assert dx.dtype == bf16 and dgamma.dtype == np.float32
        assert _rel(dbeta, dy64.sum(axis=axes)) <= 1e-5
        y_eval = ops.batch_norm_inference(x, w, b, rm, rv, axis=axis)
        assert _kinds(cp) == ["xbn_inference"] and y_eval.dtype == bf16
        bs = _bs(len(shape), axis)
        want_eval = x64 / np.sqrt(1 + 1e-5) * _np(w).astype(np.float64).reshape(bs)
        assert _rel(y_eval.astype(np.float64), want_eval) <= 1e-2
