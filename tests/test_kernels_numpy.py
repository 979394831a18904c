"""The NumPy fast paths (xbn/kernels/numpy.py) against the generic functions they replace.

Every registered op is run through ``resolve("numpy")`` (fast) and ``resolve("numpy",
generic=True)`` (generic) on the same inputs: shapes that exercise each walk of the kernel
(row layout, column layout, folded columns, split rows, the thread pool), every channel axis,
the three float dtypes and non-contiguous inputs; on both engines, the NumPy passes and the
compiled loops (when numba is installed). Timing is not tested here: see ``xbn bench --cpu``.
"""

from __future__ import annotations

import importlib.util
import tracemalloc

import numpy as np
import pytest

import xbn
from xbn import backends
from xbn import functional as F
from xbn.kernels import numpy as kn

from reference import assert_same_bits

# generic=False: the kernels are tested whatever XBN_FORCE_GENERIC says about the layers
NUMPY_FAST = backends.resolve("numpy", generic=False)
FAST = NUMPY_FAST.ops
GENERIC = backends.resolve("numpy", generic=True).ops
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(
    autouse=True,
    params=[
        "numpy",
        pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")),
    ],
)
def engine(request):
    """Every test runs on the NumPy passes, and again on the compiled loops where numba is."""
    before = kn._engine
    kn.set_engine(request.param)
    yield request.param
    kn._engine = before


# (shape, channel axis): C=1 and C=3, spatial 1, 7 and prime extents, large C with tiny
# spatial size, channels-last, a channel axis in the middle, rows long enough for the row
# layout (>= 2048 values), rows split into sub-rows (> 65536), a prime row too long to split,
# and arrays over 1 MiB, which go through the thread pool.
SHAPES = [
    ((16, 1), 1),
    ((5, 3), 1),
    ((7, 1, 7, 7), 1),
    ((4, 3, 1, 1), 1),
    ((3, 5, 13, 17), 1),
    ((2, 512, 1, 3), 1),
    ((3, 1031), 1),
    ((2, 7, 11, 5), -1),
    ((6, 9, 9, 3), 3),
    ((4, 5, 3, 11), 2),
    ((3, 4, 2, 5, 7), 2),
    ((2, 3, 64, 64), 1),
    ((1, 2, 300, 300), 1),
    ((1, 2, 65537), 1),
    ((1, 3, 4099), 0),
    ((8, 16, 48, 48), 1),
    ((16, 24, 24, 32), -1),
    ((4099, 64), 1),
    ((4096, 128), 1),
    # wide C: partials of one block of rows, channels split among tasks (strips), and blocks of
    # rows that the partial budget makes taller; C over the folding limit; a prime C and N
    ((3, 70001), 1),
    ((40, 20011), 1),
    ((4096, 1024), 1),
    ((2, 3001, 5), 1),
    ((8, 300, 7, 7), 1),
    ((1031, 257), 1),
]
DTYPES = [np.float32, np.float64, np.float16]
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}


def _id(p):
    return "x".join(map(str, p[0])) + f"-ax{p[1]}"


