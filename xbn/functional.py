"""Batch normalization math as pure functions of Python Array API arrays.

Nothing here holds state or asks which library it runs on: every function takes arrays
(positional-only) and options (keyword-only), and finds the namespace with array-api-compat
unless ``xp=`` is given. The layers in :mod:`xbn.layers` orchestrate these functions; the fast
paths in :mod:`xbn.kernels` replace some of them one for one and are tested against them.

Statistics are accumulated in float32 for float16/bfloat16 inputs and in the input's own
precision otherwise (float64 stays float64). Per-channel vectors are 1-D arrays of length C.

Examples
--------
>>> import numpy as np
>>> from xbn import functional as F
>>> x = np.arange(12, dtype=np.float64).reshape(3, 2, 2)     # (N, C, L)
>>> mean, var = F.batch_stats(x, axis=1)
>>> mean.tolist(), var.tolist()
([4.5, 6.5], [10.916666666666666, 10.916666666666666])
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace

Array = Any

__all__ = [
    "compute_dtype",
    "reduction_axes",
    "per_channel",
    "batch_stats",
    "shift_of",
    "invstd",
    "scale_shift_coefficients",
    "scale_shift",
    "updated_running_stats",
    "backward_reduce",
    "backward_coefficients",
    "backward_apply",
    "normalize",
    "batch_norm_forward",
    "batch_norm_train",
    "batch_norm_backward",
    "batch_norm_inference",
    "eval_statistics",
    "values_per_channel",
]


def _ns(xp: ModuleType | None, *arrays: Array) -> ModuleType:
    return xp if xp is not None else array_namespace(*arrays)


def compute_dtype(dtype: Any, /, *, xp: ModuleType) -> Any:
    """The dtype statistics are accumulated in: float64 for float64, float32 for the rest.

    float16/bfloat16 sums lose digits after a few thousand terms, so they accumulate in float32.
    """
    return xp.float64 if dtype == xp.float64 else xp.float32


def _channel_axis(ndim: int, axis: int) -> int:
    """``axis`` as an index 0 <= axis < ndim; negative axes count from the end."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for a {ndim}-D array")
    return axis % ndim


def reduction_axes(ndim: int, axis: int, /) -> tuple[int, ...]:
    """Every axis but the channel axis (negative ``axis`` counts from the end, as everywhere)."""
    axis = _channel_axis(ndim, axis)
    return tuple(a for a in range(ndim) if a != axis)


def per_channel(v: Array, ndim: int, axis: int, /, *, xp: ModuleType | None = None) -> Array:
    """Reshape a (C,) vector so it broadcasts along ``axis`` of an ``ndim``-dimensional array."""
    xp = _ns(xp, v)
    shape = [1] * ndim
    shape[_channel_axis(ndim, axis)] = v.shape[0]
    return xp.reshape(v, tuple(shape))


