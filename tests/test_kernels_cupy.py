"""The CUDA kernels on a GPU: parity with the generic CuPy path and a float64 NumPy reference,
poisoned outputs, bitwise determinism, fallbacks, streams, and the layer on top. The whole-step
ops (fused per-channel epilogues): two launches per direction, the generic CuPy path's results
and dtypes, every output written, bitwise determinism, constant channels giving exactly the
bias, and BatchNorm2d on the kernels against BatchNorm2d on the generic path. The eval-mode
forward as one launch; reductions under CUDA graph capture (replayed); threads on the
per-thread default stream; infinities and constant channels on tall (N, C) inputs.

Skips (with the reason) where CuPy or a usable CUDA device is missing. ci/gpu_tier.sh runs it;
tests/test_kernels_host.py runs the same kernels on the CPU where there is no GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from xbn import backends
from xbn import functional as F

import reference as ref

cupy = pytest.importorskip("cupy", reason="the CUDA kernels need CuPy")
try:
    _CUPY = backends.resolve("cupy")
    _GENERIC = backends.resolve("cupy", generic=True)
except backends.BackendUnavailableError as e:  # CuPy without a device or driver
    pytest.skip(f"the CUDA kernels need a GPU: {e}", allow_module_level=True)

from xbn.kernels import _launch as L  # noqa: E402
from xbn.kernels import cupy as kc  # noqa: E402

XP = _GENERIC.xp
#: REFERENCE A.12: largest relative error against float64, per input dtype.
TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
#: Statistics accumulate in float32 for 16-bit inputs: they are as exact as float32's.
STATS_TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}


def _bf16():
    try:
        import ml_dtypes

        a = cupy.asarray(np.zeros(4, dtype=ml_dtypes.bfloat16))
        return a.dtype
    except Exception:
        return None


BF16 = _bf16()
DTYPES = ["float32", "float64", "float16"] + (["bfloat16"] if BF16 is not None else [])
if BF16 is None:
    # Recorded, so the skip shows in -ra output instead of bfloat16 silently missing.
    DTYPES.append(
        pytest.param(
            "bfloat16",
            marks=pytest.mark.skip(
                reason="this CuPy has no bfloat16 arrays (needs a CuPy with ml_dtypes support)"
            ),
        )
    )

# (shape, channel axis). Channel-major: C=1, C=3, H*W=7, prime N*H*W, large C with tiny
# spatial, tiny C with huge spatial, a middle axis; channels-last: H*W=1, (N, C), NHWC, C=3.
SHAPES = [
    ((8, 1, 33, 33), 1),
    ((16, 3, 32, 32), 1),
    ((8, 5, 7), 1),
    ((1, 4, 1, 10007), 1),  # N*H*W = 10007, prime
    ((7, 3, 11, 13), 1),
    ((64, 2048, 2, 2), 1),
    ((2, 2, 512, 512), 1),
    ((8, 5, 12, 6), 2),
    ((16, 8, 14, 14), 1),  # 14x14: 8-byte vectors for 16-bit dtypes
    ((64, 6), 1),  # C = 6: 8-byte vectors for float32
    ((64, 32, 1, 1), 1),  # H*W = 1: channels-last kernels
    ((4096, 1024), 1),
    ((8, 16, 16, 64), -1),
    ((64, 7, 7, 3), -1),
    ((1000, 1), 1),
    ((3, 2), 1),
]


def _random_shapes(n: int, seed: int = 0) -> list[tuple[tuple[int, ...], int]]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        nd = int(rng.integers(2, 5))
        shape = tuple(int(v) for v in rng.choice([1, 2, 3, 5, 7, 13, 16, 31, 64, 97], size=nd))
        if 2 <= np.prod(shape) <= 4_000_000:
            out.append((shape, int(rng.integers(-nd, nd))))
    return out


ALL_SHAPES = SHAPES + _random_shapes(8)
IDS = [f"{s}-ax{a}" for s, a in ALL_SHAPES]


def _dtype(name: str):
    return BF16 if name == "bfloat16" else cupy.dtype(name)


def _make(shape, name, seed, loc=0.5, scale=2.0):
    """(cupy array of dtype ``name``, float64 NumPy copy of its exact values)."""
    host = np.random.default_rng(seed).normal(loc, scale, size=shape)
    if name == "bfloat16":
        dev = cupy.asarray(host.astype(np.float32)).astype(BF16)
    else:
        dev = cupy.asarray(host.astype(name))
    return dev, cupy.asnumpy(dev.astype(cupy.float64))


def _acc(name: str):
    return cupy.dtype(L.accumulator_dtype(name))


def _f64(a) -> np.ndarray:
    return cupy.asnumpy(a.astype(cupy.float64))


def _nan(shape, dtype):
    return cupy.full(shape, cupy.nan, dtype=cupy.float32).astype(dtype)


def _axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _bs(ndim, axis):
    s = [1] * ndim
    s[axis % ndim] = -1
    return tuple(s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), ALL_SHAPES, ids=IDS)
def test_batch_stats(shape, axis, dtype):
    x, xh = _make(shape, dtype, 1)
    c = shape[axis]
    out = (_nan((c,), _acc(dtype)), _nan((c,), _acc(dtype)))
    got = kc.launch_batch_stats(x, axis=axis, out=out)
    assert got is not None, "the kernel should take this input"
    assert got[0] is out[0] and got[1] is out[1]
    axes = _axes(len(shape), axis)
    ref.assert_close(_f64(got[0]), xh.mean(axis=axes), STATS_TOL[dtype], "mean vs float64")
    ref.assert_close(_f64(got[1]), xh.var(axis=axes), STATS_TOL[dtype], "var vs float64")
    gm, gv = F.batch_stats(x, axis=axis, xp=XP)
    ref.assert_close(_f64(got[0]), _f64(gm), STATS_TOL[dtype] * 2, "mean vs generic")
    ref.assert_close(_f64(got[1]), _f64(gv), STATS_TOL[dtype] * 2, "var vs generic")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), ALL_SHAPES, ids=IDS)
def test_backward_reduce(shape, axis, dtype):
    x, xh = _make(shape, dtype, 2)
    dy, dyh = _make(shape, dtype, 3, loc=0.0, scale=1.0)
    c, axes, bs = shape[axis], _axes(len(shape), axis), _bs(len(shape), axis)
    mean = cupy.asarray(xh.mean(axis=axes)).astype(_acc(dtype))
    out = (_nan((c,), _acc(dtype)), _nan((c,), _acc(dtype)))
    got = kc.launch_backward_reduce(dy, x, mean, axis=axis, out=out)
    assert got is not None
    mh = _f64(mean).reshape(bs)
    tol = STATS_TOL[dtype] * 10  # sums of signed terms: relative to the largest channel's sum
    ref.assert_close(_f64(got[0]), dyh.sum(axis=axes), tol, "sum_dy vs float64")
    ref.assert_close(_f64(got[1]), (dyh * (xh - mh)).sum(axis=axes), tol, "sum_dy_xmu vs float64")
    g1, g2 = F.backward_reduce(dy, x, mean, axis=axis, xp=XP)
    ref.assert_close(_f64(got[0]), _f64(g1), tol, "sum_dy vs generic")
    ref.assert_close(_f64(got[1]), _f64(g2), tol, "sum_dy_xmu vs generic")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), ALL_SHAPES, ids=IDS)
def test_scale_shift(shape, axis, dtype):
    x, xh = _make(shape, dtype, 4)
    c, bs = shape[axis], _bs(len(shape), axis)
    rng = np.random.default_rng(5)
    scale = cupy.asarray(rng.normal(size=c)).astype(_acc(dtype))
    shift = cupy.asarray(rng.normal(size=c)).astype(_acc(dtype))
    for sh in (shift, None):
        out = _nan(shape, x.dtype)
        got = kc.launch_scale_shift(x, scale, sh, axis=axis, out=out)
        assert got is out
        expect = xh * _f64(scale).reshape(bs) + (0.0 if sh is None else _f64(sh).reshape(bs))
        ref.assert_close(_f64(got), expect, TOL[dtype], "y vs float64")
        ref.assert_close(
            _f64(got), _f64(F.scale_shift(x, scale, sh, axis=axis, xp=XP)), TOL[dtype], "y vs generic"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), ALL_SHAPES, ids=IDS)
def test_backward_apply(shape, axis, dtype):
    x, xh = _make(shape, dtype, 6)
    dy, dyh = _make(shape, dtype, 7, loc=0.0, scale=1.0)
    c, bs = shape[axis], _bs(len(shape), axis)
    rng = np.random.default_rng(8)
    mean, k_dy, k_xmu, k_const = (cupy.asarray(rng.normal(size=c)).astype(_acc(dtype)) for _ in range(4))
    out = _nan(shape, x.dtype)
    got = kc.launch_backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis, out=out)
    assert got is out
    m, a, b, k = (_f64(v).reshape(bs) for v in (mean, k_dy, k_xmu, k_const))
    ref.assert_close(_f64(got), dyh * a + (xh - m) * b + k, TOL[dtype], "dx vs float64")
    generic = F.backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis, xp=XP)
    ref.assert_close(_f64(got), _f64(generic), TOL[dtype], "dx vs generic")


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((2, 3, 1024, 1024), 1), ((65536, 64), 1), ((8, 1, 512, 512), 1), ((32, 64, 56, 56), 1)],
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reductions_bitwise_deterministic(shape, axis, dtype):
    x, xh = _make(shape, dtype, 9)
    dy, _ = _make(shape, dtype, 10)
    mean = cupy.asarray(xh.mean(axis=_axes(len(shape), axis))).astype(cupy.float32)
    first = None
    for _ in range(10):
        m, v = kc.launch_batch_stats(x, axis=axis)
        s1, s2 = kc.launch_backward_reduce(dy, x, mean, axis=axis)
        blob = b"".join(cupy.asnumpy(a).tobytes() for a in (m, v, s1, s2))
        first = blob if first is None else first
        assert blob == first, "results differ between runs"


def test_counters_are_left_zero():
    x, _ = _make((4, 2, 300, 300), "float32", 11)
    kc.launch_batch_stats(x, axis=1)
    kc.launch_backward_reduce(x, x, cupy.zeros(2, cupy.float32), axis=1)
    cupy.cuda.get_current_stream().synchronize()
    assert kc._thread_counters(), "a split reduction should have used the counters"
    for buf in kc._thread_counters().values():
        assert int(cupy.count_nonzero(buf)) == 0


def test_non_default_stream():
    x, xh = _make((4, 3, 257, 259), "float32", 12)
    with cupy.cuda.Stream(non_blocking=True) as s:
        m, v = kc.launch_batch_stats(x, axis=1)
        s.synchronize()
    ref.assert_close(_f64(v), xh.var(axis=(0, 2, 3)), 1e-5, "var on a side stream")


def test_variance_of_large_mean_data():
    """REFERENCE B: float32 x = 1e4 + N(0, 1) keeps its variance within 1e-3 relative."""
    host = (1e4 + np.random.default_rng(13).normal(size=(64, 8, 32, 32))).astype(np.float32)
    _, var = kc.launch_batch_stats(cupy.asarray(host), axis=1)
    expect = host.astype(np.float64).var(axis=(0, 2, 3))
    assert np.max(np.abs(cupy.asnumpy(var) / expect - 1)) < 1e-3


def test_fallbacks_give_the_generic_result():
    x, xh = _make((8, 4, 10, 12), "float32", 14)
    strided = x[:, :, :, ::2]
    assert kc.launch_batch_stats(strided, axis=1) is None
    assert kc.batch_stats(strided, axis=1, xp=XP) is NotImplemented
    m, v = _CUPY.ops.batch_stats(strided, axis=1)  # the seam runs the generic function
    ref.assert_close(_f64(v), xh[:, :, :, ::2].var(axis=(0, 2, 3)), 1e-5, "strided var")
    # float64 coefficients with float32 input: not the kernels' accumulator dtype
    scale64 = cupy.ones(4, dtype=cupy.float64)
    assert kc.launch_scale_shift(x, scale64, None, axis=1) is None
    assert kc.scale_shift(x, scale64, None, axis=1, xp=XP) is NotImplemented
    y = _CUPY.ops.scale_shift(x, scale64, None, axis=1)
    assert cupy.allclose(y, x)
    assert kc.launch_batch_stats(cupy.zeros((0, 4), cupy.float32), axis=1) is None


def test_misaligned_views_use_scalar_loads():
    base, _ = _make((4 * 3 * 64 + 1,), "float32", 15)
    x = base[1:].reshape(4, 3, 64)  # 4-byte offset: no 16-byte vectors
    assert x.flags.c_contiguous and x.data.ptr % 16
    m, v = kc.launch_batch_stats(x, axis=1)
    xh = cupy.asnumpy(x).astype(np.float64)
    ref.assert_close(_f64(v), xh.var(axis=(0, 2)), 1e-5, "var of a misaligned view")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layer_matches_generic_backend(layout):
    import xbn

    axis = 1 if layout == "NCHW" else -1
    shape = (16, 32, 14, 14) if layout == "NCHW" else (16, 14, 14, 32)
    fast = xbn.BatchNorm(32, axis=axis, backend=_CUPY)
    slow = xbn.BatchNorm(32, axis=axis, backend=_GENERIC)
    assert set(fast._backend.ops.fast) == set(backends.OP_NAMES)
    assert slow._backend.ops.fast == ()
    x, _ = _make(shape, "float32", 16)
    dy, _ = _make(shape, "float32", 17)
    for bn in (fast, slow):
        bn.zero_grad()
    y_f, y_s = fast(x), slow(x)
    dx_f, dx_s = fast.backward(dy), slow.backward(dy)
    ref.assert_close(_f64(y_f), _f64(y_s), 1e-5, "y")
    ref.assert_close(_f64(dx_f), _f64(dx_s), 1e-5, "dx")
    ref.assert_close(_f64(fast.weight.grad), _f64(slow.weight.grad), 1e-5, "dgamma")
    ref.assert_close(_f64(fast.bias.grad), _f64(slow.bias.grad), 1e-5, "dbeta")
    ref.assert_close(_f64(fast.running_var), _f64(slow.running_var), 1e-6, "running_var")
    fast.eval()
    slow.eval()
    ref.assert_close(_f64(fast(x)), _f64(slow(x)), 1e-5, "eval y")
    ref.assert_close(_f64(fast.backward(dy)), _f64(slow.backward(dy)), 1e-5, "eval dx")


# -- the whole-step ops: two launches each, the generic CuPy path's results ---------------------

STEP_SHAPES = [
    ((16, 3, 32, 32), 1),
    ((8, 1, 33, 33), 1),  # C = 1
    ((2, 2, 512, 512), 1),  # tiny C, huge spatial: split reductions
    ((16, 8, 14, 14), 1),
    ((64, 2048, 2, 2), 1),  # large C, tiny spatial
    ((64, 32, 1, 1), 1),  # H*W = 1: channels-last kernels
    ((4096, 1024), 1),
    ((8, 16, 16, 64), -1),
    ((64, 7, 7, 3), -1),
    ((2, 5), 1),  # M = 2
    ((1, 4, 1, 10007), 1),  # prime N*H*W
]
STEP_IDS = [f"{s}-ax{a}" for s, a in STEP_SHAPES]
#: (weight and bias, running statistics, parameter dtype)
VARIANTS = [
    (True, True, "float32"),
    (False, False, "float32"),
    (True, True, "float64"),
    (True, False, "float32"),
]


def _params(c, affine, running, pdt, seed):
    rng = np.random.default_rng(seed)
    w = cupy.asarray(rng.normal(1.0, 0.5, size=c).astype(pdt)) if affine else None
    b = cupy.asarray(rng.normal(size=c).astype(pdt)) if affine else None
    rm = cupy.asarray(rng.normal(size=c).astype(pdt)) if running else None
    rv = cupy.asarray(rng.uniform(0.5, 2.0, size=c).astype(pdt)) if running else None
    return w, b, rm, rv


def _h(a):
    return None if a is None else _f64(a)


class _Launches:
    """Counts the kernel launches of xbn.kernels.cupy (every launch goes through _run)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real = kc._run

        def run(op, key, plan, values, device_id):
            self.names.append(op)
            return real(op, key, plan, values, device_id)

        monkeypatch.setattr(kc, "_run", run)

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), STEP_SHAPES, ids=STEP_IDS)
def test_step_ops_match_the_generic_cupy_path(shape, axis, dtype, variant, monkeypatch):
    affine, running, pdt = VARIANTS[variant]
    c, bs = shape[axis], _bs(len(shape), axis)
    x, xh = _make(shape, dtype, 30, loc=2.0)
    dy, dyh = _make(shape, dtype, 31, loc=0.0, scale=1.0)
    w, b, rm, rv = _params(c, affine, running, pdt, 32)
    rm_before, rv_before = _h(rm), _h(rv)
    launches = _Launches(monkeypatch)

    fast = _CUPY.ops.batch_norm_forward(x, w, b, rm, rv, axis=axis, eps=1e-5, momentum=0.1)
    assert launches.take() == ["stats_fused", "scale_shift"]
    slow = _GENERIC.ops.batch_norm_forward(x, w, b, rm, rv, axis=axis, eps=1e-5, momentum=0.1)
    launches.take()
    for what, f, s in zip(("y", "mean", "invstd", "running_mean", "running_var"), fast, slow):
        if s is None:
            assert f is None, what
            continue
        assert f.dtype == s.dtype and f.shape == s.shape, what
        tol = TOL[dtype] if what == "y" else STATS_TOL[dtype] * 4
        if what.startswith("running") and pdt == "float32":
            tol = max(tol, 1e-6)
        ref.assert_close(_f64(f), _f64(s), tol, f"{what} vs generic")
    if running:  # the given running statistics are read, never written
        assert np.array_equal(_h(rm), rm_before) and np.array_equal(_h(rv), rv_before)
    want = ref.forward(xh, axis=axis, weight=_h(w), bias=_h(b))
    ref.assert_close(_f64(fast[0]), want["y"], TOL[dtype], "y vs float64")
    ref.assert_close(_f64(fast[1]), want["mean"], STATS_TOL[dtype], "mean vs float64")
    ref.assert_close(_f64(fast[2]), want["invstd"], STATS_TOL[dtype] * 4, "invstd vs float64")

    y, mean, inv = fast[:3]
    gf = _CUPY.ops.batch_norm_backward(dy, x, mean, inv, w, axis=axis)
    assert launches.take() == ["backward_reduce_fused", "backward_apply"]
    gs = _GENERIC.ops.batch_norm_backward(dy, x, mean, inv, w, axis=axis)
    k = _f64(inv) * (1.0 if w is None else _f64(w))
    terms = float(np.max(np.abs(dyh * k.reshape(bs)))) or 1.0  # dx: a difference of such terms
    for what, f, s in zip(("dx", "dgamma", "dbeta"), gf, gs):
        assert f.dtype == s.dtype and f.shape == s.shape, what
        scale = terms if what == "dx" else (float(np.max(np.abs(_f64(s)))) or 1.0)
        err = float(np.max(np.abs(_f64(f) - _f64(s)))) / scale
        assert err <= TOL[dtype] * 10, f"{what} vs generic: {err:.3e}"
    grads = ref.backward(dyh, xh, axis=axis, weight=_h(w))
    ref.assert_close(_f64(gf[2]), grads["dbeta"], STATS_TOL[dtype] * 10 + 1e-6, "dbeta vs float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((16, 3, 32, 32), 1), ((300, 24), 1)])
def test_step_ops_eval_mode_backward(shape, axis, dtype, monkeypatch):
    c = shape[axis]
    x, _ = _make(shape, dtype, 33)
    dy, _ = _make(shape, dtype, 34)
    w, _, rm, rv = _params(c, True, True, "float32", 35)
    acc = _acc(dtype)
    mean = rm.astype(acc)
    inv = 1.0 / cupy.sqrt(rv.astype(acc) + 1e-5)
    launches = _Launches(monkeypatch)
    for need in (True, False):
        f = _CUPY.ops.batch_norm_backward(
            dy, x, mean, inv, w, axis=axis, batch_stats_used=False, need_param_grads=need
        )
        names = launches.take()
        s = _GENERIC.ops.batch_norm_backward(
            dy, x, mean, inv, w, axis=axis, batch_stats_used=False, need_param_grads=need
        )
        launches.take()
        assert names == (["backward_reduce_fused", "scale_shift"] if need else ["scale_shift"])
        # dx = dy * (weight * inv) on both paths, rounded once to the input's dtype
        assert f[0].dtype == s[0].dtype
        ref.assert_close(_f64(f[0]), _f64(s[0]), TOL[dtype], "eval-mode dx")
        for a, b_ in zip(f[1:], s[1:]):
            assert (a is None) == (b_ is None)
            if a is not None:
                assert a.dtype == b_.dtype
                ref.assert_close(_f64(a), _f64(b_), STATS_TOL[dtype] * 10, "eval-mode grads")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "axis"), [((4, 3, 257, 259), 1), ((8, 64), 1), ((65536, 64), 1), ((2, 5, 3), -1)]
)
def test_fused_kernels_write_every_output(shape, axis, dtype):
    c = shape[axis]
    x, _ = _make(shape, dtype, 36)
    dy, _ = _make(shape, dtype, 37)
    acc = _acc(dtype)
    for pdt in ("float32", "float64"):
        w, b, rm, rv = _params(c, True, True, pdt, 38)
        out = tuple(_nan((c,), acc) for _ in range(4)) + tuple(_nan((c,), pdt) for _ in range(2))
        got = kc.launch_stats_fused(x, w, b, rm, rv, axis=axis, eps=1e-5, momentum=0.1, out=out)
        assert got is not None and all(g is o for g, o in zip(got, out))
        assert all(bool(cupy.isfinite(g).all()) for g in got)
        outb = tuple(_nan((c,), acc) for _ in range(5))
        gotb = kc.launch_backward_reduce_fused(dy, x, got[0], got[1], w, axis=axis, out=outb)
        assert gotb is not None and all(g is o for g, o in zip(gotb, outb))
        assert all(bool(cupy.isfinite(g).all()) for g in gotb)
    # without weight, bias or running statistics nothing else is touched
    out = tuple(_nan((c,), acc) for _ in range(4)) + (None, None)
    got = kc.launch_stats_fused(x, None, None, None, None, axis=axis, eps=1e-5, momentum=0.1, out=out)
    assert got[4] is None and got[5] is None and all(bool(cupy.isfinite(g).all()) for g in got[:4])


