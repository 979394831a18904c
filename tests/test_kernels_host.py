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

import host_kernels as hk
import reference as ref
from xbn import functional as F
from xbn.kernels import _launch as L

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
    ((4, 1, 6, 5), 1),        # C == 1 (one long channel)
    ((5, 3, 7), 1),           # C == 3, S == 7
    ((13, 3, 1, 1), 1),       # S == 1: channels-last, C == 3
    ((3, 5, 31), 1),          # prime S, N * S == 93
    ((8, 96, 2, 2), 1),       # large C, tiny spatial
    ((2, 2, 4099), 1),        # tiny C, large prime spatial: split over blocks, scalar loads
    ((2, 2, 4096), 1),        # tiny C, large spatial: split over blocks, vector loads
    ((100, 24), 1),           # (N, C)
    ((64, 5, 5, 8), -1),      # NHWC
    ((6, 4, 9, 3), 2),        # a middle channel axis
    ((257, 33), 1),           # channels-last with C just over one warp of columns
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
    values = {"x": x, "mean": np.zeros(1, np.float32), "var": np.zeros(1, np.float32),
              "ws_a": np.zeros(1, np.float32), "ws_b": np.zeros(1, np.float32),
              "ws_n": np.zeros(1, np.int32), "counters": np.zeros(1, np.uint32)}
    with pytest.raises(hk.HostRunError, match="not whole warps"):
        hk.run_kernel("f32", bad, "stats", values)


@pytest.mark.parametrize(("shape", "axis", "dtype", "width"), [
    ((4, 3, 196), 1, "float16", 4),      # 14x14 planes in float16: 8-byte loads
    ((4, 3, 196), 1, "bfloat16", 4),
    ((5, 2, 6), 1, "float32", 2),        # S = 6: float2
    ((64, 12), 1, "float16", 4),         # channels-last, C = 12
    ((64, 6), 1, "float32", 2),
])
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
    assert _rel(s_dy_xmu, (xv * (xv - mu.astype(np.float64).reshape(bs))).sum(axis=axes)) \
        <= 4 * REDUCE_TOL[dtype]
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
FUSED_VARIANTS = [(True, True, "float32"), (False, False, "float32"), (True, True, "float64"),
                  (False, True, "float64")]


def _variant(shape_index: int, dtype: str):
    return FUSED_VARIANTS[(shape_index + DTYPES.index(dtype)) % len(FUSED_VARIANTS)]


def _same_bits(got: np.ndarray, expect: np.ndarray, what: str) -> None:
    expect = np.asarray(expect)
    assert got.dtype == expect.dtype, (what, got.dtype, expect.dtype)
    assert got.tobytes() == expect.tobytes(), (
        f"{what}: not the generic formula's result bit for bit; max difference "
        f"{np.max(np.abs(got.astype(np.float64) - expect.astype(np.float64))):.3e}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(FUSED_SHAPES)),
                         ids=[f"{s}-ax{a}" for s, a in FUSED_SHAPES])
