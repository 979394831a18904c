"""xbn.functional against the independent float64 reference, on every backend tier."""

from __future__ import annotations

import numpy as np
import pytest

from xbn import _reference as ref
from xbn import functional as F
from xbn._reference import assert_close, to_numpy

from reference import rand, to_backend

# (shape, channel axis): (N,C), (N,C,L), NCHW, NHWC given both ways, NCDHW
CASES = [
    ((8, 3), 1),
    ((4, 3, 5), 1),
    ((2, 3, 4, 5), 1),
    ((2, 4, 5, 3), 3),
    ((2, 4, 5, 3), -1),
    ((2, 3, 2, 3, 2), 1),
]
IDS = [f"{s}-axis{a}" for s, a in CASES]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rand(rng, shape, dtype, loc=0.5, scale=2.0)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    dy = rand(rng, shape, dtype)
    return x, w, b, dy


def test_helpers():
    assert F.reduction_axes(4, 1) == (0, 2, 3)
    assert F.reduction_axes(4, -1) == (0, 1, 2)
    assert F.values_per_channel((2, 3, 4, 5), 1) == 40
    assert F.values_per_channel((2, 4, 5, 3), -1) == 40
    assert F.values_per_channel((0, 3), 1) == 0
    with pytest.raises(ValueError, match="channel axis 4 is out of range for a 4-D array"):
        F.reduction_axes(4, 4)


def test_per_channel_and_compute_dtype(backend):
    xp = backend.xp
    v = to_backend(backend, np.arange(3.0))
    assert tuple(F.per_channel(v, 4, 1).shape) == (1, 3, 1, 1)
    assert tuple(F.per_channel(v, 4, -1).shape) == (1, 1, 1, 3)
    assert F.compute_dtype(xp.float64, xp=xp) == xp.float64
    assert F.compute_dtype(xp.float32, xp=xp) == xp.float32
    if hasattr(xp, "float16"):
        assert F.compute_dtype(xp.float16, xp=xp) == xp.float32


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_batch_stats(backend, shape, axis, dtype):
    x, *_ = _data(shape, axis, dtype)
    mean, var = F.batch_stats(to_backend(backend, x), axis=axis)
    rmean, rvar = ref.batch_mean_var(x, axis)
    assert mean.dtype == to_backend(backend, x).dtype
    assert tuple(mean.shape) == tuple(var.shape) == (shape[axis],)
    assert_close(to_numpy(mean), rmean, TOL[dtype], "mean")
    assert_close(to_numpy(var), rvar, TOL[dtype], "var")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False])
def test_train_forward_backward(backend, shape, axis, dtype, affine):
    x, w, b, dy = _data(shape, axis, dtype)
    if not affine:
        w = b = None
    X, DY = to_backend(backend, x), to_backend(backend, dy)
    W = None if w is None else to_backend(backend, w)
    B = None if b is None else to_backend(backend, b)
    y, mean, inv = F.batch_norm_train(X, W, B, axis=axis, eps=1e-3)
    r = ref.forward(x, axis=axis, weight=w, bias=b, eps=1e-3)
    assert y.dtype == X.dtype
    assert_close(to_numpy(y), r["y"], TOL[dtype], "y")
    assert_close(to_numpy(mean), r["mean"], TOL[dtype], "mean")
    assert_close(to_numpy(inv), r["invstd"], TOL[dtype], "invstd")

    dx, dgamma, dbeta = F.batch_norm_backward(DY, X, mean, inv, W, axis=axis)
    g = ref.backward(dy, x, axis=axis, weight=w, eps=1e-3)
    assert dx.dtype == X.dtype
    assert_close(to_numpy(dx), g["dx"], TOL[dtype] * 10, "dx")
    assert_close(to_numpy(dgamma), g["dgamma"], TOL[dtype] * 10, "dgamma")
    assert_close(to_numpy(dbeta), g["dbeta"], TOL[dtype] * 10, "dbeta")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis", CASES[:4], ids=IDS[:4])