@pytest.mark.parametrize(
    ("shape", "axis"), [((2, 3, 1024, 1024), 1), ((65536, 64), 1), ((32, 64, 56, 56), 1)]
)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_step_ops_bitwise_deterministic(shape, axis, dtype):
    c = shape[axis]
    x, _ = _make(shape, dtype, 39)
    dy, _ = _make(shape, dtype, 40)
    w, b, rm, rv = _params(c, True, True, "float32", 41)
    first = None
    for _ in range(10):
        fwd = _CUPY.ops.batch_norm_forward(x, w, b, rm, rv, axis=axis)
        bwd = _CUPY.ops.batch_norm_backward(dy, x, fwd[1], fwd[2], w, axis=axis)
        blob = b"".join(cupy.asnumpy(a).tobytes() for a in (*fwd, *bwd))
        first = blob if first is None else first
        assert blob == first, "results differ between runs"


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_forward_constant_channels_give_exactly_the_bias(dtype):
    x, _ = _make((8, 4, 13, 11), dtype, 42)
    for ch, v in ((0, 0.1), (2, -1234.567)):
        x[:, ch] = cupy.asarray(np.float32(v)).astype(x.dtype)
    w, b, rm, rv = _params(4, True, True, "float32", 43)
    y, mean, inv, _, _ = _CUPY.ops.batch_norm_forward(x, w, b, rm, rv, axis=1)
    expect = b.astype(x.dtype)
    for ch in (0, 2):
        assert bool((y[:, ch] == expect[ch]).all()), f"channel {ch}"
        assert bool(mean[ch] == x[0, ch, 0, 0].astype(mean.dtype))


