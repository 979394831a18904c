"""Numerics (docs/numerics.md): large offsets, constant channels, low-precision inputs."""

from __future__ import annotations

import numpy as np
import pytest

import xbn
from xbn import _reference as ref
from xbn import functional as F
from xbn._reference import assert_close, rel_err, to_numpy

from reference import to_backend

OFFSET_CASES = [((4096, 3), 1), ((32, 3, 16, 16), 1), ((32, 16, 16, 3), -1)]
OFFSET_IDS = ["NC", "NCHW", "NHWC"]


def _offset_data(shape, loc=1e4, seed=0):
    x32 = (loc + np.random.default_rng(seed).normal(size=shape)).astype(np.float32)
    return x32, x32.astype(np.float64)  # the float64 truth is of the same (rounded) values


# -- x = 1e4 + N(0, 1) in float32 ---------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", OFFSET_CASES, ids=OFFSET_IDS)
def test_large_offset_variance_functional(backend, shape, axis):
    x32, x64 = _offset_data(shape)
    want_mean, want_var = ref.batch_mean_var(x64, axis)
    X = to_backend(backend, x32)
    for name, fn in (("generic", F.batch_stats), ("backend ops", backend.ops.batch_stats)):
        mean, var = fn(X, axis=axis)
        assert mean.dtype == backend.xp.float32 and var.dtype == backend.xp.float32
        assert_close(to_numpy(mean), want_mean, 1e-6, f"{name} mean")
        assert_close(to_numpy(var), want_var, 1e-3, f"{name} var")


@pytest.mark.parametrize("shape,axis", OFFSET_CASES, ids=OFFSET_IDS)
def test_large_offset_variance_through_running_var(backend, shape, axis):
    x32, x64 = _offset_data(shape, seed=1)
    bn = xbn.BatchNorm(shape[axis], axis=axis, momentum=1.0, backend=backend.name)
    bn(to_backend(backend, x32))
    m = x64.size // shape[axis]
    want_mean, want_var = ref.batch_mean_var(x64, axis)
    assert_close(to_numpy(bn.running_var), want_var * m / (m - 1), 1e-3, "running_var")
    assert_close(to_numpy(bn.running_mean), want_mean, 1e-6, "running_mean")


@pytest.mark.parametrize("shape,axis", OFFSET_CASES, ids=OFFSET_IDS)
def test_large_offset_forward_and_backward(backend, shape, axis):
    """y = x * scale + shift rounds at ulp(|x| * invstd) (as torch's CPU kernel does: both
    measured ~1e-4 relative here); dx keeps (x - mean), so it stays at float32 accuracy.

    dgamma = sum(dy * (x - mean)) * invstd with the float32 mean, whose rounding (ulp(1e4) ~
    1e-3, against a std of 1) shifts every (x - mean) alike and so adds |sum(dy)| * that error:
    inherent in a float32 saved mean (torch's is off by 9e-3 relative on the (4096, 3) case).
    """
    x32, x64 = _offset_data(shape, seed=2)
    dy = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    bn = xbn.BatchNorm(shape[axis], axis=axis, backend=backend.name)
    y = to_numpy(bn(to_backend(backend, x32)))
    dx = to_numpy(bn.backward(to_backend(backend, dy)))
    f = ref.forward(x64, axis=axis)
    g = ref.backward(dy, x64, axis=axis)
    eps32 = float(np.finfo(np.float32).eps)
    y_bound = 8 * eps32 * float(np.abs(x64).max() * f["invstd"].max())  # ~2e-3 absolute here
    assert np.abs(y - f["y"]).max() <= y_bound
    assert_close(dx, g["dx"], 1e-4, "dx")
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    mean_ulp = np.spacing(np.abs(f["mean"]).astype(np.float32)).astype(np.float64)
    bound = 1e-4 * np.abs(g["dgamma"]).max() + 2 * mean_ulp * np.abs(dy.sum(axis=red)) * f["invstd"]
    err = np.abs(to_numpy(bn.weight.grad) - g["dgamma"])
    assert np.all(err <= bound), f"dgamma error {err} > bound {bound}"


def test_many_values_per_channel(backend):
    """A million values per channel in float32: mean and variance to float32 accuracy."""
    x32 = np.random.default_rng(4).normal(3.0, 2.0, size=(256, 2, 64, 64)).astype(np.float32)
    mean, var = backend.ops.batch_stats(to_backend(backend, x32), axis=1)
    want_mean, want_var = ref.batch_mean_var(x32, 1)
    assert_close(to_numpy(mean), want_mean, 1e-5, "mean")
    assert_close(to_numpy(var), want_var, 1e-5, "var")


# -- constant channels --------------------------------------------------------------------------

