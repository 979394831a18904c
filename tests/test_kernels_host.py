"""xbn's CUDA kernels executed on the CPU (tests/cuda_host: the .cu sources compiled as C++ with
AddressSanitizer and UndefinedBehaviorSanitizer, CUDA threads as fibers). No GPU needed.

Checked here, for every kernel family, dtype (float32, float64, float16, bfloat16 as bits) and
both layouts, over shapes with C = 1, C = 3, S = 1, S = 7, prime sizes, large C with tiny
spatial and tiny C with large spatial: results against a float64 reference; every output
element written (outputs start as NaN); no access outside any buffer; every thread at every
barrier; the grid reduction bitwise identical whichever block finishes last; counters left at
zero; the scalar and vector paths in agreement. The fused reductions of the whole-step ops:
their per-channel epilogues bit for bit the formulas of xbn.functional applied to the plain
kernels' statistics and sums, and a float64 reference, for every dtype, both layouts, with and
without weight and running statistics, float32 and float64 parameters, M == 2; constant
channels giving exactly the bias. What this cannot check is the GPU itself (memory model, real
concurrency, speed, NVRTC's arithmetic): tests/test_kernels_cupy.py and ci/gpu_tier.sh do.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import array_api_compat.numpy as xnp
import numpy as np
import pytest

from xbn import functional as F
from xbn.kernels import _launch as L

import host_kernels as hk
import reference as ref
from reference import assert_same_bits

pytestmark = pytest.mark.skipif(
    hk.compiler() is None,
    reason="needs g++ (C++20 <barrier>, _Float16, -fsanitize=address,undefined) to run the "
    "CUDA kernels on the CPU",
)

DTYPES = ("float32", "float64", "float16", "bfloat16")
#: Largest relative error (max |got - ref| / max |ref|) against float64, per input dtype: the
#: reductions accumulate in float32 (float64 for float64), outputs round to the input dtype.
REDUCE_TOL = {"float32": 2e-6, "float64": 1e-12, "float16": 2e-6, "bfloat16": 2e-6}
OUTPUT_TOL = {"float32": 2e-6, "float64": 1e-12, "float16": 1e-3, "bfloat16": 8e-3}

# (shape, channel axis): the edge cases, scaled to what an emulator runs in seconds.
SHAPES = [
    ((4, 1, 6, 5), 1),  # C == 1 (one long channel)
    ((5, 3, 7), 1),  # C == 3, S == 7
    ((13, 3, 1, 1), 1),  # S == 1: channels-last, C == 3
    ((3, 5, 31), 1),  # prime S, N * S == 93
    ((8, 96, 2, 2), 1),  # large C, tiny spatial
    ((2, 2, 4099), 1),  # tiny C, large prime spatial: split over blocks, scalar loads
    ((2, 2, 4096), 1),  # tiny C, large spatial: split over blocks, vector loads
    ((100, 24), 1),  # (N, C)
    ((64, 5, 5, 8), -1),  # NHWC
    ((6, 4, 9, 3), 2),  # a middle channel axis
    ((257, 33), 1),  # channels-last with C just over one warp of columns
]


@pytest.fixture(scope="module", autouse=True)
def _build():
    # Build the four harnesses in parallel up front (cached on disk by source hash).
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(hk.driver, [L.dtype_key(d) for d in DTYPES]))


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _bshape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tuple(shape)


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all(), "unwritten (NaN) or non-finite outputs"
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(got - ref))) / scale


def _data(shape, dtype, seed, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    stored = hk.to_storage(rng.normal(loc, scale, size=shape), dtype)
    return stored, hk.from_storage(stored, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=[f"{s}-ax{a}" for s, a in SHAPES])
def test_all_ops_against_float64(shape, axis, dtype):
    acc = np.dtype(L.accumulator_dtype(dtype))
    x, xv = _data(shape, dtype, 1)
    dy, dyv = _data(shape, dtype, 2, loc=0.0, scale=1.0)
    axes, bs = _axes(len(shape), axis), _bshape(len(shape), axis)
    c = shape[axis]

    mean, var, plan = hk.batch_stats(x, dtype, axis=axis, seed=7)
    assert _rel(mean, xv.mean(axis=axes)) <= REDUCE_TOL[dtype], plan
    assert _rel(var, xv.var(axis=axes)) <= REDUCE_TOL[dtype], plan

    mu = xv.mean(axis=axes).astype(acc)
    s_dy, s_dy_xmu, plan = hk.backward_reduce(dy, x, mu, dtype, axis=axis, seed=7)
    mu64 = mu.astype(np.float64).reshape(bs)
    assert _rel(s_dy, dyv.sum(axis=axes)) <= REDUCE_TOL[dtype] * 4, plan
    assert _rel(s_dy_xmu, (dyv * (xv - mu64)).sum(axis=axes)) <= REDUCE_TOL[dtype] * 4, plan

    rng = np.random.default_rng(3)
    scale, shift = rng.normal(size=c).astype(acc), rng.normal(size=c).astype(acc)
    for sh in (shift, None):
        y, plan = hk.scale_shift(x, scale, sh, dtype, axis=axis)
        ref = xv * scale.astype(np.float64).reshape(bs)
        if sh is not None:
            ref = ref + sh.astype(np.float64).reshape(bs)
        assert _rel(hk.from_storage(y, dtype), ref) <= OUTPUT_TOL[dtype], plan

    k = [rng.normal(size=c).astype(acc) for _ in range(3)]
    dx, plan = hk.backward_apply(dy, x, mu, *k, dtype, axis=axis)
    k64 = [v.astype(np.float64).reshape(bs) for v in k]
    ref = dyv * k64[0] + (xv - mu64) * k64[1] + k64[2]
    assert _rel(hk.from_storage(dx, dtype), ref) <= OUTPUT_TOL[dtype], plan


@pytest.mark.parametrize(("shape", "axis"), [((3, 2, 4096), 1), ((600, 16), 1), ((5, 3, 2801), 1)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_grid_reduction_is_bitwise_reproducible_whichever_block_ends_last(shape, axis, dtype):
    x, xv = _data(shape, dtype, 4)
    dy, _ = _data(shape, dtype, 5)
    mu = xv.mean(axis=_axes(len(shape), axis)).astype(np.float32)
    runs = []
    for seed in (0, 1, 2, 3):
        mean, var, plan = hk.batch_stats(x, dtype, axis=axis, seed=seed)
        s1, s2, plan2 = hk.backward_reduce(dy, x, mu, dtype, axis=axis, seed=seed)
        assert plan.parts > 1 and plan2.parts > 1, "the case must split channels over blocks"
        runs.append(b"".join(a.tobytes() for a in (mean, var, s1, s2)))
    assert all(r == runs[0] for r in runs[1:])


@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 64), 1), ((64, 16), 1), ((2, 4, 4, 16), -1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_and_vector_paths_agree(shape, axis, dtype):
    """16-byte vectors against scalar loads (the 8-byte width: test_eight_byte_vectors)."""
    x, xv = _data(shape, dtype, 6)
    layout = L.plan_layout(shape, axis, c_contiguous=True)
    assert L.vector_width(layout, hk.itemsize(dtype)) > 1
    m_w, v_w, p_w = hk.batch_stats(x, dtype, axis=axis, wide=True)
    m_s, v_s, p_s = hk.batch_stats(x, dtype, axis=axis, wide=False)
    assert p_w.kernel.endswith(f"_v{16 // hk.itemsize(dtype)}") and p_s.kernel.endswith("_v1")
    tol = REDUCE_TOL[dtype]
    assert _rel(m_w, m_s.astype(np.float64)) <= tol and _rel(v_w, v_s.astype(np.float64)) <= tol
    scale = np.linspace(0.5, 2.0, shape[axis])
    y_w, _ = hk.scale_shift(x, scale, None, dtype, axis=axis, wide=True)
    y_s, _ = hk.scale_shift(x, scale, None, dtype, axis=axis, wide=False)
    assert np.array_equal(y_w, y_s)  # elementwise: the same arithmetic per element


def test_variance_of_large_mean_data_float32():
    """REFERENCE B: float32 x = 1e4 + N(0, 1) keeps its variance within 1e-3 relative."""
    rng = np.random.default_rng(0)
    for shape, axis in (((16, 2, 32, 32), 1), ((2048, 8), 1)):
        x = (1e4 + rng.normal(size=shape)).astype(np.float32)
        _, var, _ = hk.batch_stats(x, "float32", axis=axis, seed=3)
        ref = x.astype(np.float64).var(axis=_axes(len(shape), axis))
        assert np.max(np.abs(var / ref - 1)) < 1e-3


def test_constant_channel_has_zero_variance():
    x = np.full((6, 3, 50), 7.25, dtype=np.float32)
    x[:, 1] = -3.0
    mean, var, _ = hk.batch_stats(x, "float32", axis=1, seed=2)
    assert mean.tolist() == [7.25, -3.0, 7.25]
    assert var.tolist() == [0.0, 0.0, 0.0]


def test_harness_reports_a_broken_launch():
    """The emulator is not silently permissive: shuffles in a block that is not whole warps
    (the planner never launches one) are reported."""
    x = np.ones((2, 1, 64), dtype=np.float32)
    layout = L.plan_layout(x.shape, 1, c_contiguous=True)
    good = L.plan("stats", layout, 1, sm_count=1)
    bad = L.LaunchPlan(good.kernel, good.grid, (48, 1, 1), good.args, good.parts, 0, 0)
    values = {
        "x": x,
        "mean": np.zeros(1, np.float32),
        "var": np.zeros(1, np.float32),
        "ws_a": np.zeros(1, np.float32),
        "ws_b": np.zeros(1, np.float32),
        "ws_n": np.zeros(1, np.int32),
        "counters": np.zeros(1, np.uint32),
    }
    with pytest.raises(hk.HostRunError, match="not whole warps"):
        hk.run_kernel("f32", bad, "stats", values)


@pytest.mark.parametrize(
    ("shape", "axis", "dtype", "width"),
    [
        ((4, 3, 196), 1, "float16", 4),  # 14x14 planes in float16: 8-byte loads
        ((4, 3, 196), 1, "bfloat16", 4),
        ((5, 2, 6), 1, "float32", 2),  # S = 6: float2
        ((64, 12), 1, "float16", 4),  # channels-last, C = 12
        ((64, 6), 1, "float32", 2),
    ],
)
def test_eight_byte_vectors(shape, axis, dtype, width):
    x, xv = _data(shape, dtype, 8)
    axes, bs = _axes(len(shape), axis), _bshape(len(shape), axis)
    mean, var, plan = hk.batch_stats(x, dtype, axis=axis, seed=3)
    assert plan.kernel.endswith(f"_v{width}")
    assert _rel(var, xv.var(axis=axes)) <= REDUCE_TOL[dtype]
    acc = np.dtype(L.accumulator_dtype(dtype))
    mu = xv.mean(axis=axes).astype(acc)
    s_dy, s_dy_xmu, plan = hk.backward_reduce(x, x, mu, dtype, axis=axis, seed=3)
    assert plan.kernel.endswith(f"_v{width}")
    assert (
        _rel(s_dy_xmu, (xv * (xv - mu.astype(np.float64).reshape(bs))).sum(axis=axes))
        <= 4 * REDUCE_TOL[dtype]
    )
    k = np.linspace(0.5, 1.5, shape[axis]).astype(acc)
    dx, plan = hk.backward_apply(x, x, mu, k, k, k, dtype, axis=axis)
    assert plan.kernel.endswith(f"_v{width}")
    k64 = k.astype(np.float64).reshape(bs)
    ref = xv * k64 + (xv - mu.astype(np.float64).reshape(bs)) * k64 + k64
    assert _rel(hk.from_storage(dx, dtype), ref) <= OUTPUT_TOL[dtype]
    y, plan = hk.scale_shift(x, k, k, dtype, axis=axis)
    assert plan.kernel.endswith(f"_v{width}")
    assert _rel(hk.from_storage(y, dtype), xv * k64 + k64) <= OUTPUT_TOL[dtype]


# -- the fused reductions of the whole-step ops -------------------------------------------------

# (shape, axis): split ncl with scalar loads, split nlc with vectors, C == 1 with 8-byte
# vectors, and M == 2 in both layouts.
FUSED_SHAPES = [((40, 6, 33), 1), ((300, 24), 1), ((2, 1, 5, 7), 1), ((2, 5), 1), ((1, 3, 2), 1)]
#: (weight and bias, running statistics, parameter dtype): every dtype and every shape meets
#: each of these, rotated, instead of the whole cross product (which the emulator runs slowly).
FUSED_VARIANTS = [
    (True, True, "float32"),
    (False, False, "float32"),
    (True, True, "float64"),
    (False, True, "float64"),
]


def _variant(shape_index: int, dtype: str):
    return FUSED_VARIANTS[(shape_index + DTYPES.index(dtype)) % len(FUSED_VARIANTS)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(FUSED_SHAPES)), ids=[f"{s}-ax{a}" for s, a in FUSED_SHAPES])
def test_fused_epilogues_are_the_generic_formulas(index, dtype):
    """The fused kernels' per-channel results equal xbn.functional's formulas applied to the
    plain kernels' statistics and sums, bit for bit (the reductions are the same code and the
    epilogues round every operation as the array operations do), and a float64 reference to
    the dtype's tolerance."""
    shape, axis = FUSED_SHAPES[index]
    affine, running, pdt = _variant(index, dtype)
    acc = np.dtype(L.accumulator_dtype(dtype))
    c, bs = shape[axis], _bshape(len(shape), axis)
    m_count = int(np.prod(shape)) // c
    x, xv = _data(shape, dtype, 11, loc=3.0)
    dy, dyv = _data(shape, dtype, 12, loc=0.0, scale=1.0)
    rng = np.random.default_rng(13)
    w = rng.normal(1.0, 0.5, size=c).astype(pdt) if affine else None
    b = rng.normal(size=c).astype(pdt) if affine else None
    rm = rng.normal(size=c).astype(pdt) if running else None
    rv = rng.uniform(0.5, 2.0, size=c).astype(pdt) if running else None
    eps, momentum = 1e-3, 0.3

    fwd, plan = hk.stats_fused(
        x, w, b, rm, rv, dtype, axis=axis, eps=eps, momentum=momentum, param_dtype=pdt, seed=5
    )
    mean, var, plain = hk.batch_stats(x, dtype, axis=axis, seed=5)
    assert (plan.grid, plan.block, plan.args) == (plain.grid, plain.block, plain.args)
    inv = F.invstd(var, eps=eps, xp=xnp)
    scale, shift = F.scale_shift_coefficients(mean, inv, w, b, var=var, xp=xnp)
    assert_same_bits(fwd["mean"], mean, "mean")
    assert_same_bits(fwd["inv"], inv, "invstd")
    assert_same_bits(fwd["scale"], scale, "scale")
    assert_same_bits(fwd["shift"], shift, "shift")
    if running:
        new_rm, new_rv = F.updated_running_stats(rm, rv, mean, var, count=m_count, momentum=momentum, xp=xnp)
        assert_same_bits(fwd["new_running_mean"], new_rm, "new running mean")
        assert_same_bits(fwd["new_running_var"], new_rv, "new running var")
        rm64, rv64, _ = ref.update_running(rm, rv, xv, axis=axis, momentum=momentum)
        rounding = 5e-7 if pdt == "float32" else 0.0  # the update runs in the parameters' dtype
        assert _rel(fwd["new_running_mean"], rm64) <= 4 * REDUCE_TOL[dtype] + rounding
        assert _rel(fwd["new_running_var"], rv64) <= 4 * REDUCE_TOL[dtype] + rounding
    else:
        assert fwd["new_running_mean"] is None and fwd["new_running_var"] is None
    want = ref.forward(xv, axis=axis, weight=w, bias=b, eps=eps)
    assert _rel(fwd["mean"], want["mean"]) <= REDUCE_TOL[dtype]
    assert _rel(fwd["inv"], want["invstd"]) <= 4 * REDUCE_TOL[dtype]
    y, _ = hk.scale_shift(x, fwd["scale"], fwd["shift"], dtype, axis=axis)
    assert _rel(hk.from_storage(y, dtype), want["y"]) <= 4 * OUTPUT_TOL[dtype]

    bwd, plan = hk.backward_reduce_fused(
        dy, x, fwd["mean"], fwd["inv"], w, dtype, axis=axis, param_dtype=pdt, seed=6
    )
    s_dy, s_dy_xmu, plain = hk.backward_reduce(dy, x, fwd["mean"], dtype, axis=axis, seed=6)
    assert (plan.grid, plan.block, plan.args) == (plain.grid, plain.block, plain.args)
    k_dy, k_xmu, k_const = F.backward_coefficients(s_dy, s_dy_xmu, fwd["inv"], w, count=m_count, xp=xnp)
    assert_same_bits(bwd["dgamma"], s_dy_xmu * fwd["inv"], "dgamma")
    assert_same_bits(bwd["dbeta"], s_dy, "dbeta")
    assert_same_bits(bwd["k_dy"], k_dy, "k_dy")
    assert_same_bits(bwd["k_xmu"], k_xmu, "k_xmu")
    assert_same_bits(bwd["k_const"], k_const, "k_const")
    assert bwd["dgamma"].dtype == acc
    grads = ref.backward(dyv, xv, axis=axis, weight=w, eps=eps)
    tol = 10 * REDUCE_TOL[dtype] + (1e-4 if dtype in ("float16", "bfloat16") else 0)
    assert _rel(bwd["dbeta"], grads["dbeta"]) <= tol
    assert _rel(bwd["dgamma"], grads["dgamma"]) <= tol
    dx, _ = hk.backward_apply(dy, x, fwd["mean"], bwd["k_dy"], bwd["k_xmu"], bwd["k_const"], dtype, axis=axis)
    # dx is a difference of terms of the size of dy * k_dy (tiny for M == 2): errors scale with them
    terms = float(np.max(np.abs(dyv * bwd["k_dy"].astype(np.float64).reshape(bs))))
    err = float(np.max(np.abs(hk.from_storage(dx, dtype) - grads["dx"])))
    assert err <= (4 * OUTPUT_TOL[dtype] + tol) * terms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((7, 4, 33), 1), ((150, 8), 1)])