def test_layer_training_step_is_four_launches(monkeypatch):
    import xbn

    bn = xbn.BatchNorm2d(16, backend=_CUPY)
    x, _ = _make((8, 16, 12, 12), "float32", 44)
    dy, _ = _make((8, 16, 12, 12), "float32", 45)
    launches = _Launches(monkeypatch)
    bn.zero_grad()
    bn(x)
    assert launches.take() == ["stats_fused", "scale_shift"]
    bn.backward(dy)
    assert launches.take() == ["backward_reduce_fused", "backward_apply"]


@pytest.mark.parametrize(
    ("dtype", "momentum", "affine", "track"),
    [
        ("float32", 0.1, True, True),
        ("float32", None, True, True),
        ("float32", 0.1, False, True),
        ("float32", 0.1, True, False),
        ("float16", 0.1, True, True),
        ("float64", 0.3, True, True),
    ],
)
def test_batchnorm2d_steps_match_generic_backend(dtype, momentum, affine, track):
    import xbn

    kw = dict(momentum=momentum, affine=affine, track_running_stats=track)
    fast = xbn.BatchNorm2d(24, backend=_CUPY, **kw)
    slow = xbn.BatchNorm2d(24, backend=_GENERIC, **kw)
    tol = TOL[dtype]
    for step in range(3):
        x, _ = _make((8, 24, 10, 9), dtype, 50 + step, loc=step - 1.0)
        dy, _ = _make((8, 24, 10, 9), dtype, 60 + step)
        y_f, y_s = fast(x), slow(x)
        dx_f, dx_s = fast.backward(dy), slow.backward(dy)  # grads accumulate over the steps
        assert y_f.dtype == y_s.dtype and dx_f.dtype == dx_s.dtype
        ref.assert_close(_f64(y_f), _f64(y_s), tol, f"y, step {step}")
        ref.assert_close(_f64(dx_f), _f64(dx_s), tol * 10, f"dx, step {step}")
        assert fast.num_batches_tracked == slow.num_batches_tracked
    for name in ("running_mean", "running_var"):
        f, s = getattr(fast, name), getattr(slow, name)
        assert (f is None) == (s is None)
        if f is not None:
            assert f.dtype == s.dtype
            ref.assert_close(_f64(f), _f64(s), 1e-5, name)
    for p_f, p_s in zip(fast.parameters(), slow.parameters()):
        assert p_f.grad.dtype == p_s.grad.dtype
        # float32 gradients of float64 sums: the casts may round a hair apart
        ref.assert_close(_f64(p_f.grad), _f64(p_s.grad), max(tol * 10, 1e-6), "parameter grad")
    fast.eval()
    slow.eval()
    x, _ = _make((8, 24, 10, 9), dtype, 70)
    dy, _ = _make((8, 24, 10, 9), dtype, 71)
    ref.assert_close(_f64(fast(x)), _f64(slow(x)), tol, "eval y")
    ref.assert_close(_f64(fast.backward(dy)), _f64(slow.backward(dy)), tol, "eval dx")