def _data(shape, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def _close(a, b, tol, what):
    """a and b agree to ``tol`` relative to the largest magnitude in b; same dtype and shape."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a64)), f"{what}: non-finite values"
    scale = max(float(np.max(np.abs(b64))), 1e-30)
    err = float(np.max(np.abs(a64 - b64))) / scale
    assert err <= tol, f"{what}: relative difference {err:.3g} > {tol:.3g}"


def _coefficients(x, axis, ops, weight=None):
    mean, var = ops.batch_stats(x, axis=axis)
    inv = F.invstd(var, eps=1e-5)
    return mean, var, inv, weight


def _permuted(x, order):
    """The same values as ``x`` stored in another axis order (a contiguous array's view)."""
    inverse = np.argsort(order)
    return np.ascontiguousarray(x.transpose(order)).transpose(inverse)


# -- registration and routing ---------------------------------------------------------------


def test_all_ops_registered(engine):
    # every op; the whole steps decline on the NumPy passes (the composition runs there)
    assert set(FAST.fast) == set(backends.OP_NAMES)
    assert GENERIC.fast == ()
    assert kn.get_engine() == engine


# (shape, axis) x what the layer may hand the whole-step ops: affine or not, running statistics
# or not, a constant channel (its scale is 0), a tiny eps, an infinite value, a large offset
STEP_SHAPES = [((64, 16, 8, 8), 1), ((32, 7, 5, 3), -1), ((300, 5), 1), ((4, 3, 1031), 1), ((17, 2), 0)]
STEP_CASES = ["plain", "no-affine", "no-running", "constant", "tiny-eps", "inf", "offset"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("shape_axis", STEP_SHAPES, ids=_id)
def test_whole_steps_match_the_composition_bit_for_bit(shape_axis, case, dtype, engine):
    """batch_norm_forward/backward/inference (fused per-channel work on the compiled engine, the
    composition itself on the NumPy passes) give the generic composition's bits over the same
    passes: y, the statistics, the running statistics, dx and both parameter gradients."""
    shape, axis = shape_axis
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w, b = (rng.random(c) + 0.5).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
    eps = 1e-30 if case == "tiny-eps" else 1e-5
    first = [slice(None)] * len(shape)
    first[axis] = 0
    if case == "no-affine":
        w = b = None
    if case == "no-running":
        rm = rv = None
    if case in ("constant", "tiny-eps"):
        x[tuple(first)] = 3.25
    if case == "inf":
        x[tuple(first)].flat[0] = np.inf
    if case == "offset":
        x = (x + 1e4).astype(dtype)
    with np.errstate(all="ignore"):
        got = FAST.batch_norm_forward(x, w, b, rm, rv, axis=axis, eps=eps, momentum=0.1)
        want = F.batch_norm_forward(x, w, b, rm, rv, axis=axis, eps=eps, momentum=0.1, xp=np, ops=FAST)
        for g, v, name in zip(got, want, ("y", "mean", "invstd", "running mean", "running var")):
            assert_same_bits(g, v, f"forward {name}", any_nan=True)
        _, mean, inv, _, _ = want
        got = FAST.batch_norm_backward(dy, x, mean, inv, w, axis=axis)
        want = F.batch_norm_backward(dy, x, mean, inv, w, axis=axis, xp=np, ops=FAST)
        for g, v, name in zip(got, want, ("dx", "dgamma", "dbeta")):
            assert_same_bits(g, v, f"backward {name}", any_nan=True)
        if rm is not None:
            got = FAST.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=eps)
            want = F.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=eps, xp=np, ops=FAST)
            assert_same_bits(got, want, "inference y", any_nan=True)


def test_whole_steps_decline_what_they_do_not_fuse(engine):
    """float16 input, vectors of another dtype (float64 running statistics with float32 input
    compute in float64), an eval-mode backward and a single value per channel go to the
    composition: the results are the generic path's."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 4, 3)).astype(np.float32)
    rm64, rv64 = np.zeros(4), np.ones(4)
    got = FAST.batch_norm_inference(x, None, None, rm64, rv64, axis=1)
    assert got.dtype == np.float32
    _close(got, GENERIC.batch_norm_inference(x, None, None, rm64, rv64, axis=1), 1e-6, "float64 running")
    x16 = x.astype(np.float16)
    y, *_ = FAST.batch_norm_forward(x16, None, None, None, None, axis=1)
    _close(y, GENERIC.batch_norm_forward(x16, None, None, None, None, axis=1)[0], 2e-3, "float16")
    dy = rng.standard_normal(x.shape).astype(np.float32)
    inv = np.full(4, 0.5, np.float32)
    got = FAST.batch_norm_backward(dy, x, np.zeros(4, np.float32), inv, None, axis=1, batch_stats_used=False)
    want = GENERIC.batch_norm_backward(
        dy, x, np.zeros(4, np.float32), inv, None, axis=1, batch_stats_used=False
    )
    for g, v in zip(got, want):
        _close(g, v, 1e-6, "eval-mode backward")
    with pytest.raises(ZeroDivisionError):  # the composition's error, as on the generic path
        FAST.batch_norm_forward(
            x[:1, :, :1], None, None, np.zeros(4, np.float32), np.ones(4, np.float32), axis=1
        )


def test_engine_choice():
    with pytest.raises(ValueError):
        kn.set_engine("fortran")
    if not HAVE_NUMBA:
        with pytest.raises(ImportError):
            kn.set_engine("numba")
        kn.set_engine("auto")
        assert kn.get_engine() == "numpy"


@pytest.mark.parametrize(
    "make, fast",
    [
        (lambda x: x, True),
        (lambda x: np.asfortranarray(x), True),
        (lambda x: _permuted(x, (0, 2, 3, 1)), True),
        (lambda x: x[:, :, ::2], False),
        (lambda x: x[::-1], False),
    ],
)
def test_layouts_routed(make, fast):
    x = make(np.ones((4, 3, 6, 5), np.float32))
    assert (kn._geometry(x, 1) is not None) is fast


def test_mismatched_dy_layout_goes_generic():
    x, dy = _data((4, 3, 6, 5), np.float32)
    assert kn._geometry(x, 1, np.asfortranarray(dy)) is None
    mean = FAST.batch_stats(x, axis=1)[0]
    got = FAST.backward_reduce(np.asfortranarray(dy), x, mean, axis=1)
    want = GENERIC.backward_reduce(dy, x, mean, axis=1)
    for g, w in zip(got, want):
        _close(g, w, 2e-5, "backward_reduce")


# -- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", SHAPES, ids=_id)
def test_parity_all_ops(case, dtype):
    shape, axis = case
    x, dy = _data(shape, dtype, seed=len(shape) + shape[0])
    tol = TOL[np.dtype(dtype)]
    c = shape[axis]
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal(c) + 1.0).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)

    mean_f, var_f = FAST.batch_stats(x, axis=axis)
    mean_g, var_g = GENERIC.batch_stats(x, axis=axis)
    stat_tol = max(tol, 1e-5) if dtype == np.float16 else tol
    _close(mean_f, mean_g, stat_tol, "mean")
    _close(var_f, var_g, stat_tol, "var")
    np.testing.assert_allclose(var_f, var_g, rtol=10 * stat_tol)

    # downstream ops get identical coefficients, so they are compared one at a time
    inv = F.invstd(var_g, eps=1e-5)
    scale, shift = F.scale_shift_coefficients(mean_g, inv, weight, bias)
    _close(
        FAST.scale_shift(x, scale, shift, axis=axis),
        GENERIC.scale_shift(x, scale, shift, axis=axis),
        tol,
        "y",
    )
    _close(
        FAST.scale_shift(dy, scale, None, axis=axis),
        GENERIC.scale_shift(dy, scale, None, axis=axis),
        tol,
        "eval dx",
    )

    sums_f = FAST.backward_reduce(dy, x, mean_g, axis=axis)
    sums_g = GENERIC.backward_reduce(dy, x, mean_g, axis=axis)
    _close(sums_f[0], sums_g[0], max(tol, 1e-5), "sum_dy")
    _close(sums_f[1], sums_g[1], max(tol, 1e-5), "sum_dy_xmu")

    count = F.values_per_channel(shape, axis % len(shape))
    k = F.backward_coefficients(*sums_g, inv, weight, count=count)
    _close(
        FAST.backward_apply(dy, x, mean_g, *k, axis=axis),
        GENERIC.backward_apply(dy, x, mean_g, *k, axis=axis),
        tol,
        "dx",
    )


@pytest.mark.parametrize("order", [(0, 2, 3, 1), (3, 2, 1, 0), (1, 0, 2, 3)])
@pytest.mark.parametrize("axis", [1, -1])
def test_parity_permuted_memory(order, axis):
    """torch's channels_last and Fortran order: the fast path walks memory order, and its
    outputs keep the input's layout, as the generic elementwise ops do."""
    x0, dy0 = _data((6, 5, 9, 7), np.float32)
    x, dy = _permuted(x0, order), _permuted(dy0, order)
    assert kn._geometry(x, axis, dy) is not None
    mean, var = FAST.batch_stats(x, axis=axis)
    mg, vg = GENERIC.batch_stats(x0, axis=axis)
    _close(mean, mg, 2e-5, "mean")
    _close(var, vg, 2e-5, "var")
    inv = F.invstd(vg, eps=1e-5)
    scale, shift = F.scale_shift_coefficients(mg, inv, None, None)
    y, yg = FAST.scale_shift(x, scale, shift, axis=axis), GENERIC.scale_shift(x, scale, shift, axis=axis)
    _close(y, yg, 2e-5, "y")
    assert np.argsort(y.strides).tolist() == np.argsort(x.strides).tolist()
    sums = GENERIC.backward_reduce(dy0, x0, mg, axis=axis)
    for a, b in zip(FAST.backward_reduce(dy, x, mg, axis=axis), sums):
        _close(a, b, 2e-5, "sums")
    k = F.backward_coefficients(*sums, inv, None, count=x.size // x.shape[axis])
    dx = FAST.backward_apply(dy, x, mg, *k, axis=axis)
    _close(dx, GENERIC.backward_apply(dy0, x0, mg, *k, axis=axis), 2e-5, "dx")
    assert np.argsort(dx.strides).tolist() == np.argsort(x.strides).tolist()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_non_contiguous_input_matches_generic(dtype):
    """A strided view no axis order makes contiguous: every fast path declines it
    (NotImplemented), the seam gives the generic results, and those agree with the fast path
    on a contiguous copy of the same values."""
    base, dbase = _data((6, 4, 10, 9), dtype)
    x, dy = base[:, :, ::2, 1:], dbase[:, :, ::2, 1:]
    xc, dyc = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    assert kn._geometry(x, 1) is None and kn._geometry(xc, 1, dyc) is not None
    tol = TOL[np.dtype(dtype)]
    mg, vg = GENERIC.batch_stats(x, axis=1)
    inv = F.invstd(vg, eps=1e-5)
    scale, shift = F.scale_shift_coefficients(mg, inv, None, None)
    sums = GENERIC.backward_reduce(dy, x, mg, axis=1)
    k = F.backward_coefficients(*sums, inv, None, count=x.size // 4)
    calls = {
        "batch_stats": ((x,), (xc,)),
        "scale_shift": ((x, scale, shift), (xc, scale, shift)),
        "backward_reduce": ((dy, x, mg), (dyc, xc, mg)),
        "backward_apply": ((dy, x, mg, *k), (dyc, xc, mg, *k)),
    }
    for op, (strided, contiguous) in calls.items():
        assert getattr(kn, op)(*strided, axis=1) is NotImplemented, op
        seam = getattr(FAST, op)(*strided, axis=1)
        generic = getattr(GENERIC, op)(*strided, axis=1)
        fast = getattr(FAST, op)(*contiguous, axis=1)
        for s, g, f in zip(*(r if isinstance(r, tuple) else (r,) for r in (seam, generic, fast))):
            np.testing.assert_array_equal(s, g)  # the generic function itself ran
            sums_tol = op in ("batch_stats", "backward_reduce")  # reductions in another order
            _close(f, g, max(tol, 1e-5) if sums_tol else tol, op)


@pytest.mark.parametrize("case", [((4, 3, 50, 50), 1), ((64, 3, 4, 4), 1), ((200, 3), 1)], ids=_id)
def test_backward_apply_unfoldable_channels(case):
    """A channel with gamma = 0 (k_dy = 0) or with sum(dy * (x - mean)) = 0 (k_xmu = 0) cannot
    use the four-pass form; the five-pass form must give the generic result."""
    shape, axis = case
    x, dy = _data(shape, np.float32)
    mean, var = GENERIC.batch_stats(x, axis=axis)
    inv = F.invstd(var, eps=1e-5)
    count = x.size // shape[axis]
    weight = np.array([1.5, 0.0, -2.0], np.float32)
    sums = GENERIC.backward_reduce(dy, x, mean, axis=axis)
    k = F.backward_coefficients(*sums, inv, weight, count=count)
    assert kn._fold_backward(mean, *k, np.dtype(np.float32)) is None
    _close(
        FAST.backward_apply(dy, x, mean, *k, axis=axis),
        GENERIC.backward_apply(dy, x, mean, *k, axis=axis),
        2e-5,
        "dx",
    )
    k_dy, k_xmu, k_const = F.backward_coefficients(*sums, inv, None, count=count)
    k_xmu = k_xmu.copy()
    k_xmu[0] = 0.0
    got = FAST.backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis)
    _close(got, GENERIC.backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis), 2e-5, "dx")


@pytest.mark.parametrize(
    "case", [((3, 20001), 1), ((64, 8, 32, 32), 1), ((4096, 16), 1), ((8, 14, 14, 32), -1)], ids=_id
)
def test_backward_apply_large_offset(case):
    """float32 x = 1e4 + N(0, 1): dx as accurate as the generic form (against float64 arithmetic
    on the same coefficients). The four-pass form would round its centre at ulp(1e4) = 1e-3 in
    every x - centre (2.6e-2 relative error with 3 values per channel), so it is not taken."""
    shape, axis = case
    rng = np.random.default_rng(11)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    mean, var = GENERIC.batch_stats(x, axis=axis)
    inv = F.invstd(var, eps=1e-5)
    sums = GENERIC.backward_reduce(dy, x, mean, axis=axis)
    k = F.backward_coefficients(*sums, inv, None, count=x.size // shape[axis])
    nd, a = x.ndim, axis % x.ndim
    pc = [np.asarray(F.per_channel(v, nd, a), np.float64) for v in (mean, *k)]
    ref = dy * pc[1] + (x - pc[0]) * pc[2] + pc[3]
    got = FAST.backward_apply(dy, x, mean, *k, axis=axis)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert err <= 1e-6, f"dx relative error {err:.2g}"


def test_mixed_precision_coefficients():
    """float32 input with float64 running statistics (eval with dtype='float64' parameters)."""
    x, _ = _data((8, 5, 40, 40), np.float32)
    scale = np.linspace(0.5, 2.0, 5)
    shift = np.linspace(-1.0, 1.0, 5)
    y, yg = FAST.scale_shift(x, scale, shift, axis=1), GENERIC.scale_shift(x, scale, shift, axis=1)
    assert y.dtype == yg.dtype == np.float32
    np.testing.assert_array_equal(y, yg)


def test_random_shapes():
    rng = np.random.default_rng(12345)
    for _ in range(25):
        ndim = int(rng.integers(2, 5))
        shape = tuple(int(v) for v in rng.integers(1, 12, size=ndim))
        shape = (max(shape[0], 2),) + shape[1:]
        axis = int(rng.integers(-ndim, ndim))
        dtype = DTYPES[int(rng.integers(0, 3))]
        x, dy = _data(shape, dtype, seed=int(rng.integers(1 << 30)))
        tol = max(TOL[np.dtype(dtype)], 1e-5)
        for a, b in zip(FAST.batch_stats(x, axis=axis), GENERIC.batch_stats(x, axis=axis)):
            _close(a, b, tol, f"stats {shape} axis {axis} {np.dtype(dtype).name}")
        mean = GENERIC.batch_stats(x, axis=axis)[0]
        for a, b in zip(
            FAST.backward_reduce(dy, x, mean, axis=axis), GENERIC.backward_reduce(dy, x, mean, axis=axis)
        ):
            _close(a, b, tol, f"sums {shape} axis {axis}")


# -- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", [((16, 4, 64, 64), 1), ((32, 8, 14, 14), 1), ((4096, 16), 1), ((8, 28, 28, 16), -1)], ids=_id
)
def test_large_offset_variance(case):
    """float32 x = 1e4 + N(0, 1): the variance within 1e-3 of the float64 one (of the same data)."""
    shape, axis = case
    rng = np.random.default_rng(7)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    mean, var = FAST.batch_stats(x, axis=axis)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    x64 = x.astype(np.float64)
    ref = x64.var(axis=axes)
    np.testing.assert_allclose(var, ref, rtol=1e-3)
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "case", [((8, 5, 64, 64), 1), ((6, 5, 7, 7), 1), ((500, 5), 1), ((4, 9, 9, 5), -1)], ids=_id
)
def test_constant_channel_exact(case, dtype):
    """A constant channel has mean exactly its value and variance exactly 0, so the layer can
    give it exactly beta; scale 0 then gives exactly the shift."""
    shape, axis = case
    x, _ = _data(shape, dtype)
    values = np.array([0.1, 1e4, -3.3, 7e-3, 123.456], dtype=dtype)
    index = [slice(None)] * x.ndim
    for c, v in enumerate(values):
        index[axis] = c
        x[tuple(index)] = v
    mean, var = FAST.batch_stats(x, axis=axis)
    np.testing.assert_array_equal(var, np.zeros(5, var.dtype))
    np.testing.assert_array_equal(mean, values.astype(mean.dtype))
    shift = np.arange(5, dtype=mean.dtype)
    y = FAST.scale_shift(x, np.zeros(5, mean.dtype), shift, axis=axis)
    want = np.broadcast_to(F.per_channel(shift.astype(x.dtype), x.ndim, axis % x.ndim), x.shape)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda d: np.dtype(d).name)
