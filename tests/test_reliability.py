"""Regression tests for defects found by adversarial use: state that must stay clean and plain."""

from __future__ import annotations

import numpy as np
import pytest

import xbn
from xbn.nn import Linear, ReLU, Sequential

from reference import snapshot, to_backend, to_numpy


def _x(backend, shape=(8, 3), seed=0, dtype=np.float32):
    return to_backend(backend, np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(dtype))


def test_torch_state_never_joins_the_autograd_graph():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    bn = xbn.BatchNorm1d(3, backend="torch", momentum=None)
    lin = Linear(3, 3, backend="torch", seed=0)
    for i in range(50):
        x = torch.as_tensor(np.random.default_rng(i).normal(size=(8, 3)).astype(np.float32))
        x.requires_grad_(True)
        y = lin(bn(x))
        lin.backward(torch.ones_like(y))
    for a in (bn.running_mean, bn.running_var, lin.weight.grad, lin.bias.grad):
        assert a.grad_fn is None and not a.requires_grad
    bn.backward(torch.ones((8, 3)))
    assert bn.weight.grad.grad_fn is None and bn.bias.grad.grad_fn is None


def test_sgd_zero_grad_without_none_gives_exact_zeros(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.xp)
    nan_inf = np.array([np.nan, np.inf, -np.inf], np.float32)
    for p in bn.parameters():
        p.grad = to_backend(backend, nan_inf)
    xbn.optim.SGD(bn.parameters(), lr=0.1).zero_grad(set_to_none=False)
    for p in bn.parameters():
        np.testing.assert_array_equal(to_numpy(p.grad), np.zeros(3, np.float32))


def test_empty_batch_backward_gives_separate_gradients(backend):
    bn = xbn.BatchNorm1d(3, backend=backend.xp)
    e = to_backend(backend, np.zeros((0, 3), np.float32))
    bn(e)
    bn.backward(e)
    assert bn.weight.grad is not bn.bias.grad
    bn.weight.grad = bn.weight.grad + 1
    np.testing.assert_array_equal(to_numpy(bn.bias.grad), np.zeros(3, np.float32))


def test_masked_and_memmap_inputs_leave_plain_state(tmp_path):
    x = np.random.default_rng(0).normal(1.0, 2.0, (8, 3)).astype(np.float32)
    masked = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    masked.mask[0, 1] = True
    bn, plain = xbn.BatchNorm1d(3, backend="numpy"), xbn.BatchNorm1d(3, backend="numpy")
    y = bn(masked)
    np.testing.assert_array_equal(y, plain(x))  # the mask is ignored, as np.asarray ignores it
    for a in (bn.running_mean, bn.running_var, y):
        assert type(a) is np.ndarray
    assert bn.running_mean.dtype == np.float32
    np.testing.assert_array_equal(bn.state_dict()["running_mean"], plain.running_mean)
    dx = bn.backward(np.ma.masked_array(np.ones_like(x)))
    assert type(dx) is np.ndarray and type(bn.weight.grad) is np.ndarray

    mm = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    fresh = xbn.BatchNorm1d(3, backend="numpy")
    np.testing.assert_array_equal(fresh(mm), xbn.BatchNorm1d(3, backend="numpy")(x))
    assert type(fresh.running_mean) is np.ndarray


@pytest.mark.parametrize("value", [np.uint64(2**63), 2**63, 2**70])
def test_num_batches_tracked_beyond_int64_is_rejected_atomically(backend, value):
    bn = xbn.BatchNorm1d(3, backend=backend.xp)
    bn(_x(backend))
    sd = {k: to_numpy(v) for k, v in bn.state_dict().items()}
    sd["num_batches_tracked"] = value
    sd["running_mean"] = np.full(3, 7.0, np.float32)
    before = snapshot(bn)
    with pytest.raises(ValueError, match=r"num_batches_tracked must be at most 2\*\*63 - 1"):
        bn.load_state_dict(sd)
    assert snapshot(bn) == before
    sd["num_batches_tracked"] = np.uint64(2**63 - 1)
    bn.load_state_dict(sd)
    assert int(to_numpy(bn.state_dict()["num_batches_tracked"])) == 2**63 - 1