# -- the eval-mode forward, graph capture, threads, non-finite input ----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((16, 8, 14, 14), 1),
        ((128, 64, 7, 7), 1),
        ((8, 2048, 7, 7), 1),
        ((64, 7, 7, 3), -1),
        ((4096, 1024), 1),
    ],
)
def test_inference_is_one_launch_with_the_generic_results(shape, axis, dtype, monkeypatch):
    c = shape[axis]
    x, xh = _make(shape, dtype, 80, loc=1.0)
    rng = np.random.default_rng(81)
    w, b = (
        cupy.asarray(rng.normal(1, 0.3, c).astype(np.float32)),
        cupy.asarray(rng.normal(size=c).astype(np.float32)),
    )
    rm, rv = (
        cupy.asarray(rng.normal(size=c).astype(np.float32)),
        cupy.asarray(rng.uniform(0.3, 2, c).astype(np.float32)),
    )
    launches = _Launches(monkeypatch)
    y = _CUPY.ops.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=1e-5)
    assert launches.take() == ["inference"]
    want = _GENERIC.ops.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=1e-5)
    assert y.dtype == want.dtype
    ref.assert_close(_f64(y), _f64(want), TOL[dtype], "eval y")


def test_layer_eval_forward_is_one_launch(monkeypatch):
    import xbn

    bn = xbn.BatchNorm2d(16, backend=_CUPY)
    x, _ = _make((8, 16, 12, 12), "float32", 82)
    bn(x)
    bn.backward(x)
    bn.eval()
    launches = _Launches(monkeypatch)
    bn(x)
    assert launches.take() == ["inference"]


