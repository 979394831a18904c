"""BatchRenorm, LazyBatchNorm, folding BatchNorm into Linear/Conv layers, and xbn.nn.Identity.

Renorm is checked against a float64 reference written out here from the paper (r and d held
constant in its backward), by central finite differences, and against torch autograd with r and
d detached; folding against the unfolded layers in float64 and torch's fusion utilities.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

import xbn
from xbn import _reference as ref
from xbn._reference import assert_close, to_numpy
from xbn.lazy import UninitializedError
from xbn.renorm import renorm_corrections

from reference import check_layer_gradients, numerical_grad, snapshot, to_backend

LAYOUTS = [
    (xbn.BatchRenorm1d, {}, (6, 3), 1),
    (xbn.BatchRenorm1d, {}, (4, 3, 5), 1),
    (xbn.BatchRenorm2d, {}, (2, 3, 4, 5), 1),
    (xbn.BatchRenorm, {"axis": -1}, (2, 4, 5, 3), -1),
    (xbn.BatchRenorm3d, {}, (2, 3, 2, 3, 2), 1),
]
IDS = ["1d-NC", "1d-NCL", "2d-NCHW", "NHWC", "3d"]
FD_TOL = 1e-6


def _x(shape, seed=0, loc=0.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def _set(layer, backend, **values):
    for name, v in values.items():
        arr = backend.xp.asarray(np.asarray(v), dtype=layer.dtype, device=backend.device)
        if name in ("weight", "bias"):
            getattr(layer, name).data = arr
        else:
            setattr(layer, name, arr)


def _bshape(ndim, axis, c):
    return tuple(c if i == axis % ndim else 1 for i in range(ndim))


def renorm_reference(
    x, dy, *, axis, weight, bias, running_mean, running_var, eps, rmax, dmax, r=None, d=None
):
    """Batch renorm in float64 from the paper: y, dx, dgamma, dbeta, r, d (given r, d are used as is).

    The backward holds r and d constant: dx is BatchNorm's dx for the weight gamma * r.
    """
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    bs = _bshape(x.ndim, axis, c)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    mean, var = ref.batch_mean_var(x, axis)
    sigma_b, sigma_r = np.sqrt(var + eps), np.sqrt(np.asarray(running_var, np.float64) + eps)
    if r is None:
        r = np.clip(sigma_b / sigma_r, 1 / rmax, rmax)
    if d is None:
        d = np.clip((mean - np.asarray(running_mean, np.float64)) / sigma_r, -dmax, dmax)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    xhat = (x - mean.reshape(bs)) / sigma_b.reshape(bs)
    y = w.reshape(bs) * (xhat * r.reshape(bs) + d.reshape(bs)) + b.reshape(bs)
    g = dy * (w * r).reshape(bs)  # dL/dx_hat
    dx = (
        g - g.mean(axis=axes).reshape(bs) - xhat * (g * xhat).mean(axis=axes).reshape(bs)
    ) / sigma_b.reshape(bs)
    dgamma = (dy * (xhat * r.reshape(bs) + d.reshape(bs))).sum(axis=axes)
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dy.sum(axis=axes), "r": r, "d": d}


# -- BatchRenorm: the math -------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw,shape,axis", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_renorm_steps_match_reference(backend, cls, kw, shape, axis, momentum):
    """Four training steps (y, dx, grads, running stats), r and d clipped in some, then eval."""
    c = shape[axis]
    bn = cls(c, **kw, rmax=1.6, dmax=0.4, momentum=momentum, eps=1e-3, backend=backend.name, dtype="float64")
    rng = np.random.default_rng(7)
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    _set(bn, backend, weight=w, bias=b)
    rm, rv, nbt = np.zeros(c), np.ones(c), 0
    clipped = unclipped = 0
    for step in range(4):
        x, dy = _x(shape, seed=step, loc=0.3 * step, scale=0.6 + 0.5 * step), _x(shape, seed=10 + step)
        y = bn(to_backend(backend, x))
        dx = bn.backward(to_backend(backend, dy))
        want = renorm_reference(
            x, dy, axis=axis, weight=w, bias=b, running_mean=rm, running_var=rv, eps=1e-3, rmax=1.6, dmax=0.4
        )
        at_bound = (
            np.isclose(np.abs(want["d"]), 0.4) | np.isclose(want["r"], 1.6) | np.isclose(want["r"], 1 / 1.6)
        )
        clipped, unclipped = clipped + at_bound.sum(), unclipped + (~at_bound).sum()
        assert_close(to_numpy(y), want["y"], 1e-12, "y")
        assert_close(to_numpy(dx), want["dx"], 1e-11, "dx")
        assert_close(to_numpy(bn.weight.grad), want["dgamma"], 1e-11, "dgamma")
        assert_close(to_numpy(bn.bias.grad), want["dbeta"], 1e-11, "dbeta")
        # the running statistics move exactly as BatchNorm's
        rm, rv, nbt = ref.update_running(rm, rv, x, axis=axis, momentum=momentum, num_batches_tracked=nbt)
        assert_close(to_numpy(bn.running_mean), rm, 1e-12, "running_mean")
        assert_close(to_numpy(bn.running_var), rv, 1e-12, "running_var")
        assert bn.num_batches_tracked == nbt
        bn.zero_grad()
    assert clipped and unclipped  # both regimes were exercised
    bn.eval()
    x = _x(shape, seed=99)
    want = ref.forward(
        x, axis=axis, weight=w, bias=b, eps=1e-3, running_mean=rm, running_var=rv, use_batch_stats=False
    )
    assert_close(to_numpy(bn(to_backend(backend, x))), want["y"], 1e-12, "eval y")


@pytest.mark.parametrize("cls,kw,shape,axis", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-6)])
def test_renorm_with_rmax_1_dmax_0_is_batchnorm(backend, cls, kw, shape, axis, dtype, tol):
    c = shape[axis]
    bn_cls = getattr(xbn, cls.__name__.replace("Renorm", "Norm"))
    renorm = cls(c, **kw, rmax=1.0, dmax=0.0, backend=backend.name, dtype=dtype)
    plain = bn_cls(c, **kw, backend=backend.name, dtype=dtype)
    rng = np.random.default_rng(1)
    for layer in (renorm, plain):
        _set(
            layer,
            backend,
            weight=rng.uniform(0.5, 1.5, c),
            bias=rng.normal(size=c),
            running_mean=rng.normal(size=c),
        )
        rng = np.random.default_rng(1)
    for step in range(2):
        x, dy = _x(shape, seed=step).astype(dtype), _x(shape, seed=5 + step).astype(dtype)
        outs = []
        for layer in (renorm, plain):
            y = layer(to_backend(backend, x))
            outs.append((to_numpy(y), to_numpy(layer.backward(to_backend(backend, dy)))))
        for what, got, want in zip(("y", "dx"), outs[0], outs[1]):
            assert_close(got, want, tol, what)
        for name in ("running_mean", "running_var"):
            assert_close(to_numpy(getattr(renorm, name)), to_numpy(getattr(plain, name)), tol, name)
        assert_close(to_numpy(renorm.weight.grad), to_numpy(plain.weight.grad), tol, "dgamma")
        assert_close(to_numpy(renorm.bias.grad), to_numpy(plain.bias.grad), tol, "dbeta")
    assert renorm.num_batches_tracked == plain.num_batches_tracked == 2


def test_renorm_without_clipping_trains_as_eval_normalizes(backend):
    """Unclipped, a training step's output is eval's with the running statistics before the step."""
    bn = xbn.BatchRenorm2d(3, rmax=1e6, dmax=1e6, backend=backend.name, dtype="float64")
    rng = np.random.default_rng(2)
    w, b, rm, rv = rng.uniform(0.5, 1.5, 3), rng.normal(size=3), rng.normal(size=3), rng.uniform(0.2, 3.0, 3)
    _set(bn, backend, weight=w, bias=b, running_mean=rm, running_var=rv)
    x = to_backend(backend, _x((3, 3, 2, 2), loc=2.0, scale=3.0))
    before = copy.deepcopy(bn)
    y_eval = to_numpy(before.forward(x, training=False))
    y_train = to_numpy(bn(x))
    assert_close(y_train, y_eval, 1e-12, "training y against eval y")
    assert bn.num_batches_tracked == 1 and before.num_batches_tracked == 0


def test_renorm_corrections_clip_per_the_paper(backend):
    """r and d on and inside each bound, checked value by value, and the layer uses exactly those."""
    eps, rmax, dmax = 1e-5, 2.0, 0.5
    rm, rv = np.array([0.0, 0.0, 1.5, 1.0]), np.array([1.0, 1.0, 4.0, 1.0])
    # channel 0: wide (r > rmax) and high (d > dmax); 1: narrow, low; 2 and 3: within both bounds
    x = np.array([[-3.0, -1.1, 0.1, 0.4], [5.0, -0.9, 3.7, 2.2]] * 2)
    mean, var = ref.batch_mean_var(x, 1)
    raw_r, raw_d = np.sqrt(var + eps) / np.sqrt(rv + eps), (mean - rm) / np.sqrt(rv + eps)
    assert (
        raw_r[0] > rmax and raw_r[1] < 1 / rmax and 1 / rmax < raw_r[2] < rmax and 1 / rmax < raw_r[3] < rmax
    )
    assert raw_d[0] > dmax and raw_d[1] < -dmax and abs(raw_d[2]) < dmax and abs(raw_d[3]) < dmax
    xp, dev = backend.xp, backend.device
    r, d = renorm_corrections(
        *(xp.asarray(a, device=dev) for a in (mean, var, rm, rv)), eps=eps, rmax=rmax, dmax=dmax, xp=xp
    )
    r, d = to_numpy(r), to_numpy(d)
    assert r[0] == rmax and r[1] == 1 / rmax and d[0] == dmax and d[1] == -dmax
    assert_close(r[2:], raw_r[2:], 1e-15, "unclipped r")
    assert_close(d[2:], raw_d[2:], 1e-15, "unclipped d")
    bn = xbn.BatchRenorm1d(4, rmax=rmax, dmax=dmax, eps=eps, backend=backend.name, dtype="float64")
    _set(bn, backend, running_mean=rm, running_var=rv, weight=[1.5, 0.5, 2.0, 1.0], bias=[0.1, 0.2, 0.3, 0.4])
    y = to_numpy(bn(to_backend(backend, x)))
    # the clipped values are what the layer applied: channel 0 is x_hat * 2 + 0.5, then affine
    xhat = (x - mean) / np.sqrt(var + eps)
    want = np.array([1.5, 0.5, 2.0, 1.0]) * (xhat * r + d) + np.array([0.1, 0.2, 0.3, 0.4])
    assert_close(y, want, 1e-12, "y")
    assert_close(y[:, 0], 1.5 * (xhat[:, 0] * 2.0 + 0.5) + 0.1, 1e-12, "y of the clipped channel")


def test_renorm_constant_channel_is_exactly_beta_plus_gamma_d(backend):
    x = _x((6, 3)).astype(np.float32)
    x[:, 1] = 7.25
    bn = xbn.BatchRenorm1d(3, rmax=2.0, dmax=0.5, backend=backend.name)
    _set(bn, backend, weight=[1.0, 2.0, 1.0], bias=[0.0, 0.25, 0.0])
    y = to_numpy(bn(to_backend(backend, x)))
    # d = (7.25 - 0) / 1 is clipped to 0.5: y = 0.25 + 2 * 0.5, exactly
    np.testing.assert_array_equal(y[:, 1], np.full(6, 1.25, np.float32))
    dy = _x((6, 3), seed=3).astype(np.float32)
    bn.backward(to_backend(backend, dy))
    assert_close(
        to_numpy(bn.weight.grad)[1], 0.5 * dy[:, 1].astype(np.float64).sum(), 1e-6, "dgamma = d sum(dy)"
    )


@pytest.mark.parametrize("regime", ["saturated", "batchnorm"])
def test_renorm_finite_differences_of_the_layer(backend, regime):
    """Where r and d are locally constant (clipped at their bounds, or rmax = 1 and dmax = 0), the
    layer's function itself has the gradient its backward gives."""
    shape = (4, 2, 3)
    rng = np.random.default_rng(4)
    x, rr = rng.normal(0.3, 1.5, size=shape), rng.normal(size=shape)
    w, b = rng.uniform(0.5, 1.5, 2), rng.normal(size=2)
    rmax, dmax = (1.2, 0.3) if regime == "saturated" else (1.0, 0.0)
    # momentum 0: each forward of the differences leaves the running statistics as they are
    bn = xbn.BatchRenorm1d(
        2, rmax=rmax, dmax=dmax, eps=1e-3, momentum=0.0, backend=backend.name, dtype="float64"
    )
    # running std 10x the batch's on channel 0 and 1/10 on channel 1, means far off: all clipped
    _set(bn, backend, running_mean=[-5.0, 5.0], running_var=[200.0, 0.02])
    check_layer_gradients(bn, backend, x, rr, w, b, FD_TOL, call=lambda a: bn.forward(a, training=True))


