"""Ghost batches (BatchNorm(virtual_batch_size=...)) and frozen statistics, and freeze_batchnorm.

Every value is checked against the float64 reference of :mod:`xbn._reference` applied to each
ghost batch on its own (a ghost batch is a separate BatchNorm), gradients also by central
finite differences in float64, and against torch where it is installed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import xbn
from xbn import _reference as ref
from xbn._reference import assert_close, to_numpy

from reference import check_layer_gradients, snapshot, to_backend

# (class, kwargs, shape, channel axis); N = 10 with ghost batches of 4 gives groups 4, 4 and 2
LAYOUTS = [
    (xbn.BatchNorm1d, {}, (10, 3), 1),
    (xbn.BatchNorm1d, {}, (10, 3, 2), 1),
    (xbn.BatchNorm2d, {}, (10, 2, 2, 3), 1),
    (xbn.BatchNorm, {"axis": -1}, (10, 2, 3, 3), -1),
    (xbn.BatchNorm3d, {}, (10, 2, 2, 1, 2), 1),
]
IDS = ["1d-NC", "1d-NCL", "2d-NCHW", "NHWC", "3d"]
FD_TOL = 1e-6


def _x(shape, seed=0, loc=0.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


def _groups(n, size):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _ghost_reference(x, dy, *, axis, size, weight, bias, eps):
    """y, dx, dgamma, dbeta of separate BatchNorms on each group of ``size`` samples."""
    y, dx = np.empty_like(x), np.empty_like(x)
    dgamma, dbeta = 0.0, 0.0
    for s, e in _groups(x.shape[0], size):
        f = ref.forward(x[s:e], axis=axis, weight=weight, bias=bias, eps=eps)
        g = ref.backward(dy[s:e], x[s:e], axis=axis, weight=weight, eps=eps)
        y[s:e], dx[s:e] = f["y"], g["dx"]
        dgamma, dbeta = dgamma + g["dgamma"], dbeta + g["dbeta"]
    return y, dx, dgamma, dbeta


def _ghost_running(rm, rv, x, *, axis, size, momentum):
    """Running statistics after one call: the mean over groups of each group's mean and unbiased var."""
    means, uvars = [], []
    for s, e in _groups(x.shape[0], size):
        mean, var = ref.batch_mean_var(x[s:e], axis)
        count = x[s:e].size // x.shape[axis]
        means.append(mean)
        uvars.append(var * count / (count - 1))
    new_rm = (1 - momentum) * rm + momentum * np.mean(means, axis=0)
    new_rv = (1 - momentum) * rv + momentum * np.mean(uvars, axis=0)
    return new_rm, new_rv


def _set(layer, backend, **values):
    for name, v in values.items():
        arr = backend.xp.asarray(np.asarray(v), dtype=layer.dtype, device=backend.device)
        if name in ("weight", "bias"):
            getattr(layer, name).data = arr
        else:
            setattr(layer, name, arr)


# -- ghost batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw,shape,axis", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batches_are_separate_batchnorms(backend, cls, kw, shape, axis, momentum):
    """Three calls: y and dx per group, dgamma/dbeta summed, running stats moved once per call."""
    c = shape[axis]
    bn = cls(
        c, **kw, virtual_batch_size=4, momentum=momentum, eps=1e-3, backend=backend.name, dtype="float64"
    )
    rng = np.random.default_rng(3)
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    _set(bn, backend, weight=w, bias=b)
    rm, rv = np.zeros(c), np.ones(c)
    for step in range(3):
        x, dy = _x(shape, seed=step, loc=step), _x(shape, seed=10 + step)
        y = bn(to_backend(backend, x))
        dx = bn.backward(to_backend(backend, dy))
        want_y, want_dx, want_dg, want_db = _ghost_reference(
            x, dy, axis=axis, size=4, weight=w, bias=b, eps=1e-3
        )
        assert_close(to_numpy(y), want_y, 1e-12, "y")
        assert_close(to_numpy(dx), want_dx, 1e-11, "dx")
        assert_close(to_numpy(bn.weight.grad), want_dg, 1e-11, "dgamma")
        assert_close(to_numpy(bn.bias.grad), want_db, 1e-11, "dbeta")
        m = 1.0 / (step + 1) if momentum is None else momentum
        rm, rv = _ghost_running(rm, rv, x, axis=axis, size=4, momentum=m)
        assert_close(to_numpy(bn.running_mean), rm, 1e-12, "running_mean")
        assert_close(to_numpy(bn.running_var), rv, 1e-12, "running_var")
        assert bn.num_batches_tracked == step + 1  # once per call, not per group
        bn.zero_grad()