def test_reductions_under_graph_capture_replay_correctly():
    """Captured into a CUDA graph, a forward and backward whose reductions would split run
    unsplit (no pool workspace, no counter buffer made in the capture), and the graph replayed
    on new data gives that data's results."""
    x, xh = _make((4, 2, 256, 256), "float32", 83)
    dy, dyh = _make((4, 2, 256, 256), "float32", 84)
    w, b = cupy.ones(2, cupy.float32), cupy.zeros(2, cupy.float32)
    kc._thread_counters().clear()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        # compile, and fill the memory pool with the sizes the capture allocates, beforehand
        _, m0, i0, _, _ = _CUPY.ops.batch_norm_forward(x, w, b, None, None, axis=1)
        _CUPY.ops.batch_norm_backward(dy, x, m0, i0, w, axis=1)
        stream.synchronize()
        stream.begin_capture()
        y, mean, inv, _, _ = _CUPY.ops.batch_norm_forward(x, w, b, None, None, axis=1)
        dx, dgamma, dbeta = _CUPY.ops.batch_norm_backward(dy, x, mean, inv, w, axis=1)
        graph = stream.end_capture()
    assert not any(k[1] == stream.ptr for k in kc._thread_counters())
    for seed in (85, 86):
        new_x, new_xh = _make(x.shape, "float32", seed)
        x[...] = new_x
        graph.launch(stream)
        stream.synchronize()
        want = ref.forward(new_xh, axis=1, weight=np.ones(2), bias=np.zeros(2), eps=1e-5)
        ref.assert_close(_f64(y), want["y"], 1e-5, "replayed y")
        grads = ref.backward(dyh, new_xh, axis=1, weight=np.ones(2), eps=1e-5)
        ref.assert_close(_f64(dx), grads["dx"], 1e-4, "replayed dx")