def test_renorm_backward_holds_r_and_d_constant(backend):
    """Unclipped, r and d depend on x; the backward is the gradient with them held at their values
    (finite differences of the float64 reference with r and d fixed)."""
    shape = (5, 3)
    rng = np.random.default_rng(6)
    x, rr = rng.normal(0.3, 1.5, size=shape), rng.normal(size=shape)
    w, b = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    rm, rv = np.array([0.1, 0.5, -0.2]), np.array([1.5, 2.0, 3.0])
    bn = xbn.BatchRenorm1d(3, rmax=10.0, dmax=10.0, eps=1e-3, backend=backend.name, dtype="float64")
    _set(bn, backend, weight=w, bias=b, running_mean=rm, running_var=rv)
    bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, rr))
    opts = dict(axis=1, bias=b, running_mean=rm, running_var=rv, eps=1e-3, rmax=10.0, dmax=10.0)
    at_x = renorm_reference(x, rr, weight=w, **opts)
    r, d = at_x["r"], at_x["d"]
    assert np.all((r > 1 / 10.0) & (r < 10.0)) and np.all(np.abs(d) < 10.0)  # unclipped

    def fixed(x_=x, w_=w):
        return float(np.sum(renorm_reference(x_, rr, weight=w_, r=r, d=d, **opts)["y"] * rr))

    assert_close(to_numpy(dx), numerical_grad(lambda a: fixed(x_=a), x.copy()), FD_TOL, "dx")
    assert_close(to_numpy(bn.weight.grad), numerical_grad(lambda a: fixed(w_=a), w.copy()), FD_TOL, "dgamma")
    # and it is not the gradient through r and d: the layer's own function differs here
    full = numerical_grad(
        lambda a: float(np.sum(renorm_reference(a, rr, weight=w, **opts)["y"] * rr)), x.copy()
    )
    assert ref.rel_err(to_numpy(dx), full) > 1e-3


