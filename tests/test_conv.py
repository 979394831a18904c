"""xbn.nn.Conv2d, GlobalAvgPool2d and Flatten: torch parity, finite differences, state_dict
interchange with torch.nn.Conv2d, and the checks, on every backend tier.

Parity tolerances are relative to the max abs of torch's value, as in test_torch_parity.py:
float64 1e-10, float32 1e-5 (the sums here have at most a few hundred terms).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import xbn
from xbn._reference import assert_close, to_numpy
from xbn.nn import Conv2d, Flatten, GlobalAvgPool2d, Linear, ReLU, Sequential

from reference import numerical_grad, to_backend

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch parity needs torch installed")

TOL = {"float32": 1e-5, "float64": 1e-10}
FD_H = 1e-6
FD_TOL = 1e-6  # central differences, h = 1e-6, float64: truncation and roundoff ~1e-9 relative

# (in, out, kernel, stride, padding, input H x W)
CONFIGS = [
    (1, 4, 3, 1, 1, (8, 8)),
    (3, 5, 3, 2, 1, (9, 7)),
    (2, 3, (3, 2), (2, 1), (1, 0), (6, 5)),
    (4, 2, 1, 1, 0, (3, 4)),
    (2, 6, 2, 3, 2, (5, 5)),  # stride beyond the kernel: some inputs meet no weight
    (3, 4, 5, 1, 2, (4, 4)),  # kernel larger than the unpadded input
]
CONFIG_IDS = ["1to4-k3-s1-p1", "3to5-k3-s2-p1", "k3x2-s2x1-p1x0", "1x1", "k2-s3-p2", "k5-p2-small"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: torch's intra-op threads would only add synchronization on a shared machine."""
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _conv(backend, cin, cout, k, stride, pad, dtype="float64", **kw):
    return Conv2d(
        cin,
        cout,
        k,
        stride=stride,
        padding=pad,
        backend=backend.name,
        device=backend.device,
        dtype=dtype,
        **kw,
    )


# -- torch parity ----------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_matches_torch_conv2d(backend, cin, cout, k, stride, pad, hw, dtype, bias):
    rng = np.random.default_rng(0)
    conv = _conv(backend, cin, cout, k, stride, pad, dtype=dtype, bias=bias, seed=3)
    tdt = getattr(torch, dtype)
    ref = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias, dtype=tdt)
    ref.load_state_dict({k_: torch.from_numpy(to_numpy(v)) for k_, v in conv.state_dict().items()})
    x = rng.normal(size=(3, cin, *hw)).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = ref(tx)
    dy = rng.normal(size=tuple(ty.shape)).astype(dtype)
    ty.backward(torch.from_numpy(dy))

    y = conv.forward(to_backend(backend, x))
    dx = conv.backward(to_backend(backend, dy))
    tol = TOL[dtype]
    assert y.dtype == conv.dtype and dx.dtype == conv.dtype
    assert_close(to_numpy(y), ty.detach().numpy(), tol, "y")
    assert_close(to_numpy(dx), tx.grad.numpy(), tol, "dx")
    assert_close(to_numpy(conv.weight.grad), ref.weight.grad.numpy(), tol, "dW")
    if bias:
        assert_close(to_numpy(conv.bias.grad), ref.bias.grad.numpy(), tol, "db")
    else:
        assert conv.bias is None and list(conv.state_dict()) == ["weight"]


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pool_and_flatten_match_torch(backend, dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 5, 6)).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.Flatten()(torch.nn.AdaptiveAvgPool2d(1)(tx))
    dy = rng.normal(size=tuple(ty.shape)).astype(dtype)
    ty.backward(torch.from_numpy(dy))
    pool, flat = GlobalAvgPool2d(), Flatten()
    y = flat(pool(to_backend(backend, x)))
    dx = pool.backward(flat.backward(to_backend(backend, dy)))
    assert tuple(y.shape) == (4, 3) and tuple(dx.shape) == x.shape
    assert_close(to_numpy(y), ty.detach().numpy(), TOL[dtype], "y")
    assert_close(to_numpy(dx), tx.grad.numpy(), TOL[dtype], "dx")


