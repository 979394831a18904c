"""The pieces a small convnet needs around :class:`xbn.BatchNorm2d`: Conv2d, GlobalAvgPool2d, Flatten.

A support layer for the demo and the examples, not a convolution library: one formulation, NCHW
only, no dilation or groups. Written once against the Python Array API, so it runs on NumPy,
CuPy, PyTorch tensors and array-api-strict alike, and it follows the layer protocol of
:mod:`xbn.nn`: ``forward(x, training=None)`` saves what ``backward(dy)`` needs, ``backward``
returns dx and accumulates the parameter gradients.

How the convolution is computed (im2col): the padded input is held as (H, W, N, C). For each of
the kh*kw kernel offsets, one strided slice of it is that offset's input for every output pixel
of every image, a (Ho*Wo*N, C) matrix; side by side they are the columns (Ho*Wo*N, kh*kw*C),
and one matmul with the weight as (out, kh*kw*C) gives the output. The backward is one matmul
for dW, and per offset one matmul for its share of dx, added back into the padded slice. The
only Python loops run over kernel offsets.

The (H, W, N, C) layout is for the slices: each run of contiguous memory a slice touches holds
N*C values, where in NCHW it would hold Wo (8 in the demo); on the demo's shapes the slice
copies and additions took 2x less time in total, transposes to and from NCHW included.

Examples
--------
>>> import numpy as np, xbn
>>> from xbn.nn import Conv2d, Flatten, GlobalAvgPool2d, Linear, ReLU, Sequential
>>> net = Sequential(
...     Conv2d(1, 4, 3, padding=1, backend="numpy", seed=0), xbn.BatchNorm2d(4, backend="numpy"), ReLU(),
...     GlobalAvgPool2d(), Flatten(), Linear(4, 10, backend="numpy", seed=1))
>>> x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
>>> net(x).shape
(5, 10)
>>> net.backward(np.ones((5, 10), dtype=np.float32)).shape
(5, 1, 8, 8)
>>> list(net.state_dict())[:2]
['0.weight', '0.bias']
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from . import _arrays
from .backends import Backend
from .module import Module, Parameter

Array = Any

__all__ = ["Conv2d", "GlobalAvgPool2d", "Flatten"]


def init_weight_and_bias(module: Module, shape: tuple[int, ...], bias: bool, rng: Any) -> None:
    """PyTorch's default initialization of a weight of ``shape`` (out, in, ...) and, if
    ``bias``, a bias of ``out`` values: uniform on +-1/sqrt(fan_in), the weight drawn first."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    xp, dev, dt = module.xp, module.device, module._dtype
    w = rng.uniform(-bound, bound, size=shape)
    module.weight = Parameter(xp.asarray(w, dtype=dt, device=dev))
    b = rng.uniform(-bound, bound, size=(shape[0],)) if bias else None
    module.register_parameter("bias", None if b is None else Parameter(xp.asarray(b, dtype=dt, device=dev)))


