"""BatchNorm in a trained model: fold it into the layer before it, or freeze its statistics.

In eval mode a BatchNorm is a per-channel affine map, y = z * s + (beta - mean * s) with
s = gamma / sqrt(running_var + eps), so a Linear or convolution followed by it is one layer with
weight W * s (each output channel's row scaled) and bias (b - mean) * s + beta. Folding removes
the BN's pass over the activations at inference. The fold is computed in float64 where the
backend has it (float32 otherwise) and cast back, so the folded layer keeps its dtypes.

A BN folds when it normalizes with its running statistics: in eval mode, or frozen (a frozen BN
uses the running statistics in training mode too, so its output is the same affine map). A BN
in training mode that is not frozen, or one without running statistics, normalizes with each
batch's statistics and cannot be folded: that is an error, not a silent approximation.

Examples
--------
>>> import numpy as np, xbn
>>> model = xbn.nn.Sequential(xbn.nn.Linear(4, 3, backend="numpy", seed=0),
...                           xbn.BatchNorm1d(3, backend="numpy"), xbn.nn.ReLU())
>>> x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
>>> _ = model(x)                           # one training step moves the running statistics
>>> folded = xbn.fold_batchnorm(model.eval())
>>> folded
Sequential(
  (0): Linear(in_features=4, out_features=3, bias=True, backend='numpy')
  (1): Identity()
  (2): ReLU()
)
>>> bool(np.allclose(folded(x), model(x), atol=1e-6))
True
"""

from __future__ import annotations

import copy
from typing import Any

from . import _arrays
from . import nn as _nn
from .layers import BatchNorm
from .module import Module, Parameter

Array = Any

__all__ = ["fold_into_linear", "fold_into_conv", "fold_batchnorm", "freeze_batchnorm"]