@needs_torch
def test_small_convnet_with_batchnorm_matches_torch(backend):
    """Conv -> BatchNorm2d -> ReLU -> Conv -> pool -> Linear, one training step, against torch."""
    rng = np.random.default_rng(2)
    kw = dict(backend=backend.name, device=backend.device, dtype="float64")
    net = Sequential(
        Conv2d(2, 4, 3, padding=1, seed=0, **kw),
        xbn.BatchNorm2d(4, **kw),
        ReLU(),
        Conv2d(4, 6, 3, stride=2, seed=1, **kw),
        GlobalAvgPool2d(),
        Flatten(),
        Linear(6, 3, seed=2, **kw),
    )
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 3),
    ).double()
    ref.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in net.state_dict().items()})
    x = rng.normal(size=(5, 2, 7, 7))
    dy = rng.normal(size=(5, 3))
    tx = torch.tensor(x, requires_grad=True)
    ty = ref(tx)
    ty.backward(torch.from_numpy(dy))
    y = net.forward(to_backend(backend, x))
    dx = net.backward(to_backend(backend, dy))
    assert_close(to_numpy(y), ty.detach().numpy(), 1e-10, "y")
    assert_close(to_numpy(dx), tx.grad.numpy(), 1e-10, "dx")
    grads = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        # The conv bias before BatchNorm has a zero gradient (BN removes the mean): both sides
        # give roundoff, so measure against a floor.
        assert_close(to_numpy(p.grad), grads[name].grad.numpy(), 1e-10, name, scale=1e-3)
    sd = ref.state_dict()
    for name, v in net.state_dict().items():
        assert_close(to_numpy(v), sd[name].numpy(), 1e-10, name)


# -- state_dict interchange and initialization -----------------------------------------------


@needs_torch
def test_state_dict_interchanges_with_torch_conv2d(backend):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 0))
    conv = _conv(backend, 3, 5, (3, 2), 2, (1, 0), dtype="float32", seed=9)
    assert list(conv.state_dict()) == list(ref.state_dict())
    # torch -> xbn: torch's own tensors load as they are, and give torch's outputs
    conv.load_state_dict(ref.state_dict())
    for name, v in ref.state_dict().items():
        np.testing.assert_array_equal(to_numpy(conv.state_dict()[name]), v.numpy())
    x = np.random.default_rng(3).normal(size=(2, 3, 6, 5)).astype(np.float32)
    assert_close(to_numpy(conv(to_backend(backend, x))), ref(torch.from_numpy(x)).detach().numpy(), 1e-5, "y")
    # xbn -> torch: exact, through the host
    other = _conv(backend, 3, 5, (3, 2), 2, (1, 0), dtype="float32", seed=10)
    back = torch.nn.Conv2d(3, 5, (3, 2), stride=2, padding=(1, 0))
    back.load_state_dict({k: torch.from_numpy(to_numpy(v)) for k, v in other.state_dict().items()})
    for name, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), to_numpy(getattr(other, name).data))


@pytest.mark.parametrize("cin,k", [(1, 3), (16, 3), (4, (1, 5))])
def test_initialization_is_torchs_distribution(backend, cin, k):
    """Uniform in +-1/sqrt(in*kh*kw) for weight and bias, as torch's kaiming_uniform(a=sqrt(5))."""
    conv = _conv(backend, cin, 64, k, 1, 0, seed=0)
    kh, kw = (k, k) if isinstance(k, int) else k
    bound = 1 / math.sqrt(cin * kh * kw)
    w, b = to_numpy(conv.weight.data), to_numpy(conv.bias.data)
    assert w.shape == (64, cin, kh, kw) and b.shape == (64,)
    for a in (w, b):
        assert np.all(np.abs(a) <= bound)
        assert np.max(np.abs(a)) > 0.9 * bound  # fills the range, not a narrower one
    # The weight's mean and variance are those of U(-bound, bound) (n >= 320 draws).
    assert abs(w.mean()) < 4 * bound / math.sqrt(3 * w.size)
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.25)
    same = _conv(backend, cin, 64, k, 1, 0, seed=0)
    np.testing.assert_array_equal(to_numpy(same.weight.data), w)
    assert not np.array_equal(to_numpy(_conv(backend, cin, 64, k, 1, 0, seed=1).weight.data), w)


