"""xbn.nn: finite-difference gradient checks in float64 and the layer protocol, per backend tier."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xbn
from xbn.nn import Linear, ReLU, Sequential, softmax_cross_entropy

from reference import numerical_grad


def to_host(a):
    """A float64/int NumPy copy of an array of any tier's backend."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.from_dlpack(a).copy()


def assert_grad_close(analytic, numeric):
    np.testing.assert_allclose(to_host(analytic), numeric, rtol=1e-6, atol=1e-8)


def dev_array(backend, host):
    return backend.xp.asarray(host, device=backend.device)


# -- Linear ----------------------------------------------------------------------------------


def test_linear_gradients(backend):
    rng = np.random.default_rng(0)
    lin = Linear(5, 3, backend=backend.xp, device=backend.device, dtype="float64", seed=1)
    x = rng.normal(size=(4, 5))
    r = rng.normal(size=(4, 3))  # L = sum(y * r), so dL/dy = r
    w = to_host(lin.weight.data)
    b = to_host(lin.bias.data)

    def loss():
        lin.weight.data, lin.bias.data = dev_array(backend, w), dev_array(backend, b)
        return float(backend.xp.sum(lin.forward(dev_array(backend, x)) * dev_array(backend, r)))

    num_dx, num_dw, num_db = (numerical_grad(lambda _: loss(), a) for a in (x, w, b))
    lin.weight.data, lin.bias.data = dev_array(backend, w), dev_array(backend, b)
    lin.forward(dev_array(backend, x))
    dx = lin.backward(dev_array(backend, r))
    assert_grad_close(dx, num_dx)
    assert_grad_close(lin.weight.grad, num_dw)
    assert_grad_close(lin.bias.grad, num_db)


def test_linear_grads_accumulate_and_no_bias(backend):
    lin = Linear(3, 2, bias=False, backend=backend.xp, dtype="float64", seed=0)
    assert lin.bias is None and lin.parameters() == [lin.weight]
    x = dev_array(backend, np.ones((2, 3)))
    dy = dev_array(backend, np.ones((2, 2)))
    lin.forward(x)
    lin.backward(dy)
    once = to_host(lin.weight.grad)
    with pytest.raises(xbn.BackwardBeforeForwardError, match="run forward"):
        lin.backward(dy)  # one backward per forward, as in torch
    lin.forward(x)
    lin.backward(dy)
    np.testing.assert_array_equal(to_host(lin.weight.grad), 2 * once)


def test_linear_init_is_torch_like_and_seeded(backend):
    lin = Linear(64, 128, backend=backend.xp, seed=3)
    w, b = to_host(lin.weight.data), to_host(lin.bias.data)
    assert w.shape == (128, 64) and b.shape == (128,)
    assert w.dtype == np.float32
    bound = 1 / math.sqrt(64)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # std of U(-a, a)
    # Drawn on the host: the same seed gives the same weights on every backend.
    ref = Linear(64, 128, backend="numpy", seed=3)
    np.testing.assert_array_equal(w, ref.weight.data)
    np.testing.assert_array_equal(b, ref.bias.data)


def test_shared_rng_gives_identical_networks_with_and_without_batchnorm():
    def mlp(bn):
        rng = np.random.default_rng(7)
        layers = [Linear(4, 8, backend="numpy", rng=rng)]
        if bn:
            layers.append(xbn.BatchNorm1d(8, backend="numpy"))
        layers += [ReLU(), Linear(8, 2, backend="numpy", rng=rng)]
        return Sequential(*layers)

    plain, with_bn = mlp(False), mlp(True)
    lin_plain = [p.data for layer in plain if isinstance(layer, Linear) for p in layer.parameters()]
    lin_bn = [p.data for layer in with_bn if isinstance(layer, Linear) for p in layer.parameters()]
    assert len(lin_plain) == len(lin_bn) == 4
    for a, b in zip(lin_plain, lin_bn):
        np.testing.assert_array_equal(a, b)
    # The two Linear layers of one network draw different values from the shared rng.
    assert not np.array_equal(lin_plain[0][:2, :2], lin_plain[2][:2, :2])