def test_renorm_matches_torch_autograd_with_detached_r_d(backend):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    shape, c, eps = (4, 3, 5), 3, 1e-5
    rng = np.random.default_rng(9)
    w, b, rm, rv = rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.1, 0.5, c)
    bn = xbn.BatchRenorm1d(c, rmax=2.0, dmax=0.7, backend=backend.name, dtype="float64")
    _set(bn, backend, weight=w, bias=b, running_mean=rm, running_var=rv)
    x, dy = _x(shape, loc=0.5, scale=1.5), _x(shape, seed=1)
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))

    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    mean, var = tx.mean(dim=(0, 2)), tx.var(dim=(0, 2), unbiased=False)
    sigma_b, sigma_r = torch.sqrt(var + eps), torch.sqrt(torch.tensor(rv) + eps)
    r = torch.clamp(sigma_b / sigma_r, 1 / 2.0, 2.0).detach()
    d = torch.clamp((mean - torch.tensor(rm)) / sigma_r, -0.7, 0.7).detach()
    xhat = (tx - mean[:, None]) / sigma_b[:, None]
    ty = tw[:, None] * (xhat * r[:, None] + d[:, None]) + tb[:, None]
    ty.backward(torch.tensor(dy))
    assert_close(to_numpy(y), ty.detach().numpy(), 1e-12, "y")
    assert_close(to_numpy(dx), tx.grad.numpy(), 1e-11, "dx")
    assert_close(to_numpy(bn.weight.grad), tw.grad.numpy(), 1e-11, "dgamma")
    assert_close(to_numpy(bn.bias.grad), tb.grad.numpy(), 1e-11, "dbeta")


def test_renorm_affine_false(backend):
    bn = xbn.BatchRenorm1d(3, affine=False, rmax=1.5, dmax=0.5, backend=backend.name, dtype="float64")
    rm, rv = np.array([1.0, -1.0, 0.0]), np.array([0.5, 4.0, 1.0])
    _set(bn, backend, running_mean=rm, running_var=rv)
    x, dy = _x((6, 3)), _x((6, 3), seed=1)
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))
    want = renorm_reference(
        x, dy, axis=1, weight=None, bias=None, running_mean=rm, running_var=rv, eps=1e-5, rmax=1.5, dmax=0.5
    )
    assert_close(to_numpy(y), want["y"], 1e-12, "y")
    assert_close(to_numpy(dx), want["dx"], 1e-11, "dx")
    assert bn.parameters() == []


def test_renorm_float32_and_mixed_dtypes(backend):
    rm, rv = np.array([0.2, -0.3]), np.array([0.8, 1.7])
    x, dy = _x((5, 2, 3)), _x((5, 2, 3), seed=1)
    x32, dy32, rm32, rv32 = (a.astype(np.float32) for a in (x, dy, rm, rv))
    opts = dict(axis=1, weight=None, bias=None, eps=1e-5, rmax=1.3, dmax=0.2)
    want = renorm_reference(x32, dy32, running_mean=rm32, running_var=rv32, **opts)
    for layer_dtype, x_dtype in (("float32", np.float32), ("float64", np.float32), ("float32", np.float64)):
        bn = xbn.BatchRenorm1d(2, rmax=1.3, dmax=0.2, backend=backend.name, dtype=layer_dtype)
        _set(bn, backend, running_mean=rm32, running_var=rv32)
        y = bn(to_backend(backend, x.astype(x_dtype)))
        dx = bn.backward(to_backend(backend, dy.astype(x_dtype)))
        assert y.dtype == dx.dtype == getattr(backend.xp, np.dtype(x_dtype).name)
        assert bn.running_mean.dtype == getattr(backend.xp, layer_dtype)
        assert_close(to_numpy(y), want["y"], 2e-6, f"y ({layer_dtype} layer, {np.dtype(x_dtype)} input)")
        assert_close(to_numpy(dx), want["dx"], 2e-5, f"dx ({layer_dtype} layer, {np.dtype(x_dtype)} input)")


def test_renorm_uses_the_backend_ops(backend):
    """Renorm's passes over the data are BatchNorm's ops, so the registered fast paths serve it."""
    bn = xbn.BatchRenorm1d(3, backend=backend.name)
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapped

    ops = bn._backend.ops
    names = ("batch_stats", "scale_shift", "batch_norm_backward")
    spied = dataclasses.replace(ops, **{n: spy(n, getattr(ops, n)) for n in names})
    bn.__dict__["_backend"] = dataclasses.replace(bn._backend, ops=spied)
    x = to_backend(backend, _x((6, 3)).astype(np.float32))
    y = bn(x)
    bn.backward(backend.xp.ones_like(y))
    assert calls == ["batch_stats", "scale_shift", "batch_norm_backward"]


# -- BatchRenorm: options, errors, state -----------------------------------------------------------


BAD_CLIPS = [
    ("rmax", 0.5, ValueError),
    ("rmax", float("inf"), ValueError),
    ("rmax", float("nan"), ValueError),
    ("rmax", "3", TypeError),
    ("rmax", True, TypeError),
    ("dmax", -0.1, ValueError),
    ("dmax", float("inf"), ValueError),
    ("dmax", None, TypeError),
]