def test_a_shared_generator_draws_the_next_values():
    rng = np.random.default_rng(0)
    a = Conv2d(2, 3, 3, backend="numpy", rng=rng)
    b = Conv2d(2, 3, 3, backend="numpy", rng=rng)
    assert not np.array_equal(a.weight.data, b.weight.data)
    with pytest.raises(ValueError, match="rng or seed"):
        Conv2d(2, 3, 3, backend="numpy", rng=rng, seed=0)


# -- finite differences ----------------------------------------------------------------------


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", CONFIGS[1:5], ids=CONFIG_IDS[1:5])
def test_conv_finite_differences(backend, cin, cout, k, stride, pad, hw):
    rng = np.random.default_rng(4)
    conv = _conv(backend, cin, cout, k, stride, pad, seed=5)
    x = rng.normal(size=(2, cin, *hw))
    w, b = to_numpy(conv.weight.data).copy(), to_numpy(conv.bias.data).copy()
    n, o, ho, wo = conv.output_shape(x.shape)
    r = rng.normal(size=(n, o, ho, wo))  # L = sum(y * r)

    def loss():
        conv.weight.data, conv.bias.data = to_backend(backend, w), to_backend(backend, b)
        return float(np.sum(to_numpy(conv.forward(to_backend(backend, x))) * r))

    num = {name: numerical_grad(lambda _: loss(), a, FD_H) for name, a in (("dx", x), ("dW", w), ("db", b))}
    loss()
    dx = conv.backward(to_backend(backend, r))
    assert_close(to_numpy(dx), num["dx"], FD_TOL, "dx")
    assert_close(to_numpy(conv.weight.grad), num["dW"], FD_TOL, "dW")
    assert_close(to_numpy(conv.bias.grad), num["db"], FD_TOL, "db")


def test_pool_and_flatten_finite_differences(backend):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 3, 2))
    r = rng.normal(size=(2, 3))
    pool, flat = GlobalAvgPool2d(), Flatten()

    def loss():
        return float(np.sum(to_numpy(flat(pool(to_backend(backend, x)))) * r))

    num = numerical_grad(lambda _: loss(), x, FD_H)
    loss()
    dx = pool.backward(flat.backward(to_backend(backend, r)))
    assert_close(to_numpy(dx), num, FD_TOL, "dx")


# -- the layer protocol and the checks -------------------------------------------------------