def test_linear_rejects_bad_inputs(backend):
    lin = Linear(3, 2, backend=backend.xp, seed=0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        lin.forward(dev_array(backend, np.ones((2, 4), dtype=np.float32)))
    with pytest.raises(TypeError, match="dtype"):
        lin.forward(dev_array(backend, np.ones((2, 3), dtype=np.float64)))
    if backend.name != "numpy":
        with pytest.raises(TypeError, match="backend"):
            lin.forward(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(xbn.BackwardBeforeForwardError):
        Linear(3, 2, backend=backend.xp, seed=0).backward(
            dev_array(backend, np.ones((2, 2), dtype=np.float32))
        )
    with pytest.raises(ValueError):
        Linear(0, 2, backend="numpy")
    with pytest.raises(ValueError, match="not both"):
        Linear(2, 2, backend="numpy", seed=0, rng=np.random.default_rng(0))


# -- ReLU ------------------------------------------------------------------------------------


def test_relu_gradient(backend):
    rng = np.random.default_rng(1)
    # Keep every input away from the kink at 0, where central differences are meaningless.
    x = rng.uniform(0.1, 1.0, size=(6, 4)) * rng.choice([-1.0, 1.0], size=(6, 4))
    r = rng.normal(size=(6, 4))
    relu = ReLU()

    def loss():
        return float(backend.xp.sum(relu.forward(dev_array(backend, x)) * dev_array(backend, r)))

    num = numerical_grad(lambda _: loss(), x)
    y = relu.forward(dev_array(backend, x))
    np.testing.assert_array_equal(to_host(y), np.maximum(x, 0))
    assert_grad_close(relu.backward(dev_array(backend, r)), num)


# -- softmax cross-entropy -------------------------------------------------------------------


def test_softmax_cross_entropy_value_and_gradient(backend):
    rng = np.random.default_rng(2)
    z = rng.normal(scale=3.0, size=(7, 5))
    labels_host = rng.integers(0, 5, size=7)
    labels = dev_array(backend, labels_host)

    def loss():
        return float(softmax_cross_entropy(dev_array(backend, z), labels)[0])

    num = numerical_grad(lambda _: loss(), z)
    value, dz = softmax_cross_entropy(dev_array(backend, z), labels)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert float(value) == pytest.approx(-np.log(p[np.arange(7), labels_host]).mean(), rel=1e-12)
    assert_grad_close(dz, num)


def test_softmax_cross_entropy_is_stable_for_large_logits(backend):
    z = dev_array(backend, np.array([[1e4, 0.0, -1e4], [-1e30, 1e30, -np.inf]], dtype=np.float32))
    loss, dz = softmax_cross_entropy(z, dev_array(backend, np.array([1, 1])))
    assert float(loss) == pytest.approx(1e4 / 2, rel=1e-6)  # row 0 costs 1e4, row 1 costs 0
    dz = to_host(dz)
    assert np.isfinite(dz).all()
    np.testing.assert_allclose(dz, [[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], atol=1e-7)


def test_softmax_cross_entropy_validates_labels(backend):
    z = dev_array(backend, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        softmax_cross_entropy(z, dev_array(backend, np.array([0, 4, 1])))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        softmax_cross_entropy(z, dev_array(backend, np.array([0, 1])))
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(z, dev_array(backend, np.array([0.0, 1.0, 2.0])))
    # Host labels (a list, a NumPy array) are moved to the logits' device.
    loss, _ = softmax_cross_entropy(z, [0, 1, 2])
    assert float(loss) == pytest.approx(math.log(4))


# -- Sequential with BatchNorm1d -------------------------------------------------------------


def _mlp(backend, seed=0):
    rng = np.random.default_rng(seed)
    kw = dict(backend=backend.xp, device=backend.device, dtype="float64")
    return Sequential(
        Linear(5, 6, rng=rng, **kw),
        xbn.BatchNorm1d(6, **kw),
        ReLU(),
        Linear(6, 3, rng=rng, **kw),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequential_with_batchnorm_gradients(backend, training):
    rng = np.random.default_rng(4)
    net = _mlp(backend)
    x = rng.normal(size=(8, 5))
    labels = dev_array(backend, rng.integers(0, 3, size=8))
    bn = net[1]
    # Non-trivial BN parameters and running statistics, so every term of the gradient shows.
    bn.weight.data = dev_array(backend, rng.uniform(0.5, 1.5, size=6))
    bn.bias.data = dev_array(backend, rng.normal(size=6))
    bn.running_mean = dev_array(backend, rng.normal(size=6))
    bn.running_var = dev_array(backend, rng.uniform(0.5, 2.0, size=6))
    net.train(training)
    params = net.parameters()
    assert len(params) == 6
    hosts = [to_host(p.data) for p in params]

    def loss():
        for p, h in zip(params, hosts):
            p.data = dev_array(backend, h)
        return float(softmax_cross_entropy(net.forward(dev_array(backend, x)), labels)[0])

    num_dx = numerical_grad(lambda _: loss(), x)
    num_params = [numerical_grad(lambda _: loss(), h) for h in hosts]
    loss()  # restore the unperturbed parameters
    net.zero_grad()
    _, dlogits = softmax_cross_entropy(net.forward(dev_array(backend, x)), labels)
    dx = net.backward(dlogits)
    assert_grad_close(dx, num_dx)
    for p, num in zip(params, num_params):
        assert_grad_close(p.grad, num)


def test_sequential_modes_propagate(backend):
    net = _mlp(backend)
    assert net.training and all(layer.training for layer in net)
    assert net.eval() is net
    assert not net.training and not any(layer.training for layer in net)
    net.train()
    assert all(layer.training for layer in net)
    x = dev_array(backend, np.random.default_rng(5).normal(size=(8, 5)))
    # An explicit training flag reaches BatchNorm: training=False uses the running statistics.
    y_flag = to_host(net.forward(x, training=False))
    assert net[1].num_batches_tracked == 0
    y_eval = to_host(net.eval().forward(x))
    np.testing.assert_array_equal(y_flag, y_eval)
    y_train = to_host(net.train().forward(x))
    assert net[1].num_batches_tracked == 1
    assert not np.allclose(y_train, y_eval)


def test_sequential_rejects_non_layers_and_trains_with_sgd(backend):
    with pytest.raises(TypeError, match="forward"):
        Sequential(object())
    rng = np.random.default_rng(6)
    net = _mlp(backend)
    x = dev_array(backend, rng.normal(size=(32, 5)))
    labels = dev_array(backend, np.argmax(to_host(x) @ rng.normal(size=(5, 3)), axis=1))  # learnable
    opt = xbn.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, d = softmax_cross_entropy(net(x), labels)
        net.backward(d)
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