def test_ghost_groups_that_divide_the_batch(backend):
    x, dy = _x((12, 3)), _x((12, 3), seed=1)
    bn = xbn.BatchNorm1d(3, virtual_batch_size=3, backend=backend.name, dtype="float64")
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))
    want_y, want_dx, want_dg, want_db = _ghost_reference(
        x, dy, axis=1, size=3, weight=None, bias=None, eps=1e-5
    )
    assert_close(to_numpy(y), want_y, 1e-12, "y")
    assert_close(to_numpy(dx), want_dx, 1e-11, "dx")
    assert_close(to_numpy(bn.weight.grad), want_dg, 1e-11, "dgamma")


@pytest.mark.parametrize("n", [3, 4])
def test_batch_no_larger_than_a_ghost_batch_is_plain_batchnorm(backend, n):
    x, dy = _x((n, 3)), _x((n, 3), seed=1)
    ghost = xbn.BatchNorm1d(3, virtual_batch_size=4, backend=backend.name, dtype="float64")
    plain = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    for bn in (ghost, plain):
        bn(to_backend(backend, x))
        bn.backward(to_backend(backend, dy))
    assert snapshot(ghost) == snapshot(plain)


def test_ghost_float32(backend):
    x, dy = _x((10, 4, 3)), _x((10, 4, 3), seed=1)
    bn = xbn.BatchNorm1d(4, virtual_batch_size=3, backend=backend.name)
    y = bn(to_backend(backend, x.astype(np.float32)))
    dx = bn.backward(to_backend(backend, dy.astype(np.float32)))
    assert y.dtype == backend.xp.float32 and dx.dtype == backend.xp.float32
    x32, dy32 = (a.astype(np.float32).astype(np.float64) for a in (x, dy))
    want_y, want_dx, want_dg, _ = _ghost_reference(
        x32, dy32, axis=1, size=3, weight=None, bias=None, eps=1e-5
    )
    assert_close(to_numpy(y), want_y, 1e-5, "y")
    assert_close(to_numpy(dx), want_dx, 1e-4, "dx")
    assert_close(to_numpy(bn.weight.grad), want_dg, 1e-4, "dgamma")


def test_ghost_eval_uses_running_stats(backend):
    bn = xbn.BatchNorm1d(3, virtual_batch_size=2, backend=backend.name, dtype="float64")
    rm, rv = np.array([1.0, -1.0, 0.5]), np.array([2.0, 0.5, 1.0])
    _set(bn, backend, running_mean=rm, running_var=rv)
    bn.eval()
    x = _x((6, 3))
    y = bn(to_backend(backend, x))
    want = ref.forward(x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)["y"]
    assert_close(to_numpy(y), want, 1e-12, "eval y")
    assert bn.num_batches_tracked == 0


@pytest.mark.parametrize("n,size", [(9, 4), (5, 1)])
def test_ghost_batch_with_one_value_per_channel_raises_and_changes_nothing(backend, n, size):
    bn = xbn.BatchNorm1d(3, virtual_batch_size=size, backend=backend.name)
    before = snapshot(bn)
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training.*ghost batch"
    ):
        bn(to_backend(backend, _x((n, 3)).astype(np.float32)))
    assert snapshot(bn) == before
    # with spatial values a one-sample ghost batch has enough values per channel
    bn(to_backend(backend, _x((n, 3, 2)).astype(np.float32)))
    assert bn.num_batches_tracked == 1