def _pair(name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as a pair (torch's kernel_size/stride/padding)."""
    if _arrays.is_int(value):
        items: tuple[Any, ...] = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_arrays.is_int(v) for v in value):
        items = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


class Conv2d(Module):
    """2-D cross-correlation over NCHW inputs, as ``torch.nn.Conv2d`` with dilation 1 and groups 1.

    The weight has torch's shape ``(out_channels, in_channels, kh, kw)`` and the state_dict has
    torch's keys (``weight``, ``bias``), so state dicts interchange with ``torch.nn.Conv2d``.
    Initialized as torch initializes it: weight and bias uniform in +-1/sqrt(fan_in) with
    fan_in = in_channels*kh*kw (Kaiming-uniform with a=sqrt(5)), drawn with NumPy on the host in
    float64 from ``rng`` or ``seed``, weight first, then cast to ``dtype`` and moved.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and of the output.
    kernel_size
        kh and kw: an int or a pair.
    stride
        Step between output pixels: an int or a pair, each >= 1.
    padding
        Zeros added on both sides of H and W: an int or a pair, each >= 0.
    bias
        Whether to add a learnable per-channel bias.
    backend, device, dtype, rng, seed
        As for :class:`xbn.nn.Linear`.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import Conv2d
    >>> conv = Conv2d(3, 8, 3, stride=2, padding=1, backend="numpy", seed=0)
    >>> conv
    Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=True, backend='numpy')
    >>> y = conv(np.ones((2, 3, 9, 9), dtype=np.float32))
    >>> y.shape, conv.weight.shape
    ((2, 8, 5, 5), (8, 3, 3, 3))
    >>> dx = conv.backward(np.ones_like(y))
    >>> dx.shape, conv.weight.grad.shape, conv.bias.grad.shape
    ((2, 3, 9, 9), (8, 3, 3, 3), (8,))
    """

    _backend: Backend  # always set: __init__ resolves it before anything else

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        backend: Any = "auto",
        device: Any = None,
        dtype: Any = "float32",
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        in_channels = _arrays.check_positive_int("in_channels", in_channels)
        out_channels = _arrays.check_positive_int("out_channels", out_channels)
        kernel = _pair("kernel_size", kernel_size, minimum=1)
        strides = _pair("stride", stride, minimum=1)
        pads = _pair("padding", padding, minimum=0)
        bias = _arrays.check_bool("bias", bias)
        rng = _arrays.check_rng(rng, seed)
        self._init_backend(backend, device, dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel, strides, pads
        init_weight_and_bias(self, (out_channels, in_channels, *kernel), bias, rng)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(N, out_channels, Ho, Wo) for an input of shape (N, in_channels, H, W); checks it."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (N, {self.in_channels}, H, W), got {shape}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h, w = shape[2] + 2 * ph, shape[3] + 2 * pw
        if h < kh or w < kw:
            raise ValueError(
                f"input of spatial size {shape[2:]} with padding {self.padding} is smaller than "
                f"the kernel {self.kernel_size}"
            )
        return shape[0], self.out_channels, (h - kh) // sh + 1, (w - kw) // sw + 1

    def _offsets(self, ho: int, wo: int) -> list[tuple[int, int, slice, slice]]:
        """Per kernel offset (i, j), the rows and columns of the padded input it meets, one per
        output pixel."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return [
            (i, j, slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
            for i in range(kh)
            for j in range(kw)
        ]

    def _weight_matrix(self) -> Array:
        """The weight as (out, kh*kw*C), offset-major: the order of the columns."""
        xp, w = self.xp, self.weight.data
        return xp.reshape(xp.permute_dims(w, (0, 2, 3, 1)), (self.out_channels, -1))

    def forward(self, x: Array, training: bool | None = None) -> Array:
        """The convolution of ``x`` (N, C, H, W); ``training`` is accepted for the layer protocol
        and has no effect."""
        _arrays.check_training_flag(training, self.training)
        x = _arrays.check_array(self._backend, x, "input")
        n, o, ho, wo = self.output_shape(tuple(x.shape))
        if x.dtype != self._dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {self._dtype}")
        xp = self.xp
        c, h, w = x.shape[1:]
        ph, pw = self.padding
        # zeros plus a slice assignment: the standard has no pad(); the assignment also does the
        # transpose to (H, W, N, C)
        xpad = xp.zeros((h + 2 * ph, w + 2 * pw, n, c), dtype=x.dtype, device=self.device)
        xpad[ph : ph + h, pw : pw + w, :, :] = xp.permute_dims(x, (2, 3, 0, 1))
        patches = [
            xp.reshape(xpad[rows, cols, :, :], (ho * wo * n, c)) for _, _, rows, cols in self._offsets(ho, wo)
        ]
        columns = xp.concat(patches, axis=1)
        y = xp.matmul(columns, xp.matrix_transpose(self._weight_matrix()))
        if self.bias is not None:
            y = y + self.bias.data
        self._save_for_backward((columns, tuple(x.shape), (ho, wo)))
        return _to_nchw(xp, xp.reshape(y, (ho, wo, n, o)))

    def backward(self, dy: Array) -> Array:
        """dx of the last forward; accumulates dW and db into ``weight.grad`` and ``bias.grad``."""
        columns, x_shape, (ho, wo) = self._saved_for_backward()
        dy = _arrays.check_array(self._backend, dy, "dy")
        n, c, h, w = x_shape
        o = self.out_channels
        expected = (n, o, ho, wo)
        if tuple(dy.shape) != expected or dy.dtype != columns.dtype:
            raise ValueError(
                f"dy must have shape {expected} and dtype {columns.dtype}, "
                f"got shape {tuple(dy.shape)} and dtype {dy.dtype}"
            )
        xp = self.xp
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        dy2 = xp.reshape(xp.permute_dims(dy, (2, 3, 0, 1)), (ho * wo * n, o))
        weight = self.weight.data
        dxpad = xp.zeros((h + 2 * ph, w + 2 * pw, n, c), dtype=dy.dtype, device=self.device)
        # Offsets overlap when the stride is below the kernel size: each addition reads what the
        # ones before it wrote, so the sum is complete.
        for i, j, rows, cols in self._offsets(ho, wo):
            share = xp.reshape(xp.matmul(dy2, weight[:, :, i, j]), (ho, wo, n, c))
            dxpad[rows, cols, :, :] = dxpad[rows, cols, :, :] + share
        dx = _to_nchw(xp, dxpad[ph : ph + h, pw : pw + w, :, :])
        dw = xp.reshape(xp.matmul(xp.matrix_transpose(dy2), columns), (o, kh, kw, c))
        self._accumulate_grad(self.weight, _contiguous(xp, xp.permute_dims(dw, (0, 3, 1, 2))))
        if self.bias is not None:
            self._accumulate_grad(self.bias, xp.sum(dy2, axis=0))
        self._release_saved()
        return dx

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"backend={self.backend!r}"
        )


def _contiguous(xp: Any, a: Array) -> Array:
    """A C-contiguous copy of a strided view (after permute_dims).

    The reshape through 1-D makes the copy in row-major order; asarray(copy=True) would keep
    NumPy's strides, and a strided array reads slower in every later pass (BatchNorm's compiled
    loops, the next layer's slices, the optimizer's updates).
    """
    return xp.reshape(xp.reshape(a, (-1,)), tuple(a.shape))


def _to_nchw(xp: Any, a: Array) -> Array:
    """An (H, W, N, C) array as a C-contiguous (N, C, H, W) one."""
    return _contiguous(xp, xp.permute_dims(a, (2, 3, 0, 1)))


def _check_input(x: Any, what: str) -> Any:
    """The namespace of ``x``, which must be an array of a real floating dtype."""
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError:
        raise TypeError(f"{what} must be an array, got {_arrays.describe(x)}") from None
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{what} must have a real floating dtype, got {x.dtype}")
    return xp


class GlobalAvgPool2d(Module):
    """The mean over H and W of an (N, C, H, W) input, as (N, C, 1, 1).

    ``torch.nn.AdaptiveAvgPool2d(1)``, keeping torch's shape: follow it with :class:`Flatten` for
    a classifier. Holds no arrays, so it follows its input's namespace and device.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import GlobalAvgPool2d
    >>> pool = GlobalAvgPool2d()
    >>> pool(np.arange(8.0).reshape(1, 2, 2, 2)).ravel().tolist()
    [1.5, 5.5]
    >>> pool.backward(np.ones((1, 2, 1, 1))).ravel().tolist()
    [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    """

    def forward(self, x: Array, training: bool | None = None) -> Array:
        _arrays.check_training_flag(training, self.training)
        xp = _check_input(x, "input")
        if x.ndim != 4 or x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"expected a non-empty (N, C, H, W) input, got shape {tuple(x.shape)}")
        self._save_for_backward((tuple(x.shape), x.dtype))
        return xp.mean(x, axis=(2, 3), keepdims=True)

    def backward(self, dy: Array) -> Array:
        shape, dtype = self._saved_for_backward()
        xp = _check_input(dy, "dy")
        expected = (shape[0], shape[1], 1, 1)
        if tuple(dy.shape) != expected or dy.dtype != dtype:
            raise ValueError(
                f"dy must have shape {expected} and dtype {dtype}, "
                f"got shape {tuple(dy.shape)} and dtype {dy.dtype}"
            )
        # Written out rather than broadcast_to, whose NumPy result is a read-only view.
        dx = xp.zeros(shape, dtype=dtype, device=array_api_compat.device(dy)) + dy / (shape[2] * shape[3])
        self._release_saved()
        return dx


class Flatten(Module):
    """Axes ``start_dim`` to ``end_dim`` merged into one, as ``torch.nn.Flatten`` (default: all but N).

    Holds no arrays, so it follows its input's namespace and device.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import Flatten
    >>> flat = Flatten()
    >>> flat(np.zeros((2, 3, 1, 1))).shape
    (2, 3)
    >>> flat.backward(np.ones((2, 3))).shape
    (2, 3, 1, 1)
    """

    def __init__(self, *, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        for name, value in (("start_dim", start_dim), ("end_dim", end_dim)):
            if not _arrays.is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def forward(self, x: Array, training: bool | None = None) -> Array:
        _arrays.check_training_flag(training, self.training)
        try:
            xp = array_api_compat.array_namespace(x)
        except TypeError:
            raise TypeError(f"input must be an array, got {_arrays.describe(x)}") from None
        shape = tuple(x.shape)
        ndim, lo, hi = len(shape), self.start_dim, self.end_dim
        if not (-ndim <= lo < ndim and -ndim <= hi < ndim):
            raise ValueError(
                f"start_dim={lo} and end_dim={hi} must both lie in [{-ndim}, {ndim - 1}] for an "
                f"input of shape {shape}"
            )
        lo, hi = lo % ndim, hi % ndim
        if lo > hi:
            raise ValueError(
                f"start_dim={self.start_dim} comes after end_dim={self.end_dim} for input shape {shape}"
            )
        out_shape = (*shape[:lo], math.prod(shape[lo : hi + 1]), *shape[hi + 1 :])
        self._save_for_backward((shape, out_shape))
        return xp.reshape(x, out_shape)

    def backward(self, dy: Array) -> Array:
        shape, out_shape = self._saved_for_backward()
        try:
            xp = array_api_compat.array_namespace(dy)
        except TypeError:
            raise TypeError(f"dy must be an array, got {_arrays.describe(dy)}") from None
        if tuple(dy.shape) != out_shape:
            raise ValueError(f"dy must have shape {out_shape}, got {tuple(dy.shape)}")
        dx = xp.reshape(dy, shape)
        self._release_saved()
        return dx

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