def test_fused_epilogues_are_the_generic_formulas(index, dtype):
    """The fused kernels' per-channel results equal xbn.functional's formulas applied to the
    plain kernels' statistics and sums, bit for bit (the reductions are the same code and the
    epilogues round every operation as the array operations do), and a float64 reference to
    the dtype's tolerance."""
    shape, axis = FUSED_SHAPES[index]
    affine, running, pdt = _variant(index, dtype)
    acc = np.dtype(L.accumulator_dtype(dtype))
    c, axes, bs = shape[axis], _axes(len(shape), axis), _bshape(len(shape), axis)
    m_count = int(np.prod(shape)) // c
    x, xv = _data(shape, dtype, 11, loc=3.0)
    dy, dyv = _data(shape, dtype, 12, loc=0.0, scale=1.0)
    rng = np.random.default_rng(13)
    w = rng.normal(1.0, 0.5, size=c).astype(pdt) if affine else None
    b = rng.normal(size=c).astype(pdt) if affine else None
    rm = rng.normal(size=c).astype(pdt) if running else None
    rv = rng.uniform(0.5, 2.0, size=c).astype(pdt) if running else None
    eps, momentum = 1e-3, 0.3

    fwd, plan = hk.stats_fused(x, w, b, rm, rv, dtype, axis=axis, eps=eps, momentum=momentum,
                               param_dtype=pdt, seed=5)
    mean, var, plain = hk.batch_stats(x, dtype, axis=axis, seed=5)
    assert (plan.grid, plan.block, plan.args) == (plain.grid, plain.block, plain.args)
    inv = F.invstd(var, eps=eps, xp=xnp)
    scale, shift = F.scale_shift_coefficients(mean, inv, w, b, var=var, xp=xnp)
    _same_bits(fwd["mean"], mean, "mean")
    _same_bits(fwd["inv"], inv, "invstd")
    _same_bits(fwd["scale"], scale, "scale")
    _same_bits(fwd["shift"], shift, "shift")
    if running:
        new_rm, new_rv = F.updated_running_stats(rm, rv, mean, var, count=m_count,
                                                 momentum=momentum, xp=xnp)
        _same_bits(fwd["new_running_mean"], new_rm, "new running mean")
        _same_bits(fwd["new_running_var"], new_rv, "new running var")
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

    bwd, plan = hk.backward_reduce_fused(dy, x, fwd["mean"], fwd["inv"], w, dtype, axis=axis,
                                         param_dtype=pdt, seed=6)
    s_dy, s_dy_xmu, plain = hk.backward_reduce(dy, x, fwd["mean"], dtype, axis=axis, seed=6)
    assert (plan.grid, plan.block, plan.args) == (plain.grid, plain.block, plain.args)
    k_dy, k_xmu, k_const = F.backward_coefficients(s_dy, s_dy_xmu, fwd["inv"], w,
                                                   count=m_count, xp=xnp)
    _same_bits(bwd["dgamma"], s_dy_xmu * fwd["inv"], "dgamma")
    _same_bits(bwd["dbeta"], s_dy, "dbeta")
    _same_bits(bwd["k_dy"], k_dy, "k_dy")
    _same_bits(bwd["k_xmu"], k_xmu, "k_xmu")
    _same_bits(bwd["k_const"], k_const, "k_const")
    assert bwd["dgamma"].dtype == acc
    grads = ref.backward(dyv, xv, axis=axis, weight=w, eps=eps)
    tol = 10 * REDUCE_TOL[dtype] + (1e-4 if dtype in ("float16", "bfloat16") else 0)
    assert _rel(bwd["dbeta"], grads["dbeta"]) <= tol
    assert _rel(bwd["dgamma"], grads["dgamma"]) <= tol
    dx, _ = hk.backward_apply(dy, x, fwd["mean"], bwd["k_dy"], bwd["k_xmu"], bwd["k_const"],
                              dtype, axis=axis)
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
    fwd, _ = hk.stats_fused(x, np.full(c, 3.0, np.float32), bias, None, None, dtype,
                            axis=axis, seed=4)
    const = np.arange(c) % 2 == 0
    assert np.all(fwd["mean"][const] == hk.from_storage(np.moveaxis(x, axis, 0)[const, ...]
                                                        .reshape(const.sum(), -1)[:, 0], dtype))
    assert np.all(fwd["scale"][const] == 0) and np.all(fwd["scale"][~const] != 0)
    _same_bits(fwd["shift"][const], bias.astype(acc)[const], "shift of constant channels")
    y, _ = hk.scale_shift(x, fwd["scale"], fwd["shift"], dtype, axis=axis)
    y_const = np.moveaxis(y, axis, 0)[const]
    expect = hk.to_storage(bias[const].astype(np.float64), dtype)
    assert np.array_equal(y_const, np.broadcast_to(expect.reshape(-1, *(1,) * (y.ndim - 1)),
                                                   y_const.shape))


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
        bwd, plan2 = hk.backward_reduce_fused(dy, x, fwd["mean"], fwd["inv"], w, "float32",
                                              axis=axis, seed=seed)
        assert plan.parts > 1 and plan2.parts > 1, "the case must split channels over blocks"
        runs.append(b"".join(a.tobytes() for a in (*fwd.values(), *bwd.values())))
    assert runs[1] == runs[0] and runs[2] == runs[0]