@pytest.mark.parametrize("name,bad,err", BAD_CLIPS)
def test_rmax_dmax_are_validated_at_construction_and_when_set(backend, name, bad, err):
    with pytest.raises(err, match=name):
        xbn.BatchRenorm1d(3, backend=backend.name, **{name: bad})
    bn = xbn.BatchRenorm1d(3, rmax=2.0, dmax=1.0, backend=backend.name)
    with pytest.raises(err, match=name):
        setattr(bn, name, bad)
    assert (bn.rmax, bn.dmax) == (2.0, 1.0)


def test_rmax_dmax_warm_up_between_steps(backend):
    bn = xbn.BatchRenorm1d(2, rmax=1.0, dmax=0.0, backend=backend.name, dtype="float64")
    rv = np.array([0.01, 100.0])
    _set(bn, backend, running_var=rv)
    x = _x((8, 2), loc=3.0)
    for rmax, dmax in ((1.0, 0.0), (1.5, 1.0), (3.0, 5.0)):
        bn.rmax, bn.dmax = rmax, dmax
        assert (bn.rmax, bn.dmax) == (rmax, dmax) and isinstance(bn.rmax, float)
        rm, rv_now = to_numpy(bn.running_mean), to_numpy(bn.running_var)
        y = bn(to_backend(backend, x))
        want = renorm_reference(
            x,
            x,
            axis=1,
            weight=None,
            bias=None,
            running_mean=rm,
            running_var=rv_now,
            eps=1e-5,
            rmax=rmax,
            dmax=dmax,
        )
        assert_close(to_numpy(y), want["y"], 1e-12, f"y at rmax={rmax}, dmax={dmax}")


def test_renorm_needs_running_stats_and_rejects_ghost_batches(backend):
    with pytest.raises(ValueError, match="needs running statistics"):
        xbn.BatchRenorm1d(3, track_running_stats=False, backend=backend.name)
    with pytest.raises(TypeError, match="track_running_stats must be a bool"):
        xbn.BatchRenorm1d(3, track_running_stats=0, backend=backend.name)
    with pytest.raises(ValueError, match="does not take virtual_batch_size"):
        xbn.BatchRenorm(3, virtual_batch_size=4, backend=backend.name)
    bn = xbn.BatchRenorm1d(3, backend=backend.name)
    with pytest.raises(ValueError, match="does not take virtual_batch_size"):
        bn.virtual_batch_size = 2
    assert bn.virtual_batch_size is None
    bn.virtual_batch_size = None


def test_renorm_failed_forward_changes_nothing(backend):
    bn = xbn.BatchRenorm1d(3, backend=backend.name)
    bn(to_backend(backend, _x((4, 3)).astype(np.float32)))
    before = snapshot(bn)
    for bad in (np.ones((1, 3), np.float32), np.ones((4, 2), np.float32), np.ones((4,), np.float32)):
        with pytest.raises(ValueError):
            bn(to_backend(backend, bad))
        assert snapshot(bn) == before


def test_renorm_frozen_and_eval_are_batchnorm_eval(backend):
    rm, rv = np.array([0.5, -0.5]), np.array([2.0, 0.5])
    x, dy = _x((5, 2)), _x((5, 2), seed=1)
    want = ref.forward(x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)["y"]
    want_dx = ref.backward(dy, x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)["dx"]
    for make in (lambda b: b.eval(), lambda b: xbn.freeze_batchnorm(b)):
        bn = xbn.BatchRenorm1d(2, rmax=1.1, dmax=0.1, backend=backend.name, dtype="float64")
        _set(bn, backend, running_mean=rm, running_var=rv)
        make(bn)
        assert_close(to_numpy(bn(to_backend(backend, x))), want, 1e-12, "y")
        assert_close(to_numpy(bn.backward(to_backend(backend, dy))), want_dx, 1e-12, "dx")
        assert bn.num_batches_tracked == 0


def test_renorm_state_copies_and_repr(backend):
    bn = xbn.BatchRenorm2d(3, rmax=2.5, dmax=0.5, backend=backend.name)
    bn(to_backend(backend, _x((2, 3, 2, 2)).astype(np.float32)))
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert repr(bn) == (
        "BatchRenorm2d(3, axis=1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        f"rmax=2.5, dmax=0.5, backend={backend.name!r})"
    )
    for twin in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(twin) is xbn.BatchRenorm2d and (twin.rmax, twin.dmax) == (2.5, 0.5)
        assert snapshot(twin) == snapshot(bn)
    other = xbn.BatchRenorm2d(3, backend=backend.name)
    other.load_state_dict(bn.state_dict())
    assert snapshot(other) == snapshot(bn)


def test_renorm_state_dict_loads_into_torch_batchnorm_with_equal_eval(backend):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    bn = xbn.BatchRenorm1d(4, backend=backend.name)
    for s in range(3):
        bn(to_backend(backend, _x((6, 4), seed=s).astype(np.float32)))
    tbn = torch.nn.BatchNorm1d(4).eval()
    tbn.load_state_dict({k: torch.as_tensor(to_numpy(v)) for k, v in bn.state_dict().items()}, strict=True)
    x = _x((5, 4), seed=9).astype(np.float32)
    with torch.no_grad():
        want = tbn(torch.as_tensor(x)).numpy()
    assert_close(to_numpy(bn.eval()(to_backend(backend, x))), want, 1e-6)


# -- LazyBatchNorm ---------------------------------------------------------------------------------

LAZY = [
    (xbn.LazyBatchNorm1d, {}, xbn.BatchNorm1d, {}, (6, 3)),
    (xbn.LazyBatchNorm1d, {}, xbn.BatchNorm1d, {}, (4, 5, 3)),
    (xbn.LazyBatchNorm2d, {}, xbn.BatchNorm2d, {}, (2, 4, 3, 3)),
    (xbn.LazyBatchNorm3d, {}, xbn.BatchNorm3d, {}, (2, 2, 3, 2, 2)),
    (xbn.LazyBatchNorm, {"axis": -1}, xbn.BatchNorm, {"axis": -1}, (2, 3, 5)),
]
LAZY_IDS = ["1d-NC", "1d-NCL", "2d", "3d", "axis-1"]


def _raises_uninitialized(fn, what):
    with pytest.raises(UninitializedError, match=f"no {what} before its first input.*run one forward first"):
        fn()


def test_lazy_has_no_arrays_before_its_first_input(backend):
    bn = xbn.LazyBatchNorm1d(backend=backend.name)
    assert bn.num_features is None and isinstance(bn, xbn.BatchNorm)
    _raises_uninitialized(bn.parameters, "parameters")
    _raises_uninitialized(lambda: list(bn.named_parameters()), "parameters")
    _raises_uninitialized(lambda: list(bn.named_buffers()), "buffers")
    _raises_uninitialized(bn.state_dict, "state to save")
    _raises_uninitialized(lambda: xbn.optim.SGD(bn.parameters(), lr=0.1), "parameters")
    for name in ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked"):
        with pytest.raises(AttributeError, match=f"no {name} before its first input"):
            getattr(bn, name)
        assert not hasattr(bn, name)
    with pytest.raises(xbn.BackwardBeforeForwardError):
        bn.backward(to_backend(backend, np.ones((2, 3), np.float32)))
    bn.zero_grad()  # nothing to clear


