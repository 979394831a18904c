"""Layer semantics (docs/semantics.md): defaults, modes, running statistics, state, gradients."""

from __future__ import annotations

import numpy as np
import pytest

import xbn

import reference as ref
from reference import assert_close, snapshot, to_backend, to_numpy

LAYOUTS = [
    # (class, kwargs, shape, channel axis)
    (xbn.BatchNorm1d, {}, (8, 3), 1),
    (xbn.BatchNorm1d, {}, (4, 3, 5), 1),
    (xbn.BatchNorm2d, {}, (2, 3, 4, 5), 1),
    (xbn.BatchNorm, {"axis": -1}, (2, 4, 5, 3), -1),
    (xbn.BatchNorm3d, {}, (2, 3, 2, 3, 2), 1),
]
LAYOUT_IDS = ["1d-NC", "1d-NCL", "2d-NCHW", "NHWC", "3d"]


def _x(shape, seed=0, dtype=np.float64, loc=0.5, scale=2.0):
    return ref.rand(np.random.default_rng(seed), shape, dtype, loc=loc, scale=scale)


def _set(layer, backend, **values):
    """Set parameters / running stats of ``layer`` from NumPy arrays."""
    for name, v in values.items():
        arr = backend.xp.asarray(np.asarray(v), dtype=layer.dtype, device=backend.device)
        if name in ("weight", "bias"):
            getattr(layer, name).data = arr
        else:
            setattr(layer, name, arr)


# -- defaults and construction ------------------------------------------------------------------


def test_defaults(backend):
    bn = xbn.BatchNorm2d(4, backend=backend.name)
    xp = backend.xp
    assert bn.eps == 1e-5 and bn.momentum == 0.1
    assert bn.affine is True and bn.track_running_stats is True and bn.training is True
    assert bn.axis == 1 and bn.num_features == 4
    assert bn.backend == backend.name and bn.xp is backend.xp
    assert bn.dtype == xp.float32
    np.testing.assert_array_equal(to_numpy(bn.weight.data), np.ones(4, np.float32))
    np.testing.assert_array_equal(to_numpy(bn.bias.data), np.zeros(4, np.float32))
    np.testing.assert_array_equal(to_numpy(bn.running_mean), np.zeros(4, np.float32))
    np.testing.assert_array_equal(to_numpy(bn.running_var), np.ones(4, np.float32))
    for a in (bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var):
        assert a.dtype == xp.float32 and tuple(a.shape) == (4,)
    assert bn.num_batches_tracked == 0 and isinstance(bn.num_batches_tracked, int)
    assert bn.weight.grad is None and bn.bias.grad is None
    assert "BatchNorm2d(4" in repr(bn)


def test_backend_given_as_namespace(backend):
    bn = xbn.BatchNorm1d(2, backend=backend.xp)
    assert bn.backend == backend.name and bn.xp is backend.xp
    x = to_backend(backend, _x((4, 2)))
    assert tuple(bn(x).shape) == (4, 2)


