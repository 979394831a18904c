"""Ghost batches: batch norm with statistics of each group of ``size`` samples along axis 0.

Outputs and dx equal those of separate BatchNorms on each group; dgamma and dbeta are their sums.
The groups are computed together: x of shape (N, ...) is viewed as (G, N/G, ...), so each
reduction is one pass over x with per-(group, channel) results, not one pass per group. When
``size`` does not divide N, the last, smaller group is a second such view.

The running statistics move once per call, towards the mean over groups of each group's mean
and unbiased variance (as Keras 2's virtual batches did), so ``num_batches_tracked`` counts calls.

Written once against the Array API: ghost batches take the generic path on every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import functional as F

Array = Any

__all__ = ["Groups", "forward", "backward", "chunks"]


@dataclass(frozen=True)
class Groups:
    """How a batch was split: ``chunks`` of (start, stop, groups) along axis 0."""

    size: int
    chunks: tuple[tuple[int, int, int], ...]


def chunks(n: int, size: int) -> tuple[tuple[int, int, int], ...]:
    """(start, stop, number of groups) of the equal-sized groups, then of the smaller last one.

    >>> chunks(10, 4)
    ((0, 8, 2), (8, 10, 1))
    >>> chunks(8, 4)
    ((0, 8, 2),)
    """
    full = n // size * size
    out = [(0, full, n // size)] if full else []
    if full < n:
        out.append((full, n, 1))
    return tuple(out)


def _grouped(a: Array, start: int, stop: int, groups: int, xp: Any) -> Array:
    part = a[start:stop, ...]
    return xp.reshape(part, (groups, (stop - start) // groups) + tuple(a.shape[1:]))


def _broadcast(v: Array, ndim: int, channel: int, xp: Any) -> Array:
    """A (G, C) array shaped to broadcast over a grouped (G, n, ...) array with channel axis ``channel``."""
    shape = [1] * ndim
    shape[0], shape[channel] = v.shape[0], v.shape[1]
    return xp.reshape(v, tuple(shape))


def _reduced_axes(ndim: int, channel: int) -> tuple[int, ...]:
    return tuple(a for a in range(1, ndim) if a != channel)


def _stats(xg: Array, channel: int, xp: Any) -> tuple[Array, Array]:
    """Per-(group, channel) mean and biased variance, about a shift that keeps constants exact.

    The shift is each group's first value per channel (:func:`xbn.functional.shift_of`): a
    constant channel then gives exactly its value as the mean and exactly 0 as the variance (and
    so y exactly beta), and an infinite one gives torch's infinite mean.
    """
    axes = _reduced_axes(xg.ndim, channel)
    count = math.prod(xg.shape[a] for a in axes)
    first = tuple(slice(None) if a in (0, channel) else slice(0, 1) for a in range(xg.ndim))
    shift = F.shift_of(xg[first], xp=xp)
    mean = xp.reshape(shift, (xg.shape[0], xg.shape[channel])) + xp.sum(xg - shift, axis=axes) / count
    d = xg - _broadcast(mean, xg.ndim, channel, xp)
    return mean, xp.sum(d * d, axis=axes) / count


def forward(
    x: Array,
    weight: Array | None,
    bias: Array | None,
    running_mean: Array | None,
    running_var: Array | None,
    /,
    *,
    axis: int,
    eps: float,
    momentum: float,
    group: int,
    xp: Any,
) -> tuple[Array, Array, Array, Array | None, Array | None, Groups]:
    """(y, mean (G, C), invstd (G, C), new running mean, new running var, groups).

    ``axis`` is the channel axis of ``x`` (not 0); ``group`` the ghost batch size.
    """
    cdt = F.compute_dtype(x.dtype, xp=xp)
    channel = axis + 1
    split = Groups(group, chunks(x.shape[0], group))
    ys, means, variances, invs, unbiased = [], [], [], [], []
    for start, stop, g in split.chunks:
        xg = _grouped(x, start, stop, g, xp)
        xg = xg if xg.dtype == cdt else xp.astype(xg, cdt)
        mean, var = _stats(xg, channel, xp)
        inv = F.invstd(var, eps=eps, xp=xp)
        scale, shift = F.scale_shift_coefficients(mean, inv, weight, bias, var=var, xp=xp)
        y = xg * _broadcast(scale, xg.ndim, channel, xp) + _broadcast(shift, xg.ndim, channel, xp)
        ys.append(
            xp.reshape(
                y if y.dtype == x.dtype else xp.astype(y, x.dtype), (stop - start,) + tuple(x.shape[1:])
            )
        )
        count = math.prod(xg.shape[a] for a in _reduced_axes(xg.ndim, channel))
        means.append(mean)
        variances.append(var)
        invs.append(inv)
        unbiased.append(var * (count / (count - 1)))
    cat = lambda parts: parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)  # noqa: E731
    y, mean, inv = cat(ys), cat(means), cat(invs)
    if running_mean is None or running_var is None:
        return y, mean, inv, None, None, split
    batch_mean = xp.mean(mean, axis=0)
    batch_var = xp.mean(cat(unbiased), axis=0)
    rdt = running_mean.dtype
    new_mean = (1.0 - momentum) * running_mean + momentum * xp.astype(batch_mean, rdt)
    new_var = (1.0 - momentum) * running_var + momentum * xp.astype(batch_var, rdt)
    return y, mean, inv, new_mean, new_var, split


def backward(
    dy: Array,
    x: Array,
    mean: Array,
    inv: Array,
    weight: Array | None,
    /,
    *,
    axis: int,
    groups: Groups,
    xp: Any,
) -> tuple[Array, Array, Array]:
    """(dx, dgamma, dbeta): each group's batch-norm backward; the parameter grads summed over groups."""
    cdt = mean.dtype
    channel = axis + 1
    dxs, dgamma, dbeta, row = [], None, None, 0
    for start, stop, g in groups.chunks:
        xg, dyg = _grouped(x, start, stop, g, xp), _grouped(dy, start, stop, g, xp)
        xg = xg if xg.dtype == cdt else xp.astype(xg, cdt)
        dyg = dyg if dyg.dtype == cdt else xp.astype(dyg, cdt)
        m, iv = mean[row : row + g, ...], inv[row : row + g, ...]
        row += g
        axes = _reduced_axes(xg.ndim, channel)
        xmu = xg - _broadcast(m, xg.ndim, channel, xp)
        sum_dy, sum_dy_xmu = xp.sum(dyg, axis=axes), xp.sum(dyg * xmu, axis=axes)
        count = math.prod(xg.shape[a] for a in axes)
        k_dy, k_xmu, k_const = F.backward_coefficients(sum_dy, sum_dy_xmu, iv, weight, count=count, xp=xp)
        dxg = (
            dyg * _broadcast(k_dy, xg.ndim, channel, xp)
            + xmu * _broadcast(k_xmu, xg.ndim, channel, xp)
            + _broadcast(k_const, xg.ndim, channel, xp)
        )
        dxs.append(
            xp.reshape(
                dxg if dxg.dtype == dy.dtype else xp.astype(dxg, dy.dtype),
                (stop - start,) + tuple(dy.shape[1:]),
            )
        )
        dg, db = xp.sum(sum_dy_xmu * iv, axis=0), xp.sum(sum_dy, axis=0)
        dgamma = dg if dgamma is None else dgamma + dg
        dbeta = db if dbeta is None else dbeta + db
    dx = dxs[0] if len(dxs) == 1 else xp.concat(dxs, axis=0)
    assert dgamma is not None and dbeta is not None
    return dx, dgamma, dbeta
