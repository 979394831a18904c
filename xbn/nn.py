"""Minimal network pieces around xbn's BatchNorm: Linear, ReLU, Sequential and a loss.

Enough to train a small MLP by hand (the ``xbn demo`` does), written against the Python Array
API so the same code runs on NumPy, CuPy, PyTorch tensors and array-api-strict. Every layer
follows the protocol of :class:`xbn.BatchNorm`: ``forward(x, training=None)`` caches what its
``backward(dy)`` needs, ``backward`` returns dx and accumulates parameter gradients into
``Parameter.grad`` (clear them with the optimizer's ``zero_grad()``), and ``parameters()`` lists
the :class:`xbn.Parameter` objects an :class:`xbn.optim.SGD` updates.

Initial weights are drawn on the host with NumPy from a seed and only then moved to the backend,
so a seed gives the same network on every backend, and two networks built from the same seed
(say, one with BatchNorm between its Linear layers and one without) start from identical
Linear weights.

Examples
--------
>>> import numpy as np, xbn
>>> from xbn.nn import Linear, ReLU, Sequential, softmax_cross_entropy
>>> rng = np.random.default_rng(0)
>>> net = Sequential(
...     Linear(4, 8, backend="numpy", rng=rng), xbn.BatchNorm1d(8, backend="numpy"), ReLU(),
...     Linear(8, 3, backend="numpy", rng=rng),
... )
>>> x = rng.normal(size=(16, 4)).astype(np.float32)
>>> labels = rng.integers(0, 3, size=16)
>>> loss, dlogits = softmax_cross_entropy(net(x), labels)
>>> dx = net.backward(dlogits)
>>> [p.shape for p in net.parameters()]
[(8, 4), (8,), (8,), (8,), (3, 8), (3,)]
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np

from . import _arrays
from ._conv import Conv2d, Flatten, GlobalAvgPool2d, init_weight_and_bias
from .backends import Backend
from .module import Module

Array = Any

__all__ = [
    "Linear",
    "ReLU",
    "Identity",
    "Sequential",
    "softmax_cross_entropy",
    "Conv2d",
    "GlobalAvgPool2d",
    "Flatten",
]


class Linear(Module):
    """y = x @ W.T + b for x of shape (N, in_features); W has PyTorch's shape (out, in).

    Initialized as ``torch.nn.Linear`` is: W and b uniform in +-1/sqrt(in_features) (this is
    Kaiming-uniform with a=sqrt(5)), drawn with NumPy on the host in float64 from ``rng`` (a
    ``numpy.random.Generator``) or ``seed``, then cast to ``dtype`` and moved to the backend.

    Parameters
    ----------
    in_features, out_features
        Sizes of the input and output feature axes.
    bias
        Whether to add a learnable bias.
    backend, device
        As for :class:`xbn.BatchNorm`: "auto", "numpy", "cupy", "torch", "array_api_strict",
        a namespace module, or an example array.
    dtype
        dtype of the parameters (inputs must have the same dtype).
    rng, seed
        Source of the initial weights: a NumPy Generator (shared by the layers of a network so
        each draws the next values), else a fresh Generator from ``seed``.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import Linear
    >>> lin = Linear(3, 2, backend="numpy", seed=0)
    >>> y = lin(np.ones((5, 3), dtype=np.float32))
    >>> y.shape, lin.weight.shape, lin.bias.shape
    ((5, 2), (2, 3), (2,))
    >>> dx = lin.backward(np.ones_like(y))
    >>> dx.shape, lin.weight.grad.shape
    ((5, 3), (2, 3))
    """

    _backend: Backend  # always set: a Linear owns arrays

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        backend: Any = "auto",
        device: Any = None,
        dtype: Any = "float32",
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        in_features = _arrays.check_positive_int("in_features", in_features)
        out_features = _arrays.check_positive_int("out_features", out_features)
        bias = _arrays.check_bool("bias", bias)
        rng = _arrays.check_rng(rng, seed)
        self._init_backend(backend, device, dtype)
        self.in_features, self.out_features = in_features, out_features
        init_weight_and_bias(self, (out_features, in_features), bias, rng)

    def forward(self, x: Array, training: bool | None = None) -> Array:
        """x @ W.T + b; ``training`` is accepted for the layer protocol and has no effect."""
        _arrays.check_training_flag(training, self.training)
        x = _arrays.check_array(self._backend, x, "input")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input of shape (N, {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self._dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {self._dtype}")
        xp = self.xp
        y = xp.matmul(x, xp.matrix_transpose(self.weight.data))
        if self.bias is not None:
            y = y + self.bias.data
        self._save_for_backward(x)
        return y

    def backward(self, dy: Array) -> Array:
        """dx = dy @ W; accumulates dW = dy.T @ x and db = sum(dy) over the batch."""
        x = self._saved_for_backward()
        dy = _arrays.check_array(self._backend, dy, "dy")
        if tuple(dy.shape) != (x.shape[0], self.out_features) or dy.dtype != x.dtype:
            raise ValueError(
                f"dy must have shape {(x.shape[0], self.out_features)} and dtype {x.dtype}, "
                f"got shape {tuple(dy.shape)} and dtype {dy.dtype}"
            )
        xp = self.xp
        dx = xp.matmul(dy, self.weight.data)
        self._accumulate_grad(self.weight, xp.matmul(xp.matrix_transpose(dy), x))
        if self.bias is not None:
            self._accumulate_grad(self.bias, xp.sum(dy, axis=0))
        self._release_saved()
        return dx

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )


class ReLU(Module):
    """max(x, 0) elementwise; the backward passes dy where x > 0 (the subgradient 0 at x == 0).

    Holds no arrays of its own, so it follows its input's namespace and device.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import ReLU
    >>> relu = ReLU()
    >>> relu(np.array([-1.0, 0.0, 2.0])).tolist()
    [0.0, 0.0, 2.0]
    >>> relu.backward(np.array([5.0, 5.0, 5.0])).tolist()
    [0.0, 0.0, 5.0]
    """

    def forward(self, x: Array, training: bool | None = None) -> Array:
        _arrays.check_training_flag(training, self.training)
        xp = array_api_compat.array_namespace(x)
        # where() rather than x * mask: -1.0 * 0 would give -0.0. zeros_like rather than a Python
        # scalar 0, which where() accepts only from the 2024.12 standard on.
        mask = x > 0
        self._save_for_backward(mask)
        return xp.where(mask, x, xp.zeros_like(x))

    def backward(self, dy: Array) -> Array:
        mask = self._saved_for_backward()
        if tuple(dy.shape) != tuple(mask.shape):
            raise ValueError(f"dy must have shape {tuple(mask.shape)}, got {tuple(dy.shape)}")
        xp = array_api_compat.array_namespace(dy)
        dx = xp.where(mask, dy, xp.zeros_like(dy))
        self._release_saved()
        return dx


class Identity(Module):
    """Returns its input; the backward returns dy. The stand-in for a layer folded away.

    :func:`xbn.fold_batchnorm` puts one where each folded BatchNorm was, so positions in a
    Sequential and the other state_dict keys stay as they were (as torch's fusion does). Holds
    no arrays; one backward per forward, as every layer.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import Identity
    >>> layer = Identity()
    >>> x = np.array([1.0, -2.0])
    >>> layer(x) is x, layer.backward(np.array([3.0, 4.0])).tolist()
    (True, [3.0, 4.0])
    """

    def forward(self, x: Array, training: bool | None = None) -> Array:
        _arrays.check_training_flag(training, self.training)
        if not hasattr(x, "shape"):
            raise TypeError(f"input must be an array, got {type(x).__name__}")
        self._save_for_backward(tuple(x.shape))
        return x

    def backward(self, dy: Array) -> Array:
        shape = self._saved_for_backward()
        if not hasattr(dy, "shape") or tuple(dy.shape) != shape:
            got = f"shape {tuple(dy.shape)}" if hasattr(dy, "shape") else type(dy).__name__
            raise ValueError(f"dy must have the input's shape {shape}, got {got}")
        self._release_saved()
        return dy


_TAKES_TRAINING: dict[type, bool] = {}


def _accepts_training(cls: type[Module]) -> bool:
    """Whether ``cls.forward`` takes ``training=`` (BatchNorm does; a user's module may not)."""
    takes = _TAKES_TRAINING.get(cls)
    if takes is None:
        try:
            takes = "training" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            takes = False
        _TAKES_TRAINING[cls] = takes
    return takes


class Sequential(Module):
    """Modules applied in order, registered as children "0", "1", ...; backward runs them in reverse.

    ``training`` given to ``forward`` is passed on to the layers that take it (BatchNorm does);
    ``train()`` and ``eval()`` set the mode of every layer.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> from xbn.nn import Linear, ReLU, Sequential
    >>> net = Sequential(Linear(2, 4, backend="numpy", seed=0), xbn.BatchNorm1d(4, backend="numpy"), ReLU())
    >>> len(net), len(net.parameters()), net.eval().training, net[1].training
    (3, 4, False, False)
    >>> list(net.state_dict())
    ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked']
    """

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for layer in layers:
            if not isinstance(layer, Module):
                raise TypeError(
                    "Sequential takes xbn.Module layers (with forward() and backward()), "
                    f"got {type(layer).__name__}"
                )
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    @property
    def layers(self) -> list[Module]:
        return list(self.children())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def forward(self, x: Array, training: bool | None = None) -> Array:
        _arrays.check_training_flag(training, self.training)
        # A layer deep in the model may reject what the ones before it made of x: undo their
        # updates then, so that a failed call leaves the whole model as it was.
        snapshot = self._snapshot()
        try:
            for layer in self.children():
                takes = training is not None and _accepts_training(type(layer))
                x = layer.forward(x, training=training) if takes else layer.forward(x)
        except BaseException:
            self._restore(snapshot)
            raise
        return x

    def backward(self, dy: Array) -> Array:
        snapshot = self._snapshot()
        try:
            for layer in reversed(self.layers):
                dy = layer.backward(dy)
        except BaseException:
            self._restore(snapshot)
            raise
        return dy


def softmax_cross_entropy(logits: Array, labels: Array, /) -> tuple[Array, Array]:
    """Mean cross-entropy of softmax(logits) against integer class labels, and its gradient.

    Parameters
    ----------
    logits
        (N, K) real floating array.
    labels
        (N,) integer class indices in [0, K), of the logits' namespace or anything ``asarray``
        takes (a NumPy array or list is moved to the logits' device).

    Returns
    -------
    loss
        0-d array in the logits' dtype: mean over the batch of logsumexp(z) - z[label].
    dlogits
        (N, K): (softmax(z) - onehot(label)) / N, the gradient of ``loss``.

    Subtracting the row maximum before exp keeps every exp <= 1, so large logits neither
    overflow nor lose the loss to inf - inf.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.nn import softmax_cross_entropy
    >>> loss, d = softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, 0.0]]), np.array([0, 1]))
    >>> round(float(loss), 6), d.round(4).tolist()
    (0.346574, [[0.0, 0.0], [0.25, -0.25]])
    """
    xp = array_api_compat.array_namespace(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"logits must have a real floating dtype, got {logits.dtype}")
    n, k = logits.shape
    dev = array_api_compat.device(logits)
    try:
        same_ns = array_api_compat.array_namespace(labels) is xp
    except TypeError:
        same_ns = False
    if not same_ns:
        labels = xp.asarray(np.asarray(labels), device=dev)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n == 0:
        raise ValueError("softmax_cross_entropy needs a non-empty batch")
    # One host sync per call: an out-of-range label would silently give a wrong loss otherwise.
    if bool(xp.any((labels < 0) | (labels >= k))):
        raise ValueError(f"labels must lie in [0, {k})")

    z = logits - xp.max(logits, axis=1, keepdims=True)
    e = xp.exp(z)
    sum_e = xp.sum(e, axis=1, keepdims=True)
    # Built by comparison: take_along_axis is missing from older namespaces.
    is_label = labels[:, None] == xp.arange(k, dtype=labels.dtype, device=dev)[None, :]
    # where(), not z * onehot: a logit of -inf elsewhere in the row must not turn 0 * -inf into NaN.
    z_label = xp.sum(xp.where(is_label, z, xp.zeros_like(z)), axis=1)
    loss = xp.mean(xp.log(sum_e)[:, 0] - z_label)
    dlogits = (e / sum_e - xp.astype(is_label, logits.dtype)) / n
    return loss, dlogits