@pytest.mark.parametrize("lazy_cls,kw,cls,cls_kw,shape", LAZY, ids=LAZY_IDS)
def test_lazy_becomes_the_equivalent_batchnorm(backend, lazy_cls, kw, cls, cls_kw, shape):
    lazy = lazy_cls(**kw, momentum=None, eps=1e-3, backend=backend.name, dtype="float64")
    c = shape[kw.get("axis", 1)]
    plain = cls(c, **cls_kw, momentum=None, eps=1e-3, backend=backend.name, dtype="float64")
    for step in range(2):
        x, dy = to_backend(backend, _x(shape, seed=step)), to_backend(backend, _x(shape, seed=7 + step))
        ys = [to_numpy(m(x)) for m in (lazy, plain)]
        dxs = [to_numpy(m.backward(dy)) for m in (lazy, plain)]
        np.testing.assert_array_equal(ys[0], ys[1])
        np.testing.assert_array_equal(dxs[0], dxs[1])
        assert type(lazy) is cls and lazy.num_features == c
        assert snapshot(lazy) == snapshot(plain)
    assert repr(lazy) == repr(plain)
    assert list(lazy.state_dict()) == list(plain.state_dict())
    opt = xbn.optim.SGD(lazy.parameters(), lr=0.1)
    opt.step()
    assert to_numpy(lazy.weight.data).shape == (c,)


def test_lazy_keeps_its_options_mode_and_dtype(backend):
    bn = xbn.LazyBatchNorm1d(
        eps=1e-2, momentum=0.3, affine=False, virtual_batch_size=2, backend=backend.name, dtype="float64"
    ).eval()
    bn.momentum = 0.5  # options are attributes, and the layer is built from their current values
    x = _x((4, 3))
    y = bn(to_backend(backend, x))
    assert type(bn) is xbn.BatchNorm1d and bn.training is False
    assert (bn.eps, bn.momentum, bn.affine, bn.virtual_batch_size) == (1e-2, 0.5, False, 2)
    assert bn.dtype == backend.xp.float64 and bn.weight is None
    # eval before any training: the initial running statistics, 0 and 1
    assert_close(to_numpy(y), x / np.sqrt(1 + 1e-2), 1e-12, "eval y")
    assert bn.num_batches_tracked == 0
    untracked = xbn.LazyBatchNorm2d(track_running_stats=False, backend=backend.name)
    untracked(to_backend(backend, _x((2, 3, 2, 2)).astype(np.float32)))
    assert untracked.running_mean is None and untracked.num_batches_tracked == 0
    assert set(untracked.state_dict()) == {"weight", "bias"}


def test_lazy_checks_its_options_when_made(backend):
    with pytest.raises(ValueError, match="eps must be"):
        xbn.LazyBatchNorm1d(eps=0.0, backend=backend.name)
    with pytest.raises(ValueError, match="frozen=True needs running statistics"):
        xbn.LazyBatchNorm(frozen=True, track_running_stats=False, backend=backend.name)
    with pytest.raises(ValueError, match="virtual_batch_size splits axis 0"):
        xbn.LazyBatchNorm(axis=0, virtual_batch_size=2, backend=backend.name)
    with pytest.raises(TypeError):
        xbn.LazyBatchNorm1d(3, backend=backend.name)  # no num_features: it comes from the input


@pytest.mark.parametrize(
    "make_bad,err,match",
    [
        (lambda b: to_backend(b, np.ones((4,), np.float32)), ValueError, "expected 2-D or 3-D input"),
        (lambda b: to_backend(b, np.ones((4, 3, 2, 2), np.float32)), ValueError, "expected 2-D or 3-D input"),
        (lambda b: to_backend(b, np.ones((1, 3), np.float32)), ValueError, "more than 1 value per channel"),
        (lambda b: to_backend(b, np.ones((4, 0), np.float32)), ValueError, "has size 0"),
        (lambda b: to_backend(b, np.ones((4, 3), np.int32)), TypeError, "real floating dtype"),
        (lambda b: [[1.0, 2.0], [3.0, 4.0]], TypeError, "must be an array of the layer's backend"),
    ],
)
def test_a_failed_first_forward_leaves_it_lazy(backend, make_bad, err, match):
    bn = xbn.LazyBatchNorm1d(backend=backend.name)
    with pytest.raises(err, match=match):
        bn(make_bad(backend))
    assert type(bn) is xbn.LazyBatchNorm1d and bn.num_features is None
    _raises_uninitialized(bn.parameters, "parameters")
    bn(to_backend(backend, _x((4, 5)).astype(np.float32)))
    assert type(bn) is xbn.BatchNorm1d and bn.num_features == 5 and bn.num_batches_tracked == 1


def test_lazy_load_state_dict_takes_num_features_from_the_state(backend):
    src = xbn.BatchNorm1d(4, momentum=0.5, backend=backend.name)
    for s in range(2):
        src(to_backend(backend, _x((5, 4), seed=s).astype(np.float32)))
    bn = xbn.LazyBatchNorm1d(momentum=0.5, backend=backend.name).eval()
    assert bn.load_state_dict(src.state_dict()) == ([], [])
    assert type(bn) is xbn.BatchNorm1d and bn.num_features == 4 and bn.training is False
    assert snapshot(bn.train()) == snapshot(src)
    # from host arrays (a converted torch state_dict), into a lazy layer inside a model
    model = xbn.nn.Sequential(
        xbn.nn.Linear(3, 4, backend=backend.name, seed=0), xbn.LazyBatchNorm1d(backend=backend.name)
    )
    sd = {
        "0." + k: to_numpy(v)
        for k, v in xbn.nn.Linear(3, 4, backend=backend.name, seed=1).state_dict().items()
    }
    sd.update({"1." + k: to_numpy(v) for k, v in src.state_dict().items()})
    model.load_state_dict(sd)
    assert type(model[1]) is xbn.BatchNorm1d and snapshot(model[1]) == snapshot(src)