@pytest.mark.parametrize("need_param_grads", [True, False])
def test_eval_backward(backend, shape, axis, dtype, need_param_grads):
    x, w, _, dy = _data(shape, axis, dtype)
    c = shape[axis]
    rng = np.random.default_rng(1)
    rm = rng.normal(size=c).astype(dtype)
    rv = rng.uniform(0.5, 2.0, c).astype(dtype)
    inv = F.invstd(to_backend(backend, rv), eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(
        to_backend(backend, dy),
        to_backend(backend, x),
        to_backend(backend, rm),
        inv,
        to_backend(backend, w),
        axis=axis,
        batch_stats_used=False,
        need_param_grads=need_param_grads,
    )
    g = ref.backward(dy, x, axis=axis, weight=w, running_mean=rm, running_var=rv, use_batch_stats=False)
    assert_close(to_numpy(dx), g["dx"], TOL[dtype] * 10, "dx")
    if need_param_grads:
        assert_close(to_numpy(dgamma), g["dgamma"], TOL[dtype] * 10, "dgamma")
        assert_close(to_numpy(dbeta), g["dbeta"], TOL[dtype] * 10, "dbeta")
    else:
        assert dgamma is None and dbeta is None


def test_backward_pieces_compose(backend):
    """backward_reduce + backward_coefficients + backward_apply is the A.11 formula."""
    shape, axis = (3, 4, 5), 1
    x, w, _, dy = _data(shape, axis, np.float64)
    X, DY, W = (to_backend(backend, a) for a in (x, dy, w))
    mean, var = F.batch_stats(X, axis=axis)
    inv = F.invstd(var, eps=1e-5)
    s_dy, s_dy_xmu = F.backward_reduce(DY, X, mean, axis=axis)
    rm = ref.batch_mean_var(x, axis)[0]
    assert_close(to_numpy(s_dy), dy.sum(axis=(0, 2)), 1e-12, "sum_dy")
    assert_close(to_numpy(s_dy_xmu), (dy * (x - rm[:, None])).sum(axis=(0, 2)), 1e-12, "sum_dy_xmu")
    k = F.backward_coefficients(s_dy, s_dy_xmu, inv, W, count=15)
    dx = F.backward_apply(DY, X, mean, *k, axis=axis)
    assert_close(to_numpy(dx), ref.backward(dy, x, axis=axis, weight=w)["dx"], 1e-12, "dx")


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_updated_running_stats(backend, momentum):
    shape, axis = (5, 3, 4), 1
    x, *_ = _data(shape, axis, np.float64)
    rng = np.random.default_rng(3)
    rm0, rv0 = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    mean, var = F.batch_stats(to_backend(backend, x), axis=axis)
    nm, nv = F.updated_running_stats(
        to_backend(backend, rm0), to_backend(backend, rv0), mean, var, count=20, momentum=momentum
    )
    em, ev, _ = ref.update_running(rm0, rv0, x, axis=axis, momentum=momentum)
    assert_close(to_numpy(nm), em, 1e-12, "running_mean")
    assert_close(to_numpy(nv), ev, 1e-12, "running_var")


def test_running_stats_keep_their_dtype(backend):
    xp = backend.xp
    x = np.random.default_rng(0).normal(size=(6, 2))
    mean, var = F.batch_stats(to_backend(backend, x), axis=1)  # float64
    rm = xp.zeros((2,), dtype=xp.float32, device=backend.device)
    rv = xp.ones((2,), dtype=xp.float32, device=backend.device)
    nm, nv = F.updated_running_stats(rm, rv, mean, var, count=6, momentum=0.5)
    assert nm.dtype == xp.float32 and nv.dtype == xp.float32


def test_ops_match_generic(backend):
    """The backend's ops (fast paths where registered) agree with the generic functions."""
    shape, axis = (4, 3, 6), 1
    x, w, b, dy = _data(shape, axis, np.float32)
    X, W, B, DY = (to_backend(backend, a) for a in (x, w, b, dy))
    y1, m1, i1 = F.batch_norm_train(X, W, B, axis=axis)
    y2, m2, i2 = F.batch_norm_train(X, W, B, axis=axis, xp=backend.xp, ops=backend.ops)
    assert_close(to_numpy(y2), to_numpy(y1), 1e-5, "y")
    g1 = F.batch_norm_backward(DY, X, m1, i1, W, axis=axis)
    g2 = F.batch_norm_backward(DY, X, m2, i2, W, axis=axis, xp=backend.xp, ops=backend.ops)
    for a, bb, what in zip(g1, g2, ("dx", "dgamma", "dbeta")):
        assert_close(to_numpy(bb), to_numpy(a), 1e-5, what)