def test_float64_layer(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    assert bn.dtype == backend.xp.float64
    for a in (bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var):
        assert a.dtype == backend.xp.float64


def test_mode_switches_return_self(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    assert bn.train(True) is bn and bn.training is True


def test_gamma_beta_are_weight_bias(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    assert bn.gamma is bn.weight and bn.beta is bn.bias
    assert bn.parameters() == [bn.weight, bn.bias]
    assert all(isinstance(p, xbn.Parameter) for p in bn.parameters())


def test_affine_false(backend):
    bn = xbn.BatchNorm1d(3, affine=False, backend=backend.name)
    assert bn.weight is None and bn.bias is None and bn.gamma is None and bn.beta is None
    assert bn.parameters() == []
    x = _x((6, 3))
    y = bn(to_backend(backend, x))
    assert_close(to_numpy(y), ref.forward(x, axis=1)["y"], 1e-5, "y")
    dy = _x((6, 3), seed=1)
    dx = bn.backward(to_backend(backend, dy))
    assert_close(to_numpy(dx), ref.backward(dy, x, axis=1)["dx"], 1e-5, "dx")
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


# -- training and eval against the reference ----------------------------------------------------


@pytest.mark.parametrize("cls,kw,shape,axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_steps_match_reference(backend, cls, kw, shape, axis, momentum):
    """Three training steps (forward, backward, running stats), then an eval step, in float64."""
    c = shape[axis]
    bn = cls(c, **kw, momentum=momentum, eps=1e-3, backend=backend.name, dtype="float64")
    rng = np.random.default_rng(7)
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    _set(bn, backend, weight=w, bias=b)
    rm, rv, nbt = np.zeros(c), np.ones(c), 0
    for step in range(3):
        x = _x(shape, seed=step, loc=step, scale=1.0 + step)
        dy = _x(shape, seed=10 + step)
        y = bn(to_backend(backend, x))
        dx = bn.backward(to_backend(backend, dy))
        f = ref.forward(x, axis=axis, weight=w, bias=b, eps=1e-3)
        g = ref.backward(dy, x, axis=axis, weight=w, eps=1e-3)
        rm, rv, nbt = ref.update_running(rm, rv, x, axis=axis, momentum=momentum, num_batches_tracked=nbt)
        assert_close(to_numpy(y), f["y"], 1e-12, "y")
        assert_close(to_numpy(dx), g["dx"], 1e-11, "dx")
        assert_close(to_numpy(bn.weight.grad), g["dgamma"], 1e-11, "dgamma")
        assert_close(to_numpy(bn.bias.grad), g["dbeta"], 1e-11, "dbeta")
        assert_close(to_numpy(bn.running_mean), rm, 1e-12, "running_mean")
        assert_close(to_numpy(bn.running_var), rv, 1e-12, "running_var")
        assert bn.num_batches_tracked == nbt == step + 1
        bn.zero_grad()

    bn.eval()
    x = _x(shape, seed=99)
    dy = _x(shape, seed=98)
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))
    f = ref.forward(
        x, axis=axis, weight=w, bias=b, eps=1e-3, running_mean=rm, running_var=rv, use_batch_stats=False
    )
    g = ref.backward(
        dy, x, axis=axis, weight=w, eps=1e-3, running_mean=rm, running_var=rv, use_batch_stats=False
    )
    assert_close(to_numpy(y), f["y"], 1e-12, "eval y")
    assert_close(to_numpy(dx), g["dx"], 1e-12, "eval dx")
    assert_close(to_numpy(bn.weight.grad), g["dgamma"], 1e-11, "eval dgamma")
    assert_close(to_numpy(bn.bias.grad), g["dbeta"], 1e-11, "eval dbeta")
    # eval changed no buffer
    assert_close(to_numpy(bn.running_mean), rm, 1e-12, "running_mean after eval")
    assert bn.num_batches_tracked == 3


def test_momentum_none_first_batch_replaces_initial_values(backend):
    bn = xbn.BatchNorm1d(3, momentum=None, backend=backend.name, dtype="float64")
    xs = [_x((5, 3), seed=s, loc=s) for s in range(4)]
    for x in xs:
        bn(to_backend(backend, x))
    # the cumulative average of the batch statistics: initial values have weight zero
    means = [ref.batch_mean_var(x, 1)[0] for x in xs]
    uvars = [ref.batch_mean_var(x, 1)[1] * 5 / 4 for x in xs]
    assert_close(to_numpy(bn.running_mean), np.mean(means, axis=0), 1e-12, "running_mean")
    assert_close(to_numpy(bn.running_var), np.mean(uvars, axis=0), 1e-12, "running_var")
    assert bn.num_batches_tracked == 4


def test_momentum_one_and_zero(backend):
    x = _x((6, 2))
    bn1 = xbn.BatchNorm1d(2, momentum=1.0, backend=backend.name, dtype="float64")
    bn1(to_backend(backend, x))
    mean, var = ref.batch_mean_var(x, 1)
    assert_close(to_numpy(bn1.running_mean), mean, 1e-12)
    assert_close(to_numpy(bn1.running_var), var * 6 / 5, 1e-12)
    bn0 = xbn.BatchNorm1d(2, momentum=0.0, backend=backend.name)
    bn0(to_backend(backend, x))
    np.testing.assert_array_equal(to_numpy(bn0.running_mean), np.zeros(2, np.float32))
    np.testing.assert_array_equal(to_numpy(bn0.running_var), np.ones(2, np.float32))
    assert bn0.num_batches_tracked == 1


def test_num_batches_tracked_counts_training_forwards_only(backend):
    bn = xbn.BatchNorm2d(2, backend=backend.name)
    x = to_backend(backend, _x((2, 2, 3, 3), dtype=np.float32))
    for i in range(3):
        bn(x)
        assert bn.num_batches_tracked == i + 1
    bn.forward(x, training=False)
    assert bn.num_batches_tracked == 3
    bn.eval()
    bn(x)
    assert bn.num_batches_tracked == 3
    bn.forward(x, training=True)
    assert bn.num_batches_tracked == 4
    assert bn.training is False  # the flag overrides one call, not the mode


def test_training_flag_overrides_mode_for_one_call(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    rm, rv = np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 1.0])
    _set(bn, backend, running_mean=rm, running_var=rv)
    x = _x((7, 3))
    X = to_backend(backend, x)
    y_eval = bn.forward(X, training=False)
    assert bn.training is True
    f = ref.forward(x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)
    assert_close(to_numpy(y_eval), f["y"], 1e-12)
    assert_close(to_numpy(bn.running_mean), rm, 0.0)
    assert bn.num_batches_tracked == 0
    # the backward of that call is the eval-mode backward
    dy = _x((7, 3), seed=1)
    dx = bn.backward(to_backend(backend, dy))
    g = ref.backward(dy, x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)
    assert_close(to_numpy(dx), g["dx"], 1e-12)
    # and the next call without the flag trains again
    y = bn(X)
    assert_close(to_numpy(y), ref.forward(x, axis=1)["y"], 1e-12)
    assert bn.num_batches_tracked == 1


def test_call_is_forward(backend):
    # A training-mode layer, so that a __call__ dropping training= would update the statistics.
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    _set(bn, backend, running_mean=[0.1, 0.2, 0.3])
    x = _x((4, 3), dtype=np.float32)
    X = to_backend(backend, x)
    y_eval = to_numpy(bn(X, training=False))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(y_eval, to_numpy(bn.forward(X, training=False)))
    assert_close(y_eval, (x - [0.1, 0.2, 0.3]) / np.sqrt(1 + 1e-5), 1e-6)
    y_train = to_numpy(bn(X))
    assert bn.num_batches_tracked == 1
    assert_close(y_train, ref.forward(x.astype(np.float64), axis=1)["y"], 1e-5)


def test_eval_uses_running_stats_and_leaves_buffers(backend):
    bn = xbn.BatchNorm2d(2, backend=backend.name).eval()
    rm, rv = np.array([3.0, -1.0], np.float32), np.array([2.0, 0.5], np.float32)
    _set(bn, backend, running_mean=rm, running_var=rv)
    before = snapshot(bn)
    x = _x((2, 2, 3, 3), dtype=np.float32)
    y = bn(to_backend(backend, x))
    f = ref.forward(x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)
    assert_close(to_numpy(y), f["y"], 1e-6)
    assert snapshot(bn) == before


def test_track_running_stats_false(backend):
    bn = xbn.BatchNorm1d(3, track_running_stats=False, backend=backend.name, dtype="float64")
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked == 0
    assert set(bn.state_dict()) == {"weight", "bias"}
    x = _x((6, 3))
    for mode in (True, False):
        bn.train(mode)
        y = bn(to_backend(backend, x))
        assert_close(to_numpy(y), ref.forward(x, axis=1)["y"], 1e-12, f"training={mode}")
        dy = _x((6, 3), seed=2)
        dx = bn.backward(to_backend(backend, dy))
        # batch statistics in eval too, so the backward carries their derivative
        assert_close(to_numpy(dx), ref.backward(dy, x, axis=1)["dx"], 1e-11, f"training={mode}")
    assert bn.running_mean is None and bn.num_batches_tracked == 0


def test_n_equals_one_with_spatial_is_fine(backend):
    bn = xbn.BatchNorm2d(3, backend=backend.name, dtype="float64")
    x = _x((1, 3, 2, 2))
    y = bn(to_backend(backend, x))
    assert_close(to_numpy(y), ref.forward(x, axis=1)["y"], 1e-12)
    assert bn.num_batches_tracked == 1
    dy = _x((1, 3, 2, 2), seed=1)
    dx = bn.backward(to_backend(backend, dy))
    assert_close(to_numpy(dx), ref.backward(dy, x, axis=1)["dx"], 1e-11)


def test_one_value_per_channel_is_fine_in_eval(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name).eval()
    y = bn(to_backend(backend, np.ones((1, 3), np.float32)))
    np.testing.assert_allclose(to_numpy(y), np.ones((1, 3)) / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
def test_empty_batch_returns_empty_and_changes_nothing(backend, training, shape):
    """Documented choice: an empty batch gives an empty output and leaves all state unchanged."""
    bn = xbn.BatchNorm1d(3, backend=backend.name).train(training)
    before = snapshot(bn)
    x = to_backend(backend, np.zeros(shape, np.float32))
    y = bn(x)
    assert tuple(y.shape) == shape and y.dtype == x.dtype
    assert snapshot(bn) == before
    dx = bn.backward(to_backend(backend, np.zeros(shape, np.float32)))
    assert tuple(dx.shape) == shape
    np.testing.assert_array_equal(to_numpy(bn.weight.grad), np.zeros(3, np.float32))
    np.testing.assert_array_equal(to_numpy(bn.bias.grad), np.zeros(3, np.float32))


def test_grads_accumulate_and_zero_grad_clears(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    x, dy1, dy2 = _x((5, 3)), _x((5, 3), seed=1), _x((5, 3), seed=2)
    bn(to_backend(backend, x))
    bn.backward(to_backend(backend, dy1))
    bn(to_backend(backend, x))
    bn.backward(to_backend(backend, dy2))  # two forward/backward pairs: grads add up
    g1, g2 = ref.backward(dy1, x, axis=1), ref.backward(dy2, x, axis=1)
    assert_close(to_numpy(bn.weight.grad), g1["dgamma"] + g2["dgamma"], 1e-12)
    assert_close(to_numpy(bn.bias.grad), g1["dbeta"] + g2["dbeta"], 1e-12)
    opt = xbn.optim.SGD(bn.parameters(), lr=0.1)
    opt.zero_grad()
    assert bn.weight.grad is None and bn.bias.grad is None
    bn(to_backend(backend, x))
    bn.backward(to_backend(backend, dy1))
    assert_close(to_numpy(bn.weight.grad), g1["dgamma"], 1e-12)
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(to_numpy(bn.weight.grad), np.zeros(3))
    bn.zero_grad()
    assert bn.weight.grad is None


def test_second_backward_of_one_forward_raises_and_changes_nothing(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    x, dy = _x((5, 3)), _x((5, 3), seed=1)
    bn(to_backend(backend, x))
    bn.backward(to_backend(backend, dy))
    before = to_numpy(bn.weight.grad)
    with pytest.raises(xbn.BackwardBeforeForwardError, match="run forward"):
        bn.backward(to_backend(backend, dy))
    np.testing.assert_array_equal(to_numpy(bn.weight.grad), before)


def test_failed_backward_keeps_the_forward_for_a_corrected_call(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    x, dy = _x((5, 3)), _x((5, 3), seed=1)
    bn(to_backend(backend, x))
    with pytest.raises(ValueError, match="dy must match"):
        bn.backward(to_backend(backend, dy[:4]))
    assert bn.weight.grad is None
    bn.backward(to_backend(backend, dy))
    assert_close(to_numpy(bn.weight.grad), ref.backward(dy, x, axis=1)["dgamma"], 1e-12)


def test_backward_uses_the_weight_of_its_forward(backend):
    """An SGD step between forward and backward must not change that backward (no aliasing)."""
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    x, dy = _x((5, 3)), _x((5, 3), seed=1)
    bn(to_backend(backend, x))
    for p in bn.parameters():
        p.grad = backend.xp.ones_like(p.data)
    opt = xbn.optim.SGD(bn.parameters(), lr=0.5)
    opt.step()
    opt.zero_grad()
    dx = bn.backward(to_backend(backend, dy))
    assert_close(to_numpy(dx), ref.backward(dy, x, axis=1)["dx"], 1e-12)


def test_param_dtype_differs_from_input_dtype(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name)  # float32 state
    x = _x((6, 3))
    y = bn(to_backend(backend, x))  # float64 input
    assert y.dtype == backend.xp.float64
    assert bn.running_mean.dtype == backend.xp.float32
    assert_close(to_numpy(y), ref.forward(x, axis=1)["y"], 1e-7)
    dx = bn.backward(to_backend(backend, _x((6, 3), seed=1)))
    assert dx.dtype == backend.xp.float64 and bn.weight.grad.dtype == backend.xp.float32


# -- state dict ---------------------------------------------------------------------------------


def test_state_dict_keys_dtypes_and_copies(backend):
    bn = xbn.BatchNorm2d(3, backend=backend.name)
    bn(to_backend(backend, _x((2, 3, 2, 2), dtype=np.float32)))
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    host = {k: to_numpy(v) for k, v in sd.items()}
    assert host["num_batches_tracked"].shape == () and host["num_batches_tracked"].dtype == np.int64
    assert int(host["num_batches_tracked"]) == 1
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert host[k].dtype == np.float32 and host[k].shape == (3,)
    np.testing.assert_array_equal(host["running_mean"], to_numpy(bn.running_mean))
    # a copy: a training step afterwards does not reach into it
    bn(to_backend(backend, _x((2, 3, 2, 2), seed=3, dtype=np.float32)))
    np.testing.assert_array_equal(to_numpy(sd["running_mean"]), host["running_mean"])


def test_state_dict_round_trip(backend):
    src = xbn.BatchNorm1d(3, backend=backend.name, momentum=0.3)
    for s in range(2):
        src(to_backend(backend, _x((5, 3), seed=s, dtype=np.float32)))
    src.weight.data = src.weight.data * 2
    dst = xbn.BatchNorm1d(3, backend=backend.name)
    dst.load_state_dict(src.state_dict())
    assert snapshot(dst) == snapshot(src)
    # and from NumPy arrays (e.g. a converted torch state_dict)
    dst2 = xbn.BatchNorm1d(3, backend=backend.name)
    dst2.load_state_dict({k: to_numpy(v) for k, v in src.state_dict().items()})
    assert snapshot(dst2) == snapshot(src)


def test_load_state_dict_copies_its_input(backend):
    """The loaded arrays must not alias the source: torch's state_dict().numpy() shares memory."""
    bn = xbn.BatchNorm1d(2, backend=backend.name)
    sd = {
        "weight": np.array([2.0, 3.0], np.float32),
        "bias": np.array([0.5, -0.5], np.float32),
        "running_mean": np.array([1.0, 2.0], np.float32),
        "running_var": np.array([4.0, 5.0], np.float32),
        "num_batches_tracked": np.array(7, np.int64),
    }
    bn.load_state_dict(sd)
    loaded = snapshot(bn)
    for k in ("weight", "bias", "running_mean", "running_var"):
        sd[k][...] = -1.0
    assert snapshot(bn) == loaded
    assert bn.num_batches_tracked == 7
    np.testing.assert_array_equal(to_numpy(bn.running_var), [4.0, 5.0])


def test_load_state_dict_casts_float64_to_layer_dtype(backend):
    bn = xbn.BatchNorm1d(2, backend=backend.name)
    bn.load_state_dict(
        {
            "weight": np.ones(2),
            "bias": np.zeros(2),
            "running_mean": np.ones(2),
            "running_var": np.ones(2) * 3,
            "num_batches_tracked": 4,
        }
    )
    assert bn.running_var.dtype == backend.xp.float32 and bn.num_batches_tracked == 4


# -- moving between backends --------------------------------------------------------------------


def test_to_numpy_and_back(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.name)
    bn(to_backend(backend, _x((4, 3), dtype=np.float32)))
    bn.backward(to_backend(backend, _x((4, 3), seed=1, dtype=np.float32)))
    before = snapshot(bn)
    assert bn.to("numpy") is bn and bn.backend == "numpy"
    assert isinstance(bn.running_mean, np.ndarray) and isinstance(bn.weight.grad, np.ndarray)
    assert snapshot(bn) == before
    with pytest.raises(xbn.BackwardBeforeForwardError, match="needs a preceding forward"):
        bn.backward(np.ones((4, 3), np.float32))
    bn.to(backend.name)
    assert bn.backend == backend.name and snapshot(bn) == before