def test_lazy_load_state_dict_failures_leave_it_lazy(backend):
    good = {k: to_numpy(v) for k, v in xbn.BatchNorm1d(4, backend=backend.name).state_dict().items()}
    bad_cases = [
        ({k: v for k, v in good.items() if k != "bias"}, ValueError, "missing"),
        ({**good, "extra": np.zeros(4)}, ValueError, "unexpected"),
        (
            {**good, "running_mean": np.zeros(5, np.float32)},
            ValueError,
            r"running_mean must have shape \(4,\)",
        ),
        (
            {**good, "weight": np.zeros((4, 1), np.float32)},
            ValueError,
            "1-D array with one value per channel",
        ),
        ({**good, "weight": np.zeros(0, np.float32)}, ValueError, "1-D array with one value per channel"),
        ({**good, "running_var": np.zeros(4, np.int64)}, TypeError, "real floating dtype"),
        ({**good, "num_batches_tracked": np.array(-1)}, ValueError, "num_batches_tracked must be >= 0"),
    ]
    bn = xbn.LazyBatchNorm1d(backend=backend.name)
    for sd, err, match in bad_cases:
        with pytest.raises(err, match=match):
            bn.load_state_dict(sd)
        assert type(bn) is xbn.LazyBatchNorm1d and bn.num_features is None
    with pytest.raises(ValueError, match="takes num_features from a per-channel entry"):
        bn.load_state_dict({"num_batches_tracked": np.array(3)}, strict=False)
    assert type(bn) is xbn.LazyBatchNorm1d
    # strict=False with some entries: C from them, the rest as a new layer has them
    missing = bn.load_state_dict({"running_mean": np.arange(3.0)}, strict=False).missing_keys
    assert missing == ["weight", "bias", "running_var", "num_batches_tracked"]
    assert type(bn) is xbn.BatchNorm1d and bn.num_features == 3
    np.testing.assert_array_equal(to_numpy(bn.running_mean), np.arange(3.0, dtype=np.float32))
    np.testing.assert_array_equal(to_numpy(bn.running_var), np.ones(3, np.float32))


def test_lazy_copies_pickles_and_repr_before_and_after(backend):
    bn = xbn.LazyBatchNorm2d(momentum=0.2, frozen=False, backend=backend.name)
    want_repr = (
        "LazyBatchNorm2d(axis=1, eps=1e-05, momentum=0.2, affine=True, track_running_stats=True, "
        f"backend={backend.name!r})"
    )
    assert repr(bn) == want_repr
    x = to_backend(backend, _x((2, 3, 2, 2)).astype(np.float32))
    for twin in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(twin) is xbn.LazyBatchNorm2d and repr(twin) == want_repr
        twin(x)
        assert type(twin) is xbn.BatchNorm2d and twin.num_features == 3
    assert type(bn) is xbn.LazyBatchNorm2d  # the copies became real, the original did not
    bn(x)
    for twin in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(twin) is xbn.BatchNorm2d and snapshot(twin) == snapshot(bn) and repr(twin) == repr(bn)
    assert repr(bn).startswith("BatchNorm2d(3, axis=1, eps=1e-05, momentum=0.2")


def test_lazy_moves_before_its_first_input(backend):
    bn = xbn.LazyBatchNorm1d(backend="numpy", dtype="float64")
    assert bn.to(backend.name) is bn and bn.backend == backend.name
    y = bn(to_backend(backend, _x((4, 2))))
    assert type(bn) is xbn.BatchNorm1d and bn.weight.data.dtype == backend.xp.float64
    assert_close(to_numpy(y), ref.forward(_x((4, 2)), axis=1)["y"], 1e-12)


def test_lazy_in_a_model(backend):
    model = xbn.nn.Sequential(
        xbn.nn.Linear(3, 5, backend=backend.name, seed=0),
        xbn.LazyBatchNorm1d(backend=backend.name),
        xbn.nn.ReLU(),
    )
    _raises_uninitialized(model.state_dict, "state to save")
    y = model(to_backend(backend, _x((4, 3)).astype(np.float32)))
    model.backward(backend.xp.ones_like(y))
    assert type(model[1]) is xbn.BatchNorm1d
    assert [p.shape for p in model.parameters()] == [(5, 3), (5,), (5,), (5,)]
    assert "1.running_mean" in model.state_dict()


def test_model_parameters_before_a_lazy_layers_first_input_raise(backend):
    model = xbn.nn.Sequential(
        xbn.nn.Linear(3, 5, backend=backend.name, seed=0), xbn.LazyBatchNorm1d(backend=backend.name)
    )
    with pytest.raises(UninitializedError):
        model.parameters()


# -- folding ---------------------------------------------------------------------------------------


def _eval_bn(backend, cls, c, dtype, seed=0, affine=True, **kw):
    bn = cls(c, affine=affine, eps=1e-3, backend=backend.name, dtype=dtype, **kw)
    rng = np.random.default_rng(seed)
    if affine:
        _set(bn, backend, weight=rng.uniform(0.5, 1.5, c), bias=rng.normal(size=c))
    _set(bn, backend, running_mean=rng.normal(size=c), running_var=rng.uniform(0.2, 3.0, c))
    return bn.eval()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_into_linear_equals_linear_then_eval_bn(backend, dtype, tol, has_bias, affine):
    lin = xbn.nn.Linear(6, 4, bias=has_bias, backend=backend.name, dtype=dtype, seed=3)
    bn = _eval_bn(backend, xbn.BatchNorm1d, 4, dtype, affine=affine)
    x = to_backend(backend, _x((7, 6)).astype(dtype))
    want = to_numpy(bn(lin(x)))
    before = snapshot(bn), to_numpy(lin.weight.data)
    w, b = xbn.fold_into_linear(lin.weight.data, None if lin.bias is None else lin.bias.data, bn)
    assert w.dtype == b.dtype == lin.weight.data.dtype and tuple(w.shape) == (4, 6) and tuple(b.shape) == (4,)
    assert (snapshot(bn), to_numpy(lin.weight.data).tobytes()) == (before[0], before[1].tobytes())
    got = to_numpy(backend.xp.matmul(x, backend.xp.matrix_transpose(w)) + b)
    assert_close(got, want, tol, "folded Linear")


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fold_into_conv_equals_conv_then_eval_bn(backend, dtype, tol):
    conv_cls = getattr(xbn.nn, "Conv2d", None)
    if conv_cls is None:
        pytest.skip("xbn.nn.Conv2d is not available")
    for has_bias in (True, False):
        conv = conv_cls(3, 4, 3, padding=1, bias=has_bias, backend=backend.name, dtype=dtype, seed=1)
        bn = _eval_bn(backend, xbn.BatchNorm2d, 4, dtype)
        x = to_backend(backend, _x((2, 3, 5, 5)).astype(dtype))
        want = to_numpy(bn(conv(x)))
        w, b = xbn.fold_into_conv(conv.weight.data, None if conv.bias is None else conv.bias.data, bn)
        folded = conv_cls(3, 4, 3, padding=1, backend=backend.name, dtype=dtype, seed=2)
        folded.weight.data, folded.bias.data = w, b
        assert_close(to_numpy(folded(x)), want, tol, f"folded Conv2d (bias={has_bias})")


