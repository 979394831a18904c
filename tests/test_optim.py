"""xbn.optim.SGD: torch.optim.SGD's update rule, defaults, zero_grad and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

import xbn
from xbn._reference import assert_close, to_numpy
from xbn.optim import SGD

from reference import to_backend

CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.5),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight-decay": dict(lr=0.1, weight_decay=0.01),
    "everything": dict(lr=0.03, momentum=0.7, dampening=0.2, weight_decay=0.1),
    "nesterov-decay": dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=1e-3),
}


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="comparing with torch.optim.SGD needs torch")


def _grad(p, k, target, curv):
    """A gradient that depends on the parameter and the step: a noisy quadratic bowl."""
    return curv * (p - target) + 0.1 * np.sin(k + np.arange(p.size))


def _reference_sgd(
    p0, steps, target, curv, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False
):
    """The update as torch documents it, in float64."""
    p, buf, out = p0.copy(), None, []
    for k in range(steps):
        g = _grad(p, k, target, curv) + weight_decay * p
        if momentum != 0:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
        out.append(p.copy())
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_trajectory_matches_torch(backend, torch, config, dtype):
    cfg = CONFIGS[config]
    rng = np.random.default_rng(len(config))
    p0 = [rng.normal(size=4).astype(dtype), rng.normal(size=3).astype(dtype)]
    targets = [rng.normal(size=4), rng.normal(size=3)]
    curv = [rng.uniform(0.5, 2.0, 4), rng.uniform(0.5, 2.0, 3)]
    xs = [xbn.Parameter(to_backend(backend, p)) for p in p0]
    ts = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    xopt, topt = SGD(xs, **cfg), torch.optim.SGD(ts, **cfg)
    tol = 1e-12 if dtype == "float64" else 1e-6
    for k in range(12):
        xopt.zero_grad()
        topt.zero_grad()
        for xp_, tp, t, c in zip(xs, ts, targets, curv):
            g = _grad(to_numpy(tp.detach()).astype(np.float64), k, t, c).astype(dtype)
            xp_.grad = to_backend(backend, g)
            tp.grad = torch.tensor(g)
        xopt.step()
        topt.step()
        for xp_, tp in zip(xs, ts):
            assert to_numpy(xp_.data).dtype == np.dtype(dtype)
            assert_close(to_numpy(xp_.data), tp.detach().numpy(), tol, f"step {k}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_trajectory_matches_documented_rule(backend, config):
    """Without torch: the same update written out (momentum buffer starts as the first grad)."""
    cfg = CONFIGS[config]
    rng = np.random.default_rng(7)
    p0, target, curv = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
    p = xbn.Parameter(to_backend(backend, p0))
    opt = SGD([p], **cfg)
    expected = _reference_sgd(p0, 10, target, curv, **cfg)
    for k in range(10):
        p.grad = to_backend(backend, _grad(to_numpy(p.data), k, target, curv))
        opt.step()
        assert_close(to_numpy(p.data), expected[k], 1e-13, f"step {k}")


def test_defaults_match_torch(torch):
    import inspect

    ours = inspect.signature(SGD).parameters
    theirs = inspect.signature(torch.optim.SGD).parameters
    for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov"):
        assert ours[name].default == theirs[name].default, name


def test_parameters_without_grad_are_skipped(backend):
    a = xbn.Parameter(to_backend(backend, np.ones(2)))
    b = xbn.Parameter(to_backend(backend, np.ones(2)))
    opt = SGD([a, b], lr=0.5, momentum=0.9)
    a.grad = to_backend(backend, np.array([1.0, 2.0]))
    opt.step()
    np.testing.assert_array_equal(to_numpy(a.data), [0.5, 0.0])
    np.testing.assert_array_equal(to_numpy(b.data), [1.0, 1.0])
    # b's momentum buffer starts only when it first has a grad
    b.grad = to_backend(backend, np.array([1.0, 1.0]))
    a.grad = None
    opt.step()
    np.testing.assert_array_equal(to_numpy(b.data), [0.5, 0.5])
    np.testing.assert_array_equal(to_numpy(a.data), [0.5, 0.0])


def test_step_assigns_new_arrays(backend):
    """Arrays a forward pass cached (the weight) are never changed in place."""
    old = to_backend(backend, np.ones(3))
    p = xbn.Parameter(old)
    p.grad = to_backend(backend, np.ones(3))
    SGD([p], lr=0.1, momentum=0.5, weight_decay=0.1).step()
    assert p.data is not old
    np.testing.assert_array_equal(to_numpy(old), np.ones(3))


def test_zero_grad(backend):
    bn = xbn.BatchNorm1d(2, backend=backend.name)
    opt = SGD(bn.parameters(), lr=0.1)
    bn(to_backend(backend, np.array([[0.0, 1.0], [2.0, 5.0]], np.float32)))
    bn.backward(to_backend(backend, np.ones((2, 2), np.float32)))
    assert bn.weight.grad is not None
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(to_numpy(bn.weight.grad), np.zeros(2, np.float32))
    assert bn.weight.grad.dtype == backend.xp.float32
    opt.zero_grad()
    assert bn.weight.grad is None and bn.bias.grad is None
    opt.zero_grad(set_to_none=False)  # grads that are None stay None
    assert bn.weight.grad is None
    opt.step()  # nothing to do
    np.testing.assert_array_equal(to_numpy(bn.weight.data), np.ones(2, np.float32))


def test_training_a_layer_reduces_a_loss(backend):
    """End to end: fit gamma/beta so the normalized output matches a target affine map."""
    rng = np.random.default_rng(0)
    bn = xbn.BatchNorm1d(3, backend=backend.name, dtype="float64")
    opt = SGD(bn.parameters(), lr=0.5, momentum=0.5)
    gamma_t, beta_t = np.array([2.0, 0.5, -1.0]), np.array([1.0, -2.0, 0.0])
    losses = []
    for _ in range(60):
        x = rng.normal(3.0, 2.0, size=(32, 3))
        xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
        target = xhat * gamma_t + beta_t
        y = to_numpy(bn(to_backend(backend, x)))
        losses.append(float(np.mean((y - target) ** 2)))
        opt.zero_grad()
        bn.backward(to_backend(backend, 2 * (y - target) / y.size))
        opt.step()
    assert losses[-1] < 1e-8 * losses[0]
    assert_close(to_numpy(bn.weight.data), gamma_t, 1e-4)
    assert_close(to_numpy(bn.bias.data), beta_t, 1e-4)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(lr=-0.1), ValueError, "lr must be >= 0, got -0.1"),
        (dict(lr=0.1, momentum=-0.5), ValueError, "momentum must be >= 0, got -0.5"),
        (dict(lr=0.1, dampening=-1), ValueError, "dampening must be >= 0, got -1"),
        (dict(lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay must be >= 0, got -0.0001"),
        (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
        (dict(lr=True), TypeError, "lr must be a real number, got bool"),
        (dict(lr=0.1, momentum=None), TypeError, "momentum must be a real number, got NoneType"),
        (dict(lr=0.1, nesterov=True), ValueError, "Nesterov momentum requires a momentum > 0"),
        (
            dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            ValueError,
            "Nesterov momentum requires a momentum > 0 and zero dampening",
        ),
    ],
)
def test_bad_arguments(backend, kwargs, exc, match):
    p = xbn.Parameter(to_backend(backend, np.ones(2)))
    with pytest.raises(exc, match=match):
        SGD([p], **kwargs)


def test_params_must_be_parameters(backend):
    with pytest.raises(TypeError, match=r"params must be xbn\.Parameter objects, got"):
        SGD([to_backend(backend, np.ones(2))], lr=0.1)


def test_params_may_be_a_generator(backend):
    bn = xbn.BatchNorm1d(2, backend=backend.name)
    opt = SGD((p for p in bn.parameters()), lr=0.1)
    assert len(opt.params) == 2


def test_state_dict_holds_momentum_buffers(backend):
    p = xbn.Parameter(to_backend(backend, np.ones(2)))
    opt = SGD([p], lr=0.1, momentum=0.9)
    assert opt.state_dict() == {"momentum_buffers": {}}
    p.grad = to_backend(backend, np.array([1.0, -1.0]))
    opt.step()
    bufs = opt.state_dict()["momentum_buffers"]
    np.testing.assert_array_equal(to_numpy(bufs[0]), [1.0, -1.0])
