"""PyTorch parity: xbn layers and xbn.optim.SGD against torch.nn.BatchNorm*d and torch.optim.SGD.

Several training steps in lockstep (forward, backward, SGD step), then an eval step, comparing
outputs, dx, dgamma, dbeta, parameters, running statistics and num_batches_tracked. Tolerances
are relative to the max abs of torch's value: float64 1e-10, float32 1e-5.

Also the float64 reference itself (xbn._reference, which the other tiers and ``xbn parity``
compare against) against torch's layers in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tier needs torch installed")

import xbn  # noqa: E402
from xbn import _reference as ref  # noqa: E402
from xbn._reference import assert_close, rel_err, to_numpy  # noqa: E402

from reference import to_backend  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tensors are tiny: torch's intra-op threads only add synchronization (10x slower on
    a loaded 2-core machine), so this module runs torch single-threaded and restores it after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def f64(t):
    return t.detach().numpy().astype(np.float64)


TOL = {"float64": 1e-10, "float32": 1e-5}

# kind: (torch class, input rank, channels-last)
KINDS = {
    "1d-NC": (torch.nn.BatchNorm1d, 2, False),
    "1d-NCL": (torch.nn.BatchNorm1d, 3, False),
    "1d-NLC": (torch.nn.BatchNorm1d, 3, True),
    "2d": (torch.nn.BatchNorm2d, 4, False),
    "2d-NHWC": (torch.nn.BatchNorm2d, 4, True),
    "3d": (torch.nn.BatchNorm3d, 5, False),
    "3d-NDHWC": (torch.nn.BatchNorm3d, 5, True),
}

OPTIONS = {
    "defaults": dict(layer={}, sgd=dict(lr=0.1)),
    "cma-momentum": dict(layer=dict(momentum=None), sgd=dict(lr=0.05, momentum=0.9), nbt=2),
    "affine-off": dict(layer=dict(affine=False), sgd=None),
    "untracked-nesterov": dict(
        layer=dict(track_running_stats=False),
        sgd=dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    ),
    "eps-dampening": dict(
        layer=dict(momentum=0.3, eps=1e-3), sgd=dict(lr=0.2, momentum=0.5, dampening=0.3, weight_decay=0.05)
    ),
    "plain": dict(layer=dict(affine=False, track_running_stats=False), sgd=None),
    "eval-first": dict(layer=dict(momentum=0.7), sgd=dict(lr=0.1, weight_decay=0.1), eval_first=True),
}


def _random_shape(rng, rank, c, big=False):
    n = int(rng.integers(8, 17) if big else rng.integers(1, 5))
    spatial = [int(rng.integers(4, 9) if big else rng.integers(1, 4)) for _ in range(rank - 2)]
    if n == 1 and all(s == 1 for s in spatial):  # training needs > 1 value per channel
        n = 2
    return (n, c, *spatial)


def _well_conditioned(rng, shape):
    """(N, C, ...) data whose channels have mean ~N(0, 1) and std in [0.5, 3] exactly.

    A near-constant channel (std ~ sqrt(eps)) amplifies the float32 rounding of its mean by
    invstd ~ 300 in both libraries, differently; that is numerics (tests/test_numerics.py), not
    semantics, and with a few values per channel it happens by chance.
    """
    z = rng.normal(size=shape)
    red = tuple(i for i in range(len(shape)) if i != 1)
    z = (z - z.mean(axis=red, keepdims=True)) / z.std(axis=red, keepdims=True)
    bshape = [1] * len(shape)
    bshape[1] = shape[1]
    loc = rng.normal(size=shape[1]).reshape(bshape)
    return loc + rng.uniform(0.5, 3.0, shape[1]).reshape(bshape) * z


def _torch_layer(tcls, c, opt, dtype, rng):
    """A torch layer of OPTIONS ``opt`` with random parameters and running statistics."""
    tbn = tcls(c, **opt["layer"], dtype=getattr(torch, dtype))
    with torch.no_grad():
        if tbn.affine:
            tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)))
            tbn.bias.copy_(torch.from_numpy(rng.normal(size=c)))
        if tbn.track_running_stats:
            tbn.running_mean.copy_(torch.from_numpy(rng.normal(size=c)))
            tbn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, c)))
            tbn.num_batches_tracked.fill_(opt.get("nbt", 0))
    return tbn


def _torch_forward_backward(tbn, x, dy, channels_last):
    """torch's y and dx for the NumPy input x and upstream gradient dy (channels-last when asked:
    torch's layers take the channel on axis 1 only)."""
    xt = torch.tensor(x, requires_grad=True)
    yt = tbn(torch.movedim(xt, -1, 1) if channels_last else xt)
    if channels_last:
        yt = torch.movedim(yt, 1, -1)
    (yt * torch.from_numpy(dy)).sum().backward()
    return yt, xt.grad