def test_ghost_batches_with_channel_axis_zero_are_an_error(backend):
    with pytest.raises(ValueError, match="virtual_batch_size splits axis 0"):
        xbn.BatchNorm(3, axis=0, virtual_batch_size=2, backend=backend.name)
    # an axis that only turns out to be 0 for the input's rank: an error at the call, no change
    bn = xbn.BatchNorm(3, axis=-2, virtual_batch_size=2, backend=backend.name)
    before = snapshot(bn)
    with pytest.raises(ValueError, match="virtual_batch_size splits axis 0"):
        bn(to_backend(backend, _x((3, 4)).astype(np.float32)))
    assert snapshot(bn) == before
    bn(to_backend(backend, _x((4, 3, 2)).astype(np.float32)))  # axis -2 is 1 here: fine
    assert bn.num_batches_tracked == 1


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_virtual_batch_size_validation(backend, bad, err):
    with pytest.raises(err, match="virtual_batch_size"):
        xbn.BatchNorm1d(3, virtual_batch_size=bad, backend=backend.name)


def test_ghost_constant_channel_is_exactly_beta(backend):
    """A channel constant within each ghost batch (another constant per batch) gives exactly beta."""
    x = _x((8, 3)).astype(np.float32)
    x[:4, 1], x[4:, 1] = 1234.567, -0.1
    bn = xbn.BatchNorm1d(3, virtual_batch_size=4, backend=backend.name)
    _set(bn, backend, weight=[2.0, 3.0, 0.5], bias=[0.25, -1.75, 0.5])
    y = to_numpy(bn(to_backend(backend, x)))
    np.testing.assert_array_equal(y[:, 1], np.full(8, -1.75, np.float32))
    w, b = [2.0, 3.0, 0.5], [0.25, -1.75, 0.5]
    want = _ghost_reference(x.astype(np.float64), x, axis=1, size=4, weight=w, bias=b, eps=1e-5)[0]
    assert_close(y, want, 1e-5, "y")


def test_ghost_finite_differences(backend):
    shape, size = (7, 2, 3), 3  # groups 3, 3 and 1 sample (3 values per channel)
    rng = np.random.default_rng(5)
    x, r = rng.normal(0.3, 1.5, size=shape), rng.normal(size=shape)
    w, b = rng.uniform(0.5, 1.5, 2), rng.normal(size=2)
    bn = xbn.BatchNorm1d(2, virtual_batch_size=size, eps=1e-3, backend=backend.name, dtype="float64")
    check_layer_gradients(bn, backend, x, r, w, b, FD_TOL)


def test_ghost_batches_match_torch_batchnorms_per_group(backend):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    shape, size = (10, 3, 4), 4
    x, dy = _x(shape), _x(shape, seed=1)
    bn = xbn.BatchNorm1d(3, virtual_batch_size=size, backend=backend.name, dtype="float64")
    y = to_numpy(bn(to_backend(backend, x)))
    dx = to_numpy(bn.backward(to_backend(backend, dy)))
    tbn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    dgamma = 0.0
    for s, e in _groups(shape[0], size):
        tx = torch.tensor(x[s:e], requires_grad=True)
        ty = tbn(tx)
        ty.backward(torch.tensor(dy[s:e]))
        assert_close(y[s:e], ty.detach().numpy(), 1e-12, f"y[{s}:{e}]")
        assert_close(dx[s:e], tx.grad.numpy(), 1e-11, f"dx[{s}:{e}]")
        dgamma = tbn.weight.grad.numpy().copy()  # torch accumulates across the groups
    assert_close(to_numpy(bn.weight.grad), dgamma, 1e-11, "dgamma")


def test_ghost_state_survives_copies_and_repr(backend):
    bn = xbn.BatchNorm1d(3, virtual_batch_size=4, backend=backend.name)
    assert "virtual_batch_size=4" in repr(bn)
    assert copy.deepcopy(bn).virtual_batch_size == 4
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