def _cast(a: Array, dtype: Any, xp: ModuleType) -> Array:
    """``a`` in ``dtype``, without a copy when it already is (``astype`` always copies)."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _weight_times(inv: Array, weight: Array | None, xp: ModuleType) -> Array:
    """gamma * invstd per channel (invstd alone without affine parameters)."""
    return inv if weight is None else inv * _cast(weight, inv.dtype, xp)


def _as_compute(x: Array, xp: ModuleType) -> Array:
    return _cast(x, compute_dtype(x.dtype, xp=xp), xp)


def shift_of(first: Array, /, *, xp: ModuleType) -> Array:
    """The shift the statistics are taken about: each channel's first value, or 0 where it is
    not finite (an infinite shift would make every shifted value inf - inf = NaN, where torch's
    mean is that infinity)."""
    return xp.where(xp.isfinite(first), first, xp.zeros_like(first))


def batch_stats(x: Array, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Array, Array]:
    """Per-channel mean and biased variance of ``x``, in the compute dtype.

    Two passes (mean, then the mean of centered squares): E[x^2] - E[x]^2 cancels
    catastrophically in float32 when |mean| >> std (x = 1e4 + N(0, 1) loses every digit).
    The mean is taken of x shifted by each channel's first value, so a constant channel gets
    exactly its value as mean and then exactly 0 as variance (sum(c) / M rounds for most c),
    and a large common offset costs the mean no digits.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.functional import batch_stats
    >>> x = np.array([[1.0, 10.0], [3.0, 10.0]])
    >>> [v.tolist() for v in batch_stats(x, axis=1)]
    [[2.0, 10.0], [1.0, 0.0]]
    """
    xp = _ns(xp, x)
    xc = _as_compute(x, xp)
    axis = _channel_axis(x.ndim, axis)
    axes = reduction_axes(x.ndim, axis)
    if values_per_channel(tuple(x.shape), axis) > 0:
        first = shift_of(xc[tuple(slice(None) if a == axis else 0 for a in range(x.ndim))], xp=xp)
        mean = first + xp.mean(xc - per_channel(first, x.ndim, axis, xp=xp), axis=axes)
    else:
        mean = xp.mean(xc, axis=axes)
    # the second pass centres on the returned mean: the same (x - mean) the backward uses
    centered = xc - per_channel(mean, x.ndim, axis, xp=xp)
    var = xp.mean(centered * centered, axis=axes)
    return mean, var


def invstd(var: Array, /, *, eps: float, xp: ModuleType | None = None) -> Array:
    """1 / sqrt(var + eps), the factor PyTorch saves as ``save_invstd``."""
    xp = _ns(xp, var)
    return 1.0 / xp.sqrt(var + eps)


def scale_shift_coefficients(
    mean: Array,
    inv: Array,
    weight: Array | None,
    bias: Array | None,
    /,
    *,
    var: Array | None = None,
    xp: ModuleType | None = None,
) -> tuple[Array, Array]:
    """Per-channel (scale, shift) with y = x * scale + shift = (x - mean) * inv * weight + bias.

    ``var``, the batch variance the mean came with, marks constant channels: var == 0 exactly
    means every x equals the mean, so (x - mean) * inv is exactly 0 and y is exactly the bias;
    scale 0 gives that, where x * scale + shift would round to ulp(mean * inv) ~ 300 ulp(mean).
    """
    xp = _ns(xp, mean, inv)
    scale = _weight_times(inv, weight, xp)
    if var is not None:
        scale = xp.where(var == 0, xp.zeros_like(scale), scale)
    shift = -mean * scale
    if bias is not None:
        shift = shift + _cast(bias, inv.dtype, xp)
    return scale, shift


def scale_shift(
    x: Array,
    scale: Array,
    shift: Array | None,
    /,
    *,
    axis: int,
    xp: ModuleType | None = None,
) -> Array:
    """y = x * scale + shift per channel, computed in the dtype of ``scale``, returned in x's dtype."""
    xp = _ns(xp, x)
    y = _cast(x, scale.dtype, xp)
    y = y * per_channel(scale, x.ndim, axis, xp=xp)
    if shift is not None:
        y = y + per_channel(shift, x.ndim, axis, xp=xp)
    return _cast(y, x.dtype, xp)


def updated_running_stats(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    /,
    *,
    count: int,
    momentum: float,
    xp: ModuleType | None = None,
) -> tuple[Array, Array]:
    """New running (mean, var): (1 - m) * running + m * batch, with the unbiased batch variance.

    ``var`` is the biased batch variance over ``count`` values per channel; the running variance
    takes var * count / (count - 1), as PyTorch does. Results keep the running stats' dtype.
    """
    xp = _ns(xp, running_mean, mean)
    dt = running_mean.dtype
    unbiased = var * (count / (count - 1))
    new_mean = (1.0 - momentum) * running_mean + momentum * _cast(mean, dt, xp)
    new_var = (1.0 - momentum) * running_var + momentum * _cast(unbiased, dt, xp)
    return new_mean, new_var


def backward_reduce(
    dy: Array, x: Array, mean: Array, /, *, axis: int, xp: ModuleType | None = None
) -> tuple[Array, Array]:
    """Per-channel sum(dy) and sum(dy * (x - mean)), accumulated in mean's dtype."""
    xp = _ns(xp, dy, x)
    dt = mean.dtype
    dyc = _cast(dy, dt, xp)
    xc = _cast(x, dt, xp)
    axes = reduction_axes(x.ndim, axis)
    xmu = xc - per_channel(mean, x.ndim, axis, xp=xp)
    return xp.sum(dyc, axis=axes), xp.sum(dyc * xmu, axis=axes)