def run_parity(backend, kind, option, dtype, seed, steps=3, big=False):
    """Run torch and xbn side by side; return {quantity: max relative error}."""
    tcls, rank, channels_last = KINDS[kind]
    opt = OPTIONS[option]
    rng = np.random.default_rng(seed)
    c = int(rng.integers(3, 9) if big else rng.integers(1, 5))
    tbn = _torch_layer(tcls, c, opt, dtype, rng)
    if channels_last:
        bn = xbn.BatchNorm(c, axis=-1, **opt["layer"], backend=backend.name, dtype=dtype)
    else:
        bn = getattr(xbn, tcls.__name__)(c, **opt["layer"], backend=backend.name, dtype=dtype)
    # exactly the conversion a user would write; torch updates its tensors in place afterwards
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})

    topt = xopt = None
    if opt["sgd"] is not None:
        topt = torch.optim.SGD(tbn.parameters(), **opt["sgd"])
        xopt = xbn.optim.SGD(bn.parameters(), **opt["sgd"])

    errs: dict[str, float] = {}

    def check(what, got, want, scale=0.0):
        """Relative error against torch, scaled by max|torch value| or by ``scale`` if larger.

        ``scale`` is the size of the terms a value is computed from, where they cancel: dx is
        gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), and with M = 2 values per
        channel xhat = +-sqrt(var / (var + eps)), so the exact dx is O(eps / var) of those terms
        and both libraries carry float32 roundoff of order 1e-7 * max|gamma * invstd * dy| in it
        (measured: torch and xbn both up to ~2e-1 off the float64 truth there, relative to max|dx|;
        from M = 3 on both are within 6e-6). Scaling by max|dx| alone would test roundoff noise.
        """
        got, want = to_numpy(got), want.detach().numpy() if hasattr(want, "detach") else want
        assert got.shape == tuple(want.shape), (what, got.shape, want.shape)
        assert str(got.dtype) == dtype, (what, got.dtype)
        e = assert_close(got, want, TOL[dtype], f"{kind}/{option}/{dtype}: {what}", scale=scale)
        errs[what] = max(errs.get(what, 0.0), e)
        errs[what + " (plain)"] = max(errs.get(what + " (plain)", 0.0), rel_err(got, want))

    modes = [False] + [True] * steps + [False] if opt.get("eval_first") else [True] * steps + [False]
    for training in modes:
        tbn.train(training)
        bn.train(training)
        shape = _random_shape(rng, rank, c, big)
        x = _well_conditioned(rng, shape)
        dy = rng.normal(size=shape)
        if channels_last:
            x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
        x, dy = np.ascontiguousarray(x, dtype=dtype), np.ascontiguousarray(dy, dtype=dtype)

        # torch first: its in-place updates must not reach the xbn layer
        if topt is not None:
            topt.zero_grad()
        yt, xt_grad = _torch_forward_backward(tbn, x, dy, channels_last)
        if topt is not None:
            xopt.zero_grad()
        y = bn(to_backend(backend, x))
        dx = bn.backward(to_backend(backend, dy))

        check("y", y, yt)
        if x.size // c == 2 and (training or not tbn.track_running_stats):
            # M = 2 values per channel: dx is O(eps / var) of its terms (see check), so it is
            # compared on the scale of its leading term gamma * invstd * dy
            w = f64(tbn.weight) if tbn.affine else np.ones(c)
            inv = ref.forward(x, axis=-1 if channels_last else 1, eps=tbn.eps)["invstd"]
            check("dx", dx, xt_grad, scale=float(np.abs(w * inv).max() * np.abs(dy).max()))
        else:
            check("dx", dx, xt_grad)
        if tbn.affine:
            check("dgamma", bn.weight.grad, tbn.weight.grad)
            check("dbeta", bn.bias.grad, tbn.bias.grad)
        if tbn.track_running_stats:
            assert bn.num_batches_tracked == int(tbn.num_batches_tracked)
            check("running_mean", bn.running_mean, tbn.running_mean)
            check("running_var", bn.running_var, tbn.running_var)
        else:
            assert bn.running_mean is None and bn.running_var is None
        if topt is not None:
            topt.step()
            xopt.step()
            check("weight", bn.weight.data, tbn.weight)
            check("bias", bn.bias.data, tbn.bias)

    # state_dict: same keys in the same order, same dtypes and shapes; loads back into torch
    sd = bn.state_dict()
    tsd = tbn.state_dict()
    assert list(sd) == list(tsd)
    for k, v in tsd.items():
        h = to_numpy(sd[k])
        assert h.dtype == v.numpy().dtype and h.shape == tuple(v.shape), k
        np.testing.assert_allclose(h, v.numpy(), rtol=TOL[dtype] * 10, atol=0)
    tbn2 = tcls(c, **opt["layer"], dtype=getattr(torch, dtype))
    tbn2.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in sd.items()})
    return errs


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_matches_torch(kind, option, training):
    """xbn._reference, which every tier and ``xbn parity`` are measured against, is torch's
    BatchNorm in float64: y, dx, dgamma, dbeta, running statistics and num_batches_tracked."""
    tcls, rank, channels_last = KINDS[kind]
    opt = OPTIONS[option]
    rng = np.random.default_rng(list(KINDS).index(kind) * 100 + list(OPTIONS).index(option))
    c = 3
    tbn = _torch_layer(tcls, c, opt, "float64", rng).train(training)
    before = {k: v.numpy().copy() for k, v in tbn.state_dict().items()}  # torch updates in place
    shape = (8, c) if rank == 2 else (4, c, *[3] * (rank - 2))
    x, dy = _well_conditioned(rng, shape), rng.normal(size=shape)
    if channels_last:
        x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
    yt, xt_grad = _torch_forward_backward(tbn, x, dy, channels_last)

    want = ref.layer_step(
        x,
        dy,
        axis=-1 if channels_last else 1,
        weight=before.get("weight"),
        bias=before.get("bias"),
        running_mean=before.get("running_mean"),
        running_var=before.get("running_var"),
        num_batches_tracked=int(before.get("num_batches_tracked", 0)),
        training=training,
        eps=tbn.eps,
        momentum=tbn.momentum,
    )
    got = {"y": yt, "dx": xt_grad}
    if tbn.affine:
        got["dgamma"], got["dbeta"] = tbn.weight.grad, tbn.bias.grad
    if training and tbn.track_running_stats:
        got["running_mean"], got["running_var"] = tbn.running_mean, tbn.running_var
        got["num_batches_tracked"] = int(tbn.num_batches_tracked)
    assert set(want) == set(got)
    assert want.pop("num_batches_tracked", None) == got.pop("num_batches_tracked", None)
    case = f"{kind}/{option}/{'train' if training else 'eval'}"
    for key, value in want.items():
        assert_close(to_numpy(got[key]), value, 1e-12, f"{case}: {key}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity(backend, kind, option, dtype):
    seed = (list(KINDS).index(kind) * 100 + list(OPTIONS).index(option)) * 7 + len(dtype)
    run_parity(backend, kind, option, dtype, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "kind,option",
    [
        ("1d-NC", "cma-momentum"),
        ("2d", "eps-dampening"),
        ("2d-NHWC", "defaults"),
        ("3d-NDHWC", "untracked-nesterov"),
    ],
)
def test_parity_larger_batches(backend, kind, option, dtype):
    """Up to ~16 x 8 x 8 x 8 values per channel: longer reductions than the random small shapes."""
    run_parity(backend, kind, option, dtype, seed=1000 + len(kind) + len(option), steps=2, big=True)


def test_defaults_match_torch(backend):
    for tcls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
        tbn = tcls(3)
        bn = getattr(xbn, tcls.__name__)(3, backend=backend.name)
        assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.training) == (
            tbn.eps,
            tbn.momentum,
            tbn.affine,
            tbn.track_running_stats,
            tbn.training,
        )
        for k, v in tbn.state_dict().items():
            h = to_numpy(bn.state_dict()[k])
            assert h.dtype == v.numpy().dtype and h.shape == tuple(v.shape)
            np.testing.assert_array_equal(h, v.numpy())


def test_one_value_per_channel_message_matches_torch(backend):
    with pytest.raises(ValueError) as t_err:
        torch.nn.BatchNorm1d(3)(torch.ones(1, 3))
    with pytest.raises(ValueError) as x_err:
        xbn.BatchNorm1d(3, backend=backend.name)(to_backend(backend, np.ones((1, 3), np.float32)))
    prefix = "Expected more than 1 value per channel when training, got input size"
    assert str(t_err.value).startswith(prefix) and str(x_err.value).startswith(prefix)
    assert "(1, 3)" in str(x_err.value)


def test_empty_batch_output_matches_torch(backend):
    tbn = torch.nn.BatchNorm2d(3)
    yt = tbn(torch.ones(0, 3, 2, 2))
    bn = xbn.BatchNorm2d(3, backend=backend.name)
    y = bn(to_backend(backend, np.ones((0, 3, 2, 2), np.float32)))
    assert to_numpy(y).shape == tuple(yt.shape)
