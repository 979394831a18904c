"""Property tests (hypothesis) over shapes, ranks and channel axes, on every tier.

Data is well conditioned by construction: each channel is standardized, then given a mean in
[-10, 10] and a std in [0.5, 3], so no channel is near-constant (std >> sqrt(eps)).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xbn
from xbn import _reference as ref
from xbn._reference import assert_close, to_numpy

from reference import to_backend

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def layouts(draw, max_rank=5):
    """(shape, axis, seed) with at least 2 values per channel; axis may be negative."""
    rank = draw(st.integers(2, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    m = int(np.prod(shape)) // shape[axis]
    if m < 2:  # make room for batch statistics on the first non-channel axis
        other = 0 if axis % rank != 0 else 1
        shape = shape[:other] + (2,) + shape[other + 1 :]
    return shape, axis, draw(st.integers(0, 2**32 - 1))


def well_conditioned(rng, shape, axis, dtype=np.float64):
    axis = axis % len(shape)
    red = tuple(i for i in range(len(shape)) if i != axis)
    z = rng.normal(size=shape)
    z = (z - z.mean(axis=red, keepdims=True)) / z.std(axis=red, keepdims=True)
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    loc = rng.uniform(-10, 10, shape[axis]).reshape(bshape)
    scale = rng.uniform(0.5, 3.0, shape[axis]).reshape(bshape)
    return (loc + scale * z).astype(dtype)


def _layer(backend, shape, axis, rng, dtype="float64", **kw):
    c = shape[axis]
    bn = xbn.BatchNorm(c, axis=axis, backend=backend.name, dtype=dtype, **kw)
    w = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    b = rng.normal(size=c)
    bn.weight.data = backend.xp.asarray(w, dtype=bn.dtype, device=backend.device)
    bn.bias.data = backend.xp.asarray(b, dtype=bn.dtype, device=backend.device)
    return bn, w, b


def _channel_moments(y, axis):
    y = np.asarray(y, dtype=np.float64)
    red = tuple(i for i in range(y.ndim) if i != axis % y.ndim)
    return y.mean(axis=red), y.std(axis=red)


@SETTINGS
@given(layout=layouts(), dtype=st.sampled_from(["float64", "float32"]))
def test_training_output_has_mean_beta_and_std_gamma(backend, layout, dtype):
    shape, axis, seed = layout
    rng = np.random.default_rng(seed)
    x = well_conditioned(rng, shape, axis, np.dtype(dtype))
    bn, w, b = _layer(backend, shape, axis, rng, dtype=dtype)
    y = to_numpy(bn(to_backend(backend, x)))
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    mean, std = _channel_moments(y, axis)
    _, var = ref.batch_mean_var(x, axis)
    # |mean| / std up to 20: the rounding of x and of the mean is amplified ~20x in the output
    tol = 1e-13 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(mean, b, rtol=0, atol=tol * np.abs(w).max())
    np.testing.assert_allclose(std, np.abs(w) * np.sqrt(var / (var + bn.eps)), rtol=tol)
    np.testing.assert_allclose(std, np.abs(w), rtol=1e-4)  # eps is negligible next to var >= 0.25


@SETTINGS
@given(layout=layouts(), training=st.booleans())
def test_forward_backward_agree_with_reference(backend, layout, training):
    shape, axis, seed = layout
    rng = np.random.default_rng(seed)
    x = well_conditioned(rng, shape, axis)
    dy = rng.normal(size=shape)
    bn, w, b = _layer(backend, shape, axis, rng)
    c = shape[axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    bn.running_mean = to_backend(backend, rm)
    bn.running_var = to_backend(backend, rv)
    bn.train(training)
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))
    stats = dict(running_mean=rm, running_var=rv, use_batch_stats=training)
    f = ref.forward(x, axis=axis, weight=w, bias=b, **stats)
    g = ref.backward(dy, x, axis=axis, weight=w, **stats)
    assert_close(to_numpy(y), f["y"], 1e-12, "y")
    # with 2 values per channel dx is O(eps / var) of its terms: compare on their scale
    m = x.size // c
    k = np.abs(w * f["invstd"]).max() * np.abs(dy).max() if (training and m == 2) else 0.0
    assert_close(to_numpy(dx), g["dx"], 1e-10, "dx", scale=k)
    assert_close(to_numpy(bn.weight.grad), g["dgamma"], 1e-10, "dgamma")
    assert_close(to_numpy(bn.bias.grad), g["dbeta"], 1e-10, "dbeta")
    if training:
        em, ev, _ = ref.update_running(rm, rv, x, axis=axis, momentum=0.1)
        assert_close(to_numpy(bn.running_mean), em, 1e-12, "running_mean")
        assert_close(to_numpy(bn.running_var), ev, 1e-12, "running_var")
    else:
        np.testing.assert_array_equal(to_numpy(bn.running_mean), rm)


@SETTINGS
@given(layout=layouts(max_rank=4))
def test_training_dx_sums_to_zero_per_channel(backend, layout):
    """The batch mean is subtracted, so dx is orthogonal to per-channel constants."""
    shape, axis, seed = layout
    rng = np.random.default_rng(seed)
    x = well_conditioned(rng, shape, axis)
    dy = rng.normal(size=shape)
    bn, w, _ = _layer(backend, shape, axis, rng)
    bn(to_backend(backend, x))
    dx = to_numpy(bn.backward(to_backend(backend, dy)))
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    scale = np.abs(w).max() * np.abs(dy).sum(axis=red).max() * 2  # invstd <= 2 here
    np.testing.assert_allclose(dx.sum(axis=red), 0.0, atol=1e-13 * scale)


@SETTINGS
@given(layout=layouts(max_rank=4), shift=st.floats(-100, 100), factor=st.floats(0.25, 4.0))
def test_training_output_invariant_to_channel_affine_input(backend, layout, shift, factor):
    """y(a * x + s) = y(x) for a > 0 (up to eps, made negligible here)."""
    shape, axis, seed = layout
    rng = np.random.default_rng(seed)
    x = well_conditioned(rng, shape, axis)
    bn, _, _ = _layer(backend, shape, axis, rng, eps=1e-12)
    y1 = to_numpy(bn(to_backend(backend, x)))
    y2 = to_numpy(bn(to_backend(backend, factor * x + shift)))
    assert_close(y2, y1, 1e-9, "y")


@SETTINGS
@given(layout=layouts(max_rank=4))
def test_channel_permutation_equivariance(backend, layout):
    shape, axis, seed = layout
    rng = np.random.default_rng(seed)
    x = well_conditioned(rng, shape, axis)
    c = shape[axis]
    perm = rng.permutation(c)
    bn, w, b = _layer(backend, shape, axis, rng)
    y = to_numpy(bn(to_backend(backend, x)))
    bn_p, _, _ = _layer(backend, shape, axis, rng)
    bn_p.weight.data = to_backend(backend, w[perm])
    bn_p.bias.data = to_backend(backend, b[perm])
    y_p = to_numpy(bn_p(to_backend(backend, np.take(x, perm, axis=axis))))
    # equal up to rounding: a fast path may sum a channel in an order that depends on its position
    assert_close(y_p, np.take(y, perm, axis=axis), 1e-14, "y")
    assert_close(to_numpy(bn_p.running_var), to_numpy(bn.running_var)[perm], 1e-14, "running_var")


@SETTINGS
@given(layout=layouts(max_rank=4))
def test_eval_is_affine_and_backward_is_its_slope(backend, layout):
    shape, axis, seed = layout
    rng = np.random.default_rng(seed)
    c = shape[axis]
    bn, w, b = _layer(backend, shape, axis, rng)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    bn.running_mean, bn.running_var = to_backend(backend, rm), to_backend(backend, rv)
    bn.eval()
    x1, x2 = rng.normal(size=shape), rng.normal(size=shape)
    y1 = to_numpy(bn(to_backend(backend, x1)))
    y2 = to_numpy(bn(to_backend(backend, x2)))
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    slope = np.expand_dims(w / np.sqrt(rv + bn.eps), red)
    assert_close(y2 - y1, slope * (x2 - x1), 1e-12, "y differences")
    dy = rng.normal(size=shape)
    dx = to_numpy(bn.backward(to_backend(backend, dy)))
    assert_close(dx, slope * dy, 1e-12, "dx")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layouts_strategy_is_exercised(dtype):
    """Guard: the strategy reaches negative axes, rank 5 and M == 2 (not only easy cases)."""
    seen = set()

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(layouts())
    def collect(layout):
        shape, axis, _ = layout
        seen.add(("neg", axis < 0))
        seen.add(("rank", len(shape)))
        seen.add(("m2", int(np.prod(shape)) // shape[axis] == 2))

    collect()
    assert {("neg", True), ("rank", 5), ("m2", True), ("rank", 2)} <= seen