def test_fused_constant_channels_give_exactly_the_bias(shape, axis, dtype):
    """Channels whose values are all equal (values of no special form) have variance exactly 0,
    scale 0 and shift exactly the bias, so y is exactly the bias, as in the generic path."""
    c = shape[axis]
    x, xv = _data(shape, dtype, 14)
    consts = hk.to_storage(np.array([0.1, -1.0 / 3.0, 12345.678, -2.5e-3]), dtype)
    moved = np.moveaxis(x, axis, 0)  # a view: writes go to x
    for ch in range(0, c, 2):
        moved[ch] = consts[(ch // 2) % len(consts)]
    acc = np.dtype(L.accumulator_dtype(dtype))
    bias = np.linspace(-1.5, 2.5, c).astype(np.float32)
    fwd, _ = hk.stats_fused(x, np.full(c, 3.0, np.float32), bias, None, None, dtype, axis=axis, seed=4)
    const = np.arange(c) % 2 == 0
    assert np.all(
        fwd["mean"][const]
        == hk.from_storage(np.moveaxis(x, axis, 0)[const, ...].reshape(const.sum(), -1)[:, 0], dtype)
    )
    assert np.all(fwd["scale"][const] == 0) and np.all(fwd["scale"][~const] != 0)
    assert_same_bits(fwd["shift"][const], bias.astype(acc)[const], "shift of constant channels")
    y, _ = hk.scale_shift(x, fwd["scale"], fwd["shift"], dtype, axis=axis)
    y_const = np.moveaxis(y, axis, 0)[const]
    expect = hk.to_storage(bias[const].astype(np.float64), dtype)
    assert np.array_equal(y_const, np.broadcast_to(expect.reshape(-1, *(1,) * (y.ndim - 1)), y_const.shape))


@pytest.mark.parametrize(("shape", "axis"), [((40, 6, 33), 1), ((300, 24), 1)])
def test_fused_reductions_are_bitwise_reproducible(shape, axis):
    x, xv = _data(shape, "float32", 15)
    dy, _ = _data(shape, "float32", 16)
    c = shape[axis]
    w, b = np.linspace(0.5, 1.5, c, dtype=np.float32), np.linspace(-1, 1, c, dtype=np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    runs = []
    for seed in (0, 1, 2):
        fwd, plan = hk.stats_fused(x, w, b, rm, rv, "float32", axis=axis, seed=seed)
        bwd, plan2 = hk.backward_reduce_fused(
            dy, x, fwd["mean"], fwd["inv"], w, "float32", axis=axis, seed=seed
        )
        assert plan.parts > 1 and plan2.parts > 1, "the case must split channels over blocks"
        runs.append(b"".join(a.tobytes() for a in (*fwd.values(), *bwd.values())))
    assert runs[1] == runs[0] and runs[2] == runs[0]


# -- the eval-mode forward in one launch --------------------------------------------------------

INFERENCE_SHAPES = [
    ((5, 3, 7), 1),
    ((4, 3, 64), 1),
    ((64, 24), 1),
    ((13, 5, 5, 3), -1),
    ((2, 9, 1, 1), 1),
    ((3, 40, 6), 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "index", range(len(INFERENCE_SHAPES)), ids=[f"{s}-ax{a}" for s, a in INFERENCE_SHAPES]
)
def test_inference_kernel_is_scale_shift_with_the_generic_coefficients(index, dtype):
    """The inference kernel's y equals, bit for bit, the scale_shift kernel's y with the
    coefficients of xbn.functional (eval_statistics, scale_shift_coefficients without var=)
    computed by NumPy: its per-channel prologue rounds every operation as the array operations
    do. With and without weight and bias; float32 parameters, and float64 ones for float64
    input (the only mix the CuPy wrapper sends it, where the generic path's dtype is the
    kernels'); running variances of zero (eps keeps them finite, scale is not zeroed)."""
    shape, axis = INFERENCE_SHAPES[index]
    c = shape[axis]
    acc = np.dtype(L.accumulator_dtype(dtype))
    x, xv = _data(shape, dtype, 31, loc=2.0)
    rng = np.random.default_rng(32)
    pdts = ["float32"] + (["float64"] if dtype == "float64" else [])
    for pdt in pdts:
        rm = rng.normal(size=c).astype(pdt)
        rv = rng.uniform(0.2, 3.0, size=c).astype(pdt)
        rv[0] = 0.0
        for affine in ((True, True), (False, False), (True, False), (False, True)):
            w = rng.normal(1.0, 0.5, size=c).astype(pdt) if affine[0] else None
            b = rng.normal(size=c).astype(pdt) if affine[1] else None
            y, plan = hk.inference(x, w, b, rm, rv, dtype, axis=axis, eps=1e-3, param_dtype=pdt, seed=3)
            mean, inv = F.eval_statistics(rm, rv, dtype=acc, eps=1e-3, xp=xnp)
            assert mean.dtype == acc
            scale, shift = F.scale_shift_coefficients(mean, inv, w, b, xp=xnp)
            want, plain = hk.scale_shift(x, scale, shift, dtype, axis=axis)
            assert plan.args == plain.args  # (the inference kernel may pack channels)
            assert_same_bits(y, want, f"y ({pdt}, affine {affine})")
            ref = ref_eval = (xv - rm.astype(np.float64).reshape(_bshape(len(shape), axis))) / np.sqrt(
                rv.astype(np.float64) + 1e-3
            ).reshape(_bshape(len(shape), axis))
            if w is not None:
                ref_eval = ref * w.astype(np.float64).reshape(_bshape(len(shape), axis))
            if b is not None:
                ref_eval = ref_eval + b.astype(np.float64).reshape(_bshape(len(shape), axis))
            assert _rel(hk.from_storage(y, dtype), ref_eval) <= 4 * OUTPUT_TOL[dtype] + 4e-6


# -- several channels per block (the channel-major inference kernel, small N*S) ------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(8, 21, 7, 7), (1, 13, 7, 7), (3, 9, 5)])
def test_packed_inference_blocks_give_the_results_of_one_channel_per_block(shape, dtype):
    """The inference kernel with a channel per row of threads (the planner packs channels that
    need fewer than MAX_THREADS threads) writes exactly what one block per channel writes, rows
    past the last channel included (they write nothing)."""
    x, xv = _data(shape, dtype, 33, loc=1.5)
    c = shape[1]
    layout = L.plan_layout(shape, 1, c_contiguous=True)
    packed = L.plan("inference", layout, 1, sm_count=2, threads_per_sm=hk.THREADS_PER_SM)
    assert packed.block[1] > 1 and packed.grid[0] * packed.block[1] > c, packed
    single = L.LaunchPlan(
        packed.kernel, (c, packed.grid[1], 1), (packed.block[0], 1, 1), packed.args, packed.parts, 0, 0
    )
    w = np.linspace(0.5, 1.5, c).astype(np.float32)
    b = np.linspace(-1.0, 1.0, c).astype(np.float32)
    rm, rv = np.linspace(-0.5, 0.5, c).astype(np.float32), np.linspace(0.5, 2, c).astype(np.float32)
    y_packed, _ = hk.inference(x, w, b, rm, rv, dtype, axis=1, wide=False, plan=packed, seed=3)
    y_single, _ = hk.inference(x, w, b, rm, rv, dtype, axis=1, wide=False, plan=single, seed=3)
    assert_same_bits(y_packed, y_single, "packed against one channel a block")


# -- the last block's merge ---------------------------------------------------------------------


def _split_plan(op: str, layout: L.Layout, vec: int, block: tuple[int, int], parts: int):
    """A reduction split ``parts`` ways with a block the test chooses (more partials per merging
    thread than the planner gives: several rounds of hoisted loads)."""
    if layout.kind == "ncl":
        sv = layout.inner // vec
        chunk = -(-layout.outer * sv // parts)
        parts = -(-layout.outer * sv // chunk)
        gx = layout.channels
        args = (layout.outer, layout.channels, sv, chunk)
    else:
        cvs = layout.channels // vec
        chunk = -(-layout.outer // parts)
        parts = -(-layout.outer // chunk)
        gx = -(-cvs // block[0])
        args = (layout.outer, cvs, chunk)
    return L.LaunchPlan(
        L.kernel_name(op, layout.kind, vec),
        (gx, parts, 1),
        (*block, 1),
        args,
        parts,
        layout.channels * parts,
        gx,
    )


@pytest.mark.parametrize(
    ("shape", "block", "parts"),
    [
        ((5000, 8), (2, 2), 37),  # channels-last: 19 partials a thread, five rounds of loads
        ((5000, 8), (2, 4), 19),  # a round and a ragged one
        ((3, 2, 3000), (32, 1), 157),  # channel-major: 5 partials a thread, two rounds
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_merge_in_rounds_matches_float64_and_is_reproducible(shape, block, parts, dtype):
    x, xv = _data(shape, dtype, 35, loc=100.0)
    dy, dyv = _data(shape, dtype, 36, loc=0.0, scale=1.0)
    layout = L.plan_layout(shape, 1, c_contiguous=True)
    axes = _axes(len(shape), 1)
    vec = L.vector_width(layout, hk.itemsize(dtype))
    acc = np.dtype(L.accumulator_dtype(dtype))
    mu = xv.mean(axis=axes).astype(acc)
    runs = []
    for seed in (0, 1, 2):
        mean, var, p = hk.batch_stats(
            x, dtype, axis=1, seed=seed, plan=_split_plan("stats", layout, vec, block, parts)
        )
        s1, s2, p2 = hk.backward_reduce(
            dy,
            x,
            mu,
            dtype,
            axis=1,
            seed=seed,
            plan=_split_plan("backward_reduce", layout, vec, block, parts),
        )
        assert p.merge_per_thread > L.UNROLL and p2.merge_per_thread > L.UNROLL
        runs.append(b"".join(a.tobytes() for a in (mean, var, s1, s2)))
        assert _rel(mean, xv.mean(axis=axes)) <= REDUCE_TOL[dtype]
        assert _rel(var, xv.var(axis=axes)) <= 1e3 * REDUCE_TOL[dtype]  # offset 100, std 2
        assert _rel(s1, dyv.sum(axis=axes)) <= 4 * REDUCE_TOL[dtype]
    assert runs[1] == runs[0] and runs[2] == runs[0]


def test_counters_wrap_to_zero_by_themselves():
    """The ticket is atomicInc(counter, parts - 1): after a launch its counters are 0 again
    with no reset step, launch after launch on one buffer (as on one stream), and the slots
    past the launch's own counters are never touched."""
    x, _ = _data((600, 16), "float32", 37)
    layout = L.plan_layout(x.shape, 1, c_contiguous=True)
    p = L.plan("stats", layout, 4, sm_count=hk.SM_COUNT, threads_per_sm=hk.THREADS_PER_SM)
    assert p.parts > 1 and p.counters >= 1
    counters = np.zeros(p.counters + 5, dtype=np.uint32)
    counters[p.counters :] = 0xDEAD
    results = []
    for seed in (0, 4, 9):
        values = {
            "x": x,
            "mean": hk.poison((16,), "float32"),
            "var": hk.poison((16,), "float32"),
            "ws_a": np.full(p.workspace, np.nan, np.float32),
            "ws_b": np.full(p.workspace, np.nan, np.float32),
            "ws_n": np.full(p.workspace, -7, np.int32),
            "counters": counters,
        }
        out = hk.run_kernel("f32", p, "stats", values, seed=seed)
        counters = out["counters"]
        assert not counters[: p.counters].any() and (counters[p.counters :] == 0xDEAD).all()
        results.append(out["mean"].tobytes() + out["var"].tobytes())
    assert results[1] == results[0] and results[2] == results[0]
    # the harness' atomicInc is CUDA's: wraps at the limit, not at 2**32
    src = (hk.HERE / "cuda_host.h").read_text()
    assert "old >= limit ? 0u : old + 1u" in src
    assert "atomicInc(counter, blocks - 1u)" in _kernel_text("xbn_common.cuh")
    assert "*counter = 0" not in _kernel_text("xbn_common.cuh")


def _kernel_text(name: str) -> str:
    return (hk.KERNELS / name).read_text()


# -- the numerical promises on tall (N, C) inputs and on infinities -----------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "axis"), [((4096, 6), 1), ((8192, 3), 1), ((3, 2, 4096), 1)])
def test_constant_channels_on_tall_inputs_with_multi_block_merges(shape, axis, dtype):
    """A channel constant at 12345.678 or 1e8: mean exactly that value, variance exactly 0 and
    y exactly beta, over N >= 4096 values merged from many blocks (the plain and the fused
    statistics, and the scale-shift pass)."""
    x, _ = _data(shape, dtype, 38)
    c = shape[axis]
    moved = np.moveaxis(x, axis, 0)
    values = np.array([12345.678, 1e8, -1e8], dtype=dtype)
    const = np.arange(c) % 2 == 0
    for i, ch in enumerate(np.flatnonzero(const)):
        moved[ch] = values[i % len(values)]
    mean, var, plan = hk.batch_stats(x, dtype, axis=axis, seed=6)
    assert plan.parts > 1 and plan.merge_per_thread >= 1
    want = moved[const].reshape(const.sum(), -1)[:, 0]
    assert np.array_equal(mean[const], want) and np.all(var[const] == 0)
    bias = np.linspace(-2.0, 3.0, c).astype(np.float32)
    fwd, fplan = hk.stats_fused(
        x,
        np.full(c, 1.5, np.float32),
        bias,
        np.zeros(c, np.float32),
        np.ones(c, np.float32),
        dtype,
        axis=axis,
        seed=7,
    )
    assert fplan.parts > 1
    assert np.array_equal(fwd["mean"][const], want) and np.all(fwd["scale"][const] == 0)
    y, _ = hk.scale_shift(x, fwd["scale"], fwd["shift"], dtype, axis=axis)
    y_const = np.moveaxis(y, axis, 0)[const].reshape(const.sum(), -1)
    assert np.all(y_const == bias.astype(dtype)[const][:, None])


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize(("shape", "axis"), [((4096, 6), 1), ((3, 6, 2048), 1), ((7, 5, 3), 1)])
def test_infinities_propagate_as_in_torch(shape, axis, dtype):
    """A channel holding +inf (at its first value or further on) or -inf: mean +-inf, variance
    NaN, new running mean +-inf, new running variance NaN and y NaN in that channel, as
    PyTorch gives; the other channels untouched. (Shifting by a first value of inf, or
    merging partial means one of which is infinite, gave NaN means.)"""
    x, _ = _data(shape, dtype, 39)
    c = shape[axis]
    moved = np.moveaxis(x, axis, 0).reshape(c, -1)  # (C, M): index 0 is the channel's first
    placements = {0: (0, np.inf), 1: (moved.shape[1] // 2, np.inf), 2: (moved.shape[1] - 1, -np.inf)}
    for ch, (pos, v) in placements.items():
        moved[ch, pos] = v
    if c > 3:
        moved[3, 1:] = np.inf  # an infinity of one sign everywhere but the first value
    rest = np.moveaxis(x, axis, 0).shape[1:]
    x = np.ascontiguousarray(np.moveaxis(moved.reshape(c, *rest), 0, axis))
    xv = hk.from_storage(x, dtype)
    finite = [ch for ch in range(c) if ch not in placements and ch != 3]
    fwd, plan = hk.stats_fused(
        x,
        np.ones(c, np.float32),
        np.zeros(c, np.float32),
        np.zeros(c, np.float32),
        np.ones(c, np.float32),
        dtype,
        axis=axis,
        seed=8,
    )
    mean, var, _ = hk.batch_stats(x, dtype, axis=axis, seed=8)
    y, _ = hk.scale_shift(x, fwd["scale"], fwd["shift"], dtype, axis=axis)
    yv = np.moveaxis(hk.from_storage(y, dtype), axis, 0).reshape(c, -1)
    for ch, (_, v) in list(placements.items()) + ([(3, (0, np.inf))] if c > 3 else []):
        assert mean[ch] == v and fwd["mean"][ch] == v, (ch, mean[ch], plan)
        assert np.isnan(var[ch]) and fwd["new_running_mean"][ch] == 0.1 * v
        assert np.isnan(fwd["new_running_var"][ch]) and np.isnan(yv[ch]).all()
    xf = np.moveaxis(xv, axis, 0).reshape(c, -1)[finite]
    assert _rel(mean[finite], xf.mean(axis=1)) <= REDUCE_TOL[dtype]
    assert np.isfinite(yv[finite]).all()