def _check_foldable(bn: Any, what: str = "bn") -> BatchNorm:
    """``bn`` must normalize with running statistics it has (eval, or frozen)."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"{what} must be an xbn.BatchNorm, got {type(bn).__name__}")
    if bn.num_features is None:
        raise ValueError(f"{what} is a lazy layer that has not seen an input yet: run one forward first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{what} has no running statistics (track_running_stats=False): it normalizes with each "
            "batch's statistics, which no fixed weight can reproduce"
        )
    if bn.training and not bn.frozen:
        raise ValueError(
            f"{what} is in training mode: it normalizes with each batch's statistics; call eval() "
            "on it (or on the model) first, or freeze it"
        )
    return bn


def _work_dtype(xp: Any, device: Any, dtypes: list[Any]) -> Any:
    """float64 where the backend and device have it; otherwise the widest of ``dtypes``."""
    try:
        xp.zeros((1,), dtype=xp.float64, device=device)
        return xp.float64
    except Exception:  # e.g. torch on Apple's MPS, which has no float64
        return xp.result_type(*dtypes)


def _fold(weight: Array, bias: Array | None, bn: Any, *, linear: bool) -> tuple[Array, Array]:
    bn = _check_foldable(bn)
    layer = "Linear" if linear else "convolution"
    backend = bn._backend
    xp, c = backend.xp, bn.num_features
    weight = _arrays.check_array(backend, weight, "weight")
    if not xp.isdtype(weight.dtype, "real floating"):
        raise TypeError(f"weight must have a real floating dtype, got {weight.dtype}")
    if (weight.ndim != 2) if linear else (weight.ndim < 3):
        expected = (
            "(out_features, in_features)" if linear else "(out_channels, in_channels / groups, *kernel)"
        )
        raise ValueError(f"a {layer} weight has shape {expected}, got shape {tuple(weight.shape)}")
    if weight.shape[0] != c:
        raise ValueError(
            f"the {layer} has {weight.shape[0]} outputs (weight shape {tuple(weight.shape)}) but bn "
            f"normalizes {c} channels"
        )
    if bias is not None:
        bias = _arrays.check_array(backend, bias, "bias")
        if not xp.isdtype(bias.dtype, "real floating"):
            raise TypeError(f"bias must have a real floating dtype, got {bias.dtype}")
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must have shape ({c},), got {tuple(bias.shape)}")

    weight = _arrays.detach(weight)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    work = _work_dtype(xp, backend.device, [weight.dtype, bias_dtype, bn.dtype])

    def cast(a: Array) -> Array:
        a = _arrays.detach(a)
        return a if a.dtype == work else xp.astype(a, work)

    scale = 1.0 / xp.sqrt(cast(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * cast(bn.weight.data)
    shift = -cast(bn.running_mean) if bias is None else cast(bias) - cast(bn.running_mean)
    shift = shift * scale
    if bn.bias is not None:
        shift = shift + cast(bn.bias.data)
    w = cast(weight) * xp.reshape(scale, (c,) + (1,) * (weight.ndim - 1))
    return xp.astype(w, weight.dtype), xp.astype(shift, bias_dtype)


def fold_into_linear(weight: Array, bias: Array | None, bn: BatchNorm, /) -> tuple[Array, Array]:
    """(weight, bias) of a Linear layer equal to that layer followed by the eval-mode ``bn``.

    Parameters
    ----------
    weight
        (out_features, in_features), as PyTorch and :class:`xbn.nn.Linear` store it; an array of
        ``bn``'s backend and device.
    bias
        (out_features,), or None for a layer without bias (the result has one).
    bn
        A BatchNorm over out_features channels that normalizes with running statistics: in eval
        mode, or frozen.

    Returns
    -------
    weight, bias
        New arrays, in the dtypes of ``weight`` and ``bias`` (``weight``'s when bias is None),
        computed in float64 where the backend has it.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> bn = xbn.BatchNorm1d(2, backend="numpy", dtype="float64").eval()
    >>> bn.running_mean, bn.running_var = np.array([1.0, -1.0]), np.array([4.0, 0.25])
    >>> bn.eps = 0.0
    >>> w, b = xbn.fold_into_linear(np.ones((2, 3)), None, bn)
    >>> w.tolist(), b.tolist()
    ([[0.5, 0.5, 0.5], [2.0, 2.0, 2.0]], [-0.5, 2.0])
    """
    return _fold(weight, bias, bn, linear=True)


def fold_into_conv(weight: Array, bias: Array | None, bn: BatchNorm, /) -> tuple[Array, Array]:
    """(weight, bias) of a convolution equal to it followed by the eval-mode ``bn``.

    Parameters
    ----------
    weight
        (out_channels, in_channels / groups, *kernel), as PyTorch stores it (any number of
        spatial axes, any groups); an array of ``bn``'s backend and device.
    bias
        (out_channels,), or None (the result has one).
    bn
        A BatchNorm over out_channels channels that normalizes with running statistics.

    Returns
    -------
    weight, bias
        As for :func:`fold_into_linear`.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> bn = xbn.BatchNorm2d(2, backend="numpy", dtype="float64").eval()
    >>> bn.running_var, bn.eps = np.array([4.0, 1.0]), 0.0
    >>> w, b = xbn.fold_into_conv(np.ones((2, 1, 3, 3)), np.array([2.0, 2.0]), bn)
    >>> w[:, 0, 0, 0].tolist(), b.tolist()
    ([0.5, 1.0], [1.0, 2.0])
    """
    return _fold(weight, bias, bn, linear=False)


def _follows(bn: Module, rank: int) -> bool:
    """Whether ``bn`` normalizes axis 1 of the rank-``rank`` output of the layer before it."""
    if not isinstance(bn, BatchNorm):
        return False
    valid = bn._valid_ndims
    return (valid is None or rank in valid) and bn.axis in (1, 1 - rank)


def _pairs(model: Module) -> list[tuple[str, Module, str, Module, str]]:
    """(path of the container, the container, layer name, layer, BN name) for every foldable pair:
    a Linear (or Conv2d) directly followed by a BatchNorm over its output, in a Sequential."""
    conv = getattr(_nn, "Conv2d", None)
    found: list[tuple[str, Module, str, Module, str]] = []
    for path, m in model.named_modules():
        if not isinstance(m, _nn.Sequential):
            continue
        children = list(m.named_children())
        i = 0
        while i + 1 < len(children):
            (name, layer), (bn_name, bn) = children[i], children[i + 1]
            if (isinstance(layer, _nn.Linear) and _follows(bn, 2)) or (
                conv is not None and isinstance(layer, conv) and _follows(bn, 4)
            ):
                found.append((path, m, name, layer, bn_name))
                i += 2
            else:
                i += 1
    return found


def _uses(model: Module) -> dict[int, int]:
    """How many times each module appears in the tree (a shared module is one object, many uses)."""
    counts: dict[int, int] = {}
    for m in model.modules():
        for child in m.children():
            counts[id(child)] = counts.get(id(child), 0) + 1
    return counts


def fold_batchnorm(model: Module) -> Module:
    """A copy of ``model`` with each BatchNorm folded into the Linear or Conv2d right before it.

    In every :class:`xbn.nn.Sequential` of the tree, each ``Linear -> BatchNorm1d`` pair (a
    BatchNorm normalizing axis 1 of 2-D inputs) and each ``Conv2d -> BatchNorm2d`` pair (where
    ``xbn.nn.Conv2d`` exists) becomes the folded layer followed by :class:`xbn.nn.Identity`, so
    positions and the other state_dict keys stay as they were, as in torch's fusion. A layer
    without bias gets one. The folded layers' gradients are cleared (they were of other weights).
    Other BatchNorms are left as they are. The model itself is not changed.

    Raises
    ------
    ValueError
        If a BatchNorm of a pair cannot be folded (training mode and not frozen, no running
        statistics, lazy), or a layer of a pair is used more than once in the tree (folding it
        would change its other uses).

    Examples
    --------
    >>> import xbn
    >>> model = xbn.nn.Sequential(xbn.nn.Linear(4, 3, bias=False, backend="numpy", seed=0),
    ...                           xbn.BatchNorm1d(3, backend="numpy")).eval()
    >>> list(xbn.fold_batchnorm(model).state_dict())
    ['0.weight', '0.bias']
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be an xbn.Module, got {type(model).__name__}")
    # Everything is checked and computed on the copy: a failure leaves nothing behind.
    folded = copy.deepcopy(model)
    pairs = _pairs(folded)
    uses = _uses(folded)
    updates = []
    for path, seq, name, layer, bn_name in pairs:
        where = f"{path}.{bn_name}" if path else bn_name
        bn = getattr(seq, bn_name)
        for mod, label in ((layer, f"{path}.{name}" if path else name), (bn, where)):
            if uses.get(id(mod), 0) > 1:
                raise ValueError(
                    f"module {label!r} is used more than once in the model: folding it would change "
                    "its other uses"
                )
        _check_foldable(bn, what=f"BatchNorm {where!r}")
        fold = fold_into_linear if isinstance(layer, _nn.Linear) else fold_into_conv
        bias = layer.bias.data if layer.bias is not None else None
        updates.append((seq, layer, bn_name, fold(layer.weight.data, bias, bn)))
    for seq, layer, bn_name, (w, b) in updates:
        layer.weight.data, layer.weight.grad = w, None
        if layer.bias is None:
            layer.register_parameter("bias", Parameter(b))
        else:
            layer.bias.data, layer.bias.grad = b, None
        # in place: add_module would move the name to the end, and a Sequential runs in order
        seq._modules[bn_name] = _nn.Identity()
    return folded


def freeze_batchnorm(model: Module, *, frozen: bool = True) -> Module:
    """Set ``frozen`` on every BatchNorm of the tree (subclasses included); returns ``model``.

    A frozen BatchNorm normalizes with its running statistics in training mode too, never
    updates them, and stays frozen through ``model.train()``: the usual setting for fine-tuning
    with small batches. ``frozen=False`` unfreezes them all.

    Raises
    ------
    ValueError
        With ``frozen=True``, if some BatchNorm has no running statistics to freeze (nothing is
        changed then).

    Examples
    --------
    >>> import xbn
    >>> model = xbn.nn.Sequential(xbn.nn.Linear(4, 3, backend="numpy", seed=0),
    ...                           xbn.BatchNorm1d(3, backend="numpy"))
    >>> xbn.freeze_batchnorm(model) is model, model[1].frozen, model.train()[1].frozen
    (True, True, True)
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be an xbn.Module, got {type(model).__name__}")
    frozen = _arrays.check_bool("frozen", frozen)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNorm)]
    if frozen:
        untracked = [name or "(the model)" for name, m in layers if not m.track_running_stats]
        if untracked:
            raise ValueError(
                "cannot freeze BatchNorms without running statistics (track_running_stats=False): "
                f"{untracked}"
            )
    for _, m in layers:
        m.frozen = frozen
    return model