def test_threads_on_streams_of_their_own():
    """Four threads, each on a stream of its own, reducing at once: every result right."""
    import threading

    x, xh = _make((600, 64), "float32", 87)
    want = xh.var(axis=0)
    errors = []

    def work():
        try:
            with cupy.cuda.Stream(non_blocking=True) as s:
                for _ in range(20):
                    _, v = kc.launch_batch_stats(x, axis=1)
                s.synchronize()
                ref.assert_close(_f64(v), want, 1e-5, "var")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_threads_on_the_per_thread_default_stream():
    """With CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 (read when CuPy is imported, hence a child
    process) every thread's default stream has one pointer; four threads reducing at once on
    theirs must still not share counters."""
    import os
    import subprocess
    import sys

    script = (
        "import threading, numpy as np, cupy\n"
        "from xbn.kernels import cupy as kc\n"
        "assert cupy.cuda.get_current_stream().ptr == cupy.cuda.Stream.ptds.ptr\n"
        "h = np.random.default_rng(0).normal(size=(600, 64)).astype(np.float32)\n"
        "x = cupy.asarray(h); want = h.astype(np.float64).var(axis=0); bad = []\n"
        "def work():\n"
        "    for _ in range(50):\n"
        "        _, v = kc.launch_batch_stats(x, axis=1)\n"
        "    cupy.cuda.get_current_stream().synchronize()\n"
        "    if not np.allclose(cupy.asnumpy(v), want, rtol=1e-5): bad.append(1)\n"
        "ts = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "assert not bad, 'wrong statistics'\n"
    )
    env = dict(os.environ, CUPY_CUDA_PER_THREAD_DEFAULT_STREAM="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize(("shape", "axis"), [((8192, 6), 1), ((4, 6, 4096), 1)])
def test_infinities_and_constant_channels(shape, axis):
    host = np.random.default_rng(88).normal(size=shape).astype(np.float32)
    moved = np.moveaxis(host, axis, 0)
    moved[0] = np.float32(12345.678)
    moved[1] = np.float32(1e8)
    moved[2][(0,) * (moved.ndim - 1)] = np.inf  # the channel's first value
    moved[3][(-1,) * (moved.ndim - 1)] = -np.inf  # its last
    host = np.ascontiguousarray(host)
    x = cupy.asarray(host)
    c = shape[axis]
    bias = cupy.asarray(np.linspace(-1, 1, c).astype(np.float32))
    y, mean, inv, rm, rv = _CUPY.ops.batch_norm_forward(
        x,
        cupy.ones(c, cupy.float32),
        bias,
        cupy.zeros(c, cupy.float32),
        cupy.ones(c, cupy.float32),
        axis=axis,
    )
    m, r_m, r_v = cupy.asnumpy(mean), cupy.asnumpy(rm), cupy.asnumpy(rv)
    yh = np.moveaxis(cupy.asnumpy(y), axis, 0)
    assert m[0] == np.float32(12345.678) and m[1] == np.float32(1e8)
    assert (yh[0] == cupy.asnumpy(bias)[0]).all() and (yh[1] == cupy.asnumpy(bias)[1]).all()
    assert m[2] == np.inf and m[3] == -np.inf and r_m[2] == np.inf and r_m[3] == -np.inf
    assert np.isnan(r_v[2:4]).all() and np.isnan(yh[2:4]).all()
    assert np.isfinite(yh[4:]).all()
