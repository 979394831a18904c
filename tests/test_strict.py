"""array-api-strict: the functional module and the layers on the strictest namespace, including
its fake devices ("device1"), where every array must stay on the layer's device.

These run whatever --backend tiers are selected: they are about array-api-strict itself, a test
dependency, and cost little.
"""

from __future__ import annotations

import numpy as np
import pytest

xs = pytest.importorskip("array_api_strict", reason="these tests are about array-api-strict")

import xbn  # noqa: E402
from xbn import _reference as ref  # noqa: E402
from xbn import functional as F  # noqa: E402
from xbn._reference import assert_close, to_numpy  # noqa: E402

from reference import snapshot  # noqa: E402

DEVICES = ["CPU_DEVICE", "device1"]


def _on(a, device, dtype=None):
    return xs.asarray(np.asarray(a), dtype=dtype, device=xs.Device(device))


def _all_state_arrays(bn):
    out = {"running_mean": bn.running_mean, "running_var": bn.running_var}
    for n in ("weight", "bias"):
        p = getattr(bn, n)
        if p is not None:
            out[f"{n}.data"], out[f"{n}.grad"] = p.data, p.grad
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_functional_on_device(device):
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    w, b = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    X, DY, W, B = (_on(a, device) for a in (x, dy, w, b))
    mean, var = F.batch_stats(X, axis=1)
    y, m, inv = F.batch_norm_train(X, W, B, axis=1, eps=1e-5)
    dx, dgamma, dbeta = F.batch_norm_backward(DY, X, m, inv, W, axis=1)
    for a in (mean, var, y, m, inv, dx, dgamma, dbeta):
        assert a.device == xs.Device(device)
    assert_close(to_numpy(y), ref.forward(x, axis=1, weight=w, bias=b)["y"], 1e-12)
    g = ref.backward(dy, x, axis=1, weight=w)
    assert_close(to_numpy(dx), g["dx"], 1e-12)
    assert_close(to_numpy(dgamma), g["dgamma"], 1e-12)
    rm, rv = F.updated_running_stats(
        _on(np.zeros(3), device), _on(np.ones(3), device), mean, var, count=20, momentum=0.1
    )
    assert rm.device == rv.device == xs.Device(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_on_device(device, affine):
    dev = xs.Device(device)
    bn = xbn.BatchNorm2d(3, backend="array_api_strict", device=device, affine=affine, dtype="float64")
    assert bn.backend == "array_api_strict" and bn.device == dev
    for a in _all_state_arrays(bn).values():
        assert a.device == dev
    rng = np.random.default_rng(1)
    x, dy = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    for training in (True, False):
        bn.train(training)
        y = bn(_on(x, device))
        dx = bn.backward(_on(dy, device))
        assert y.device == dev and dx.device == dev
        for name, a in _all_state_arrays(bn).items():
            assert a.device == dev, name
    # values: one training step then an eval step, against the reference
    rm, rv, _ = ref.update_running(np.zeros(3), np.ones(3), x, axis=1)
    assert_close(to_numpy(bn.running_mean), rm, 1e-12)
    assert_close(to_numpy(bn.running_var), rv, 1e-12)
    g = ref.backward(dy, x, axis=1, running_mean=rm, running_var=rv, use_batch_stats=False)
    assert_close(to_numpy(dx), g["dx"], 1e-12)
    sd = bn.state_dict()
    assert all(v.device == dev for v in sd.values())
    assert sd["num_batches_tracked"].dtype == xs.int64 and sd["num_batches_tracked"].shape == ()


@pytest.mark.parametrize("device", DEVICES)
def test_sgd_keeps_the_device(device):
    bn = xbn.BatchNorm1d(3, backend="array_api_strict", device=device)
    opt = xbn.optim.SGD(bn.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    x = _on(np.random.default_rng(2).normal(size=(5, 3)), device, xs.float32)
    for _ in range(2):
        opt.zero_grad()
        bn(x)
        bn.backward(xs.ones_like(x))
        opt.step()
    for a in _all_state_arrays(bn).values():
        assert a.device == xs.Device(device)


def test_input_on_another_device_is_a_type_error():
    bn = xbn.BatchNorm1d(3, backend="array_api_strict", device="device1")
    bn(_on(np.random.default_rng(3).normal(size=(4, 3)), "device1", xs.float32))
    before = snapshot(bn)
    x_cpu = _on(np.ones((4, 3)), "CPU_DEVICE", xs.float32)
    with pytest.raises(
        TypeError,
        match=r"input is on device .*CPU_DEVICE.*, but the layer lives on "
        r"device .*device1",
    ):
        bn(x_cpu)
    with pytest.raises(
        TypeError,
        match=r"dy is on device .*CPU_DEVICE.*, but the layer lives on "
        r"device .*device1",
    ):
        bn.backward(x_cpu)
    assert snapshot(bn) == before
    bn.backward(_on(np.ones((4, 3)), "device1", xs.float32))  # the cached forward is intact


def test_numpy_array_to_strict_layer_is_a_type_error():
    bn = xbn.BatchNorm1d(3, backend="array_api_strict", device="device1")
    with pytest.raises(TypeError, match=r"backend 'array_api_strict', got numpy\.ndarray"):
        bn(np.ones((4, 3), np.float32))


@pytest.mark.parametrize(
    "src,dst", [("device1", "CPU_DEVICE"), ("CPU_DEVICE", "device1"), ("device1", "device1")]
)
def test_load_state_dict_across_devices(src, dst):
    a = xbn.BatchNorm1d(3, backend="array_api_strict", device=src, momentum=0.5)
    a(_on(np.random.default_rng(4).normal(2.0, 3.0, size=(6, 3)), src, xs.float32))
    b = xbn.BatchNorm1d(3, backend="array_api_strict", device=dst)
    b.load_state_dict(a.state_dict())
    assert snapshot(b) == snapshot(a)
    assert all(v.device == xs.Device(dst) for v in _all_state_arrays(b).values())
    # and from NumPy, e.g. a converted torch state_dict
    c = xbn.BatchNorm1d(3, backend="array_api_strict", device=dst)
    c.load_state_dict({k: to_numpy(v) for k, v in a.state_dict().items()})
    assert snapshot(c) == snapshot(a)


def test_move_between_devices():
    bn = xbn.BatchNorm1d(3, backend="array_api_strict")
    bn(_on(np.random.default_rng(5).normal(size=(6, 3)), "CPU_DEVICE", xs.float32))
    bn.backward(_on(np.ones((6, 3)), "CPU_DEVICE", xs.float32))
    before = snapshot(bn)
    bn.to(device="device1")
    assert bn.device == xs.Device("device1")
    assert all(a.device == xs.Device("device1") for a in _all_state_arrays(bn).values())
    assert snapshot(bn) == before


@pytest.mark.parametrize("api_version", ["2023.12", "2024.12"])
def test_older_standard_versions_and_strict_flags(api_version):
    """Nothing relies on features newer than the 2023.12 standard, boolean indexing, or
    data-dependent shapes: a training and an eval step give the reference's values."""
    rng = np.random.default_rng(6)
    x64, dy64 = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    with xs.ArrayAPIStrictFlags(api_version=api_version, boolean_indexing=False, data_dependent_shapes=False):
        bn = xbn.BatchNorm(3, axis=-1, backend="array_api_strict", device="device1")
        x, dy = _on(x64, "device1", xs.float32), _on(dy64, "device1", xs.float32)
        y_train = bn(x)
        dx_train = bn.backward(dy)
        bn.eval()
        y_eval = bn(x)
        dx_eval = bn.backward(dy)
        before = snapshot(bn)
        bn.load_state_dict(bn.state_dict())
        assert snapshot(bn) == before
    # the reference sees the inputs as the layer did, rounded to float32
    x64, dy64 = to_numpy(x).astype(np.float64), to_numpy(dy).astype(np.float64)
    assert_close(to_numpy(y_train), ref.forward(x64, axis=-1)["y"], 1e-5, "train y")
    assert_close(to_numpy(dx_train), ref.backward(dy64, x64, axis=-1)["dx"], 1e-4, "train dx")
    rm, rv, _ = ref.update_running(np.zeros(3), np.ones(3), x64, axis=-1)
    assert_close(to_numpy(bn.running_mean), rm, 1e-5, "running_mean")
    assert_close(to_numpy(bn.running_var), rv, 1e-5, "running_var")
    stats = dict(axis=-1, running_mean=rm, running_var=rv, use_batch_stats=False)
    assert_close(to_numpy(y_eval), ref.forward(x64, **stats)["y"], 1e-5, "eval y")
    assert_close(to_numpy(dx_eval), ref.backward(dy64, x64, **stats)["dx"], 1e-4, "eval dx")


def test_float64_layer_on_a_device_without_float64_fails_at_construction():
    with pytest.raises(ValueError, match="does not support dtype"):
        xbn.BatchNorm1d(3, backend="array_api_strict", device="no_float64", dtype="float64")
    bn = xbn.BatchNorm1d(3, backend="array_api_strict", device="no_float64")  # float32 works
    rng = np.random.default_rng(7)
    x = _on(rng.normal(size=(4, 3)), "no_float64", xs.float32)
    dy = _on(rng.normal(size=(4, 3)), "no_float64", xs.float32)
    y = bn(x)
    dx = bn.backward(dy)
    x64, dy64 = to_numpy(x).astype(np.float64), to_numpy(dy).astype(np.float64)
    assert_close(to_numpy(y), ref.forward(x64, axis=1)["y"], 1e-5, "y")
    assert_close(to_numpy(dx), ref.backward(dy64, x64, axis=1)["dx"], 1e-4, "dx")