def test_low_precision_accumulates_in_float32(dtype):
    x, dy = _data((64, 3, 40, 40), dtype)
    mean, var = FAST.batch_stats(x, axis=1)
    assert mean.dtype == var.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-5)
    sums = FAST.backward_reduce(dy, x, mean, axis=1)
    assert all(s.dtype == np.float32 for s in sums)
    np.testing.assert_allclose(sums[0], dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-2)


def test_float64_stays_float64():
    x, dy = _data((16, 4, 50, 50), np.float64)
    mean, var = FAST.batch_stats(x, axis=1)
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-13)


# -- determinism ----------------------------------------------------------------------------


def _all_outputs(x, dy, axis):
    mean, var = FAST.batch_stats(x, axis=axis)
    inv = F.invstd(var, eps=1e-5)
    scale, shift = F.scale_shift_coefficients(mean, inv, None, None)
    y = FAST.scale_shift(x, scale, shift, axis=axis)
    sums = FAST.backward_reduce(dy, x, mean, axis=axis)
    k = F.backward_coefficients(*sums, inv, None, count=x.size // x.shape[axis])
    return [mean, var, y, *sums, FAST.backward_apply(dy, x, mean, *k, axis=axis)]


@pytest.fixture
def threads():
    before = kn.get_num_threads()
    yield kn.set_num_threads
    kn.set_num_threads(before)


@pytest.mark.parametrize(
    "case", [((8, 16, 64, 64), 1), ((64, 32, 14, 14), 1), ((16, 28, 28, 32), -1), ((8192, 64), 1)], ids=_id
)
def test_deterministic_across_calls_and_thread_counts(case, threads, engine):
    """Bitwise equal on repeated calls with any thread timing. Across thread counts: bitwise on
    the NumPy passes; the compiled engine runs a serial build on one thread and a parallel one
    on more, which may round the last bit differently (see xbn/kernels/_numba_cpu.py)."""
    shape, axis = case
    x, dy = _data(shape, np.float32)
    assert x.nbytes >= kn._PARALLEL_MIN_BYTES  # the pool is used
    threads(2)
    first = _all_outputs(x, dy, axis)
    for _ in range(3):
        for a, b in zip(first, _all_outputs(x, dy, axis)):
            np.testing.assert_array_equal(a, b)
    for n in (1, 3):
        threads(n)
        again = _all_outputs(x, dy, axis)
        for a, b in zip(again, _all_outputs(x, dy, axis)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(first, again):
            if engine == "numpy" or n > 1:
                np.testing.assert_array_equal(a, b)
            else:
                _close(a, b, 1e-6, "1 thread vs 2")


def test_set_num_threads_validates(threads):
    with pytest.raises(ValueError):
        threads(0)


def test_errors_in_workers_propagate(threads, monkeypatch, engine):
    if engine != "numpy":
        pytest.skip("the thread pool belongs to the NumPy passes")
    threads(2)
    x, _ = _data((8, 16, 64, 64), np.float32)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(kn.np, "vecdot", boom)
    with pytest.raises(RuntimeError, match="boom"):
        FAST.batch_stats(x, axis=1)


# -- memory ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [((16, 16, 64, 64), 1), ((32, 32, 32, 32), -1), ((4096, 256), 1)], ids=_id)
def test_backward_peak_memory(case):
    """Peak extra memory of a layer backward: dx plus O(chunk) scratch (the generic path
    peaks at 3 * x.nbytes); the target is at most about 2 * x.nbytes."""
    if backends.generic_forced():
        pytest.skip("XBN_FORCE_GENERIC is set: layers do not use the fast paths")
    shape, axis = case
    x, dy = _data(shape, np.float32)
    bn = xbn.BatchNorm(shape[axis], axis=axis, backend=NUMPY_FAST)
    bn(x)
    bn.backward(dy)  # warm: the pool's threads exist, nothing lazily allocated remains
    bn(x)  # a backward needs a forward of its own
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        dx = bn.backward(dy)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert dx.shape == x.shape
    assert peak <= 1.5 * x.nbytes, f"backward peak {peak / x.nbytes:.2f} x nbytes"
    assert peak >= x.nbytes  # dx itself: tracemalloc sees NumPy's allocations
