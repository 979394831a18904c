"""Analytic gradients against central finite differences, in float64, on every tier.

The loss is L = sum(y * R) for a fixed random R, so dL/dy = R is what backward receives.
"""

from __future__ import annotations

import numpy as np
import pytest

import xbn
from xbn import _reference as ref
from xbn._reference import assert_close, to_numpy

from reference import check_layer_gradients, numerical_grad, to_backend

LAYOUTS = [
    (xbn.BatchNorm1d, {}, (5, 3), 1),
    (xbn.BatchNorm1d, {}, (3, 2, 4), 1),
    (xbn.BatchNorm2d, {}, (2, 3, 2, 3), 1),
    (xbn.BatchNorm, {"axis": -1}, (2, 3, 2, 3), -1),
    (xbn.BatchNorm3d, {}, (2, 2, 2, 2, 3), 1),
]
IDS = ["1d-NC", "1d-NCL", "2d-NCHW", "NHWC", "3d"]
TOL = 1e-6  # central differences with h = 1e-6 in float64: error ~1e-9 relative


@pytest.mark.parametrize("mode", ["train", "eval", "untracked-eval"])
@pytest.mark.parametrize("cls,kw,shape,axis", LAYOUTS, ids=IDS)
def test_finite_differences(backend, cls, kw, shape, axis, mode):
    c = shape[axis]
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.5, size=shape)
    r = rng.normal(size=shape)
    w = rng.uniform(0.5, 1.5, c)
    b = rng.normal(size=c)
    bn = cls(
        c,
        **kw,
        eps=1e-3,
        backend=backend.name,
        dtype="float64",
        track_running_stats=(mode != "untracked-eval"),
    )
    if mode == "eval":
        bn.running_mean = to_backend(backend, rng.normal(size=c))
        bn.running_var = to_backend(backend, rng.uniform(0.5, 2.0, c))
    training = mode == "train"
    bn.train(training)
    num_dx, num_dw, _ = check_layer_gradients(
        bn, backend, x, r, w, b, TOL, call=lambda a: bn.forward(a, training=training)
    )
    # the finite differences also confirm the reference itself
    kwargs = dict(axis=axis, weight=w, eps=1e-3, use_batch_stats=(mode != "eval"))
    if mode == "eval":
        kwargs.update(running_mean=to_numpy(bn.running_mean), running_var=to_numpy(bn.running_var))
    g = ref.backward(r, x, **kwargs)
    assert_close(g["dx"], num_dx, TOL, "reference dx")
    assert_close(g["dgamma"], num_dw, TOL, "reference dgamma")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_finite_differences_affine_false(backend, mode):
    shape = (4, 3, 2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    r = rng.normal(size=shape)
    bn = xbn.BatchNorm1d(3, affine=False, backend=backend.name, dtype="float64")
    bn.running_var = to_backend(backend, np.array([0.5, 1.0, 2.0]))
    training = mode == "train"

    def loss(a):
        return float(np.sum(to_numpy(bn.forward(to_backend(backend, a), training=training)) * r))

    num_dx = numerical_grad(loss, x.copy())
    bn.forward(to_backend(backend, x), training=training)
    dx = bn.backward(to_backend(backend, r))
    assert_close(to_numpy(dx), num_dx, TOL, "dx")