@pytest.mark.parametrize("weight_shape", [(4, 3), (6, 2, 3), (6, 1, 3, 3), (4, 2, 2, 3, 1)])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fold_matches_torch_fusion(backend, weight_shape, dtype):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    fusion = pytest.importorskip("torch.nn.utils.fusion")
    c = weight_shape[0]
    bn = _eval_bn(backend, xbn.BatchNorm, c, dtype, seed=4)
    rng = np.random.default_rng(5)
    w, b = rng.normal(size=weight_shape).astype(dtype), rng.normal(size=c).astype(dtype)
    fold = xbn.fold_into_linear if len(weight_shape) == 2 else xbn.fold_into_conv
    got_w, got_b = fold(to_backend(backend, w), to_backend(backend, b), bn)
    t = {
        k: torch.as_tensor(to_numpy(v)).double()
        for k, v in bn.state_dict().items()
        if k != "num_batches_tracked"
    }
    tw, tb = torch.as_tensor(w).double(), torch.as_tensor(b).double()
    if len(weight_shape) == 2:
        want_w, want_b = fusion.fuse_linear_bn_weights(
            tw, tb, t["running_mean"], t["running_var"], bn.eps, t["weight"], t["bias"]
        )
    else:
        want_w, want_b = fusion.fuse_conv_bn_weights(
            tw, tb, t["running_mean"], t["running_var"], bn.eps, t["weight"], t["bias"]
        )
    tol = 1e-12 if dtype == "float64" else 1e-6
    assert_close(to_numpy(got_w), want_w.detach().numpy(), tol, "weight")
    assert_close(to_numpy(got_b), want_b.detach().numpy(), tol, "bias")


def test_fold_keeps_each_dtype_and_computes_in_float64(backend):
    bn = _eval_bn(backend, xbn.BatchNorm1d, 3, "float64")
    w, b = _x((3, 2)), _x((3,), seed=1)
    got_w, got_b = xbn.fold_into_linear(to_backend(backend, w.astype(np.float32)), to_backend(backend, b), bn)
    assert got_w.dtype == backend.xp.float32 and got_b.dtype == backend.xp.float64
    s = to_numpy(bn.weight.data) / np.sqrt(to_numpy(bn.running_var) + bn.eps)
    # float64 work then one rounding: the float32 weight is the correctly rounded product
    np.testing.assert_array_equal(
        to_numpy(got_w), (w.astype(np.float32).astype(np.float64) * s[:, None]).astype(np.float32)
    )
    assert_close(to_numpy(got_b), (b - to_numpy(bn.running_mean)) * s + to_numpy(bn.bias.data), 1e-15)
    _, none_b = xbn.fold_into_linear(to_backend(backend, w.astype(np.float32)), None, bn)
    assert none_b.dtype == backend.xp.float32


def test_fold_a_frozen_bn_in_training_mode(backend):
    """Documented choice: frozen normalizes with running statistics in training too, so it folds."""
    lin = xbn.nn.Linear(3, 2, backend=backend.name, dtype="float64", seed=0)
    bn = xbn.freeze_batchnorm(_eval_bn(backend, xbn.BatchNorm1d, 2, "float64").train())
    x = to_backend(backend, _x((5, 3)))
    want = to_numpy(bn(lin(x)))
    w, b = xbn.fold_into_linear(lin.weight.data, lin.bias.data, bn)
    assert_close(to_numpy(backend.xp.matmul(x, backend.xp.matrix_transpose(w)) + b), want, 1e-12)


def test_fold_errors(backend):
    def ones(shape, dtype=np.float32):
        return to_backend(backend, np.ones(shape, dtype))

    w, b = ones((3, 2)), ones((3,))
    bn = _eval_bn(backend, xbn.BatchNorm1d, 3, "float32")
    training = _eval_bn(backend, xbn.BatchNorm1d, 3, "float32").train()
    untracked = xbn.BatchNorm1d(3, track_running_stats=False, backend=backend.name).eval()
    lazy = xbn.LazyBatchNorm1d(backend=backend.name).eval()
    foreign = [[1.0, 1.0]] * 3 if backend.name == "numpy" else np.ones((3, 2), np.float32)
    linear, conv = xbn.fold_into_linear, xbn.fold_into_conv
    cases = [
        (linear, (w, b, training), ValueError, "training mode.*eval"),
        (linear, (w, b, untracked), ValueError, "no running statistics"),
        (linear, (w, b, lazy), ValueError, "lazy layer.*run one forward first"),
        (linear, (w, b, xbn.nn.Linear(2, 3, backend=backend.name)), TypeError, r"must be an xbn\.BatchNorm"),
        (linear, (foreign, b, bn), TypeError, "must be an array of the layer's backend"),
        (linear, (ones((4, 2)), None, bn), ValueError, "has 4 outputs.*normalizes 3 channels"),
        (
            linear,
            (ones((3, 2, 1)), None, bn),
            ValueError,
            r"Linear weight has shape \(out_features, in_features\)",
        ),
        (conv, (w, None, bn), ValueError, "convolution weight has shape"),
        (linear, (w, ones((4,)), bn), ValueError, r"bias must have shape \(3,\)"),
        (linear, (ones((3, 2), np.int32), None, bn), TypeError, "weight must have a real floating dtype"),
        (linear, (w, ones((3,), np.int32), bn), TypeError, "bias must have a real floating dtype"),
    ]
    states = [snapshot(m) for m in (bn, training, untracked)]
    for fold, args, err, match in cases:
        with pytest.raises(err, match=match):
            fold(*args)
    assert [snapshot(m) for m in (bn, training, untracked)] == states
    assert type(lazy) is xbn.LazyBatchNorm1d


def _mlp(backend, dtype="float64"):
    rng = np.random.default_rng(0)
    kw = dict(backend=backend.name, dtype=dtype)
    return xbn.nn.Sequential(
        xbn.nn.Linear(5, 8, rng=rng, **kw),
        xbn.BatchNorm1d(8, **kw),
        xbn.nn.ReLU(),
        xbn.nn.Sequential(xbn.nn.Linear(8, 6, bias=False, rng=rng, **kw), xbn.BatchRenorm1d(6, **kw)),
        xbn.nn.ReLU(),
        xbn.BatchNorm1d(6, **kw),  # after a ReLU: nothing to fold into, left as it is
        xbn.nn.Linear(6, 3, rng=rng, **kw),
    )