CONSTANTS = [0.0, 0.1, 3.7, -123.456, 1e4]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("untracked_eval", [False, True])
def test_constant_channel_outputs_beta(backend, dtype, untracked_eval):
    """var == 0: y is exactly beta (to an ulp of beta), no NaN; the backward is finite and is the
    reference's (x - mean = 0, so dx = gamma * invstd * (dy - mean(dy)))."""
    rng = np.random.default_rng(5)
    c = len(CONSTANTS) + 1
    shape = (24, c, 5)
    x = rng.normal(size=shape).astype(dtype)
    for i, v in enumerate(CONSTANTS):
        x[:, i] = v
    dy = rng.normal(size=shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, c).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    bn = xbn.BatchNorm1d(c, backend=backend.name, dtype=dtype, track_running_stats=not untracked_eval)
    bn.train(not untracked_eval)
    bn.weight.data, bn.bias.data = to_backend(backend, w), to_backend(backend, b)
    y = to_numpy(bn(to_backend(backend, x)))
    assert np.all(np.isfinite(y))
    ulp = np.spacing(np.abs(b).astype(dtype))
    for i, v in enumerate(CONSTANTS):
        err = np.abs(y[:, i].astype(np.float64) - b[i]).max()
        assert err <= ulp[i], f"constant {v}: |y - beta| = {err:.3e} (beta {b[i]})"
    dx = to_numpy(bn.backward(to_backend(backend, dy)))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(to_numpy(bn.weight.grad)))
    g = ref.backward(dy, x, axis=1, weight=w)
    assert_close(dx, g["dx"], 1e-10 if dtype == "float64" else 1e-5, "dx")
    assert_close(to_numpy(bn.weight.grad), g["dgamma"], 1e-10 if dtype == "float64" else 1e-5, "dgamma")
    if not untracked_eval:
        rv = to_numpy(bn.running_var)
        np.testing.assert_allclose(rv[: len(CONSTANTS)], 0.9, rtol=1e-7)


def test_constant_channel_functional(backend):
    """The generic statistics: mean exactly the constant, variance exactly 0."""
    x = np.full((7, 3, 3), 0.1, np.float32)
    x[:, 1] = -123.456
    x[:, 2] = 1e4
    X = to_backend(backend, x)
    mean, var = F.batch_stats(X, axis=1)
    np.testing.assert_array_equal(to_numpy(mean), x[0, :, 0])
    np.testing.assert_array_equal(to_numpy(var), np.zeros(3, np.float32))
    y, _, _ = F.batch_norm_train(X, None, to_backend(backend, np.array([1.0, 2.0, 3.0], np.float32)), axis=1)
    np.testing.assert_array_equal(to_numpy(y), np.broadcast_to(np.array([1.0, 2.0, 3.0])[:, None], x.shape))


def test_all_constant_input(backend):
    bn = xbn.BatchNorm2d(2, backend=backend.name)
    y = to_numpy(bn(to_backend(backend, np.full((4, 2, 3, 3), 7.25, np.float32))))
    np.testing.assert_array_equal(y, np.zeros_like(y))
    dx = to_numpy(bn.backward(to_backend(backend, np.ones((4, 2, 3, 3), np.float32))))
    np.testing.assert_array_equal(dx, np.zeros_like(dx))


def test_zero_running_var_in_eval_is_finite(backend):
    bn = xbn.BatchNorm1d(2, backend=backend.name).eval()
    bn.running_var = to_backend(backend, np.zeros(2, np.float32))
    x = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    y = to_numpy(bn(to_backend(backend, x)))
    np.testing.assert_allclose(y, x / np.sqrt(1e-5), rtol=1e-6)


def test_nan_stays_in_its_channel(backend):
    x = np.random.default_rng(6).normal(size=(6, 3)).astype(np.float32)
    x[2, 1] = np.nan
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    y = to_numpy(bn(to_backend(backend, x)))
    assert np.all(np.isnan(y[:, 1]))
    assert np.all(np.isfinite(y[:, [0, 2]]))
    assert_close(y[:, [0, 2]], ref.forward(x[:, [0, 2]], axis=1)["y"], 1e-6)


# -- float16 / bfloat16 inputs ------------------------------------------------------------------


def _low_precision_dtype(backend, name):
    xp = backend.xp
    if not hasattr(xp, name):
        pytest.skip(f"backend {backend.name!r} has no {name} (the Array API standard does not require it)")
    return getattr(xp, name)