# -- frozen statistics ------------------------------------------------------------------------------


def _frozen_layer(backend, c=3, **kw):
    bn = xbn.BatchNorm1d(c, frozen=True, eps=1e-3, backend=backend.name, dtype="float64", **kw)
    rng = np.random.default_rng(2)
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    _set(bn, backend, weight=w, bias=b, running_mean=rm, running_var=rv)
    return bn, w, b, rm, rv


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (1, 3)])
def test_frozen_normalizes_with_running_stats_in_training(backend, shape):
    bn, w, b, rm, rv = _frozen_layer(backend)
    assert bn.training and bn.frozen
    x, dy = _x(shape), _x(shape, seed=1)
    stats = dict(axis=1, eps=1e-3, running_mean=rm, running_var=rv, use_batch_stats=False)
    for _ in range(2):
        y = bn(to_backend(backend, x))
        dx = bn.backward(to_backend(backend, dy))
    assert_close(to_numpy(y), ref.forward(x, weight=w, bias=b, **stats)["y"], 1e-12, "y")
    g = ref.backward(dy, x, weight=w, **stats)
    assert_close(to_numpy(dx), g["dx"], 1e-12, "dx")  # eval-mode dx: the statistics are constants
    assert_close(to_numpy(bn.weight.grad), 2 * g["dgamma"], 1e-11, "dgamma")
    assert_close(to_numpy(bn.bias.grad), 2 * g["dbeta"], 1e-11, "dbeta")
    # never updated, whatever the batch (one value per channel included)
    np.testing.assert_array_equal(to_numpy(bn.running_mean), rm)
    np.testing.assert_array_equal(to_numpy(bn.running_var), rv)
    assert bn.num_batches_tracked == 0


def test_frozen_survives_train_and_matches_eval(backend):
    bn, *_ = _frozen_layer(backend)
    model = xbn.nn.Sequential(xbn.nn.Linear(4, 3, backend=backend.name, dtype="float64", seed=0), bn)
    model.train()
    assert bn.frozen and bn.training
    x = to_backend(backend, _x((5, 4)))
    y_train = to_numpy(model(x))
    y_eval = to_numpy(model.eval()(x))
    np.testing.assert_array_equal(y_train, y_eval)
    model.train()
    assert bn.frozen
    assert "frozen=True" in repr(bn)
    assert copy.deepcopy(bn).frozen


def test_unfreeze_trains_again(backend):
    bn, *_ = _frozen_layer(backend)
    bn.frozen = False
    x = _x((6, 3))
    y = bn(to_backend(backend, x))
    want = ref.forward(x, axis=1, weight=to_numpy(bn.weight.data), bias=to_numpy(bn.bias.data), eps=1e-3)
    assert_close(to_numpy(y), want["y"], 1e-12)
    assert bn.num_batches_tracked == 1


def test_frozen_needs_running_stats(backend):
    with pytest.raises(ValueError, match="frozen=True needs running statistics"):
        xbn.BatchNorm1d(3, frozen=True, track_running_stats=False, backend=backend.name)
    bn = xbn.BatchNorm1d(3, track_running_stats=False, backend=backend.name)
    with pytest.raises(ValueError, match="frozen=True needs running statistics"):
        bn.frozen = True
    assert bn.frozen is False
    bn.frozen = False  # unfreezing is always fine
    with pytest.raises(TypeError, match="frozen must be a bool"):
        xbn.BatchNorm1d(3, frozen=1, backend=backend.name)
    tracked = xbn.BatchNorm1d(3, backend=backend.name)
    with pytest.raises(TypeError, match="frozen must be a bool"):
        tracked.frozen = "yes"
    assert tracked.frozen is False