@pytest.mark.parametrize("make", ["bn", "linear", "relu", "sequential"])
def test_second_backward_of_one_forward_raises(backend, make):
    layer = {
        "bn": lambda: xbn.BatchNorm1d(3, backend=backend.xp),
        "linear": lambda: Linear(3, 3, backend=backend.xp, seed=0),
        "relu": ReLU,
        "sequential": lambda: Sequential(
            Linear(3, 3, backend=backend.xp, seed=0), xbn.BatchNorm1d(3, backend=backend.xp), ReLU()
        ),
    }[make]()
    y = layer(_x(backend))
    dy = backend.xp.ones_like(y)
    layer.backward(dy)
    grads = [to_numpy(p.grad) for p in layer.parameters()]
    with pytest.raises(xbn.BackwardBeforeForwardError, match=r"run forward\(\) again"):
        layer.backward(dy)
    for p, g in zip(layer.parameters(), grads):
        np.testing.assert_array_equal(to_numpy(p.grad), g)
    layer(_x(backend))
    layer.backward(dy)  # a new forward makes a backward possible again


def test_sgd_follows_a_model_moved_after_some_steps():
    pytest.importorskip("torch", reason="torch is not installed")
    model = Sequential(Linear(3, 3, backend="numpy", seed=0), xbn.BatchNorm1d(3, backend="numpy"))
    opt = xbn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    model.backward(np.ones_like(model(x)))
    opt.step()
    model.to(backend="torch")
    import torch

    y = model(torch.as_tensor(x))
    opt.zero_grad()
    model.backward(torch.ones_like(y))
    opt.step()
    assert all(isinstance(p.data, torch.Tensor) for p in model.parameters())


def test_bfloat16_torch_state_loads():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    tbn = torch.nn.BatchNorm1d(3).to(torch.bfloat16)
    with torch.no_grad():
        tbn.running_mean.copy_(torch.tensor([0.5, 1.5, -2.0]))
    bn = xbn.BatchNorm1d(3, backend="numpy")
    bn.load_state_dict(tbn.state_dict())
    np.testing.assert_array_equal(bn.running_mean, np.array([0.5, 1.5, -2.0], np.float32))


def test_byte_order_mismatch_is_named():
    bn = xbn.BatchNorm1d(3, backend="numpy")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    bn(x)
    with pytest.raises(ValueError, match="only the byte order differs"):
        bn.backward(np.ones((8, 3), dtype=">f4"))
    bn.backward(np.ones((8, 3), np.float32))


def test_tiny_eps_constant_channel_gives_finite_dx(backend):
    # inv = 1e15: k_dy * inv * inv overflows float32 unless the zero sum_dy_xmu comes in first.
    x = np.full((4, 2), 3.0, np.float32)
    x[:, 1] = [1, 2, 3, 4]
    bn = xbn.BatchNorm1d(2, eps=1e-30, backend=backend.xp)
    y = bn(to_backend(backend, x))
    np.testing.assert_array_equal(to_numpy(y)[:, 0], np.zeros(4, np.float32))
    dx = to_numpy(bn.backward(to_backend(backend, np.tile(np.float32([1, 2]), (4, 1)))))
    assert np.isfinite(dx).all()
    np.testing.assert_array_equal(dx[:, 0], np.zeros(4, np.float32))  # torch gives 0 here too


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the generic path's inf - inf on NumPy
def test_ghost_batches_keep_an_infinite_first_value_infinite(backend):
    # ghost batches shift each group like batch_stats does: an infinite first value gives torch's
    # infinite mean (running_mean inf), not inf - inf = NaN
    x = np.array([[np.inf, 2.0], [1.0, 3.0], [0.0, 4.0], [2.0, 5.0]], np.float32)
    bn = xbn.BatchNorm1d(2, backend=backend.xp, virtual_batch_size=2)
    bn(to_backend(backend, x))
    rm, rv = to_numpy(bn.running_mean), to_numpy(bn.running_var)
    assert rm[0] == np.inf and np.isnan(rv[0])
    np.testing.assert_allclose(rm[1], 0.1 * 3.5, rtol=1e-6)