@pytest.mark.parametrize("training", [True, False])
def test_float16_input(backend, training):
    f16 = _low_precision_dtype(backend, "float16")
    xp = backend.xp
    # 8192 values of ~100 per channel: their float16 sum would overflow (max 65504), so a
    # correct mean shows the statistics were accumulated in float32
    x = (100.0 + np.random.default_rng(7).normal(size=(64, 3, 128))).astype(np.float16)
    dy = np.random.default_rng(8).normal(size=x.shape).astype(np.float16)
    bn = xbn.BatchNorm1d(3, backend=backend.name).train(training)
    rng = np.random.default_rng(9)
    w, b = rng.uniform(0.5, 2, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    rm, rv = np.full(3, 100.0, np.float32), np.full(3, 1.5, np.float32)
    bn.weight.data, bn.bias.data = to_backend(backend, w), to_backend(backend, b)
    bn.running_mean, bn.running_var = to_backend(backend, rm), to_backend(backend, rv)
    X = xp.asarray(to_backend(backend, x), dtype=f16)
    y = bn(X)
    assert y.dtype == f16
    dx = bn.backward(xp.asarray(to_backend(backend, dy), dtype=f16))
    assert dx.dtype == f16
    for a in (bn.weight.data, bn.bias.data, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var):
        assert a.dtype == xp.float32
    x64 = x.astype(np.float64)
    stats = {} if training else dict(running_mean=rm, running_var=rv)
    f = ref.forward(x64, axis=1, weight=w, bias=b, use_batch_stats=training, **stats)
    g = ref.backward(dy, x64, axis=1, weight=w, use_batch_stats=training, **stats)
    assert_close(to_numpy(y), f["y"], 1e-2, "y")
    assert_close(to_numpy(dx), g["dx"], 1e-2, "dx")
    # float32 statistics: the parameter grads and running stats are float32-accurate
    assert_close(to_numpy(bn.weight.grad), g["dgamma"], 1e-4, "dgamma")
    assert_close(to_numpy(bn.bias.grad), g["dbeta"], 1e-5, "dbeta")
    if training:
        em, ev, _ = ref.update_running(rm, rv, x64, axis=1)
        assert_close(to_numpy(bn.running_mean), em, 1e-6, "running_mean")
        assert_close(to_numpy(bn.running_var), ev, 1e-5, "running_var")
    else:
        np.testing.assert_array_equal(to_numpy(bn.running_mean), rm)


def test_float16_functional_statistics_are_float32(backend):
    f16 = _low_precision_dtype(backend, "float16")
    x = (100.0 + np.random.default_rng(10).normal(size=(8192, 2))).astype(np.float16)
    X = backend.xp.asarray(to_backend(backend, x), dtype=f16)
    for fn in (F.batch_stats, backend.ops.batch_stats):
        mean, var = fn(X, axis=1)
        assert mean.dtype == backend.xp.float32 and var.dtype == backend.xp.float32
        want_mean, want_var = ref.batch_mean_var(x, 1)
        assert_close(to_numpy(mean), want_mean, 1e-6, "mean")
        assert_close(to_numpy(var), want_var, 1e-4, "var")


def test_bfloat16_input(backend):
    bf16 = _low_precision_dtype(backend, "bfloat16")
    xp = backend.xp
    x = np.random.default_rng(11).normal(2.0, 3.0, size=(16, 3, 8)).astype(np.float32)
    X = xp.astype(to_backend(backend, x), bf16)
    x_rounded = to_numpy(xp.astype(X, xp.float32)).astype(np.float64)
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    y = bn(X)
    assert y.dtype == bf16 and bn.running_mean.dtype == xp.float32
    dy = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)
    DY = xp.astype(to_backend(backend, dy), bf16)
    dx = bn.backward(DY)
    assert dx.dtype == bf16 and bn.weight.grad.dtype == xp.float32
    dy_rounded = to_numpy(xp.astype(DY, xp.float32)).astype(np.float64)
    assert_close(to_numpy(xp.astype(y, xp.float32)), ref.forward(x_rounded, axis=1)["y"], 2e-2, "y")
    assert_close(
        to_numpy(xp.astype(dx, xp.float32)), ref.backward(dy_rounded, x_rounded, axis=1)["dx"], 2e-2, "dx"
    )
    em, _, _ = ref.update_running(np.zeros(3), np.ones(3), x_rounded, axis=1)
    assert_close(to_numpy(bn.running_mean), em, 1e-5, "running_mean")


# -- the error measure every comparison uses ------------------------------------------------------


def test_assert_close_reports_the_error_where_it_is_and_the_tolerance():
    want = np.array([[1.0, -2.0], [4.0, 0.5]])
    got = want.copy()
    got[1, 0] = 4.004
    assert assert_close(got, want, 1e-3, "dx") == pytest.approx(1e-3)  # relative to max|want| = 4
    with pytest.raises(
        AssertionError,
        match=r"^dx: max relative error 1\.000e-03 > tolerance 1\.0e-04, "
        r"at index \(1, 0\): got 4\.004, reference 4\.0 ",
    ):
        assert_close(got, want, 1e-4, "dx")
    got[0, 1] = np.nan
    assert rel_err(got, want) == np.inf
    with pytest.raises(AssertionError, match=r"^dx: 1 non-finite values, the first at index \(0, 1\)"):
        assert_close(got, want, 1.0, "dx")
    with pytest.raises(AssertionError, match=r"shape \(2, 2\), reference shape \(4,\)"):
        assert_close(want, want.ravel(), 1.0)


def test_rel_err_scales():
    want = np.array([0.0, 2.0, -0.5])
    assert rel_err(want + 0.02, want) == pytest.approx(0.01)
    assert rel_err(want + 0.02, want, scale=20.0) == pytest.approx(0.001)  # a larger scale wins
    assert rel_err(want + 0.02, want, scale=0.5) == pytest.approx(0.01)
    assert rel_err(np.full(3, 1e-3), np.zeros(3)) == pytest.approx(1e-3)  # all zeros: absolute
    assert rel_err(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