def backward_coefficients(
    sum_dy: Array,
    sum_dy_xmu: Array,
    inv: Array,
    weight: Array | None,
    /,
    *,
    count: int,
    xp: ModuleType | None = None,
) -> tuple[Array, Array, Array]:
    """Per-channel (k_dy, k_xmu, k_const) with dx = dy * k_dy + (x - mean) * k_xmu + k_const.

    This is dx = gamma * invstd * (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M)
    with the per-channel products hoisted out, so the elementwise pass is two multiply-adds.
    (x - mean) is kept rather than folding mean into k_const: x * k - mean * k cancels in float32
    when |mean| >> std.
    """
    xp = _ns(xp, sum_dy, inv)
    k_dy = _weight_times(inv, weight, xp)
    # inv * (inv * ...) from the inside out: with a tiny eps a constant channel has a huge inv and
    # sum_dy_xmu == 0, and k_dy * inv * inv would overflow to inf before the product with 0 (NaN).
    k_xmu = -k_dy * (inv * (inv * (sum_dy_xmu / count)))
    k_const = -k_dy * sum_dy / count
    return k_dy, k_xmu, k_const


def backward_apply(
    dy: Array,
    x: Array,
    mean: Array,
    k_dy: Array,
    k_xmu: Array,
    k_const: Array,
    /,
    *,
    axis: int,
    xp: ModuleType | None = None,
) -> Array:
    """dx = dy * k_dy + (x - mean) * k_xmu + k_const per channel, in dy's dtype."""
    xp = _ns(xp, dy, x)
    dt = k_dy.dtype
    dyc = _cast(dy, dt, xp)
    xc = _cast(x, dt, xp)
    nd, a = x.ndim, axis
    dx = (
        dyc * per_channel(k_dy, nd, a, xp=xp)
        + (xc - per_channel(mean, nd, a, xp=xp)) * per_channel(k_xmu, nd, a, xp=xp)
        + per_channel(k_const, nd, a, xp=xp)
    )
    return _cast(dx, dy.dtype, xp)