def test_frozen_finite_differences(backend):
    bn, w, b, rm, rv = _frozen_layer(backend, c=2)
    shape = (3, 2, 2)
    rng = np.random.default_rng(8)
    x, r = rng.normal(size=shape), rng.normal(size=shape)
    check_layer_gradients(bn, backend, x, r, w, b, FD_TOL)
    assert bn.num_batches_tracked == 0


def test_frozen_matches_torch_eval_with_trainable_affine(backend):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    bn, w, b, rm, rv = _frozen_layer(backend)
    tbn = torch.nn.BatchNorm1d(3, eps=1e-3, dtype=torch.float64).eval()  # torch's way to freeze
    tbn.load_state_dict({k: torch.as_tensor(to_numpy(v)) for k, v in bn.state_dict().items()})
    x, dy = _x((6, 3)), _x((6, 3), seed=1)
    tx = torch.tensor(x, requires_grad=True)
    ty = tbn(tx)
    ty.backward(torch.tensor(dy))
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))
    assert_close(to_numpy(y), ty.detach().numpy(), 1e-12, "y")
    assert_close(to_numpy(dx), tx.grad.numpy(), 1e-12, "dx")
    assert_close(to_numpy(bn.weight.grad), tbn.weight.grad.numpy(), 1e-11, "dgamma")
    assert_close(to_numpy(bn.bias.grad), tbn.bias.grad.numpy(), 1e-11, "dbeta")


# -- freeze_batchnorm -------------------------------------------------------------------------------


def _tree(backend):
    inner = xbn.nn.Sequential(xbn.BatchRenorm1d(4, backend=backend.name), xbn.nn.ReLU())
    return xbn.nn.Sequential(
        xbn.nn.Linear(3, 4, backend=backend.name, seed=0),
        xbn.BatchNorm1d(4, backend=backend.name),
        inner,
        xbn.LazyBatchNorm1d(backend=backend.name),
    )


def test_freeze_batchnorm_sets_every_batchnorm_and_returns_the_model(backend):
    model = _tree(backend)
    assert xbn.freeze_batchnorm(model) is model
    bns = [m for m in model.modules() if isinstance(m, xbn.BatchNorm)]
    assert len(bns) == 3 and all(m.frozen for m in bns)
    model.train()
    assert all(m.frozen for m in bns)
    # the lazy layer keeps the setting when it becomes a BatchNorm1d
    x = to_backend(backend, _x((5, 3)).astype(np.float32))
    model(x)
    assert type(model[3]) is xbn.BatchNorm1d and model[3].frozen
    assert all(m.num_batches_tracked == 0 for m in model.modules() if isinstance(m, xbn.BatchNorm))
    assert xbn.freeze_batchnorm(model, frozen=False) is model
    assert not any(m.frozen for m in model.modules() if isinstance(m, xbn.BatchNorm))


def test_freeze_batchnorm_on_a_single_layer(backend):
    bn = xbn.BatchNorm2d(3, backend=backend.name)
    assert xbn.freeze_batchnorm(bn) is bn and bn.frozen


def test_freeze_batchnorm_is_all_or_nothing(backend):
    model = xbn.nn.Sequential(
        xbn.BatchNorm1d(3, backend=backend.name),
        xbn.nn.Sequential(xbn.BatchNorm1d(3, track_running_stats=False, backend=backend.name)),
    )
    with pytest.raises(ValueError, match=r"without running statistics.*\['1.0'\]"):
        xbn.freeze_batchnorm(model)
    assert not model[0].frozen
    xbn.freeze_batchnorm(model, frozen=False)  # unfreezing needs no running statistics


def test_freeze_batchnorm_argument_checks(backend):
    with pytest.raises(TypeError, match=r"model must be an xbn\.Module"):
        xbn.freeze_batchnorm([xbn.BatchNorm1d(3, backend=backend.name)])
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    with pytest.raises(TypeError, match="frozen must be a bool"):
        xbn.freeze_batchnorm(bn, frozen=1)
    with pytest.raises(TypeError):
        xbn.freeze_batchnorm(bn, True)  # keyword-only
    assert not bn.frozen