def _train_a_little(model, backend, dtype, shape):
    for s in range(3):
        y = model(to_backend(backend, _x(shape, seed=s).astype(dtype)))
        model.backward(backend.xp.ones_like(y))
    return model.eval()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fold_batchnorm_of_a_model(backend, dtype, tol):
    model = _train_a_little(_mlp(backend, dtype), backend, dtype, (16, 5))
    state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    folded = xbn.fold_batchnorm(model)
    kinds = [type(m).__name__ for m in folded]
    assert kinds == ["Linear", "Identity", "ReLU", "Sequential", "ReLU", "BatchNorm1d", "Linear"]
    assert [type(m).__name__ for m in folded[3]] == ["Linear", "Identity"]
    assert (
        folded[3][0].bias is not None and folded[0].weight.grad is None and folded[3][0].weight.grad is None
    )
    # the other keys stay where they were; the folded BNs' keys are gone, the new bias is in
    keys = list(folded.state_dict())
    assert keys == ["0.weight", "0.bias", "3.0.weight", "3.0.bias"] + [
        k for k in state if k.startswith(("5.", "6."))
    ]
    x = to_backend(backend, _x((9, 5), seed=20).astype(dtype))
    assert_close(to_numpy(folded(x)), to_numpy(model(x)), tol, "folded model")
    # the model is unchanged: same types, same state
    assert [type(m).__name__ for m in model][:2] == ["Linear", "BatchNorm1d"]
    after = {k: to_numpy(v) for k, v in model.state_dict().items()}
    assert list(after) == list(state) and all(np.array_equal(after[k], state[k]) for k in state)
    dy = backend.xp.ones_like(folded(x))
    assert tuple(folded.backward(dy).shape) == (9, 5)  # the folded model still backs through


def test_fold_batchnorm_with_conv2d(backend):
    conv_cls = getattr(xbn.nn, "Conv2d", None)
    if conv_cls is None:
        pytest.skip("xbn.nn.Conv2d is not available")
    kw = dict(backend=backend.name, dtype="float64")
    model = xbn.nn.Sequential(
        conv_cls(2, 4, 3, padding=1, bias=False, seed=0, **kw),
        xbn.BatchNorm2d(4, **kw),
        xbn.nn.ReLU(),
        conv_cls(4, 3, 3, seed=1, **kw),
        xbn.BatchNorm(3, axis=1, **kw),
    )
    model = _train_a_little(model, backend, "float64", (3, 2, 5, 5))
    folded = xbn.fold_batchnorm(model)
    assert [type(m).__name__ for m in folded] == ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity"]
    x = to_backend(backend, _x((2, 2, 5, 5), seed=9))
    assert_close(to_numpy(folded(x)), to_numpy(model(x)), 1e-12, "folded convnet")


def test_fold_batchnorm_matches_torch(backend):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    model = xbn.nn.Sequential(
        xbn.nn.Linear(5, 4, backend=backend.name, seed=0), xbn.BatchNorm1d(4, backend=backend.name)
    )
    model = _train_a_little(model, backend, "float32", (8, 5))
    tmodel = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).eval()
    tmodel.load_state_dict({k: torch.as_tensor(to_numpy(v)) for k, v in model.state_dict().items()})
    tfused = torch.nn.utils.fusion.fuse_linear_bn_eval(tmodel[0], tmodel[1])
    folded = xbn.fold_batchnorm(model)
    assert_close(to_numpy(folded[0].weight.data), tfused.weight.detach().numpy(), 1e-6, "weight")
    assert_close(to_numpy(folded[0].bias.data), tfused.bias.detach().numpy(), 1e-6, "bias")


def test_fold_batchnorm_errors_leave_the_model_alone(backend):
    model = _mlp(backend)
    model.eval()
    model[3][1].train()
    with pytest.raises(ValueError, match=r"BatchNorm '3\.1' is in training mode"):
        xbn.fold_batchnorm(model)
    model[3][1].frozen = True  # frozen in training mode folds (documented)
    folded = xbn.fold_batchnorm(model)
    assert type(folded[3][1]) is xbn.nn.Identity and type(model[3][1]) is xbn.BatchRenorm1d
    shared = xbn.nn.Linear(4, 4, backend=backend.name, seed=0)
    twice = xbn.nn.Sequential(shared, xbn.BatchNorm1d(4, backend=backend.name), shared).eval()
    with pytest.raises(ValueError, match="used more than once"):
        xbn.fold_batchnorm(twice)
    untracked = xbn.nn.Sequential(
        xbn.nn.Linear(4, 4, backend=backend.name, seed=0),
        xbn.BatchNorm1d(4, track_running_stats=False, backend=backend.name),
    )
    with pytest.raises(ValueError, match="no running statistics"):
        xbn.fold_batchnorm(untracked.eval())
    assert type(untracked[1]) is xbn.BatchNorm1d
    with pytest.raises(TypeError, match=r"model must be an xbn\.Module"):
        xbn.fold_batchnorm([model])


def test_fold_batchnorm_leaves_non_matching_pairs(backend):
    kw = dict(backend=backend.name, dtype="float64")
    # a BatchNorm over the last axis of 2-D input is axis 1 too; a BatchNorm2d never follows a Linear
    model = xbn.nn.Sequential(xbn.nn.Linear(3, 4, seed=0, **kw), xbn.BatchNorm(4, axis=-1, **kw)).eval()
    assert type(xbn.fold_batchnorm(model)[1]) is xbn.nn.Identity
    model = xbn.nn.Sequential(xbn.nn.Linear(3, 4, seed=0, **kw), xbn.BatchNorm2d(4, **kw)).eval()
    assert type(xbn.fold_batchnorm(model)[1]) is xbn.BatchNorm2d
    # axis 3 is out of range for the Linear's 2-D output: the model fails, and is left to fail
    model = xbn.nn.Sequential(xbn.nn.Linear(3, 4, seed=0, **kw), xbn.BatchNorm(4, axis=3, **kw)).eval()
    assert type(xbn.fold_batchnorm(model)[1]) is xbn.BatchNorm
    alone = xbn.BatchNorm1d(3, **kw).eval()
    assert type(xbn.fold_batchnorm(alone)) is xbn.BatchNorm1d


# -- Identity --------------------------------------------------------------------------------------


def test_identity(backend):
    layer = xbn.nn.Identity()
    x = to_backend(backend, _x((3, 2)))
    assert layer(x) is x and layer.forward(x, training=False) is x
    dy = to_backend(backend, _x((3, 2), seed=1))
    assert layer.backward(dy) is dy
    with pytest.raises(xbn.BackwardBeforeForwardError):
        layer.backward(dy)
    layer(x)
    with pytest.raises(ValueError, match=r"dy must have the input's shape \(3, 2\)"):
        layer.backward(to_backend(backend, _x((2, 2))))
    with pytest.raises(TypeError, match="training must be a bool"):
        layer(x, training=1)
    assert layer.parameters() == [] and layer.state_dict() == {} and repr(layer) == "Identity()"
    assert "Identity" in xbn.nn.__all__