def normalize(
    x: Array,
    mean: Array,
    inv: Array,
    weight: Array | None,
    bias: Array | None,
    /,
    *,
    axis: int,
    var: Array | None = None,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> Array:
    """y = (x - mean) * inv * weight + bias, as one multiply-add per element.

    ``ops`` (an object with the op names of :data:`xbn.backends.OP_NAMES` as attributes, such as
    a :class:`xbn.backends.Ops`) supplies fast paths; by default the functions of this module.
    ``var``: the batch variance, when mean and inv are batch statistics (constant channels then
    give exactly the bias; see :func:`scale_shift_coefficients`).
    """
    xp = _ns(xp, x)
    ops = _GENERIC if ops is None else ops
    scale, shift = scale_shift_coefficients(mean, inv, weight, bias, var=var, xp=xp)
    return ops.scale_shift(x, scale, shift, axis=axis, xp=xp)


def batch_norm_forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    momentum: float = 0.1,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> tuple[Array, Array, Array, Array | None, Array | None]:
    """One training-mode forward: returns (y, mean, invstd, new_running_mean, new_running_var).

    Normalizes with the batch's own statistics and, when running statistics are given, returns
    them moved by ``momentum`` towards the batch's (unbiased variance); otherwise the last two
    are None. This is the whole forward in one op, so a backend can run it as one fused pass
    over the per-channel work (the CUDA kernels do it in the statistics launch).

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.functional import batch_norm_forward
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, inv, rm, rv = batch_norm_forward(x, None, None, np.zeros(1), np.ones(1),
    ...                                           axis=1, eps=0.0, momentum=0.5)
    >>> y.ravel().tolist(), mean.tolist(), inv.tolist(), rm.tolist(), rv.tolist()
    ([-1.0, 1.0], [2.0], [1.0], [1.0], [1.5])
    """
    xp = _ns(xp, x)
    ops = _GENERIC if ops is None else ops
    mean, var = ops.batch_stats(x, axis=axis, xp=xp)
    inv = invstd(var, eps=eps, xp=xp)
    y = normalize(x, mean, inv, weight, bias, axis=axis, var=var, xp=xp, ops=ops)
    if running_mean is None or running_var is None:
        return y, mean, inv, None, None
    new_mean, new_var = updated_running_stats(
        running_mean,
        running_var,
        mean,
        var,
        count=values_per_channel(tuple(x.shape), axis),
        momentum=momentum,
        xp=xp,
    )
    return y, mean, inv, new_mean, new_var


def batch_norm_train(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> tuple[Array, Array, Array]:
    """Batch norm with the batch's own statistics and no running statistics: (y, mean, invstd).

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.functional import batch_norm_train
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, inv = batch_norm_train(x, None, None, axis=1, eps=0.0)
    >>> y.ravel().tolist(), mean.tolist(), inv.tolist()
    ([-1.0, 1.0], [2.0], [1.0])
    """
    xp = _ns(xp, x)
    ops = _GENERIC if ops is None else ops
    y, mean, inv, _, _ = ops.batch_norm_forward(x, weight, bias, None, None, axis=axis, eps=eps, xp=xp)
    return y, mean, inv


def eval_statistics(
    running_mean: Array,
    running_var: Array,
    /,
    *,
    dtype: Any,
    eps: float,
    xp: ModuleType | None = None,
) -> tuple[Array, Array]:
    """(mean, invstd) that an eval-mode forward of an input of ``dtype`` normalizes with.

    They are in the dtype that holds both the input's compute dtype and the running
    statistics' (float64 statistics with float32 input give float64), as
    :func:`batch_norm_inference` computes them; a backward of that forward takes these.
    """
    xp = _ns(xp, running_mean)
    cdt = xp.result_type(compute_dtype(dtype, xp=xp), running_mean.dtype)
    return _cast(running_mean, cdt, xp), invstd(_cast(running_var, cdt, xp), eps=eps, xp=xp)


def batch_norm_inference(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    /,
    *,
    axis: int,
    eps: float = 1e-5,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> Array:
    """Eval-mode forward: ``x`` normalized with the running statistics, which stay as they are.

    y = (x - running_mean) * invstd * weight + bias with invstd = 1 / sqrt(running_var + eps),
    computed in the dtype of :func:`eval_statistics` and returned in x's dtype. One op for the
    whole forward, so that a backend can compute the per-channel coefficients inside its one
    pass over ``x`` (the CUDA kernel does); a zero running variance marks no constant channel.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.functional import batch_norm_inference
    >>> x = np.array([[1.0], [3.0]])
    >>> batch_norm_inference(x, None, np.array([0.5]), np.array([2.0]), np.array([4.0]),
    ...                      axis=1, eps=0.0).ravel().tolist()
    [0.0, 1.0]
    """
    xp = _ns(xp, x)
    ops = _GENERIC if ops is None else ops
    mean, inv = eval_statistics(running_mean, running_var, dtype=x.dtype, eps=eps, xp=xp)
    return normalize(x, mean, inv, weight, bias, axis=axis, xp=xp, ops=ops)


def batch_norm_backward(
    dy: Array,
    x: Array,
    mean: Array,
    inv: Array,
    weight: Array | None,
    /,
    *,
    axis: int,
    batch_stats_used: bool = True,
    need_param_grads: bool = True,
    xp: ModuleType | None = None,
    ops: Any = None,
) -> tuple[Array, Array | None, Array | None]:
    """Backward of batch norm: returns (dx, dgamma, dbeta).

    With ``batch_stats_used`` the mean and invstd were computed from ``x`` itself and dx carries
    their derivative; otherwise (eval mode with running statistics) they were constants and
    dx = dy * gamma * invstd. dgamma = sum(dy * (x - mean)) * invstd and dbeta = sum(dy); they
    are None when ``need_param_grads`` is false and dx does not need the sums either.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.functional import batch_norm_backward
    >>> x = np.array([[1.0], [3.0]]); dy = np.array([[1.0], [0.0]])
    >>> dx, dgamma, dbeta = batch_norm_backward(dy, x, np.array([2.0]), np.array([1.0]), None, axis=1)
    >>> dx.ravel().tolist(), dgamma.tolist(), dbeta.tolist()
    ([0.0, 0.0], [-1.0], [1.0])
    """
    xp = _ns(xp, dy, x)
    ops = _GENERIC if ops is None else ops
    if not batch_stats_used:  # mean and inv were constants: dx needs no reduction
        dx = ops.scale_shift(dy, _weight_times(inv, weight, xp), None, axis=axis, xp=xp)
        if not need_param_grads:
            return dx, None, None
        sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean, axis=axis, xp=xp)
        return dx, sum_dy_xmu * inv, sum_dy
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean, axis=axis, xp=xp)
    count = values_per_channel(x.shape, axis)
    k_dy, k_xmu, k_const = backward_coefficients(sum_dy, sum_dy_xmu, inv, weight, count=count, xp=xp)
    dx = ops.backward_apply(dy, x, mean, k_dy, k_xmu, k_const, axis=axis, xp=xp)
    return dx, sum_dy_xmu * inv, sum_dy


def values_per_channel(shape: tuple[int, ...], axis: int, /) -> int:
    """M: the number of values each channel's statistics are taken over (numel / C)."""
    axis = _channel_axis(len(shape), axis)
    count = 1
    for i, n in enumerate(shape):
        if i != axis:
            count *= n
    return count


_GENERIC = sys.modules[__name__]