def test_grads_accumulate_and_one_backward_per_forward(backend):
    conv = _conv(backend, 2, 3, 3, 1, 1, seed=0)
    x = to_backend(backend, np.ones((2, 2, 4, 4)))
    dy = to_backend(backend, np.ones((2, 3, 4, 4)))
    conv.forward(x)
    conv.backward(dy)
    once = to_numpy(conv.weight.grad)
    with pytest.raises(xbn.BackwardBeforeForwardError):
        conv.backward(dy)
    conv.forward(x)
    conv.backward(dy)
    np.testing.assert_array_equal(to_numpy(conv.weight.grad), 2 * once)
    for layer, shape in ((GlobalAvgPool2d(), (2, 3, 1, 1)), (Flatten(), (2, 48))):
        layer.forward(dy)
        layer.backward(to_backend(backend, np.ones(shape)))
        with pytest.raises(xbn.BackwardBeforeForwardError):
            layer.backward(to_backend(backend, np.ones(shape)))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
        (dict(kernel_size=(3,)), TypeError, "kernel_size must be an int or a pair"),
        (dict(kernel_size=2.0), TypeError, "kernel_size must be an int or a pair"),
        (dict(kernel_size=True), TypeError, "kernel_size must be an int or a pair"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(stride=(1, 0)), ValueError, "stride must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(padding="same"), TypeError, "padding must be an int or a pair"),
        (dict(in_channels=0), ValueError, "in_channels must be a positive int"),
        (dict(out_channels=2.5), TypeError, "out_channels must be an int"),
        (dict(bias=1), TypeError, "bias must be a bool"),
        (dict(dtype="int32"), TypeError, "real floating"),
        (dict(rng=0), TypeError, "numpy.random.Generator"),
    ],
)
def test_constructor_rejects_bad_options(kwargs, exc, match):
    args = dict(in_channels=2, out_channels=3, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        Conv2d(
            args.pop("in_channels"),
            args.pop("out_channels"),
            args.pop("kernel_size"),
            backend="numpy",
            **args,
        )


def test_forward_and_backward_reject_bad_inputs_and_change_nothing(backend):
    conv = _conv(backend, 2, 3, 3, 1, 0, seed=0)
    good = to_backend(backend, np.ones((1, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, H, W\), got \(1, 3, 4, 4\)"):
        conv.forward(to_backend(backend, np.ones((1, 3, 4, 4))))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, H, W\)"):
        conv.forward(to_backend(backend, np.ones((2, 4, 4))))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv.forward(to_backend(backend, np.ones((1, 2, 2, 5))))
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        conv.forward(to_backend(backend, np.ones((1, 2, 4, 4), dtype=np.float32)))
    with pytest.raises(TypeError, match="must be an array of the layer's backend"):
        conv.forward([[1.0]])
    with pytest.raises(xbn.BackwardBeforeForwardError):
        conv.backward(to_backend(backend, np.ones((1, 3, 2, 2))))
    conv.forward(good)
    with pytest.raises(ValueError, match=r"dy must have shape \(1, 3, 2, 2\)"):
        conv.backward(to_backend(backend, np.ones((1, 3, 4, 4))))
    assert conv.weight.grad is None  # a rejected backward accumulates nothing ...
    conv.backward(to_backend(backend, np.ones((1, 3, 2, 2))))  # ... and keeps the forward
    assert conv.weight.grad is not None


def test_pool_and_flatten_reject_bad_inputs(backend):
    pool = GlobalAvgPool2d()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) input, got shape \(2, 3\)"):
        pool(to_backend(backend, np.ones((2, 3))))
    with pytest.raises(TypeError, match="real floating"):
        pool(to_backend(backend, np.ones((2, 3, 2, 2), dtype=np.int64)))
    with pytest.raises(TypeError, match="must be an array"):
        pool([1.0, 2.0])
    pool(to_backend(backend, np.ones((2, 3, 2, 2))))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 1, 1\)"):
        pool.backward(to_backend(backend, np.ones((2, 3))))
    flat = Flatten(start_dim=1, end_dim=2)
    assert tuple(flat(to_backend(backend, np.ones((2, 3, 4, 5)))).shape) == (2, 12, 5)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 12, 5\)"):
        flat.backward(to_backend(backend, np.ones((2, 60))))
    with pytest.raises(ValueError, match="must both lie in"):
        Flatten(start_dim=3)(to_backend(backend, np.ones((2, 3))))
    with pytest.raises(ValueError, match="comes after"):
        Flatten(start_dim=2, end_dim=1)(to_backend(backend, np.ones((2, 3, 4))))
    with pytest.raises(TypeError, match="start_dim must be an int"):
        Flatten(start_dim=1.0)


def test_repr_state_dict_and_moves():
    conv = Conv2d(1, 16, 3, padding=1, backend="numpy", seed=0)
    assert repr(conv) == (
        "Conv2d(1, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=True, backend='numpy')"
    )
    assert repr(Flatten()) == "Flatten(start_dim=1, end_dim=-1)"
    assert repr(GlobalAvgPool2d()) == "GlobalAvgPool2d()"
    copy = Conv2d(1, 16, 3, padding=1, backend="numpy", seed=1)
    copy.load_state_dict(conv.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 1, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(copy(x), conv(x))
    conv.to("array_api_strict")
    assert conv.backend == "array_api_strict" and conv.weight.shape == (16, 1, 3, 3)
